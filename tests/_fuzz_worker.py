"""Corruption fuzzing of .tall archives (issue 6, item 1): the archives, the mutations, the oracle, a worker.

A case is (seed, case number): it picks one of the archives (small single files with every role, the
golden files, and one sharded archive: a folder of shards and tall.index.json), damages a copy of it in
one seeded way (bit flips, overwritten bytes, truncation, appended bytes, preamble fields, header JSON
edits and raw text edits, a segment's bytes; for the sharded archive the same on one shard, or the index
flipped, truncated, extended or edited and resealed), and runs every read operation on it: ``open``, ``decode`` of every task, ``merge`` with each method, ``mask`` of
every masked tensor for every task, ``agreement`` and ``verify``. Each operation must either raise
``tallfmt.FormatError`` (or a subclass) or return exactly what it returns on the undamaged archive.

Mutations whose header checksum was recomputed ("forged") can make a *valid* archive that says something
else (two mask segments swapped, a tensor reshaped, a segment's bytes changed together with its xxh3):
checksums are not signatures. When a forged file opens and its header differs from the original in
anything the outputs depend on, the oracle checks instead that every output is what the forged header
declares (names, dtypes, shapes, the agreement total) and that nothing but FormatError is raised.
In every case: if ``verify`` passes, no other operation may raise.

Batches run in a subprocess (``python tests/_fuzz_worker.py SPEC.json``) so that a crash in native code
(numba kernels, zstd) or a hang fails the run with its seed and case rather than killing it. The worker
writes the case it is on to ``SPEC["progress"]`` and prints one JSON report on stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
import traceback
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tallcraft as tc  # noqa: E402

MERGES: list[tuple[str, dict[str, Any]]] = [
    ("zeroshot", {}), ("task_arithmetic", {"alpha": 0.4}),
    ("consensus", {"k": 1, "alpha": 0.7}), ("consensus", {"k": 2, "alpha": 1.0}),
]
KINDS = [("flip", 25), ("bytes", 5), ("truncate", 8), ("append", 5), ("preamble", 5), ("json", 30),
         ("text", 10), ("segdata", 12)]
DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
               "F8_E4M3", "F8_E5M2", "F128", "f32", ""]
CODEC_NAMES = ["raw", "zstd", "byteplane-zstd", "lz4", "ZSTD", "", "tau-rans"]  # tau-rans: masks only


# ----------------------------------------------------------------------------------------------
# The archives: small, several tasks, every role and dtype path


def make_zoo(kind: str, seed: int = 0) -> tuple[dict, dict, dict]:
    """(base state dict, {task: state dict}, encode kwargs) of a small synthetic zoo."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    emb = rnd(6, 4)
    base = {"emb": emb, "lm_head": emb, "w32": rnd(5, 3), "w16": rnd(9).half(), "wbf": rnd(2, 3).bfloat16(),
            "frozen": torch.arange(4.0), "buf": torch.arange(3), "scalar": torch.tensor(1.5),
            "empty": torch.zeros(0, 3), "f64": rnd(2).double()}
    names = {"tall3": ["a", "b", "c"], "ties_raw": ["x", "y"], "mismatch": ["p", "q", "r"],
             "single": ["only"]}[kind]
    tasks: dict[str, dict] = {}
    for i, t in enumerate(names):
        e = emb + 0.05 * rnd(6, 4)
        sd = {}
        for k, v in base.items():
            if k in ("emb", "lm_head"):
                sd[k] = e
            elif k == "frozen":
                sd[k] = v.clone()
            elif k == "buf":
                sd[k] = v + i
            elif v.is_floating_point() and v.numel():
                sd[k] = (v.double() + 0.05 * rnd(*v.shape).double()).to(v.dtype)
            else:
                sd[k] = v.clone()
        if kind == "mismatch":
            sd["head"] = rnd(i + 1, 4)           # a classification head of another shape per task
            if i == 1:
                del sd["f64"]                    # a task without this tensor
        tasks[t] = sd
    kw: dict[str, Any] = {"lambdas": {t: 0.2 + 0.2 * i for i, t in enumerate(names)}}
    if kind == "ties_raw":
        kw = {"merge": "ties", "ties_density": 0.5, "mask_method": "magnitude", "mask_density": 0.3,
              "mask_scope": "per_tensor", "codec": "raw"}
    elif kind == "mismatch":
        kw.update(mismatch="per_task", codec="zstd")
    return base, tasks, kw


ZOO_KINDS = ("tall3", "ties_raw", "mismatch", "single")


def build_archives(folder: str | Path, *, golden: bool = True) -> list[Path]:
    """Encode the fuzz corpus into ``folder`` (and add the golden files of spec/golden)."""
    import tallfmt

    folder = Path(folder)
    out = []
    for kind in ZOO_KINDS:
        base, tasks, kw = make_zoo(kind)
        out.append(tallfmt.encode(base, tasks, folder / f"{kind}.tall", **kw).path)
    base, tasks, kw = make_zoo("tall3", seed=1)  # a sharded archive: a folder of 3 shards and an index
    out.append(tallfmt.encode(base, tasks, folder / "sharded", shards=3, **kw).path)
    if golden:
        out += sorted((Path(__file__).resolve().parents[1] / "spec" / "golden").glob("*.tall"))
    return out


# ----------------------------------------------------------------------------------------------
# Running every read operation on a file


def tensor_digest(t: Any) -> tuple[str, tuple[int, ...], str]:
    from tallfmt.compute.tensors import from_torch, to_numpy
    arr = to_numpy(t)
    return from_torch(t.dtype).name, tuple(t.shape), hashlib.sha256(arr.tobytes()).hexdigest()[:20]


def state_digest(sd: dict) -> list[tuple[str, tuple[str, tuple[int, ...], str]]]:
    return [(k, tensor_digest(v)) for k, v in sd.items()]


def _declared(header: Any, i: int | None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) a decode of task i (None: θ0, as merges use) must return, per the header."""
    by = {t.name: t for t in header.tensors}
    out = []
    for e in header.tensors:
        r = by[e.target] if e.role == "alias" else e
        if r.role == "per_task":
            it = r.base_item if i is None else r.task_items[i]
            if it is not None:
                out.append((e.name, it.dtype, tuple(it.shape)))
        else:
            out.append((e.name, r.dtype, tuple(r.shape)))
    return out


def operations(zoo: Any) -> list[tuple[str, Callable[[], Any], Callable[[Any], str | None]]]:
    """(op id, call, check) for every read operation; `check(result)` says what is inconsistent with the
    archive's own header (None when the result is what the header declares)."""
    import torch

    h = zoo.header
    ops: list[tuple[str, Callable[[], Any], Callable[[Any], str | None]]] = []

    def shape_check(want: list) -> Callable[[Any], str | None]:
        def check(sd: dict) -> str | None:
            got = [(k, tensor_digest(v)[0], tuple(v.shape)) for k, v in sd.items()]
            return None if got == want else f"declared {want}, got {got}"
        return check

    # an archive without θ0 (FORMAT.md §2.1, opened without a base) refuses decodes and merges by design
    with_theta0 = not h.external_base
    for i, task in enumerate(zoo.tasks if with_theta0 else ()):
        ops.append((f"decode[{i}]", lambda task=task: zoo.decode(task), shape_check(_declared(h, i))))
    for method, params in MERGES if with_theta0 else ():
        ops.append((f"merge:{method}:{params}", lambda m=method, p=params: zoo.merge(m, **p),
                    shape_check(_declared(h, None))))
    by = {t.name: t for t in h.tensors}
    masked = [e for e in h.tensors if (by[e.target] if e.role == "alias" else e).role == "masked"]
    for i, task in enumerate(zoo.tasks):
        for e in masked:
            r = by[e.target] if e.role == "alias" else e

            def mask_check(m: Any, r: Any = r) -> str | None:
                ok = m.dtype == torch.bool and tuple(m.shape) == tuple(r.shape)
                return None if ok else f"mask {m.dtype} {tuple(m.shape)}, declared {r.shape}"
            ops.append((f"mask[{i}]:{e.name}", lambda t=task, n=e.name: zoo.mask(t, n), mask_check))
    total = sum(e.numel for e in h.tensors if e.role == "masked")

    def agreement_check(a: Any) -> str | None:
        ok = a.dtype == torch.int64 and tuple(a.shape) == (len(h.tasks) + 1,) and int(a.sum()) == total
        return None if ok else f"agreement {a.dtype} {tuple(a.shape)} sum {int(a.sum())}, {total} masked"
    ops.append(("agreement", zoo.agreement, agreement_check))
    ops.append(("verify", zoo.verify, lambda r: None if r is None else f"verify returned {r!r}"))
    return ops


def summarise(value: Any) -> Any:
    if isinstance(value, dict):
        return state_digest(value)
    if value is None:
        return None
    return tensor_digest(value)


def run_file(path: Path) -> tuple[dict[str, tuple[str, Any]], Any]:
    """{op: ("ok", digest) | ("E", error class) | ("crash", traceback) | ("bad", why)} and the header."""
    import tallfmt
    from tallfmt import FormatError

    out: dict[str, tuple[str, Any]] = {}
    try:
        zoo = tallfmt.open(path)
    except FormatError as exc:
        out["open"] = ("E", _error_class(exc, path))
        return out, None
    except BaseException:  # noqa: BLE001 - anything else is what the fuzzer looks for
        out["open"] = ("crash", traceback.format_exc(limit=6))
        return out, None
    out["open"] = ("ok", None)
    with zoo:
        header = zoo.header
        for op, call, check in operations(zoo):
            try:
                value = call()
            except FormatError as exc:
                out[op] = ("E", _error_class(exc, path))
                continue
            except BaseException:  # noqa: BLE001
                out[op] = ("crash", traceback.format_exc(limit=8))
                continue
            why = check(value)
            out[op] = ("bad", why) if why else ("ok", summarise(value))
            del value
    return out, header


def _error_class(exc: Exception, path: Path) -> str:
    # every FormatError must name the file
    return type(exc).__name__ if str(path) in str(exc) else f"{type(exc).__name__} (message lacks the path)"


def _relevant(header: Any) -> Any:
    """What outputs depend on: task order and the tensor table (segments with their checksums)."""
    return (tuple(header.task_names), header.tensors) if header is not None else None


def judge(result: dict[str, tuple[str, Any]], header: Any, ref: dict[str, tuple[str, Any]], ref_header: Any,
          forged: bool, damaged: bool = False) -> list[str]:
    """Problems with one case's results (empty: the case passed). `damaged`: bytes changed without
    recomputing any checksum, which FORMAT.md promises that open or verify detects."""
    problems = []
    if damaged and not forged and "E" not in (result["open"][0], result.get("verify", ("",))[0]):
        problems.append("damage went undetected: open and verify both passed")
    strict = not forged or header is None or _relevant(header) == _relevant(ref_header)
    for op, (status, value) in result.items():
        if status == "crash":
            problems.append(f"{op}: crashed\n{value}")
        elif status == "bad":
            problems.append(f"{op}: output inconsistent with the header: {value}")
        elif status == "E" and "lacks the path" in value:
            problems.append(f"{op}: {value}")
        elif status == "ok" and strict and ref.get(op) != (status, value):
            problems.append(f"{op}: output differs from the undamaged archive's")
    if strict and header is not None and set(result) != set(ref):
        problems.append(f"operations differ: {sorted(set(result) ^ set(ref))}")
    if result.get("verify", ("",))[0] == "ok":
        raised = [op for op, (s, _) in result.items() if s == "E"]
        if raised:
            problems.append(f"verify passed but {raised} raised FormatError")
    return problems


# ----------------------------------------------------------------------------------------------
# Mutations


class Corpus:
    """One archive's pristine bytes and parsed parts; a sharded archive (a folder): its files, and a
    Corpus per shard."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self.raw = {p.name: p.read_bytes() for p in sorted(self.path.iterdir())}
            self.shards = {n: Corpus(self.path / n) for n in self.raw if n.endswith(".tall")}
            return
        self.raw = self.path.read_bytes()
        self.parts = tc.split(self.path)
        self.header = self.parts.header_json()
        self.segments = tc.segments(self.header)
        self.boundaries = tc.segment_boundaries(self.path)


def _weighted(rng: random.Random, table: list[tuple[str, int]]) -> str:
    return rng.choices([k for k, _ in table], weights=[w for _, w in table])[0]


def _int_variant(rng: random.Random, v: Any) -> Any:
    v0 = v if isinstance(v, int) and not isinstance(v, bool) else 0
    return rng.choice([v0 + 1, v0 - 1, v0 + 64, v0 - 64, v0 * 2, 0, -1, 1, 2**31, 2**48, 2**63, 2**64, 2**70,
                       rng.randrange(0, 1 << 16), float(v0), v0 + 0.5, str(v0), None, True, [v0]])


def _random_json(rng: random.Random) -> Any:
    return rng.choice([None, True, False, 0, -1, 1.5, 2**64, 1e308, "", "x", "F32", "masked", [], {}, [1], {"a": 1},
                       "a" * 5000])


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _tamper_json(rng: random.Random, h: dict, c: Corpus) -> str:
    """Change the parsed header in place; returns what was done."""
    what = _weighted(rng, [("segfield", 30), ("shape", 15), ("dtype", 8), ("codec", 6), ("role", 4), ("tasks", 8),
                           ("swap", 8), ("alias", 3), ("node", 12), ("delete", 4), ("add", 2), ("top", 3)])
    segs = tc.segments(h)
    tensors = h["tensors"]
    if what == "segfield" and segs:
        where, s = rng.choice(segs)
        key = rng.choice(["offset", "length", "decoded_length", "codec", "xxh3"])
        if key == "codec":
            s[key] = rng.choice(CODEC_NAMES)
        elif key == "xxh3":
            s[key] = rng.choice(["0" * 16, s[key][::-1], s[key].upper(), s[key][:15], rng.choice(segs)[1]["xxh3"]])
        else:
            s[key] = _int_variant(rng, s[key]) if rng.random() < 0.8 else rng.choice(segs)[1][key]
        return f"{where}.{key} = {str(s[key])[:40]}"
    if what in ("shape", "dtype"):
        items = [(f"tensors[{i}]", t) for i, t in enumerate(tensors) if "shape" in t]
        items += [(f"tensors[{i}].{k}", it) for i, t in enumerate(tensors) for k, it in
                  [("base", t.get("base"))] + [(f"tasks[{j}]", x) for j, x in enumerate(t.get("tasks") or [])]
                  if isinstance(it, dict) and "shape" in it]
        if not items:
            return "no shapes"
        where, t = rng.choice(items)
        shape = list(t["shape"])
        if what == "shape":
            n = 1
            for d in shape:
                n *= d
            op = rng.choice(["dim", "add1", "drop", "reverse", "flatten", "huge", "neg", "float", "many"])
            if op == "dim" and shape:
                shape[rng.randrange(len(shape))] = _int_variant(rng, rng.choice(shape))
            elif op == "add1":
                shape.insert(rng.randrange(len(shape) + 1), 1)
            elif op == "drop" and shape:
                shape.pop(rng.randrange(len(shape)))
            elif op == "reverse":
                shape = shape[::-1]
            elif op == "flatten":
                shape = [n]
            elif op == "huge":
                shape = [2**40, 2**40] if rng.random() < 0.5 else [2**24] * 3
            elif op == "neg":
                shape = [-n] if n else [-1]
            elif op == "float":
                shape = [float(d) for d in shape] or [1.0]
            else:
                shape = [1] * rng.choice([32, 33, 1000])
            t["shape"] = shape
        else:
            t["dtype"] = rng.choice(DTYPE_NAMES)
        if rng.random() < 0.5:  # keep decoded lengths consistent with the new shape/dtype, to go deeper
            _fix_lengths(t)
        return f"{where} {what} -> {str(t.get('shape'))[:40]} {t.get('dtype')}"
    if what == "codec" and segs:
        where, s = rng.choice(segs)
        s["codec"] = rng.choice(CODEC_NAMES[:3])
        return f"{where}.codec = {s['codec']}"
    if what == "role":
        i = rng.randrange(len(tensors))
        tensors[i]["role"] = rng.choice(["masked", "shared", "per_task", "alias", "frozen"])
        return f"tensors[{i}].role = {tensors[i]['role']}"
    if what == "tasks":
        op = rng.choice(["drop", "dup", "swap", "rename", "add", "empty", "dropmask", "dupmask"])
        tasks = h["tasks"]
        if op == "drop" and tasks:
            tasks.pop(rng.randrange(len(tasks)))
        elif op == "dup" and tasks:
            tasks.append(dict(rng.choice(tasks)))
        elif op == "swap" and len(tasks) > 1:
            i, j = rng.sample(range(len(tasks)), 2)
            tasks[i], tasks[j] = tasks[j], tasks[i]
        elif op == "rename" and tasks:
            rng.choice(tasks)["name"] = rng.choice(["", "zz", tasks[0]["name"], "é" * 3000])
        elif op == "add":
            tasks.append({"name": "new", "lambda": 0.5, "stats": {}})
        elif op == "empty":
            h["tasks"] = []
        else:
            with_masks = [t for t in tensors if t.get("masks")]
            if with_masks:
                m = rng.choice(with_masks)["masks"]
                m.pop() if op == "dropmask" else m.append(rng.choice(m))
        return f"tasks {op}"
    if what == "swap" and len(segs) > 1:  # two whole segment objects trade places (tiling still holds)
        (w1, s1), (w2, s2) = rng.sample(segs, 2)
        a, b = dict(s1), dict(s2)
        s1.clear(), s1.update(b), s2.clear(), s2.update(a)
        return f"swap {w1} <-> {w2}"
    if what == "alias":
        aliases = [t for t in tensors if t["role"] == "alias"]
        if aliases:
            t = rng.choice(aliases)
            t["target"] = rng.choice([x["name"] for x in tensors] + ["missing"])
            return f"alias {t['name']} -> {t['target']}"
        return "no alias"
    paths = _paths(h)
    if what == "node":
        p = rng.choice(paths)
        parent = _get(h, p[:-1])
        parent[p[-1]] = _random_json(rng) if rng.random() < 0.6 else _int_variant(rng, parent[p[-1]])
        return f"node {p} = {str(parent[p[-1]])[:40]}"
    if what == "delete":
        p = rng.choice(paths)
        parent = _get(h, p[:-1])
        del parent[p[-1]]
        return f"delete {p}"
    if what == "add":
        dicts = [p for p in paths if isinstance(_get(h, p), dict)] + [()]
        _get(h, rng.choice(dicts))["zz_extra"] = 1
        return "add key"
    key = rng.choice(["format", "version", "encoding", "metadata"])
    h[key] = rng.choice([_random_json(rng), [1, 1], [2, 0], [1], "tallfmt", {"merge": {"method": "ties"}}])
    return f"top {key}"


def _fix_lengths(t: dict) -> None:
    from tallfmt.format import dtypes
    shape, dt = t.get("shape"), t.get("dtype")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape) or dt not in dtypes.DTYPES:
        return
    n = 1
    for d in shape:
        n *= d
    isz = dtypes.by_name(dt).itemsize
    for key in ("base", "data"):
        if isinstance(t.get(key), dict) and "decoded_length" in t[key]:
            t[key]["decoded_length"] = n * isz
    if isinstance(t.get("tau"), dict):
        t["tau"]["decoded_length"] = 4 * n
    for m in t.get("masks") or []:
        if isinstance(m, dict):
            m["decoded_length"] = (n + 7) // 8


def _text_edit(rng: random.Random, text: bytes) -> tuple[bytes, str]:
    b = bytearray(text)
    pos = rng.randrange(len(b))
    op = rng.choice(["delete", "insert", "replace", "dup", "digit"])
    if op == "delete":
        n = rng.randint(1, 8)
        del b[pos:pos + n]
    elif op == "insert":
        b[pos:pos] = rng.choice([b"{", b"}", b"[", b"]", b'"', b",", b":", b"0", b"-", b".", b"e9", b" ", b"\\",
                                 b"\xff", b"\xc3", b"NaN", b'"a":1,', b"null", b"\\ud800", b"\\u0000"])
    elif op == "replace":
        b[pos] = rng.randrange(256)
    elif op == "dup":
        n = rng.randint(1, 40)
        b[pos:pos] = b[pos:pos + n]
    else:
        digits = [i for i, ch in enumerate(b) if 48 <= ch <= 57]
        if digits:
            pos = rng.choice(digits)
            b[pos] = rng.choice(b"0123456789")
    return bytes(b), f"text {op} at {pos}"


INDEX = "tall.index.json"


def _index_body(raw: bytes) -> str:
    """The index's JSON text without its checksum member (what seal_index takes)."""
    text = raw.decode("utf-8")
    return text[:text.rindex('"checksum"')].rstrip().rstrip(",") + "\n}"


def _mutate_sharded(rng: random.Random, c: Corpus) -> tuple[dict[str, bytes], str, bool]:
    from tallfmt.errors import TallError
    from tallfmt.format.index import seal_index

    if rng.random() < 0.5:
        name = rng.choice(sorted(c.shards))
        data, desc, forged = mutate(rng, c.shards[name])
        return {**c.raw, name: data}, f"shard {name}: {desc}", forged
    raw = c.raw[INDEX]
    kind = rng.choice(["flip", "truncate", "append", "text", "json", "json"])
    if kind == "flip":
        bit = rng.randrange(len(raw) * 8)
        return {**c.raw, INDEX: tc.flip_bit(raw, bit)}, f"index flip bit {bit}", False
    if kind == "truncate":  # (cutting only the final newline changes no JSON: not done alone)
        cut = rng.randrange(len(raw.rstrip()))
        return {**c.raw, INDEX: raw[:cut]}, f"index truncate at {cut}", False
    if kind == "append":  # (whitespace after the closing brace is insignificant JSON: not appended alone)
        extra = rng.choice([b"x", b"}", b"\n{}", rng.randbytes(rng.randint(1, 50)) + b"!"])
        return {**c.raw, INDEX: raw + extra}, f"index append {extra[:20]!r}", False
    if kind == "text":
        text, desc = _text_edit(rng, _index_body(raw).encode())
        try:
            return {**c.raw, INDEX: seal_index(text.decode("utf-8", "surrogateescape"))}, f"index {desc}", True
        except (TallError, UnicodeError, ValueError):
            return {**c.raw, INDEX: text}, f"index {desc} (not sealed)", False
    h = json.loads(raw)
    del h["checksum"]
    what = rng.choice(["node", "node", "delete", "weight_map", "shards", "tasks"])
    if what == "weight_map" and len(h["weight_map"]) > 1:
        a, b = rng.sample(sorted(h["weight_map"]), 2)
        h["weight_map"][a], h["weight_map"][b] = h["weight_map"][b], h["weight_map"][a]
        desc = f"weight_map swap {a} <-> {b}"
    elif what == "shards":
        i = rng.randrange(len(h["shards"]))
        key = rng.choice(["file", "size", "header_xxh3"])
        h["shards"][i][key] = rng.choice(["../x.tall", "/etc/passwd", "model-00002-of-00003.tall", INDEX, "",
                                          _int_variant(rng, h["shards"][i]["size"]), "0" * 16])
        desc = f"shards[{i}].{key} = {h['shards'][i][key]!r}"
    elif what == "tasks":
        h["tasks"] = h["tasks"][::-1] if rng.random() < 0.5 else h["tasks"][:-1]
        desc = "index tasks reordered or cut"
    else:
        p = rng.choice(_paths(h))
        parent = _get(h, p[:-1])
        if what == "delete":
            del parent[p[-1]]
        else:
            parent[p[-1]] = _random_json(rng) if rng.random() < 0.6 else _int_variant(rng, parent[p[-1]])
        desc = f"{what} {p}"
    sealed = seal_index(json.dumps(h, indent=2, ensure_ascii=False))
    return {**c.raw, INDEX: sealed}, f"index json {desc}", True


def mutate(rng: random.Random, c: Corpus) -> tuple[bytes | dict[str, bytes], str, bool]:
    """(damaged file bytes, or for a sharded archive {file name: bytes}; what was done; forged: whether a
    checksum that covers the change was recomputed)."""
    if isinstance(c.raw, dict):
        return _mutate_sharded(rng, c)
    raw, parts, size = c.raw, c.parts, len(c.raw)
    kind = _weighted(rng, KINDS)
    if kind == "flip":
        out = raw
        flips = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            region = rng.choice([(0, 64), (64, parts.header_offset), (parts.header_offset, size), (0, size)])
            lo, hi = region if region[1] > region[0] else (0, size)
            bit = rng.randrange(lo * 8, hi * 8)
            out = tc.flip_bit(out, bit)
            flips.append(bit)
        return out, f"flip bits {flips}", False
    if kind == "bytes":
        pos = rng.randrange(size)
        n = rng.randint(1, 8)
        fill = rng.choice([bytes(n), b"\xff" * n, rng.randbytes(n)])
        return raw[:pos] + fill + raw[pos + n:], f"overwrite {n} bytes at {pos}", False
    if kind == "truncate":
        cut = rng.choice(c.boundaries) + rng.choice([0, 0, -1, 1]) if rng.random() < 0.7 else rng.randrange(size)
        cut = max(0, min(size - 1, cut))
        return raw[:cut], f"truncate at {cut}", False
    if kind == "append":
        extra = rng.choice([b"\0", bytes(rng.randint(1, 300)), rng.randbytes(rng.randint(1, 300)), parts.header,
                            raw[:64]])
        return raw + extra, f"append {len(extra)} bytes", False
    if kind == "preamble":
        field = rng.choice(["header_offset", "header_length", "minor", "major"])
        value = getattr(parts, field)
        new = rng.choice([value + 1, value - 1, value + 64, value - 64, 0, 2**63, 2**64 - 1, 100 * 2**20 + 1,
                          rng.randrange(size)])
        new = max(0, min(new, 2**16 - 1 if field in ("minor", "major") else 2**64 - 1))
        fix = rng.random() < 0.7
        return tc.assemble(parts, fix_checksums=fix, **{field: new}), f"preamble {field}={new} fix={fix}", fix
    if kind == "segdata" and c.segments:
        h = json.loads(parts.header)
        segs = [(w, s) for w, s in tc.segments(h) if s["length"] > 0]
        where, s = rng.choice(segs)
        data = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            pos = s["offset"] + rng.randrange(s["length"])
            data[pos] = rng.choice([data[pos] ^ (1 << rng.randrange(8)), rng.randrange(256), 0, 255])
        s["xxh3"] = xxhash.xxh3_64_hexdigest(bytes(data[s["offset"]:s["offset"] + s["length"]]))
        p2 = replace(parts, data=bytes(data[64:parts.header_offset]))
        return tc.assemble(p2, header=tc.header_text(h)), f"segment data {where} (xxh3 recomputed)", True
    fix = rng.random() < 0.85
    if kind == "text":
        text, desc = _text_edit(rng, parts.header)
        return tc.assemble(parts, header=text, fix_checksums=fix,
                           **({} if fix else {"header_length": len(text)})), f"{desc} fix={fix}", fix
    h = json.loads(parts.header)
    desc = _tamper_json(rng, h, c)
    if rng.random() < 0.15:
        try:  # a second change, on a header the first may have made malformed
            desc += "; " + _tamper_json(rng, h, c)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError):
            desc += "; (second change did not apply)"
    text = tc.header_text(h)
    return (tc.assemble(parts, header=text, fix_checksums=fix, **({} if fix else {"header_length": len(text)})),
            f"json {desc} fix={fix}", fix)


# ----------------------------------------------------------------------------------------------
# Batches


def case_rng(seed: int, case: int) -> random.Random:
    return random.Random(f"tallfmt-fuzz:{seed}:{case}")


def run_batch(spec: dict) -> dict:
    """Run cases [start, stop) of `seed` on the archives; the report lists every failure."""
    import torch

    torch.set_num_threads(1)
    selftest = spec.get("selftest")
    archives = [Corpus(Path(p)) for p in spec["archives"]]
    refs = []
    for c in archives:
        ref, header = run_file(c.path)
        bad = [op for op, (s, _) in ref.items() if s != "ok"]
        if bad:
            raise RuntimeError(f"{c.path}: undamaged archive fails {bad}: {ref}")
        refs.append((ref, header))
    work = Path(spec["workdir"])
    work.mkdir(parents=True, exist_ok=True)
    progress = Path(spec["progress"]) if spec.get("progress") else None
    failures, outcomes = [], Counter()
    t0 = time.perf_counter()
    for case in range(spec["start"], spec["stop"]):
        rng = case_rng(spec["seed"], case)
        ai = rng.randrange(len(archives))
        if progress is not None:
            progress.write_text(json.dumps({"case": case, "archive": str(archives[ai].path), "mutation": "?"}))
        data, desc, forged = mutate(rng, archives[ai])
        if selftest == "wrong":  # an undamaged file whose decode output is then falsified
            data, desc, forged = archives[ai].raw, "selftest: undamaged", False
        if progress is not None:
            progress.write_text(json.dumps({"case": case, "archive": str(archives[ai].path), "mutation": desc}))
        path = work / f"case{case}.tall"
        if isinstance(data, dict):  # a sharded archive: a folder
            path.mkdir()
            for name, content in data.items():
                (path / name).write_bytes(content)
        else:
            path.write_bytes(data)
        if selftest == "segfault" and case == spec["start"] + 1:
            import ctypes
            ctypes.string_at(0)
        if selftest == "hang" and case == spec["start"] + 1:
            while True:  # spins, as an endless loop in native code would
                pass
        result, header = run_file(path)
        if selftest == "wrong" and "decode[0]" in result and result["decode[0]"][0] == "ok":
            result["decode[0]"] = ("ok", [("x", ("F32", (1,), "0"))])
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        problems = judge(result, header, *refs[ai], forged, data != archives[ai].raw)
        first_e = next((op for op, (s, _) in result.items() if s == "E"), None)
        outcomes[f"{desc.split()[0]}:{'open-refused' if header is None else 'opened'}"] += 1
        if header is not None:
            outcomes["opened, all ops identical" if first_e is None and not forged else
                     "opened, some ops refused" if first_e else "opened forged"] += 1
        if problems:
            failures.append({"seed": spec["seed"], "case": case, "archive": str(archives[ai].path),
                             "mutation": desc, "forged": forged, "problems": problems})
    return {"cases": spec["stop"] - spec["start"], "failures": failures, "outcomes": dict(outcomes),
            "seconds": time.perf_counter() - t0}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    report = run_batch(spec)
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


# ----------------------------------------------------------------------------------------------
# The parent side: run batches in subprocesses, collect reports


def run_parallel(archives: list[Path], seed: int, cases: int, *, workdir: Path, jobs: int = 2, batch: int = 500,
                 timeout: float = 3600.0, stall: float = 60.0, selftests: list[str | None] | None = None,
                 start: int = 0, on_report: Callable[[dict], None] | None = None) -> dict:
    """Run cases [start, start + cases) in batches, `jobs` subprocesses at a time. A batch whose process
    dies (signal, non-zero exit), runs past `timeout` seconds, or spends `stall` seconds of CPU time on
    one case (a hang: a case takes milliseconds) becomes a failure naming its seed and case. CPU time,
    not wall time, so a busy machine slows the detection of a hang but never makes a slow case one; a
    case blocked without using the CPU counts after 10 × `stall` seconds of wall time. ``selftests[i]``
    is given to batch i (cycling): "segfault", "hang" or "wrong" make the worker fail on purpose."""
    import subprocess

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pending = [(a, min(a + batch, start + cases)) for a in range(start, start + cases, batch)]
    tests = selftests or [None]
    running: list[tuple[subprocess.Popen, dict, float, Path, _Watch]] = []
    total = {"cases": 0, "failures": [], "outcomes": Counter(), "seconds": 0.0, "batches": 0}
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    while pending or running:
        while pending and len(running) < jobs:
            a, b = pending.pop(0)
            spec = {"archives": [str(p) for p in archives], "seed": seed, "start": a, "stop": b,
                    "workdir": str(workdir / f"batch{a}"), "progress": str(workdir / f"batch{a}.progress"),
                    "selftest": tests[(a - start) // batch % len(tests)]}
            spec_path = workdir / f"batch{a}.json"
            spec_path.write_text(json.dumps(spec))
            out_path = workdir / f"batch{a}.out"
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(spec_path)],
                                    stdout=out_path.open("wb"), stderr=subprocess.STDOUT, env=env)
            running.append((proc, spec, time.monotonic(), out_path, _Watch(proc.pid, Path(spec["progress"]))))
        time.sleep(0.05)
        for item in list(running):
            proc, spec, started, out_path, watch = item
            timed_out = time.monotonic() - started > timeout or watch.stalled(stall)
            if proc.poll() is None and not timed_out:
                continue
            if timed_out and proc.poll() is None:
                proc.kill()
                proc.wait()
            running.remove(item)
            report = _collect(proc.returncode, spec, out_path, timed_out)
            total["cases"] += report["cases"]
            total["failures"] += report["failures"]
            total["outcomes"].update(report.get("outcomes", {}))
            total["seconds"] += report.get("seconds", 0.0)
            total["batches"] += 1
            if on_report is not None:
                on_report(report)
    total["outcomes"] = dict(total["outcomes"])
    return total


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _Watch:
    """How long a worker has been on its current case: CPU seconds, and wall seconds."""

    def __init__(self, pid: int, progress: Path) -> None:
        self.pid, self.progress = pid, progress
        self.mark: float | None = None   # progress file mtime of the current case
        self.cpu0 = self.wall0 = 0.0

    def stalled(self, stall: float) -> bool:
        try:
            mtime = self.progress.stat().st_mtime
        except OSError:  # not started a case yet (imports, references)
            return False
        cpu = _cpu_seconds(self.pid)
        if mtime != self.mark:
            self.mark, self.cpu0, self.wall0 = mtime, cpu or 0.0, time.monotonic()
            return False
        wall = time.monotonic() - self.wall0
        if cpu is None:
            return wall > stall
        return cpu - self.cpu0 > stall or wall > 10 * stall


def _collect(returncode: int, spec: dict, out_path: Path, timed_out: bool) -> dict:
    text = out_path.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    if returncode == 0 and not timed_out and lines:
        return json.loads(lines[-1])
    where = {}
    try:
        where = json.loads(Path(spec["progress"]).read_text())
    except (OSError, ValueError):
        pass
    why = "hung (timed out)" if timed_out else f"worker died with return code {returncode}"
    failure = {"seed": spec["seed"], "case": where.get("case"), "archive": where.get("archive"),
               "mutation": where.get("mutation"), "problems": [f"{why}; output tail:\n{text[-3000:]}"],
               "batch": [spec["start"], spec["stop"]]}
    done = (where.get("case", spec["start"]) - spec["start"]) if where else 0
    return {"cases": done, "failures": [failure], "outcomes": {}}


if __name__ == "__main__":
    sys.exit(main(sys.argv))
