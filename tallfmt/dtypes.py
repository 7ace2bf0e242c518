"""Element types: safetensors' dtype names, their storage numpy dtype and their torch dtype.

bfloat16 has no numpy dtype, so its storage view is uint16 (the raw bit pattern); likewise the
float8 types are viewed as uint8. Conversions to torch reinterpret those bits, never round.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DType:
    name: str           # safetensors name, e.g. "BF16"
    itemsize: int       # bytes per element
    storage: np.dtype   # numpy dtype of the stored bytes (bit pattern for BF16 / F8)
    torch: torch.dtype
    is_float: bool


def _d(name: str, np_dtype: str, tdtype: torch.dtype, is_float: bool) -> DType:
    st = np.dtype(np_dtype).newbyteorder("<")
    return DType(name, st.itemsize, st, tdtype, is_float)


_TABLE = [
    _d("F64", "f8", torch.float64, True),
    _d("F32", "f4", torch.float32, True),
    _d("F16", "f2", torch.float16, True),
    _d("BF16", "u2", torch.bfloat16, True),
    _d("I64", "i8", torch.int64, False),
    _d("I32", "i4", torch.int32, False),
    _d("I16", "i2", torch.int16, False),
    _d("I8", "i1", torch.int8, False),
    _d("U8", "u1", torch.uint8, False),
    _d("BOOL", "u1", torch.bool, False),
]
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _np = {"U16": "u2", "U32": "u4", "U64": "u8"}.get(_name, "u1")
        _TABLE.append(_d(_name, _np, getattr(torch, _attr), _name.startswith("F8")))

DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}
_BY_TORCH: dict[torch.dtype, DType] = {d.torch: d for d in _TABLE}

#: dtypes whose changed tensors are stored as θ0 + mask ∘ τ_MTL (computed in float32).
MASKABLE = frozenset({"F32", "F16", "BF16"})


def by_name(name: str) -> DType:
    """The DType for a safetensors dtype name; KeyError if unknown."""
    return DTYPES[name]


def from_torch(dtype: torch.dtype) -> DType:
    """The DType of a torch dtype; KeyError if tallfmt cannot store it."""
    return _BY_TORCH[dtype]


def to_torch(arr: np.ndarray, dtype: DType) -> torch.Tensor:
    """View a numpy array of `dtype.storage` elements as a torch tensor of `dtype` (no rounding)."""
    shape = np.shape(arr)
    flat = np.ascontiguousarray(np.asarray(arr, dtype=dtype.storage).reshape(-1)).view(np.uint8)
    if not flat.flags.writeable:
        # A read-only view (e.g. of a memory map) that the caller only reads or copies from.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(flat).view(dtype.torch).reshape(shape)
    return torch.from_numpy(flat).view(dtype.torch).reshape(shape)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The storage view (numpy) of a tensor, bit for bit (copied to CPU if needed)."""
    d = from_torch(t.dtype)
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().view(d.storage).reshape(tuple(t.shape))
