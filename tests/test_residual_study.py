"""The residual study's coding helpers (bench/zoo/residual_study.py): exact top-k, the gap stream it
measures is decodable back to the positions, budgets fit, and residuals land where they belong."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.zoo.residual_study import (PLANES, Layout, Option, add_residual, coded_bytes, fit_budget,  # noqa: E402
                                      gaps, knapsack, ranked, varint)


def layout(*sizes: int) -> Layout:
    return Layout([f"t{i}" for i in range(len(sizes))], np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def test_ranked_is_exact_top_k_with_ties_to_the_lower_position():
    d = np.array([0.5, -2.0, 1.0, -1.0, 1.0, 0.0, 3.0], dtype=np.float32)
    assert ranked(d, 3).tolist() == [6, 1, 2]
    assert ranked(d, 4).tolist() == [6, 1, 2, 3]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000).astype(np.float32).round(1)  # many ties
    top = ranked(x, 777)
    ref = np.lexsort((np.arange(x.size), -np.abs(x)))[:777]
    assert top.tolist() == ref.tolist()


def test_gap_stream_decodes_back_to_the_positions_across_tensor_boundaries():
    lay = layout(5, 1, 0, 7, 3)
    pos = np.array([0, 4, 5, 6, 12, 13, 15], dtype=np.int64)  # first and last of tensors, a 1-element tensor
    g, counts = gaps(lay, pos)
    assert counts.tolist() == [2, 1, 0, 2, 2]
    stored = np.frombuffer(PLANES.decode(PLANES.encode(g.view(np.uint8), 4), g.nbytes, 4), dtype="<u4")
    back, i = [], 0
    for t, n in enumerate(counts):
        p = -1
        for _ in range(n):
            p += int(stored[i]) + 1
            back.append(int(lay.offsets[t]) + p)
            i += 1
    assert back == pos.tolist()


def test_varint_is_leb128():
    assert varint(np.array([0, 1, 127, 128, 300, 2**32 - 1])).tolist() == [
        0, 1, 127, 0x80, 1, 0xAC, 2, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_budget_fits_and_grows_with_the_budget(dtype):
    rng = np.random.default_rng(1)
    lay = layout(40_000, 25_000, 35_000)
    d = (rng.standard_normal(lay.numel) * 1e-3).astype(np.float32)
    top = ranked(d, lay.numel // 8)
    ks = []
    for b in (0.1, 0.25, 0.5):
        k, nbytes = fit_budget(lay, d, top, b * lay.numel, dtype)
        pos = np.sort(top[:k])
        assert nbytes == coded_bytes(lay, pos, d[pos], dtype)
        assert 8 * nbytes["total"] <= b * lay.numel
        k2 = int(k * 1.02) + 1  # the largest k, to the search's 0.5 %: a little more no longer fits
        pos2 = np.sort(top[:k2])
        assert 8 * coded_bytes(lay, pos2, d[pos2], dtype)["total"] > b * lay.numel
        ks.append(k)
    assert ks == sorted(ks) and ks[0] > 0
    assert fit_budget(lay, d, top, 0.0, dtype)[0] == 0


def test_add_residual_adds_each_value_at_its_position():
    lay = layout(6, 4)
    sd = {"t0": torch.zeros(2, 3), "t1": torch.ones(4)}
    pos = np.array([1, 5, 7], dtype=np.int64)
    add_residual(sd, lay, pos, np.array([0.5, -1.0, 2.0], dtype=np.float32))
    assert sd["t0"].tolist() == [[0.0, 0.5, 0.0], [0.0, 0.0, -1.0]]
    assert sd["t1"].tolist() == [1.0, 3.0, 1.0, 1.0]


def test_knapsack_finds_the_best_choice_under_the_limit_by_brute_force():
    import itertools

    rng = np.random.default_rng(2)
    options = {t: [Option(lam, b, int(rng.integers(1, 40)) * 4096, float(rng.uniform(0.9, 1.02)))
                   for lam in (0.2, 0.4) for b in (0.0, 0.5)] for t in "abc"}
    fixed = 10 * 4096
    for limit in (fixed + 30 * 4096, fixed + 70 * 4096):
        for objective in ("mean", "shortfall"):
            got = knapsack(options, fixed, limit, objective)

            def key(combo):
                s = [o.score for o in combo]
                if objective == "mean":
                    return round(sum(s), 9)
                return round(sum(min(x, 0.98) for x in s), 9), round(sum(s), 9)

            fits = [c for c in itertools.product(*options.values()) if fixed + sum(o.bytes for o in c) <= limit]
            if not fits:
                assert got is None
                continue
            best = max(fits, key=key)
            chosen = [next(o for o in options[t] if (o.lam, o.budget) == got["choice"][t]) for t in options]
            assert key(chosen) == key(best) and got["estimated_bytes"] <= limit
    assert knapsack(options, fixed, fixed + 2 * 4096, "mean") is None  # three tasks need at least 3 units
