"""Reading a .tall archive: decode any task model, a merged model, a mask, τ_MTL, agreement statistics.

    >>> import tallfmt
    >>> with tallfmt.open("zoo.tall") as zoo:                  # doctest: +SKIP
    ...     sd = zoo.decode("sst2")                            # {name: tensor} as the fine-tune had it
    ...     merged = zoo.merge("consensus", k=2, alpha=0.4)

Opening validates the header (and a sharded archive's index and shard headers); segments are read on
demand (``pread``, or a memory map with ``mmap=True``); what only reads the header (``tasks``, ``task_info``, ``roles``, ``sizes``) never imports torch
or numba. Decoding a task reads θ0, τ_MTL and only that task's masks, and runs the fused numba kernel
(θ0 + bit ? τ : 0, rounded once to the tensor's dtype). Merges run their float math in torch on
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
from tallfmt.read.merges import DEFAULT_MERGE

if TYPE_CHECKING:
    import torch

    from tallfmt.read.decoding import ArchiveTensors

#: Tensors decoded ahead in parallel by iter_decode/decode/merge, at most.
MAX_THREADS = 4


class Archive:
    """An open .tall archive — one file, or a sharded folder (FORMAT.md §9) read as one table of
    tensors. Use ``tallfmt.open(path)``; a context manager.

    ``shards`` are the open files (one for a single file); each tensor is read from the shard that
    holds it. ``index`` is the sharded archive's parsed ``tall.index.json`` (None for a single file).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, mmap: bool = False,
                 max_tensor_bytes: int | None = None) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}")
        if max_tensor_bytes is not None and (isinstance(max_tensor_bytes, bool) or not isinstance(max_tensor_bytes, int)
                                             or max_tensor_bytes < 1):
            raise InputError(f"max_tensor_bytes must be a positive integer, got {max_tensor_bytes!r}")
        self.threads = threads or min(MAX_THREADS, os.cpu_count() or 1)
        self.layout = open_layout(path, mmap=bool(mmap), max_tensor_bytes=max_tensor_bytes)
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

            self._tensors = ArchiveTensors(self.layout, self.threads)
        return self._tensors

    def iter_decode(self, task: str, *, device: str | torch.device | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) of one task model, tensor by tensor (bounded memory)."""
        i = self.task_index(task)
        t = self.tensors
        return t.iterate(lambda e: t.decode_entry(e, i), _device(device))

    def decode(self, task: str, *, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """θ̂_t = θ0 + m_t ∘ τ_MTL for every tensor: original names, shapes and dtypes.

        Tied tensors (role ``alias``) are the same tensor object, as in the original model.

            >>> sd = zoo.decode("sst2")                            # doctest: +SKIP
        """
        return dict(self.iter_decode(task, device=device))

    def decode_tensor(self, task: str, name: str, *, device: str | torch.device | None = None) -> torch.Tensor:
        """One tensor of one task model."""
        i = self.task_index(task)
        t = self.tensors.decode_entry(self.entry(name), i)
        if t is None:
            raise InputError(f"{self.path}: task {task!r} has no tensor {name!r}")
        return t.to(device) if device is not None else t

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

        dev = _device(device)
        fn = self.tensors.merge_fn(method, params, dev or torch.device("cpu"))
        return self.tensors.iterate(fn, dev)

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


def open(path: str | os.PathLike, *, threads: int | None = None, mmap: bool = False,  # noqa: A001 - like safe_open
         max_tensor_bytes: int | None = None) -> Archive:
    """Open a .tall archive (validates the header; tensors are read lazily).

    ``path``: a .tall file, or a sharded archive's ``tall.index.json`` or the folder holding it
    (every shard is opened and checked against the index; FORMAT.md §9).

    ``threads``: tensors decoded ahead in parallel by iter_decode/decode/merge (default: up to 4).
    ``max_tensor_bytes``: the decode memory budget — reading a segment (a tensor's θ0, τ_MTL, one
    mask, a stored copy) that decodes to more bytes raises LimitError before anything is allocated
    (default: a quarter of the machine's memory, at least 1 GiB; FORMAT.md §6). ``mmap=True`` maps
    the files instead of reading segments with ``pread`` (raw segments are then zero-copy, but a file
    truncated in place by another program while it is read can kill the process with SIGBUS).

        >>> with tallfmt.open("zoo.tall") as zoo:                # doctest: +SKIP
        ...     print(zoo.tasks)
        >>> with tallfmt.open("zoo/") as zoo:                    # doctest: +SKIP
        ...     zoo.verify()
    """
    return Archive(path, threads=threads, mmap=mmap, max_tensor_bytes=max_tensor_bytes)
