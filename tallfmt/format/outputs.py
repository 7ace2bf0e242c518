"""Output paths: one rule, for the Python API and the command line alike, about what tallfmt writes
where and whether it may replace what is there.

    >>> model_output_kind("sst2.safetensors"), model_output_kind("sst2-model")
    ('file', 'folder')
    >>> model_output_kind("sst2.bin")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    tallfmt.errors.InputError: sst2.bin: a model is written as one .safetensors file or as a folder; ...
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tallfmt.errors import InputError

#: Whether encode, decode_to and merge_to replace an existing output when not told (``overwrite=``;
#: the CLI's ``--force``): no, in the API as on the command line.
OVERWRITE = False
#: Largest weight file of a decoded or merged folder before it is sharded (``max_shard_size``).
MAX_SHARD_SIZE = 5 * 2**30
#: Names that look like a file of another kind: a model output named so would silently become a folder.
FILE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".tall", ".json", ".h5", ".gguf", ".onnx", ".npz", ".npy",
                 ".pkl", ".msgpack", ".zip", ".tar", ".gz")
WEIGHT_INDEX = "model.safetensors.index.json"


def model_output_kind(out: str | os.PathLike) -> str:
    """"file" for a ``.safetensors`` name, "folder" for a name without a file suffix; InputError for
    a name like ``x.bin``, which would otherwise become a folder of that name."""
    p = Path(out)
    if p.name.endswith(".safetensors"):
        return "file"
    if p.suffix.lower() in FILE_SUFFIXES:
        raise InputError(f"{p}: a model is written as one .safetensors file or as a folder; name a "
                         f".safetensors file or a folder (a folder named {p.name!r} would be confusing)")
    return "folder"


def check_model_output(out: str | os.PathLike, overwrite: bool) -> str:
    """Refuse to replace a model file, or a folder that holds one, unless ``overwrite``; returns the
    output's kind (:func:`model_output_kind`)."""
    p = Path(out)
    kind = model_output_kind(p)
    if kind == "file" and p.is_dir():
        raise InputError(f"{p}: is a folder; a .safetensors output is one file")
    if kind == "folder" and p.exists() and not p.is_dir():
        raise InputError(f"{p}: exists and is not a folder")
    if overwrite or not p.exists():
        return kind
    if kind == "file":
        raise InputError(f"{p}: already exists (pass overwrite=True / --force to replace it)")
    if any(p.glob("*.safetensors")) or (p / WEIGHT_INDEX).exists():
        raise InputError(f"{p}: already holds a model (pass overwrite=True / --force to replace it)")
    return kind


@contextmanager
def new_folder_removed_on_failure(out: str | os.PathLike) -> Iterator[None]:
    """If ``out`` does not exist yet and the block fails (an error, Ctrl-C), remove the folder the
    block made there, so that an interrupted decode leaves nothing behind; an existing ``out`` is
    left to the writers (each file in it is replaced whole or not at all)."""
    p = Path(out)
    existed = os.path.lexists(p)
    try:
        yield
    except BaseException:
        if not existed and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        raise
