"""The container (FORMAT.md §1, §5, §6, §8): one crafted-file test per validation rule, writer round trips,
determinism, the JSON Schema, and the temp-file + rename behaviour.

Every crafted file starts as a valid container written by ContainerWriter (tests/_tallcraft.py) and is then
changed in exactly one way; checksums are recomputed unless the checksum is what the test is about, so the
rule under test is the one that fires. Each test checks the exception type and that the message names the
file and the field.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _tallcraft as tc
from tallfmt.format import codecs as compression
from tallfmt.format.container import ContainerReader, ContainerWriter
from tallfmt.format.header import (MAX_HEADER_BYTES, MAX_JSON_DEPTH, MAX_NAME_BYTES, MAX_TASKS, Header, TaskEntry,
                                   TensorEntry, parse_header)
from tallfmt.errors import ChecksumError, FormatError, InputError, LimitError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    return tc.build(tmp_path / "x.tall")


@pytest.fixture
def valid_raw(tmp_path: Path) -> Path:
    return tc.build(tmp_path / "x.tall", codec="raw")


def refused(path: Path, exc: type[Exception], *fields: str, read_all: bool = False) -> str:
    """Open (and, with read_all, verify) ``path``; assert ``exc`` naming the file and each field."""
    with pytest.raises(exc) as info:
        with ContainerReader(path) as r:
            if read_all:
                r.verify()
    msg = str(info.value)
    assert str(path) in msg, msg
    for f in fields:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------------------------
# Small editing language for header JSON: "tensors.0.shape.1" addresses a value.


def _walk(obj: Any, dotted: str) -> tuple[Any, Any]:
    keys = [int(k) if k.lstrip("-").isdigit() else k for k in dotted.split(".")]
    for k in keys[:-1]:
        obj = obj[k]
    return obj, keys[-1]


def setk(dotted: str, value: Any) -> Callable[[dict], None]:
    def fn(h: dict) -> None:
        parent, key = _walk(h, dotted)
        parent[key] = value
    return fn


def delk(dotted: str) -> Callable[[dict], None]:
    def fn(h: dict) -> None:
        parent, key = _walk(h, dotted)
        del parent[key]
    return fn


def seg_of(h: dict, name: str, part: str) -> dict:
    t = next(t for t in h["tensors"] if t["name"] == name)
    parent, key = _walk(t, part)
    return parent[key]


def last_segment(h: dict) -> dict:
    return max((s for _, s in tc.segments(h)), key=lambda s: s["offset"])


# ----------------------------------------------------------------------------------------------
# Preamble (§1.1) and the header's place in the file


def test_valid_file_opens_and_verifies(valid: Path) -> None:
    with ContainerReader(valid) as r:
        assert r.header.task_names == ["a", "b"]
        assert [t.role for t in r.header.tensors] == ["masked", "masked", "shared", "per_task", "alias"]
        r.verify()
        assert np.array_equal(r.read_array(r.header.tensors[2].data, "I64"), np.arange(3))


@pytest.mark.parametrize("content", [b"", b"\x89TA", b"PK\x03\x04" + bytes(200), b"\x89TALL\r\n\x0a" + bytes(100)])
def test_bad_magic_or_tiny_file(tmp_path: Path, content: bytes) -> None:
    p = tc.write(tmp_path / "bad.tall", content)
    refused(p, FormatError, "not a .tall file", "magic")


def test_bad_magic_in_valid_file(valid: Path) -> None:
    tc.patch(valid, 1, b"t")
    refused(valid, FormatError, "not a .tall file", "magic")


@pytest.mark.parametrize("size", [8, 20, 63])
def test_file_shorter_than_preamble(tmp_path: Path, size: int) -> None:
    p = tc.write(tmp_path / "short.tall", tc.preamble()[:size])
    refused(p, FormatError, "preamble", f"{size} bytes")


@pytest.mark.parametrize("offset", [8, 12, 16, 24, 32, 39, 40, 47])
def test_preamble_checksum(valid: Path, offset: int) -> None:
    raw = Path(valid).read_bytes()
    tc.write(valid, tc.flip_bit(raw, offset * 8 + 3))
    refused(valid, ChecksumError, "preamble checksum")


@pytest.mark.parametrize("major", [0, 2, 65535])
def test_unknown_major(valid: Path, major: int) -> None:
    tc.write(valid, tc.assemble(tc.split(valid), major=major))
    refused(valid, FormatError, "major version", str(major))


def test_nonzero_flags(valid: Path) -> None:
    tc.write(valid, tc.assemble(tc.split(valid), flags=1))
    refused(valid, FormatError, "flags")


@pytest.mark.parametrize("pos", [0, 7, 15])
def test_nonzero_reserved(valid: Path, pos: int) -> None:
    reserved = bytearray(16)
    reserved[pos] = 0x80
    tc.write(valid, tc.assemble(tc.split(valid), reserved=bytes(reserved)))
    refused(valid, FormatError, "reserved")


def test_header_length_over_cap(valid: Path) -> None:
    tc.write(valid, tc.assemble(tc.split(valid), header_length=MAX_HEADER_BYTES + 1))
    refused(valid, LimitError, "header length", str(MAX_HEADER_BYTES))


@pytest.mark.parametrize("delta", [1, 64, 10**6])
def test_header_length_past_end_of_file(valid: Path, delta: int) -> None:
    parts = tc.split(valid)
    tc.write(valid, tc.assemble(parts, header_length=parts.header_length + delta))
    refused(valid, FormatError, "header at")


@pytest.mark.parametrize("h_off", [0, 32, 63, 2**64 - 64])
def test_header_offset_inside_preamble(valid: Path, h_off: int) -> None:
    parts = tc.split(valid)
    tc.write(valid, tc.assemble(parts, header_offset=h_off))
    refused(valid, FormatError, "header at")


def test_header_misaligned(valid: Path) -> None:
    parts = tc.split(valid)  # one more data byte, header moved by one: ends the file, but misaligned
    tc.write(valid, tc.assemble(parts, data=parts.data + b"\0", header_offset=parts.header_offset + 1))
    refused(valid, FormatError, "header at", f"[{parts.header_offset + 1},")


def test_header_offset_not_after_last_segment(valid: Path) -> None:
    parts = tc.split(valid)  # an aligned header, but 64 bytes of extra padding before it
    tc.write(valid, tc.assemble(parts, data=parts.data + bytes(64), header_offset=parts.header_offset + 64))
    refused(valid, FormatError, "header offset", "last segment")


@pytest.mark.parametrize("extra", [b"\0", b"x" * 100, bytes(64)])
def test_trailing_bytes(valid: Path, extra: bytes) -> None:
    tc.write(valid, Path(valid).read_bytes() + extra)
    refused(valid, FormatError, "header at", "trailing")


def test_truncation_everywhere(valid: Path) -> None:
    raw = Path(valid).read_bytes()
    cuts = sorted(set(tc.segment_boundaries(valid)) | {len(raw) - 1, len(raw) - 100, 100, 65})
    for cut in cuts:
        if cut >= len(raw):
            continue
        tc.write(valid, raw[:cut])
        exc = pytest.raises(FormatError, ContainerReader, valid)
        assert str(valid) in str(exc.value)


def test_header_checksum(valid: Path) -> None:
    parts = tc.split(valid)
    hdr = parts.header.replace(b'"k":"v"', b'"k":"w"')
    assert hdr != parts.header
    tc.write(valid, tc.assemble(parts, header=hdr, header_xxh3=parts.header_xxh3))
    refused(valid, ChecksumError, "header checksum")


# ----------------------------------------------------------------------------------------------
# Header text (§1.2): encoding, JSON, duplicate keys, depth


def test_header_not_utf8(valid: Path) -> None:
    parts = tc.split(valid)
    tc.with_header(valid, parts.header.replace(b'"k":"v"', b'"k":"\xff\xfe"'))
    refused(valid, FormatError, "header", "UTF-8")


@pytest.mark.parametrize("old, new, field", [
    (b'"name":"a"', b'"name":"\\ud800"', "tasks[0].name"),
    (b'"name":"pos"', b'"name":"p\\udfffos"', "tensors[2].name"),
    (b'"k":"v"', b'"k":"\\udbff"', "metadata.k"),
    (b'"k":"v"', b'"\\ud800k":"v"', "metadata"),
    (b'"mask_density"', b'"\\ud800"', "tasks[0].stats"),
])
def test_header_unpaired_surrogate_escape(valid: Path, old: bytes, new: bytes, field: str) -> None:
    # "\ud800" is JSON syntax but no Unicode character: such a name cannot be written as UTF-8 again
    # (tallfmt info, a sharded index, a safetensors header would fail on it), so the reader refuses it
    parts = tc.split(valid)
    tc.with_header(valid, parts.header.replace(old, new, 1))
    refused(valid, FormatError, field, "surrogate")


def test_header_paired_surrogate_escapes_are_text(valid: Path) -> None:
    parts = tc.split(valid)
    tc.with_header(valid, parts.header.replace(b'"k":"v"', b'"k":"\\ud83d\\ude00 \\\\ud800"'))
    with ContainerReader(valid) as r:
        assert r.header.metadata == {"k": "\U0001f600 \\ud800"}


@pytest.mark.parametrize("prefix", [b" ", b"\xef\xbb\xbf", b"\n"])
def test_header_not_starting_with_brace(valid: Path, prefix: bytes) -> None:
    tc.with_header(valid, prefix + tc.split(valid).header)
    refused(valid, FormatError, "header", "starting with '{'")


@pytest.mark.parametrize("text", [b"[]", b"null", b"1"])
def test_header_not_an_object(valid: Path, text: bytes) -> None:
    tc.with_header(valid, text)
    refused(valid, FormatError, "header", "starting with '{'")


@pytest.mark.parametrize("cut", [1, 10, -1])
def test_header_invalid_json(valid: Path, cut: int) -> None:
    parts = tc.split(valid)
    tc.with_header(valid, parts.header[:cut])
    refused(valid, FormatError, "header", "not valid JSON")


def test_header_invalid_json_trailing_garbage(valid: Path) -> None:
    tc.with_header(valid, tc.split(valid).header + b"}")
    refused(valid, FormatError, "header", "not valid JSON")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_header_nan_literal(valid: Path, literal: bytes) -> None:
    parts = tc.split(valid)
    tc.with_header(valid, parts.header.replace(b'"lambda":0.4', b'"lambda":' + literal, 1))
    refused(valid, FormatError, "header", literal.decode().lstrip("-"))


def test_header_number_overflowing_to_infinity(valid: Path) -> None:
    parts = tc.split(valid)  # 1e400 is JSON, but not a finite double
    tc.with_header(valid, parts.header.replace(b'"lambda":0.4', b'"lambda":1e400', 1))
    refused(valid, FormatError, "tasks[0].lambda", "finite")


def test_header_stats_overflowing_to_infinity(valid: Path) -> None:
    parts = tc.split(valid)
    tc.with_header(valid, parts.header.replace(b'"mask_density":0.5', b'"mask_density":-1e999', 1))
    refused(valid, FormatError, "tasks[0].stats.mask_density")


def test_header_integer_with_too_many_digits(valid: Path) -> None:
    parts = tc.split(valid)  # Python refuses int() of > 4300 digits: must still be a FormatError
    tc.with_header(valid, parts.header.replace(b'"version":[1,1]', b'"version":[1,' + b"9" * 5000 + b"]"))
    refused(valid, FormatError, "header")


def test_duplicate_key_top_level(valid: Path) -> None:
    parts = tc.split(valid)
    tc.with_header(valid, parts.header[:-1] + b',"metadata":{}}')
    refused(valid, FormatError, "duplicate key", "'metadata'")


@pytest.mark.parametrize("needle, dup", [
    (b'"offset":', b'"offset":64,"offset":'),                 # inside a segment
    (b'"name":"a",', b'"name":"a","name":"a",'),               # inside a task
    (b'"method":"tall"', b'"method":"tall","method":"tall"'),  # inside encoding.mask
])
def test_duplicate_key_nested(valid: Path, needle: bytes, dup: bytes) -> None:
    parts = tc.split(valid)
    assert needle in parts.header
    tc.with_header(valid, parts.header.replace(needle, dup, 1))
    refused(valid, FormatError, "duplicate key", needle.split(b'"')[1].decode())


def _nested_metadata(depth: int) -> bytes:
    # the header object is level 1, metadata level 2: depth-2 more brackets reach `depth`
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return inner.encode()


def test_json_depth_at_limit_is_not_a_limit_error(valid: Path) -> None:
    parts = tc.split(valid)
    tc.with_header(valid, parts.header.replace(b'"k":"v"', b'"k":' + _nested_metadata(MAX_JSON_DEPTH)))
    msg = refused(valid, FormatError, "metadata.k")
    assert "deeper" not in msg


def test_json_depth_over_limit(valid: Path) -> None:
    parts = tc.split(valid)
    tc.with_header(valid, parts.header.replace(b'"k":"v"', b'"k":' + _nested_metadata(MAX_JSON_DEPTH + 1)))
    refused(valid, LimitError, "header", "deeper than 16")


def test_json_depth_brackets_inside_strings_do_not_count(valid: Path) -> None:
    parts = tc.split(valid)
    tc.with_header(valid, parts.header.replace(b'"k":"v"', b'"k":"' + b"[{" * 100 + b'\\"[["'))
    with ContainerReader(valid) as r:
        assert r.header.metadata["k"] == "[{" * 100 + '"[['


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_json_nesting_100k_deep(valid: Path, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    text = b'{"format":' + opener * 100_000 + b"1" + closer * 100_000 + b"}"
    tc.with_header(valid, text)
    refused(valid, LimitError, "header", "deeper")


def test_parse_header_deep_nesting_without_the_reader() -> None:
    with pytest.raises(LimitError, match="deeper"):
        parse_header(b"{" + b'"a":{' * 200_000 + b"}" * 200_001, "mem")


# ----------------------------------------------------------------------------------------------
# Header structure (§1.2, §2): keys, types, enums, names, counts


STRUCTURE_CASES: list[tuple[str, Callable[[dict], Any], type[Exception], tuple[str, ...]]] = [
    ("unknown top-level key", setk("extra", 1), FormatError, ("unknown key", "'extra'")),
    ("unknown key in a segment", setk("tensors.2.data.xxh4", "0"), FormatError, ("tensors[2]", "data", "'xxh4'")),
    ("unknown key in a task", setk("tasks.1.lam", 1), FormatError, ("tasks[1]", "'lam'")),
    ("unknown key in a masked tensor", setk("tensors.0.data", None), FormatError, ("tensors[0]", "'data'")),
    ("unknown key in encoding", setk("encoding.level", 3), FormatError, ("encoding", "'level'")),
    ("missing metadata", delk("metadata"), FormatError, ("missing key", "'metadata'")),
    ("missing tensors", delk("tensors"), FormatError, ("missing key", "'tensors'")),
    ("missing tau", delk("tensors.0.tau"), FormatError, ("tensors[0]", "'tau'")),
    ("missing segment xxh3", delk("tensors.2.data.xxh3"), FormatError, ("tensors[2]", "data", "'xxh3'")),
    ("missing task lambda", delk("tasks.0.lambda"), FormatError, ("tasks[0]", "'lambda'")),
    ("missing alias target", delk("tensors.4.target"), FormatError, ("tensors[4]", "'target'")),
    ("missing per_task base", delk("tensors.3.base"), FormatError, ("tensors[3]", "'base'")),
    ("wrong format", setk("format", "safetensors"), FormatError, ("format", "'safetensors'")),
    ("version not a list", setk("version", "1.0"), FormatError, ("version",)),
    ("version too short", setk("version", [1]), FormatError, ("version",)),
    ("version too long", setk("version", [1, 0, 0]), FormatError, ("version",)),
    ("version differs from the preamble's", setk("version", [1, 3]), FormatError, ("version", "preamble")),
    ("version is a bool", setk("version", [True, 0]), FormatError, ("version[0]", "integer")),
    ("tasks not a list", setk("tasks", {"a": 1}), FormatError, ("tasks", "array")),
    ("task not an object", setk("tasks.0", "a"), FormatError, ("tasks[0]", "object")),
    ("lambda a string", setk("tasks.0.lambda", "0.4"), FormatError, ("tasks[0].lambda", "finite number")),
    ("lambda a bool", setk("tasks.0.lambda", True), FormatError, ("tasks[0].lambda", "finite number")),
    ("tall mask without lambda", setk("tasks.1.lambda", None), FormatError, ("tasks", "lambda")),
    ("stats value a string", setk("tasks.0.stats.mask_density", "x"), FormatError, ("tasks[0].stats.mask_density",)),
    ("stats not an object", setk("tasks.0.stats", [1]), FormatError, ("tasks[0].stats", "object")),
    ("metadata value not a string", setk("metadata.k", 1), FormatError, ("metadata.k", "string")),
    ("metadata not an object", setk("metadata", ["k"]), FormatError, ("metadata", "object")),
    ("tensors not a list", setk("tensors", {}), FormatError, ("tensors", "array")),
    ("tensor not an object", setk("tensors.1", ["h"]), FormatError, ("tensors[1]", "object")),
    ("unknown dtype", setk("tensors.2.dtype", "F128"), FormatError, ("tensors[2]", "dtype", "'F128'")),
    ("dtype lowercase", setk("tensors.2.dtype", "i64"), FormatError, ("tensors[2]", "dtype", "'i64'")),
    ("dtype not a string", setk("tensors.2.dtype", 8), FormatError, ("tensors[2]", "dtype")),
    ("masked tensor of integers", setk("tensors.0.dtype", "I32"), FormatError, ("tensors[0]", "dtype", "'I32'")),
    ("per_task item dtype", setk("tensors.3.tasks.0.dtype", "float"), FormatError,
     ("tensors[3]", "tasks[0].dtype", "'float'")),
    ("unknown role", setk("tensors.2.role", "frozen"), FormatError, ("tensors[2]", "role", "'frozen'")),
    ("role not a string", setk("tensors.2.role", None), FormatError, ("tensors[2]", "role")),
    ("unknown codec", setk("tensors.2.data.codec", "lz4"), FormatError, ("tensors[2]", "data.codec", "'lz4'")),
    ("xxh3 uppercase", lambda h: h["tensors"][2]["data"].update(xxh3=h["tensors"][2]["data"]["xxh3"].upper()),
     FormatError, ("tensors[2]", "data.xxh3", "hex")),
    ("xxh3 too short", setk("tensors.2.data.xxh3", "abc"), FormatError, ("tensors[2]", "data.xxh3")),
    ("xxh3 an integer", setk("tensors.2.data.xxh3", 12345), FormatError, ("tensors[2]", "data.xxh3")),
    ("unknown merge method", setk("encoding.merge.method", "dare"), FormatError, ("encoding.merge.method", "'dare'")),
    ("ties without settings", setk("encoding.merge.method", "ties"), FormatError, ("encoding.merge", "missing")),
    ("ties density over 1", setk("encoding.merge", {"method": "ties", "density": 1.5, "agg": "sum",
                                                    "scope": "global"}), FormatError, ("encoding.merge.density",)),
    ("ties unknown agg", setk("encoding.merge", {"method": "ties", "density": 0.2, "agg": "max",
                                                 "scope": "global"}), FormatError, ("encoding.merge.agg", "'max'")),
    ("task_arithmetic with a parameter", setk("encoding.merge.density", 0.2), FormatError, ("encoding.merge",)),
    ("unknown mask method", setk("encoding.mask.method", "random"), FormatError, ("encoding.mask.method", "'random'")),
    ("magnitude without density", setk("encoding.mask", {"method": "magnitude"}), FormatError, ("encoding.mask",)),
    ("magnitude unknown scope", setk("encoding.mask", {"method": "magnitude", "density": 0.1, "scope": "layer"}),
     FormatError, ("encoding.mask.scope", "'layer'")),
    ("tall with a parameter", setk("encoding.mask.density", 0.1), FormatError, ("encoding.mask",)),
    ("compute dtype", setk("encoding.compute_dtype", "F16"), FormatError, ("encoding.compute_dtype", "'F16'")),
    ("bit order", setk("encoding.bit_order", "big"), FormatError, ("encoding.bit_order", "'big'")),
    ("duplicate task names", setk("tasks.1.name", "a"), FormatError, ("tasks", "duplicate task")),
    ("empty task name", setk("tasks.0.name", ""), FormatError, ("tasks[0].name", "bytes")),
    ("task name too long", setk("tasks.0.name", "é" * (MAX_NAME_BYTES // 2 + 1)), FormatError,
     ("tasks[0].name", str(MAX_NAME_BYTES))),
    ("zero tasks", lambda h: [h.update(tasks=[]), h["tensors"].pop(3)] + [t.update(masks=[]) for t in h["tensors"][:2]],
     FormatError, ("tasks", "at least one")),
    ("too many tasks", setk("tasks", [{"name": f"t{i}", "lambda": 0.4, "stats": {}} for i in range(MAX_TASKS + 1)]),
     LimitError, ("tasks", str(MAX_TASKS))),
    ("duplicate tensor names", setk("tensors.1.name", "w"), FormatError, ("tensors", "duplicate tensor name", "'w'")),
    ("empty tensor name", setk("tensors.2.name", ""), FormatError, ("tensors[2].name",)),
    ("tensor name too long", setk("tensors.2.name", "x" * (MAX_NAME_BYTES + 1)), FormatError, ("tensors[2].name",)),
    ("alias to a missing target", setk("tensors.4.target", "nope"), FormatError, ("'tied'", "target", "'nope'")),
    ("alias to itself", setk("tensors.4.target", "tied"), FormatError, ("'tied'", "target")),
    ("alias to an alias", lambda h: h["tensors"].append({"name": "tied2", "role": "alias", "target": "tied"}),
     FormatError, ("'tied2'", "target", "'tied'")),
    ("fewer masks than tasks", lambda h: h["tensors"][0]["masks"].pop(), FormatError, ("'w'", "masks", "1 masks for 2")),
    ("more masks than tasks", lambda h: h["tensors"][1]["masks"].append(h["tensors"][1]["masks"][0]), FormatError,
     ("'h'", "masks", "3 masks for 2")),
    ("per_task entries != tasks", lambda h: h["tensors"][3]["tasks"].append(None), FormatError,
     ("'head'", "tasks", "3 entries for 2")),
    ("per_task stored nowhere", lambda h: h["tensors"][3].update(tasks=[None, None]), FormatError,
     ("'head'", "per_task")),
    ("negative dimension", setk("tensors.2.shape.0", -3), FormatError, ("tensors[2]", "shape[0]", "-3")),
    ("float dimension", setk("tensors.2.shape.0", 3.0), FormatError, ("tensors[2]", "shape[0]", "integer")),
    ("fractional dimension", setk("tensors.2.shape.0", 2.5), FormatError, ("tensors[2]", "shape[0]", "integer")),
    ("string dimension", setk("tensors.2.shape.0", "3"), FormatError, ("tensors[2]", "shape[0]", "integer")),
    ("bool dimension", setk("tensors.2.shape", [True, 3]), FormatError, ("tensors[2]", "shape[0]", "integer")),
    ("shape not a list", setk("tensors.2.shape", 3), FormatError, ("tensors[2]", "shape", "array")),
    ("33 dimensions", setk("tensors.2.shape", [1] * 33), LimitError, ("tensors[2]", "shape", "32")),
    ("overflowing shape", setk("tensors.2.shape", [2**40, 2**40]), LimitError, ("tensors[2]", "shape", "limit")),
    ("dimension past 2**64", setk("tensors.2.shape", [2**70]), FormatError, ("tensors[2]", "shape[0]")),
    ("many dimensions overflowing only as a product", setk("tensors.0.shape", [2**12] * 5), LimitError,
     ("tensors[0]", "shape", "limit")),
    ("shape disagrees with decoded_length", setk("tensors.2.shape", [4]), FormatError,
     ("tensors[2]", "data.decoded_length", "24", "32")),
    ("decoded_length disagrees with shape", lambda h: seg_of(h, "w", "tau").update(decoded_length=64), FormatError,
     ("tensors[0]", "tau.decoded_length", "64", "60")),
    ("mask decoded_length", lambda h: seg_of(h, "w", "masks.1").update(decoded_length=15), FormatError,
     ("tensors[0]", "masks[1].decoded_length", "15")),
    ("per_task item decoded_length", lambda h: h["tensors"][3]["tasks"][1]["data"].update(decoded_length=8),
     FormatError, ("tensors[3]", "tasks[1].data.decoded_length")),
    ("negative offset", lambda h: seg_of(h, "pos", "data").update(offset=-64), FormatError,
     ("tensors[2]", "data.offset", "-64")),
    ("length a float", lambda h: seg_of(h, "pos", "data").update(length=30.0), FormatError,
     ("tensors[2]", "data.length", "integer")),
    ("expansion bomb", lambda h: h["tensors"][2].update(
        shape=[2**30], data=dict(h["tensors"][2]["data"], decoded_length=2**33)), LimitError,
     ("tensors[2]", "data", "expansion")),
]


@pytest.mark.parametrize("mutate, exc, fields", [c[1:] for c in STRUCTURE_CASES], ids=[c[0] for c in STRUCTURE_CASES])
def test_header_structure_rule(valid: Path, mutate: Callable[[dict], Any], exc: type[Exception],
                               fields: tuple[str, ...]) -> None:
    tc.rewrite_header(valid, mutate)
    msg = refused(valid, exc, *fields)
    if exc is FormatError:
        assert not isinstance(exc, LimitError)
    assert len(msg) < 2000


def test_wrong_type_is_a_format_error_not_a_crash(valid: Path) -> None:
    # every value of the header replaced in turn by values of other types: always a FormatError
    base = tc.split(valid).header_json()
    paths: list[str] = []

    def collect(v: Any, where: str) -> None:
        if where:
            paths.append(where)
        if isinstance(v, dict):
            for k, x in v.items():
                collect(x, f"{where}.{k}" if where else k)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                collect(x, f"{where}.{i}" if where else str(i))
    collect(base, "")
    assert len(paths) > 100
    accepted = []
    for where in paths:
        for value in (None, -1, 2**64, 0.5, "", "x", [], {}, True, [None]):
            h = json.loads(json.dumps(base))
            parent, key = _walk(h, where)
            if parent[key] == value and type(parent[key]) is type(value):
                continue
            parent[key] = value
            tc.with_header(valid, h)
            try:
                ContainerReader(valid).close()
                accepted.append((where, value))
            except FormatError as e:
                assert str(valid) in str(e)
    # only free-form values (names, statistics, metadata, λ) may take another valid value
    for where, value in accepted:
        assert where == "metadata" or where.startswith(("tasks.", "metadata.", "tensors.")) and where.split(".")[-1] in (
            "mask_density", "stats", "k", "lambda", "name"), (where, value)


def test_unknown_keys_allowed_when_minor_is_newer(valid: Path) -> None:
    h = tc.split(valid).header_json()
    h["version"] = [1, 7]
    h["future"] = {"x": 1}
    h["tensors"][2]["data"]["crc"] = "0"
    h["tasks"][0]["extra"] = True
    tc.write(valid, tc.assemble(tc.split(valid), header=tc.header_text(h), minor=7))
    with ContainerReader(valid) as r:
        assert r.header.version == (1, 7)
        r.verify()


def test_newer_minor_still_needs_required_keys(valid: Path) -> None:
    h = tc.split(valid).header_json()
    h["version"] = [1, 7]
    del h["tensors"][2]["data"]["xxh3"]
    tc.write(valid, tc.assemble(tc.split(valid), header=tc.header_text(h), minor=7))
    refused(valid, FormatError, "tensors[2]", "'xxh3'")


def test_magnitude_masks_take_null_lambdas(valid: Path) -> None:
    def fn(h: dict) -> None:
        h["encoding"]["mask"] = {"method": "magnitude", "density": 0.1, "scope": "per_tensor"}
        for t in h["tasks"]:
            t["lambda"] = None
    tc.rewrite_header(valid, fn)
    with ContainerReader(valid) as r:
        assert r.header.tasks[0].lam is None


# ----------------------------------------------------------------------------------------------
# Segments (§1, §5, §6): raw lengths, layout, padding, checksums, codecs


def test_raw_length_mismatch(valid_raw: Path) -> None:
    tc.rewrite_header(valid_raw, lambda h: seg_of(h, "pos", "data").update(length=16))
    refused(valid_raw, FormatError, "tensors[2]", "data.length", "raw")


def test_segment_overlap(valid: Path) -> None:
    def fn(h: dict) -> None:
        seg_of(h, "w", "tau")["offset"] = seg_of(h, "w", "base")["offset"]
    tc.rewrite_header(valid, fn)
    refused(valid, FormatError, "'w'", "overlaps")


def test_segment_gap(valid: Path) -> None:
    tc.rewrite_header(valid, lambda h: seg_of(h, "pos", "data").update(offset=seg_of(h, "pos", "data")["offset"] + 64))
    refused(valid, FormatError, "'pos'", "gap")


@pytest.mark.parametrize("delta", [1, 8, 63])
def test_segment_misaligned(valid: Path, delta: int) -> None:
    tc.rewrite_header(valid, lambda h: seg_of(h, "h", "tau").update(offset=seg_of(h, "h", "tau")["offset"] + delta))
    refused(valid, FormatError, "'h'", "misaligned")


def test_segment_past_end_of_file(valid: Path) -> None:
    tc.rewrite_header(valid, lambda h: last_segment(h).update(length=10**6))
    refused(valid, FormatError, "'head'", "past the end")


def test_segment_past_end_of_file_huge(valid: Path) -> None:
    tc.rewrite_header(valid, lambda h: last_segment(h).update(length=2**63))
    refused(valid, FormatError, "'head'")


@pytest.mark.parametrize("delta", [-1, 1])
def test_segment_length_changed_within_alignment(valid: Path, delta: int) -> None:
    # tiling still holds (the next segment starts at the same aligned offset): the padding rule (a
    # nonzero byte left out) or the checksum catches it
    h = tc.split(valid).header_json()
    where, seg = next((w, s) for w, s in tc.segments(h) if 0 < s["length"] % 64 < 63)
    seg["length"] += delta
    tc.with_header(valid, h)
    msg = refused(valid, FormatError, read_all=True)
    assert "padding" in msg or (where.split(".", 1)[1] in msg and "checksum" in msg), msg


def _padding_positions(path: Path) -> list[int]:
    parts = tc.split(path)
    used = bytearray(parts.header_offset)
    used[:64] = b"\1" * 64
    for _, s in tc.segments(parts.header_json()):
        used[s["offset"]:s["offset"] + s["length"]] = b"\1" * s["length"]
    return [i for i, u in enumerate(used) if not u]


def test_nonzero_padding_between_segments_and_before_header(valid: Path) -> None:
    raw = Path(valid).read_bytes()
    gaps = _padding_positions(valid)
    assert len(gaps) > 100
    for pos in (gaps[0], gaps[len(gaps) // 2], gaps[-1]):
        tc.write(valid, raw[:pos] + b"\x01" + raw[pos + 1:])
        msg = refused(valid, FormatError, "padding")
        lo, hi = map(int, msg.split("[")[1].split(")")[0].split(", "))
        assert lo <= pos < hi


def test_segment_checksum_detected_before_data_is_returned(valid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = tc.split(valid).header_json()
    s = seg_of(h, "pos", "data")
    tc.patch(valid, s["offset"] + s["length"] // 2, b"\xaa")
    calls = []
    for codec in compression.CODECS.values():
        monkeypatch.setattr(codec, "decode", lambda *a, **k: calls.append(a) or b"", raising=False)
    with ContainerReader(valid) as r:  # open does not read segment bytes
        entry = r.header.tensors[2]
        for read in (lambda: r.read(entry.data, 8), lambda: r.stored(entry.data), r.verify):
            with pytest.raises(ChecksumError) as info:
                read()
            assert str(valid) in str(info.value) and "tensors[2] ('pos').data" in str(info.value)
        # no codec ever saw the damaged bytes (verify decoded the segments before it)
        assert all(len(a[0]) != s["length"] or bytes(a[0]) != bytes(r.stored(entry.base)) for a in calls)
        assert all(a[1] != s["decoded_length"] for a in calls)


def test_segment_xxh3_field_changed(valid: Path) -> None:
    tc.rewrite_header(valid, lambda h: seg_of(h, "h", "masks.1").update(xxh3="0" * 16))
    refused(valid, ChecksumError, "'h'", "masks[1]", read_all=True)


def _one_segment_file(path: Path, stored: bytes, codec: str, dtype: str = "I64", shape: tuple[int, ...] = (3,)) -> Path:
    from tallfmt.format import dtypes
    n = math.prod(shape) * dtypes.by_name(dtype).itemsize
    with ContainerWriter(path) as w:
        seg = w.write_stored(stored, n, codec)
        w.finish(Header((TaskEntry("a", 0.4),), tc.ENCODING, (TensorEntry("x", "shared", dtype, shape, data=seg),)))
    return path


def _frame(data: bytes, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=content_size).compress(data)


ZSTD_CASES = [
    ("content size smaller than declared", _frame(bytes(16)), "declares 16"),
    ("content size larger than declared", _frame(bytes(40)), "declares 40"),
    ("content size missing", _frame(bytes(24), content_size=False), "declares no content size"),
    ("bytes after the frame", _frame(bytes(24)) + b"\0\0\0", "unused data"),
    ("two frames", _frame(bytes(24)) + _frame(bytes(24)), "unused data"),
    ("garbage", b"this is not zstd at all!", "not a zstd frame"),
    ("truncated frame", _frame(bytes(range(24)))[:-3], "corrupt"),
    ("skippable frame", b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd", "zstd"),
    ("empty", b"", "zstd"),
]


@pytest.mark.parametrize("stored, what", [c[1:] for c in ZSTD_CASES], ids=[c[0] for c in ZSTD_CASES])
def test_zstd_frame_errors(tmp_path: Path, stored: bytes, what: str) -> None:
    p = _one_segment_file(tmp_path / "z.tall", stored, "zstd")
    with ContainerReader(p) as r:
        with pytest.raises(FormatError) as info:
            r.read(r.header.tensors[0].data, 8)
    msg = str(info.value)
    assert str(p) in msg and "'x'" in msg and "zstd" in msg and what in msg, msg


def test_zstd_frame_claiming_more_is_refused_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a frame that says 2**40 bytes for a 24-byte tensor: refused from the frame header, nothing decompressed
    big = _frame(bytes(1 << 20))  # a real frame header with a 4-byte content size field
    p = _one_segment_file(tmp_path / "z.tall", big, "zstd")
    called = []
    monkeypatch.setattr(zstandard.ZstdDecompressor, "decompress",
                        lambda *a, **k: called.append(1), raising=False)
    with ContainerReader(p) as r, pytest.raises(FormatError, match="declares 1048576"):
        r.read(r.header.tensors[0].data, 8)
    assert called == []


def _plane_table(*lengths: int) -> bytes:
    return b"".join(n.to_bytes(8, "little") for n in lengths)


BYTEPLANE_CASES = [
    ("table does not fit", b"\x01\x02\x03", "table"),
    ("table only, lengths zero", _plane_table(*[0] * 8), "plane 0"),
    ("lengths add up to less", _plane_table(*[9] * 8) + _frame(b"\0\0\0") * 8 + b"x", "add up"),
    ("lengths add up to more", _plane_table(*[9] * 7, 10) + _frame(b"\0\0\0") * 8, "add up"),
    ("length overflowing u64 sums", _plane_table(2**64 - 1, *[1] * 7) + bytes(7), "add up"),
    ("plane with wrong size", _plane_table(*[12] * 7, len(_frame(bytes(4)))) + _frame(bytes(3)) * 7 + _frame(bytes(4)),
     "plane 7"),
    ("plane garbage", _plane_table(*[12] * 8) + _frame(b"\0\0\0") * 3 + b"x" * 12 + _frame(b"\0\0\0") * 4, "plane 3"),
]


@pytest.mark.parametrize("stored, what", [c[1:] for c in BYTEPLANE_CASES], ids=[c[0] for c in BYTEPLANE_CASES])
def test_byteplane_errors(tmp_path: Path, stored: bytes, what: str) -> None:
    p = _one_segment_file(tmp_path / "b.tall", stored, "byteplane-zstd")
    with ContainerReader(p) as r:
        with pytest.raises(FormatError) as info:
            r.verify()
    msg = str(info.value)
    assert str(p) in msg and "'x'" in msg and "byteplane-zstd" in msg and what in msg, msg


def test_byteplane_checks_every_frame_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # planes whose frames claim 3 bytes while the header claims ~700 KB per plane: refused from the frame
    # headers before the output buffer is allocated
    stored = _plane_table(*[12] * 7, 20) + _frame(b"\0\0\0") * 7 + _frame(bytes(1 << 16))
    n = len(stored) * 32768 // 8
    p = _one_segment_file(tmp_path / "c.tall", stored, "byteplane-zstd", "I64", (n,))
    allocations: list = []
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda *a, **k: allocations.append(a) or real_empty(*a, **k))
    with ContainerReader(p) as r, pytest.raises(FormatError, match="plane 0"):
        r.verify()
    assert allocations == []


def test_mask_padding_bits(tmp_path: Path) -> None:
    tallfmt = pytest.importorskip("tallfmt")
    p = tc.build(tmp_path / "m.tall", codec="raw")
    h = tc.split(p).header_json()
    seg = seg_of(h, "w", "masks.1")  # 15 bits: bit 7 of the second byte is padding
    raw = bytearray(Path(p).read_bytes())
    raw[seg["offset"] + 1] |= 0x80
    seg["xxh3"] = xxhash.xxh3_64_hexdigest(bytes(raw[seg["offset"]:seg["offset"] + seg["length"]]))
    parts = tc.split(tc.write(p, bytes(raw)))
    tc.write(p, tc.assemble(parts, header=tc.header_text(h)))
    with ContainerReader(p) as r, pytest.raises(FormatError, match=r"'w'.*masks\[1\] \(task 'b'\).*padding"):
        r.verify()  # the container checks mask padding bits too, in its one pass over the segments
    with tallfmt.open(p) as zoo:
        zoo.decode("a")
        for op in (lambda: zoo.decode("b"), lambda: zoo.mask("b", "w"), lambda: zoo.mask("b", "tied"),
                   zoo.agreement, zoo.verify, lambda: zoo.merge("consensus", k=1)):
            with pytest.raises(FormatError) as info:
                op()
            msg = str(info.value)
            assert str(p) in msg and "'w'" in msg and "'b'" in msg and "padding" in msg, msg
        zoo.merge("task_arithmetic")  # reads no mask


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="no such file"):
        ContainerReader(tmp_path / "missing.tall")
    with pytest.raises(FormatError, match="directory"):
        ContainerReader(tmp_path)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    # a FIFO must be refused, not waited on (a blocking open would hang until a writer comes)
    if kind == "fifo":
        path = tmp_path / "pipe.tall"
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
    code = (f"from tallfmt.format.container import ContainerReader\n"
            f"try:\n    ContainerReader({str(path)!r})\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("FormatError") and str(path) in out.stdout and "regular file" in out.stdout, (
        out.stdout + out.stderr)


def test_closed_reader(valid: Path) -> None:
    r = ContainerReader(valid)
    seg = r.header.tensors[2].data
    r.close()
    with pytest.raises(InputError, match="closed"):
        r.read(seg, 8)


# ----------------------------------------------------------------------------------------------
# Writer: round trips, determinism, schema, temp file + rename


ITEM_DTYPE = {1: "U8", 2: "I16", 4: "I32", 8: "I64"}

segments_strategy = st.lists(
    st.tuples(st.sampled_from(sorted(set(compression.CODECS) - compression.CONTEXT_CODECS)),  # plain codecs
              st.sampled_from([1, 2, 4, 8]),
              st.one_of(st.binary(max_size=300), st.builds(lambda n, b: bytes([b]) * n,
                                                              st.integers(0, 5000), st.integers(0, 255)))),
    max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segs=segments_strategy, n_tasks=st.integers(1, 3))
def test_writer_round_trip(tmp_path: Path, segs: list[tuple[str, int, bytes]], n_tasks: int) -> None:
    path = tmp_path / "rt.tall"
    tensors = []
    with ContainerWriter(path) as w:
        for i, (codec, isz, data) in enumerate(segs):
            data = data[:len(data) // isz * isz]
            seg = w.write_segment(data, codec, isz)
            tensors.append(TensorEntry(f"t{i}", "shared", ITEM_DTYPE[isz], (len(data) // isz,), data=seg))
        header = Header(tuple(TaskEntry(f"task{j}", 0.5) for j in range(n_tasks)), tc.ENCODING, tuple(tensors),
                        {"é": "ü"})
        w.finish(header)
    with ContainerReader(path) as r:
        assert r.header == header
        r.verify()
        for (codec, isz, data), t in zip(segs, r.header.tensors):
            assert bytes(memoryview(r.read(t.data, isz)).cast("B")) == data[:len(data) // isz * isz]
            assert t.data.offset % 64 == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_writer_accepts_numpy_and_memoryview(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    with ContainerWriter(tmp_path / "n.tall") as w:
        a = w.write_segment(arr, "byteplane-zstd", 4)
        b = w.write_segment(memoryview(arr.tobytes()), "raw", 4)
        c = w.write_segment(arr[:, ::2], "zstd", 4)  # non-contiguous: copied in C order
        w.finish(Header((TaskEntry("a", 0.4),), tc.ENCODING, (
            TensorEntry("a", "shared", "F32", (3, 4), data=a), TensorEntry("b", "shared", "F32", (3, 4), data=b),
            TensorEntry("c", "shared", "F32", (3, 2), data=c))))
    with ContainerReader(tmp_path / "n.tall") as r:
        t = r.header.tensors
        assert np.array_equal(r.read_array(t[0].data, "F32", (3, 4)), arr)
        assert np.array_equal(r.read_array(t[1].data, "F32", (3, 4)), arr)
        assert np.array_equal(r.read_array(t[2].data, "F32", (3, 2)), arr[:, ::2])


@pytest.mark.parametrize("codec", ["auto", "raw", "zstd", "byteplane-zstd"])
def test_writer_is_deterministic(tmp_path: Path, codec: str) -> None:
    a = tc.build(tmp_path / "a.tall", codec=codec).read_bytes()
    b = tc.build(tmp_path / "b.tall", codec=codec).read_bytes()
    assert a == b
    parts = tc.split(tmp_path / "a.tall")
    with ContainerReader(tmp_path / "a.tall") as r:
        assert r.header.to_bytes() == parts.header  # header bytes exactly as FORMAT.md §1.2 says
    assert parts.header == json.dumps(json.loads(parts.header), separators=(",", ":"),
                                      ensure_ascii=False).encode()


def test_header_at_end_and_layout(valid: Path) -> None:
    parts = tc.split(valid)
    size = valid.stat().st_size
    assert parts.header_offset % 64 == 0 and parts.header_offset + parts.header_length == size
    assert parts.flags == 0 and parts.reserved == bytes(16) and (parts.major, parts.minor) == (1, 1)
    offsets = sorted(s["offset"] for _, s in tc.segments(parts.header_json()))
    assert offsets[0] == 64 and all(o % 64 == 0 for o in offsets)
    assert _padding_positions(valid) and all(Path(valid).read_bytes()[i] == 0 for i in _padding_positions(valid))


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads((ROOT / "spec" / "header.schema.json").read_text())


@pytest.mark.parametrize("codec", ["auto", "raw"])
@pytest.mark.parametrize("tasks", [("a",), ("a", "b"), ("a", "b", "c")])
def test_header_matches_schema(tmp_path: Path, schema: dict, codec: str, tasks: tuple[str, ...]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    p = tc.build(tmp_path / "s.tall", codec=codec, tasks=tasks)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(tc.split(p).header_json())


@pytest.mark.parametrize("mutate", [c[1] for c in STRUCTURE_CASES if c[0] in {
    "unknown top-level key", "unknown key in a segment", "missing tau", "wrong format", "unknown dtype",
    "unknown role", "unknown codec", "unknown merge method", "unknown mask method", "negative dimension",
    "fractional dimension", "33 dimensions", "xxh3 uppercase", "empty task name", "zero tasks", "metadata value not a string",
}])
def test_schema_refuses_what_the_reader_refuses(valid: Path, schema: dict, mutate: Callable[[dict], Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    h = tc.split(valid).header_json()
    mutate(h)
    assert not jsonschema.Draft202012Validator(schema).is_valid(h)


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_exception_inside_writer_leaves_no_file(tmp_path: Path) -> None:
    p = tmp_path / "x.tall"
    with pytest.raises(RuntimeError):
        with ContainerWriter(p) as w:
            w.write_segment(b"abc" * 100, "zstd", 1)
            assert _tmp_files(tmp_path)  # writing goes to a temporary file beside the target
            raise RuntimeError("boom")
    assert not p.exists() and _tmp_files(tmp_path) == []


def test_exception_inside_writer_keeps_existing_file(tmp_path: Path) -> None:
    p = tc.build(tmp_path / "x.tall")
    before = p.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with ContainerWriter(p) as w:
            w.write_segment(b"abc" * 100, "zstd", 1)
            raise KeyboardInterrupt
    assert p.read_bytes() == before and _tmp_files(tmp_path) == []


def test_header_over_the_limit_keeps_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tallfmt.format.container as container
    p = tc.build(tmp_path / "x.tall")
    before = p.read_bytes()
    monkeypatch.setattr(container, "MAX_HEADER_BYTES", 100)
    with pytest.raises(LimitError, match="header"):
        tc.build(p)
    assert p.read_bytes() == before and _tmp_files(tmp_path) == []


def test_abort_and_finish_replace(tmp_path: Path) -> None:
    p = tc.build(tmp_path / "x.tall")
    before = p.read_bytes()
    w = ContainerWriter(p)
    w.write_segment(b"x", "raw", 1)
    w.abort()
    w.abort()  # idempotent
    assert p.read_bytes() == before and _tmp_files(tmp_path) == []
    tc.build(p, tasks=("z",))  # finish replaces the old file
    with ContainerReader(p) as r:
        assert r.header.task_names == ["z"]
    assert _tmp_files(tmp_path) == []


def test_writer_target_checks(tmp_path: Path) -> None:
    p = tc.build(tmp_path / "x.tall")
    with pytest.raises(InputError, match="already exists"):
        ContainerWriter(p, overwrite=False)
    with pytest.raises(InputError, match="directory"):
        ContainerWriter(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        ContainerWriter(tmp_path / "no" / "x.tall")
    assert _tmp_files(tmp_path) == []


def test_relative_path_in_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tc.build("rel.tall")
    with ContainerReader("rel.tall") as r:
        r.verify()
    assert os.listdir(tmp_path) == ["rel.tall"]


def test_every_written_file_gets_the_usual_mode_and_no_temporary_file(tmp_path: Path) -> None:
    """One atomic writer (FORMAT.md §8): archives, shards, the index, decoded and merged safetensors
    files and folders all get 0666 & ~umask, and no temporary file stays behind."""
    import os

    import torch

    import tallfmt
    from tallfmt.format.atomic import umask

    base = {"w": torch.zeros(6, 5), "b": torch.zeros(3)}
    tasks = {t: {"w": torch.randn(6, 5), "b": torch.randn(3)} for t in ("x", "y")}
    tallfmt.encode(base, tasks, tmp_path / "one.tall")
    tallfmt.encode(base, tasks, tmp_path / "many", shards=2)
    with tallfmt.open(tmp_path / "one.tall") as zoo:
        zoo.decode_to("x", tmp_path / "x.safetensors")
        zoo.decode_to("y", tmp_path / "y-folder", max_shard_size=64)
        zoo.merge_to(tmp_path / "m.safetensors")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 8 and not [p for p in files if p.name.startswith(".")]
    want = 0o666 & ~umask()
    assert {p.name: os.stat(p).st_mode & 0o777 for p in files} == {p.name: want for p in files}


def test_a_later_write_removes_the_temporary_files_of_dead_writers(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tallfmt.format.atomic import write_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".x.bin.{dead}-0123456789ab.tmp"           # its writer exited: removed
    alive = tmp_path / f".x.bin.{os.getppid()}-0123456789ab.tmp"   # a live process: kept
    other = tmp_path / f".y.bin.{dead}-0123456789ab.tmp"           # another target: kept
    for p in (stale, alive, other):
        p.write_bytes(b"half written")
    write_atomic(tmp_path / "x.bin", b"new")
    assert not stale.exists() and alive.exists() and other.exists()
    assert (tmp_path / "x.bin").read_bytes() == b"new"
