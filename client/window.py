"""Which stored records a round trains on: the fresh window plus a balanced replay.

Eligibility is decided per record, from the record itself and DP outputs only, so the
per-record accounting of ``common.privacy.StreamPlan`` holds:

1. Noisy counts. Each live record is counted once: in the fresh count if it arrived
   since the last round, else in its replay group's count (group = keyed hash of its
   label or first tag). Gaussian noise ``count_noise`` is added to every count. This is
   the only place other records influence a record's eligibility, and it is a DP
   output charged to every live record.
2. Rates from the noisy counts: ``min(1, fresh_cap / fresh)`` for fresh records and
   ``min(1, replay_cap / group)`` for each replay group, so a surge of one kind fills
   its own share and cannot crowd out the others, and the expected training set is
   bounded by ``fresh_cap + groups x replay_cap`` however long the stream runs.
3. Coins. A record is eligible when its own keyed coin HMAC(secret, seq, release) falls
   below its rate: independent of every other record.
4. Drift sample. An eligible fresh record joins the drift sample when a second keyed
   coin falls below ``min(1, drift_cap / expected eligible fresh)`` (from the noisy
   count) and it can afford ``drift_weight`` more count queries, which it is charged
   (the drift release, ``common.drift``).
5. Budget. A record that could not afford this round (its epsilon after one more
   eligible round would pass the per-record budget) is not eligible; one that cannot
   afford even being counted again retires for good.

The ledger update (counted, eligible, retired) is committed before training starts,
so it is on disk before any update can leave the host.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from client.store import Store
from common.privacy import StreamPlan

__all__ = ["Selection", "WindowSettings", "host_epsilon", "select_round"]


@dataclass(frozen=True)
class WindowSettings:
    fresh_cap: int = 256  # expected fresh records a round
    replay_cap: int = 64  # expected replayed records per group a round


@dataclass(frozen=True)
class Selection:
    round: int
    eligible: list[int]  # seqs to train on
    fresh: int  # eligible fresh records
    replay: int  # eligible replayed records
    retired: int  # records retired this round
    live: int  # live records after this round
    drift: list[int] = field(default_factory=list)  # seqs in the drift sample
    drift_expected: float = 0.0  # expected drift sample size, from noisy counts
    expected: float = 0.0  # expected eligible records, from noisy counts
    release: int = 0  # this host's release number (keys all noise of the round)


def _coin(secret: bytes, seq: int, rnd: int, kind: str = "coin") -> float:
    mac = hmac.new(secret, f"{kind}:{seq}:{rnd}".encode(), hashlib.sha256).digest()
    return int.from_bytes(mac[:7], "big") / 2.0**56


def select_round(
    store: Store,
    plan: StreamPlan,
    settings: WindowSettings,
    *,
    round_num: int,
    secret: bytes,
    drift_weight: int = 0,
    drift_cap: int = 0,
) -> Selection:
    """Choose and commit this round's eligible records (see the module docstring).

    Memory is bounded by configuration: counts come from one SQL aggregate, the
    live records are streamed once, and only the eligible seqs are kept.
    """
    last_seq = store.meta_int("fresh_after", 0)
    top = store.max_seq()  # records arriving during selection wait for next round
    fresh_key = b"\x00fresh"
    # 1. Counts of the records that can afford this round's count query.
    # Every selection is a new release, numbered by a counter committed with its
    # spend: noise and coins are keyed by it, never by the server's round number, so
    # a second run against this host (which starts again at round 1) or a re-run of
    # a round after a crash draws fresh noise (and is charged again).
    release = store.meta_int("releases", 0) + 1
    counts: dict[bytes, int] = defaultdict(int)
    retiring: list[tuple[int, int]] = []
    for is_fresh, grp, elig, queries, n in store.live_summary(last_seq, top):
        if plan.fits(elig, queries + 1):
            counts[fresh_key if is_fresh else grp] += n
        else:
            retiring.append((elig, queries))  # cannot even be counted again
    rates = {}
    noisy_counts: dict[bytes, float] = {}
    for key, n in counts.items():
        # Noise keyed by (round, group) from the host secret: the server cannot
        # reproduce it, and one group's noise does not depend on which others exist.
        tag = b"counts:%d:" % release + key
        seed = hmac.new(secret, tag, hashlib.sha256).digest()
        noisy = n + np.random.default_rng(int.from_bytes(seed[:8], "big")).normal(
            0.0, plan.count_noise
        )
        cap = settings.fresh_cap if key == fresh_key else settings.replay_cap
        rates[key] = min(1.0, cap / max(noisy, 1.0))
        noisy_counts[key] = max(noisy, 0.0)
    # The drift sample: eligible fresh records whose own second coin falls below a
    # rate set from the noisy fresh count (so about drift_cap records).
    fresh_expected = noisy_counts.get(fresh_key, 0.0) * rates.get(fresh_key, 0.0)
    drift_rate = (
        min(1.0, drift_cap / max(fresh_expected, 1.0)) if drift_weight > 0 else 0.0
    )
    drift: list[int] = []
    # 2. Each record's own coin against its group's rate.
    eligible: list[int] = []
    fresh = replay = 0
    for seq, grp, elig, queries in store.iter_live(top):
        key = fresh_key if seq > last_seq else grp
        if key not in rates or not plan.fits(elig + 1, queries + 1):
            continue
        if _coin(secret, seq, release) < rates[key]:
            eligible.append(seq)
            fresh += key == fresh_key
            replay += key != fresh_key
            if (
                key == fresh_key
                and drift_rate > 0
                and plan.fits(elig + 1, queries + 1 + drift_weight)
                and _coin(secret, seq, release, "drift") < drift_rate
            ):
                drift.append(seq)
    # 3. The spend, committed before any training.
    retired, live = store.apply_round(
        top=top,
        retire=retiring,
        eligible=eligible,
        extra=drift,
        extra_queries=drift_weight,
        meta={
            "fresh_after": max(top, last_seq),
            "last_round": round_num,
            "releases": release,
        },
    )
    expected = sum(noisy_counts[k] * rates[k] for k in rates)
    return Selection(
        round_num,
        eligible,
        fresh,
        replay,
        retired,
        live,
        drift=drift,
        drift_expected=fresh_expected * drift_rate,
        expected=expected,
        release=release,
    )


def host_epsilon(store: Store, plan: StreamPlan) -> float:
    """The host's guarantee: the largest per-record epsilon over all its records."""
    return max((plan.epsilon(m, c) for m, c, _ in store.spend()), default=0.0)
