"""Privacy accounting across rounds.

A host's ``Ledger`` holds every DP-SGD event it has taken part in (noise multiplier,
Poisson sample rate, steps) and composes them with an Opacus accountant, so the epsilon
it reports covers the whole run, not one round. The ledger is saved (atomically) before
an update leaves the host, and a host refuses a round that would exceed its budget.

Sample rate and the gradient normaliser are fixed by configuration, never computed from
the data, so epsilon itself reveals nothing about the host's dataset.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.config import PrivacyConfig, TrainingConfig
from common.errors import PrivacyError

__all__ = [
    "DPEvent",
    "Ledger",
    "StreamPlan",
    "noise_multiplier_for",
    "planned_noise_multiplier",
]


@dataclass(frozen=True)
class DPEvent:
    """``steps`` Poisson-subsampled Gaussian steps at rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    round: int = 0

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


@dataclass
class Ledger:
    """Composed privacy spend of one host, persisted as JSON."""

    accountant: str
    delta: float
    events: list[DPEvent] = field(default_factory=list)

    def epsilon(self) -> float:
        return epsilon_of(self.events, delta=self.delta, accountant=self.accountant)

    def epsilon_with(self, event: DPEvent) -> float:
        return epsilon_of(
            [*self.events, event], delta=self.delta, accountant=self.accountant
        )

    def record(self, event: DPEvent) -> None:
        self.events.append(event)

    # -- persistence ----------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write atomically and fsync: a crash leaves the old or the new ledger."""
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = json.dumps(
            {
                "accountant": self.accountant,
                "delta": self.delta,
                "events": [asdict(e) for e in self.events],
            },
            indent=1,
        )
        fd, tmp = tempfile.mkstemp(prefix=".ledger-", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, *, accountant: str, delta: float) -> Ledger:
        if not path.exists():
            return cls(accountant=accountant, delta=delta)
        try:
            data = json.loads(path.read_text())
            events = [DPEvent(**e) for e in data["events"]]
        except (ValueError, KeyError, TypeError) as err:
            raise PrivacyError(
                f"privacy ledger {path} is unreadable ({err}); refusing to train "
                "without knowing the spent budget"
            ) from None
        if data.get("accountant") != accountant or data.get("delta") != delta:
            raise PrivacyError(
                f"privacy ledger {path} was written with accountant="
                f"{data.get('accountant')} delta={data.get('delta')}, but the config "
                f"says accountant={accountant} delta={delta}; keep them fixed for a "
                "host"
            )
        return cls(accountant=accountant, delta=delta, events=events)


def noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
) -> float:
    """Smallest sigma with composed epsilon after ``steps`` <= ``target_epsilon``."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=0.005,
            )
        )
    except ValueError:
        raise PrivacyError(
            f"privacy.target_epsilon = {target_epsilon} cannot be reached with "
            f"sample_rate {sample_rate} over {steps} steps (noise would exceed the "
            "accountant's limit); raise target_epsilon, lower training.sample_rate, "
            "or plan fewer rounds/local_steps"
        ) from None


def planned_noise_multiplier(
    privacy: PrivacyConfig, training: TrainingConfig, *, rounds: int
) -> float:
    """The configured sigma, or the one that spends ``target_epsilon`` over the plan."""
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    assert privacy.target_epsilon is not None  # enforced by PrivacyConfig
    return noise_multiplier_for(
        target_epsilon=privacy.target_epsilon,
        delta=privacy.delta,
        sample_rate=training.sample_rate,
        steps=rounds * training.local_steps,
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
