"""The per-shard work of an encode: plain functions of an immutable :class:`ShardJob`, so they run in
this process or on a Dask worker alike. A single-file archive is the one-shard case.

Everything a shard's bytes depend on is in its job: the math is element-wise float32 and the
statistics are sequential float64 sums (FORMAT.md §4.5), so a shard is the same file on any worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tallfmt.compute import maskmath
from tallfmt.format.container import ContainerWriter
from tallfmt.format.header import Header, TaskEntry
from tallfmt.format.index import read_header_xxh3, shard_name
from tallfmt.write import thresholds as th
from tallfmt.write.inputs import Inputs, open_inputs
from tallfmt.write.options import EncodeOptions
from tallfmt.write.plan import COMMON, TensorPlan, decide_role
from tallfmt.write.report import RoleSummary
from tallfmt.write.tensor import TensorEncoder


@dataclass(frozen=True)
class ShardJob:
    """What one shard's work needs: the checkpoint sources, the options and the shard's tensor plans."""

    base: Any
    tasks: tuple[tuple[str, Any], ...]
    options: EncodeOptions
    plans: tuple[TensorPlan, ...]


@dataclass
class ShardResult:
    """What encoding one shard returns to the driver: the file, its identity, statistics and roles."""

    path: str
    size: int
    header_xxh3: str
    stats: list[maskmath.TaskStats]
    summary: RoleSummary


Progress = Callable[[int], None] | None  # told the input bytes of each tensor a pass is done with


@contextmanager
def _opened(job: ShardJob) -> Iterator[Inputs]:
    with open_inputs(job.base, job.tasks) as inputs:
        yield inputs


def shard_roles(job: ShardJob, progress: Progress = None) -> list[str]:
    """Step 1 of a global selection: the role of each of the shard's tensors (reads common ones)."""
    roles = []
    with _opened(job) as inputs:
        for p in job.plans:
            roles.append(decide_role(inputs, p, job.options.per_task) if p.role == COMMON else p.role)
            if progress is not None:
                progress(inputs.tensor_bytes(p.name))
    return roles


def shard_histograms(job: ShardJob, templates: th.Selections, method: str, progress: Progress = None
                     ) -> th.Selections:
    """Steps 2 and 3: the shard's |τ_t| histograms (``method`` "update_hi" or "update_lo") in fresh
    forks of ``templates`` (the driver's accumulators in the current pass), for the driver to merge."""
    if method not in ("update_hi", "update_lo"):
        raise ValueError(f"method must be 'update_hi' or 'update_lo', got {method!r}")
    forks = th.fork(templates)  # never the caller's objects
    with _opened(job) as inputs:
        dev = torch.device(job.options.device)
        for p in job.plans:
            if p.role == "masked":
                th.sweep(inputs, p, forks, method, dev, job.options.chunk_size)
            if progress is not None:
                progress(inputs.tensor_bytes(p.name))
    return forks


def encode_shard(job: ShardJob, thresholds: dict[str, torch.Tensor | None], path: str | Path,
                 overwrite: bool = True, progress: Progress = None, number: tuple[int, int] | None = None
                 ) -> ShardResult:
    """Write the shard as a complete .tall file at ``path`` (atomically). With ``number`` = (i, n)
    the file is named by its content instead, :func:`~tallfmt.format.index.shard_name` in ``path``'s
    folder. Roles not decided yet are decided here (encodes without a global step read each tensor
    once)."""
    opts = job.options
    with _opened(job) as inputs, ContainerWriter(path, overwrite=overwrite) as writer:
        enc = TensorEncoder(inputs, opts, thresholds)
        entries = []
        for p in job.plans:
            if p.role == COMMON:
                p = p.with_role(decide_role(inputs, p, opts.per_task))
            entries.append(enc.write(writer, p))
            if progress is not None:
                progress(inputs.tensor_bytes(p.name))
        tasks = tuple(TaskEntry(t, opts.lambdas.get(t), enc.stats[i].result()) for i, t in enumerate(opts.tasks))
        name = None if number is None else (lambda h: shard_name(*number, h))
        final = writer.finish(Header(tasks, opts.encoding(), tuple(entries), dict(opts.metadata)), name)
    return ShardResult(str(final), final.stat().st_size, read_header_xxh3(final), enc.stats,
                       RoleSummary.of(entries))
