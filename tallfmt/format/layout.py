"""Opening what an archive path names — one .tall file, or a sharded folder (its ``tall.index.json``
and every shard) — as one table of tensors (FORMAT.md §9.3)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tallfmt.errors import FormatError, InputError, LimitError
from tallfmt.format.container import ContainerReader
from tallfmt.format.header import Header, TensorEntry
from tallfmt.format.index import (INDEX_NAME, MAX_INDEX_BYTES, ShardIndex, ShardInfo, parse_index,
                                  read_header_xxh3)


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


def open_layout(path: str | os.PathLike) -> Layout:
    """Open a single .tall file, or a sharded archive's index (or its folder) and every shard.

    Every shard is opened (its own header validated) and checked against the index: size, header
    checksum, tasks and λ, encoding, and the tensors the weight map gives it, in order. A path that
    does not exist is an InputError (the caller named the wrong thing; nothing is damaged).
    """
    if not os.path.lexists(path):
        raise InputError(f"{path}: no such file or folder (expected a .tall file, or the folder or "
                         f"{INDEX_NAME} of a sharded archive)")
    index_path = index_path_of(path)
    if index_path is None:
        reader = ContainerReader(path)
        return Layout(Path(path), reader.header, [reader], None)
    try:
        size = index_path.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise LimitError(f"{index_path}: index is {size} bytes, over the {MAX_INDEX_BYTES}-byte limit")
        raw = index_path.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{index_path}: no such file") from None
    except OSError as exc:
        raise FormatError(f"{index_path}: cannot read ({exc.strerror})") from None
    index = parse_index(raw, str(index_path))
    wanted: dict[str, list[str]] = {info.file: [] for info in index.shards}
    for name, file in index.weight_map.items():  # one pass, whatever the number of shards
        wanted[file].append(name)
    readers: list[ContainerReader] = []
    try:
        for i, info in enumerate(index.shards):
            readers.append(_open_shard(index_path, index, i, info, wanted[info.file]))
        entries: dict[str, TensorEntry] = {}
        reader_of: dict[str, ContainerReader] = {}
        for r in readers:
            for e in r.header.tensors:
                entries[e.name] = e
                reader_of[e.name] = r
        header = Header(index.tasks, index.encoding, tuple(entries[n] for n in index.weight_map),
                        dict(index.metadata), index.version, index.files)
        return Layout(index_path, header, readers, reader_of if len(readers) > 1 else None, index, len(raw))
    except BaseException:
        for r in readers:
            r.close()
        raise


def _open_shard(index_path: Path, index: ShardIndex, i: int, info: ShardInfo, want: list[str]
                ) -> ContainerReader:
    """Open shard ``i`` and check it against the index; ``want``: its tensors per the weight map."""
    f = index_path.parent / info.file
    where = f"{index_path}: index shards[{i}]"
    try:
        size = f.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"{where}.file: {f} does not exist") from None
    except OSError as exc:
        raise FormatError(f"{where}.file: {f}: {exc.strerror}") from None
    if size != info.size:
        raise FormatError(f"{f}: {size} bytes, but {index_path} shards[{i}].size says {info.size} "
                          f"(truncated or replaced?)")
    reader = ContainerReader(f)
    try:
        h = reader.header
        if read_header_xxh3(f) != info.header_xxh3:
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
