"""What the store's row layout costs in SQLite, against the bare row of bench/ingest.py.

The same random rows (16-byte keyed hashes, a 190-byte sealed payload) go into one
table per layout, in batches of 256 in one transaction each (``synchronous=FULL``,
WAL), layouts interleaved batch by batch; CPU per record (``time.process_time``,
Python's sqlite3 binding included, as in the store). Layouts:

* ``store``: the records table of client/store.py's layout 2 (AUTOINCREMENT, a
  UNIQUE index on the 16-byte rid, an index on the 16-byte content hash);
* ``no_autoincrement``: the same without AUTOINCREMENT;
* ``no_indexes``: the same columns without the two indexes (exact dedup would then
  need another structure);
* ``int64_keys``: both indexes on 64-bit integers instead of 16-byte blobs;
* ``sorted_runs``: ``no_indexes`` plus the dedup keys as the store keeps them since
  layout 3: a sorted run a batch, merged level by level (``Store._add_run``,
  ``Store._compact``);
* ``bare``: ``(seq INTEGER PRIMARY KEY, data BLOB)``, bench/ingest.py's storage limit.

Usage: ``python bench/store_rows.py [--batches 80] [--batch 256]``. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from client.store import _TABLES, Store

_COLS = (
    "grp BLOB NOT NULL, arrived REAL NOT NULL, ts REAL NOT NULL, "
    "payload BLOB NOT NULL, elig INTEGER NOT NULL DEFAULT 0, "
    "queries INTEGER NOT NULL DEFAULT 0, "
    "retired INTEGER NOT NULL DEFAULT 0"
)
LAYOUTS = {
    "store": (
        "seq INTEGER PRIMARY KEY AUTOINCREMENT, rid BLOB NOT NULL UNIQUE, "
        f"chash BLOB NOT NULL, {_COLS}",
        True,
    ),
    "no_autoincrement": (
        "seq INTEGER PRIMARY KEY, rid BLOB NOT NULL UNIQUE, "
        f"chash BLOB NOT NULL, {_COLS}",
        True,
    ),
    "no_indexes": (
        f"seq INTEGER PRIMARY KEY AUTOINCREMENT, rid BLOB NOT NULL, "
        f"chash BLOB NOT NULL, {_COLS}",
        False,
    ),
    "int64_keys": (
        "seq INTEGER PRIMARY KEY AUTOINCREMENT, rid INTEGER NOT NULL UNIQUE, "
        f"chash INTEGER NOT NULL, {_COLS}",
        True,
    ),
    "sorted_runs": (
        f"seq INTEGER PRIMARY KEY AUTOINCREMENT, rid BLOB NOT NULL, "
        f"chash BLOB NOT NULL, {_COLS}",
        False,
    ),
    "bare": ("seq INTEGER PRIMARY KEY, data BLOB NOT NULL", False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=80)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument(
        "--cache-mib", type=int, default=0, help="PRAGMA cache_size (0: SQLite's 2 MiB)"
    )
    p.add_argument("--mmap-mib", type=int, default=0, help="PRAGMA mmap_size")
    p.add_argument(
        "--autocheckpoint", type=int, default=0, help="PRAGMA wal_autocheckpoint"
    )
    args = p.parse_args()
    spent = dict.fromkeys(LAYOUTS, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        conns = {}
        for name, (columns, chash_index) in LAYOUTS.items():
            db = sqlite3.connect(Path(tmp) / f"{name}.db", isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if args.cache_mib:
                db.execute(f"PRAGMA cache_size=-{args.cache_mib * 1024}")
            if args.autocheckpoint:
                db.execute(f"PRAGMA wal_autocheckpoint={args.autocheckpoint}")
            if args.mmap_mib:
                db.execute(f"PRAGMA mmap_size={args.mmap_mib << 20}")
            db.execute(f"CREATE TABLE r({columns})")
            if chash_index:
                db.execute("CREATE INDEX r_chash ON r(chash)")
            if name == "sorted_runs":
                for table in ("dedup", "dedup_runs"):
                    db.execute(f"CREATE TABLE {_TABLES[table]}")
            conns[name] = db
        for _ in range(args.batches):
            rows = [
                (os.urandom(16), os.urandom(16), b"g" * 16, 1.0, 1.0, os.urandom(190))
                for _ in range(args.batch)
            ]
            for name, db in conns.items():
                if name == "bare":
                    sql = "INSERT INTO r(data) VALUES (?)"
                    params = [(r[5],) for r in rows]
                else:
                    sql = (
                        "INSERT INTO r(rid, chash, grp, arrived, ts, payload) "
                        "VALUES (?,?,?,?,?,?)"
                    )
                    params = rows
                    if name == "int64_keys":
                        params = [
                            (
                                int.from_bytes(r[0][:8], "little", signed=True),
                                int.from_bytes(r[1][:8], "little", signed=True),
                                *r[2:],
                            )
                            for r in rows
                        ]
                t0 = time.process_time()
                db.execute("BEGIN IMMEDIATE")
                db.executemany(sql, params)
                if name == "sorted_runs":  # as Store.commit: one run, then merges
                    run = db.execute("SELECT last_insert_rowid()").fetchone()[0]
                    keys = [b"r" + r[0] for r in rows] + [b"c" + r[1] for r in rows]
                    cur = db.cursor()
                    Store._add_run(cur, run, 0, b"".join(sorted(keys)))
                    Store._compact(cur)
                db.execute("COMMIT")
                spent[name] += time.process_time() - t0
        for db in conns.values():
            db.close()
    n = args.batches * args.batch
    us = {name: round(s / n * 1e6, 2) for name, s in spent.items()}
    print(
        json.dumps(
            {
                "records": n,
                "batch": args.batch,
                "cache_mib": args.cache_mib or 2,
                "mmap_mib": args.mmap_mib,
                "wal_autocheckpoint": args.autocheckpoint or 1000,
                "cpu_us_per_record": us,
                "store_over_bare": round(us["store"] / us["bare"], 2),  # layout 2
                "sorted_runs_over_bare": round(us["sorted_runs"] / us["bare"], 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
