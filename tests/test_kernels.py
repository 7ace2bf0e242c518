"""Tests of tallfmt.kernels against numpy/torch references (np.packbits, torch rounding)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numba import njit

from tallfmt import kernels
from tallfmt.kernels import bits as kbits, core as kcore, decode as kdecode
from tallfmt.errors import FormatError, InputError

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
BITS = {"F32": np.int32, "F16": np.int16, "BF16": np.int16}


def ref_pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(bits) != 0, bitorder="little")


def patterns(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.zeros(n, bool), np.ones(n, bool), np.arange(n) % 2 == 0, np.arange(n) % 3 == 1,
            rng.random(n) < 0.5, rng.random(n) < 0.05]


# --- pack / unpack / popcount / add_bits ----------------------------------------------------------
def test_every_length_0_to_200() -> None:
    rng = np.random.default_rng(0)
    for n in range(201):
        for bits in patterns(n, rng):
            packed = kernels.pack_bits(bits)
            assert packed.dtype == np.uint8 and packed.shape == ((n + 7) // 8,)
            np.testing.assert_array_equal(packed, ref_pack(bits), err_msg=f"n={n}")
            unpacked = kernels.unpack_bits(packed, n)
            assert unpacked.dtype == np.bool_
            np.testing.assert_array_equal(unpacked, bits, err_msg=f"n={n}")
            assert kernels.padding_ok(packed, n)
            if n % 8:
                assert packed[-1] >> (n % 8) == 0
            assert kernels.popcount(packed, n) == int(bits.sum())
            counts = np.zeros(n, np.uint8)
            kernels.add_bits(counts, packed, n)
            np.testing.assert_array_equal(counts, bits.astype(np.uint8))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.bool_, st.integers(0, 5000)))
def test_round_trip_random(bits: np.ndarray) -> None:
    packed = kernels.pack_bits(bits)
    np.testing.assert_array_equal(packed, ref_pack(bits))
    np.testing.assert_array_equal(kernels.unpack_bits(packed, bits.size), bits)
    assert kernels.popcount(packed, bits.size) == int(bits.sum())


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.uint8, st.integers(0, 3000), elements=st.integers(0, 255)))
def test_uint8_any_nonzero_is_one(values: np.ndarray) -> None:
    np.testing.assert_array_equal(kernels.pack_bits(values), ref_pack(values))


def test_uint8_values_2_and_255() -> None:
    for n in range(1, 70):
        v = np.full(n, 2, np.uint8)
        v[::3] = 255
        v[1::5] = 0
        v[2::7] = 128
        np.testing.assert_array_equal(kernels.pack_bits(v), ref_pack(v), err_msg=f"n={n}")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=8), st.integers(0, 20), st.integers(0, 2**32 - 1))
def test_pack_bits_into_chunks(chunk_bytes: list[int], last: int, seed: int) -> None:
    # every chunk but the last is a multiple of 8 bits, as in chunked encoding
    sizes = [8 * c for c in chunk_bytes] + [last]
    n = sum(sizes)
    bits = np.random.default_rng(seed).random(n) < 0.4
    out = np.full((n + 7) // 8, 0xAA, np.uint8)
    s = 0
    for size in sizes:
        kernels.pack_bits_into(bits[s:s + size], out[s // 8:(s + size + 7) // 8])
        s += size
    np.testing.assert_array_equal(out, kernels.pack_bits(bits))
    np.testing.assert_array_equal(out, ref_pack(bits))


def test_padding_bits_are_detected() -> None:
    rng = np.random.default_rng(1)
    for n in range(1, 41):
        if n % 8 == 0:
            continue
        bits = rng.random(n) < 0.5
        for pad in range(n % 8, 8):
            packed = kernels.pack_bits(bits)
            packed[-1] |= np.uint8(1 << pad)
            assert not kernels.padding_ok(packed, n)
            with pytest.raises(FormatError, match="padding"):
                kernels.unpack_bits(packed, n)
            np.testing.assert_array_equal(kernels.unpack_bits(packed, n, check_padding=False), bits)
            assert kernels.popcount(packed, n) == int(bits.sum())  # padding never counted
            with pytest.raises(FormatError, match="padding"):
                kernels.popcount(packed, n, check_padding=True)
            with pytest.raises(FormatError, match="padding"):
                kernels.add_bits(np.zeros(n, np.uint16), packed, n)
            with pytest.raises(FormatError, match="padding"):
                kernels.decode_masked(np.zeros(n, np.float32), np.zeros(n, np.float32), packed)


@pytest.mark.parametrize("ctype", [np.uint8, np.uint16, np.uint32])
def test_add_bits_counts_masks(ctype: type) -> None:
    rng = np.random.default_rng(2)
    for n in [0, 1, 7, 63, 64, 65, 127, 1000, 4099]:
        masks = [rng.random(n) < d for d in (0.1, 0.5, 0.9, 0.3, 1.0)]
        counts = np.zeros(n, ctype)
        for m in masks:
            kernels.add_bits(counts, kernels.pack_bits(m), n)
        np.testing.assert_array_equal(counts, np.sum(masks, axis=0).astype(ctype) if n else counts)


def test_add_bits_wraps_at_counter_width() -> None:
    counts = np.full(9, 255, np.uint8)
    kernels.add_bits(counts, kernels.pack_bits(np.ones(9, bool)), 9)
    np.testing.assert_array_equal(counts, np.zeros(9, np.uint8))


def test_read_only_and_unaligned_inputs() -> None:
    rng = np.random.default_rng(3)
    n = 1001
    bits = rng.random(n) < 0.5
    raw = np.zeros(n + 1, np.uint8)
    raw[1:] = bits
    unaligned = raw[1:]
    unaligned.setflags(write=False)
    np.testing.assert_array_equal(kernels.pack_bits(unaligned), ref_pack(bits))
    packed = kernels.pack_bits(bits)
    packed.setflags(write=False)
    np.testing.assert_array_equal(kernels.unpack_bits(packed, n), bits)
    buf = np.zeros(4 * n + 1, np.uint8)
    base = np.frombuffer(buf.data, np.float32, count=n, offset=1)  # misaligned, read-only
    assert not base.flags.aligned
    tau = rng.standard_normal(n).astype(np.float32)
    tau.setflags(write=False)
    out = kernels.decode_masked(base, tau, packed)
    np.testing.assert_array_equal(out, np.where(bits, tau, np.float32(0)))


# --- fused decode -----------------------------------------------------------------------------------
def ref_decode(base: np.ndarray, tau: np.ndarray, bits: np.ndarray, dtype: str) -> np.ndarray:
    tdt = TORCH[dtype]
    b = torch.from_numpy(base.view(BITS[dtype]).copy()).view(tdt)
    r = torch.where(torch.from_numpy(bits), (b.float() + torch.from_numpy(tau)).to(tdt), b)
    return r.view(torch.int32 if dtype == "F32" else torch.int16).numpy()


def assert_same_bits(out: np.ndarray, ref_bits: np.ndarray, dtype: str) -> None:
    """Bit for bit, except that where the reference is NaN any NaN passes (torch's own CPU code
    paths disagree on NaN patterns; kernels document theirs)."""
    got = out.view(BITS[dtype])
    tdt = TORCH[dtype]
    ref_nan = torch.from_numpy(ref_bits.copy()).view(tdt).float().isnan().numpy()
    got_nan = torch.from_numpy(got.copy()).view(tdt).float().isnan().numpy()
    bad = (got != ref_bits) & ~(ref_nan & got_nan)
    idx = np.flatnonzero(bad)[:5]
    assert not bad.any(), (f"{dtype}: {bad.sum()} mismatches, e.g. at {idx.tolist()}: "
                           f"got {[hex(int(v) & 0xFFFFFFFF) for v in got[idx]]} "
                           f"want {[hex(int(v) & 0xFFFFFFFF) for v in ref_bits[idx]]}")


def decode(base: np.ndarray, tau: np.ndarray, bits: np.ndarray, dtype: str) -> np.ndarray:
    out = kernels.decode_masked(base, tau, kernels.pack_bits(bits), dtype=dtype)
    assert out.dtype == np.dtype(STORAGE[dtype]) and out.shape == base.shape
    return out


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    t = torch.from_numpy(np.asarray(x, np.float32)).to(TORCH[dtype])
    return t.view(torch.int32 if dtype == "F32" else torch.int16).numpy().view(STORAGE[dtype])


SPECIAL_F32 = np.array([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.17549435e-38, 5.9e-39, 6.0e-8, 6.1e-5, 65504.0,
                        65520.0, 3.0e38, -3.0e38, 3.4028235e38, np.inf, -np.inf, np.nan, 1e-3, 2.0 ** -24,
                        2.0 ** -25, 2.0 ** -133, 0.1, 1.0 + 2.0 ** -8], np.float32)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_decode_special_values_all_pairs(dtype: str) -> None:
    # every (base, tau) pair of special values: -0.0, subnormals, overflow to inf, inf - inf, NaN
    b, t = np.meshgrid(SPECIAL_F32, SPECIAL_F32, indexing="ij")
    base = to_storage(b.ravel(), dtype)
    tau = np.ascontiguousarray(t.ravel())
    for bits in (np.ones(base.size, bool), np.zeros(base.size, bool), np.arange(base.size) % 3 == 0):
        assert_same_bits(decode(base, tau, bits, dtype), ref_decode(base, tau, bits, dtype), dtype)
    keep = decode(base, tau, np.zeros(base.size, bool), dtype)
    np.testing.assert_array_equal(keep.view(BITS[dtype]), base.view(BITS[dtype]))  # -0.0, NaNs kept


def test_decode_overflow_and_negative_zero() -> None:
    base = to_storage(np.array([-0.0, -0.0, 65504.0, 3.0e38, 3.3e38], np.float32), "F16")
    tau = np.array([0.0, -0.0, 16.0, 0.0, 0.0], np.float32)
    out = decode(base, tau, np.array([False, True, True, True, True]), "F16")
    assert out.view(np.uint16).tolist() == [0x8000, 0x8000, 0x7C00, 0x7C00, 0x7C00]
    bf = to_storage(np.array([3.3895314e38, -0.0], np.float32), "BF16")  # bf16 max
    out = decode(bf, np.array([3.0e36, 0.0], np.float32), np.array([True, False]), "BF16")
    assert out.tolist() == [0x7F80, 0x8000]
    f = np.array([3.4028235e38, -0.0], np.float32)
    out = decode(f, np.array([3.4028235e38, 0.0], np.float32), np.array([True, False]), "F32")
    assert out.view(np.uint32).tolist() == [0x7F800000, 0x80000000]


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_decode_every_16_bit_pattern(dtype: str) -> None:
    base = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(STORAGE[dtype])
    rng = np.random.default_rng(4)
    bits = rng.random(base.size) < 0.8
    for tv in [0.0, -0.0, 1e-3, -1e-3, 1.0, -1.0, 1e-8, 2.0 ** -25, 6.0e-8, 2.0 ** -14, 65504.0, 3.0e38, -3.0e38,
               np.inf, np.nan, 1e-45, 0.5 * 2.0 ** -133]:
        tau = np.full(base.size, tv, np.float32)
        assert_same_bits(decode(base, tau, bits, dtype), ref_decode(base, tau, bits, dtype), dtype)
    tau = (rng.standard_normal(base.size) * 10.0 ** rng.integers(-12, 6, base.size)).astype(np.float32)
    assert_same_bits(decode(base, tau, bits, dtype), ref_decode(base, tau, bits, dtype), dtype)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_decode_random_bit_patterns(dtype: str) -> None:
    rng = np.random.default_rng(5)
    n = 300_007
    width = np.uint32 if dtype == "F32" else np.uint16
    base = rng.integers(0, np.iinfo(width).max, n, dtype=width, endpoint=True).view(STORAGE[dtype])
    tau = rng.integers(0, 2**32, n, dtype=np.uint32).view(np.float32)
    tau[::2] = (rng.standard_normal(tau[::2].size) * 1e-2).astype(np.float32)
    bits = rng.random(n) < 0.5
    assert_same_bits(decode(base, tau, bits, dtype), ref_decode(base, tau, bits, dtype), dtype)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_decode_every_length(dtype: str) -> None:
    rng = np.random.default_rng(6)
    for n in range(0, 200):
        base = to_storage((rng.standard_normal(n) * 0.02).astype(np.float32), dtype)
        tau = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        bits = rng.random(n) < 0.3
        assert_same_bits(decode(base, tau, bits, dtype), ref_decode(base, tau, bits, dtype), dtype)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 3000), st.sampled_from(["F32", "F16", "BF16"]), st.integers(0, 2**32 - 1))
def test_decode_hypothesis(n: int, dtype: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = to_storage((rng.standard_normal(n) * 0.02).astype(np.float32), dtype)
    tau = (rng.standard_normal(n) * 10.0 ** rng.integers(-9, 2, n)).astype(np.float32)
    bits = rng.random(n) < rng.random()
    assert_same_bits(decode(base, tau, bits, dtype), ref_decode(base, tau, bits, dtype), dtype)


def test_decode_nan_rule() -> None:
    # documented: a NaN sum becomes a quiet NaN that keeps the sign and the top payload bits
    nan = np.array([0x7FA12345, 0xFFB00001, 0x7FC00000], np.uint32).view(np.float32)
    q = nan.view(np.uint32) | np.uint32(0x00400000)
    one = np.ones(3, np.float32)
    bits = np.ones(3, bool)
    out = decode(to_storage(one, "BF16"), nan, bits, "BF16")
    assert out.tolist() == ((q >> 16) | 0x40).astype(np.uint16).tolist()
    out = decode(to_storage(one, "F16"), nan, bits, "F16").view(np.uint16)
    want = ((q >> 16) & 0x8000) | 0x7E00 | ((q >> 13) & 0x3FF)
    assert out.tolist() == want.astype(np.uint16).tolist()


def test_decode_in_place_and_out() -> None:
    rng = np.random.default_rng(7)
    n = 777
    base = rng.standard_normal(n).astype(np.float32)
    tau = rng.standard_normal(n).astype(np.float32)
    bits = rng.random(n) < 0.5
    want = np.where(bits, base + tau, base)
    out = np.empty(n, np.float32)
    assert kernels.decode_masked(base, tau, kernels.pack_bits(bits), out=out) is out
    np.testing.assert_array_equal(out, want)
    assert kernels.decode_masked(base, tau, kernels.pack_bits(bits), out=base) is base
    np.testing.assert_array_equal(base, want)


def test_decode_dtype_inference() -> None:
    base16 = np.ones(10, np.float16)
    out = kernels.decode_masked(base16, np.ones(10, np.float32), kernels.pack_bits(np.ones(10, bool)))
    assert out.dtype == np.float16 and (out == 2).all()


def test_threads_decode_concurrently() -> None:
    rng = np.random.default_rng(8)
    jobs = []
    for dtype in ["F32", "F16", "BF16"] * 4:
        n = int(rng.integers(100_000, 300_000))
        base = to_storage(rng.standard_normal(n).astype(np.float32), dtype)
        tau = rng.standard_normal(n).astype(np.float32)
        jobs.append((base, tau, rng.random(n) < 0.5, dtype))
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda j: decode(*j), jobs))
    for (base, tau, bits, dtype), out in zip(jobs, outs):
        assert_same_bits(out, ref_decode(base, tau, bits, dtype), dtype)


# --- float16 integer conversions (used when the CPU has no F16C) ----------------------------------------
@njit
def _soft_to_f32(h: np.ndarray) -> np.ndarray:
    out = np.empty(h.shape[0], np.float32)
    for i in range(h.shape[0]):
        out[i] = kcore._f16_to_f32_soft(h[i])
    return out


@njit
def _soft_to_f16(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape[0], np.uint16)
    for i in range(x.shape[0]):
        out[i] = kcore._f32_to_f16_soft(x[i])
    return out


def test_soft_f16_conversions_exact() -> None:
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    f = _soft_to_f32(h)
    want = h.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(f.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(f[nan]).all()
    # every float16 value, its float32 neighbours and the midpoints between float16 values
    u = want[~nan].view(np.uint32)
    cand = np.concatenate([u, u + 1, u - 1, u + 0x1000, u + 0xFFF, u + 0x1001, u + 0x2000])
    rng = np.random.default_rng(9)
    cand = np.concatenate([cand, rng.integers(0, 2**32, 500_000, dtype=np.uint32),
                           np.array([0x7F800001, 0xFFA00001, 0x7FC00000, 0x7F7FFFFF, 0x477FF000, 0x477FEFFF],
                                    np.uint32)])
    x = cand.view(np.float32)
    got = _soft_to_f16(x)
    ref = torch.from_numpy(x).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    xn = np.isnan(x)
    np.testing.assert_array_equal(got[~xn], ref[~xn])
    a = cand[xn] & np.uint32(0x7FFFFFFF)
    want_nan = ((cand[xn] >> 16) & 0x8000) | 0x7E00 | ((a >> 13) & 0x3FF)
    np.testing.assert_array_equal(got[xn], want_nan.astype(np.uint16))


# --- errors -------------------------------------------------------------------------------------------
B10 = np.zeros(10, bool)
P10 = np.zeros(2, np.uint8)
F10 = np.zeros(10, np.float32)


@pytest.mark.parametrize("call", [
    lambda: kernels.pack_bits([True, False]),
    lambda: kernels.pack_bits(np.zeros((2, 8), bool)),
    lambda: kernels.pack_bits(np.zeros(8, np.float32)),
    lambda: kernels.pack_bits(np.zeros(8, np.int8)),
    lambda: kernels.pack_bits(np.zeros(16, bool)[::2]),
    lambda: kernels.pack_bits_into(B10, np.zeros(1, np.uint8)),
    lambda: kernels.pack_bits_into(B10, np.zeros(3, np.uint8)),
    lambda: kernels.pack_bits_into(B10, np.zeros(2, np.int8)),
    lambda: kernels.pack_bits_into(B10, np.zeros(4, np.uint8)[::2]),
    lambda: kernels.pack_bits_into(B10, np.frombuffer(b"\0\0", np.uint8)),
    lambda: (lambda buf: kernels.pack_bits_into(buf, buf[:2]))(np.zeros(16, np.uint8)),
    lambda: kernels.unpack_bits(P10, -1),
    lambda: kernels.unpack_bits(P10, 10.0),
    lambda: kernels.unpack_bits(P10, True),
    lambda: kernels.unpack_bits(P10.astype(np.int8), 10),
    lambda: kernels.unpack_bits(np.zeros(4, np.uint8)[::2], 10),
    lambda: kernels.unpack_bits(np.zeros((1, 2), np.uint8), 10),
    lambda: kernels.popcount(P10.astype(np.uint16), 10),
    lambda: kernels.add_bits(np.zeros(10, np.int64), P10, 10),
    lambda: kernels.add_bits(np.zeros(10, np.float32), P10, 10),
    lambda: kernels.add_bits(np.zeros(9, np.uint16), P10, 10),
    lambda: kernels.add_bits(np.frombuffer(bytes(20), np.uint16), P10, 10),
    lambda: kernels.add_bits(np.zeros(20, np.uint16)[::2], P10, 10),
    lambda: kernels.decode_masked(F10.astype(np.float64), F10, P10),
    lambda: kernels.decode_masked(F10.astype(np.uint16), F10, P10),
    lambda: kernels.decode_masked(F10, F10, P10, dtype="F64"),
    lambda: kernels.decode_masked(F10, F10, P10, dtype="BF16"),
    lambda: kernels.decode_masked(F10.astype(np.float16), F10, P10, dtype="F32"),
    lambda: kernels.decode_masked(F10.astype(">f4"), F10, P10, dtype="F32"),
    lambda: kernels.decode_masked(F10.reshape(2, 5), F10, P10),
    lambda: kernels.decode_masked(np.zeros(20, np.float32)[::2], F10, P10),
    lambda: kernels.decode_masked(F10, F10.astype(np.float64), P10),
    lambda: kernels.decode_masked(F10, F10[:9], P10),
    lambda: kernels.decode_masked(F10, F10, P10.astype(np.int8)),
    lambda: kernels.decode_masked(F10, F10, P10, out=np.zeros(10, np.float64)),
    lambda: kernels.decode_masked(F10, F10, P10, out=np.zeros(11, np.float32)),
    lambda: kernels.decode_masked(F10, F10, P10, out=np.frombuffer(bytes(40), np.float32)),
    lambda: kernels.decode_masked(F10.astype(np.uint16), F10, P10, dtype="BF16", out=np.zeros(10, np.float16)),
])
def test_input_errors(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError):
        call()


def test_overlapping_out_is_refused() -> None:
    buf = np.zeros(20, np.float32)
    with pytest.raises(InputError, match="overlaps base"):
        kernels.decode_masked(buf[:10], F10, P10, out=buf[1:11])
    tau = np.zeros(10, np.float32)
    with pytest.raises(InputError, match="overlaps tau"):
        kernels.decode_masked(F10, tau, P10, out=tau)
    counts = np.zeros(16, np.uint8)
    with pytest.raises(InputError, match="overlaps"):
        kernels.add_bits(counts, counts[:2], 16)


@pytest.mark.parametrize("nbytes", [0, 1, 3, 100])
def test_wrong_packed_length_is_format_error(nbytes: int) -> None:
    p = np.zeros(nbytes, np.uint8)
    for call in (lambda: kernels.unpack_bits(p, 10), lambda: kernels.padding_ok(p, 10),
                 lambda: kernels.popcount(p, 10), lambda: kernels.add_bits(np.zeros(10, np.uint16), p, 10),
                 lambda: kernels.decode_masked(F10, F10, p)):
        with pytest.raises(FormatError, match="expected 2 bytes for 10 bits"):
            call()


def test_kernels_recheck_lengths() -> None:
    # a direct (unvalidated) call with inconsistent lengths must raise, not read or write out of bounds
    none_p, none_v = np.zeros(0, np.int64), np.zeros(0, np.float32)
    with pytest.raises(ValueError):
        kdecode._decode_kernel(np.zeros(100, np.uint32), np.zeros(10, np.float32), np.zeros(13, np.uint8),
                               np.zeros(100, np.uint32), 0, 0, 100, none_p, none_v)
    u8, f32 = np.zeros(100, np.uint32), np.zeros(100, np.float32)
    for start, stop in ((0, 101), (8, 4), (3, 64), (-8, 8)):  # a range past the end, backwards, unaligned
        with pytest.raises(ValueError):
            kdecode._decode_kernel(u8, f32, np.zeros(13, np.uint8), np.zeros(100, np.uint32), 0, start, stop,
                                   none_p, none_v)
        with pytest.raises(ValueError):
            kdecode._select_kernel(u8, u8, np.zeros(13, np.uint8), np.zeros(100, np.uint32), start, stop)
    with pytest.raises(ValueError):  # planes of the wrong count or length
        kdecode._decode_planes_kernel(np.zeros((2, 100), np.uint8), np.zeros((4, 100), np.uint8),
                                      np.zeros(13, np.uint8), np.zeros(100, np.uint32), 0, 0, 100, none_p, none_v)
    with pytest.raises(ValueError):
        kdecode._decode_planes_kernel(np.zeros((4, 100), np.uint8), np.zeros((4, 99), np.uint8),
                                      np.zeros(13, np.uint8), np.zeros(100, np.uint32), 0, 0, 100, none_p, none_v)
    # residual entries outside the range, negative, out of order, or of another count than their values
    planes = (np.zeros((4, 100), np.uint8), np.zeros((4, 100), np.uint8))
    for pos, vals, start, stop in (([64], [1.0], 0, 64), ([-1], [1.0], 0, 100), ([99, 3], [1.0, 1.0], 0, 100),
                                   ([5, -7], [1.0, 1.0], 0, 100), ([3], [], 0, 100), ([2], [1.0], 8, 100)):
        p, v = np.array(pos, np.int64), np.array(vals, np.float32)
        with pytest.raises(ValueError):
            kdecode._decode_kernel(u8, f32, np.zeros(13, np.uint8), np.zeros(100, np.uint32), 0, start, stop, p, v)
        with pytest.raises(ValueError):
            kdecode._decode_planes_kernel(*planes, np.zeros(13, np.uint8), np.zeros(100, np.uint32), 0, start, stop,
                                          p, v)
    with pytest.raises(ValueError):
        kdecode._residual_kernel(u8, f32, np.zeros(13, np.uint8), np.array([100]), np.ones(1, np.float32),
                                 np.zeros(1, np.uint32), 0)
    with pytest.raises(ValueError):
        kdecode._residual_planes_kernel(*planes, np.zeros(13, np.uint8), np.array([100]), np.ones(1, np.float32),
                                        np.zeros(1, np.uint32), 0)
    with pytest.raises(ValueError):
        kdecode._select_kernel(u8, u8[:99], np.zeros(13, np.uint8), np.zeros(100, np.uint32), 0, 100)
    with pytest.raises(ValueError):
        kbits._unpack_kernel(np.zeros(1, np.uint8), np.zeros(100, np.uint8))
    with pytest.raises(ValueError):
        kbits._pack_kernel(np.zeros(100, np.uint8), np.zeros(1, np.uint8), False)
    with pytest.raises(ValueError):
        kbits._popcount_kernel(np.zeros(1, np.uint8), 100)
    with pytest.raises(ValueError):
        kbits._add_bits_kernel(np.zeros(100, np.uint16), np.zeros(1, np.uint8))


def test_decode_without_hardware_half(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a CPU without F16C: the kernel must compile the integer float16 path (not abort on a missing
    # compiler-rt helper) and give the same bits
    code = (
        "import numpy as np, torch\n"
        "from tallfmt import kernels as K\n"
        "from tallfmt.kernels import core\n"
        "assert not core.NATIVE_HALF\n"
        "rng = np.random.default_rng(0)\n"
        "base = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)\n"
        "tau = (rng.standard_normal(65536) * 1e-3).astype(np.float32)\n"
        "bits = rng.random(65536) < 0.7\n"
        "o = K.decode_masked(base, tau, K.pack_bits(bits))\n"
        "t = torch.from_numpy(base)\n"
        "ref = torch.where(torch.from_numpy(bits), (t.float() + torch.from_numpy(tau)).half(), t).numpy()\n"
        "nan = np.isnan(ref)\n"
        "assert (o.view(np.uint16)[~nan] == ref.view(np.uint16)[~nan]).all() and np.isnan(o[nan]).all()\n"
        "print('ok')\n")
    root = str(Path(kernels.__file__).resolve().parent.parent.parent)
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
