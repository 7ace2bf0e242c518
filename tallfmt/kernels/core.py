"""What every numba kernel shares: LLVM intrinsics (bit casts, unaligned 8-byte loads and stores,
popcount), exact float16/bfloat16 ↔ float32 conversions on bit patterns, the one-element masked decode,
the lazy ``kernel`` decorator, and the argument checks every public kernel function runs first.

Every public kernel function validates lengths, dtypes and contiguity before any kernel runs, so no
kernel reads or writes out of bounds whatever it is given; the kernels also re-check their lengths
(O(1)). Kernels release the GIL, so threads can work on different tensors in parallel. Each kernel is
compiled on first use for one fixed set of signatures (arrays typed unaligned, inputs read-only), so
writable, read-only (memory-mapped) and unaligned arrays all share one compiled version, cached on disk.
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

from tallfmt.errors import FormatError, InputError

#: dtypes the masked kernels handle (safetensors names), and their kind numbers inside kernels.
DECODE_DTYPES = ("F32", "F16", "BF16")
U64 = np.uint64
U32 = np.uint32
KIND_F32, KIND_BF16, KIND_F16 = 0, 1, 2
KINDS = {"F32": KIND_F32, "BF16": KIND_BF16, "F16": KIND_F16}
#: numpy dtype of the bit patterns a masked kernel sees for each dtype.
BITS = {"F32": np.uint32, "BF16": np.uint16, "F16": np.uint16}



def _native_half() -> bool:
    """Whether numba's target converts float16 in hardware (x86 F16C). Without it LLVM would emit
    calls to compiler-rt helpers that numba cannot link, so the integer conversion is used instead."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    feats = config.CPU_FEATURES if config.CPU_FEATURES is not None else llb.get_host_cpu_features().flatten()
    return "+f16c" in feats.split(",")


NATIVE_HALF = _native_half()


# --- intrinsics: bit casts, unaligned 8-byte load/store, popcount ----------------------------------
@intrinsic
def f32_bits(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def _byte_ptr(context: Any, builder: Any, arrty: Any, arr: Any, idx: Any) -> Any:
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [idx]), ir.IntType(64).as_pointer())


@intrinsic
def load_u64(typingctx: Any, arr: Any, idx: Any) -> Any:
    """Bytes arr[idx:idx+8] as a little-endian u64 (one unaligned load; caller checks bounds)."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.load(_byte_ptr(context, builder, sig.args[0], args[0], args[1]), align=1)
    return types.uint64(arr, types.uint64), codegen


@intrinsic
def store_u64(typingctx: Any, arr: Any, idx: Any, val: Any) -> Any:
    """Write val to bytes arr[idx:idx+8], little-endian (caller checks bounds)."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        builder.store(args[2], _byte_ptr(context, builder, sig.args[0], args[0], args[1]), align=1)
        return context.get_dummy_value()
    return types.void(arr, types.uint64, types.uint64), codegen


@intrinsic
def ctpop(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


# --- float16 / bfloat16 <-> float32, branch-free on the bit patterns -------------------------------
@njit(inline="always")
def _f16_to_f32_soft(h: Any) -> Any:
    """Exact float16 -> float32 from the bits (F. Giesen's half_to_float, with selects for branches)."""
    h = U32(h)
    o = (h & U32(0x7FFF)) << U32(13)
    e = o & U32(0x0F800000)
    o = o + U32(0x38000000)                      # rebias exponent 15 -> 127
    special = o + U32(0x38000000)                # inf/NaN: exponent all ones
    sub = f32_bits(bits_f32(o + U32(0x00800000)) - bits_f32(U32(0x38800000)))  # renormalise
    m_special = U32(0) - U32(e == U32(0x0F800000))
    m_sub = U32(0) - U32(e == U32(0))
    o = (special & m_special) | (sub & m_sub) | (o & ~(m_special | m_sub))
    return bits_f32(o | ((h & U32(0x8000)) << U32(16)))


@njit(inline="always")
def _f32_to_f16_soft(x: Any) -> Any:
    """float32 -> float16 bits, round to nearest even; overflow -> inf; NaN -> quiet NaN keeping sign
    and the top payload bits (what x86 F16C does). Giesen's float_to_half_fast3_rtne, branch-free."""
    u = f32_bits(x)
    sign = u & U32(0x80000000)
    a = u ^ sign
    is_nan = U32(0) - U32(a > U32(0x7F800000))
    big = ((U32(0x7E00) | ((a >> U32(13)) & U32(0x3FF))) & is_nan) | (U32(0x7C00) & ~is_nan)
    # |x| < 2^-14: adding 0.5 puts the f16 subnormal ulp at the float32 ulp, so the FPU rounds for us.
    sub = f32_bits(bits_f32(a) + bits_f32(U32(0x3F000000))) - U32(0x3F000000)
    nrm = (a + U32(0xC8000FFF) + ((a >> U32(13)) & U32(1))) >> U32(13)
    m_big = U32(0) - U32(a >= U32(0x47800000))
    m_sub = U32(0) - U32(a < U32(0x38800000))
    r = (big & m_big) | (sub & m_sub) | (nrm & ~(m_big | m_sub))
    return np.uint16(r | (sign >> U32(16)))


@intrinsic
def f16_to_f32(typingctx: Any, h: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        if NATIVE_HALF:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return context.compile_internal(builder, _f16_to_f32_soft.py_func, sig, args)
    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_f16(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        if NATIVE_HALF:
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return context.compile_internal(builder, _f32_to_f16_soft.py_func, sig, args)
    return types.uint16(types.float32), codegen


@njit(inline="always")
def f32_to_bf16(x: Any) -> Any:
    """float32 -> bfloat16 bits, round to nearest even (as torch); NaN -> quiet NaN keeping sign and
    the top payload bits (torch's CPU kernels return 0xFFFF or 0x7FC0 depending on the code path)."""
    u = f32_bits(x)
    r = (u + U32(0x7FFF) + ((u >> U32(16)) & U32(1))) >> U32(16)
    q = (u >> U32(16)) | U32(0x40)
    is_nan = U32(0) - U32((u & U32(0x7FFFFFFF)) > U32(0x7F800000))
    return np.uint16((q & is_nan) | (r & ~is_nan))


@njit(inline="always")
def decode_elem(b: Any, t: Any, bit: Any, kind: int) -> Any:
    """bit & 1 ? round(float32(b) + t) : b, on storage bits; a bit select, never a branch per element."""
    b = U32(b)
    if kind == KIND_F32:
        r = f32_bits(bits_f32(b) + t)
    elif kind == KIND_BF16:
        r = U32(f32_to_bf16(bits_f32(b << U32(16)) + t))
    else:
        r = U32(f32_to_f16(f16_to_f32(np.uint16(b)) + t))
    m = U32(0) - U32(bit & U64(1))
    return (r & m) | (b & ~m)



# --- the lazy kernel decorator --------------------------------------------------------------------
def array_type(dtype: Any, readonly: bool) -> Any:
    return types.Array(dtype, 1, "C", readonly=readonly, aligned=False)


RO_U8 = array_type(types.uint8, True)
RW_U8 = array_type(types.uint8, False)
_compile_lock = threading.Lock()


def kernel(*sigs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
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


@njit(inline="always")
def to_f32(b: Any, kind: int) -> Any:
    b = U32(b)
    if kind == KIND_F32:
        return bits_f32(b)
    if kind == KIND_BF16:
        return bits_f32(b << U32(16))
    return f16_to_f32(np.uint16(b))


# --- validation ----------------------------------------------------------------------------------
def vector(a: Any, name: str, dtypes: tuple[Any, ...], *, writeable: bool = False) -> np.ndarray:
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


def packed_len(packed: Any, n: int) -> np.ndarray:
    """`packed` as uint8, FormatError unless it holds exactly ceil(n/8) bytes."""
    p = vector(packed, "packed mask", (np.uint8,))
    if p.shape[0] != (n + 7) // 8:
        raise FormatError(f"packed mask: expected {(n + 7) // 8} bytes for {n} bits, got {p.shape[0]}")
    return p


def padding_bits(p: np.ndarray, n: int) -> int:
    return int(p[-1]) >> (n % 8) if n % 8 else 0


def check_padding_bits(p: np.ndarray, n: int) -> None:
    if padding_bits(p, n):
        raise FormatError(f"packed mask: padding bits past bit {n} of the last byte are not zero "
                          f"(last byte 0x{int(p[-1]):02x})")


def no_overlap(out: np.ndarray, name: str, *others: tuple[str, np.ndarray], same_ok: str = "") -> None:
    for oname, o in others:
        if not np.may_share_memory(out, o):
            continue
        if oname == same_ok and out.__array_interface__["data"][0] == o.__array_interface__["data"][0] \
                and out.dtype == o.dtype and out.shape == o.shape:
            continue  # exactly the same elements: an element-wise kernel may work in place
        raise InputError(f"{name} overlaps {oname}")


def bits_u8(bits: Any) -> tuple[np.ndarray, bool]:
    """The bytes of a bool/uint8 bit array and whether they need normalising to 0/1."""
    b = vector(bits, "bits", (np.bool_, np.uint8))
    return b.view(np.uint8), b.dtype == np.uint8


