"""The fused masked decode (numba): θ̂ = θ0 + m ∘ τ_MTL for one tensor, rounded once to its dtype
(FORMAT.md §4.4), 64 elements per mask word, branch-free."""

from __future__ import annotations

import numpy as np
from numba import types

from tallfmt.errors import InputError
from tallfmt.format.dtypes import by_name
from tallfmt.kernels.core import (BITS, DECODE_DTYPES, KINDS, RO_U8, U64, array_type, check_padding_bits,
                                  decode_elem, kernel, load_u64, no_overlap, packed_len, vector)


@kernel(*[types.void(array_type(s, True), array_type(types.float32, True), RO_U8, array_type(s, False), types.int64)
           for s in (types.uint32, types.uint16)])
def _decode_kernel(base: np.ndarray, tau: np.ndarray, packed: np.ndarray, out: np.ndarray, kind: int) -> None:
    """out[i] = bit i ? round(float32(base[i]) + tau[i]) : base[i], on storage bit patterns."""
    n = U64(base.shape[0])
    if U64(tau.shape[0]) != n or U64(out.shape[0]) != n or U64(packed.shape[0]) != (n + U64(7)) // U64(8):
        raise ValueError("decode kernel: lengths")
    nwords = n // U64(64)
    for w in range(nwords):  # 64 elements per mask word: a fixed-length inner loop LLVM vectorises
        w = U64(w)
        word = load_u64(packed, U64(8) * w)
        s = U64(64) * w
        for j in range(64):
            i = s + U64(j)
            out[i] = decode_elem(base[i], tau[i], word >> U64(j), kind)
    for i in range(U64(64) * nwords, n):
        i = U64(i)
        out[i] = decode_elem(base[i], tau[i], U64(packed[i >> U64(3)]) >> (i & U64(7)), kind)


def decode_masked(base: np.ndarray, tau: np.ndarray, packed: np.ndarray, out: np.ndarray | None = None, *,
                  dtype: str | None = None, check_padding: bool = True) -> np.ndarray:
    """Fused TALL-mask decode of one tensor, flattened.

    ``out[i] = round_to_dtype(float32(base[i]) + tau[i])`` where bit i of `packed` is set (round to
    nearest even, overflow to inf, NaN stays NaN), else ``base[i]``'s bits exactly (-0.0 stays -0.0).
    `base` holds the storage of `dtype` ("F32": float32, "F16": float16, "BF16": uint16 bit patterns;
    if dtype is None it is inferred from float32/float16 — BF16 must be named). `tau` is float32 of
    the same length; `packed` holds ceil(n/8) bytes. `out` (optional) must have base's dtype and length;
    it may be `base` itself (in place) but must not otherwise overlap an input. Returns `out`.
    """
    if dtype is None:
        b0 = vector(base, "base", (np.float32, np.float16, np.uint16))
        if b0.dtype == np.uint16:
            raise InputError("base: uint16 holds bfloat16 bit patterns only when dtype='BF16' is given")
        dtype = "F32" if b0.dtype == np.float32 else "F16"
    if dtype not in DECODE_DTYPES:
        raise InputError(f"dtype: expected one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")
    storage = by_name(dtype).storage
    b = vector(base, "base", (storage,))
    n = b.shape[0]
    t = vector(tau, "tau", (np.float32,))
    if t.shape[0] != n:
        raise InputError(f"tau: expected length {n} (as base), got {t.shape[0]}")
    p = packed_len(packed, n)
    if check_padding:
        check_padding_bits(p, n)
    if out is None:
        o = np.empty(n, dtype=storage)
    else:
        o = vector(out, "out", (storage,), writeable=True)
        if o.shape[0] != n:
            raise InputError(f"out: expected length {n} (as base), got {o.shape[0]}")
        no_overlap(o, "out", ("base", b), ("tau", t), ("packed mask", p), same_ok="base")
    bits = BITS[dtype]
    _decode_kernel(b.view(bits), t, p, o.view(bits), KINDS[dtype])
    return o

