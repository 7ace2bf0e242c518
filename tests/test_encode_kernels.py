"""The fused encode kernels against the torch path (_torch_path.py) and
TopKThreshold, bit for bit: τ_MTL, packed masks, float64 statistics and |τ_t| histograms."""

from __future__ import annotations

import threading
import zlib

import numpy as np
import pytest
import torch

import _torch_path
import tallfmt.kernels.encode as ek
from tallfmt import kernels
from tallfmt.compute import maskmath
from tallfmt.compute.tensors import to_numpy, to_torch, torch_dtype
from tallfmt.format import dtypes
from tallfmt.errors import InputError

DTYPES = ("F32", "F16", "BF16")
MERGES = (("task_arithmetic", "sum"), ("ties", "sum"), ("ties", "mean"))
MASKS = ("tall", "magnitude")
LAMBDAS = (0.5, 0.4, 1.0, 0.3, 2.0, 0.25, 0.7, 1e-3)  # exact halves/doubles make ties; 0.4, 0.3 round


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- data ------------------------------------------------------------------------------------------
def _storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded (nearest even) to `dtype`, as that dtype's storage array."""
    if x.size == 0:  # torch cannot view an empty tensor as bytes
        return np.empty(0, dtype=dtypes.by_name(dtype).storage)
    return to_numpy(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch_dtype(dtype)))


def _widen(a: np.ndarray, dtype: str) -> np.ndarray:
    return to_torch(a, dtypes.by_name(dtype)).float().numpy()


def _case(dtype: str, n: int, nt: int, seed: int, *, grid: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """θ0 and nt fine-tunes with what makes bits differ: exact ties (a grid of quarters), τ = ±0,
    θ0 = −0.0, subnormals, exact cancellations between tasks, untouched entries."""
    rng = np.random.default_rng(seed)
    if grid:
        base = rng.integers(-16, 17, n) / 4
        thetas = [base + rng.integers(-4, 5, n) / 4 * (rng.random(n) < 0.7) for _ in range(nt)]
    else:
        base = rng.standard_normal(n)
        thetas = [base + rng.standard_normal(n) * 10.0 ** rng.integers(-4, 0, n) * (rng.random(n) < 0.5)
                  for _ in range(nt)]
    base = base.astype(np.float32)
    thetas = [t.astype(np.float32) for t in thetas]
    tiny = {"F32": np.float32(1e-45), "F16": np.float32(6e-8), "BF16": np.float32(1e-40)}[dtype]  # subnormal
    for i in range(0, n, 7):  # one special every 7 elements, cycling through the kinds
        kind = (i // 7) % 6
        if kind == 0:    # θ0 = −0.0; tasks ±0.0
            base[i] = -0.0
            for t, th in enumerate(thetas):
                th[i] = 0.0 if t % 2 else -0.0
        elif kind == 1:  # θ0 = +0.0, tasks −0.0: τ = −0.0 everywhere, τ_MTL = +0.0
            base[i] = 0.0
            for th in thetas:
                th[i] = -0.0
        elif kind == 2:  # subnormal θ0 and τ
            base[i] = tiny * rng.integers(-3, 4)
            for th in thetas:
                th[i] = tiny * rng.integers(-5, 6)
        elif kind == 3 and nt >= 2:  # two tasks cancel exactly: the elected sum can be 0
            thetas[0][i] = base[i] + 0.25
            thetas[1][i] = base[i] - 0.25
        elif kind == 4:  # untouched
            for th in thetas:
                th[i] = base[i]
    return _storage(base, dtype), [_storage(t, dtype) for t in thetas]


def _taus(dtype: str, base: np.ndarray, thetas: list[np.ndarray]) -> list[np.ndarray]:
    b = _widen(base, dtype)
    return [_widen(th, dtype) - b for th in thetas]


def _thresholds(taus: list[np.ndarray], seed: int, density: float) -> list[float]:
    """Per task: the exact top-k threshold, a value present in |τ_t| (ties at it), 0.0 or +inf."""
    rng = np.random.default_rng(seed)
    out = []
    for t, tau in enumerate(taus):
        pick = t % 4
        if pick == 0:
            out.append(maskmath.topk_threshold_dense(torch.from_numpy(tau), density))
        elif pick == 1:
            out.append(float(np.abs(tau[rng.integers(0, tau.size)])) if tau.size else 1.0)
        elif pick == 2:
            out.append(0.0 if t % 8 == 2 else float(np.abs(tau).max(initial=0.0)))
        else:
            out.append(np.inf if t % 8 == 7 else maskmath.topk_threshold_dense(torch.from_numpy(tau), 0.5))
    return out


# --- the fused kernel vs the torch path ------------------------------------------------------------
def _chunked(spec: ek.EncodeSpec, dtype: str, base: np.ndarray, thetas: list[np.ndarray],
             bounds: list[int]) -> ek.EncodeOutputs:
    x = ek.TensorInputs(dtype, base, thetas)
    out = ek.EncodeOutputs(base.shape[0], len(thetas))
    for s, e in zip(bounds[:-1], bounds[1:]):
        ek.encode_chunk(spec, x, out, s, e)
    return out


def _bounds(n: int, rng: np.random.Generator) -> list[list[int]]:
    """Chunkings of [0, n): one chunk, chunks of 8, 64 (one block), 200, and random multiples of 8."""
    fixed = [[0, n]] + [list(range(0, n, c)) + [n] for c in (8, 64, 200)]
    cuts = sorted(set(int(c) for c in rng.integers(0, n // 8 + 1, 6) * 8) - {0, n}) if n else []
    return [sorted(set(b)) if n else [0, 0] for b in fixed] + [[0, *cuts, n]]


def _assert_same(out: ek.EncodeOutputs, ref: tuple[np.ndarray, list[np.ndarray], np.ndarray]) -> None:
    tau, packed, stats = ref
    assert np.array_equal(out.tau.view(np.uint32), tau.view(np.uint32)), "τ_MTL bits differ"
    for t, p in enumerate(packed):
        assert np.array_equal(out.masks[t], p), f"mask of task {t} differs"
    assert np.array_equal(out.stats.view(np.uint64), stats.view(np.uint64)), f"stats differ:\n{out.stats}\n{stats}"


def _spec_and_ref_args(merge: str, agg: str, mask: str, taus: list[np.ndarray], seed: int,
                       zero: bool) -> tuple[ek.EncodeSpec, dict]:
    nt = len(taus)
    lams = list(LAMBDAS[:nt])
    ties_thr = _thresholds(taus, seed, 0.3) if merge == "ties" else None
    mask_thr = _thresholds(taus, seed + 1, 0.1) if mask == "magnitude" else None
    spec = ek.EncodeSpec(merge=merge, ties_agg=agg, ties_thresholds=ties_thr, mask=mask,
                         lambdas=lams if mask == "tall" else None, mask_thresholds=mask_thr,
                         zero_tau_clears_mask=zero)
    return spec, dict(merge=merge, ties_agg=agg, ties_thr=ties_thr, mask=mask, lambdas=lams, mask_thr=mask_thr,
                      zero_tau_clears_mask=zero)


@pytest.mark.parametrize("nt", (1, 2, 3, 8))
@pytest.mark.parametrize("zero", (False, True), ids=("format1.0", "zero_clears"))
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("merge,agg", MERGES, ids=("ta", "ties_sum", "ties_mean"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_path(dtype: str, merge: str, agg: str, mask: str, zero: bool, nt: int) -> None:
    seed = zlib.crc32(repr((dtype, merge, agg, mask, nt)).encode())
    for grid in (False, True):
        n = 1003
        base, thetas = _case(dtype, n, nt, seed, grid=grid)
        spec, args = _spec_and_ref_args(merge, agg, mask, _taus(dtype, base, thetas), seed, zero)
        ref = _torch_path.encode_masked(dtype, base, thetas, 72, **args)
        for bounds in _bounds(n, np.random.default_rng(seed)):
            out = _chunked(spec, dtype, base, thetas, bounds)
            _assert_same(out, ref)
            assert not out.problems.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_are_sequential_float64_sums(dtype: str) -> None:
    """The statistics against numpy: IEEE float64 terms and np.cumsum, a left-to-right sum (from +0.0).
    Both numba kernels would agree with each other even if LLVM fused or reordered their arithmetic;
    this reference would not."""
    base, thetas = _case(dtype, 2000, 3, 11)
    spec = ek.EncodeSpec(lambdas=[0.4, 0.5, 0.3])
    out = _chunked(spec, dtype, base, thetas, [0, 512, 1000, 2000])
    seq = lambda x: np.cumsum(np.concatenate([[0.0], x]))[-1]  # noqa: E731
    for t, th in enumerate(thetas):
        bits = kernels.unpack_bits(out.masks[t], 2000).astype(np.float64)
        hat = _widen(kernels.decode_masked(base, out.tau, out.masks[t], dtype=dtype), dtype).astype(np.float64)
        theta = _widen(th, dtype).astype(np.float64)
        tau = (_widen(th, dtype) - _widen(base, dtype)).astype(np.float64)  # the float32 τ_t, widened
        mt = out.tau.astype(np.float64) * bits
        err = hat - theta
        want = [seq(err * err), seq(tau * tau), seq(mt * tau), seq(mt * mt), bits.sum()]
        assert np.array_equal(out.stats[t].view(np.uint64), np.array(want).view(np.uint64))


@pytest.mark.parametrize("n", (0, 1, 7, 8, 63, 64, 65, 129))
@pytest.mark.parametrize("dtype", DTYPES)
def test_short_tensors(dtype: str, n: int) -> None:
    """Lengths around the byte and the 64-element block; the padding bits of the last byte are 0."""
    base, thetas = _case(dtype, n, 3, n)
    for merge, agg in MERGES:
        for mask in MASKS:
            spec, args = _spec_and_ref_args(merge, agg, mask, _taus(dtype, base, thetas), n, False)
            ref = _torch_path.encode_masked(dtype, base, thetas, 16, **args)
            for bounds in _bounds(n, np.random.default_rng(n)):
                out = _chunked(spec, dtype, base, thetas, bounds)
                _assert_same(out, ref)
                for t in range(3):
                    assert kernels.padding_ok(out.masks[t], n)


def test_all_negative_zero_sum_is_positive_zero() -> None:
    base = np.zeros(16, np.float32)
    thetas = [np.full(16, -0.0, np.float32) for _ in range(3)]
    out = _chunked(ek.EncodeSpec(lambdas=[0.4] * 3), "F32", base, thetas, [0, 16])
    assert (out.tau.view(np.uint32) == 0).all()  # +0.0, not −0.0
    assert (out.masks == 0xFF).all()  # |τ| = 0 >= λ·|0 − (−0)| = 0: kept (format 1.0)
    out = _chunked(ek.EncodeSpec(lambdas=[0.4] * 3, zero_tau_clears_mask=True), "F32", base, thetas, [0, 16])
    assert (out.masks == 0).all()


def test_inputs_any_layout_and_bit_views() -> None:
    """Read-only, unaligned and uint32-bit-view inputs give the same results as plain arrays."""
    base, thetas = _case("F32", 301, 3, 5)
    spec = ek.EncodeSpec(lambdas=[0.4, 0.5, 0.3])
    want = _chunked(spec, "F32", base, thetas, [0, 301])
    ro = np.frombuffer(thetas[0].tobytes(), dtype=np.float32)
    raw = np.zeros(301 * 4 + 1, np.uint8)
    raw[1:] = thetas[1].view(np.uint8)
    unaligned = raw[1:].view(np.float32)
    assert not ro.flags.writeable and not unaligned.flags.aligned
    got = _chunked(spec, "F32", base.view(np.uint32), [ro, unaligned, thetas[2].view(np.uint32)], [0, 128, 301])
    _assert_same(got, (want.tau, list(want.masks), want.stats))


def test_threads_on_different_tensors() -> None:
    """The kernels release the GIL; concurrent tensors do not disturb each other."""
    cases = [_case("BF16", 5000 + 8 * i, 4, 40 + i) for i in range(4)]
    spec = ek.EncodeSpec(merge="ties", ties_thresholds=[1e-3] * 4, lambdas=[0.4] * 4)
    want = [_chunked(spec, "BF16", b, th, [0, b.shape[0]]) for b, th in cases]
    got: list = [None] * 4

    def work(i: int) -> None:
        b, th = cases[i]
        got[i] = _chunked(spec, "BF16", b, th, list(range(0, b.shape[0], 1024)) + [b.shape[0]])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for w, g in zip(want, got):
        _assert_same(g, (w.tau, list(w.masks), w.stats))


# --- problems --------------------------------------------------------------------------------------
def _problems(dtype: str, base: list[float], thetas: list[list[float]], merge: str = "task_arithmetic"
              ) -> np.ndarray:
    nt = len(thetas)
    spec = ek.EncodeSpec(merge=merge, ties_thresholds=[0.0] * nt if merge == "ties" else None, lambdas=[0.5] * nt)
    b = _storage(np.array(base, np.float32), dtype)
    th = [_storage(np.array(t, np.float32), dtype) for t in thetas]
    out = _chunked(spec, dtype, b, th, [0, 8, len(base)])
    return out.problems


@pytest.mark.parametrize("merge", ("task_arithmetic", "ties"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_problem_nonfinite_inputs(dtype: str, merge: str) -> None:
    n = 19
    for bad in (np.nan, np.inf, -np.inf):
        base, t1, t2 = [0.5] * n, [1.0] * n, [0.25] * n
        base[11] = bad
        p = _problems(dtype, base, [t1, t2], merge)
        assert p[0] & ek.PROBLEM_INPUT and not (p[1:] & ek.PROBLEM_INPUT).any()
        base[11] = 0.5
        t2[17] = bad
        p = _problems(dtype, base, [t1, t2], merge)
        assert p[2] & ek.PROBLEM_INPUT and not p[0] & ek.PROBLEM_INPUT and not p[1] & ek.PROBLEM_INPUT
        assert p[2] & ek.PROBLEM_OVERFLOW  # τ_2 is not finite either; the input flag explains it


@pytest.mark.parametrize("merge", ("task_arithmetic", "ties"))
@pytest.mark.parametrize("dtype", ("F32", "BF16"))  # F16 differences cannot overflow float32
def test_problem_tau_overflow(dtype: str, merge: str) -> None:
    n = 10
    p = _problems(dtype, [1.0] * 9 + [-3e38], [[1.0] * 9 + [3e38], [1.0] * n], merge)
    assert p[1] == ek.PROBLEM_OVERFLOW and p[0] & ek.PROBLEM_OVERFLOW and p[2] == 0
    # finite τ_t whose sum overflows: only τ_MTL
    p = _problems(dtype, [1.0] * 9 + [-2e38], [[1.0] * 9 + [0.0], [1.0] * 9 + [0.0]], merge)
    assert p[0] == ek.PROBLEM_OVERFLOW and not (p[1:] & ek.PROBLEM_OVERFLOW).any()


@pytest.mark.parametrize("dtype,base,theta", (("F16", 60000.0, 65504.0), ("BF16", 3.0e38, 3.3e38),
                                              ("F32", 3.0e38, 3.3e38)))
def test_problem_decode_overflow(dtype: str, base: float, theta: float) -> None:
    """θ0 + τ_MTL rounds to inf in the dtype (τ_MTL = 2τ): a kept element decodes to inf."""
    p = _problems(dtype, [1.0] * 8 + [base], [[1.0] * 8 + [theta]] * 2)
    assert p[0] == 0 and p[1] == p[2] == ek.PROBLEM_DECODE


def test_describe_problems() -> None:
    labels = ["base.st", "a.st", "b.st"]
    assert ek.describe_problems(np.zeros(3, np.uint8), "w", labels) is None
    p = np.array([ek.PROBLEM_OVERFLOW, ek.PROBLEM_DECODE, ek.PROBLEM_INPUT | ek.PROBLEM_OVERFLOW], np.uint8)
    assert ek.describe_problems(p, "w", labels) == "b.st: tensor 'w' holds NaN or Inf values"
    p[2] = 0
    assert "τ_MTL overflows float32" in ek.describe_problems(p, "w", labels)
    p[0] = 0
    assert ek.describe_problems(p, "w", labels).startswith("a.st: tensor 'w': a decoded value")


# --- histograms vs TopKThreshold -------------------------------------------------------------------
def _threshold_from(hist_hi: np.ndarray, hist_lo: np.ndarray, k: int) -> tuple[int, int]:
    """(bin, threshold bits) from our histograms (hist_lo of the bin chosen from hist_hi), by
    TopKThreshold's rule: the highest bin with at least k entries at or above it."""
    def from_top(h: np.ndarray, kk: int) -> tuple[int, int]:
        cum = np.cumsum(h[::-1])
        j = int(np.searchsorted(cum, kk))
        return h.size - 1 - j, int(cum[j])
    b, at_or_above = from_top(hist_hi, k)
    above = at_or_above - int(hist_hi[b])
    low, _ = from_top(hist_lo[1:-1], k - above)
    return b, (b << 16) | low


@pytest.mark.parametrize("density", (0.05, 0.95))  # 0.95 selects bin 0 (τ = 0 dominates)
@pytest.mark.parametrize("nt", (1, 3, 8))
@pytest.mark.parametrize("dtype", DTYPES)
def test_histograms_match_topk_threshold(dtype: str, nt: int, density: float) -> None:
    rng = np.random.default_rng(nt)
    tensors = [_case(dtype, n, nt, 100 + n) for n in (1003, 517)]  # two tensors, chunks of odd sizes
    total = sum(b.shape[0] for b, _ in tensors)
    sels = [maskmath.TopKThreshold(total, density) for _ in range(nt)]
    hi = np.zeros((nt, ek.HI_BINS), np.int64)
    chunkings = []
    for b, _ in tensors:
        n = b.shape[0]
        cuts = sorted(set(int(c) for c in rng.integers(1, n, 5)))
        chunkings.append([0, *cuts, n])
    for (b, th), bounds in zip(tensors, chunkings):
        x = ek.TensorInputs(dtype, b, th)
        for s, e in zip(bounds[:-1], bounds[1:]):
            ek.hist_hi_chunk(x, s, e, hi)
        for t, tau in enumerate(_taus(dtype, b, th)):
            sels[t].update_hi(torch.from_numpy(tau))
    for t, sel in enumerate(sels):
        assert np.array_equal(hi[t], sel.hist_hi.numpy())
        sel.finish_hi()
    bins = [sel.selected_bin for sel in sels]
    lo = np.zeros((nt, ek.LO_BINS), np.int64)
    for (b, th), bounds in zip(tensors, chunkings):
        x = ek.TensorInputs(dtype, b, th)
        for s, e in zip(bounds[:-1], bounds[1:]):
            ek.hist_lo_chunk(x, s, e, bins, lo)
        for t, tau in enumerate(_taus(dtype, b, th)):
            sels[t].update_lo(torch.from_numpy(tau))
    for t, sel in enumerate(sels):
        assert np.array_equal(lo[t, 1:-1], sel.hist_lo.numpy())
        bits = np.concatenate([np.abs(_taus(dtype, b, th)[t]).view(np.uint32) for b, th in tensors])
        assert lo[t, 0] == (bits < bins[t] << 16).sum() and lo[t, -1] == (bits >> 16 > bins[t]).sum()
        sel.finish_lo()
        assert _threshold_from(hi[t], lo[t], sel.k) == (sel.selected_bin, sel.threshold_bits)
    if density == 0.95:
        assert 0 in bins


def test_histogram_bin_edges() -> None:
    """|τ| bit patterns at the edges of bins (F32 θ0 = 0, so τ = θ_t exactly), against the formulas of
    TopKThreshold.update_hi / update_lo written in numpy."""
    edges = [0, 1, 0xFFFF, 0x10000, 0x3A83FFFF, 0x3A840000, 0x3A84FFFF, 0x3A850000, 0x7F7FFFFF]
    bits = np.array(edges * 3, dtype=np.uint32)
    bits[len(edges):2 * len(edges)] |= np.uint32(0x80000000)  # negative τ: the same bins
    rng = np.random.default_rng(7)
    bits = np.concatenate([bits, rng.integers(0x3A800000, 0x3A880000, 200, dtype=np.uint32)])
    n = bits.size
    x = ek.TensorInputs("F32", np.zeros(n, np.float32), [bits.view(np.float32), bits[::-1].copy().view(np.float32)])
    a = [(bits & 0x7FFFFFFF).astype(np.int64), (bits[::-1] & 0x7FFFFFFF).astype(np.int64)]
    hi = np.zeros((2, ek.HI_BINS), np.int64)
    ek.hist_hi_chunk(x, 0, 5, hi)
    ek.hist_hi_chunk(x, 5, n, hi)
    for t in range(2):
        assert np.array_equal(hi[t], np.bincount(a[t] >> 16, minlength=ek.HI_BINS))
    for bins in ([0, 1], [0x3A84, 0x3A84], [0x3A85, 0x7F7F], [0x3A83, 0xFFFF]):
        lo = np.zeros((2, ek.LO_BINS), np.int64)
        ek.hist_lo_chunk(x, 0, n, bins, lo)
        for t in range(2):
            want = np.bincount(np.clip(a[t] - (bins[t] << 16), -1, 1 << 16) + 1, minlength=ek.LO_BINS)
            assert np.array_equal(lo[t], want)


# --- argument checks -------------------------------------------------------------------------------
def test_argument_errors() -> None:
    base = np.zeros(20, np.float32)
    th = [np.ones(20, np.float32)]
    x = ek.TensorInputs("F32", base, th)
    out = ek.EncodeOutputs(20, 1)
    spec = ek.EncodeSpec(lambdas=[0.4])
    with pytest.raises(InputError, match="multiples of 8"):
        ek.encode_chunk(spec, x, out, 4, 20)
    with pytest.raises(InputError, match="multiples of 8"):
        ek.encode_chunk(spec, x, out, 0, 12)
    with pytest.raises(InputError, match="not inside"):
        ek.encode_chunk(spec, x, out, 0, 24)
    with pytest.raises(InputError, match="task parameters"):
        ek.encode_chunk(ek.EncodeSpec(lambdas=[0.4, 0.4]), x, out, 0, 20)
    with pytest.raises(InputError, match="length 20"):
        ek.TensorInputs("F32", base, [np.ones(19, np.float32)])
    with pytest.raises(InputError, match="dtype"):
        ek.TensorInputs("F16", base, th)
    with pytest.raises(InputError, match="uint16 holds|expected dtype"):
        ek.TensorInputs("BF16", base.astype(np.float16), [np.ones(20, np.float16)])
    with pytest.raises(InputError, match="lambdas"):
        ek.EncodeSpec()
    with pytest.raises(InputError, match="finite"):
        ek.EncodeSpec(lambdas=[float("nan")])
    with pytest.raises(InputError, match="finite"):
        ek.EncodeSpec(lambdas=[1e39])  # rounds to inf in float32
    with pytest.raises(InputError, match=">= 0"):
        ek.EncodeSpec(lambdas=[-0.5])
    with pytest.raises(InputError, match="ties_thresholds"):
        ek.EncodeSpec(merge="ties", lambdas=[0.4])
    with pytest.raises(InputError, match="expected 1 values"):
        ek.EncodeSpec(merge="ties", ties_thresholds=[1.0, 2.0], lambdas=[0.4])
    assert ek.EncodeSpec(mask="magnitude", mask_thresholds=[float("inf")]).num_tasks == 1
    with pytest.raises(InputError, match="hist"):
        ek.hist_hi_chunk(x, 0, 20, np.zeros((2, ek.HI_BINS), np.int64))
    with pytest.raises(InputError, match="bins"):
        ek.hist_lo_chunk(x, 0, 20, [1 << 16], np.zeros((1, ek.LO_BINS), np.int64))
    with pytest.raises(InputError, match="masks"):
        ek.EncodeOutputs(20, 1, masks=np.zeros((1, 2), np.uint8))
