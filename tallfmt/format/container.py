"""The .tall container: bytes on disk. See FORMAT.md for the normative description.

Layout::

    [0, 64)            preamble: magic, version, header offset/length, checksums, zero padding
    [64, H)            data section: segments, each at an offset aligned to 64, zero bytes between
    [H, H + L)         UTF-8 JSON header (H aligned to 64); the file ends exactly at H + L

The header comes last so that a writer can stream segments to disk as it produces them; the preamble is
written last of all (a seek back to byte 0) and the finished file is renamed into place.

This module knows segments and the header, never the math: ``ContainerWriter`` writes encoded segments
and a header, ``ContainerReader`` validates a header and hands out verified, decoded segment bytes.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xxhash

from tallfmt.errors import ChecksumError, FormatError, InputError, LimitError
from tallfmt.format import dtypes
from tallfmt.format.atomic import AtomicFile, write_error
from tallfmt.format.codecs import Buffer, as_bytes, get_codec
from tallfmt.format.header import (ALIGN, MAGIC, MAJOR, MAX_HEADER_BYTES, PREAMBLE_SIZE, Header, Segment,
                                   align, check_layout, checksum, parse_header, segment_locations)

_PREAMBLE = struct.Struct("<8sHHIQQQQ")  # magic, major, minor, flags, hdr offset, hdr length, hdr xxh3, preamble xxh3


# Reader


class ContainerReader:
    """Opens a .tall file, validates preamble, header and layout, and memory-maps the data.

    Segments are read lazily: ``read(segment, itemsize)`` checks the stored bytes' checksum and decodes
    them. Safe to share between threads; open one reader per process.

        >>> with ContainerReader("zoo.tall") as r:          # doctest: +SKIP
        ...     print(r.header.task_names)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a directory, not a .tall file") from None
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot open ({exc.strerror})") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
            raise FormatError(f"{self.path}: is {kind}, not a .tall file")
        self._file = os.fdopen(fd, "rb")
        self._mm: mmap.mmap | None = None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        p = self.path
        size = os.fstat(self._file.fileno()).st_size
        pre = self._file.read(PREAMBLE_SIZE)
        if len(pre) < 8 or pre[:8] != MAGIC:
            raise FormatError(f"{p}: not a .tall file (bad magic bytes {pre[:8]!r})")
        if len(pre) < PREAMBLE_SIZE:
            raise FormatError(f"{p}: file is {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
        magic, major, minor, flags, h_off, h_len, h_sum, p_sum = _PREAMBLE.unpack_from(pre)
        if xxhash.xxh3_64_intdigest(pre[:40]) != p_sum:
            raise ChecksumError(f"{p}: preamble checksum mismatch (the first 64 bytes are damaged)")
        if major != MAJOR:
            raise FormatError(f"{p}: format major version {major} is not supported (this reader reads {MAJOR})")
        if flags != 0:
            raise FormatError(f"{p}: preamble flags are {flags:#x}, must be 0")
        if any(pre[48:]):
            raise FormatError(f"{p}: preamble reserved bytes (48..64) are not zero")
        if h_len > MAX_HEADER_BYTES:
            raise LimitError(f"{p}: header length {h_len} is over the {MAX_HEADER_BYTES}-byte limit")
        if h_off < PREAMBLE_SIZE or h_off % ALIGN or h_off + h_len != size:
            raise FormatError(f"{p}: header at [{h_off}, {h_off + h_len}) does not end the "
                              f"{size}-byte file at an aligned offset (truncated or trailing bytes?)")
        self._file.seek(h_off)
        raw = self._file.read(h_len)
        if xxhash.xxh3_64_intdigest(raw) != h_sum:
            raise ChecksumError(f"{p}: header checksum mismatch")
        self.header = parse_header(raw, p)
        if self.header.version[0] != major or self.header.version[1] != minor:
            raise FormatError(f"{p}: header version {list(self.header.version)} differs from the preamble's "
                              f"[{major}, {minor}]")
        self.header_offset, self.header_length, self.file_size = h_off, h_len, size
        self.segments = check_layout(self.header, size, h_off, p)
        self._where = {id(s): w for w, s in segment_locations(self.header)}
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._check_padding()

    def _check_padding(self) -> None:
        pos = PREAMBLE_SIZE
        for s in (*self.segments, None):
            end = s.offset if s is not None else self.header_offset
            if any(self._mm[pos:end]):
                raise FormatError(f"{self.path}: padding bytes [{pos}, {end}) are not zero")
            if s is not None:
                pos = s.offset + s.length

    def stored(self, seg: Segment) -> memoryview:
        """The segment's stored bytes (a view of the memory map), checksum verified."""
        if self._mm is None:
            raise InputError(f"{self.path}: the archive is closed")
        view = memoryview(self._mm)[seg.offset:seg.offset + seg.length]
        if checksum(view) != seg.xxh3:
            view.release()
            raise ChecksumError(f"{self.path}: {self._locate(seg)}: checksum mismatch (xxh3 of the stored "
                                f"bytes is not {seg.xxh3})")
        return view

    def _locate(self, seg: Segment) -> str:
        return f"{self._where.get(id(seg), 'segment')} (segment at offset {seg.offset})"

    def segment_error(self, seg: Segment, exc: FormatError) -> FormatError:
        """``exc``, raised while decoding ``seg`` outside :meth:`read` (e.g. one byte plane at a time),
        worded as :meth:`read` words its errors: this file, where the segment is, its codec."""
        if str(exc).startswith(self.path):
            return exc
        return type(exc)(f"{self.path}: {self._locate(seg)}, codec {seg.codec}: {exc}")

    def read(self, seg: Segment, itemsize: int, out: np.ndarray | None = None) -> Buffer:
        """The decoded bytes of a segment (zero-copy for raw segments unless ``out`` is given; with
        ``out``, a uint8 array of ``decoded_length`` bytes, they are decoded into it), checksum
        verified first."""
        try:
            return get_codec(seg.codec).decode(self.stored(seg), seg.decoded_length, itemsize, out)
        except FormatError as exc:
            if str(exc).startswith(self.path):
                raise
            raise type(exc)(f"{self.path}: {self._locate(seg)}, codec {seg.codec}: {exc}") from None

    def read_array(self, seg: Segment, dtype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A segment decoded as a numpy array of the dtype's storage type (read-only for raw segments)."""
        d = dtypes.by_name(dtype)
        arr = np.frombuffer(self.read(seg, d.itemsize), dtype=d.storage)
        return arr if shape is None else arr.reshape(shape)

    def verify(self) -> None:
        """Check every segment's checksum and decode it; raise the first FormatError found."""
        for t in self.header.tensors:
            for seg, itemsize in t.parts():
                self.read(seg, itemsize)

    def close(self) -> None:
        if self._mm is not None:
            mm, self._mm = self._mm, None
            try:
                mm.close()
            except BufferError:
                # views of the map are still alive (arrays of raw segments, or frames of a traceback
                # being handled): the map is unmapped when the last of them goes
                pass
        self._file.close()

    def __enter__(self) -> "ContainerReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ContainerWriter:
    """Streams segments to a temporary file beside ``path``; ``finish(header)`` makes it the archive.

    The header and the preamble are written last, the file is fsynced and renamed over ``path``
    (:class:`~tallfmt.format.atomic.AtomicFile`); an exception before that leaves ``path`` untouched
    and removes the temporary file.

        >>> with ContainerWriter("x.tall") as w:             # doctest: +SKIP
        ...     seg = w.write_segment(b"...", "zstd", 1)
        ...     w.finish(header)
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = True) -> None:
        self._out = AtomicFile(path, overwrite=overwrite)
        self.path = self._out.path
        self._pos = 0
        self._write(bytes(PREAMBLE_SIZE))

    @property
    def tmp_path(self) -> Path:
        return self._out.tmp_path

    def _write(self, data: Buffer) -> None:
        view = as_bytes(data)
        self._out.write(view)
        self._pos += len(view)

    def _pad(self) -> None:
        gap = align(self._pos) - self._pos
        if gap:
            self._write(bytes(gap))

    def write_segment(self, data: Buffer, codec: str, itemsize: int) -> Segment:
        """Encode ``data`` (the decoded bytes) with ``codec`` and append it; returns its Segment."""
        decoded = as_bytes(data)
        return self.write_stored(get_codec(codec).encode(decoded, itemsize), len(decoded), codec)

    def write_stored(self, stored: Buffer | Sequence[Buffer], decoded_length: int, codec: str) -> Segment:
        """Append already-encoded bytes (e.g. compressed by another thread, or copied from an archive),
        one buffer or the pieces of one (see ``codecs.encode_parts``), without joining them."""
        self._pad()
        parts = [as_bytes(p) for p in stored] if isinstance(stored, (list, tuple)) else [as_bytes(stored)]
        digest = xxhash.xxh3_64()
        for p in parts:
            digest.update(p)
        seg = Segment(self._pos, sum(len(p) for p in parts), decoded_length, codec, digest.hexdigest())
        for p in parts:
            self._write(p)
        return seg

    def finish(self, header: Header) -> Path:
        """Write header and preamble, fsync, rename into place. Returns the final path."""
        raw = header.to_bytes()
        if len(raw) > MAX_HEADER_BYTES:
            self.abort()
            raise LimitError(f"{self.path}: header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit")
        self._pad()
        h_off = self._pos
        self._write(raw)
        pre = bytearray(PREAMBLE_SIZE)
        _PREAMBLE.pack_into(pre, 0, MAGIC, header.version[0], header.version[1], 0, h_off, len(raw),
                            xxhash.xxh3_64_intdigest(raw), 0)
        struct.pack_into("<Q", pre, 40, xxhash.xxh3_64_intdigest(bytes(pre[:40])))
        try:
            self._out.file.seek(0)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, f"cannot finish {self.tmp_path.name}", exc) from exc
        self._out.write(pre)
        return self._out.commit()

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        self._out.abort()

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.abort()  # a no-op after finish()
