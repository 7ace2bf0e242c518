"""Tensor reads of an open archive: stored copies, θ0, τ_MTL, masks, task models (the fused numba
decode) and merged models (torch, on ``device``), streamed tensor by tensor in a small thread pool.

:class:`tallfmt.read.archive.Archive` creates one :class:`ArchiveTensors` on first use, so opening an
archive and reading its header never imports torch or numba.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from tallfmt import kernels
from tallfmt.compute import maskmath, rounding
from tallfmt.compute.tensors import to_torch
from tallfmt.errors import FormatError, InputError
from tallfmt.format.container import ContainerReader
from tallfmt.format.dtypes import by_name
from tallfmt.format.header import Item, Segment, TensorEntry
from tallfmt.format.layout import Layout
from tallfmt.read.merges import get_merge


def _writable(arr: np.ndarray) -> np.ndarray:
    # Views of the memory map (raw segments) or of immutable bytes must not escape as torch tensors.
    return arr if arr.flags.writeable else arr.copy()


class ArchiveTensors:
    """Reads tensors of a layout (one file, or shards), each from the shard that holds it."""

    def __init__(self, layout: Layout, threads: int) -> None:
        self.layout, self.threads = layout, threads
        self.header = layout.header
        self.tasks = layout.header.task_names
        self.entries = {t.name: t for t in layout.header.tensors}

    # --- low-level reads ------------------------------------------------------------------------
    def shard(self, e: TensorEntry) -> ContainerReader:
        return self.layout.reader(e.name)

    def resolve(self, e: TensorEntry) -> TensorEntry:
        return self.entries[e.target] if e.role == "alias" else e

    def array(self, e: TensorEntry, seg: Segment, dtype: str) -> np.ndarray:
        """Segment ``seg`` of tensor ``e``, read from the shard holding ``e``."""
        return self.shard(e).read_array(seg, dtype)

    def item_tensor(self, e: TensorEntry, item: Item) -> torch.Tensor:
        d = by_name(item.dtype)
        return to_torch(_writable(self.array(e, item.data, item.dtype)).reshape(item.shape), d)

    def packed(self, e: TensorEntry, i: int) -> np.ndarray:
        packed = self.array(e, e.masks[i], "U8")
        if not kernels.padding_ok(packed, e.numel):
            raise FormatError(f"{self.shard(e).path}: tensor {e.name!r}, task {self.tasks[i]!r}: mask padding "
                              f"bits are not zero")
        return packed

    def theta0(self, e: TensorEntry, device: torch.device) -> torch.Tensor:
        """θ0 of a masked tensor in its own dtype, flat, on ``device``."""
        return to_torch(self.array(e, e.base, e.dtype), by_name(e.dtype)).to(device)

    def tau(self, e: TensorEntry, device: torch.device | None = None) -> torch.Tensor:
        t = torch.from_numpy(_writable(self.array(e, e.tau, "F32")))
        return t.to(device) if device is not None else t

    def counts(self, e: TensorEntry) -> np.ndarray:
        counts = np.zeros(e.numel, dtype=np.uint16)
        for i in range(len(self.tasks)):
            kernels.add_bits(counts, self.packed(e, i), e.numel)
        return counts

    # --- task models ------------------------------------------------------------------------------
    def decode_entry(self, e: TensorEntry, i: int | None) -> torch.Tensor | None:
        """Tensor ``e`` of task i (None: θ0), or None when that checkpoint does not have it."""
        if e.role == "shared":
            return self.item_tensor(e, Item(e.dtype, e.shape, e.data))
        if e.role == "per_task":
            item = e.base_item if i is None else e.task_items[i]
            return None if item is None else self.item_tensor(e, item)
        d = by_name(e.dtype)
        base = self.array(e, e.base, e.dtype)
        if i is None:
            return to_torch(_writable(base).reshape(e.shape), d)
        out = kernels.decode_masked(base, self.array(e, e.tau, "F32"), self.packed(e, i), dtype=e.dtype)
        return to_torch(out.reshape(e.shape), d)

    def iterate(self, fn: Callable[[TensorEntry], torch.Tensor | None], device: torch.device | None
                ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield fn(tensor) in table order, computing up to ``threads`` tensors ahead in a thread pool
        (the kernels, zstd and numpy release the GIL). Memory stays at a few tensors: only alias
        targets are kept after they are yielded."""
        targets = {e.target for e in self.header.tensors if e.role == "alias"}
        kept: dict[str, torch.Tensor | None] = {}

        def run(e: TensorEntry) -> torch.Tensor | None:
            t = fn(e)
            return t.to(device) if t is not None and device is not None else t

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            pending: deque[tuple[TensorEntry, Future | None]] = deque()
            entries = iter(self.header.tensors)
            while True:
                while len(pending) <= self.threads:
                    e = next(entries, None)
                    if e is None:
                        break
                    pending.append((e, None if e.role == "alias" else pool.submit(run, e)))
                if not pending:
                    return
                e, fut = pending.popleft()
                target = self.resolve(e)
                if fut is not None:
                    t = fut.result()
                elif target.name in kept:
                    t = kept[target.name]
                else:  # an alias listed before its target
                    t = run(target)
                if target.name in targets:
                    kept[target.name] = t
                if t is not None:
                    yield e.name, t

    # --- merged models ----------------------------------------------------------------------------
    def merge_fn(self, method: str, params: dict[str, Any], device: torch.device
                 ) -> Callable[[TensorEntry], torch.Tensor | None]:
        m = get_merge(method)
        checked = m.check(dict(params), len(self.tasks))

        def fn(e: TensorEntry) -> torch.Tensor | None:
            if e.role != "masked":
                return self.decode_entry(e, None)
            native = self.theta0(e, device)
            theta0 = rounding.widen(native)
            tau = self.tau(e, device) if "tau" in m.needs else None
            counts = (torch.from_numpy(self.counts(e).astype(np.int32)).to(device)
                      if "counts" in m.needs else None)
            merged = m.apply(theta0=theta0, tau=tau, counts=counts, **checked)
            return rounding.round_merged(merged, native, theta0).reshape(e.shape).cpu()
        return fn

    # --- masks and statistics -------------------------------------------------------------------
    def mask(self, e: TensorEntry, i: int) -> torch.Tensor:
        return torch.from_numpy(kernels.unpack_bits(self.packed(e, i), e.numel)).reshape(e.shape)

    def agreement(self, device: torch.device) -> torch.Tensor:
        total = torch.zeros(len(self.tasks) + 1, dtype=torch.int64, device=device)
        for e in self.header.tensors:
            if e.role == "masked":
                counts = torch.from_numpy(self.counts(e).astype(np.int64)).to(device)
                total += maskmath.agreement_histogram(counts, len(self.tasks))
        return total

    def verify(self) -> None:
        for shard in self.layout.readers:  # each segment once: checksum, codec, BOOL bytes, mask padding
            shard.verify()


def check_masked(e: TensorEntry, path: Any, name: str) -> TensorEntry:
    if e.role != "masked":
        raise InputError(f"{path}: tensor {name!r} has role {e.role!r}; only masked tensors have masks and τ_MTL")
    return e
