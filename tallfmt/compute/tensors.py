"""torch ↔ stored bytes: the torch dtype of each safetensors dtype name, and bit-exact views between
numpy storage arrays and torch tensors (conversions reinterpret bits, never round)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from tallfmt.format.dtypes import DTYPES, DType

_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
                "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
#: torch dtype of each stored dtype this torch build has.
TORCH_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, a) for n, a in _TORCH_NAMES.items() if hasattr(torch, a)}
_BY_TORCH: dict[torch.dtype, DType] = {t: DTYPES[n] for n, t in TORCH_DTYPES.items()}


def from_torch(dtype: torch.dtype) -> DType:
    """The DType of a torch dtype; KeyError if tallfmt cannot store it."""
    return _BY_TORCH[dtype]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a stored dtype name; KeyError if this torch build lacks it."""
    return TORCH_DTYPES[name]


def to_torch(arr: np.ndarray, dtype: DType) -> torch.Tensor:
    """View a numpy array of ``dtype.storage`` elements as a torch tensor of ``dtype`` (no rounding)."""
    shape = np.shape(arr)
    flat = np.ascontiguousarray(np.asarray(arr, dtype=dtype.storage).reshape(-1)).view(np.uint8)
    if not flat.flags.writeable:
        # A read-only view (e.g. of a memory map) that the caller only reads or copies from.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(flat).view(TORCH_DTYPES[dtype.name]).reshape(shape)
    return torch.from_numpy(flat).view(TORCH_DTYPES[dtype.name]).reshape(shape)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """The storage view (numpy) of a tensor, bit for bit (copied to the CPU if needed)."""
    d = from_torch(t.dtype)
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().view(d.storage).reshape(tuple(t.shape))
