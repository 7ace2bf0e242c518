"""Global thresholds (TIES global trim, global magnitude masks, FORMAT.md §4.2–4.3): exact per-task
k-th largest |τ_t| over all masked parameters, by a two-pass radix select whose histograms add up
across tensors, shards and workers (:class:`tallfmt.compute.maskmath.TopKThreshold`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from tallfmt import kernels
from tallfmt.compute import maskmath
from tallfmt.compute.tensors import to_numpy
from tallfmt.write.inputs import Inputs, flat
from tallfmt.write.plan import TensorPlan

#: The two histogram passes: (update method, finish method).
PASSES = (("update_hi", "finish_hi"), ("update_lo", "finish_lo"))

Selections = list[list[maskmath.TopKThreshold]]  # [step][task]


def new_selections(densities: Sequence[float], total: int, n_tasks: int, device: str) -> Selections:
    """One accumulator per task for each selection (density), over ``total`` parameters."""
    return [[maskmath.TopKThreshold(total, d, device=device) for _ in range(n_tasks)] for d in densities]


def fork(selections: Selections) -> Selections:
    """Empty copies in the current pass, for a worker to fill."""
    return [[s.fork() for s in sel] for sel in selections]


def merge_into(selections: Selections, part: Selections) -> None:
    """Add a worker's histograms into ``selections``."""
    for sel, got in zip(selections, part):
        for s, f in zip(sel, got):
            s.merge(f)


def finish(selections: Selections, method: str) -> None:
    for sel in selections:
        for s in sel:
            getattr(s, method)()


def fused_on(device: torch.device) -> bool:
    """Whether encode work on ``device`` runs in the numba kernels (the CPU) rather than in torch."""
    return device.type == "cpu"


def sweep(inputs: Inputs, plan: TensorPlan, selections: Selections, method: str, device: torch.device,
          chunk: int) -> None:
    """Add one masked tensor's |τ_t| to every selection, in the pass ``method`` names."""
    if fused_on(device):
        _sweep_kernels(inputs, plan, selections, method)
    else:
        _sweep_torch(inputs, plan, selections, method, device, chunk)
    inputs.release(plan.name)


def _sweep_kernels(inputs: Inputs, plan: TensorPlan, selections: Selections, method: str) -> None:
    n = plan.numel
    x = kernels.TensorInputs(plan.dtype, to_numpy(flat(inputs.base, plan.name)),
                             [to_numpy(flat(ck, plan.name)) for ck in inputs.cks])
    if method == "update_hi":  # one histogram serves every selection: they differ only in k
        hist = np.zeros((len(inputs.cks), kernels.HI_BINS), dtype=np.int64)
        kernels.hist_hi_chunk(x, 0, n, hist)
        for sel in selections:
            for t, s in enumerate(sel):
                s.add_counts("hi", torch.from_numpy(hist[t]), n)
        return
    for sel in selections:
        hist = np.zeros((len(inputs.cks), kernels.LO_BINS), dtype=np.int64)
        kernels.hist_lo_chunk(x, 0, n, [s.selected_bin or 0 for s in sel], hist)
        for t, s in enumerate(sel):
            s.add_counts("lo", torch.from_numpy(hist[t]), n)


def _sweep_torch(inputs: Inputs, plan: TensorPlan, selections: Selections, method: str, device: torch.device,
                 chunk: int) -> None:
    b = flat(inputs.base, plan.name)
    flats = [flat(ck, plan.name) for ck in inputs.cks]
    for s in range(0, b.numel(), chunk):
        e = min(b.numel(), s + chunk)
        theta0 = b[s:e].to(device, dtype=torch.float32)
        for t, f in enumerate(flats):
            tau = maskmath.task_vector(f[s:e].to(device, dtype=torch.float32), theta0)
            for sel in selections:
                getattr(sel[t], method)(tau)


def tensor_thresholds(inputs: Inputs, plan: TensorPlan, density: float, device: torch.device,
                      chunk: int) -> torch.Tensor:
    """Per-task thresholds over one tensor (per_tensor scope): both passes over that tensor alone."""
    sels = new_selections([density], plan.numel, len(inputs.cks), str(device))
    for method, finish_method in PASSES:
        sweep(inputs, plan, sels, method, device, chunk)
        finish(sels, finish_method)
    return as_tensor(sels[0], device)


def as_tensor(selection: Sequence[maskmath.TopKThreshold], device: torch.device | str) -> torch.Tensor:
    """The thresholds of one selection, float32, +inf where nothing is kept."""
    return torch.tensor([s.threshold for s in selection], dtype=torch.float32, device=device)


def as_index_values(selection: Sequence[maskmath.TopKThreshold]) -> tuple[float | None, ...]:
    """The thresholds as the index records them (FORMAT.md §9.2): None where k = 0."""
    return tuple(None if s.k == 0 else s.threshold for s in selection)


def total_params(plans: Sequence[TensorPlan]) -> int:
    return sum(math.prod(p.shape) for p in plans if p.role == "masked")
