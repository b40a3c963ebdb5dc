"""Drift benchmark: aggregation policies side by side on drifting federations.

Every (scenario, policy, seed) is one real ``fedstream-sim`` run (Simulation Engine,
DP on, epsilon <= 8 per host) in its own process; the same scenario and seed give the
same streams to every policy. Metrics per run, from ``metrics.jsonl``:

* ``adaptation``: rounds of training on the new domain (counting the shift round)
  until its held-out perplexity is within 5% of the lowest value any policy reaches
  after the shift in that (scenario, seed); a run that never gets there counts one
  round more than it had after the shift (a lower bound; ``adaptation_censored``);
* ``forgetting``: old-domain held-out perplexity at the end over its best before the
  shift (1.0 = nothing forgotten);
* ``union``: perplexity on the union of the held-out sets at the end
  (``exp`` of the mean per-token loss over sets of equal size);
* ``robustness`` (scenario ``noisy``): union perplexity with the noisy host over the
  same policy and seed in ``noisy-clean`` (the same hosts without it).

Modes: ``quick`` (tiny-llama; learning rate 0.1, 8 local steps, full LoRA, so that a
random-init model learns something in 8 rounds) and ``full`` (SmolLM2-135M with the
default training settings). Prints one JSON object (per-run metrics, per-policy means,
target checks) and writes ``table.md`` and ``drift.png`` into ``--out``.

Usage: ``python bench/drift.py [--mode quick|full] [--seeds 0 1 2]
[--scenarios abrupt ...] [--policies fedavg fedprox drift] [--jobs 1] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# scenario -> (old domain, new domain, shift round); None: no shift to measure.
SHIFTS: dict[str, tuple[str, str, int] | None] = {
    "abrupt": ("banking", "clinical", 4),
    "gradual": ("banking", "clinical", 3),
    "recurring": ("banking", "clinical", 3),
    "languages": ("english", "spanish", 4),
    "code-prose": ("prose", "code", 4),
    "noisy": None,
    "noisy-clean": None,
}
QUICK = """
[training]
learning_rate = 0.1
local_steps = 8
[lora]
ffa = false
"""


def _run(scenario: str, policy: str, seed: int, mode: str, out: Path) -> Path:
    folder = out / "runs" / f"{scenario}-{policy}-{seed}"
    if (folder / "report.png").exists():
        return folder  # done before: the bench resumes
    cmd = [
        sys.executable,
        "-m",
        "server.sim",
        "--scenario",
        scenario,
        "--policy",
        policy,
        "--seed",
        str(seed),
        "--out",
        str(folder),
        "--quiet",
    ]
    if mode == "quick":
        cfg = out / "quick.toml"
        cfg.write_text(QUICK)
        cmd += ["--config", str(cfg), "--model", "tiny-llama"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{folder.name} failed: {proc.stderr.strip()[-2000:]}")
    print(
        f"{folder.name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True
    )
    return folder


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").open()]


def _union(row: dict[str, Any]) -> float:
    losses = [v["loss"] for v in row["heldout"].values()]
    return math.exp(sum(losses) / len(losses))


def metrics(runs: dict[tuple[str, str, int], Path]) -> list[dict[str, Any]]:
    out = []
    for (scen, policy, seed), folder in sorted(runs.items()):
        rows = _rows(folder)
        m: dict[str, Any] = {
            "scenario": scen,
            "policy": policy,
            "seed": seed,
            "union": round(_union(rows[-1]), 3),
            "events": sum(len(r.get("drift_events") or []) for r in rows),
            "epsilon": max((rows[-1].get("epsilon") or {}).values(), default=0.0),
        }
        shift = SHIFTS.get(scen)
        if shift is not None:
            old, new, at = shift
            best_old = min(r["heldout"][old]["ppl"] for r in rows if r["round"] < at)
            m["forgetting"] = round(rows[-1]["heldout"][old]["ppl"] / best_old, 4)
            # Lowest new-domain perplexity any policy reaches after the shift.
            low = min(
                r["heldout"][new]["ppl"]
                for (s2, _p, sd2), f2 in runs.items()
                if s2 == scen and sd2 == seed
                for r in _rows(f2)
                if r["round"] >= at
            )
            hit = [
                r["round"]
                for r in rows
                if r["round"] >= at and r["heldout"][new]["ppl"] <= 1.05 * low
            ]
            # Never within 5%: counted as one round more than the run had after the
            # shift (a lower bound), and flagged, so a policy that never gets there
            # does not drop out of the mean.
            m["adaptation"] = hit[0] - at + 1 if hit else rows[-1]["round"] - at + 2
            m["adaptation_censored"] = not hit
        if scen == "noisy" and (("noisy-clean", policy, seed) in runs):
            clean = _union(_rows(runs[("noisy-clean", policy, seed)])[-1])
            m["robustness"] = round(_union(rows[-1]) / clean, 4)
        out.append(m)
    return out


def summarise(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds, per policy and scenario, and the drift targets."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for key in ("adaptation", "forgetting", "union", "robustness", "events"):
        for r in per_run:
            if r.get(key) is None:
                continue
            cell = table.setdefault(r["policy"], {}).setdefault(r["scenario"], {})
            cell.setdefault(key + "_all", []).append(r[key])  # type: ignore[arg-type]
    for cells in table.values():
        for cell in cells.values():
            for k in [k for k in cell if k.endswith("_all")]:
                vals = cell.pop(k)
                cell[k[:-4]] = round(sum(vals) / len(vals), 4)  # type: ignore[arg-type]

    def mean(policy: str, key: str, scens: list[str]) -> float | None:
        vals = [table[policy][s][key] for s in scens if key in table[policy].get(s, {})]
        return sum(vals) / len(vals) if vals else None

    shifted = [s for s in SHIFTS if SHIFTS[s] is not None]
    allscen = list(SHIFTS)
    checks: dict[str, Any] = {}
    if "drift" in table and "fedavg" in table:
        ad, af = (
            mean("drift", "adaptation", shifted),
            mean("fedavg", "adaptation", shifted),
        )
        fd, ff = (
            mean("drift", "forgetting", shifted),
            mean("fedavg", "forgetting", shifted),
        )
        ud, uf = mean("drift", "union", allscen), mean("fedavg", "union", allscen)
        rd = mean("drift", "robustness", ["noisy"])
        checks = {
            "adaptation_ratio": None if not (ad and af) else round(ad / af, 3),
            "adaptation_target": "<= 0.5",
            "forgetting_drift_vs_fedavg": [fd, ff],
            "robustness_drift": rd,
            "robustness_target": "<= 1.05",
            "union_drift_vs_fedavg": [ud, uf],
        }
    return {"table": table, "targets": checks}


def write_table(summary: dict[str, Any], path: Path) -> None:
    lines = [
        "| policy | scenario | adaptation (rounds) | forgetting | union ppl | "
        "robustness | drift events |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy, cells in sorted(summary["table"].items()):
        for scen, c in cells.items():
            lines.append(
                f"| {policy} | {scen} | {c.get('adaptation', '-')} | "
                f"{c.get('forgetting', '-')} | {c.get('union', '-')} | "
                f"{c.get('robustness', '-')} | {c.get('events', '-')} |"
            )
    path.write_text("\n".join(lines) + "\n")


def plot(runs: dict[tuple[str, str, int], Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scens = [
        s for s in SHIFTS if SHIFTS[s] is not None and any(k[0] == s for k in runs)
    ]
    if not scens:
        return
    fig, axes = plt.subplots(
        1, len(scens), figsize=(4 * len(scens), 3.4), squeeze=False
    )
    for ax, scen in zip(axes[0], scens, strict=True):
        old, new, at = SHIFTS[scen]  # type: ignore[misc]
        for policy in sorted({k[1] for k in runs}):
            seeds = sorted(k[2] for k in runs if k[0] == scen and k[1] == policy)
            if not seeds:
                continue
            rows = [_rows(runs[(scen, policy, s)]) for s in seeds]
            rounds = [r["round"] for r in rows[0]]
            for dom, style in ((new, "-"), (old, ":")):
                ys = [
                    sum(rs[i]["heldout"][dom]["ppl"] for rs in rows) / len(rows)
                    for i in range(len(rounds))
                ]
                ax.plot(rounds, ys, style, label=f"{policy} {dom}")
        ax.axvline(at - 0.5, color="grey", lw=0.8)
        ax.set_title(scen)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out perplexity")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["quick", "full"], default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scenarios", nargs="+", default=list(SHIFTS))
    p.add_argument("--policies", nargs="+", default=["fedavg", "fedprox", "drift"])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/bench-drift")
    args = p.parse_args()
    out = Path(args.out).resolve() / args.mode
    out.mkdir(parents=True, exist_ok=True)
    keys = [
        (s, pol, seed)
        for seed in args.seeds
        for s in args.scenarios
        for pol in args.policies
    ]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        folders = list(pool.map(lambda k: _run(*k, args.mode, out), keys))
    runs = dict(zip(keys, folders, strict=True))
    per_run = metrics(runs)
    summary = summarise(per_run)
    write_table(summary, out / "table.md")
    plot(runs, out / "drift.png")
    result = {
        "mode": args.mode,
        "seeds": args.seeds,
        "wall_s": round(time.perf_counter() - t0, 1),
        "runs": per_run,
        **summary,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
