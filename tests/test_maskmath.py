"""Tests of tallfmt.maskmath against plain references (numpy float32 loops, sorting, Python counts)."""

from __future__ import annotations

import doctest
import inspect
import math
import struct
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallfmt.compute.maskmath as mm
from tallfmt.errors import InputError
from tallfmt.compute.maskmath import (
    TaskStats,
    TopKThreshold,
    agreement_histogram,
    consensus_mask,
    magnitude_mask,
    mask_counts,
    merge_chunk,
    tall_mask,
    task_arithmetic,
    task_vector,
    ties_merge,
    topk_count,
    topk_threshold_dense,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SUBNORMAL = struct.unpack("<f", struct.pack("<I", 1))[0]  # smallest positive float32
POOL = [0.0, -0.0, SUBNORMAL, -SUBNORMAL, 3 * SUBNORMAL, 1e-38, 1.0, -1.0, 1.0000001, 0.5, -0.5,
        2.0, -2.0, 0.1, -0.3, 1e30, -1e30, 65504.0, 7.5]

values = st.one_of(
    st.sampled_from(POOL),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
)
densities = st.one_of(st.sampled_from([0.0, 1e-9, 1e-3, 0.2, 0.5, 0.7, 1.0]), st.floats(0.0, 1.0))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def f32(xs) -> torch.Tensor:
    return torch.tensor(np.asarray(xs, dtype=np.float32))


def cut(n: int, cuts: list[int]) -> list[tuple[int, int]]:
    """Chunk boundaries for a length-n vector from arbitrary cut points (empty chunks allowed)."""
    pts = sorted(c % (n + 1) for c in cuts)
    edges = [0, *pts, n]
    return list(zip(edges[:-1], edges[1:]))


def run_topk(chunks: list[torch.Tensor], total: int, density: float, order2=None) -> TopKThreshold:
    sel = TopKThreshold(total, density)
    for c in chunks:
        sel.update_hi(c)
    sel.finish_hi()
    for c in (chunks if order2 is None else order2):
        sel.update_lo(c)
    sel.finish_lo()
    return sel


# ------------------------------------------------------------------------------------------------
# topk_count and the threshold
# ------------------------------------------------------------------------------------------------

def test_topk_count_is_decimal_exact():
    assert topk_count(100, 0.07) == 7  # math.ceil(0.07 * 100) would say 8
    assert topk_count(25, 0.28) == 7   # 0.28 * 25 = 7.000000000000001 in floating point
    assert topk_count(10, 0.1) == 1    # the exact binary value of 0.1 times 10 is just above 1
    assert topk_count(3, 0.5) == 2
    assert topk_count(5, 0.2) == 1
    assert topk_count(5, 0.21) == 2
    assert topk_count(0, 0.5) == 0
    assert topk_count(7, 0) == 0
    assert topk_count(7, 1) == 7
    assert topk_count(10**12, 1e-12) == 1


@given(st.integers(0, 10**9), st.integers(0, 1000))
def test_topk_count_matches_rational_ceiling(total, permille):
    d = permille / 1000
    assert topk_count(total, d) == -((-total * permille) // 1000)


@pytest.mark.parametrize("density", [-0.1, 1.0000001, math.nan, math.inf, True, "0.2", None])
def test_topk_bad_density(density):
    with pytest.raises(InputError):
        topk_count(10, density)
    with pytest.raises(InputError):
        TopKThreshold(10, density)


@pytest.mark.parametrize("total", [-1, 2.5, True])
def test_topk_bad_total(total):
    with pytest.raises(InputError):
        TopKThreshold(total, 0.2)


@SETTINGS
@given(st.lists(values, max_size=300), densities, st.lists(st.integers(0, 10**6), max_size=6),
       st.randoms(use_true_random=False))
def test_streaming_threshold_equals_dense(xs, density, cuts, rnd):
    x = f32(xs)
    chunks = [x[a:b] for a, b in cut(x.numel(), cuts)]
    order2 = chunks[:]
    rnd.shuffle(order2)  # pass 2 may see the chunks in another order
    sel = run_topk(chunks, x.numel(), density, order2)
    k = topk_count(x.numel(), density)
    dense = topk_threshold_dense(x, density)
    assert sel.threshold == dense
    a = x.abs()
    if k == 0:
        assert sel.threshold == math.inf and sel.kept == 0
        return
    # the k-th largest by a plain sort of Python floats
    assert sel.threshold == sorted((abs(float(v)) for v in x), reverse=True)[k - 1]
    assert sel.kept == int((a >= sel.threshold).sum()) >= k
    assert int((a > sel.threshold).sum()) < k
    assert sel.kept == int(magnitude_mask(x, sel.threshold).sum())


@SETTINGS
@given(st.integers(0, 400), densities, st.lists(st.integers(0, 10**6), max_size=5), st.integers(0, 2**31))
def test_distinct_values_keep_exactly_k(n, density, cuts, seed):
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).float().mul_(2).sub_(1)
    x = (torch.randperm(n, generator=g).float() + 1).mul_(0.37).mul_(signs)  # |x| all distinct
    chunks = [x[a:b] for a, b in cut(n, cuts)]
    sel = run_topk(chunks, n, density)
    assert sel.kept == topk_count(n, density)


def test_same_top_bin_needs_second_pass():
    # every value shares the top 16 bits; only the low 16 bits tell them apart
    base = struct.unpack("<I", struct.pack("<f", 1.0))[0]
    bits = torch.tensor([base | i for i in range(0, 65536, 7)], dtype=torch.int32)
    x = bits.view(torch.float32)[torch.randperm(bits.numel(), generator=torch.Generator().manual_seed(1))]
    for density in (1e-4, 0.3, 0.999, 1.0):
        sel = run_topk(list(x.split(1000)), x.numel(), density)
        assert sel.threshold == topk_threshold_dense(x, density)
        assert sel.kept == topk_count(x.numel(), density)


def test_large_random_many_chunkings():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_003, generator=g) * torch.rand(200_003, generator=g).pow(8)
    x[::17] = 0.0
    x[5::31] = x[7]  # heavy ties
    for density in (0.0, 1e-6, 0.05, 0.2, 0.9, 1.0):
        dense = topk_threshold_dense(x, density)
        for size in (200_003, 65_536, 9_999):
            sel = run_topk(list(x.split(size)), x.numel(), density)
            assert sel.threshold == dense
            assert sel.kept == int((x.abs() >= dense).sum()) if density else sel.kept == 0


def test_global_threshold_over_several_tensors():
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(s, generator=g) * sc for s, sc in ((1000, 1.0), (0, 1.0), (37, 50.0), (4096, 0.01))]
    total = sum(t.numel() for t in tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    for density in (0.01, 0.2, 0.5):
        sel = TopKThreshold(total, density)
        for t in tensors:
            for c in t.reshape(-1).split(300):
                sel.update_hi(c)
        sel.finish_hi()
        for t in reversed(tensors):
            sel.update_lo(t)
        sel.finish_lo()
        assert sel.threshold == topk_threshold_dense(flat, density)


def test_half_precision_chunks_are_widened_exactly():
    g = torch.Generator().manual_seed(4)
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(5000, generator=g).to(dt)
        sel = run_topk(list(x.split(777)), x.numel(), 0.2)
        assert sel.threshold == topk_threshold_dense(x.float(), 0.2)


def test_workers_fork_and_merge():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10_000, generator=g)
    x[:500] = 0.25
    chunks = list(x.split(900))
    coordinator = TopKThreshold(x.numel(), 0.3)

    def on_workers(n_workers, update):
        workers = [coordinator.fork() for _ in range(n_workers)]
        for i, c in enumerate(chunks):
            update(workers[i % n_workers], c)
        for w in workers:
            coordinator.merge(w)

    on_workers(3, TopKThreshold.update_hi)
    coordinator.finish_hi()
    on_workers(2, TopKThreshold.update_lo)
    coordinator.finish_lo()
    assert coordinator.threshold == topk_threshold_dense(x, 0.3)
    assert int(coordinator.hist_hi.sum()) == x.numel()
    assert int(coordinator.hist_lo.sum()) == int(coordinator.hist_hi[coordinator.selected_bin])


def test_topk_k_zero_needs_no_data_and_keeps_nothing():
    sel = TopKThreshold(5, 0.0)
    assert not sel.needs_second_pass
    sel.update_hi(torch.ones(5))
    sel.finish_hi()
    sel.update_lo(torch.ones(5))
    sel.finish_lo()
    assert sel.threshold == math.inf and sel.kept == 0
    assert not magnitude_mask(torch.ones(5), sel.threshold).any()
    empty = TopKThreshold(0, 1.0)
    empty.finish_hi()
    empty.finish_lo()
    assert empty.threshold == math.inf


def test_topk_misuse_raises():
    x = torch.randn(10)
    sel = TopKThreshold(10, 0.5)
    with pytest.raises(InputError):
        sel.update_lo(x)           # pass 2 before pass 1 is finished
    with pytest.raises(InputError):
        sel.threshold
    sel.update_hi(x[:4])
    with pytest.raises(InputError):
        sel.finish_hi()            # saw 4 of 10
    sel.update_hi(x[4:])
    sel.finish_hi()
    with pytest.raises(InputError):
        sel.update_hi(x)
    sel.update_lo(x * 2)           # different data in pass 2
    with pytest.raises(InputError):
        sel.finish_lo()
    with pytest.raises(InputError):
        TopKThreshold(10, 0.5).update_hi(x.double())
    with pytest.raises(InputError):
        TopKThreshold(10, 0.5).merge(TopKThreshold(11, 0.5))


# ------------------------------------------------------------------------------------------------
# TIES and task arithmetic vs plain float32 loops
# ------------------------------------------------------------------------------------------------

def ref_sum(rows: list[list[float]]) -> list[float]:
    n = len(rows[0]) if rows else 0
    out = []
    for j in range(n):
        acc = np.float32(0)
        for r in rows:
            acc = np.float32(acc + np.float32(r[j]))
        out.append(float(acc))
    return out


def ref_ties(rows: list[list[float]], thr: list[float], agg: str) -> list[float]:
    out = []
    for j in range(len(rows[0])):
        trimmed = [np.float32(r[j]) if abs(np.float32(r[j])) >= np.float32(t) else np.float32(0)
                   for r, t in zip(rows, thr)]
        s = np.float32(0)
        for v in trimmed:
            s = np.float32(s + v)
        kept = [v for v in trimmed if s != 0 and v != 0 and (v > 0) == (s > 0)]
        acc = np.float32(0)
        for v in kept:
            acc = np.float32(acc + v)
        if agg == "mean":
            acc = np.float32(acc / np.float32(len(kept))) if kept else np.float32(0)
        out.append(float(acc))
    return out


task_rows = st.integers(1, 5).flatmap(
    lambda t: st.integers(0, 25).flatmap(
        lambda n: st.lists(st.lists(st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -1.5]), values),
                                    min_size=n, max_size=n), min_size=t, max_size=t)))


@SETTINGS
@given(task_rows, st.data())
def test_ties_matches_reference(rows, data):
    t = len(rows)
    thr = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, math.inf, 1e-38]), min_size=t, max_size=t))
    taus = f32(rows).reshape(t, -1)
    cuts = data.draw(st.lists(st.integers(0, 100), max_size=3))
    for agg in ("sum", "mean"):
        expected = torch.tensor(ref_ties(rows, thr, agg), dtype=torch.float32) if taus.shape[1] else torch.zeros(0)
        got = ties_merge(taus, f32(thr), agg)
        assert torch.equal(got, expected), (agg, got, expected)
        # the same from a sequence of rows and python-float thresholds, and chunk by chunk
        assert torch.equal(ties_merge(list(taus), thr, agg), expected)
        pieces = [ties_merge(taus[:, a:b], f32(thr), agg) for a, b in cut(taus.shape[1], cuts)]
        assert torch.equal(torch.cat(pieces), expected)


def test_ties_exact_cancellation_keeps_nothing():
    taus = f32([[1.0, 2.0, 0.0], [-1.0, 3.0, 0.0]])
    out = ties_merge(taus, f32([0.0, 0.0]), "mean")
    assert out.tolist() == [0.0, 2.5, 0.0]
    assert ties_merge(taus, f32([0.0, 0.0]), "sum").tolist() == [0.0, 5.0, 0.0]


@SETTINGS
@given(st.integers(1, 4), st.sampled_from(["global", "per_tensor"]), densities, st.integers(0, 2**31))
def test_ties_both_scopes_equal_dense_reference(t, scope, density, seed):
    """End to end over a 'model' of several tensors: streaming thresholds + chunked TIES vs a dense
    reference on the flattened vectors (thresholds by sorting, TIES by plain loops)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (0,), (20,), (2, 2, 2)]
    taus = [[(torch.randn(s, generator=g) * 0.1).round(decimals=2) for s in shapes] for _ in range(t)]
    total = sum(math.prod(s) for s in shapes)
    if scope == "global":
        thr_dense = [[topk_threshold_dense(torch.cat([x.reshape(-1) for x in taus[i]]), density)] * len(shapes)
                     for i in range(t)]
        sels = [TopKThreshold(total, density) for _ in range(t)]
        for i in range(t):
            for x in taus[i]:
                for c in x.reshape(-1).split(5):
                    sels[i].update_hi(c)
            sels[i].finish_hi()
            for x in taus[i]:
                sels[i].update_lo(x.reshape(-1))
            sels[i].finish_lo()
        thr = [[sels[i].threshold] * len(shapes) for i in range(t)]
    else:
        thr_dense = [[topk_threshold_dense(x, density) for x in taus[i]] for i in range(t)]
        thr = [[run_topk(list(x.reshape(-1).split(4)), x.numel(), density).threshold for x in taus[i]]
               for i in range(t)]
    assert thr == thr_dense
    for agg in ("sum", "mean"):
        for j, _ in enumerate(shapes):
            rows = [taus[i][j].reshape(-1).tolist() for i in range(t)]
            if not rows[0]:
                continue
            expected = ref_ties(rows, [thr_dense[i][j] for i in range(t)], agg)
            stacked = torch.stack([taus[i][j].reshape(-1) for i in range(t)])
            got = torch.cat([ties_merge(stacked[:, a:a + 6], [thr[i][j] for i in range(t)], agg)
                             for a in range(0, stacked.shape[1], 6)])
            assert got.tolist() == expected


def test_ties_bad_arguments():
    taus = torch.randn(2, 5)
    with pytest.raises(InputError):
        ties_merge(taus, f32([0.1, 0.1]), agg="median")
    with pytest.raises(InputError):
        ties_merge(taus, f32([0.1]))
    with pytest.raises(InputError):
        ties_merge(taus.double(), f32([0.1, 0.1]))
    with pytest.raises(InputError):
        ties_merge(torch.randn(5), f32([0.1]))
    with pytest.raises(InputError):
        ties_merge([torch.randn(5), torch.randn(4)], [0.1, 0.1])
    with pytest.raises(InputError):
        ties_merge(taus, [0.1, math.nan])


@SETTINGS
@given(task_rows)
def test_task_arithmetic_sequential_sum(rows):
    taus = f32(rows).reshape(len(rows), -1)
    expected = torch.tensor(ref_sum(rows), dtype=torch.float32)
    assert torch.equal(task_arithmetic(taus), expected)
    assert torch.equal(task_arithmetic(list(taus)), expected)


def test_task_arithmetic_order_is_left_to_right():
    # (1e8 + 1) rounds to 1e8 in float32, so left-to-right gives 0; another grouping would give 1
    taus = f32([[1e8], [1.0], [-1e8]])
    assert task_arithmetic(taus).item() == 0.0
    assert task_arithmetic(f32([[1e8], [-1e8], [1.0]])).item() == 1.0
    assert torch.equal(task_arithmetic(torch.zeros(0, 3)), torch.zeros(3))
    with pytest.raises(InputError):
        task_arithmetic([])


# ------------------------------------------------------------------------------------------------
# task vectors and TALL masks
# ------------------------------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.tuples(values, values), max_size=50), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_task_vector_is_one_float32_subtraction(pairs, dtype):
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float32).to(dtype)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float32).to(dtype)
    got = task_vector(a, b)
    assert got.dtype == torch.float32
    with np.errstate(invalid="ignore"):  # float16 overflows 1e30 to inf, and inf - inf = nan
        expected = a.float().numpy() - b.float().numpy()
    np.testing.assert_array_equal(got.numpy(), expected)


def test_task_vector_refuses_float64_and_ints_and_shape_mismatch():
    with pytest.raises(InputError):
        task_vector(torch.zeros(3, dtype=torch.float64), torch.zeros(3))
    with pytest.raises(InputError):
        task_vector(torch.zeros(3, dtype=torch.int64), torch.zeros(3))
    with pytest.raises(InputError):
        task_vector(torch.zeros(3), torch.zeros(4))
    with pytest.raises(InputError):
        task_vector([1.0], torch.zeros(1))


lams = st.one_of(st.sampled_from([0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.1, 1.0, 3e38]), st.floats(0, 100))


@SETTINGS
@given(st.lists(st.tuples(values, values), max_size=60), lams)
def test_tall_mask_matches_formula(pairs, lam):
    t = f32([p[0] for p in pairs])
    mtl = f32([p[1] for p in pairs])
    got = tall_mask(t, mtl, lam)
    tn, mn = t.numpy(), mtl.numpy()
    with np.errstate(over="ignore"):
        expected = np.abs(tn) >= np.float32(lam) * np.abs(mn - tn)
    np.testing.assert_array_equal(got.numpy(), expected)
    # element-wise: chunking cannot change it
    assert torch.equal(torch.cat([tall_mask(a, b, lam) for a, b in zip(t.split(7), mtl.split(7))]), got)


@SETTINGS
@given(st.lists(values, max_size=60), lams)
def test_single_task_keeps_everything(xs, lam):
    t = f32(xs)
    assert bool(tall_mask(t, task_arithmetic(t[None]), lam).all())


def test_tall_mask_huge_lambda_keeps_only_equal_entries():
    g = torch.Generator().manual_seed(7)
    t = torch.randn(1000, generator=g)
    mtl = t + torch.randn(1000, generator=g)
    mtl[::3] = t[::3]
    m = tall_mask(t, mtl, 3e38)
    assert torch.equal(m, mtl == t)
    assert bool(tall_mask(t, mtl, 0.0).all())


def test_tall_mask_boundary_is_inclusive():
    # |τ_t| == λ|τ_MTL − τ_t| exactly: kept with >=
    assert tall_mask(f32([1.0]), f32([3.0]), 0.5).item() is True
    assert tall_mask(f32([1.0]), f32([3.0]), 0.5000001).item() is False


@pytest.mark.parametrize("lam", [-0.1, math.nan, math.inf, 1e39, "0.4", None])
def test_tall_mask_bad_lambda(lam):
    with pytest.raises(InputError):
        tall_mask(torch.ones(3), torch.ones(3), lam)


def test_tall_mask_bad_tensors():
    with pytest.raises(InputError):
        tall_mask(torch.ones(3), torch.ones(4), 0.4)
    with pytest.raises(InputError):
        tall_mask(torch.ones(3, dtype=torch.float64), torch.ones(3), 0.4)


# ------------------------------------------------------------------------------------------------
# consensus and agreement
# ------------------------------------------------------------------------------------------------

mask_sets = st.integers(1, 6).flatmap(
    lambda t: st.integers(0, 40).flatmap(
        lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=t, max_size=t)))


@SETTINGS
@given(mask_sets, st.lists(st.integers(0, 100), max_size=3))
def test_counts_consensus_and_agreement(masks, cuts):
    t, n = len(masks), len(masks[0])
    counts_py = [sum(m[j] for m in masks) for j in range(n)]
    counts = mask_counts(torch.tensor(masks, dtype=torch.bool).reshape(t, n))
    assert counts.tolist() == counts_py
    assert mask_counts([torch.tensor(m, dtype=torch.bool) for m in masks]).tolist() == counts_py
    assert bool(consensus_mask(counts, 0).all())
    assert not bool(consensus_mask(counts, t + 1).any())
    for k in range(t + 2):
        assert consensus_mask(counts, k).tolist() == [c >= k for c in counts_py]
    hist = agreement_histogram(counts, t)
    assert hist.dtype == torch.int64 and hist.numel() == t + 1
    assert int(hist.sum()) == n
    py = Counter(counts_py)
    assert hist.tolist() == [py.get(i, 0) for i in range(t + 1)]
    summed = sum(agreement_histogram(counts[a:b], t) for a, b in cut(n, cuts))
    assert torch.equal(summed, hist)


def test_counts_dtypes_and_many_tasks():
    many = [torch.ones(3, dtype=torch.bool)] * 300
    c = mask_counts(many)
    assert c.tolist() == [300] * 3
    for dt in (torch.uint8, torch.int16, torch.int32, torch.int64):
        counts = torch.tensor([0, 1, 2, 2], dtype=dt)
        assert agreement_histogram(counts, 2).tolist() == [1, 1, 2]
        assert consensus_mask(counts, 2).tolist() == [False, False, True, True]
        assert not consensus_mask(counts, 257).any()  # 257 must not wrap to 1 in uint8


def test_consensus_and_agreement_bad_arguments():
    counts = torch.tensor([0, 1, 2])
    with pytest.raises(InputError):
        consensus_mask(counts, -1)
    with pytest.raises(InputError):
        consensus_mask(counts.float(), 1)
    with pytest.raises(InputError):
        consensus_mask(counts, 1.5)
    with pytest.raises(InputError):
        agreement_histogram(counts, 1)          # a count above T
    with pytest.raises(InputError):
        agreement_histogram(torch.tensor([-1, 0]), 2)
    with pytest.raises(InputError):
        agreement_histogram(counts, -1)
    with pytest.raises(InputError):
        mask_counts([torch.ones(3)])
    with pytest.raises(InputError):
        mask_counts([])


# ------------------------------------------------------------------------------------------------
# merges
# ------------------------------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.tuples(values, values, st.booleans()), max_size=50),
       st.one_of(st.sampled_from([0.0, 1.0, 0.3, -0.7]), st.floats(-10, 10)))
def test_merge_chunk_formula(items, alpha):
    base = f32([i[0] for i in items])
    tau = f32([i[1] for i in items])
    keep = torch.tensor([i[2] for i in items], dtype=torch.bool)
    with np.errstate(over="ignore"):
        a = np.float32(alpha) * tau.numpy()
        full = base.numpy() + a
    got = merge_chunk(base, tau, keep, alpha)
    expected = np.where(keep.numpy(), full, base.numpy())
    np.testing.assert_array_equal(got.numpy().view(np.int32), expected.view(np.int32))  # bit for bit
    np.testing.assert_array_equal(merge_chunk(base, tau, None, alpha).numpy().view(np.int32),
                                  full.view(np.int32))


def test_merge_chunk_decode_and_untouched_bits():
    base = f32([-0.0, 1.0, 2.0])
    tau = f32([5.0, 0.25, -2.0])
    keep = torch.tensor([False, True, True])
    out = merge_chunk(base, tau, keep, 1.0)
    assert out.tolist() == [0.0, 1.25, 0.0]
    assert math.copysign(1.0, out[0].item()) == -1.0   # θ0 kept bit for bit where the mask is 0
    with pytest.raises(InputError):
        merge_chunk(base, tau, keep, math.nan)
    with pytest.raises(InputError):
        merge_chunk(base, tau, keep.int(), 1.0)
    with pytest.raises(InputError):
        merge_chunk(base, tau[:2], None, 1.0)


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------

def direct_stats(theta_hat, theta_t, tau, mtl, mask):
    th, tt = theta_hat.double().numpy(), theta_t.double().numpy()
    tau64, m = tau.double().numpy(), mask.numpy()
    mt = np.where(m, mtl.double().numpy(), 0.0)
    err, nt, nm = np.sum((th - tt) ** 2), np.sum(tau64 ** 2), np.sum(mt ** 2)
    return {
        "mask_density": m.sum() / m.size if m.size else None,
        "rel_error": math.sqrt(err) / math.sqrt(nt) if nt else None,
        "cosine": float(np.dot(mt, tau64) / (math.sqrt(nm) * math.sqrt(nt))) if nt and nm else None,
    }


def _chunk_sums(theta0, theta_t, mtl, mask, a, b):
    """Sums of one chunk [a, b) (a multiple of 8) through the kernel the encoder uses."""
    from tallfmt import kernels
    from tallfmt.compute.tensors import from_torch, to_numpy

    sums = np.zeros(5)
    kernels.mask_stats(to_numpy(theta0[a:b]), to_numpy(theta_t[a:b]), mtl[a:b].numpy(),
                       kernels.pack_bits(mask[a:b].numpy()), sums, dtype=from_torch(theta0.dtype).name)
    return sums


@SETTINGS
@given(st.integers(0, 3000), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       st.integers(0, 2**31), st.lists(st.integers(0, 5000), max_size=4))
def test_task_stats_match_direct_float64(n, dtype, seed, cuts):
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(n, generator=g).to(dtype)
    theta_t = (theta0.float() + 0.01 * torch.randn(n, generator=g)).to(dtype)
    tau = task_vector(theta_t, theta0)
    mtl = tau + 0.01 * torch.randn(n, generator=g)
    mask = tall_mask(tau, mtl, 0.4)
    theta_hat = merge_chunk(theta0.float(), mtl, mask, 1.0).to(dtype)
    whole = TaskStats()
    whole.add(_chunk_sums(theta0, theta_t, mtl, mask, 0, n), n)
    merged = TaskStats()
    for a, b in cut(n, [c // 8 * 8 for c in cuts]):
        s = TaskStats()
        s.add(_chunk_sums(theta0, theta_t, mtl, mask, a, b), b - a)
        merged.merge(s)
    expected = direct_stats(theta_hat, theta_t, tau, mtl, mask)
    for res in (whole.result(), merged.result()):
        assert res.keys() == expected.keys()
        for key, val in expected.items():
            if val is None:
                assert res[key] is None
            else:
                assert res[key] == pytest.approx(val, rel=1e-9, abs=1e-12)
    assert merged.kept == int(mask.sum()) and merged.total == n


def test_task_stats_undefined_values_are_none():
    s = TaskStats()
    assert s.result() == {"mask_density": None, "rel_error": None, "cosine": None}
    s.add([0.0, 0.0, 0.0, 0.0, 1.0], 4)
    assert s.result() == {"mask_density": 0.25, "rel_error": None, "cosine": None}
    s2 = TaskStats()
    s2.add([0.0, 5.0, 0.0, 0.0, 0.0], 2)
    assert s2.result() == {"mask_density": 0.0, "rel_error": 0.0, "cosine": None}
    s3 = TaskStats()
    s3.add([0.0, 5.0, 5.0, 5.0, 2.0], 2)
    assert s3.result() == {"mask_density": 1.0, "rel_error": 0.0, "cosine": 1.0}
    with pytest.raises(InputError):
        s3.add([0.0, 1.0], 2)


# ------------------------------------------------------------------------------------------------
# device-agnostic code and documentation examples
# ------------------------------------------------------------------------------------------------

def test_elementwise_functions_stay_on_the_input_device():
    """The meta device has no data: any hidden CPU tensor or host copy would fail here."""
    dev = torch.device("meta")
    t = torch.empty(10, device=dev)
    mtl = torch.empty(10, device=dev)
    base = torch.empty(10, device=dev)
    keep = torch.empty(10, dtype=torch.bool, device=dev)
    thr = torch.empty(2, device=dev)
    outs = [
        task_vector(t, base), tall_mask(t, mtl, 0.4), magnitude_mask(t, 0.5),
        task_arithmetic(torch.empty(2, 10, device=dev)),
        ties_merge(torch.empty(2, 10, device=dev), thr, "mean"),
        ties_merge([t, mtl], [0.1, math.inf], "sum"),
        mask_counts([keep, keep]), consensus_mask(torch.empty(10, dtype=torch.int32, device=dev), 1),
        merge_chunk(base, mtl, keep, 0.4), merge_chunk(base, mtl, None, 0.4),
    ]
    assert all(o.device == dev for o in outs)


def test_module_never_copies_to_host():
    src = inspect.getsource(mm)
    for forbidden in (".cpu(", ".numpy(", ".half(", ".bfloat16("):
        assert forbidden not in src, forbidden


def test_docstring_examples():
    result = doctest.testmod(mm, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10 and result.failed == 0
