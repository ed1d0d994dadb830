"""Tensors on the wire in the model's own dtype.

Flower's ``Array(ndarray)`` goes through numpy, which has no bfloat16, so a bf16 model's
tensors used to travel as float32: twice the bytes. Here a bf16 (or any other torch dtype)
tensor travels as its raw little-endian bytes with a dtype tag in ``Array.dtype`` and the
serialization type :data:`RAW_STYPE`; decoding is bit-exact. Float32 tensors keep Flower's
standard numpy serialization, so a float32 model's messages are unchanged.

The server aggregates in float32/float64 (:func:`to_numpy` widens bf16 exactly) and sends
the new global back in the model's dtype (:func:`encode_record` with ``dtypes``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

RAW_STYPE = "fedmoe.raw"  # Array.data holds the tensor's C-order bytes, little-endian
TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype | np.dtype | str) -> str:
    """``torch.bfloat16`` / ``np.float32`` / ``"bfloat16"`` -> ``"bfloat16"`` / ``"float32"``."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name if not isinstance(dtype, str) else dtype


def encode(value: torch.Tensor | np.ndarray, dtype: str | None = None) -> Array:
    """One tensor as a Flower ``Array`` in ``dtype`` (default: its own).

    float32 goes as a standard numpy array; bf16/fp16 as raw bytes with a dtype tag.
    """
    tensor = torch.as_tensor(value).detach().to("cpu")
    target = TORCH_DTYPES[dtype or dtype_name(tensor.dtype)]
    tensor = tensor.to(target).contiguous()
    if target == torch.float32:
        return Array(tensor.numpy())
    raw = tensor.view(torch.uint8) if tensor.numel() else tensor.new_empty(0, dtype=torch.uint8)
    data = raw.numpy().tobytes()
    if sys.byteorder != "little":  # pragma: no cover - every platform fedmoe runs on
        data = tensor.view(torch.int16).numpy().byteswap().tobytes()
    return Array(dtype=dtype_name(target), shape=tuple(tensor.shape), stype=RAW_STYPE, data=data)


def to_tensor(array: Array) -> torch.Tensor:
    """The tensor an ``Array`` carries, in the dtype it was sent in (bit-exact)."""
    if array.stype != RAW_STYPE:
        return torch.from_numpy(np.ascontiguousarray(array.numpy()))
    if array.dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype tag {array.dtype!r} (expected one of "
                         f"{sorted(TORCH_DTYPES)})")
    target = TORCH_DTYPES[array.dtype]
    expected = int(np.prod(array.shape, dtype=np.int64)) * target.itemsize
    if len(array.data) != expected:
        raise ValueError(f"{len(array.data)} bytes for a {array.dtype} tensor of shape "
                         f"{tuple(array.shape)} (expected {expected})")
    raw = torch.frombuffer(bytearray(array.data), dtype=torch.uint8) if expected \
        else torch.empty(0, dtype=torch.uint8)
    return raw.view(target).reshape(tuple(array.shape))


def to_numpy(array: Array) -> np.ndarray:
    """The values of an ``Array`` as numpy: float32 for bf16/fp16 (exact), else as sent."""
    if array.stype != RAW_STYPE:
        return array.numpy()
    tensor = to_tensor(array)
    return tensor.float().numpy() if tensor.dtype in (torch.bfloat16, torch.float16) \
        else tensor.numpy()


def wire_nbytes(array: Array) -> int:
    """Bytes of the tensor's payload as sent (without the serialization header)."""
    if array.stype == RAW_STYPE:
        return len(array.data)
    try:
        return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
    except (TypeError, ValueError):  # a reply's junk dtype: count what arrived
        return len(array.data)


def encode_record(arrays: Mapping[str, torch.Tensor | np.ndarray],
                  dtypes: Mapping[str, str] | None = None) -> ArrayRecord:
    """An ``ArrayRecord`` of ``arrays``, each in ``dtypes[key]`` (default: its own dtype)."""
    dtypes = dtypes or {}
    return ArrayRecord({k: encode(v, dtypes.get(k)) for k, v in arrays.items()})


def decode_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Every tensor of an ``ArrayRecord``, in the dtype it was sent in."""
    return {k: to_tensor(a) for k, a in record.items()}
