"""The files an encode stores beside the tensors (FORMAT.md §10): the non-weight files of every input
that is a folder — configs, tokenizer files, chat templates, the model card — read on the driver.

Only files of known kinds are taken (see :data:`SIDECAR_SUFFIXES`); weights, their indexes, hidden
files, Trainer ``checkpoint-N`` folders and anything else (optimizer states, pickled training
arguments) are left alone.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text("{}"); _ = (d / "optimizer.pt").write_bytes(b"x")
    >>> sorted(folder_files(d))
    ['config.json']
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tallfmt.errors import InputError
from tallfmt.format.files import MAX_FILE_BYTES, MAX_FILES_PER_MODEL, MAX_FILES_STORED, Files, name_problem

#: What a model folder holds beside its weights: configs and tokenizers (.json), vocabularies and
#: merges (.txt), sentencepiece models (.model), tiktoken files, chat templates (.jinja), model cards.
SIDECAR_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".md")
#: Index files of sharded weights (model.safetensors.index.json, pytorch_model.bin.index.json).
WEIGHT_INDEX_SUFFIX = ".index.json"
#: Subfolders followed (sentence-transformers keeps e.g. 1_Pooling/config.json).
MAX_DEPTH = 3


def _skipped(name: str, is_dir: bool) -> bool:
    if name.startswith("."):
        return True
    if is_dir:
        return name.startswith("checkpoint-") or name in ("runs", "__pycache__")
    return not name.endswith(SIDECAR_SUFFIXES) or name.endswith(WEIGHT_INDEX_SUFFIX)


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes (symlinks followed, as in a Hugging Face cache), at most MAX_FILE_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise InputError(f"{path}: {st.st_size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit of a stored "
                             f"file; pass files=False (CLI: --no-files) to store no files")
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{path}: grew past the {MAX_FILE_BYTES:,}-byte limit of a stored file while read")
    return data


def folder_files(folder: Path) -> dict[str, bytes]:
    """{relative POSIX name: bytes} of a model folder's sidecar files, in name order."""
    out: dict[str, bytes] = {}

    def walk(d: Path, prefix: str, depth: int) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            raise InputError(f"{d}: cannot list ({exc.strerror})") from None
        for e in entries:
            is_dir = e.is_dir()  # follows symlinks
            if _skipped(e.name, is_dir):
                continue
            name = prefix + e.name
            if is_dir:
                if depth < MAX_DEPTH:
                    walk(Path(e.path), name + "/", depth + 1)
                continue
            why = name_problem(name)
            if why is not None:
                raise InputError(f"{e.path!r}: this file name cannot be stored ({why}); pass files=False "
                                 f"(CLI: --no-files) to store no files")
            out[name] = _read_regular(Path(e.path))
            if len(out) > MAX_FILES_PER_MODEL:
                raise InputError(f"{folder}: more than {MAX_FILES_PER_MODEL} files to store; pass files=False "
                                 f"(CLI: --no-files) to store none")

    walk(folder, "", 1)
    return out


def source_files(src: Any) -> dict[str, bytes]:
    """The sidecar files of one checkpoint source: a folder's, else none (a file, a mapping)."""
    if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
        return folder_files(Path(src))
    return {}


def collect_files(base: Any, tasks: Sequence[tuple[str, Any]]) -> Files | None:
    """The ``files`` of an archive of ``base`` and ``tasks`` (deduplicated), or None when no input is
    a folder with such files."""
    files = Files.pack(source_files(base), [source_files(src) for _, src in tasks])
    if files is not None and files.stored_bytes > MAX_FILES_STORED:
        raise InputError(f"the inputs' files take {files.stored_bytes:,} bytes stored, over the "
                         f"{MAX_FILES_STORED:,}-byte limit; pass files=False (CLI: --no-files) to store none")
    return files
