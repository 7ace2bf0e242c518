"""Segment codecs (FORMAT.md §5): a registry of byte-to-byte transforms, each with the id stored in
the header — the one source of truth for the codec names the CLI and the writer offer.

A codec follows numcodecs' shape: ``codec_id``, ``encode(buf, itemsize)``, ``decode(buf,
decoded_length, itemsize, out=None)`` and ``get_config()``. ``itemsize`` is the size of the segment's
elements (1 for packed masks), which byte-plane codecs need. Every decoder checks that what it produces
has exactly the declared decoded length *before* allocating more than that, so a hostile segment
cannot expand past what the header (already validated against shape × dtype) promised; with ``out``
the bytes land straight in the caller's buffer.

    >>> c = get_codec("zstd")
    >>> bytes(c.decode(c.encode(b"abc" * 10, 1), 30, 1))[:6]
    b'abcabc'

Register your own with :func:`register_codec` (in Python: import your module before reading; for the
command line: an entry point in the ``tallfmt.codecs`` group naming the codec object).

**Context codecs.** A codec may declare ``context = "tau"``: it codes mask segments only, and both
``encode(buf, itemsize, context=tau)`` and ``decode(buf, decoded_length, itemsize, out, context=tau)``
take τ_MTL of the same tensor (float32, n elements, as decoded) as a keyword argument, which the
reader decodes first (for ``decode`` τ may also be its 4 × n uint8 byte planes, how a
``byteplane-zstd`` τ decodes, which ``tau-rans`` reads without merging them). A plain codec has no
``context`` attribute (or ``None``) and never gets one.
Such a codec appears in :func:`mask_choices`, not in :func:`choices`; a header that names it for any
segment other than a mask is refused (FORMAT.md §5). ``minor`` (default 0) is the format minor version
that introduced a codec: a file of an older minor that names it is refused, and a writer that uses it
writes at least that minor (:func:`minor_of`).

    >>> import numpy as np
    >>> tau = np.linspace(-1, 1, 64, dtype=np.float32)
    >>> bits = np.packbits(np.abs(tau) > 0.5, bitorder="little").tobytes()
    >>> c = get_codec("tau-rans")
    >>> bytes(c.decode(c.encode(bits, 1, context=tau), 8, 1, context=tau)) == bits
    True
"""

from __future__ import annotations

import struct
import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np
import zstandard

from tallfmt.errors import FormatError, InputError

#: Largest ratio decoded/stored any valid zstd frame can reach (a 128 KiB RLE block costs 4 bytes);
#: a segment claiming more is refused before anything is decompressed.
MAX_EXPANSION = 32768
#: Largest zstd window a reader accepts (zstd's own default decoder limit): bounds what a frame can
#: make the decompressor allocate.
MAX_WINDOW = 1 << 27
#: zstd level used when encoding; level 3 did not beat level 1 on float byte planes.
ZSTD_LEVEL = 1
#: ``codec="auto"``: the writer's default choice per segment (FORMAT.md §5).
AUTO = "auto"

Buffer = bytes | bytearray | memoryview | np.ndarray


@runtime_checkable
class Codec(Protocol):
    """What a segment codec provides (numcodecs-style)."""

    codec_id: str

    def encode(self, buf: Buffer, itemsize: int) -> bytes: ...

    def decode(self, buf: Buffer, decoded_length: int, itemsize: int, out: np.ndarray | None = None) -> Buffer: ...

    def get_config(self) -> dict[str, Any]: ...


def as_bytes(data: Buffer) -> memoryview:
    """A flat byte view of a buffer or a contiguous array (no copy)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return memoryview(data).cast("B")


def _out(out: np.ndarray | None, n: int) -> np.ndarray:
    if out is None:
        return np.empty(n, dtype=np.uint8)
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1 or out.shape[0] != n \
            or not out.flags.c_contiguous or not out.flags.writeable:
        raise InputError(f"out: expected a writable contiguous uint8 array of {n} bytes")
    return out


class RawCodec:
    """Stored bytes are the decoded bytes (the reader can return a zero-copy view)."""

    codec_id = "raw"

    def encode(self, buf: Buffer, itemsize: int) -> bytes:
        return bytes(as_bytes(buf))

    def decode(self, buf: Buffer, decoded_length: int, itemsize: int, out: np.ndarray | None = None) -> Buffer:
        view = as_bytes(buf)
        if len(view) != decoded_length:
            raise FormatError(f"raw segment holds {len(view)} bytes, header says {decoded_length}")
        if out is None:
            return view
        o = _out(out, decoded_length)
        o[:] = np.frombuffer(view, dtype=np.uint8)
        return o

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id}


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compression context for ``level`` (contexts are reused, never shared)."""
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        # one frame with its content size written, so a reader can check it before allocating
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


#: Match finder settings for byte planes at the default level: planes are near-random bytes (low mantissa)
#: or short-alphabet runs (exponents), where long minimum matches and tiny tables find what level 1's
#: defaults find, faster, and make the frames faster to decode. A writer's choice: frames stay plain zstd.
PLANE_TUNING = {"min_match": 7, "search_log": 1, "hash_log": 6, "chain_log": 6}


def _plane_compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's context for byte planes: level ``level``, with PLANE_TUNING at the default level."""
    if level != ZSTD_LEVEL:
        return _compressor(level)
    cache = getattr(_local, "plane_compressors", None)
    if cache is None:
        cache = _local.plane_compressors = {}
    if level not in cache:
        params = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=True, **PLANE_TUNING)
        cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    return d


def zstd_compress(data: Buffer, level: int = ZSTD_LEVEL) -> bytes:
    """One zstd frame of ``data`` with its content size (this thread's reused context)."""
    return _compressor(level).compress(as_bytes(data))


#: The magic number that starts a zstd frame (RFC 8878 §3.1.1); skippable frames have others.
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _check_frame(view: memoryview, decoded_length: int, what: str) -> None:
    """The frame header rules of FORMAT.md §5, before anything is decompressed: a zstd frame (not a
    skippable one), its content size stated and equal to ``decoded_length``, no dictionary, a window
    of at most MAX_WINDOW bytes."""
    if bytes(view[:4]) != ZSTD_MAGIC:
        raise FormatError(f"{what}: not a zstd frame (magic {bytes(view[:4]).hex()}; skippable frames are not allowed)")
    try:
        params = zstandard.get_frame_parameters(view)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what}: not a zstd frame ({exc})") from None
    if params.dict_id:
        raise FormatError(f"{what}: the frame needs dictionary {params.dict_id}; frames use no dictionary")
    size = params.content_size
    if size != decoded_length:
        shown = "no content size" if size == zstandard.CONTENTSIZE_UNKNOWN else f"{size} decoded bytes"
        raise FormatError(f"{what}: frame declares {shown}, header says {decoded_length}")
    if params.window_size > MAX_WINDOW:
        raise FormatError(f"{what}: frame window of {params.window_size} bytes is over the {MAX_WINDOW}-byte limit")


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


def zstd_decompress_into(data: Buffer, out: np.ndarray, what: str = "zstd frame") -> None:
    """Decompress exactly one frame holding ``len(out)`` bytes straight into ``out``; FormatError for
    anything else (no frame, another content size, a window over the limit, corrupt data, bytes after
    the frame)."""
    view = as_bytes(data)
    n = len(out)
    _check_frame(view, n, what)
    if n == 0 or _frame_length(view) != len(view):
        try:
            got = _decompressor().decompress(view, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise FormatError(f"{what}: corrupt zstd data ({exc})") from None
        if len(got) != n:
            raise FormatError(f"{what}: decoded to {len(got)} bytes, header says {n}")
        out[:] = np.frombuffer(got, dtype=np.uint8)
        return
    dest = memoryview(out).cast("B")
    done = 0
    try:
        with _decompressor().stream_reader(view, read_across_frames=False) as reader:
            while done < n:
                k = reader.readinto(dest[done:])
                if not k:
                    break
                done += k
            more = len(reader.read(1)) if done == n else 0
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what}: corrupt zstd data ({exc})") from None
    if done != n or more:
        raise FormatError(f"{what}: decoded to {done + more}{'+' if more else ''} bytes, header says {n}")


class TauRansCodec:
    """A packed mask coded with adaptive binary rANS under contexts from the magnitude of τ_MTL and the
    mask's own previous bits (FORMAT.md §5.1); τ_MTL of the tensor is the ``context``."""

    codec_id = "tau-rans"
    context = "tau"
    minor = 2

    def encode(self, buf: Buffer, itemsize: int, *, context: np.ndarray) -> bytes:
        from tallfmt.format.maskcodec import encode_mask

        return encode_mask(np.frombuffer(as_bytes(buf), dtype=np.uint8), context)

    def decode(self, buf: Buffer, decoded_length: int, itemsize: int, out: np.ndarray | None = None, *,
               context: np.ndarray) -> Buffer:
        from tallfmt.format.maskcodec import decode_mask

        n = getattr(context, "shape", (0,))[-1] if getattr(context, "ndim", 1) == 2 else getattr(context, "size", -1)
        if not isinstance(context, np.ndarray) or (n + 7) // 8 != decoded_length:
            raise InputError(f"tau-rans: the context must be τ_MTL of the mask's tensor ({decoded_length} mask "
                             f"bytes), got {n!r} elements")
        o = _out(out, decoded_length)
        decode_mask(as_bytes(buf), context, o)
        return o

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id}


class ZstdCodec:
    """One zstd frame of the whole segment."""

    codec_id = "zstd"

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        self.level = level

    def encode(self, buf: Buffer, itemsize: int) -> bytes:
        return zstd_compress(buf, self.level)

    def decode(self, buf: Buffer, decoded_length: int, itemsize: int, out: np.ndarray | None = None) -> Buffer:
        o = _out(out, decoded_length)
        zstd_decompress_into(buf, o)
        return o

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "level": self.level}


class BytePlaneZstdCodec:
    """Split elements into byte planes (byte k of every element together), zstd each plane.

    The exponent byte of floats compresses well once apart from the noisy low mantissa bytes (the
    ZipNN idea). Stored layout: ``itemsize`` little-endian u64 lengths, then one zstd frame per plane,
    plane 0 being the least significant byte of each element.
    """

    codec_id = "byteplane-zstd"

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        self.level = level

    def encode(self, buf: Buffer, itemsize: int) -> bytes:
        return b"".join(self.encode_parts(buf, itemsize))

    def encode_parts(self, buf: Buffer, itemsize: int) -> list[bytes]:
        """The stored bytes as the length table and the plane frames, not joined (no copy)."""
        from tallfmt.format.planes import split_planes

        view = np.frombuffer(as_bytes(buf), dtype=np.uint8)
        if itemsize < 1 or len(view) % itemsize:
            raise InputError(f"byteplane-zstd: {len(view)} bytes is not a whole number of {itemsize}-byte items")
        c = _plane_compressor(self.level)
        frames = [c.compress(as_bytes(p)) for p in split_planes(view, itemsize)]
        return [struct.pack(f"<{itemsize}Q", *map(len, frames)), *frames]

    def frames(self, buf: Buffer, decoded_length: int, itemsize: int) -> list[memoryview]:
        """The plane frames of a stored segment, after checking the table and every frame's header."""
        view = as_bytes(buf)
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
        out, pos = [], table
        for k, length in enumerate(lengths):  # every frame's stated size is checked before allocating
            frame = view[pos:pos + length]
            _check_frame(frame, n, f"byteplane-zstd plane {k}")
            out.append(frame)
            pos += length
        return out

    def decode(self, buf: Buffer, decoded_length: int, itemsize: int, out: np.ndarray | None = None) -> Buffer:
        from tallfmt.format.planes import merge_planes

        frames = self.frames(buf, decoded_length, itemsize)
        o = _out(out, decoded_length)
        planes = np.empty((itemsize, decoded_length // itemsize), dtype=np.uint8)
        for k, frame in enumerate(frames):
            zstd_decompress_into(frame, planes[k], what=f"byteplane-zstd plane {k}")
        return merge_planes(planes, o)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, "level": self.level}


CODECS: dict[str, Codec] = {}
#: The ids of registered context codecs (``context`` set), kept with the registry: a header check.
CONTEXT_CODECS: set[str] = set()


def register_codec(codec: Codec) -> Codec:
    """Add a codec to the registry (its id must be new and not ``auto``). Archives that use it need it
    to be read. Returns the codec."""
    if not isinstance(codec, Codec):
        raise InputError(f"{codec!r} is not a codec (codec_id, encode, decode, get_config)")
    if codec.codec_id in CODECS or codec.codec_id == AUTO:
        raise InputError(f"codec id {codec.codec_id!r} is already registered")
    ctx = getattr(codec, "context", None)
    if ctx not in (None, "tau"):
        raise InputError(f"codec {codec.codec_id!r}: unknown context {ctx!r} (known: 'tau')")
    CODECS[codec.codec_id] = codec
    if ctx is not None:
        CONTEXT_CODECS.add(codec.codec_id)
    return codec


for _c in (RawCodec(), ZstdCodec(), BytePlaneZstdCodec(), TauRansCodec()):
    register_codec(_c)


def get_codec(codec_id: str) -> Codec:
    """The registered codec with this id; InputError if there is none."""
    try:
        return CODECS[codec_id]
    except (KeyError, TypeError):
        raise InputError(f"unknown codec {codec_id!r}; known: {sorted(CODECS)}") from None


def context_of(codec_id: str) -> str | None:
    """What a codec needs besides its stored bytes: ``"tau"`` (τ_MTL of the mask's tensor) or None."""
    return getattr(get_codec(codec_id), "context", None)


def minor_of(codec_id: str) -> int:
    """The format minor version that introduced a codec (0 for those of version 1.0)."""
    return int(getattr(get_codec(codec_id), "minor", 0))


def encode_parts(codec_id: str, buf: Buffer, itemsize: int, context: np.ndarray | None = None) -> list[Buffer]:
    """A segment's stored bytes as a list of buffers whose concatenation is ``encode()``'s result: a
    codec that builds its output from pieces may offer ``encode_parts`` so nobody copies them together.
    ``context``: what a context codec needs (τ_MTL for ``tau``), ignored by the others."""
    codec = get_codec(codec_id)
    if getattr(codec, "context", None) is not None:
        if context is None:
            raise InputError(f"codec {codec_id!r} needs τ_MTL as its context: it codes masks only")
        return [codec.encode(buf, itemsize, context=context)]
    parts = getattr(codec, "encode_parts", None)
    return list(parts(buf, itemsize)) if parts is not None else [codec.encode(buf, itemsize)]


def decode(codec_id: str, buf: Buffer, decoded_length: int, itemsize: int, out: np.ndarray | None = None,
           context: np.ndarray | None = None) -> Buffer:
    """Decode a segment with its codec, passing ``context`` to a context codec (InputError when it
    needs one and none is given)."""
    codec = get_codec(codec_id)
    if getattr(codec, "context", None) is None:
        return codec.decode(buf, decoded_length, itemsize, out)
    if context is None:
        raise InputError(f"codec {codec_id!r} decodes a mask from τ_MTL of its tensor, which was not given")
    return codec.decode(buf, decoded_length, itemsize, out, context=context)


def choose(codec: str, itemsize: int) -> str:
    """The codec id for a segment of ``itemsize``-byte elements: ``codec`` itself, or for ``auto``
    byteplane-zstd for multi-byte elements and zstd for masks and bytes."""
    if codec != AUTO:
        return codec
    return "byteplane-zstd" if itemsize > 1 else "zstd"


def choose_mask(mask_codec: str, codec: str) -> str:
    """The codec id of mask segments: ``mask_codec`` itself, or for ``auto`` what ``codec`` picks for
    1-byte elements (zstd under ``codec="auto"``)."""
    return choose(codec, 1) if mask_codec == AUTO else mask_codec


def choices() -> list[str]:
    """What ``encode(codec=...)`` accepts: ``auto`` and every registered codec id that needs no context."""
    return [AUTO, *(c for c in CODECS if c not in CONTEXT_CODECS)]


def mask_choices() -> list[str]:
    """What ``encode(mask_codec=...)`` accepts: ``auto`` (follow ``codec``) and every registered codec id."""
    return [AUTO, *CODECS]
