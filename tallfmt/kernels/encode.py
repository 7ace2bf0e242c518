"""Encode-time kernels (numba): the per-task statistics of FORMAT.md §4.4, measured on θ̂ exactly as
decode produces it."""

from __future__ import annotations

import numpy as np
from numba import types

from tallfmt.errors import InputError
from tallfmt.format.dtypes import by_name
from tallfmt.kernels.core import (BITS, DECODE_DTYPES, KINDS, RO_U8, U64, array_type, decode_elem, kernel,
                                  packed_len, to_f32, vector)


@kernel(*[types.void(array_type(s, True), array_type(s, True), array_type(types.float32, True), RO_U8,
                      array_type(types.float64, False), types.int64) for s in (types.uint32, types.uint16)])
def _mask_stats_kernel(base: np.ndarray, theta: np.ndarray, tau: np.ndarray, packed: np.ndarray,
                       sums: np.ndarray, kind: int) -> None:
    """sums += [Σ(θ̂−θ)², Σ τ_t², Σ (m∘τ_MTL)·τ_t, Σ (m∘τ_MTL)², Σ m] with θ̂ the decoded value."""
    n = U64(base.shape[0])
    if U64(theta.shape[0]) != n or U64(tau.shape[0]) != n or U64(packed.shape[0]) != (n + U64(7)) // U64(8) \
            or sums.shape[0] != 5:
        raise ValueError("mask stats kernel: lengths")
    err2 = tau2 = dot = masked2 = kept = 0.0
    for i in range(n):  # sequential float64 sums: the same result on every CPU
        i = U64(i)
        bit = (U64(packed[i >> U64(3)]) >> (i & U64(7))) & U64(1)
        b = to_f32(base[i], kind)
        th = to_f32(theta[i], kind)
        hat = to_f32(decode_elem(base[i], tau[i], bit, kind), kind)
        tau_t = np.float64(th - b)  # the float32 task vector of FORMAT.md §4.1, widened
        mt = np.float64(tau[i]) * np.float64(bit)
        err = np.float64(hat) - np.float64(th)
        err2 += err * err
        tau2 += tau_t * tau_t
        dot += mt * tau_t
        masked2 += mt * mt
        kept += np.float64(bit)
    sums[0] += err2
    sums[1] += tau2
    sums[2] += dot
    sums[3] += masked2
    sums[4] += kept


def mask_stats(base: np.ndarray, theta: np.ndarray, tau: np.ndarray, packed: np.ndarray, sums: np.ndarray, *,
               dtype: str) -> None:
    """Add one chunk's encode-time statistics of one task into ``sums`` (float64[5]).

    ``base``/``theta``: θ0 and θ_t in ``dtype``'s storage ("F32"/"F16"/"BF16"), ``tau`` τ_MTL float32,
    ``packed`` the task's mask bits. θ̂ is computed exactly as decode_masked does, so the recorded
    error is the error users get. Sums run sequentially in float64 so they are bit-identical on
    every machine (the header, and so the file, must not depend on the CPU).
    """
    if dtype not in DECODE_DTYPES:
        raise InputError(f"dtype: expected one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")
    storage = by_name(dtype).storage
    b = vector(base, "base", (storage,))
    th = vector(theta, "theta", (storage,))
    t = vector(tau, "tau", (np.float32,))
    n = b.shape[0]
    if th.shape[0] != n or t.shape[0] != n:
        raise InputError(f"theta/tau: expected length {n} (as base), got {th.shape[0]}/{t.shape[0]}")
    p = packed_len(packed, n)
    s = vector(sums, "sums", (np.float64,), writeable=True)
    if s.shape[0] != 5:
        raise InputError(f"sums: expected 5 float64, got {s.shape[0]}")
    bits = BITS[dtype]
    _mask_stats_kernel(b.view(bits), th.view(bits), t, p, s, KINDS[dtype])

