"""Helpers that build small valid .tall containers and craft damaged or hostile variants of them.

Used by test_container.py, test_hostile.py and the fuzz worker. Nothing here imports torch or numba,
so crafting works in any process.

    build(path)                    a valid container with every role (hand-made header, ContainerWriter)
    split(path) -> Parts           preamble fields, data section, header bytes
    assemble(path, parts, ...)     write a file from parts, checksums recomputed unless told otherwise
    rewrite_header(path, fn)       parse the header JSON, let fn change it, write it back (checksums fixed)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xxhash

from tallfmt.format.container import ContainerWriter
from tallfmt.format.header import MAGIC, PREAMBLE_SIZE, Header, Item, TaskEntry, TensorEntry, align

PREAMBLE = struct.Struct("<8sHHIQQQQ16s")
TASKS = ("a", "b")
ENCODING = {"merge": {"method": "task_arithmetic"}, "mask": {"method": "tall"},
            "compute_dtype": "F32", "bit_order": "little"}


def mask_bytes(n: int, seed: int) -> bytes:
    """A packed little-endian mask of n bits with zero padding bits."""
    bits = np.random.default_rng(seed).random(n) < 0.5
    return np.packbits(bits, bitorder="little").tobytes()


def build(path: str | Path, *, codec: str = "auto", tasks: tuple[str, ...] = TASKS,
          metadata: dict[str, str] | None = None) -> Path:
    """A valid container (a sample of every role) written with ContainerWriter; returns its path.

    tensors[0] 'w'     masked F32 [3, 5]   (15 elements: the masks have a padding bit)
    tensors[1] 'h'     masked BF16 [4]
    tensors[2] 'pos'   shared I64 [3]
    tensors[3] 'head'  per_task: base None, task 0 F32 [2, 2], task 1 F16 [3], further tasks None
    tensors[4] 'tied'  alias of 'w'
    """
    def c(itemsize: int, mask: bool = False) -> str:
        if codec != "auto":
            return codec
        return "zstd" if mask or itemsize == 1 else "byteplane-zstd"

    rng = np.random.default_rng(0)
    with ContainerWriter(path) as wr:
        def seg(arr: np.ndarray, itemsize: int, mask: bool = False):
            return wr.write_segment(arr, c(itemsize, mask), itemsize)

        w_base = seg(rng.standard_normal(15).astype(np.float32), 4)
        w_tau = seg((rng.standard_normal(15) * 0.01).astype(np.float32), 4)
        w_masks = tuple(wr.write_segment(np.frombuffer(mask_bytes(15, i), np.uint8), c(1, True), 1)
                        for i in range(len(tasks)))
        h_base = seg(np.array([0x3F80, 0xBF80, 0x0000, 0x4000], dtype=np.uint16), 2)
        h_tau = seg(np.array([0.5, -0.25, 1.0, 0.0], dtype=np.float32), 4)
        h_masks = tuple(wr.write_segment(np.frombuffer(mask_bytes(4, 10 + i), np.uint8), c(1, True), 1)
                        for i in range(len(tasks)))
        pos = seg(np.arange(3, dtype=np.int64), 8)
        items: list[Item | None] = [Item("F32", (2, 2), seg(np.arange(4, dtype=np.float32), 4))]
        if len(tasks) > 1:
            items.append(Item("F16", (3,), seg(np.array([1, 2, 3], dtype=np.float16), 2)))
        items += [None] * (len(tasks) - len(items))
        tensors = (
            TensorEntry("w", "masked", "F32", (3, 5), base=w_base, tau=w_tau, masks=w_masks),
            TensorEntry("h", "masked", "BF16", (4,), base=h_base, tau=h_tau, masks=h_masks),
            TensorEntry("pos", "shared", "I64", (3,), data=pos),
            TensorEntry("head", "per_task", base_item=None, task_items=tuple(items)),
            TensorEntry("tied", "alias", target="w"),
        )
        header = Header(tuple(TaskEntry(t, 0.4, {"mask_density": 0.5}) for t in tasks), ENCODING, tensors,
                        dict(metadata or {"k": "v"}))
        return wr.finish(header)


@dataclass(frozen=True)
class Parts:
    magic: bytes
    major: int
    minor: int
    flags: int
    header_offset: int
    header_length: int
    header_xxh3: int
    preamble_xxh3: int
    reserved: bytes
    data: bytes      # bytes [64, header_offset)
    header: bytes    # the header bytes as stored

    def header_json(self) -> dict:
        return json.loads(self.header)


def split(path: str | Path) -> Parts:
    raw = Path(path).read_bytes()
    magic, major, minor, flags, h_off, h_len, h_sum, p_sum, reserved = PREAMBLE.unpack_from(raw)
    return Parts(magic, major, minor, flags, h_off, h_len, h_sum, p_sum, reserved,
                 raw[PREAMBLE_SIZE:h_off], raw[h_off:h_off + h_len])


def header_text(obj: Any) -> bytes:
    """Header bytes as the writer emits them."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def preamble(magic: bytes = MAGIC, major: int = 1, minor: int = 0, flags: int = 0, header_offset: int = 64,
             header_length: int = 0, header_xxh3: int | None = None, header: bytes = b"",
             reserved: bytes = bytes(16), preamble_xxh3: int | None = None) -> bytes:
    """64 preamble bytes; checksums computed unless given."""
    if header_xxh3 is None:
        header_xxh3 = xxhash.xxh3_64_intdigest(header)
    head = struct.pack("<8sHHIQQQ", magic, major, minor, flags, header_offset, header_length, header_xxh3)
    if preamble_xxh3 is None:
        preamble_xxh3 = xxhash.xxh3_64_intdigest(head)
    return head + struct.pack("<Q", preamble_xxh3) + reserved


def assemble(parts: Parts, *, fix_checksums: bool = True, trailing: bytes = b"", **changes: Any) -> bytes:
    """File bytes from parts (fields overridable by keyword). With ``fix_checksums`` the header length
    and both checksums are recomputed, so the rule under test is the one that fires."""
    p = replace(parts, **changes)
    if fix_checksums:
        if "header_length" not in changes:
            p = replace(p, header_length=len(p.header))
        h_sum = xxhash.xxh3_64_intdigest(p.header) if "header_xxh3" not in changes else p.header_xxh3
        pre = preamble(p.magic, p.major, p.minor, p.flags, p.header_offset, p.header_length, h_sum,
                       reserved=p.reserved,
                       preamble_xxh3=p.preamble_xxh3 if "preamble_xxh3" in changes else None)
    else:
        pre = PREAMBLE.pack(p.magic, p.major, p.minor, p.flags, p.header_offset, p.header_length,
                            p.header_xxh3, p.preamble_xxh3, p.reserved)
    return pre + p.data + p.header + trailing


def write(path: str | Path, data: bytes) -> Path:
    Path(path).write_bytes(data)
    return Path(path)


def with_header(path: str | Path, header: bytes | dict, **kw: Any) -> Path:
    """Replace the header (bytes, or an object serialised as the writer does), checksums recomputed."""
    raw = header if isinstance(header, (bytes, bytearray)) else header_text(header)
    return write(path, assemble(split(path), header=bytes(raw), **kw))


def rewrite_header(path: str | Path, fn: Callable[[dict], Any]) -> Path:
    """Parse the header JSON, let fn edit it in place (its return value is ignored), write it back."""
    obj = split(path).header_json()
    fn(obj)
    return with_header(path, obj)


def patch(path: str | Path, offset: int, data: bytes) -> Path:
    raw = bytearray(Path(path).read_bytes())
    raw[offset:offset + len(data)] = data
    return write(path, bytes(raw))


def flip_bit(raw: bytes, bit: int) -> bytes:
    out = bytearray(raw)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def segments(header: Any) -> list[tuple[str, dict]]:
    """(JSON path, segment object) for every segment of a parsed header, in table order (a damaged
    header's malformed parts are skipped)."""
    out: list[tuple[str, dict]] = []
    tensors = header.get("tensors") if isinstance(header, dict) else None
    for i, t in enumerate(tensors if isinstance(tensors, list) else []):
        if not isinstance(t, dict):
            continue
        where = f"tensors[{i}]"
        for key in ("base", "tau", "data"):
            v = t.get(key)
            if isinstance(v, dict) and "offset" in v:
                out.append((f"{where}.{key}", v))
            elif isinstance(v, dict) and isinstance(v.get("data"), dict):
                out.append((f"{where}.{key}.data", v["data"]))
        masks, items = t.get("masks"), t.get("tasks")
        for j, m in enumerate(masks if isinstance(masks, list) else []):
            if isinstance(m, dict):
                out.append((f"{where}.masks[{j}]", m))
        for j, it in enumerate(items if isinstance(items, list) else []):
            if isinstance(it, dict) and isinstance(it.get("data"), dict):
                out.append((f"{where}.tasks[{j}].data", it["data"]))
    return out


def segment_boundaries(path: str | Path) -> list[int]:
    """Every offset where a part of the file starts or ends (preamble, segments, padding, header)."""
    p = split(path)
    marks = {0, 8, PREAMBLE_SIZE, p.header_offset, p.header_offset + p.header_length}
    for _, s in segments(p.header_json()):
        marks.update((s["offset"], s["offset"] + s["length"], align(s["offset"] + s["length"])))
    return sorted(marks)
