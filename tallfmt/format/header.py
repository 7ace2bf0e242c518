"""The header model of a .tall file and its checks (FORMAT.md §1.2, §2, §6): segments, tensor rows,
tasks, the whole header; parsing and validating header JSON; the segment layout rule.

Nothing here reads or writes files (see :mod:`tallfmt.format.container`) or does math on tensors.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterator

import xxhash

from tallfmt.errors import FormatError, LimitError
from tallfmt.format import dtypes
from tallfmt.format.codecs import CODECS, CONTEXT_CODECS, MAX_EXPANSION, Buffer, minor_of
from tallfmt.format.files import FILES_MINOR, Files, check_files
from tallfmt.format.jsonio import is_text, loads_strict_object
from tallfmt.format.residual import RESIDUAL_DTYPES, RESIDUAL_MINOR, gap_itemsize

MAGIC = b"\x89TALL\r\n\x1a"
FORMAT_NAME = "tallfmt"
#: The newest version this reader knows. A writer writes 1.1 (mask bits 0 where τ_MTL = 0, FORMAT.md
#: §4.3; ``files``, §10) unless the archive uses a feature of 1.2 that a 1.1 reader would decode wrongly
#: (``encoding.tau_dtype``, §4.2; θ0 kept outside the archive, §2.1; the ``tau-rans`` mask codec, §5.1;
#: per-task residuals, §11): :func:`header_version`.
MAJOR, MINOR = 1, 2
BASE_MINOR = 1                    # every archive this writer writes is at least 1.1
TAU_DTYPE_MINOR = 2               # encoding.tau_dtype (a τ_MTL stored in BF16)
EXTERNAL_BASE_MINOR = 2           # BASEREF in place of θ0's segments (θ0 not stored)
PREAMBLE_SIZE = 64
ALIGN = 64

# Documented limits (FORMAT.md "Limits"). A file past any of them is refused before allocating for it.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_JSON_DEPTH = 16
MAX_TASKS = 4096
MAX_TENSORS = 1_000_000
MAX_NDIM = 32
MAX_NAME_BYTES = 4096
MAX_DIM = 1 << 48                 # each dimension
MAX_TENSOR_BYTES = 1 << 48        # n × itemsize of one tensor (n = 0 when any dimension is 0)
MAX_INT = (1 << 63) - 1           # integer fields (offset, length, ...) are in [0, 2**63)
MAX_VERSION = 65535               # version numbers are u16
MAX_STATS = 256                   # keys of one task's `stats`

ROLES = ("masked", "shared", "per_task", "alias")
#: dtypes τ_MTL may be stored in (encoding.tau_dtype, FORMAT.md §4.2); F32 is lossless and the default.
TAU_DTYPES = ("F32", "BF16")
MERGE_METHODS = ("task_arithmetic", "ties")  # how τ_MTL was made (encoding.merge)
MASK_METHODS = ("tall", "magnitude")


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def checksum(data: Buffer) -> str:
    """xxh3-64 of the bytes, 16 lowercase hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


# ----------------------------------------------------------------------------------------------
# The rules a writer checks before writing and a reader checks on open (one implementation)


@dataclass(frozen=True)
class Refusal:
    """Why a name or a shape is not allowed (FORMAT.md §6). ``limit``: a documented numeric limit is
    exceeded (a reader raises LimitError), else the value is malformed (FormatError). A writer raises
    InputError with the same message, before writing anything."""

    message: str
    limit: bool = False


def name_refusal(name: Any) -> Refusal | None:
    """None for a valid task or tensor name: Unicode text of 1..4096 UTF-8 bytes.

        >>> name_refusal("enc.w") is None, name_refusal("\\ud800").limit, name_refusal("x" * 4097).limit
        (True, False, True)
    """
    if not isinstance(name, str):
        return Refusal(f"a name is a string, not a {type(name).__name__}")
    if not name:
        return Refusal(f"a name is 1..{MAX_NAME_BYTES} UTF-8 bytes; this one is empty")
    if not is_text(name):
        return Refusal("a name must be Unicode text (writable as UTF-8); this one holds an unpaired surrogate")
    if len(name) * 4 > MAX_NAME_BYTES:  # at most 4 bytes per character: only long names are encoded
        n = len(name.encode("utf-8"))
        if n > MAX_NAME_BYTES:
            return Refusal(f"a name of {n} UTF-8 bytes is over the {MAX_NAME_BYTES}-byte limit", limit=True)
    return None


def shape_refusal(shape: Sequence[Any], itemsize: int) -> Refusal | None:
    """None for a valid shape of elements of ``itemsize`` bytes: at most 32 dimensions, each an integer
    in [0, 2**48], and n × itemsize ≤ 2**48 bytes where n is the product (0 if any dimension is 0).
    The product is formed without overflow (it stops as soon as it passes the limit).

        >>> shape_refusal([2**48, 0], 4) is None, shape_refusal([2**47, 4], 1).limit
        (True, True)
    """
    if len(shape) > MAX_NDIM:
        return Refusal(f"{len(shape)} dimensions, the limit is {MAX_NDIM}", limit=True)
    for i, d in enumerate(shape):
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            return Refusal(f"dimension {i} is {d!r}, not a non-negative integer")
        if d > MAX_DIM:
            return Refusal(f"dimension {i} is {d}, over the 2**48 limit", limit=True)
    if 0 in shape:
        return None
    n = itemsize
    for d in shape:
        n *= d
        if n > MAX_TENSOR_BYTES:
            return Refusal(f"{list(shape)} × {itemsize} bytes is over the {MAX_TENSOR_BYTES}-byte (2**48) "
                           f"tensor limit", limit=True)
    return None


def topk_count(total: int, density: float) -> int:
    """k = ⌈density · total⌉ with density read as its shortest decimal representation (FORMAT.md §4.2),
    so 0.07 · 100 gives 7.

        >>> topk_count(100, 0.07), topk_count(15, 0.2), topk_count(5, 0.0)
        (7, 3, 0)
    """
    return math.ceil(Fraction(repr(float(density))) * total)


def fits_float32(x: float) -> bool:
    """Whether ``x`` rounds to a finite float32 (round to nearest even)."""
    try:
        struct.pack("<f", x)
    except OverflowError:
        return False
    return True


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
class BaseRef:
    """θ0's bytes of a tensor kept outside the archive (``encode(store_base=False)``, FORMAT.md §2.1):
    their length and XXH3-64, in place of the segment that would hold them."""

    decoded_length: int
    xxh3: str

    def to_json(self) -> dict[str, Any]:
        return {"decoded_length": self.decoded_length, "xxh3": self.xxh3}


@dataclass(frozen=True)
class Item:
    """One stored tensor value: its dtype, shape and segment (a `shared` tensor, or one copy of a `per_task`)."""

    dtype: str
    shape: tuple[int, ...]
    data: Segment | BaseRef                  # BaseRef: θ0's copy, kept outside the archive

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data.to_json()}


@dataclass(frozen=True)
class Residual:
    """One task's residual on a masked tensor (FORMAT.md §11): ``count`` entries, their positions as
    gaps and their values in ``dtype``."""

    count: int
    dtype: str
    positions: Segment
    values: Segment

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "dtype": self.dtype, "positions": self.positions.to_json(),
                "values": self.values.to_json()}


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table. Which fields are set depends on ``role`` (FORMAT.md, "Tensor table")."""

    name: str
    role: str
    dtype: str | None = None                 # masked, shared
    shape: tuple[int, ...] | None = None     # masked, shared
    base: Segment | BaseRef | None = None    # masked: θ0 in `dtype` (BaseRef: kept outside the archive)
    tau: Segment | None = None               # masked: τ_MTL in ``tau_dtype``
    masks: tuple[Segment, ...] = ()          # masked: one packed mask per task, in task order
    data: Segment | BaseRef | None = None    # shared (BaseRef: equal to θ0's, kept outside the archive)
    base_item: Item | None = None            # per_task: θ0's copy, if θ0 has the tensor
    task_items: tuple[Item | None, ...] = () # per_task: one per task (None: that task lacks it)
    target: str | None = None                # alias
    residuals: tuple[Residual | None, ...] = ()  # masked, 1.2: one per task (None: none), or () for no task
    tau_dtype: str = "F32"                   # masked: the archive's encoding.tau_dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0

    def residual(self, i: int) -> Residual | None:
        """Task i's residual on this tensor, or None."""
        return self.residuals[i] if self.residuals else None

    def segments(self) -> Iterator[Segment]:
        for s, _ in self.parts():
            yield s

    def parts(self) -> Iterator[tuple[Segment, str]]:
        """(segment, what its elements are) for every stored segment of the row: a dtype name, "mask" for
        a packed mask of ``numel`` bits, or "positions" for a residual's gaps (:func:`gap_itemsize`).
        θ0's bytes kept outside (BaseRef) are no segment."""
        for s in (self.base, self.data):
            if isinstance(s, Segment):
                yield s, self.dtype
        if self.tau is not None:
            yield self.tau, self.tau_dtype
        for m in self.masks:
            yield m, "mask"
        for r in self.residuals:
            if r is not None:
                yield r.positions, "positions"
                yield r.values, r.dtype
        for it in (self.base_item, *self.task_items):
            if it is not None and isinstance(it.data, Segment):
                yield it.data, it.dtype

    def base_refs(self) -> Iterator[tuple[BaseRef, str, tuple[int, ...]]]:
        """(reference, dtype, shape) of θ0's bytes of this row when they are kept outside the archive."""
        for s in (self.base, self.data):
            if isinstance(s, BaseRef):
                yield s, self.dtype, self.shape
        if self.base_item is not None and isinstance(self.base_item.data, BaseRef):
            yield self.base_item.data, self.base_item.dtype, self.base_item.shape

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "role": self.role}
        if self.role in ("masked", "shared"):
            out["dtype"] = self.dtype
            out["shape"] = list(self.shape or ())
        if self.role == "masked":
            out["base"] = self.base.to_json()
            out["tau"] = self.tau.to_json()
            out["masks"] = [m.to_json() for m in self.masks]
            if self.residuals:
                out["residuals"] = [r.to_json() if r is not None else None for r in self.residuals]
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
    version: tuple[int, int] = (MAJOR, BASE_MINOR)  # writers: header_version(...)
    files: Files | None = None               # 1.1: the models' non-weight files (FORMAT.md §10)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def external_base(self) -> bool:
        """Whether θ0 is kept outside the archive (some row holds a BaseRef, FORMAT.md §2.1)."""
        return any(True for t in self.tensors for _ in t.base_refs())

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

    what = "header"

    def __init__(self, path: str, strict: bool) -> None:
        self.path = path
        self.strict = strict  # unknown keys are errors unless the file's minor version is newer
        self.minor = MINOR    # the file's minor version, once read: keys and codecs of a later minor are unknown
        self.mask_codecs, self.plain_codecs = self.codecs_for(MINOR)
        self.tau_dtype, self.tau_itemsize = "F32", 4

    @staticmethod
    def codecs_for(minor: int) -> tuple[frozenset[str], frozenset[str]]:
        """The codec ids a file of this minor version may name: for masks, for every other segment."""
        known = frozenset(c for c in CODECS if minor_of(c) <= minor)
        return known, known - CONTEXT_CODECS

    def fail(self, where: str, msg: str) -> FormatError:
        return FormatError(f"{self.path}: {self.what} {where}: {msg}")

    def refuse(self, where: str, r: Refusal) -> FormatError:
        """The error for a Refusal: LimitError for a limit, else FormatError."""
        return LimitError(f"{self.path}: {self.what} {where}: {r.message}") if r.limit else self.fail(where, r.message)

    def obj(self, v: Any, where: str, required: set[str], optional: frozenset[str] = frozenset()) -> dict:
        if not isinstance(v, dict):
            raise self.fail(where, f"expected an object, got {type(v).__name__}")
        missing = required - v.keys()
        if missing:
            raise self.fail(where, f"missing key(s) {sorted(missing)}")
        if self.strict:
            extra = v.keys() - required - optional
            if extra:
                raise self.fail(where, f"unknown key(s) {sorted(extra)}")
        return v

    def free_obj(self, v: Any, where: str) -> dict:
        """An object whose keys are free (stats, metadata, weight_map)."""
        if not isinstance(v, dict):
            raise self.fail(where, f"expected an object, got {type(v).__name__}")
        return v

    def int_(self, v: Any, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(where, f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            shown = v if -10**20 < v < 10**20 else f"an integer of {len(str(abs(v)))} digits"
            raise self.fail(where, f"{shown} is outside [{lo}, {hi}]")
        return v

    def num(self, v: Any, where: str, allow_none: bool = False) -> float | None:
        """A JSON number as a double: refused unless it rounds to a finite one (1e999, a 401-digit
        integer)."""
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(where, f"expected a finite number, got {type(v).__name__}")
        try:
            x = float(v)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            raise self.fail(where, "expected a finite number, got one that does not fit a double")
        return x

    def str_(self, v: Any, where: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(v, str):
            raise self.fail(where, f"expected a string, got {type(v).__name__}")
        if choices is not None and v not in choices:
            raise self.fail(where, f"{v[:80]!r} is not one of {list(choices)}")
        return v

    def list_(self, v: Any, where: str, max_len: int) -> list:
        if not isinstance(v, list):
            raise self.fail(where, f"expected an array, got {type(v).__name__}")
        if len(v) > max_len:
            raise LimitError(f"{self.path}: {self.what} {where}: {len(v)} entries, the limit is {max_len}")
        return v

    def name(self, v: Any, where: str) -> str:
        s = self.str_(v, where)
        r = name_refusal(s)
        if r is not None:
            raise self.refuse(where, r)
        return s

    def dtype(self, v: Any, where: str, allowed: frozenset[str] | None = None) -> str:
        s = self.str_(v, where)
        if s not in dtypes.DTYPES or (allowed is not None and s not in allowed):
            raise self.fail(where, f"unknown or unsupported dtype {s[:80]!r}")
        return s

    def shape(self, v: Any, where: str, itemsize: int) -> tuple[int, ...]:
        if type(v) is list and len(v) <= MAX_NDIM and all(type(d) is int and 0 <= d <= MAX_DIM for d in v):
            shape = tuple(v)  # the common case, checked without building a message per dimension
            r = shape_refusal(shape, itemsize)
            if r is not None:
                raise self.refuse(where, r)
            return shape
        if not isinstance(v, list):
            raise self.fail(where, f"expected an array, got {type(v).__name__}")
        if len(v) > MAX_NDIM:  # before looking at the dimensions
            raise self.refuse(where, Refusal(f"{len(v)} dimensions, the limit is {MAX_NDIM}", limit=True))
        shape = tuple(self.int_(d, f"{where}[{i}]") for i, d in enumerate(v))
        r = shape_refusal(shape, itemsize)
        if r is not None:
            raise self.refuse(where, r)
        return shape

    def segment(self, v: Any, where: str, decoded_length: int, index: int | None = None, mask: bool = False
                ) -> Segment:
        """A SEGMENT object at ``where`` (``where[index]`` in a list) of ``decoded_length`` bytes; a
        context codec only for a ``mask``."""
        if type(v) is dict and (len(v) == 5 or not self.strict) and _SEGMENT_KEYS <= v.keys():
            off, ln, dl, codec, x = v["offset"], v["length"], v["decoded_length"], v["codec"], v["xxh3"]
            if (type(off) is int and type(ln) is int and type(dl) is int and type(codec) is str and type(x) is str
                    and 0 <= off <= MAX_INT and 0 <= ln <= MAX_INT and dl == decoded_length
                    and codec in (self.mask_codecs if mask else self.plain_codecs)
                    and len(x) == 16 and _HEX.issuperset(x) and (codec != "raw" or ln == dl)
                    and dl <= MAX_EXPANSION * ln + 4096):
                return Segment(off, ln, dl, codec, x)  # valid: no message built
        return self._segment(v, where if index is None else f"{where}[{index}]", decoded_length, mask)

    def _segment(self, v: Any, where: str, decoded_length: int, mask: bool) -> Segment:
        o = self.obj(v, where, _SEGMENT_KEYS)
        seg = Segment(self.int_(o["offset"], f"{where}.offset"), self.int_(o["length"], f"{where}.length"),
                      self.int_(o["decoded_length"], f"{where}.decoded_length"),
                      self.str_(o["codec"], f"{where}.codec", tuple(CODECS)), self.str_(o["xxh3"], f"{where}.xxh3"))
        if seg.codec in CONTEXT_CODECS and not mask:
            raise self.fail(f"{where}.codec", f"codec {seg.codec!r} codes masks only (its context is τ_MTL)")
        if minor_of(seg.codec) > self.minor:
            raise self.fail(f"{where}.codec", f"codec {seg.codec!r} is from version {MAJOR}.{minor_of(seg.codec)}; "
                                              f"this file says {MAJOR}.{self.minor}")
        if len(seg.xxh3) != 16 or not _HEX.issuperset(seg.xxh3):
            raise self.fail(f"{where}.xxh3", "expected 16 lowercase hex digits")
        if seg.decoded_length != decoded_length:
            raise self.fail(f"{where}.decoded_length",
                            f"{seg.decoded_length} does not match shape × dtype = {decoded_length}")
        if seg.codec == "raw" and seg.length != seg.decoded_length:
            raise self.fail(f"{where}.length", f"raw segment: stored {seg.length} != decoded {seg.decoded_length}")
        if seg.decoded_length > MAX_EXPANSION * seg.length + 4096:
            raise LimitError(f"{self.path}: {self.what} {where}: {seg.decoded_length} decoded bytes from "
                             f"{seg.length} stored is past the {MAX_EXPANSION}× expansion limit")
        return seg

    def theta0(self, v: Any, where: str, decoded_length: int) -> Segment | BaseRef:
        """Where θ0's bytes go: a SEGMENT, or from version 1.2 a BASEREF (an object without
        ``offset``: exactly ``decoded_length`` and ``xxh3``, θ0 kept outside the archive)."""
        if self.minor < EXTERNAL_BASE_MINOR or not isinstance(v, dict) or "offset" in v:
            return self.segment(v, where, decoded_length)
        o = self.obj(v, where, {"decoded_length", "xxh3"})
        dl = self.int_(o["decoded_length"], f"{where}.decoded_length")
        x = self.str_(o["xxh3"], f"{where}.xxh3")
        if len(x) != 16 or not _HEX.issuperset(x):
            raise self.fail(f"{where}.xxh3", "expected 16 lowercase hex digits")
        if dl != decoded_length:
            raise self.fail(f"{where}.decoded_length", f"{dl} does not match shape × dtype = {decoded_length}")
        return BaseRef(dl, x)

    def item(self, v: Any, where: str, theta0: bool = False) -> Item:
        o = self.obj(v, where, {"dtype", "shape", "data"})
        dt = self.dtype(o["dtype"], f"{where}.dtype")
        isz = dtypes.by_name(dt).itemsize
        shape = self.shape(o["shape"], f"{where}.shape", isz)
        read = self.theta0 if theta0 else self.segment
        return Item(dt, shape, read(o["data"], f"{where}.data", math.prod(shape) * isz))

    def tensor(self, v: Any, where: str, n_tasks: int) -> TensorEntry:
        o = self.obj(v, where, {"name", "role"}, _ROW_KEYS)
        name = self.name(o["name"], f"{where}.name")
        role = self.str_(o["role"], f"{where}.role", ROLES)
        where = f"{where} ({name[:80]!r})"
        if role == "masked":
            o = self.obj(o, where, {"name", "role", "dtype", "shape", "base", "tau", "masks"},
                         _RESIDUAL_KEY if self.minor >= RESIDUAL_MINOR else frozenset())
            dt = self.dtype(o["dtype"], f"{where}.dtype", dtypes.MASKABLE)
            isz = dtypes.by_name(dt).itemsize
            shape = self.shape(o["shape"], f"{where}.shape", isz)
            n = math.prod(shape)
            masks = self.list_(o["masks"], f"{where}.masks", MAX_TASKS)
            if len(masks) != n_tasks:
                raise self.fail(f"{where}.masks", f"{len(masks)} masks for {n_tasks} tasks")
            residuals = ()
            if "residuals" in o and self.minor >= RESIDUAL_MINOR:
                rs = self.list_(o["residuals"], f"{where}.residuals", MAX_TASKS)
                if len(rs) != n_tasks:
                    raise self.fail(f"{where}.residuals", f"{len(rs)} entries for {n_tasks} tasks")
                residuals = tuple(None if r is None else self.residual(r, f"{where}.residuals[{i}]", n)
                                  for i, r in enumerate(rs))
            return TensorEntry(name, role, dt, shape,
                               base=self.theta0(o["base"], f"{where}.base", n * isz),
                               tau=self.segment(o["tau"], f"{where}.tau", n * self.tau_itemsize),
                               masks=tuple(self.segment(m, at, (n + 7) // 8, i, True) for at in (f"{where}.masks",)
                                           for i, m in enumerate(masks)), residuals=residuals,
                               tau_dtype=self.tau_dtype)
        if role == "shared":
            o = self.obj(o, where, {"name", "role", "dtype", "shape", "data"})
            dt = self.dtype(o["dtype"], f"{where}.dtype")
            isz = dtypes.by_name(dt).itemsize
            shape = self.shape(o["shape"], f"{where}.shape", isz)
            return TensorEntry(name, role, dt, shape, data=self.theta0(o["data"], f"{where}.data",
                                                                       math.prod(shape) * isz))
        if role == "per_task":
            o = self.obj(o, where, {"name", "role", "base", "tasks"})
            items = self.list_(o["tasks"], f"{where}.tasks", MAX_TASKS)
            if len(items) != n_tasks:
                raise self.fail(f"{where}.tasks", f"{len(items)} entries for {n_tasks} tasks")
            base = None if o["base"] is None else self.item(o["base"], f"{where}.base", theta0=True)
            task_items = tuple(None if it is None else self.item(it, f"{where}.tasks[{i}]")
                               for i, it in enumerate(items))
            if base is None and all(it is None for it in task_items):
                raise self.fail(where, "a per_task tensor must be stored for θ0 or at least one task")
            return TensorEntry(name, role, base_item=base, task_items=task_items)
        o = self.obj(o, where, {"name", "role", "target"})
        return TensorEntry(name, role, target=self.name(o["target"], f"{where}.target"))

    def residual(self, v: Any, where: str, numel: int) -> Residual:
        """One task's residual on a masked tensor of ``numel`` elements (FORMAT.md §11): 1 ≤ count ≤ numel,
        a value dtype of RESIDUAL_DTYPES, segments of count × gap size and count × itemsize bytes."""
        o = self.obj(v, where, {"count", "dtype", "positions", "values"})
        count = self.int_(o["count"], f"{where}.count")
        if not 1 <= count <= numel:
            raise self.fail(f"{where}.count", f"{count} entries for a tensor of {numel} elements (1..{numel} "
                                              f"allowed; a task without entries has null)")
        dt = self.str_(o["dtype"], f"{where}.dtype", RESIDUAL_DTYPES)
        return Residual(count, dt, self.segment(o["positions"], f"{where}.positions", count * gap_itemsize(numel)),
                        self.segment(o["values"], f"{where}.values", count * dtypes.by_name(dt).itemsize))

    def method(self, v: Any, where: str, methods: tuple[str, ...], params: dict[str, frozenset[str]]) -> dict:
        """encoding.merge / encoding.mask: a method and exactly its parameters (unknown keys only in a
        newer minor version)."""
        known = frozenset().union(*params.values())
        m = self.obj(v, where, {"method"}, known)
        method = self.str_(m["method"], f"{where}.method", methods)
        wrong = (known - params[method]) & m.keys()
        if wrong:
            raise self.fail(where, f"{method} takes no parameter(s) {sorted(wrong)}")
        self.obj(m, where, {"method", *params[method]}, known)
        if "density" in params[method]:
            d = self.num(m["density"], f"{where}.density")
            if not 0 <= d <= 1:
                raise self.fail(f"{where}.density", f"{d} is outside [0, 1]")
            self.str_(m["scope"], f"{where}.scope", ("global", "per_tensor"))
        if "agg" in params[method]:
            self.str_(m["agg"], f"{where}.agg", ("sum", "mean"))
        return m

    def encoding(self, v: Any) -> dict[str, Any]:
        optional = frozenset({"tau_dtype"}) if self.minor >= TAU_DTYPE_MINOR else frozenset()
        o = self.obj(v, "encoding", {"merge", "mask", "compute_dtype", "bit_order"}, optional)
        if "tau_dtype" in optional and "tau_dtype" in o:
            self.tau_dtype = self.str_(o["tau_dtype"], "encoding.tau_dtype", TAU_DTYPES)
            self.tau_itemsize = dtypes.by_name(self.tau_dtype).itemsize
        self.str_(o["compute_dtype"], "encoding.compute_dtype", ("F32",))
        self.str_(o["bit_order"], "encoding.bit_order", ("little",))
        self.method(o["merge"], "encoding.merge", MERGE_METHODS, _MERGE_PARAMS)
        self.method(o["mask"], "encoding.mask", MASK_METHODS, _MASK_PARAMS)
        return o

    def task(self, v: Any, where: str) -> TaskEntry:
        o = self.obj(v, where, {"name", "lambda", "stats"})
        name = self.name(o["name"], f"{where}.name")
        lam = self.num(o["lambda"], f"{where}.lambda", allow_none=True)
        stats = self.free_obj(o["stats"], f"{where}.stats")
        if len(stats) > MAX_STATS:
            raise LimitError(f"{self.path}: {self.what} {where}.stats: {len(stats)} keys, the limit is {MAX_STATS}")
        for k, s in stats.items():
            if s is not None:
                self.num(s, f"{where}.stats.{k[:80]}")
        return TaskEntry(name, lam, dict(stats))

    def tasks(self, v: Any, enc: dict[str, Any]) -> tuple[TaskEntry, ...]:
        """The task list: 1..4096 tasks, unique names; λ by the mask method (TALL: every λ a number
        > 0 whose float32 rounding is finite; magnitude: every λ null)."""
        tasks = tuple(self.task(t, f"tasks[{i}]") for i, t in enumerate(self.list_(v, "tasks", MAX_TASKS)))
        if not tasks:
            raise self.fail("tasks", "an archive holds at least one task")
        if len({t.name for t in tasks}) != len(tasks):
            raise self.fail("tasks", "duplicate task names")
        tall = enc["mask"]["method"] == "tall"
        for i, t in enumerate(tasks):
            if not tall and t.lam is not None:
                raise self.fail(f"tasks[{i}].lambda", "must be null: magnitude masks have no λ")
            if tall and (t.lam is None or not t.lam > 0 or not fits_float32(t.lam)):
                raise self.fail(f"tasks[{i}].lambda", f"TALL masks need a λ > 0 whose float32 rounding is finite, "
                                                       f"got {t.lam!r}")
        return tasks

    def version(self, v: Any) -> tuple[int, int]:
        if not isinstance(v, list) or len(v) != 2:
            raise self.fail("version", "expected [major, minor], a list of two integers")
        return self.int_(v[0], "version[0]", 0, MAX_VERSION), self.int_(v[1], "version[1]", 0, MAX_VERSION)

    def metadata(self, v: Any) -> dict[str, str]:
        meta = self.free_obj(v, "metadata")
        for k, s in meta.items():
            if not isinstance(s, str):
                raise self.fail(f"metadata.{k[:80]}", "metadata values are strings")
        return meta  # freshly parsed, owned by this header: no copy of a possibly large object

    def header(self, v: Any) -> Header:
        o = self.obj(v, "", {"format", "version", "tasks", "encoding", "tensors", "metadata"}, since_1_1(v))
        if o["format"] != FORMAT_NAME:
            raise self.fail("format", f"expected {FORMAT_NAME!r}, got {str(o['format'])[:80]!r}")
        version = self.version(o["version"])
        self.minor = version[1]
        self.mask_codecs, self.plain_codecs = self.codecs_for(self.minor)
        enc = self.encoding(o["encoding"])
        tasks = self.tasks(o["tasks"], enc)
        raw = self.list_(o["tensors"], "tensors", MAX_TENSORS)
        tensors = tuple(self.tensor(t, f"tensors[{i}]", len(tasks)) for i, t in enumerate(raw))
        by_name = {}
        for t in tensors:
            if t.name in by_name:
                raise self.fail("tensors", f"duplicate tensor name {t.name[:80]!r}")
            by_name[t.name] = t
        for t in tensors:
            if t.role == "alias" and (t.target not in by_name or by_name[t.target].role == "alias"):
                raise self.fail(f"tensors ({t.name[:80]!r}).target", f"{t.target[:80]!r} is not a stored tensor")
        files = check_files(self, o["files"], len(tasks)) if "files" in o else None
        return Header(tasks, enc, tensors, self.metadata(o["metadata"]), version, files)


def version_for(files: Files | None, encoding: dict[str, Any] | None = None) -> tuple[int, int]:
    """The version a writer gives an index: 1.0, 1.1 when it holds files (an index holds no masks,
    so one without files is unchanged for 1.0 readers), 1.2 when its encoding has a ``tau_dtype``.
    Headers: :func:`header_version`."""
    if encoding is not None and "tau_dtype" in encoding:
        return (MAJOR, TAU_DTYPE_MINOR)
    return (MAJOR, FILES_MINOR if files is not None else 0)


def header_version(encoding: dict[str, Any], tensors: Sequence[TensorEntry] = ()) -> tuple[int, int]:
    """The version a writer gives a header: 1.1, or the newest minor it needs for a feature that a 1.1
    reader would decode wrongly (FORMAT.md §7) — 1.2 for ``encoding.tau_dtype`` (a 1.1 reader ignores the
    key of a newer minor and then refuses the τ segments' ``decoded_length``), a BASEREF (not a SEGMENT
    to a 1.1 reader), a ``tau-rans`` segment (an unknown codec) or a residual (a gap in the layout)."""
    need = [BASE_MINOR, *(minor_of(c) for c in {s.codec for t in tensors for s, _ in t.parts()})]
    if "tau_dtype" in encoding:
        need.append(TAU_DTYPE_MINOR)
    if any(True for t in tensors for _ in t.base_refs()):
        need.append(EXTERNAL_BASE_MINOR)
    if any(t.residuals for t in tensors):
        need.append(RESIDUAL_MINOR)
    return (MAJOR, max(need))


def since_1_1(v: Any) -> frozenset[str]:
    """The optional top-level keys of a header or index object, by its version: ``files`` from 1.1."""
    ver = v.get("version") if isinstance(v, dict) else None
    ok = isinstance(ver, list) and len(ver) == 2 and all(type(x) is int for x in ver) and ver[1] >= FILES_MINOR
    return frozenset({"files"}) if ok else frozenset()


_SEGMENT_KEYS = {"offset", "length", "decoded_length", "codec", "xxh3"}
_RESIDUAL_KEY = frozenset({"residuals"})
_ROW_KEYS = frozenset({"dtype", "shape", "base", "tau", "masks", "data", "tasks", "target", "residuals"})
_MERGE_PARAMS = {"task_arithmetic": frozenset(), "ties": frozenset({"density", "agg", "scope"})}
_MASK_PARAMS = {"tall": frozenset(), "magnitude": frozenset({"density", "scope"})}
_HEX = frozenset("0123456789abcdef")


def load_json_object(raw: bytes, path: str, what: str = "header", minor: int = MINOR,
                     trailing_whitespace: bool = False) -> tuple[Any, bool]:
    """Decode and parse a header-like JSON object by §1.2's rules (UTF-8, first byte '{', last byte '}'
    unless ``trailing_whitespace``, depth, no duplicate keys, no NaN/Infinity, Unicode strings):
    (object, strict), strict unless its ``version`` minor number is newer than ``minor``, the
    reader's. FormatError/LimitError name ``path`` and ``what``."""
    obj = loads_strict_object(raw, lambda msg: FormatError(f"{path}: {msg}"), what,
                              lambda: LimitError(f"{path}: {what} JSON nests deeper than {MAX_JSON_DEPTH} levels"),
                              MAX_JSON_DEPTH, trailing_whitespace)
    ver = obj.get("version") if isinstance(obj, dict) else None
    return obj, not (isinstance(ver, list) and len(ver) == 2 and isinstance(ver[1], int) and ver[1] > minor)


def parse_header(raw: bytes, path: str = "<header>") -> Header:
    """Decode, parse and validate header bytes (UTF-8 JSON) into a Header; FormatError when invalid."""
    obj, strict = load_json_object(raw, path, "header")
    return HeaderChecker(path, strict).header(obj)


Location = tuple[int, str, int]  # (row, part, index within the part or -1)


def segment_locations(header: Header) -> list[tuple[Location, Segment]]:
    """(location, segment) for every segment, in table order; :func:`describe` turns a location into
    the header field it names, e.g. ``tensors[0] ('enc.w').masks[1] (task 'b')``, for error messages
    (built only when one is needed: a header may hold millions of segments)."""
    out: list[tuple[Location, Segment]] = []
    for i, t in enumerate(header.tensors):
        for part in ("base", "tau", "data"):
            s = getattr(t, part)
            if isinstance(s, Segment):
                out.append(((i, part, -1), s))
        out.extend(((i, "masks", j), s) for j, s in enumerate(t.masks))
        for j, r in enumerate(t.residuals):
            if r is not None:
                out.append(((i, "residuals.positions", j), r.positions))
                out.append(((i, "residuals.values", j), r.values))
        if t.base_item is not None and isinstance(t.base_item.data, Segment):
            out.append(((i, "base.data", -1), t.base_item.data))
        out.extend(((i, "tasks", j), it.data) for j, it in enumerate(t.task_items) if it is not None)
    return out


def describe(header: Header, loc: Location) -> str:
    """The header field a segment location names."""
    i, part, j = loc
    where = f"tensors[{i}] ({header.tensors[i].name[:80]!r})"
    if part == "masks":
        return f"{where}.masks[{j}] (task {header.tasks[j].name[:80]!r})"
    if part == "tasks":
        return f"{where}.tasks[{j}].data"
    if part.startswith("residuals."):
        return f"{where}.residuals[{j}].{part[10:]} (task {header.tasks[j].name[:80]!r})"
    return f"{where}.{part}"


def check_layout(header: Header, file_size: int, header_offset: int, path: str) -> list[Segment]:
    """Segments must tile the data section: sorted by (offset, length) — a zero-length segment first
    among those at one offset — each at align64(previous end)."""
    located = sorted(segment_locations(header), key=lambda ws: (ws[1].offset, ws[1].length))
    pos = PREAMBLE_SIZE
    for loc, s in located:
        if s.offset != align(pos):
            what = "overlaps the previous segment" if s.offset < pos else (
                "is misaligned" if s.offset % ALIGN else "leaves a gap after the previous segment")
            raise FormatError(f"{path}: header {describe(header, loc)}.offset: segment at offset {s.offset} {what} "
                              f"(expected offset {align(pos)})")
        pos = s.offset + s.length
        if pos > file_size:
            raise FormatError(f"{path}: header {describe(header, loc)}.length: segment at offset {s.offset} with "
                              f"{s.length} bytes runs past the end of the file ({file_size} bytes)")
    segs = [s for _, s in located]
    if header_offset != align(pos):
        raise FormatError(f"{path}: header offset {header_offset} does not follow the last segment "
                          f"(expected {align(pos)})")
    return segs

