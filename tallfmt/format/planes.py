"""Byte planes (numba): split m elements of s bytes into s planes (plane j = byte j of every element)
and back. The ``byteplane-zstd`` codec compresses each plane on its own (FORMAT.md §5).

numba is imported only when a plane is first split or merged, so header-only commands stay light.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from tallfmt.errors import InputError

_compiled: dict[str, Any] = {}
_lock = threading.Lock()


def _planes_py(src: np.ndarray, out: np.ndarray, size: int, split: bool) -> None:
    """split: out[j*m + i] = src[i*size + j]; else the inverse (m = len/size elements)."""
    total = src.shape[0]
    if out.shape[0] != total or size < 1 or total % size:
        raise ValueError("planes kernel: lengths")
    m = total // size
    if size == 4 and split:  # one 32-bit assembly, four byte stores: LLVM vectorises this loop
        for i in range(m):
            v = np.uint32(src[4 * i]) | (np.uint32(src[4 * i + 1]) << np.uint32(8)) \
                | (np.uint32(src[4 * i + 2]) << np.uint32(16)) | (np.uint32(src[4 * i + 3]) << np.uint32(24))
            out[i] = np.uint8(v & np.uint32(0xFF))
            out[m + i] = np.uint8((v >> np.uint32(8)) & np.uint32(0xFF))
            out[2 * m + i] = np.uint8((v >> np.uint32(16)) & np.uint32(0xFF))
            out[3 * m + i] = np.uint8(v >> np.uint32(24))
    elif size == 4:
        for i in range(m):
            out[4 * i] = src[i]
            out[4 * i + 1] = src[m + i]
            out[4 * i + 2] = src[2 * m + i]
            out[4 * i + 3] = src[3 * m + i]
    elif size == 2 and split:
        for i in range(m):
            out[i] = src[2 * i]
            out[m + i] = src[2 * i + 1]
    elif size == 2:
        for i in range(m):
            out[2 * i] = src[i]
            out[2 * i + 1] = src[m + i]
    elif split:
        for j in range(size):
            for i in range(m):
                out[j * m + i] = src[i * size + j]
    else:
        for i in range(m):
            for j in range(size):
                out[i * size + j] = src[j * m + i]


def _kernel() -> Any:
    if "planes" not in _compiled:
        with _lock:
            if "planes" not in _compiled:
                from numba import njit, types

                arr = types.Array(types.uint8, 1, "C", readonly=True, aligned=False)
                out = types.Array(types.uint8, 1, "C", readonly=False, aligned=False)
                _compiled["planes"] = njit([types.void(arr, out, types.int64, types.boolean)],
                                           nogil=True, cache=True)(_planes_py)
    return _compiled["planes"]


def _bytes_1d(a: Any, name: str, writeable: bool = False) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != np.uint8 or not a.flags.c_contiguous:
        raise InputError(f"{name}: expected a contiguous 1-D uint8 array")
    if writeable and not a.flags.writeable:
        raise InputError(f"{name}: array is read-only")
    return a


def split_planes(data: np.ndarray, itemsize: int) -> np.ndarray:
    """uint8 bytes of m elements of ``itemsize`` bytes → an itemsize×m array of planes.

        >>> split_planes(np.array([1, 2, 3, 4], dtype=np.uint8), 2).tolist()
        [[1, 3], [2, 4]]
    """
    d = _bytes_1d(data, "data")
    if itemsize < 1 or d.shape[0] % itemsize:
        raise InputError(f"split_planes: {d.shape[0]} bytes is not a whole number of {itemsize}-byte items")
    out = np.empty(d.shape[0], dtype=np.uint8)
    _kernel()(d, out, itemsize, True)
    return out.reshape(itemsize, -1)


def merge_planes(planes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`split_planes`: an itemsize×m uint8 array → the m elements' bytes (into ``out``)."""
    if not isinstance(planes, np.ndarray) or planes.ndim != 2 or planes.dtype != np.uint8 \
            or not planes.flags.c_contiguous:
        raise InputError("merge_planes: expected a contiguous 2-D uint8 array of planes")
    flat = planes.reshape(-1)
    o = np.empty(flat.shape[0], dtype=np.uint8) if out is None else _bytes_1d(out, "out", writeable=True)
    if o.shape[0] != flat.shape[0]:
        raise InputError(f"merge_planes: out holds {o.shape[0]} bytes, planes {flat.shape[0]}")
    _kernel()(flat, o, planes.shape[0], False)
    return o
