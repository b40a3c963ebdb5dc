"""Ingestion throughput versus the storage limit, side by side.

* ``pipeline``: records through the whole agent path (gate, PII scrubbing, exact and
  near-duplicate checks, AES-GCM sealing, one durable SQLite transaction a batch) as
  the agent's stream sources (JSONL tail, Kafka) feed it: ``Ingestor.submit_stream``,
  batch k+1 checked while batch k commits;
* ``unary``: the same path one ``Ingestor.submit`` call a batch, each waiting for its
  commit (a gRPC ``PushBatch`` call); a store of its own, the same records;
* ``bare``: the same raw bytes inserted into a plain SQLite WAL table, same batch
  size, same ``synchronous`` setting: the storage limit.

All three run in one process, alternating every ``--chunk`` batches so drift hits
them alike (the stream starts afresh each chunk: its first batch is not overlapped).
Also reported: the rate at which DP training consumes records (expected batch /
measured step time, from ``--step-s``), to check that ingestion never holds training
back.

Usage: ``python bench/ingest.py [--records 20000] [--batch 256] [--chunk 32]
[--sync FULL]``. Prints one JSON object.
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
    p.add_argument("--chunk", type=int, default=32, help="batches between switches")
    p.add_argument(
        "--workers", type=int, default=1, help="pipeline: worker processes (0: none)"
    )
    p.add_argument("--sync", choices=["FULL", "NORMAL"], default="FULL")
    p.add_argument(
        "--no-rotate",
        dest="rotate",
        action="store_false",
        help="always pipeline, unary, bare (the order before 2026-12-01, later)",
    )
    p.add_argument(
        "--step-s",
        type=float,
        default=2.67,
        help="measured DP step time (bench/dp_overhead.py, SmolLM2)",
    )
    p.add_argument("--expected-batch", type=int, default=16)
    args = p.parse_args()

    from client.front import tune_process
    from client.ingest import Ingestor
    from client.store import Store, load_key

    records = make_records(args.records)
    tune_process()  # as the agent does (client.front.tune_process)
    with tempfile.TemporaryDirectory() as tmp:
        key = load_key(Path(tmp) / "key")
        stores = {
            name: Store(Path(tmp) / f"{name}.db", key, synchronous=args.sync)
            for name in ("pipeline", "unary")
        }
        ingestors = {
            "pipeline": Ingestor(stores["pipeline"], workers=args.workers),
            "unary": Ingestor(stores["unary"]),
        }
        ingestors["pipeline"].start_workers()  # spawned before the clock starts
        bare = sqlite3.connect(Path(tmp) / "bare.db", isolation_level=None)
        bare.execute("PRAGMA journal_mode=WAL")
        bare.execute(f"PRAGMA synchronous={args.sync}")
        bare.execute("CREATE TABLE r(seq INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        batches = [
            [(raw, "bench") for raw in records[i : i + args.batch]]
            for i in range(0, len(records), args.batch)
        ]
        spent = {"pipeline": 0.0, "unary": 0.0, "bare": 0.0}

        def pipeline(chunk: list[list[tuple[bytes, str]]]) -> None:
            stream = ingestors["pipeline"].submit_stream(
                ((b, None) for b in chunk),
                acks=False,  # as the stream sources
            )
            for _ in stream:
                pass

        def unary(chunk: list[list[tuple[bytes, str]]]) -> None:
            for b in chunk:
                ingestors["unary"].submit(b)

        def bare_insert(chunk: list[list[tuple[bytes, str]]]) -> None:
            for b in chunk:
                bare.execute("BEGIN")
                bare.executemany("INSERT INTO r(data) VALUES (?)", [(r,) for r, _ in b])
                bare.execute("COMMIT")

        sides = [("pipeline", pipeline), ("unary", unary), ("bare", bare_insert)]
        for k, c in enumerate(range(0, len(batches), args.chunk)):
            chunk = batches[c : c + args.chunk]
            # The order turns every chunk (a side's place in it measurably moves
            # its rate: 5-10% in side-by-side runs), so each side goes first,
            # second and third equally often.
            turn = k % len(sides) if args.rotate else 0
            for name, side in sides[turn:] + sides[:turn]:
                t0 = time.perf_counter()
                side(chunk)
                spent[name] += time.perf_counter() - t0
        counters = {name: store.counters() for name, store in stores.items()}
        ingestors["pipeline"].close()
        for store in stores.values():
            store.close()
        bare.close()
    n = len(records)
    rate = {name: n / t for name, t in spent.items()}
    train_rate = args.expected_batch / args.step_s
    print(
        json.dumps(
            {
                "records": n,
                "batch": args.batch,
                "synchronous": args.sync,
                "chunk": args.chunk,
                "workers": args.workers,
                "rotate": args.rotate,
                "pipeline_records_per_s": round(rate["pipeline"], 1),
                "unary_records_per_s": round(rate["unary"], 1),
                "bare_sqlite_records_per_s": round(rate["bare"], 1),
                "ratio_to_storage_limit": round(rate["pipeline"] / rate["bare"], 4),
                "unary_ratio_to_storage_limit": round(rate["unary"] / rate["bare"], 4),
                "dp_training_records_per_s": round(train_rate, 2),
                "ratio_to_training": round(rate["pipeline"] / train_rate, 1),
                "counters": {
                    k: v for k, v in counters["pipeline"].items() if ":" not in k
                },
                "same_decisions": counters["pipeline"] == counters["unary"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
