"""The per-shard work of an encode: plain functions of an immutable :class:`ShardJob`, so they run in
this process or on a Dask worker alike. A single-file archive is the one-shard case.

Everything a shard's bytes depend on is in its job: the math is element-wise float32 and the
statistics are sequential float64 sums (FORMAT.md §4.5), so a shard is the same file on any worker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from tallfmt.compute import maskmath
from tallfmt.format.container import ContainerWriter
from tallfmt.format.files import Files
from tallfmt.format.header import Header, TaskEntry, header_version
from tallfmt.format.index import read_header_xxh3, shard_name
from tallfmt.write import residuals
from tallfmt.write import thresholds as th
from tallfmt.write.inputs import Inputs, open_inputs
from tallfmt.write.options import EncodeOptions
from tallfmt.write.plan import COMMON, TensorPlan, decide_role
from tallfmt.write.report import RoleSummary
from tallfmt.write.tensor import Prepared, TensorEncoder

_T = TypeVar("_T")
_R = TypeVar("_R")


def ordered(fn: Callable[[_T], _R], items: Sequence[_T], threads: int) -> Iterator[_R]:
    """fn(item) for each item, in order, computed up to ``threads`` at a time in a thread pool (numba and
    zstd release the GIL) with at most ``threads`` + 1 results held; one thread: no pool at all. The
    workers block on their work, never spin."""
    if threads <= 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[Future[_R]] = deque()
        it = iter(items)
        try:
            for item in it:
                pending.append(pool.submit(fn, item))
                if len(pending) > threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


@dataclass(frozen=True)
class ShardJob:
    """What one shard's work needs: the checkpoint sources, the options and the shard's tensor plans;
    ``threads``: tensors prepared at once (it changes no byte of the shard)."""

    base: Any
    tasks: tuple[tuple[str, Any], ...]
    options: EncodeOptions
    plans: tuple[TensorPlan, ...]
    threads: int = 1
    files: Files | None = None   # a single-file archive's files (a sharded one keeps them in its index)


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
    with open_inputs(job.base, job.tasks, dtype=job.options.dtype, prefix_map=job.options.prefix_map) as inputs:
        yield inputs


def shard_pass1(job: ShardJob, windows: th.Windows, progress: Progress = None) -> th.Pass1:
    """Pass 1 of the global selections over the shard: roles and histograms (one read of each tensor)."""
    with _opened(job) as inputs:
        o = job.options
        return th.pass1(inputs, job.plans, windows, o.per_task, torch.device(o.device), o.chunk_size, progress)


def shard_lo(job: ShardJob, bins: list[list[int]]) -> np.ndarray:
    """The low-bit histograms inside ``bins`` over the shard's masked tensors (only when the sample of
    pass 1 misjudged a threshold's bin)."""
    with _opened(job) as inputs:
        o = job.options
        return th.lo_pass(inputs, [p for p in job.plans if p.role == "masked"], bins, torch.device(o.device),
                          o.chunk_size)


def shard_residual(job: ShardJob, thresholds: dict[str, torch.Tensor | None], bins: list[int] | None = None,
                   progress: Progress = None) -> residuals.Scan:
    """The residual histograms of the shard (FORMAT.md §11): of the top 16 bits of |d_t| (``bins`` None;
    roles not decided yet are decided here), or of the low 16 bits inside ``bins`` (masked tensors only)."""
    with _opened(job) as inputs:
        enc = TensorEncoder(inputs, job.options, thresholds)
        plans = job.plans if bins is None else [p for p in job.plans if p.role == "masked"]
        return residuals.scan(inputs, plans, enc, job.options, bins, progress)


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

        def prepare(p: TensorPlan) -> Prepared:
            if p.role == COMMON:
                p = p.with_role(decide_role(inputs, p, opts.per_task))
            return enc.prepare(p)

        entries = []
        for prep in ordered(prepare, job.plans, job.threads):
            entries.append(enc.write(writer, prep))
            if progress is not None:
                progress(inputs.tensor_bytes(prep.plan.name))
        tasks = tuple(TaskEntry(t, opts.lambdas.get(t), enc.stats[i].result()) for i, t in enumerate(opts.tasks))
        name = None if number is None else (lambda h: shard_name(*number, h))
        encoding = opts.encoding()
        final = writer.finish(Header(tasks, encoding, tuple(entries), dict(opts.metadata),
                                     header_version(encoding, entries), job.files), name)
    return ShardResult(str(final), final.stat().st_size, read_header_xxh3(final), enc.stats,
                       RoleSummary.of(entries))
