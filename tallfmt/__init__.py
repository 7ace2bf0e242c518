"""tallfmt: one compressed archive for a zoo of fine-tunes of one base model (TALL-masks)."""

from tallfmt.errors import ChecksumError, FormatError, InputError, LimitError, TallError

__version__ = "0.1.0"

__all__ = ["TallError", "FormatError", "ChecksumError", "LimitError", "InputError", "__version__"]
