"""θ0 given by the reader for an archive that keeps it outside (``encode(store_base=False)``,
FORMAT.md §2.1): every tensor the archive's BASEREFs name is looked up in the given checkpoint (a
file, a folder or a state dict, read by :mod:`tallfmt.checkpoints`) and checked — present, same dtype
and shape, same XXH3-64 of its bytes — when the archive is opened, so a wrong base is refused before
anything is decoded.

    >>> zoo = tallfmt.open("zoo.tall", base="all-MiniLM-L6-v2/")          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tallfmt.checkpoints import open_checkpoint
from tallfmt.compute.tensors import to_numpy
from tallfmt.errors import InputError
from tallfmt.format.header import BaseRef, Header, checksum


def no_base_error(archive: Any) -> InputError:
    """The error for reading θ0 of an archive that does not store it, without a base."""
    return InputError(f"{archive}: θ0 is not stored in this archive (it was encoded with store_base=False): "
                      f"open it with tallfmt.open(path, base=THETA0) (CLI: --base PATH) to decode or merge")


class ExternalBase:
    """θ0's tensors for the BASEREFs of ``header``, from ``source``, each checked on construction."""

    def __init__(self, source: Any, header: Header, archive: Any) -> None:
        self.archive = archive
        self.ck = open_checkpoint(source)
        self.source = self.ck.source
        self.refs: dict[str, tuple[BaseRef, str, tuple[int, ...]]] = {}
        self.arrays: dict[str, np.ndarray] = {}
        try:
            for e in header.tensors:
                for ref in e.base_refs():
                    self.refs[e.name] = ref
                    self.arrays[e.name] = self._checked(e.name, *ref)
        except BaseException:
            self.ck.close()
            raise

    def _checked(self, name: str, ref: BaseRef, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.ck:
            raise InputError(f"{self.source}: the base has no tensor {name!r}, which {self.archive} needs (the "
                             f"archive does not store θ0)")
        dt, sh = self.ck.info(name)
        if dt != dtype or tuple(sh) != tuple(shape):
            raise InputError(f"{self.source}: tensor {name!r} is {dt} {list(sh)}, but the θ0 {self.archive} was "
                             f"encoded from has {dtype} {list(shape)}")
        arr = to_numpy(self.ck.get(name)).reshape(-1).view(np.uint8)
        self._check_sum(name, ref, arr)
        return arr

    def _check_sum(self, name: str, ref: BaseRef, arr: np.ndarray) -> None:
        got = checksum(arr)
        if got != ref.xxh3:
            raise InputError(f"{self.source}: tensor {name!r} differs from the θ0 {self.archive} was encoded from "
                             f"(xxh3 {got}, the archive records {ref.xxh3}): not the same base model")

    def bytes(self, name: str) -> np.ndarray:
        """θ0's bytes of tensor ``name`` (checked on open), flat uint8."""
        return self.arrays[name]

    def verify(self) -> None:
        """Check every tensor's checksum again (the base may have changed since it was opened)."""
        for name, (ref, _, _) in self.refs.items():
            self._check_sum(name, ref, self.arrays[name])

    def close(self) -> None:
        self.arrays.clear()
        self.ck.close()
