"""Thresholds of the top-k steps (TIES trim, magnitude masks; FORMAT.md §4.2–4.3): the exact k-th largest
|τ_t| per task, by a radix select on the float32 bits — the top 16 bits first, then the low 16 bits
inside the chosen bin. Counts are integers, so histograms add up exactly across tensors, shards and
workers.

Per tensor (``per_tensor`` scope) both passes read the tensor. Over all masked tensors (``global``
scope) the inputs are read twice in all, pass 1 and the encode pass: a small sample first (about
1/64 of the candidate tensors, at least 2^15 elements, in blocks) estimates where each task's threshold lies, and pass 1 —
which also decides every tensor's role — keeps, besides the top-16-bit histograms, the low-16-bit
histograms of a window of bins around that estimate. The threshold is then exact whenever its bin
falls inside the window; only when the sample misjudged does one more pass over the masked tensors
count the low bits of the true bin (:func:`lo_pass`), so the result is exact in every case.
"""

from __future__ import annotations

import fnmatch
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tallfmt import kernels
from tallfmt.compute import maskmath
from tallfmt.compute.tensors import to_numpy
from tallfmt.format.dtypes import MASKABLE
from tallfmt.write.inputs import Inputs, flat
from tallfmt.write.plan import COMMON, TensorPlan, decide_role

HI = kernels.HI_BINS
#: Bytes the window histograms of pass 1 may take (over every task and selection) before the window
#: narrows; a narrower window only makes a third pass likelier, never a threshold less exact.
WINDOW_BYTES = 64 << 20
MAX_WINDOW = 64
SAMPLE_FRACTION = 1 / 64
SAMPLE_MIN = 1 << 15  # elements sampled at least (all of a smaller model): the estimate's spread is ~1/√that
SAMPLE_BLOCK = 1024   # elements per sampled block: contiguous runs, a few pages each


def fused_on(device: torch.device) -> bool:
    """Whether encode work on ``device`` runs in the numba kernels (the CPU) rather than in torch."""
    return device.type == "cpu"


def _tensor_inputs(inputs: Inputs, plan: TensorPlan) -> kernels.TensorInputs:
    return kernels.TensorInputs(plan.dtype, to_numpy(flat(inputs.base, plan.name)),
                                [to_numpy(flat(ck, plan.name)) for ck in inputs.cks])


def _abs_bits(inputs: Inputs, plan: TensorPlan, device: torch.device, s: int, e: int
              ) -> tuple[list[torch.Tensor], list[bool]]:
    """The torch path: |τ_t| float32 bits (int64) of elements [s, e) per task, and whether θ_t's bits
    differ from θ0's there."""
    b = flat(inputs.base, plan.name)[s:e]
    out, differs = [], []
    theta0 = b.to(device, dtype=torch.float32)
    for ck in inputs.cks:
        x = flat(ck, plan.name)[s:e]
        tau = maskmath.task_vector(x.to(device, dtype=torch.float32), theta0)
        out.append(tau.view(torch.int32).bitwise_and(0x7FFFFFFF).to(torch.int64))
        differs.append(not torch.equal(x.view(torch.uint8), b.view(torch.uint8)))
    return out, differs


def from_top(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The highest bin b with at least k entries in bins ≥ b, and how many entries lie above b."""
    cum = np.cumsum(hist[::-1])
    j = min(int(np.searchsorted(cum, k)), cum.shape[0] - 1)  # k beyond the count: bin 0 (scaled samples only)
    b = hist.shape[0] - 1 - j
    return b, int(cum[j] - hist[b])


def _bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# --- per tensor (per_tensor scope) ------------------------------------------------------------------
def tensor_thresholds(inputs: Inputs, plan: TensorPlan, density: float, device: torch.device,
                      chunk: int) -> torch.Tensor:
    """Per-task thresholds over one tensor (float32, +inf where k = 0): both passes over that tensor."""
    n, nt = plan.numel, len(inputs.cks)
    k = maskmath.topk_count(n, density)
    hi = np.zeros((nt, HI), dtype=np.int64)
    _accumulate(inputs, plan, device, chunk, hi, None, None, np.zeros(nt, np.uint8))
    bins = [from_top(hi[t], k) for t in range(nt)] if k else [(0, 0)] * nt
    lo = lo_pass(inputs, [plan], [[b for b, _ in bins]], device, chunk)[0] if k else None
    out = []
    for t in range(nt):
        if k == 0:
            out.append(math.inf)
            continue
        b, above = bins[t]
        low, _ = from_top(lo[t, 1:HI + 1], k - above)
        out.append(_bits_to_float((b << 16) | low))
    return torch.tensor(out, dtype=torch.float32, device=device)


def _accumulate(inputs: Inputs, plan: TensorPlan, device: torch.device, chunk: int, hi: np.ndarray,
                starts: np.ndarray | None, lo: np.ndarray | None, differs: np.ndarray,
                ranges: Sequence[tuple[int, int]] | None = None) -> None:
    """Add elements of ``ranges`` (default: the whole tensor) of one tensor into the pass-1 histograms:
    ``hi`` (T, HI), and with ``starts`` (S, T) the windows ``lo`` (S, T, width, HI); ``differs`` (T,)."""
    nt = len(inputs.cks)
    if starts is None:
        starts = np.zeros((0, nt), np.int64)
        lo = np.zeros((0, nt, 1, HI), np.int64)
    width = lo.shape[2]
    ranges = ranges if ranges is not None else [(s, min(plan.numel, s + chunk)) for s in range(0, plan.numel, chunk)]
    if fused_on(device):
        x = _tensor_inputs(inputs, plan)
        for s, e in ranges:
            kernels.hist_window_chunk(x, s, e, starts, width, hi, lo, differs)
        return
    for s, e in ranges:
        bits, diff = _abs_bits(inputs, plan, device, s, e)
        for t, a in enumerate(bits):
            differs[t] |= diff[t]
            hi[t] += torch.bincount(a >> 16, minlength=HI).cpu().numpy()
            for sel in range(starts.shape[0]):
                b = (a >> 16) - int(starts[sel, t])
                keep = (b >= 0) & (b < width)
                idx = b[keep] * HI + (a[keep] & 0xFFFF)
                lo[sel, t] += torch.bincount(idx, minlength=width * HI).cpu().numpy().reshape(width, HI)


def lo_pass(inputs: Inputs, plans: Sequence[TensorPlan], bins: Sequence[Sequence[int]], device: torch.device,
            chunk: int) -> np.ndarray:
    """For each selection s: per task t, the low-16-bit histogram inside bin ``bins[s][t]`` over the
    masked ``plans``, as (S, T, HI + 2): below the bin, its 65536 low halves, above it."""
    nt = len(inputs.cks)
    out = np.zeros((len(bins), nt, HI + 2), dtype=np.int64)
    for p in plans:
        if fused_on(device):
            x = _tensor_inputs(inputs, p)
            for s, sel in enumerate(bins):
                kernels.hist_lo_chunk(x, 0, p.numel, sel, out[s])
        else:
            for s0 in range(0, p.numel, chunk):
                bits, _ = _abs_bits(inputs, p, device, s0, min(p.numel, s0 + chunk))
                for s, sel in enumerate(bins):
                    for t, a in enumerate(bits):
                        idx = (a - (sel[t] << 16)).clamp_(-1, HI).add_(1)
                        out[s, t] += torch.bincount(idx, minlength=HI + 2).cpu().numpy()
        inputs.release(p.name)
    return out


# --- over all masked tensors (global scope) ---------------------------------------------------------
@dataclass(frozen=True)
class Windows:
    """Where pass 1 keeps low-bit histograms: per selection s and task t, the ``width`` top-16-bit bins
    starting at ``starts[s, t]``."""

    starts: np.ndarray  # (S, T) int64
    width: int


def is_candidate(plan: TensorPlan, per_task_globs: Sequence[str]) -> bool:
    """A tensor that becomes masked unless it turns out equal in every checkpoint."""
    return plan.role == COMMON and plan.dtype in MASKABLE and not any(
        fnmatch.fnmatchcase(plan.name, g) for g in per_task_globs)


def sample_windows(inputs: Inputs, plans: Sequence[TensorPlan], densities: Sequence[float],
                   per_task_globs: Sequence[str], device: torch.device, chunk: int) -> Windows:
    """Windows around where each task's threshold lies, from a sample of the candidate tensors."""
    nt = len(inputs.cks)
    width = int(max(1, min(MAX_WINDOW, WINDOW_BYTES // max(1, len(densities) * nt * HI * 8))))
    cands = [p for p in plans if is_candidate(p, per_task_globs)]
    total = sum(p.numel for p in cands)
    hist = np.zeros((nt, HI), dtype=np.int64)
    seen = differing = 0
    fraction = min(1.0, max(SAMPLE_FRACTION, SAMPLE_MIN / max(1, total)))
    for p in cands:
        n = p.numel
        want = max(8, math.ceil(n * fraction))               # elements to sample, in evenly spaced blocks
        blocks = math.ceil(want / SAMPLE_BLOCK)
        size = math.ceil(want / blocks / 8) * 8
        starts = np.linspace(0, max(0, n - size), blocks).astype(np.int64) // 8 * 8
        ranges = [(int(s), int(min(n, s + size))) for s in np.unique(starts)]
        differs = np.zeros(nt, np.uint8)
        _accumulate(inputs, p, device, chunk, hist, None, None, differs, ranges)
        seen += sum(e - s for s, e in ranges)
        differing += n if differs.any() else 0
        inputs.release(p.name)
    starts = np.zeros((len(densities), nt), dtype=np.int64)
    if seen == 0:
        return Windows(starts, width)
    scale = total / seen
    for s, density in enumerate(densities):
        for t in range(nt):
            # k lies between the count over the candidates that differ in the sample and over all of them
            ks = [maskmath.topk_count(n, density) for n in (differing, total)]
            bins = [from_top(hist[t] * scale, k)[0] for k in ks if k > 0]
            if bins:
                mid = (min(bins) + max(bins)) // 2
                starts[s, t] = min(max(0, mid - width // 2), HI - width)
    return Windows(starts, width)


@dataclass
class Pass1:
    """One shard's pass 1: the role of each of its tensors and its histograms."""

    roles: list[str]
    hi: np.ndarray        # (T, HI)
    lo: np.ndarray        # (S, T, width, HI)
    masked: int           # elements of its masked tensors


def pass1(inputs: Inputs, plans: Sequence[TensorPlan], windows: Windows, per_task_globs: Sequence[str],
          device: torch.device, chunk: int, progress: Callable[[int], None] | None = None) -> Pass1:
    """Decide every role and count the |τ_t| of the masked tensors into the histograms, reading each
    tensor once."""
    nt = windows.starts.shape[1]
    hi = np.zeros((nt, HI), dtype=np.int64)
    lo = np.zeros((windows.starts.shape[0], nt, windows.width, HI), dtype=np.int64)
    roles, masked = [], 0
    for p in plans:
        role = p.role
        if is_candidate(p, per_task_globs):
            differs = np.zeros(nt, np.uint8)
            _accumulate(inputs, p, device, chunk, hi, windows.starts, lo, differs)
            role = "masked" if differs.any() else "shared"
            if role == "masked":
                masked += p.numel
            else:  # equal in every checkpoint: all its n counts went to |τ| = +0, bits 0, which takes them back
                hi[:, 0] -= p.numel
                for sel in range(lo.shape[0]):
                    for t in range(nt):
                        if windows.starts[sel, t] == 0:
                            lo[sel, t, 0, 0] -= p.numel
            inputs.release(p.name)
        elif role == COMMON:
            role = decide_role(inputs, p, per_task_globs)
        roles.append(role)
        if progress is not None:
            progress(inputs.tensor_bytes(p.name))
    return Pass1(roles, hi, lo, masked)


def choose(hi: np.ndarray, lo: np.ndarray, windows: Windows, densities: Sequence[float], total: int
           ) -> tuple[list[list[float | None]], list[tuple[int, int, int, int]]]:
    """Thresholds from pass 1's summed histograms: per selection, per task, the float32 threshold, or None
    where k = 0 (nothing kept), or -1.0 as a placeholder where the true bin lies outside the window.
    Returns them and the misses as (selection, task, bin, entries above the bin)."""
    out: list[list[float | None]] = []
    misses = []
    for s, density in enumerate(densities):
        k = maskmath.topk_count(total, density)
        row: list[float | None] = []
        for t in range(hi.shape[0]):
            if k == 0:
                row.append(None)
                continue
            b, above = from_top(hi[t], k)
            w = b - int(windows.starts[s, t])
            if 0 <= w < windows.width:
                low, _ = from_top(lo[s, t, w], k - above)
                row.append(_bits_to_float((b << 16) | low))
            else:
                row.append(-1.0)
                misses.append((s, t, b, above))
        out.append(row)
    return out, misses


def choose_bin(hist: np.ndarray, total: int, density: float) -> int:
    """The top-16-bit bin that holds one task's k-th largest |τ_t| (any bin when k = 0)."""
    k = maskmath.topk_count(total, density)
    return from_top(hist, k)[0] if k else 0


def settle(values: list[list[float | None]], misses: Sequence[tuple[int, int, int, int]], lo: np.ndarray,
           densities: Sequence[float], total: int) -> None:
    """Fill in the missed thresholds from a lo_pass over the true bins (``lo``: (S, T, HI + 2))."""
    for s, t, b, above in misses:
        k = maskmath.topk_count(total, densities[s])
        low, _ = from_top(lo[s, t, 1:HI + 1], k - above)
        values[s][t] = _bits_to_float((b << 16) | low)


def as_tensor(values: Sequence[float | None]) -> torch.Tensor:
    """Thresholds as the encoders take them: float32, +inf where nothing is kept."""
    return torch.tensor([math.inf if v is None else v for v in values], dtype=torch.float32)
