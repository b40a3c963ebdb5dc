"""Client-level differential privacy at the server (``[client_dp]``): DP-FedAvg.

Record-level DP-SGD on each host (``client.trainer``) protects every record against
everyone outside its host. Client-level DP protects a whole host: whatever one host
sends, the published global adapters change little in distribution. This is the
fixed-clipping Gaussian mechanism of DP-FedAvg (McMahan et al., ICLR 2018, the
fixed-denominator estimator; Flower's ``DifferentialPrivacy*SideFixedClipping``
wrappers implement the same):

    mean = (sum_i clip_C(delta_i) + N(0, (z C)^2 I)) / n

* ``clip_C`` scales a host's update to L2 norm at most ``C`` (``clip_norm``). In the
  clear the server clips; under SecAgg+ each host clips its own update before masking
  (the server cannot see it) and the server rejects a reported norm above ``C``.
* ``n`` is the number of hosts the round was sent to, fixed before any reply comes
  (a host that fails or is rejected adds 0): the sum has sensitivity ``C`` when one
  host is added or removed, and the noise does not depend on who answered. The
  number of hosts asked is treated as public, as in Flower's DP strategies.
* Hosts weigh equally and the server step is 1: the weighting policies' weights
  and step depend on every host's report, which would make the sensitivity depend
  on the other hosts. Drift scores and events are still logged.
* Every round is one Gaussian mechanism with noise multiplier ``z`` on the whole
  federation (no subsampling is claimed, even with ``fraction_train < 1``); the
  client-level epsilon after ``r`` rounds composes ``r`` of them with the Opacus
  accountant of ``privacy.accountant``. ``target_epsilon`` gives the smallest ``z``
  that ends at that epsilon after the planned rounds.
* The noise comes from the operating system's CSPRNG, never from the run seed: a
  host that knows the seed must not be able to subtract it. The server itself sees
  the sum before noise (central DP: the server is trusted with the sum; SecAgg+
  keeps the individual updates from it).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from common.config import RunConfig
from common.errors import PrivacyError
from common.privacy import DPEvent, epsilon_of

__all__ = ["ClientDP", "client_dp_for"]


@dataclass(frozen=True)
class ClientDP:
    """The client-level mechanism of a run (see the module docstring)."""

    clip_norm: float
    noise_multiplier: float
    delta: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier"):
            if not getattr(self, name) > 0:
                raise PrivacyError(
                    f"ClientDP.{name} must be > 0, got {getattr(self, name)}"
                )

    def clip_factor(self, norm: float) -> float:
        """The factor that brings an update of L2 ``norm`` within ``clip_norm``."""
        return 1.0 if norm <= self.clip_norm else self.clip_norm / norm

    def noise(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        hosts: int,
        *,
        rng: np.random.Generator | None = None,
    ) -> OrderedDict[str, np.ndarray]:
        """Noise on the mean of ``hosts`` clipped updates: std ``z x C / hosts``."""
        if hosts < 1:
            raise PrivacyError(f"client-level noise needs hosts >= 1, got {hosts}")
        gen = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        std = self.noise_multiplier * self.clip_norm / hosts
        return OrderedDict(
            (k, (std * gen.standard_normal(s)).astype(np.float32))
            for k, s in shapes.items()
        )

    def epsilon(self, rounds: int) -> float:
        """Client-level epsilon after ``rounds`` released aggregates."""
        events = [DPEvent(self.noise_multiplier, 1.0, rounds)] if rounds else []
        return epsilon_of(events, delta=self.delta, accountant=self.accountant)


def client_dp_for(cfg: RunConfig) -> ClientDP | None:
    """The run's mechanism (``z`` derived from ``target_epsilon`` over the planned
    rounds when no ``noise_multiplier`` is set), or None when client DP is off."""
    c = cfg.client_dp
    if not c.enabled:
        return None
    assert c.clip_norm is not None  # enforced by ClientDPConfig
    clip: float = c.clip_norm

    def mech(z: float) -> ClientDP:
        return ClientDP(
            clip_norm=clip,
            noise_multiplier=z,
            delta=c.delta,
            accountant=cfg.privacy.accountant,
        )

    if c.noise_multiplier is not None:
        return mech(c.noise_multiplier)
    target = c.target_epsilon
    assert target is not None  # enforced by ClientDPConfig
    rounds = cfg.federation.rounds
    low, high = 0.0, 1.0
    while mech(high).epsilon(rounds) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise PrivacyError(
                f"client_dp.target_epsilon = {target} cannot be reached over "
                f"{rounds} rounds; raise it or plan fewer rounds"
            )
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if mech(mid).epsilon(rounds) > target:
            low = mid
        else:
            high = mid
    return mech(high)
