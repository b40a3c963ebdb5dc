"""The encrypted SQLite store: no plaintext on disk, keys, quota, counters."""

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from client.ingest import Ingestor
from client.store import KeyError_, QuotaExceeded, Store, load_key


def _texts(n):
    return [
        f"patient {i} presented with fever and a cough lasting {i % 9 + 1} days, "
        f"ward {i % 5}"
        for i in range(n)
    ]


@pytest.fixture(params=["native", "python"])
def near_impl(request, monkeypatch):
    """client._native, and its pure-Python twin for unbuilt source trees."""
    if request.param == "python":
        import client.front
        import client.ingest
        import client.near_py

        for name in ("KeyFilter", "NearIndex"):
            monkeypatch.setattr(client.ingest, name, getattr(client.near_py, name))
        monkeypatch.setattr(client.front, "sketches", client.near_py.sketches)
    return request.param


def _open(tmp_path, **kw):
    return Store(tmp_path / "store.db", load_key(tmp_path / "store.key"), **kw)


def test_database_files_hold_no_plaintext(tmp_path):
    store = _open(tmp_path)
    texts = _texts(50)
    acks = Ingestor(store).submit(
        [
            (
                json.dumps(
                    {
                        "text": t,
                        "tags": ["cardiology"],
                        "label": "triage",
                        "id": f"mrn-{i}",
                    }
                ).encode(),
                "t",
            )
            for i, t in enumerate(texts)
        ]
        + [(b'{"text": 5, "note": "quarantined secret words"}', "t")]
    )
    assert sum(a.status == "STORED" for a in acks) == 50
    assert [r.content["text"] for r in store.iter_records()] == texts
    store.close()
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    for needle in [
        b"patient",
        b"fever",
        b"cardiology",
        b"triage",
        b"mrn-",
        b"secret words",
    ]:
        assert needle not in blob


def test_key_file_is_private_and_a_wrong_key_changes_nothing(tmp_path, monkeypatch):
    store = _open(tmp_path)
    Ingestor(store).submit([(json.dumps({"text": t}).encode(), "t") for t in _texts(5)])
    store.close()
    key_file = tmp_path / "store.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    before = (tmp_path / "store.db").read_bytes()
    monkeypatch.setenv("FEDSTREAM_STORE_KEY", base64.b64encode(os.urandom(32)).decode())
    with pytest.raises(KeyError_, match="does not open store"):
        Store(tmp_path / "store.db", load_key(key_file))
    assert (tmp_path / "store.db").read_bytes() == before
    monkeypatch.setenv("FEDSTREAM_STORE_KEY", "not base64!")
    with pytest.raises(KeyError_, match="base64"):
        load_key(key_file)
    monkeypatch.delenv("FEDSTREAM_STORE_KEY")
    key_file.chmod(0o644)
    with pytest.raises(KeyError_, match="chmod 600"):
        load_key(key_file)


def test_quota_refuses_a_whole_batch_and_writes_nothing(tmp_path):
    store = _open(tmp_path, quota_bytes=6000)
    ing = Ingestor(store)
    first = ing.submit([(json.dumps({"text": t}).encode(), "t") for t in _texts(20)])
    assert all(a.status == "STORED" for a in first)
    used, counters = store.bytes_used(), store.counters()
    with pytest.raises(QuotaExceeded, match="quota"):
        ing.submit(
            [(json.dumps({"text": t + " more"}).encode(), "t") for t in _texts(40)]
        )
    assert store.bytes_used() == used and store.counters() == counters
    assert store.count() == 20


def test_counters_account_for_every_input(tmp_path):
    store = _open(tmp_path)
    ing = Ingestor(store)
    items = [
        (json.dumps({"text": t, "id": str(i)}).encode(), "t")
        for i, t in enumerate(_texts(30))
    ]
    items += items[:5]  # redelivery: duplicates
    items += [(b"\xc3\x28", "t"), (b"{}", "t"), (b"[]", "t")]
    ing.submit(items)
    c = store.counters()
    assert c["received"] == len(items) == 38
    assert c["received"] == c["stored"] + c["duplicates"] + c["quarantined"]
    assert (c["stored"], c["duplicates"], c["quarantined"]) == (30, 5, 3)
    assert sum(v for k, v in c.items() if k.startswith("quarantined:")) == 3


def test_key_filter_never_misses_and_both_implementations_agree():
    """The Bloom filter in front of the exact-duplicate lookups: every added key is
    a "maybe" (no false negatives), the false-positive rate is what its size gives,
    and the native filter and its pure-Python twin answer alike."""
    import random

    from client._native import KeyFilter
    from client.near_py import KeyFilter as PyKeyFilter

    rng = random.Random(3)
    keys = [rng.randbytes(16) for _ in range(6000)]
    added, others = keys[:3000], keys[3000:]
    native, python = KeyFilter(log2_bits=14, k=4), PyKeyFilter(log2_bits=14, k=4)
    for f in (native, python):
        for start in range(0, len(added), 700):
            f.add(added[start : start + 700])
        assert len(f) == 3000
        assert f.maybe(added) == added
    assert native.maybe(others) == python.maybe(others)
    # 3,000 keys in 16,384 bits, 4 probes: (1 - e^(-12000/16384))^4 = 0.064
    rate = len(native.maybe(others)) / len(others)
    assert 0.04 < rate < 0.09, rate
    with pytest.raises(TypeError):
        native.add([b"short"])
    with pytest.raises(ValueError):
        KeyFilter(log2_bits=40, k=4)


def test_duplicates_stored_by_another_writer_are_still_found(tmp_path, near_impl):
    """The filter is loaded when an ingestor starts and refreshed before each batch
    with what was stored since, also through another connection (another process
    sharing the store): redeliveries and copies are found as before."""
    store = _open(tmp_path)
    ing = Ingestor(store)
    first = [
        (json.dumps({"text": t, "id": f"a{i}"}).encode(), "t")
        for i, t in enumerate(_texts(40))
    ]
    assert {a.status for a in ing.submit(first[:20])} == {"STORED"}
    other = _open(tmp_path)  # a second writer on the same file
    assert {a.status for a in Ingestor(other).submit(first[20:])} == {"STORED"}
    other.close()
    copy = json.loads(first[30][0])["text"]
    acks = ing.submit(
        [
            first[5],  # stored by this ingestor
            first[25],  # stored by the other writer
            (json.dumps({"text": copy, "id": "b1"}).encode(), "t"),  # its content
            (json.dumps({"text": "a note about the weather on tuesday"}).encode(), "t"),
        ]
    )
    assert [(a.status, a.reason) for a in acks] == [
        ("DUPLICATE", "already stored"),
        ("DUPLICATE", "already stored"),
        ("QUARANTINED", "duplicate"),
        ("STORED", ""),
    ]
    store.close()
    store = _open(tmp_path)  # a restarted agent loads the filter from the store
    acks = Ingestor(store).submit(first[:1] + first[39:])
    assert [a.status for a in acks] == ["DUPLICATE", "DUPLICATE"]
    c = store.counters()
    assert c["received"] == c["stored"] + c["duplicates"] + c["quarantined"]


def _runs(store):
    """{run: (level, keys)} of the store's sorted dedup runs, checking each."""
    from client.store import KEY_WIDTH

    out = {}
    for run, level in store.db.execute("SELECT run, level FROM dedup_runs"):
        blocks = store.db.execute(
            "SELECT first, keys FROM dedup WHERE run=? ORDER BY first", (run,)
        ).fetchall()
        keys = [b[i : i + KEY_WIDTH] for _, b in blocks for i in range(0, len(b), 17)]
        assert all(first == b[:KEY_WIDTH] for first, b in blocks)
        assert keys == sorted(set(keys)), f"run {run} is not sorted and distinct"
        out[run] = (level, keys)
    return out


def test_dedup_keys_live_in_sorted_runs_merged_level_by_level(tmp_path, monkeypatch):
    """Every batch adds one sorted run of its records' keys; FANOUT runs of a level
    become one of the next; after every commit each stored record's rid and content
    hash are in exactly one run, lookups find them, and absent keys are not found."""
    import client.store
    from client.store import DEDUP_FANOUT, KEY_WIDTH

    monkeypatch.setattr(client.store, "DEDUP_BLOCK_KEYS", 5)  # many blocks a run
    store = _open(tmp_path)
    ing = Ingestor(store)
    texts = [f"{t} batch note {i}" for i, t in enumerate(_texts(3 * 70))]
    levels_seen = set()
    for b in range(70):
        batch = texts[3 * b : 3 * b + 3]
        acks = ing.submit(
            [
                (json.dumps({"text": t, "id": f"k{b}.{j}"}).encode(), "t")
                for j, t in enumerate(batch)
            ]
        )
        assert {a.status for a in acks} == {"STORED"}
        runs = _runs(store)
        per_level = {}
        for level, _ in runs.values():
            per_level[level] = per_level.get(level, 0) + 1
        assert max(per_level.values()) < DEDUP_FANOUT
        levels_seen |= set(per_level)
        keys = [k for _, ks in runs.values() for k in ks]
        assert len(keys) == len(set(keys)) == 2 * 3 * (b + 1)
    assert levels_seen >= {0, 1, 2}  # 70 batches: runs of 1, 8 and 64 batches
    stored = list(store.db.execute("SELECT rid, chash FROM records"))
    assert store.known([r for r, _ in stored]) == {r for r, _ in stored}
    assert store.content_known([c for _, c in stored]) == {c for _, c in stored}
    absent = [os.urandom(KEY_WIDTH - 1) for _ in range(50)]
    assert store.known(absent) == store.content_known(absent) == set()
    # rids are not content hashes: the kinds do not answer for each other
    assert store.known([c for _, c in stored[:5]]) == set()
    again = ing.submit([(json.dumps({"text": texts[0], "id": "k0.0"}).encode(), "t")])
    assert again[0].status == "DUPLICATE"
    store.close()


def test_purge_removes_the_dedup_keys_of_purged_records(tmp_path):
    """Retention deletes records and their dedup keys: a purged record, redelivered,
    is new again; the records kept are still found."""
    store = _open(tmp_path)
    ing = Ingestor(store)
    old = [
        (json.dumps({"text": t, "id": f"o{i}"}).encode(), "t")
        for i, t in enumerate(_texts(10))
    ]
    ing.submit(old)
    store.db.execute("UPDATE records SET arrived = 1.0 WHERE seq <= 4")
    assert store.purge(older_than=2.0) == 4
    runs = _runs(store)
    assert len(runs) == 1 and len(next(iter(runs.values()))[1]) == 2 * 6
    acks = Ingestor(store).submit([old[0], old[9]])
    assert [a.status for a in acks] == ["STORED", "DUPLICATE"]
    store.close()


def test_a_record_stored_by_another_writer_meanwhile_is_decided_again(tmp_path):
    """Duplicates are decided before the commit: if another writer stores the same
    record in between, the commit refuses (nothing written) and the batch is
    decided again, so the record is stored once."""
    from client.store import Conflict

    store = _open(tmp_path)
    other = _open(tmp_path)
    ing = Ingestor(store)
    record = (json.dumps({"text": "a note on the night shift handover"}).encode(), "t")
    fresh = (
        json.dumps({"text": "another note on ward rounds", "id": "x"}).encode(),
        "t",
    )
    real_commit = store.begin_commit
    raced = []

    def commit_after_the_other_writer(batch):
        finish = real_commit(batch)

        def write():
            if not raced:
                raced.append(Ingestor(other).submit([record])[0].status)
            try:
                return finish()
            except Conflict:
                raced.append("conflict")
                raise

        return write

    store.begin_commit = commit_after_the_other_writer
    acks = ing.submit([record, fresh])
    assert raced == ["STORED", "conflict"]
    assert [a.status for a in acks] == ["DUPLICATE", "STORED"]
    assert store.count() == 2
    store.close()
    other.close()


def test_near_duplicates_are_quarantined_and_horizon_survives_restart(
    tmp_path, near_impl
):
    store = _open(tmp_path)
    base = (
        "the quarterly report shows revenue growth in every region with strong "
        "demand for the new product line and stable costs"
    )
    Ingestor(store).submit([(json.dumps({"text": base}).encode(), "t")])
    store.close()
    store = _open(tmp_path)  # a restarted agent rebuilds its near-duplicate horizon
    acks = Ingestor(store).submit(
        [
            (
                json.dumps(
                    {"text": base.replace("stable costs", "stable prices")}
                ).encode(),
                "t",
            ),
            (
                json.dumps(
                    {"text": "an unrelated note about the weather on tuesday"}
                ).encode(),
                "t",
            ),
        ]
    )
    assert [a.reason for a in acks] == ["near_duplicate", ""]
    reasons = [q[0] for q in store.quarantined()]
    assert reasons == ["near_duplicate"]


def test_near_duplicate_index_finds_exactly_the_band_matches(near_impl):
    """The native LSH index proposes exactly the records that share a whole band
    (16 bands of 8 rows) with the query, and verification is digest agreement."""
    import numpy as np

    from client.ingest import NearDuplicates

    near = NearDuplicates(horizon=10_000, threshold=0.8)
    texts = [
        f"{w} cups of {f} with {n} spoons, then stir for {m} minutes and serve"
        for w in ("one", "two", "three")
        for f in ("rice", "flour", "sugar", "oats")
        for n in range(6)
        for m in range(5)
    ]
    sketches = near.sketch_many(texts)
    digests = np.frombuffer(sketches, dtype=np.uint32).reshape(len(texts), 128)
    half = len(texts) // 2
    keys = [near.add(sketches, row) for row in range(half)]
    assert keys == list(range(half))
    for i in range(half, len(texts)):
        exact = {
            k
            for k in range(half)
            if any(
                (digests[k, b * 8 : b * 8 + 8] == digests[i, b * 8 : b * 8 + 8]).all()
                for b in range(16)
            )
        }
        assert near.index.candidates(sketches, i) == exact
        agree = max(((digests[list(exact)] == digests[i]).mean(1)), default=0.0)
        assert near.query(sketches, i) == (agree >= 0.8)


def test_near_duplicate_sketches_are_rensas(near_impl):
    """Tokens cut and hashed natively give rensa's own sketches of the Python
    shingles, ASCII or not, short or long."""
    import numpy as np
    from rensa import RMinHash

    from client._native import token_hash
    from client.ingest import NearDuplicates, shingles

    texts = [
        *_texts(200),
        "",
        "a",
        "a b",
        "a b c",
        "!!! x",
        "snake_case and-dash 12.5%",
    ]
    texts += ["café au lait, très bien servi à midi", "ελληνικά κείμενα εδώ"]
    near = NearDuplicates(horizon=100, threshold=0.8)
    got = np.frombuffer(near.sketch_many(texts), dtype=np.uint32)
    want = [m.digest() for m in RMinHash.from_token_sets(map(shingles, texts), 128, 17)]
    assert np.array_equal(got.reshape(len(texts), 128), np.array(want, np.uint32))
    tokens = ["", "a", "abcdefgh", "abcdefghi", "x" * 16, "y" * 17, "é ü", "z" * 100]
    ours = [token_hash(t.encode()) for t in tokens]
    assert ours == RMinHash.hash_token_sets([tokens])[0]


def test_near_duplicate_index_is_bounded_and_forgets_a_failed_batch(near_impl):
    """The horizon holds the newest records; removing the newest keys (a failed
    commit) leaves the index as it was, so later adds evict the same records."""
    from client.ingest import NearDuplicates

    texts = [
        f"record number {i} says something entirely its own {i * 7919}"
        for i in range(12)
    ]
    near = NearDuplicates(horizon=5, threshold=0.8)
    sk = near.sketch_many(texts)
    for row in range(5):
        near.add(sk, row)
    assert len(near) == 5 and near.query(sk, 0)
    near.add(sk, 5)  # evicts record 0
    assert len(near) == 5 and not near.query(sk, 0) and near.query(sk, 1)
    pending = [near.add(sk, row) for row in (6, 7)]  # evict 1 and 2
    for key in pending:
        near.remove(key)
    assert len(near) == 3 and not near.query(sk, 6)
    near.add(sk, 8)
    near.add(sk, 9)  # the freed slots: nothing more is evicted
    assert len(near) == 5 and all(near.query(sk, r) for r in (3, 4, 5, 8, 9))
    near.add(sk, 10)  # now the oldest (3) leaves
    assert not near.query(sk, 3) and near.query(sk, 4)


def _open_and_report(args):
    path, key = args
    from pathlib import Path

    from client.store import Store

    Store(Path(path), key).close()
    return "ok"


def test_many_processes_creating_one_store_at_once(tmp_path):
    """The agent and a ClientApp may open a new store at the same moment."""
    from concurrent.futures import ProcessPoolExecutor

    key = load_key(tmp_path / "store.key")
    with ProcessPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(_open_and_report, [(str(tmp_path / "s.db"), key)] * 12))
    assert results == ["ok"] * 12
    Store(tmp_path / "s.db", key).close()
    with pytest.raises(KeyError_):
        Store(tmp_path / "s.db", os.urandom(32))


_V1_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE records(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, rid BLOB NOT NULL UNIQUE,
    chash BLOB NOT NULL, grp BLOB NOT NULL, arrived REAL NOT NULL, ts REAL NOT NULL,
    nbytes INTEGER NOT NULL, nonce BLOB NOT NULL, payload BLOB NOT NULL,
    elig INTEGER NOT NULL DEFAULT 0, queries INTEGER NOT NULL DEFAULT 0,
    retired INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX records_chash ON records(chash);
CREATE INDEX records_live ON records(retired, seq);
CREATE TABLE quarantine(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, arrived REAL NOT NULL, reason TEXT NOT NULL,
    source TEXT NOT NULL, nbytes INTEGER NOT NULL, nonce BLOB NOT NULL,
    payload BLOB NOT NULL
);
"""


_V2_RECORDS = """
CREATE TABLE records(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, rid BLOB NOT NULL UNIQUE,
    chash BLOB NOT NULL, grp BLOB NOT NULL, arrived REAL NOT NULL, ts REAL NOT NULL,
    payload BLOB NOT NULL, elig INTEGER NOT NULL DEFAULT 0,
    queries INTEGER NOT NULL DEFAULT 0, retired INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX records_chash ON records(chash);
"""


@pytest.mark.parametrize("layout", [1, 2])
def test_a_store_of_an_older_layout_is_migrated_on_open(tmp_path, layout):
    """A store written with layout 1 (nonce and nbytes columns) or 2 (indexes on the
    dedup keys, no sorted runs) opens: its records, quarantine, ledger columns and
    seq sequence carry over, it still deduplicates against them (ids and content),
    and it says it is at layout 3."""
    import sqlite3

    from client.store import SCHEMA_VERSION

    store = _open(tmp_path)
    texts = _texts(7)
    items = [
        (json.dumps({"text": t, "id": f"r{i}"}).encode(), "t")
        for i, t in enumerate(texts[:6])
    ]
    Ingestor(store).submit([*items, (b"not json", "t")])
    store.apply_round(top=6, retire=[], eligible=[2, 3], meta={})
    store.purge(older_than=0)  # nothing: every record is newer
    before = [(r.seq, r.content, r.elig) for r in store.iter_records()]
    quarantined = list(store.quarantined())
    store.close()
    # Rewrite the file in the old layout, as that release wrote it.
    db = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    rows = db.execute(
        "SELECT seq, rid, chash, grp, arrived, ts, payload, elig, queries, retired "
        "FROM records"
    ).fetchall()
    qrows = db.execute("SELECT seq, arrived, reason, source, payload FROM quarantine")
    qrows = qrows.fetchall()
    db.execute("DELETE FROM records WHERE seq = 6")  # the newest seq is gone
    kept = [r for r in rows if r[0] != 6]
    if layout == 1:
        db.executescript(
            "BEGIN; ALTER TABLE records RENAME TO r2; ALTER TABLE quarantine RENAME "
            "TO q2; DROP TABLE r2; DROP TABLE q2; DROP TABLE dedup; "
            "DROP TABLE dedup_runs; DELETE FROM meta WHERE key='schema_version';"
            + _V1_SCHEMA.replace(
                "CREATE TABLE meta(key TEXT PRIMARY KEY, value BLOB NOT NULL);", ""
            )
            + "COMMIT;"
        )
        db.executemany(
            "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [(*r[:6], len(r[6]) - 12, r[6][:12], r[6][12:], *r[7:]) for r in kept],
        )
        db.executemany(
            "INSERT INTO quarantine VALUES (?,?,?,?,?,?,?)",
            [(*q[:4], len(q[4]) - 12, q[4][:12], q[4][12:]) for q in qrows],
        )
    else:
        db.executescript(
            "BEGIN; ALTER TABLE records RENAME TO r2; DROP TABLE r2; "
            "DROP TABLE dedup; DROP TABLE dedup_runs; "
            "UPDATE meta SET value = CAST('2' AS BLOB) WHERE key='schema_version';"
            + _V2_RECORDS
            + "COMMIT;"
        )
        db.executemany("INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?)", kept)
    db.execute("UPDATE sqlite_sequence SET seq = 6 WHERE name = 'records'")
    db.close()

    store = _open(tmp_path)
    assert store.meta_int("schema_version") == SCHEMA_VERSION == 3
    cols = [r[1] for r in store.db.execute("PRAGMA table_info(records)")]
    assert "nonce" not in cols and "nbytes" not in cols
    indexes = [
        r[0]
        for r in store.db.execute("SELECT name FROM sqlite_master WHERE type='index'")
    ]
    assert not [i for i in indexes if "records" in i], indexes
    assert [(r.seq, r.content, r.elig) for r in store.iter_records()] == before[:5]
    assert list(store.quarantined()) == quarantined
    copy = (json.dumps({"text": texts[1], "id": "other"}).encode(), "t")
    acks = Ingestor(store).submit(
        [items[0], copy, (json.dumps({"text": texts[6]}).encode(), "t")]
    )
    assert [(a.status, a.reason) for a in acks] == [
        ("DUPLICATE", "already stored"),
        ("QUARANTINED", "duplicate"),
        ("STORED", ""),
    ]
    assert acks[2].seq == 7  # seq 6 was handed out once; never again
    store.close()
    _open(tmp_path).close()  # opening a migrated store again changes nothing


def test_native_and_python_near_duplicates_decide_alike(tmp_path, monkeypatch):
    """The bench's stream through both implementations: the same acknowledgements."""
    import sys

    import client.front
    import client.ingest
    import client.near_py

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from ingest import make_records

    records = make_records(3000)
    acks = []
    for impl in ("native", "python"):
        if impl == "python":
            for name in ("KeyFilter", "NearIndex"):
                monkeypatch.setattr(client.ingest, name, getattr(client.near_py, name))
            monkeypatch.setattr(client.front, "sketches", client.near_py.sketches)
        store = Store(tmp_path / f"{impl}.db", load_key(tmp_path / "key"))
        ing = Ingestor(store)
        acks.append(
            [
                (a.status, a.reason)
                for i in range(0, len(records), 256)
                for a in ing.submit([(r, "b") for r in records[i : i + 256]])
            ]
        )
        store.close()
    assert acks[0] == acks[1]
    assert sum(a == ("QUARANTINED", "near_duplicate") for a in acks[0]) > 50


@pytest.mark.parametrize("sha_extensions", [True, False])
def test_batched_keyed_hashes_are_the_stores_keyed_hash(tmp_path, sha_extensions):
    """The native HMAC-SHA256 (with and without the CPU's SHA extensions) gives the
    store's keyed hashes byte for byte, so existing stores still deduplicate."""
    import random

    from client import _native

    rng = random.Random(0)
    items = ["", "a", "x" * 55, "y" * 56, "z" * 64, "é" * 40, "ü" * 300]
    items += [
        "".join(rng.choice("ab ç\n") for _ in range(rng.randrange(400)))
        for _ in range(300)
    ]
    store = _open(tmp_path)
    before = _native.sha_extensions()
    try:
        _native.use_sha_extensions(sha_extensions)
        for prefix in (b"c:", b"i:", b"g:", b""):
            want = [store.keyed_hash(prefix + t.encode()) for t in items]
            assert store.keyed_hashes(prefix, items) == want
    finally:
        _native.use_sha_extensions(before)
    store.close()


def test_records_keep_their_exact_ts_and_content(tmp_path):
    """The records of a batch go into SQLite in one statement (their ts through a
    JSON array): every ts reads back as the same float, every payload opens to its
    content."""
    import random

    rng = random.Random(5)
    tss = [rng.uniform(0, 1e11 - 1) for _ in range(300)] + [1e-7, 5e-324, 0.1, 1 / 3]
    store = _open(tmp_path)
    items = [
        (
            json.dumps(
                {"text": f"reading {i} of sensor {i * 7919 % 1000}", "ts": ts}
            ).encode(),
            "t",
        )
        for i, ts in enumerate(tss)
    ]
    acks = Ingestor(store, near_threshold=1.01).submit(items)
    assert {a.status for a in acks} == {"STORED"}
    got = list(store.iter_records())
    assert [r.ts for r in got] == tss
    assert [r.content["text"] for r in got] == [json.loads(r)["text"] for r, _ in items]
    assert [r.seq for r in got] == [a.seq for a in acks] == list(range(1, len(tss) + 1))


def test_sorting_dedup_keys_natively_and_in_python_agree():
    """client._native.sort_keys (the store's runs and merges) and its Python twin:
    the distinct keys of single keys and run blobs, sorted bytewise."""
    import random

    from client._native import sort_keys as native
    from client.near_py import sort_keys as python

    rng = random.Random(11)
    keys = [bytes(rng.randrange(4) for _ in range(17)) for _ in range(3000)]
    runs = [b"".join(sorted(set(keys[i : i + 300]))) for i in range(0, 3000, 300)]
    for parts in ([], keys, runs, [*runs, *keys[:50]], [b"\x00" * 17, b"\x00" * 17]):
        got = native(parts, 17)
        assert got == python(parts, 17)
        every = {p[i : i + 17] for p in parts for i in range(0, len(p), 17)}
        assert got == b"".join(sorted(every))
    assert native(keys, 17) == b"".join(sorted(set(keys)))
    # a merge of runs, not a sort: unsorted blobs, odd run counts, other widths
    for width in (1, 3, 17):
        for _ in range(40):
            parts = [
                bytes(rng.randrange(3) for _ in range(width * rng.randrange(9)))
                for _ in range(rng.randrange(7))
            ]
            assert native(parts, width) == python(parts, width)
    for bad in (([b"abc"], 17), ([b"a" * 17], 0), (["x" * 17], 17)):
        with pytest.raises((ValueError, TypeError)):
            native(*bad)
        with pytest.raises((ValueError, TypeError)):
            python(*bad)


def test_batch_column_helpers_natively_and_in_python_agree():
    """gather, gather_var, dedup_keys and KeyFilter on blobs: client._native and its
    Python twin give the same, and the same as plain slicing."""
    import random
    from array import array

    import client._native as native
    import client.near_py as python

    rng = random.Random(2)
    keys = bytes(rng.randrange(256) for _ in range(16 * 300))
    keys += keys[:160]  # ten keys twice
    idx = sorted(rng.sample(range(310), 120))
    for mod in (native, python):
        assert mod.gather(keys, 16, idx) == b"".join(
            keys[16 * i : 16 * i + 16] for i in idx
        )
        assert mod.gather(keys, 16, []) == b""
        with pytest.raises(IndexError):
            mod.gather(keys, 16, [310])
    payloads = [
        bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        for _ in range(50)
    ]
    starts = array("Q", [0])
    for p in payloads:
        starts.append(starts[-1] + len(p))
    blob = b"".join(payloads)
    pick = [3, 0, 49, 7, 7]
    expected = (b"".join(payloads[i] for i in pick), [len(payloads[i]) for i in pick])
    assert native.gather_var(blob, starts, pick) == expected
    assert python.gather_var(blob, starts, pick) == expected
    for mod in (native, python):
        with pytest.raises(IndexError):
            mod.gather_var(blob, starts, [50])
        with pytest.raises(ValueError):
            mod.gather_var(blob[:-1], starts, [0])
    chashes = keys[16 * 5 : 16 * 205]
    run = native.dedup_keys(keys, chashes)
    assert run == python.dedup_keys(keys, chashes)
    every = {b"r" + keys[i : i + 16] for i in range(0, len(keys), 16)}
    every |= {b"c" + chashes[i : i + 16] for i in range(0, len(chashes), 16)}
    assert run == b"".join(sorted(every)) and len(run) == 17 * (300 + 200)
    for mod in (native, python):
        f = mod.KeyFilter(log2_bits=20, k=4)
        f.add(keys[: 16 * 100])
        listed = [keys[i : i + 16] for i in range(0, len(keys), 16)]
        assert f.maybe(keys) == f.maybe(listed)
        assert set(listed[:100]) <= set(f.maybe(keys))
        assert len(f) == 100


def test_batch_decisions_natively_and_in_python_agree():
    """NearIndex.decide on key blobs, with the in-flight batch's keys counting as
    stored: native and Python give the same verdicts, and index the same records."""
    import random

    import client._native as native
    import client.near_py as python
    from client.front import sketch_texts

    rng = random.Random(4)
    texts = [
        " ".join(rng.choice("abcdefgh") * rng.randint(1, 3) for _ in range(12))
        for _ in range(200)
    ]
    texts += texts[:20]  # exact copies: near-duplicates when their keys differ
    sketches = sketch_texts(texts, 128, 17)
    rids = [rng.randbytes(16) for _ in texts]
    chashes = [rng.randbytes(16) for _ in texts]
    rids[30], chashes[31], rids[40] = rids[10], chashes[11], b"p" * 16
    known_rids, known_content = {rids[50]}, {chashes[60]}
    prev_r, prev_c = b"p" * 16 + rng.randbytes(16), chashes[70] + rng.randbytes(16)
    got = []
    for mod in (native, python):
        idx = mod.NearIndex(num_perm=128, bands=16, horizon=500, threshold=0.8)
        got.append(
            idx.decide(
                sketches,
                b"".join(rids),
                b"".join(chashes),
                known_rids,
                known_content,
                prev_r,
                prev_c,
            )
        )
        assert len(idx) == sum(v >= 0 for v in got[-1])
    assert got[0] == got[1]
    v = got[0]
    assert v[30] == v[40] == v[50] == -2 and v[31] == v[60] == v[70] == -3
    assert -1 in v[200:]  # copies under other keys are near-duplicates


def test_decide_on_short_sketches_raises_with_nothing_indexed():
    """decide() checks its inputs before it decides (it then runs without the GIL):
    sketches for fewer records than keys are an IndexError, and nothing is kept."""
    import client._native as native

    idx = native.NearIndex(num_perm=128, bands=16, horizon=100, threshold=0.8)
    keys = bytes(range(32))
    with pytest.raises(IndexError):
        idx.decide(b"\0" * 512, keys, keys, set(), set(), b"", b"")
    assert len(idx) == 0
    got = idx.decide(b"\1" * 1024, keys, keys[16:] + keys[:16], set(), set(), b"", b"")
    assert got == [0, -1]  # the second's sketch is the first's: a near-duplicate
    assert len(idx) == 1


def test_a_replay_looks_up_no_content_of_records_whose_id_is_stored(tmp_path):
    """A record whose id is stored is a duplicate by id whatever its content, so a
    replay asks the store only about ids; a record with a new id and stored content
    still has its content looked up (and is quarantined as a duplicate)."""
    store = _open(tmp_path)
    ing = Ingestor(store)
    first = [
        (json.dumps({"text": f"pump {i} serviced", "id": f"p{i}"}).encode(), "t")
        for i in range(20)
    ]
    assert {a.status for a in ing.submit(first)} == {"STORED"}
    asked = []
    real = store._stored_keys

    def spy(keys):
        asked.append(sorted(k[:1] for k in keys))
        return real(keys)

    store._stored_keys = spy
    replay = ing.submit(first)  # ids and contents all stored
    assert [a.reason for a in replay] == ["already stored"] * 20
    assert asked == [[b"r"] * 20, []]  # ids only
    asked.clear()
    copy = (json.dumps({"text": "pump 3 serviced", "id": "new"}).encode(), "t")
    acks = ing.submit([first[5], copy])
    assert [(a.status, a.reason) for a in acks] == [
        ("DUPLICATE", "already stored"),
        ("QUARANTINED", "duplicate"),
    ]
    assert asked == [[b"r"], [b"c"]]  # the new id's content, not the replay's


def test_sealing_a_batch_natively_gives_the_bytes_of_aesgcm(tmp_path, monkeypatch):
    """Keys.seal_batch through client._seal (libcrypto's AES-GCM, JSON written
    natively) and through cryptography's AESGCM with orjson: the same payloads for
    the same nonces, each opening to its content with its rid; a content that is
    not plain str/list values takes the Python path, still sealed."""
    import random

    import client._seal as native
    import client.store
    from client.store import Keys

    assert native.available()  # CI builds it and has libcrypto (Python's own)
    rng = random.Random(5)
    keys = Keys(bytes(rng.randrange(256) for _ in range(32)))
    alphabet = 'ab "\\\n\t\x01\x1f\x7fé☃'
    contents = [
        {
            "text": "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))),
            **({"label": "l"} if i % 3 == 0 else {}),
            **({"id": f"id{i}"} if i % 2 == 0 else {}),
            **({"tags": [f"t{k}" for k in range(i % 4)]} if i % 5 else {}),
        }
        for i in range(200)
    ]
    rids = bytes(rng.randrange(256) for _ in range(16 * len(contents)))
    nonces = bytes(rng.randrange(256) for _ in range(12 * len(contents)))
    monkeypatch.setattr(client.store.os, "urandom", lambda n: nonces[:n])
    got, starts = keys.seal_batch(contents, rids)
    monkeypatch.setattr(client.store, "_seal_natively", None)
    want, want_starts = keys.seal_batch(contents, rids)
    assert got == want and list(starts) == list(want_starts)
    store = _open(tmp_path)
    store.keys = keys
    store._aead = keys.aead
    for j, content in enumerate(contents):
        payload = got[starts[j] : starts[j + 1]]
        assert store._open(payload, rids[16 * j : 16 * j + 16]) == content
    odd = [{"text": "x", "n": 3}]  # not the gate's shape: Python's path
    assert native.seal_many(keys.key, odd, rids[:16], nonces[:12]) is None
    monkeypatch.setattr(client.store, "_seal_natively", native.seal_many)
    blob, cuts = keys.seal_batch(odd, rids[:16])
    assert store._open(blob[cuts[0] : cuts[1]], rids[:16]) == odd[0]
