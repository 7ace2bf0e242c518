"""Per-task sparse residuals (FORMAT.md §11, format version 1.2): what a masked tensor's residual
segments hold and their checks. Nothing here imports torch: numpy only.

A task's residual on one tensor is ``count`` entries: their flat positions, stored as gaps (the first
position, then each position minus the previous one minus 1), unsigned little-endian integers of
:func:`gap_itemsize` bytes; and their values in ``dtype`` (F32, F16 or BF16), widened exactly to
float32 for the decode.

    >>> pos = np.array([0, 3, 4], np.int64)
    >>> g = positions_to_gaps(pos, 10)
    >>> g.tolist(), gaps_to_positions(g.view(np.uint8), 3, 10, lambda: "x").tolist()
    ([0, 2, 0], [0, 3, 4])
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tallfmt.errors import FormatError
from tallfmt.format.dtypes import by_name

#: The minor version that added residuals: a header holding one is version 1.2 or newer.
RESIDUAL_MINOR = 2
#: Value dtypes a residual may have (tallfmt writes BF16).
RESIDUAL_DTYPES = ("F32", "F16", "BF16")
#: Tensors of more elements than this store their gaps as u64 (else u32).
U32_GAPS_MAX = 1 << 32


def gap_itemsize(numel: int) -> int:
    """Bytes per stored gap of a tensor of ``numel`` elements: 4 up to 2**32 elements, else 8."""
    return 4 if numel <= U32_GAPS_MAX else 8


def positions_to_gaps(pos: np.ndarray, numel: int) -> np.ndarray:
    """Strictly increasing positions in [0, numel) as the stored gaps (little-endian u32 or u64)."""
    p = np.asarray(pos, dtype=np.int64)
    g = np.empty(p.shape[0], dtype=np.int64)
    if p.shape[0]:
        g[0] = p[0]
        g[1:] = p[1:] - p[:-1] - 1
    return g.astype("<u4" if gap_itemsize(numel) == 4 else "<u8")


def gaps_to_positions(data: np.ndarray, count: int, numel: int, what: Callable[[], str]) -> np.ndarray:
    """Decoded positions bytes → int64 positions, checked: ``count`` gaps whose positions are strictly
    increasing (no wrap-around) and inside [0, numel). FormatError naming ``what()`` otherwise."""
    s = gap_itemsize(numel)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.shape[0] != count * s:
        raise FormatError(f"{what()}: {raw.shape[0]} bytes of positions for {count} entries of {s} bytes")
    g = raw.view("<u4" if s == 4 else "<u8")
    if count == 0:
        return np.zeros(0, np.int64)
    if int(g.max()) >= numel:
        j = int(np.argmax(g >= numel))
        raise FormatError(f"{what()}: position gap {j} is {int(g[j])}, out of range for a tensor of {numel} elements")
    # p_j = Σ_{i ≤ j} (gap_i + 1) − 1: strictly increasing by construction; every gap < n ≤ 2**48, so a
    # last position past twice n shows in a float64 sum before any int64 one could wrap
    if float(np.sum(g, dtype=np.float64)) + count > 2.0 * numel + 1:
        raise FormatError(f"{what()}: the positions run past the end of a tensor of {numel} elements")
    pos = np.add(g, 1, dtype=np.int64)
    np.cumsum(pos, out=pos)
    pos -= 1
    if int(pos[-1]) >= numel:
        raise FormatError(f"{what()}: position {int(pos[-1])} (entry {count - 1}) is out of range for a tensor of "
                          f"{numel} elements")
    return pos


def values_to_f32(data: np.ndarray, count: int, dtype: str, what: Callable[[], str]) -> np.ndarray:
    """Decoded values bytes of ``dtype`` → float32 (exact widening), checked: ``count`` finite values."""
    d = by_name(dtype)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.shape[0] != count * d.itemsize:
        raise FormatError(f"{what()}: {raw.shape[0]} bytes of values for {count} entries of {dtype}")
    bits = raw.view(_BITS[dtype])
    exp = _EXP[dtype]
    if ((bits & exp) == exp).any():  # all exponent bits set: NaN or ±Inf
        raise FormatError(f"{what()}: value {int(np.argmax((bits & exp) == exp))} is not finite (NaN or Inf)")
    if dtype == "BF16":
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return raw.view(d.storage).astype(np.float32)


_BITS = {"F32": np.dtype("<u4"), "F16": np.dtype("<u2"), "BF16": np.dtype("<u2")}
_EXP = {"F32": np.uint32(0x7F800000), "F16": np.uint16(0x7C00), "BF16": np.uint16(0x7F80)}
