"""Reading a .tall archive: decode any task model, a merged model, a mask, agreement statistics.

    >>> import tallfmt
    >>> with tallfmt.open("zoo.tall") as zoo:                  # doctest: +SKIP
    ...     sd = zoo.decode("sst2")                            # {name: tensor} as the fine-tune had it
    ...     merged = zoo.merge("consensus", k=2, alpha=0.4)

Decoding a task reads θ0, τ_MTL and only that task's masks, and runs the fused numba kernel
(θ0 + bit ? τ : 0, rounded once to the tensor's dtype). Merges run their float math in torch on
``device``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tallfmt import dtypes, kernels, maskmath
from tallfmt.checkpoints import save_state_dict
from tallfmt.container import ContainerReader, Header, Item, Segment, TensorEntry
from tallfmt.errors import FormatError, InputError
from tallfmt.sharded import ShardIndex, open_layout


def _writable(arr: np.ndarray) -> np.ndarray:
    # Views of the memory map (raw segments) or of immutable bytes must not escape as torch tensors.
    return arr if arr.flags.writeable else arr.copy()


# ----------------------------------------------------------------------------------------------
# Merge methods: a small registry


@dataclass(frozen=True)
class MergeMethod:
    """A merge: ``apply(theta0, tau, keep, alpha)`` in float32 on masked tensors; others take θ0's value.

    ``needs`` is what apply reads: "tau" (τ_MTL), "counts" (how many task masks keep each parameter).
    ``check(params, num_tasks)`` validates and normalises the keyword parameters.
    """

    name: str
    needs: frozenset[str]
    check: Callable[[dict[str, Any], int], dict[str, Any]]
    apply: Callable[..., torch.Tensor]


def _check_alpha(params: dict[str, Any], num_tasks: int) -> dict[str, Any]:
    alpha = params.pop("alpha", 0.4)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise InputError(f"alpha must be a finite number, got {alpha!r}")
    return {"alpha": float(alpha)}


def _check_consensus(params: dict[str, Any], num_tasks: int) -> dict[str, Any]:
    k = params.pop("k", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InputError(f"k must be an integer >= 0, got {k!r}")
    return {"k": k, **_check_alpha(params, num_tasks)}


def _no_params(params: dict[str, Any], num_tasks: int) -> dict[str, Any]:
    return {}


MERGES: dict[str, MergeMethod] = {}


def register_merge(method: MergeMethod) -> None:
    """Add a merge method (its name must be new)."""
    if method.name in MERGES:
        raise InputError(f"merge method {method.name!r} is already registered")
    MERGES[method.name] = method


register_merge(MergeMethod("zeroshot", frozenset(), _no_params, lambda theta0, **_: theta0))
register_merge(MergeMethod("task_arithmetic", frozenset({"tau"}), _check_alpha,
                           lambda theta0, tau, alpha, **_: maskmath.merge_chunk(theta0, tau, None, alpha)))
register_merge(MergeMethod(
    "consensus", frozenset({"tau", "counts"}), _check_consensus,
    lambda theta0, tau, counts, k, alpha, **_: maskmath.merge_chunk(
        theta0, tau, maskmath.consensus_mask(counts, k), alpha)))


# ----------------------------------------------------------------------------------------------
# Archive


class Archive:
    """An open .tall archive — one file, or a sharded folder (FORMAT.md §9) read as one table of
    tensors. Use ``tallfmt.open(path)``; a context manager.

    ``shards`` are the open files (one for a single file); each tensor is read from the shard that
    holds it. ``index`` is the sharded archive's parsed ``tall.index.json`` (None for a single file).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads or min(4, os.cpu_count() or 1)
        layout = open_layout(path)
        self.path = layout.path  # the file, or a sharded archive's index
        self.header: Header = layout.header
        self.index: ShardIndex | None = layout.index
        self.shards: list[ContainerReader] = layout.readers
        self._reader_of = layout.reader_of  # tensor name -> shard; None: one shard holds all
        self._index_bytes = layout.index_bytes
        self._entries = {t.name: t for t in self.header.tensors}
        self._task_index = {t: i for i, t in enumerate(self.header.task_names)}

    # --- what is inside ---------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """Task names in encode order."""
        return self.header.task_names

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.header.tensors]

    @property
    def roles(self) -> dict[str, str]:
        """{tensor name: role} — masked, shared, per_task or alias."""
        return {t.name: t.role for t in self.header.tensors}

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.metadata)

    @property
    def encoding(self) -> dict[str, Any]:
        return self.header.encoding

    def task_info(self, task: str) -> dict[str, Any]:
        """λ and the statistics recorded at encode time for one task."""
        e = self.header.tasks[self._index(task)]
        return {"name": e.name, "lambda": e.lam, **e.stats}

    def _index(self, task: str) -> int:
        try:
            return self._task_index[task]
        except (KeyError, TypeError):
            raise InputError(f"{self.path}: no task {task!r}; tasks are {self.tasks}") from None

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise InputError(f"{self.path}: no tensor {name!r}") from None

    def _resolve(self, e: TensorEntry) -> TensorEntry:
        return self._entries[e.target] if e.role == "alias" else e

    # --- low-level reads ------------------------------------------------------------------------
    def _shard(self, e: TensorEntry | None) -> ContainerReader:
        if self._reader_of is None:
            return self.shards[0]
        if e is None:
            raise InputError(f"{self.path}: a sharded archive needs the tensor to find a segment's shard")
        return self._reader_of[e.name]

    def _array(self, e: TensorEntry | None, seg: Segment, dtype: str) -> np.ndarray:
        """Segment ``seg`` of tensor ``e``, read from the shard holding ``e``."""
        return self._shard(e).read_array(seg, dtype)

    def _item_tensor(self, item: Item, e: TensorEntry | None = None) -> torch.Tensor:
        """A stored copy (``e``: its tensor row; may be left out when there is one shard)."""
        d = dtypes.by_name(item.dtype)
        return dtypes.to_torch(_writable(self._array(e, item.data, item.dtype)).reshape(item.shape), d)

    def _packed(self, e: TensorEntry, i: int) -> np.ndarray:
        packed = self._array(e, e.masks[i], "U8")
        if not kernels.padding_ok(packed, e.numel):
            raise FormatError(f"{self._shard(e).path}: tensor {e.name!r}, task {self.tasks[i]!r}: mask padding "
                              f"bits are not zero")
        return packed

    def _theta0_f32(self, e: TensorEntry, device: torch.device) -> torch.Tensor:
        d = dtypes.by_name(e.dtype)
        return dtypes.to_torch(self._array(e, e.base, e.dtype), d).to(device, dtype=torch.float32)

    def _tau(self, e: TensorEntry, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(_writable(self._array(e, e.tau, "F32"))).to(device)

    def _counts(self, e: TensorEntry) -> np.ndarray:
        counts = np.zeros(e.numel, dtype=np.uint16)
        for i in range(len(self.tasks)):
            kernels.add_bits(counts, self._packed(e, i), e.numel)
        return counts

    # --- task models ------------------------------------------------------------------------------
    def _decode_entry(self, e: TensorEntry, i: int | None) -> torch.Tensor | None:
        """Tensor `e` of task i (None: θ0), or None when that checkpoint does not have it."""
        if e.role == "shared":
            return self._item_tensor(Item(e.dtype, e.shape, e.data), e)
        if e.role == "per_task":
            item = e.base_item if i is None else e.task_items[i]
            return None if item is None else self._item_tensor(item, e)
        d = dtypes.by_name(e.dtype)
        base = self._array(e, e.base, e.dtype)
        if i is None:
            return dtypes.to_torch(_writable(base).reshape(e.shape), d)
        out = kernels.decode_masked(base, self._array(e, e.tau, "F32"), self._packed(e, i), dtype=e.dtype)
        return dtypes.to_torch(out.reshape(e.shape), d)

    def _iter(self, fn: Callable[[TensorEntry], torch.Tensor | None], device: torch.device | None
              ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield fn(tensor) in table order, computing up to ``threads`` tensors ahead in a thread pool
        (the kernels, zstd and numpy release the GIL). Memory stays at a few tensors: only alias
        targets are kept after they are yielded."""
        targets = {e.target for e in self.header.tensors if e.role == "alias"}
        kept: dict[str, torch.Tensor | None] = {}

        def run(e: TensorEntry) -> torch.Tensor | None:
            t = fn(e)
            return t.to(device) if t is not None and device is not None else t

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            pending: deque[tuple[TensorEntry, Future | None]] = deque()
            entries = iter(self.header.tensors)
            while True:
                while len(pending) <= self.threads:
                    e = next(entries, None)
                    if e is None:
                        break
                    pending.append((e, None if e.role == "alias" else pool.submit(run, e)))
                if not pending:
                    return
                e, fut = pending.popleft()
                target = self._resolve(e)
                if fut is not None:
                    t = fut.result()
                elif target.name in kept:
                    t = kept[target.name]
                else:  # an alias listed before its target
                    t = run(target)
                if target.name in targets:
                    kept[target.name] = t
                if t is not None:
                    yield e.name, t

    def iter_decode(self, task: str, *, device: str | torch.device | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) of one task model, tensor by tensor (bounded memory)."""
        i = self._index(task)
        return self._iter(lambda e: self._decode_entry(e, i), torch.device(device) if device else None)

    def decode(self, task: str, *, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """θ̂_t = θ0 + m_t ∘ τ_MTL for every tensor: original names, shapes and dtypes.

        Tied tensors (role ``alias``) are the same tensor object, as in the original model.

            >>> sd = zoo.decode("sst2")                            # doctest: +SKIP
        """
        return dict(self.iter_decode(task, device=device))

    def decode_tensor(self, task: str, name: str, *, device: str | torch.device | None = None) -> torch.Tensor:
        """One tensor of one task model."""
        t = self._decode_entry(self._resolve(self._entry(name)), self._index(task))
        if t is None:
            raise InputError(f"{self.path}: task {task!r} has no tensor {name!r}")
        return t.to(device) if device is not None else t

    def _entries_for(self, present: Callable[[TensorEntry], Item | TensorEntry | None]
                     ) -> list[tuple[str, str, tuple[int, ...]]]:
        out = []
        for e in self.header.tensors:
            r = present(self._resolve(e))
            if r is not None:
                out.append((e.name, r.dtype, tuple(r.shape)))
        return out

    def _present(self, i: int | None) -> Callable[[TensorEntry], Item | TensorEntry | None]:
        def f(e: TensorEntry) -> Item | TensorEntry | None:
            if e.role == "per_task":
                return e.base_item if i is None else e.task_items[i]
            return e
        return f

    def decode_to(self, task: str, out: str | os.PathLike, *, max_shard_size: int = 5 * 2**30,
                  metadata: dict[str, str] | None = None) -> list[Path]:
        """Write one task model to ``out``: a ``.safetensors`` file, or a folder (HF-style, sharded
        above ``max_shard_size``). Streams tensor by tensor; atomic. Returns the files written."""
        i = self._index(task)
        return save_state_dict(self.iter_decode(task), out, entries=self._entries_for(self._present(i)),
                               max_shard_size=max_shard_size, metadata=metadata)

    # --- merged models ----------------------------------------------------------------------------
    def _merge_fn(self, method: str, params: dict[str, Any], device: torch.device
                  ) -> Callable[[TensorEntry], torch.Tensor | None]:
        try:
            m = MERGES[method]
        except (KeyError, TypeError):
            raise InputError(f"unknown merge method {method!r}; known: {sorted(MERGES)}") from None
        params = dict(params)
        checked = m.check(params, len(self.tasks))
        if params:
            raise InputError(f"merge {method!r} takes no parameter(s) {sorted(params)}")

        def fn(e: TensorEntry) -> torch.Tensor | None:
            if e.role != "masked":
                return self._decode_entry(e, None)
            d = dtypes.by_name(e.dtype)
            theta0 = self._theta0_f32(e, device)
            tau = self._tau(e, device) if "tau" in m.needs else None
            counts = (torch.from_numpy(self._counts(e).astype(np.int32)).to(device)
                      if "counts" in m.needs else None)
            merged = m.apply(theta0=theta0, tau=tau, counts=counts, **checked)
            return merged.to(d.torch).reshape(e.shape).cpu()
        return fn

    def iter_merge(self, method: str = "task_arithmetic", *, device: str | torch.device | None = None,
                   **params: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) of a merged model, tensor by tensor."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        fn = self._merge_fn(method, params, dev)
        return self._iter(fn, dev if device is not None else None)

    def merge(self, method: str = "task_arithmetic", *, device: str | torch.device | None = None,
              **params: Any) -> dict[str, torch.Tensor]:
        """A merged multi-task model. Methods: ``task_arithmetic`` θ0 + α·τ_MTL (``alpha``=0.4);
        ``consensus`` θ0 + α·(1{Σ_t m_t ≥ k} ∘ τ_MTL) (``k``=2, ``alpha``=0.4); ``zeroshot`` θ0.
        τ_MTL is the archive's (TIES-merged if it was encoded with merge="ties"). Per-task tensors
        come from θ0 when θ0 has them and are left out otherwise.

            >>> merged = zoo.merge("consensus", k=2, alpha=0.4)  # doctest: +SKIP
        """
        return dict(self.iter_merge(method, device=device, **params))

    def merge_to(self, out: str | os.PathLike, method: str = "task_arithmetic", *,
                 max_shard_size: int = 5 * 2**30, **params: Any) -> list[Path]:
        """Write a merged model to a .safetensors file or an HF-style folder (streamed, atomic)."""
        it = self.iter_merge(method, **params)
        return save_state_dict(it, out, entries=self._entries_for(self._present(None)),
                               max_shard_size=max_shard_size)

    # --- masks and statistics -------------------------------------------------------------------
    def mask(self, task: str, name: str) -> torch.Tensor:
        """Task ``task``'s mask of tensor ``name`` as a torch.bool tensor of the tensor's shape."""
        i = self._index(task)
        e = self._resolve(self._entry(name))
        if e.role != "masked":
            raise InputError(f"{self.path}: tensor {name!r} has role {e.role!r}; only masked tensors have masks")
        return torch.from_numpy(kernels.unpack_bits(self._packed(e, i), e.numel)).reshape(e.shape)

    def agreement(self, *, device: str | torch.device | None = None) -> torch.Tensor:
        """int64 tensor of length T+1: parameters kept by exactly n of the T task masks (paper eq. 7)."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        total = torch.zeros(len(self.tasks) + 1, dtype=torch.int64, device=dev)
        for e in self.header.tensors:
            if e.role == "masked":
                counts = torch.from_numpy(self._counts(e).astype(np.int64)).to(dev)
                total += maskmath.agreement_histogram(counts, len(self.tasks))
        return total

    def verify(self) -> None:
        """Check every checksum, decode every segment and check mask padding, in every shard;
        FormatError naming the damaged file. (A sharded archive's index and shard headers were
        checked against each other on open.)"""
        for shard in self.shards:
            shard.verify()
        for e in self.header.tensors:
            for i in range(len(e.masks)):
                self._packed(e, i)

    def sizes(self) -> dict[str, int]:
        """Stored bytes per part: theta0, tau, masks, shared, per_task, header, padding and total."""
        parts = dict.fromkeys(("theta0", "tau", "masks", "shared", "per_task"), 0)
        for e in self.header.tensors:
            if e.role == "masked":
                parts["theta0"] += e.base.length
                parts["tau"] += e.tau.length
                parts["masks"] += sum(m.length for m in e.masks)
            elif e.role in ("shared", "per_task"):
                parts[e.role] += sum(s.length for s in e.segments())
        # a sharded archive: every shard's preamble and header, and the index, count as "header"
        parts["header"] = sum(r.header_length + 64 for r in self.shards) + self._index_bytes
        parts["total"] = sum(r.file_size for r in self.shards) + self._index_bytes
        parts["padding"] = parts["total"] - sum(v for k, v in parts.items() if k != "total")
        return parts

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        shards = f", {len(self.shards)} shards" if self.index is not None else ""
        return f"<tallfmt.Archive {str(self.path)!r}: {len(self.tasks)} tasks, {len(self._entries)} tensors{shards}>"


def open(path: str | os.PathLike, *, threads: int | None = None) -> Archive:  # noqa: A001 - like safe_open
    """Open a .tall archive (validates the header, memory-maps the data; tensors are read lazily).

    ``path``: a .tall file, or a sharded archive's ``tall.index.json`` or the folder holding it
    (every shard is opened and checked against the index; FORMAT.md §9).

    ``threads``: tensors decoded ahead in parallel by iter_decode/decode/merge (default: up to 4).

        >>> with tallfmt.open("zoo.tall") as zoo:                # doctest: +SKIP
        ...     print(zoo.tasks)
        >>> with tallfmt.open("zoo/") as zoo:                    # doctest: +SKIP
        ...     zoo.verify()
    """
    return Archive(path, threads=threads)
