"""Element types: safetensors' dtype names, their itemsize and the numpy dtype of their stored bytes.

bfloat16 has no numpy dtype, so its storage view is uint16 (the raw bit pattern); likewise the float8
types are viewed as uint8. Nothing here imports torch: the header-only commands stay light
(:mod:`tallfmt.compute.tensors` maps these names to torch dtypes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str           # safetensors name, e.g. "BF16"
    itemsize: int       # bytes per element
    storage: np.dtype   # numpy dtype of the stored bytes (bit pattern for BF16 / F8)
    is_float: bool


def _d(name: str, np_dtype: str, is_float: bool) -> DType:
    return DType(name, np.dtype(np_dtype).itemsize, np.dtype(np_dtype).newbyteorder("<"), is_float)


DTYPES: dict[str, DType] = {d.name: d for d in (
    _d("F64", "f8", True), _d("F32", "f4", True), _d("F16", "f2", True), _d("BF16", "u2", True),
    _d("I64", "i8", False), _d("I32", "i4", False), _d("I16", "i2", False), _d("I8", "i1", False),
    _d("U8", "u1", False), _d("BOOL", "u1", False), _d("U16", "u2", False), _d("U32", "u4", False),
    _d("U64", "u8", False), _d("F8_E4M3", "u1", True), _d("F8_E5M2", "u1", True))}

#: dtypes whose changed tensors are stored as θ0 + mask ∘ τ_MTL (computed in float32).
MASKABLE = frozenset({"F32", "F16", "BF16"})


def by_name(name: str) -> DType:
    """The DType for a safetensors dtype name; KeyError if unknown."""
    return DTYPES[name]
