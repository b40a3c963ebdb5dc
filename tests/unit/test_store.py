"""The encrypted SQLite store: no plaintext on disk, keys, quota, counters."""

import base64
import json
import os
import stat

import pytest

from client.ingest import Ingestor
from client.store import KeyError_, QuotaExceeded, Store, load_key


def _texts(n):
    return [
        f"patient {i} presented with fever and a cough lasting {i % 9 + 1} days, "
        f"ward {i % 5}"
        for i in range(n)
    ]


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


def test_near_duplicates_are_quarantined_and_horizon_survives_restart(tmp_path):
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


def test_near_duplicate_index_finds_exactly_the_band_matches():
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
    digests = np.array([s.digest() for s in sketches], dtype=np.uint32)
    half = len(texts) // 2
    for sketch in sketches[:half]:
        near.add(sketch)
    for i in range(half, len(texts)):
        exact = {
            k
            for k in range(half)
            if any(
                (digests[k, b * 8 : b * 8 + 8] == digests[i, b * 8 : b * 8 + 8]).all()
                for b in range(16)
            )
        }
        assert set(near.lsh.query(sketches[i])) == exact
        agree = max(((digests[list(exact)] == digests[i]).mean(1)), default=0.0)
        assert near.query(sketches[i]) == (agree >= 0.8)


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
