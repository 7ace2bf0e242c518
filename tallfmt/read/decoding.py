"""Tensor reads of an open archive: stored copies, θ0, τ_MTL, masks, task models (the fused decode)
and merged models (torch, on ``device``), streamed tensor by tensor.

A task decode is a graph of short jobs on a small thread pool (:class:`~tallfmt.read.jobs.Jobs`):
each byte plane of θ0 and τ_MTL decompresses on its own, and the fused kernel runs over ranges of
the tensor once its inputs are there, so both cores stay busy whatever the tensor sizes. Decoded θ0
and τ_MTL segments are kept in the archive's :class:`~tallfmt.read.cache.SegmentCache`, as byte
planes when their codec is ``byteplane-zstd`` (the planar kernel reads them without merging), so a
later decode of another task only reads its masks and runs the kernel. On a device other than the
CPU the kernel is the torch code of :mod:`tallfmt.compute.fused`, run on that device, and the cache
keeps θ0 and τ_MTL there (joined into elements), so a later decode moves only the task's masks.

:class:`tallfmt.read.archive.Archive` creates one :class:`ArchiveTensors` on first use, so opening an
archive and reading its header never imports torch or numba.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from functools import partial
from typing import Any

import numpy as np
import torch

from tallfmt import kernels
from tallfmt.compute import fused, maskmath, rounding
from tallfmt.compute.tensors import to_numpy, to_torch, torch_dtype
from tallfmt.errors import FormatError, InputError
from tallfmt.format.codecs import BytePlaneZstdCodec, context_of, get_codec, zstd_decompress_into
from tallfmt.format.container import ContainerReader
from tallfmt.format.dtypes import by_name
from tallfmt.format.header import BaseRef, Item, Segment, TensorEntry
from tallfmt.format.layout import Layout
from tallfmt.format.planes import merge_planes
from tallfmt.read.base import ExternalBase, no_base_error
from tallfmt.read.cache import SegmentCache
from tallfmt.read.defaults import AHEAD_BYTES, KERNEL_STEP, SMALL_TENSOR, check_kernel
from tallfmt.read.jobs import Jobs, done
from tallfmt.read.merges import get_merge

StartFn = Callable[[Jobs, TensorEntry], Future]


def _writable(arr: np.ndarray) -> np.ndarray:
    # Views of the memory map (raw segments) or of immutable bytes must not escape as torch tensors.
    return arr if arr.flags.writeable else arr.copy()


def storage_view(t: torch.Tensor) -> np.ndarray | None:
    """The flat storage (numpy) of a CPU tensor that a kernel can write into, sharing its memory; None
    when it is not a contiguous CPU tensor of a maskable dtype."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return to_numpy(t.detach().reshape(-1))


def empty(shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """A new CPU tensor whose memory numpy allocates: numpy asks the kernel for huge pages
    (madvise), which makes a large output's first write several times cheaper than torch's 4 KiB pages."""
    d = by_name(dtype)
    if math.prod(shape) == 0:  # numpy gives an empty buffer stride 0, which torch cannot view
        return torch.empty(shape, dtype=torch_dtype(dtype))
    return torch.from_numpy(np.empty(math.prod(shape) * d.itemsize, dtype=np.uint8)).view(torch_dtype(dtype)).reshape(shape)


def planes_or_flat(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A decoded segment as the kernels take it: byte planes as they are, bytes as ``dtype``'s storage."""
    return arr if arr.ndim == 2 else arr.view(by_name(dtype).storage)


def widen_tau(arr: np.ndarray) -> np.ndarray:
    """A decoded BF16 τ_MTL segment as float32 the way the kernels take it (FORMAT.md §4.4: the
    bfloat16 bits b are the float32 bits b·2¹⁶, exact): byte planes (2, n) become float32 planes (4, n)
    whose two low planes are zero; bytes become the float32 values' bytes."""
    if arr.ndim == 2:
        out = np.zeros((4, arr.shape[1]), dtype=np.uint8)
        out[2:] = arr
        return out
    return (arr.view(np.uint16).astype(np.uint32) << 16).view(np.uint8)


def _tau_reshaped(e: TensorEntry) -> bool:
    """Whether τ_MTL's decoded segment is reshaped for the kernel (:func:`_tau_ready`)."""
    return e.tau_dtype != "F32" or isinstance(e.base, BaseRef)


def _tau_ready(e: TensorEntry, arr: np.ndarray) -> np.ndarray:
    """τ_MTL's decoded segment as the CPU kernel takes it beside θ0: float32 (a BF16 τ widened,
    :func:`widen_tau`), and as bytes rather than planes when θ0 comes from the reader's base (flat), so
    the kernel does not merge the planes on every call."""
    if arr.ndim == 2 and isinstance(e.base, BaseRef):
        arr = merge_planes(arr).reshape(-1)
    return widen_tau(arr) if e.tau_dtype == "BF16" else arr


def flat(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A decoded segment as ``dtype``'s storage (byte planes merged)."""
    return (merge_planes(arr) if arr.ndim == 2 else arr).view(by_name(dtype).storage)


class ArchiveTensors:
    """Reads tensors of a layout (one file, or shards), each from the shard that holds it."""

    def __init__(self, layout: Layout, threads: int, cache: SegmentCache | None = None, kernel: str = "auto",
                 base: ExternalBase | None = None) -> None:
        self.layout, self.threads, self.kernel = layout, threads, check_kernel(kernel)
        self.base = base  # θ0 given by the reader, for rows whose θ0 is a BaseRef (FORMAT.md §2.1)
        self.cache = cache if cache is not None else SegmentCache(0)
        self.header = layout.header
        self.tasks = layout.header.task_names
        self.entries = {t.name: t for t in layout.header.tensors}

    # --- low-level reads ------------------------------------------------------------------------
    def shard(self, e: TensorEntry) -> ContainerReader:
        return self.layout.reader(e.name)

    def resolve(self, e: TensorEntry) -> TensorEntry:
        return self.entries[e.target] if e.role == "alias" else e

    def array(self, e: TensorEntry, seg: Segment | BaseRef, dtype: str) -> np.ndarray:
        """Segment ``seg`` of tensor ``e``, read from the shard holding ``e`` (a BaseRef: from the base)."""
        if isinstance(seg, BaseRef):
            return self.external(e).view(by_name(dtype).storage)
        return self.shard(e).read_array(seg, dtype)

    def external(self, e: TensorEntry) -> np.ndarray:
        """θ0's bytes of ``e`` from the base the archive was opened with (checked then)."""
        if self.base is None:
            raise no_base_error(self.layout.path)
        return self.base.bytes(e.name)

    def item_tensor(self, e: TensorEntry, item: Item) -> torch.Tensor:
        d = by_name(item.dtype)
        return to_torch(_writable(self.array(e, item.data, item.dtype)).reshape(item.shape), d)

    def needs_tau(self, e: TensorEntry, i: int) -> bool:
        """Whether task i's mask of ``e`` decodes from τ_MTL (a context codec, FORMAT.md §5.1)."""
        return context_of(e.masks[i].codec) == "tau"

    def tau_context(self, e: TensorEntry, decoded: np.ndarray | None = None) -> np.ndarray:
        """τ_MTL of ``e`` as the context of its masks: its decoded segment (``decoded``, or through the
        cache) as byte planes (4 × n uint8, which the codec reads without merging) or float32 elements."""
        arr = decoded if decoded is not None else self.tau_now(e)  # a BF16 τ_MTL widened (exact)
        return arr if arr.ndim == 2 else arr.view(np.float32)

    def packed(self, e: TensorEntry, i: int, tau: np.ndarray | None = None) -> np.ndarray:
        """Task i's packed mask of tensor ``e``. A mask whose codec decodes from τ_MTL gets ``tau``
        (:meth:`tau_context`) or the tensor's τ_MTL through the cache: only τ_MTL and that task's mask
        segment are read."""
        seg = e.masks[i]
        context = None
        if self.needs_tau(e, i):
            context = tau if tau is not None else self.tau_context(e)
        packed = self.shard(e).read_array(seg, "U8", context=context)
        if not kernels.padding_ok(packed, e.numel):
            raise FormatError(f"{self.shard(e).path}: tensor {e.name!r}, task {self.tasks[i]!r}: mask padding "
                              f"bits are not zero")
        return packed

    def use_torch(self, device: torch.device | None) -> bool:
        """Whether the torch kernels (rather than numba's) decode for ``device``."""
        return self.kernel == "torch" or (self.kernel == "auto" and device is not None and device.type != "cpu")

    # --- decoded θ0 / τ_MTL segments, through the cache -------------------------------------------
    def _plan(self, e: TensorEntry, seg: Segment, itemsize: int) -> tuple[np.ndarray, list[Callable[[], None]]]:
        """The array a segment decodes into and the jobs that fill it (checksum verified first).

        byteplane-zstd: an (itemsize, n) array of planes, one job per plane; raw: a view, no job;
        any other codec: its decoded bytes, one job; a BaseRef: the base's bytes, no job."""
        if isinstance(seg, BaseRef):
            return self.external(e), []
        r = self.shard(e)
        r.check_budget(seg)
        codec = get_codec(seg.codec)
        if isinstance(codec, BytePlaneZstdCodec) and itemsize > 1:
            stored = r.stored(seg)
            try:
                frames = codec.frames(stored, seg.decoded_length, itemsize)
            except FormatError as exc:
                raise r.segment_error(seg, exc) from None
            planes = np.empty((itemsize, seg.decoded_length // itemsize), dtype=np.uint8)
            return planes, [partial(_plane, r, seg, f, planes[k], k) for k, f in enumerate(frames)]
        if seg.codec == "raw":
            return np.frombuffer(r.read(seg, itemsize), dtype=np.uint8), []
        out = np.empty(seg.decoded_length, dtype=np.uint8)
        return out, [partial(r.read, seg, itemsize, out)]

    def _key(self, e: TensorEntry, seg: Segment) -> tuple[int, Segment]:
        return id(self.shard(e)), seg

    def decoded(self, e: TensorEntry, seg: Segment, itemsize: int, jobs: Jobs, keep: bool = True) -> Future:
        """A future of θ0's or τ_MTL's decoded segment (planes or bytes; see :meth:`_plan`), decoded
        by jobs in ``jobs`` unless cached, and cached when done if it fits (and ``keep``)."""
        key = self._key(e, seg)
        hit = self.cache.get(key)
        if hit is not None:
            return done(hit)
        arr, work = self._plan(e, seg, itemsize)
        fut = jobs.gather([jobs.submit(w) for w in work], arr)

        def put(f: Future) -> None:
            if keep and not f.cancelled() and f.exception() is None:
                self.cache.put(key, arr)
        fut.add_done_callback(put)
        return fut

    def on_device(self, e: TensorEntry, seg: Segment, dtype: str, device: torch.device | None, jobs: Jobs) -> Future:
        """A future of θ0 or τ_MTL as a flat tensor on ``device`` (planes joined there), cached there:
        a later decode on that device moves nothing to it but the task's masks."""
        key = (*self._key(e, seg), str(device))
        hit = self.cache.get(key)
        if hit is not None:
            return done(hit)
        host = self.decoded(e, seg, by_name(dtype).itemsize, jobs, keep=False)

        def move() -> torch.Tensor:
            t = self.device_tensor(host.result(), dtype, device)
            self.cache.put(key, t)
            return t
        return jobs.after([host], move)

    def decoded_now(self, e: TensorEntry, seg: Segment, itemsize: int) -> np.ndarray:
        """:meth:`decoded`, in this thread."""
        key = self._key(e, seg)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        arr, work = self._plan(e, seg, itemsize)
        for w in work:
            w()
        self.cache.put(key, arr)
        return arr

    def tau_decoded(self, e: TensorEntry, jobs: Jobs) -> Future:
        """A future of τ_MTL's decoded segment as the CPU kernel takes it beside θ0 (float32 planes or
        bytes), cached as that (:meth:`_tau_ready`)."""
        if not _tau_reshaped(e):
            return self.decoded(e, e.tau, 4, jobs)
        key = (*self._key(e, e.tau), "kernel")
        hit = self.cache.get(key)
        if hit is not None:
            return done(hit)
        raw = self.decoded(e, e.tau, by_name(e.tau_dtype).itemsize, jobs, keep=False)

        def ready() -> np.ndarray:
            w = _tau_ready(e, raw.result())
            self.cache.put(key, w)
            return w
        return jobs.after([raw], ready)

    def tau_now(self, e: TensorEntry) -> np.ndarray:
        """:meth:`tau_decoded`, in this thread."""
        if not _tau_reshaped(e):
            return self.decoded_now(e, e.tau, 4)
        key = (*self._key(e, e.tau), "kernel")
        hit = self.cache.get(key)
        if hit is None:
            arr, work = self._plan(e, e.tau, by_name(e.tau_dtype).itemsize)
            for w in work:
                w()
            hit = _tau_ready(e, arr)
            self.cache.put(key, hit)
        return hit

    def tau_on_device(self, e: TensorEntry, device: torch.device | None, jobs: Jobs) -> Future:
        """A future of τ_MTL as a flat float32 tensor on ``device``, cached there (:meth:`on_device`)."""
        if e.tau_dtype == "F32":
            return self.on_device(e, e.tau, "F32", device, jobs)
        key = (*self._key(e, e.tau), "F32", str(device))
        hit = self.cache.get(key)
        if hit is not None:
            return done(hit)
        host = self.decoded(e, e.tau, 2, jobs, keep=False)

        def move() -> torch.Tensor:
            t = self.device_tensor(host.result(), e.tau_dtype, device).float()
            self.cache.put(key, t)
            return t
        return jobs.after([host], move)

    def theta0(self, e: TensorEntry) -> np.ndarray:
        """θ0 of a masked tensor: its dtype's storage, flat."""
        return flat(self.decoded_now(e, e.base, by_name(e.dtype).itemsize), e.dtype)

    def theta0_on(self, e: TensorEntry, device: torch.device) -> torch.Tensor:
        """θ0 of a masked tensor in its own dtype, flat, on ``device``."""
        return to_torch(self.theta0(e), by_name(e.dtype)).to(device)

    def tau(self, e: TensorEntry, device: torch.device | None = None) -> torch.Tensor:
        t = torch.from_numpy(_writable(flat(self.tau_now(e), "F32")))
        return t.to(device) if device is not None else t

    def all_packed(self, e: TensorEntry) -> Iterator[np.ndarray]:
        """Every task's packed mask of ``e`` in task order, τ_MTL decoded at most once for them."""
        tau = self.tau_context(e) if any(self.needs_tau(e, i) for i in range(len(self.tasks))) else None
        for i in range(len(self.tasks)):
            yield self.packed(e, i, tau)

    def residual(self, e: TensorEntry, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Task i's residual on masked tensor ``e``: (positions int64, values float32), checked (FORMAT.md
        §11), or None when it has none."""
        r = e.residual(i)
        if r is None:
            return None
        keys = self._key(e, r.positions), self._key(e, r.values)
        hit = [self.cache.get(k) for k in keys]
        if hit[0] is not None and hit[1] is not None:
            return hit[0], hit[1]
        found = self.shard(e).residual(e, r)
        for k, arr in zip(keys, found):  # kept beside θ0 and τ_MTL when it fits: a later decode reads it no more
            self.cache.put(k, arr)
        return found

    def counts(self, e: TensorEntry) -> np.ndarray:
        counts = np.zeros(e.numel, dtype=np.uint16)
        for m in self.all_packed(e):
            kernels.add_bits(counts, m, e.numel)
        return counts

    # --- task models ------------------------------------------------------------------------------
    def decode_entry(self, e: TensorEntry, i: int | None, residual: bool = True) -> torch.Tensor | None:
        """Tensor ``e`` of task i (None: θ0), or None when that checkpoint does not have it; with the
        task's residual unless ``residual=False``."""
        if e.role == "shared":
            return self.item_tensor(e, Item(e.dtype, e.shape, e.data))
        if e.role == "per_task":
            item = e.base_item if i is None else e.task_items[i]
            return None if item is None else self.item_tensor(e, item)
        d = by_name(e.dtype)
        if i is None:
            return to_torch(_writable(self.theta0(e)).reshape(e.shape), d)
        base = planes_or_flat(self.decoded_now(e, e.base, d.itemsize), e.dtype)
        tau = planes_or_flat(self.tau_now(e), "F32")
        out = empty(e.shape, e.dtype)
        kernels.decode_into(base, tau, self.packed(e, i), storage_view(out), dtype=e.dtype, check_padding=False,
                            residual=self.residual(e, i) if residual else None)
        return out

    def start_decode(self, jobs: Jobs, e: TensorEntry, i: int, device: torch.device | None,
                     out: torch.Tensor | None = None, residual: bool = True) -> Future:
        """Start decoding tensor ``e`` of task ``i``; a future of the tensor (None when the task does not
        have it). A masked tensor goes straight into ``out`` when given (a CPU tensor of its dtype and
        shape, contiguous; other tensors ignore it) and comes back on ``device``. The task's residual
        is applied unless ``residual=False``."""
        if e.role != "masked" or (e.numel < SMALL_TENSOR and out is None and not self.use_torch(device)):
            return jobs.submit(lambda: move(self.decode_entry(e, i, residual), device))  # one job: less overhead
        if self.needs_tau(e, i) and not self.use_torch(device):  # the mask waits for τ_MTL, decoded once
            tau_f = self.tau_decoded(e, jobs)
            mask = jobs.after([tau_f], lambda: self.packed(e, i, self.tau_context(e, tau_f.result())))
        else:
            mask = jobs.submit(self.packed, e, i)
        res = jobs.submit(self.residual, e, i) if residual and e.residual(i) is not None else done(None)
        if self.use_torch(device):
            ins = [self.on_device(e, e.base, e.dtype, device, jobs), self.tau_on_device(e, device, jobs), mask, res]

            def run_torch() -> torch.Tensor:
                b, t, p, rv = (f.result() for f in ins)
                packed = to_torch(p, by_name("U8")).to(device)
                r = fused.decode(b, t, packed)
                if rv is not None:  # the residual entries, recomputed from θ0 and τ_MTL: one rounding
                    pos = torch.from_numpy(rv[0]).to(device)
                    r[pos] = fused.residual_values(b, t, packed, pos, torch.from_numpy(rv[1]).to(device))
                r = r.reshape(e.shape)
                return r if out is None else out.copy_(r)
            return jobs.after(ins, run_torch)
        d = by_name(e.dtype)
        ins = [self.decoded(e, e.base, d.itemsize, jobs), self.tau_decoded(e, jobs), mask, res]
        return jobs.after(ins, lambda: self._kernel(jobs, e, *(f.result() for f in ins), device, out))

    def _kernel(self, jobs: Jobs, e: TensorEntry, base: np.ndarray, tau: np.ndarray, packed: np.ndarray,
                residual: tuple[np.ndarray, np.ndarray] | None, device: torch.device | None,
                out: torch.Tensor | None) -> Future | torch.Tensor:
        """The numba decode over ranges of the tensor (into ``out`` or a new tensor), moved to ``device``;
        the kernel adds the residual entries of each range in its own pass (one rounding)."""
        res = out if out is not None else empty(e.shape, e.dtype)
        o = storage_view(res)
        b, t = planes_or_flat(base, e.dtype), planes_or_flat(tau, "F32")

        def run(a: int, z: int) -> None:
            kernels.decode_into(b, t, packed, o, dtype=e.dtype, start=a, stop=z, check_padding=False,
                                residual=residual)
        fut = jobs.ranges(e.numel, KERNEL_STEP, run, res)
        if device is None or out is not None:
            return fut
        return jobs.after([fut], lambda: res.to(device))

    @staticmethod
    def device_tensor(arr: np.ndarray, dtype: str, device: torch.device | None) -> torch.Tensor:
        """A decoded segment (planes or bytes, possibly read-only) as a flat tensor of ``dtype`` on
        ``device``, the planes joined there."""
        d = by_name(dtype)
        if arr.ndim == 2:
            return fused.join_planes(to_torch(arr, by_name("U8")).to(device), torch_dtype(dtype))
        return to_torch(arr.view(d.storage), d).to(device)

    def iterate(self, start: StartFn, ahead_bytes: int = AHEAD_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in table order; ``start(jobs, row)`` begins a row's work (a future of its
        tensor or None) for each non-alias row, up to ``ahead_bytes`` of output ahead of what was
        yielded (and at least one row). Only alias targets are kept after they are yielded."""
        targets = {e.target for e in self.header.tensors if e.role == "alias"}
        kept: dict[str, torch.Tensor | None] = {}
        with Jobs(self.threads) as jobs:
            pending: deque[tuple[TensorEntry, Future | None, int]] = deque()
            entries = iter(self.header.tensors)
            ahead = 0
            while True:
                while not pending or ahead < ahead_bytes:
                    e = next(entries, None)
                    if e is None:
                        break
                    size = _nbytes(e)
                    pending.append((e, None if e.role == "alias" else start(jobs, e), size))
                    ahead += size
                if not pending:
                    return
                e, fut, size = pending.popleft()
                ahead -= size
                target = self.resolve(e)
                if fut is not None:
                    t = fut.result()
                elif target.name in kept:
                    t = kept[target.name]
                else:  # an alias listed before its target
                    t = start(jobs, target).result()
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
            native = self.theta0_on(e, device)
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
        if self.base is not None:
            self.base.verify()


def _plane(r: ContainerReader, seg: Segment, frame: memoryview, out: np.ndarray, k: int) -> None:
    try:
        zstd_decompress_into(frame, out, what=f"byteplane-zstd plane {k}")
    except FormatError as exc:
        raise r.segment_error(seg, exc) from None


def move(t: torch.Tensor | None, device: torch.device | None) -> torch.Tensor | None:
    """``t`` on ``device`` (None: where it is); None stays None."""
    return t.to(device) if t is not None and device is not None else t


def _nbytes(e: TensorEntry) -> int:
    """Output bytes of a row in a task model (a per-task row: its largest copy)."""
    if e.role in ("masked", "shared"):
        return e.numel * by_name(e.dtype).itemsize
    if e.role == "per_task":
        return max((it.numel * by_name(it.dtype).itemsize for it in (e.base_item, *e.task_items) if it), default=0)
    return 0


def check_masked(e: TensorEntry, path: Any, name: str) -> TensorEntry:
    if e.role != "masked":
        raise InputError(f"{path}: tensor {name!r} has role {e.role!r}; only masked tensors have masks and τ_MTL")
    return e
