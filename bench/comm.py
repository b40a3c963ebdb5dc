"""Bytes a host sends per round versus trainable parameters x bytes per parameter.

The reply is built exactly as the ClientApp builds it (flat delta, metrics, info) and
serialised with Flower's own protobuf serde, so the count is what goes on the wire
inside the Flower message (transport framing and TLS excluded). The fixed header is
what remains when the payload is zero-sized in the limit: it is measured as the
intercept across ranks and must not grow with them.

Usage: ``python bench/comm.py [--models tiny-llama smollm2-135m]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def reply_bytes(model_name: str, rank: int, ffa: bool, dtype: str) -> dict:
    from flwr.app import ConfigRecord, MetricRecord, RecordDict
    from flwr.common import serde

    from common.adapter import encode_delta, layout_id, trainable_state
    from common.config import LoraSettings, ModelConfig
    from common.models import build_adapter_model, load_base_model

    base = load_base_model(ModelConfig(name=model_name))
    model = build_adapter_model(base, LoraSettings(rank=rank, ffa=ffa), seed=0)
    old = trainable_state(model)
    rng = np.random.default_rng(0)
    new = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in old.items()}
    params = sum(v.size for v in old.values())
    content = RecordDict(
        {
            "arrays": encode_delta(new, old, dtype),
            "metrics": MetricRecord(
                {
                    "num-examples": 256,
                    "train-loss": 3.21,
                    "epsilon": 1.234,
                    "noise-multiplier": 0.8,
                    "steps": 4,
                    "train-seconds": 12.3,
                }
            ),
            "info": ConfigRecord(
                {
                    "host": "host-0",
                    "layout": layout_id({k: v.shape for k, v in old.items()}),
                }
            ),
        }
    )
    sent = serde.recorddict_to_proto(content).ByteSize()
    payload = params * np.dtype(dtype).itemsize
    return {
        "rank": rank,
        "ffa": ffa,
        "dtype": dtype,
        "trainable_params": int(params),
        "payload_bytes": int(payload),
        "sent_bytes": int(sent),
        "ratio": sent / payload,
        "header_bytes": int(sent - payload),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out: dict = {}
    for model in args.models:
        rows = [
            reply_bytes(model, r, ffa, dt)
            for r in (4, 8, 16)
            for ffa in (True, False)
            for dt in ("float16", "float32")
        ]
        headers = sorted({row["header_bytes"] for row in rows})
        out[model] = {
            "rows": rows,
            "header_bytes_min": headers[0],
            "header_bytes_max": headers[-1],
            "max_ratio_excluding_header": max(
                (row["sent_bytes"] - headers[-1]) / row["payload_bytes"] for row in rows
            ),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
