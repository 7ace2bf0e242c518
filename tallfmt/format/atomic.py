"""The one atomic writer: every file tallfmt writes (archives, shards, indexes, decoded and merged
safetensors files) goes through :class:`AtomicFile` (FORMAT.md §8).

Bytes go to a temporary file beside the target, ``.<target name>.<pid>-<random>.tmp``; ``commit()``
gives it the usual mode (0666 & ~umask), fsyncs it, renames it over the target and fsyncs the folder.
Anything that fails before the rename leaves the target as it was and removes the temporary file. A
killed writer leaves its temporary file behind; the next write to the same target removes the
temporary files of that target whose writer process is gone (:func:`remove_stale`).

    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "x.bin")
    >>> with AtomicFile(target) as f:
    ...     _ = f.write(b"hello")
    >>> open(target, "rb").read()
    b'hello'
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from tallfmt.errors import InputError, WriteError

_TMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{12}\.tmp")


def umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename into it is durable; best effort (some filesystems refuse)."""
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale(target: Path) -> None:
    """Remove temporary files of ``target`` (our naming scheme only) whose writer process is gone.

    A file whose pid belongs to a live process (a concurrent writer, or an unrelated process that
    reused the pid) is kept: removing too little is safe, removing a live writer's file is not."""
    folder = target.parent if str(target.parent) else Path(".")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        m = _TMP.fullmatch(e.name)
        if m and m["name"] == target.name and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            try:
                os.unlink(e.path)
            except OSError:
                pass


def write_error(path: Path, what: str, exc: OSError) -> WriteError:
    """The WriteError for an OSError while writing ``path`` (keeps the errno)."""
    return WriteError(exc.errno, f"{path}: {what} ({exc.strerror or exc}); the target was not changed")


class AtomicFile:
    """A temporary file beside ``path`` that :meth:`commit` renames over it (see the module doc).

    ``overwrite=False`` refuses an existing ``path`` (InputError). Writes and the commit raise
    :class:`~tallfmt.WriteError` (an OSError with the original errno) after removing the temporary
    file. As a context manager: commit on success, abort on an exception.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = True) -> None:
        self.path = Path(path)
        if not overwrite and self.path.exists():
            raise InputError(f"{self.path}: already exists (pass overwrite=True / --force to replace it)")
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory")
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise InputError(f"{self.path}: folder {folder} does not exist")
        remove_stale(self.path)
        self.tmp_path = folder / f".{self.path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise write_error(self.path, "cannot create a temporary file in the target folder", exc) from exc
        self.file = os.fdopen(fd, "w+b")
        self.done = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append bytes; WriteError (temporary file removed) on failure."""
        try:
            return self.file.write(data)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, f"cannot write {self.tmp_path.name}", exc) from exc

    def commit(self) -> Path:
        """fsync, give the usual mode, rename over ``path``, fsync the folder; returns ``path``."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp_path, 0o666 & ~umask())
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, f"cannot finish {self.tmp_path.name}", exc) from exc
        self.done = True
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Remove the temporary file; ``path`` is left as it was."""
        if self.done:
            return
        self.done = True
        try:
            self.file.close()  # may fail flushing buffered bytes on a full disk: the file goes anyway
        except OSError:
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.done:
            self.commit()


def write_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with AtomicFile(path, overwrite=overwrite) as f:
        f.write(data)
    return f.path
