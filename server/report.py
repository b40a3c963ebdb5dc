"""``report.png``: held-out perplexity per domain, epsilon per host, bytes per host,
and each host's drift score, drift events and aggregation weight."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.checkpoint import RunFolder

__all__ = ["write_report"]

log = logging.getLogger(__name__)


def write_report(folder: RunFolder, *, epsilon_budget: float | None = None) -> None:
    lines = folder.read_metrics()
    if not lines:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    ax_ppl, ax_eps, ax_bytes, ax_drift = axes

    domains = sorted({d for ln in lines for d in ln.get("heldout", {})})
    for d in domains:
        pts = [
            (ln["round"], ln["heldout"][d]["ppl"])
            for ln in lines
            if d in ln.get("heldout", {})
        ]
        ax_ppl.plot(*zip(*pts, strict=True), marker="o", label=d)
    ax_ppl.set(
        title="Held-out perplexity per domain (log scale)",
        xlabel="round",
        ylabel="perplexity",
        yscale="log",
    )
    if domains:
        ax_ppl.legend(fontsize=8)

    hosts = sorted({h for ln in lines for h in ln.get("epsilon", {})})
    for h in hosts:
        pts = [(0, 0.0)] + [
            (ln["round"], ln["epsilon"][h])
            for ln in lines
            if h in ln.get("epsilon", {})
        ]
        ax_eps.plot(*zip(*pts, strict=True), marker="o", label=h)
    if epsilon_budget is not None:
        ax_eps.axhline(epsilon_budget, color="grey", linestyle="--", label="budget")
    ax_eps.set(
        title="Privacy spent per host (epsilon)", xlabel="round", ylabel="epsilon"
    )
    ax_eps.set_ylim(bottom=0)
    if hosts:
        ax_eps.legend(fontsize=8, loc="lower right")

    rounds = [ln for ln in lines if ln.get("bytes")]
    senders = sorted({h for ln in rounds for h in ln["bytes"]})
    width = 0.8 / max(len(senders), 1)
    for i, h in enumerate(senders):
        xs = [ln["round"] + (i - (len(senders) - 1) / 2) * width for ln in rounds]
        ys = [ln["bytes"].get(h, 0) / 1024 for ln in rounds]
        ax_bytes.bar(xs, ys, width=width, label=h)
    ax_bytes.set(title="Update size sent per host", xlabel="round", ylabel="KiB")
    if senders:
        ax_bytes.legend(fontsize=8, loc="lower right")
    weighed = [ln for ln in lines if ln.get("weights")]
    for i, h in enumerate(sorted({h for ln in weighed for h in ln["weights"]})):
        color = f"C{i % 10}"
        pts = [(ln["round"], ln["weights"][h]) for ln in weighed if h in ln["weights"]]
        ax_drift.plot(*zip(*pts, strict=True), color=color, marker="o", label=h)
        pts = [
            (ln["round"], ln["drift"][h]) for ln in weighed if h in ln.get("drift", {})
        ]
        if pts:
            ax_drift.plot(*zip(*pts, strict=True), color=color, linestyle=":")
        events = [ln["round"] for ln in weighed if h in ln.get("drift_events", [])]
        ax_drift.scatter(events, [1.02] * len(events), color=color, marker="v", s=60)
    policy = next((ln["policy"] for ln in reversed(weighed) if "policy" in ln), "")
    for ln in weighed:  # the server step, where drift made it larger than 1
        if ln.get("server_step", 1.0) > 1.0:
            ax_drift.annotate(
                f"x{ln['server_step']:.2g}", (ln["round"], 0.9), ha="center", fontsize=8
            )
    ax_drift.set(
        title=f"Weight ({policy}), drift score (dotted), events (v), step (xN)",
        xlabel="round",
        ylabel="weight / score",
    )
    ax_drift.set_ylim(0, 1.08)
    if weighed:
        ax_drift.legend(fontsize=8, loc="upper left")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    fig.tight_layout()
    fig.savefig(folder.report_path, dpi=90)
    plt.close(fig)
