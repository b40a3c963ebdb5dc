"""Secure aggregation (``aggregation.secure = true``): SecAgg+ with weights agreed
before masking (protocol: ``common.secagg``; host side: ``client.secagg``).

A round is Flower's train exchange followed by three more exchanges on the same grid,
all inside ``aggregate_train``:

1. train replies carry metrics only (noised example count and drift score, the
   update's norm) and two public keys; the server checks them (layout, count, norm
   bound) and weighs the hosts with the configured policy;
2. share-keys: each host gets its weight and its neighbours' public keys;
3. mask: each host sends its weighted, quantised, masked delta;
4. unmask: the server collects the shares that remove the masks and obtains only
   ``sum_i f_i x delta_i``, divided by the weights of the hosts whose vector it got.

The server never sees an individual delta, so it cannot check one: its checks are
the host's own (the guard, finite values), the reported norm against the bound, and
coordinate clipping at ``f_i x B`` inside quantisation, which bounds what any one host
can add. With client-level DP (``server.client_dp``) each host clips its own update
to ``clip_norm`` before masking, a reported norm above it is rejected, the weights
are ``1/hosts asked``, and the server adds the noise to the unmasked sum.

The policy sees each host's reported norm as a one-number "delta": the
drift policy's norm damping works as in the clear, its cosine damping cannot (it
needs the individual directions) and is neutral.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import serde
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    generate_shared_key,
)
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
)

from common.adapter import apply_delta, pack_global
from common.secagg import RECORD, blobs, dequantize_sum, ints, mask
from server.policies import HostUpdate
from server.strategy import AdapterFedAvg, RoundOutcome, host_name

__all__ = ["SecureAdapterFedAvg"]

log = logging.getLogger(__name__)


class SecureAdapterFedAvg(AdapterFedAvg):
    def __init__(
        self,
        *,
        shares: int = 0,
        stage_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.shares = shares  # neighbours per host incl. itself; 0: every host
        self.stage_timeout = stage_timeout
        self._grid: Grid | None = None
        self._rng = random.SystemRandom()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._grid = grid
        return super().configure_train(server_round, arrays, config, grid)

    # -- the round -----------------------------------------------------------------
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
        keys: dict[str, tuple[int, bytes, bytes]] = {}
        for msg in sorted(valid, key=host_name):
            name = host_name(msg)
            outcome.bytes[name] = serde.recorddict_to_proto(msg.content).ByteSize()
            metrics = msg.content.metric_records.get("metrics")
            if metrics is not None:
                outcome.metrics[name] = {
                    k: float(v)
                    for k, v in metrics.items()
                    if isinstance(v, (int, float))
                }
            reason, norm, weight, pks = self._check_secure_reply(msg)
            if reason is not None:
                outcome.rejected[name] = reason
                log.warning(
                    "Round %s: rejected update from %s: %s", outcome.round, name, reason
                )
                continue
            keys[name] = (msg.metadata.src_node_id, *pks)
            m = outcome.metrics.get(name, {})
            updates.append(
                HostUpdate(
                    name=name,
                    delta=OrderedDict(norm=np.array([norm], dtype=np.float64)),
                    examples=weight,
                    drift_score=float(m.get("drift-score", 0.0)),
                    drift_event=bool(m.get("drift-event", 0)),
                    staleness=max(0, int(outcome.round - m.get("base-round", 0))),
                )
            )
        if len(updates) < 2:
            log.warning(
                "Round %s: secure aggregation needs 2 or more updates, got %d; the "
                "global adapter is unchanged",
                outcome.round,
                len(updates),
            )
            for u in updates:
                outcome.failed[u.name] = "secure aggregation needs 2 or more hosts"
            return None, None
        asked = self._asked(replies, updates)
        weighing = self._weigh(updates, asked=asked)
        outcome.drift = {u.name: u.drift_score for u in updates}
        outcome.drift_events = [u.name for u in updates if u.drift_event]
        outcome.damped = weighing.damped
        for host, why in weighing.damped.items():
            log.warning("Round %s: damped update from %s: %s", outcome.round, host, why)
        norms = {u.name: float(u.delta["norm"][0]) for u in updates}
        result = self._secure_sum(
            outcome, keys, weighing.weights, weighing.scale, norms
        )
        if result is None:
            return None, None
        total, got = result
        weight_sum = sum(weighing.weights[h] for h in got)
        outcome.hosts = sorted(got)
        if self.client_dp is not None:
            # Fixed denominator: the weights 1/asked are already in the sum.
            weight_sum = 1.0
        outcome.weights = {
            h: round(weighing.weights[h] / weight_sum, 4) for h in outcome.hosts
        }
        if weight_sum <= 0 or not np.isfinite(total).all():
            log.warning(
                "Round %s: secure sum unusable; adapter unchanged", outcome.round
            )
            return None, None
        # The policy's server step (public, from the reported scores) applies to
        # the weighted mean as in the plain path.
        outcome.step = weighing.step
        mean_flat = (weighing.step * total / weight_sum).astype(np.float32)
        mean: OrderedDict[str, np.ndarray] = OrderedDict()
        offset = 0
        for key, shape in self.shapes.items():
            size = int(np.prod(shape))
            mean[key] = mean_flat[offset : offset + size].reshape(shape)
            offset += size
        mean = self._noised(mean, asked=asked)
        self.global_arrays = apply_delta(self.global_arrays, mean)
        log.info(
            "Round %s: secure aggregate of %d hosts, policy %s, weights %s",
            outcome.round,
            len(got),
            self.policy.name,
            outcome.weights,
        )
        return pack_global(self.global_arrays), self._round_metrics(outcome)

    def _check_secure_reply(
        self, msg: Message
    ) -> tuple[str | None, float, float, tuple[bytes, bytes]]:
        content = msg.content
        none = (b"", b"")
        if content.array_records:
            return "a secure-aggregation reply must not carry arrays", 0.0, 0.0, none
        metrics = content.metric_records.get("metrics")
        weight = metrics.get("num-examples") if metrics is not None else None
        if not isinstance(weight, (int, float)) or not weight > 0:
            return f"num-examples must be a positive number, got {weight!r}", 0, 0, none
        info = content.config_records.get("info")
        layout = info.get("layout") if info is not None else None
        if layout != self.layout:
            return f"update layout {layout!r} differs from {self.layout!r}", 0, 0, none
        norm = metrics.get("update-norm") if metrics is not None else None
        if not isinstance(norm, (int, float)) or not math.isfinite(norm) or norm < 0:
            return f"update-norm must be a finite number, got {norm!r}", 0, 0, none
        bound = self.max_update_norm
        if bound is not None and norm > bound:
            return (
                f"update norm {norm:.4g} is above the bound {bound:.4g} "
                "(aggregation.max_update_norm)",
                0.0,
                0.0,
                none,
            )
        clip = self.client_dp.clip_norm if self.client_dp is not None else None
        if clip is not None and norm > clip * (1 + 1e-6):
            return (
                f"update norm {norm:.4g} is above client_dp.clip_norm {clip:.4g}: "
                "the host did not clip its update",
                0.0,
                0.0,
                none,
            )
        sa = content.config_records.get(RECORD)
        pk1 = sa.get("pk1") if sa is not None else None
        pk2 = sa.get("pk2") if sa is not None else None
        if not isinstance(pk1, bytes) or not isinstance(pk2, bytes):
            return "reply has no secure-aggregation public keys", 0.0, 0.0, none
        return None, float(norm), float(weight), (pk1, pk2)

    def _exchange(
        self,
        outcome: RoundOutcome,
        stage: str,
        contents: dict[int, dict[str, Any]],
        names: dict[int, str],
    ) -> dict[int, RecordDict]:
        """One stage: send, collect, count bytes; a host without a reply drops."""
        assert self._grid is not None
        msgs = [
            Message(
                content=RecordDict(
                    {
                        RECORD: ConfigRecord(
                            {"stage": stage, "round": outcome.round, **body}
                        )
                    }
                ),
                dst_node_id=nid,
                message_type="train",
                group_id=str(outcome.round),
            )
            for nid, body in contents.items()
        ]
        out: dict[int, RecordDict] = {}
        for reply in self._grid.send_and_receive(msgs, timeout=self.stage_timeout):
            nid = reply.metadata.src_node_id
            if nid not in names:
                continue
            name = names[nid]
            if reply.has_error():
                outcome.failed[name] = f"secure aggregation ({stage}): " + (
                    reply.error.reason or "error"
                )
                continue
            outcome.bytes[name] = outcome.bytes.get(name, 0) + (
                serde.recorddict_to_proto(reply.content).ByteSize()
            )
            out[nid] = reply.content
        for nid, name in names.items():
            if nid in contents and nid not in out and name not in outcome.failed:
                outcome.failed[name] = f"secure aggregation ({stage}): no reply"
        return out

    def _secure_sum(
        self,
        outcome: RoundOutcome,
        keys: dict[str, tuple[int, bytes, bytes]],
        weights: dict[str, float],
        scale: dict[str, float],
        norms: dict[str, float],
    ) -> tuple[np.ndarray, list[str]] | None:
        size = sum(int(np.prod(s)) for s in self.shapes.values())
        hosts = sorted(h for h in keys if weights.get(h, 0.0) > 0)
        n = len(hosts)
        index = {h: i + 1 for i, h in enumerate(hosts)}  # protocol ids 1..n
        nid_of = {index[h]: keys[h][0] for h in hosts}
        name_of_nid = {keys[h][0]: h for h in hosts}
        pk1 = {index[h]: keys[h][1] for h in hosts}
        pk2 = {index[h]: keys[h][2] for h in hosts}
        k = n if not self.shares or self.shares >= n else self.shares | 1
        t = max(2, k // 2 + 1)
        order = list(range(1, n + 1))
        self._rng.shuffle(order)
        half = k // 2
        nb: dict[int, list[int]] = {
            order[p]: sorted({order[(p + o) % n] for o in range(-half, half + 1)})
            for p in range(n)
        }
        bound = max(max(norms[h] for h in hosts), 1e-12) * (1 + 1e-6)
        factor = {h: weights[h] * scale.get(h, 1.0) for h in hosts}
        clips = {h: factor[h] * bound for h in hosts}
        q_scale = (2**31 - 1 - n) / max(sum(clips.values()), 1e-30)

        # share-keys: weights and neighbours' keys out, encrypted shares back
        sent = {
            nid_of[index[h]]: {
                "index": index[h],
                "ids": nb[index[h]],
                "pk1": [pk1[j] for j in nb[index[h]]],
                "pk2": [pk2[j] for j in nb[index[h]]],
                "t": t,
                "f": factor[h],
                "clip": clips[h],
                "scale": q_scale,
            }
            for h in hosts
        }
        got = self._exchange(outcome, "share-keys", sent, name_of_nid)
        u2 = {index[name_of_nid[nid]] for nid in got}
        forward: dict[int, tuple[list[int], list[bytes]]] = {i: ([], []) for i in u2}
        for nid, content in got.items():
            src = index[name_of_nid[nid]]
            rec = content.config_records.get(RECORD, ConfigRecord())
            try:
                pairs = list(zip(ints(rec, "dst"), blobs(rec, "ct"), strict=True))
            except ValueError as err:
                log.warning("Round %s: %s from host %d", outcome.round, err, src)
                continue
            for dst, ct in pairs:
                if dst in u2 and dst in nb[src]:
                    forward[dst][0].append(src)
                    forward[dst][1].append(ct)
        if not self._enough(outcome, u2, nb, t, "share-keys"):
            return None

        # mask: forwarded shares out, masked vectors back
        sent = {nid_of[i]: {"srcs": forward[i][0], "cts": forward[i][1]} for i in u2}
        got = self._exchange(outcome, "mask", sent, name_of_nid)
        total = np.zeros(size, dtype=np.uint32)
        u3: set[int] = set()
        for nid, content in got.items():
            arrays = content.array_records.get("masked")
            y = arrays["y"].numpy() if arrays is not None and "y" in arrays else None
            if y is None or y.dtype != np.uint32 or y.shape != (size,):
                outcome.failed[name_of_nid[nid]] = "secure aggregation: bad vector"
                continue
            total += y
            u3.add(index[name_of_nid[nid]])
        dead = u2 - u3
        if not self._enough(outcome, u3, nb, t, "mask"):
            return None

        # unmask: seeds of the hosts we heard from, keys of those that dropped
        sent = {
            nid_of[i]: {
                "active": sorted(set(nb[i]) & u3),
                "dead": sorted(set(nb[i]) & dead),
            }
            for i in u3
        }
        got = self._exchange(outcome, "unmask", sent, name_of_nid)
        collected: dict[int, list[bytes]] = {i: [] for i in u2}
        for content in got.values():
            rec = content.config_records.get(RECORD, ConfigRecord())
            try:
                pairs = list(zip(ints(rec, "ids"), blobs(rec, "shares"), strict=True))
            except ValueError as err:
                log.warning("Round %s: %s", outcome.round, err)
                continue
            for owner, share in pairs:
                if owner in collected:
                    collected[owner].append(share)
        for i in sorted(u2):
            if len(collected[i]) < t:
                log.warning(
                    "Round %s: secure aggregation: %d of %d shares for host %d; the "
                    "global adapter is unchanged",
                    outcome.round,
                    len(collected[i]),
                    t,
                    i,
                )
                return None
            secret = combine_shares(collected[i])
            if i in u3:
                total -= mask(secret, size)
                continue
            sk1 = bytes_to_private_key(secret)
            for j in nb[i]:
                if j == i or j not in u3:
                    continue
                pair = mask(generate_shared_key(sk1, bytes_to_public_key(pk1[j])), size)
                if j > i:
                    total -= pair
                else:
                    total += pair
        names = [name_of_nid[nid_of[i]] for i in sorted(u3)]
        return dequantize_sum(total, q_scale), names

    def _enough(
        self,
        outcome: RoundOutcome,
        alive: set[int],
        nb: dict[int, list[int]],
        t: int,
        stage: str,
    ) -> bool:
        short = [i for i in alive if len(set(nb[i]) & alive) < t]
        if len(alive) >= 2 and not short:
            return True
        log.warning(
            "Round %s: secure aggregation stopped after %s: %d hosts left, fewer "
            "than the threshold %d for some; the global adapter is unchanged",
            outcome.round,
            stage,
            len(alive),
            t,
        )
        return False
