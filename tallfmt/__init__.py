"""tallfmt: one compressed archive for a zoo of fine-tunes of one base model (TALL-masks).

    >>> import tallfmt
    >>> tallfmt.encode("base.safetensors", {"sst2": "sst2.safetensors"}, "zoo.tall")   # doctest: +SKIP
    >>> with tallfmt.open("zoo.tall") as zoo:                                          # doctest: +SKIP
    ...     sd = zoo.decode("sst2")
"""

from __future__ import annotations

import importlib
from typing import Any

from tallfmt.errors import ChecksumError, FormatError, InputError, LimitError, TallError, TallWarning, WriteError

__version__ = "0.1.0"

# Heavy modules (torch, numba) load on first use, so `import tallfmt` and `tallfmt --help` stay fast.
_LAZY = {
    "encode": "tallfmt.write.pipeline", "EncodeReport": "tallfmt.write.report",
    "open": "tallfmt.read.archive", "Archive": "tallfmt.read.archive",
    "select_lambdas": "tallfmt.tuning", "select_alpha": "tallfmt.tuning", "select_residuals": "tallfmt.tuning",
    "ResidualSelection": "tallfmt.tuning",
    "MergeMethod": "tallfmt.read.merges", "Param": "tallfmt.read.merges", "register_merge": "tallfmt.read.merges",
    "MERGES": "tallfmt.read.merges", "register_codec": "tallfmt.format.codecs", "CODECS": "tallfmt.format.codecs",
}

__all__ = [*_LAZY, "TallError", "FormatError", "ChecksumError", "LimitError", "InputError", "WriteError",
           "TallWarning", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tallfmt' has no attribute {name!r}")
