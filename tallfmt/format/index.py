"""The index of a sharded archive, ``tall.index.json`` (FORMAT.md §9.2, §9.3): its model, how it is
sealed with its own checksum, and its checks.

    >>> shard_name(1, 3, "0123456789abcdef")
    'model-00001-of-00003-0123456789abcdef.tall'
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import xxhash

from tallfmt.errors import ChecksumError, FormatError, InputError, LimitError
from tallfmt.format.files import Files, check_files
from tallfmt.format.header import (MAX_TASKS, MAX_TENSORS, PREAMBLE_SIZE, TAU_DTYPE_MINOR, HeaderChecker, TaskEntry,
                                   load_json_object, since_1_1)

INDEX_NAME = "tall.index.json"
INDEX_FORMAT = "tallfmt-index"
INDEX_MAJOR, INDEX_MINOR = 1, TAU_DTYPE_MINOR  # the newest minor this reader knows (1.1: files, 1.2: tau_dtype)
MAX_SHARDS = 99_999                     # five digits in the shard file names
MAX_INDEX_BYTES = 256 * 1024 * 1024
MAX_FILE_NAME_BYTES = 255               # what common filesystems allow for one path component
# The writer's shard names (and those of tallfmt before content-named shards): files of the folder
# that match and that the index does not list are leftovers a later encode removes (FORMAT.md §9.5).
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}(-[0-9a-f]{16})?\.tall")
# The index ends with its own checksum: `"checksum": "<16 hex>"` closing the top-level object.
_CHECKSUM_TAIL = re.compile(rb'"checksum"[ \t\r\n]*:[ \t\r\n]*"([0-9a-f]{16})"[ \t\r\n]*\}[ \t\r\n]*\Z')
_HEX16 = re.compile(r"[0-9a-f]{16}")


def shard_name(i: int, n: int, header_xxh3: str) -> str:
    """The file name of shard ``i`` (1-based) of ``n`` whose header checksum is ``header_xxh3``: named
    by its content, a new shard never takes the name of a different shard an older index lists."""
    return f"model-{i:05d}-of-{n:05d}-{header_xxh3}.tall"


def plan_name(i: int, n: int) -> str:
    """The name shard ``i`` of ``n`` is written under before its content is known (its temporary file
    is ``.<plan name>.<pid>-<random>.tmp``, FORMAT.md §8)."""
    return f"model-{i:05d}-of-{n:05d}.tall"


# ----------------------------------------------------------------------------------------------
# The index


@dataclass(frozen=True)
class ShardInfo:
    """One row of the index's ``shards``: a file in the index's folder, its size, its header's XXH3-64."""

    file: str
    size: int
    header_xxh3: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "size": self.size, "header_xxh3": self.header_xxh3}


@dataclass(frozen=True)
class ShardIndex:
    """The parsed ``tall.index.json`` (FORMAT.md §9).

    ``thresholds`` maps "ties" and "magnitude" to one float32 threshold per task (None: k = 0, nothing
    kept) when that step used a global scope, else to None. ``weight_map`` lists every tensor in the
    archive's order.
    """

    tasks: tuple[TaskEntry, ...]
    encoding: dict[str, Any]
    thresholds: dict[str, tuple[float | None, ...] | None]
    metadata: dict[str, str]
    shards: tuple[ShardInfo, ...]
    weight_map: dict[str, str]
    version: tuple[int, int] = (INDEX_MAJOR, 0)
    files: Files | None = None   # 1.1: the models' non-weight files (FORMAT.md §10); shards hold none

    def to_json(self) -> dict[str, Any]:
        out = {"format": INDEX_FORMAT, "version": list(self.version), "tasks": [t.to_json() for t in self.tasks],
               "encoding": self.encoding,
               "thresholds": {k: None if v is None else list(v) for k, v in self.thresholds.items()},
               "metadata": dict(self.metadata), "shards": [s.to_json() for s in self.shards],
               "weight_map": dict(self.weight_map)}
        if self.files is not None:
            out["files"] = self.files.to_json()
        return out

    def to_bytes(self) -> bytes:
        """The index file: indented JSON whose last member is the checksum of the bytes before it."""
        return seal_index(json.dumps(self.to_json(), indent=2, ensure_ascii=False, allow_nan=False))

    def tensors_of(self, file: str) -> list[str]:
        """The tensors that ``weight_map`` gives to shard ``file``, in archive order."""
        return [n for n, f in self.weight_map.items() if f == file]


def seal_index(text: str) -> bytes:
    """Append the ``checksum`` member to the JSON text of an index object (without one).

    The checksum is the XXH3-64 of every byte before the ``"checksum"`` key (FORMAT.md §9.2).

        >>> seal_index('{"a": 1}')
        b'{"a": 1,\\n  "checksum": "1cbd3ded2f3e6d58"\\n}\\n'
    """
    body = text.rstrip()
    if not body.endswith("}"):
        raise InputError("an index is a JSON object")
    raw = (body[:-1].rstrip() + ",\n  ").encode("utf-8")
    return raw + f'"checksum": "{xxhash.xxh3_64_hexdigest(raw)}"\n}}\n'.encode()


class IndexChecker(HeaderChecker):
    """The header checker's rules, with errors that name the index file and field."""

    what = "index"

    def file_name(self, v: Any, where: str) -> str:
        """A plain file name inside the index's folder: no separators, not '.', '..' or the index."""
        s = self.str_(v, where)
        if (not s or s in (".", "..", INDEX_NAME) or any(c in s for c in "/\\\0")
                or len(s.encode("utf-8")) > MAX_FILE_NAME_BYTES):
            raise self.fail(where, f"{s[:300]!r} is not a plain file name inside the index's folder")
        return s

    def threshold_list(self, v: Any, where: str, n_tasks: int, used: bool, what: str) -> tuple | None:
        if v is None:
            if used:
                raise self.fail(where, f"the encoding uses a global {what} scope, so the thresholds are required")
            return None
        if not used:
            raise self.fail(where, f"must be null: the encoding has no global {what} step")
        vals = self.list_(v, where, MAX_TASKS)
        if len(vals) != n_tasks:
            raise self.fail(where, f"{len(vals)} thresholds for {n_tasks} tasks")
        out = []
        for i, x in enumerate(vals):
            x = self.num(x, f"{where}[{i}]", allow_none=True)
            if x is not None and (x < 0 or struct.unpack("<f", struct.pack("<f", x))[0] != x):
                raise self.fail(f"{where}[{i}]", f"{x!r} is not a non-negative float32 value")
            out.append(x)
        return tuple(out)

    def index(self, v: Any) -> ShardIndex:
        keys = {"format", "version", "tasks", "encoding", "thresholds", "metadata", "shards", "weight_map",
                "checksum"}
        o = self.obj(v, "", keys, since_1_1(v))
        if o["format"] != INDEX_FORMAT:
            raise self.fail("format", f"expected {INDEX_FORMAT!r}, got {str(o['format'])[:80]!r}")
        version = self.version(o["version"])
        if version[0] != INDEX_MAJOR:
            raise self.fail("version", f"major version {version[0]} is not supported (this reader reads "
                                       f"{INDEX_MAJOR})")
        self.minor = version[1]
        enc = self.encoding(o["encoding"])
        tasks = self.tasks(o["tasks"], enc)
        th = self.obj(o["thresholds"], "thresholds", {"ties", "magnitude"})
        thresholds = {
            "ties": self.threshold_list(th["ties"], "thresholds.ties", len(tasks),
                                        enc["merge"]["method"] == "ties" and enc["merge"]["scope"] == "global",
                                        "TIES"),
            "magnitude": self.threshold_list(th["magnitude"], "thresholds.magnitude", len(tasks),
                                             enc["mask"]["method"] == "magnitude"
                                             and enc["mask"]["scope"] == "global", "magnitude mask")}
        meta = self.metadata(o["metadata"])
        shards = []
        for i, s in enumerate(self.list_(o["shards"], "shards", MAX_SHARDS)):
            s = self.obj(s, f"shards[{i}]", {"file", "size", "header_xxh3"})
            info = ShardInfo(self.file_name(s["file"], f"shards[{i}].file"),
                             self.int_(s["size"], f"shards[{i}].size", PREAMBLE_SIZE),
                             self.str_(s["header_xxh3"], f"shards[{i}].header_xxh3"))
            if not _HEX16.fullmatch(info.header_xxh3):
                raise self.fail(f"shards[{i}].header_xxh3", "expected 16 lowercase hex digits")
            shards.append(info)
        if not shards:
            raise self.fail("shards", "an index lists at least one shard")
        files = [s.file for s in shards]
        if len(set(files)) != len(files):
            raise self.fail("shards", "a file is listed twice")
        wm = self.free_obj(o["weight_map"], "weight_map")
        if len(wm) > MAX_TENSORS:
            raise LimitError(f"{self.path}: index weight_map: {len(wm)} tensors, the limit is {MAX_TENSORS}")
        known, used = set(files), set()
        for name, file in wm.items():
            self.name(name, f"weight_map ({name[:80]!r})")
            if self.str_(file, f"weight_map.{name[:80]}") not in known:
                raise self.fail(f"weight_map.{name[:80]}", f"{file[:300]!r} is not a file listed in shards")
            used.add(file)
        idle = [f for f in files if f not in used]
        if idle and (wm or len(files) > 1):
            raise self.fail("shards", f"shard(s) {idle[:5]} hold no tensor (only an archive without tensors "
                                      f"has an empty shard, its only one)")
        files = check_files(self, o["files"], len(tasks)) if "files" in o else None
        return ShardIndex(tasks, enc, thresholds, meta, tuple(shards), wm, version, files)


def parse_index(raw: bytes, path: str = "<index>") -> ShardIndex:
    """Check the checksum, parse and validate an index file's bytes; FormatError naming the field."""
    if len(raw) > MAX_INDEX_BYTES:
        raise LimitError(f"{path}: index is {len(raw)} bytes, over the {MAX_INDEX_BYTES}-byte limit")
    m = _CHECKSUM_TAIL.search(raw)
    if m is None:
        raise FormatError(f"{path}: index checksum: the file does not end with '\"checksum\": \"<16 hex "
                          f"digits>\"}}' (truncated, or not a tallfmt index)")
    if xxhash.xxh3_64_hexdigest(raw[:m.start()]) != m.group(1).decode():
        raise ChecksumError(f"{path}: index checksum mismatch (the file is damaged or was edited)")
    obj, strict = load_json_object(raw, path, "index", INDEX_MINOR, trailing_whitespace=True)
    return IndexChecker(path, strict).index(obj)


def read_header_xxh3(path: str | os.PathLike) -> str:
    """A .tall file's header checksum from its preamble (bytes 32..40), as 16 hex digits.

    ContainerReader checks it against the header on open, so this identifies the header cheaply.
    """
    with open(path, "rb") as f:
        pre = f.read(PREAMBLE_SIZE)
    if len(pre) < 40:
        raise FormatError(f"{path}: shorter than the {PREAMBLE_SIZE}-byte preamble")
    return f"{struct.unpack_from('<Q', pre, 32)[0]:016x}"
