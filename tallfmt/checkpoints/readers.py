"""Checkpoint inputs: lazy, memory-mapped readers of the files users have.

The encoder reads T+1 checkpoints tensor by tensor, so a reader never loads a whole checkpoint: a
``.safetensors`` file is memory-mapped and ``get()`` returns a zero-copy view of the mapped bytes (only
the pages that are touched are read).

    >>> import torch
    >>> with open_checkpoint({"w": torch.ones(2, 3)}, label="demo") as ck:
    ...     ck.names(), ck.info("w"), ck.source
    (['w'], ('F32', (2, 3)), "<dict 'demo'>")

Accepted sources (``open_checkpoint``): a ``.safetensors`` file; a folder holding ``model.safetensors``,
a sharded ``model.safetensors.index.json``, exactly one ``*.safetensors`` file, or ``pytorch_model.bin``
(tried in that order, as transformers does); a ``.bin`` / ``.pt`` / ``.pth`` torch file, loaded only with
``torch.load(weights_only=True)``; an in-memory ``{name: torch.Tensor}`` mapping. Anything else, and any
malformed file, raises :class:`~tallfmt.errors.InputError` naming the file and the field.
"""

from __future__ import annotations

import mmap
import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, TypeVar

import numpy as np
import torch

from tallfmt.compute.tensors import from_torch, to_torch
from tallfmt.errors import InputError
from tallfmt.format.container import open_regular
from tallfmt.format.dtypes import DTYPES, DType
from tallfmt.format.jsonio import loads_strict_object

__all__ = ["Checkpoint", "open_checkpoint", "MAX_HEADER_BYTES"]

#: safetensors' own limit on the JSON header (its reader refuses larger headers).
MAX_HEADER_BYTES = 100_000_000
#: numpy's limit on the number of dimensions.
MAX_NDIM = 64
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------
class Checkpoint:
    """A read-only, lazy view of one checkpoint's tensors (use :func:`open_checkpoint`).

    ``source`` is what error messages name: the file path, or ``"<dict 'label'>"`` for a mapping.
    ``metadata`` is a safetensors file's ``__metadata__`` (``None`` for other sources).

        >>> import torch
        >>> w = torch.arange(6.0).reshape(2, 3)
        >>> ck = open_checkpoint({"w": w, "tied": w})
        >>> ck.get("w") is w, ck.storage_key("w") == ck.storage_key("tied")
        (True, True)
        >>> ck.close()
    """

    source: str
    label: str | None = None
    metadata: dict[str, str] | None = None

    def names(self) -> list[str]:
        """Tensor names in file order (a sharded folder: index order)."""
        raise NotImplementedError

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(safetensors dtype name, shape)`` of a tensor, without reading its data."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a CPU tensor (a mapping's tensors: as given, on their device and with their
        strides). Treat it as read-only. KeyError for an unknown name."""
        raise NotImplementedError

    def storage_key(self, name: str) -> object | None:
        """A hashable key; two tensors have equal keys exactly when they are the same memory (same
        data pointer, dtype, shape and strides): tied weights. ``None`` when the source cannot share
        memory between tensors (safetensors files) or the tensor has no elements."""
        return None

    def release(self, name: str) -> None:
        """Hint that ``name`` will not be read again soon: a memory-mapped file drops its pages from
        this process (the page cache keeps them), so a streaming pass over a large model does not grow
        the resident set by every byte it read. Tensors from ``get()`` stay valid; a no-op for sources
        held in memory."""

    def close(self) -> None:
        """Release files and mappings. Tensors already returned by ``get()`` stay valid."""

    def _fail(self, msg: str) -> InputError:
        return InputError(f"{self.source}: {msg}")

    def _lookup(self, table: Mapping[str, _T], name: str) -> _T:
        try:
            return table[name]
        except KeyError:
            raise KeyError(f"{self.source}: no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in set(self.names())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source}>"


@dataclass(frozen=True)
class _Entry:
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int


def _nbytes(shape: tuple[int, ...], itemsize: int, limit: int = 1 << 64) -> int | None:
    """Bytes of a tensor, or None once the product passes ``limit`` (keeps hostile shapes cheap)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def _load_json(raw: bytes, fail: Any, what: str) -> dict:
    return loads_strict_object(raw, fail, what)


def is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_header(raw: bytes, buffer_len: int, fail: Any) -> tuple[dict[str, str] | None, dict[str, _Entry], list[str]]:
    obj = _load_json(raw, fail, "header")
    meta = obj.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict):
            raise fail("__metadata__ must be an object of strings")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise fail(f"__metadata__[{k!r}] is a {type(v).__name__}, not a string")
    entries: dict[str, _Entry] = {}
    for name, info in obj.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"{where}: expected an object with exactly dtype, shape and data_offsets")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise fail(f"{where}: unknown dtype {dt!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(is_uint(d) for d in shape):
            raise fail(f"{where}: shape {shape!r} is not a list of at most {MAX_NDIM} non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(is_uint(o) for o in offs)
                and offs[0] <= offs[1]):
            raise fail(f"{where}: data_offsets {offs!r} is not [begin, end] with 0 <= begin <= end")
        d = DTYPES[dt]
        span = offs[1] - offs[0]
        need = _nbytes(tuple(shape), d.itemsize)
        if need != span:
            size = f"{need} bytes" if need is not None else "more than 2**64 bytes"
            raise fail(f"{where}: shape {shape} of {dt} needs {size}, but data_offsets {offs} span {span}")
        entries[name] = _Entry(d, tuple(shape), offs[0], offs[1])
    # sorted() is stable: tensors at the same offsets (zero-size ones) keep header order
    order = sorted(entries, key=lambda n: (entries[n].begin, entries[n].end))
    pos = 0
    for n in order:
        e = entries[n]
        if e.begin > pos:
            raise fail(f"tensor {n!r}: hole in the data buffer: bytes [{pos}, {e.begin}) belong to no tensor")
        if e.begin < pos:
            raise fail(f"tensor {n!r}: data_offsets [{e.begin}, {e.end}] overlap the previous tensor, "
                       f"which ends at {pos}")
        if e.end > buffer_len:
            raise fail(f"tensor {n!r}: data_offsets end {e.end} is past the {buffer_len}-byte data buffer "
                       "(truncated file?)")
        pos = e.end
    if pos != buffer_len:
        raise fail(f"data buffer is {buffer_len} bytes but the tensors end at {pos}: trailing bytes")
    return meta, entries, order


class _SafetensorsFile(Checkpoint):
    """Our own mmap reader: validates everything safetensors validates, and more (see module doc)."""

    def __init__(self, path: Path, label: str | None) -> None:
        self.path, self.source, self.label = path, str(path), label
        self._mm: mmap.mmap | None = None
        self._u8: np.ndarray | None = None
        with os.fdopen(open_regular(str(path), InputError, "a .safetensors file"), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise self._fail(f"file is {size} bytes, too short for the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise self._fail(f"header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise self._fail(f"header length {n} runs past the end of the {size}-byte file")
            self.metadata, self._entries, self._order = _parse_header(f.read(n), size - 8 - n, self._fail)
            self._data_start = 8 + n
            # ACCESS_COPY: views are writable (no torch warning) and a stray write never reaches the file
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._u8 = np.frombuffer(self._mm, dtype=np.uint8)

    def _entry(self, name: str) -> _Entry:
        return self._lookup(self._entries, name)

    def names(self) -> list[str]:
        return list(self._order)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        e = self._entry(name)
        return e.dtype.name, e.shape

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy view of the mapped bytes; slicing it reads only the pages it touches. A tensor
        whose bytes are not aligned to its itemsize in the file is copied (torch kernels assume it)."""
        e = self._entry(name)
        if self._u8 is None:
            raise InputError(f"{self.source}: checkpoint is closed")
        start = self._data_start + e.begin
        a = self._u8[start:self._data_start + e.end]
        if start % e.dtype.itemsize:
            a = a.copy()
        return checked_bool(to_torch(a.view(e.dtype.storage), e.dtype).reshape(e.shape), self.source, name)

    def release(self, name: str) -> None:
        e = self._entry(name)
        if self._mm is None or e.end == e.begin:
            return
        # Whole pages only; a page shared with a neighbour is simply read again from the file.
        start = (self._data_start + e.begin) // mmap.PAGESIZE * mmap.PAGESIZE
        end = self._data_start + e.end
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (AttributeError, OSError, ValueError):
            pass  # only a hint (no madvise on this platform)

    def close(self) -> None:
        """Unmaps now, or - while tensors from ``get()`` still reference it - when the last one is freed."""
        self._u8 = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views still exported: the mapping lives until they are garbage-collected
            self._mm = None


def checked_bool(t: torch.Tensor, source: str, name: str) -> torch.Tensor:
    """``t``, after checking that a BOOL tensor's bytes are 0 or 1 (a safetensors file or a uint8 view
    can hold others; an archive holding them would be refused by readers, FORMAT.md §6)."""
    if t.dtype == torch.bool and t.numel() and int(t.contiguous().view(torch.uint8).max()) > 1:
        raise InputError(f"{source}: tensor {name!r} is BOOL but holds bytes other than 0 and 1")
    return t


def _shard_path(folder: Path, rel: Any, fail: Any, name: str) -> Path:
    """The shard's path; only plain relative paths below the folder (checked lexically, so the
    symlinks of a Hugging Face cache snapshot still work)."""
    if not isinstance(rel, str) or not rel:
        raise fail(f"weight_map[{name!r}] must be a non-empty file name, got {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or PureWindowsPath(rel).drive:
        raise fail(f"weight_map[{name!r}]: shard path {rel!r} leaves the folder")
    return folder / p


def _few(names: list[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


class _ShardedCheckpoint(Checkpoint):
    """A Hugging Face sharded folder: ``model.safetensors.index.json`` + the shard files it names."""

    def __init__(self, index: Path, label: str | None) -> None:
        self.path, self.source, self.label = index, str(index), label
        self._shards: dict[str, _SafetensorsFile] = {}
        try:
            with os.fdopen(open_regular(str(index), InputError, "an index file"), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_HEADER_BYTES:
                    raise self._fail(f"index is {size} bytes, over the {MAX_HEADER_BYTES}-byte limit")
                raw = f.read(MAX_HEADER_BYTES + 1)
        except OSError as exc:
            raise InputError(f"{index}: cannot read ({exc.strerror})") from None
        obj = _load_json(raw, self._fail, "index")
        wm = obj.get("weight_map")
        if not isinstance(wm, dict):
            raise self._fail("index has no weight_map object {name: shard file}")
        if not isinstance(obj.get("metadata", {}), dict):
            raise self._fail("index metadata is not an object")
        self._where: dict[str, str] = dict(wm)
        try:
            self._open_shards(index.parent)
        except BaseException:
            self.close()
            raise

    def _open_shards(self, folder: Path) -> None:
        listed: dict[str, list[str]] = {}
        for name, rel in self._where.items():
            if rel not in listed:
                p = _shard_path(folder, rel, self._fail, name)
                if not p.is_file():
                    raise self._fail(f"weight_map[{name!r}]: shard file {rel!r} does not exist")
                listed[rel] = []
                self._shards[rel] = _SafetensorsFile(p, self.label)
            listed[rel].append(name)
        for rel, names in listed.items():
            held = self._shards[rel]._entries
            missing = [n for n in names if n not in held]
            if missing:
                raise self._fail(f"weight_map puts {len(missing)} tensor(s) in {rel!r} that it does not hold: "
                                 f"{_few(missing)}")
            unlisted = set(names)
            extra = [n for n in self._shards[rel].names() if n not in unlisted]
            if extra:
                raise self._fail(f"shard {rel!r} holds {len(extra)} tensor(s) the weight_map does not give it: "
                                 f"{_few(extra)}")

    def _shard(self, name: str) -> _SafetensorsFile:
        return self._shards[self._lookup(self._where, name)]

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        return self._shard(name).info(name)

    def get(self, name: str) -> torch.Tensor:
        return self._shard(name).get(name)

    def release(self, name: str) -> None:
        self._shard(name).release(name)

    def close(self) -> None:
        for s in self._shards.values():
            s.close()


class _DictCheckpoint(Checkpoint):
    """An in-memory mapping, or a torch file's loaded state dict (its tensors mmapped when possible)."""

    def __init__(self, tensors: Mapping[Any, Any], source: str, label: str | None) -> None:
        self.source, self.label = source, label
        self._t: dict[str, torch.Tensor] = {}
        for k, t in tensors.items():
            if not isinstance(k, str):
                raise InputError(f"{source}: key {k!r} is a {type(k).__name__}, not a tensor name (str)")
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{source}: {k!r} is a {type(t).__name__}, not a torch.Tensor")
            if t.layout != torch.strided:
                raise InputError(f"{source}: tensor {k!r} has layout {t.layout}; only dense tensors are supported")
            if t.is_meta:
                raise InputError(f"{source}: tensor {k!r} is on the meta device and holds no data")
            try:
                from_torch(t.dtype)
            except KeyError:
                raise InputError(f"{source}: tensor {k!r} has dtype {t.dtype}, which tallfmt cannot store "
                                 f"(known: {', '.join(DTYPES)})") from None
            need = t.numel() * t.element_size()
            held = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
            if need > held:  # a stride-0 or overlapping view: storing it would materialise `need` bytes
                raise InputError(f"{source}: tensor {k!r} of shape {list(t.shape)[:8]} needs {need:,} bytes but its "
                                 f"storage holds {held:,} (a stride-0 or overlapping view, e.g. from expand()); "
                                 f"store a dense tensor")
            self._t[k] = t

    def _tensor(self, name: str) -> torch.Tensor:
        return self._lookup(self._t, name)

    def names(self) -> list[str]:
        return list(self._t)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        t = self._tensor(name)
        return from_torch(t.dtype).name, tuple(t.shape)

    def get(self, name: str) -> torch.Tensor:
        return checked_bool(self._tensor(name), self.source, name)

    def storage_key(self, name: str) -> object | None:
        t = self._tensor(name)
        if t.numel() == 0:
            return None  # empty tensors may all report data_ptr 0 without sharing anything
        return (str(t.device), t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))

    def close(self) -> None:
        self._t = {}


def _unpickle_reason(exc: BaseException) -> str:
    """torch's useful line: what the weights-only unpickler refused (a blocked global, an opcode)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1]
        line = next((ln.strip() for ln in rest.splitlines() if ln.strip()), "")
        line = line.split(" Please use", 1)[0].strip()
        if line.startswith("Unsupported operand"):
            line += " (a plain pickle, not a file torch.save wrote?)"
        if line:
            return line
    return text.splitlines()[0] if text else type(exc).__name__


def _load_torch(path: Path, label: str | None) -> _DictCheckpoint:
    try:  # a FIFO, a device or a link to /dev/zero is refused here, before torch reads from it
        with os.fdopen(open_regular(str(path), InputError, "a torch file"), "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({exc.strerror})") from None
    try:
        # mmap only works for the zip format (torch >= 1.6); old files are read into memory
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's concern
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: refuses to unpickle untrusted code: the file needs more than "
                         f"torch.load(weights_only=True) allows ({_unpickle_reason(exc)}); "
                         "convert it to safetensors where it is trusted") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... for damaged or foreign files
        raise InputError(f"{path}: cannot load as a torch file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    sd = obj
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        sd = obj["state_dict"]
    if not isinstance(sd, Mapping):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a flat {{name: tensor}} state dict")
    return _DictCheckpoint(sd, str(path), label)


def _open_folder(folder: Path, label: str | None) -> Checkpoint:
    # exists(), not is_file(): a FIFO or a device under these names is refused by the reader, by name
    if (folder / SINGLE_NAME).exists():
        return _SafetensorsFile(folder / SINGLE_NAME, label)
    if (folder / INDEX_NAME).exists():
        return _ShardedCheckpoint(folder / INDEX_NAME, label)
    found = sorted(p for p in folder.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))
    if len(found) == 1:
        return _SafetensorsFile(found[0], label)
    if found:
        raise InputError(f"{folder}: holds {len(found)} .safetensors files ({_few([p.name for p in found])}) "
                         f"but no {INDEX_NAME} saying how they form one model")
    if (folder / "pytorch_model.bin").exists():
        return _load_torch(folder / "pytorch_model.bin", label)
    extra = " (sharded pytorch_model.bin files are not supported)" if (
        folder / "pytorch_model.bin.index.json").is_file() else ""
    raise InputError(f"{folder}: no weights found{extra}; expected {SINGLE_NAME}, {INDEX_NAME}, "
                     "a single *.safetensors file or pytorch_model.bin")


def open_checkpoint(source: str | os.PathLike[str] | Mapping[str, torch.Tensor], *,
                    label: str | None = None) -> Checkpoint:
    """Open a checkpoint lazily; ``label`` names an in-memory mapping in error messages.

        >>> import torch
        >>> with open_checkpoint({"b": torch.zeros(3, dtype=torch.bfloat16)}, label="sst2") as ck:
        ...     ck.info("b")
        ('BF16', (3,))
        >>> open_checkpoint("missing.safetensors")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        tallfmt.errors.InputError: missing.safetensors: no such file or folder; expected a .safetensors, ...
    """
    if isinstance(source, Mapping):
        return _DictCheckpoint(source, f"<dict {label!r}>" if label is not None else "<dict>", label)
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"a checkpoint must be a path or a {{name: torch.Tensor}} mapping, "
                         f"got a {type(source).__name__}")
    path = Path(source)
    expected = "expected a .safetensors, .bin, .pt or .pth file or a model folder"
    if path.is_dir():
        return _open_folder(path, label)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; {expected}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _SafetensorsFile(path, label)
    if suffix in TORCH_SUFFIXES:
        return _load_torch(path, label)
    raise InputError(f"{path}: unknown kind of file {path.suffix!r}; {expected}")

