"""Ingestion throughput versus the storage limit, side by side.

* ``pipeline``: records through the whole agent path (gate, PII scrubbing, exact and
  near-duplicate checks, AES-GCM sealing, one durable SQLite transaction a batch);
* ``bare``: the same raw bytes inserted into a plain SQLite WAL table, same batch
  size, same ``synchronous`` setting: the storage limit.

Both run in one process, alternating batch by batch so drift hits both alike. Also
reported: the rate at which DP training consumes records (expected batch / measured
step time, from ``--step-s``), to check that ingestion never holds training back.

Usage: ``python bench/ingest.py [--records 20000] [--batch 256] [--sync FULL]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_records(n: int, seed: int = 0) -> list[bytes]:
    from common.corpus import DOMAINS, generate

    rng = random.Random(seed)
    per = n // len(DOMAINS) + 1
    texts = [t for d in DOMAINS for t in generate(d, per, seed=seed)][:n]
    rng.shuffle(texts)
    out = []
    for i, text in enumerate(texts):
        if i % 10 == 0:  # some PII to scrub
            text += f" Contact: user{i}@example.com or +44 20 7946 {i % 10000:04d}."
        out.append(
            json.dumps({"text": text, "id": f"r{i}", "tags": [f"t{i % 5}"]}).encode()
        )
    for i in range(0, n, 20):  # 5% redeliveries
        out[i] = out[max(i - 1, 0)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sync", choices=["FULL", "NORMAL"], default="FULL")
    p.add_argument(
        "--step-s",
        type=float,
        default=2.67,
        help="measured DP step time (bench/dp_overhead.py, SmolLM2)",
    )
    p.add_argument("--expected-batch", type=int, default=16)
    args = p.parse_args()

    from client.ingest import Ingestor
    from client.store import Store, load_key

    records = make_records(args.records)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(
            Path(tmp) / "store.db", load_key(Path(tmp) / "key"), synchronous=args.sync
        )
        ingestor = Ingestor(store)
        bare = sqlite3.connect(Path(tmp) / "bare.db", isolation_level=None)
        bare.execute("PRAGMA journal_mode=WAL")
        bare.execute(f"PRAGMA synchronous={args.sync}")
        bare.execute("CREATE TABLE r(seq INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        t_pipe = t_bare = 0.0
        for start in range(0, len(records), args.batch):
            chunk = records[start : start + args.batch]
            t0 = time.perf_counter()
            ingestor.submit([(raw, "bench") for raw in chunk])
            t1 = time.perf_counter()
            bare.execute("BEGIN")
            bare.executemany(
                "INSERT INTO r(data) VALUES (?)", [(raw,) for raw in chunk]
            )
            bare.execute("COMMIT")
            t2 = time.perf_counter()
            t_pipe += t1 - t0
            t_bare += t2 - t1
        counters = store.counters()
        store.close()
        bare.close()
    n = len(records)
    pipe_rate, bare_rate = n / t_pipe, n / t_bare
    train_rate = args.expected_batch / args.step_s
    print(
        json.dumps(
            {
                "records": n,
                "batch": args.batch,
                "synchronous": args.sync,
                "pipeline_records_per_s": round(pipe_rate, 1),
                "bare_sqlite_records_per_s": round(bare_rate, 1),
                "ratio_to_storage_limit": round(pipe_rate / bare_rate, 4),
                "dp_training_records_per_s": round(train_rate, 2),
                "ratio_to_training": round(pipe_rate / train_rate, 1),
                "counters": {k: v for k, v in counters.items() if ":" not in k},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
