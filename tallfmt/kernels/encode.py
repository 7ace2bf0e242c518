"""Fused encode kernels (numba): one element loop per chunk of a tensor makes τ_MTL, the T packed masks and
the per-task statistics; two histogram kernels give the exact global top-k thresholds of |τ_t|.

Bits are those of the torch path (tallfmt.compute.maskmath, used on other devices; FORMAT.md §4), element for element:

* τ_t = float32(θ_t) − float32(θ0), one float32 subtraction (F16/BF16 widen exactly).
* task_arithmetic: τ_MTL = ((+0.0 + τ_1) + τ_2) + …, float32 after each addition.
* ties: trimmed_t = τ_t if |τ_t| ≥ v_t else +0.0; s = sign(Σ_t trimmed_t) (float32, task order); kept_t =
  trimmed_t where sign(trimmed_t) == s (zeros "match" s = 0, as torch's ``sign() ==`` does); τ_MTL = Σ_t
  (kept_t or +0.0); mean divides by float32(number matched) clamped to ≥ 1.
* tau_dtype BF16: τ_MTL is then rounded to bfloat16 (nearest even) and widened back; the masks, the
  decoded values and the statistics below use that stored τ_MTL (FORMAT.md §4.2).
* tall: bit = |τ_t| ≥ float32(λ_t) · |τ_MTL − τ_t|;  magnitude: bit = |τ_t| ≥ v_t.
* statistics per task, float64, added element by element in element order into ``stats[t]`` =
  [Σ(θ̂−θ_t)², Σ τ_t², Σ (m∘τ_MTL)·τ_t, Σ (m∘τ_MTL)², Σ m], θ̂ exactly as ``decode_elem`` decodes it. The
  accumulators are loaded, extended and stored back, so consecutive chunks give the very float64 values
  of one ``mask_stats`` call over the whole tensor, whatever the chunk size.

Inputs: θ0 as a flat storage array and the T fine-tunes as flat storage arrays of the same length, given
once per tensor (:class:`TensorInputs`); a chunk is a range ``[start, stop)`` of element indices, so the
caller never slices or copies per chunk. The fine-tunes reach the kernel as a table of T base addresses
(see :class:`TensorInputs` for why). Kernels release the GIL: threads may encode different tensors at
once. Each option combination is its own compiled kernel (compile-time constants, no per-element
branching on options), compiled on first use and cached on disk.

Never compile these kernels with fastmath: reassociating or contracting (FMA) the float32 math or the
float64 sums changes bits, and nnan/ninf would delete the NaN/Inf checks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from tallfmt.errors import InputError
from tallfmt.format.dtypes import by_name
from tallfmt.kernels.core import (BITS, DECODE_DTYPES, KIND_BF16, KIND_F16, KIND_F32, KINDS, RO_U8, U32, U64,
                                  array_type, bits_f32, ctpop, decode_elem, f32_bits, f32_to_bf16, kernel,
                                  packed_len, store_u64, to_f32, vector)

__all__ = ["mask_stats", "EncodeSpec", "TensorInputs", "EncodeOutputs", "encode_chunk", "hist_hi_chunk",
           "hist_lo_chunk", "hist_window_chunk", "describe_problems", "PROBLEM_INPUT", "PROBLEM_OVERFLOW", "PROBLEM_DECODE", "HI_BINS", "LO_BINS"]

#: Flags in ``EncodeOutputs.problems`` (row 0: θ0 / τ_MTL, row 1 + t: task t), OR-ed over all chunks.
PROBLEM_INPUT = 1      # NaN or Inf in θ0 (row 0) or θ_t (row 1 + t)
PROBLEM_OVERFLOW = 2   # a non-finite τ_MTL (row 0) or τ_t (row 1 + t), e.g. a float32 sum that overflows
PROBLEM_DECODE = 4     # a non-finite decoded θ̂_t (row 1 + t), e.g. an F16 θ0 + τ_MTL that rounds to inf

HI_BINS = 1 << 16        # pass 1: top 16 bits of |τ_t|
LO_BINS = (1 << 16) + 2  # pass 2: [below the bin, low 16 bits inside it (65536), above it], as TopKThreshold

_U = U64
_u32 = U32
_f32 = np.float32
_W = 64                        # elements per block: one u64 mask word per task
_F32_EXP = _u32(0x7F800000)
_EXP = {KIND_F32: 0x7F800000, KIND_BF16: 0x7F80, KIND_F16: 0x7C00}   # exponent field of each storage format
_KIND_BITS = {KINDS[d]: b for d, b in BITS.items()}


@intrinsic
def _load_at(typingctx: Any, like: Any, addr: Any, idx: Any) -> Any:
    """Element ``idx`` of the array whose data starts at address ``addr``, of ``like``'s element type
    (one unaligned load; the caller checks bounds)."""
    elt = like.dtype

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[1], context.get_value_type(elt).as_pointer())
        return builder.load(builder.gep(ptr, [args[2]]), align=1)
    return elt(like, types.uint64, types.uint64), codegen


@njit(inline="always")
def _nonfinite(x: Any) -> Any:
    """1 when the float32 x is ±inf or NaN, else 0 (a bit test, no branch)."""
    return _u32((f32_bits(x) & _F32_EXP) == _F32_EXP)


@njit(inline="always")
def _sign(x: Any) -> Any:
    """−1, 0 or 1 as torch.sign (±0 → 0), for float32 x without NaN."""
    return np.int32(x > _f32(0.0)) - np.int32(x < _f32(0.0))


@njit(inline="always")
def _add_terms1(stats: np.ndarray, o: Any, terms: np.ndarray, m: Any) -> None:
    """stats[o + c] += terms[c * _W + j] for c < 4, in the order j = 0, 1, …, m − 1."""
    a0 = stats[o]
    a1 = stats[o + _U(1)]
    a2 = stats[o + _U(2)]
    a3 = stats[o + _U(3)]
    for j in range(m):
        a0 += terms[j]
        a1 += terms[_W + j]
        a2 += terms[2 * _W + j]
        a3 += terms[3 * _W + j]
    stats[o] = a0
    stats[o + _U(1)] = a1
    stats[o + _U(2)] = a2
    stats[o + _U(3)] = a3


@njit(inline="always")
def _add_terms2(stats: np.ndarray, o: Any, terms: np.ndarray, m: Any) -> None:
    """_add_terms1 for two consecutive tasks at once (stats rows o and o + 5, terms at 0 and 4·_W)."""
    a0 = stats[o]
    a1 = stats[o + _U(1)]
    a2 = stats[o + _U(2)]
    a3 = stats[o + _U(3)]
    b0 = stats[o + _U(5)]
    b1 = stats[o + _U(6)]
    b2 = stats[o + _U(7)]
    b3 = stats[o + _U(8)]
    for j in range(m):
        a0 += terms[j]
        a1 += terms[_W + j]
        a2 += terms[2 * _W + j]
        a3 += terms[3 * _W + j]
        b0 += terms[4 * _W + j]
        b1 += terms[5 * _W + j]
        b2 += terms[6 * _W + j]
        b3 += terms[7 * _W + j]
    stats[o] = a0
    stats[o + _U(1)] = a1
    stats[o + _U(2)] = a2
    stats[o + _U(3)] = a3
    stats[o + _U(5)] = b0
    stats[o + _U(6)] = b1
    stats[o + _U(7)] = b2
    stats[o + _U(8)] = b3


# --- the fused encode kernel ---------------------------------------------------------------------
@functools.cache
def _encode_kernel(kind: int, ties: bool, mean: bool, tall: bool, zero_clears: bool, tau_bf16: bool) -> Any:
    """The encode kernel of one option combination. The options are closure constants, so every
    ``if`` on them folds at compile time (numba caches each closure under its constants)."""
    st = types.uint32 if kind == KIND_F32 else types.uint16
    exp = _KIND_BITS[kind](_EXP[kind])
    sig = types.void(array_type(st, True), array_type(types.uint64, True), types.uint64, types.uint64,
                     array_type(types.float32, True), array_type(types.float32, True), array_type(types.float32, False),
                     array_type(types.uint8, False), array_type(types.float64, False), array_type(types.uint8, False))

    def encode(base: np.ndarray, thetas: np.ndarray, start: int, stop: int, trim: np.ndarray,
               mparam: np.ndarray, tau_out: np.ndarray, masks: np.ndarray, stats: np.ndarray,
               problems: np.ndarray) -> None:
        """Elements [start, stop) of one tensor: τ_MTL into tau_out, mask bits into masks (T rows of
        ceil(n/8) bytes, flat), stats (T×5, flat) extended in element order, problem flags OR-ed.
        thetas: the T fine-tunes' base addresses (each n elements of base's type). trim: TIES v_t;
        mparam: λ_t (tall) or v_t (magnitude), float32."""
        n = _U(base.shape[0])
        nt = _U(thetas.shape[0])
        nbytes = (n + _U(7)) // _U(8)
        start = _U(start)
        stop = _U(stop)
        if stop > n or start > stop or start % _U(8) != _U(0) or (stop % _U(8) != _U(0) and stop != n) \
                or _U(tau_out.shape[0]) != n or _U(masks.shape[0]) != nt * nbytes \
                or _U(stats.shape[0]) != _U(5) * nt or _U(problems.shape[0]) != nt + _U(1) \
                or _U(mparam.shape[0]) != nt or (ties and _U(trim.shape[0]) != nt):
            raise ValueError("encode kernel: lengths")
        b_f = np.empty(_W, dtype=np.float32)   # float32(θ0) of the block
        mtl = np.empty(_W, dtype=np.float32)   # τ_MTL of the block (the running sum until it is final)
        esum = np.empty(_W, dtype=np.float32)  # ties: Σ_t trimmed_t, whose sign is elected
        cnt = np.empty(_W, dtype=np.float32)   # ties mean: number of tasks matching the elected sign
        terms = np.empty(8 * _W, dtype=np.float64)  # statistics terms of the block, two tasks
        nblocks = (stop - start + _U(_W - 1)) // _U(_W)
        for k in range(nblocks):
            s = start + _U(_W) * _U(k)
            m = min(_U(_W), stop - s)
            # --- τ_MTL of the block: one pass over θ0, one (ties: two) over the T fine-tunes
            bad = _u32(0)
            for j in range(m):
                bb = base[s + _U(j)]
                bad |= _u32((bb & exp) == exp)
                b_f[j] = to_f32(bb, kind)
                mtl[j] = _f32(0.0)
                if ties:
                    esum[j] = _f32(0.0)
                    if mean:
                        cnt[j] = _f32(0.0)
            problems[0] |= np.uint8(bad * _u32(PROBLEM_INPUT))
            for t in range(nt):
                p = thetas[t]
                bad = _u32(0)
                ovf = _u32(0)
                for j in range(m):
                    th = _load_at(base, p, s + _U(j))
                    tau = to_f32(th, kind) - b_f[j]
                    bad |= _u32((th & exp) == exp)
                    ovf |= _nonfinite(tau)
                    if ties:
                        esum[j] += tau if abs(tau) >= trim[t] else _f32(0.0)
                    else:
                        mtl[j] += tau
                problems[t + 1] |= np.uint8(bad * _u32(PROBLEM_INPUT) | ovf * _u32(PROBLEM_OVERFLOW))
            if ties:
                for t in range(nt):  # disjoint merge: recompute τ_t (an L1 load) rather than store T×W
                    p = thetas[t]
                    thr = trim[t]
                    for j in range(m):
                        tau = to_f32(_load_at(base, p, s + _U(j)), kind) - b_f[j]
                        tr = tau if abs(tau) >= thr else _f32(0.0)
                        keep = _sign(tr) == _sign(esum[j])
                        mtl[j] += tr if keep else _f32(0.0)
                        if mean:
                            cnt[j] += _f32(keep)
                if mean:
                    for j in range(m):
                        mtl[j] = mtl[j] / max(cnt[j], _f32(1.0))
            ovf = _u32(0)
            for j in range(m):
                ovf |= _nonfinite(mtl[j])
                if tau_bf16:  # the stored τ_MTL, which everything below uses; one that rounds to ±inf overflows
                    mtl[j] = bits_f32(_u32(f32_to_bf16(mtl[j])) << _u32(16))
                    ovf |= _nonfinite(mtl[j])
                tau_out[s + _U(j)] = mtl[j]
            problems[0] |= np.uint8(ovf * _u32(PROBLEM_OVERFLOW))
            # --- per task: mask bits and decoded values, then the statistics. The terms come from a loop
            # LLVM vectorises (element-wise IEEE products: the bits of scalar code); only the float64
            # additions stay sequential, in element order, two tasks at a time: eight independent
            # addition chains instead of four hide the latency of each addition.
            for t in range(nt):
                p = thetas[t]
                prm = mparam[t]
                slot = _U(4 * _W) * (_U(t) & _U(1))
                word = _U(0)
                bad = _u32(0)
                for j in range(m):
                    i = s + _U(j)
                    th_f = to_f32(_load_at(base, p, i), kind)
                    tau = th_f - b_f[j]
                    v = mtl[j]
                    if tall:
                        keep = abs(tau) >= prm * abs(v - tau)
                    else:
                        keep = abs(tau) >= prm
                    if zero_clears:
                        keep = keep and v != _f32(0.0)
                    bit = _U(keep)
                    word |= bit << _U(j)
                    hat = decode_elem(base[i], v, bit, kind)
                    bad |= _u32((hat & _u32(exp)) == _u32(exp))
                    # the terms of _mask_stats_kernel, from the same float32 values
                    tau_t = np.float64(tau)
                    mt = np.float64(v) * np.float64(bit)
                    err = np.float64(to_f32(hat, kind)) - np.float64(th_f)
                    terms[slot + _U(j)] = err * err
                    terms[slot + _U(_W + j)] = tau_t * tau_t
                    terms[slot + _U(2 * _W + j)] = mt * tau_t
                    terms[slot + _U(3 * _W + j)] = mt * mt
                if t & 1 == 1:
                    _add_terms2(stats, _U(5) * _U(t - 1), terms, m)
                elif t == nt - 1:
                    _add_terms1(stats, _U(5) * _U(t), terms, m)
                # whole numbers below 2^53 add exactly: one addition per block equals one per element
                stats[_U(5) * _U(t) + _U(4)] += np.float64(ctpop(word))
                row = _U(t) * nbytes + s // _U(8)
                if m == _U(_W):
                    store_u64(masks, row, word)
                else:
                    for q in range((m + _U(7)) // _U(8)):
                        masks[row + _U(q)] = np.uint8((word >> (_U(8) * _U(q))) & _U(0xFF))
                problems[t + 1] |= np.uint8(bad * _u32(PROBLEM_DECODE))

    return kernel(sig)(encode)


# --- |τ_t| radix histograms (TopKThreshold's two passes) -----------------------------------------
_HB = 256  # elements per histogram block (each of the 8 byte lanes of a u64 counts at most 32 of them)


@functools.cache
def _hist_kernel(kind: int, second: bool) -> Any:
    """Pass 1 (second=False): hist[t, top 16 bits of |τ_t|] += 1. Pass 2: with b = bins[t],
    hist[t, 0] counts |τ_t| bits below b << 16, hist[t, 1 + low 16 bits] those inside bin b and
    hist[t, 65537] those above, as TopKThreshold.update_lo. hist is flat, T rows.

    Most entries hit one count (τ_t = 0 in pass 1; below or above the bin in pass 2); a memory
    increment of one bin per element would be a chain of store-to-load forwards, and a branch around
    it is mispredicted on mixed data. So those entries are "diverted": element j increments bin
    ``first + (j & 7)`` like any other, its byte lane j & 7 of a u64 counts it, and after each block the
    lane counts are taken back out of those 8 bins and added where they belong.
    """
    st = types.uint32 if kind == KIND_F32 else types.uint16
    sig = types.void(array_type(st, True), array_type(types.uint64, True), types.uint64, types.uint64,
                     array_type(types.int64, True), array_type(types.int64, False))
    width = _U(LO_BINS if second else HI_BINS)
    first = _u32(1 if second else 0)  # the 8 bins diverted entries pass through

    def hist(base: np.ndarray, thetas: np.ndarray, start: int, stop: int, bins: np.ndarray,
             out: np.ndarray) -> None:
        n = _U(base.shape[0])
        nt = _U(thetas.shape[0])
        start = _U(start)
        stop = _U(stop)
        if stop > n or start > stop or _U(out.shape[0]) != nt * width or (second and _U(bins.shape[0]) != nt):
            raise ValueError("histogram kernel: lengths")
        idx = np.empty(_HB, dtype=np.uint32)
        nblocks = (stop - start + _U(_HB - 1)) // _U(_HB)
        for t in range(nt):
            p = thetas[t]
            row = _U(t) * width
            lo = _u32(0)
            if second:
                if bins[t] < 0 or bins[t] >= HI_BINS:
                    raise ValueError("histogram kernel: bin")
                lo = _u32(bins[t]) << _u32(16)
            below = _U(0)
            above = _U(0)
            for k in range(nblocks):
                s = start + _U(_HB) * _U(k)
                m = min(_U(_HB), stop - s)
                lanes = _U(0)
                for j in range(m):  # vectorised: bins and lane counts
                    i = s + _U(j)
                    tau = to_f32(_load_at(base, p, i), kind) - to_f32(base[i], kind)
                    a = f32_bits(tau) & _u32(0x7FFFFFFF)  # |τ|, −0 as +0
                    if second:
                        d = a - lo  # unsigned: wraps above 0xFFFF when a < lo
                        below += _U(a < lo)
                        above += _U(a > (lo | _u32(0xFFFF)))
                        divert = d > _u32(0xFFFF)
                        b = first + d
                    else:
                        divert = a == _u32(0)
                        b = a >> _u32(16)
                    lane = _u32(j) & _u32(7)
                    lanes += _U(divert) << (_U(8) * _U(lane))
                    idx[j] = b if not divert else first + lane
                for j in range(m):
                    out[row + _U(idx[j])] += 1
                for q in range(8):
                    c = np.int64((lanes >> _U(8 * q)) & _U(0xFF))
                    out[row + _U(first) + _U(q)] -= c
                    if not second:
                        out[row] += c
            if second:
                out[row] += np.int64(below)
                out[row + width - _U(1)] += np.int64(above)
    return kernel(sig)(hist)


@functools.cache
def _window_kernel(kind: int) -> Any:
    """Pass 1 of a global selection, in one read: hi[t, top 16 bits of |τ_t|] += 1 (as _hist_kernel's
    first pass), for each selection s lo[s, t, b − w0, low 16 bits] += 1 where the top bits b lie in
    the window [w0, w0 + width) with w0 = starts[s, t], and differs[t] = 1 when some θ_t element's bits
    are not θ0's (the tensor is then not shared). hi, lo flat."""
    st = types.uint32 if kind == KIND_F32 else types.uint16
    sig = types.void(array_type(st, True), array_type(types.uint64, True), types.uint64, types.uint64,
                     array_type(types.int64, True), types.int64, array_type(types.int64, False),
                     array_type(types.int64, False), array_type(types.uint8, False))

    def window(base: np.ndarray, thetas: np.ndarray, start: int, stop: int, starts: np.ndarray, width: int,
               hi: np.ndarray, lo: np.ndarray, differs: np.ndarray) -> None:
        n = _U(base.shape[0])
        nt = _U(thetas.shape[0])
        start = _U(start)
        stop = _U(stop)
        w = _U(width)
        nsel = _U(starts.shape[0]) // nt if nt else _U(0)
        if stop > n or start > stop or _U(hi.shape[0]) != nt * _U(HI_BINS) or _U(starts.shape[0]) != nsel * nt \
                or _U(lo.shape[0]) != nsel * nt * w * _U(HI_BINS) or _U(differs.shape[0]) != nt:
            raise ValueError("window kernel: lengths")
        for q in range(nsel * nt):
            if starts[q] < 0 or _U(starts[q]) + w > _U(HI_BINS):
                raise ValueError("window kernel: window")
        idx = np.empty(_HB, dtype=np.uint32)
        nblocks = (stop - start + _U(_HB - 1)) // _U(_HB)
        for t in range(nt):
            p = thetas[t]
            row = _U(t) * _U(HI_BINS)
            diff = _u32(0)
            for k in range(nblocks):
                s = start + _U(_HB) * _U(k)
                m = min(_U(_HB), stop - s)
                lanes = _U(0)
                for j in range(m):  # vectorised: bins and lane counts (zeros diverted, as _hist_kernel does)
                    i = s + _U(j)
                    bb = base[i]
                    th = _load_at(base, p, i)
                    diff |= _u32(th != bb)
                    a = f32_bits(to_f32(th, kind) - to_f32(bb, kind)) & _u32(0x7FFFFFFF)
                    divert = a == _u32(0)
                    lane = _u32(j) & _u32(7)
                    lanes += _U(divert) << (_U(8) * _U(lane))
                    idx[j] = (a >> _u32(16)) if not divert else lane
                for j in range(m):
                    hi[row + _U(idx[j])] += 1
                for q in range(8):
                    c = np.int64((lanes >> _U(8 * q)) & _U(0xFF))
                    hi[row + _U(q)] -= c
                    hi[row] += c
                for sel in range(nsel):  # the windows: a few bins, so most elements skip them
                    w0 = _u32(starts[_U(sel) * nt + _U(t)])
                    base_row = (_U(sel) * nt + _U(t)) * w * _U(HI_BINS)
                    for j in range(m):
                        i = s + _U(j)
                        a = f32_bits(to_f32(_load_at(base, p, i), kind) - to_f32(base[i], kind)) & _u32(0x7FFFFFFF)
                        b = (a >> _u32(16)) - w0  # unsigned: wraps above the window when a is below it
                        if _U(b) < w:
                            lo[base_row + _U(b) * _U(HI_BINS) + _U(a & _u32(0xFFFF))] += 1
            differs[t] |= np.uint8(diff != _u32(0))
    return kernel(sig)(window)


# --- public API ----------------------------------------------------------------------------------
def _float32_params(values: Any, name: str, *, allow_inf: bool) -> np.ndarray:
    """Per-task parameters rounded once to float32 (nearest even), as maskmath rounds its scalars.
    NaN, a finite value that rounds to ±inf, or (unless allow_inf) any infinity is an InputError."""
    try:
        wide = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{name}: expected a sequence of real numbers") from None
    with np.errstate(over="ignore"):
        out = wide.astype(np.float32)
    bad = np.isnan(wide) | (np.isinf(out) & (np.isfinite(wide) | (not allow_inf)))
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"{name}[{i}]: {wide[i]} is not a {'' if allow_inf else 'finite '}float32 value")
    return out


@dataclass(frozen=True, eq=False)
class EncodeSpec:
    """What to compute: the merge, the mask and their per-task parameters (FORMAT.md §4).

    ``merge`` "task_arithmetic" or "ties" (with ``ties_thresholds`` v_t, one per task, and ``ties_agg``
    "sum" or "mean"); ``mask`` "tall" (``lambdas``, λ_t ≥ 0 as maskmath allows; the codec asks > 0) or
    "magnitude" (``mask_thresholds`` v_t; +inf keeps nothing). Parameters are rounded to float32 here,
    once. ``tau_dtype`` "BF16": τ_MTL is rounded to bfloat16 before the masks (FORMAT.md §4.2); ``tau``
    then holds the widened bfloat16 values. ``zero_tau_clears_mask``: clear the mask bit wherever τ_MTL == 0 exactly (what the encoder of
    format 1.1 does, FORMAT.md §4.3; off: the mask rule alone, as format 1.0 wrote).

        >>> EncodeSpec(lambdas=[0.4, 0.5]).num_tasks
        2
    """

    merge: str = "task_arithmetic"
    mask: str = "tall"
    lambdas: Sequence[float] | None = None
    mask_thresholds: Sequence[float] | None = None
    ties_thresholds: Sequence[float] | None = None
    ties_agg: str = "sum"
    zero_tau_clears_mask: bool = False
    tau_dtype: str = "F32"
    _mparam: np.ndarray = field(init=False, repr=False)
    _trim: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.merge not in ("task_arithmetic", "ties"):
            raise InputError(f"merge: expected 'task_arithmetic' or 'ties', got {self.merge!r}")
        if self.mask not in ("tall", "magnitude"):
            raise InputError(f"mask: expected 'tall' or 'magnitude', got {self.mask!r}")
        if self.ties_agg not in ("sum", "mean"):
            raise InputError(f"ties_agg: expected 'sum' or 'mean', got {self.ties_agg!r}")
        if self.tau_dtype not in ("F32", "BF16"):
            raise InputError(f"tau_dtype: expected 'F32' or 'BF16', got {self.tau_dtype!r}")
        if self.mask == "tall":
            if self.lambdas is None:
                raise InputError("lambdas: the tall mask needs one λ per task")
            mparam = _float32_params(self.lambdas, "lambdas", allow_inf=False)
            if (mparam < 0).any():
                raise InputError(f"lambdas: must be >= 0, got {list(self.lambdas)}")
        else:
            if self.mask_thresholds is None:
                raise InputError("mask_thresholds: the magnitude mask needs one threshold per task")
            mparam = _float32_params(self.mask_thresholds, "mask_thresholds", allow_inf=True)
        if mparam.shape[0] < 1:
            raise InputError("EncodeSpec: need at least one task")
        trim = np.zeros(0, dtype=np.float32)
        if self.merge == "ties":
            if self.ties_thresholds is None:
                raise InputError("ties_thresholds: the ties merge needs one trim threshold per task")
            trim = _float32_params(self.ties_thresholds, "ties_thresholds", allow_inf=True)
            if trim.shape[0] != mparam.shape[0]:
                raise InputError(f"ties_thresholds: expected {mparam.shape[0]} values, got {trim.shape[0]}")
        object.__setattr__(self, "_mparam", mparam)
        object.__setattr__(self, "_trim", trim)

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks (the length of the mask parameters)."""
        return int(self._mparam.shape[0])

    def _compiled(self, kind: int) -> Any:
        return _encode_kernel(kind, self.merge == "ties", self.ties_agg == "mean", self.mask == "tall",
                              bool(self.zero_tau_clears_mask), self.tau_dtype == "BF16")


class TensorInputs:
    """θ0 and the T fine-tunes of one tensor, flat, checked once per tensor.

    ``dtype`` is "F32", "F16" or "BF16"; each array is 1-D, C-contiguous, of length n, holding that
    dtype's storage (float32/float16/uint16 for BF16) or its bit pattern (uint32/uint16); read-only,
    memory-mapped and unaligned arrays are fine. Nothing is copied.

    The kernels take the fine-tunes as a uint64 table of their data addresses: one compiled kernel
    serves every T and every mix of array flags, with no copy and no per-chunk cost (building it costs
    what a numba typed list costs, ~25 µs for T = 8, once per tensor; bench_encode_kernels.py). A typed
    list needs identically typed arrays — a read-only mmap, a writable array and an unaligned view are
    three numba types, and appending a mismatched one fails in numba's array cast; a tuple compiles once
    per T (and per mix of flags); a (T, chunk) staging buffer adds a memcpy of every input (6-12% of
    the kernel's time). This object holds the arrays, so their memory outlives every call using the table.
    """

    def __init__(self, dtype: str, base: np.ndarray, thetas: Sequence[np.ndarray]) -> None:
        if dtype not in DECODE_DTYPES:
            raise InputError(f"dtype: expected one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self._kind = KINDS[dtype]
        bits = BITS[dtype]
        accepted = tuple(dict.fromkeys((np.dtype(by_name(dtype).storage), np.dtype(bits))))
        self._base = vector(base, "base", accepted).view(bits)
        self.n = int(self._base.shape[0])
        if len(thetas) < 1:
            raise InputError("thetas: need at least one fine-tune")
        self._thetas = []
        for t, a in enumerate(thetas):
            v = vector(a, f"thetas[{t}]", accepted).view(bits)
            if v.shape[0] != self.n:
                raise InputError(f"thetas[{t}]: expected length {self.n} (as base), got {v.shape[0]}")
            self._thetas.append(v)
        self._ptrs = np.array([v.__array_interface__["data"][0] for v in self._thetas], dtype=np.uint64)

    @property
    def num_tasks(self) -> int:
        """T, the number of fine-tunes."""
        return len(self._thetas)


class EncodeOutputs:
    """One tensor's results, filled chunk by chunk by encode_chunk.

    ``tau``: τ_MTL, float32[n]; ``masks``: uint8[T, ceil(n/8)], row t the packed mask of task t (each row
    a contiguous segment); ``stats``: float64[T, 5], zero at creation — today's codec adds each tensor's
    sums into TaskStats, so use one EncodeOutputs (or zeroed stats) per tensor to keep its values;
    ``problems``: uint8[T + 1] of PROBLEM_* flags (see describe_problems). ``tau``/``masks`` may be
    given (preallocated buffers of exactly those shapes); they must not overlap the inputs.
    """

    def __init__(self, n: int, num_tasks: int, *, tau: np.ndarray | None = None,
                 masks: np.ndarray | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise InputError(f"n: expected a count >= 0, got {n!r}")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
            raise InputError(f"num_tasks: expected a count >= 1, got {num_tasks!r}")
        self.n, self.num_tasks = int(n), int(num_tasks)
        nbytes = (self.n + 7) // 8
        self.tau = np.empty(self.n, dtype=np.float32) if tau is None else \
            vector(tau, "tau", (np.float32,), writeable=True)
        if self.tau.shape[0] != self.n:
            raise InputError(f"tau: expected length {self.n}, got {self.tau.shape[0]}")
        if masks is None:
            masks = np.empty((self.num_tasks, nbytes), dtype=np.uint8)
        if not isinstance(masks, np.ndarray) or masks.dtype != np.uint8 or masks.shape != (self.num_tasks, nbytes) \
                or not masks.flags.c_contiguous or not masks.flags.writeable:
            raise InputError(f"masks: expected a writable contiguous uint8 array of shape ({self.num_tasks}, {nbytes})")
        self.masks = masks
        self.stats = np.zeros((self.num_tasks, 5), dtype=np.float64)
        self.problems = np.zeros(self.num_tasks + 1, dtype=np.uint8)


def _check_range(n: int, start: int, stop: int, *, aligned: bool) -> None:
    for name, v in (("start", start), ("stop", stop)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputError(f"{name}: expected an integer, got {type(v).__name__}")
    if not 0 <= start <= stop <= n:
        raise InputError(f"chunk [{start}, {stop}) is not inside [0, {n})")
    if aligned and (start % 8 or (stop % 8 and stop != n)):
        raise InputError(f"chunk [{start}, {stop}): start, and stop unless it is the end ({n}), must be "
                         f"multiples of 8 (one mask byte holds 8 elements)")


def encode_chunk(spec: EncodeSpec, inputs: TensorInputs, out: EncodeOutputs, start: int, stop: int) -> None:
    """Encode elements [start, stop) of one tensor into ``out`` (τ_MTL, mask bits, statistics, problems).

    ``start`` and ``stop`` are multiples of 8, except ``stop`` = n. Call it on consecutive chunks in
    order: the statistics continue element by element, so after the last chunk ``out.stats`` holds
    exactly the float64 sums of ``kernels.mask_stats`` over the whole tensor, whatever the chunking.
    Thresholds come from the spec; global ones from hist_hi_chunk / hist_lo_chunk sweeps.

        >>> x = TensorInputs("F32", np.array([1, 2, 3], np.float32), [np.array([1, 2.5, 3], np.float32)])
        >>> out = EncodeOutputs(3, 1)
        >>> encode_chunk(EncodeSpec(lambdas=[0.4]), x, out, 0, 3)
        >>> out.tau.tolist(), int(out.masks[0, 0]), out.stats[0].tolist()
        ([0.0, 0.5, 0.0], 7, [0.0, 0.25, 0.25, 0.25, 3.0])
    """
    if not spec.num_tasks == inputs.num_tasks == out.num_tasks or inputs.n != out.n:
        raise InputError(f"encode_chunk: {spec.num_tasks} task parameters, {inputs.num_tasks} fine-tunes of "
                         f"{inputs.n} elements, outputs for {out.num_tasks} tasks of {out.n} elements")
    _check_range(inputs.n, start, stop, aligned=True)
    spec._compiled(inputs._kind)(inputs._base, inputs._ptrs, start, stop, spec._trim, spec._mparam, out.tau,
                                out.masks.reshape(-1), out.stats.reshape(-1), out.problems)


def _hist_array(hist: Any, num_tasks: int, width: int) -> np.ndarray:
    if not isinstance(hist, np.ndarray) or hist.dtype != np.int64 or hist.shape != (num_tasks, width) \
            or not hist.flags.c_contiguous or not hist.flags.writeable:
        raise InputError(f"hist: expected a writable contiguous int64 array of shape ({num_tasks}, {width})")
    return hist.reshape(-1)


def hist_hi_chunk(inputs: TensorInputs, start: int, stop: int, hist: np.ndarray) -> None:
    """Pass 1 of the exact top-k threshold: ``hist[t, b] +=`` the number of i in [start, stop) whose
    |τ_t[i]| has float32 bits with top 16 bits b (sign cleared: −0 counts as +0). ``hist``: int64
    (T, HI_BINS), the histogram ``TopKThreshold.update_hi`` builds from the same τ_t."""
    h = _hist_array(hist, inputs.num_tasks, HI_BINS)
    _check_range(inputs.n, start, stop, aligned=False)
    _hist_kernel(inputs._kind, False)(inputs._base, inputs._ptrs, start, stop, np.zeros(0, np.int64), h)


def hist_lo_chunk(inputs: TensorInputs, start: int, stop: int, bins: Sequence[int] | np.ndarray,
                  hist: np.ndarray) -> None:
    """Pass 2: per task t, with b = bins[t] (the bin pass 1 chose), ``hist[t]`` (int64, LO_BINS) adds the
    count of |τ_t| bit patterns below b << 16 (column 0), of each low half inside bin b (column
    1 + low 16 bits) and above the bin (column 65537): TopKThreshold.update_lo's 65538 bins."""
    h = _hist_array(hist, inputs.num_tasks, LO_BINS)
    b = np.array([int(x) for x in bins], dtype=np.int64)
    if b.shape != (inputs.num_tasks,) or ((b < 0) | (b >= HI_BINS)).any():
        raise InputError(f"bins: expected {inputs.num_tasks} bins in [0, {HI_BINS}), got {list(bins)}")
    _check_range(inputs.n, start, stop, aligned=False)
    _hist_kernel(inputs._kind, True)(inputs._base, inputs._ptrs, start, stop, b, h)


def hist_window_chunk(inputs: TensorInputs, start: int, stop: int, starts: np.ndarray, width: int,
                      hi: np.ndarray, lo: np.ndarray, differs: np.ndarray) -> None:
    """Pass 1 of a global selection in one read of elements [start, stop): ``hi`` (int64 (T, HI_BINS))
    adds what hist_hi_chunk adds; for each selection s and task t, ``lo[s, t]`` (int64 (S, T, width,
    65536)) adds, for the top-16-bit bins b in [starts[s, t], starts[s, t] + width), the low-16-bit
    histogram of the |τ_t| in bin b (row b − starts[s, t]); ``differs[t]`` (uint8 (T,)) becomes 1 when
    an element of θ_t is not θ0 bit for bit."""
    nt = inputs.num_tasks
    st = np.ascontiguousarray(starts, dtype=np.int64)
    if st.ndim != 2 or st.shape[1] != nt:
        raise InputError(f"starts: expected shape (selections, {nt}), got {st.shape}")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise InputError(f"width: expected an integer >= 1, got {width!r}")
    h = _hist_array(hi, nt, HI_BINS)
    if not isinstance(lo, np.ndarray) or lo.dtype != np.int64 or lo.shape != (st.shape[0], nt, width, HI_BINS) \
            or not lo.flags.c_contiguous or not lo.flags.writeable:
        raise InputError(f"lo: expected a writable contiguous int64 array of shape ({st.shape[0]}, {nt}, {width}, "
                         f"{HI_BINS})")
    d = vector(differs, "differs", (np.uint8,), writeable=True)
    if d.shape[0] != nt:
        raise InputError(f"differs: expected {nt} flags, got {d.shape[0]}")
    if ((st < 0) | (st + width > HI_BINS)).any():
        raise InputError(f"starts: every window [start, start + {width}) must lie in [0, {HI_BINS})")
    _check_range(inputs.n, start, stop, aligned=False)
    _window_kernel(inputs._kind)(inputs._base, inputs._ptrs, start, stop, st.reshape(-1), int(width), h,
                                 lo.reshape(-1), d)


def describe_problems(problems: np.ndarray, tensor: str, sources: Sequence[str]) -> str | None:
    """The error message for the first flagged problem of a tensor, or None when there is none.

    ``sources``: labels of θ0 and the T fine-tunes (T + 1, e.g. their file names). Inputs with NaN/Inf
    come first (they also make τ non-finite), then overflowing task vectors τ_t, then τ_MTL, then
    non-finite decodes.
    """
    if len(sources) != len(problems):
        raise InputError(f"sources: expected {len(problems)} labels (θ0 and each task), got {len(sources)}")
    for r, src in enumerate(sources):
        if problems[r] & PROBLEM_INPUT:
            return f"{src}: tensor {tensor!r} holds NaN or Inf values"
    for r in (*range(1, len(sources)), 0):  # a task's own τ_t first: it is the cause of a τ_MTL that overflows
        if problems[r] & PROBLEM_OVERFLOW:
            what = "the merged task vector τ_MTL" if r == 0 else "its task vector θ_t − θ0"
            return f"{sources[r]}: tensor {tensor!r}: {what} overflows float32"
    for r, src in enumerate(sources):
        if problems[r] & PROBLEM_DECODE:
            return f"{src}: tensor {tensor!r}: a decoded value θ0 + τ_MTL overflows the tensor's dtype"
    return None


# --- statistics alone (the torch path's encode computes τ_MTL and masks on its device) ---------------
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

