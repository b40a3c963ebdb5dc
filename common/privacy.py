"""Privacy accounting across rounds.

Events (noise multiplier, Poisson sample rate, steps) compose with an Opacus accountant
(``epsilon_of``). On a host, ``StreamPlan`` turns each record's own history (rounds it
was eligible in, rounds it was counted in) into that record's epsilon; the host's
guarantee is the largest of them (``client.window``).

Sample rate and the gradient normaliser are fixed by configuration, never computed from
the data, so epsilon itself reveals nothing about the host's dataset.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from opacus.accountants import create_accountant

from common.config import PrivacyConfig, RunConfig, TrainingConfig
from common.errors import PrivacyError

__all__ = [
    "DPEvent",
    "StreamPlan",
    "epsilon_of",
    "planned_noise_multiplier",
    "run_noise_multiplier",
    "run_plan",
    "stream_plan",
]


@dataclass(frozen=True)
class DPEvent:
    """``steps`` Poisson-subsampled Gaussian steps at rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise PrivacyError(
                f"DPEvent.noise_multiplier must be > 0, got {self.noise_multiplier}"
            )
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(
                f"DPEvent.sample_rate must be in (0, 1], got {self.sample_rate}"
            )
        if self.steps < 0:
            raise PrivacyError(f"DPEvent.steps must be >= 0, got {self.steps}")


def epsilon_of(events: list[DPEvent], *, delta: float, accountant: str) -> float:
    if not events:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    return float(acc.get_epsilon(delta=delta))


def planned_noise_multiplier(
    privacy: PrivacyConfig,
    training: TrainingConfig,
    *,
    rounds: int,
    extra_queries: int = 0,
) -> float:
    """The configured sigma, or the smallest one with which a record that is eligible
    and counted in every one of ``rounds`` rounds, and charged ``extra_queries`` more
    count queries once (the drift release), ends at ``target_epsilon``."""
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    target = privacy.target_epsilon
    assert target is not None  # enforced by PrivacyConfig

    def plan(sigma: float) -> StreamPlan:
        return StreamPlan(
            noise_multiplier=sigma,
            sample_rate=training.sample_rate,
            steps_per_round=training.local_steps,
            count_noise=privacy.count_noise,
            record_budget=target,
            delta=privacy.delta,
            accountant=privacy.accountant,
        )

    counts = rounds + extra_queries
    counts_only = plan(1.0).epsilon(0, counts)
    if counts_only >= target:
        raise PrivacyError(
            f"privacy.target_epsilon = {target} cannot be reached: the noisy counts "
            f"alone spend {counts_only:.3g} over {rounds} rounds; raise "
            "target_epsilon or privacy.count_noise, or plan fewer rounds"
        )
    low, high = 0.0, 1.0
    while plan(high).epsilon(rounds, counts) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise PrivacyError(
                f"privacy.target_epsilon = {target} cannot be reached with sample_rate "
                f"{training.sample_rate} over {rounds * training.local_steps} steps "
                "(noise would exceed the accountant's limit); raise target_epsilon, "
                "lower training.sample_rate, or plan fewer rounds/local_steps"
            )
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if plan(mid).epsilon(rounds, counts) > target:
            low = mid
        else:
            high = mid
    return high


def stream_plan(
    privacy: PrivacyConfig,
    training: TrainingConfig,
    *,
    rounds: int,
    extra_queries: int = 0,
) -> StreamPlan:
    """The per-record plan a host trains under (no budget cap without DP)."""
    sigma = (
        planned_noise_multiplier(
            privacy, training, rounds=rounds, extra_queries=extra_queries
        )
        if privacy.enabled
        else 1.0
    )
    budget = privacy.target_epsilon if privacy.enabled else None
    return StreamPlan(
        noise_multiplier=sigma,
        sample_rate=training.sample_rate,
        steps_per_round=training.local_steps,
        count_noise=privacy.count_noise,
        record_budget=budget or float("inf"),
        delta=privacy.delta,
        accountant=privacy.accountant,
    )


@dataclass(frozen=True)
class StreamPlan:
    """Per-record accounting for a host that trains on a stream.

    A record's privacy loss comes only from the rounds it takes part in:

    * every round while it is live, one Gaussian count query (noise ``count_noise``,
      sensitivity 1: each record is in exactly one count) that sets the eligibility
      rates of the fresh window and of each replay group;
    * every round it is eligible, ``steps_per_round`` Poisson-subsampled Gaussian
      steps (rate ``sample_rate``, noise ``noise_multiplier``).

    ``epsilon(m, c)`` composes both with the accountant for a record that was
    eligible in ``m`` rounds and counted in ``c``. A host's guarantee is the largest
    epsilon over its records; a record retires before it would pass ``record_budget``.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    count_noise: float
    record_budget: float
    delta: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "count_noise", "record_budget"):
            if not getattr(self, name) > 0:
                raise PrivacyError(
                    f"StreamPlan.{name} must be > 0, got {getattr(self, name)}"
                )

    def events(self, eligible_rounds: int, count_rounds: int) -> list[DPEvent]:
        return [
            DPEvent(
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=self.steps_per_round * eligible_rounds,
            ),
            DPEvent(
                noise_multiplier=self.count_noise, sample_rate=1.0, steps=count_rounds
            ),
        ]

    def epsilon(self, eligible_rounds: int, count_rounds: int) -> float:
        return _stream_epsilon(self, eligible_rounds, count_rounds)

    def fits(self, eligible_rounds: int, count_rounds: int) -> bool:
        return self.epsilon(eligible_rounds, count_rounds) <= self.record_budget


@functools.lru_cache(maxsize=4096)
def _stream_epsilon(plan: StreamPlan, eligible_rounds: int, count_rounds: int) -> float:
    events = [e for e in plan.events(eligible_rounds, count_rounds) if e.steps > 0]
    return epsilon_of(events, delta=plan.delta, accountant=plan.accountant)


def run_plan(cfg: RunConfig) -> StreamPlan:
    """The plan of a run: its rounds, plus the drift release when drift is on."""
    return stream_plan(
        cfg.privacy,
        cfg.training,
        rounds=cfg.federation.rounds,
        extra_queries=cfg.drift.query_weight if cfg.drift.enabled else 0,
    )


def run_noise_multiplier(cfg: RunConfig) -> float:
    return planned_noise_multiplier(
        cfg.privacy,
        cfg.training,
        rounds=cfg.federation.rounds,
        extra_queries=cfg.drift.query_weight if cfg.drift.enabled else 0,
    )
