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

import mmap as _mmap
import os
import stat
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import xxhash

from tallfmt.errors import ChecksumError, FormatError, InputError, LimitError
from tallfmt.format import dtypes
from tallfmt.format.atomic import AtomicFile, write_error
from tallfmt.format.codecs import Buffer, as_bytes, context_of, decode, get_codec
from tallfmt.format.header import (ALIGN, MAGIC, MAJOR, MAX_HEADER_BYTES, PREAMBLE_SIZE, Header, Residual, Segment,
                                   TensorEntry, align, check_layout, checksum, describe, parse_header,
                                   segment_locations)
from tallfmt.format.residual import gap_itemsize, gaps_to_positions, values_to_f32

_PREAMBLE = struct.Struct("<8sHHIQQQQ")  # magic, major, minor, flags, hdr offset, hdr length, hdr xxh3, preamble xxh3


# Reader

#: Default decode memory budget: one segment may decode to at most this many bytes (1/4 of the
#: machine's memory, at least 1 GiB), so a valid archive that asks for more than the machine has
#: gets a LimitError before anything is allocated, not a MemoryError (FORMAT.md §6, "Memory").
MIN_DEFAULT_BUDGET = 1 << 30


def default_max_tensor_bytes() -> int:
    """The default of ``max_tensor_bytes``: a quarter of physical memory, at least 1 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 16 << 30
    return max(MIN_DEFAULT_BUDGET, total // 4)


def check_values(data: Buffer, dtype: str, numel: int, what: Callable[[], str]) -> None:
    """Value rules of decoded bytes (FORMAT.md §3, §6): BOOL bytes are 0 or 1; a packed mask ("mask",
    ``numel`` bits) has zero padding bits. FormatError naming ``what()``."""
    if dtype == "BOOL":
        arr = np.frombuffer(as_bytes(data), dtype=np.uint8)
        if arr.size and int(arr.max()) > 1:
            i = int(np.argmax(arr > 1))
            raise FormatError(f"{what()}: BOOL element {i} is byte 0x{int(arr[i]):02x}; BOOL bytes are 0 or 1")
    elif dtype == "mask" and numel % 8:
        view = as_bytes(data)
        if len(view) and view[len(view) - 1] >> (numel % 8):
            raise FormatError(f"{what()}: mask padding bits past bit {numel} of the last byte are not zero "
                              f"(last byte 0x{view[len(view) - 1]:02x})")


class ContainerReader:
    """Opens a .tall file, validates preamble, header and layout; reads segments on demand.

    Segments are read lazily: ``read(segment, itemsize)`` reads the stored bytes (``pread``, so a file
    truncated while it is open gives a FormatError, never a SIGBUS), checks their checksum and decodes
    them. ``mmap=True`` maps the file instead (raw segments are then zero-copy views; a file
    truncated by another program while mapped can kill the process with SIGBUS, as for any mapped
    reader). ``max_tensor_bytes``: the most one segment may decode to (LimitError before allocating;
    default :func:`default_max_tensor_bytes`). Safe to share between threads.

        >>> with ContainerReader("zoo.tall") as r:          # doctest: +SKIP
        ...     print(r.header.task_names)
    """

    def __init__(self, path: str | os.PathLike, *, mmap: bool = False, max_tensor_bytes: int | None = None) -> None:
        self.path = str(path)
        self.max_tensor_bytes = default_max_tensor_bytes() if max_tensor_bytes is None else max_tensor_bytes
        self._fd: int | None = open_regular(self.path, FormatError, "a .tall file")
        self._mm: _mmap.mmap | None = None
        try:
            self._open(mmap)
        except BaseException:
            self.close()
            raise

    def _open(self, use_mmap: bool) -> None:
        p = self.path
        size = os.fstat(self._fd).st_size
        pre = os.pread(self._fd, PREAMBLE_SIZE, 0)
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
        raw = self._pread(h_off, h_len, "the header")
        if xxhash.xxh3_64_intdigest(raw) != h_sum:
            raise ChecksumError(f"{p}: header checksum mismatch")
        self.header = parse_header(bytes(raw), p)
        del raw
        if self.header.version[0] != major or self.header.version[1] != minor:
            raise FormatError(f"{p}: header version {list(self.header.version)} differs from the preamble's "
                              f"[{major}, {minor}]")
        self.header_offset, self.header_length, self.header_xxh3, self.file_size = h_off, h_len, h_sum, size
        self.segments = check_layout(self.header, size, h_off, p)
        if use_mmap:
            self._mm = _mmap.mmap(self._fd, 0, access=_mmap.ACCESS_READ)
        self._check_padding()

    def _pread(self, offset: int, length: int, what: str | Segment) -> memoryview:
        """``length`` bytes at ``offset`` into a fresh writable buffer; FormatError naming ``what`` (a
        description, or the segment being read) if the file ends first."""
        buf = memoryview(bytearray(length))
        got = 0
        while got < length:
            try:
                k = os.preadv(self._fd, [buf[got:]], offset + got) if _PREADV else _pread_into(
                    self._fd, buf[got:], offset + got)
            except OSError as exc:
                raise FormatError(f"{self.path}: cannot read {self._what(what)} ({exc.strerror})") from None
            if k == 0:
                raise FormatError(f"{self.path}: the file ended at byte {offset + got} while reading "
                                  f"{self._what(what)} (it was truncated or replaced in place while open)")
            got += k
        return buf

    def _check_padding(self) -> None:
        pos = PREAMBLE_SIZE
        for s in (*self.segments, None):
            end = s.offset if s is not None else self.header_offset
            if end > pos:
                gap = self._mm[pos:end] if self._mm is not None else self._pread(pos, end - pos, "padding")
                if any(gap):
                    raise FormatError(f"{self.path}: padding bytes [{pos}, {end}) are not zero")
            if s is not None:
                pos = s.offset + s.length

    def stored(self, seg: Segment) -> memoryview:
        """The segment's stored bytes (read now, or a view of the map with ``mmap=True``), checksum
        verified."""
        if self._fd is None:
            raise InputError(f"{self.path}: the archive is closed")
        if self._mm is not None:
            view = memoryview(self._mm)[seg.offset:seg.offset + seg.length]
        else:
            view = self._pread(seg.offset, seg.length, seg)
        if checksum(view) != seg.xxh3:
            view.release()
            raise ChecksumError(f"{self.path}: {self._locate(seg)}: checksum mismatch (xxh3 of the stored "
                                f"bytes is not {seg.xxh3})")
        return view

    def _locate(self, seg: Segment) -> str:
        """The header field of a segment, for an error message (found by a scan: errors are rare)."""
        loc = next((loc for loc, s in segment_locations(self.header) if s is seg), None)
        return f"{describe(self.header, loc) if loc else 'segment'} (segment at offset {seg.offset})"

    def _what(self, what: str | Segment) -> str:
        return what if isinstance(what, str) else self._locate(what)

    def check_budget(self, seg: Segment) -> None:
        """LimitError when ``seg`` decodes to more than ``max_tensor_bytes`` (checked before reading it)."""
        if seg.decoded_length > self.max_tensor_bytes:
            raise LimitError(f"{self.path}: {self._locate(seg)}: decodes to {seg.decoded_length:,} bytes, over this "
                             f"reader's memory budget of {self.max_tensor_bytes:,} bytes per segment (open the "
                             f"archive with a larger max_tensor_bytes, or tallfmt --max-tensor-bytes, to read it)")

    def segment_error(self, seg: Segment, exc: FormatError) -> FormatError:
        """``exc``, raised while decoding ``seg`` outside :meth:`read` (e.g. one byte plane at a time),
        worded as :meth:`read` words its errors: this file, where the segment is, its codec."""
        if str(exc).startswith(self.path):
            return exc
        return type(exc)(f"{self.path}: {self._locate(seg)}, codec {seg.codec}: {exc}")

    def read(self, seg: Segment, itemsize: int, out: np.ndarray | None = None,
             context: np.ndarray | None = None) -> Buffer:
        """The decoded bytes of a segment (for raw segments the stored buffer itself unless ``out`` is
        given; with ``out``, a uint8 array of ``decoded_length`` bytes, they are decoded into it),
        checksum verified first. ``context``: τ_MTL of the tensor (float32, or its 4 × n byte planes)
        for a mask whose codec needs it (FORMAT.md §5.1). LimitError, before reading, when ``decoded_length`` is over
        ``max_tensor_bytes``."""
        self.check_budget(seg)
        try:
            return decode(seg.codec, self.stored(seg), seg.decoded_length, itemsize, out, context)
        except FormatError as exc:
            if str(exc).startswith(self.path):
                raise
            raise type(exc)(f"{self.path}: {self._locate(seg)}, codec {seg.codec}: {exc}") from None

    def read_array(self, seg: Segment, dtype: str, shape: tuple[int, ...] | None = None,
                   context: np.ndarray | None = None) -> np.ndarray:
        """A segment decoded as a numpy array of the dtype's storage type (its values checked: BOOL
        bytes 0 or 1). Read-only only for raw segments of a mapped reader. ``context``: as for
        :meth:`read`."""
        d = dtypes.by_name(dtype)
        data = self.read(seg, d.itemsize, context=context)
        if dtype == "BOOL":
            check_values(data, dtype, 0, lambda: f"{self.path}: {self._locate(seg)}")
        arr = np.frombuffer(data, dtype=d.storage)
        return arr if shape is None else arr.reshape(shape)

    def verify(self) -> None:
        """Read every segment once: checksum, codec, values (BOOL bytes, mask padding bits); raise the
        first FormatError found."""
        for t in self.header.tensors:
            tau = None  # τ_MTL, decoded before the masks (parts() lists it first) for a context codec
            for seg, kind in t.parts():
                if kind == "positions":  # checked with its values by residual()
                    continue
                context = tau if kind == "mask" and context_of(seg.codec) == "tau" else None
                data = self.read(seg, _ITEMSIZE.get(kind, 1), context=context)
                check_values(data, kind, t.numel, lambda: f"{self.path}: {self._locate(seg)}")
                if seg is t.tau and any(context_of(m.codec) == "tau" for m in t.masks):
                    tau = np.frombuffer(data, dtype=np.float32 if t.tau_dtype == "F32" else np.uint16)
                    if t.tau_dtype != "F32":  # BF16: the float32 context is the bits · 2¹⁶, exact (§5.1)
                        tau = (tau.astype(np.uint32) << 16).view(np.float32)
            for r in t.residuals:
                if r is not None:
                    self.residual(t, r)

    def residual(self, e: TensorEntry, r: Residual) -> tuple[np.ndarray, np.ndarray]:
        """A task's residual on masked tensor ``e`` (FORMAT.md §11): its positions (int64, strictly
        increasing, inside the tensor) and values (float32, finite), both checked."""
        pos = gaps_to_positions(self.read(r.positions, gap_itemsize(e.numel)), r.count, e.numel,
                                lambda: f"{self.path}: {self._locate(r.positions)}")
        vals = values_to_f32(self.read(r.values, dtypes.by_name(r.dtype).itemsize), r.count, r.dtype,
                             lambda: f"{self.path}: {self._locate(r.values)}")
        return pos, vals

    def close(self) -> None:
        if self._mm is not None:
            mm, self._mm = self._mm, None
            try:
                mm.close()
            except BufferError:
                # views of the map are still alive (arrays of raw segments, or frames of a traceback
                # being handled): the map is unmapped when the last of them goes
                pass
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> "ContainerReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PREADV = hasattr(os, "preadv")
_ITEMSIZE = {**{n: d.itemsize for n, d in dtypes.DTYPES.items()}, "mask": 1}


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    data = os.pread(fd, len(buf), offset)
    buf[:len(data)] = data
    return len(data)


def open_regular(path: str, error: type[Exception], what: str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file: a directory, FIFO, device or
    socket (also through a symlink, e.g. to /dev/zero) is refused with ``error`` before anything is
    read from it, and without waiting on it (O_NONBLOCK: opening a FIFO does not wait for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot open ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise error(f"{path}: is {kind}, not {what}")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


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

    def finish(self, header: Header, name: Callable[[str], str] | None = None) -> Path:
        """Write header and preamble, fsync, rename into place. Returns the final path: the target,
        or — with ``name`` — the file in the same folder named ``name(header_xxh3)`` (16 hex digits)."""
        raw = header.to_bytes()
        if len(raw) > MAX_HEADER_BYTES:
            self.abort()
            raise LimitError(f"{self.path}: header would be {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit")
        try:  # the reader's own checks: a writer never puts in place a file that readers refuse
            parse_header(raw, str(self.path))
        except FormatError as exc:
            self.abort()
            raise InputError(f"readers would refuse this archive, so it was not written: {exc}") from None
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
        return self._out.commit(None if name is None else name(f"{xxhash.xxh3_64_intdigest(raw):016x}"))

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        self._out.abort()

    def __enter__(self) -> ContainerWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.abort()  # a no-op after finish()
