"""Checkpoint outputs: streaming, atomic ``.safetensors`` writers and Hugging Face style folders.

Writers stream: the header is written from the entries known up front, then each tensor's bytes as it
arrives, through the one atomic writer (:class:`tallfmt.format.atomic.AtomicFile`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tallfmt.checkpoints.readers import INDEX_NAME, MAX_HEADER_BYTES, MAX_NDIM, SINGLE_NAME, is_uint
from tallfmt.compute.tensors import from_torch, to_numpy, torch_dtype
from tallfmt.errors import InputError, WriteError
from tallfmt.format.atomic import AtomicFile, AtomicFolder, write_atomic
from tallfmt.format.dtypes import DTYPES, DType
from tallfmt.format.files import name_problem
from tallfmt.format.planner import plan_shards

__all__ = ["SafetensorsWriter", "save_safetensors", "save_state_dict"]

_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


_Spec = tuple[str, DType, tuple[int, ...]]


def _check_entries(entries: Iterable[tuple[str, str, tuple[int, ...]]], path: Path) -> list[_Spec]:
    out: list[_Spec] = []
    seen: set[str] = set()
    for ent in entries:
        try:
            name, dt, shape = ent
        except (TypeError, ValueError):
            raise InputError(f"{path}: entry {ent!r} is not (name, dtype, shape)") from None
        if not isinstance(name, str) or name == "__metadata__" or name in seen:
            raise InputError(f"{path}: tensor name {name!r} is not a string, is reserved by safetensors or repeats")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise InputError(f"{path}: entry {name!r}: unknown dtype {dt!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, (tuple, list)) or len(shape) > MAX_NDIM or not all(is_uint(d) for d in shape):
            raise InputError(f"{path}: entry {name!r}: shape {shape!r} is not a tuple of non-negative integers")
        seen.add(name)
        out.append((name, DTYPES[dt], tuple(shape)))
    return out


def _entries_of(items: Iterable[tuple[Any, Any]]) -> list[tuple[str, str, tuple[int, ...]]]:
    out = []
    for k, t in items:
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{k!r} is a {type(t).__name__}, not a torch.Tensor")
        try:
            dt = from_torch(t.dtype).name
        except KeyError:
            raise InputError(f"tensor {k!r} has dtype {t.dtype}, which safetensors/tallfmt cannot store") from None
        out.append((k, dt, tuple(t.shape)))
    return out


def _header_bytes(specs: list[_Spec], metadata: dict[str, str] | None) -> bytes:
    """The header exactly as safetensors writes it: compact JSON, __metadata__ first, padded with
    spaces to a multiple of 8 (so the data starts 8-aligned)."""
    h: dict[str, Any] = {}
    if metadata is not None:
        h["__metadata__"] = metadata
    pos = 0
    for name, d, shape in specs:
        n = math.prod(shape) * d.itemsize
        h[name] = {"dtype": d.name, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    try:
        raw = json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"a tensor name or metadata string is not valid Unicode ({exc})") from None
    return raw + b" " * (-len(raw) % 8)



class SafetensorsWriter:
    """Streams one ``.safetensors`` file: the header from ``entries`` first, then each tensor's bytes
    in entries order. Atomic: data goes to a temporary file beside ``path`` that ``close()`` fsyncs and
    renames over ``path``. Any error (or leaving a ``with`` block by an exception) aborts: the temporary
    file is removed and an existing ``path`` is left untouched. Tensors sharing memory are written as
    separate copies. The output is byte-identical for the same inputs and loads with
    ``safetensors.torch.load_file``.

        >>> import torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> with SafetensorsWriter(path, [("w", "F32", (2,)), ("n", "I64", ())]) as w:
        ...     w.write("w", torch.tensor([1.0, 2.0]))
        ...     w.write("n", torch.tensor(7))
        >>> from tallfmt.checkpoints import open_checkpoint
        >>> open_checkpoint(path).get("w")
        tensor([1., 2.])
    """

    def __init__(self, path: str | os.PathLike[str], entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._specs = _check_entries(entries, self.path)
        if metadata is not None and not (isinstance(metadata, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise InputError(f"{self.path}: metadata must map strings to strings")
        header = _header_bytes(self._specs, dict(metadata) if metadata is not None else None)
        if len(header) > MAX_HEADER_BYTES:
            raise InputError(f"{self.path}: header would be {len(header)} bytes, over safetensors' "
                             f"{MAX_HEADER_BYTES}-byte limit")
        self._next = 0
        self._out = AtomicFile(self.path)
        self._guard(self._out.write, len(header).to_bytes(8, "little") + header)

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except BaseException:
            self.abort()
            raise

    @property
    def closed(self) -> bool:
        return self._out.done

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, dtype and shape must match the next entry."""
        self._guard(self._write, name, tensor)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        if self._out.done:
            raise InputError(f"{self.path}: writer is closed")
        if self._next >= len(self._specs):
            raise InputError(f"{self.path}: got tensor {name!r} after all {len(self._specs)} entries were written")
        want, d, shape = self._specs[self._next]
        if name != want:
            raise InputError(f"{self.path}: expected tensor {want!r} (entry {self._next}), got {name!r}")
        want_dtype = torch_dtype(d.name)
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != want_dtype or tuple(tensor.shape) != shape:
            got = (f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor)
                   else type(tensor).__name__)
            raise InputError(f"{self.path}: tensor {name!r} must be {want_dtype} {shape}, got {got}")
        if tensor.is_meta:
            raise InputError(f"{self.path}: tensor {name!r} is on the meta device and holds no data")
        self._out.write(memoryview(to_numpy(tensor).reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        """Check that every entry was written, fsync and rename into place (no-op once closed)."""
        if self._out.done:
            return
        if self._next != len(self._specs):
            self.abort()
            raise InputError(f"{self.path}: only {self._next} of {len(self._specs)} tensors were written "
                             f"(next: {self._specs[self._next][0]!r}); nothing was saved")
        self._out.commit()

    def abort(self) -> None:
        """Remove the temporary file; ``path`` stays as it was."""
        self._out.abort()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                     metadata: dict[str, str] | None = None) -> None:
    """Write a state dict to one ``.safetensors`` file (atomic; tied tensors become separate copies).

        >>> import torch, tempfile, os
        >>> w = torch.ones(2)
        >>> p = os.path.join(tempfile.mkdtemp(), "tied.safetensors")
        >>> save_safetensors({"a": w, "b": w}, p, metadata={"format": "pt"})
        >>> from tallfmt.checkpoints import open_checkpoint
        >>> open_checkpoint(p).names()
        ['a', 'b']
    """
    with SafetensorsWriter(path, _entries_of(state_dict.items()), metadata) as w:
        for name, t in state_dict.items():
            w.write(name, t)


_END = object()


def _stream(path: Path, specs: list[_Spec], it: Iterator[tuple[str, torch.Tensor]],
            metadata: dict[str, str] | None, last: bool) -> Path:
    with SafetensorsWriter(path, [(n, d.name, s) for n, d, s in specs], metadata) as w:
        for name, _, _ in specs:
            nxt = next(it, _END)
            if nxt is _END:
                raise InputError(f"{path}: the tensors ran out before entry {name!r}")
            w.write(*nxt)
        if last and next(it, _END) is not _END:
            raise InputError(f"{path}: more tensors were given than the {len(specs)} entries")
    return path


def save_state_dict(tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
                    path: str | os.PathLike[str], *,
                    entries: list[tuple[str, str, tuple[int, ...]]] | None = None,
                    max_shard_size: int = 5 * 2**30, metadata: dict[str, str] | None = None,
                    files: Mapping[str, bytes] | None = None) -> list[Path]:
    """Stream tensors to ``path`` and return the files written.

    ``path`` ending in ``.safetensors``: one file. Otherwise a folder, HF-style: ``model.safetensors``
    when the tensors fit in ``max_shard_size`` bytes, else ``model-00001-of-0000N.safetensors`` ...
    and ``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {name:
    file}}``, in entries order). Folder shards carry ``{"format": "pt", **metadata}`` as transformers
    expects. A folder is written beside ``path`` and swapped in as a whole
    (:class:`~tallfmt.format.atomic.AtomicFolder`): the files of an earlier folder that are not model
    weights (a config.json) are carried over, its weights replaced all at once or not at all.
    ``files`` ({relative name: bytes}: a config.json, tokenizer files) are written into a folder output
    too, inside the same swap.

    Before anything is written, the output's size is checked against the free space of the disk
    (WriteError, errno ENOSPC): an archive whose tied tensors (aliases) decode to far more bytes than
    it stores is refused at once, not after filling the disk.

    ``entries`` ((name, dtype, shape) in the order the tensors come) let an iterable be streamed one
    tensor at a time; without them the iterable is first collected into a list.

        >>> import torch, tempfile
        >>> out = tempfile.mkdtemp()
        >>> sd = {"a": torch.zeros(4), "b": torch.ones(4)}
        >>> [p.name for p in save_state_dict(sd, out, max_shard_size=16)]
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
        >>> from tallfmt.checkpoints import open_checkpoint
        >>> open_checkpoint(out).names()
        ['a', 'b']
    """
    if isinstance(tensors, Mapping):
        items: Iterable[tuple[str, torch.Tensor]] = tensors.items()
    else:
        items = tensors if entries is not None else list(tensors)
    out = Path(path)
    specs = _check_entries(entries if entries is not None else _entries_of(items), out)
    if not is_uint(max_shard_size) or max_shard_size == 0:
        raise InputError(f"max_shard_size must be a positive integer, got {max_shard_size!r}")
    it = iter(items)
    total = sum(math.prod(s) * d.itemsize for _, d, s in specs)
    if out.name.endswith(".safetensors"):
        _check_space(out, total)
        return [_stream(out, specs, it, metadata, last=True)]
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder (name a .safetensors file or a folder)")
    _check_space(out, total)
    meta = {"format": "pt", **(metadata or {})}
    runs = plan_shards([math.prod(shape) * d.itemsize for _, d, shape in specs], max_shard_size=max_shard_size)
    shards = [specs[r.start:r.stop] for r in runs]
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    with AtomicFolder(out, carried=lambda n: not is_weight_file(n)) as tmp:
        for i, (fn, grp) in enumerate(zip(names, shards)):
            _stream(tmp / fn, grp, it, meta, last=i == len(shards) - 1)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: fn for fn, grp in zip(names, shards) for n, _, _ in grp}}
            write_atomic(tmp / INDEX_NAME, (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
            names.append(INDEX_NAME)
        for name, data in (files or {}).items():
            why = name_problem(name)
            if why is not None:  # the header checks already refused these; never write outside the folder
                raise InputError(f"{out}: refusing to write file {name!r}: {why}")
            target = tmp.joinpath(*name.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target, bytes(data))
            names.append(name)
    return [out.joinpath(*n.split("/")) for n in names]


def is_weight_file(name: str) -> bool:
    """Whether a file name in a model folder is one of the weight files tallfmt writes (replaced, not
    carried over, when the folder is written again)."""
    return name in (SINGLE_NAME, INDEX_NAME) or _SHARD_RE.fullmatch(name) is not None


def _check_space(out: Path, need: int) -> None:
    """WriteError (ENOSPC) when the disk that will hold ``out`` has fewer than ``need`` bytes free."""
    folder = next((p for p in (out, *out.parents) if p.is_dir()), Path("."))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need > free:
        raise WriteError(errno.ENOSPC, f"{out}: the model is {need:,} bytes, but {folder} has {free:,} bytes free; "
                                       f"nothing was written")
