"""float32 ↔ F16/BF16 on bit patterns, in torch on any device, exactly as FORMAT.md §4.4 rounds: widening
is exact (NaN payloads kept), narrowing is round-to-nearest-even with overflow to ±inf, and a NaN
becomes the quiet NaN that keeps its sign and top payload bits — BF16 ``(bits32 >> 16) | 0x0040``, F16
``sign | 0x7E00 | (mantissa32 >> 13 & 0x3FF)`` — the bits the numba decode kernel gives, so merges
and decodes agree bit for bit (torch's own ``.to(torch.bfloat16)`` gives 0xFFFF for every NaN).

    >>> import torch
    >>> nan = torch.tensor([0x7F812345], dtype=torch.int32).view(torch.float32)
    >>> hex(narrow(nan, torch.bfloat16).view(torch.int16).item() & 0xFFFF)
    '0x7fc1'
"""

from __future__ import annotations

import torch
from torch import Tensor

_NARROW = (torch.float16, torch.bfloat16)


def widen(x: Tensor) -> Tensor:
    """float32 of an F32/F16/BF16 tensor, exactly (every value, NaN payloads included)."""
    if x.dtype == torch.float32:
        return x
    if x.dtype == torch.bfloat16:  # the bits, shifted up: (int16 value) · 65536 stays in int32
        return (x.view(torch.int16).to(torch.int32) * 65536).view(torch.float32)
    if x.dtype != torch.float16:
        raise TypeError(f"widen: expected float32, float16 or bfloat16, got {x.dtype}")
    out = x.to(torch.float32)
    nan = torch.isnan(x)
    if not bool(nan.any()):
        return out
    h = x.view(torch.int16).to(torch.int32)
    bits = (torch.where(h < 0, -(1 << 31), 0) + 0x7F800000 + ((h & 0x3FF) << 13)).to(torch.int32)
    return torch.where(nan, bits.view(torch.float32), out)


def narrow(x: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``x`` rounded once to ``dtype`` (float32: unchanged) by the rule of the module doc."""
    if x.dtype != torch.float32:
        raise TypeError(f"narrow: expected float32, got {x.dtype}")
    if dtype == torch.float32:
        return x
    if dtype not in _NARROW:
        raise TypeError(f"narrow: expected float32, float16 or bfloat16, got {dtype}")
    out = x.to(dtype)
    nan = torch.isnan(x)
    if not bool(nan.any()):
        return out
    b = x.view(torch.int32)
    if dtype == torch.bfloat16:
        q = (b >> 16) | 0x0040  # arithmetic shift: the high half as a signed 16-bit value
    else:
        q = torch.where(b < 0, -(1 << 15), 0) + (((b >> 13) & 0x3FF) | 0x7E00)
    return torch.where(nan, q.to(torch.int16).view(dtype), out)


def round_merged(merged: Tensor, theta0: Tensor, theta0_f32: Tensor) -> Tensor:
    """A merge's float32 result in θ0's dtype: rounded once (:func:`narrow`), and θ0 bit for bit
    wherever the result is θ0's float32 value bit for bit (a parameter the merge left alone, so a
    zeroshot merge is θ0 exactly, signalling-NaN payloads included)."""
    rounded = narrow(merged, theta0.dtype)
    same = merged.view(torch.int32) == theta0_f32.view(torch.int32)
    return torch.where(same, theta0, rounded)
