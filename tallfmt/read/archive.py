"""Reading a .tall archive: decode any task model, a merged model, a mask, τ_MTL, agreement statistics.

    >>> import tallfmt
    >>> with tallfmt.open("zoo.tall") as zoo:                  # doctest: +SKIP
    ...     sd = zoo.decode("sst2")                            # {name: tensor} as the fine-tune had it
    ...     merged = zoo.merge("consensus", k=2, alpha=0.4)

Opening validates the header (and a sharded archive's index and shard headers); segments are read on
demand (``pread``, or a memory map with ``mmap=True``); what only reads the header (``tasks``,
``task_info``, ``roles``, ``sizes``) never imports torch or numba. Decoding a task reads θ0, τ_MTL and
only that task's masks, and runs the fused kernel (θ0 + bit ? τ : 0, rounded once to the tensor's
dtype): numba on the CPU, torch on another device.
Decoded θ0 and τ_MTL stay in a cache of ``cache_bytes`` (default 2 GiB), so a later decode of
another task reads only its masks. ``load_into`` writes a task into an existing model in place;
``switcher`` keeps a model's θ0, θ0 + τ_MTL and masks resident and switches it between tasks
without reading the file (:mod:`tallfmt.read.serving`). Merges run their float math in torch on
``device``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tallfmt.errors import InputError, TallWarning
from tallfmt.format.container import ContainerReader
from tallfmt.format.header import Header, Item, Segment, TensorEntry
from tallfmt.format.index import ShardIndex
from tallfmt.format.layout import open_layout
from tallfmt.format.outputs import MAX_SHARD_SIZE, OVERWRITE, check_model_output, new_folder_removed_on_failure
from tallfmt.read.cache import SegmentCache
from tallfmt.read.defaults import DEFAULT_CACHE_BYTES, MAX_THREADS, check_kernel
from tallfmt.read.files import merge_note
from tallfmt.read.merges import DEFAULT_MERGE, DEFAULT_PER_TASK, check_per_task, get_merge

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import torch

    from tallfmt.read.base import ExternalBase
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
                 cache_bytes: int = DEFAULT_CACHE_BYTES, kernel: str = "auto", mmap: bool = False,
                 max_tensor_bytes: int | None = None, base: Any = None) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        if max_tensor_bytes is not None and (isinstance(max_tensor_bytes, bool) or not isinstance(max_tensor_bytes, int)
                                             or max_tensor_bytes < 1):
            raise InputError(f"max_tensor_bytes must be a positive integer, got {max_tensor_bytes!r}")
        self.threads = threads or min(MAX_THREADS, os.cpu_count() or 1)
        self.kernel = check_kernel(kernel)
        self.cache = SegmentCache(cache_bytes)
        self.layout = open_layout(path, mmap=bool(mmap), max_tensor_bytes=max_tensor_bytes)
        self.path = self.layout.path  # the file, or a sharded archive's index
        self.header: Header = self.layout.header
        self.index: ShardIndex | None = self.layout.index
        self.shards: list[ContainerReader] = self.layout.readers
        self._entries = {t.name: t for t in self.header.tensors}
        self._task_index = {t: i for i, t in enumerate(self.header.task_names)}
        self._tensors: ArchiveTensors | None = None
        self.base: ExternalBase | None = None  # θ0 given by the reader (FORMAT.md §2.1)
        if base is not None:
            try:
                self.base = self._open_base(base)
            except BaseException:
                self.layout.close()
                raise

    def _open_base(self, base: Any) -> ExternalBase:
        if not self.header.external_base:
            raise InputError(f"{self.path}: this archive stores θ0; base= is only for archives encoded with "
                             f"store_base=False")
        from tallfmt.read.base import ExternalBase

        return ExternalBase(base, self.header, self.path)

    @property
    def external_base(self) -> bool:
        """Whether θ0 is kept outside this archive (encoded with ``store_base=False``): decoding and
        merging then need ``tallfmt.open(path, base=...)``; masks, τ_MTL and agreement do not."""
        return self.header.external_base

    def _need_theta0(self) -> None:
        """Refuse, before anything is read or written, what needs θ0 when the archive lacks it."""
        if self.header.external_base and self.base is None:
            from tallfmt.read.base import no_base_error

            raise no_base_error(self.path)

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

    def files(self, task: str | None = None) -> dict[str, bytes]:
        """The non-weight files stored with θ0 (``task=None``) or with one task, {relative name: bytes}
        — config.json, tokenizer files, the model card of each folder that was encoded (FORMAT.md
        §10) — each checked against its checksum. Empty when those inputs were not folders.

            >>> zoo.files("sst2")["config.json"][:1]                  # doctest: +SKIP
            b'{'
        """
        i = None if task is None else self.task_index(task)
        f = self.header.files
        return {} if f is None else f.read(i, str(self.path))

    def file_names(self, task: str | None = None) -> list[str]:
        """The names :meth:`files` returns, from the header alone."""
        i = None if task is None else self.task_index(task)
        f = self.header.files
        return [] if f is None else f.names(i)

    def unmergeable(self) -> dict[str, str]:
        """Tensors a merge cannot merge (role ``per_task``: heads, adapters, batch-norm statistics,
        tensors only some tasks have): {name: "θ0"} for those θ0 has, {name: "none"} for the others."""
        return {e.name: ("θ0" if e.base_item is not None else "none") for e in self.header.tensors
                if e.role == "per_task"}

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
        """Stored bytes per part: theta0, tau, masks, residuals, shared, per_task, header, padding and total."""
        parts = dict.fromkeys(("theta0", "tau", "masks", "residuals", "shared", "per_task"), 0)
        for e in self.header.tensors:
            if e.role == "masked":
                parts["theta0"] += e.base.length if isinstance(e.base, Segment) else 0  # BaseRef: not stored
                parts["tau"] += e.tau.length
                parts["masks"] += sum(m.length for m in e.masks)
                parts["residuals"] += sum(r.positions.length + r.values.length for r in e.residuals if r is not None)
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

            self._tensors = ArchiveTensors(self.layout, self.threads, self.cache, self.kernel, self.base)
        return self._tensors

    def iter_decode(self, task: str, *, device: str | torch.device | None = None, residual: bool = True
                    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) of one task model, tensor by tensor (bounded memory: a few hundred MB
        decoded ahead, plus the cache). ``residual``: as :meth:`decode`."""
        i = self.task_index(task)
        self._need_theta0()
        t = self.tensors
        dev = _device(device)
        res = _flag("residual", residual)
        return t.iterate(lambda jobs, e: t.start_decode(jobs, e, i, dev, residual=res))

    def decode(self, task: str, *, device: str | torch.device | None = None,
               residual: bool = True) -> dict[str, torch.Tensor]:
        """θ̂_t = θ0 + m_t ∘ τ_MTL (+ r_t, the task's residual where the archive stores one: FORMAT.md
        §11) for every tensor: original names, shapes and dtypes, on ``device`` (decoded there: a CUDA
        device runs the decode in torch on the GPU). ``residual=False`` leaves the residual out (the
        mask-only model).

        Tied tensors (role ``alias``) are the same tensor object, as in the original model.

            >>> sd = zoo.decode("sst2")                            # doctest: +SKIP
            >>> sd = zoo.decode("mnli", device="cuda")             # doctest: +SKIP
            >>> masks_only = zoo.decode("mnli", residual=False)    # doctest: +SKIP
        """
        return dict(self.iter_decode(task, device=device, residual=residual))

    def residual_info(self, task: str) -> dict[str, int]:
        """What the archive stores of one task's residual (header only): ``entries`` and stored
        ``bytes`` (positions and values), 0 and 0 without one.

            >>> zoo.residual_info("sst2")                          # doctest: +SKIP
            {'entries': 1234, 'bytes': 2345}
        """
        i = self.task_index(task)
        rs = [r for e in self.header.tensors if (r := e.residual(i)) is not None]
        return {"entries": sum(r.count for r in rs), "bytes": sum(r.positions.length + r.values.length for r in rs)}

    def decode_tensor(self, task: str, name: str, *, device: str | torch.device | None = None,
                      residual: bool = True) -> torch.Tensor:
        """One tensor of one task model (``residual``: as :meth:`decode`)."""
        i = self.task_index(task)
        self._need_theta0()
        t = self.tensors.decode_entry(self.entry(name), i, _flag("residual", residual))
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

        self._need_theta0()
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

        self._need_theta0()
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

    def decode_to(self, task: str, out: str | os.PathLike, *, max_shard_size: int | None = None,
                  metadata: dict[str, str] | None = None, overwrite: bool = OVERWRITE,
                  residual: bool = True) -> list[Path]:
        """Write one task model to ``out``: a ``.safetensors`` file, or a folder (HF-style, sharded
        above ``max_shard_size``, 5 GiB by default) with the task's stored files (config.json,
        tokenizer, …), so that ``from_pretrained(out)`` loads it. Streams tensor by tensor; each file
        is written atomically, and a folder this call created is removed if it fails. An existing
        model at ``out`` is replaced only with ``overwrite=True``. ``residual``: as :meth:`decode`.
        Returns the files written.

            >>> zoo.decode_to("sst2", "sst2-model/")                  # doctest: +SKIP
        """
        i = self.task_index(task)
        self._need_theta0()
        return self._write_model(out, self.iter_decode(task, residual=residual), self.model_entries(i),
                                 lambda: self.files(task),
                                 max_shard_size, metadata, overwrite)

    def _write_model(self, out: str | os.PathLike, tensors: Iterator[tuple[str, torch.Tensor]],
                     entries: list[tuple[str, str, tuple[int, ...]]], files: Callable[[], dict[str, bytes]],
                     max_shard_size: int | None, metadata: dict[str, str] | None, overwrite: bool) -> list[Path]:
        from tallfmt.checkpoints import save_state_dict

        kind = check_model_output(out, overwrite)
        if kind == "file" and max_shard_size is not None:
            raise InputError(f"{out}: max_shard_size applies to a folder output; this is one .safetensors file")
        sidecars = files() if kind == "folder" else {}  # checked before anything is written
        with new_folder_removed_on_failure(out):
            return save_state_dict(tensors, out, entries=entries, max_shard_size=max_shard_size or MAX_SHARD_SIZE,
                                   metadata=metadata, files=sidecars)

    def iter_merge(self, method: str = DEFAULT_MERGE, *, device: str | torch.device | None = None,
                   per_task: str = DEFAULT_PER_TASK, **params: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) of a merged model, tensor by tensor (``per_task`` as in :meth:`merge`)."""
        import torch

        from tallfmt.read.decoding import move

        dev = _device(device)
        self._need_theta0()
        fn = self.tensors.merge_fn(method, params, dev or torch.device("cpu"))  # bad parameters fail before any warning
        policy = self._check_unmergeable(per_task)
        if policy == "drop":
            inner = fn
            fn = lambda e: None if e.role == "per_task" else inner(e)  # noqa: E731
        return self.tensors.iterate(lambda jobs, e: jobs.submit(lambda: move(fn(e), dev)))

    def _check_unmergeable(self, per_task: str) -> str:
        """The policy, after refusing (``error``) or warning about the tensors a merge cannot merge."""
        policy = check_per_task(per_task)
        left = self.unmergeable()
        if not left:
            return policy
        if policy == "error":
            raise InputError(f"{self.path}: {_unmergeable_text(left, policy)}; pass per_task='base' or 'drop' "
                             f"(CLI: --per-task base|drop)")
        warnings.warn(f"{_unmergeable_text(left, policy)} (per_task={policy!r}; 'drop' leaves them all out, "
                      f"'error' refuses; CLI: --per-task)", TallWarning, stacklevel=3)
        return policy

    def merge(self, method: str = DEFAULT_MERGE, *, device: str | torch.device | None = None,
              per_task: str = DEFAULT_PER_TASK, **params: Any) -> dict[str, torch.Tensor]:
        """A merged multi-task model (methods and their parameters: :data:`tallfmt.MERGES`):
        ``task_arithmetic`` θ0 + α·τ_MTL (``alpha``=0.4); ``consensus`` θ0 + α·(1{Σ_t m_t ≥ k} ∘ τ_MTL)
        (``k``=2, ``alpha``=0.4); ``zeroshot`` θ0. τ_MTL is the archive's (TIES-merged if it was encoded
        with merge="ties"); α may be any finite float32 number (negative: task negation). Merges
        ignore the tasks' residuals (FORMAT.md §11): each is one task's correction, not part of τ_MTL.

        Tensors stored per task (:meth:`unmergeable`: heads, adapters, batch-norm statistics, tensors
        only some tasks have) cannot be merged: ``per_task="base"`` (the default) takes θ0's copy and
        leaves out those θ0 has none of, ``"drop"`` leaves them all out, ``"error"`` refuses; a
        :class:`tallfmt.TallWarning` names them. Tied tensors are one tensor in the result.

            >>> merged = zoo.merge("consensus", k=2, alpha=0.4)  # doctest: +SKIP
        """
        return dict(self.iter_merge(method, device=device, per_task=per_task, **params))

    def merge_to(self, out: str | os.PathLike, method: str = DEFAULT_MERGE, *, per_task: str = DEFAULT_PER_TASK,
                 max_shard_size: int | None = None, overwrite: bool = OVERWRITE, **params: Any) -> list[Path]:
        """Write a merged model to a .safetensors file or an HF-style folder (streamed, atomic; see
        :meth:`merge`). A folder gets θ0's stored files (config.json, tokenizer, …); the weights'
        safetensors metadata notes the merge (``tallfmt.merge``: archive, method, parameters, tasks).
        An existing model at ``out`` is replaced only with ``overwrite=True``."""
        it = self.iter_merge(method, per_task=per_task, **params)
        m = get_merge(method)
        given = {p.name: params.get(p.name, p.default) for p in m.params}
        note = merge_note(self.path.parent if self.index is not None else self.path, method, given, per_task,
                          self.tasks)
        dropped = set(self.unmergeable()) if per_task == "drop" else set()
        entries = [x for x in self.model_entries(None) if self.entry(x[0]).name not in dropped]
        return self._write_model(out, it, entries, lambda: self.files(None), max_shard_size, note, overwrite)

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
        checked against each other on open.) Stored files (FORMAT.md §10) are decoded and checked too."""
        if self.header.files is not None:
            self.header.files.verify(str(self.path))
        self.tensors.verify()

    def close(self) -> None:
        self.cache.clear()
        if self.base is not None:
            self.base.close()
        self.layout.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        shards = f", {len(self.shards)} shards" if self.index is not None else ""
        n = len(self.tasks)
        return (f"<tallfmt.Archive {str(self.path)!r}: {n} task{'s' if n != 1 else ''}, {len(self._entries)} "
                f"tensors{shards}>")


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise InputError(f"{name} must be True or False, got {v!r}")
    return v


def _device(device: Any) -> torch.device | None:
    if device is None:
        return None
    from tallfmt.compute.devices import check_device

    return check_device(device)


def _unmergeable_text(left: dict[str, str], policy: str) -> str:
    def few(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    if policy == "error":
        return f"{len(left)} tensor{'s' if len(left) != 1 else ''} stored per task cannot be merged: {few(list(left))}"
    from_base = [n for n, w in left.items() if w == "θ0" and policy == "base"]
    out = [n for n in left if n not in from_base]
    parts = ([f"taken from θ0: {few(from_base)}"] if from_base else []) + (
        [f"left out{' (θ0 has none)' if policy == 'base' else ''}: {few(out)}"] if out else [])
    return f"{len(left)} tensor{'s' if len(left) != 1 else ''} stored per task cannot be merged; {'; '.join(parts)}"


def open(path: str | os.PathLike, *, threads: int | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
         kernel: str = "auto", mmap: bool = False, max_tensor_bytes: int | None = None, base: Any = None
         ) -> Archive:  # noqa: A001 - like safe_open
    """Open a .tall archive (validates the header; tensors are read lazily).

    ``path``: a .tall file, or a sharded archive's ``tall.index.json`` or the folder holding it
    (every shard is opened and checked against the index; FORMAT.md §9).

    ``threads``: worker threads of a decode or merge (default: the CPU count, at most 4); a decode
    splits into one job per byte plane and per range of the kernel, so they share even one tensor.

    ``cache_bytes``: budget of the decoded θ0 / τ_MTL cache (default 2 GiB; 0: none). The segments a
    decode decompresses are kept while they fit (first come, never evicted), so later decodes of any
    task skip their checksum and decompression; :meth:`Archive.cache_info` says what it holds.

    ``kernel``: ``auto`` (numba on the CPU, torch on other devices), ``numba``, or ``torch`` (the
    device-agnostic torch code CUDA runs, on every device).

    ``max_tensor_bytes``: the decode memory budget — reading a segment (a tensor's θ0, τ_MTL, one
    mask, a stored copy) that decodes to more bytes raises LimitError before anything is allocated
    (default: a quarter of the machine's memory, at least 1 GiB; FORMAT.md §6). ``mmap=True`` maps
    the files instead of reading segments with ``pread`` (raw segments are then zero-copy, but a file
    truncated in place by another program while it is read can kill the process with SIGBUS).

        >>> with tallfmt.open("zoo.tall") as zoo:                # doctest: +SKIP
        ...     print(zoo.tasks)
    ``base``: θ0 for an archive encoded with ``store_base=False`` (it keeps θ0's tensor table and a
    checksum of each tensor, not their data; FORMAT.md §2.1): a .safetensors file, a folder, a
    .bin/.pt file or a state dict. Every tensor the archive needs is checked on open — present, same
    dtype, shape and XXH3-64 of its bytes — and InputError names the first that differs (tensors the
    archive does not need are ignored); ``verify`` checks them again. Without it such an archive
    still gives tasks, masks, τ_MTL and agreement; decode and merge refuse, naming the archive.

        >>> with tallfmt.open("zoo/") as zoo:                    # doctest: +SKIP
        ...     zoo.verify()
        >>> zoo = tallfmt.open("small.tall", base="theta0.safetensors")  # doctest: +SKIP
    """
    return Archive(path, threads=threads, cache_bytes=cache_bytes, kernel=kernel, mmap=mmap,
                   max_tensor_bytes=max_tensor_bytes, base=base)
