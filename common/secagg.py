"""SecAgg+ for weighted adapter deltas: what hosts and server share.

The protocol is Flower's SecAgg+ (Bell et al. 2020, as in
``flwr.server.workflow.SecAggPlusWorkflow``), built from Flower's own primitives (EC
key pairs, ECDH + HKDF shared keys, Fernet, Shamir shares), run over the Message API
so that it composes with the weighting policy:

* **train** (the round's train message): the host trains as usual, keeps its delta
  in its node state, and replies with its metrics (noised example count and drift
  score, the update's L2 norm) and two fresh public keys; no array.
* **share-keys**: the server weighs the hosts with the configured policy and answers
  each its weight ``f_i`` together with its neighbours' public keys; the host splits
  a fresh mask seed and its first secret key into Shamir shares (threshold ``t``),
  one per neighbour, encrypted for that neighbour.
* **mask**: the server forwards the encrypted shares; the host sends
  ``q(f_i x delta_i) + PRG(seed_i) + sum_j +-PRG(s_ij)  (mod 2^32)``, one uint32 per
  adapter number (the payload of an fp32 update).
* **unmask**: for every host that sent its vector the server asks its neighbours for
  shares of its mask seed, for every host that dropped after share-keys the shares of
  its secret key (never both for one host), removes the masks and gets
  ``sum_i q(f_i x delta_i)`` only.

Quantisation is fixed point in Z_{2^32}: ``q(x) = stochastic_round(x x scale)``, two's
complement. The server sets ``clip_i = f_i x B`` with ``B`` the largest norm reported
this round (no coordinate of an honest update exceeds its norm) and
``scale = (2^31 - 1 - n) / B``, so the sum cannot wrap: the error per coordinate is at
most ``n / scale``, about ``n x B x 5e-10``.

Masks are AES-256-CTR streams keyed by SHA-256 of the seed or shared key (Flower's
``pseudo_rand_gen`` seeds a 32-bit Mersenne twister, which a server could search).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "RECORD",
    "STAGES",
    "blob",
    "blobs",
    "dequantize_sum",
    "ints",
    "mask",
    "number",
    "pack_shares",
    "quantize",
    "unpack_shares",
]

RECORD = "secagg"  # the ConfigRecord every SecAgg message carries
STAGES = ("share-keys", "mask", "unmask")
MOD_BITS = 32


def mask(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform uint32 from a 256-bit key derived from ``seed`` (AES-CTR)."""
    key = hashlib.sha256(b"fedstream-secagg-mask" + seed).digest()
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(bytes(4 * size)), dtype="<u4").astype(np.uint32)


def quantize(
    x: np.ndarray, *, clip: float, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """Clip to [-clip, clip], scale, round stochastically; two's complement uint32."""
    y = np.clip(x.astype(np.float64), -clip, clip) * scale
    low = np.floor(y)
    q = low + (rng.random(y.shape) < (y - low))
    return q.astype(np.int64).astype(np.uint32)


def dequantize_sum(total: np.ndarray, scale: float) -> np.ndarray:
    """The masked-out sum (uint32) back to float64."""
    return total.astype(np.uint32).view(np.int32).astype(np.float64) / scale


def pack_shares(src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    head = struct.pack("<QQI", src, dst, len(seed_share))
    return head + seed_share + key_share


def unpack_shares(blob: bytes) -> tuple[int, int, bytes, bytes]:
    src, dst, n = struct.unpack_from("<QQI", blob)
    body = blob[struct.calcsize("<QQI") :]
    return src, dst, body[:n], body[n:]


# -- typed reads of a ConfigRecord (inputs from the other side are checked) ---------
def ints(rec: Mapping[str, Any], key: str) -> list[int]:
    value = rec.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"secure aggregation: {key!r} must be a list of integers")
    return [int(v) for v in value]


def blobs(rec: Mapping[str, Any], key: str) -> list[bytes]:
    value = rec.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise ValueError(f"secure aggregation: {key!r} must be a list of bytes")
    return list(value)


def number(rec: Mapping[str, Any], key: str) -> float:
    value = rec.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"secure aggregation: {key!r} must be a number")
    return float(value)


def blob(rec: Mapping[str, Any], key: str) -> bytes:
    value = rec.get(key)
    if not isinstance(value, bytes):
        raise ValueError(f"secure aggregation: {key!r} must be bytes")
    return value
