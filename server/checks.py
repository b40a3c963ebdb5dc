"""The server's bound on the L2 norm of one update (``aggregation.max_update_norm``).

An honest host's adapter delta cannot be arbitrarily long: with Adam (the default
optimizer, betas 0.9/0.999, a fresh optimizer every round) one step moves a coordinate
by at most ``ADAM_STEP_BOUND x lr``: by Cauchy-Schwarz
``|m_t| <= (1 - b1) sqrt(v_t / (1 - b2)) / sqrt(1 - b1^2 / b2)``, that is
``|m_t| / sqrt(v_t) <= 7.27``, and the bias corrections only shrink it for the first
steps. The proximal pull toward the global adapter contracts (``lr x mu <= 1``). So a
round of ``local_steps`` steps over ``d`` trainable numbers moves the adapter by at most
``ADAM_STEP_BOUND x lr x local_steps x sqrt(d)`` in L2 norm: about 7x to 15x what DP
updates actually measure (their per-step moves are about ``lr`` per coordinate, with
changing signs). An update above that bound did not come from the configured
training; the server rejects it with its reason and the round goes on.

``max_update_norm`` unset: that derived bound for Adam; none for SGD (whose step has
no hard limit), unless set. ``0`` turns the check off; a positive number is the bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from common.config import RunConfig

__all__ = ["ADAM_STEP_BOUND", "update_norm", "update_norm_bound"]

_B1, _B2 = 0.9, 0.999
ADAM_STEP_BOUND = (1 - _B1) / math.sqrt(1 - _B2) / math.sqrt(1 - _B1**2 / _B2)


def update_norm_bound(cfg: RunConfig, size: int) -> float | None:
    """The L2 bound on one host's delta of ``size`` numbers, or None for no check."""
    bound = cfg.aggregation.max_update_norm
    if bound is not None:
        return bound if bound > 0 else None
    t = cfg.training
    if t.optimizer != "adam" or t.learning_rate * cfg.aggregation.mu > 1:
        return None
    return ADAM_STEP_BOUND * t.learning_rate * t.local_steps * math.sqrt(size)


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(
        sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values())
    )
