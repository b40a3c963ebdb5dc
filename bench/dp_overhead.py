"""DP-LoRA versus non-private LoRA: step time and peak memory, side by side.

Step time: one process holds a model per mode and runs the modes interleaved, step by
step (A B C A B C ...), on the same fixed batch and threads, so drift of the machine
hits every mode alike; the median per mode is reported. Peak memory: each mode runs
again in its own process, and the RSS high-water mark while training is reported
(reset after the model is loaded). Modes:

* ``lora``: ``privacy.enabled = false`` (same loss, same normaliser, no clipping/noise)
* ``dp-lora``: fedstream's lean per-sample gradients for LoRA's Linear layers, fed
  to Opacus's DPOptimizer (the default)
* ``dp-hooks``: Opacus per-sample gradients from module hooks
* ``dp-functorch``: Opacus per-sample gradients via torch.func for every layer

Usage: ``python bench/dp_overhead.py [--models tiny-llama smollm2-135m] [--steps 8]``.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ["lora", "dp-lora", "dp-hooks", "dp-functorch"]
GRAD_SAMPLE = {"dp-lora": "lora", "dp-hooks": "hooks", "dp-functorch": "functorch"}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _setup(mode: str, model_name: str, batch: int, seq: int) -> tuple:
    import torch

    from common.config import RunConfig
    from common.corpus import host_records
    from common.lm import encode
    from common.models import build_adapter_model, load_base_model

    cfg = RunConfig.build(
        {
            "model": {"name": model_name, "max_length": seq},
            "training": {"batch_size": batch, "learning_rate": 1e-3},
            "privacy": {
                "enabled": mode != "lora",
                "noise_multiplier": 1.0,
                "grad_sample_mode": GRAD_SAMPLE.get(mode, "lora"),
            },
        }
    )
    base = load_base_model(cfg.model)
    model = build_adapter_model(base, cfg.lora, seed=0)
    data = encode(host_records(0, batch, seed=0), base.tokenizer, seq)
    return cfg, model, data.take(torch.arange(batch))


def _trainer(cfg, model, mode: str):  # type: ignore[no-untyped-def]
    from client.trainer import LocalTrainer

    return LocalTrainer(
        model,
        training=cfg.training,
        privacy=cfg.privacy,
        noise_multiplier=1.0 if mode != "lora" else None,
        seed=0,
    )


def time_worker(
    model_name: str, batch: int, seq: int, steps: int, threads: int
) -> dict:
    """Median step time per mode: one model per mode, all trainers open (as in a
    round), steps interleaved A B C A B C ... so machine drift hits every mode alike."""
    import contextlib

    import torch

    torch.set_num_threads(threads)
    setups = {m: _setup(m, model_name, batch, seq) for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    with contextlib.ExitStack() as stack:
        trainers = {
            m: stack.enter_context(_trainer(s[0], s[1], m)) for m, s in setups.items()
        }
        for rep in range(steps + 2):
            for mode in MODES:
                t0 = time.perf_counter()
                trainers[mode].step(setups[mode][2])
                if rep >= 2:  # two warm-up steps per mode
                    times[mode].append(time.perf_counter() - t0)
    return {m: {"median_step_s": statistics.median(t)} for m, t in times.items()}


def mem_worker(mode: str, model_name: str, batch: int, seq: int, threads: int) -> dict:
    """Peak RSS while training 3 steps, this mode alone in this process."""
    import torch

    torch.set_num_threads(threads)
    cfg, model, fixed = _setup(mode, model_name, batch, seq)
    rss_before = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    with _trainer(cfg, model, mode) as tr:
        for _ in range(3):
            tr.step(fixed)
    peak = _rss_kb("VmHWM")
    return {
        "peak_rss_mb": peak / 1024,
        "rss_before_mb": rss_before / 1024,
        "train_mem_mb": (peak - rss_before) / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=40)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "time":
        result = time_worker(args.model, args.batch, args.seq, args.steps, args.threads)
        print(json.dumps(result))
        return
    if args.worker:
        result = mem_worker(args.worker, args.model, args.batch, args.seq, args.threads)
        print(json.dumps(result))
        return
    out: dict = {
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "steps": args.steps,
        "models": {},
    }
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }

    def run(worker: str, model: str) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            worker,
            "--model",
            model,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    for model in args.models:
        res = run("time", model)
        for mode in MODES:
            res[mode].update(run(mode, model))
        plain = res["lora"]
        for mode in MODES[1:]:
            res[mode]["step_time_ratio"] = (
                res[mode]["median_step_s"] / plain["median_step_s"]
            )
            res[mode]["peak_rss_ratio"] = (
                res[mode]["peak_rss_mb"] / plain["peak_rss_mb"]
            )
            res[mode]["train_mem_ratio"] = (
                res[mode]["train_mem_mb"] / plain["train_mem_mb"]
                if plain["train_mem_mb"] > 0
                else None
            )
        out["models"][model] = res
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
