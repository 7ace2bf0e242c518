"""The encoder's inputs: θ0 and the T task checkpoints, opened lazily (memory-mapped) for one pass."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from tallfmt.checkpoints import Checkpoint, open_checkpoint
from tallfmt.compute.tensors import torch_dtype
from tallfmt.errors import InputError
from tallfmt.format.dtypes import by_name

#: dtypes ``dtype=`` casts (every floating one); non-float tensors are never changed.
FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class Inputs:
    """θ0 (``base``) and the task checkpoints (``cks``, in task order), with the names each holds."""

    def __init__(self, base: Checkpoint, cks: list[Checkpoint], tasks: Sequence[str]) -> None:
        self.base, self.cks, self.tasks = base, cks, list(tasks)
        self.base_names = set(base.names())
        self.task_name_sets = [set(ck.names()) for ck in cks]

    @property
    def all(self) -> tuple[Checkpoint, ...]:
        """θ0, then every task's checkpoint."""
        return (self.base, *self.cks)

    def holders(self, name: str) -> list[Checkpoint]:
        """The checkpoints that hold tensor ``name`` (θ0 first)."""
        out = [self.base] if name in self.base_names else []
        return out + [ck for ck, names in zip(self.cks, self.task_name_sets) if name in names]

    def release(self, name: str) -> None:
        """Drop a finished tensor's mapped pages from every checkpoint that has it, so the resident
        set stays near the bound instead of growing by every byte read (the page cache keeps them)."""
        for ck in self.holders(name):
            ck.release(name)

    def tensor_bytes(self, name: str) -> int:
        """Raw bytes of one tensor in θ0 and every task checkpoint that holds it."""
        total = 0
        for ck in self.holders(name):
            dt, shape = ck.info(name)
            total += math.prod(shape) * by_name(dt).itemsize
        return total


def flat(ck: Checkpoint, name: str) -> torch.Tensor:
    """A checkpoint's tensor as a flat, contiguous CPU tensor (a view where it can be)."""
    t = ck.get(name)
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1)


class InputView(Checkpoint):
    """A checkpoint as encode sees it: names renamed by ``prefix_map`` (θ0 only: a name starting with
    a key starts with its value instead, the longest key winning) and every float tensor cast to
    ``dtype`` (one rounding to nearest even, FORMAT.md §4.1), non-float tensors as they are.

        >>> import torch
        >>> ck = open_checkpoint({"emb.w": torch.ones(2, dtype=torch.float64), "ids": torch.arange(2)})
        >>> v = InputView(ck, "BF16", {"": "bert."})
        >>> v.names(), v.info("bert.emb.w"), v.get("bert.ids").dtype
        (['bert.emb.w', 'bert.ids'], ('BF16', (2,)), torch.int64)
    """

    def __init__(self, ck: Checkpoint, dtype: str | None, prefix_map: Mapping[str, str] | None = None) -> None:
        self.ck, self.dtype = ck, dtype
        self.source, self.label, self.metadata = ck.source, ck.label, ck.metadata
        self._orig: dict[str, str] = {}
        keys = sorted(prefix_map or {}, key=len, reverse=True)
        for n in ck.names():
            old = next((k for k in keys if n.startswith(k)), None)
            new = n if old is None else prefix_map[old] + n[len(old):]  # type: ignore[index]
            if new in self._orig:
                raise InputError(f"{ck.source}: prefix_map gives {self._orig[new]!r} and {n!r} the same name {new!r}")
            self._orig[new] = n

    def _name(self, name: str) -> str:
        return self._lookup(self._orig, name)

    def names(self) -> list[str]:
        return list(self._orig)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        dt, shape = self.ck.info(self._name(name))
        return (self.dtype if self.dtype is not None and dt in FLOAT_NAMES else dt), shape

    def get(self, name: str) -> torch.Tensor:
        orig = self._name(name)
        t = self.ck.get(orig)
        if self.dtype is None or not t.is_floating_point() or t.dtype == torch_dtype(self.dtype):
            return t
        out = t.to(torch_dtype(self.dtype))
        narrower = by_name(self.dtype).itemsize < t.element_size() or (
            self.dtype == "F16" and t.dtype == torch.bfloat16)  # bf16's range is float32's
        if narrower and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(t).all()):
            raise InputError(f"{self.source}: tensor {orig!r} has values outside the range of {self.dtype} "
                             f"(largest |x| = {float(t.abs().max()):.4g}); cast to BF16 instead")
        return out

    def storage_key(self, name: str) -> object | None:
        return self.ck.storage_key(self._name(name))  # tied before the cast, tied after it

    def release(self, name: str) -> None:
        self.ck.release(self._name(name))

    def close(self) -> None:
        self.ck.close()


@contextmanager
def open_inputs(base: Any, tasks: Sequence[tuple[str, Any]] | Mapping[str, Any], *, dtype: str | None = None,
                prefix_map: Mapping[str, str] | None = None) -> Iterator[Inputs]:
    """Open θ0 and the task checkpoints (lazily); closed when the block ends. ``dtype`` and
    ``prefix_map`` (θ0's names) as in :class:`InputView`."""
    pairs = list(tasks.items()) if isinstance(tasks, Mapping) else list(tasks)

    def view(ck: Checkpoint, renames: Mapping[str, str] | None) -> Checkpoint:
        return ck if dtype is None and not renames else InputView(ck, dtype, renames)

    with ExitStack() as stack:
        base_ck = view(stack.enter_context(open_checkpoint(base, label="base")), prefix_map)
        cks = [view(stack.enter_context(open_checkpoint(src, label=t)), None) for t, src in pairs]
        yield Inputs(base_ck, cks, [t for t, _ in pairs])


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def refuse_own_input(out: str | os.PathLike, sources: Iterable[tuple[str, Any]]) -> None:
    """InputError when writing ``out`` would replace one of the inputs: the same file or folder, or a
    weight file inside an input folder. ``sources``: (what, source) pairs, e.g. ("task 'sst2'", path)."""
    o = Path(out)
    for what, src in sources:
        if not isinstance(src, (str, os.PathLike)):
            continue
        s = Path(src)
        inside = s.is_dir() and _same(o.parent, s) and o.name.endswith((".safetensors", ".bin", ".index.json"))
        if _same(o, s) or inside:
            raise InputError(f"{o}: is {what}'s own {'folder' if s.is_dir() and not inside else 'file'} ({s}); "
                             f"write the archive somewhere else")
