"""Reading a .tall archive: decode any task model, a merged model, a mask, τ_MTL, agreement statistics.

    >>> import tallfmt
    >>> with tallfmt.open("zoo.tall") as zoo:                  # doctest: +SKIP
    ...     sd = zoo.decode("sst2")                            # {name: tensor} as the fine-tune had it
    ...     merged = zoo.merge("consensus", k=2, alpha=0.4)

Opening validates the header (and a sharded archive's index and shard headers) and memory-maps the
data; what only reads the header (``tasks``, ``task_info``, ``roles``, ``sizes``) never imports torch
or numba. Decoding a task reads θ0, τ_MTL and only that task's masks, and runs the fused kernel
(θ0 + bit ? τ : 0, rounded once to the tensor's dtype): numba on the CPU, torch on another device.
Decoded θ0 and τ_MTL stay in a cache of ``cache_bytes`` (default 2 GiB), so a later decode of
another task reads only its masks. ``load_into`` writes a task into an existing model in place;
``switcher`` keeps a model's θ0, θ0 + τ_MTL and masks resident and switches it between tasks
without reading the file (:mod:`tallfmt.read.serving`). Merges run their float math in torch on
``device``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tallfmt.errors import InputError
from tallfmt.format.container import ContainerReader
from tallfmt.format.header import Header, Item, TensorEntry
from tallfmt.format.index import ShardIndex
from tallfmt.format.layout import open_layout
from tallfmt.read.cache import SegmentCache
from tallfmt.read.defaults import DEFAULT_CACHE_BYTES, MAX_THREADS, check_kernel
from tallfmt.read.merges import DEFAULT_MERGE

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import torch

    from tallfmt.read.decoding import ArchiveTensors
    from tallfmt.read.serving import LoadResult, Switcher


class Archive:
    """An open .tall archive — one file, or a sharded folder (FORMAT.md §9) read as one table of
    tensors. Use ``tallfmt.open(path)``; a context manager.

    ``shards`` are the open files (one for a single file); each tensor is read from the shard that
    holds it. ``index`` is the sharded archive's parsed ``tall.index.json`` (None for a single file).
    ``cache`` holds decoded θ0 and τ_MTL segments (see :func:`open`).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, kernel: str = "auto") -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        self.threads = threads or min(MAX_THREADS, os.cpu_count() or 1)
        self.kernel = check_kernel(kernel)
        self.cache = SegmentCache(cache_bytes)
        self.layout = open_layout(path)
        self.path = self.layout.path  # the file, or a sharded archive's index
        self.header: Header = self.layout.header
        self.index: ShardIndex | None = self.layout.index
        self.shards: list[ContainerReader] = self.layout.readers
        self._entries = {t.name: t for t in self.header.tensors}
        self._task_index = {t: i for i, t in enumerate(self.header.task_names)}
        self._tensors: ArchiveTensors | None = None

    # --- what is inside (header only) -----------------------------------------------------------
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
        e = self.header.tasks[self.task_index(task)]
        return {"name": e.name, "lambda": e.lam, **e.stats}

    def task_index(self, task: str) -> int:
        """The position of ``task`` in the archive's task order; InputError naming the known tasks."""
        try:
            return self._task_index[task]
        except (KeyError, TypeError):
            raise InputError(f"{self.path}: no task {task!r}; tasks are {self.tasks}") from None

    def entry(self, name: str) -> TensorEntry:
        """The tensor table row of ``name`` (an alias resolved to its target)."""
        try:
            e = self._entries[name]
        except (KeyError, TypeError):
            raise InputError(f"{self.path}: no tensor {name!r}") from None
        return self._entries[e.target] if e.role == "alias" else e

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
        parts["header"] = sum(r.header_length + 64 for r in self.shards) + self.layout.index_bytes
        parts["total"] = sum(r.file_size for r in self.shards) + self.layout.index_bytes
        parts["padding"] = parts["total"] - sum(v for k, v in parts.items() if k != "total")
        return parts

    # --- tensors (torch and numba load here, on first use) ---------------------------------------
    @property
    def tensors(self) -> ArchiveTensors:
        """The tensor reader (loads torch and the kernels on first use)."""
        if self._tensors is None:
            from tallfmt.read.decoding import ArchiveTensors

            self._tensors = ArchiveTensors(self.layout, self.threads, self.cache, self.kernel)
        return self._tensors

    def iter_decode(self, task: str, *, device: str | torch.device | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) of one task model, tensor by tensor (bounded memory: a few hundred MB
        decoded ahead, plus the cache)."""
        i = self.task_index(task)
        t = self.tensors
        dev = _device(device)
        return t.iterate(lambda jobs, e: t.start_decode(jobs, e, i, dev))

    def decode(self, task: str, *, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """θ̂_t = θ0 + m_t ∘ τ_MTL for every tensor: original names, shapes and dtypes, on ``device``
        (decoded there: a CUDA device runs the decode in torch on the GPU).

        Tied tensors (role ``alias``) are the same tensor object, as in the original model.

            >>> sd = zoo.decode("sst2")                            # doctest: +SKIP
            >>> sd = zoo.decode("mnli", device="cuda")             # doctest: +SKIP
        """
        return dict(self.iter_decode(task, device=device))

    def decode_tensor(self, task: str, name: str, *, device: str | torch.device | None = None) -> torch.Tensor:
        """One tensor of one task model."""
        i = self.task_index(task)
        t = self.tensors.decode_entry(self.entry(name), i)
        if t is None:
            raise InputError(f"{self.path}: task {task!r} has no tensor {name!r}")
        return t.to(device) if device is not None else t

    def load_into(self, target: torch.nn.Module | Mapping[str, torch.Tensor], task: str, *, prefix: str = "",
                  name_map: Mapping[str, str] | Callable[[str], str | None] | None = None, strict: bool = True,
                  cast: bool = False) -> LoadResult:
        """Write task model ``task`` into ``target`` in place: an ``nn.Module``'s parameters and
        persistent buffers, or a ``{name: tensor}`` mapping, each on the device and in the dtype it
        already has (tied parameters stay tied: no tensor is replaced, each is written once).

        Names: archive name ``n`` is ``prefix + name_map(n)`` in ``target`` (``name_map`` a mapping —
        unlisted names stay — or a function returning None to skip a tensor). Like
        ``load_state_dict(strict=True)``: InputError for names missing on either side (``strict=False``
        skips them and returns them), and always for a shape mismatch or, unless ``cast``, a dtype one.
        CPU tensors of the stored dtype are decoded straight into their memory.

            >>> model = BertForSequenceClassification(config)   # doctest: +SKIP
            >>> zoo.load_into(model, "sst2", prefix="bert.", strict=False)  # doctest: +SKIP
        """
        from tallfmt.read.serving import load_into

        return load_into(self, target, task, prefix=prefix, name_map=name_map, strict=strict, cast=cast)

    def switcher(self, target: torch.nn.Module | Mapping[str, torch.Tensor], *, prefix: str = "",
                 name_map: Mapping[str, str] | Callable[[str], str | None] | None = None, strict: bool = True,
                 kernel: str | None = None) -> Switcher:
        """A :class:`~tallfmt.read.serving.Switcher` that serves every task of this archive in
        ``target`` (names as :meth:`load_into`; dtypes must match): θ0, θ0 + τ_MTL rounded, and every
        task's packed masks stay resident on each tensor's device, and ``switch(task)`` rewrites
        ``target`` in place from them — one select pass, no reads from the file.

            >>> switch = zoo.switcher(model)                     # doctest: +SKIP
            >>> switch("sst2"); out = model(**batch)             # doctest: +SKIP
            >>> switch("mnli"); out = model(**batch)             # doctest: +SKIP
        """
        from tallfmt.read.serving import Switcher

        return Switcher(self, target, prefix=prefix, name_map=name_map, strict=strict,
                        kernel=kernel or self.kernel)

    def cache_info(self) -> dict[str, int]:
        """The decoded-segment cache: ``budget``, ``bytes`` held, ``segments``, ``hits``, ``misses``."""
        return self.cache.info()

    def clear_cache(self) -> None:
        """Drop every cached θ0 / τ_MTL segment (the next decode decompresses again)."""
        self.cache.clear()

    def model_entries(self, i: int | None) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of each tensor the model of task index ``i`` (None: θ0, what merges
        hold) has, in table order."""
        out = []
        for row in self.header.tensors:
            e = self.entry(row.name)
            r: Item | TensorEntry | None = e
            if e.role == "per_task":
                r = e.base_item if i is None else e.task_items[i]
            if r is not None:
                out.append((row.name, r.dtype, tuple(r.shape)))
        return out

    def decode_to(self, task: str, out: str | os.PathLike, *, max_shard_size: int = 5 * 2**30,
                  metadata: dict[str, str] | None = None) -> list[Path]:
        """Write one task model to ``out``: a ``.safetensors`` file, or a folder (HF-style, sharded
        above ``max_shard_size``). Streams tensor by tensor; atomic. Returns the files written."""
        from tallfmt.checkpoints import save_state_dict

        i = self.task_index(task)
        return save_state_dict(self.iter_decode(task), out, entries=self.model_entries(i),
                               max_shard_size=max_shard_size, metadata=metadata)

    def iter_merge(self, method: str = DEFAULT_MERGE, *, device: str | torch.device | None = None,
                   **params: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) of a merged model, tensor by tensor."""
        import torch

        from tallfmt.read.decoding import move

        dev = _device(device)
        fn = self.tensors.merge_fn(method, params, dev or torch.device("cpu"))
        return self.tensors.iterate(lambda jobs, e: jobs.submit(lambda: move(fn(e), dev)))

    def merge(self, method: str = DEFAULT_MERGE, *, device: str | torch.device | None = None,
              **params: Any) -> dict[str, torch.Tensor]:
        """A merged multi-task model (methods and their parameters: :data:`tallfmt.MERGES`):
        ``task_arithmetic`` θ0 + α·τ_MTL (``alpha``=0.4); ``consensus`` θ0 + α·(1{Σ_t m_t ≥ k} ∘ τ_MTL)
        (``k``=2, ``alpha``=0.4); ``zeroshot`` θ0. τ_MTL is the archive's (TIES-merged if it was encoded
        with merge="ties"). Per-task tensors come from θ0 when θ0 has them and are left out otherwise.

            >>> merged = zoo.merge("consensus", k=2, alpha=0.4)  # doctest: +SKIP
        """
        return dict(self.iter_merge(method, device=device, **params))

    def merge_to(self, out: str | os.PathLike, method: str = DEFAULT_MERGE, *,
                 max_shard_size: int = 5 * 2**30, **params: Any) -> list[Path]:
        """Write a merged model to a .safetensors file or an HF-style folder (streamed, atomic)."""
        from tallfmt.checkpoints import save_state_dict

        it = self.iter_merge(method, **params)
        return save_state_dict(it, out, entries=self.model_entries(None), max_shard_size=max_shard_size)

    def mask(self, task: str, name: str) -> torch.Tensor:
        """Task ``task``'s mask of tensor ``name`` as a torch.bool tensor of the tensor's shape."""
        from tallfmt.read.decoding import check_masked

        i = self.task_index(task)
        return self.tensors.mask(check_masked(self.entry(name), self.path, name), i)

    def tau(self, name: str, *, device: str | torch.device | None = None) -> torch.Tensor:
        """τ_MTL of masked tensor ``name``: float32, the tensor's shape."""
        from tallfmt.read.decoding import check_masked

        e = check_masked(self.entry(name), self.path, name)
        return self.tensors.tau(e, _device(device)).reshape(e.shape)

    def agreement(self, *, device: str | torch.device | None = None) -> torch.Tensor:
        """int64 tensor of length T+1: parameters kept by exactly n of the T task masks (paper eq. 7)."""
        import torch

        return self.tensors.agreement(_device(device) or torch.device("cpu"))

    def verify(self) -> None:
        """Check every checksum, decode every segment and check mask padding, in every shard;
        FormatError naming the damaged file. (A sharded archive's index and shard headers were
        checked against each other on open.)"""
        self.tensors.verify()

    def close(self) -> None:
        self.cache.clear()
        self.layout.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        shards = f", {len(self.shards)} shards" if self.index is not None else ""
        return f"<tallfmt.Archive {str(self.path)!r}: {len(self.tasks)} tasks, {len(self._entries)} tensors{shards}>"


def _device(device: Any) -> torch.device | None:
    if device is None:
        return None
    import torch

    return torch.device(device)


def open(path: str | os.PathLike, *, threads: int | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
         kernel: str = "auto") -> Archive:  # noqa: A001 - like safe_open
    """Open a .tall archive (validates the header, memory-maps the data; tensors are read lazily).

    ``path``: a .tall file, or a sharded archive's ``tall.index.json`` or the folder holding it
    (every shard is opened and checked against the index; FORMAT.md §9).

    ``threads``: worker threads of a decode or merge (default: the CPU count, at most 4); a decode
    splits into one job per byte plane and per range of the kernel, so they share even one tensor.

    ``cache_bytes``: budget of the decoded θ0 / τ_MTL cache (default 2 GiB; 0: none). The segments a
    decode decompresses are kept while they fit (first come, never evicted), so later decodes of any
    task skip their checksum and decompression; :meth:`Archive.cache_info` says what it holds.

    ``kernel``: ``auto`` (numba on the CPU, torch on other devices), ``numba``, or ``torch`` (the
    device-agnostic torch code CUDA runs, on every device).

        >>> with tallfmt.open("zoo.tall") as zoo:                # doctest: +SKIP
        ...     print(zoo.tasks)
        >>> with tallfmt.open("zoo/") as zoo:                    # doctest: +SKIP
        ...     zoo.verify()
    """
    return Archive(path, threads=threads, cache_bytes=cache_bytes, kernel=kernel)
