"""encode(): one pipeline for every archive — a single .tall file is the one-shard case of a sharded
archive (FORMAT.md §9), written without an index.

1. Plan on the driver from metadata alone (names, dtypes, shapes, tied storage), and split the plans
   into shards (one for a single file).
2. Global selections (TIES global trim, global magnitude masks) as map/reduce over shards: each shard
   returns its tensors' roles and its |τ_t| histograms in one read, which add up to the exact thresholds.
3. Each shard is encoded by a runner (this process, or a Dask cluster) into its file.
4. Sharded archives only: commit — the new shards (named by their content) were written beside the
   old ones; the index is replaced atomically, then the shards it no longer lists are removed.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tallfmt.compute import maskmath
from tallfmt.errors import InputError
from tallfmt.format.atomic import remove_stale, write_atomic, write_error
from tallfmt.format.header import TaskEntry, version_for
from tallfmt.format.index import INDEX_NAME, MAX_SHARDS, SHARD_RE, ShardIndex, ShardInfo, plan_name
from tallfmt.format.outputs import OVERWRITE, new_folder_removed_on_failure
from tallfmt.write import thresholds as th
from tallfmt.write.files import collect_files
from tallfmt.write.inputs import open_inputs, refuse_own_input
from tallfmt.write.options import DEFAULTS, EncodeOptions
from tallfmt.write.plan import group_into_shards, plan_metadata, stored_bytes
from tallfmt.write.report import EncodeReport, RoleSummary
from tallfmt.write.runners import Runner, portable_source, runner_for
from tallfmt.write import residuals
from tallfmt.write.shard import ShardJob, ShardResult, encode_shard, shard_lo, shard_pass1, shard_residual

#: progress(advance, total): bytes of input processed since the last call, and the total over all passes.
ProgressFn = Callable[[int, int], None]


def encode(base: Any, tasks: Mapping[str, Any], path: str | os.PathLike, *, merge: str = DEFAULTS.merge,
           lambdas: float | Mapping[str, float] = DEFAULTS.lambdas, ties_density: float = DEFAULTS.ties_density,
           ties_agg: str = DEFAULTS.ties_agg, ties_scope: str = DEFAULTS.ties_scope,
           mask_method: str = DEFAULTS.mask_method, mask_density: float = DEFAULTS.mask_density,
           mask_scope: str = DEFAULTS.mask_scope, codec: str = DEFAULTS.codec,
           mask_codec: str = DEFAULTS.mask_codec, device: str | torch.device | None = DEFAULTS.device, mismatch: str = DEFAULTS.mismatch,
           per_task: Any = DEFAULTS.per_task, metadata: Mapping[str, str] | None = DEFAULTS.metadata,
           chunk_size: int = DEFAULTS.chunk_size, dtype: str | None = DEFAULTS.dtype,
           prefix_map: Mapping[str, str] | None = DEFAULTS.prefix_map, files: bool = DEFAULTS.files,
           residual: float | Mapping[str, float] | None = DEFAULTS.residual,
           tau_dtype: str = DEFAULTS.tau_dtype, store_base: bool = DEFAULTS.store_base,
           overwrite: bool = OVERWRITE, progress: ProgressFn | None = None,
           shards: int | None = None, max_shard_size: int | None = None, scheduler: Any = None,
           retries: int = 3, threads: int | None = None) -> EncodeReport:
    """Encode θ0 and T fine-tunes of it into one .tall archive at ``path``.

    ``base`` and each task source: a .safetensors file, a HF folder (model.safetensors or a sharded
    index), a .bin/.pt file (loaded with weights_only=True) or a ``{name: tensor}`` mapping.
    ``merge`` makes τ_MTL: "task_arithmetic" (Σ τ_t) or "ties" (``ties_density``, ``ties_agg``,
    ``ties_scope``). ``mask_method`` "tall" (eq. 5 with ``lambdas``) or "magnitude" (top
    ``mask_density`` of |τ_t|). ``mismatch="per_task"`` stores tensors whose presence, dtype or shape
    differ between checkpoints per task instead of refusing them. Float tensors whose names match a
    glob in ``per_task`` (default: batch-norm running statistics) are stored verbatim per task when
    they differ. ``dtype`` ("BF16", "F16", "F32") casts every float tensor of every input to that
    storage dtype first (the math stays float32), so a mixed-precision zoo keeps its masks;
    ``prefix_map`` renames θ0's tensors ({"": "bert."} prefixes every name, {"model.": ""} strips
    one) to match the fine-tunes'. ``codec``: the segments' codec ("auto": byteplane-zstd for floats,
    zstd for masks); ``mask_codec``: the masks' ("auto": as ``codec``; "tau-rans" codes each mask
    from τ_MTL's magnitudes and its own previous bits, about 20 % smaller than zstd on real zoos
    but slower to decode, and makes the archive version 1.2, FORMAT.md §5.1). ``files``: store the
    non-weight files of folder inputs (config, tokenizer, model card: FORMAT.md §10), which decode_to
    and merge_to write back. ``tau_dtype`` "BF16" stores τ_MTL in bfloat16 (half its size, lossy; the
    masks are computed from the rounded τ_MTL, FORMAT.md §4.2); the default "F32" is lossless.
    ``store_base=False`` keeps θ0 outside the archive (its tensor table and a checksum of each tensor
    stay, FORMAT.md §2.1): a reader then needs θ0 itself, ``tallfmt.open(path, base=...)``.
    ``progress(advance, total)`` is told the input bytes processed. ``threads``: at most this many
    tensors are encoded and compressed at once (default: one per core; the threads block, never spin,
    so the default suits a busy machine too; 1 runs everything in the calling thread). An existing
    ``path`` is refused unless ``overwrite=True`` (as the CLI's --force), and so is a ``path`` that is
    one of the inputs.

    ``residual`` (bits per masked parameter, one number or ``{task: bits}``; tasks left out get none)
    stores, per task, the entries of largest |τ_t − m_t∘τ_MTL| over all masked tensors as a sparse
    correction that decodes add (FORMAT.md §11; the archive is then version 1.2): k = ⌊bits · N / 16⌋
    entries for N masked parameters, 16 bits being the estimated cost of one entry. The report's
    ``task_stats`` then give each task's ``rel_error`` with and ``rel_error_mask`` without it.

    ``shards=N`` or ``max_shard_size=BYTES`` make ``path`` a folder of shard files plus
    ``tall.index.json`` (FORMAT.md §9); ``scheduler`` (a ``dask.distributed.Client`` or a scheduler
    address) runs the per-shard work on a Dask cluster, retrying a failed task up to ``retries``
    times. The decoded models are the same bit for bit.

        >>> report = encode("base.safetensors", {"a": "a.safetensors", "b": "b.safetensors"},
        ...                 "zoo.tall", lambdas={"a": 0.3, "b": 0.5})                    # doctest: +SKIP
        >>> print(report.ratio)                                                          # doctest: +SKIP
        >>> encode("base.safetensors", {"a": "a.safetensors"}, "zoo/", shards=4)         # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if not isinstance(tasks, Mapping) or not tasks:
        raise InputError("tasks must be a non-empty mapping {task name: checkpoint}")
    opts = EncodeOptions.check(list(tasks), merge=merge, lambdas=lambdas, ties_density=ties_density,
                               ties_agg=ties_agg, ties_scope=ties_scope, mask_method=mask_method,
                               mask_density=mask_density, mask_scope=mask_scope, codec=codec, mask_codec=mask_codec, device=device,
                               mismatch=mismatch, per_task=per_task, metadata=metadata, chunk_size=chunk_size,
                               dtype=dtype, prefix_map=prefix_map, files=files, residual=residual,
                               tau_dtype=tau_dtype, store_base=store_base)
    sharded = shards is not None or max_shard_size is not None or scheduler is not None
    if shards is not None and max_shard_size is not None:
        raise InputError("pass shards= or max_shard_size=, not both")
    if shards is not None:
        _check_count("shards", shards, 1, MAX_SHARDS)
    if max_shard_size is not None:
        _check_count("max_shard_size", max_shard_size, 1)
    _check_count("retries", retries, 0)
    if threads is not None:
        _check_count("threads", threads, 1)
    out = Path(path)
    refuse_own_input(out, [("the base", base), *((f"task {t!r}", src) for t, src in tasks.items())])
    if sharded:
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder (a sharded archive is a folder)")
        if not overwrite and (out / INDEX_NAME).exists():
            raise InputError(f"{out / INDEX_NAME}: already exists (pass overwrite=True / --force to replace it)")
    elif not overwrite and out.exists():  # before any input is read
        raise InputError(f"{out}: already exists (pass overwrite=True / --force to replace it)")
    if threads is None:
        threads = os.cpu_count() or 1
    remote = scheduler is not None  # in-memory sources are refused before any cluster is contacted
    base_src = portable_source(base, "base", remote)
    task_srcs = tuple((t, portable_source(tasks[t], f"task {t!r}", remote)) for t in tasks)
    run = uuid.uuid4().hex[:12]
    # our own pool does the parallel work: torch's intra-op threads would only spin on chunk-sized copies;
    # a sharded archive's folder that this call made goes again if it fails (a file is written atomically)
    with _torch_threads(1), new_folder_removed_on_failure(out) if sharded else nullcontext():
        runner = runner_for(scheduler, retries, run)
        try:
            return _drive(runner, base_src, task_srcs, out, opts, sharded, shards, max_shard_size, overwrite,
                          progress, 1 if remote else threads, t0)
        finally:
            runner.close()


def _check_count(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise InputError(f"{name} must be an integer in [{lo}, {hi if hi is not None else '∞'}], got {v!r}")
    return v


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _Meter:
    """Progress over all passes: in this process every tensor reports, on a cluster every shard."""

    def __init__(self, fn: ProgressFn | None, total: int, runner: Runner, job_bytes: list[int]) -> None:
        self.fn, self.total, self.job_bytes = fn, total, job_bytes
        self.local = not runner.remote and fn is not None

    def advance(self, n: int) -> None:
        if self.fn is not None:
            self.fn(n, self.total)

    @property
    def per_tensor(self) -> Callable[[int], None] | None:
        """What the shard functions get: advance() in this process, None on a cluster."""
        return self.advance if self.local else None

    def shard_done(self, i: int, _: Any) -> None:
        if self.fn is not None and not self.local:
            self.advance(self.job_bytes[i])


def _drive(runner: Runner, base_src: Any, task_srcs: tuple[tuple[str, Any], ...], out: Path, opts: EncodeOptions,
           sharded: bool, shards: int | None, max_shard_size: int | None, overwrite: bool,
           progress: ProgressFn | None, threads: int, t0: float) -> EncodeReport:
    # 1. plan on the driver, from metadata only
    with open_inputs(base_src, task_srcs, dtype=opts.dtype, prefix_map=opts.prefix_map) as inputs:
        plans = plan_metadata(inputs, opts.mismatch)
        sizes = [stored_bytes(inputs, p) for p in plans]
        tensor_bytes = {p.name: inputs.tensor_bytes(p.name) for p in plans}
        # where the global thresholds lie, from a sample (~1/64 of the candidate tensors)
        windows = th.sample_windows(inputs, plans, [d for _, d in opts.global_steps()], opts.per_task,
                                    torch.device(opts.device), opts.chunk_size) if opts.global_steps() else None
    input_bytes = sum(tensor_bytes.values())
    files = collect_files(base_src, task_srcs) if opts.files else None
    if sharded:
        if shards is None and max_shard_size is None:
            shards = runner.workers()
        groups = group_into_shards(plans, sizes, shards=shards, max_shard_size=max_shard_size)
    else:
        groups = [plans]
    jobs = [ShardJob(base_src, task_srcs, opts, tuple(g), threads, None if sharded else files) for g in groups]
    passes = (2 if opts.global_steps() else 1) + (2 if opts.residual_on else 0)
    meter = _Meter(progress, input_bytes * passes, runner, [sum(tensor_bytes[p.name] for p in g) for g in groups])

    # 2. global thresholds: roles and histograms in one map over shards, then a reduce
    jobs, thresholds, index_thresholds = _global_thresholds(runner, jobs, opts, windows, meter)
    jobs, thresholds = _residual_limits(runner, jobs, opts, thresholds, meter)

    # 3. encode every shard: the single file straight to its path, shards to temporary names
    if not sharded:
        r = runner.map("encode", encode_shard, [(jobs[0], thresholds, out, overwrite, meter.per_tensor)],
                       meter.shard_done)[0]
        return EncodeReport(Path(r.path), list(opts.tasks), r.summary.roles, r.summary.role_bytes, r.summary.params,
                            input_bytes, r.size, {t.name: t.stats for t in _task_entries(opts, r.stats)},
                            time.perf_counter() - t0, r.summary, files)
    results = _write_shards(runner, jobs, thresholds, out, meter)
    names = [Path(r.path).name for r in results]
    stats = [maskmath.TaskStats() for _ in opts.tasks]
    summary = RoleSummary({}, {}, {})
    for r in results:
        for mine, theirs in zip(stats, r.stats):
            mine.merge(theirs)
        summary.add(r.summary)
    task_entries = _task_entries(opts, stats)
    where = {p.name: n for n, j in zip(names, jobs) for p in j.plans}
    index = ShardIndex(task_entries, opts.encoding(), index_thresholds, dict(opts.metadata),
                       tuple(ShardInfo(n, r.size, r.header_xxh3) for n, r in zip(names, results)),
                       {p.name: where[p.name] for p in plans}, version_for(files, opts.encoding()), files)
    raw = index.to_bytes()
    write_atomic(out / INDEX_NAME, raw)  # the commit: readers now find the new archive
    _remove_shards(out, keep=set(names))
    return EncodeReport(out, list(opts.tasks), summary.roles, summary.role_bytes, summary.params, input_bytes,
                        sum(r.size for r in results) + len(raw), {t.name: t.stats for t in task_entries},
                        time.perf_counter() - t0, summary, files)


def _write_shards(runner: Runner, jobs: list[ShardJob], thresholds: dict[str, torch.Tensor | None], out: Path,
                  meter: _Meter) -> list[ShardResult]:
    """Write every shard beside the archive already in ``out`` (FORMAT.md §9.5 step 3): each under its
    content name, which no shard of another content has, so the old index stays valid meanwhile. On a
    failure the shards this encode added are removed again."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, "cannot create the archive folder", exc) from exc
    remove_stale(out / INDEX_NAME, names=lambda n: n == INDEX_NAME or SHARD_RE.fullmatch(n) is not None)
    before = set(_shard_files(out))
    n = len(jobs)
    calls = [(j, thresholds, str(out / plan_name(i + 1, n)), True, meter.per_tensor, (i + 1, n))
             for i, j in enumerate(jobs)]
    try:
        return runner.map("encode", encode_shard, calls, meter.shard_done)
    except BaseException:
        _remove_shards(out, keep=before)
        raise


def _shard_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if SHARD_RE.fullmatch(p.name)]


def _remove_shards(folder: Path, keep: set[str]) -> None:
    """Remove the files named like shards that are not in ``keep``: after a commit, the shards of the
    archive replaced and of encodes killed before their commit."""
    for name in _shard_files(folder):
        if name not in keep:
            (folder / name).unlink(missing_ok=True)


def _task_entries(opts: EncodeOptions, stats: list[maskmath.TaskStats]) -> tuple[TaskEntry, ...]:
    return tuple(TaskEntry(t, opts.lambdas.get(t), stats[i].result()) for i, t in enumerate(opts.tasks))


def _global_thresholds(runner: Runner, jobs: list[ShardJob], opts: EncodeOptions, windows: th.Windows | None,
                       meter: _Meter) -> tuple[list[ShardJob], dict[str, torch.Tensor | None], dict[str, tuple | None]]:
    """Decide every role and the exact global thresholds in one pass over the inputs (FORMAT.md §9.5
    step 2; thresholds.py says how). Returns the jobs with their roles decided, {step: thresholds} for
    the encoders and the index's values."""
    index_values: dict[str, tuple | None] = {"ties": None, "magnitude": None}
    thresholds: dict[str, torch.Tensor | None] = {"ties": None, "magnitude": None}
    steps = opts.global_steps()
    if windows is None:
        return jobs, thresholds, index_values
    parts = runner.map("pass1", shard_pass1, [(j, windows, meter.per_tensor) for j in jobs], meter.shard_done)
    jobs = [replace(j, plans=tuple(p.with_role(r) for p, r in zip(j.plans, part.roles))) for j, part in zip(jobs, parts)]
    hi = sum(part.hi for part in parts)
    lo = sum(part.lo for part in parts)
    total = sum(part.masked for part in parts)
    densities = [d for _, d in steps]
    values, misses = th.choose(hi, lo, windows, densities, total)
    if misses:  # the sample misjudged a bin: one more pass over the masked tensors, for those bins
        bins = [[int(th.choose_bin(hi[t], total, d)) for t in range(hi.shape[0])] for d in densities]
        lo_true = sum(runner.map("lo", shard_lo, [(j, bins) for j in jobs]))
        th.settle(values, misses, lo_true, densities, total)
    for (step, _), row in zip(steps, values):
        index_values[step] = tuple(row)
        thresholds[step] = th.as_tensor(row)
    return jobs, thresholds, index_values


def _residual_limits(runner: Runner, jobs: list[ShardJob], opts: EncodeOptions,
                     thresholds: dict[str, torch.Tensor | None], meter: _Meter
                     ) -> tuple[list[ShardJob], dict[str, torch.Tensor | None]]:
    """Each task's residual limit v_t (FORMAT.md §11; residuals.py says how): the top-16-bit histograms
    of |d_t| in one map over shards (which also decides the roles still open), then the low bits inside
    the chosen bins in a second. Returns the jobs with their roles and the thresholds with "residual"
    (float32 per task, +inf where a task keeps nothing)."""
    if not opts.residual_on:
        return jobs, thresholds
    parts = runner.map("residual", shard_residual, [(j, thresholds, None, meter.per_tensor) for j in jobs],
                       meter.shard_done)
    jobs = [replace(j, plans=tuple(p.with_role(r) for p, r in zip(j.plans, part.roles))) for j, part in zip(jobs, parts)]
    hi = sum(part.hist for part in parts)
    total = sum(part.masked for part in parts)
    counts = [opts.residual_count(t, total) for t in opts.tasks]
    bins = residuals.first_bins(hi, counts)
    if all(b is None for b in bins):
        limits = [math.inf] * len(bins)
    else:
        lo = sum(part.hist for part in runner.map(
            "residual_lo", shard_residual, [(j, thresholds, [b[0] if b else 0 for b in bins], meter.per_tensor)
                                            for j in jobs], meter.shard_done))
        limits = residuals.thresholds(bins, lo, hi, counts)
    return jobs, {**thresholds, "residual": torch.tensor(limits, dtype=torch.float32)}
