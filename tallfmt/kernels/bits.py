"""Bit kernels (numba): pack and unpack masks, count bits, add bits into per-parameter counters.

Bit order: element i is bit ``i % 8`` of byte ``i // 8`` (little-endian inside each byte, the same as
``np.packbits(bitorder="little")``); the padding bits of the last byte are zero (FORMAT.md §3).
"""

from __future__ import annotations

import numpy as np
from numba import types

from tallfmt.errors import InputError, check_count
from tallfmt.kernels.core import (RO_U8, RW_U8, U64, array_type, bits_u8, check_padding_bits, ctpop, kernel,
                                  load_u64, no_overlap, packed_len, padding_bits, store_u64, vector)

_PACK_MAGIC = U64(0x0102040810204080)   # byte j (0/1) of a u64 times this lands on bit 56 + j
_LOW7 = U64(0x7F7F7F7F7F7F7F7F)
_ONES = U64(0x0101010101010101)
_HIGH = U64(0x8080808080808080)
_LANE_BIT = U64(0x8040201008040201)     # byte j keeps bit j


@kernel(types.void(RO_U8, RW_U8, types.boolean))
def _pack_kernel(src: np.ndarray, out: np.ndarray, normalize: bool) -> None:
    """out = packbits(src != 0); with normalize=False src must hold only 0/1 (bool arrays)."""
    n = U64(src.shape[0])
    nfull = n // U64(8)
    if U64(out.shape[0]) != (n + U64(7)) // U64(8):
        raise ValueError("pack kernel: output length")
    for k in range(nfull):
        k = U64(k)
        x = load_u64(src, U64(8) * k)
        if normalize:  # loop-invariant: LLVM unswitches it, the bool path pays nothing
            x = ((((x & _LOW7) + _LOW7) | x) >> U64(7)) & _ONES
        out[k] = np.uint8((x * _PACK_MAGIC) >> U64(56))
    if n > U64(8) * nfull:
        byte = U64(0)
        for i in range(U64(8) * nfull, n):
            i = U64(i)
            byte |= U64(src[i] != 0) << (i & U64(7))
        out[nfull] = np.uint8(byte)


@kernel(types.void(RO_U8, RW_U8))
def _unpack_kernel(packed: np.ndarray, out: np.ndarray) -> None:
    """out[i] = bit i of packed (as 0/1 bytes)."""
    n = U64(out.shape[0])
    nfull = n // U64(8)
    if U64(packed.shape[0]) != (n + U64(7)) // U64(8):
        raise ValueError("unpack kernel: input length")
    for k in range(nfull):
        k = U64(k)
        x = (U64(packed[k]) * _ONES) & _LANE_BIT
        store_u64(out, U64(8) * k, ((x + _LOW7) & _HIGH) >> U64(7))
    for i in range(U64(8) * nfull, n):
        i = U64(i)
        out[i] = np.uint8((packed[nfull] >> (i & U64(7))) & U64(1))


@kernel(types.int64(RO_U8, types.int64))
def _popcount_kernel(packed: np.ndarray, n: int) -> int:
    """Set bits among the first n bits of packed."""
    n = U64(n)
    nbytes = n // U64(8)
    if U64(packed.shape[0]) != (n + U64(7)) // U64(8):
        raise ValueError("popcount kernel: input length")
    total = U64(0)
    nwords = nbytes // U64(8)
    for w in range(nwords):
        total += ctpop(load_u64(packed, U64(8) * U64(w)))
    for k in range(U64(8) * nwords, nbytes):
        total += ctpop(U64(packed[U64(k)]))
    if n > U64(8) * nbytes:
        total += ctpop(U64(packed[nbytes]) & ((U64(1) << (n & U64(7))) - U64(1)))
    return np.int64(total)


@kernel(*[types.void(array_type(c, False), RO_U8) for c in (types.uint8, types.uint16, types.uint32)])
def _add_bits_kernel(counts: np.ndarray, packed: np.ndarray) -> None:
    """counts[i] += bit i of packed (wrapping at the counter width)."""
    n = U64(counts.shape[0])
    if U64(packed.shape[0]) != (n + U64(7)) // U64(8):
        raise ValueError("add_bits kernel: input length")
    nwords = n // U64(64)
    for w in range(nwords):
        w = U64(w)
        word = load_u64(packed, U64(8) * w)
        s = U64(64) * w
        for j in range(64):
            counts[s + U64(j)] += (word >> U64(j)) & U64(1)
    for i in range(U64(64) * nwords, n):
        i = U64(i)
        counts[i] += (U64(packed[i >> U64(3)]) >> (i & U64(7))) & U64(1)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a 1-D bool or uint8 array (any nonzero byte is 1) of length n into ceil(n/8) bytes,
    little-endian bit order, padding bits zero. Equals ``np.packbits(bits != 0, bitorder="little")``.

    bool arrays are taken to hold 0/1 bytes, as numpy makes them; a bool view of arbitrary bytes
    should be passed as its uint8 view, which is normalised (15-19% slower in bench/RESULTS.md).
    """
    src, norm = bits_u8(bits)
    out = np.empty((src.shape[0] + 7) // 8, dtype=np.uint8)
    _pack_kernel(src, out, norm)
    return out


def pack_bits_into(bits: np.ndarray, out: np.ndarray) -> None:
    """Like pack_bits, into a preallocated uint8 array of exactly ceil(len(bits)/8) bytes.

    Chunks whose lengths are multiples of 8 can be packed into consecutive slices of one buffer.
    """
    src, norm = bits_u8(bits)
    dst = vector(out, "out", (np.uint8,), writeable=True)
    if dst.shape[0] != (src.shape[0] + 7) // 8:
        raise InputError(f"out: expected {(src.shape[0] + 7) // 8} bytes for {src.shape[0]} bits, "
                         f"got {dst.shape[0]}")
    no_overlap(dst, "out", ("bits", src))
    _pack_kernel(src, dst, norm)


def unpack_bits(packed: np.ndarray, n: int, *, check_padding: bool = True) -> np.ndarray:
    """The first n bits of `packed` (exactly ceil(n/8) bytes) as a bool array.

    FormatError if the length is wrong, or (when check_padding) if a padding bit is set.
    """
    n = check_count(n, "n")
    p = packed_len(packed, n)
    if check_padding:
        check_padding_bits(p, n)
    out = np.empty(n, dtype=np.bool_)
    _unpack_kernel(p, out.view(np.uint8))
    return out


def padding_ok(packed: np.ndarray, n: int) -> bool:
    """True when the bits past n in the last byte are zero (FormatError if len != ceil(n/8))."""
    n = check_count(n, "n")
    return padding_bits(packed_len(packed, n), n) == 0


def popcount(packed: np.ndarray, n: int, *, check_padding: bool = False) -> int:
    """Number of set bits among the first n bits of `packed` (padding bits are not counted)."""
    n = check_count(n, "n")
    p = packed_len(packed, n)
    if check_padding:
        check_padding_bits(p, n)
    return int(_popcount_kernel(p, n))


def add_bits(counts: np.ndarray, packed: np.ndarray, n: int, *, check_padding: bool = True) -> None:
    """counts[i] += bit i of `packed`, for i < n; counts is uint8/uint16/uint32 of length n.

    Counting T task masks this way gives how many tasks keep each parameter. Counters wrap at their
    width, so choose one wider than the number of masks added (uint8 holds up to 255).
    """
    n = check_count(n, "n")
    c = vector(counts, "counts", (np.uint8, np.uint16, np.uint32), writeable=True)
    if c.shape[0] != n:
        raise InputError(f"counts: expected length {n}, got {c.shape[0]}")
    p = packed_len(packed, n)
    if check_padding:
        check_padding_bits(p, n)
    no_overlap(c, "counts", ("packed mask", p))
    _add_bits_kernel(c, p)

