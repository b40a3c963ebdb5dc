"""Adapter tensors <-> Flower ``ArrayRecord``.

Only trainable adapter tensors travel. Names are the PEFT checkpoint names (Opacus's
``_module.`` prefix and PEFT's adapter name stripped), in the model's parameter order,
so every host and the server agree on them. The global adapter is kept in fp32 and
sent as one flat fp32 vector (``pack_global``) under a key that names its layout (a
hash of names, order and shapes), so a host with another model or LoRA setting fails
clearly; on the Deployment Engine every array is a separate object pulled with
Flower's backoff, and one array instead of one per tensor is what keeps a round's
messages quick to arrive. Updates travel back as one flat delta vector in fp16 (or
fp32), in the order of the global adapter's names.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.errors import TrainingError

__all__ = [
    "apply_delta",
    "canonical_name",
    "check_compatible",
    "decode_delta",
    "encode_delta",
    "from_record",
    "layout_id",
    "load_trainable_state",
    "pack_global",
    "to_record",
    "trainable_shapes",
    "trainable_state",
    "unpack_global",
]

GLOBAL = "adapter:"  # key prefix of the packed global adapter, then its layout id


def canonical_name(name: str) -> str:
    """``_module.x.lora_B.default.weight`` -> ``x.lora_B.weight`` (PEFT file names)."""
    while name.startswith("_module."):
        name = name[len("_module.") :]
    return name.replace(".default.", ".")


def trainable_state(model: torch.nn.Module) -> OrderedDict[str, np.ndarray]:
    """Copies of the trainable tensors as fp32 numpy arrays, in parameter order."""
    return OrderedDict(
        (canonical_name(n), p.detach().to(torch.float32).cpu().numpy().copy())
        for n, p in model.named_parameters()
        if p.requires_grad
    )


def trainable_shapes(model: torch.nn.Module) -> OrderedDict[str, tuple[int, ...]]:
    return OrderedDict(
        (canonical_name(n), tuple(p.shape))
        for n, p in model.named_parameters()
        if p.requires_grad
    )


def load_trainable_state(
    model: torch.nn.Module, arrays: OrderedDict[str, np.ndarray] | dict[str, np.ndarray]
) -> None:
    """Copy ``arrays`` into the trainable tensors; names and shapes must match."""
    params = {
        canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad
    }
    check_compatible(arrays, {k: tuple(p.shape) for k, p in params.items()})
    with torch.no_grad():
        for name, value in arrays.items():
            params[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def check_compatible(
    arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]
) -> None:
    """Raise with the first offending tensor if names or shapes differ."""
    missing = [k for k in shapes if k not in arrays]
    extra = [k for k in arrays if k not in shapes]
    if missing or extra:
        raise TrainingError(
            f"adapter tensors do not match the model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}; host and server must use the same model and lora "
            "settings"
        )
    for key, shape in shapes.items():
        if tuple(arrays[key].shape) != shape:
            raise TrainingError(
                f"adapter tensor {key} has shape {tuple(arrays[key].shape)}, "
                f"expected {shape}"
            )


def to_record(arrays: dict[str, np.ndarray], dtype: str = "float32") -> ArrayRecord:
    return ArrayRecord(
        OrderedDict(
            (k, Array(np.ascontiguousarray(v, dtype=dtype))) for k, v in arrays.items()
        )
    )


def from_record(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """fp32 copies of every tensor in ``record``, in its order."""
    return OrderedDict((k, v.numpy().astype(np.float32)) for k, v in record.items())


def pack_global(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """The global adapter as one flat fp32 array, keyed by its layout id."""
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    flat = np.concatenate(
        [np.asarray(v, dtype=np.float32).ravel() for v in arrays.values()]
    )
    return ArrayRecord(OrderedDict([(GLOBAL + layout_id(shapes), Array(flat))]))


def unpack_global(
    record: ArrayRecord, shapes: dict[str, tuple[int, ...]]
) -> OrderedDict[str, np.ndarray]:
    """fp32 tensors of a global adapter for a model with ``shapes``: a packed one
    (``pack_global``) or named tensors (``to_record``)."""
    keys = list(record.keys())
    if not (len(keys) == 1 and keys[0].startswith(GLOBAL)):
        arrays = from_record(record)
        check_compatible(arrays, dict(shapes))
        return arrays
    if keys[0] != GLOBAL + layout_id(shapes):
        raise TrainingError(
            f"the global adapter has layout {keys[0][len(GLOBAL) :]}, this host's "
            f"model has {layout_id(shapes)}: host and server must use the same model "
            "and lora settings"
        )
    flat = record[keys[0]].numpy()
    expected = sum(int(np.prod(s)) for s in shapes.values())
    if flat.ndim != 1 or flat.size != expected or flat.dtype != np.float32:
        raise TrainingError(
            f"global adapter has shape {tuple(flat.shape)} {flat.dtype}, expected "
            f"({expected},) float32"
        )
    return _split(flat, shapes)


def layout_id(shapes: dict[str, tuple[int, ...]]) -> str:
    """Hash of tensor names, order and shapes: both sides must agree on it."""
    blob = ";".join(f"{k}:{'x'.join(map(str, v))}" for k, v in shapes.items())
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_delta(
    new: dict[str, np.ndarray], old: dict[str, np.ndarray], dtype: str
) -> ArrayRecord:
    """``new - old`` as one flat vector in the wire dtype, in ``old``'s order."""
    flat = np.concatenate([(new[k] - old[k]).ravel() for k in old]).astype(dtype)
    return ArrayRecord(OrderedDict([("delta", Array(flat))]))


def decode_delta(
    record: ArrayRecord, shapes: dict[str, tuple[int, ...]]
) -> OrderedDict[str, np.ndarray]:
    """Split a flat delta into fp32 tensors; raise if it does not fit ``shapes``."""
    if list(record.keys()) != ["delta"]:
        raise TrainingError(
            f"update must hold one flat 'delta' array, got {list(record.keys())[:3]}"
        )
    flat = record["delta"].numpy()
    expected = sum(int(np.prod(s)) for s in shapes.values())
    if flat.ndim != 1 or flat.size != expected:
        raise TrainingError(
            f"update has shape {tuple(flat.shape)}, expected ({expected},) for this "
            "adapter layout"
        )
    if flat.dtype not in (np.float16, np.float32):
        raise TrainingError(f"update dtype {flat.dtype} is not float16/float32")
    return _split(flat, shapes)


def _split(
    flat: np.ndarray, shapes: dict[str, tuple[int, ...]]
) -> OrderedDict[str, np.ndarray]:
    """fp32 tensors of ``shapes`` (in order) cut from a flat vector that fits them."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = 0
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        out[key] = flat[offset : offset + size].astype(np.float32).reshape(shape)
        offset += size
    return out


def apply_delta(
    base: dict[str, np.ndarray], delta: dict[str, np.ndarray]
) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, (base[k] + delta[k]).astype(np.float32)) for k in base)
