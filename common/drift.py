"""Drift signals of a data host, released with differential privacy, and the detector.

Every round, before training, a host measures how its fresh records differ from what it
saw before, on a *drift sample* of its fresh records (chosen by the records' own keyed
coins, see ``client.window``):

* **loss signal**: ``c_i = clip(log loss_i - baseline, -0.5, 0.5)``, the log of
  the received global model's per-token loss on record ``i`` relative to the host's
  running baseline (the level it released last round);
* **token signal**: ``h_i``, the record's hashed token-bucket counts scaled to unit L2
  norm.

One Gaussian query releases ``(sum_i c_i, sqrt(3)/2 x sum_i h_i)``: a record changes
that vector by at most L2 norm ``sqrt(0.5^2 + 3/4) = 1``, and noise ``sigma`` is added
to every coordinate. With ``sigma = count_noise / sqrt(k)`` this is exactly ``k`` of the
host's count queries (Gaussian mechanisms compose by adding ``1/sigma^2``), so the
ledger charges the sampled records ``k`` count queries and needs no new kind of event.

Everything after the release is post-processing of DP outputs: the mean loss change
(noisy sum over the expected sample size, itself computed from the noisy counts), the
Jensen-Shannon divergence between the noisy token histogram and a reference (an
exponential average of earlier noisy histograms), the baseline, the Page-Hinkley
detector over ``x = max(loss change, 0) + JS``, and the ``drift_score`` in [0, 1]
(the detector statistic over its alarm threshold) that leaves the host. A drift event
is an alarm: the detector, baseline and reference restart from the new concept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BASELINE0",
    "DriftRelease",
    "DriftState",
    "PageHinkley",
    "js_divergence",
    "js_null",
    "observe",
    "record_vectors",
    "release",
]

BASELINE0 = 1.5  # log-loss level assumed before a host's first release (loss ~4.5)
DECAY = 0.5  # score after an event: 1, 0.5, 0.25, ... until the detector says more
CLIP = 0.5  # per-record bound of the loss signal (nats of log-loss)
_HASH = 2654435761  # Knuth's multiplicative hash


def record_vectors(input_ids: np.ndarray, mask: np.ndarray, buckets: int) -> np.ndarray:
    """(N, buckets) hashed token counts of each record, scaled to unit L2 norm."""
    n = input_ids.shape[0]
    out = np.zeros((n, buckets), dtype=np.float64)
    idx = (input_ids.astype(np.int64) * _HASH) % (2**32) % buckets
    rows = np.repeat(np.arange(n), input_ids.shape[1])
    np.add.at(out, (rows, idx.ravel()), mask.ravel().astype(np.float64))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


@dataclass(frozen=True)
class DriftRelease:
    """One round's DP output: noisy sums and the expected sample size."""

    loss_sum: float
    hist: list[float]
    expected: float  # from the noisy counts: post-processing


def release(
    log_losses: np.ndarray,
    vectors: np.ndarray,
    *,
    baseline: float,
    expected: float,
    sigma: float,
    rng: np.random.Generator | None,
) -> DriftRelease:
    """The Gaussian release over a drift sample (``rng=None``: no noise, no DP)."""
    c = np.clip(log_losses - baseline, -CLIP, CLIP)
    b = math.sqrt(1.0 - CLIP**2)  # c^2 + b^2 |h|^2 <= 1: sensitivity 1
    loss = float(c.sum())
    hist = b * vectors.sum(axis=0)
    if rng is not None:
        loss += rng.normal(0.0, sigma)
        hist = hist + rng.normal(0.0, sigma, size=hist.shape)
    return DriftRelease(loss, (hist / b).tolist(), expected)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (nats) of two non-negative vectors, normalised."""
    p = np.clip(p, 0.0, None) + 1e-9
    q = np.clip(q, 0.0, None) + 1e-9
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    return float(0.5 * (p * np.log(p / m)).sum() + 0.5 * (q * np.log(q / m)).sum())


@dataclass
class PageHinkley:
    """Page-Hinkley test for an upward shift of a standardised sequence (mean 0
    without change): ``cum += x - delta``, alarm when ``cum - min(cum)`` passes
    ``threshold``."""

    delta: float
    threshold: float
    cum: float = 0.0
    low: float = 0.0

    def update(self, x: float) -> float:
        """Add ``x``; returns the statistic (alarm when it passes ``threshold``)."""
        self.cum += x - self.delta
        self.low = min(self.low, self.cum)
        return self.cum - self.low

    def reset(self) -> None:
        self.cum, self.low = 0.0, 0.0


def js_null(
    reference: np.ndarray, total: float, sigma: float, *, draws: int = 64, seed: int = 0
) -> tuple[float, float]:
    """Mean and sd of the JS divergence a window drawn from ``reference`` shows
    through the release noise alone (Monte Carlo, public randomness): the "no
    change" level the observed divergence is standardised against."""
    rng = np.random.default_rng(seed)
    ref = np.clip(reference, 0.0, None)
    ref = ref / ref.sum() if ref.sum() > 0 else np.full(len(ref), 1.0 / len(ref))
    mean_hist = ref * max(total, 1.0)
    # The reference is an average of earlier noisy windows: its noise is ~0.6x.
    vals = [
        js_divergence(
            mean_hist + rng.normal(0.0, sigma, len(ref)),
            mean_hist + 0.6 * rng.normal(0.0, sigma, len(ref)),
        )
        for _ in range(draws)
    ]
    return float(np.mean(vals)), float(np.std(vals))


@dataclass
class DriftState:
    """What a host keeps between rounds (DP outputs only; JSON in the store)."""

    baseline: float | None = None
    reference: list[float] | None = None
    ph: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    events: list[int] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> DriftState:
        return cls(**data) if data else cls()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


MIN_SAMPLE = 8.0  # below this expected sample size a round gives no signal


JS_SD_FLOOR = 0.002  # sd floors: without DP noise the spread is sampling alone
LOSS_SD_FLOOR = 0.02


def observe(
    state: DriftState,
    rel: DriftRelease | None,
    *,
    round_num: int,
    sigma: float,
    delta: float,
    threshold: float,
) -> tuple[float, bool]:
    """Update ``state`` with one round's release; returns (drift score, event).

    Both signals are standardised by their spread without change: the loss change
    by the release noise over the sample size plus the sampling spread of a mean of
    values clipped to +-0.5, the divergence by ``js_null``. The detector sees
    ``x = max(z_js, z_loss)``; a drift event is ``x``'s Page-Hinkley statistic
    passing ``threshold``; the score is that statistic over the threshold (capped
    at 1), and at least ``DECAY ** (rounds since the last event)``.
    """
    state.rounds += 1
    ph = PageHinkley(
        delta, threshold, state.ph.get("cum", 0.0), state.ph.get("low", 0.0)
    )
    if rel is None or rel.expected < MIN_SAMPLE:
        # No signal this round; an event keeps counting (a round re-run after a
        # crash finds its fresh records already measured, and reports the event).
        event = bool(state.events) and state.events[-1] == round_num
        score = DECAY ** (round_num - state.events[-1]) if state.events else 0.0
        state.last = {"round": round_num, "score": round(score, 4), "x": 0.0}
        return score, event
    n = rel.expected
    base = state.baseline if state.baseline is not None else BASELINE0
    change = max(-CLIP, min(CLIP, rel.loss_sum / n))
    level = base + change
    hist = np.asarray(rel.hist)
    first = state.baseline is None or state.reference is None
    js = z_js = z_loss = 0.0
    if not first:
        ref = np.asarray(state.reference)
        js = js_divergence(hist, ref)
        mu0, sd0 = js_null(
            ref,
            float(np.clip(hist, 0, None).sum()),
            sigma / math.sqrt(1 - CLIP**2),
            seed=round_num,
        )
        z_js = (js - mu0) / max(sd0, JS_SD_FLOOR)
        loss_sd = math.hypot(sigma / n, CLIP / 2 / math.sqrt(n))
        z_loss = change / max(loss_sd, LOSS_SD_FLOOR)
    x = max(z_js, z_loss)
    stat = ph.update(x) if not first else 0.0
    event = stat > threshold
    if event:
        state.events.append(round_num)
    score = 1.0 if event else min(1.0, stat / threshold)
    if state.events:
        # A drift event keeps counting for a few rounds: the new concept needs more
        # than one round to be learnt. Halves each round.
        score = max(score, DECAY ** (round_num - state.events[-1]))
    clean = np.clip(hist, 0.0, None)
    clean = clean / clean.sum() if clean.sum() > 0 else clean
    if event or state.reference is None:
        ph.reset()
        state.reference = clean.tolist()
    else:
        ref = np.asarray(state.reference)
        state.reference = (0.5 * ref + 0.5 * clean).tolist()
    state.baseline = level
    state.ph = {"cum": ph.cum, "low": ph.low}
    state.last = {
        "round": round_num,
        "score": round(score, 4),
        "x": round(x, 3),
        "z_js": round(z_js, 3),
        "z_loss": round(z_loss, 3),
        "loss_change": round(change, 4),
        "js": round(js, 4),
        "expected": round(n, 1),
    }
    return score, event
