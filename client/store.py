"""The agent's durable store: SQLite in WAL mode, record content encrypted at rest.

One file ``<data-dir>/store.db`` holds stored records, quarantined inputs with their
reasons, counters that account for every record received, and source offsets. Record
content (text or prompt/response, tags, label, producer id) is sealed with AES-GCM; the
row's dedup key is its associated data, so a payload cannot be moved to another row.
Dedup keys and balancing groups are keyed hashes (HMAC with a key derived from the store
key): nothing in the file is plaintext of a record.

Exact dedup over the whole history: every stored record's two dedup keys (its rid and
its content hash) are kept in sorted runs, a small log-structured merge tree inside the
same file (``dedup``: blocks of ``DEDUP_BLOCK_KEYS`` sorted keys; ``dedup_runs``: one
row a run). A batch appends one run of its own keys, written in key order, and
``DEDUP_FANOUT`` runs of one level are merged into one run of the next, in the same
transaction. Unlike an index over random keys, no insert lands on a random page: a
batch writes a few new pages instead of dirtying hundreds (bench/RESULTS.md, "store
rows"). A lookup reads one block a run; the ingestor asks only about keys its Bloom
filter may hold.

Durability: a batch is one transaction; ``commit`` returns only after SQLite has
committed it (``synchronous=FULL`` by default), so an acknowledged record survives
``kill -9`` and power loss. At the disk quota a whole batch is refused and nothing of
it is written.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import sqlite3
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import FedstreamError

try:
    from client._seal import seal_many as _seal_natively
except ImportError:  # not built: cryptography's AESGCM a record
    _seal_natively = None  # type: ignore[assignment]

try:
    from client._native import dedup_keys, keyed_hashes, sort_keys
except ImportError:  # not built (a Flower App bundle ships sources): hmac per item
    keyed_hashes = None  # type: ignore[assignment]
    from client.near_py import dedup_keys, sort_keys

__all__ = [
    "Conflict",
    "KeyError_",
    "Keys",
    "QuotaExceeded",
    "Store",
    "StoreError",
    "StoredRecord",
    "load_key",
]

KEY_ENV = "FEDSTREAM_STORE_KEY"
_CHECK = b"fedstream store key check v1"

SCHEMA_VERSION = 3
WAL_AUTOCHECKPOINT_PAGES = 10_000
# Dedup keys: b"r" + rid or b"c" + content hash; 224 of them fill a 4 KiB page.
KEY_WIDTH, DEDUP_BLOCK_KEYS, DEDUP_FANOUT = 17, 224, 8

# Version 2: the 12-byte nonce leads the payload (no nonce or nbytes columns) and
# records have no (retired, seq) index: every ledger query scans live records by seq
# anyway, and each column and index costs every insert (bench/RESULTS.md).
# Version 3: no index on rid or chash, the dedup keys live in sorted runs (above);
# seqs are handed out by the store (meta "records_high_water", one update a batch)
# instead of AUTOINCREMENT (a write to sqlite_sequence a row).
_TABLES = {
    "meta": "meta(key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "records": """records(
    seq INTEGER PRIMARY KEY,           -- never handed out twice (records_high_water)
    rid BLOB NOT NULL,                 -- keyed hash of producer id, else of content
    chash BLOB NOT NULL,               -- keyed hash of normalised content
    grp BLOB NOT NULL,                 -- keyed hash of label/first tag (balancing)
    arrived REAL NOT NULL,
    ts REAL NOT NULL,
    payload BLOB NOT NULL,             -- nonce (12 bytes) || AES-GCM ciphertext
    elig INTEGER NOT NULL DEFAULT 0,   -- rounds this record was eligible to train in
    queries INTEGER NOT NULL DEFAULT 0, -- rounds it was counted in (noisy counts)
    retired INTEGER NOT NULL DEFAULT 0
)""",
    "quarantine": """quarantine(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    arrived REAL NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    payload BLOB NOT NULL              -- nonce (12 bytes) || AES-GCM ciphertext
)""",
    "counters": "counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    # privacy spend of records removed by retention, so the host's epsilon never drops
    "spend_archive": """spend_archive(
    elig INTEGER NOT NULL, queries INTEGER NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (elig, queries)
)""",
    "offsets": "offsets(source TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "dedup": """dedup(
    run INTEGER NOT NULL,
    first BLOB NOT NULL,               -- the block's first key
    keys BLOB NOT NULL,                -- up to DEDUP_BLOCK_KEYS sorted keys
    PRIMARY KEY (run, first)
)""",
    "dedup_runs": "dedup_runs(run INTEGER PRIMARY KEY, level INTEGER NOT NULL)",
}
# Version 1 -> 3: the same rows, nonce || payload in one column (|| makes text of
# the bytes; the cast gives them back as a blob, unchanged). 2 -> 3: the same rows
# in a records table without the rid and chash indexes.
_MIGRATE = {
    1: {
        "records": "seq, rid, chash, grp, arrived, ts, "
        "CAST(nonce || payload AS BLOB), elig, queries, retired",
        "quarantine": "seq, arrived, reason, source, CAST(nonce || payload AS BLOB)",
    },
    2: {
        "records": "seq, rid, chash, grp, arrived, ts, payload, elig, queries, retired"
    },
}


# A batch's whole write as one statement (one GIL release for the commit thread, one
# implicit transaction): an insert into a temporary view whose INSTEAD OF trigger
# checks and writes every table. The records' fixed-width keys are cut from three
# blobs, their payloads from a fourth by (ts, start, length) triples in a JSON array
# (a JSON number reads back as the same float: tested), or, when none has a ts of
# its own (they arrive now, the usual case: ``plain``), by their lengths alone, the
# starts summed in SQL (one JSON number a row: 11% less); the quarantine's
# payloads by triples too. ``expect``: the high-water seq the batch was decided at
# (NULL: no check).
_PUT_COLUMNS = (
    "n", "expect", "first", "rids", "chashes", "grps", "now", "payloads",
    "plain", "rows", "dkeys", "dstep", "qrows", "qpay", "counters", "offsets",
)  # fmt: skip
_CONFLICT_MSG = "fedstream: another writer stored records meanwhile"
_PUT_VIEW = (
    f"CREATE TEMP VIEW IF NOT EXISTS put_batch({', '.join(_PUT_COLUMNS)}) AS SELECT "
    + ", ".join(["NULL"] * len(_PUT_COLUMNS))
)
_PUT_TRIGGER = f"""CREATE TEMP TRIGGER IF NOT EXISTS put_batch_rows
INSTEAD OF INSERT ON put_batch BEGIN
SELECT RAISE(ABORT, '{_CONFLICT_MSG}') WHERE NEW.expect IS NOT NULL AND NEW.expect
  != (SELECT CAST(CAST(value AS TEXT) AS INTEGER) FROM meta
      WHERE key = 'records_high_water');
UPDATE meta SET value = CAST(CAST(NEW.first + NEW.n - 1 AS TEXT) AS BLOB)
  WHERE key = 'records_high_water' AND NEW.n > 0;
INSERT INTO dedup SELECT NEW.first + NEW.n - 1, substr(NEW.dkeys, b.at, {KEY_WIDTH}),
  substr(NEW.dkeys, b.at, NEW.dstep) FROM (WITH RECURSIVE blocks(at) AS (
  SELECT 1 WHERE length(NEW.dkeys) > 0 UNION ALL SELECT at + NEW.dstep FROM blocks
  WHERE at + NEW.dstep <= length(NEW.dkeys)) SELECT at FROM blocks) AS b;
INSERT INTO dedup_runs SELECT NEW.first + NEW.n - 1, 0 WHERE NEW.n > 0;
INSERT INTO quarantine(arrived, reason, source, payload)
  SELECT NEW.now, j.value ->> 0, j.value ->> 1,
  substr(NEW.qpay, j.value ->> 2, j.value ->> 3)
  FROM json_each(NEW.qrows) AS j ORDER BY j.key;
INSERT INTO counters SELECT j.key, j.value FROM json_each(NEW.counters) AS j
  WHERE true ON CONFLICT(name) DO UPDATE SET value = value + excluded.value;
INSERT INTO offsets SELECT j.key, j.value FROM json_each(NEW.offsets) AS j
  WHERE true ON CONFLICT(source) DO UPDATE SET value = excluded.value;
INSERT INTO records(seq, rid, chash, grp, arrived, ts, payload)
  SELECT NEW.first + j.key, substr(NEW.rids, j.key * 16 + 1, 16),
  substr(NEW.chashes, j.key * 16 + 1, 16), substr(NEW.grps, j.key * 16 + 1, 16),
  NEW.now, j.value ->> 0, substr(NEW.payloads, j.value ->> 1, j.value ->> 2)
  FROM json_each(CASE WHEN NEW.plain THEN '[]' ELSE NEW.rows END) AS j;
INSERT INTO records(seq, rid, chash, grp, arrived, ts, payload)
  SELECT NEW.first + k, substr(NEW.rids, k * 16 + 1, 16),
  substr(NEW.chashes, k * 16 + 1, 16), substr(NEW.grps, k * 16 + 1, 16),
  NEW.now, NEW.now, substr(NEW.payloads, e - n + 1, n) FROM (
  SELECT j.key AS k, j.value AS n, SUM(j.value) OVER (ORDER BY j.key) AS e
  FROM json_each(CASE WHEN NEW.plain THEN NEW.rows ELSE '[]' END) AS j);
END"""
_PUT = f"INSERT INTO put_batch VALUES ({', '.join(':' + c for c in _PUT_COLUMNS)})"


class StoreError(FedstreamError):
    """The store cannot be opened or written."""


class KeyError_(StoreError):
    """The key does not open this store."""


class QuotaExceeded(StoreError):
    """Storing the batch would exceed the disk quota; nothing was written."""


class Conflict(StoreError):
    """Another writer stored records after the batch's duplicates were decided;
    nothing was written (decide again and retry)."""


def _sorted_keys(parts: list[bytes]) -> bytes:
    """The distinct keys in ``parts`` (single keys or runs), sorted, as one blob."""
    return sort_keys(parts, KEY_WIDTH)


def _block_has(block: bytes, key: bytes) -> bool:
    """Binary search of a block of sorted keys."""
    lo, hi = 0, len(block) // KEY_WIDTH
    while lo < hi:
        mid = (lo + hi) // 2
        got = block[mid * KEY_WIDTH : (mid + 1) * KEY_WIDTH]
        if got == key:
            return True
        if got < key:
            lo = mid + 1
        else:
            hi = mid
    return False


_OPEN_PATIENCE_S = 30.0


def _when_unlocked(step: Callable[[], None]) -> None:
    """``step``, again while another process holds the lock it needs (processes
    opening a new store at once: the agent and a ClientApp); SQLite's own busy
    timeout does not cover every lock taken on opening. Gives up after
    ``_OPEN_PATIENCE_S`` seconds with the error."""
    deadline = time.monotonic() + _OPEN_PATIENCE_S
    delay = 0.005
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as err:
            locked = "locked" in str(err) or "busy" in str(err)
            if not locked or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def load_key(key_file: Path | None, *, create: bool = True) -> bytes:
    """The 32-byte store key from ``$FEDSTREAM_STORE_KEY`` (base64) or a key file.

    A missing key file is created with mode 0600 when ``create`` is true.
    """
    env = os.environ.get(KEY_ENV)
    if env:
        try:
            key = base64.b64decode(env, validate=True)
        except ValueError:
            raise KeyError_(f"{KEY_ENV} is not base64") from None
        if len(key) != 32:
            raise KeyError_(f"{KEY_ENV} must hold 32 bytes (base64), got {len(key)}")
        return key
    if key_file is None:
        raise KeyError_(f"no store key: set {KEY_ENV} or store.key_file")
    if key_file.exists():
        if key_file.stat().st_mode & 0o077:
            raise KeyError_(
                f"key file {key_file} is readable by others; chmod 600 {key_file}"
            )
        key = base64.b64decode(key_file.read_bytes().strip())
        if len(key) != 32:
            raise KeyError_(f"key file {key_file} must hold 32 bytes in base64")
        return key
    if not create:
        raise KeyError_(f"key file {key_file} does not exist")
    key = AESGCM.generate_key(bit_length=256)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(base64.b64encode(key) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


class Keys:
    """The store key's two uses, apart from the store (client.front's worker
    processes get one): AES-GCM sealing of record content, and keyed hashes (HMAC
    with a key derived from the store key)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.aead = AESGCM(key)
        self.mac = hmac.new(key, b"fedstream hash key v1", hashlib.sha256).digest()

    def __reduce__(self) -> tuple[type[Keys], tuple[bytes]]:
        return Keys, (self.key,)

    def keyed_hash(self, data: bytes) -> bytes:
        return hmac.digest(self.mac, data, "sha256")[:16]

    def keyed_hashes(self, prefix: bytes, items: list[str]) -> list[bytes]:
        """``keyed_hash(prefix + item.encode())`` of each item."""
        if keyed_hashes is not None:
            return keyed_hashes(self.mac, prefix, items)
        return [self.keyed_hash(prefix + item.encode()) for item in items]

    def seal(
        self, obj: dict[str, Any], aad: bytes, nonce: bytes | None = None
    ) -> bytes:
        """``nonce || AES-GCM(obj as JSON)``."""
        nonce = nonce or os.urandom(12)
        try:
            blob = orjson.dumps(obj)
        except TypeError:  # e.g. a lone surrogate: orjson refuses what json writes
            blob = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        return nonce + self.aead.encrypt(nonce, blob, aad)

    def seal_batch(
        self, contents: list[dict[str, Any]], rids: bytes
    ) -> tuple[bytes, array[int]]:
        """``seal_many`` of a batch, with the rids back to back as aads: the
        payloads back to back, and their ``len(contents) + 1`` start offsets.
        Natively where client._seal is built and finds libcrypto (the same
        bytes; measured 2.1 -> 0.4 us a record), else as ``seal_many``."""
        nonces = os.urandom(12 * len(contents))
        if _seal_natively is not None:
            done = _seal_natively(self.key, contents, rids, nonces)
            if done is not None:
                starts = array("Q")
                starts.frombytes(done[1])
                return done[0], starts
        payloads = self.seal_many(
            contents,
            [rids[i : i + 16] for i in range(0, len(rids), 16)],
            nonces,
        )
        return b"".join(payloads), array(
            "Q", itertools.accumulate(map(len, payloads), initial=0)
        )

    def seal_many(
        self,
        contents: list[dict[str, Any]],
        aads: list[bytes],
        nonces: bytes | None = None,
    ) -> list[bytes]:
        """``seal`` of each content with its aad (the record's rid); one random
        96-bit nonce each."""
        if nonces is None:
            nonces = os.urandom(12 * len(contents))
        nonces_ = [nonces[i : i + 12] for i in range(0, len(nonces), 12)]
        encrypt, dumps = self.aead.encrypt, orjson.dumps
        try:
            return [
                nonce + encrypt(nonce, dumps(c), aad)
                for nonce, c, aad in zip(nonces_, contents, aads, strict=True)
            ]
        except TypeError:  # what orjson refuses, json may write: as seal
            return [
                self.seal(c, aad, nonce)
                for nonce, c, aad in zip(nonces_, contents, aads, strict=True)
            ]


@dataclass(frozen=True)
class StoredRecord:
    seq: int
    content: dict[str, Any]  # text or prompt/response, tags, label, id
    arrived: float
    ts: float
    elig: int


@dataclass
class Batch:
    """Rows to write in one transaction (built by the ingest pipeline). The records
    are columns: 16-byte keyed hashes back to back (rid, content hash, balancing
    group), their ts, and their sealed payloads back to back with their lengths."""

    rids: bytes = b""
    chashes: bytes = b""
    groups: bytes = b""
    tss: list[float] = field(default_factory=list)  # 0 = time of arrival
    payloads: bytes = b""  # nonce || AES-GCM(content), aad = rid (Keys.seal_many)
    lengths: list[int] = field(default_factory=list)
    quarantine: list[tuple[str, str, bytes]] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, str] = field(default_factory=dict)
    # The records' high-water seq when their duplicates were decided: if another
    # writer stored records since, ``commit`` raises ``Conflict`` (None: no check).
    decided_at: int | None = None

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


class Store:
    def __init__(
        self,
        path: Path,
        key: bytes,
        *,
        quota_bytes: int = 0,
        synchronous: str = "FULL",
    ) -> None:
        self.path = path
        self.quota_bytes = quota_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
            _when_unlocked(self._set_wal)
            self.db.execute(f"PRAGMA synchronous={synchronous}")
            # Checkpoint the WAL every ~40 MB instead of SQLite's ~4 MB: the random
            # dedup-key indexes dirty hundreds of pages a batch, and each checkpoint
            # copies them back (bench/RESULTS.md, "store rows": +15-20% at
            # 100,000 records). Durability is the WAL's either way.
            self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            _when_unlocked(self._create_or_migrate)
        except sqlite3.DatabaseError as err:
            raise StoreError(f"cannot open store {path}: {err}") from None
        self.keys = Keys(key)
        self._aead = self.keys.aead
        self._reader: sqlite3.Connection | None = None  # dedup lookups
        self._runs_since_merge = self.db.execute(
            "SELECT COUNT(*) FROM dedup_runs WHERE level=0"
        ).fetchone()[0]
        self.db.execute(_PUT_VIEW)
        self.db.execute(_PUT_TRIGGER)
        self._check_key()

    def _set_wal(self) -> None:
        """WAL mode, kept in the file: set by the first opener only (setting it
        takes a lock that SQLite's busy timeout does not wait for)."""
        mode = self.db.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            self.db.execute("PRAGMA journal_mode=WAL")

    def _create_or_migrate(self) -> None:
        """Create the tables, or bring a store of an older layout to this one, in one
        transaction (two processes may open the store at once: one migrates)."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            have = {r[0] for r in cur.execute("SELECT name FROM sqlite_master")}
            version = SCHEMA_VERSION
            if "records" in have:
                row = cur.execute(
                    "SELECT value FROM meta WHERE key='schema_version'"
                ).fetchone()
                version = 1 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has layout {version}, newer than this "
                    f"fedstream's {SCHEMA_VERSION}; upgrade fedstream"
                )
            for name, table in _TABLES.items():
                if name in _MIGRATE.get(version, {}):
                    self._rebuild_table(cur, name, table, _MIGRATE[version][name])
                else:
                    cur.execute(f"CREATE TABLE IF NOT EXISTS {table}")
            if version < SCHEMA_VERSION:
                self._carry_high_water(cur)
                cur.execute("DROP INDEX IF EXISTS records_live")
                cur.execute("DROP INDEX IF EXISTS records_chash")
                self._rebuild_dedup(cur)
            cur.execute(
                "INSERT INTO meta VALUES('schema_version', ?) ON CONFLICT(key) "
                "DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION).encode(),),
            )
            cur.execute(
                "INSERT OR IGNORE INTO meta "
                "VALUES('records_high_water', CAST('0' AS BLOB))"
            )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    @staticmethod
    def _rebuild_table(
        cur: sqlite3.Cursor, name: str, table: str, columns: str
    ) -> None:
        # AUTOINCREMENT: the new table continues the old one's sequence, so a seq
        # is never handed out twice (the ledger keys records by seq).
        row = cur.execute(
            "SELECT seq FROM sqlite_sequence WHERE name=?", (name,)
        ).fetchone()
        cur.execute(f"CREATE TABLE {table.replace(name, name + '_new', 1)}")
        cur.execute(f"INSERT INTO {name}_new SELECT {columns} FROM {name}")
        cur.execute(f"DROP TABLE {name}")
        cur.execute(f"ALTER TABLE {name}_new RENAME TO {name}")
        if row is not None:
            cur.execute("DELETE FROM sqlite_sequence WHERE name=?", (name,))
            cur.execute("INSERT INTO sqlite_sequence VALUES(?, ?)", (name, row[0]))

    @staticmethod
    def _carry_high_water(cur: sqlite3.Cursor) -> None:
        """Layouts 1 and 2 counted seqs in sqlite_sequence (AUTOINCREMENT)."""
        row = cur.execute(
            "SELECT MAX(seq) FROM (SELECT seq FROM sqlite_sequence WHERE "
            "name='records' UNION ALL SELECT MAX(seq) FROM records)"
        ).fetchone()
        cur.execute(
            "INSERT OR REPLACE INTO meta VALUES('records_high_water', ?)",
            (str(int(row[0] or 0)).encode(),),
        )

    # -- dedup keys: sorted runs ------------------------------------------------------
    @staticmethod
    def _add_run(cur: sqlite3.Cursor, run: int, level: int, keys: bytes) -> None:
        step = KEY_WIDTH * DEDUP_BLOCK_KEYS
        cur.executemany(
            "INSERT INTO dedup VALUES (?, ?, ?)",
            [
                (run, keys[i : i + KEY_WIDTH], keys[i : i + step])
                for i in range(0, len(keys), step)
            ],
        )
        cur.execute("INSERT INTO dedup_runs VALUES (?, ?)", (run, level))

    @staticmethod
    def _run_keys(cur: sqlite3.Cursor, run: int) -> bytes:
        rows = cur.execute("SELECT keys FROM dedup WHERE run=? ORDER BY first", (run,))
        return b"".join(r[0] for r in rows)

    @staticmethod
    def _compact(cur: sqlite3.Cursor) -> None:
        """Merge every ``DEDUP_FANOUT`` runs of a level into one of the next."""
        while True:
            full = cur.execute(
                "SELECT level FROM dedup_runs GROUP BY level HAVING COUNT(*) >= ? "
                "ORDER BY level LIMIT 1",
                (DEDUP_FANOUT,),
            ).fetchone()
            if full is None:
                return
            runs = [
                int(r[0])
                for r in cur.execute(
                    "SELECT run FROM dedup_runs WHERE level=? ORDER BY run", (full[0],)
                )
            ]
            merged = _sorted_keys([Store._run_keys(cur, run) for run in runs])
            marks = ",".join("?" * len(runs))
            cur.execute(f"DELETE FROM dedup WHERE run IN ({marks})", runs)
            cur.execute(f"DELETE FROM dedup_runs WHERE run IN ({marks})", runs)
            Store._add_run(cur, runs[-1], int(full[0]) + 1, merged)

    def _rebuild_dedup(self, cur: sqlite3.Cursor) -> None:
        """The dedup keys of the records stored now, as one run (migration, purge)."""
        cur.execute("DELETE FROM dedup")
        cur.execute("DELETE FROM dedup_runs")
        keys: list[bytes] = []
        for rid, chash in cur.execute("SELECT rid, chash FROM records"):
            keys += (b"r" + rid, b"c" + chash)
        if keys:
            # its own level, above any the batches' runs reach by merging
            self._add_run(cur, self._high_water(cur), 1_000, _sorted_keys(keys))

    @staticmethod
    def _high_water(cur: sqlite3.Cursor | sqlite3.Connection) -> int:
        row = cur.execute(
            "SELECT value FROM meta WHERE key='records_high_water'"
        ).fetchone()
        return 0 if row is None else int(row[0])

    def high_water(self) -> int:
        """The largest seq ever handed out (records purged since included)."""
        return self._high_water(self.db)

    def _stored_keys(self, keys: list[bytes]) -> set[bytes]:
        if not keys:
            return set()
        found: set[bytes] = set()
        # Its own connection: lookups for the next batch run while this one's
        # commit is in flight (Ingestor.submit_stream). One snapshot: a merge by
        # another writer cannot move keys between the reads.
        if self._reader is None:
            self._reader = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
        cur = self._reader.cursor()
        cur.execute("BEGIN")
        try:
            runs = [r[0] for r in cur.execute("SELECT run FROM dedup_runs")]
            for key in keys:
                for run in runs:
                    row = cur.execute(
                        "SELECT keys FROM dedup WHERE run=? AND first<=? "
                        "ORDER BY first DESC LIMIT 1",
                        (run, key),
                    ).fetchone()
                    if row is not None and _block_has(row[0], key):
                        found.add(key)
                        break
        finally:
            cur.execute("COMMIT")
        return found

    # -- keys -----------------------------------------------------------------------
    def _check_key(self) -> None:
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, _CHECK, b"meta")
        # Two processes may create the store at once (agent and ClientApp): the first
        # key check written wins, and every process verifies its key against it.
        self.db.execute("INSERT OR IGNORE INTO meta VALUES('key_check', ?)", (sealed,))
        row = self.db.execute("SELECT value FROM meta WHERE key='key_check'").fetchone()
        try:
            self._aead.decrypt(row[0][:12], row[0][12:], b"meta")
        except InvalidTag:
            raise KeyError_(
                f"the key does not open store {self.path} (it was created with another "
                "key); nothing was changed. Use the original key file or "
                f"${KEY_ENV}"
            ) from None

    def keyed_hash(self, data: bytes) -> bytes:
        return self.keys.keyed_hash(data)

    def keyed_hashes(self, prefix: bytes, items: list[str]) -> list[bytes]:
        """``keyed_hash(prefix + item.encode())`` of each item."""
        return self.keys.keyed_hashes(prefix, items)

    def _seal(
        self, obj: dict[str, Any], aad: bytes, nonce: bytes | None = None
    ) -> bytes:
        return self.keys.seal(obj, aad, nonce)

    def _open(self, payload: bytes, aad: bytes) -> dict[str, Any]:
        try:
            blob = self._aead.decrypt(payload[:12], payload[12:], aad)
        except InvalidTag:
            raise StoreError(f"a payload in {self.path} fails authentication") from None
        try:
            return orjson.loads(blob)  # type: ignore[no-any-return]
        except orjson.JSONDecodeError:  # what json wrote where orjson could not
            return json.loads(blob)  # type: ignore[no-any-return]

    # -- writes ---------------------------------------------------------------------
    def known(self, rids: Iterable[bytes]) -> set[bytes]:
        """The rids among ``rids`` that a stored record has."""
        return {k[1:] for k in self._stored_keys([b"r" + r for r in rids])}

    def content_known(self, chashes: Iterable[bytes]) -> set[bytes]:
        """The content hashes among ``chashes`` that a stored record has."""
        return {k[1:] for k in self._stored_keys([b"c" + c for c in chashes])}

    def commit(self, batch: Batch) -> list[int]:
        """Write ``batch`` in one transaction; returns the new records' seq numbers.

        Raises ``QuotaExceeded`` (nothing written) if the quota would be exceeded.
        """
        return self.begin_commit(batch)()

    def begin_commit(self, batch: Batch) -> Callable[[], list[int]]:
        """``commit`` in two steps: this one, which does not touch the database
        (it may run while another batch commits), seals the quarantine and lays
        the batch out as one statement's parameters; the function it returns
        writes it all in one statement (the commit thread's whole job: one wait
        for the disk, one for the GIL; every ``DEDUP_FANOUT`` batches the dedup
        runs are merged in the same transaction). On any error nothing is
        written."""
        now = time.time()
        n = len(batch.tss)
        if not (
            len(batch.rids) == len(batch.chashes) == len(batch.groups) == 16 * n
            and len(batch.lengths) == n
            and sum(batch.lengths) == len(batch.payloads)
        ):
            raise ValueError("a batch's record columns differ in length")
        qrows, qpay, at = [], [], 1
        for reason, source, raw in batch.quarantine:
            payload = self._seal({"raw": base64.b64encode(raw).decode()}, b"q")
            qrows.append((reason, source, at, len(payload)))
            qpay.append(payload)
            at += len(payload)
        keys = dedup_keys(batch.rids, batch.chashes) if n else b""
        plain = not any(batch.tss)
        if plain:
            rows = orjson.dumps(batch.lengths).decode()
        else:
            starts = itertools.accumulate(batch.lengths, initial=1)
            rows = orjson.dumps(
                [
                    (ts or now, start, length)
                    for ts, start, length in zip(
                        batch.tss, starts, batch.lengths, strict=False
                    )
                ]
            ).decode()
        params: dict[str, Any] = {
            "n": n,
            "expect": batch.decided_at if n else None,
            "first": 0,  # set under the write lock, below
            "rids": batch.rids,
            "chashes": batch.chashes,
            "grps": batch.groups,
            "now": now,
            "payloads": batch.payloads,
            "plain": plain,
            "rows": rows,
            "dkeys": keys,
            "dstep": KEY_WIDTH * DEDUP_BLOCK_KEYS,  # a block of keys
            "qrows": orjson.dumps(qrows).decode(),
            "qpay": b"".join(qpay),
            "counters": orjson.dumps(batch.counters).decode(),
            "offsets": orjson.dumps(batch.offsets).decode(),
        }

        def finish() -> list[int]:
            cur = self.db.cursor()
            try:
                merge = n and self._runs_since_merge + 1 >= DEDUP_FANOUT
                if merge or self.quota_bytes or (n and params["expect"] is None):
                    # the quota (a sum over the store: only where one is set) or
                    # the seqs (no check asked) are read under the write lock, and
                    # every DEDUP_FANOUT batches the dedup runs are merged in it
                    cur.execute("BEGIN IMMEDIATE")
                    if params["expect"] is None and n:
                        params["expect"] = self._high_water(cur)
                    adding = len(batch.payloads) + len(params["qpay"])
                    if self.quota_bytes and (
                        self.bytes_used() + adding > self.quota_bytes
                    ):
                        raise QuotaExceeded(
                            f"store {self.path} is at its quota ({self.quota_bytes} "
                            "bytes); raise store.quota_bytes or lower "
                            "store.retention_days"
                        )
                top = params["expect"] or 0
                params["first"] = top + 1
                try:
                    cur.execute(_PUT, params)
                except sqlite3.IntegrityError as err:
                    if _CONFLICT_MSG in str(err):
                        raise Conflict(
                            f"another writer stored records in {self.path} meanwhile"
                        ) from None
                    raise
                if merge:
                    self._compact(cur)
                if self.db.in_transaction:
                    cur.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    cur.execute("ROLLBACK")
                raise
            if n:
                self._runs_since_merge = 0 if merge else self._runs_since_merge + 1
            return list(range(top + 1, top + 1 + n))

        return finish

    # -- reads ----------------------------------------------------------------------
    def bytes_used(self) -> int:
        row = self.db.execute(
            "SELECT (SELECT COALESCE(SUM(length(payload)),0) FROM records) + "
            "(SELECT COALESCE(SUM(length(payload)),0) FROM quarantine)"
        ).fetchone()
        return int(row[0])

    def counters(self) -> dict[str, int]:
        return {
            k: int(v) for k, v in self.db.execute("SELECT name, value FROM counters")
        }

    def offset(self, source: str) -> str | None:
        row = self.db.execute("SELECT value FROM offsets WHERE source=?", (source,))
        got = row.fetchone()
        return None if got is None else str(got[0])

    def count(self, *, live: bool = True) -> int:
        sql = "SELECT COUNT(*) FROM records" + (" WHERE retired=0" if live else "")
        return int(self.db.execute(sql).fetchone()[0])

    def iter_records(self, seqs: Iterable[int] | None = None) -> Iterator[StoredRecord]:
        if seqs is None:
            cur = self.db.execute(
                "SELECT seq, rid, arrived, ts, elig, payload FROM records ORDER BY seq"
            )
        else:
            seqs = list(seqs)
            marks = ",".join("?" * len(seqs))
            cur = self.db.execute(
                "SELECT seq, rid, arrived, ts, elig, payload FROM records "
                f"WHERE seq IN ({marks}) ORDER BY seq",
                seqs,
            )
        for seq, rid, arrived, ts, elig, payload in cur:
            yield StoredRecord(seq, self._open(payload, rid), arrived, ts, elig)

    # -- stream ledger ----------------------------------------------------------------
    def recent(self, n: int) -> list[int]:
        """Seqs of the ``n`` newest live records."""
        rows = self.db.execute(
            "SELECT seq FROM records WHERE retired=0 ORDER BY seq DESC LIMIT ?", (n,)
        )
        return sorted(int(r[0]) for r in rows)

    def max_seq(self) -> int:
        return int(
            self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()[0]
        )

    def live_summary(
        self, last_seq: int, top: int
    ) -> list[tuple[bool, bytes, int, int, int]]:
        """(fresh?, group, eligible rounds, counted rounds, records) of live records."""
        rows = self.db.execute(
            "SELECT seq > ?, grp, elig, queries, COUNT(*) FROM records "
            "WHERE retired=0 AND seq <= ? GROUP BY seq > ?, grp, elig, queries",
            (last_seq, top, last_seq),
        )
        return [(bool(a), bytes(b), int(c), int(d), int(e)) for a, b, c, d, e in rows]

    def iter_live(self, top: int) -> Iterator[tuple[int, bytes, int, int]]:
        """Stream (seq, group, eligible rounds, counted rounds) of live records."""
        cur = self.db.execute(
            "SELECT seq, grp, elig, queries FROM records WHERE retired=0 AND seq <= ? "
            "ORDER BY seq",
            (top,),
        )
        for seq, grp, elig, queries in cur:
            yield int(seq), bytes(grp), int(elig), int(queries)

    def meta_int(self, key: str, default: int = 0) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def meta_json(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta_json(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO meta VALUES(?, ?) ON CONFLICT(key) DO UPDATE "
            "SET value = excluded.value",
            (key, json.dumps(value).encode()),
        )

    def apply_round(
        self,
        *,
        top: int,
        retire: list[tuple[int, int]],
        eligible: list[int],
        meta: dict[str, int],
        extra: list[int] | None = None,
        extra_queries: int = 0,
    ) -> tuple[int, int]:
        """One round's privacy spend, in one transaction: retire the records whose
        (eligible, counted) spend is in ``retire``, charge every other live record one
        count query, and every record in ``eligible`` one eligible round; records in
        ``extra`` (the drift sample) are charged ``extra_queries`` more count queries.
        Returns (records retired, live records)."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            retired = 0
            for elig, queries in retire:
                cur.execute(
                    "UPDATE records SET retired=1 WHERE retired=0 AND seq <= ? "
                    "AND elig=? AND queries=?",
                    (top, elig, queries),
                )
                retired += cur.rowcount
            cur.execute(
                "UPDATE records SET queries = queries + 1 WHERE retired=0 AND seq <= ?",
                (top,),
            )
            live = cur.rowcount
            cur.executemany(
                "UPDATE records SET elig = elig + 1 WHERE seq=?",
                [(s,) for s in eligible],
            )
            if extra and extra_queries:
                cur.executemany(
                    "UPDATE records SET queries = queries + ? WHERE seq=?",
                    [(extra_queries, s) for s in extra],
                )
            cur.executemany(
                "INSERT INTO meta VALUES(?, ?) ON CONFLICT(key) DO UPDATE "
                "SET value = excluded.value",
                [(k, str(v).encode()) for k, v in meta.items()],
            )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return retired, live

    def spend(self) -> list[tuple[int, int, int]]:
        """Distinct (eligible rounds, counted rounds, records) over every record ever
        stored, those removed by retention included."""
        rows = self.db.execute(
            "SELECT elig, queries, SUM(n) FROM ("
            " SELECT elig, queries, COUNT(*) AS n FROM records GROUP BY elig, queries"
            " UNION ALL SELECT elig, queries, n FROM spend_archive"
            ") GROUP BY elig, queries ORDER BY elig, queries"
        )
        return [(int(a), int(b), int(c)) for a, b, c in rows]

    def purge(self, older_than: float) -> int:
        """Retention: delete records and quarantined inputs that arrived before
        ``older_than`` (epoch seconds), archiving the records' privacy spend."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute(
                "INSERT INTO spend_archive(elig, queries, n) "
                "SELECT elig, queries, COUNT(*) FROM records WHERE arrived < ? "
                "GROUP BY elig, queries "
                "ON CONFLICT(elig, queries) DO UPDATE SET n = n + excluded.n",
                (older_than,),
            )
            cur.execute("DELETE FROM records WHERE arrived < ?", (older_than,))
            removed = cur.rowcount
            if removed:
                self._rebuild_dedup(cur)
            cur.execute("DELETE FROM quarantine WHERE arrived < ?", (older_than,))
            cur.execute(
                "INSERT INTO counters VALUES('purged', ?) ON CONFLICT(name) "
                "DO UPDATE SET value = value + excluded.value",
                (removed,),
            )
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return int(removed)

    def quarantined(self) -> Iterator[tuple[str, str, bytes]]:
        for reason, source, payload in self.db.execute(
            "SELECT reason, source, payload FROM quarantine ORDER BY seq"
        ):
            raw = base64.b64decode(self._open(payload, b"q")["raw"])
            yield reason, source, raw

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self.db.close()
