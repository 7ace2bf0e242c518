"""Serving tasks from an archive into a live model: :func:`load_into` writes one task model into an
existing module (or state dict) in place, and :class:`Switcher` keeps what every task needs resident
and switches the module between tasks without reading the file.

Both write into the tensors the target already has — on their own device, in their own dtype — so
tied parameters stay tied and references to them stay valid. Names map as
``prefix + name_map(archive name)``; mismatches are refused as ``load_state_dict(strict=True)`` would.

The switcher holds, per masked tensor, θ0 and θ1 = round_dtype(θ0 + τ_MTL) (the decoded value
wherever a mask bit is set, which does not depend on the task) and every task's packed mask, on the
tensor's device: ``switch(t)`` is then out = m_t ? θ1 : θ0, one select pass, bit for bit the decode
of FORMAT.md §4.4, in (2 + T/(8·itemsize)) × the masked tensors' bytes. On the CPU the select is the
numba kernel over ranges on a few threads; elsewhere it is torch (:mod:`tallfmt.compute.fused`).

    >>> with tallfmt.open("zoo.tall") as zoo:                 # doctest: +SKIP
    ...     zoo.load_into(model, "sst2")                        # in place, strict
    ...     switch = zoo.switcher(model)
    >>> switch("mnli")                                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from tallfmt import kernels
from tallfmt.compute import fused
from tallfmt.compute.tensors import to_torch, torch_dtype
from tallfmt.errors import InputError
from tallfmt.format.dtypes import by_name
from tallfmt.format.header import TensorEntry
from tallfmt.read.decoding import ArchiveTensors, storage_view
from tallfmt.read.defaults import KERNEL_STEP, check_kernel
from tallfmt.read.jobs import Jobs, done

#: An open :class:`tallfmt.read.archive.Archive` (not imported: archive.py imports this module).
Archive = Any

NameMap = Mapping[str, str] | Callable[[str], "str | None"] | None
#: How many names an error message lists.
SHOWN = 8


class LoadResult(NamedTuple):
    """What :func:`load_into` did not match (both empty when ``strict``), like torch's."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def target_tensors(target: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a module's parameters and persistent buffers, or of a mapping."""
    if isinstance(target, torch.nn.Module):
        return dict(target.state_dict(keep_vars=True))
    if isinstance(target, Mapping):
        bad = [k for k, v in target.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise InputError(f"target: expected {{name: tensor}}, got {bad[:SHOWN]!r} that are not")
        return dict(target)
    raise InputError(f"target: expected a torch.nn.Module or a mapping of tensors, got {type(target).__name__}")


def name_mapper(prefix: str, name_map: NameMap) -> Callable[[str], str | None]:
    """archive name → target name (None: skip): ``prefix + name_map(name)``."""
    if not isinstance(prefix, str):
        raise InputError(f"prefix must be a string, got {prefix!r}")
    if name_map is None:
        return lambda n: prefix + n
    if isinstance(name_map, Mapping):
        return lambda n: prefix + name_map.get(n, n)
    if callable(name_map):
        def mapped(n: str) -> str | None:
            m = name_map(n)
            if m is not None and not isinstance(m, str):
                raise InputError(f"name_map({n!r}) returned {m!r}, not a string or None")
            return None if m is None else prefix + m
        return mapped
    raise InputError(f"name_map must be a mapping, a function or None, got {type(name_map).__name__}")


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Equal for tensors that are the same memory (tied weights)."""
    if t.numel() == 0:
        return ("empty", id(t))
    return (str(t.device), t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())


def _names(names: Iterable[str]) -> str:
    names = list(names)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(repr(n) for n in names[:SHOWN]) + more


@dataclass
class Row:
    """One stored row of the archive and the distinct target tensors it writes (several when the
    archive ties tensors the target keeps apart); ``checks``: tensors an earlier row already writes
    (the target ties what the archive stores apart), which must come out equal."""

    entry: TensorEntry
    tensors: list[torch.Tensor] = field(default_factory=list)
    checks: list[tuple[str, torch.Tensor]] = field(default_factory=list)


def plan(zoo: Archive, targets: dict[str, torch.Tensor], task: str, mapfn: Callable[[str], str | None],
         strict: bool, cast: bool) -> tuple[dict[str, Row], LoadResult]:
    """Match task ``task``'s tensors to ``targets``: the rows to write (by stored row name) and what
    did not match. InputError for missing/unexpected names when ``strict``, for shape mismatches, and
    for dtype mismatches unless ``cast``."""
    i = zoo.task_index(task)
    where = f"{zoo.path}: task {task!r}"
    covered: set[str] = set()
    unexpected: list[str] = []
    rows: dict[str, Row] = {}
    owner: dict[tuple[Any, ...], str] = {}
    for name, dtype, shape in zoo.model_entries(i):
        key = mapfn(name)
        if key is None:
            continue
        if key not in targets:
            unexpected.append(key)
            continue
        covered.add(key)
        t = targets[key]
        if tuple(t.shape) != shape:
            raise InputError(f"{where}: tensor {name!r} has shape {list(shape)}, the target's {key!r} "
                             f"{list(t.shape)}")
        if t.dtype != torch_dtype(dtype) and not cast:
            raise InputError(f"{where}: tensor {name!r} is {dtype}, the target's {key!r} is {t.dtype} "
                             f"(pass cast=True to convert)")
        e = zoo.entry(name)  # an alias resolved to the row it shares
        sk = _storage_key(t)
        row = rows.setdefault(e.name, Row(e))
        if sk not in owner:
            owner[sk] = e.name
            row.tensors.append(t)
        elif owner[sk] != e.name:
            row.checks.append((owner[sk], t))
    missing = [k for k in targets if k not in covered]
    if strict and (missing or unexpected):
        parts = [f"missing in the archive: {_names(missing)}" if missing else "",
                 f"not in the target: {_names(unexpected)}" if unexpected else ""]
        raise InputError(f"{where} does not match the target ({'; '.join(p for p in parts if p)}); map names "
                         f"with prefix= or name_map=, or pass strict=False")
    return rows, LoadResult(missing, unexpected)


def _written(ts: Iterable[torch.Tensor]) -> None:
    """Tell autograd that tensors were written behind its back (as an in-place op would)."""
    for t in ts:
        torch.autograd.graph.increment_version(t)


def _straight(tensors: ArchiveTensors, row: Row) -> torch.Tensor | None:
    """The target tensor a masked row can be decoded straight into (CPU, contiguous, its dtype)."""
    if row.entry.role != "masked" or not row.tensors or tensors.use_torch(row.tensors[0].device):
        return None
    t = row.tensors[0]
    if t.dtype != torch_dtype(row.entry.dtype) or storage_view(t) is None or row.checks:
        return None
    return t


def load_into(zoo: Archive, target: torch.nn.Module | Mapping[str, torch.Tensor], task: str, *, prefix: str = "",
              name_map: NameMap = None, strict: bool = True, cast: bool = False) -> LoadResult:
    """Write task model ``task`` into ``target`` in place (see :meth:`tallfmt.read.archive.Archive.load_into`)."""
    targets = target_tensors(target)
    rows, result = plan(zoo, targets, task, name_mapper(prefix, name_map), strict, cast)
    i = zoo.task_index(task)
    t = zoo.tensors
    straight = {name: _straight(t, row) for name, row in rows.items()}

    def start(jobs: Jobs, e: TensorEntry) -> Any:
        row = rows.get(e.name)
        if row is None:
            return done(None)
        dev = row.tensors[0].device if row.tensors else None
        return t.start_decode(jobs, e, i, dev, out=straight[e.name])

    with torch.no_grad():
        for name, value in t.iterate(start):
            row = rows.get(name)
            if row is None:
                continue
            for tgt in row.tensors:
                if tgt is not value:
                    tgt.copy_(value.reshape(tgt.shape))
            for first, tgt in row.checks:
                if not torch.equal(tgt, value.to(tgt.device, tgt.dtype).reshape(tgt.shape)):
                    raise InputError(f"{zoo.path}: task {task!r}: {name!r} and {first!r} are one tensor in the "
                                     f"target but differ in the archive")
            _written(row.tensors)
    return result


def _ones_mask(n: int) -> np.ndarray:
    p = np.full((n + 7) // 8, 0xFF, dtype=np.uint8)
    if n % 8:
        p[-1] = (1 << (n % 8)) - 1
    return p


def _groups(arrays: list[np.ndarray | None]) -> list[int]:
    """Per array, the index of the first equal one (None equals None): copies are kept once."""
    out: list[int] = []
    for k, a in enumerate(arrays):
        out.append(next((j for j in range(k) if _same(arrays[j], a)), k))
    return out


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                         b.reshape(-1).view(torch.uint8))
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def _same_resident(a: Any, b: Any) -> bool:
    """Whether two rows' resident values give every task the same tensor."""
    if type(a) is not type(b):
        return False
    if isinstance(a, _Masked):
        pairs = [(a.theta0, b.theta0), (a.theta1, b.theta1), (a.masks, b.masks)]
        for ra, rb in zip(a.residuals, b.residuals):
            if (ra is None) != (rb is None):
                return False
            if ra is not None:
                pairs += [(ra[0], rb[0]), (ra[1], rb[1])]
        return all(_same(_np(x), _np(y)) for x, y in pairs)
    return len(a.values) == len(b.values) and all(
        _same(a.values[a.group[k]], b.values[b.group[k]]) for k in range(len(a.values)))


def _np(x: Any) -> np.ndarray:
    return x.cpu().reshape(-1).view(torch.uint8).numpy() if isinstance(x, torch.Tensor) else x.reshape(-1).view(np.uint8)


@dataclass
class _Masked:
    row: Row
    theta0: Any          # flat storage: numpy on the CPU, a torch tensor on another device
    theta1: Any
    masks: Any           # (T, ⌈n/8⌉) packed masks, numpy or torch
    group: list[int]     # per task, the first task with the same mask and residual
    on_device: bool
    # per task: its residual's positions and decoded values (the dtype's storage), numpy or torch, or None
    residuals: list[tuple[Any, Any] | None] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.theta0, self.theta1, self.masks)) + sum(
            int(p.nbytes) + int(v.nbytes) for r in self.residuals if r is not None for p, v in (r,))


@dataclass
class _Stored:
    row: Row
    values: list[torch.Tensor | None]  # per task (per_task), or one value for every task (shared)
    group: list[int]

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for k, v in enumerate(self.values) if v is not None
                   and self.group[k] == k)


class Switcher:
    """Serves every task of an archive in one model, switching it in place (see
    :meth:`tallfmt.read.archive.Archive.switcher`). Call it with a task name; ``task`` is the task
    the target holds (None before the first call). Reads nothing from the archive after it is built.

    A switch writes every masked tensor whose mask differs from the current task's, and the per-task
    tensors whose stored copies differ; shared tensors are written by the first switch only. It
    assumes nothing else writes those tensors in between (``load_into`` writes everything).

        >>> switch = zoo.switcher(model)                     # doctest: +SKIP
        >>> switch("sst2"); switch.task, switch.resident_bytes  # doctest: +SKIP
        ('sst2', 1012345678)
    """

    def __init__(self, zoo: Archive, target: torch.nn.Module | Mapping[str, torch.Tensor], *, prefix: str = "",
                 name_map: NameMap = None, strict: bool = True, kernel: str = "auto") -> None:
        self.tasks = list(zoo.tasks)
        self.threads = zoo.threads
        self.path = zoo.path
        targets = target_tensors(target)
        mapfn = name_mapper(prefix, name_map)
        t = zoo.tensors
        self._torch = check_kernel(kernel) == "torch"
        rows: dict[str, Row] = {}
        for task in self.tasks:  # every task must fit the target
            for name, row in plan(zoo, targets, task, mapfn, strict, cast=False)[0].items():
                rows.setdefault(name, row)
        self._masked: list[_Masked] = []
        self._stored: list[_Stored] = []
        built: dict[str, _Masked | _Stored] = {}
        with torch.no_grad():
            for e in zoo.header.tensors:
                row = rows.get(e.name)
                if row is None:
                    continue
                built[e.name] = r = self._resident(t, row)
                for first, _ in row.checks:  # the target ties rows the archive stores apart
                    if not _same_resident(built[first], r):
                        raise InputError(f"{self.path}: {e.name!r} and {first!r} are one tensor in the target but "
                                         f"differ in the archive for some task; a switcher cannot serve them")
                if not row.tensors:
                    continue  # every tensor it would write is written by an equal row
                (self._masked if isinstance(r, _Masked) else self._stored).append(r)
        self._current: int | None = None

    def _resident(self, t: ArchiveTensors, row: Row) -> _Masked | _Stored:
        e = row.entry
        if e.role == "masked":
            return self._resident_masked(t, row)
        if e.role == "shared":
            return _Stored(row, [t.decode_entry(e, None)], [0])
        vals = [t.decode_entry(e, i) for i in range(len(self.tasks))]
        group = _groups(vals)
        dev = row.tensors[0].device if row.tensors else None
        return _Stored(row, [v.to(dev) if v is not None and group[k] == k and dev is not None else
                             (v if group[k] == k else None) for k, v in enumerate(vals)], group)

    def _resident_masked(self, t: ArchiveTensors, row: Row) -> _Masked:
        e = row.entry
        n = e.numel
        theta0 = t.theta0(e)
        theta1 = np.empty_like(theta0)
        tau = t.tau_now(e)
        kernels.decode_into(theta0, tau if tau.ndim == 2 else tau.view(np.float32), _ones_mask(n), theta1,
                            dtype=e.dtype, check_padding=False)
        packed = list(t.all_packed(e))
        masks = np.stack(packed) if packed else np.zeros((0, (n + 7) // 8), np.uint8)
        residuals = []
        for i, p in enumerate(packed):  # each entry's decoded value, computed once (FORMAT.md §11)
            r = t.residual(e, i)
            residuals.append(None if r is None else (r[0], kernels.residual_values(
                theta0, tau if tau.ndim == 2 else tau.view(np.float32), p, *r, dtype=e.dtype)))
        # tasks share a group when their masks and residuals are equal: a switch between them writes nothing
        group = _groups([p if r is None else np.concatenate([p, r[0].view(np.uint8), r[1].view(np.uint8)])
                         for p, r in zip(packed, residuals)])
        dev = row.tensors[0].device if row.tensors else torch.device("cpu")
        if dev.type == "cpu" and not self._torch:
            return _Masked(row, theta0.copy(), theta1, masks, group, False, residuals)
        d = by_name(e.dtype)

        def put(a: np.ndarray) -> torch.Tensor:
            return to_torch(a, d).to(dev)
        on_dev = [None if r is None else (torch.from_numpy(r[0]).to(dev), put(r[1])) for r in residuals]
        return _Masked(row, put(theta0), put(theta1), torch.from_numpy(masks).to(dev), group, True, on_dev)

    @property
    def task(self) -> str | None:
        """The task the target holds now (None before the first switch)."""
        return None if self._current is None else self.tasks[self._current]

    @property
    def resident_bytes(self) -> int:
        """Bytes the switcher holds: θ0, θ1 and masks of every masked tensor, distinct per-task copies."""
        return sum(m.nbytes() for m in self._masked) + sum(s.nbytes() for s in self._stored
                                                           if s.row.entry.role == "per_task")

    def __call__(self, task: str) -> None:
        """Make the target hold task ``task``'s model."""
        try:
            i = self.tasks.index(task)
        except ValueError:
            raise InputError(f"{self.path}: no task {task!r}; tasks are {self.tasks}") from None
        prev = self._current
        self._current = None  # a switch that fails half way leaves no task claimed
        todo = [m for m in self._masked if prev is None or m.group[prev] != m.group[i]]
        with torch.no_grad():
            self._select(i, [m for m in todo if not m.on_device])
            for m in todo:
                if m.on_device:
                    self._select_torch(i, m)
            for s in self._stored:
                k = 0 if s.row.entry.role == "shared" else i
                if prev is not None and (s.row.entry.role == "shared" or s.group[prev] == s.group[k]):
                    continue
                value = s.values[s.group[k]]
                if value is None:  # this task has no such tensor (strict=False): left as it is
                    continue
                for tgt in s.row.tensors:
                    tgt.copy_(value.reshape(tgt.shape))
                _written(s.row.tensors)
            if prev is None:  # shared tensors are written once: drop the copies
                for s in self._stored:
                    if s.row.entry.role == "shared":
                        s.values = [None]
        self._current = i

    def _select(self, i: int, todo: list[_Masked]) -> None:
        """The CPU masked tensors, straight into their memory, ranges of each on the worker threads."""
        if not todo:
            return
        with Jobs(self.threads) as jobs:
            futures = []
            written: list[tuple[_Masked, np.ndarray | None]] = []
            for m in todo:
                outs = [(tgt, storage_view(tgt)) for tgt in m.row.tensors]
                for tgt, view in outs:
                    buf = view if view is not None else np.empty_like(m.theta0)

                    def run(a: int, z: int, m: _Masked = m, buf: np.ndarray = buf) -> None:
                        kernels.select_into(m.theta1, m.theta0, m.masks[i], buf, start=a, stop=z, check_padding=False)
                    fut = jobs.ranges(m.row.entry.numel, KERNEL_STEP, run)
                    futures.append((fut, tgt, None if view is not None else buf))
                    written.append((m, view))
            for (fut, tgt, buf), (m, view) in zip(futures, written):
                fut.result()
                r = m.residuals[i] if m.residuals else None
                if r is not None:  # the task's residual entries, after the select of the whole tensor
                    (view if view is not None else buf)[r[0]] = r[1]
                if buf is not None:  # a tensor that is not contiguous: selected beside it, then copied
                    tgt.copy_(torch.from_numpy(buf.view(np.uint8)).view(tgt.dtype).reshape(tgt.shape))
            _written(t for m in todo for t in m.row.tensors)

    def _select_torch(self, i: int, m: _Masked) -> None:
        bits = fused.unpack_bits(m.masks[i], m.row.entry.numel)
        r = m.residuals[i] if m.residuals else None
        for tgt in m.row.tensors:
            if tgt.is_contiguous():
                flat = fused.select(bits, m.theta1, m.theta0, out=tgt.view(-1))
            else:
                flat = fused.select(bits, m.theta1, m.theta0)
            if r is not None:
                flat[r[0]] = r[1]
            if not tgt.is_contiguous():
                tgt.copy_(flat.reshape(tgt.shape))
        _written(m.row.tensors)

    def __repr__(self) -> str:
        return (f"<tallfmt.Switcher {str(self.path)!r}: {len(self.tasks)} tasks, holding {self.task!r}, "
                f"{self.resident_bytes / 2**20:.1f} MiB resident>")


def model_bytes(target: torch.nn.Module | Mapping[str, torch.Tensor]) -> int:
    """Bytes of a model's distinct tensors (tied ones once): what a switcher's memory is measured against."""
    seen: dict[tuple[Any, ...], int] = {}
    for t in target_tensors(target).values():
        seen[_storage_key(t)] = t.numel() * t.element_size()
    return sum(seen.values())

