"""Sharded .tall archives (FORMAT.md §9): a folder of shard files plus ``tall.index.json``.

Each shard ``model-00001-of-0000N.tall`` is a complete .tall file holding some of the tensors (with
the same task list and encoding); the index maps every tensor to its shard and carries what only the
whole collection knows: the per-task statistics over all shards and the global thresholds used.

    >>> import tallfmt
    >>> tallfmt.encode("base.safetensors", {"a": "a.safetensors"}, "zoo", shards=4)   # doctest: +SKIP
    >>> with tallfmt.open("zoo") as zoo:                                              # doctest: +SKIP
    ...     sd = zoo.decode("a")

Encoding runs as map/reduce over shards. The driver plans from metadata alone (names, dtypes, shapes,
aliases) and assigns tensors to shards; each global step is a map over shards returning small
summaries (roles, histograms, statistics sums) that the driver reduces; then every shard is encoded
into a temporary file in the target folder. The driver renames the shards into place and writes the
index last, atomically. The per-shard work runs in this process (``scheduler=None``) or as tasks on a
Dask cluster (``scheduler=`` a ``dask.distributed.Client`` or a scheduler address); the files are the
same bytes either way.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import xxhash

from tallfmt import dtypes, maskmath
from tallfmt._files import umask
from tallfmt.checkpoints import _write_atomic
from tallfmt.codec import (EncodeOptions, EncodeReport, ProgressFn, _checkpoint_bytes, _find_aliases,
                           _open_encoder, _Plan, _plan_metadata, _role_summary, _write_archive)
from tallfmt.container import (MAX_TASKS, MAX_TENSORS, PREAMBLE_SIZE, ContainerReader, Header, TaskEntry,
                               TensorEntry, _Checker, load_json_object)
from tallfmt.errors import ChecksumError, FormatError, InputError, LimitError

INDEX_NAME = "tall.index.json"
INDEX_FORMAT = "tallfmt-index"
INDEX_MAJOR, INDEX_MINOR = 1, 0
MAX_SHARDS = 99_999                     # five digits in the shard file names
MAX_INDEX_BYTES = 256 * 1024 * 1024
MAX_FILE_NAME_BYTES = 255               # what common filesystems allow for one path component
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.tall")
# The index ends with its own checksum: `"checksum": "<16 hex>"` closing the top-level object.
_CHECKSUM_TAIL = re.compile(rb'"checksum"[ \t\r\n]*:[ \t\r\n]*"([0-9a-f]{16})"[ \t\r\n]*\}[ \t\r\n]*\Z')
_HEX16 = re.compile(r"[0-9a-f]{16}")


def shard_name(i: int, n: int) -> str:
    """The file name of shard ``i`` (1-based) of ``n``.

        >>> shard_name(1, 3)
        'model-00001-of-00003.tall'
    """
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
    version: tuple[int, int] = (INDEX_MAJOR, INDEX_MINOR)

    def to_json(self) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "version": list(self.version), "tasks": [t.to_json() for t in self.tasks],
                "encoding": self.encoding,
                "thresholds": {k: None if v is None else list(v) for k, v in self.thresholds.items()},
                "metadata": dict(self.metadata), "shards": [s.to_json() for s in self.shards],
                "weight_map": dict(self.weight_map)}

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


class _IndexChecker(_Checker):
    """The header checker's rules, with errors that name the index file and field."""

    def fail(self, where: str, msg: str) -> FormatError:
        return FormatError(f"{self.path}: index {where}: {msg}")

    def list_(self, v: Any, where: str, max_len: int) -> list:
        if isinstance(v, list) and len(v) > max_len:
            raise LimitError(f"{self.path}: index {where}: {len(v)} entries, the limit is {max_len}")
        return super().list_(v, where, max_len)

    def file_name(self, v: Any, where: str) -> str:
        """A plain file name inside the index's folder: no separators, not '.', '..' or the index."""
        s = self.str_(v, where)
        if (not s or s in (".", "..", INDEX_NAME) or any(c in s for c in "/\\\0")
                or len(s.encode("utf-8", "surrogatepass")) > MAX_FILE_NAME_BYTES):
            raise self.fail(where, f"{s!r} is not a plain file name inside the index's folder")
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
        o = self.obj(v, "", keys)
        if o["format"] != INDEX_FORMAT:
            raise self.fail("format", f"expected {INDEX_FORMAT!r}, got {o['format']!r}")
        ver = self.list_(o["version"], "version", 2)
        if len(ver) != 2:
            raise self.fail("version", "expected [major, minor]")
        version = (self.int_(ver[0], "version[0]", 0, 65535), self.int_(ver[1], "version[1]", 0, 65535))
        if version[0] != INDEX_MAJOR:
            raise self.fail("version", f"major version {version[0]} is not supported (this reader reads "
                                       f"{INDEX_MAJOR})")
        tasks = tuple(self.task(t, f"tasks[{i}]") for i, t in enumerate(self.list_(o["tasks"], "tasks", MAX_TASKS)))
        if not tasks:
            raise self.fail("tasks", "an archive holds at least one task")
        if len({t.name for t in tasks}) != len(tasks):
            raise self.fail("tasks", "duplicate task names")
        enc = self.encoding(o["encoding"])
        if enc["mask"]["method"] == "tall" and any(t.lam is None for t in tasks):
            raise self.fail("tasks", "TALL masks need a lambda for every task")
        th = self.obj(o["thresholds"], "thresholds", {"ties", "magnitude"})
        thresholds = {
            "ties": self.threshold_list(th["ties"], "thresholds.ties", len(tasks),
                                        enc["merge"]["method"] == "ties" and enc["merge"]["scope"] == "global",
                                        "TIES"),
            "magnitude": self.threshold_list(th["magnitude"], "thresholds.magnitude", len(tasks),
                                             enc["mask"]["method"] == "magnitude"
                                             and enc["mask"]["scope"] == "global", "magnitude mask")}
        meta = self.obj(o["metadata"], "metadata", set(), frozenset(o["metadata"]) if isinstance(o["metadata"], dict)
                        else frozenset())
        for k, s in meta.items():
            if not isinstance(s, str):
                raise self.fail(f"metadata.{k}", "metadata values are strings")
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
        wm = self.obj(o["weight_map"], "weight_map", set(), frozenset(o["weight_map"])
                      if isinstance(o["weight_map"], dict) else frozenset())
        if len(wm) > MAX_TENSORS:
            raise LimitError(f"{self.path}: index weight_map: {len(wm)} tensors, the limit is {MAX_TENSORS}")
        known, used = set(files), set()
        for name, file in wm.items():
            self.name(name, f"weight_map ({name[:80]!r})")
            if self.str_(file, f"weight_map.{name}") not in known:
                raise self.fail(f"weight_map.{name}", f"{file!r} is not a file listed in shards")
            used.add(file)
        idle = [f for f in files if f not in used]
        if idle and (wm or len(files) > 1):
            raise self.fail("shards", f"shard(s) {idle[:5]} hold no tensor (only an archive without tensors "
                                      f"has an empty shard, its only one)")
        return ShardIndex(tasks, enc, thresholds, dict(meta), tuple(shards), dict(wm), version)


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
    obj, strict = load_json_object(raw, path, "index", INDEX_MINOR)
    return _IndexChecker(path, strict).index(obj)


def read_header_xxh3(path: str | os.PathLike) -> str:
    """A .tall file's header checksum from its preamble (bytes 32..40), as 16 hex digits.

    ContainerReader checks it against the header on open, so this identifies the header cheaply.
    """
    with open(path, "rb") as f:
        pre = f.read(PREAMBLE_SIZE)
    if len(pre) < 40:
        raise FormatError(f"{path}: shorter than the {PREAMBLE_SIZE}-byte preamble")
    return f"{struct.unpack_from('<Q', pre, 32)[0]:016x}"


# ----------------------------------------------------------------------------------------------
# Opening: one file or a sharded folder, as one table of tensors


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
    checksum, tasks and λ, encoding, and the tensors the weight map gives it, in order.
    """
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
                        dict(index.metadata))
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


# ----------------------------------------------------------------------------------------------
# Assigning tensors to shards


def _plan_bytes(enc: Any, p: _Plan, n_tasks: int) -> int:
    """Stored bytes a tensor may take before compression (its share of a shard), from metadata.

    Differing floats are counted as masked (θ0 + F32 τ + a bit per task), other tensors as one copy
    (per_task: every copy), aliases as nothing.
    """
    if p.role == "alias":
        return 0
    if p.role == "per_task":
        total = 0
        for ck in (enc.base, *enc.cks):
            if p.name in ck:
                dt, shape = ck.info(p.name)
                total += math.prod(shape) * dtypes.by_name(dt).itemsize
        return total
    n = math.prod(p.shape)
    own = n * dtypes.by_name(p.dtype).itemsize
    return own + 4 * n + n_tasks * ((n + 7) // 8) if p.dtype in dtypes.MASKABLE else own


def assign_shards(plans: Sequence[_Plan], sizes: Sequence[int], *, shards: int | None = None,
                  max_shard_size: int | None = None) -> list[list[_Plan]]:
    """Split the tensors into contiguous runs of shards, keeping each alias with its target.

    ``shards=N``: min(N, groups) shards, the largest as small as it can be (binary search on the
    capacity; each shard is a contiguous run of groups, so archive order is kept). ``max_shard_size``:
    a new shard when the next group would pass it; a larger group gets a shard of its own. A group is
    a stored tensor and its aliases; inside a shard tensors keep their archive order.

        >>> ps = [_Plan(n, "masked") for n in "abcd"]
        >>> [[p.name for p in s] for s in assign_shards(ps, [4, 1, 1, 4], shards=2)]
        [['a', 'b'], ['c', 'd']]
    """
    groups: list[list[int]] = []
    group_of: dict[str, int] = {}
    for i, p in enumerate(plans):
        if p.role == "alias" and p.target in group_of:
            groups[group_of[p.target]].append(i)
        else:
            group_of[p.name] = len(groups)
            groups.append([i])
    weights = [sum(sizes[i] for i in g) for g in groups]
    if max_shard_size is not None:
        cuts = _greedy(weights, max_shard_size, 1)
    else:
        cuts = _balanced(weights, max(1, min(shards or 1, len(weights))))
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(groups)]):
        idx = sorted(i for g in groups[a:b] for i in g)
        out.append([plans[i] for i in idx])
    return out


def _greedy(weights: Sequence[int], cap: int, parts: int) -> list[int]:
    """Cut positions: start a new part when the next weight would pass ``cap``, or when the groups
    left are only just enough to give each of the ``parts`` still to fill one group."""
    cuts: list[int] = []
    size = 0
    g = len(weights)
    for i, w in enumerate(weights):
        if i > 0 and (size + w > cap or g - i <= parts - len(cuts) - 1):
            cuts.append(i)
            size = 0
        size += w
    return cuts


def _balanced(weights: Sequence[int], n: int) -> list[int]:
    """n contiguous parts minimising the largest part's weight (binary search on the capacity)."""
    lo, hi = max(weights, default=0), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_greedy(weights, mid, 1)) + 1 <= n:
            hi = mid
        else:
            lo = mid + 1
    return _greedy(weights, lo, n)


# ----------------------------------------------------------------------------------------------
# Per-shard work (runs in this process or on a Dask worker)


@dataclass(frozen=True)
class ShardJob:
    """What one shard's tasks need: the checkpoint sources, the options and the shard's tensor plans.

    Everything a shard's bytes depend on is here: the math is element-wise float32 and the statistics
    are sequential float64 sums (FORMAT.md §4.4), so a shard is the same file on any worker.
    """

    base: Any
    tasks: tuple[tuple[str, Any], ...]
    options: EncodeOptions
    plans: tuple[_Plan, ...]


@dataclass
class ShardResult:
    """What encoding one shard returns to the driver: the file, its identity and its statistics."""

    path: str
    size: int
    header_xxh3: str
    stats: list[maskmath.TaskStats]
    roles: dict[str, int]
    role_bytes: dict[str, int]
    params: dict[str, int]


@contextmanager
def _job(job: ShardJob) -> Iterator[tuple[Any, list[_Plan]]]:
    """Open the job's checkpoints; yield (encoder, plans). The plans are copies: a job never changes
    the driver's objects, in this process as on a cluster."""
    with _open_encoder(job.base, dict(job.tasks), job.options) as enc:
        yield enc, [replace(p) for p in job.plans]


def shard_roles(job: ShardJob) -> list[str]:
    """Map step 1: the role of each of the shard's tensors (reads the bytes of `common` ones)."""
    with _job(job) as (enc, plans):
        enc.decide_roles(plans)
        return [p.role for p in plans]


def shard_histograms(job: ShardJob, templates: list[list[maskmath.TopKThreshold]], method: str
                     ) -> list[list[maskmath.TopKThreshold]]:
    """Map steps 2 and 3: the shard's |τ_t| histograms (``method`` "update_hi" or "update_lo"), in
    fresh forks of ``templates`` (one list of per-task accumulators per global selection, in the
    current pass); the driver merges them."""
    if method not in ("update_hi", "update_lo"):
        raise InputError(f"method must be 'update_hi' or 'update_lo', got {method!r}")
    forks = [[s.fork() for s in sel] for sel in templates]  # never the caller's objects
    with _job(job) as (enc, plans):
        for p in plans:
            if p.role == "masked":
                for sel in forks:
                    enc._sweep_tensor(p.name, sel, method)
    return forks


def encode_shard(job: ShardJob, ties_thr: torch.Tensor | None, mag_thr: torch.Tensor | None,
                 path: str) -> ShardResult:
    """Final step: write the shard as a complete .tall file at ``path`` (a temporary name the driver
    renames). Roles not decided yet are decided here (encodes without global thresholds)."""
    with _job(job) as (enc, plans):
        enc.decide_roles(plans)
        ties = ties_thr.to(enc.device) if ties_thr is not None else None
        mag = mag_thr.to(enc.device) if mag_thr is not None else None
        final, entries, _ = _write_archive(enc, plans, path, ties, mag, job.options, True, None)
        stats = enc.stats
    roles, role_bytes, params = _role_summary(entries)
    return ShardResult(str(final), final.stat().st_size, read_header_xxh3(final), stats, roles, role_bytes, params)


# ----------------------------------------------------------------------------------------------
# Running the per-shard work: in this process, or on Dask


class _LocalRunner:
    """Runs each shard's task in this process, one after the other."""

    def map(self, phase: str, fn: Callable[..., Any], calls: list[tuple], on_done: Callable[[int, Any], None]
            | None = None) -> list[Any]:
        out = []
        for i, args in enumerate(calls):
            out.append(fn(*args))
            if on_done is not None:
                on_done(i, out[-1])
        return out

    def close(self) -> None:
        pass


class _DaskRunner:
    """Submits each shard's task to a Dask cluster; a failed task is retried ``retries`` times (a task
    whose worker dies is rescheduled by the scheduler itself)."""

    def __init__(self, scheduler: Any, retries: int, run: str) -> None:
        try:
            from distributed import Client
        except ImportError:
            raise InputError("scheduler= needs Dask: pip install 'tallfmt[dask]'") from None
        if isinstance(scheduler, str):
            try:
                self.client, self.owned = Client(scheduler, set_as_default=False), True
            except (OSError, TimeoutError) as exc:
                raise InputError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}") from None
        elif isinstance(scheduler, Client):
            self.client, self.owned = scheduler, False
        else:
            raise InputError(f"scheduler must be a dask.distributed.Client or a scheduler address, "
                             f"got {type(scheduler).__name__}")
        self.retries, self.run = retries, run

    def map(self, phase: str, fn: Callable[..., Any], calls: list[tuple], on_done: Callable[[int, Any], None]
            | None = None) -> list[Any]:
        from distributed import as_completed

        futures = [self.client.submit(fn, *args, key=f"tallfmt-{phase}-{i:05d}-{self.run}",
                                      retries=self.retries, pure=False) for i, args in enumerate(calls)]
        where = {f.key: i for i, f in enumerate(futures)}
        out: list[Any] = [None] * len(futures)
        try:
            for fut in as_completed(futures):
                i = where[fut.key]
                out[i] = fut.result()
                if on_done is not None:
                    on_done(i, out[i])
        except BaseException:
            self.client.cancel(futures)
            raise
        return out

    def workers(self) -> int:
        """Threads in the cluster (the default number of shards)."""
        return max(1, sum(self.client.nthreads().values()))

    def close(self) -> None:
        if self.owned:
            self.client.close()


# ----------------------------------------------------------------------------------------------
# The driver


def _check_count(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise InputError(f"{name} must be an integer in [{lo}, {hi if hi is not None else '∞'}], got {v!r}")
    return v


def _source(src: Any, what: str, remote: bool) -> Any:
    if isinstance(src, Mapping):
        if remote:
            raise InputError(f"{what}: an in-memory {{name: tensor}} mapping cannot be sent to a Dask cluster; "
                             f"save it (e.g. safetensors) where every worker can read it and pass the path")
        return src
    if isinstance(src, (str, os.PathLike)):
        # absolute, so that workers with another working directory find the same file
        return str(Path(src).absolute()) if remote else src
    return src  # open_checkpoint names what is wrong with it


def encode_sharded(base: Any, tasks: Mapping[str, Any], path: str | os.PathLike, opts: EncodeOptions, *,
                   shards: int | None = None, max_shard_size: int | None = None, scheduler: Any = None,
                   retries: int = 3, overwrite: bool = True, progress: ProgressFn | None = None) -> EncodeReport:
    """Encode into the folder ``path``: shard files and ``tall.index.json``. Called by
    ``tallfmt.encode(..., shards=N | max_shard_size=B [, scheduler=...])``, which checked ``opts``.

    ``shards=N`` gives N shards, fewer when there are fewer tensors (an alias counts with its
    target); it defaults to the cluster's thread count with a scheduler, else 1. ``max_shard_size``
    cuts by the stored size before compression (a larger tensor gets a shard of its own). The index
    is written last; an encode that fails leaves no index and removes its temporary shard files.

        >>> encode_sharded("base.safetensors", {"a": "a.safetensors"}, "zoo",
        ...                EncodeOptions.check(task_names=["a"]), shards=2)        # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if shards is not None and max_shard_size is not None:
        raise InputError("pass shards= or max_shard_size=, not both")
    if shards is not None:
        _check_count("shards", shards, 1, MAX_SHARDS)
    if max_shard_size is not None:
        _check_count("max_shard_size", max_shard_size, 1)
    _check_count("retries", retries, 0)
    remote = scheduler is not None
    base_src = _source(base, "base", remote)
    task_srcs = tuple((t, _source(tasks[t], f"task {t!r}", remote)) for t in tasks)
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder (a sharded archive is a folder)")
    if not overwrite and (folder / INDEX_NAME).exists():
        raise InputError(f"{folder / INDEX_NAME}: already exists (pass overwrite=True / --force to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:12]
    runner: _LocalRunner | _DaskRunner = _DaskRunner(scheduler, retries, run) if remote else _LocalRunner()
    try:
        if shards is None and max_shard_size is None:
            shards = runner.workers() if isinstance(runner, _DaskRunner) else 1
        return _drive(runner, base_src, task_srcs, folder, opts, shards, max_shard_size, run, progress, t0)
    finally:
        runner.close()
        # our temporary shards after a failure; after a success, what a killed worker left half written
        for p in folder.glob(f".*{run}*"):
            p.unlink(missing_ok=True)


def _drive(runner: Any, base: Any, tasks: tuple[tuple[str, Any], ...], folder: Path, opts: EncodeOptions,
           shards: int | None, max_shard_size: int | None, run: str, progress: ProgressFn | None,
           t0: float) -> EncodeReport:
    task_names = [t for t, _ in tasks]
    # 1. plan on the driver, from metadata only
    with _open_encoder(base, dict(tasks), opts) as enc:
        plans = _plan_metadata(enc.base, enc.cks, task_names, opts.mismatch)
        _find_aliases(plans, enc.base, enc.cks)
        sizes = [_plan_bytes(enc, p, len(task_names)) for p in plans]
        input_bytes = sum(_checkpoint_bytes(ck) for ck in (enc.base, *enc.cks))
    groups = assign_shards(plans, sizes, shards=shards, max_shard_size=max_shard_size)
    jobs = [ShardJob(base, tasks, opts, tuple(g)) for g in groups]

    # 2. global thresholds: roles, then the two histogram passes, each a map over shards + a reduce
    thresholds: dict[str, tuple[float | None, ...] | None] = {"ties": None, "magnitude": None}
    ties_thr = mag_thr = None
    if opts.global_ties or opts.global_magnitude:
        roles = runner.map("roles", shard_roles, [(j,) for j in jobs])
        jobs = [replace(j, plans=tuple(replace(p, role=r) for p, r in zip(j.plans, rs))) for j, rs in zip(jobs, roles)]
        total = sum(math.prod(p.shape) for j in jobs for p in j.plans if p.role == "masked")
        densities = ([("ties", opts.ties_density)] if opts.global_ties else []) + (
            [("magnitude", opts.mask_density)] if opts.global_magnitude else [])
        # histograms travel and add up on the CPU; counts are integers, so the sum is exact
        sels = [[maskmath.TopKThreshold(total, d, device="cpu") for _ in task_names] for _, d in densities]
        for method, finish in (("update_hi", "finish_hi"), ("update_lo", "finish_lo")):
            forks = [[s.fork() for s in sel] for sel in sels]
            for part in runner.map(method, shard_histograms, [(j, forks, method) for j in jobs]):
                for sel, got in zip(sels, part):
                    for s, f in zip(sel, got):
                        s.merge(f)
            for sel in sels:
                for s in sel:
                    getattr(s, finish)()
        for (what, _), sel in zip(densities, sels):
            thresholds[what] = tuple(None if s.k == 0 else s.threshold for s in sel)
            thr = torch.tensor([s.threshold for s in sel], dtype=torch.float32)
            ties_thr, mag_thr = (thr, mag_thr) if what == "ties" else (ties_thr, thr)

    # 3. encode every shard into a temporary name in the folder
    names = [shard_name(i + 1, len(jobs)) for i in range(len(jobs))]
    tmps = [str(folder / f".{n}.{run}.part") for n in names]

    def done(i: int, _: ShardResult) -> None:
        if progress is not None:
            progress(len(jobs[i].plans))

    results: list[ShardResult] = runner.map("encode", encode_shard,
                                            [(j, ties_thr, mag_thr, t) for j, t in zip(jobs, tmps)], done)

    # 4. commit: no index while shards are replaced, shards into place, stale shards out, index last
    index_path = folder / INDEX_NAME
    index_path.unlink(missing_ok=True)
    for r, n in zip(results, names):
        os.replace(r.path, folder / n)
    for p in folder.iterdir():
        if SHARD_RE.fullmatch(p.name) and p.name not in names:
            p.unlink(missing_ok=True)
    stats = [maskmath.TaskStats() for _ in task_names]
    for r in results:
        for mine, theirs in zip(stats, r.stats):
            mine.merge(theirs)
    task_entries = tuple(TaskEntry(t, opts.lambdas.get(t), stats[i].result()) for i, t in enumerate(task_names))
    index = ShardIndex(task_entries, opts.encoding(), thresholds, dict(opts.metadata),
                       tuple(ShardInfo(n, r.size, r.header_xxh3) for n, r in zip(names, results)),
                       _weight_map(plans, names, jobs))
    raw = index.to_bytes()
    _write_atomic(index_path, raw)  # temp file + fsync + rename + folder fsync (FORMAT.md §8)
    os.chmod(index_path, 0o666 & ~umask())  # mkstemp made it 0600; the shards have the usual mode

    roles_all: dict[str, int] = {}
    role_bytes: dict[str, int] = {}
    params: dict[str, int] = {}
    for r in results:
        for mine, theirs in ((roles_all, r.roles), (role_bytes, r.role_bytes), (params, r.params)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
    return EncodeReport(folder, task_names, roles_all, role_bytes, params, input_bytes,
                        sum(r.size for r in results) + len(raw),
                        {t.name: dict(t.stats) for t in task_entries}, time.perf_counter() - t0)


def _weight_map(plans: list[_Plan], names: list[str], jobs: list[ShardJob]) -> dict[str, str]:
    """{tensor: shard file} in archive order (the plan's order)."""
    where = {p.name: n for n, j in zip(names, jobs) for p in j.plans}
    return {p.name: where[p.name] for p in plans}
