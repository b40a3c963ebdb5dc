"""The host's side of SecAgg+ (see ``common.secagg`` for the protocol).

Between the messages of a round the host keeps its delta and its keys in the node
state (``Context.state``, kept by the SuperNode), never in a reply: the server only
ever receives public keys, shares encrypted for other hosts, one masked vector, and
at the end the shares it needs to remove the masks of the vectors it received.
"""

from __future__ import annotations

import math
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from common.errors import FedstreamError
from common.secagg import (
    RECORD,
    blob,
    blobs,
    ints,
    mask,
    number,
    pack_shares,
    quantize,
    unpack_shares,
)

__all__ = ["handle", "setup"]

STATE = "secagg.state"
DELTA = "secagg.delta"


class SecAggError(FedstreamError):
    """A SecAgg+ message this host refuses to answer."""


def _state(context: Context) -> ConfigRecord:
    if STATE not in context.state.config_records:
        raise SecAggError("secure aggregation: no round in progress on this host")
    return context.state.config_records[STATE]


def setup(context: Context, delta: np.ndarray, round_num: int) -> ConfigRecord:
    """After training: keep the flat fp32 delta and fresh keys; the reply's keys."""
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    context.state.array_records[DELTA] = ArrayRecord(
        {"delta": Array(np.ascontiguousarray(delta, dtype=np.float32))}
    )
    context.state.config_records[STATE] = ConfigRecord(
        {
            "round": round_num,
            "stage": "train",
            "sk1": private_key_to_bytes(sk1),
            "sk2": private_key_to_bytes(sk2),
            "pk1": public_key_to_bytes(pk1),
            "pk2": public_key_to_bytes(pk2),
        }
    )
    return ConfigRecord(
        {"pk1": public_key_to_bytes(pk1), "pk2": public_key_to_bytes(pk2)}
    )


def handle(msg: Message, context: Context) -> Message:
    try:
        return _handle(msg, context)
    except ValueError as err:  # malformed input from the server
        raise SecAggError(str(err)) from None


def _handle(msg: Message, context: Context) -> Message:
    cfg = msg.content.config_records[RECORD]
    state = _state(context)
    stage = cfg.get("stage")
    if number(cfg, "round") != number(state, "round"):
        raise SecAggError(
            f"secure aggregation: message for round {cfg.get('round')!r}, this host "
            f"trained round {state['round']!r}"
        )
    expected = {"share-keys": "train", "mask": "share-keys", "unmask": "mask"}
    if not isinstance(stage, str) or expected.get(stage) != state["stage"]:
        raise SecAggError(
            f"secure aggregation: stage {stage!r} after {state['stage']!r} refused"
        )
    if stage == "share-keys":
        reply = RecordDict({RECORD: _share_keys(state, cfg)})
    elif stage == "mask":
        vector = _mask(context, state, cfg)
        reply = RecordDict(
            {"masked": ArrayRecord({"y": Array(vector)}), RECORD: ConfigRecord({})}
        )
    else:
        reply = RecordDict({RECORD: _unmask(state, cfg)})
        del context.state.config_records[STATE]
    if stage != "unmask":
        state["stage"] = stage
    return Message(content=reply, reply_to=msg)


def _share_keys(state: ConfigRecord, cfg: ConfigRecord) -> ConfigRecord:
    me = int(number(cfg, "index"))
    ids = ints(cfg, "ids")
    pk1s, pk2s = blobs(cfg, "pk1"), blobs(cfg, "pk2")
    t = int(number(cfg, "t"))
    if me not in ids or len(pk1s) != len(ids) or len(pk2s) != len(ids):
        raise SecAggError("secure aggregation: neighbour list does not fit")
    if len({*pk1s, *pk2s}) != 2 * len(ids) or len(set(ids)) != len(ids):
        raise SecAggError("secure aggregation: neighbour keys are not distinct")
    k = ids.index(me)
    if pk1s[k] != blob(state, "pk1") or pk2s[k] != blob(state, "pk2"):
        raise SecAggError("secure aggregation: the server changed this host's keys")
    if not 2 <= t <= len(ids):
        raise SecAggError(f"secure aggregation: threshold {t} for {len(ids)} shares")
    values = {key: number(cfg, key) for key in ("f", "clip", "scale")}
    for key, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise SecAggError(f"secure aggregation: bad {key} {value}")
    seed = os.urandom(32)
    seed_shares = create_shares(seed, t, len(ids))
    key_shares = create_shares(blob(state, "sk1"), t, len(ids))
    sk2 = bytes_to_private_key(blob(state, "sk2"))
    dsts: list[int] = []
    cts: list[bytes] = []
    for j, seed_share, key_share, pk2 in zip(
        ids, seed_shares, key_shares, pk2s, strict=True
    ):
        if j == me:
            continue
        shared = generate_shared_key(sk2, bytes_to_public_key(pk2))
        dsts.append(j)
        cts.append(encrypt(shared, pack_shares(me, j, seed_share, key_share)))
    state.update(
        {
            "index": me,
            "t": t,
            "seed": seed,
            **values,
            "nb": ids,
            "nb_pk1": pk1s,
            "nb_pk2": pk2s,
            "got": [me],
            "seed_shares": [seed_shares[k]],
            "key_shares": [key_shares[k]],
        }
    )
    return ConfigRecord({"dst": dsts, "ct": cts})


def _mask(context: Context, state: ConfigRecord, cfg: ConfigRecord) -> np.ndarray:
    me = int(number(state, "index"))
    nb = ints(state, "nb")
    pk1s, pk2s = blobs(state, "nb_pk1"), blobs(state, "nb_pk2")
    srcs, cts = ints(cfg, "srcs"), blobs(cfg, "cts")
    if len(srcs) != len(cts) or len(srcs) + 1 < number(state, "t"):
        raise SecAggError("secure aggregation: fewer neighbours than the threshold")
    sk1 = bytes_to_private_key(blob(state, "sk1"))
    sk2 = bytes_to_private_key(blob(state, "sk2"))
    got = [me]
    seed_shares = blobs(state, "seed_shares")
    key_shares = blobs(state, "key_shares")
    for src, ct in zip(srcs, cts, strict=True):
        if src not in nb or src in got:
            raise SecAggError(f"secure aggregation: unexpected share source {src}")
        shared = generate_shared_key(sk2, bytes_to_public_key(pk2s[nb.index(src)]))
        real_src, dst, seed_share, key_share = unpack_shares(decrypt(shared, ct))
        if real_src != src or dst != me:
            raise SecAggError("secure aggregation: a share was forwarded wrongly")
        got.append(src)
        seed_shares.append(seed_share)
        key_shares.append(key_share)
    state.update({"got": got, "seed_shares": seed_shares, "key_shares": key_shares})
    delta = context.state.array_records.pop(DELTA)["delta"].numpy()
    y = quantize(
        number(state, "f") * delta.astype(np.float64),
        clip=number(state, "clip"),
        scale=number(state, "scale"),
        rng=np.random.default_rng(),
    )
    y += mask(blob(state, "seed"), y.size)
    for j in srcs:
        pair = mask(
            generate_shared_key(sk1, bytes_to_public_key(pk1s[nb.index(j)])), y.size
        )
        if me > j:
            y += pair
        else:
            y -= pair
    del state["seed"]
    return y


def _unmask(state: ConfigRecord, cfg: ConfigRecord) -> ConfigRecord:
    active, dead = ints(cfg, "active"), ints(cfg, "dead")
    got = ints(state, "got")
    me = int(number(state, "index"))
    if set(active) & set(dead) or me in dead or me not in active:
        raise SecAggError("secure aggregation: a host cannot be active and dropped")
    if len(active) < number(state, "t"):
        raise SecAggError("secure aggregation: fewer active neighbours than threshold")
    seed_shares, key_shares = blobs(state, "seed_shares"), blobs(state, "key_shares")
    ids: list[int] = []
    shares: list[bytes] = []
    for j in active:
        if j in got:
            ids.append(j)
            shares.append(seed_shares[got.index(j)])
    for j in dead:
        if j in got:
            ids.append(j)
            shares.append(key_shares[got.index(j)])
    return ConfigRecord({"ids": ids, "shares": shares})
