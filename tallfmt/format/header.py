"""The header model of a .tall file and its checks (FORMAT.md §1.2, §2, §6): segments, tensor rows,
tasks, the whole header; parsing and validating header JSON; the segment layout rule.

Nothing here reads or writes files (see :mod:`tallfmt.format.container`) or does math on tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import xxhash

from tallfmt.errors import FormatError, LimitError
from tallfmt.format import dtypes
from tallfmt.format.codecs import CODECS, MAX_EXPANSION, Buffer
from tallfmt.format.files import FILES_MINOR, Files, check_files
from tallfmt.format.jsonio import loads_strict_object

MAGIC = b"\x89TALL\r\n\x1a"
FORMAT_NAME = "tallfmt"
#: The version this writer writes and the newest this reader knows: 1.1 stores mask bits as 0 where
#: τ_MTL = 0 (FORMAT.md §4.3) and added ``files`` (§10).
MAJOR, MINOR = 1, 1
PREAMBLE_SIZE = 64
ALIGN = 64

# Documented limits (FORMAT.md "Limits"). A file past any of them is refused before allocating for it.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_DEPTH = 16
MAX_TASKS = 4096
MAX_TENSORS = 1_000_000
MAX_NDIM = 32
MAX_NAME_BYTES = 4096
MAX_TENSOR_BYTES = 1 << 48

ROLES = ("masked", "shared", "per_task", "alias")
MERGE_METHODS = ("task_arithmetic", "ties")  # how τ_MTL was made (encoding.merge)
MASK_METHODS = ("tall", "magnitude")


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def checksum(data: Buffer) -> str:
    """xxh3-64 of the bytes, 16 lowercase hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


# ----------------------------------------------------------------------------------------------
# Header model


@dataclass(frozen=True)
class Segment:
    offset: int
    length: int
    decoded_length: int
    codec: str
    xxh3: str

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "length": self.length, "decoded_length": self.decoded_length,
                "codec": self.codec, "xxh3": self.xxh3}


@dataclass(frozen=True)
class Item:
    """One stored tensor value: its dtype, shape and segment (a `shared` tensor, or one copy of a `per_task`)."""

    dtype: str
    shape: tuple[int, ...]
    data: Segment

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data.to_json()}


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table. Which fields are set depends on ``role`` (FORMAT.md, "Tensor table")."""

    name: str
    role: str
    dtype: str | None = None                 # masked, shared
    shape: tuple[int, ...] | None = None     # masked, shared
    base: Segment | None = None              # masked: θ0 in `dtype`
    tau: Segment | None = None               # masked: τ_MTL in F32
    masks: tuple[Segment, ...] = ()          # masked: one packed mask per task, in task order
    data: Segment | None = None              # shared
    base_item: Item | None = None            # per_task: θ0's copy, if θ0 has the tensor
    task_items: tuple[Item | None, ...] = () # per_task: one per task (None: that task lacks it)
    target: str | None = None                # alias

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0

    def segments(self) -> Iterator[Segment]:
        for s, _ in self.parts():
            yield s

    def parts(self) -> Iterator[tuple[Segment, int]]:
        """(segment, itemsize of its elements) for every segment of the row."""
        if self.role in ("masked", "shared"):
            own = dtypes.by_name(self.dtype).itemsize
            for s in (self.base, self.data):
                if s is not None:
                    yield s, own
        if self.tau is not None:
            yield self.tau, 4
        for m in self.masks:
            yield m, 1
        for it in (self.base_item, *self.task_items):
            if it is not None:
                yield it.data, dtypes.by_name(it.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "role": self.role}
        if self.role in ("masked", "shared"):
            out["dtype"] = self.dtype
            out["shape"] = list(self.shape or ())
        if self.role == "masked":
            out["base"] = self.base.to_json()
            out["tau"] = self.tau.to_json()
            out["masks"] = [m.to_json() for m in self.masks]
        elif self.role == "shared":
            out["data"] = self.data.to_json()
        elif self.role == "per_task":
            out["base"] = self.base_item.to_json() if self.base_item else None
            out["tasks"] = [it.to_json() if it else None for it in self.task_items]
        else:
            out["target"] = self.target
        return out


@dataclass(frozen=True)
class TaskEntry:
    name: str
    lam: float | None = None                         # TALL λ_t (None for magnitude masks)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "lambda": self.lam, "stats": dict(self.stats)}


@dataclass(frozen=True)
class Header:
    tasks: tuple[TaskEntry, ...]
    encoding: dict[str, Any]
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    version: tuple[int, int] = (MAJOR, MINOR)
    files: Files | None = None               # 1.1: the models' non-weight files (FORMAT.md §10)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT_NAME, "version": list(self.version),
               "tasks": [t.to_json() for t in self.tasks], "encoding": self.encoding,
               "tensors": [t.to_json() for t in self.tensors], "metadata": dict(self.metadata)}
        if self.files is not None:
            out["files"] = self.files.to_json()
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode("utf-8")


# ----------------------------------------------------------------------------------------------
# Header parsing and validation


class HeaderChecker:
    """Validates the parsed JSON against FORMAT.md; every error names the file and the JSON path."""

    def __init__(self, path: str, strict: bool) -> None:
        self.path = path
        self.strict = strict  # unknown keys are errors unless the file's minor version is newer

    def fail(self, where: str, msg: str) -> FormatError:
        return FormatError(f"{self.path}: header {where}: {msg}")

    def obj(self, v: Any, where: str, required: set[str], optional: frozenset[str] = frozenset()) -> dict:
        if not isinstance(v, dict):
            raise self.fail(where, f"expected an object, got {type(v).__name__}")
        missing = required - v.keys()
        if missing:
            raise self.fail(where, f"missing key(s) {sorted(missing)}")
        extra = v.keys() - required - optional
        if extra and self.strict:
            raise self.fail(where, f"unknown key(s) {sorted(extra)}")
        for k, x in v.items():  # JSON can escape an unpaired surrogate ("\ud800"): not Unicode text
            for s, at in ((k, f"{where} (a key)" if where else "(a key)"), (x, f"{where}.{k}" if where else k)):
                if isinstance(s, str) and not s.isascii() and not _is_unicode(s):
                    raise self.fail(at, f"{s!r} holds an unpaired surrogate escape, not Unicode text")
        return v

    def int_(self, v: Any, where: str, lo: int = 0, hi: int = 1 << 63) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(where, f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise self.fail(where, f"{v} is outside [{lo}, {hi}]")
        return v

    def num(self, v: Any, where: str, allow_none: bool = False) -> float | None:
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(where, f"expected a finite number, got {v!r}")
        return float(v)

    def str_(self, v: Any, where: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(v, str):
            raise self.fail(where, f"expected a string, got {type(v).__name__}")
        if choices is not None and v not in choices:
            raise self.fail(where, f"{v!r} is not one of {list(choices)}")
        return v

    def list_(self, v: Any, where: str, max_len: int) -> list:
        if not isinstance(v, list):
            raise self.fail(where, f"expected an array, got {type(v).__name__}")
        if len(v) > max_len:
            raise LimitError(f"{self.path}: header {where}: {len(v)} entries, the limit is {max_len}")
        return v

    def name(self, v: Any, where: str) -> str:
        s = self.str_(v, where)
        if not s or len(s.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise self.fail(where, f"names must be 1..{MAX_NAME_BYTES} bytes")
        return s

    def dtype(self, v: Any, where: str, allowed: frozenset[str] | None = None) -> str:
        s = self.str_(v, where)
        if s not in dtypes.DTYPES or (allowed is not None and s not in allowed):
            raise self.fail(where, f"unknown or unsupported dtype {s!r}")
        return s

    def shape(self, v: Any, where: str, itemsize: int) -> tuple[int, ...]:
        dims = self.list_(v, where, MAX_NDIM)
        shape = tuple(self.int_(d, f"{where}[{i}]", 0, MAX_TENSOR_BYTES) for i, d in enumerate(dims))
        n = 1
        for d in shape:  # overflow-safe: stop as soon as the product passes the cap
            n *= d
            if n * itemsize > MAX_TENSOR_BYTES:
                raise LimitError(f"{self.path}: header {where}: {list(shape)} × {itemsize} bytes is over "
                                 f"the {MAX_TENSOR_BYTES}-byte tensor limit")
        return shape

    def segment(self, v: Any, where: str, decoded_length: int) -> Segment:
        o = self.obj(v, where, {"offset", "length", "decoded_length", "codec", "xxh3"})
        seg = Segment(self.int_(o["offset"], f"{where}.offset"), self.int_(o["length"], f"{where}.length"),
                      self.int_(o["decoded_length"], f"{where}.decoded_length"),
                      self.str_(o["codec"], f"{where}.codec", tuple(CODECS)), self.str_(o["xxh3"], f"{where}.xxh3"))
        if len(seg.xxh3) != 16 or any(c not in "0123456789abcdef" for c in seg.xxh3):
            raise self.fail(f"{where}.xxh3", "expected 16 lowercase hex digits")
        if seg.decoded_length != decoded_length:
            raise self.fail(f"{where}.decoded_length",
                            f"{seg.decoded_length} does not match shape × dtype = {decoded_length}")
        if seg.codec == "raw" and seg.length != seg.decoded_length:
            raise self.fail(f"{where}.length", f"raw segment: stored {seg.length} != decoded {seg.decoded_length}")
        if seg.decoded_length > MAX_EXPANSION * seg.length + 4096:
            raise LimitError(f"{self.path}: header {where}: {seg.decoded_length} decoded bytes from "
                             f"{seg.length} stored is past the {MAX_EXPANSION}× expansion limit")
        return seg

    def item(self, v: Any, where: str) -> Item:
        o = self.obj(v, where, {"dtype", "shape", "data"})
        dt = self.dtype(o["dtype"], f"{where}.dtype")
        isz = dtypes.by_name(dt).itemsize
        shape = self.shape(o["shape"], f"{where}.shape", isz)
        return Item(dt, shape, self.segment(o["data"], f"{where}.data", math.prod(shape) * isz))

    def tensor(self, v: Any, where: str, n_tasks: int) -> TensorEntry:
        o = self.obj(v, where, {"name", "role"}, frozenset({"dtype", "shape", "base", "tau", "masks", "data",
                                                            "tasks", "target"}))
        name = self.name(o["name"], f"{where}.name")
        role = self.str_(o["role"], f"{where}.role", ROLES)
        where = f"{where} ({name!r})"
        if role == "masked":
            o = self.obj(o, where, {"name", "role", "dtype", "shape", "base", "tau", "masks"})
            dt = self.dtype(o["dtype"], f"{where}.dtype", dtypes.MASKABLE)
            isz = dtypes.by_name(dt).itemsize
            shape = self.shape(o["shape"], f"{where}.shape", isz)
            n = math.prod(shape)
            masks = self.list_(o["masks"], f"{where}.masks", MAX_TASKS)
            if len(masks) != n_tasks:
                raise self.fail(f"{where}.masks", f"{len(masks)} masks for {n_tasks} tasks")
            return TensorEntry(name, role, dt, shape,
                               base=self.segment(o["base"], f"{where}.base", n * isz),
                               tau=self.segment(o["tau"], f"{where}.tau", n * 4),
                               masks=tuple(self.segment(m, f"{where}.masks[{i}]", (n + 7) // 8)
                                           for i, m in enumerate(masks)))
        if role == "shared":
            o = self.obj(o, where, {"name", "role", "dtype", "shape", "data"})
            dt = self.dtype(o["dtype"], f"{where}.dtype")
            isz = dtypes.by_name(dt).itemsize
            shape = self.shape(o["shape"], f"{where}.shape", isz)
            return TensorEntry(name, role, dt, shape, data=self.segment(o["data"], f"{where}.data",
                                                                        math.prod(shape) * isz))
        if role == "per_task":
            o = self.obj(o, where, {"name", "role", "base", "tasks"})
            items = self.list_(o["tasks"], f"{where}.tasks", MAX_TASKS)
            if len(items) != n_tasks:
                raise self.fail(f"{where}.tasks", f"{len(items)} entries for {n_tasks} tasks")
            base = None if o["base"] is None else self.item(o["base"], f"{where}.base")
            task_items = tuple(None if it is None else self.item(it, f"{where}.tasks[{i}]")
                               for i, it in enumerate(items))
            if base is None and all(it is None for it in task_items):
                raise self.fail(where, "a per_task tensor must be stored for θ0 or at least one task")
            return TensorEntry(name, role, base_item=base, task_items=task_items)
        o = self.obj(o, where, {"name", "role", "target"})
        return TensorEntry(name, role, target=self.name(o["target"], f"{where}.target"))

    def encoding(self, v: Any) -> dict[str, Any]:
        o = self.obj(v, "encoding", {"merge", "mask", "compute_dtype", "bit_order"})
        self.str_(o["compute_dtype"], "encoding.compute_dtype", ("F32",))
        self.str_(o["bit_order"], "encoding.bit_order", ("little",))
        m = self.obj(o["merge"], "encoding.merge", {"method"}, frozenset({"density", "agg", "scope"}))
        method = self.str_(m["method"], "encoding.merge.method", MERGE_METHODS)
        if method == "ties":
            self.obj(m, "encoding.merge", {"method", "density", "agg", "scope"})
            d = self.num(m["density"], "encoding.merge.density")
            if not 0 <= d <= 1:
                raise self.fail("encoding.merge.density", f"{d} is outside [0, 1]")
            self.str_(m["agg"], "encoding.merge.agg", ("sum", "mean"))
            self.str_(m["scope"], "encoding.merge.scope", ("global", "per_tensor"))
        elif len(m) != 1:
            raise self.fail("encoding.merge", "task_arithmetic takes no parameters")
        k = self.obj(o["mask"], "encoding.mask", {"method"}, frozenset({"density", "scope"}))
        if self.str_(k["method"], "encoding.mask.method", MASK_METHODS) == "magnitude":
            self.obj(k, "encoding.mask", {"method", "density", "scope"})
            d = self.num(k["density"], "encoding.mask.density")
            if not 0 <= d <= 1:
                raise self.fail("encoding.mask.density", f"{d} is outside [0, 1]")
            self.str_(k["scope"], "encoding.mask.scope", ("global", "per_tensor"))
        elif len(k) != 1:
            raise self.fail("encoding.mask", "tall takes no parameters (λ is per task)")
        return o

    def task(self, v: Any, where: str) -> TaskEntry:
        o = self.obj(v, where, {"name", "lambda", "stats"})
        lam = self.num(o["lambda"], f"{where}.lambda", allow_none=True)
        stats = self.obj(o["stats"], f"{where}.stats", set(), frozenset(o["stats"]) if isinstance(o["stats"], dict) else frozenset())
        for k, s in stats.items():
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)):
                raise self.fail(f"{where}.stats.{k}", "statistics are finite numbers or null")
        return TaskEntry(self.name(o["name"], f"{where}.name"), lam, dict(stats))

    def header(self, v: Any) -> Header:
        o = self.obj(v, "", {"format", "version", "tasks", "encoding", "tensors", "metadata"}, since_1_1(v))
        if o["format"] != FORMAT_NAME:
            raise self.fail("format", f"expected {FORMAT_NAME!r}, got {o['format']!r}")
        ver = self.list_(o["version"], "version", 2)
        if len(ver) != 2:
            raise self.fail("version", "expected [major, minor]")
        version = (self.int_(ver[0], "version[0]", 0, 65535), self.int_(ver[1], "version[1]", 0, 65535))
        tasks = tuple(self.task(t, f"tasks[{i}]") for i, t in enumerate(self.list_(o["tasks"], "tasks", MAX_TASKS)))
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise self.fail("tasks", "duplicate task names")
        if not tasks:
            raise self.fail("tasks", "an archive holds at least one task")
        enc = self.encoding(o["encoding"])
        if enc["mask"]["method"] == "tall" and any(t.lam is None for t in tasks):
            raise self.fail("tasks", "TALL masks need a lambda for every task")
        raw = self.list_(o["tensors"], "tensors", MAX_TENSORS)
        tensors = tuple(self.tensor(t, f"tensors[{i}]", len(tasks)) for i, t in enumerate(raw))
        by_name = {}
        for t in tensors:
            if t.name in by_name:
                raise self.fail("tensors", f"duplicate tensor name {t.name!r}")
            by_name[t.name] = t
        for t in tensors:
            if t.role == "alias" and (t.target not in by_name or by_name[t.target].role == "alias"):
                raise self.fail(f"tensors ({t.name!r}).target", f"{t.target!r} is not a stored tensor")
        meta = self.obj(o["metadata"], "metadata", set(), frozenset(o["metadata"]) if isinstance(o["metadata"], dict) else frozenset())
        for k, s in meta.items():
            if not isinstance(s, str):
                raise self.fail(f"metadata.{k}", "metadata values are strings")
        files = check_files(self, o["files"], len(tasks)) if "files" in o else None
        return Header(tasks, enc, tensors, dict(meta), version, files)


def version_for(files: Files | None) -> tuple[int, int]:
    """The version a writer gives an index: 1.0, or 1.1 when it holds files (an index holds no masks,
    so one without files is unchanged for 1.0 readers). Headers are always (MAJOR, MINOR)."""
    return (MAJOR, FILES_MINOR if files is not None else 0)


def since_1_1(v: Any) -> frozenset[str]:
    """The optional top-level keys of a header or index object, by its version: ``files`` from 1.1."""
    ver = v.get("version") if isinstance(v, dict) else None
    ok = isinstance(ver, list) and len(ver) == 2 and all(type(x) is int for x in ver) and ver[1] >= FILES_MINOR
    return frozenset({"files"}) if ok else frozenset()


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_json_object(raw: bytes, path: str, what: str = "header", minor: int = MINOR) -> tuple[Any, bool]:
    """Decode and parse a header-like JSON object by §1.2's rules (UTF-8, starts with '{', depth,
    no duplicate keys, no NaN/Infinity): (object, strict), strict unless its ``version`` minor number
    is newer than ``minor``, the reader's. FormatError/LimitError name ``path`` and ``what``."""
    obj = loads_strict_object(raw, lambda msg: FormatError(f"{path}: {msg}"), what,
                              lambda: LimitError(f"{path}: {what} JSON nests deeper than {MAX_JSON_DEPTH} levels"),
                              MAX_JSON_DEPTH)
    ver = obj.get("version") if isinstance(obj, dict) else None
    return obj, not (isinstance(ver, list) and len(ver) == 2 and isinstance(ver[1], int) and ver[1] > minor)


def parse_header(raw: bytes, path: str = "<header>") -> Header:
    """Decode, parse and validate header bytes (UTF-8 JSON) into a Header; FormatError when invalid."""
    obj, strict = load_json_object(raw, path, "header")
    return HeaderChecker(path, strict).header(obj)


def segment_locations(header: Header) -> list[tuple[str, Segment]]:
    """(where, segment) for every segment, in table order; `where` names the header field, e.g.
    ``tensors[0] ('enc.w').masks[1]``, for error messages."""
    out = []
    for i, t in enumerate(header.tensors):
        where = f"tensors[{i}] ({t.name!r})"
        for part in ("base", "tau", "data"):
            s = getattr(t, part)
            if s is not None:
                out.append((f"{where}.{part}", s))
        out.extend((f"{where}.masks[{j}]", s) for j, s in enumerate(t.masks))
        if t.base_item is not None:
            out.append((f"{where}.base.data", t.base_item.data))
        out.extend((f"{where}.tasks[{j}].data", it.data) for j, it in enumerate(t.task_items) if it is not None)
    return out


def check_layout(header: Header, file_size: int, header_offset: int, path: str) -> list[Segment]:
    """Segments must tile the data section: sorted by offset, each at align64(previous end)."""
    located = sorted(segment_locations(header), key=lambda ws: ws[1].offset)
    pos = PREAMBLE_SIZE
    for where, s in located:
        if s.offset != align(pos):
            what = "overlaps the previous segment" if s.offset < pos else (
                "is misaligned" if s.offset % ALIGN else "leaves a gap after the previous segment")
            raise FormatError(f"{path}: header {where}.offset: segment at offset {s.offset} {what} "
                              f"(expected offset {align(pos)})")
        pos = s.offset + s.length
        if pos > file_size:
            raise FormatError(f"{path}: header {where}.length: segment at offset {s.offset} with {s.length} "
                              f"bytes runs past the end of the file ({file_size} bytes)")
    segs = [s for _, s in located]
    if header_offset != align(pos):
        raise FormatError(f"{path}: header offset {header_offset} does not follow the last segment "
                          f"(expected {align(pos)})")
    return segs

