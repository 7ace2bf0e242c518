"""Encode a collection of fine-tunes into a .tall archive; decode any task model or a merged model.

    >>> import tallfmt
    >>> report = tallfmt.encode("base.safetensors", {"sst2": "sst2.safetensors"}, "zoo.tall")  # doctest: +SKIP
    >>> with tallfmt.open("zoo.tall") as zoo:                                                 # doctest: +SKIP
    ...     sd = zoo.decode("sst2")

Encoding is a per-tensor pipeline with bounded memory: checkpoints are memory-mapped and each tensor is
processed in flat chunks of ``chunk_size`` elements, so peak memory is about one tensor's τ_MTL plus
T packed masks plus T chunks, whatever the number of tensors or tasks. The mask math runs in torch on
``device``; packing and the fused decode run in numba.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tallfmt import dtypes, kernels, maskmath
from tallfmt.checkpoints import Checkpoint, open_checkpoint, save_state_dict
from tallfmt.compression import CODECS
from tallfmt.container import (MAX_NAME_BYTES, MAX_TASKS, ContainerReader, ContainerWriter, Header, Item,
                               Segment, TaskEntry, TensorEntry)
from tallfmt.errors import FormatError, InputError

DEFAULT_CHUNK = 1 << 20  # elements per chunk of mask math: T chunks of 4 MiB in flight
DEFAULT_CODEC = "auto"   # byteplane-zstd for multi-byte elements, zstd for masks and bytes
#: Tensors stored per task (verbatim) when they differ, even if float: batch-norm statistics are not
#: weights, and θ0 + Σ_t of their changes can be meaningless (a negative variance).
DEFAULT_PER_TASK = ("*running_mean", "*running_var", "*num_batches_tracked")

ProgressFn = Callable[[int], None]


# ----------------------------------------------------------------------------------------------
# Parameters


def _check_lambdas(lambdas: float | Mapping[str, float], tasks: list[str]) -> dict[str, float]:
    if isinstance(lambdas, Mapping):
        unknown = set(lambdas) - set(tasks)
        if unknown:
            raise InputError(f"lambdas name unknown task(s) {sorted(unknown)}")
        missing = [t for t in tasks if t not in lambdas]
        if missing:
            raise InputError(f"lambdas has no value for task(s) {missing}")
        out = {t: lambdas[t] for t in tasks}
    else:
        out = {t: lambdas for t in tasks}
    for t, v in out.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0 \
                or not _fits_float32(v):
            raise InputError(f"lambda for task {t!r} must be a finite number > 0 that fits in float32, got {v!r}")
    return {t: float(v) for t, v in out.items()}


def _fits_float32(v: float) -> bool:
    # the masks use float32(λ) (FORMAT.md §4.3); a λ that rounds to inf must be refused up front, by name
    try:
        struct.pack("<f", v)
    except OverflowError:
        return False
    return True


def _check_fraction(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
        raise InputError(f"{name} must be a number in [0, 1], got {v!r}")
    return float(v)


def _check_choice(name: str, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {v!r}")
    return v


def _codec_for(codec: str, itemsize: int) -> str:
    if codec != "auto":
        return codec
    return "byteplane-zstd" if itemsize > 1 else "zstd"


@dataclass(frozen=True)
class EncodeOptions:
    """encode()'s checked options, in one picklable value (sharded encodes ship it to workers).

        >>> EncodeOptions.check(task_names=["a"], merge="ties").encoding()["merge"]
        {'method': 'ties', 'density': 0.2, 'agg': 'sum', 'scope': 'global'}
    """

    merge: str
    lambdas: dict[str, float]
    ties_density: float
    ties_agg: str
    ties_scope: str
    mask_method: str
    mask_density: float
    mask_scope: str
    codec: str
    device: str
    mismatch: str
    metadata: dict[str, str]
    chunk: int
    per_task: tuple[str, ...] = ()

    @classmethod
    def check(cls, *, task_names: list[str], merge: str = "task_arithmetic",
              lambdas: float | Mapping[str, float] = 0.4, ties_density: float = 0.2, ties_agg: str = "sum",
              ties_scope: str = "global", mask_method: str = "tall", mask_density: float = 0.1,
              mask_scope: str = "global", codec: str = DEFAULT_CODEC, device: str | torch.device | None = None,
              mismatch: str = "error", metadata: Mapping[str, str] | None = None,
              chunk_size: int = DEFAULT_CHUNK, per_task: Any = DEFAULT_PER_TASK) -> EncodeOptions:
        """Validate encode()'s keyword arguments (InputError naming the bad one)."""
        _check_choice("merge", merge, ("task_arithmetic", "ties"))
        _check_choice("mask_method", mask_method, ("tall", "magnitude"))
        _check_choice("ties_agg", ties_agg, ("sum", "mean"))
        _check_choice("ties_scope", ties_scope, ("global", "per_tensor"))
        _check_choice("mask_scope", mask_scope, ("global", "per_tensor"))
        _check_choice("mismatch", mismatch, ("error", "per_task"))
        if codec != "auto":
            _check_choice("codec", codec, tuple(CODECS))
        ties_density = _check_fraction("ties_density", ties_density)
        mask_density = _check_fraction("mask_density", mask_density)
        lams = _check_lambdas(lambdas, task_names) if mask_method == "tall" else {}
        if not isinstance(chunk_size, int) or chunk_size < 8:
            raise InputError(f"chunk_size must be an integer >= 8, got {chunk_size!r}")
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise InputError("metadata must map strings to strings")
        dev = str(torch.device(device)) if device is not None else "cpu"
        if isinstance(per_task, str) or not all(isinstance(p, str) for p in per_task):
            raise InputError(f"per_task must be a sequence of name patterns (strings), got {per_task!r}")
        return cls(merge, lams, ties_density, ties_agg, ties_scope, mask_method, mask_density, mask_scope,
                   codec, dev, mismatch, meta, chunk_size // 8 * 8, tuple(per_task))

    @property
    def global_ties(self) -> bool:
        """TIES trim with one threshold per task over all masked tensors (needs a data pass first)."""
        return self.merge == "ties" and self.ties_scope == "global"

    @property
    def global_magnitude(self) -> bool:
        """Magnitude masks with one threshold per task over all masked tensors."""
        return self.mask_method == "magnitude" and self.mask_scope == "global"

    def encoding(self) -> dict[str, Any]:
        """The header's ``encoding`` object (FORMAT.md §1.2)."""
        encoding: dict[str, Any] = {"merge": {"method": self.merge}, "mask": {"method": self.mask_method},
                                    "compute_dtype": "F32", "bit_order": "little"}
        if self.merge == "ties":
            encoding["merge"].update(density=self.ties_density, agg=self.ties_agg, scope=self.ties_scope)
        if self.mask_method == "magnitude":
            encoding["mask"].update(density=self.mask_density, scope=self.mask_scope)
        return encoding


# ----------------------------------------------------------------------------------------------
# Planning: which role each tensor gets


@dataclass
class _Plan:
    name: str
    role: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    target: str | None = None


def _equal_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.numel() == 0:
        return b.numel() == 0
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _describe(names: list[str]) -> str:
    head = ", ".join(repr(n) for n in names[:5])
    return f"{head}{f' and {len(names) - 5} more' if len(names) > 5 else ''} ({len(names)} in all)"


def _plan_metadata(base: Checkpoint, cks: list[Checkpoint], task_names: list[str], mismatch: str) -> list[_Plan]:
    """Roles that follow from names, dtypes and shapes alone; `common` ones are refined from the data."""
    names: list[str] = list(base.names())
    seen = set(names)
    for ck in cks:
        for n in ck.names():
            if n not in seen:
                seen.add(n)
                names.append(n)
    base_set, task_sets = set(base.names()), [set(ck.names()) for ck in cks]
    plans, bad, why = [], [], []
    for n in names:
        if len(n.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES or not n:
            raise InputError(f"tensor name {n[:80]!r}… is empty or longer than {MAX_NAME_BYTES} bytes")
        base_info = base.info(n) if n in base_set else None
        task_infos = [ck.info(n) if n in ck_set else None for ck, ck_set in zip(cks, task_sets)]
        if base_info is not None and all(i == base_info for i in task_infos):
            plans.append(_Plan(n, "common", *base_info))
        else:
            bad.append(n)
            plans.append(_Plan(n, "per_task"))
            if len(why) < 5:
                why.append(_mismatch_reason(n, base, base_info, cks, task_infos))
    if bad and mismatch == "error":
        raise InputError(
            f"tensors differ in presence, dtype or shape between the base and the tasks: {_describe(bad)}: "
            f"{'; '.join(why)}{'; …' if len(bad) > len(why) else ''}. Pass mismatch='per_task' "
            f"(CLI: --mismatch per_task) to store them per task")
    return plans


def _mismatch_reason(name: str, base: Checkpoint, base_info: tuple | None, cks: list[Checkpoint],
                     task_infos: list[tuple | None]) -> str:
    """Which checkpoint differs from θ0 for one tensor, e.g. "'w' is F16 [3, 5] in x.safetensors, F32 [3, 5]
    in the base"."""
    def show(info: tuple | None) -> str:
        return "missing" if info is None else f"{info[0]} {list(info[1])}"
    for ck, info in zip(cks, task_infos):
        if info != base_info:
            return f"{name!r} is {show(info)} in {ck.source}, {show(base_info)} in the base {base.source}"
    return f"{name!r} is {show(base_info)} in the base {base.source}"


def _find_aliases(plans: list[_Plan], base: Checkpoint, cks: list[Checkpoint]) -> None:
    """Mark `common` tensors that share storage with an earlier one in every checkpoint as aliases.

    Metadata only (storage keys), so a sharded encode's driver can keep aliases with their targets.
    """
    by_key: dict[tuple, str] = {}
    for p in plans:
        if p.role != "common":
            continue
        keys = tuple(ck.storage_key(p.name) for ck in (base, *cks))
        if all(k is not None for k in keys):
            if keys in by_key:
                p.role, p.target = "alias", by_key[keys]
            else:
                by_key[keys] = p.name


# ----------------------------------------------------------------------------------------------
# Encode


@dataclass
class EncodeReport:
    """What encode() did: where, how big, what each tensor became, and what each task loses."""

    path: Path
    tasks: list[str]
    roles: dict[str, int]                  # role -> number of tensors
    role_bytes: dict[str, int]             # role -> stored bytes of its segments
    params: dict[str, int]                 # "masked" / "shared" / "per_task" -> elements (θ0's copy)
    input_bytes: int                       # raw bytes of base + every task checkpoint
    archive_bytes: int
    task_stats: dict[str, dict[str, Any]]
    seconds: float

    @property
    def ratio(self) -> float:
        """Raw collection bytes / archive bytes."""
        return self.input_bytes / self.archive_bytes if self.archive_bytes else float("inf")

    def __str__(self) -> str:
        return (f"{self.path}: {len(self.tasks)} tasks, {self.input_bytes:,} → {self.archive_bytes:,} bytes "
                f"({self.ratio:.2f}×) in {self.seconds:.1f}s; roles {self.roles}")


class _Encoder:
    def __init__(self, base: Checkpoint, cks: list[Checkpoint], task_names: list[str], opts: EncodeOptions,
                 progress: ProgressFn | None) -> None:
        self.base, self.cks, self.tasks, self.opts, self.progress = base, cks, task_names, opts, progress
        self.merge, self.lambdas = opts.merge, opts.lambdas
        self.ties_density, self.ties_agg, self.ties_scope = opts.ties_density, opts.ties_agg, opts.ties_scope
        self.mask_method, self.mask_density, self.mask_scope = opts.mask_method, opts.mask_density, opts.mask_scope
        self.codec, self.device, self.chunk = opts.codec, torch.device(opts.device), opts.chunk
        self.stats = [maskmath.TaskStats() for _ in task_names]
        self.base_names = set(base.names())
        self.task_names_sets = [set(ck.names()) for ck in cks]

    # --- reading -------------------------------------------------------------------------------
    def release(self, name: str) -> None:
        """Drop a finished tensor's mapped pages from every checkpoint that has it, so the resident
        set stays near the bound instead of growing by every byte read (the page cache keeps them)."""
        if name in self.base_names:
            self.base.release(name)
        for ck, names in zip(self.cks, self.task_names_sets):
            if name in names:
                ck.release(name)

    def _flat(self, ck: Checkpoint, name: str) -> torch.Tensor:
        t = ck.get(name)
        if t.device.type != "cpu":
            t = t.cpu()
        return t.contiguous().reshape(-1)

    def _chunks(self, n: int) -> Iterator[tuple[int, int]]:
        for s in range(0, n, self.chunk):
            yield s, min(n, s + self.chunk)

    def _f32(self, flat: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return flat[s:e].to(self.device, dtype=torch.float32)

    def _check_chunk(self, probe: torch.Tensor, inputs: list[torch.Tensor], name: str) -> None:
        """NaN/Inf check at the cost of one reduction: any NaN or Inf in θ0 or a θ_t makes Σ_t τ_t
        non-finite. Only then is each input checked, to name the culprit (a merely overflowing sum
        of finite values passes)."""
        if bool(torch.isfinite(probe.sum())):
            return
        for ck, x in zip((self.base, *self.cks), inputs):
            if not bool(torch.isfinite(x).all()):
                raise InputError(f"{ck.source}: tensor {name!r} holds NaN or Inf values")

    # --- roles ------------------------------------------------------------------------------------
    def refine(self, plans: list[_Plan]) -> None:
        """Split `common` tensors into alias / shared / masked / per_task by looking at the bytes."""
        _find_aliases(plans, self.base, self.cks)
        self.decide_roles(plans)

    def decide_roles(self, plans: list[_Plan]) -> None:
        """Roles of the `common` tensors that are not aliases: shared / masked / per_task (reads bytes)."""
        for p in plans:
            if p.role != "common":
                continue
            b = self.base.get(p.name)
            same = all(_equal_bytes(b, ck.get(p.name)) for ck in self.cks)
            del b
            self.release(p.name)
            maskable = p.dtype in dtypes.MASKABLE and not any(fnmatch.fnmatchcase(p.name, pat)
                                                              for pat in self.opts.per_task)
            p.role = "shared" if same else ("masked" if maskable else "per_task")

    def check_finite(self, ck: Checkpoint, name: str) -> None:
        flat = self._flat(ck, name)
        if not flat.dtype.is_floating_point:
            return
        for s, e in self._chunks(flat.numel()):
            if not bool(torch.isfinite(flat[s:e]).all()):
                raise InputError(f"{ck.source}: tensor {name!r} holds NaN or Inf values")

    # --- global thresholds (TIES global trim, global magnitude masks) -----------------------------
    def global_thresholds(self, masked: list[_Plan], density: float) -> torch.Tensor:
        """Exact per-task k-th largest |τ_t| over all masked parameters: two streaming passes."""
        return self._thresholds([p.name for p in masked], sum(math.prod(p.shape) for p in masked), density)

    def tensor_thresholds(self, name: str, numel: int, density: float) -> torch.Tensor:
        """The same over one tensor (per_tensor scope)."""
        return self._thresholds([name], numel, density)

    def _thresholds(self, names: list[str], total: int, density: float) -> torch.Tensor:
        sel = [maskmath.TopKThreshold(total, density, device=self.device) for _ in self.tasks]
        for update, finish in (("update_hi", "finish_hi"), ("update_lo", "finish_lo")):
            for name in names:
                self._sweep_tensor(name, sel, update)
            for s in sel:
                getattr(s, finish)()
        return torch.tensor([s.threshold for s in sel], dtype=torch.float32, device=self.device)

    def _sweep_tensor(self, name: str, sel: list, method: str) -> None:
        b = self._flat(self.base, name)
        flats = [self._flat(ck, name) for ck in self.cks]
        for s, e in self._chunks(b.numel()):
            theta0 = b[s:e].to(self.device, dtype=torch.float32)
            for t, f in enumerate(flats):
                getattr(sel[t], method)(maskmath.task_vector(f[s:e].to(self.device, dtype=torch.float32), theta0))
        del b, flats
        self.release(name)

    # --- one masked tensor ------------------------------------------------------------------------
    def encode_masked(self, p: _Plan, ties_thr: torch.Tensor | None, mag_thr: torch.Tensor | None
                      ) -> tuple[np.ndarray, list[np.ndarray]]:
        """τ_MTL (float32) and one packed mask per task for one tensor, chunk by chunk."""
        n = math.prod(p.shape)
        if self.merge == "ties" and self.ties_scope == "per_tensor":
            ties_thr = self.tensor_thresholds(p.name, n, self.ties_density)
        if self.mask_method == "magnitude" and self.mask_scope == "per_tensor":
            mag_thr = self.tensor_thresholds(p.name, n, self.mask_density)
        b = self._flat(self.base, p.name)
        flats = [self._flat(ck, p.name) for ck in self.cks]
        tau_out = np.empty(n, dtype=np.float32)
        packed = [np.empty((n + 7) // 8, dtype=np.uint8) for _ in self.tasks]
        lams = [self.lambdas.get(t) for t in self.tasks]
        for s, e in self._chunks(n):
            theta0 = self._f32(b, s, e)
            thetas = [self._f32(f, s, e) for f in flats]
            taus = [maskmath.task_vector(th, theta0) for th in thetas]
            if self.merge == "ties":
                tau_mtl = maskmath.ties_merge(taus, ties_thr, agg=self.ties_agg)
                self._check_chunk(maskmath.task_arithmetic(taus), [theta0, *thetas], p.name)
            else:
                tau_mtl = maskmath.task_arithmetic(taus)
                self._check_chunk(tau_mtl, [theta0, *thetas], p.name)
            tau_cpu = tau_mtl.to("cpu").numpy()
            for t in range(len(self.tasks)):
                if self.mask_method == "tall":
                    m = maskmath.tall_mask(taus[t], tau_mtl, lams[t])
                else:
                    m = maskmath.magnitude_mask(taus[t], mag_thr[t])
                kernels.pack_bits_into(m.to("cpu").numpy(), packed[t][s // 8:(e + 7) // 8])
            tau_out[s:e] = tau_cpu
        # What users lose, measured on θ̂ exactly as decode will produce it: one sequential pass over the
        # whole tensor (b and flats are views, no copy), so the sums — and the header — do not depend
        # on chunk_size (FORMAT.md §4.4: sequential in element order, tensor by tensor).
        theta0_st = dtypes.to_numpy(b)
        for t in range(len(self.tasks)):
            sums = np.zeros(5)
            kernels.mask_stats(theta0_st, dtypes.to_numpy(flats[t]), tau_out, packed[t], sums, dtype=p.dtype)
            self.stats[t].add(sums, n)
        return tau_out, packed


def encode(base: Any, tasks: Mapping[str, Any], path: str | Path, *, merge: str = "task_arithmetic",
           lambdas: float | Mapping[str, float] = 0.4, ties_density: float = 0.2, ties_agg: str = "sum",
           ties_scope: str = "global", mask_method: str = "tall", mask_density: float = 0.1,
           mask_scope: str = "global", codec: str = DEFAULT_CODEC, device: str | torch.device | None = None,
           mismatch: str = "error", metadata: Mapping[str, str] | None = None, overwrite: bool = True,
           chunk_size: int = DEFAULT_CHUNK, progress: ProgressFn | None = None, shards: int | None = None,
           max_shard_size: int | None = None, scheduler: Any = None, retries: int = 3,
           per_task: Any = DEFAULT_PER_TASK, threads: int | None = None) -> EncodeReport:
    """Encode θ0 and T fine-tunes of it into one .tall archive at ``path``.

    ``base`` and each task source: a .safetensors file, a HF folder (model.safetensors or a sharded
    index), a .bin/.pt file (loaded with weights_only=True) or a ``{name: tensor}`` mapping.
    ``merge`` makes τ_MTL: "task_arithmetic" (Σ τ_t) or "ties" (``ties_density``, ``ties_agg``,
    ``ties_scope``). ``mask_method`` "tall" (eq. 5 with ``lambdas``) or "magnitude" (top
    ``mask_density`` of |τ_t|). ``mismatch="per_task"`` stores tensors whose presence, dtype or shape
    differ between checkpoints per task instead of refusing them. Float tensors whose names match a
    glob in ``per_task`` (default: batch-norm running statistics) are stored verbatim per task when
    they differ. ``progress(n)`` is called with the number of tensors written. ``threads``: torch
    intra-op threads for the mask math while encoding (restored afterwards; None keeps torch's
    setting). On a machine whose cores are busy with other work, ``threads=1`` (or
    OMP_WAIT_POLICY=PASSIVE) avoids OpenMP threads spinning for each chunk-sized op: measured 7× faster
    there, and 0.8× as fast on an idle 2-core machine (bench/RESULTS.md).

    ``shards=N`` or ``max_shard_size=BYTES`` make ``path`` a folder of shard files plus
    ``tall.index.json`` (FORMAT.md §9, see :mod:`tallfmt.sharded`); ``scheduler`` (a
    ``dask.distributed.Client`` or a scheduler address) runs the per-shard work on a Dask cluster,
    retrying a failed task up to ``retries`` times. The decoded models are the same bit for bit.

        >>> report = encode("base.safetensors", {"a": "a.safetensors", "b": "b.safetensors"},
        ...                 "zoo.tall", lambdas={"a": 0.3, "b": 0.5})                    # doctest: +SKIP
        >>> print(report.ratio)                                                          # doctest: +SKIP
        >>> encode("base.safetensors", {"a": "a.safetensors"}, "zoo/", shards=4)         # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if not isinstance(tasks, Mapping) or not tasks:
        raise InputError("tasks must be a non-empty mapping {task name: checkpoint}")
    task_names = list(tasks)
    if len(task_names) > MAX_TASKS:
        raise InputError(f"{len(task_names)} tasks is over the limit of {MAX_TASKS}")
    for t in task_names:
        if not isinstance(t, str) or not t or len(t.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise InputError(f"task names must be non-empty strings of at most {MAX_NAME_BYTES} bytes, got {t!r}")
    opts = EncodeOptions.check(task_names=task_names, merge=merge, lambdas=lambdas, ties_density=ties_density,
                               ties_agg=ties_agg, ties_scope=ties_scope, mask_method=mask_method,
                               mask_density=mask_density, mask_scope=mask_scope, codec=codec, device=device,
                               mismatch=mismatch, metadata=metadata, chunk_size=chunk_size, per_task=per_task)
    if not overwrite and Path(path).exists():  # before any input is read
        raise InputError(f"{path}: already exists (pass overwrite=True / --force to replace it)")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError(f"threads must be a positive integer or None, got {threads!r}")
    with _torch_threads(threads):
        return _encode(base, tasks, path, opts, task_names, overwrite, progress, shards, max_shard_size,
                       scheduler, retries, t0)


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


def _encode(base: Any, tasks: Mapping[str, Any], path: str | Path, opts: EncodeOptions, task_names: list[str],
            overwrite: bool, progress: ProgressFn | None, shards: int | None, max_shard_size: int | None,
            scheduler: Any, retries: int, t0: float) -> EncodeReport:
    if shards is not None or max_shard_size is not None or scheduler is not None:
        from tallfmt.sharded import encode_sharded  # sharded imports this module

        return encode_sharded(base, tasks, path, opts, shards=shards, max_shard_size=max_shard_size,
                              scheduler=scheduler, retries=retries, overwrite=overwrite, progress=progress)

    with ExitStack() as stack:
        enc = stack.enter_context(_open_encoder(base, tasks, opts, progress))
        plans = _plan_metadata(enc.base, enc.cks, task_names, opts.mismatch)
        enc.refine(plans)
        masked = [p for p in plans if p.role == "masked"]
        ties_thr = mag_thr = None
        if opts.global_ties:
            ties_thr = enc.global_thresholds(masked, opts.ties_density)
        if opts.global_magnitude:
            mag_thr = enc.global_thresholds(masked, opts.mask_density)
        input_bytes = sum(_checkpoint_bytes(ck) for ck in (enc.base, *enc.cks))
        final, entries, task_entries = _write_archive(enc, plans, path, ties_thr, mag_thr, opts, overwrite,
                                                      progress)

    roles, role_bytes, params = _role_summary(entries)
    return EncodeReport(final, task_names, roles, role_bytes, params, input_bytes, final.stat().st_size,
                        {t.name: dict(t.stats) for t in task_entries}, time.perf_counter() - t0)


@contextmanager
def _open_encoder(base: Any, tasks: Mapping[str, Any], opts: EncodeOptions,
                  progress: ProgressFn | None = None) -> Iterator[_Encoder]:
    """Open θ0 and the task checkpoints (lazily, memory-mapped) and an _Encoder over them."""
    with ExitStack() as stack:
        base_ck = stack.enter_context(open_checkpoint(base, label="base"))
        cks = [stack.enter_context(open_checkpoint(tasks[t], label=t)) for t in tasks]
        yield _Encoder(base_ck, cks, list(tasks), opts, progress)


def _write_archive(enc: _Encoder, plans: list[_Plan], path: str | Path, ties_thr: torch.Tensor | None,
                   mag_thr: torch.Tensor | None, opts: EncodeOptions, overwrite: bool,
                   progress: ProgressFn | None) -> tuple[Path, list[TensorEntry], tuple[TaskEntry, ...]]:
    """Write ``plans`` (roles decided) as one .tall file: the whole archive, or one shard of it."""
    entries: list[TensorEntry] = []
    with ContainerWriter(path, overwrite=overwrite) as writer:
        for p in plans:
            entries.append(_write_tensor(writer, enc, p, ties_thr, mag_thr, opts.codec))
            enc.release(p.name)
            if progress is not None:
                progress(1)
        task_entries = tuple(TaskEntry(t, opts.lambdas.get(t), enc.stats[i].result())
                             for i, t in enumerate(enc.tasks))
        final = writer.finish(Header(task_entries, opts.encoding(), tuple(entries), dict(opts.metadata)))
    return final, entries, task_entries


def _role_summary(entries: list[TensorEntry]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """EncodeReport's roles, role_bytes and params of a list of tensor entries."""
    roles: dict[str, int] = {}
    role_bytes: dict[str, int] = {}
    params: dict[str, int] = {}
    for e in entries:
        roles[e.role] = roles.get(e.role, 0) + 1
        role_bytes[e.role] = role_bytes.get(e.role, 0) + sum(s.length for s in e.segments())
        if e.role in ("masked", "shared"):
            params[e.role] = params.get(e.role, 0) + e.numel
    return roles, role_bytes, params


def _checkpoint_bytes(ck: Checkpoint) -> int:
    total = 0
    for n in ck.names():
        dt, shape = ck.info(n)
        total += math.prod(shape) * dtypes.by_name(dt).itemsize
    return total


def _write_item(writer: ContainerWriter, enc: _Encoder, ck: Checkpoint, name: str, codec: str,
                check: bool = True) -> Item:
    if check:
        enc.check_finite(ck, name)
    dt, shape = ck.info(name)
    d = dtypes.by_name(dt)
    arr = dtypes.to_numpy(ck.get(name).contiguous())
    return Item(dt, tuple(shape), writer.write_segment(arr, _codec_for(codec, d.itemsize), d.itemsize))


def _write_tensor(writer: ContainerWriter, enc: _Encoder, p: _Plan, ties_thr, mag_thr, codec: str) -> TensorEntry:
    if p.role == "alias":
        return TensorEntry(p.name, "alias", target=p.target)
    if p.role == "per_task":
        base_item = _write_item(writer, enc, enc.base, p.name, codec) if p.name in enc.base_names else None
        items = tuple(_write_item(writer, enc, ck, p.name, codec) if p.name in names else None
                      for ck, names in zip(enc.cks, enc.task_names_sets))
        return TensorEntry(p.name, "per_task", base_item=base_item, task_items=items)
    item = _write_item(writer, enc, enc.base, p.name, codec, check=p.role == "shared")
    if p.role == "shared":
        return TensorEntry(p.name, "shared", item.dtype, item.shape, data=item.data)
    tau, packed = enc.encode_masked(p, ties_thr, mag_thr)
    tau_seg = writer.write_segment(tau, _codec_for(codec, 4), 4)
    mask_codec = "zstd" if codec == "auto" else codec
    masks = tuple(writer.write_segment(m, mask_codec, 1) for m in packed)
    return TensorEntry(p.name, "masked", item.dtype, item.shape, base=item.data, tau=tau_seg, masks=masks)


# ----------------------------------------------------------------------------------------------
# Choosing λ per task and α of merges on validation data


DEFAULT_LAMBDA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _check_grid(name: str, grid: Any) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in grid)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a sequence of numbers, got {grid!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise InputError(f"{name} must be a non-empty sequence of finite numbers, got {grid!r}")
    return values


def select_lambdas(base: Any, tasks: Mapping[str, Any], evaluate: Callable[[str, dict[str, torch.Tensor]], float],
                   *, grid: Any = DEFAULT_LAMBDA_GRID, workdir: str | Path | None = None,
                   scores: dict[str, dict[float, float]] | None = None, **encode_kwargs: Any) -> dict[str, float]:
    """Pick each task's λ from ``grid`` by ``evaluate(task, state_dict) -> score`` (higher is better).

    One archive per grid value is encoded into ``workdir`` (a temporary folder by default) and each
    task decoded from it in turn, so at most one decoded model is held at a time. Ties go to the
    first grid value. ``scores``, if given, is filled with {task: {λ: score}}.

        >>> lams = select_lambdas("base.safetensors", {"a": "a.safetensors"},
        ...                       lambda task, sd: accuracy(sd, task, "validation"))   # doctest: +SKIP
        >>> encode("base.safetensors", {"a": "a.safetensors"}, "zoo.tall", lambdas=lams)  # doctest: +SKIP
    """
    import tempfile

    from tallfmt.archive import open as open_archive

    values = _check_grid("grid", grid)
    if any(v <= 0 for v in values):
        raise InputError(f"λ grid values must be > 0, got {values}")
    if "lambdas" in encode_kwargs:
        raise InputError("select_lambdas chooses lambdas itself; do not pass lambdas=")
    table: dict[str, dict[float, float]] = {t: {} for t in tasks}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="tallfmt-lambdas-") as tmp:
        for lam in values:
            path = Path(tmp) / "sweep.tall"
            encode(base, tasks, path, lambdas=lam, **encode_kwargs)
            with open_archive(path) as zoo:
                for t in zoo.tasks:
                    table[t][lam] = float(evaluate(t, zoo.decode(t)))
    if scores is not None:
        scores.update(table)
    return {t: max(values, key=lambda v: (table[t][v], -values.index(v))) for t in table}


def select_alpha(archive: Any, evaluate: Callable[[str, dict[str, torch.Tensor]], float], *,
                 method: str = "task_arithmetic", grid: Any = DEFAULT_ALPHA_GRID, tasks: list[str] | None = None,
                 scores: dict[float, float] | None = None, **params: Any) -> float:
    """Pick the α of a merge from ``grid`` by the mean of ``evaluate(task, merged)`` over ``tasks``.

    Holds one merged model at a time. ``archive`` is an open Archive. Ties go to the first grid value.

        >>> alpha = select_alpha(zoo, lambda t, sd: accuracy(sd, t, "validation"),
        ...                      method="consensus", k=2)                           # doctest: +SKIP
    """
    values = _check_grid("grid", grid)
    names = list(tasks) if tasks is not None else archive.tasks
    table: dict[float, float] = {}
    for a in values:
        merged = archive.merge(method, alpha=a, **params)
        table[a] = sum(float(evaluate(t, merged)) for t in names) / max(1, len(names))
        del merged
    if scores is not None:
        scores.update(table)
    return max(values, key=lambda v: (table[v], -values.index(v)))
