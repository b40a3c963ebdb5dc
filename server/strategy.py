"""Aggregation of LoRA adapter deltas under a weighting policy.

Hosts send ``local - global`` (fp16 or fp32). The server checks every reply on its own
(names, shapes, finite values, the norm bound of ``server.checks``), so one bad host
is rejected with its reason logged and the round goes on with the rest. Accepted
deltas are combined in fp32 with the weights of the configured policy
(``server.policies``: ``fedavg`` weighs by ``num-examples``) and added to the fp32
global adapter. With client-level DP (``server.client_dp``) every accepted delta is
clipped, hosts weigh equally over the hosts asked, and the mean gets Gaussian noise.

``round_offset`` lets a resumed run continue its numbering: Flower's ``start`` counts
rounds from 1, the run counts from ``offset + 1``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import serde
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.adapter import apply_delta, decode_delta, layout_id, pack_global
from common.config import AggregationConfig
from server.checks import update_norm
from server.client_dp import ClientDP
from server.policies import FedAvgPolicy, HostUpdate, Policy, Weighing

__all__ = ["AdapterFedAvg", "RoundOutcome"]

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What the server learnt in one round, for metrics and checkpoint metadata."""

    round: int
    hosts: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # host -> values
    bytes: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # host -> reason
    failed: dict[str, str] = field(default_factory=dict)  # node -> error reason
    weights: dict[str, float] = field(default_factory=dict)  # host -> weight
    drift: dict[str, float] = field(default_factory=dict)  # host -> drift score
    drift_events: list[str] = field(default_factory=list)
    damped: dict[str, str] = field(default_factory=dict)  # host -> reason
    step: float = 1.0  # server step on the weighted mean update
    clipped: dict[str, float] = field(default_factory=dict)  # host -> norm (client DP)
    wait_s: float = 0.0  # from sending the train messages to having every reply


def host_name(msg: Message) -> str:
    info = msg.content.config_records.get("info") if msg.has_content() else None
    if info is not None and "host" in info:
        return str(info["host"])
    return f"node-{msg.metadata.src_node_id}"


class AdapterFedAvg(FedAvg):
    """FedAvg whose replies are adapter deltas, validated one by one."""

    def __init__(
        self,
        *,
        global_arrays: OrderedDict[str, np.ndarray],
        base_config: dict[str, Any],
        round_offset: int = 0,
        policy: Policy | None = None,
        before_round: Callable[[int], None] | None = None,
        max_update_norm: float | None = None,
        client_dp: ClientDP | None = None,
        noise_rng: np.random.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.client_dp = client_dp
        self.noise_rng = noise_rng  # tests only; None: the OS's CSPRNG each round
        self.max_update_norm = max_update_norm  # server.checks; None: no bound
        self.policy = policy or FedAvgPolicy(AggregationConfig())
        self.before_round = before_round
        self.global_arrays = global_arrays
        self.shapes = {k: tuple(v.shape) for k, v in global_arrays.items()}
        self.layout = layout_id(self.shapes)
        self.base_config = base_config
        self.round_offset = round_offset
        self.outcome = RoundOutcome(round=round_offset)
        self._sent: list[Message] = []
        self._sent_at = time.perf_counter()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**self.base_config, **dict(config)})
        if self.before_round is not None:
            # e.g. a simulated stream delivering this round's records to the hosts
            self.before_round(self.round_offset + server_round)
        self._sent = list(
            super().configure_train(
                self.round_offset + server_round, arrays, config, grid
            )
        )
        self._sent_at = time.perf_counter()
        return self._sent

    def failed_node(self, msg: Message) -> str:
        """The node an error reply is about. The SuperLink answers for a node it
        gave up on in its own name: find the node the message was sent to (the grid
        sets the message ids of the messages it pushes)."""
        sent = {m.metadata.message_id: m for m in self._sent}
        ins = sent.get(msg.metadata.reply_to_message_id)
        node = ins.metadata.dst_node_id if ins is not None else msg.metadata.src_node_id
        return f"node-{node}"

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**self.base_config, **dict(config)})
        return super().configure_evaluate(
            self.round_offset + server_round, arrays, config, grid
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        outcome = RoundOutcome(round=self.round_offset + server_round)
        outcome.wait_s = time.perf_counter() - self._sent_at
        self.outcome = outcome
        valid, errors = self._check_and_log_replies(
            replies, is_train=True, validate=False
        )
        for msg in errors:
            outcome.failed[self.failed_node(msg)] = msg.error.reason or ""

        updates: list[HostUpdate] = []
        # Sorted by host so the fp32 sum does not depend on reply arrival order.
        for msg in sorted(valid, key=host_name):
            name = host_name(msg)
            reason, delta, weight = self._check_reply(msg)
            outcome.bytes[name] = serde.recorddict_to_proto(msg.content).ByteSize()
            metrics = msg.content.metric_records.get("metrics")
            if metrics is not None:
                outcome.metrics[name] = {
                    k: float(v)
                    for k, v in metrics.items()
                    if isinstance(v, (int, float))
                }
            if reason is not None:
                outcome.rejected[name] = reason
                log.warning(
                    "Round %s: rejected update from %s: %s", outcome.round, name, reason
                )
                continue
            assert delta is not None
            outcome.hosts.append(name)
            m = outcome.metrics.get(name, {})
            base_round = m.get("base-round", outcome.round)
            updates.append(
                HostUpdate(
                    name=name,
                    delta=delta,
                    examples=weight,
                    drift_score=float(m.get("drift-score", 0.0)),
                    drift_event=bool(m.get("drift-event", 0)),
                    staleness=max(0, int(outcome.round - base_round)),
                )
            )

        if not updates:
            log.warning(
                "Round %s: no usable update; the global adapter is unchanged",
                outcome.round,
            )
            return None, None
        asked = self._asked(replies, updates)
        weighing = self._weigh(updates, asked=asked)
        outcome.weights = {h: round(w, 4) for h, w in weighing.weights.items()}
        outcome.drift = {u.name: u.drift_score for u in updates}
        outcome.drift_events = [u.name for u in updates if u.drift_event]
        outcome.damped = weighing.damped
        outcome.step = weighing.step
        if outcome.drift_events:
            log.warning(
                "Round %s: drift events from %s",
                outcome.round,
                ", ".join(outcome.drift_events),
            )
        for host, why in weighing.damped.items():
            log.warning("Round %s: damped update from %s: %s", outcome.round, host, why)
        log.info(
            "Round %s: policy %s, weights %s, drift scores %s, drift events %s, "
            "server step %.3g",
            outcome.round,
            self.policy.name,
            outcome.weights,
            outcome.drift,
            outcome.drift_events,
            weighing.step,
        )
        mean: OrderedDict[str, np.ndarray] = OrderedDict()
        for key, value in self.global_arrays.items():
            acc = np.zeros_like(value)
            for u in updates:
                w = (
                    weighing.step
                    * weighing.weights[u.name]
                    * weighing.scale.get(u.name, 1.0)
                )
                acc += np.float32(w) * u.delta[key]
            mean[key] = acc
        mean = self._noised(mean, asked=asked)
        self.global_arrays = apply_delta(self.global_arrays, mean)
        return pack_global(self.global_arrays), self._round_metrics(outcome)

    def _asked(self, replies: list[Message], updates: list[HostUpdate]) -> int:
        """Hosts the round was sent to: fixed before any reply (client DP's n)."""
        return max(len(self._sent), len(replies), len(updates))

    def _weigh(self, updates: list[HostUpdate], *, asked: int) -> Weighing:
        """The policy's weights, or under client-level DP equal weights ``1/asked``
        with each update clipped (``scale``) and server step 1 (``server.client_dp``).
        """
        if self.client_dp is None:
            return self.policy.weigh(updates)
        weighing = Weighing(weights={u.name: 1.0 / asked for u in updates})
        for u in updates:
            norm = update_norm(u.delta)
            factor = self.client_dp.clip_factor(norm)
            if factor < 1.0:
                weighing.scale[u.name] = factor
                self.outcome.clipped[u.name] = round(norm, 6)
        if self.outcome.clipped:
            log.info(
                "Round %s: client-level DP clipped %s to norm %.4g",
                self.outcome.round,
                self.outcome.clipped,
                self.client_dp.clip_norm,
            )
        return weighing

    def _noised(
        self, mean: OrderedDict[str, np.ndarray], *, asked: int
    ) -> OrderedDict[str, np.ndarray]:
        """``mean`` plus the client-level noise of the round (unchanged without)."""
        if self.client_dp is None:
            return mean
        noise = self.client_dp.noise(self.shapes, asked, rng=self.noise_rng)
        return OrderedDict((k, v + noise[k]) for k, v in mean.items())

    @staticmethod
    def _round_metrics(outcome: RoundOutcome) -> MetricRecord:
        """The round's aggregate metrics: mean train loss of the hosts aggregated."""
        losses = [
            m["train-loss"]
            for h, m in outcome.metrics.items()
            if h in outcome.hosts and "train-loss" in m
        ]
        return MetricRecord(
            {
                "train-loss": float(np.mean(losses)) if losses else 0.0,
                "hosts": len(outcome.hosts),
            }
        )

    def _check_reply(
        self, msg: Message
    ) -> tuple[str | None, OrderedDict[str, np.ndarray] | None, float]:
        content = msg.content
        if "arrays" not in content.array_records:
            return "reply has no 'arrays' record", None, 0.0
        metrics = content.metric_records.get("metrics")
        weight = metrics.get("num-examples") if metrics is not None else None
        if not isinstance(weight, (int, float)) or not weight > 0:
            return f"num-examples must be a positive number, got {weight!r}", None, 0.0
        info = content.config_records.get("info")
        layout = info.get("layout") if info is not None else None
        if layout != self.layout:
            return (
                (
                    f"update layout {layout!r} differs from the global adapter's "
                    f"{self.layout!r} (other model or lora settings)"
                ),
                None,
                0.0,
            )
        try:
            delta = decode_delta(content.array_records["arrays"], self.shapes)
        except Exception as err:
            return str(err), None, 0.0
        for key, value in delta.items():
            if not np.isfinite(value).all():
                return f"update has NaN/Inf in {key}", None, 0.0
        bound = self.max_update_norm
        if bound is not None and (norm := update_norm(delta)) > bound:
            return (
                f"update norm {norm:.4g} is above the bound {bound:.4g} "
                "(aggregation.max_update_norm)",
                None,
                0.0,
            )
        return None, delta, float(weight)
