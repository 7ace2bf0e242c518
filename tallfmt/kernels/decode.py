"""The fused masked decode (numba): θ̂ = θ0 + m ∘ τ_MTL for one tensor, rounded once to its dtype
(FORMAT.md §4.4), 64 elements per mask word, branch-free; and the masked select that switches a
resident model between tasks (out = m ? θ1 : θ0, θ1 = θ̂ where every bit is set).

Every kernel works on a range [start, stop) of the tensor (start a multiple of 8, so the range
begins at a mask byte), so threads can share one large tensor. θ0 and τ_MTL may be given as the
elements' storage or as byte planes (the ``byteplane-zstd`` codec's decoded planes, FORMAT.md §5):
the planar kernel assembles each element from its planes, so a byteplane segment is never merged.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

from tallfmt.errors import InputError
from tallfmt.format.dtypes import by_name
from tallfmt.format.planes import merge_planes
from tallfmt.kernels.core import (BITS, DECODE_DTYPES, KIND_BF16, KIND_F32, KINDS, RO_U8, U32, U64, array_type,
                                  bits_f32, check_padding_bits, decode_elem, f32_bits, f32_to_bf16, f32_to_f16, kernel,
                                  load_u64, no_overlap, packed_len, to_f32, vector)

_I64 = types.int64
_RO_PLANES = types.Array(types.uint8, 2, "C", readonly=True, aligned=False)
_NO_POS = np.zeros(0, np.int64)
_NO_VALS = np.zeros(0, np.float32)


@njit(inline="always")
def _residual_elem(b: int, t: float, bit: int, r: float, kind: int) -> int:
    """round(a + r), a = bit ? float32(float32(b) + t) : float32(b), on storage bits (FORMAT.md §11)."""
    bf = to_f32(b, kind)
    m = U32(0) - U32(bit & U64(1))
    v = bits_f32((f32_bits(bf + t) & m) | (f32_bits(bf) & ~m)) + r
    if kind == KIND_F32:
        return f32_bits(v)
    if kind == KIND_BF16:
        return U32(f32_to_bf16(v))
    return U32(f32_to_f16(v))


_RO_I64 = array_type(types.int64, True)
_RO_F32 = array_type(types.float32, True)


@njit(inline="always")
def _bad_range(n: int, packed: np.ndarray, start: int, stop: int) -> bool:
    """The kernels' own O(1) check: ⌈n/8⌉ mask bytes, 0 <= start <= stop <= n, start at a mask byte."""
    a, b = U64(start), U64(stop)
    return U64(packed.shape[0]) != (n + U64(7)) // U64(8) or start < 0 or a > b or b > n or a % U64(8) != U64(0)


@njit(inline="always")
def _bad_entries(pos: np.ndarray, r: np.ndarray, a: int, b: int) -> bool:
    """The residual entries given to a range must lie in it (the kernels also need them in order)."""
    k = pos.shape[0]
    return r.shape[0] != k or (k > 0 and (pos[0] < 0 or U64(pos[0]) < a or pos[k - 1] < 0 or U64(pos[k - 1]) >= b))


@kernel(*[types.void(array_type(s, True), array_type(types.float32, True), RO_U8, array_type(s, False), _I64, _I64,
                     _I64, _RO_I64, _RO_F32) for s in (types.uint32, types.uint16)])
def _decode_kernel(base: np.ndarray, tau: np.ndarray, packed: np.ndarray, out: np.ndarray, kind: int, start: int,
                   stop: int, pos: np.ndarray, r: np.ndarray) -> None:
    """out[i] = bit i ? round(float32(base[i]) + tau[i]) : base[i] for start <= i < stop, on storage bits;
    then, block by block while the block is in cache, the residual entries pos[j] (sorted, inside the
    range) get round(a + r[j]) instead (FORMAT.md §11)."""
    n = U64(base.shape[0])
    a, b = U64(start), U64(stop)
    if U64(tau.shape[0]) != n or U64(out.shape[0]) != n or _bad_range(n, packed, start, stop) \
            or _bad_entries(pos, r, a, b):
        raise ValueError("decode kernel: lengths")
    k = pos.shape[0]
    jr = 0
    nwords = (b - a) // U64(64)
    for w in range(nwords):  # 64 elements per mask word: a fixed-length inner loop LLVM vectorises
        w = U64(w)
        word = load_u64(packed, a // U64(8) + U64(8) * w)
        s = a + U64(64) * w
        for j in range(64):
            i = s + U64(j)
            out[i] = decode_elem(base[i], tau[i], word >> U64(j), kind)
        while jr < k and U64(pos[jr]) < s + U64(64):
            i = U64(pos[jr])
            out[i] = _residual_elem(base[i], tau[i], word >> (i - s), r[jr], kind)
            jr += 1
    for i in range(a + U64(64) * nwords, b):
        i = U64(i)
        out[i] = decode_elem(base[i], tau[i], U64(packed[i >> U64(3)]) >> (i & U64(7)), kind)
    while jr < k:
        i = U64(pos[jr])
        if i < a + U64(64) * nwords or i >= b:
            raise ValueError("decode kernel: residual positions out of order")
        out[i] = _residual_elem(base[i], tau[i], U64(packed[i >> U64(3)]) >> (i & U64(7)), r[jr], kind)
        jr += 1


@njit(inline="always")
def _join4(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, i: int) -> int:
    return U32(p0[i]) | (U32(p1[i]) << U32(8)) | (U32(p2[i]) << U32(16)) | (U32(p3[i]) << U32(24))


@kernel(*[types.void(_RO_PLANES, _RO_PLANES, RO_U8, array_type(s, False), _I64, _I64, _I64, _RO_I64, _RO_F32)
          for s in (types.uint32, types.uint16)])
def _decode_planes_kernel(base: np.ndarray, tau: np.ndarray, packed: np.ndarray, out: np.ndarray, kind: int,
                          start: int, stop: int, pos: np.ndarray, r: np.ndarray) -> None:
    """As _decode_kernel, with base as (itemsize, n) and tau as (4, n) byte planes (plane 0: low bytes)."""
    n = U64(out.shape[0])
    a, b = U64(start), U64(stop)
    planes = 4 if kind == KIND_F32 else 2
    if base.shape[0] != planes or tau.shape[0] != 4 or U64(base.shape[1]) != n or U64(tau.shape[1]) != n \
            or _bad_range(n, packed, start, stop) or _bad_entries(pos, r, a, b):
        raise ValueError("planar decode kernel: lengths")
    k = pos.shape[0]
    jr = 0
    # 2-byte elements: planes 0 and 1 are read twice, the high half masked off (one loop for every dtype)
    b0, b1, b2, b3 = base[0], base[1], base[planes - 2], base[planes - 1]
    t0, t1, t2, t3 = tau[0], tau[1], tau[2], tau[3]
    low = U32(0xFFFFFFFF) if kind == KIND_F32 else U32(0xFFFF)
    nwords = (b - a) // U64(64)
    for w in range(nwords):
        w = U64(w)
        word = load_u64(packed, a // U64(8) + U64(8) * w)
        s = a + U64(64) * w
        for j in range(64):
            i = s + U64(j)
            t = bits_f32(_join4(t0, t1, t2, t3, i))
            out[i] = decode_elem(_join4(b0, b1, b2, b3, i) & low, t, word >> U64(j), kind)
        while jr < k and U64(pos[jr]) < s + U64(64):
            i = U64(pos[jr])
            t = bits_f32(_join4(t0, t1, t2, t3, i))
            out[i] = _residual_elem(_join4(b0, b1, b2, b3, i) & low, t, word >> (i - s), r[jr], kind)
            jr += 1
    for i in range(a + U64(64) * nwords, b):
        i = U64(i)
        t = bits_f32(_join4(t0, t1, t2, t3, i))
        out[i] = decode_elem(_join4(b0, b1, b2, b3, i) & low, t, U64(packed[i >> U64(3)]) >> (i & U64(7)), kind)
    while jr < k:
        i = U64(pos[jr])
        if i < a + U64(64) * nwords or i >= b:
            raise ValueError("planar decode kernel: residual positions out of order")
        t = bits_f32(_join4(t0, t1, t2, t3, i))
        out[i] = _residual_elem(_join4(b0, b1, b2, b3, i) & low, t, U64(packed[i >> U64(3)]) >> (i & U64(7)), r[jr],
                                kind)
        jr += 1


@kernel(*[types.void(array_type(s, True), array_type(s, True), RO_U8, array_type(s, False), _I64, _I64)
          for s in (types.uint32, types.uint16)])
def _select_kernel(on: np.ndarray, off: np.ndarray, packed: np.ndarray, out: np.ndarray, start: int,
                   stop: int) -> None:
    """out[i] = bit i ? on[i] : off[i] for start <= i < stop (bit patterns, a select per element)."""
    n = U64(out.shape[0])
    a, b = U64(start), U64(stop)
    if U64(on.shape[0]) != n or U64(off.shape[0]) != n or _bad_range(n, packed, start, stop):
        raise ValueError("select kernel: lengths")
    nwords = (b - a) // U64(64)
    for w in range(nwords):
        w = U64(w)
        word = load_u64(packed, a // U64(8) + U64(8) * w)
        s = a + U64(64) * w
        for j in range(64):
            i = s + U64(j)
            m = U32(0) - U32((word >> U64(j)) & U64(1))
            out[i] = (U32(on[i]) & m) | (U32(off[i]) & ~m)
    for i in range(a + U64(64) * nwords, b):
        i = U64(i)
        m = U32(0) - U32((U64(packed[i >> U64(3)]) >> (i & U64(7))) & U64(1))
        out[i] = (U32(on[i]) & m) | (U32(off[i]) & ~m)


def decode_masked(base: np.ndarray, tau: np.ndarray, packed: np.ndarray, out: np.ndarray | None = None, *,
                  dtype: str | None = None, check_padding: bool = True) -> np.ndarray:
    """Fused TALL-mask decode of one tensor, flattened.

    ``out[i] = round_to_dtype(float32(base[i]) + tau[i])`` where bit i of `packed` is set (round to
    nearest even, overflow to inf, NaN stays NaN), else ``base[i]``'s bits exactly (-0.0 stays -0.0).
    `base` holds the storage of `dtype` ("F32": float32, "F16": float16, "BF16": uint16 bit patterns;
    if dtype is None it is inferred from float32/float16 — BF16 must be named). `tau` is float32 of
    the same length; `packed` holds ceil(n/8) bytes. `out` (optional) must have base's dtype and length;
    it may be `base` itself (in place) but must not otherwise overlap an input. Returns `out`.

        >>> decode_masked(np.zeros(3, np.float32), np.ones(3, np.float32), np.array([5], np.uint8)).tolist()
        [1.0, 0.0, 1.0]
    """
    if dtype is None:
        b0 = vector(base, "base", (np.float32, np.float16, np.uint16))
        if b0.dtype == np.uint16:
            raise InputError("base: uint16 holds bfloat16 bit patterns only when dtype='BF16' is given")
        dtype = "F32" if b0.dtype == np.float32 else "F16"
    storage = _storage(dtype)
    b = vector(base, "base", (storage,))
    n = b.shape[0]
    t = _tau_flat(tau, n)
    p = _packed(packed, n, check_padding)
    if out is None:
        o = np.empty(n, dtype=storage)
    else:
        o = _out(out, storage, n)
        no_overlap(o, "out", ("base", b), ("tau", t), ("packed mask", p), same_ok="base")
    bits = BITS[dtype]
    _decode_kernel(b.view(bits), t, p, o.view(bits), KINDS[dtype], 0, n, _NO_POS, _NO_VALS)
    return o


def decode_into(base: np.ndarray, tau: np.ndarray, packed: np.ndarray, out: np.ndarray, *, dtype: str,
                start: int = 0, stop: int | None = None, check_padding: bool = True,
                residual: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """:func:`decode_masked` of elements [start, stop) into ``out``, with θ0 and τ_MTL as storage
    or byte planes; with ``residual`` = (positions int64, strictly increasing, inside the tensor; values
    float32) the entries inside [start, stop) decode as FORMAT.md §11 says, round_dtype((θ0_f +
    m·τ_MTL) + r) with one rounding, applied in the same pass, block by block.

    ``base``: the n elements' storage (1-D, as :func:`decode_masked`), or their byte planes, a C-contiguous
    (itemsize, n) uint8 array, row j holding byte j of every element. ``tau``: float32 of length n, or
    (4, n) uint8 planes. ``out``: the storage of n elements (written only in [start, stop); it must not
    overlap an input). ``start`` must be a multiple of 8 (a mask byte boundary) unless it equals ``stop``,
    so that threads can decode disjoint ranges of one tensor at once.

        >>> planes = np.zeros((4, 3), np.uint8); planes[3] = 0x3F   # three float32 0.5
        >>> out = np.empty(3, np.float32)
        >>> decode_into(planes, np.ones(3, np.float32), np.array([2], np.uint8), out, dtype="F32")
        >>> out.tolist()
        [0.5, 1.5, 0.5]
    """
    storage = _storage(dtype)
    o = vector(out, "out", (storage,), writeable=True)
    n = o.shape[0]
    a, z = _range(start, stop, n)
    p = _packed(packed, n, check_padding)
    b_planar, t_planar = _is_planes(base), _is_planes(tau)
    b = _planes(base, "base", by_name(dtype).itemsize, n) if b_planar else vector(base, "base", (storage,))
    t = _planes(tau, "tau", 4, n) if t_planar else _tau_flat(tau, n)
    if b.shape[-1] != n:
        raise InputError(f"base: expected length {n} (as out), got {b.shape[-1]}")
    no_overlap(o, "out", ("base", b), ("tau", t), ("packed mask", p))
    pos, vals = _NO_POS, _NO_VALS
    if residual is not None:
        pos = vector(residual[0], "residual positions", (np.int64,))
        vals = vector(residual[1], "residual values", (np.float32,))
        if vals.shape[0] != pos.shape[0]:
            raise InputError(f"residual: {pos.shape[0]} positions, {vals.shape[0]} values")
        lo, hi = np.searchsorted(pos, (a, z))
        pos, vals = pos[lo:hi], vals[lo:hi]
    bits = BITS[dtype]
    if b_planar and t_planar:
        _decode_planes_kernel(b, t, p, o.view(bits), KINDS[dtype], a, z, pos, vals)
        return
    if b_planar:  # mixed layouts (segments stored with different codecs): merge the planes first
        b = merge_planes(b).view(storage)
    if t_planar:
        t = merge_planes(t).view(np.float32)
    _decode_kernel(b.view(bits), t, p, o.view(bits), KINDS[dtype], a, z, pos, vals)


def select_into(on: np.ndarray, off: np.ndarray, packed: np.ndarray, out: np.ndarray, *, start: int = 0,
                stop: int | None = None, check_padding: bool = True) -> None:
    """``out[i] = on[i] if bit i of packed else off[i]`` for start <= i < stop, bit for bit.

    ``on``, ``off`` and ``out``: 1-D arrays of one 2- or 4-byte dtype (float32, float16, uint16 for
    bfloat16 bits, ...); ``out`` must not overlap them. With ``on`` = θ0 + τ_MTL rounded (a decode with
    every bit set) and ``off`` = θ0 this is the task decode of FORMAT.md §4.4, without the float math.

        >>> out = np.empty(3, np.float32)
        >>> select_into(np.ones(3, np.float32), np.zeros(3, np.float32), np.array([5], np.uint8), out)
        >>> out.tolist()
        [1.0, 0.0, 1.0]
    """
    if not isinstance(out, np.ndarray) or out.dtype.itemsize not in (2, 4):
        raise InputError("out: expected a numpy array of a 2- or 4-byte dtype")
    o = vector(out, "out", (out.dtype,), writeable=True)
    n = o.shape[0]
    x = vector(on, "on", (o.dtype,))
    y = vector(off, "off", (o.dtype,))
    for name, arr in (("on", x), ("off", y)):
        if arr.shape[0] != n:
            raise InputError(f"{name}: expected length {n} (as out), got {arr.shape[0]}")
    a, z = _range(start, stop, n)
    p = _packed(packed, n, check_padding)
    no_overlap(o, "out", ("on", x), ("off", y), ("packed mask", p))
    bits = np.uint32 if o.dtype.itemsize == 4 else np.uint16
    _select_kernel(x.view(bits), y.view(bits), p, o.view(bits), a, z)


@kernel(*[types.void(array_type(s, True), _RO_F32, RO_U8, _RO_I64, _RO_F32, array_type(s, False), _I64)
          for s in (types.uint32, types.uint16)])
def _residual_kernel(base: np.ndarray, tau: np.ndarray, packed: np.ndarray, pos: np.ndarray, r: np.ndarray,
                     out: np.ndarray, kind: int) -> None:
    """out[j] = the decoded value of residual entry j, at position pos[j] (θ0 and τ_MTL flat)."""
    n = U64(base.shape[0])
    k = pos.shape[0]
    if U64(tau.shape[0]) != n or U64(packed.shape[0]) != (n + U64(7)) // U64(8) or r.shape[0] != k \
            or out.shape[0] != k:
        raise ValueError("residual kernel: lengths")
    for j in range(k):
        i = U64(pos[j])
        if i >= n:
            raise ValueError("residual kernel: position out of range")
        bit = U64(packed[i >> U64(3)]) >> (i & U64(7))
        out[j] = _residual_elem(base[i], tau[i], bit, r[j], kind)


@kernel(*[types.void(_RO_PLANES, _RO_PLANES, RO_U8, _RO_I64, _RO_F32, array_type(s, False), _I64)
          for s in (types.uint32, types.uint16)])
def _residual_planes_kernel(base: np.ndarray, tau: np.ndarray, packed: np.ndarray, pos: np.ndarray, r: np.ndarray,
                            out: np.ndarray, kind: int) -> None:
    """As _residual_kernel, with θ0 and τ_MTL as byte planes (each element joined at its position only)."""
    n = U64(tau.shape[1])
    k = pos.shape[0]
    planes = 4 if kind == KIND_F32 else 2
    if base.shape[0] != planes or tau.shape[0] != 4 or U64(base.shape[1]) != n \
            or U64(packed.shape[0]) != (n + U64(7)) // U64(8) or r.shape[0] != k or out.shape[0] != k:
        raise ValueError("planar residual kernel: lengths")
    b0, b1, b2, b3 = base[0], base[1], base[planes - 2], base[planes - 1]
    t0, t1, t2, t3 = tau[0], tau[1], tau[2], tau[3]
    low = U32(0xFFFFFFFF) if kind == KIND_F32 else U32(0xFFFF)
    for j in range(k):
        i = U64(pos[j])
        if i >= n:
            raise ValueError("planar residual kernel: position out of range")
        bit = U64(packed[i >> U64(3)]) >> (i & U64(7))
        out[j] = _residual_elem(_join4(b0, b1, b2, b3, i) & low, bits_f32(_join4(t0, t1, t2, t3, i)), bit, r[j], kind)


def residual_values(base: np.ndarray, tau: np.ndarray, packed: np.ndarray, pos: np.ndarray, vals: np.ndarray, *,
                    dtype: str) -> np.ndarray:
    """The decoded values (``dtype``'s storage) of the residual entries at ``pos`` (int64, inside the
    tensor), values ``vals`` (float32): round_dtype(a + r) with a the masked decode's float32 sum (θ0 +
    τ_MTL where the bit is set, θ0 where it is clear) — one rounding, never two (FORMAT.md §11).
    ``base``/``tau``: storage or byte planes as :func:`decode_into` takes them. Reads only the k
    entries, never the whole tensor.

        >>> residual_values(np.zeros(3, np.float32), np.ones(3, np.float32), np.array([1], np.uint8),
        ...                 np.array([0, 2]), np.array([0.5, 0.25], np.float32), dtype="F32").tolist()
        [1.5, 0.25]
    """
    storage = _storage(dtype)
    p = vector(np.ascontiguousarray(pos, dtype=np.int64), "pos", (np.int64,))
    r = vector(vals, "vals", (np.float32,))
    if r.shape[0] != p.shape[0]:
        raise InputError(f"vals: expected {p.shape[0]} values (as pos), got {r.shape[0]}")
    bits = BITS[dtype]
    out = np.empty(p.shape[0], dtype=storage)
    b_planar, t_planar = _is_planes(base), _is_planes(tau)
    n = tau.shape[1] if t_planar else tau.shape[0]
    pk = _packed(packed, n, False)
    if b_planar and t_planar:
        _residual_planes_kernel(_planes(base, "base", by_name(dtype).itemsize, n), _planes(tau, "tau", 4, n), pk, p, r,
                                out.view(bits), KINDS[dtype])
        return out
    b = merge_planes(base).view(storage) if b_planar else vector(base, "base", (storage,))
    t = merge_planes(tau).view(np.float32) if t_planar else _tau_flat(tau, n)
    if b.shape[0] != n:
        raise InputError(f"base: expected length {n} (as tau), got {b.shape[0]}")
    _residual_kernel(b.view(bits), t, pk, p, r, out.view(bits), KINDS[dtype])
    return out


# --- argument checks -------------------------------------------------------------------------------
def _storage(dtype: str) -> np.dtype:
    if dtype not in DECODE_DTYPES:
        raise InputError(f"dtype: expected one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")
    return by_name(dtype).storage


def _out(out: np.ndarray, storage: np.dtype, n: int) -> np.ndarray:
    o = vector(out, "out", (storage,), writeable=True)
    if o.shape[0] != n:
        raise InputError(f"out: expected length {n} (as base), got {o.shape[0]}")
    return o


def _tau_flat(tau: np.ndarray, n: int) -> np.ndarray:
    t = vector(tau, "tau", (np.float32,))
    if t.shape[0] != n:
        raise InputError(f"tau: expected length {n} (as base), got {t.shape[0]}")
    return t


def _packed(packed: np.ndarray, n: int, check_padding: bool) -> np.ndarray:
    p = packed_len(packed, n)
    if check_padding:
        check_padding_bits(p, n)
    return p


def _is_planes(a: object) -> bool:
    return isinstance(a, np.ndarray) and a.ndim == 2


def _planes(a: np.ndarray, name: str, itemsize: int, n: int) -> np.ndarray:
    if a.dtype != np.uint8 or not a.flags.c_contiguous or a.shape != (itemsize, n):
        raise InputError(f"{name}: byte planes must be a C-contiguous uint8 array of shape ({itemsize}, {n}), "
                         f"got {a.dtype} {a.shape}")
    return a


def _range(start: int, stop: int | None, n: int) -> tuple[int, int]:
    z = n if stop is None else stop
    if isinstance(start, bool) or isinstance(z, bool) or not isinstance(start, (int, np.integer)) \
            or not isinstance(z, (int, np.integer)) or not 0 <= start <= z <= n:
        raise InputError(f"start, stop: expected 0 <= start <= stop <= {n}, got {start!r}, {stop!r}")
    if start % 8 and start != z:
        raise InputError(f"start: expected a multiple of 8 (a mask byte boundary), got {start}")
    return int(start), int(z)
