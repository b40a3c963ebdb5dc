"""Server weighting policies: how much each host's update counts in a round.

A policy sees the round's validated updates (delta, example count, drift score and
event, staleness) and returns one weight per host plus, for damped hosts, the reason.
The strategy then applies ``sum_i w_i delta_i`` (weights sum to 1) to the global
adapter. Policies are chosen by name (``aggregation.policy``) from ``REGISTRY``;
``register`` adds more.

* ``fedavg``: weights proportional to the example counts.
* ``fedprox``: the same weights; hosts add the proximal pull toward the global
  adapter (``aggregation.proximal_mu``, default 1.0) while they train.
* ``drift``: ``w_i ~ n_i x (1 + drift_boost x s_i) x 1/(1 + staleness_i) x a_i``.
  ``s_i`` in [0, 1] is the host's DP drift score: a shift seen by many hosts is
  adopted fast because the hosts that see it count more. ``a_i`` is agreement
  damping, applied only with 3 or more updates: an update longer than
  ``norm_limit`` x the median norm is scaled down to that length, and an update
  whose cosine with the example-weighted mean of the other updates is below
  ``min_cosine`` loses weight linearly, to 0 at ``min_cosine - 0.2``: one noisy
  host cannot drag the model. Hosts also train with the proximal pull and replay,
  which keeps old knowledge. With equal drift scores, equal staleness and no
  damping the weights are exactly FedAvg's.

  Server step (Flash-style): the weighted mean update is applied with step
  ``min(1 + server_boost x S, max_server_step)``, where ``S = sum_i w_i s_i`` over
  the hosts in drift (``s_i >= 0.5``: an event this round or the last, or a
  detector past half its threshold; lower scores are mostly the noise of the DP
  release). When many hosts drift together the global adapter moves further toward
  the new concept; with no host in drift the step is exactly 1, so the whole update
  is FedAvg's bit for bit. The step also scales the DP noise inside the mean update,
  which is why it is bounded and decays with the scores (0.5 per round after an
  event).

  Why this rule: see bench/RESULTS.md ("Drift policies") for the measurements that
  chose the boost and the damping thresholds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common.config import AggregationConfig
from common.errors import ConfigError

__all__ = [
    "REGISTRY",
    "DriftPolicy",
    "FedAvgPolicy",
    "HostUpdate",
    "Policy",
    "Weighing",
    "make_policy",
    "register",
]


@dataclass
class HostUpdate:
    name: str
    delta: OrderedDict[str, np.ndarray]
    examples: float
    drift_score: float = 0.0
    drift_event: bool = False
    staleness: int = 0


@dataclass
class Weighing:
    weights: dict[str, float]  # sum to 1
    damped: dict[str, str] = field(default_factory=dict)  # host -> reason
    scale: dict[str, float] = field(default_factory=dict)  # host -> delta factor
    step: float = 1.0  # server step on the weighted mean update


class Policy:
    name = "base"

    def __init__(self, cfg: AggregationConfig) -> None:
        self.cfg = cfg

    def weigh(self, updates: list[HostUpdate]) -> Weighing:
        raise NotImplementedError


REGISTRY: dict[str, type[Policy]] = {}


def register(name: str) -> Callable[[type[Policy]], type[Policy]]:
    def deco(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def make_policy(cfg: AggregationConfig) -> Policy:
    if cfg.policy not in REGISTRY:
        raise ConfigError(
            f"aggregation.policy: unknown policy {cfg.policy!r}; "
            f"choose one of {', '.join(sorted(REGISTRY))}"
        )
    return REGISTRY[cfg.policy](cfg)


def _normalise(raw: dict[str, float]) -> dict[str, float]:
    total = sum(raw.values())
    if total <= 0:
        return {h: 1.0 / len(raw) for h in raw}
    return {h: w / total for h, w in raw.items()}


@register("fedavg")
class FedAvgPolicy(Policy):
    def weigh(self, updates: list[HostUpdate]) -> Weighing:
        return Weighing(_normalise({u.name: u.examples for u in updates}))


@register("fedprox")
class FedProxPolicy(FedAvgPolicy):
    """FedAvg weights; the proximal term acts on the hosts."""


def _flat(delta: OrderedDict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([v.ravel().astype(np.float64) for v in delta.values()])


@register("drift")
class DriftPolicy(Policy):
    def weigh(self, updates: list[HostUpdate]) -> Weighing:
        cfg = self.cfg
        factor = {
            u.name: (1.0 + cfg.drift_boost * min(max(u.drift_score, 0.0), 1.0))
            / (1.0 + max(u.staleness, 0))
            for u in updates
        }
        # Relative to the largest factor, so equal factors are exactly 1: equal
        # scores and staleness give FedAvg's weights bit for bit.
        top = max(factor.values())
        raw = {u.name: u.examples * (factor[u.name] / top) for u in updates}
        damped: dict[str, str] = {}
        scale: dict[str, float] = {}
        if len(updates) >= 3:
            flats = {u.name: _flat(u.delta) for u in updates}
            norms = {h: float(np.linalg.norm(v)) for h, v in flats.items()}
            median = float(np.median(list(norms.values())))
            for h, n in norms.items():
                if median > 0 and n > cfg.norm_limit * median:
                    scale[h] = cfg.norm_limit * median / n
                    damped[h] = (
                        f"norm {n:.3g} > {cfg.norm_limit} x median {median:.3g}: "
                        f"scaled by {scale[h]:.3g}"
                    )
            total_n = sum(u.examples for u in updates)
            weighted = sum(
                u.examples * flats[u.name] * scale.get(u.name, 1.0) for u in updates
            )
            low = cfg.min_cosine - 0.2
            for u in updates:
                own = u.examples * flats[u.name] * scale.get(u.name, 1.0)
                rest = (weighted - own) / max(total_n - u.examples, 1e-12)
                denom = float(np.linalg.norm(rest) * np.linalg.norm(flats[u.name]))
                cos = float(rest @ flats[u.name]) / denom if denom > 0 else 1.0
                if cos < cfg.min_cosine:
                    damp = max(0.0, (cos - low) / (cfg.min_cosine - low))
                    raw[u.name] *= damp
                    note = f"cosine {cos:.3f} < {cfg.min_cosine}: weight x {damp:.2f}"
                    damped[u.name] = (
                        f"{damped[u.name]}; {note}" if u.name in damped else note
                    )
        weights = _normalise(raw)
        # Flash-style server step: the share of the round's weight that comes from
        # hosts in drift (score >= 0.5: an event this round or the one before, or a
        # detector past half its threshold), scaled. Scores below 0.5 are mostly the
        # DP noise of the release and do not move the step. No drift anywhere:
        # exactly 1, FedAvg's step.
        mean_score = sum(
            weights[u.name] * min(u.drift_score, 1.0)
            for u in updates
            if u.drift_score >= 0.5
        )
        step = min(1.0 + cfg.server_boost * mean_score, cfg.max_server_step)
        return Weighing(weights, damped, scale, step)
