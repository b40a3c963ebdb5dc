"""Adapter tensors <-> Flower ``ArrayRecord``.

Only trainable adapter tensors travel. Names are the PEFT checkpoint names (Opacus's
``_module.`` prefix and PEFT's adapter name stripped), in the model's parameter order,
so every host and the server agree on them. The global adapter is kept in fp32 and
sent as named tensors. Updates travel back as one flat delta vector in fp16 (or fp32),
in the order of the global adapter's names, tagged with a hash of that layout: one
array header per message instead of one per tensor.
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
    "to_record",
    "trainable_state",
]


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
