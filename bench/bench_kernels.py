"""Benchmark of tallfmt's numba bit kernels against numpy/torch, measured side by side in one run.

    .venv/bin/python bench/bench_kernels.py [--n 64000000] [--repeats 11] [--density 0.3]

Throughputs are the best of --repeats runs. The cases are interleaved round by round, so on a noisy
(shared) machine the ratios are also given as the median over rounds of the ratio of the two cases'
times in the same round. Compile time is excluded (every function is warmed up first).
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tallfmt import kernels  # noqa: E402
from tallfmt.kernels import core as kernel_core  # noqa: E402

Case = tuple[str, str, Callable[[], object], float, str]  # group, name, fn, units per call, unit


def _storage(t: torch.Tensor, np_dtype: type) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np_dtype)


def build_cases(n: int, density: float) -> list[Case]:
    rng = np.random.default_rng(0)
    bits = rng.random(n) < density
    bits_u8 = bits.view(np.uint8)
    packed = np.packbits(bits, bitorder="little")
    copy_dst = np.empty(n, np.uint8)
    base = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float32)
    tau = (rng.standard_normal(n, dtype=np.float32) * 0.002).astype(np.float32)
    out32 = np.empty(n, np.float32)
    tb = torch.from_numpy(base)
    bf16 = tb.to(torch.bfloat16)
    f16 = tb.to(torch.float16)
    b16 = _storage(bf16, np.uint16)
    h16 = _storage(f16, np.float16)
    out16 = np.empty(n, np.uint16)
    outh = np.empty(n, np.float16)
    tmask = torch.from_numpy(bits)
    ttau = torch.from_numpy(tau)
    counts = np.zeros(n, np.uint16)
    g = "GB/s bool"
    p = "Gparam/s"

    def two_pass_bf16() -> object:
        # the alternative to in-kernel rounding: decode in float32, then round with torch
        kernels.decode_masked(bf16.float().numpy(), tau, packed, out=out32)
        return torch.from_numpy(out32).to(torch.bfloat16)

    def threaded(fn: Callable[[int, int], object]) -> Callable[[], object]:
        half = (n // 2) // 64 * 64

        def run() -> None:
            ts = [threading.Thread(target=fn, args=(0, half)), threading.Thread(target=fn, args=(half, n))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return run

    def dec_slice(s: int, e: int) -> None:
        kernels.decode_masked(base[s:e], tau[s:e], packed[s // 8:(e + 7) // 8], out=out32[s:e])

    def add_slice(s: int, e: int) -> None:
        np.add(base[s:e], tau[s:e], out=out32[s:e])

    return [
        ("pack", "np.copyto of the bool bytes", lambda: np.copyto(copy_dst, bits_u8), n, g),
        ("pack", "np.packbits(bitorder=little)", lambda: np.packbits(bits, bitorder="little"), n, g),
        ("pack", "kernels.pack_bits (bool)", lambda: kernels.pack_bits(bits), n, g),
        ("pack", "kernels.pack_bits (uint8, normalised)", lambda: kernels.pack_bits(bits_u8), n, g),
        ("unpack", "np.copyto of the bool bytes", lambda: np.copyto(copy_dst, bits_u8), n, g),
        ("unpack", "np.unpackbits(bitorder=little)",
         lambda: np.unpackbits(packed, count=n, bitorder="little"), n, g),
        ("unpack", "kernels.unpack_bits", lambda: kernels.unpack_bits(packed, n), n, g),
        ("decode", "np.add(a, b, out) float32 (dense add)", lambda: np.add(base, tau, out=out32), n, p),
        ("decode", "kernels.decode_masked F32", lambda: kernels.decode_masked(base, tau, packed, out=out32), n, p),
        ("decode", "kernels.decode_masked BF16",
         lambda: kernels.decode_masked(b16, tau, packed, out=out16, dtype="BF16"), n, p),
        ("decode", "kernels.decode_masked F16", lambda: kernels.decode_masked(h16, tau, packed, out=outh), n, p),
        ("decode", "np.unpackbits + np.where + add, F32",
         lambda: np.where(np.unpackbits(packed, count=n, bitorder="little").view(bool), base + tau, base), n, p),
        ("decode", "F32 decode of upcast base + torch round, BF16", two_pass_bf16, n, p),
        ("decode", "torch.where(mask, (b.float()+tau).to(bf16), b) (mask unpacked)",
         lambda: torch.where(tmask, (bf16.float() + ttau).to(torch.bfloat16), bf16), n, p),
        ("decode", "np.add dense, 2 threads on halves", threaded(add_slice), n, p),
        ("decode", "kernels.decode_masked F32, 2 threads on halves", threaded(dec_slice), n, p),
        ("count", "np.unpackbits + counts += bits",
         lambda: np.add(counts, np.unpackbits(packed, count=n, bitorder="little"), out=counts), n, p),
        ("count", "kernels.add_bits (uint16 counts)", lambda: kernels.add_bits(counts, packed, n), n, p),
        ("count", "np.bitwise_count(packed).sum()", lambda: int(np.bitwise_count(packed).sum()), n, p),
        ("count", "kernels.popcount", lambda: kernels.popcount(packed, n), n, p),
    ]


TARGETS = [  # (what, our case, reference case, target ratio or None)
    ("pack_bits (bool) / np.packbits", "kernels.pack_bits (bool)", "np.packbits(bitorder=little)", 1.0),
    ("pack_bits (uint8) / np.packbits", "kernels.pack_bits (uint8, normalised)", "np.packbits(bitorder=little)", 1.0),
    ("unpack_bits / np.unpackbits", "kernels.unpack_bits", "np.unpackbits(bitorder=little)", None),
    ("decode_masked F32 / dense add", "kernels.decode_masked F32", "np.add(a, b, out) float32 (dense add)", 0.85),
    ("decode_masked BF16 / dense float32 add", "kernels.decode_masked BF16",
     "np.add(a, b, out) float32 (dense add)", 0.85),
    ("decode_masked F16 / dense float32 add", "kernels.decode_masked F16",
     "np.add(a, b, out) float32 (dense add)", 0.85),
]


def measure(cases: list[Case], repeats: int) -> list[list[float]]:
    """Seconds per call of every case in every round (cases interleaved within a round)."""
    for c in cases:
        c[2]()  # warm-up: numba compile / cache load, page faults of outputs
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for k, c in enumerate(cases):
            t0 = time.perf_counter()
            c[2]()
            times[k].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64_000_000, help="elements (bits) per array")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--density", type=float, default=0.3, help="fraction of set mask bits")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = build_cases(a.n, a.density)
    times = measure(cases, a.repeats)
    best = [min(ts) for ts in times]
    print(f"n={a.n:,} density={a.density} repeats={a.repeats}, torch threads=1, {platform.machine()}, "
          f"numba float16 conversion: {'F16C' if kernel_core.NATIVE_HALF else 'integer'}")
    print("| group | case | throughput (best of repeats) | × first row of group |")
    print("|---|---|---|---|")
    first: dict[str, float] = {}
    for (group, name, _, units, unit), t in zip(cases, best):
        first.setdefault(group, t)
        print(f"| {group} | {name} | {units / t / 1e9:.2f} {unit} | {first[group] / t:.2f}× |")
    k = {c[1]: i for i, c in enumerate(cases)}
    print()
    print("| ratio | best/best | median of same-round ratios | target |")
    print("|---|---|---|---|")
    for what, ours, theirs, target in TARGETS:
        r_best = best[k[theirs]] / best[k[ours]]
        r_med = float(np.median(np.array(times[k[theirs]]) / np.array(times[k[ours]])))
        verdict = "" if target is None else f"≥ {target:.2f}×: {'met' if min(r_best, r_med) >= target else 'MISSED'}"
        print(f"| {what} | {r_best:.2f}× | {r_med:.2f}× | {verdict} |")


if __name__ == "__main__":
    main()
