"""Files stored beside the tensors (FORMAT.md §10, format version 1.1): the non-weight files of model
folders — config.json, tokenizer files, the model card — deduplicated by content, so a decoded folder
loads with ``from_pretrained`` as the original did.

They live in the header (``"files"``) rather than in segments, so that a 1.0 reader, which ignores the
keys of a newer minor version (§7), still reads everything else: a segment it did not know would break
its layout check (§6). Each file's bytes are stored once (raw or one zstd frame, then base64), with
the XXH3-64 of its content, which is checked before the bytes are returned.

    >>> files = Files.pack({"config.json": b"{}"}, [{"config.json": b"{}", "vocab.txt": b"a\\nb\\n"}])
    >>> len(files.blobs), files.names(None), files.names(0)
    (2, ['config.json'], ['config.json', 'vocab.txt'])
    >>> files.read(0, "zoo.tall")["vocab.txt"]
    b'a\\nb\\n'
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from tallfmt.errors import ChecksumError, FormatError, LimitError
from tallfmt.format.codecs import MAX_EXPANSION, get_codec, zstd_compress

#: The minor version that added ``files`` (a header of a lower minor must not hold them; an index
#: holding files is 1.1, one without them 1.0).
FILES_MINOR = 1
#: Largest file (decoded bytes).
MAX_FILE_BYTES = 64 * 2**20
#: All distinct files of an archive together (decoded bytes).
MAX_FILES_BYTES = 256 * 2**20
#: All stored (base64) data together, which the header holds (its own limit is 100 MiB).
MAX_FILES_STORED = 64 * 2**20
#: Files of one model (θ0 or one task).
MAX_FILES_PER_MODEL = 1024
MAX_PATH_BYTES = 1024
MAX_PART_BYTES = 255
FILE_CODECS = ("raw", "zstd")
#: Names a decode writes itself: a file may not take them (nor a folder of the same name).
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a stored file's name, or None: a relative POSIX path of plain parts
    (no empty, ``.`` or ``..`` part, no backslash, NUL or control character), at most 1024 UTF-8
    bytes and 255 per part, not a weight file that a decode writes (``*.safetensors``, its index).

        >>> name_problem("tokenizer/vocab.txt") is None, name_problem("../x")
        (True, "a part is '', '.' or '..'")
    """
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return "not Unicode text"
    if len(raw) > MAX_PATH_BYTES:
        return f"longer than {MAX_PATH_BYTES} bytes"
    if any(ord(c) < 32 or c in "\\\x7f" for c in name):
        return "holds a backslash or a control character"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a part is '', '.' or '..'"
    if any(len(p.encode("utf-8")) > MAX_PART_BYTES for p in parts):
        return f"a part is longer than {MAX_PART_BYTES} bytes"
    if name.endswith(WEIGHT_SUFFIXES):
        return "a weight file name, which a decode writes itself"
    return None


@dataclass(frozen=True)
class Blob:
    """One distinct file content: its size, the XXH3-64 of its bytes, the codec and the base64 data."""

    size: int
    xxh3: str
    codec: str
    data: str

    @classmethod
    def of(cls, content: bytes) -> Blob:
        """The smaller of raw and zstd (a one-frame zstd of the whole file)."""
        packed = zstd_compress(content)
        codec, stored = ("zstd", packed) if len(packed) < len(content) else ("raw", content)
        return cls(len(content), xxhash.xxh3_64_hexdigest(content), codec, base64.b64encode(stored).decode("ascii"))

    def content(self, where: str) -> bytes:
        """The file's bytes, decoded and checked against ``xxh3`` (ChecksumError naming ``where``)."""
        try:
            stored = base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            raise FormatError(f"{where}.data: not base64") from None
        try:
            out = bytes(get_codec(self.codec).decode(stored, self.size, 1))
        except FormatError as exc:
            raise FormatError(f"{where}: codec {self.codec}: {exc}") from None
        if xxhash.xxh3_64_hexdigest(out) != self.xxh3:
            raise ChecksumError(f"{where}: checksum mismatch (xxh3 of the file's bytes is not {self.xxh3})")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "xxh3": self.xxh3, "codec": self.codec, "data": self.data}


@dataclass(frozen=True)
class Files:
    """The ``files`` object: ``blobs`` (distinct contents), θ0's files and each task's, as
    {relative name: blob index}."""

    blobs: tuple[Blob, ...]
    base: dict[str, int]
    tasks: tuple[dict[str, int], ...]

    @classmethod
    def pack(cls, base: Mapping[str, bytes], tasks: Sequence[Mapping[str, bytes]]) -> Files | None:
        """Deduplicate the files of θ0 and of each task; None when there are none."""
        blobs: list[Blob] = []
        seen: dict[tuple[str, int], list[tuple[bytes, int]]] = {}

        def index(content: bytes) -> int:
            key = (xxhash.xxh3_64_hexdigest(content), len(content))
            for other, i in seen.get(key, []):
                if other == content:
                    return i
            blobs.append(Blob.of(content))
            seen.setdefault(key, []).append((content, len(blobs) - 1))
            return len(blobs) - 1

        maps = [{n: index(c) for n, c in sorted(m.items())} for m in (base, *tasks)]
        return cls(tuple(blobs), maps[0], tuple(maps[1:])) if blobs else None

    def model(self, i: int | None) -> dict[str, int]:
        """{name: blob index} of task index ``i`` (None: θ0)."""
        return self.base if i is None else self.tasks[i]

    def names(self, i: int | None) -> list[str]:
        return list(self.model(i))

    def read(self, i: int | None, path: str) -> dict[str, bytes]:
        """{name: bytes} of task index ``i`` (None: θ0), each checked; errors name ``path``."""
        return {n: self.blobs[b].content(f"{path}: files.blobs[{b}] ({n!r})") for n, b in self.model(i).items()}

    def verify(self, path: str) -> None:
        """Decode and check every blob (ChecksumError / FormatError naming ``path``)."""
        for b, blob in enumerate(self.blobs):
            blob.content(f"{path}: files.blobs[{b}]")

    @property
    def stored_bytes(self) -> int:
        """Characters of base64 data in the header."""
        return sum(len(b.data) for b in self.blobs)

    @property
    def content_bytes(self) -> int:
        """Bytes of all distinct files."""
        return sum(b.size for b in self.blobs)

    def to_json(self) -> dict[str, Any]:
        return {"blobs": [b.to_json() for b in self.blobs], "base": dict(self.base),
                "tasks": [dict(t) for t in self.tasks]}


def check_files(c: Any, v: Any, n_tasks: int) -> Files:
    """Validate a header's (or an index's) ``files`` object with checker ``c`` (a
    :class:`~tallfmt.format.header.HeaderChecker`): every rule of FORMAT.md §10 that needs no
    decompression. A blob's content is checked when it is read."""
    o = c.obj(v, "files", {"blobs", "base", "tasks"})
    blobs = []
    for i, b in enumerate(c.list_(o["blobs"], "files.blobs", MAX_FILES_PER_MODEL * (n_tasks + 1))):
        where = f"files.blobs[{i}]"
        b = c.obj(b, where, {"size", "xxh3", "codec", "data"})
        blob = Blob(c.int_(b["size"], f"{where}.size", 0, MAX_FILE_BYTES), c.str_(b["xxh3"], f"{where}.xxh3"),
                    c.str_(b["codec"], f"{where}.codec", FILE_CODECS), c.str_(b["data"], f"{where}.data"))
        if len(blob.xxh3) != 16 or any(ch not in "0123456789abcdef" for ch in blob.xxh3):
            raise c.fail(f"{where}.xxh3", "expected 16 lowercase hex digits")
        stored = _base64_length(blob.data)
        if stored is None:
            raise c.fail(f"{where}.data", "not base64 (RFC 4648, with padding)")
        if blob.codec == "raw" and stored != blob.size:
            raise c.fail(f"{where}.size", f"raw file: stored {stored} bytes != size {blob.size}")
        if blob.size > MAX_EXPANSION * stored + 4096:
            raise _limit(c, where, f"{blob.size} bytes from {stored} stored is past the {MAX_EXPANSION}× "
                                   f"expansion limit")
        blobs.append(blob)
    if sum(b.size for b in blobs) > MAX_FILES_BYTES:
        raise _limit(c, "files", f"{sum(b.size for b in blobs)} bytes of files, the limit is {MAX_FILES_BYTES}")
    tasks = c.list_(o["tasks"], "files.tasks", n_tasks)
    if len(tasks) != n_tasks:
        raise c.fail("files.tasks", f"{len(tasks)} entries for {n_tasks} tasks")
    maps = [_check_map(c, m, where, len(blobs)) for m, where in
            ((o["base"], "files.base"), *((t, f"files.tasks[{i}]") for i, t in enumerate(tasks)))]
    used = {b for m in maps for b in m.values()}
    if len(used) != len(blobs):
        raise c.fail("files.blobs", f"blob(s) {sorted(set(range(len(blobs))) - used)[:5]} belong to no model")
    return Files(tuple(blobs), maps[0], tuple(maps[1:]))


def _check_map(c: Any, v: Any, where: str, n_blobs: int) -> dict[str, int]:
    if not isinstance(v, dict):
        raise c.fail(where, f"expected an object, got {type(v).__name__}")
    m = c.obj(v, where, set(), frozenset(v))
    if len(m) > MAX_FILES_PER_MODEL:
        raise _limit(c, where, f"{len(m)} files, the limit is {MAX_FILES_PER_MODEL}")
    for name, b in m.items():
        why = name_problem(name)
        if why is not None:
            raise c.fail(f"{where} ({name[:80]!r})", f"not a file name inside a model folder: {why}")
        c.int_(b, f"{where}.{name}", 0, n_blobs - 1)
    folders = {"/".join(n.split("/")[:k]) for n in m for k in range(1, n.count("/") + 1)}
    clash = sorted(folders & set(m))
    if clash:
        raise c.fail(where, f"{clash[0]!r} is both a file and a folder")
    return dict(m)


def _limit(c: Any, where: str, msg: str) -> LimitError:
    return LimitError(str(c.fail(where, msg)))  # the checker's wording: "<path>: header|index <where>: ..."


def _base64_length(text: str) -> int | None:
    """Decoded length of canonical base64 text, or None when it is not base64."""
    if len(text) % 4 or not text.isascii():
        return None
    try:
        return len(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return None
