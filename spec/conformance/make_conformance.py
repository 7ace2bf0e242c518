"""Write the tallfmt conformance suite (spec/conformance/) from FORMAT.md alone.

    python spec/conformance/make_conformance.py            # rewrite accept/, refuse/, cases.json here
    python spec/conformance/make_conformance.py --out DIR  # write the suite into DIR instead

Every byte is written by this script with the standard library, numpy, xxhash and zstandard only
(it never imports tallfmt or torch): the preamble, the header JSON, the segments, the zstd frames
(built by hand, block by block, except one frame made once by libzstd and embedded below as hex),
the shard index and the expected-output .safetensors files (written by hand too: safetensors'
numpy API cannot hold BF16 or F8 tensors, and a hand-written file does not change with the
safetensors package version). Expected values come from plain numpy float32 arithmetic and a
round-to-nearest-even of float32 to bfloat16/float16 written here on integer bit patterns.

Running it twice gives byte-identical files (no timestamps, no randomness: "random" data comes from
XXH32 of a counter). README.md in this folder describes the suite and the manifest cases.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zstandard

HERE = Path(__file__).resolve().parent

MAGIC = b"\x89TALL\r\n\x1a"
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
DTYPES = tuple(ITEMSIZE)
MAX_FILE = 300_000        # every file of the suite is smaller than this
MAX_SUITE = 2_000_000     # and the whole suite smaller than this
FUTURE = 99               # a minor version newer than any reader of this suite knows (§7)

ENC_TA = {"merge": {"method": "task_arithmetic"}, "mask": {"method": "tall"},
          "compute_dtype": "F32", "bit_order": "little"}


def align64(n: int) -> int:
    return (n + 63) // 64 * 64


def dumps(obj: Any) -> bytes:
    """Header JSON as the reference writer emits it (FORMAT.md §1.2)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def xxh3_hex(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


# ----------------------------------------------------------------------------------------------
# Deterministic "random" data: XXH32 of (seed, counter). Stable forever, unlike numpy distributions.


def rand_u32(seed: str, n: int) -> np.ndarray:
    return np.array([xxhash.xxh32_intdigest(f"{seed}:{i}".encode()) for i in range(n)], dtype=np.uint32)


def rand_f32(seed: str, n: int, scale: float = 1.0) -> np.ndarray:
    """Floats in [-scale, scale): float64 arithmetic on the integers, then one rounding to float32."""
    u = rand_u32(seed, n).astype(np.float64)
    return ((u / 2.0**32 - 0.5) * 2.0 * scale).astype(np.float32)


def rand_bits(seed: str, n: int, p: float) -> np.ndarray:
    """n booleans, each True with probability about p."""
    return rand_u32(seed, n).astype(np.float64) / 2.0**32 < p


# ----------------------------------------------------------------------------------------------
# float32 helpers and rounding (FORMAT.md §4.4): float32 -> bfloat16 / float16, nearest even


def f32_bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def bits_f32(u: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(u, dtype=np.uint32)).view(np.float32)


def f32(x: float) -> np.float32:
    return np.float32(x)


def u32_of(x: float) -> int:
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def round_f32_bits(u: int, exp_bits: int, man_bits: int) -> int:
    """The float32 with bit pattern u rounded to nearest (ties to even) in the binary format with
    `exp_bits` exponent and `man_bits` mantissa bits (IEEE layout, with subnormals and infinities).
    Finite values only. Written on exact integers: value = M * 2**E."""
    sign = (u >> 31) & 1
    exp = (u >> 23) & 0xFF
    man = u & 0x7FFFFF
    assert exp != 0xFF
    top = sign << (exp_bits + man_bits)
    if exp == 0 and man == 0:
        return top
    M, E = (man, -149) if exp == 0 else (man | 0x800000, exp - 150)
    bias = (1 << (exp_bits - 1)) - 1
    emin = 1 - bias                       # exponent of the smallest normal number
    lead = M.bit_length() - 1 + E         # floor(log2(value))
    Q = max(lead, emin) - man_bits        # the target's quantum (ulp) at this value is 2**Q
    shift = Q - E
    if shift <= 0:
        n = M << -shift
    else:
        n = M >> shift
        rem, half = M - (n << shift), 1 << (shift - 1)
        if rem > half or (rem == half and n & 1):
            n += 1
    if n == 0:
        return top                        # underflow to a signed zero
    lead = n.bit_length() - 1 + Q
    if lead > bias:
        return top | (((1 << exp_bits) - 1) << man_bits)   # overflow: infinity
    if lead < emin:
        return top | n                    # subnormal (n < 2**man_bits)
    mant = (n >> (n.bit_length() - 1 - man_bits)) & ((1 << man_bits) - 1)
    return top | ((lead + bias) << man_bits) | mant


def f32_to_bf16_bits(u: int) -> int:
    if (u & 0x7FFFFFFF) > 0x7F800000:                      # NaN: quiet, sign and top payload kept
        return (u >> 16) | 0x0040
    if (u & 0x7FFFFFFF) == 0x7F800000:
        return u >> 16
    return round_f32_bits(u, 8, 7)


def f32_to_f16_bits(u: int) -> int:
    sign = (u >> 16) & 0x8000
    if (u & 0x7FFFFFFF) > 0x7F800000:                      # NaN: quiet, sign and top payload kept
        return sign | 0x7E00 | ((u & 0x7FFFFF) >> 13 & 0x3FF)
    if (u & 0x7FFFFFFF) == 0x7F800000:
        return sign | 0x7C00
    return round_f32_bits(u, 5, 10)


def _self_check_rounding() -> None:
    """The rounding above against two independent references: the classic bfloat16 bit trick, and
    numpy's float32 -> float16 conversion (both on non-NaN values)."""
    pats = [int(x) for x in rand_u32("rounding-check", 4000)]
    pats += [0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
             0x3F808000, 0x3F818000, 0x3F807FFF, 0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001, 0x387FC000,
             0x38800000, 0x337FFFFF, 0x33800000, 0x33C00000, 0x7F7F8000, 0x7F7F7FFF, 0x00008000, 0x00018000]
    pats += [u for k in range(0, 0x100000000, 0x00F00FF1) for u in (k, k | 0x8000, k | 0x1000)]
    pats = [p & 0xFFFFFFFF for p in pats if (p & 0x7FFFFFFF) <= 0x7F800000]
    arr = np.array(pats, dtype=np.uint32)
    with np.errstate(over="ignore"):
        ref16 = arr.view(np.float32).astype(np.float16).view(np.uint16)
    for u, r16 in zip(pats, ref16.tolist()):
        bf = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
        assert f32_to_bf16_bits(u) == bf, hex(u)
        assert f32_to_f16_bits(u) == r16, (hex(u), hex(r16), hex(f32_to_f16_bits(u)))


def widen(dtype: str, bits: np.ndarray) -> np.ndarray:
    """θ0's storage bits -> float32 (exact)."""
    if dtype == "F32":
        return bits_f32(bits)
    if dtype == "BF16":
        return bits_f32(bits.astype(np.uint32) << 16)
    assert dtype == "F16"
    return np.ascontiguousarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


def narrow(dtype: str, x: np.ndarray) -> np.ndarray:
    """float32 -> the tensor's storage bits, one rounding (F32: none)."""
    u = f32_bits(x)
    if dtype == "F32":
        return u.copy()
    fn = f32_to_bf16_bits if dtype == "BF16" else f32_to_f16_bits
    return np.array([fn(int(v)) for v in u.tolist()], dtype=np.uint16)


def to_bits(dtype: str, x: np.ndarray) -> np.ndarray:
    """float32 values as θ0 storage bits of `dtype` (rounded once)."""
    return narrow(dtype, np.asarray(x, dtype=np.float32))


def storage_bytes(dtype: str, bits: np.ndarray) -> bytes:
    return np.ascontiguousarray(bits, dtype="<u4" if dtype == "F32" else "<u2").tobytes()


# ----------------------------------------------------------------------------------------------
# zstd frames by hand (RFC 8878): raw, RLE and compressed blocks (literals only, no sequences)

BLOCK_MAX = 128 * 1024


def _block(kind: str, payload: bytes, last: bool, cap: int = BLOCK_MAX) -> bytes:
    """One block: kind raw (payload = bytes), rle (payload = the byte, repeated `len` times: pass
    bytes([b]) * n), lit / rlelit (a compressed block of raw / RLE literals and no sequences)."""
    if kind == "raw":
        body, size, btype = payload, len(payload), 0
    elif kind == "rle":
        assert payload and len(set(payload)) == 1
        body, size, btype = payload[:1], len(payload), 1
    else:
        n = len(payload)
        ltype = 0 if kind == "lit" else 1
        if n < 32:
            lh = bytes([ltype | (n << 3)])
        elif n < 4096:
            lh = bytes([ltype | 0b0100 | (n & 0xF) << 4, n >> 4])
        else:
            lh = bytes([ltype | 0b1100 | (n & 0xF) << 4, (n >> 4) & 0xFF, n >> 12])
        lits = payload if ltype == 0 else payload[:1]
        assert ltype == 0 or len(set(payload)) == 1
        body = lh + lits + b"\x00"        # Number_of_Sequences = 0
        size, btype = len(body), 2
    assert size <= cap, (kind, size, cap)
    head = (1 if last else 0) | (btype << 1) | (size << 3)
    return struct.pack("<I", head)[:3] + body


def _lit_size(kind: str, n: int) -> int:
    """Block_Size of a compressed block of n raw (lit) or RLE (rlelit) literals and no sequences."""
    return (1 if n < 32 else 2 if n < 4096 else 3) + (n if kind == "lit" else 1) + 1


def _chunks(content: bytes, style: str, cap: int) -> list[tuple[str, bytes]]:
    out = _chunks1(content, style, cap)
    # a compressed block larger than Block_Maximum_Size is invalid: store those chunks raw / RLE
    return [(("raw" if k == "lit" else "rle") if k in ("lit", "rlelit") and _lit_size(k, len(d)) > cap else k, d)
            for k, d in out]


def _chunks1(content: bytes, style: str, cap: int) -> list[tuple[str, bytes]]:
    """Split content into (block kind, bytes) following a style; `cap` is Block_Maximum_Size (the
    smaller of the window and 128 KiB; a single-segment frame's window is its content size), which
    bounds every block's Block_Size, compressed ones included."""
    if not content:
        return []
    if style == "raw":
        return [("raw", content[i:i + cap]) for i in range(0, len(content), cap)]
    if style == "lit":
        if len(content) <= 8:
            return [("raw", content)]
        c = min(4000, cap - 4)
        return [("lit", content[i:i + c]) for i in range(0, len(content), c)]
    if style in ("rle", "mixed"):
        out: list[tuple[str, bytes]] = []
        i, k = 0, 0
        while i < len(content):
            j = i
            while j < len(content) and content[j] == content[i] and j - i < cap:
                j += 1
            if j - i >= 4:
                out.append(("rle" if style == "rle" or k % 2 == 0 else "rlelit", content[i:j]))
                i, k = j, k + 1
                continue
            # a stretch without long runs
            j = i
            while j < len(content) and j - i < min(37, cap - 4):
                if j + 4 <= len(content) and len(set(content[j:j + 4])) == 1:
                    break
                j += 1
            j = max(j, i + 1)
            out.append(("raw" if style == "rle" or k % 2 == 0 else "lit", content[i:j]))
            i, k = j, k + 1
        return out
    raise ValueError(style)


def zstd_frame(content: bytes, *, style: str = "raw", fcs: int | None = None, single: bool = True,
               window: tuple[int, int] | None = None, checksum: bool = False, stated: int | None = None,
               empty_last: bool = False, dict_id: int | None = None, reserved_bit: bool = False,
               blocks: list[tuple[str, bytes]] | None = None, bad_checksum: bool = False) -> bytes:
    """A zstd frame holding `content`.

    fcs: Frame_Content_Size field bytes (0: absent, only without single segment; 1: only single
    segment; 2, 4, 8); by default the smallest that fits. window: (log2, mantissa) of the
    Window_Descriptor when not single-segment. stated: the content size to write (default: the real one).
    """
    n = len(content) if stated is None else stated
    if fcs is None:
        fcs = (1 if single and n < 256 else 2 if 256 <= n < 65792 else 4 if n < 2**32 else 8)
        if not single and fcs == 1:
            fcs = 4
    flag = {0: 0, 1: 0, 2: 1, 4: 2, 8: 3}[fcs]
    assert not (fcs == 1 and not single) and not (fcs == 0 and single)
    did_flag = 0 if dict_id is None else 1 if dict_id < 256 else 2 if dict_id < 65536 else 3
    fhd = flag << 6 | (0x20 if single else 0) | (0x08 if reserved_bit else 0) | (0x04 if checksum else 0) | did_flag
    out = bytearray(struct.pack("<I", 0xFD2FB528)) + bytes([fhd])
    if not single:
        log, mant = window or (10, 0)
        out.append((log - 10) << 3 | mant)
    if dict_id is not None:
        out += dict_id.to_bytes({1: 1, 2: 2, 3: 4}[did_flag], "little")
    if fcs == 1:
        out.append(n)
    elif fcs == 2:
        assert 256 <= n < 65792
        out += struct.pack("<H", n - 256)
    elif fcs == 4:
        out += struct.pack("<I", n)
    elif fcs == 8:
        out += struct.pack("<Q", n)
    if single:
        window_size = n
    else:
        log, mant = window or (10, 0)
        window_size = (1 << log) + ((1 << log) >> 3) * mant
    cap = max(1, min(window_size, BLOCK_MAX))
    parts = blocks if blocks is not None else _chunks(content, style, cap)
    if empty_last or not parts:
        parts = [*parts, ("raw", b"")]
    for i, (kind, data) in enumerate(parts):
        out += _block(kind, data, i == len(parts) - 1, cap if blocks is None else BLOCK_MAX)
    if checksum:
        digest = xxhash.xxh64_intdigest(content) & 0xFFFFFFFF
        out += struct.pack("<I", digest ^ (1 if bad_checksum else 0))
    return bytes(out)


def check_frame(frame: bytes, content: bytes) -> bytes:
    """Assert that libzstd decodes `frame` (one frame, nothing after it) to `content`."""
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size == len(content), (params.content_size, len(content))
    got = zstandard.ZstdDecompressor().decompress(frame, allow_extra_data=False)
    assert got == content
    return frame


# One frame made by libzstd (level 19: Huffman-coded literals, FSE-coded sequences), embedded so that
# the suite does not change with the libzstd version. It holds 96 float32: ((i*37) % 64 - 32) / 64.
LIBZSTD_F32_96 = bytes.fromhex(
    "28b52ffd60800095040006102219c06b0e1e7aefbd1fa1d8d07befbdf7fbfd3eb190ffff3f900219001b001a004ef8"
    "590fc90efb01bbe5c7ecfeb2a5bbea57ec90df33d13c3deefa053be5d74c603f6da9d8513f6377fca08964b72d513b"
    "e7971ccf99a07edb52b2837ec7cef85113c54e5bc276cd4fd905bfeb0f52b37b7ec8aef8551377d9ef8ef92d3be087"
    "1d253beb27ec92030100007d205d53")
LIBZSTD_F32_96_VALUES = np.array([((i * 37) % 64 - 32) / 64.0 for i in range(96)], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Segments and codecs (FORMAT.md §5)


@dataclass
class Seg:
    """A segment: its stored bytes, decoded length and codec; `offset` is set when placed.
    `place`: sort key of its position in the file (default: table order). `extra`: unknown keys."""

    stored: bytes
    decoded_length: int
    codec: str
    place: float | None = None
    extra: dict = field(default_factory=dict)
    offset: int | None = None
    shift: int = 0                  # hostile layouts: start this many bytes after align64(previous end)
    fill: int = 0                   # hostile layouts: the padding byte before this segment

    def json(self) -> dict:
        return {"offset": self.offset, "length": len(self.stored), "decoded_length": self.decoded_length,
                "codec": self.codec, "xxh3": xxh3_hex(self.stored), **self.extra}


def planes_of(data: bytes, s: int) -> list[bytes]:
    assert len(data) % s == 0
    return [data[j::s] for j in range(s)]


def byteplane(frames: list[bytes]) -> bytes:
    return struct.pack(f"<{len(frames)}Q", *map(len, frames)) + b"".join(frames)


def tau_rans(packed: bytes, n: int, tau: np.ndarray, *, lanes: int = 1, mode: int = 1) -> bytes:
    """A mask in the tau-rans codec (FORMAT.md §5.1) from that section's text: MODE 0 (raw) or MODE 1
    (rANS, K = `lanes`), R = the lower median key, the informative encoder, plain Python integers."""
    if mode == 0:
        return bytes([0xA1, 0]) + packed
    assert n >= 1 and 1 <= lanes <= 16
    bits = [(packed[i >> 3] >> (i & 7)) & 1 for i in range(n)]
    au = [int(v) & 0x7FFFFFFF for v in np.ascontiguousarray(tau, dtype=np.float32).view(np.uint32)]
    keys = sorted(a >> 22 for a in au if a)
    R = keys[(len(keys) + 1) // 2 - 1] if keys else 0
    c = 64 * -(-(-(-n // 64)) // lanes)
    prob = [0] * n
    for k in range(lanes):  # the forward model pass: the p each bit is coded with
        P, T = [32768] * 160, [1] * 160
        for j in range(c):
            i = k * c + j
            if i >= n:
                break
            a = au[i]
            q = 0 if a == 0 else min(max((a >> 22) - R + 8, 1), 15)
            prev = [bits[i - d] if j - d >= 0 else 0 for d in range(1, 9)]
            m = sum(prev)
            level = 0 if m == 0 else 1 if m <= 2 else 2 if m <= 5 else 3 if m <= 7 else 4
            ctx = q + 16 * (5 * prev[0] + level)
            prob[i] = P[ctx]
            P[ctx] += ((65505 if bits[i] else 31) - P[ctx]) >> T[ctx].bit_length()
            T[ctx] = min(T[ctx] + 1, 32)
    x = [1 << 32] * lanes
    emitted: list[int] = []
    order = [k * c + j for j in range(c) for k in range(lanes) if k * c + j < n]
    for i in reversed(order):
        k = i // c
        f, start = (prob[i], 0) if bits[i] else (65536 - prob[i], prob[i])
        if x[k] >= f << 48:
            emitted.append(x[k] & 0xFFFFFFFF)
            x[k] >>= 32
        x[k] = (x[k] // f << 16) + x[k] % f + start
    return (bytes([0xA1, 1, lanes]) + R.to_bytes(2, "little") + b"".join(v.to_bytes(8, "little") for v in x)
            + b"".join(w.to_bytes(4, "little") for w in reversed(emitted)))


def encode(data: bytes, itemsize: int, codec: str, style: Any = "raw") -> Seg:
    """Encode decoded bytes with a codec. style: the zstd frame keyword arguments (a dict), a block
    style name, or for byteplane-zstd a list of either, one per plane (cycled)."""
    if codec == "auto":
        codec = "zstd" if itemsize == 1 else "byteplane-zstd"
    if codec == "raw":
        return Seg(data, len(data), "raw")
    if codec == "zstd":
        if isinstance(style, dict) and "frame" in style:          # a frame made elsewhere
            return Seg(check_frame(style["frame"], data), len(data), "zstd")
        kw = style if isinstance(style, dict) else {"style": style}
        return Seg(check_frame(zstd_frame(data, **kw), data), len(data), "zstd")
    assert codec == "byteplane-zstd"
    styles = style if isinstance(style, list) else [style]
    frames = []
    for j, plane in enumerate(planes_of(data, itemsize)):
        st = styles[j % len(styles)]
        kw = st if isinstance(st, dict) else {"style": st}
        frames.append(check_frame(zstd_frame(plane, **kw), plane))
    return Seg(byteplane(frames), len(data), "byteplane-zstd")


# ----------------------------------------------------------------------------------------------
# A .tall file (FORMAT.md §1): preamble, segments, header


def preamble(*, magic: bytes = MAGIC, major: int = 1, minor: int = 0, flags: int = 0, header_offset: int,
             header_length: int, header_xxh3: int, preamble_xxh3: int | None = None,
             reserved: bytes = bytes(16)) -> bytes:
    head = struct.pack("<8sHHIQQQ", magic, major, minor, flags, header_offset, header_length, header_xxh3)
    if preamble_xxh3 is None:
        preamble_xxh3 = xxhash.xxh3_64_intdigest(head)
    return head + struct.pack("<Q", preamble_xxh3) + reserved


@dataclass
class Built:
    """A laid-out archive: `data` is bytes [64, H) (segments and zero padding), `header` the JSON object."""

    header: dict
    data: bytes
    major: int = 1
    minor: int = 0

    def text(self) -> bytes:
        return dumps(self.header)

    def file(self, text: bytes | None = None, *, data: bytes | None = None, trailing: bytes = b"",
             **pre: Any) -> bytes:
        """The file bytes; preamble fields can be overridden (checksums are computed unless given)."""
        raw = self.text() if text is None else text
        data = self.data if data is None else data
        fields = {"major": self.major, "minor": self.minor, "header_offset": 64 + len(data),
                  "header_length": len(raw), "header_xxh3": xxhash.xxh3_64_intdigest(raw)}
        fields.update(pre)
        return preamble(**fields) + data + raw + trailing


def collect_segs(obj: Any, out: list[Seg]) -> list[Seg]:
    if isinstance(obj, Seg):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            collect_segs(v, out)
    elif isinstance(obj, list):
        for v in obj:
            collect_segs(v, out)
    return out


def to_json(obj: Any) -> Any:
    if isinstance(obj, Seg):
        return obj.json()
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    return obj


def layout(rows: list[dict]) -> bytes:
    """Place every segment of the rows (sorted by `place`, default table order) at align64 of the
    previous end, the first at 64; returns the data section [64, H) with zero padding."""
    segs = collect_segs(rows, [])
    order = sorted(range(len(segs)), key=lambda i: (segs[i].place if segs[i].place is not None else i, i))
    buf = bytearray()
    pos = 64
    for i in order:
        s = segs[i]
        s.offset = align64(pos) + s.shift
        buf += bytes([s.fill]) * (s.offset - 64 - len(buf))
        buf += s.stored
        pos = s.offset + len(s.stored)
    buf += bytes(align64(pos) - 64 - len(buf))
    return bytes(buf)


def task_json(name: str, lam: float | None = 0.4, stats: dict | None = None) -> dict:
    return {"name": name, "lambda": lam, "stats": {} if stats is None else stats}


def build(tasks: list[dict], encoding: dict, rows: list[dict], metadata: dict | None = None, *,
          minor: int = 0, major: int = 1, top_extra: dict | None = None) -> Built:
    data = layout(rows)
    header = {"format": "tallfmt", "version": [major, minor], "tasks": tasks, "encoding": encoding,
              "tensors": to_json(rows), "metadata": {} if metadata is None else metadata}
    if top_extra:
        header.update(top_extra)
    header = copy.deepcopy(header)      # cases edit headers in place: share nothing with other cases
    return Built(header, data, major, minor)


# ----------------------------------------------------------------------------------------------
# Tensors with their meaning, for the accept cases: each gives its header row (with segments) and
# what a reader must produce from it (FORMAT.md §2, §4.4)

Value = tuple[str, tuple[int, ...], bytes]   # (dtype, shape, little-endian element bytes)


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def pack_mask(bits: np.ndarray) -> bytes:
    """Element i is bit i % 8 of byte i // 8, least significant first; padding bits zero (§3)."""
    bits = np.asarray(bits, dtype=bool).reshape(-1)
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits.tolist()):
        if b:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


@dataclass
class Masked:
    name: str
    dtype: str                      # F32, F16 or BF16
    shape: tuple[int, ...]
    base: np.ndarray                # θ0 storage bits (uint32 for F32, uint16 otherwise)
    tau: np.ndarray                 # τ_MTL, float32 (any bit patterns)
    masks: list[np.ndarray]         # one bool array of n elements per task
    codec: str = "auto"             # for every segment, or a dict base/tau/masks -> codec
    style: Any = "raw"
    rans: dict = field(default_factory=dict)  # tau-rans masks: {"lanes": K, "mode": 0 or 1}
    residuals: list | None = None   # §11 (1.2): per task None or (positions, value dtype, value bits)
    role = "masked"

    def __post_init__(self) -> None:
        n = numel(self.shape)
        self.base = np.asarray(self.base, dtype=np.uint32 if self.dtype == "F32" else np.uint16).reshape(-1)
        self.tau = np.ascontiguousarray(self.tau, dtype=np.float32).reshape(-1)
        self.masks = [np.asarray(m, dtype=bool).reshape(-1) for m in self.masks]
        assert len(self.base) == n and len(self.tau) == n and all(len(m) == n for m in self.masks)

    def _codec(self, part: str) -> str:
        return self.codec[part] if isinstance(self.codec, dict) else self.codec

    def row(self) -> dict:
        isz = ITEMSIZE[self.dtype]
        return {"name": self.name, "role": "masked", "dtype": self.dtype, "shape": list(self.shape),
                "base": encode(storage_bytes(self.dtype, self.base), isz, self._codec("base"), self.style),
                "tau": encode(self.tau.tobytes(), 4, self._codec("tau"), self.style),
                "masks": [self._mask_seg(m) for m in self.masks],
                **({} if self.residuals is None else {"residuals": [self._residual(r) for r in self.residuals]})}

    def _mask_seg(self, m: np.ndarray) -> Seg:
        packed = pack_mask(m)
        if self._codec("masks") != "tau-rans":
            return encode(packed, 1, self._codec("masks"), self.style)
        return Seg(tau_rans(packed, len(m), self.tau, **self.rans), len(packed), "tau-rans")

    def _residual(self, r: tuple | None) -> dict | None:
        """§11: count, dtype, the positions as u32 gaps (first, then p_j − p_{j−1} − 1), the values."""
        if r is None:
            return None
        pos, dtype, bits = r
        gaps = [pos[0]] + [b - a - 1 for a, b in zip(pos, pos[1:])]
        codec = self.codec.get("residuals", "auto") if isinstance(self.codec, dict) else self.codec
        return {"count": len(pos), "dtype": dtype,
                "positions": encode(struct.pack(f"<{len(gaps)}I", *gaps), 4, codec, self.style),
                "values": encode(storage_bytes(dtype, np.asarray(bits)), ITEMSIZE[dtype], codec, self.style)}

    def _value(self, bits: np.ndarray) -> Value:
        return (self.dtype, self.shape, storage_bytes(self.dtype, bits))

    def combine(self, alpha: float | None, keep: np.ndarray | None) -> Value:
        """round(θ0_f + a) where keep (everywhere if None), θ0 bit for bit elsewhere; a = τ for a
        task decode (alpha None), else float32(α) · τ (§4.4)."""
        with np.errstate(all="ignore"):
            theta0 = widen(self.dtype, self.base)
            a = self.tau if alpha is None else np.float32(alpha) * self.tau
            out = narrow(self.dtype, theta0 + a)
        if keep is not None:
            out = np.where(keep, out, self.base)
        return self._value(out)

    def decode(self, t: int) -> Value | None:
        r = None if self.residuals is None else self.residuals[t]
        if r is None:
            return self.combine(None, self.masks[t])
        # §11: a = θ0_f + τ where the bit is set (one float32 addition), θ0_f where clear; at each entry
        # round(a + r), one float32 addition and one rounding; §4.4 elsewhere
        pos, dtype, bits = r
        with np.errstate(all="ignore"):
            theta0 = widen(self.dtype, self.base)
            a = np.where(self.masks[t], theta0 + self.tau, theta0).astype(np.float32)
            out = np.where(self.masks[t], narrow(self.dtype, a), self.base)
            idx = np.asarray(pos, dtype=np.int64)
            out[idx] = narrow(self.dtype, (a[idx] + widen(dtype, np.asarray(bits))).astype(np.float32))
        return self._value(out)

    def counts(self) -> np.ndarray:
        c = np.zeros(len(self.tau), dtype=np.int64)
        for m in self.masks:
            c += m
        return c

    def merge(self, kind: str, k: int, alpha: float) -> Value | None:
        if kind == "zeroshot":
            return self._value(self.base)
        if kind == "task_arithmetic":
            return self.combine(alpha, None)
        return self.combine(alpha, self.counts() >= k)


@dataclass
class Shared:
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    codec: str = "auto"
    style: Any = "raw"
    role = "shared"

    def __post_init__(self) -> None:
        assert len(self.data) == numel(self.shape) * ITEMSIZE[self.dtype]

    def row(self) -> dict:
        return {"name": self.name, "role": "shared", "dtype": self.dtype, "shape": list(self.shape),
                "data": encode(self.data, ITEMSIZE[self.dtype], self.codec, self.style)}

    def decode(self, t: int) -> Value | None:
        return (self.dtype, self.shape, self.data)

    def merge(self, kind: str, k: int, alpha: float) -> Value | None:
        return (self.dtype, self.shape, self.data)


@dataclass
class Item:
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    codec: str = "auto"
    style: Any = "raw"

    def __post_init__(self) -> None:
        assert len(self.data) == numel(self.shape) * ITEMSIZE[self.dtype]

    def json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape),
                "data": encode(self.data, ITEMSIZE[self.dtype], self.codec, self.style)}

    def value(self) -> Value:
        return (self.dtype, self.shape, self.data)


@dataclass
class PerTask:
    name: str
    base: Item | None
    items: list[Item | None]
    role = "per_task"

    def row(self) -> dict:
        return {"name": self.name, "role": "per_task", "base": None if self.base is None else self.base.json(),
                "tasks": [None if it is None else it.json() for it in self.items]}

    def decode(self, t: int) -> Value | None:
        it = self.items[t]
        return None if it is None else it.value()

    def merge(self, kind: str, k: int, alpha: float) -> Value | None:
        return None if self.base is None else self.base.value()


@dataclass
class Alias:
    name: str
    target: str
    role = "alias"

    def row(self) -> dict:
        return {"name": self.name, "role": "alias", "target": self.target}


def merge_label(kind: str, k: int | None = None, alpha: float | None = None) -> str:
    if kind == "zeroshot":
        return "zeroshot"
    if kind == "task_arithmetic":
        return f"task_arithmetic@{alpha!r}"
    return f"consensus@{k}@{alpha!r}"


def parse_label(label: str) -> tuple[str, int, float]:
    kind, *p = label.split("@")
    if kind == "zeroshot":
        return kind, 0, 0.0
    if kind == "task_arithmetic":
        return kind, 0, float(p[0])
    return kind, int(p[0]), float(p[1])


DEFAULT_MERGES = ["zeroshot", "task_arithmetic@0.5", "task_arithmetic@-1.0", "consensus@0@0.5",
                  "consensus@1@0.5", "consensus@2@1.0"]


def expected_outputs(task_names: list[str], tensors: list[Any], merges: list[str]) -> dict[str, Value]:
    """What a reader must produce: task/<task>/<tensor>, mask/<task>/<tensor> (U8 0/1, masked rows
    only), merge/<label>/<tensor>, agreement (I64, T+1: parameters of masked tensors kept by exactly
    n task masks)."""
    by_name = {t.name: t for t in tensors}
    out: dict[str, Value] = {}

    def src(t: Any) -> Any:
        return by_name[t.target] if t.role == "alias" else t

    for i, task in enumerate(task_names):
        for t in tensors:
            v = src(t).decode(i)
            if v is not None:
                out[f"task/{task}/{t.name}"] = v
        for t in tensors:
            if t.role == "masked":
                out[f"mask/{task}/{t.name}"] = ("U8", t.shape, t.masks[i].astype(np.uint8).tobytes())
    for label in merges:
        kind, k, alpha = parse_label(label)
        for t in tensors:
            v = src(t).merge(kind, k, alpha)
            if v is not None:
                out[f"merge/{label}/{t.name}"] = v
    agreement = np.zeros(len(task_names) + 1, dtype="<i8")
    for t in tensors:
        if t.role == "masked":
            agreement += np.bincount(t.counts(), minlength=len(task_names) + 1).astype("<i8")
    out["agreement"] = ("I64", (len(task_names) + 1,), agreement.tobytes())
    return out


# ----------------------------------------------------------------------------------------------
# .safetensors, by hand: u64 header length, JSON header (padded with spaces to 8), data

ST_DTYPE = {d: d for d in DTYPES}


def safetensors_bytes(tensors: dict[str, Value], metadata: dict[str, str]) -> bytes:
    order = sorted(tensors, key=lambda k: (-ITEMSIZE[tensors[k][0]], k))
    head: dict[str, Any] = {"__metadata__": metadata}
    pos, data = 0, bytearray()
    for k in order:
        dtype, shape, raw = tensors[k]
        assert len(raw) == numel(shape) * ITEMSIZE[dtype], k
        head[k] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        data += raw
        pos += len(raw)
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(data)


# ----------------------------------------------------------------------------------------------
# The shard index (FORMAT.md §9.2)


def seal_index(obj: dict, *, ws_before_colon: str = "", ws_after_colon: str = " ", tail: str = "\n}\n") -> bytes:
    """The index text: json.dumps(indent=2) of the object without its checksum, then the checksum
    member (XXH3-64 of every byte before its key's opening quote) as the last member."""
    body = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    assert body.endswith("}") and obj
    raw = (body[:-1].rstrip() + ",\n  ").encode("utf-8")
    return raw + f'"checksum"{ws_before_colon}:{ws_after_colon}"{xxh3_hex(raw)}"{tail}'.encode()


def index_obj(tasks: list[dict], encoding: dict, thresholds: dict, metadata: dict, shards: list[dict],
              weight_map: dict, version: tuple[int, int] = (1, 0), extra: dict | None = None) -> dict:
    obj = {"format": "tallfmt-index", "version": list(version), "tasks": tasks, "encoding": encoding,
           "thresholds": thresholds, "metadata": metadata, "shards": shards, "weight_map": weight_map}
    if extra:
        obj.update(extra)
    return copy.deepcopy(obj)


def shard_entry(file: str, data: bytes) -> dict:
    return {"file": file, "size": len(data), "header_xxh3": f"{struct.unpack_from('<Q', data, 32)[0]:016x}"}


# ----------------------------------------------------------------------------------------------
# The suite: files and manifest entries


@dataclass(frozen=True)
class Link:
    """A symbolic link (relative target) to write instead of a file."""

    target: str


FILES: dict[str, bytes | Link] = {}
CASES: list[dict] = []


def add_file(rel: str, data: bytes | Link) -> None:
    assert rel not in FILES, rel
    FILES[rel] = data


def f32_bytes(vals: Any) -> bytes:
    return np.asarray(vals, dtype="<f4").tobytes()


def tall_masks(taus: list[np.ndarray], lambdas: list[float]) -> tuple[np.ndarray, list[np.ndarray]]:
    """τ_MTL by task arithmetic (from +0.0, task order) and the TALL masks (§4.2, §4.3), float32."""
    mtl = np.zeros(len(taus[0]), dtype=np.float32)
    for t in taus:
        mtl = mtl + t
    return mtl, [np.abs(t) >= np.float32(lam) * np.abs(mtl - t) for t, lam in zip(taus, lambdas)]


def natural(name: str, dtype: str, shape: tuple[int, ...], lambdas: list[float], *, codec: Any = "auto",
            style: Any = "raw", p: float = 0.6) -> Masked:
    """A masked tensor as an encoder makes it from synthetic fine-tunes: θ0, θ_t in `dtype`,
    τ_t = float32(θ_t) − float32(θ0), τ_MTL by task arithmetic, TALL masks."""
    n = numel(shape)
    base = to_bits(dtype, rand_f32(f"{name}.base", n, 0.05))
    theta0 = widen(dtype, base)
    taus = []
    for i in range(len(lambdas)):
        delta = rand_f32(f"{name}.d{i}", n, 0.01) * rand_bits(f"{name}.k{i}", n, p)
        theta = widen(dtype, to_bits(dtype, theta0 + delta))
        taus.append(theta - theta0)
    mtl, masks = tall_masks(taus, lambdas)
    return Masked(name, dtype, shape, base, mtl, masks, codec, style)


def residual_tensors() -> list[Any]:
    """Masked tensors with residuals (§11) for the accept case 'residuals' (three tasks)."""
    w = natural("rw", "F32", (5, 7), [0.4, 0.4, 0.4], codec="raw")
    w.residuals = [([0, 3, 17, 34], "F32", to_bits("F32", np.array([0.25, -1e-3, 3e-5, -0.5], np.float32))), None,
                   ([34], "BF16", to_bits("BF16", np.array([0.125], np.float32)))]
    n = 9
    base = np.full(n, 0x3F80, dtype=np.uint16)   # 1.0
    base[5] = 0x8000                              # -0.0
    tau = rand_f32("rh.tau", n, 0.01)
    tau[2] = np.float32(2.0 ** -8)                # 1 + 2^-8 is a tie in bfloat16: rounding it first gives 1.0
    masks = [rand_bits(f"rh.m{i}", n, 0.5) for i in range(3)]
    masks[0][2], masks[0][5] = True, False
    h = Masked("rh", "BF16", (n,), base, tau, masks, codec={"base": "raw", "tau": "zstd", "masks": "raw"})
    h.residuals = [([2, 5, 8], "BF16", to_bits("BF16", np.array([2.0 ** -10, 0.5, -0.75], np.float32))),
                   ([0], "F32", to_bits("F32", np.array([1e-7], np.float32))), None]
    v = natural("rv", "F16", (13,), [0.4, 0.4, 0.4])
    v.residuals = [None, ([0, 12], "F16", to_bits("F16", np.array([0.001, -2.0], np.float32))), None]
    return [w, h, v]


def accept(name: str, section: str, description: str, tasks: list[dict], encoding: dict, tensors: list[Any],
           metadata: dict | None = None, merges: list[str] | None = None, *, minor: int = 0,
           top_extra: dict | None = None, header_fn: Callable[[dict], None] | None = None,
           text_fn: Callable[[Built], bytes] | None = None) -> None:
    merges = DEFAULT_MERGES if merges is None else merges
    b = build(tasks, encoding, [t.row() for t in tensors], metadata, minor=minor, top_extra=top_extra)
    if header_fn is not None:
        header_fn(b.header)       # only changes a reader ignores (unknown keys of a newer minor)
    add_file(f"accept/{name}.tall", b.file(None if text_fn is None else text_fn(b)))
    _accept_entry(name, f"accept/{name}.tall", section, description, [t["name"] for t in tasks], tensors, merges)


def _accept_entry(name: str, path: str, section: str, description: str, task_names: list[str],
                  tensors: list[Any], merges: list[str]) -> None:
    exp = expected_outputs(task_names, tensors, merges)
    add_file(f"accept/{name}.expected.safetensors", safetensors_bytes(exp, {"case": name}))
    CASES.append({"id": f"accept/{name}", "path": path, "expect": "accept",
                  "expected": f"accept/{name}.expected.safetensors", "merges": merges,
                  "section": section, "description": description})


def accept_cases() -> None:
    P = u32_of

    # --- minimal ------------------------------------------------------------------------------
    w = natural("w", "F32", (4, 6), [0.4], codec="raw")
    accept("minimal", "§1, §2 masked, §4.4", "one F32 masked tensor, one task, raw segments: decodable by hand",
           [task_json("only", 0.4)], ENC_TA, [w], merges=["zeroshot", "task_arithmetic@0.5", "consensus@1@0.5"])

    # --- every role, several tasks -------------------------------------------------------------
    lams = [0.3, 0.4, 0.5, 0.6, 0.8]
    names = ["alpha", "beta", "gamma", "delta", "epsilon"]
    rng = rand_f32("roles.head", 200, 0.5)
    tensors = [
        Alias("tied_early", "enc.w"),                          # an alias listed before its target
        natural("enc.w", "F32", (16, 12), lams),
        natural("enc.h", "F16", (40,), lams),
        natural("enc.b", "BF16", (3, 5), lams),
        Shared("pos", "I64", (12,), np.arange(12, dtype="<i8").tobytes()),
        Shared("frozen", "F32", (7,), f32_bytes(rand_f32("roles.frozen", 7))),
        PerTask("head", None, [Item("F32", (2, 12), f32_bytes(rng[:24])), Item("F32", (3, 12), f32_bytes(rng[24:60])),
                               None, Item("F16", (4,), np.asarray(rng[60:64], dtype="<f2").tobytes()), None]),
        PerTask("steps", Item("I64", (1,), np.array([0], "<i8").tobytes()),
                [Item("I64", (1,), np.array([100 * (i + 1)], "<i8").tobytes()) if i != 2 else None for i in range(5)]),
        Alias("head_alias", "head"),
        Alias("tied_late", "enc.w"),
        Alias("steps_alias", "steps"),
    ]
    accept("roles", "§2 (all roles), §3, §4.4",
           "five tasks; masked F32/F16/BF16, shared, per_task (null base, null entries, shapes and dtypes per task), "
           "aliases before and after their targets, aliases of per_task rows",
           [task_json(n, lam, {"mask_density": 0.5}) for n, lam in zip(names, lams)], ENC_TA, tensors,
           {"source": "spec/conformance/make_conformance.py"},
           merges=["zeroshot", "task_arithmetic@0.5", "task_arithmetic@-1.0", "consensus@0@0.5", "consensus@2@0.5",
                   "consensus@3@1.0", "consensus@6@0.5"])

    # --- every dtype as shared -----------------------------------------------------------------
    codecs = ["raw", "zstd", "byteplane-zstd"]
    vals: dict[str, tuple[tuple[int, ...], bytes]] = {
        "F64": ((3, 3), np.array([0, 1 << 63, 0x3FF8000000000000, 0xFE5AB7F5A2D3B9E1, 1, 0x7FF0000000000000,
                                  0xFFF0000000000000, 0x7FF8000000000123, 0xFFF0000000000001], "<u8").tobytes()),
        "F32": ((9,), np.array([0, 0x80000000, 0x3F800000, 1, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00001,
                                0x7F800001], "<u4").tobytes()),
        "F16": ((9,), np.array([0, 0x8000, 0x3C00, 1, 0x7BFF, 0x7C00, 0xFC00, 0x7E01, 0x7C01], "<u2").tobytes()),
        "BF16": ((9,), np.array([0, 0x8000, 0x3F80, 1, 0x7F7F, 0x7F80, 0xFF80, 0x7FC1, 0x7F81], "<u2").tobytes()),
        "I64": ((5,), np.array([-2**63, -1, 0, 1, 2**63 - 1], "<i8").tobytes()),
        "I32": ((5,), np.array([-2**31, -1, 0, 1, 2**31 - 1], "<i4").tobytes()),
        "I16": ((5,), np.array([-2**15, -1, 0, 1, 2**15 - 1], "<i2").tobytes()),
        "I8": ((1, 5), np.array([-128, -1, 0, 1, 127], "<i1").tobytes()),
        "U8": ((5,), np.array([0, 1, 127, 128, 255], "<u1").tobytes()),
        "BOOL": ((2, 2), bytes([0, 1, 1, 0])),
        "U16": ((3,), np.array([0, 1, 65535], "<u2").tobytes()),
        "U32": ((3,), np.array([0, 1, 2**32 - 1], "<u4").tobytes()),
        "U64": ((3,), np.array([0, 1, 2**64 - 1], "<u8").tobytes()),
        "F8_E4M3": ((16, 16), bytes(range(256))),
        "F8_E5M2": ((256,), bytes(range(255, -1, -1))),
    }
    tensors = [Shared(f"s.{d.lower()}", d, shape, data, codecs[i % 3], "mixed")
               for i, (d, (shape, data)) in enumerate(vals.items())]
    tensors += [Shared(f"s.{d.lower()}.{c}", d, shape, data, c, "rle")
                for i, (d, (shape, data)) in enumerate(vals.items()) for c in codecs if c != codecs[i % 3]
                if d in ("F64", "BF16", "BOOL", "F8_E4M3")]
    accept("dtypes_shared", "§1.2 dtypes, §2 shared, §5",
           "a shared tensor of every dtype (NaN payloads, infinities, subnormals, extreme integers, every F8 byte), "
           "each codec", [task_json("t", 1.0)], ENC_TA, tensors, merges=["zeroshot", "task_arithmetic@0.5", "consensus@1@0.5"])

    # --- every dtype as per_task ---------------------------------------------------------------
    tensors = []
    for i, d in enumerate(DTYPES):
        shape, data = vals[d]
        n, isz = numel(shape), ITEMSIZE[d]
        flat = [data[j * isz:(j + 1) * isz] for j in range(n)]
        other = DTYPES[(i + 5) % len(DTYPES)]
        oshape, odata = vals[other]
        items: list[Item | None] = [
            Item(d, (n,), b"".join(reversed(flat)), codecs[i % 3]),                 # same dtype, another shape
            None if i % 2 else Item(other, oshape, odata, codecs[(i + 1) % 3]),     # another dtype
            Item(d, (0,) if i % 3 == 0 else (1,), b"" if i % 3 == 0 else flat[0], codecs[(i + 2) % 3]),
        ]
        base = None if i % 4 == 1 else Item(d, shape, data, codecs[(i + 1) % 3], "mixed")
        tensors.append(PerTask(f"p.{d.lower()}", base, items))
    tensors.append(Alias("p.alias", "p.f32"))     # base None: left out of merges
    tensors.append(Alias("p.alias2", "p.i8"))
    accept("dtypes_per_task", "§1.2 dtypes, §2 per_task",
           "a per_task tensor of every dtype: null base and null entries, a dtype and shape of its own per task, "
           "zero-size entries, each codec; aliases of per_task rows",
           [task_json("a", 0.5), task_json("b", 0.5), task_json("c", 0.5)], ENC_TA, tensors,
           merges=["zeroshot", "task_arithmetic@0.5", "consensus@1@0.5"])

    # --- masked F32: signed zeros, subnormals, ties, overflow -----------------------------------------
    pairs = [(0x80000000, 0.0), (0x00000000, -0.0), (0x80000000, -0.0), (0x00000000, 0.0),
             (P(1.0), 2**-24), (P(1 + 2**-23), 2**-24), (P(1.0), 2**-24 + 2**-47), (0x00000001, 2**-149),
             (0x00800000, -2**-149), (0x7F7FFFFF, 2**103), (0xFF7FFFFF, -2**103), (0x7F7FFFFF, 2**102),
             (P(1.0), -1.0), (P(3.0), 1e-8), (0x80000000, 3 * 2**-149), (P(-2.5), 2.5), (P(1e-30), 1e30),
             (0x80000001, 2**-149)]
    n = len(pairs)
    m_a = np.array([i not in (0, 6, 11) for i in range(n)])
    m_b = np.array([i % 2 == 1 for i in range(n)])
    edge = Masked("edge", "F32", (n,), [p[0] for p in pairs], [p[1] for p in pairs], [m_a, m_b], codec="raw")
    rnd = natural("rand", "F32", (5, 7), [0.4, 0.6], codec="byteplane-zstd")
    accept("masked_f32", "§4.4 (F32: no rounding), §3",
           "F32 decode and merges: −0.0 kept where the mask is clear and +0.0 from (−0.0)+(+0.0), subnormal sums, "
           "float32 ties, overflow to ±inf, α = 2**100 overflowing, negative α",
           [task_json("a", 0.4), task_json("b", 0.6)], ENC_TA, [edge, rnd],
           merges=["zeroshot", "task_arithmetic@0.5", "task_arithmetic@-1.0", f"task_arithmetic@{2.0**100!r}",
                   "consensus@1@0.375", "consensus@2@1.0", "consensus@0@-1.0"])

    # --- masked BF16: rounding to nearest even ------------------------------------------------------
    pairs = [(0x3F80, 2**-8), (0x3F81, 2**-8), (0x3F80, 2**-8 + 2**-20), (0x3F80, 2**-8 - 2**-20),
             (0x3F80, -2**-9), (0x7F7F, 2**119), (0x7F7F, 2**118), (0xFF7F, -2**119), (0x0001, 2**-134),
             (0x0001, 2**-135), (0x0000, 2**-134), (0x8000, 0.0), (0x8000, -0.0), (0x0000, -2**-140),
             (0x4049, 0.001), (0x0000, 2**-149), (0x007F, 2**-134), (0x0080, -2**-134), (0x3F80, 2**-8 + 2**-23),
             (0xBF80, -2**-8), (0x4000, 1e-3), (0x7F00, 3e38)]
    n = len(pairs)
    m_a = np.array([i not in (12, 3) for i in range(n)])
    m_b = np.array([i % 3 == 0 for i in range(n)])
    edge = Masked("edge", "BF16", (n,), [p[0] for p in pairs], [p[1] for p in pairs], [m_a, m_b], codec="raw")
    rnd = natural("rand", "BF16", (3, 11), [0.4, 0.6], codec="zstd", style="lit")
    accept("masked_bf16", "§4.4 (round to BF16, nearest even)",
           "BF16 decode and merges: exact halfway cases both ways, just above/below halfway, overflow to ±inf at "
           "the largest finite value, subnormals, −0.0 kept / +0.0 produced",
           [task_json("a", 0.4), task_json("b", 0.6)], ENC_TA, [edge, rnd],
           merges=["zeroshot", "task_arithmetic@0.5", "task_arithmetic@-1.0", "task_arithmetic@2.5",
                   "consensus@1@0.375", "consensus@2@1.0"])

    # --- masked F16: rounding to nearest even, overflow, subnormals, double rounding -----------
    pairs = [(0x3C00, 2**-11), (0x3C01, 2**-11), (0x3C00, 2**-11 + 2**-30), (0x3C00, 2**-11 + 2**-22),
             (0x7BFF, 16.0), (0x7BFF, 15.99), (0xFBFF, -16.0), (0x0000, 2**-25), (0x0000, 3 * 2**-25),
             (0x0000, 2**-25 + 2**-40), (0x0000, -2**-26), (0x8000, 0.0), (0x8000, -0.0), (0x03FF, 2**-25),
             (0x0400, -2**-25), (0x3C00, 70000.0), (0x5640, 1e-3), (0x7BFF, 65519.0 - 65504.0),
             (0x3C00, -2**-12), (0xBC00, -2**-11)]
    n = len(pairs)
    m_a = np.array([i not in (12, 5) for i in range(n)])
    m_b = np.array([i % 4 == 1 for i in range(n)])
    edge = Masked("edge", "F16", (n,), [p[0] for p in pairs], [p[1] for p in pairs], [m_a, m_b], codec="raw")
    rnd = natural("rand", "F16", (2, 2, 5), [0.4, 0.6], codec="byteplane-zstd", style="mixed")
    accept("masked_f16", "§4.4 (round to F16, nearest even)",
           "F16 decode and merges: halfway cases, double rounding through the float32 sum (by design), overflow "
           "to ±inf (65504 + 16), subnormals, underflow to ±0, −0.0",
           [task_json("a", 0.4), task_json("b", 0.6)], ENC_TA, [edge, rnd],
           merges=["zeroshot", "task_arithmetic@0.5", "task_arithmetic@-1.0", "task_arithmetic@2.5",
                   "consensus@1@0.375", "consensus@2@1.0"])

    # --- NaN in τ_MTL (hostile bytes): quiet NaN keeping sign and top payload -------------------
    nan16 = [0x7FC00000, 0xFFC12345, 0x7FE00001, 0x7F800001, 0xFF812345, 0x7FFFFFFF, P(0.5), P(-0.25)]
    nan32 = [0x7FC00000, 0xFFC12345, 0x7FE00001, 0x7FFFFFFF, P(0.5)]
    tensors = [
        Masked("n.bf16", "BF16", (8,), [0x3F80, 0x3F80, 0xBF80, 0x0000, 0x8000, 0x4000, 0x7FC1, 0x3F80],
               bits_f32(nan16), [np.ones(8, bool), np.array([1, 0, 1, 0, 1, 0, 1, 0], bool)], codec="raw"),
        Masked("n.f16", "F16", (8,), [0x3C00, 0x3C00, 0xBC00, 0x0000, 0x8000, 0x4000, 0x7E01, 0x3C00],
               bits_f32(nan16), [np.ones(8, bool), np.array([0, 1, 0, 1, 0, 1, 0, 1], bool)], codec="raw"),
        Masked("n.f32", "F32", (5,), [P(1.0), P(-1.0), 0x80000000, P(2.0), 0x7FC00ABC],
               bits_f32(nan32), [np.ones(5, bool), np.array([1, 0, 1, 0, 1], bool)], codec="raw"),
    ]
    _check_nan_propagation(tensors[2])
    accept("nan_tau", "§4.4 (NaN: quiet NaN keeping sign and top payload bits)",
           "hostile τ_MTL holding NaNs (quiet and signalling, both signs, payloads) and a NaN θ0: BF16 result "
           "(bits32 >> 16) | 0x0040, F16 sign | 0x7E00 | (mantissa32 >> 13 & 0x3FF), F32 the float32 sum's NaN",
           [task_json("a", 0.4), task_json("b", 0.4)], ENC_TA, tensors,
           merges=["zeroshot", "task_arithmetic@0.5", "consensus@1@0.375", "consensus@2@1.0"])

    # --- 0-dim and zero-size tensors ----------------------------------------------------------------
    tensors = [
        Masked("scalar", "F32", (), [P(1.5)], [0.25], [np.ones(1, bool), np.zeros(1, bool)], codec="raw"),
        Masked("scalar.bf16", "BF16", (), [0x3F80], [2**-8], [np.ones(1, bool), np.ones(1, bool)], codec="zstd"),
        Masked("empty.f32", "F32", (0,), [], [], [[], []], codec="raw"),
        Masked("empty.bf16", "BF16", (0, 4), [], [], [[], []], codec="byteplane-zstd"),
        Masked("empty.f16", "F16", (2, 0, 3), [], [], [[], []], codec="zstd"),
        Shared("empty.shared", "I64", (0,), b"", "byteplane-zstd"),
        Shared("scalar.shared", "U8", (), b"\x07", "raw"),
        Shared("scalar.f64", "F64", (), struct.pack("<d", -0.0), "byteplane-zstd"),
        PerTask("empty.per_task", Item("U8", (0,), b"", "zstd"), [Item("I32", (0, 5), b"", "raw"), None]),
        PerTask("scalar.per_task", None, [Item("F16", (), b"\x00\x3c", "byteplane-zstd"), Item("U8", (1, 1, 1), b"\x01", "zstd")]),
        Alias("empty.alias", "empty.f16"),
        Alias("scalar.alias", "scalar"),
    ]
    accept("zero_size", "§1.2 shape ([] is one element, a 0 means none), §3, §5",
           "0-dim (scalar) and zero-size tensors of every role, with zero-length raw segments and zstd / "
           "byteplane-zstd frames of no content",
           [task_json("a", 0.4), task_json("b", 0.4)], ENC_TA, tensors)

    # --- zero-size tensors with huge dimensions (project decision: bytes = 0 are fine) ------------
    tensors = [
        Shared("f32.huge0", "F32", (2**48, 0), b"", "raw"),
        Shared("u8.0huge", "U8", (0, 2**48), b"", "zstd"),
        Shared("u8.30.30.0", "U8", (2**30, 2**30, 0), b"", "raw"),
        Masked("masked.huge0", "F32", (2**48, 0), [], [], [[]], codec="raw"),
        PerTask("per_task.huge0", Item("BF16", (0, 2**48), b"", "byteplane-zstd"), [Item("I8", (2**47, 0), b"", "raw")]),
        Shared("one", "U8", (1,), b"\x01", "raw"),
    ]
    accept("zero_size_huge_dims", "§1.2 shape, §6 (dimension ≤ 2**48, n·itemsize ≤ 2**48 with n = 0 if any dimension is 0)",
           "zero-size tensors whose other dimensions are as large as allowed ([2**48, 0] F32, [2**30, 2**30, 0]): "
           "0 bytes, so within every limit",
           [task_json("a", 0.4)], ENC_TA, tensors, merges=["zeroshot", "task_arithmetic@0.5"])

    # --- codecs --------------------------------------------------------------------------------
    tensors = []
    lams3 = [0.4, 0.5, 0.6]
    for c in codecs:
        tensors += [natural(f"m.f32.{c}", "F32", (5, 3), lams3, codec=c, style="mixed"),
                    natural(f"m.bf16.{c}", "BF16", (9,), lams3, codec=c, style="rle"),
                    natural(f"m.f16.{c}", "F16", (2, 4), lams3, codec=c, style="lit"),
                    Shared(f"s.u8.{c}", "U8", (10,), bytes([3] * 6 + [4, 5, 6, 7]), c, "mixed"),
                    Shared(f"s.i16.{c}", "I16", (6,), np.array([-3, 0, 0, 0, 0, 9], "<i2").tobytes(), c, "rle"),
                    PerTask(f"p.u32.{c}", Item("U32", (3,), np.array([1, 2, 3], "<u4").tobytes(), c, "lit"),
                            [Item("U32", (2,), np.array([7, 7], "<u4").tobytes(), c, "rle"), None,
                             Item("F64", (2,), np.array([0.5, -0.5], "<f8").tobytes(), c, "mixed")])]
    # mixed codecs inside one masked tensor
    tensors.append(natural("m.mixed", "F32", (4, 4), lams3, codec={"base": "raw", "tau": "byteplane-zstd", "masks": "zstd"}))
    tensors.append(natural("m.mixed2", "BF16", (4, 4), lams3, codec={"base": "zstd", "tau": "raw", "masks": "byteplane-zstd"}))
    accept("codecs", "§5 (raw, zstd, byteplane-zstd)",
           "every codec for every kind of segment (θ0, τ_MTL, masks, shared, per_task), zstd frames with raw, "
           "RLE and compressed (literals-only) blocks; byteplane-zstd for 1-byte elements (one plane)",
           [task_json(f"t{i}", lam) for i, lam in enumerate(lams3)], ENC_TA, tensors)

    # --- zstd frame variants -------------------------------------------------------------------
    c200 = bytes(rand_u32("z200", 200).astype(np.uint8))
    c300 = bytes((i * 7) % 251 for i in range(300))
    c700 = bytes((i // 3) % 256 for i in range(700))
    run = bytes([0x5A]) * 4000
    f32v = np.array(rand_f32("zbp", 40, 3.0), dtype="<f4").tobytes()
    def zs(name: str, content: bytes, **kw: Any) -> Shared:
        s = Shared(name, "U8", (len(content),), content, "zstd", kw)
        return s
    tensors = [
        zs("fcs1", c200, fcs=1),
        zs("fcs2", c300, fcs=2),
        zs("fcs4_small", c200[:10], fcs=4),
        zs("fcs8", c300, fcs=8),
        zs("window_1k", c700, single=False, window=(10, 0), fcs=2),
        zs("window_2_27", c700, single=False, window=(27, 0), fcs=4),
        zs("window_mantissa", c700, single=False, window=(26, 7), fcs=8),
        zs("checksum", c300, checksum=True),
        zs("checksum_multi", c700, checksum=True, style="mixed", single=False, window=(12, 3)),
        zs("blocks", c200 + run[:100] + c200[:50], style="mixed", empty_last=True),
        zs("rle_4000", run, style="rle"),
        zs("empty", b""),
        zs("empty_checksum_fcs8", b"", fcs=8, checksum=True),
        Shared("libzstd", "F32", (96,), LIBZSTD_F32_96_VALUES.astype("<f4").tobytes(), "zstd", {"frame": LIBZSTD_F32_96}),
        Shared("bp_mixed", "F32", (40,), f32v, "byteplane-zstd",
               [{"fcs": 8}, {"single": False, "window": (10, 0)}, {"checksum": True}, {"style": "mixed", "empty_last": True}]),
        Shared("bp_u16", "U16", (5,), np.array([1, 256, 65535, 0, 7], "<u2").tobytes(), "byteplane-zstd",
               [{"style": "lit"}, {"style": "rle", "checksum": True}]),
    ]
    accept("zstd_frames", "§5 (zstd frames, RFC 8878)",
           "zstd frames a decoder must take: Frame_Content_Size in 1, 2, 4 and 8 bytes, a window descriptor "
           "(1 KiB, 2**27 exactly, with mantissa), content checksums, raw/RLE/compressed blocks, an empty last "
           "block, empty content, a libzstd level-19 frame; byteplane planes in different frame styles",
           [task_json("t", 1.0)], ENC_TA, tensors, merges=["zeroshot"])

    # --- zero-length segments ------------------------------------------------------------------
    tensors = [
        Shared("z0", "U8", (0,), b"", "raw"),
        Shared("a", "U8", (16,), bytes(range(16)), "raw"),
        Shared("z1", "F32", (0,), b"", "raw"),
        Shared("b", "I32", (3,), np.array([1, -2, 3], "<i4").tobytes(), "raw"),
        PerTask("z2", Item("U8", (0,), b"", "raw"), [Item("U8", (0,), b"", "raw")]),
        Masked("z3", "F32", (0,), [], [], [[]], codec="raw"),
    ]
    accept("zero_length_segments", "§1, §6 (segment tiling: zero-length segments)",
           "zero-length raw segments: first in the file (offset 64), at the same offset as the next segment, and "
           "last (at the header's offset); table order equals file order",
           [task_json("a", 1.0)], ENC_TA, tensors, merges=["zeroshot"])

    z = Shared("z", "U8", (0,), b"", "raw")
    a = Shared("a", "U8", (16,), bytes(range(16)), "raw")
    zm = Masked("zm", "BF16", (0,), [], [], [[]], codec="raw")
    b = Shared("b", "I16", (2,), np.array([5, -5], "<i2").tobytes(), "raw")
    rows = [a.row(), z.row(), b.row(), zm.row()]
    rows[1]["data"].place = -1           # z at offset 64, before a (listed after it)
    rows[3]["base"].place = rows[3]["tau"].place = rows[3]["masks"][0].place = 1.5   # zm's segments before b
    bb = build([task_json("a", 1.0)], ENC_TA, rows)
    add_file("accept/zero_length_order.tall", bb.file())
    _accept_entry("zero_length_order", "accept/zero_length_order.tall",
                  "§6 (segments sorted by (offset, length): zero-length first among equal offsets)",
                  "a zero-length segment listed in the table after a non-empty segment at the same offset (and "
                  "zero-length segments of a later row before an earlier row's segment)", ["a"], [a, z, b, zm], ["zeroshot"])

    # --- TIES and magnitude encodings -----------------------------------------------------------
    enc_ties = {"merge": {"method": "ties", "density": 0.2, "agg": "sum", "scope": "global"},
                "mask": {"method": "tall"}, "compute_dtype": "F32", "bit_order": "little"}
    tensors = [natural("enc.w", "F32", (6, 5), lams3), natural("enc.b", "BF16", (7,), lams3),
               Shared("ids", "I32", (4,), np.arange(4, dtype="<i4").tobytes())]
    accept("ties_global", "§1.2 encoding.merge ties, §4.2", "a TIES-merged τ_MTL (density 0.2, sum, global scope) "
           "with TALL masks: the reader decodes it as stored",
           [task_json(f"t{i}", lam, {"mask_density": 0.25, "rel_error": 0.5, "cosine": 0.9}) for i, lam in enumerate(lams3)],
           enc_ties, tensors)
    enc_mag = {"merge": {"method": "ties", "density": 0.5, "agg": "mean", "scope": "per_tensor"},
               "mask": {"method": "magnitude", "density": 0.1, "scope": "per_tensor"},
               "compute_dtype": "F32", "bit_order": "little"}
    tensors = [natural("enc.w", "F16", (6, 5), [0.5, 0.5]), natural("enc.b", "F32", (7,), [0.5, 0.5])]
    accept("magnitude_per_tensor", "§1.2 tasks[].lambda null, encoding.mask magnitude, §4.3",
           "magnitude masks (density 0.1, per_tensor) with TIES (mean, per_tensor): every λ is null",
           [task_json("x", None, {"mask_density": 0.1}), task_json("y", None, {"mask_density": 0.1})], enc_mag, tensors)
    enc_mag_g = {"merge": {"method": "task_arithmetic"}, "mask": {"method": "magnitude", "density": 0.25, "scope": "global"},
                 "compute_dtype": "F32", "bit_order": "little"}
    accept("magnitude_global", "§1.2 encoding.mask magnitude (global)", "magnitude masks, global scope, task arithmetic",
           [task_json("x", None), task_json("y", None), task_json("z", None)], enc_mag_g,
           [natural("w", "BF16", (3, 3), lams3)])

    # --- newer minor versions (§7) ------------------------------------------------------------
    def unknown_keys(h: dict) -> None:
        h["x_new_top"] = {"a": [1, 2.5, {"b": None}], "c": "d"}
        h["tasks"][0]["x_task"] = True
        h["tasks"][1]["stats"]["x_stat"] = 1.5
        h["encoding"]["x_encoding"] = "y"
        for row in h["tensors"]:
            row["x_row"] = [row["role"]]
        h["tensors"][0]["base"]["x_segment"] = {"k": 1}
        h["tensors"][2]["tasks"][0]["x_item"] = None
        h["tensors"][2]["tasks"][0]["data"]["x_segment"] = 0
    tensors = [natural("w", "F32", (3, 5), [0.4, 0.4], codec="raw"), Shared("pos", "I64", (3,), np.arange(3, dtype="<i8").tobytes()),
               PerTask("head", None, [Item("F32", (2,), f32_bytes([1, 2])), None]), Alias("tied", "w")]
    accept("newer_minor", "§7 (a newer minor adds keys; a reader ignores those it does not know)",
           f"version 1.{FUTURE} (preamble and header) with unknown keys at the top level, in tasks, encoding, every kind of "
           "tensor row, a per_task item and segments", [task_json("a", 0.4), task_json("b", 0.4)], ENC_TA, tensors,
           {"k": "v"}, minor=FUTURE, header_fn=unknown_keys)

    def method_keys(h: dict) -> None:
        h["encoding"]["merge"]["x_param"] = 1
        h["encoding"]["mask"]["x_param"] = "y"
    accept("newer_minor_method_keys", "§7 (unknown keys inside encoding.merge / encoding.mask)",
           f"version 1.{FUTURE} with unknown keys inside encoding.merge (task_arithmetic) and encoding.mask (tall)",
           [task_json("a", 0.4)], ENC_TA, [natural("w", "F32", (4,), [0.4], codec="raw")], minor=FUTURE, header_fn=method_keys)

    # --- residuals (§11, version 1.2) ----------------------------------------------------------
    accept("residuals", "§11 (per-task residuals: positions as gaps, values, one rounding), §7 version 1.2",
           "three tasks; F32 residual values at the first and last element, none for one task, BF16 values (one on a "
           "θ0 of -0.0 with a clear bit; one where rounding θ0 + τ first would round twice), F16 values",
           [task_json(n, 0.4) for n in ("a", "b", "c")], ENC_TA, residual_tensors(), minor=2)

    def deep(h: dict) -> None:
        v: Any = "leaf"
        for _ in range(15):
            v = [v]
        h["x_deep"] = v          # the header object is level 1; 15 arrays inside: depth 16, the maximum
    accept("newer_minor_depth_16", "§1.2 (nesting depth at most 16), §7",
           "version 1.65535 with an unknown key nesting JSON to depth 16 exactly (the header object counts as 1)",
           [task_json("a", 0.4)], ENC_TA, [natural("w", "F32", (4,), [0.4], codec="raw")], minor=65535, header_fn=deep)

    # --- JSON written differently: order, escapes, whitespace inside, number forms ------------
    def restyle(b: Built) -> bytes:
        def rev(o: Any) -> Any:
            if isinstance(o, dict):
                return {k: rev(o[k]) for k in reversed(list(o))}
            if isinstance(o, list):
                return [rev(x) for x in o]
            return o
        text = json.dumps(rev(b.header), ensure_ascii=True, indent=1)
        for old, new in (('"lambda": 0.4375', '"lambda": 4375E-4'), ('"lambda": 0.5', '"lambda": 0.50'),
                         ('"lambda": 2.0', '"lambda": 2e0'), ('"mask_density": 100', '"mask_density": 1E+2'),
                         ('"cosine": 0.0', '"cosine": -0'), ('"a/b"', '"a\\/b"')):
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        assert text.startswith("{") and text.endswith("}")
        return text.encode("ascii")
    tensors = [natural("caf\u00e9", "F32", (2, 3), [0.4375, 0.5, 2.0], codec="raw"),
               Shared("a/b", "U8", (2,), b"\x01\x02", "raw"), Shared("nul\x00inside", "I8", (1,), b"\xff", "raw"),
               Shared("\U0001F600", "U8", (1,), b"\x09", "raw"), Alias("alias \u00e9", "caf\u00e9")]
    accept("json_style", "§1.2 (any JSON the rules allow: key order, escapes, whitespace inside, number forms)",
           "header with keys in reverse order, ASCII-only escapes (\\u00e9, a surrogate pair, \\u0000, \\/), indentation "
           "inside the object, numbers as 4375E-4, 0.50, 2e0, 1E+2, -0",
           [task_json("t\u00e9", 0.4375, {"mask_density": 100}), task_json("\u00fcber", 0.5, {"cosine": 0.0}),
            task_json("x", 2.0)], ENC_TA, tensors, {"\u00e9": "\U0001F600"}, text_fn=restyle,
           merges=["zeroshot", "task_arithmetic@0.5", "consensus@2@0.5"])

    # --- non-ASCII names and metadata, names at the 4096-byte limit ------------------------------
    long_task = "\U0001F600" * 1024            # 4096 UTF-8 bytes, 1024 characters
    long_tensor = "\u00e9" * 2048              # 4096 UTF-8 bytes
    tensors = [natural("enc.\u00df", "F32", (3, 2), [0.4] * 4), natural("\u540d\u524d/\u91cd\u307f", "BF16", (5,), [0.4] * 4),
               Shared("with space", "U8", (3,), b"abc"), Shared("nul\x00inside", "U16", (1,), b"\x01\x02"),
               Shared(long_tensor, "I8", (2,), b"\x01\xfe"), Alias("\u05e2\u05d1\u05e8\u05d9\u05ea", "enc.\u00df")]
    meta = {"description": "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac, \u05e2\u05d1\u05e8\u05d9\u05ea, "
                           "\u0627\u0644\u0639\u0631\u0628\u064a\u0629, \u0939\u093f\u0928\u094d\u0926\u0940",
            "emoji": "\U0001F9EA\U0001F9EC", "": "an empty key", "empty": "", "combining": "e\u0301",
            "control": "a\nb\tc\x01", "quote": "\"\\", "\u6570\u5b66": "\u6570\u5b66"}
    accept("unicode_names", "§1.2 (names 1..4096 UTF-8 bytes, metadata string → string)",
           "non-ASCII task and tensor names (a '/' and a NUL inside names), a task name of 1024 four-byte "
           "characters and a tensor name of 2048 two-byte characters (4096 bytes each), non-ASCII metadata",
           [task_json("sst2", 0.4), task_json("na\u00efve-\u00fc", 0.4), task_json("\u6570\u5b66", 0.4),
            task_json(long_task, 0.4)], ENC_TA, tensors, meta, merges=["zeroshot", "task_arithmetic@0.5"])

    # --- task fields: λ and statistics at their edges ----------------------------------------------
    flt_max = float(np.finfo(np.float32).max)
    tasks = [task_json("max", flt_max, {"mask_density": -5, "rel_error": None, "cosine": 1.7976931348623157e308}),
             task_json("tiny", 2.0**-149, {"big": 123456789012345678901234567890, "neg_zero": -0.0, "sub": 1e-320}),
             task_json("one", 1, {}),
             task_json("plain", 0.4, {"mask_density": 0.5, "rel_error": 0.1, "cosine": 0.99, "x_more": 3})]
    accept("task_fields", "§1.2 tasks[].lambda, tasks[].stats",
           "λ = the largest float32, the smallest float32 subnormal, an integer literal; statistics of odd but "
           "valid values (negative, 1.79e308, a 30-digit integer, −0.0, a subnormal double, extra keys, {})",
           tasks, ENC_TA, [natural("w", "F32", (9,), [0.4] * 4, codec="raw")])

    # --- nine tasks: agreement and consensus thresholds ----------------------------------------
    n9 = 9
    m1 = natural("a.f16", "F16", (7, 9), [0.3 + 0.05 * i for i in range(n9)])
    m1.masks[0] = np.zeros(63, bool)
    m1.masks[8] = np.ones(63, bool)
    m2 = natural("a.bf16", "BF16", (33,), [0.3 + 0.05 * i for i in range(n9)], codec="raw")
    accept("consensus_9_tasks", "§4.4 consensus, agreement",
           "nine tasks (an all-zero and an all-one mask among them), consensus merges for k = 0, 1, 3, 5, 9, 10",
           [task_json(f"task{i}", 0.3 + 0.05 * i) for i in range(n9)], ENC_TA, [m1, m2],
           merges=["zeroshot", "task_arithmetic@1.0", "consensus@0@0.5", "consensus@1@0.5", "consensus@3@0.5",
                   "consensus@5@0.5", "consensus@9@0.5", "consensus@10@0.5"])

    # --- 4096 tasks, the maximum ------------------------------------------------------------------
    accept("max_tasks", "§1.2 tasks (1..4096), §6", "4096 tasks (the maximum) and no tensors",
           [task_json(f"{i:04d}", 1) for i in range(4096)], ENC_TA, [], merges=["zeroshot", "consensus@2@0.5"])


def accept_tau_rans_cases() -> None:
    """Version 1.2: masks coded with tau-rans (FORMAT.md §5.1) from the row's τ_MTL."""
    lams = [0.3, 0.5, 0.4]
    tr = {"base": "raw", "tau": "raw", "masks": "tau-rans"}
    tensors = [
        natural("w", "F32", (16, 30), lams, codec=tr, p=0.3),                                 # K = 1
        natural("e", "BF16", (50, 16), lams, codec={**tr, "base": "byteplane-zstd", "tau": "byteplane-zstd"}),
        natural("h", "F16", (3, 64), lams, codec=tr),
        natural("v", "F32", (5,), lams, codec=tr),
        natural("one", "F32", (1,), lams, codec=tr),                                           # one bit, rANS
        natural("z", "F32", (0, 3), lams, codec=tr),
        Alias("w.tied", "w"),
    ]
    tensors[1].rans = {"lanes": 3}           # 3 lanes of 320, 320 and 160 bits
    tensors[2].rans = {"lanes": 4}           # 192 bits in 4 lanes of 64: lane 3 empty, X_3 = 2^32
    tensors[3].rans = tensors[5].rans = {"mode": 0}  # raw mode; n = 0 is always raw
    tensors[0].tau[:30] = 0.0                # a row where τ_MTL = 0 (bucket q = 0) ...
    tensors[0].tau[30:40] = -0.0             # ... and −0.0, its bits 0 as writers store them (§4.3)
    for m in tensors[0].masks:
        m[:40] = False
    accept("tau_rans", "§5.1, §7 (1.2)", "masks in the tau-rans codec: 1, 3 and 4 lanes (one empty), raw mode, "
           "n = 1 and n = 0, τ_MTL = ±0", [task_json(n, lam) for n, lam in zip(["p", "q", "r"], lams)], ENC_TA,
           tensors, merges=["zeroshot", "consensus@2@0.5"], minor=2)


def tau_rans_rows(stored: bytes | None = None, *, part: str = "masks") -> list[dict]:
    """The base file's rows with tensor 'w' masks in tau-rans, and tensors[5] 'big', masked F32 [4, 64]
    (raw θ0 and τ, tau-rans masks: MODE 1, one lane, a stream of several words); its first mask's stored
    bytes replaced by `stored`, or (part "tau"/"base") its segment of that part named tau-rans."""
    ts = base_tensors()
    tr = {"base": "raw", "tau": "raw", "masks": "tau-rans"}
    ts[0].codec = tr
    ts.append(Masked("big", "F32", (4, 64), f32_bits(rand_f32("big.base", 256)), rand_f32("big.tau", 256, 0.1),
                     [rand_bits("big.m0", 256, 0.5), rand_bits("big.m1", 256, 0.5)], codec=tr))
    rows = [t.row() for t in ts]
    big = rows[5]
    if stored is not None:
        big["masks"][0] = Seg(stored, big["masks"][0].decoded_length, "tau-rans")
    if part != "masks":
        big[part] = Seg(big["masks"][1].stored, big[part].decoded_length, "tau-rans")
    return rows


def refuse_tau_rans_cases() -> None:
    rule = "§5.1 tau-rans"
    ok = tau_rans_rows()[5]["masks"][0].stored
    assert ok[1] == 1 and ok[2] == 1 and len(ok) >= 13 + 4 * 4, ok
    x0 = int.from_bytes(ok[5:13], "little")

    def read_case(name: str, stored: bytes, field_: str, description: str) -> None:
        refuse(f"tau_rans_{name}", "FormatError", "read", rule, f"tensors[5].masks[0] ({field_})", description,
               base(rows=tau_rans_rows(stored), minor=2).file())

    refuse("tau_rans_in_1_1_file", "FormatError", "open", "§5, §7", "tensors[0].masks[0].codec",
           "a tau-rans mask in a file that says it is version 1.1 (the codec is from 1.2)",
           base(rows=tau_rans_rows(), minor=1).file())
    for part in ("tau", "base"):
        refuse(f"tau_rans_for_{part}", "FormatError", "open", "§5 (context codecs code masks only)",
               f"tensors[5].{part}.codec", f"the {part} segment named tau-rans",
               base(rows=tau_rans_rows(part=part), minor=2).file())
    read_case("bad_magic", b"\xa2" + ok[1:], "MAGIC", "MAGIC 0xA2")
    read_case("empty", b"", "MAGIC", "an empty segment")
    read_case("mode_2", ok[:1] + b"\x02" + ok[2:], "MODE", "MODE 2")
    read_case("lanes_0", ok[:2] + b"\x00" + ok[3:], "K", "K = 0 lanes")
    read_case("lanes_17", ok[:2] + b"\x11" + ok[3:], "K", "K = 17 lanes")
    read_case("ref_512", ok[:3] + (512).to_bytes(2, "little") + ok[5:], "R", "R = 512")
    read_case("truncated_header", ok[:4], "header", "4 bytes: the header is cut")
    read_case("truncated_states", ok[:12], "X_0", "the lane state is cut")
    read_case("partial_word", ok + b"\x00\x00", "word stream", "a stream that is not whole words")
    read_case("state_below_2_32", ok[:5] + ((1 << 32) - 1).to_bytes(8, "little") + ok[13:], "X_0",
              "X_0 = 2^32 − 1")
    read_case("truncated_stream", ok[:-4], "word stream", "the last word is missing")
    read_case("trailing_word", ok + bytes(4), "word stream", "one word after the last one read")
    read_case("too_many_words", ok[:13] + bytes(4 * 257), "word stream", "257 words for 256 bits (W > n)")
    read_case("final_state", ok[:5] + (x0 ^ 1 << 40).to_bytes(8, "little") + ok[13:], "termination",
              "X_0 with one bit flipped: a final state other than 2^32 (or the stream runs out)")
    read_case("raw_length", bytes([0xA1, 0]) + pack_mask(rand_bits("big.m0", 256, 0.5)) + b"\x00", "raw mode",
              "raw mode with one byte too many")
    rows = tau_rans_rows()
    packed = pack_mask(base_tensors()[0].masks[0])  # 15 bits: bit 7 of byte 1 is padding
    rows[0]["masks"][0] = Seg(bytes([0xA1, 0]) + packed[:-1] + bytes([packed[-1] | 0x80]), 2, "tau-rans")
    refuse("tau_rans_raw_padding", "FormatError", "read", rule, "tensors[0].masks[0] (raw mode)",
           "raw mode with the padding bit of a 15-bit mask set", base(rows=rows, minor=2).file())
    rows = tau_rans_rows()
    z = Masked("z", "F32", (0,), [], [], [np.zeros(0, bool), np.zeros(0, bool)], codec="raw")
    zrow = z.row()
    zrow["masks"] = [Seg(bytes([0xA1, 1, 1, 0, 0]) + (1 << 32).to_bytes(8, "little"), 0, "tau-rans"),
                     Seg(bytes([0xA1, 0]), 0, "tau-rans")]
    rows.insert(4, zrow)
    refuse("tau_rans_rans_mode_for_n_0", "FormatError", "read", rule, "tensors[4].masks[0] (MODE)",
           "MODE 1 for an empty tensor (n = 0 must be raw)", base(rows=rows, minor=2).file())


def _check_nan_propagation(t: Masked) -> None:
    """The F32 expectations of nan_tau assume IEEE quiet-NaN propagation of the one NaN operand
    (x86 and ARM do this): check that numpy on this machine agrees, rather than write a wrong file."""
    with np.errstate(all="ignore"):
        theta0 = widen("F32", t.base)
        for alpha in (None, 0.5, 0.375, 1.0):     # positive α only: the sign of α·NaN is not specified
            a = t.tau if alpha is None else np.float32(alpha) * t.tau
            s = f32_bits(theta0 + a)
            for i in range(len(s)):
                tb, bb = int(f32_bits(t.tau)[i]), int(t.base[i])
                if (tb & 0x7FFFFFFF) > 0x7F800000:
                    assert int(s[i]) == tb, (hex(int(s[i])), hex(tb))
                elif (bb & 0x7FFFFFFF) > 0x7F800000:
                    assert int(s[i]) == bb


# ----------------------------------------------------------------------------------------------
# Sharded archives (FORMAT.md §9)


@dataclass
class Sharded:
    """Shard files and the index object, before the index is sealed (refuse cases edit both)."""

    shards: list[tuple[str, Built, list[Any]]]
    index: dict
    files: dict[str, bytes] = field(default_factory=dict)

    def shard_bytes(self) -> None:
        self.files = {f: b.file() for f, b, _ in self.shards}

    def refresh_entries(self) -> None:
        self.index["shards"] = [shard_entry(f, self.files[f]) for f, _, _ in self.shards]

    def seal(self, **kw: Any) -> bytes:
        return seal_index(self.index, **kw)


def make_sharded(tasks: list[dict], encoding: dict, shards: list[tuple[str, list[Any]]], thresholds: dict,
                 metadata: dict | None = None, *, shard_stats: list[list[dict]] | None = None,
                 shard_meta: list[dict] | None = None, order: list[str] | None = None,
                 version: tuple[int, int] = (1, 0), extra: dict | None = None) -> Sharded:
    built = []
    for j, (file, tensors) in enumerate(shards):
        stasks = [dict(t, stats=shard_stats[j][i] if shard_stats else t["stats"]) for i, t in enumerate(tasks)]
        built.append((file, build(stasks, encoding, [t.row() for t in tensors],
                                  shard_meta[j] if shard_meta else metadata), tensors))
    where = {t.name: file for file, tensors in shards for t in tensors}
    names = order if order is not None else [t.name for _, tensors in shards for t in tensors]
    sh = Sharded(built, {})
    sh.shard_bytes()
    sh.index = index_obj(tasks, encoding, thresholds, {} if metadata is None else metadata,
                         [shard_entry(f, sh.files[f]) for f, _, _ in built], {n: where[n] for n in names},
                         version, extra)
    return sh


def accept_sharded(name: str, section: str, description: str, sh: Sharded, merges: list[str] | None = None, *,
                   index_name: str = "tall.index.json", path_to_index: bool = False, **seal_kw: Any) -> None:
    merges = DEFAULT_MERGES if merges is None else merges
    for f, data in sh.files.items():
        add_file(f"accept/{name}/{f}", data)
    add_file(f"accept/{name}/{index_name}", sh.seal(**seal_kw))
    by_name = {t.name: t for _, _, ts in sh.shards for t in ts}
    tensors = [by_name[n] for n in sh.index["weight_map"]]
    path = f"accept/{name}/{index_name}" if path_to_index else f"accept/{name}"
    _accept_entry(name, path, section, description, [t["name"] for t in sh.index["tasks"]], tensors, merges)


def f32_value(x: float) -> float:
    """x rounded to float32, as a Python float (its JSON form parses back to that float32 exactly)."""
    return float(np.float32(x))


def accept_sharded_cases() -> None:
    lams = [0.3, 0.5, 0.7]
    enc_ties = {"merge": {"method": "ties", "density": 0.2, "agg": "sum", "scope": "global"},
                "mask": {"method": "tall"}, "compute_dtype": "F32", "bit_order": "little"}
    tasks = [task_json(n, lam, {"mask_density": 0.5, "rel_error": 0.25, "cosine": 0.75}) for n, lam in zip("abc", lams)]
    s1 = [Alias("lm_head", "emb"), natural("emb", "F32", (6, 4), lams), natural("blk.0.w", "BF16", (5, 3), lams),
          Shared("blk.0.b", "F32", (3,), f32_bytes([0.5, -0.5, 0.0]))]
    s2 = [natural("blk.1.w", "F16", (4, 4), lams),
          PerTask("blk.1.steps", Item("I64", (1,), np.array([0], "<i8").tobytes()),
                  [Item("I64", (1,), np.array([i + 1], "<i8").tobytes()) for i in range(3)]),
          Alias("blk.1.steps.alias", "blk.1.steps")]
    s3 = [PerTask("head", None, [Item("F32", (2, 2), f32_bytes([1, 2, 3, 4])), None, Item("F32", (1, 2), f32_bytes([5, 6]))]),
          Shared("norm", "BF16", (4,), np.array([0x3F80, 0x4000, 0xBF80, 0x0000], "<u2").tobytes())]
    stats = [[{"mask_density": 0.4 + 0.1 * j}] * 3 for j in range(3)]
    sh = make_sharded(tasks, enc_ties, [("model-00001-of-00003.tall", s1), ("model-00002-of-00003.tall", s2),
                                        ("model-00003-of-00003.tall", s3)],
                      {"ties": [f32_value(0.0123), 0.0, f32_value(1e-3)], "magnitude": None}, {"source": "index"},
                      shard_stats=stats, shard_meta=[{"shard": "1"}, {}, {"shard": "3", "x": "\u00e9"}])
    accept_sharded("sharded_3", "§9 (three shards, opened by folder)",
                   "three shards: an alias before its target inside one shard, every role, TIES global thresholds; "
                   "shard statistics and metadata differ from the index's", sh,
                   merges=["zeroshot", "task_arithmetic@0.5", "consensus@2@0.5"])

    enc_mag = {"merge": {"method": "task_arithmetic"}, "mask": {"method": "magnitude", "density": 0.3, "scope": "global"},
               "compute_dtype": "F32", "bit_order": "little"}
    tasks = [task_json("x", None, {}), task_json("y", None, {})]
    sh = make_sharded(tasks, enc_mag, [("part-b.tall", [natural("w1", "F32", (3, 3), [0.5, 0.5]),
                                                        Shared("ids", "U8", (3,), b"\x01\x02\x03")]),
                                       ("part-a.tall", [natural("w2", "BF16", (2, 5), [0.5, 0.5])])],
                      {"ties": None, "magnitude": [f32_value(0.004), f32_value(0.00390625)]})
    accept_sharded("sharded_magnitude", "§9.1 (any shard file name), §9.2 (checksum member spacing, trailing whitespace)",
                   "two shards with file names of the writer's choice, listed out of name order; magnitude masks with "
                   "global thresholds; the index ends '\"checksum\" :\\t\"…\"\\n}\\n\\n \\t' (whitespace allowed)", sh,
                   merges=["zeroshot", "task_arithmetic@0.5", "consensus@1@0.5"],
                   ws_before_colon=" ", ws_after_colon="\t", tail="\n}\n\n \t")

    enc0 = {"merge": {"method": "ties", "density": 0.0, "agg": "mean", "scope": "global"},
            "mask": {"method": "tall"}, "compute_dtype": "F32", "bit_order": "little"}
    tasks = [task_json("p", 0.4), task_json("q", 0.6)]
    sh = make_sharded(tasks, enc0, [("only.tall", [natural("w", "F32", (2, 3), [0.4, 0.6]), Alias("w.alias", "w")])],
                      {"ties": [None, None], "magnitude": None}, version=(1, 3),
                      extra={"x_future": {"nested": [1, {"a": None}]}})
    sh.index["shards"][0]["x_shard_key"] = "ignored"
    accept_sharded("sharded_index_path", "§9 (a path ending in .json is an index), §9.2 thresholds (null where k = 0), §7",
                   "one shard, opened by an index named archive.json; TIES density 0 (k = 0): every threshold null; "
                   "index version 1.3 with unknown keys", sh, merges=["zeroshot", "task_arithmetic@0.5"],
                   index_name="archive.json", path_to_index=True)

    tasks = [task_json("a", 0.4), task_json("b", 0.4)]
    sh = make_sharded(tasks, enc_ties, [("model-00001-of-00001.tall", [])], {"ties": [None, None], "magnitude": None})
    accept_sharded("sharded_no_tensors", "§9.2 (the only shard of an archive without tensors)",
                   "an archive without tensors: one shard, an empty weight_map, TIES global thresholds null (N = 0)",
                   sh, merges=["zeroshot"])

    tasks = [task_json("a", 0.4), task_json("b", 0.4)]
    s1 = [natural("w", "F32", (2, 2), [0.4, 0.4]), Shared("b", "U8", (1,), b"\x05")]
    s2 = [Shared("pos", "I64", (2,), np.arange(2, dtype="<i8").tobytes()), Alias("tied", "pos")]
    sh = make_sharded(tasks, ENC_TA, [("model-00001-of-00002.tall", s1), ("model-00002-of-00002.tall", s2)],
                      {"ties": None, "magnitude": None}, order=["w", "pos", "b", "tied"])
    accept_sharded("sharded_interleaved", "§9.1, §9.3 (each shard lists its tensors in archive order)",
                   "weight_map order interleaves the two shards (w, pos, b, tied): each shard's table is its tensors in "
                   "archive order, so it is valid; decoding follows weight_map order", sh,
                   merges=["zeroshot", "task_arithmetic@0.5"])


# ----------------------------------------------------------------------------------------------
# Refuse cases: each breaks one rule of FORMAT.md §6 or §9.3 in an otherwise valid file


def refuse(name: str, error: str, on: str, section: str, field_: str, description: str,
           data: bytes | dict[str, bytes | Link], *, path: str | None = None, folder: str | None = None) -> None:
    assert error in ("FormatError", "ChecksumError", "LimitError") and on in ("open", "read")
    if isinstance(data, dict):
        folder = folder or f"refuse/{name}"
        for rel, d in data.items():
            add_file(f"{folder}/{rel}", d)
        default = folder
    else:
        add_file(f"refuse/{name}.tall", data)
        default = f"refuse/{name}.tall"
    CASES.append({"id": f"refuse/{name}", "path": path or default, "expect": "refuse", "error": error, "on": on,
                  "section": section, "field": field_, "description": description})


def base_tensors() -> list[Any]:
    """The small archive every single-file refuse case starts from (tasks 'a' λ 0.25, 'b' λ 0.75):

    tensors[0] 'w'     masked F32 [3, 5], raw segments (15 elements: one mask padding bit)
    tensors[1] 'h'     masked BF16 [4], byteplane-zstd θ0 and τ, zstd masks
    tensors[2] 'pos'   shared I64 [3], byteplane-zstd
    tensors[3] 'head'  per_task: base null, task a F32 [2, 2] raw, task b null
    tensors[4] 'tied'  alias of 'w'
    """
    return [
        Masked("w", "F32", (3, 5), f32_bits(rand_f32("base.w", 15)), rand_f32("base.w.tau", 15, 0.1),
               [rand_bits("base.w.m0", 15, 0.5), rand_bits("base.w.m1", 15, 0.5)], codec="raw"),
        Masked("h", "BF16", (4,), [0x3F80, 0xBF80, 0x0000, 0x4000], [0.5, -0.25, 1.0, 0.0],
               [np.array([1, 0, 1, 1], bool), np.array([0, 1, 1, 0], bool)]),
        Shared("pos", "I64", (3,), np.arange(3, dtype="<i8").tobytes()),
        PerTask("head", None, [Item("F32", (2, 2), f32_bytes([0, 1, 2, 3]), "raw"), None]),
        Alias("tied", "w"),
    ]


BASE_TASKS = [("a", 0.25, {"mask_density": 0.5}), ("b", 0.75, {"cosine": 0.875})]


def base(*, tensors: list[Any] | None = None, rows: list[dict] | None = None, minor: int = 0,
         encoding: dict | None = None, lambdas: tuple[Any, Any] | None = None, metadata: dict | None = None,
         top_extra: dict | None = None) -> Built:
    tasks = [task_json(n, lam if lambdas is None else lambdas[i], dict(st)) for i, (n, lam, st) in enumerate(BASE_TASKS)]
    if rows is None:
        rows = [t.row() for t in (base_tensors() if tensors is None else tensors)]
    return build(tasks, ENC_TA if encoding is None else encoding, rows, {"k": "v"} if metadata is None else metadata,
                 minor=minor, top_extra=top_extra)


def edited(fn: Callable[[dict], Any], **kw: Any) -> bytes:
    """The base file with its header object edited by fn (checksums recomputed)."""
    b = base(**kw)
    fn(b.header)
    return b.file()


def sub(text: bytes, old: bytes, new: bytes) -> bytes:
    assert text.count(old) == 1, (old, text.count(old))
    return text.replace(old, new)


def raw_field(fn: Callable[[dict, str], Any], raw: bytes, **kw: Any) -> bytes:
    """The base file with one JSON value written as the literal text `raw` (e.g. 64.0, a 401-digit
    integer, NaN): fn puts a sentinel string where the value goes."""
    b = base(**kw)
    fn(b.header, "@@RAW@@")
    return b.file(sub(b.text(), b'"@@RAW@@"', raw))


def raw_text(old: bytes, new: bytes, **kw: Any) -> bytes:
    b = base(**kw)
    return b.file(sub(b.text(), old, new))


def one_shared(seg: Seg, dtype: str, shape: tuple[int, ...], *, name: str = "x") -> bytes:
    """A file whose only tensor is a shared tensor stored as `seg`, after the base file's tensors."""
    rows = [t.row() for t in base_tensors()]
    rows.append({"name": name, "role": "shared", "dtype": dtype, "shape": list(shape), "data": seg})
    return base(rows=rows).file()


BIG = b"1" + b"0" * 400          # a 401-digit integer


def refuse_cases() -> None:
    S6 = "§6 (on open)"
    S6R = "§6 (on read)"
    good = base().file()
    good_pre = struct.unpack_from("<8sHHIQQQQ", good)

    # --- the file and the preamble ---------------------------------------------------------
    refuse("not_a_regular_file", "FormatError", "open", f"{S6}: the path is not a regular file", "path",
           "a folder named like a .tall file (holding no index)",
           {"README.txt": b"This folder stands where a .tall file is expected; a reader must refuse it.\n"},
           folder="refuse/not_a_regular_file.tall")
    refuse("empty_file", "FormatError", "open", f"{S6}: shorter than 8 bytes", "magic", "an empty file", b"")
    refuse("magic_truncated", "FormatError", "open", f"{S6}: shorter than 8 bytes", "magic",
           "the first 7 bytes of the magic only", MAGIC[:7])
    refuse("magic_text_mode", "FormatError", "open", f"{S6}: magic wrong", "magic",
           "a valid file after a text-mode transfer turned the magic's CR LF into LF", good[:5] + good[6:])
    refuse("magic_wrong", "FormatError", "open", f"{S6}: magic wrong", "magic", "'TALM' instead of 'TALL'",
           b"\x89TALM" + good[5:])
    refuse("short_preamble", "FormatError", "open", f"{S6}: shorter than the preamble", "preamble",
           "the magic and 32 more bytes of a valid file (40 bytes)", good[:40])
    refuse("preamble_checksum", "ChecksumError", "open", f"{S6}: preamble checksum", "preamble.preamble_xxh3",
           "preamble_xxh3 off by one bit", base().file(preamble_xxh3=good_pre[7] ^ 1))
    refuse("preamble_checksum_flipped_field", "ChecksumError", "open", f"{S6}: preamble checksum",
           "preamble.header_length", "a bit of header_length flipped, preamble_xxh3 left as it was (the checksum is checked before the fields it covers)",
           good[:24] + bytes([good[24] ^ 2]) + good[25:])
    refuse("major_0", "FormatError", "open", f"{S6}: major version ≠ 1", "preamble.major", "major 0", base().file(major=0))
    refuse("major_2", "FormatError", "open", f"{S6}: major version ≠ 1", "preamble.major", "major 2 (header [2, 0] too)",
           _major2())
    refuse("flags_nonzero", "FormatError", "open", f"{S6}: flags not zero", "preamble.flags", "flags = 1",
           base().file(flags=1))
    refuse("flags_high_bit", "FormatError", "open", f"{S6}: flags not zero", "preamble.flags", "flags = 0x80000000",
           base().file(flags=0x80000000))
    refuse("reserved_nonzero", "FormatError", "open", f"{S6}: reserved bytes not zero", "preamble.reserved",
           "the last reserved byte (63) is 1", base().file(reserved=bytes(15) + b"\x01"))
    refuse("header_length_over_limit", "LimitError", "open", f"{S6}: header_length > 104,857,600",
           "preamble.header_length", "header_length = 104,857,601 in a small file (checked before the file size)",
           base().file(header_length=104_857_601))
    refuse("header_length_at_limit", "FormatError", "open", f"{S6}: header not ending exactly at end of file",
           "preamble.header_length", "header_length = 104,857,600 (allowed) but the file ends long before",
           base().file(header_length=104_857_600))
    e = build([task_json("a")], ENC_TA, [])
    refuse("header_offset_unaligned", "FormatError", "open", f"{S6}: header not at an aligned offset", "preamble.header_offset",
           "no segments; the header at offset 96 after 32 zero bytes", e.file(data=bytes(32)))
    refuse("header_offset_in_preamble", "FormatError", "open", f"{S6}: header not at an offset ≥ 64",
           "preamble.header_offset", "header_offset 0", e.file(header_offset=0))
    refuse("header_offset_gap", "FormatError", "open", f"{S6}: segments not tiling: H = align64(end of the last segment)",
           "preamble.header_offset", "64 zero bytes between the last segment's padding and the header",
           base().file(data=base().data + bytes(64)))
    refuse("header_offset_no_segments_gap", "FormatError", "open", f"{S6}: H = 64 when there is no segment",
           "preamble.header_offset", "no segments; the header at 128 after 64 zero bytes", e.file(data=bytes(64)))
    refuse("trailing_zero_byte", "FormatError", "open", f"{S6}: trailing bytes", "file size",
           "one zero byte after the header", base().file(trailing=b"\x00"))
    refuse("trailing_newline_after_header", "FormatError", "open", f"{S6}: trailing bytes", "file size",
           "a newline after the header, not counted in header_length", base().file(trailing=b"\n"))
    refuse("truncated_header", "FormatError", "open", f"{S6}: truncation", "file size",
           "the file's last byte is missing", good[:-1])
    refuse("truncated_data", "FormatError", "open", f"{S6}: truncation", "file size",
           "the file cut inside the data section", good[:200])
    refuse("header_checksum", "ChecksumError", "open", f"{S6}: header checksum", "preamble.header_xxh3",
           "header_xxh3 off by one bit", base().file(header_xxh3=good_pre[6] ^ 1))
    refuse("header_byte_flipped", "ChecksumError", "open", f"{S6}: header checksum", "header",
           "one header byte changed ('v' → 'w' in metadata), header_xxh3 left as it was",
           base().file(sub(base().text(), b'"k":"v"', b'"k":"w"'), header_xxh3=good_pre[6]))

    # --- header JSON ----------------------------------------------------------------------
    t = base().text()
    for name, text, desc in [
            ("header_not_utf8", sub(t, b'"k":"v"', b'"k":"\xff"'), "a 0xFF byte inside the metadata value"),
            ("header_overlong_utf8", sub(t, b'"k":"v"', b'"k":"\xc0\xaf"'), "an overlong UTF-8 sequence (C0 AF for '/')"),
            ("header_utf8_surrogate", sub(t, b'"k":"v"', b'"k":"\xed\xa0\x80"'),
             "a UTF-16 surrogate encoded in UTF-8 (ED A0 80): not UTF-8"),
            ("header_utf8_truncated", sub(t, b'"k":"v"', b'"k":"\xe6\x95"'), "a 3-byte UTF-8 sequence cut after 2 bytes"),
            ("header_bom", b"\xef\xbb\xbf" + t, "a UTF-8 byte-order mark before '{'"),
            ("header_leading_space", b" " + t, "a space before '{'"),
            ("header_trailing_space", t + b" ", "a space after the final '}' (counted in header_length)"),
            ("header_trailing_newline", t + b"\n", "a newline after the final '}' (counted in header_length)"),
            ("header_trailing_nul", t + b"\x00", "a NUL byte after the final '}' (counted in header_length)"),
            ("header_array", b"[" + t + b"]", "the header is a JSON array holding the object"),
            ("header_not_json", t[:-1], "the final '}' missing"),
            ("header_two_objects", t + b"{}", "a second JSON object after the header object"),
            ("header_nan", sub(t, b'"lambda":0.25', b'"lambda":NaN'), "λ written NaN"),
            ("header_infinity", sub(t, b'"lambda":0.25', b'"lambda":Infinity'), "λ written Infinity"),
            ("header_neg_infinity_stats", sub(t, b'"mask_density":0.5', b'"mask_density":-Infinity'),
             "a statistic written -Infinity"),
            ("header_single_quotes", sub(t, b'"k":"v"', b"'k':'v'"), "single-quoted strings"),
            ("header_trailing_comma", sub(t, b'"k":"v"}', b'"k":"v",}'), "a trailing comma in metadata"),
            ("header_comment", sub(t, b'"k":"v"', b'"k":"v"/* c */'), "a comment"),
            ("duplicate_key_top", sub(t, b'"metadata":{"k":"v"}', b'"metadata":{"k":"v"},"metadata":{"k":"v"}'),
             "the top-level key 'metadata' twice"),
            ("duplicate_key_segment", sub(t, b'{"offset":64,', b'{"offset":64,"offset":64,'),
             "a segment with 'offset' twice (same value)"),
            ("duplicate_key_metadata", sub(t, b'{"k":"v"}', b'{"k":"v","k":"w"}'), "a metadata key twice"),
            ("duplicate_key_task", sub(t, b'{"name":"a",', b'{"name":"a","name":"a",'), "a task with 'name' twice"),
            ("duplicate_key_escaped", sub(t, b'{"k":"v"}', b'{"k":"v","\\u006b":"w"}'),
             "a metadata key twice, once written with a \\u escape"),
    ]:
        refuse(name, "FormatError", "open", f"{S6}: header not UTF-8 / not starting with '{{' / not JSON / NaN / "
               f"duplicate keys (§1.2)", "header", desc, base().file(text))

    def deep(n: int) -> Any:
        v: Any = 0
        for _ in range(n):
            v = [v]
        return v
    refuse("nesting_17", "LimitError", "open", f"{S6}: JSON nesting deeper than 16", "header",
           f"version 1.{FUTURE} with an unknown key nesting JSON to depth 17 (the header object counts as 1)",
           base(minor=FUTURE, top_extra={"x_deep": deep(16)}).file())
    b = base(minor=FUTURE, top_extra={"x_deep": "@@RAW@@"})
    refuse("nesting_10000", "LimitError", "open", f"{S6}: JSON nesting deeper than 16", "header",
           f"version 1.{FUTURE} with an unknown key nesting 10,000 arrays (a recursive parser must not crash)",
           b.file(sub(b.text(), b'"@@RAW@@"', b"[" * 10_000 + b"]" * 10_000)))

    # --- keys and types -------------------------------------------------------------------
    def case(name: str, fn: Callable[[dict], Any], desc: str, field_: str, error: str = "FormatError",
             rule: str = "missing / unknown keys, wrong types", **kw: Any) -> None:
        refuse(name, error, "open", f"{S6}: {rule}", field_, desc, edited(fn, **kw))

    case("missing_metadata", lambda h: h.pop("metadata"), "no 'metadata' key", "metadata")
    case("missing_format", lambda h: h.pop("format"), "no 'format' key", "format")
    case("missing_xxh3", lambda h: h["tensors"][0]["base"].pop("xxh3"), "a segment without 'xxh3'", "tensors[0].base.xxh3")
    case("missing_masks", lambda h: h["tensors"][0].pop("masks"), "a masked row without 'masks'", "tensors[0].masks")
    case("missing_stats", lambda h: h["tasks"][0].pop("stats"), "a task without 'stats'", "tasks[0].stats")
    case("missing_lambda", lambda h: h["tasks"][0].pop("lambda"), "a task without 'lambda'", "tasks[0].lambda")
    case("missing_target", lambda h: h["tensors"][4].pop("target"), "an alias without 'target'", "tensors[4].target")
    case("unknown_key_top", lambda h: h.__setitem__("x", 1), "an unknown top-level key in a 1.0 file", "x")
    case("unknown_key_segment", lambda h: h["tensors"][0]["base"].__setitem__("x", 1), "an unknown key in a segment",
         "tensors[0].base.x")
    case("unknown_key_task", lambda h: h["tasks"][0].__setitem__("x", 1), "an unknown key in a task", "tasks[0].x")
    case("unknown_key_masked_row", lambda h: h["tensors"][0].__setitem__("data", h["tensors"][2]["data"]),
         "a masked row with a 'data' key (a key of another role)", "tensors[0].data")
    case("unknown_key_alias_row", lambda h: h["tensors"][4].__setitem__("dtype", "F32"),
         "an alias row with a 'dtype' key", "tensors[4].dtype")
    case("unknown_key_item", lambda h: h["tensors"][3]["tasks"][0].__setitem__("x", 1), "an unknown key in a per_task item",
         "tensors[3].tasks[0].x")
    case("unknown_key_encoding", lambda h: h["encoding"].__setitem__("x", 1), "an unknown key in encoding", "encoding.x")
    case("unknown_key_merge", lambda h: h["encoding"]["merge"].__setitem__("density", 0.2),
         "task_arithmetic with a 'density' parameter", "encoding.merge.density")
    case("unknown_key_mask", lambda h: h["encoding"]["mask"].__setitem__("density", 0.2),
         "tall masks with a 'density' parameter", "encoding.mask.density")
    case("format_wrong", lambda h: h.__setitem__("format", "tallfmt-index"), "format 'tallfmt-index'", "format")
    case("tasks_object", lambda h: h.__setitem__("tasks", {"a": h["tasks"][0]}), "tasks is an object", "tasks")
    case("tensors_object", lambda h: h.__setitem__("tensors", {}), "tensors is an object", "tensors")
    case("metadata_array", lambda h: h.__setitem__("metadata", []), "metadata is an array", "metadata")
    case("metadata_value_number", lambda h: h["metadata"].__setitem__("k", 1), "a metadata value is a number", "metadata.k")
    case("metadata_value_null", lambda h: h["metadata"].__setitem__("k", None), "a metadata value is null", "metadata.k")
    case("lambda_string", lambda h: h["tasks"][0].__setitem__("lambda", "0.25"), "λ is a string", "tasks[0].lambda")
    case("stats_array", lambda h: h["tasks"][0].__setitem__("stats", []), "stats is an array", "tasks[0].stats")
    case("stats_string", lambda h: h["tasks"][0]["stats"].__setitem__("mask_density", "0.5"), "a statistic is a string",
         "tasks[0].stats.mask_density")
    case("stats_bool", lambda h: h["tasks"][0]["stats"].__setitem__("mask_density", True), "a statistic is a boolean",
         "tasks[0].stats.mask_density")
    case("shape_string", lambda h: h["tensors"][2].__setitem__("shape", "3"), "a shape is a string", "tensors[2].shape")
    case("masks_object", lambda h: h["tensors"][0].__setitem__("masks", {"0": h["tensors"][0]["masks"][0]}),
         "masks is an object", "tensors[0].masks")
    case("name_number", lambda h: h["tensors"][2].__setitem__("name", 7), "a tensor name is a number", "tensors[2].name")
    case("task_name_null", lambda h: h["tasks"][1].__setitem__("name", None), "a task name is null", "tasks[1].name")
    case("masked_base_null", lambda h: h["tensors"][0].__setitem__("base", None), "a masked row with base null",
         "tensors[0].base")
    case("per_task_item_number", lambda h: h["tensors"][3]["tasks"].__setitem__(1, 0), "a per_task entry is 0, not null",
         "tensors[3].tasks[1]")
    case("segment_array", lambda h: h["tensors"][2].__setitem__("data", list(h["tensors"][2]["data"].values())),
         "a segment written as an array", "tensors[2].data")
    case("codec_number", lambda h: h["tensors"][2]["data"].__setitem__("codec", 0), "a codec is a number",
         "tensors[2].data.codec")
    case("header_is_empty_object", lambda h: h.clear(), "the header is {}", "header")

    rule = "unknown role, dtype, codec, merge or mask method"
    case("unknown_role", lambda h: h["tensors"][4].__setitem__("role", "tied"), "role 'tied'", "tensors[4].role", rule=rule)
    case("unknown_dtype", lambda h: h["tensors"][2].__setitem__("dtype", "C64"), "dtype 'C64'", "tensors[2].dtype", rule=rule)
    case("dtype_lowercase", lambda h: h["tensors"][2].__setitem__("dtype", "i64"), "dtype 'i64'", "tensors[2].dtype", rule=rule)
    case("masked_dtype_i32", lambda h: h["tensors"][0].__setitem__("dtype", "I32"), "a masked row of dtype I32",
         "tensors[0].dtype", rule=rule)
    case("masked_dtype_u16", lambda h: h["tensors"][1].__setitem__("dtype", "U16"), "a masked row of dtype U16",
         "tensors[1].dtype", rule=rule)
    case("per_task_dtype_unknown", lambda h: h["tensors"][3]["tasks"][0].__setitem__("dtype", "F128"),
         "a per_task item of dtype 'F128'", "tensors[3].tasks[0].dtype", rule=rule)
    case("unknown_codec", lambda h: h["tensors"][2]["data"].__setitem__("codec", "lz4"), "codec 'lz4'",
         "tensors[2].data.codec", rule=rule)
    case("codec_uppercase", lambda h: h["tensors"][0]["base"].__setitem__("codec", "RAW"), "codec 'RAW'",
         "tensors[0].base.codec", rule=rule)
    case("unknown_merge_method", lambda h: h["encoding"]["merge"].__setitem__("method", "dare"), "merge method 'dare'",
         "encoding.merge.method", rule=rule)
    case("unknown_mask_method", lambda h: h["encoding"]["mask"].__setitem__("method", "random"), "mask method 'random'",
         "encoding.mask.method", rule=rule)
    case("compute_dtype_f64", lambda h: h["encoding"].__setitem__("compute_dtype", "F64"), "compute_dtype 'F64'",
         "encoding.compute_dtype", rule=rule)
    case("bit_order_big", lambda h: h["encoding"].__setitem__("bit_order", "big"), "bit_order 'big'",
         "encoding.bit_order", rule=rule)
    ties = lambda **kw: {"merge": {"method": "ties", "density": 0.2, "agg": "sum", "scope": "global", **kw},
                         "mask": {"method": "tall"}, "compute_dtype": "F32", "bit_order": "little"}
    mag = lambda **kw: {"merge": {"method": "task_arithmetic"},
                        "mask": {"method": "magnitude", "density": 0.1, "scope": "global", **kw},
                        "compute_dtype": "F32", "bit_order": "little"}
    for name, enc, desc, fld in [("ties_density_over_1", ties(density=1.5), "TIES density 1.5", "encoding.merge.density"),
                                 ("ties_density_negative", ties(density=-0.1), "TIES density -0.1", "encoding.merge.density"),
                                 ("ties_agg_unknown", ties(agg="max"), "TIES agg 'max'", "encoding.merge.agg"),
                                 ("ties_scope_unknown", ties(scope="layer"), "TIES scope 'layer'", "encoding.merge.scope"),
                                 ("ties_density_string", ties(density="0.2"), "TIES density '0.2'", "encoding.merge.density")]:
        case(name, lambda h, enc=enc: h.__setitem__("encoding", enc), desc, fld, rule="bad merge parameters (§1.2)")
    case("ties_missing_scope", lambda h: h["encoding"]["merge"].pop("scope"), "TIES without 'scope'",
         "encoding.merge.scope", encoding=ties())
    for name, enc, desc, fld in [("magnitude_density_over_1", mag(density=1.01), "magnitude density 1.01", "encoding.mask.density"),
                                 ("magnitude_scope_unknown", mag(scope="row"), "magnitude scope 'row'", "encoding.mask.scope")]:
        case(name, lambda h, enc=enc: h.__setitem__("encoding", enc), desc, fld, rule="bad mask parameters (§1.2)",
             lambdas=(None, None))
    case("magnitude_missing_density", lambda h: h["encoding"]["mask"].pop("density"), "magnitude masks without 'density'",
         "encoding.mask.density", encoding=mag(), lambdas=(None, None))
    case("newer_minor_unknown_codec", lambda h: h["tensors"][2]["data"].__setitem__("codec", "lz4"),
         f"version 1.{FUTURE} with codec 'lz4': a minor version adds optional keys, not values", "tensors[2].data.codec",
         rule=rule + " (§7)", minor=FUTURE)
    case("newer_minor_unknown_role", lambda h: h["tensors"][4].__setitem__("role", "lora"),
         f"version 1.{FUTURE} with role 'lora'", "tensors[4].role", rule=rule + " (§7)", minor=FUTURE)
    case("newer_minor_unknown_dtype", lambda h: h["tensors"][2].__setitem__("dtype", "F4"),
         f"version 1.{FUTURE} with dtype 'F4'", "tensors[2].dtype", rule=rule + " (§7)", minor=FUTURE)
    case("tau_dtype_in_1_1", lambda h: h["encoding"].__setitem__("tau_dtype", "BF16"),
         "encoding.tau_dtype (a 1.2 key) in a version 1.1 file", "encoding.tau_dtype", rule=rule + " (§7)", minor=1)
    case("tau_dtype_unknown", lambda h: h["encoding"].__setitem__("tau_dtype", "F16"),
         "version 1.2 with encoding.tau_dtype 'F16' (F32 and BF16 only)", "encoding.tau_dtype",
         rule="encoding.tau_dtype not F32 or BF16 (§6)", minor=2)
    def baseref(h: dict, **extra: Any) -> None:  # θ0 of 'w' (F32 [3, 5]) kept outside: a BASEREF, FORMAT.md §2.1
        h["tensors"][0]["base"] = {"decoded_length": 60, "xxh3": "0123456789abcdef", **extra}
    case("baseref_in_1_1", baseref, "a BASEREF (θ0 kept outside, a 1.2 feature) in a version 1.1 file: a segment "
         "without offset, length, codec", "tensors[0].base", rule=rule + " (§2.1, §7)", minor=1)
    case("baseref_extra_key", lambda h: baseref(h, codec="raw"), "version 1.2, a BASEREF with a 'codec' key",
         "tensors[0].base.codec", rule="BASEREF keys (§2.1)", minor=2)
    case("baseref_wrong_length", lambda h: baseref(h, decoded_length=64), "version 1.2, a BASEREF of 64 bytes for "
         "an F32 [3, 5] tensor (60)", "tensors[0].base.decoded_length", rule="decoded_length ≠ shape × dtype (§2.1, §6)",
         minor=2)
    case("baseref_bad_xxh3", lambda h: baseref(h, xxh3="0123456789ABCDEF"), "version 1.2, a BASEREF whose xxh3 has "
         "upper-case digits", "tensors[0].base.xxh3", rule="BASEREF keys (§2.1)", minor=2)
    case("tau_dtype_bf16_tau_4n", lambda h: h["encoding"].__setitem__("tau_dtype", "BF16"),
         "version 1.2, encoding.tau_dtype BF16 with an F32-sized tau segment (decoded_length 4n, not 2n)",
         "tensors[0].tau.decoded_length", rule="decoded_length ≠ shape × dtype (§2, §6)", minor=2)

    # --- version ------------------------------------------------------------------------
    rule = "bad version"
    case("version_header_newer", lambda h: h.__setitem__("version", [1, 1]), "header [1, 1], preamble 1.0", "version", rule=rule)
    refuse("version_preamble_newer", "FormatError", "open", f"{S6}: {rule}", "version",
           "preamble minor 1, header [1, 0]", base().file(minor=1))
    case("version_header_major_2", lambda h: h.__setitem__("version", [2, 0]), "header [2, 0], preamble 1.0", "version", rule=rule)
    case("version_length_3", lambda h: h.__setitem__("version", [1, 0, 0]), "version [1, 0, 0]", "version", rule=rule)
    case("version_length_1", lambda h: h.__setitem__("version", [1]), "version [1]", "version", rule=rule)
    case("version_empty", lambda h: h.__setitem__("version", []), "version []", "version", rule=rule)
    case("version_string", lambda h: h.__setitem__("version", "1.0"), "version '1.0'", "version", rule=rule)
    case("version_object", lambda h: h.__setitem__("version", {"major": 1, "minor": 0}), "version as an object",
         "version", rule=rule)
    case("version_negative", lambda h: h.__setitem__("version", [1, -1]), "version [1, -1]", "version", rule=rule)
    for name, raw, desc in [("version_float", b"[1.0,0]", "version [1.0, 0]"), ("version_exponent", b"[1,0e0]", "version [1, 0e0]"),
                            ("version_bool", b"[1,false]", "version [1, false]"),
                            ("version_401_digits", b"[1," + BIG + b"]", "a 401-digit minor version")]:
        refuse(name, "FormatError", "open", f"{S6}: integer field written as a non-integer number / a boolean / too large",
               "version", desc, raw_field(lambda h, s: h.__setitem__("version", s), raw))

    # --- names ----------------------------------------------------------------------------
    rule = "duplicate task or tensor names, alias whose target is missing or an alias"
    case("duplicate_task_names", lambda h: h["tasks"][1].__setitem__("name", "a"), "two tasks named 'a'", "tasks[1].name", rule=rule)
    case("duplicate_tensor_names", lambda h: h["tensors"][2].__setitem__("name", "head"), "two tensors named 'head'",
         "tensors[2].name", rule=rule)
    case("duplicate_alias_names", lambda h: h["tensors"].append(dict(h["tensors"][4])), "the alias row twice",
         "tensors[5].name", rule=rule)
    case("alias_target_missing", lambda h: h["tensors"][4].__setitem__("target", "nope"), "alias of a missing tensor",
         "tensors[4].target", rule=rule)
    case("alias_target_alias", lambda h: h["tensors"].append({"name": "tied2", "role": "alias", "target": "tied"}),
         "alias of an alias", "tensors[5].target", rule=rule)
    case("alias_self", lambda h: h["tensors"][4].__setitem__("target", "tied"), "alias of itself", "tensors[4].target", rule=rule)
    rule = "names are 1..4096 bytes of Unicode (project decision: empty is a FormatError, too long a LimitError)"
    case("empty_task_name", lambda h: h["tasks"][0].__setitem__("name", ""), "a task named ''", "tasks[0].name", rule=rule)
    case("empty_tensor_name", lambda h: h["tensors"][2].__setitem__("name", ""), "a tensor named ''", "tensors[2].name", rule=rule)
    case("empty_alias_target", lambda h: h["tensors"][4].__setitem__("target", ""), "an alias with target ''",
         "tensors[4].target", rule=rule)
    case("task_name_4097_bytes", lambda h: h["tasks"][0].__setitem__("name", "a" * 4097), "a task name of 4097 bytes",
         "tasks[0].name", "LimitError", rule=rule)
    case("task_name_4097_bytes_emoji", lambda h: h["tasks"][0].__setitem__("name", "\U0001F600" * 1024 + "a"),
         "a task name of 1025 characters, 4097 UTF-8 bytes", "tasks[0].name", "LimitError", rule=rule)
    case("tensor_name_4097_bytes", lambda h: h["tensors"][2].__setitem__("name", "\u00e9" * 2048 + "x"),
         "a tensor name of 2049 characters, 4097 UTF-8 bytes", "tensors[2].name", "LimitError", rule=rule)
    case("alias_name_4097_bytes", lambda h: h["tensors"][4].__setitem__("name", "t" * 4097),
         "an alias name of 4097 bytes", "tensors[4].name", "LimitError", rule=rule)

    rule = "a string with an unpaired surrogate escape"
    for name, old, new, desc in [
            ("surrogate_tensor_name", b'"name":"pos"', b'"name":"\\ud800"', "a tensor named '\\ud800'"),
            ("surrogate_task_name", b'"name":"b"', b'"name":"b\\udfff"', "a task name ending in '\\udfff'"),
            ("surrogate_metadata_key", b'{"k":"v"}', b'{"\\ud83d":"v"}', "a metadata key '\\ud83d' (a lone high surrogate)"),
            ("surrogate_metadata_value", b'{"k":"v"}', b'{"k":"v\\udc00"}', "a metadata value with a lone low surrogate"),
            ("surrogate_reversed_pair", b'{"k":"v"}', b'{"k":"\\ude00\\ud83d"}', "a surrogate pair in the wrong order"),
            ("surrogate_alias_target", b'"target":"w"', b'"target":"w\\ud800"', "an alias target with a lone surrogate")]:
        refuse(name, "FormatError", "open", f"{S6}: {rule}", "header", desc, raw_text(old, new))
    b = base(minor=FUTURE, top_extra={"x_future": {"note": "@@RAW@@"}})
    refuse("surrogate_in_unknown_key", "FormatError", "open", f"{S6}: {rule} (any string of the header)", "x_future.note",
           f"version 1.{FUTURE}: a lone surrogate inside the value of an unknown (ignored) key",
           b.file(sub(b.text(), b'"@@RAW@@"', b'"\\ud800"')))

    # --- integer and number fields --------------------------------------------------------
    rule = "an integer field written as a non-integer number or a boolean, or too large for the field"
    for name, fn, raw, desc, fld in [
            ("offset_float", lambda h, s: h["tensors"][0]["base"].__setitem__("offset", s), b"64.0", "offset 64.0", "tensors[0].base.offset"),
            ("offset_exponent", lambda h, s: h["tensors"][0]["base"].__setitem__("offset", s), b"6.4e1", "offset 6.4e1", "tensors[0].base.offset"),
            ("length_exponent", lambda h, s: h["tensors"][0]["base"].__setitem__("length", s), b"60e0", "length 60e0", "tensors[0].base.length"),
            ("decoded_length_float", lambda h, s: h["tensors"][2]["data"].__setitem__("decoded_length", s), b"24.0",
             "decoded_length 24.0", "tensors[2].data.decoded_length"),
            ("dimension_float", lambda h, s: h["tensors"][0].__setitem__("shape", s), b"[3.0,5]", "shape [3.0, 5]", "tensors[0].shape[0]"),
            ("dimension_exponent", lambda h, s: h["tensors"][0].__setitem__("shape", s), b"[3,5E0]", "shape [3, 5E0]", "tensors[0].shape[1]"),
            ("dimension_bool", lambda h, s: h["tensors"][2].__setitem__("shape", s), b"[true,3]", "shape [true, 3]", "tensors[2].shape[0]"),
            ("offset_bool", lambda h, s: h["tensors"][0]["base"].__setitem__("offset", s), b"true", "offset true", "tensors[0].base.offset"),
            ("offset_401_digits", lambda h, s: h["tensors"][0]["base"].__setitem__("offset", s), BIG, "a 401-digit offset",
             "tensors[0].base.offset"),
            ("length_401_digits", lambda h, s: h["tensors"][2]["data"].__setitem__("length", s), BIG, "a 401-digit length",
             "tensors[2].data.length"),
            ("offset_2_64", lambda h, s: h["tensors"][0]["base"].__setitem__("offset", s), b"18446744073709551680",
             "offset 2**64 + 64 (wraps to 64 in a u64)", "tensors[0].base.offset"),
            ("offset_negative", lambda h, s: h["tensors"][0]["base"].__setitem__("offset", s), b"-64", "offset -64",
             "tensors[0].base.offset"),
            ("length_negative", lambda h, s: h["tensors"][2]["data"].__setitem__("length", s), b"-1", "length -1",
             "tensors[2].data.length"),
            ("dimension_negative", lambda h, s: h["tensors"][0].__setitem__("shape", s), b"[-3,-5]",
             "shape [-3, -5] (the product, 15, matches the data)", "tensors[0].shape"),
    ]:
        refuse(name, "FormatError", "open", f"{S6}: {rule}", fld, desc, raw_field(fn, raw))
    rule = "a number that overflows a double (or a 401-digit integer) where a finite number is expected"
    for name, fn, raw, desc, fld, kw in [
            ("lambda_1e999", lambda h, s: h["tasks"][0].__setitem__("lambda", s), b"1e999", "λ 1e999", "tasks[0].lambda", {}),
            ("lambda_401_digits", lambda h, s: h["tasks"][0].__setitem__("lambda", s), BIG, "λ a 401-digit integer", "tasks[0].lambda", {}),
            ("stats_1e999", lambda h, s: h["tasks"][1]["stats"].__setitem__("cosine", s), b"-1e999", "a statistic -1e999",
             "tasks[1].stats.cosine", {}),
            ("stats_401_digits", lambda h, s: h["tasks"][1]["stats"].__setitem__("cosine", s), BIG, "a 401-digit statistic",
             "tasks[1].stats.cosine", {}),
            ("ties_density_1e999", lambda h, s: h["encoding"]["merge"].__setitem__("density", s), b"1e999", "TIES density 1e999",
             "encoding.merge.density", {"encoding": ties()}),
            ("ties_density_401_digits", lambda h, s: h["encoding"]["merge"].__setitem__("density", s), BIG,
             "TIES density a 401-digit integer", "encoding.merge.density", {"encoding": ties()}),
            ("magnitude_density_401_digits", lambda h, s: h["encoding"]["mask"].__setitem__("density", s), b"-" + BIG,
             "magnitude density a negative 401-digit integer", "encoding.mask.density", {"encoding": mag(), "lambdas": (None, None)}),
            ("lambda_bool", lambda h, s: h["tasks"][0].__setitem__("lambda", s), b"true", "λ true", "tasks[0].lambda", {}),
    ]:
        refuse(name, "FormatError", "open", f"{S6}: {rule}", fld, desc, raw_field(fn, raw, **kw))

    rule = "λ (project decision: TALL masks: finite > 0 with a finite float32 rounding; magnitude masks: null)"
    case("lambda_null_tall", lambda h: h["tasks"][1].__setitem__("lambda", None), "λ null with TALL masks", "tasks[1].lambda", rule=rule)
    case("lambda_zero", lambda h: h["tasks"][1].__setitem__("lambda", 0), "λ 0", "tasks[1].lambda", rule=rule)
    case("lambda_negative_zero", lambda h: h["tasks"][1].__setitem__("lambda", -0.0), "λ -0.0", "tasks[1].lambda", rule=rule)
    case("lambda_negative", lambda h: h["tasks"][1].__setitem__("lambda", -0.25), "λ -0.25", "tasks[1].lambda", rule=rule)
    case("lambda_float32_overflow", lambda h: h["tasks"][1].__setitem__("lambda", 1e39), "λ 1e39 (finite double, float32 inf)",
         "tasks[1].lambda", rule=rule)
    case("lambda_float32_overflow_tie", lambda h: h["tasks"][1].__setitem__("lambda", 3.4028235677973366e38),
         "λ = FLT_MAX + half an ulp, which rounds to float32 inf (ties to even)", "tasks[1].lambda", rule=rule)
    case("lambda_with_magnitude", lambda h: None, "magnitude masks with λ 0.25 and 0.75", "tasks[0].lambda", rule=rule,
         encoding=mag())
    case("lambda_with_magnitude_one", lambda h: None, "magnitude masks, one λ null and one 0.75", "tasks[1].lambda", rule=rule,
         encoding=mag(), lambdas=(None, 0.75))

    # --- counts and limits ------------------------------------------------------------------
    rule = "tasks 1..4096, one mask / per_task entry per task"
    case("tasks_empty", lambda h: h.__setitem__("tasks", []), "no tasks (and no masks)", "tasks", rule=rule,
         rows=[base_tensors()[2].row()])
    e = build([task_json(f"{i:04d}", 1) for i in range(4097)], ENC_TA, [])
    refuse("tasks_4097", "LimitError", "open", f"{S6}: more than 4096 tasks", "tasks", "4097 tasks, no tensors", e.file())
    case("masks_one_short", lambda h: h["tensors"][0]["masks"].pop(), "a masked row with 1 mask for 2 tasks",
         "tensors[0].masks", rule=rule)
    case("masks_one_extra", lambda h: h["tensors"][0]["masks"].append(h["tensors"][0]["masks"][0]),
         "a masked row with 3 masks for 2 tasks (the third a copy of the first)", "tensors[0].masks", rule=rule)
    case("per_task_one_short", lambda h: h["tensors"][3]["tasks"].pop(), "a per_task row with 1 entry for 2 tasks",
         "tensors[3].tasks", rule=rule)
    case("per_task_all_null", lambda h: h["tensors"][3]["tasks"].__setitem__(0, None),
         "a per_task row with base null and every entry null (task a's entry was a zero-length segment)", "tensors[3]",
         rule="per_task with nothing stored (project decision)", rows=_rows_without_head_segment())
    case("ndim_33", lambda h: h["tensors"][2].__setitem__("shape", [3] + [1] * 32), "a shape of 33 dimensions (product 3)",
         "tensors[2].shape", "LimitError", rule="more than 32 dimensions")
    rows = [t.row() for t in base_tensors()]
    rows.append({"name": "huge", "role": "shared", "dtype": "F32", "shape": [2**48 + 1, 0], "data": Seg(b"", 0, "raw")})
    refuse("dimension_over_2_48", "LimitError", "open", f"{S6}: a dimension > 2**48 (project decision)", "tensors[5].shape[0]",
           "shape [2**48 + 1, 0] F32: no bytes, but a dimension past the limit", base(rows=rows).file())
    for name, dtype, shape, desc in [
            ("bytes_over_2_48", "U8", [2**47, 4], "shape [2**47, 4] U8: 2**49 bytes"),
            ("bytes_over_2_48_f32", "F32", [2**46 + 1], "shape [2**46 + 1] F32: 2**48 + 4 bytes"),
            ("bytes_wrap_u64", "I8", [2**32, 2**32, 2**32], ("shape [2**32, 2**32, 2**32] I8 (2**96 bytes, 0 modulo 2**64), "
              "declared as 0 bytes")),
            ("bytes_wrap_u64_4_dims", "U8", [2**48, 2**48, 2**48, 2**16], ("shape [2**48, 2**48, 2**48, 2**16] U8 (2**160 "
                                                                             "bytes, 0 modulo 2**64), declared as 0 bytes"))]:
        n = numel(shape) * ITEMSIZE[dtype]
        declared = 0 if "wrap" in name else n
        seg = Seg(b"", 0, "raw") if declared == 0 else Seg(zstd_frame(b"\x00" * 16, stated=declared, fcs=8), declared, "zstd")
        refuse(name, "LimitError", "open", f"{S6}: a tensor larger than 2**48 bytes", "tensors[5].shape", desc,
               one_shared(seg, dtype, tuple(shape)))

    # --- decoded_length, raw length, expansion ---------------------------------------------
    rule = "decoded_length ≠ the size shape × dtype imply (§2)"
    case("decoded_length_tau", lambda h: h["tensors"][1]["tau"].__setitem__("decoded_length", 8),
         "τ_MTL of a BF16 [4] tensor declared 8 bytes (itemsize 2, not 4)", "tensors[1].tau.decoded_length", rule=rule)
    case("decoded_length_mask", lambda h: h["tensors"][1]["masks"][0].__setitem__("decoded_length", 4),
         "a mask of 4 elements declared 4 bytes (one bit per element: 1)", "tensors[1].masks[0].decoded_length", rule=rule)
    case("decoded_length_shared", lambda h: h["tensors"][2]["data"].__setitem__("decoded_length", 16),
         "shared I64 [3] declared 16 bytes", "tensors[2].data.decoded_length", rule=rule)
    case("decoded_length_base_dtype", lambda h: h["tensors"][1].__setitem__("dtype", "F32"),
         "a BF16 tensor relabelled F32 (its θ0 segment's decoded_length no longer matches)", "tensors[1].base.decoded_length", rule=rule)
    rows = [t.row() for t in base_tensors()]
    rows[0]["base"] = Seg(rows[0]["base"].stored + b"\x00", 60, "raw")
    refuse("raw_length_mismatch", "FormatError", "open", f"{S6}: a raw segment with length ≠ decoded_length",
           "tensors[0].base.length", "a raw θ0 segment of 61 stored bytes for 60 decoded", base(rows=rows).file())
    n_over = 32768 * 16 + 4097
    frame16 = zstd_frame(bytes([7]) * 4, stated=n_over, fcs=4)[:13] + b"\x00\x00\x00"
    refuse("expansion_over_limit", "LimitError", "open", f"{S6}: decoded_length > 32768 × length + 4096",
           "tensors[5].data.decoded_length", "a 16-byte zstd segment declaring 32768·16 + 4097 bytes (U8 shape to match)",
           one_shared(Seg(frame16, n_over, "zstd"), "U8", (n_over,)))
    frame13 = zstd_frame(b"", stated=32768 * 13 + 4096, fcs=4, blocks=[("rle", bytes([7]) * BLOCK_MAX)])
    assert len(frame13) == 13
    n_at = 32768 * 13 + 4096
    refuse("expansion_at_limit", "FormatError", "read", f"{S6R}: zstd corrupt data (decoded_length = 32768 × length + 4096 "
           "passes the open check)", "tensors[5].data", "a 13-byte zstd frame stating exactly 32768·13 + 4096 bytes whose "
           "one RLE block holds 131072: refused on read, not on open", one_shared(Seg(frame13, n_at, "zstd"), "U8", (n_at,)))

    # --- xxh3 -------------------------------------------------------------------------------
    rule = "wrong types (xxh3: 16 lowercase hex digits)"
    xx = base().header["tensors"][0]["base"]["xxh3"]
    case("xxh3_uppercase", lambda h: h["tensors"][0]["base"].__setitem__("xxh3", xx.upper() if xx.upper() != xx else "A" + xx[1:]),
         "xxh3 in uppercase hex", "tensors[0].base.xxh3", rule=rule)
    case("xxh3_15_digits", lambda h: h["tensors"][0]["base"].__setitem__("xxh3", xx[1:]), "xxh3 of 15 digits",
         "tensors[0].base.xxh3", rule=rule)
    case("xxh3_17_digits", lambda h: h["tensors"][0]["base"].__setitem__("xxh3", "0" + xx), "xxh3 of 17 digits",
         "tensors[0].base.xxh3", rule=rule)
    case("xxh3_integer", lambda h: h["tensors"][0]["base"].__setitem__("xxh3", int(xx, 16)), "xxh3 as an integer",
         "tensors[0].base.xxh3", rule=rule)
    case("xxh3_0x_prefix", lambda h: h["tensors"][0]["base"].__setitem__("xxh3", "0x" + xx[2:]), "xxh3 '0x…'",
         "tensors[0].base.xxh3", rule=rule)

    # --- segment tiling and padding ---------------------------------------------------------------
    rule = "segments not exactly tiling the data section"
    def shifted(k: int, shift: int = 0, fill: int = 0) -> bytes:
        rows = [t.row() for t in base_tensors()]
        seg = collect_segs(rows, [])[k]
        seg.shift, seg.fill = shift, fill
        return base(rows=rows).file()
    refuse("segment_gap", "FormatError", "open", f"{S6}: {rule}", "tensors[0].tau.offset",
           "64 zero bytes of gap before τ_MTL of 'w' (offset 192, expected 128)", shifted(1, 64))
    refuse("first_segment_not_at_64", "FormatError", "open", f"{S6}: {rule} (the first at 64)", "tensors[0].base.offset",
           "the first segment at offset 128, zero bytes before it", shifted(0, 64))
    refuse("segment_misaligned", "FormatError", "open", f"{S6}: {rule} (misaligned)", "tensors[1].base.offset",
           "a segment at align64(previous end) + 8", shifted(4, 8))
    case("segment_overlap", lambda h: h["tensors"][0]["tau"].__setitem__("offset", 64), "τ_MTL's offset set to θ0's (64)",
         "tensors[0].tau.offset", rule=rule)
    case("segment_shared_storage", lambda h: h["tensors"].append({"name": "pos2", "role": "shared", "dtype": "I64",
                                                                   "shape": [3], "data": dict(h["tensors"][2]["data"])}),
         "two rows with the same segment object (same offset and bytes)", "tensors[5].data.offset", rule=rule)
    case("segment_past_end", lambda h: h["tensors"][3]["tasks"][0]["data"].__setitem__("length", 100_000),
         "the last segment's length runs far past the end of the file", "tensors[3].tasks[0].data.length", rule=rule,
         rows=_rows_zstd_last())
    case("segment_into_header", lambda h: h["tensors"][3]["tasks"][0]["data"].__setitem__("length", 80),
         "the last segment's length (80) runs into the header", "tensors[3].tasks[0].data.length", rule=rule,
         rows=_rows_zstd_last())
    za = Shared("a", "U8", (16,), bytes(range(16)), "raw")
    zz = Shared("z", "U8", (0,), b"", "raw")
    rows = [za.row(), zz.row()]
    rows[1]["data"].shift = 64
    refuse("zero_length_segment_gap", "FormatError", "open", f"{S6}: {rule} (zero-length segments too)", "tensors[1].data.offset",
           "a zero-length segment at 192 (expected align64(80) = 128), the header at 192",
           build([task_json("a", 1.0)], ENC_TA, rows).file())
    rows = [za.row(), zz.row()]
    b = build([task_json("a", 1.0)], ENC_TA, rows)
    b.header["tensors"][1]["data"]["offset"] = 80
    refuse("zero_length_segment_unaligned", "FormatError", "open", f"{S6}: {rule} (zero-length segments too)",
           "tensors[1].data.offset", "a zero-length segment at offset 80 (the previous end, not aligned)", b.file())
    rule = "padding bytes between segments and before the header not zero"
    refuse("padding_nonzero", "FormatError", "open", f"{S6}: {rule}", "padding",
           "the 4 padding bytes after θ0 of 'w' are 0x01", shifted(1, 0, 1))
    rows = [t.row() for t in base_tensors()]
    b = base(rows=rows)
    data = bytearray(b.data)
    data[-1] = 0x80
    refuse("padding_nonzero_before_header", "FormatError", "open", f"{S6}: {rule}", "padding",
           "the last padding byte before the header is 0x80", b.file(data=bytes(data)))

    # --- segments, on read --------------------------------------------------------------------
    def with_seg(k: int, stored: bytes, decoded: int | None = None, codec: str | None = None) -> bytes:
        rows = [t.row() for t in base_tensors()]
        segs = collect_segs(rows, [])
        old = segs[k]
        old.stored = stored
        if decoded is not None:
            old.decoded_length = decoded
        if codec is not None:
            old.codec = codec
        return base(rows=rows).file()

    b = base()
    d = b.data
    w_tau = b.header["tensors"][0]["tau"]
    flipped = bytearray(d)
    flipped[w_tau["offset"] - 64 + 7] ^= 0x10
    refuse("segment_checksum_tau", "ChecksumError", "read", f"{S6R}: stored bytes' XXH3-64 ≠ xxh3", "tensors[0].tau",
           "one bit of τ_MTL of 'w' flipped", b.file(data=bytes(flipped)))
    m1 = b.header["tensors"][0]["masks"][1]
    flipped = bytearray(d)
    flipped[m1["offset"] - 64] ^= 0x01
    refuse("segment_checksum_mask", "ChecksumError", "read", f"{S6R}: stored bytes' XXH3-64 ≠ xxh3", "tensors[0].masks[1]",
           "one bit of task b's mask of 'w' flipped", b.file(data=bytes(flipped)))
    b = base(rows=[*[t.row() for t in base_tensors()], Shared("z", "U8", (0,), b"", "raw").row()])
    b.header["tensors"][5]["data"]["xxh3"] = "0000000000000000"
    refuse("segment_checksum_empty", "ChecksumError", "read", f"{S6R}: stored bytes' XXH3-64 ≠ xxh3", "tensors[5].data.xxh3",
           "a zero-length segment whose xxh3 is not XXH3-64 of no bytes (2d06800538d394c2)", b.file())

    pos = np.arange(3, dtype="<i8").tobytes()      # tensors[2] 'pos', segment index 8
    content = bytes(range(24))
    rule = "zstd: not a frame, content size absent or ≠ decoded_length, corrupt data, bytes after the frame"
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"skip"
    for name, stored, desc in [
            ("zstd_not_a_frame", bytes(rand_u32("garbage", 6).astype("<u4").tobytes()), "24 bytes that are not a zstd frame"),
            ("zstd_no_content_size", zstd_frame(content, single=False, fcs=0), "a frame without Frame_Content_Size"),
            ("zstd_content_size_larger", zstd_frame(content, stated=25), ("the frame states 25 bytes, the header 24 "
                                                                         "(blocks hold 24)")),
            ("zstd_content_size_smaller", zstd_frame(content + b"\x00", stated=24),
             "the frame states 24 bytes (as the header) but its blocks hold 25"),
            ("zstd_content_short", zstd_frame(content[:23], stated=24), "the frame states 24 bytes, its blocks hold 23"),
            ("zstd_reserved_block_type", frame_head(24) + struct.pack("<I", 1 | 3 << 1 | 24 << 3)[:3] + content,
             "a block of the reserved type 3"),
            ("zstd_treeless_literals", frame_head(24) + struct.pack("<I", 1 | 2 << 1 | 7 << 3)[:3] +
             bytes([0x03 | (24 & 0xF) << 4, 24 >> 4 | (3 & 0x3F) << 2, 0]) + b"\x01\x02\x03" + b"\x00",
             "a compressed block with treeless literals and no previous Huffman table"),
            ("zstd_trailing_byte", zstd_frame(content) + b"\x00", "a zero byte after the frame"),
            ("zstd_trailing_skippable", zstd_frame(content) + skippable, "a skippable frame after the frame"),
            ("zstd_leading_skippable", skippable + zstd_frame(content), "a skippable frame before the frame"),
            ("zstd_two_frames", zstd_frame(content[:12], fcs=1) + zstd_frame(content[12:], fcs=1),
             "two frames of 12 bytes each"),
            ("zstd_bad_checksum", zstd_frame(content, checksum=True, bad_checksum=True), "a content checksum that does not match"),
            ("zstd_dictionary", zstd_frame(content, dict_id=7), "a frame that needs dictionary 7"),
            ("zstd_reserved_bit", zstd_frame(content, reserved_bit=True), "the frame header's reserved bit set"),
            ("zstd_truncated", zstd_frame(content)[:-3], "a frame whose last block is cut short"),
    ]:
        assert_refused_by_libzstd(stored, 24)
        refuse(name, "FormatError", "read", f"{S6R}: {rule}", "tensors[2].data", f"shared I64 [3], codec zstd: {desc}",
               with_seg(8, stored, codec="zstd"))
    rule = "zstd window larger than 2**27 bytes (project decision)"
    for name, window, desc in [("zstd_window_2_27_plus", (27, 1), "a window of 2**27 + 2**24 bytes"),
                               ("zstd_window_2_28", (28, 0), "a window of 2**28 bytes"),
                               ("zstd_window_2_31", (31, 0), "a window of 2**31 bytes")]:
        refuse(name, "FormatError", "read", f"{S6R}: {rule}", "tensors[2].data", f"shared I64 [3], codec zstd: {desc} "
               "(content size stated)", with_seg(8, zstd_frame(content, single=False, window=window, fcs=4), codec="zstd"))

    rule = "byteplane-zstd: table does not fit, Σℓ_j ≠ stored length − 8s, any frame as for zstd"
    planes = [zstd_frame(p) for p in planes_of(pos, 8)]
    lens = [len(f) for f in planes]
    table = lambda ls: struct.pack("<8Q", *ls)
    for name, stored, desc in [
            ("byteplane_table_short", table(lens)[:60], "60 bytes: less than the 64-byte table of 8 lengths"),
            ("byteplane_sum_larger", table([lens[0] + 1] + lens[1:]) + b"".join(planes), "ℓ_0 one too large"),
            ("byteplane_sum_smaller", table(lens) + b"".join(planes) + b"\x00", "one byte more than Σℓ_j after the table"),
            ("byteplane_sum_wraps", table([2**64 - 8] + lens[1:7] + [lens[7] + 8]) + b"".join(planes),
             "ℓ_0 = 2**64 − 8 and ℓ_7 8 too large: Σℓ_j wraps to the right value in u64 arithmetic"),
            ("byteplane_plane_content_size", table(lens) + b"".join(planes[:3] + [zstd_frame(planes_of(pos, 8)[3], stated=4)] + planes[4:]),
             "plane 3's frame states 4 bytes (3 elements)"),
            ("byteplane_plane_no_content_size",
             table(lens[:5] + [len(zstd_frame(b"\x00\x00\x00", single=False, fcs=0))] + lens[6:]) +
             b"".join(planes[:5] + [zstd_frame(b"\x00\x00\x00", single=False, fcs=0)] + planes[6:]),
             "plane 5's frame has no content size"),
            ("byteplane_plane_trailing", table([lens[0] + 1] + lens[1:]) + planes[0] + b"\x00" + b"".join(planes[1:]),
             "a zero byte after plane 0's frame, counted in ℓ_0"),
            ("byteplane_plane_window", table(lens[:2] + [len(zstd_frame(b"\x00" * 3, single=False, window=(28, 0), fcs=4))] + lens[3:]) +
             b"".join(planes[:2] + [zstd_frame(b"\x00" * 3, single=False, window=(28, 0), fcs=4)] + planes[3:]),
             "plane 2's frame has a 2**28-byte window (project decision: ≤ 2**27)"),
            ("byteplane_plane_lengths_shifted", table([lens[0] - 1, lens[1] + 1] + lens[2:]) + b"".join(planes),
             "ℓ_0 one too small and ℓ_1 one too large (the sum is right): frame 0 cut, frame 1 after a stray byte"),
    ]:
        refuse(name, "FormatError", "read", f"{S6R}: {rule}", "tensors[2].data", f"shared I64 [3], byteplane-zstd: {desc}",
               with_seg(8, stored))

    rule = "mask padding bits not zero (§3)"
    m = bytearray(pack_mask(rand_bits("base.w.m0", 15, 0.5)))
    m[1] |= 0x80
    refuse("mask_padding_raw", "FormatError", "read", f"{S6R}: {rule}", "tensors[0].masks[0]",
           "bit 15 (the padding bit of a 15-element mask) set, raw codec", with_seg(2, bytes(m)))
    hm = pack_mask(np.array([0, 1, 1, 0], bool))[0] | 0xF0
    refuse("mask_padding_zstd", "FormatError", "read", f"{S6R}: {rule}", "tensors[1].masks[1]",
           "padding bits 4..7 of a 4-element mask set, zstd codec", with_seg(7, zstd_frame(bytes([hm])), codec="zstd"))

    rule = "BOOL bytes other than 0 and 1 (project decision)"
    refuse("bool_shared_2", "FormatError", "read", f"{S6R}: {rule}", "tensors[5].data", "a shared BOOL [4] holding 0, 1, 2, 1",
           one_shared(Seg(bytes([0, 1, 2, 1]), 4, "raw"), "BOOL", (4,)))
    refuse("bool_shared_zstd_80", "FormatError", "read", f"{S6R}: {rule}", "tensors[5].data",
           "a shared BOOL [3] holding 0x80 in the middle, zstd codec",
           one_shared(Seg(zstd_frame(bytes([1, 0x80, 0])), 3, "zstd"), "BOOL", (3,)))
    rows = [t.row() for t in base_tensors()]
    rows.append({"name": "flags", "role": "per_task", "base": {"dtype": "BOOL", "shape": [2], "data": Seg(b"\x01\x00", 2, "raw")},
                 "tasks": [None, {"dtype": "BOOL", "shape": [2, 1], "data": Seg(b"\x00\xff", 2, "raw")}]})
    refuse("bool_per_task_ff", "FormatError", "read", f"{S6R}: {rule}", "tensors[5].tasks[1].data",
           "a per_task BOOL entry of task b holding 0xFF", base(rows=rows).file())

    residual_refuse_cases()


def residual_base(pos: list[int] | None = None, bits: Any = None, dtype: str = "F32", minor: int = 2) -> Built:
    """The base file with a residual (§11) for task a on 'w' (F32 [3, 5], raw segments): by default
    entries 0, 7 and 14 (the first, a middle and the last element); version 1.2."""
    ts = base_tensors()
    pos = [0, 7, 14] if pos is None else pos
    bits = to_bits("F32", np.array([0.5, -0.25, 0.125][:len(pos)], np.float32)) if bits is None else bits
    ts[0].residuals = [(pos, dtype, bits), None]
    return base(tensors=ts, minor=minor)


def residual_refuse_cases() -> None:
    S6, S6R = "§6 (on open)", "§6 (on read)"
    R = "tensors[0].residuals[0]"

    def case(name: str, fn: Callable[[dict], Any], desc: str, field_: str, minor: int = 2) -> None:
        b = residual_base(minor=minor)
        fn(b.header)
        refuse(name, "FormatError", "open", f"{S6}: residuals (§11)", field_, desc, b.file())

    def r0(h: dict) -> dict:
        return h["tensors"][0]["residuals"][0]
    case("residual_count_over_n", lambda h: r0(h).__setitem__("count", 16), "count 16 for a tensor of 15 elements",
         f"{R}.count")
    case("residual_count_zero", lambda h: r0(h).__setitem__("count", 0), "count 0 (a task without entries is null)",
         f"{R}.count")
    case("residual_count_float", lambda h: r0(h).__setitem__("count", 3.0), "count 3.0", f"{R}.count")
    case("residual_dtype_f64", lambda h: r0(h).__setitem__("dtype", "F64"), "value dtype F64", f"{R}.dtype")
    case("residual_positions_length", lambda h: r0(h)["positions"].__setitem__("decoded_length", 8),
         "positions decoded_length 8 for 3 entries (12 bytes of u32 gaps)", f"{R}.positions.decoded_length")
    case("residual_values_length", lambda h: r0(h)["values"].__setitem__("decoded_length", 6),
         "values decoded_length 6 for 3 F32 entries", f"{R}.values.decoded_length")
    case("residual_missing_values", lambda h: r0(h).pop("values"), "an entry without 'values'", f"{R}.values")
    case("residual_unknown_key", lambda h: r0(h).__setitem__("x", 1), "an unknown key in a residual entry of a 1.2 file",
         f"{R}.x")
    case("residual_tasks_length", lambda h: h["tensors"][0]["residuals"].pop(), "one residual entry for two tasks",
         "tensors[0].residuals")
    case("residual_not_a_list", lambda h: h["tensors"][0].__setitem__("residuals", {"a": None}),
         "residuals as an object", "tensors[0].residuals")
    case("residual_on_shared", lambda h: h["tensors"][2].__setitem__("residuals", [None, None]),
         "residuals on a shared row", "tensors[2].residuals")
    case("residual_in_1_1", lambda h: None, "a file of version 1.1 with residuals (an unknown key of its version)",
         "tensors[0].residuals", minor=1)

    def read(name: str, desc: str, field_: str, **kw: Any) -> None:
        refuse(name, "FormatError", "read", f"{S6R}: residual positions or values (§11)", field_, desc,
               residual_base(**kw).file())
    read("residual_gap_out_of_range", "a first gap of 15 in a tensor of 15 elements", f"{R}.positions", pos=[15],
         bits=to_bits("F32", np.array([0.5], np.float32)))
    read("residual_position_out_of_range", "gaps 0, 6, 7: every gap < 15 but the last position is 15",
         f"{R}.positions", pos=[0, 7, 15])
    read("residual_value_nan", "an F32 value that is NaN", f"{R}.values",
         bits=np.array([0x3F000000, 0x7FC00000, 0x3E000000], np.uint32))
    read("residual_value_inf", "a BF16 value that is -Inf", f"{R}.values", dtype="BF16",
         bits=np.array([0x3F00, 0xFF80, 0x3E00], np.uint16))


def frame_head(n: int) -> bytes:
    """A single-segment frame header (magic, descriptor, 1- or 2-byte content size) stating n bytes, no blocks."""
    return zstd_frame(b"", stated=n, blocks=[])[:-3]


def assert_refused_by_libzstd(stored: bytes, n: int) -> None:
    """A hostile zstd segment must really be invalid: libzstd refuses it, or it does not state n bytes,
    or it decodes to other than n bytes (so the generator cannot write a refuse case by mistake)."""
    try:
        if zstandard.frame_content_size(stored) != n:
            return
        out = zstandard.ZstdDecompressor().decompress(stored, allow_extra_data=False)
    except zstandard.ZstdError:
        return
    assert len(out) != n, stored.hex()


def _major2() -> bytes:
    b = base()
    b.header["version"] = [2, 0]
    b.major = 2
    return b.file()


def _rows_without_head_segment() -> list[dict]:
    """Base rows with 'head' task a stored as F32 [0]: a zero-length segment, so that the case can
    null that entry (dropping the segment) and the segments still tile the data section."""
    ts = base_tensors()
    ts[3] = PerTask("head", None, [Item("F32", (0,), b"", "raw"), None])
    return [t.row() for t in ts]


def _rows_zstd_last() -> list[dict]:
    """Base rows with the last segment ('head' task a) zstd-coded, so that a changed length breaks only
    the tiling (a raw segment would first break length = decoded_length)."""
    ts = base_tensors()
    ts[3] = PerTask("head", None, [Item("F32", (2, 2), f32_bytes([0, 1, 2, 3]), "zstd"), None])
    return [t.row() for t in ts]


S1 = "model-00001-of-00002.tall"
S2 = "model-00002-of-00002.tall"


def sharded_base(*, encoding: dict | None = None, thresholds: dict | None = None, lambdas: tuple[Any, Any] = (0.25, 0.75),
                 index_lambdas: tuple[Any, Any] | None = None, split: tuple[list[str], list[str]] | None = None,
                 version: tuple[int, int] = (1, 0), extra: dict | None = None) -> Sharded:
    """Two shards: 1 = 'w' (masked F32 [3, 5]) and 'tied' (its alias); 2 = 'pos' (shared), 'head' (per_task)."""
    ts = {t.name: t for t in base_tensors()}
    s1, s2 = split or (["w", "tied"], ["pos", "head"])
    tasks = [task_json(n, lam, {}) for (n, _, _), lam in zip(BASE_TASKS, lambdas)]
    sh = make_sharded(tasks, ENC_TA if encoding is None else encoding, [(S1, [ts[n] for n in s1]), (S2, [ts[n] for n in s2])],
                      {"ties": None, "magnitude": None} if thresholds is None else thresholds, {"k": "v"},
                      version=version, extra=extra)
    if index_lambdas is not None:
        for t, lam in zip(sh.index["tasks"], index_lambdas):
            t["lambda"] = lam
    return sh


def refuse_sharded(name: str, error: str, section: str, field_: str, description: str, sh: Sharded | None = None,
                   *, index: bytes | None = None, on: str = "open", files: dict | None = None, path: str | None = None,
                   index_name: str = "tall.index.json") -> None:
    sh = sharded_base() if sh is None else sh
    out: dict[str, bytes | Link] = dict(sh.files if files is None else files)
    out[index_name] = sh.seal() if index is None else index
    refuse(name, error, on, section, field_, description, out, path=path)


def edit_index(fn: Callable[[dict], Any], **kw: Any) -> Sharded:
    sh = sharded_base(**kw)
    fn(sh.index)
    return sh


def reseal(text: bytes) -> bytes:
    """Recompute the checksum of an index text whose body was edited (the member stays last)."""
    head, sep, _ = text.rpartition(b'"checksum"')
    assert sep
    return head + b'"checksum": "' + xxh3_hex(head).encode() + b'"\n}\n'


def refuse_sharded_cases() -> None:
    S9 = "§9.3 (on open)"
    good = sharded_base().seal()

    # --- the index file as a whole -----------------------------------------------------------
    body = good.rpartition(b',\n  "checksum"')[0]
    for name, index, err, desc in [
            ("index_no_checksum", body + b"\n}\n", "FormatError", "no checksum member"),
            ("index_checksum_mismatch", good[:-5] + (b"0" if good[-5:-4] != b"0" else b"1") + good[-4:], "ChecksumError",
             "the checksum's last digit changed"),
            ("index_body_edited", good.replace(b'"k": "v"', b'"k": "w"'), "ChecksumError",
             "a metadata value changed after sealing"),
            ("index_checksum_not_last", good[:-3] + b',\n  "z": 1\n}\n', "FormatError", "a member after the checksum"),
            ("index_checksum_uppercase", good[:-21] + good[-21:-4].upper() + good[-4:], "FormatError",
             "the checksum in uppercase hex"),
            ("index_checksum_15_digits", good[:-6] + good[-4:], "FormatError", "a checksum of 15 digits"),
            ("index_checksum_number", good.rpartition(b'"checksum"')[0] + b'"checksum": 12345\n}\n', "FormatError",
             "the checksum as a number"),
            ("index_bom", reseal(b"\xef\xbb\xbf" + good), "FormatError",
             "a UTF-8 byte-order mark before '{' (checksum right; project decision)"),
            ("index_leading_space", reseal(b" " + good), "FormatError", "a space before '{' (checksum right; project decision)"),
            ("index_leading_newline", reseal(b"\n" + good), "FormatError", "a newline before '{' (checksum right; project decision)"),
            ("index_not_utf8", reseal(good.replace(b'"k": "v"', b'"k": "\xff"')), "FormatError", "a 0xFF byte in a string"),
            ("index_invalid_json", reseal(good.replace(b'"format": "tallfmt-index",', b'"format": "tallfmt-index"')),
             "FormatError", "a missing comma (checksum right)"),
            ("index_nan", reseal(good.replace(b'"lambda": 0.25', b'"lambda": NaN')), "FormatError", "λ NaN"),
            ("index_duplicate_key", reseal(good.replace(b'"metadata": {', b'"metadata": {},\n  "metadata": {')), "FormatError",
             "the key 'metadata' twice"),
            ("index_array", b"[" + good + b"]", "FormatError", "a JSON array around the index"),
    ]:
        refuse_sharded(name, err, f"{S9}: the index file (checksum member, UTF-8, JSON, §9.2)", "index", desc, index=index)

    v: Any = 0
    for _ in range(16):
        v = [v]
    refuse_sharded("index_nesting_17", "LimitError", f"{S9}: JSON nesting deeper than 16", "index",
                   "index version 1.1 with an unknown key nesting to depth 17", sharded_base(version=(1, 1), extra={"x_deep": v}))

    # --- index keys and values ----------------------------------------------------------------
    def case(name: str, fn: Callable[[dict], Any], desc: str, field_: str, error: str = "FormatError",
             rule: str = "missing or unknown keys, wrong types, a rule of §9.2", **kw: Any) -> None:
        refuse_sharded(name, error, f"{S9}: {rule}", field_, desc, edit_index(fn, **kw))

    case("index_missing_thresholds", lambda i: i.pop("thresholds"), "no 'thresholds' (project decision: always present)",
         "thresholds")
    case("index_missing_weight_map", lambda i: i.pop("weight_map"), "no 'weight_map'", "weight_map")
    case("index_unknown_key", lambda i: i.__setitem__("x", 1), "an unknown key in a 1.0 index", "x")
    case("index_unknown_key_shard", lambda i: i["shards"][0].__setitem__("x", 1), "an unknown key in shards[0]", "shards[0].x")
    case("index_format_wrong", lambda i: i.__setitem__("format", "tallfmt"), "format 'tallfmt'", "format")
    case("index_version_major_2", lambda i: i.__setitem__("version", [2, 0]), "index version [2, 0]", "version")
    case("index_version_length_3", lambda i: i.__setitem__("version", [1, 0, 0]), "index version [1, 0, 0]", "version")
    case("index_version_float", lambda i: i.__setitem__("version", [1, 0.0]), "index version [1, 0.0]", "version")
    case("index_tasks_empty", lambda i: i.__setitem__("tasks", []), "no tasks in the index", "tasks")
    case("index_metadata_number", lambda i: i["metadata"].__setitem__("k", 1), "a metadata value 1", "metadata.k")
    case("index_weight_map_value_number", lambda i: i["weight_map"].__setitem__("pos", 2), "a weight_map value 2",
         "weight_map.pos")
    case("index_shard_entry_string", lambda i: i["shards"].__setitem__(1, S2), "shards[1] is a string, not an object",
         "shards[1]")
    case("index_lambda_null_tall", lambda i: i["tasks"][1].__setitem__("lambda", None),
         "the index's λ of task b null with TALL masks (the shards' 0.75)", "tasks[1].lambda")
    case("index_size_string", lambda i: i["shards"][0].__setitem__("size", str(i["shards"][0]["size"])),
         "a shard size written as a string", "shards[0].size")
    case("index_size_float", lambda i: i["shards"][0].__setitem__("size", float(i["shards"][0]["size"])),
         "a shard size written as a float", "shards[0].size")

    rule = "thresholds (project decision: present; null without a global step; else one value per task, null exactly when k = 0)"
    enc_ties = {"merge": {"method": "ties", "density": 0.2, "agg": "sum", "scope": "global"}, "mask": {"method": "tall"},
                "compute_dtype": "F32", "bit_order": "little"}
    enc_ties0 = {"merge": {"method": "ties", "density": 0.0, "agg": "sum", "scope": "global"}, "mask": {"method": "tall"},
                 "compute_dtype": "F32", "bit_order": "little"}
    enc_ties_pt = {"merge": {"method": "ties", "density": 0.2, "agg": "sum", "scope": "per_tensor"}, "mask": {"method": "tall"},
                   "compute_dtype": "F32", "bit_order": "little"}
    enc_mag_pt = {"merge": {"method": "task_arithmetic"}, "mask": {"method": "magnitude", "density": 0.1, "scope": "per_tensor"},
                  "compute_dtype": "F32", "bit_order": "little"}
    th = lambda ties=None, magnitude=None: {"ties": ties, "magnitude": magnitude}
    for name, kw, desc, fld in [
            ("thresholds_without_global_step", {"thresholds": th([0.5, 0.5])}, "task arithmetic with TIES thresholds", "thresholds.ties"),
            ("thresholds_ties_per_tensor", {"encoding": enc_ties_pt, "thresholds": th([0.5, 0.5])},
             "TIES with per_tensor scope and thresholds", "thresholds.ties"),
            ("thresholds_magnitude_per_tensor", {"encoding": enc_mag_pt, "lambdas": (None, None), "thresholds": th(None, [0.5, 0.5])},
             "per_tensor magnitude masks with thresholds", "thresholds.magnitude"),
            ("thresholds_missing_with_global", {"encoding": enc_ties, "thresholds": th()}, "TIES global with ties: null",
             "thresholds.ties"),
            ("thresholds_length", {"encoding": enc_ties, "thresholds": th([0.5])}, "one threshold for two tasks", "thresholds.ties"),
            ("threshold_negative", {"encoding": enc_ties, "thresholds": th([0.5, -0.5])}, "a threshold -0.5", "thresholds.ties[1]"),
            ("threshold_not_float32", {"encoding": enc_ties, "thresholds": th([0.5, 0.1])}, "a threshold 0.1 (not a float32 value)",
             "thresholds.ties[1]"),
            ("threshold_null_with_k_positive", {"encoding": enc_ties, "thresholds": th([None, 0.5])},
             "a null threshold while k = ⌈0.2 · 15⌉ = 3 > 0", "thresholds.ties[0]"),
            ("threshold_value_with_k_zero", {"encoding": enc_ties0, "thresholds": th([0.0, 0.0])},
             "density 0 (k = 0) with thresholds 0.0 instead of null", "thresholds.ties"),
            ("threshold_string", {"encoding": enc_ties, "thresholds": th([0.5, "0.5"])}, "a threshold '0.5'", "thresholds.ties[1]"),
    ]:
        refuse_sharded(name, "FormatError", f"{S9}: {rule}", fld, desc, sharded_base(**kw))
    sh = sharded_base(encoding=enc_ties, thresholds=th([0.5, "@@RAW@@"]))
    for name, raw, desc in [("threshold_401_digits", BIG, "a 401-digit threshold"), ("threshold_1e999", b"1e999", "a threshold 1e999")]:
        text = seal_index(sh.index)
        refuse_sharded(name, "FormatError", f"{S9}: {rule}", "thresholds.ties[1]", desc, sh,
                       index=reseal(sub(text, b'"@@RAW@@"', raw)))
    case("thresholds_missing_key", lambda i: i["thresholds"].pop("magnitude"), "thresholds without 'magnitude'",
         "thresholds.magnitude", rule=rule)
    refuse_sharded("index_lambda_with_magnitude", "FormatError", f"{S9}: λ (project decision: null with magnitude masks)",
                   "tasks[0].lambda", "magnitude masks (global) with λ numbers in the index and shards",
                   sharded_base(encoding={"merge": {"method": "task_arithmetic"},
                                          "mask": {"method": "magnitude", "density": 0.1, "scope": "global"},
                                          "compute_dtype": "F32", "bit_order": "little"},
                                thresholds=th(None, [0.5, 0.5])))

    # --- shard names, sizes, checksums --------------------------------------------------------
    rule = "shards: a plain file name in the index's folder, listed once; size; header_xxh3"
    for name, file, desc, extra_files in [
            ("shard_file_slash", "sub/" + S2, "a file name with '/' (the file exists at sub/…)", {"sub/" + S2: None}),
            ("shard_file_backslash", "sub\\" + S2, "a file name with '\\\\'", {}),
            ("shard_file_dotdot", "..", "the file name '..'", {}),
            ("shard_file_dot", ".", "the file name '.'", {}),
            ("shard_file_index", "tall.index.json", "the file name 'tall.index.json'", {}),
            ("shard_file_nul", "model-00002\x00.tall", "a file name with a NUL", {}),
            ("shard_file_empty", "", "the file name ''", {}),
            ("shard_file_256_bytes", "m" * 251 + ".tall", "a file name of 256 bytes", {}),
            ("shard_file_absolute", "/tmp/" + S2, "an absolute path", {}),
    ]:
        sh = sharded_base()
        sh.index["shards"][1]["file"] = file
        for k in sh.index["weight_map"]:
            if sh.index["weight_map"][k] == S2:
                sh.index["weight_map"][k] = file
        files = dict(sh.files)
        for rel in extra_files:
            files[rel] = files.pop(S2)
        refuse_sharded(name, "FormatError", f"{S9}: {rule}", "shards[1].file", desc, sh, files=files)
    case("shard_listed_twice", lambda i: i["shards"].append(dict(i["shards"][1])), "shards[2] repeats shards[1]", "shards[2].file",
         rule=rule)
    case("shards_empty", lambda i: i.__setitem__("shards", []), "no shards (the weight map names files not listed)", "shards",
         rule=rule)
    case("shard_size_below_64", lambda i: i["shards"][1].__setitem__("size", 63), "size 63", "shards[1].size", rule=rule)
    case("shard_size_mismatch", lambda i: i["shards"][1].__setitem__("size", i["shards"][1]["size"] + 64),
         "size 64 more than the file's", "shards[1].size", rule=rule)
    case("shard_size_negative", lambda i: i["shards"][1].__setitem__("size", -1), "size -1", "shards[1].size", rule=rule)
    case("shard_header_xxh3_mismatch", lambda i: i["shards"][1].__setitem__("header_xxh3", "0123456789abcdef"),
         "header_xxh3 of another file", "shards[1].header_xxh3", rule=rule)
    case("shard_header_xxh3_uppercase", lambda i: i["shards"][1].__setitem__("header_xxh3", i["shards"][1]["header_xxh3"].upper()
                                                                              if any(c in "abcdef" for c in i["shards"][1]["header_xxh3"])
                                                                              else "ABCDEF0123456789"),
         "header_xxh3 in uppercase hex", "shards[1].header_xxh3", rule=rule)
    sh = sharded_base()
    files = dict(sh.files)
    del files[S2]
    refuse_sharded("shard_missing", "FormatError", f"{S9}: a listed shard file does not exist", "shards[1].file",
                   "shard 2 is not in the folder", sh, files=files)

    # --- weight_map -------------------------------------------------------------------------
    rule = "weight_map: every tensor, in archive order, mapped to a listed shard that holds it; no idle shard"
    case("weight_map_unknown_file", lambda i: i["weight_map"].__setitem__("pos", "model-00003-of-00002.tall"),
         "a tensor mapped to a file not in shards", "weight_map.pos", rule=rule)
    case("weight_map_missing_tensor", lambda i: i["weight_map"].pop("tied"), "the alias 'tied' missing from weight_map",
         "weight_map", rule=rule)
    case("weight_map_extra_tensor", lambda i: i["weight_map"].__setitem__("ghost", S2), "a tensor no shard holds",
         "weight_map.ghost", rule=rule)
    case("weight_map_wrong_shard", lambda i: i["weight_map"].__setitem__("pos", S1), "'pos' mapped to the shard without it",
         "weight_map.pos", rule=rule)
    case("weight_map_order", lambda i: i.__setitem__("weight_map", {k: i["weight_map"][k] for k in ["tied", "w", "pos", "head"]}),
         "weight_map lists 'tied' before 'w'; shard 1's table has 'w' first", "weight_map", rule=rule)
    case("weight_map_empty_name", lambda i: i["weight_map"].__setitem__("", S2), "a tensor name ''", "weight_map", rule=rule)
    sh = sharded_base()
    empty = build(sh.shards[0][1].header["tasks"], ENC_TA, [], {"k": "v"}).file()
    sh.files["model-00003-of-00003.tall"] = empty
    sh.index["shards"].append(shard_entry("model-00003-of-00003.tall", empty))
    refuse_sharded("idle_shard", "FormatError", f"{S9}: {rule}", "shards[2]",
                   "a third shard (a valid file without tensors) that the weight map gives nothing", sh)
    refuse_sharded("alias_across_shards", "FormatError", f"{S9}: the shard fails a check of §6 (alias target missing: §9.1)",
                   "shard 2: tensors[0].target", "the alias 'tied' in shard 2, its target 'w' in shard 1",
                   sharded_base(split=(["w"], ["tied", "pos", "head"])))

    # --- shards against the index -------------------------------------------------------------
    rule = "the shard's tasks (names, order, λ) or encoding differ from the index's"
    refuse_sharded("shard_lambda_differs", "FormatError", f"{S9}: {rule}", "tasks[1].lambda",
                   "the index's λ of task b is 0.5, the shards' 0.75", sharded_base(index_lambdas=(0.25, 0.5)))
    case("shard_tasks_order_differs", lambda i: i.__setitem__("tasks", i["tasks"][::-1]), "the index lists the tasks b, a",
         "tasks", rule=rule)
    case("shard_task_name_differs", lambda i: i["tasks"][0].__setitem__("name", "A"), "the index names task a 'A'",
         "tasks[0].name", rule=rule)
    case("shard_encoding_differs", lambda i: i.__setitem__("encoding", enc_ties_pt), "the index says TIES per_tensor, the shards "
         "task arithmetic", "encoding", rule=rule)
    sh = sharded_base()
    b2 = sh.shards[1][1]
    b2.header["tensors"] = b2.header["tensors"][::-1]
    sh.files[S2] = b2.file()
    sh.refresh_entries()
    refuse_sharded("shard_tensor_order", "FormatError", f"{S9}: the shard's tensor names, in order, differ from weight_map",
                   "shard 2: tensors", "shard 2 lists 'head' before 'pos'", sh)
    rule = "the shard fails a check of §6"
    sh = sharded_base()
    raw2 = bytearray(sh.files[S2])
    raw2[40] ^= 1
    sh.files[S2] = bytes(raw2)
    refuse_sharded("shard_preamble_checksum", "ChecksumError", f"{S9}: {rule}", "shard 2: preamble.preamble_xxh3",
                   "shard 2's preamble checksum off by one bit", sh)
    sh = sharded_base()
    sh.files[S2] = sh.shards[1][1].file(sub(sh.shards[1][1].text(), b'"k":"v"', b'"k":"w"'),
                                        header_xxh3=struct.unpack_from("<Q", sh.files[S2], 32)[0])
    refuse_sharded("shard_header_checksum", "ChecksumError", f"{S9}: {rule}", "shard 2: header",
                   "shard 2's header edited, its preamble (and the index) keep the old header_xxh3", sh)
    sh = sharded_base()
    sh.files[S2] = sh.files[S2] + b"\x00"
    sh.refresh_entries()
    refuse_sharded("shard_trailing_byte", "FormatError", f"{S9}: {rule}", "shard 2: file size",
                   "a zero byte after shard 2's header (the index's size counts it)", sh)
    sh = sharded_base()
    sh.files[S2] = b"not a .tall file\n" * 4
    sh.refresh_entries()
    refuse_sharded("shard_not_tall", "FormatError", f"{S9}: {rule}", "shard 2: magic", "shard 2 is a text file", sh)
    sh = sharded_base()
    raw2 = bytearray(sh.files[S2])
    seg = sh.shards[1][1].header["tensors"][0]["data"]
    raw2[seg["offset"] + seg["length"] - 1] ^= 0x40
    sh.files[S2] = bytes(raw2)
    refuse_sharded("shard_segment_checksum", "ChecksumError", "§9.3, §6 (on read, in the shard holding the segment)",
                   "shard 2: tensors[0].data", "a bit of 'pos' flipped in shard 2", sh, on="read")

    # --- paths --------------------------------------------------------------------------------
    sh = sharded_base()
    refuse("folder_without_index", "FormatError", "open", "§9 (a folder path opens the folder's tall.index.json)", "path",
           "a folder with the two shards but no tall.index.json", dict(sh.files))
    refuse_sharded("index_path_without_json_suffix", "FormatError", "§9 (a path not ending in .json is a single .tall file)",
                   "path", "the index saved as zoo.index and opened by that path: read as a .tall file, it has no magic",
                   index_name="zoo.index", path="refuse/index_path_without_json_suffix/zoo.index")
    sh = sharded_base()
    files: dict[str, bytes | Link] = dict(sh.files)
    files[S2] = Link("../shard_symlink_outside.outside")
    add_file("refuse/shard_symlink_outside.outside", sh.files[S2])
    refuse_sharded("shard_symlink_outside", "FormatError", "§9.2 shards[].file: a plain file in the index's folder (project "
                   "decision: a symlink out of the folder is refused)", "shards[1].file",
                   "shard 2 is a relative symlink to ../shard_symlink_outside.outside, a valid copy of it outside the folder",
                   sh, files=files)


# ----------------------------------------------------------------------------------------------


def generate() -> None:
    FILES.clear()
    CASES.clear()
    _self_check_rounding()
    accept_cases()
    accept_tau_rans_cases()
    accept_sharded_cases()
    refuse_cases()
    refuse_tau_rans_cases()
    refuse_sharded_cases()
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids))
    support = sorted(p for p in FILES if p.endswith(".outside"))
    manifest = {
        "format": "tallfmt-conformance",
        "version": [1, 0],
        "format_version": [1, 0],
        "description": "Conformance cases for the .tall format (FORMAT.md). See README.md.",
        "support_files": support,
        "cases": CASES,
    }
    # one case per line: readable, diffable, small
    head = json.dumps({k: v for k, v in manifest.items() if k != "cases"}, ensure_ascii=False)[:-1]
    lines = ",\n".join(json.dumps(c, ensure_ascii=False) for c in CASES)
    add_file("cases.json", f'{head}, "cases": [\n{lines}\n]}}\n'.encode())
    total = 0
    for rel, data in FILES.items():
        if isinstance(data, bytes):
            assert len(data) < MAX_FILE, (rel, len(data))
            total += len(data)
    assert total < MAX_SUITE, total


def write(out: Path) -> None:
    for sub_ in ("accept", "refuse"):
        if (out / sub_).is_symlink() or (out / sub_).is_file():
            (out / sub_).unlink()
        elif (out / sub_).exists():
            shutil.rmtree(out / sub_)
    for rel in sorted(FILES):
        data = FILES[rel]
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Link):
            os.symlink(data.target, p)
        else:
            p.write_bytes(data)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder to write the suite into (default: this folder)")
    args = ap.parse_args(argv)
    generate()
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out)
    n_acc = sum(c["expect"] == "accept" for c in CASES)
    size = sum(len(d) for d in FILES.values() if isinstance(d, bytes))
    print(f"wrote {n_acc} accept and {len(CASES) - n_acc} refuse cases, {len(FILES)} files, {size:,} bytes, to {args.out}")


if __name__ == "__main__":
    main()
