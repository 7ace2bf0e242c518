"""The library's exception family. Every error tallfmt raises on purpose is a TallError."""

from __future__ import annotations

import operator
from typing import Any


class TallError(Exception):
    """Base class of every error tallfmt raises on purpose."""


class FormatError(TallError, ValueError):
    """A .tall archive (or a spec/index file) is malformed, damaged or exceeds a documented limit.

    The message names the file and the field that is wrong.
    """


class ChecksumError(FormatError):
    """A segment's or the header's stored bytes do not match their recorded checksum."""


class LimitError(FormatError):
    """An archive asks for more than a documented limit (header size, tensor count, expansion ratio)."""


class WriteError(TallError, OSError):
    """Writing an archive or a model failed (disk full, I/O error, permission): an OSError with the
    original errno, raised after the temporary file was removed; the target path is left as it was."""


class InputError(TallError, ValueError):
    """Bad input to encode/merge/decode: missing files, mismatched checkpoints, NaN/Inf, bad parameters."""


class TallWarning(UserWarning):
    """Something a user should know that is not an error: a merge that cannot merge some tensors, a
    consensus k above the number of tasks. The CLI prints each as one line, ``tallfmt: warning: ...``."""


def check_count(value: Any, name: str) -> int:
    """``value`` as a non-negative int (numpy integers too, bools refused), else InputError naming it."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise InputError(f"{name}: expected a non-negative integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise InputError(f"{name}: expected a non-negative integer, got {type(value).__name__}") from None
    if n < 0:
        raise InputError(f"{name}: expected a non-negative integer, got {n}")
    return n
