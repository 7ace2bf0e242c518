"""The one atomic writer: every file tallfmt writes (archives, shards, indexes, decoded and merged
safetensors files) goes through :class:`AtomicFile`, and every folder it writes as a whole (a decoded
or merged Hugging Face folder) through :class:`AtomicFolder` (FORMAT.md §8).

Bytes go to a temporary file beside the target, ``.<target name>.<pid>-<random>.tmp``; ``commit()``
gives it the usual mode (0666 & ~umask), fsyncs it, renames it over the target and fsyncs the folder.
Anything that fails before the rename leaves the target as it was and removes the temporary file. A
folder is built under the same kind of name beside its target and swapped in as a whole. A killed
writer leaves its temporary file or folder behind; the next write to the same target removes the
temporary files and folders of that target whose writer process is gone (:func:`remove_stale`).

    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "x.bin")
    >>> with AtomicFile(target) as f:
    ...     _ = f.write(b"hello")
    >>> open(target, "rb").read()
    b'hello'
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from tallfmt.errors import InputError, WriteError

# `.tmp`: a file or folder being written; `.old`: a replaced folder between the two renames of the
# fallback swap (removed only while the target exists: until then it is the only copy left)
_TMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{12}\.(?P<kind>tmp|old)")
_RENAME_EXCHANGE = 2  # linux/fs.h


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


def temp_name(target: Path, kind: str = "tmp") -> Path:
    """A fresh name beside ``target`` in the scheme :func:`remove_stale` knows:
    ``.<target name>.<pid>-<12 hex digits>.<kind>``."""
    folder = target.parent if str(target.parent) else Path(".")
    return folder / f".{target.name}.{os.getpid()}-{secrets.token_hex(6)}.{kind}"


def remove_stale(target: Path, names: Callable[[str], bool] | None = None) -> None:
    """Remove temporary files and folders of ``target`` (our naming scheme only) whose writer process
    is gone; ``names``: which target names count instead (e.g. every shard name of a folder).

    A temporary whose pid belongs to a live process (a concurrent writer, or an unrelated process that
    reused the pid) is kept: removing too little is safe, removing a live writer's file is not."""
    folder = target.parent if str(target.parent) else Path(".")
    belongs = names or (lambda n: n == target.name)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        m = _TMP.fullmatch(e.name)
        if not m or not belongs(m["name"]) or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not os.path.lexists(folder / m["name"]):
            continue
        remove_tree(Path(e.path))


def remove_tree(path: Path) -> None:
    """Remove a file, a link or a folder and what it holds; best effort."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
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
        self.tmp_path = temp_name(self.path)
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

    def commit(self, name: str | None = None) -> Path:
        """fsync, give the usual mode, rename over ``path`` — or over ``name`` in the same folder, a
        name known only now (a shard named by its content) — fsync the folder; returns the path."""
        final = self.path if name is None else self.path.with_name(name)
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp_path, 0o666 & ~umask())
            os.replace(self.tmp_path, final)
        except OSError as exc:
            self.abort()
            raise write_error(final, f"cannot finish {self.tmp_path.name}", exc) from exc
        self.done = True
        fsync_dir(final.parent)
        return final

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


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the filesystem cannot, so the caller falls back to two renames."""
    fn = getattr(_libc(), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


class AtomicFolder:
    """A folder built beside ``path`` (``.<name>.<pid>-<random>.tmp``) and swapped in as a whole by
    :meth:`commit`: a reader, or a process killed at any moment, sees the old folder or the new one,
    never a mix. Entries of the old folder for which ``carried(name)`` is true are carried into the
    new one first (hard links, copies where links fail), so files beside a model (a config.json)
    survive its replacement.

    The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere (or on a filesystem without
    it) the old folder is first renamed to ``.<name>.<pid>-<random>.old`` and the new one into place,
    and a kill between the two leaves the old model there (FORMAT.md §8). Failures raise
    :class:`~tallfmt.WriteError` naming ``path``, after the temporary folder is removed.

        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "model"
        >>> with AtomicFolder(target) as tmp:
        ...     _ = (tmp / "a.txt").write_text("new")
        >>> sorted(p.name for p in target.iterdir())
        ['a.txt']
    """

    def __init__(self, path: str | os.PathLike, *, carried: Callable[[str], bool] | None = None) -> None:
        self.path = Path(os.path.abspath(path))  # "." or "x/.." name a folder that has a parent to swap in
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: exists and is not a folder")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.path, f"cannot create the folder {parent}", exc) from exc
        remove_stale(self.path)
        self.tmp_path = temp_name(self.path)
        self.done = False
        try:
            os.mkdir(self.tmp_path, 0o777)
            if carried is not None and self.path.is_dir():
                for e in os.scandir(self.path):
                    if carried(e.name):
                        _carry(Path(e.path), self.tmp_path / e.name)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, "cannot create a temporary folder beside it", exc) from exc

    def commit(self) -> Path:
        """fsync the new folder, swap it in, remove the old one, fsync the parent; returns ``path``."""
        try:
            fsync_dir(self.tmp_path)
            if not os.path.lexists(self.path):
                os.rename(self.tmp_path, self.path)
            elif exchange(self.tmp_path, self.path):
                remove_tree(self.tmp_path)  # now the old folder
            else:
                old = temp_name(self.path, "old")
                os.rename(self.path, old)
                os.rename(self.tmp_path, self.path)
                remove_tree(old)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, "cannot put the new folder in place", exc) from exc
        self.done = True
        fsync_dir(self.path.parent if str(self.path.parent) else Path("."))
        remove_stale(self.path)  # a dead writer's .old, kept while it was the only copy, now goes
        return self.path

    def abort(self) -> None:
        """Remove the temporary folder; ``path`` is left as it was."""
        if not self.done:
            self.done = True
            remove_tree(self.tmp_path)

    def __enter__(self) -> Path:
        return self.tmp_path

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.commit()
            return
        self.abort()
        if isinstance(exc, WriteError) and str(self.path) not in str(exc):
            raise WriteError(exc.errno, f"{self.path}: {exc.strerror}; the folder was not changed") from exc


def _carry(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
