"""Bit kernels (numba): pack/unpack masks, count bits, and the fused masked decode.

Bit order: element i is bit ``i % 8`` of byte ``i // 8`` (little-endian inside each byte, the same as
``np.packbits(bitorder="little")``); the padding bits of the last byte are zero.

Every public function validates lengths, dtypes and contiguity before any kernel runs, so no kernel
reads or writes out of bounds whatever it is given; the kernels also re-check their lengths (O(1)).
Kernels release the GIL, so threads can decode different tensors in parallel. Each kernel is compiled
on first use for one fixed set of signatures (arrays typed unaligned, inputs read-only), so writable,
read-only (memory-mapped) and unaligned arrays all share one compiled version, cached on disk.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable
from typing import Any

import llvmlite.binding as llb
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic

from tallfmt.dtypes import by_name
from tallfmt.errors import FormatError, InputError, check_count

__all__ = ["pack_bits", "pack_bits_into", "unpack_bits", "padding_ok", "popcount", "decode_masked",
           "add_bits", "mask_stats", "split_planes", "merge_planes", "DECODE_DTYPES"]

#: dtypes decode_masked handles (safetensors names).
DECODE_DTYPES = ("F32", "F16", "BF16")

_U = np.uint64
_u32 = np.uint32
_PACK_MAGIC = _U(0x0102040810204080)   # byte j (0/1) of a u64 times this lands on bit 56 + j
_LOW7 = _U(0x7F7F7F7F7F7F7F7F)
_ONES = _U(0x0101010101010101)
_HIGH = _U(0x8080808080808080)
_LANE_BIT = _U(0x8040201008040201)     # byte j keeps bit j
_F32, _BF16, _F16 = 0, 1, 2            # decode kinds


def _native_half() -> bool:
    """Whether numba's target converts float16 in hardware (x86 F16C). Without it LLVM would emit
    calls to compiler-rt helpers that numba cannot link, so the integer conversion is used instead."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    feats = config.CPU_FEATURES if config.CPU_FEATURES is not None else llb.get_host_cpu_features().flatten()
    return "+f16c" in feats.split(",")


_NATIVE_HALF = _native_half()


# --- intrinsics: bit casts, unaligned 8-byte load/store, popcount ----------------------------------
@intrinsic
def _f32_bits(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def _byte_ptr(context: Any, builder: Any, arrty: Any, arr: Any, idx: Any) -> Any:
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [idx]), ir.IntType(64).as_pointer())


@intrinsic
def _load_u64(typingctx: Any, arr: Any, idx: Any) -> Any:
    """Bytes arr[idx:idx+8] as a little-endian u64 (one unaligned load; caller checks bounds)."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.load(_byte_ptr(context, builder, sig.args[0], args[0], args[1]), align=1)
    return types.uint64(arr, types.uint64), codegen


@intrinsic
def _store_u64(typingctx: Any, arr: Any, idx: Any, val: Any) -> Any:
    """Write val to bytes arr[idx:idx+8], little-endian (caller checks bounds)."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        builder.store(args[2], _byte_ptr(context, builder, sig.args[0], args[0], args[1]), align=1)
        return context.get_dummy_value()
    return types.void(arr, types.uint64, types.uint64), codegen


@intrinsic
def _ctpop(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


# --- float16 / bfloat16 <-> float32, branch-free on the bit patterns -------------------------------
@njit(inline="always")
def _f16_to_f32_soft(h: Any) -> Any:
    """Exact float16 -> float32 from the bits (F. Giesen's half_to_float, with selects for branches)."""
    h = _u32(h)
    o = (h & _u32(0x7FFF)) << _u32(13)
    e = o & _u32(0x0F800000)
    o = o + _u32(0x38000000)                      # rebias exponent 15 -> 127
    special = o + _u32(0x38000000)                # inf/NaN: exponent all ones
    sub = _f32_bits(_bits_f32(o + _u32(0x00800000)) - _bits_f32(_u32(0x38800000)))  # renormalise
    m_special = _u32(0) - _u32(e == _u32(0x0F800000))
    m_sub = _u32(0) - _u32(e == _u32(0))
    o = (special & m_special) | (sub & m_sub) | (o & ~(m_special | m_sub))
    return _bits_f32(o | ((h & _u32(0x8000)) << _u32(16)))


@njit(inline="always")
def _f32_to_f16_soft(x: Any) -> Any:
    """float32 -> float16 bits, round to nearest even; overflow -> inf; NaN -> quiet NaN keeping sign
    and the top payload bits (what x86 F16C does). Giesen's float_to_half_fast3_rtne, branch-free."""
    u = _f32_bits(x)
    sign = u & _u32(0x80000000)
    a = u ^ sign
    is_nan = _u32(0) - _u32(a > _u32(0x7F800000))
    big = ((_u32(0x7E00) | ((a >> _u32(13)) & _u32(0x3FF))) & is_nan) | (_u32(0x7C00) & ~is_nan)
    # |x| < 2^-14: adding 0.5 puts the f16 subnormal ulp at the float32 ulp, so the FPU rounds for us.
    sub = _f32_bits(_bits_f32(a) + _bits_f32(_u32(0x3F000000))) - _u32(0x3F000000)
    nrm = (a + _u32(0xC8000FFF) + ((a >> _u32(13)) & _u32(1))) >> _u32(13)
    m_big = _u32(0) - _u32(a >= _u32(0x47800000))
    m_sub = _u32(0) - _u32(a < _u32(0x38800000))
    r = (big & m_big) | (sub & m_sub) | (nrm & ~(m_big | m_sub))
    return np.uint16(r | (sign >> _u32(16)))


@intrinsic
def _f16_to_f32(typingctx: Any, h: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        if _NATIVE_HALF:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return context.compile_internal(builder, _f16_to_f32_soft.py_func, sig, args)
    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        if _NATIVE_HALF:
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return context.compile_internal(builder, _f32_to_f16_soft.py_func, sig, args)
    return types.uint16(types.float32), codegen


@njit(inline="always")
def _f32_to_bf16(x: Any) -> Any:
    """float32 -> bfloat16 bits, round to nearest even (as torch); NaN -> quiet NaN keeping sign and
    the top payload bits (torch's CPU kernels return 0xFFFF or 0x7FC0 depending on the code path)."""
    u = _f32_bits(x)
    r = (u + _u32(0x7FFF) + ((u >> _u32(16)) & _u32(1))) >> _u32(16)
    q = (u >> _u32(16)) | _u32(0x40)
    is_nan = _u32(0) - _u32((u & _u32(0x7FFFFFFF)) > _u32(0x7F800000))
    return np.uint16((q & is_nan) | (r & ~is_nan))


@njit(inline="always")
def _decode_elem(b: Any, t: Any, bit: Any, kind: int) -> Any:
    """bit & 1 ? round(float32(b) + t) : b, on storage bits; a bit select, never a branch per element."""
    b = _u32(b)
    if kind == _F32:
        r = _f32_bits(_bits_f32(b) + t)
    elif kind == _BF16:
        r = _u32(_f32_to_bf16(_bits_f32(b << _u32(16)) + t))
    else:
        r = _u32(_f32_to_f16(_f16_to_f32(np.uint16(b)) + t))
    m = _u32(0) - _u32(bit & _U(1))
    return (r & m) | (b & ~m)


# --- kernels -------------------------------------------------------------------------------------
def _arr(dtype: Any, readonly: bool) -> Any:
    return types.Array(dtype, 1, "C", readonly=readonly, aligned=False)


_RO_U8 = _arr(types.uint8, True)
_RW_U8 = _arr(types.uint8, False)
_compile_lock = threading.Lock()


def _kernel(*sigs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """njit(nogil, cache) for exactly `sigs`, compiled (or loaded from the cache) on first call."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled: list[Any] = []

        def call(*args: Any) -> Any:
            if not compiled:
                with _compile_lock:
                    if not compiled:
                        compiled.append(njit(list(sigs), nogil=True, cache=True)(fn))
            return compiled[0](*args)
        call.__doc__ = fn.__doc__
        call.py_func = fn  # type: ignore[attr-defined]
        return call
    return wrap


@_kernel(types.void(_RO_U8, _RW_U8, types.boolean))
def _pack_kernel(src: np.ndarray, out: np.ndarray, normalize: bool) -> None:
    """out = packbits(src != 0); with normalize=False src must hold only 0/1 (bool arrays)."""
    n = _U(src.shape[0])
    nfull = n // _U(8)
    if _U(out.shape[0]) != (n + _U(7)) // _U(8):
        raise ValueError("pack kernel: output length")
    for k in range(nfull):
        k = _U(k)
        x = _load_u64(src, _U(8) * k)
        if normalize:  # loop-invariant: LLVM unswitches it, the bool path pays nothing
            x = ((((x & _LOW7) + _LOW7) | x) >> _U(7)) & _ONES
        out[k] = np.uint8((x * _PACK_MAGIC) >> _U(56))
    if n > _U(8) * nfull:
        byte = _U(0)
        for i in range(_U(8) * nfull, n):
            i = _U(i)
            byte |= _U(src[i] != 0) << (i & _U(7))
        out[nfull] = np.uint8(byte)


@_kernel(types.void(_RO_U8, _RW_U8))
def _unpack_kernel(packed: np.ndarray, out: np.ndarray) -> None:
    """out[i] = bit i of packed (as 0/1 bytes)."""
    n = _U(out.shape[0])
    nfull = n // _U(8)
    if _U(packed.shape[0]) != (n + _U(7)) // _U(8):
        raise ValueError("unpack kernel: input length")
    for k in range(nfull):
        k = _U(k)
        x = (_U(packed[k]) * _ONES) & _LANE_BIT
        _store_u64(out, _U(8) * k, ((x + _LOW7) & _HIGH) >> _U(7))
    for i in range(_U(8) * nfull, n):
        i = _U(i)
        out[i] = np.uint8((packed[nfull] >> (i & _U(7))) & _U(1))


@_kernel(types.int64(_RO_U8, types.int64))
def _popcount_kernel(packed: np.ndarray, n: int) -> int:
    """Set bits among the first n bits of packed."""
    n = _U(n)
    nbytes = n // _U(8)
    if _U(packed.shape[0]) != (n + _U(7)) // _U(8):
        raise ValueError("popcount kernel: input length")
    total = _U(0)
    nwords = nbytes // _U(8)
    for w in range(nwords):
        total += _ctpop(_load_u64(packed, _U(8) * _U(w)))
    for k in range(_U(8) * nwords, nbytes):
        total += _ctpop(_U(packed[_U(k)]))
    if n > _U(8) * nbytes:
        total += _ctpop(_U(packed[nbytes]) & ((_U(1) << (n & _U(7))) - _U(1)))
    return np.int64(total)


@_kernel(*[types.void(_arr(c, False), _RO_U8) for c in (types.uint8, types.uint16, types.uint32)])
def _add_bits_kernel(counts: np.ndarray, packed: np.ndarray) -> None:
    """counts[i] += bit i of packed (wrapping at the counter width)."""
    n = _U(counts.shape[0])
    if _U(packed.shape[0]) != (n + _U(7)) // _U(8):
        raise ValueError("add_bits kernel: input length")
    nwords = n // _U(64)
    for w in range(nwords):
        w = _U(w)
        word = _load_u64(packed, _U(8) * w)
        s = _U(64) * w
        for j in range(64):
            counts[s + _U(j)] += (word >> _U(j)) & _U(1)
    for i in range(_U(64) * nwords, n):
        i = _U(i)
        counts[i] += (_U(packed[i >> _U(3)]) >> (i & _U(7))) & _U(1)


@_kernel(*[types.void(_arr(s, True), _arr(types.float32, True), _RO_U8, _arr(s, False), types.int64)
           for s in (types.uint32, types.uint16)])
def _decode_kernel(base: np.ndarray, tau: np.ndarray, packed: np.ndarray, out: np.ndarray, kind: int) -> None:
    """out[i] = bit i ? round(float32(base[i]) + tau[i]) : base[i], on storage bit patterns."""
    n = _U(base.shape[0])
    if _U(tau.shape[0]) != n or _U(out.shape[0]) != n or _U(packed.shape[0]) != (n + _U(7)) // _U(8):
        raise ValueError("decode kernel: lengths")
    nwords = n // _U(64)
    for w in range(nwords):  # 64 elements per mask word: a fixed-length inner loop LLVM vectorises
        w = _U(w)
        word = _load_u64(packed, _U(8) * w)
        s = _U(64) * w
        for j in range(64):
            i = s + _U(j)
            out[i] = _decode_elem(base[i], tau[i], word >> _U(j), kind)
    for i in range(_U(64) * nwords, n):
        i = _U(i)
        out[i] = _decode_elem(base[i], tau[i], _U(packed[i >> _U(3)]) >> (i & _U(7)), kind)


# --- validation ----------------------------------------------------------------------------------
def _vector(a: Any, name: str, dtypes: tuple[Any, ...], *, writeable: bool = False) -> np.ndarray:
    """`a` if it is a 1-D C-contiguous ndarray of one of `dtypes` (writable if asked), else InputError."""
    if not isinstance(a, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.ndim != 1:
        raise InputError(f"{name}: expected a 1-D array, got shape {a.shape}")
    if not any(a.dtype == np.dtype(d) for d in dtypes):
        want = " or ".join(str(np.dtype(d)) for d in dtypes)
        raise InputError(f"{name}: expected dtype {want}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise InputError(f"{name}: expected a contiguous array, got strides {a.strides}")
    if writeable and not a.flags.writeable:
        raise InputError(f"{name}: array is read-only")
    return a


def _packed_len(packed: Any, n: int) -> np.ndarray:
    """`packed` as uint8, FormatError unless it holds exactly ceil(n/8) bytes."""
    p = _vector(packed, "packed mask", (np.uint8,))
    if p.shape[0] != (n + 7) // 8:
        raise FormatError(f"packed mask: expected {(n + 7) // 8} bytes for {n} bits, got {p.shape[0]}")
    return p


def _padding_bits(p: np.ndarray, n: int) -> int:
    return int(p[-1]) >> (n % 8) if n % 8 else 0


def _check_padding(p: np.ndarray, n: int) -> None:
    if _padding_bits(p, n):
        raise FormatError(f"packed mask: padding bits past bit {n} of the last byte are not zero "
                          f"(last byte 0x{int(p[-1]):02x})")


def _no_overlap(out: np.ndarray, name: str, *others: tuple[str, np.ndarray], same_ok: str = "") -> None:
    for oname, o in others:
        if not np.may_share_memory(out, o):
            continue
        if oname == same_ok and out.__array_interface__["data"][0] == o.__array_interface__["data"][0] \
                and out.dtype == o.dtype and out.shape == o.shape:
            continue  # exactly the same elements: an element-wise kernel may work in place
        raise InputError(f"{name} overlaps {oname}")


def _bits_u8(bits: Any) -> tuple[np.ndarray, bool]:
    """The bytes of a bool/uint8 bit array and whether they need normalising to 0/1."""
    b = _vector(bits, "bits", (np.bool_, np.uint8))
    return b.view(np.uint8), b.dtype == np.uint8


# --- public API ----------------------------------------------------------------------------------
def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a 1-D bool or uint8 array (any nonzero byte is 1) of length n into ceil(n/8) bytes,
    little-endian bit order, padding bits zero. Equals ``np.packbits(bits != 0, bitorder="little")``.

    bool arrays are taken to hold 0/1 bytes, as numpy makes them; a bool view of arbitrary bytes
    should be passed as its uint8 view, which is normalised (15-19% slower in bench/RESULTS.md).
    """
    src, norm = _bits_u8(bits)
    out = np.empty((src.shape[0] + 7) // 8, dtype=np.uint8)
    _pack_kernel(src, out, norm)
    return out


def pack_bits_into(bits: np.ndarray, out: np.ndarray) -> None:
    """Like pack_bits, into a preallocated uint8 array of exactly ceil(len(bits)/8) bytes.

    Chunks whose lengths are multiples of 8 can be packed into consecutive slices of one buffer.
    """
    src, norm = _bits_u8(bits)
    dst = _vector(out, "out", (np.uint8,), writeable=True)
    if dst.shape[0] != (src.shape[0] + 7) // 8:
        raise InputError(f"out: expected {(src.shape[0] + 7) // 8} bytes for {src.shape[0]} bits, "
                         f"got {dst.shape[0]}")
    _no_overlap(dst, "out", ("bits", src))
    _pack_kernel(src, dst, norm)


def unpack_bits(packed: np.ndarray, n: int, *, check_padding: bool = True) -> np.ndarray:
    """The first n bits of `packed` (exactly ceil(n/8) bytes) as a bool array.

    FormatError if the length is wrong, or (when check_padding) if a padding bit is set.
    """
    n = check_count(n, "n")
    p = _packed_len(packed, n)
    if check_padding:
        _check_padding(p, n)
    out = np.empty(n, dtype=np.bool_)
    _unpack_kernel(p, out.view(np.uint8))
    return out


def padding_ok(packed: np.ndarray, n: int) -> bool:
    """True when the bits past n in the last byte are zero (FormatError if len != ceil(n/8))."""
    n = check_count(n, "n")
    return _padding_bits(_packed_len(packed, n), n) == 0


def popcount(packed: np.ndarray, n: int, *, check_padding: bool = False) -> int:
    """Number of set bits among the first n bits of `packed` (padding bits are not counted)."""
    n = check_count(n, "n")
    p = _packed_len(packed, n)
    if check_padding:
        _check_padding(p, n)
    return int(_popcount_kernel(p, n))


def add_bits(counts: np.ndarray, packed: np.ndarray, n: int, *, check_padding: bool = True) -> None:
    """counts[i] += bit i of `packed`, for i < n; counts is uint8/uint16/uint32 of length n.

    Counting T task masks this way gives how many tasks keep each parameter. Counters wrap at their
    width, so choose one wider than the number of masks added (uint8 holds up to 255).
    """
    n = check_count(n, "n")
    c = _vector(counts, "counts", (np.uint8, np.uint16, np.uint32), writeable=True)
    if c.shape[0] != n:
        raise InputError(f"counts: expected length {n}, got {c.shape[0]}")
    p = _packed_len(packed, n)
    if check_padding:
        _check_padding(p, n)
    _no_overlap(c, "counts", ("packed mask", p))
    _add_bits_kernel(c, p)


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
        b0 = _vector(base, "base", (np.float32, np.float16, np.uint16))
        if b0.dtype == np.uint16:
            raise InputError("base: uint16 holds bfloat16 bit patterns only when dtype='BF16' is given")
        dtype = "F32" if b0.dtype == np.float32 else "F16"
    if dtype not in DECODE_DTYPES:
        raise InputError(f"dtype: expected one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")
    storage = by_name(dtype).storage
    b = _vector(base, "base", (storage,))
    n = b.shape[0]
    t = _vector(tau, "tau", (np.float32,))
    if t.shape[0] != n:
        raise InputError(f"tau: expected length {n} (as base), got {t.shape[0]}")
    p = _packed_len(packed, n)
    if check_padding:
        _check_padding(p, n)
    if out is None:
        o = np.empty(n, dtype=storage)
    else:
        o = _vector(out, "out", (storage,), writeable=True)
        if o.shape[0] != n:
            raise InputError(f"out: expected length {n} (as base), got {o.shape[0]}")
        _no_overlap(o, "out", ("base", b), ("tau", t), ("packed mask", p), same_ok="base")
    bits = np.uint32 if dtype == "F32" else np.uint16
    kind = {"F32": _F32, "BF16": _BF16, "F16": _F16}[dtype]
    _decode_kernel(b.view(bits), t, p, o.view(bits), kind)
    return o


# --- encode-time statistics ----------------------------------------------------------------------
@njit(inline="always")
def _to_f32(b: Any, kind: int) -> Any:
    b = _u32(b)
    if kind == _F32:
        return _bits_f32(b)
    if kind == _BF16:
        return _bits_f32(b << _u32(16))
    return _f16_to_f32(np.uint16(b))


@_kernel(*[types.void(_arr(s, True), _arr(s, True), _arr(types.float32, True), _RO_U8,
                      _arr(types.float64, False), types.int64) for s in (types.uint32, types.uint16)])
def _mask_stats_kernel(base: np.ndarray, theta: np.ndarray, tau: np.ndarray, packed: np.ndarray,
                       sums: np.ndarray, kind: int) -> None:
    """sums += [Σ(θ̂−θ)², Σ τ_t², Σ (m∘τ_MTL)·τ_t, Σ (m∘τ_MTL)², Σ m] with θ̂ the decoded value."""
    n = _U(base.shape[0])
    if _U(theta.shape[0]) != n or _U(tau.shape[0]) != n or _U(packed.shape[0]) != (n + _U(7)) // _U(8) \
            or sums.shape[0] != 5:
        raise ValueError("mask stats kernel: lengths")
    err2 = tau2 = dot = masked2 = kept = 0.0
    for i in range(n):  # sequential float64 sums: the same result on every CPU
        i = _U(i)
        bit = (_U(packed[i >> _U(3)]) >> (i & _U(7))) & _U(1)
        b = _to_f32(base[i], kind)
        th = _to_f32(theta[i], kind)
        hat = _to_f32(_decode_elem(base[i], tau[i], bit, kind), kind)
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
    b = _vector(base, "base", (storage,))
    th = _vector(theta, "theta", (storage,))
    t = _vector(tau, "tau", (np.float32,))
    n = b.shape[0]
    if th.shape[0] != n or t.shape[0] != n:
        raise InputError(f"theta/tau: expected length {n} (as base), got {th.shape[0]}/{t.shape[0]}")
    p = _packed_len(packed, n)
    s = _vector(sums, "sums", (np.float64,), writeable=True)
    if s.shape[0] != 5:
        raise InputError(f"sums: expected 5 float64, got {s.shape[0]}")
    bits = np.uint32 if dtype == "F32" else np.uint16
    kind = {"F32": _F32, "BF16": _BF16, "F16": _F16}[dtype]
    _mask_stats_kernel(b.view(bits), th.view(bits), t, p, s, kind)


# --- byte planes (the byteplane-zstd codec) ------------------------------------------------------
@_kernel(types.void(_RO_U8, _RW_U8, types.int64, types.boolean))
def _planes_kernel(src: np.ndarray, out: np.ndarray, size: int, split: bool) -> None:
    """split: out[j*m + i] = src[i*size + j]; else the inverse (m = len/size elements)."""
    total = src.shape[0]
    if out.shape[0] != total or size < 1 or total % size:
        raise ValueError("planes kernel: lengths")
    m = total // size
    if size == 4 and split:  # whole-word loads and byte stores: LLVM vectorises these loops
        for i in range(m):
            v = _u32(src[4 * i]) | (_u32(src[4 * i + 1]) << _u32(8)) | (_u32(src[4 * i + 2]) << _u32(16)) \
                | (_u32(src[4 * i + 3]) << _u32(24))
            out[i] = np.uint8(v)
            out[m + i] = np.uint8(v >> _u32(8))
            out[2 * m + i] = np.uint8(v >> _u32(16))
            out[3 * m + i] = np.uint8(v >> _u32(24))
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


def split_planes(data: np.ndarray, itemsize: int) -> np.ndarray:
    """uint8 bytes of m elements of ``itemsize`` bytes → itemsize×m planes (plane j = byte j of each)."""
    d = _vector(data, "data", (np.uint8,))
    if itemsize < 1 or d.shape[0] % itemsize:
        raise InputError(f"split_planes: {d.shape[0]} bytes is not a whole number of {itemsize}-byte items")
    out = np.empty(d.shape[0], dtype=np.uint8)
    _planes_kernel(d, out, itemsize, True)
    return out.reshape(itemsize, -1)


def merge_planes(planes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of split_planes: an itemsize×m uint8 array → the m elements' bytes (into ``out``)."""
    if not isinstance(planes, np.ndarray) or planes.ndim != 2 or planes.dtype != np.uint8 \
            or not planes.flags.c_contiguous:
        raise InputError("merge_planes: expected a contiguous 2-D uint8 array of planes")
    flat = planes.reshape(-1)
    o = np.empty(flat.shape[0], dtype=np.uint8) if out is None else _vector(out, "out", (np.uint8,), writeable=True)
    if o.shape[0] != flat.shape[0]:
        raise InputError(f"merge_planes: out holds {o.shape[0]} bytes, planes {flat.shape[0]}")
    _planes_kernel(flat, o, planes.shape[0], False)
    return o
