"""Mask math at P parameters and T tasks on CPU torch (default P = 100M, T = 8), as a ratio to a
plain torch ``a + b`` of P float32 timed in the same rounds.

    .venv/bin/python bench/bench_maskmath.py [--p 100000000] [--tasks 8] [--chunk 1048576] [--repeats 3]
    .venv/bin/python bench/bench_maskmath.py --quick     # P = 4M (smoke test)

The T task vectors τ_t are held as P-sized float32 vectors (T × 4P bytes; 3.2 GB at the defaults) and
everything else is streamed in chunks of --chunk elements through tallfmt.maskmath, as the encoder
does — no T×P matrix is formed. Cases (each over all P parameters), cumulative:

  1. τ_MTL = Σ_t τ_t                       (maskmath.task_arithmetic)
  2. 1 + the T TALL masks                  (maskmath.tall_mask, λ = 0.4)
  3. 2 + counts, agreement histogram, consensus mask (k = 2)
                                           (maskmath.mask_counts, agreement_histogram, consensus_mask)
  4. 3 + packing the T masks               (kernels.pack_bits_into, what encode stores)
and, for comparison,
  * TIES τ_MTL with given thresholds       (maskmath.ties_merge, agg sum)
  * one TIES/magnitude global-threshold data pass for T tasks (TopKThreshold.update_hi)
  * archive-side counts: kernels.add_bits of the T packed masks + agreement_histogram (what
    Archive.agreement and the consensus merge do).
Baselines: ``a + b`` (allocates its result, as the brief asks) and ``torch.add(a, b, out=c)``.
Timings are the best of --repeats interleaved rounds; "median" is the median of same-round ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import _common as C  # noqa: E402
from tallfmt import kernels, maskmath  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=int, default=100_000_000)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=1 << 20, help="elements per chunk (encode's default: 2^20)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lam", type=float, default=0.4)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.p, a.repeats = 4_000_000, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    print(C.machine_note(), flush=True)
    P, T, chunk = a.p, a.tasks, a.chunk // 8 * 8
    t0 = time.perf_counter()
    g = torch.Generator()
    g.manual_seed(0)
    # τ_t ~ N(0, 1e-3) with a per-task scale: masks come out at mixed densities
    taus = [torch.randn(P, generator=g).mul_(1e-3 * (1 + 0.25 * t)) for t in range(T)]
    print(f"P = {P:,}, T = {T}, chunk = {chunk:,}: τ_t generated in {time.perf_counter() - t0:.1f} s "
          f"({T * P * 4 / 1e9:.1f} GB)", flush=True)
    tau_mtl = torch.empty(P)
    cons = torch.empty(P, dtype=torch.bool)
    packed = [np.empty((P + 7) // 8, np.uint8) for _ in range(T)]
    hist = torch.zeros(T + 1, dtype=torch.int64)
    out = torch.empty(P)
    thr = torch.full((T,), 2e-3)
    a_, b_ = taus[0], taus[1]

    def stage(level: int):
        def run():
            hist.zero_()
            for s, e in C.iter_chunks(P, chunk):
                cs = [x[s:e] for x in taus]
                m = maskmath.task_arithmetic(cs)
                tau_mtl[s:e] = m
                if level < 2:
                    continue
                masks = [maskmath.tall_mask(x, m, a.lam) for x in cs]
                if level >= 3:
                    counts = maskmath.mask_counts(masks)
                    hist.add_(maskmath.agreement_histogram(counts, T))
                    cons[s:e] = maskmath.consensus_mask(counts, a.k)
                if level >= 4:
                    for t in range(T):
                        kernels.pack_bits_into(masks[t].numpy(), packed[t][s // 8:(e + 7) // 8])
        return run

    def ties():
        for s, e in C.iter_chunks(P, chunk):
            tau_mtl[s:e] = maskmath.ties_merge([x[s:e] for x in taus], thr, agg="sum")

    def topk_pass():
        sel = [maskmath.TopKThreshold(P, 0.2) for _ in range(T)]
        for s, e in C.iter_chunks(P, chunk):
            for t in range(T):
                sel[t].update_hi(taus[t][s:e])
        return sel

    def archive_counts():
        hist.zero_()
        for s, e in C.iter_chunks(P, chunk):
            c = np.zeros(e - s, np.uint16)
            for t in range(T):
                kernels.add_bits(c, packed[t][s // 8:(e + 7) // 8], e - s)
            hist.add_(maskmath.agreement_histogram(torch.from_numpy(c.astype(np.int64)), T))

    cases = [
        ("baseline: a + b (P float32, allocates)", lambda: a_ + b_),
        ("baseline: torch.add(a, b, out=c)", lambda: torch.add(a_, b_, out=out)),
        ("1. τ_MTL = Σ τ_t (task_arithmetic)", stage(1)),
        ("2. + T TALL masks", stage(2)),
        ("3. + counts + agreement histogram + consensus mask", stage(3)),
        ("4. + packing the T masks (numba)", stage(4)),
        ("TIES τ_MTL (ties_merge, thresholds given)", ties),
        ("one global top-k pass, T tasks (TopKThreshold.update_hi)", topk_pass),
        ("archive-side counts: add_bits × T + histogram", archive_counts),
    ]
    stage(4)()  # fill packed masks for the archive-side case (and warm everything)
    tm = C.interleaved(cases, a.repeats, warmup=0)
    base = tm[cases[0][0]]
    base_out = tm[cases[1][0]]
    rows = []
    for name, _ in cases:
        x = tm[name]
        rows.append([name, f"{x.best:.3f} s", f"{P / x.best / 1e9:.2f}", C.fmt_ratio(x, base),
                     C.fmt_ratio(x, base_out)])
    print(f"\nkept by exactly n of {T} masks (n = 0..{T}): {hist.tolist()}; consensus k={a.k} keeps "
          f"{int(cons.sum()) / P:.3f} of P\n")
    print(C.md_table(["case (all P parameters)", "best", "Gparam/s", "× a + b", "× add(out=)"], rows))
    print("\n" + C.machine_note())


if __name__ == "__main__":
    main()
