"""Agent memory versus stream length: RSS after 1x and after 10x the records.

One process ingests a stream through the full pipeline (gate, PII, dedup, encrypted
store) and runs window/replay selection plus loading of the selected records, as a
training round does, every ``round_every`` records. RSS is read after the 1x part and
again after the stream has grown to 10x. With the near-duplicate horizon, the window
and the replay caps full at 1x, memory must stay flat.

With ``--workers N`` the stream goes through ``Ingestor.submit_stream`` and N ingest
worker processes, as the agent's stream sources do; their RSS is reported too.

Usage: ``python bench/memory.py [--records 20000] [--factor 10] [--workers 0]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(
    records: int, factor: int, *, horizon: int, round_every: int, workers: int = 0
) -> dict:
    from client.ingest import Ingestor
    from client.store import Store, load_key
    from client.window import WindowSettings, select_round
    from common.corpus import host_stream
    from common.privacy import StreamPlan

    plan = StreamPlan(
        noise_multiplier=1.0,
        sample_rate=0.05,
        steps_per_round=4,
        count_noise=10.0,
        record_budget=1e9,
        delta=1e-5,
    )
    window = WindowSettings(fresh_cap=256, replay_cap=64)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(
            Path(tmp) / "store.db", load_key(Path(tmp) / "key"), synchronous="NORMAL"
        )
        ingestor = Ingestor(store, horizon=horizon, workers=workers)
        ingestor.start_workers()
        pids = ingestor._pool.pids if ingestor._pool else []
        rss: dict[int, float] = {}
        worker_rss: dict[int, float] = {}
        rnd, done = 0, 0
        for part, target in ((1, records), (factor, records * factor)):
            while done < target:
                n = min(round_every, target - done)
                stream = host_stream(done % 4, n, seed=done)
                # unique text per record, so the stream really grows
                items = [
                    (
                        json.dumps(
                            {"text": f"{r['text']} [{done + i}]", "tags": r["tags"]}
                        ).encode(),
                        "bench",
                    )
                    for i, r in enumerate(stream)
                ]
                batches = [
                    (items[start : start + 512], None)
                    for start in range(0, len(items), 512)
                ]
                if workers:  # as the agent's stream sources
                    for _ in ingestor.submit_stream(batches, acks=False):
                        pass
                else:
                    for batch, _ in batches:
                        ingestor.submit(batch)
                done += n
                rnd += 1
                sel = select_round(store, plan, window, round_num=rnd, secret=b"k" * 32)
                loaded = [r.content for r in store.iter_records(sel.eligible)]
                del loaded
            gc.collect()
            rss[part] = _rss_mb()
            worker_rss[part] = sum(_rss_mb(pid) for pid in pids)
        stored = store.count(live=False)
        ingestor.close()
        store.close()
    out = {
        "records_1x": records,
        "records_10x": records * factor,
        "stored": stored,
        "rss_1x_mb": round(rss[1], 1),
        "rss_10x_mb": round(rss[factor], 1),
        "growth": round(rss[factor] / rss[1] - 1, 4),
    }
    if workers:
        out |= {
            "workers": workers,
            "worker_rss_1x_mb": round(worker_rss[1], 1),
            "worker_rss_10x_mb": round(worker_rss[factor], 1),
            "worker_growth": round(worker_rss[factor] / worker_rss[1] - 1, 4),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--horizon", type=int, default=10_000)
    p.add_argument("--round-every", type=int, default=2_000)
    p.add_argument(
        "--workers", type=int, default=0, help="ingest workers (streamed, as the agent)"
    )
    args = p.parse_args()
    print(
        json.dumps(
            measure(
                args.records,
                args.factor,
                horizon=args.horizon,
                round_every=args.round_every,
                workers=args.workers,
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
