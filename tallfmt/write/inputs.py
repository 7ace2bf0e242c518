"""The encoder's inputs: θ0 and the T task checkpoints, opened lazily (memory-mapped) for one pass."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from tallfmt.checkpoints import Checkpoint, open_checkpoint
from tallfmt.format.dtypes import by_name


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


@contextmanager
def open_inputs(base: Any, tasks: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> Iterator[Inputs]:
    """Open θ0 and the task checkpoints (lazily); closed when the block ends."""
    pairs = list(tasks.items()) if isinstance(tasks, Mapping) else list(tasks)
    with ExitStack() as stack:
        base_ck = stack.enter_context(open_checkpoint(base, label="base"))
        cks = [stack.enter_context(open_checkpoint(src, label=t)) for t, src in pairs]
        yield Inputs(base_ck, cks, [t for t, _ in pairs])
