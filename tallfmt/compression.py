"""Segment codecs: a small registry of byte-to-byte transforms, each with an id stored in the header.

A codec turns the decoded bytes of one segment into its stored bytes and back. ``itemsize`` is the
size of the segment's elements (1 for packed masks), which byte-plane codecs need. Every decoder checks
that what it produces has exactly the declared decoded length *before* allocating more than that, so a
hostile segment cannot expand past what the header (already validated against shape × dtype) promised.

    >>> from tallfmt.compression import get_codec
    >>> c = get_codec("zstd")
    >>> bytes(c.decode(c.encode(b"abc" * 10, 1), 30, 1))[:6]
    b'abcabc'
"""

from __future__ import annotations

import struct
from typing import Protocol

import numpy as np
import zstandard

from tallfmt import kernels
from tallfmt.errors import FormatError, InputError

#: Largest ratio decoded/stored any valid zstd frame can reach (a 128 KiB RLE block costs 4 bytes);
#: a segment claiming more is refused before anything is decompressed.
MAX_EXPANSION = 32768
#: zstd level used when encoding; level 3 did not beat level 1 on float byte planes (anchors.md).
ZSTD_LEVEL = 1

Buffer = bytes | bytearray | memoryview | np.ndarray


class Codec(Protocol):
    id: str

    def encode(self, data: Buffer, itemsize: int) -> bytes: ...

    def decode(self, data: Buffer, decoded_length: int, itemsize: int) -> Buffer: ...


def _as_bytes_view(data: Buffer) -> memoryview:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return memoryview(data).cast("B")


class RawCodec:
    """Stored bytes are the decoded bytes (the reader can return a zero-copy view)."""

    id = "raw"

    def encode(self, data: Buffer, itemsize: int) -> bytes:
        return bytes(_as_bytes_view(data))

    def decode(self, data: Buffer, decoded_length: int, itemsize: int) -> Buffer:
        view = _as_bytes_view(data)
        if len(view) != decoded_length:
            raise FormatError(f"raw segment holds {len(view)} bytes, header says {decoded_length}")
        return view


def _zstd_compress(data: Buffer, level: int) -> bytes:
    # One frame with its content size written, so a reader can check it before allocating.
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(_as_bytes_view(data))


def _check_content_size(view: memoryview, decoded_length: int, what: str) -> None:
    try:
        size = zstandard.frame_content_size(view)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what}: not a zstd frame ({exc})") from None
    if size != decoded_length:
        raise FormatError(f"{what}: frame declares {size} decoded bytes, header says {decoded_length}")


def _zstd_decompress(data: Buffer, decoded_length: int, what: str = "zstd frame") -> bytes:
    view = _as_bytes_view(data)
    _check_content_size(view, decoded_length, what)
    try:
        out = zstandard.ZstdDecompressor().decompress(view, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what}: corrupt zstd data ({exc})") from None
    if len(out) != decoded_length:
        raise FormatError(f"{what}: decoded to {len(out)} bytes, header says {decoded_length}")
    return out


def _frame_length(view: memoryview) -> int | None:
    """Stored size of the zstd frame at the start of ``view``, from its block headers (RFC 8878 §3.1.1);
    None when that cannot be read (the caller then takes the general path, which reports the error)."""
    try:
        pos = zstandard.frame_header_size(view)
        has_checksum = zstandard.get_frame_parameters(view).has_checksum
    except zstandard.ZstdError:
        return None
    while True:
        if pos + 3 > len(view):
            return None
        h = view[pos] | view[pos + 1] << 8 | view[pos + 2] << 16
        kind = (h >> 1) & 3  # 0 raw, 1 RLE (one byte follows), 2 compressed, 3 reserved
        if kind == 3:
            return None
        pos += 3 + (1 if kind == 1 else h >> 3)
        if h & 1:  # last block
            return pos + (4 if has_checksum else 0)


def _zstd_decompress_into(data: Buffer, out: np.ndarray, what: str) -> None:
    """Decompress one frame holding exactly ``len(out)`` bytes straight into ``out`` (no intermediate
    bytes object and copy), refusing what _zstd_decompress refuses. When the frame does not span
    ``data`` exactly (bytes after it, a truncated or odd frame) it falls back to _zstd_decompress,
    which names the problem."""
    view = _as_bytes_view(data)
    n = len(out)
    _check_content_size(view, n, what)
    if n == 0 or _frame_length(view) != len(view):
        out[:] = np.frombuffer(_zstd_decompress(view, n, what), dtype=np.uint8)
        return
    dest = memoryview(out).cast("B")
    got = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(view, read_across_frames=False) as reader:
            while got < n:
                k = reader.readinto(dest[got:])
                if not k:
                    break
                got += k
            more = len(reader.read(1)) if got == n else 0
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what}: corrupt zstd data ({exc})") from None
    if got != n or more:
        raise FormatError(f"{what}: decoded to {got + more}{'+' if more else ''} bytes, header says {n}")


class ZstdCodec:
    """One zstd frame of the whole segment."""

    id = "zstd"

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        self.level = level

    def encode(self, data: Buffer, itemsize: int) -> bytes:
        return _zstd_compress(data, self.level)

    def decode(self, data: Buffer, decoded_length: int, itemsize: int) -> Buffer:
        return _zstd_decompress(data, decoded_length)


class BytePlaneZstdCodec:
    """Split elements into byte planes (byte k of every element together), zstd each plane.

    The exponent byte of floats compresses well once apart from the noisy low mantissa bytes (the
    ZipNN idea). Stored layout: ``itemsize`` little-endian u64 lengths, then one zstd frame per plane,
    plane 0 being the least significant byte of each element.
    """

    id = "byteplane-zstd"

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        self.level = level

    def encode(self, data: Buffer, itemsize: int) -> bytes:
        view = np.frombuffer(_as_bytes_view(data), dtype=np.uint8)
        if itemsize < 1 or len(view) % itemsize:
            raise InputError(f"byteplane-zstd: {len(view)} bytes is not a whole number of {itemsize}-byte items")
        planes = kernels.split_planes(view, itemsize)
        frames = [_zstd_compress(p, self.level) for p in planes]
        return struct.pack(f"<{itemsize}Q", *map(len, frames)) + b"".join(frames)

    def decode(self, data: Buffer, decoded_length: int, itemsize: int) -> Buffer:
        view = _as_bytes_view(data)
        if itemsize < 1 or decoded_length % itemsize:
            raise FormatError(f"byteplane-zstd: decoded length {decoded_length} is not a multiple of {itemsize}")
        table = 8 * itemsize
        if len(view) < table:
            raise FormatError(f"byteplane-zstd: {len(view)} stored bytes cannot hold the {itemsize}-plane table")
        lengths = struct.unpack_from(f"<{itemsize}Q", view)
        if sum(lengths) != len(view) - table:
            raise FormatError(
                f"byteplane-zstd: plane lengths add up to {sum(lengths)}, segment holds {len(view) - table}")
        n = decoded_length // itemsize
        pos = table
        for k, length in enumerate(lengths):  # every frame's stated size is checked before allocating
            _check_content_size(view[pos:pos + length], n, f"byteplane-zstd plane {k}")
            pos += length
        out = np.empty((itemsize, n), dtype=np.uint8)
        pos = table
        for k, length in enumerate(lengths):
            _zstd_decompress_into(view[pos:pos + length], out[k], what=f"byteplane-zstd plane {k}")
            pos += length
        return kernels.merge_planes(out)


CODECS: dict[str, Codec] = {c.id: c for c in (RawCodec(), ZstdCodec(), BytePlaneZstdCodec())}


def register_codec(codec: Codec) -> None:
    """Add a codec to the registry (its id must be new). Archives that use it need it to be read."""
    if codec.id in CODECS:
        raise InputError(f"codec id {codec.id!r} is already registered")
    CODECS[codec.id] = codec


def get_codec(codec_id: str) -> Codec:
    """The registered codec with this id; InputError if there is none."""
    try:
        return CODECS[codec_id]
    except KeyError:
        raise InputError(f"unknown codec {codec_id!r}; known: {sorted(CODECS)}") from None
