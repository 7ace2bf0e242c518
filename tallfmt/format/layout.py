"""Opening what an archive path names — one .tall file, or a sharded folder (its ``tall.index.json``
and every shard) — as one table of tensors (FORMAT.md §9.3)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tallfmt.errors import FormatError, InputError, LimitError
from tallfmt.format.container import ContainerReader, open_regular
from tallfmt.format.header import Header, TensorEntry, topk_count
from tallfmt.format.index import INDEX_NAME, MAX_INDEX_BYTES, ShardIndex, ShardInfo, parse_index


@dataclass
class Layout:
    """What an Archive reads from: its shard readers, the tensor table in archive order, and which
    reader holds each tensor (``reader_of`` is None when there is one shard)."""

    path: Path
    header: Header
    readers: list[ContainerReader]
    reader_of: dict[str, ContainerReader] | None
    index: ShardIndex | None = None
    index_bytes: int = 0

    def reader(self, name: str) -> ContainerReader:
        """The shard file that holds tensor ``name``."""
        return self.readers[0] if self.reader_of is None else self.reader_of[name]

    def close(self) -> None:
        for r in self.readers:
            r.close()


def index_path_of(path: str | os.PathLike) -> Path | None:
    """The index file that ``path`` names (the index itself or its folder), or None for a single file."""
    p = Path(path)
    if p.is_dir():
        if not (p / INDEX_NAME).is_file():
            raise FormatError(f"{p}: is a folder without {INDEX_NAME} (not a sharded .tall archive)")
        return p / INDEX_NAME
    return p if p.name.endswith(".json") else None


def open_layout(path: str | os.PathLike, *, mmap: bool = False, max_tensor_bytes: int | None = None,
                retries: int = 5) -> Layout:
    """Open a single .tall file, or a sharded archive's index (or its folder) and every shard.

    Every shard is opened (its own header validated) and checked against the index: size, header
    checksum, tasks and λ, encoding, the tensors the weight map gives it, in order, and then the
    thresholds against the masked parameters of all shards. A shard that is missing or does not
    match while the index has changed since it was read (a re-encode replacing the archive) makes
    the reader start again from the new index, up to ``retries`` times (FORMAT.md §9.5).
    ``mmap`` and ``max_tensor_bytes``: as :class:`~tallfmt.format.container.ContainerReader`. A path
    that does not exist is an InputError (the caller named the wrong thing; nothing is damaged).
    """
    if not os.path.lexists(path):
        raise InputError(f"{path}: no such file or folder (expected a .tall file, or the folder or "
                         f"{INDEX_NAME} of a sharded archive)")
    opts = {"mmap": mmap, "max_tensor_bytes": max_tensor_bytes}
    index_path = index_path_of(path)
    if index_path is None:
        reader = ContainerReader(path, **opts)
        return Layout(Path(path), reader.header, [reader], None)
    raw, identity = _read_index(index_path)
    for attempt in range(retries + 1):
        try:
            return _open_sharded(index_path, raw, opts)
        except FormatError:
            if attempt == retries:
                raise
            raw, again = _read_index(index_path)
            if again == identity:  # the same index file: the archive is damaged, not being replaced
                raise
            identity = again
    raise AssertionError("unreachable")


def _read_index(index_path: Path) -> tuple[bytes, tuple[int, ...]]:
    """The index's bytes and its file's identity (a writer replaces the index by a new file, so a
    new identity means a new index, even with the same bytes)."""
    fd = open_regular(str(index_path), FormatError, "an index file")
    try:
        st = os.fstat(fd)
        if st.st_size > MAX_INDEX_BYTES:
            raise LimitError(f"{index_path}: index is {st.st_size} bytes, over the {MAX_INDEX_BYTES}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise FormatError(f"{index_path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    return raw, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _open_sharded(index_path: Path, raw: bytes, opts: dict) -> Layout:
    index = parse_index(raw, str(index_path))
    wanted: dict[str, list[str]] = {info.file: [] for info in index.shards}
    for name, file in index.weight_map.items():  # one pass, whatever the number of shards
        wanted[file].append(name)
    folder = os.path.realpath(index_path.parent)
    readers: list[ContainerReader] = []
    try:
        for i, info in enumerate(index.shards):
            readers.append(_open_shard(index_path, folder, index, i, info, wanted[info.file], opts))
        entries: dict[str, TensorEntry] = {}
        reader_of: dict[str, ContainerReader] = {}
        for r in readers:
            for e in r.header.tensors:
                entries[e.name] = e
                reader_of[e.name] = r
        header = Header(index.tasks, index.encoding, tuple(entries[n] for n in index.weight_map),
                        dict(index.metadata), index.version, index.files)
        _check_thresholds(index_path, index, header)
        return Layout(index_path, header, readers, reader_of if len(readers) > 1 else None, index, len(raw))
    except BaseException:
        for r in readers:
            r.close()
        raise


def _check_thresholds(index_path: Path, index: ShardIndex, header: Header) -> None:
    """Each global step's thresholds are null exactly when k = ⌈density · N⌉ is 0, N the masked
    parameters of all shards (FORMAT.md §9.2)."""
    n = sum(e.numel for e in header.tensors if e.role == "masked")
    enc = index.encoding
    for step, density in (("ties", enc["merge"].get("density")), ("magnitude", enc["mask"].get("density"))):
        values = index.thresholds[step]
        if values is None:
            continue
        k = topk_count(n, density)
        for i, v in enumerate(values):
            if (v is None) != (k == 0):
                raise FormatError(f"{index_path}: index thresholds.{step}[{i}]: {v!r}, but k = ⌈{density!r} · {n}⌉ "
                                  f"= {k} (null exactly when k = 0)")


def _open_shard(index_path: Path, folder: str, index: ShardIndex, i: int, info: ShardInfo, want: list[str],
                opts: dict) -> ContainerReader:
    """Open shard ``i`` and check it against the index; ``want``: its tensors per the weight map."""
    f = index_path.parent / info.file
    where = f"{index_path}: index shards[{i}]"
    try:
        size = f.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"{where}.file: {f} does not exist") from None
    except OSError as exc:
        raise FormatError(f"{where}.file: {f}: {exc.strerror}") from None
    real = os.path.realpath(f)
    if os.path.commonpath([folder, real]) != folder or real == folder:
        raise FormatError(f"{where}.file: {f} is a link to {real}, outside the archive's folder {folder}")
    if size != info.size:
        raise FormatError(f"{f}: {size} bytes, but {index_path} shards[{i}].size says {info.size} "
                          f"(truncated or replaced?)")
    reader = ContainerReader(f, **opts)
    try:
        h = reader.header
        if f"{reader.header_xxh3:016x}" != info.header_xxh3:
            raise FormatError(f"{f}: header checksum differs from {index_path} shards[{i}].header_xxh3 "
                              f"(a shard of another encode?)")
        mine = [(t.name, t.lam) for t in h.tasks]
        theirs = [(t.name, t.lam) for t in index.tasks]
        if mine != theirs:
            raise FormatError(f"{f}: header tasks {mine[:5]} differ from {index_path} tasks {theirs[:5]} "
                              f"(names, order and lambda must agree)")
        if h.encoding != index.encoding:
            raise FormatError(f"{f}: header encoding {h.encoding} differs from {index_path} encoding "
                              f"{index.encoding}")
        names = [t.name for t in h.tensors]
        if names != want:
            extra = sorted(set(names) - set(want))[:5]
            missing = sorted(set(want) - set(names))[:5]
            raise FormatError(f"{f}: header tensors differ from what {index_path} weight_map gives "
                              f"{info.file!r} (not in the map: {extra}; missing: {missing}; or another order)")
        return reader
    except BaseException:
        reader.close()
        raise
