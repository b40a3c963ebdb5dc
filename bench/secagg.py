"""SecAgg+ round time and payload relative to plain aggregation (targets 1.5x, 1.1x).

N hosts (default 10) with real encrypted stores run the real ClientApp in-process
(``server.loopback``: no transport, so the time ratio is computation only: training,
keys, shares, masks, unmasking), first a plain round (``AdapterFedAvg``), then a
secure round (``SecureAdapterFedAvg``) on the same hosts from the same global
adapter; one warm-up pair, then ``--repeats`` pairs, medians. The payload is what
each host sends in a secure round (all four replies, Flower's protobuf serde) over
the size of its adapter delta in fp32 (4 bytes per number). ``protocol_only`` runs the
secure exchanges alone on synthetic deltas of other sizes (SmolLM2's adapter by
default): their time, payload and error against the exact mean.

Usage: ``python bench/secagg.py [--hosts 10] [--model tiny-llama] [--repeats 3]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def protocol_only(hosts: int, size: int, seed: int = 0) -> dict[str, float]:
    """The SecAgg+ exchanges alone (no training) for ``hosts`` synthetic deltas of
    ``size`` numbers: seconds for the three secure exchanges and unmasking, and the
    largest payload per host over the fp32 size of its delta."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from client.secagg import setup
    from common.adapter import layout_id, unpack_global
    from common.secagg import RECORD
    from server.loopback import Loopback
    from server.secure import SecureAdapterFedAvg

    rng = np.random.default_rng(seed)
    grid = Loopback({1000 + i: Path(".") for i in range(hosts)})
    layout = layout_id({"delta": (size,)})
    strat = SecureAdapterFedAvg(
        global_arrays=OrderedDict(delta=np.zeros(size, np.float32)),
        base_config={},
        min_available_nodes=hosts,
    )
    strat._grid = grid
    replies, deltas = [], []
    for i, (nid, ctx) in enumerate(grid.contexts.items()):
        delta = (rng.normal(size=size) * 1e-3).astype(np.float32)
        deltas.append(delta)
        keys = setup(ctx, delta, 1)
        content = RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "num-examples": 64,
                        "update-norm": float(np.linalg.norm(delta)),
                        "base-round": 1,
                    }
                ),
                "info": ConfigRecord({"host": f"host-{i}", "layout": layout}),
                RECORD: keys,
            }
        )
        incoming = Message(content=RecordDict(), dst_node_id=nid, message_type="train")
        replies.append(Message(content=content, reply_to=incoming))
    t0 = time.perf_counter()
    out, _ = strat.aggregate_train(1, replies)
    took = time.perf_counter() - t0
    assert out is not None
    shapes = {k: tuple(v.shape) for k, v in strat.global_arrays.items()}
    mean = unpack_global(out, shapes)["delta"]
    err = float(np.abs(mean - np.mean(deltas, axis=0)).max())
    payload = max(strat.outcome.bytes.values()) / (4 * size)
    return {
        "protocol_s": round(took, 3),
        "payload_ratio": round(payload, 4),
        "err": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=10)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--protocol-params",
        type=int,
        nargs="*",
        default=[92160],
        help="also time the exchanges alone for deltas of these sizes (default: "
        "SmolLM2-135M's default adapter, LoRA r=4 FFA on q/v)",
    )
    args = ap.parse_args()

    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from client.ingest import Ingestor
    from client.store import Store, load_key
    from common.adapter import to_record, trainable_state
    from common.config import RunConfig
    from common.corpus import host_records
    from common.models import build_adapter_model, load_base_model
    from server.checks import update_norm_bound
    from server.loopback import Loopback
    from server.policies import make_policy
    from server.secure import SecureAdapterFedAvg
    from server.strategy import AdapterFedAvg

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    root = Path(tempfile.mkdtemp(prefix="secagg-bench-"))
    dirs = {}
    for i in range(args.hosts):
        d = root / f"host-{i}"
        d.mkdir()
        store = Store(d / "store.db", load_key(d / "store.key"))
        rows = host_records(i % 4, 64, seed=i)
        Ingestor(store).submit([(json.dumps({"text": t}).encode(), "b") for t in rows])
        store.close()
        dirs[1000 + i] = d

    def config(secure: bool) -> RunConfig:
        return RunConfig.build(
            {
                "model": {"name": args.model, "max_length": 32},
                "training": {"sample_rate": 0.25, "local_steps": 2},
                "privacy": {"noise_multiplier": 1.0},
                "aggregation": {"secure": secure, "policy": "drift"},
                "federation": {"rounds": 10 * args.repeats},
            }
        )

    base = load_base_model(config(False).model)
    arrays = trainable_state(build_adapter_model(base, config(False).lora, seed=0))
    size = sum(v.size for v in arrays.values())
    grid = Loopback(dirs)
    times: dict[str, list[float]] = {"plain": [], "secure": []}
    payload: list[float] = []
    rnd = 0
    for rep in range(args.repeats + 1):  # the first pair warms up; not counted
        for mode in ("plain", "secure"):
            rnd += 1
            cfg = config(mode == "secure")
            cls = SecureAdapterFedAvg if mode == "secure" else AdapterFedAvg
            strat = cls(
                global_arrays=OrderedDict((k, v.copy()) for k, v in arrays.items()),
                base_config={f"run.{k}": v for k, v in cfg.to_flat().items()},
                policy=make_policy(cfg.aggregation),
                max_update_norm=update_norm_bound(cfg, size),
                min_available_nodes=args.hosts,
                round_offset=rnd - 1,
            )
            t0 = time.perf_counter()
            msgs = strat.configure_train(1, to_record(arrays), ConfigRecord(), grid)
            out, _ = strat.aggregate_train(1, grid.send_and_receive(msgs))
            if rep:
                times[mode].append(time.perf_counter() - t0)
            assert out is not None and len(strat.outcome.hosts) == args.hosts
            if mode == "secure":
                payload += [b / (4 * size) for b in strat.outcome.bytes.values()]
    plain, secure = (
        statistics.median(times["plain"]),
        statistics.median(times["secure"]),
    )
    print(
        json.dumps(
            {
                "hosts": args.hosts,
                "model": args.model,
                "params": size,
                "repeats": args.repeats,
                "plain_round_s": round(plain, 3),
                "secure_round_s": round(secure, 3),
                "time_ratio": round(secure / plain, 3),
                "time_target": 1.5,
                "payload_ratio_max": round(max(payload), 4),
                "payload_target": 1.1,
                "transport": "in-process (loopback): computation only",
                "protocol_only": {
                    str(n): protocol_only(args.hosts, n) for n in args.protocol_params
                },
            }
        )
    )


if __name__ == "__main__":
    main()
