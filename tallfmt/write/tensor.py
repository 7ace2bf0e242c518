"""Encoding one tensor: verbatim items (shared, per-task), or θ0, τ_MTL and one packed mask per task
(masked) with the per-task statistics of FORMAT.md §4.5.

:meth:`TensorEncoder.prepare` does all the work of a tensor — the math and the compression of its
segments — and touches no file, so several tensors are prepared at once in threads (numba and zstd
release the GIL); :meth:`TensorEncoder.write` then appends their stored bytes in table order. On the
CPU the masked math is one fused numba pass per chunk (:mod:`tallfmt.kernels.encode`); on other
devices it runs in torch (:mod:`tallfmt.compute.maskmath`). Both give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tallfmt import kernels
from tallfmt.checkpoints import Checkpoint
from tallfmt.compute import maskmath
from tallfmt.compute.tensors import to_numpy, torch_dtype
from tallfmt.errors import InputError
from tallfmt.format import codecs
from tallfmt.format.container import ContainerWriter
from tallfmt.format.dtypes import by_name
from tallfmt.format.header import BaseRef, Item, Residual, TensorEntry, checksum
from tallfmt.write.inputs import Inputs, flat
from tallfmt.write.options import EncodeOptions
from tallfmt.write.plan import TensorPlan
from tallfmt.write import residuals
from tallfmt.write import thresholds as th
from tallfmt.write.thresholds import tensor_thresholds

# Bit patterns that are NaN or ±Inf, per float dtype: (storage view, mask, value) — x & mask == value.
# F8_E4M3 (the "fn" variant) has no infinities and one NaN pattern per sign, S.1111.111.
_NON_FINITE = {"F64": (np.uint64, 0x7FF0000000000000, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000, 0x7F800000),
               "F16": (np.uint16, 0x7C00, 0x7C00), "BF16": (np.uint16, 0x7F80, 0x7F80),
               "F8_E5M2": (np.uint8, 0x7C, 0x7C), "F8_E4M3": (np.uint8, 0x7F, 0x7F)}


def nonfinite_at(raw: np.ndarray, dtype: str) -> int | None:
    """Index of the first NaN or Inf in the storage array ``raw`` of a float ``dtype``, or None (and None
    for non-float dtypes). Integer tests on the bit patterns: any float dtype, float8 included."""
    if dtype not in _NON_FINITE:
        return None
    view, mask, value = _NON_FINITE[dtype]
    bits = raw.reshape(-1).view(view)
    bad = np.flatnonzero((bits & view(mask)) == view(value))
    return int(bad[0]) if bad.size else None


@dataclass
class Prepared:
    """A tensor ready to be appended: its row's fields and each segment as stored bytes, in table order."""

    plan: TensorPlan
    items: list[tuple[str, tuple[int, ...]] | None] = field(default_factory=list)  # per_task: base, then tasks
    stored: list[tuple[list, int, str] | BaseRef] = field(default_factory=list)    # (parts, decoded length, codec)
    stats: np.ndarray | None = None                                                # masked: float64 [T, 5]
    residuals: list[tuple[int, str] | None] = field(default_factory=list)         # masked: per task (count, dtype)
    residual_sums: list[tuple[float, int]] = field(default_factory=list)           # per task (ΔΣ err², entries)


class TensorEncoder:
    """Prepares and writes the tensors of one archive (or shard) and keeps the per-task statistics of its
    masked ones. ``thresholds`` maps "ties" / "magnitude" to the global per-task thresholds (float32, one
    per task) when that step has a global scope."""

    def __init__(self, inputs: Inputs, opts: EncodeOptions, thresholds: dict[str, torch.Tensor | None]) -> None:
        self.inputs, self.opts = inputs, opts
        self.device = torch.device(opts.device)
        self.thresholds = {k: (v.to(self.device) if v is not None else None) for k, v in thresholds.items()}
        self.stats = [maskmath.TaskStats() for _ in inputs.cks]
        self.lambdas = [opts.lambdas.get(t) for t in inputs.tasks]
        self.sources = [ck.source for ck in inputs.all]

    # --- preparing (thread-safe) -------------------------------------------------------------------
    def prepare(self, p: TensorPlan) -> Prepared:
        """All the work of one tensor, its mapped input pages released afterwards."""
        try:
            out = Prepared(p)
            if p.role == "per_task":
                inputs = self.inputs
                holders = [inputs.base if p.name in inputs.base_names else None]
                holders += [ck if p.name in names else None for ck, names in zip(inputs.cks, inputs.task_name_sets)]
                for ck in holders:
                    out.items.append(None if ck is None else self._item(out, ck, p.name))
            elif p.role in ("shared", "masked"):
                self._item(out, self.inputs.base, p.name, check=p.role == "shared")
                if p.role == "masked":
                    self._masked(out, p)
            return out
        finally:
            self.inputs.release(p.name)

    def _store(self, out: Prepared, data: np.ndarray, itemsize: int, codec: str | None = None,
               context: np.ndarray | None = None) -> None:
        codec = codec if codec is not None else codecs.choose(self.opts.codec, itemsize)
        view = codecs.as_bytes(data)
        out.stored.append((codecs.encode_parts(codec, view, itemsize, context), len(view), codec))

    def _item(self, out: Prepared, ck: Checkpoint, name: str, check: bool = True) -> tuple[str, tuple[int, ...]]:
        dt, shape = ck.info(name)
        raw = to_numpy(flat(ck, name))
        if check:
            at = nonfinite_at(raw, dt)
            if at is not None:
                raise InputError(f"{ck.source}: tensor {name!r} holds NaN or Inf values (first at element {at})")
        if ck is self.inputs.base and not self.opts.store_base:  # θ0 stays outside: its length and checksum
            view = codecs.as_bytes(raw)
            out.stored.append(BaseRef(len(view), checksum(view)))
        else:
            self._store(out, raw, by_name(dt).itemsize)
        return dt, tuple(shape)

    def masked_math(self, p: TensorPlan) -> tuple[np.ndarray, Sequence[np.ndarray], np.ndarray]:
        """τ_MTL (float32[n]), the T packed masks and the statistics [T, 5] of a masked tensor, on this
        encoder's device (the fused kernel on the CPU, torch elsewhere: the same bits)."""
        o = self.opts
        ties_thr, mag_thr = self.thresholds.get("ties"), self.thresholds.get("magnitude")
        if o.merge == "ties" and o.ties_scope == "per_tensor":
            ties_thr = tensor_thresholds(self.inputs, p, o.ties_density, self.device, o.chunk_size)
        if o.mask_method == "magnitude" and o.mask_scope == "per_tensor":
            mag_thr = tensor_thresholds(self.inputs, p, o.mask_density, self.device, o.chunk_size)
        masked = self._fused if th.fused_on(self.device) else self._torch
        return masked(p, ties_thr, mag_thr)

    def _masked(self, out: Prepared, p: TensorPlan) -> None:
        tau, masks, stats = self.masked_math(p)
        if self.opts.tau_dtype == "BF16":  # already rounded: the top 16 bits are the bfloat16 (FORMAT.md §4.2)
            self._store(out, (tau.view(np.uint32) >> 16).astype(np.uint16), 2)
        else:
            self._store(out, tau, 4)
        mask_codec = codecs.choose_mask(self.opts.mask_codec, self.opts.codec)
        context = tau if codecs.context_of(mask_codec) == "tau" else None  # τ_MTL exactly as stored (F32)
        for m in masks:
            self._store(out, m, 1, mask_codec, context)
        out.stats = stats
        limits = self.thresholds.get("residual")
        if limits is None:
            return
        found = residuals.select(self.inputs, p, tau, masks, limits.tolist(), self.opts.chunk_size, self.sources)
        for t, r in enumerate(found):
            out.residuals.append(None if r is None else (r.count, residuals.VALUE_DTYPE))
            if r is not None:
                self._store(out, r.gaps, r.gaps.dtype.itemsize)
                self._store(out, r.values, 2)
            out.residual_sums.append((r.delta_err2, r.count) if r is not None else (0.0, 0))

    def _fused(self, p: TensorPlan, ties_thr: torch.Tensor | None, mag_thr: torch.Tensor | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """τ_MTL, masks [T, ⌈n/8⌉] and statistics [T, 5] in one numba pass per chunk."""
        o, n = self.opts, p.numel
        spec = kernels.EncodeSpec(
            merge=o.merge, mask=o.mask_method, ties_agg=o.ties_agg, zero_tau_clears_mask=True, tau_dtype=o.tau_dtype,
            lambdas=self.lambdas if o.mask_method == "tall" else None,
            mask_thresholds=mag_thr.tolist() if mag_thr is not None else None,
            ties_thresholds=ties_thr.tolist() if ties_thr is not None else None)
        inputs = kernels.TensorInputs(p.dtype, to_numpy(flat(self.inputs.base, p.name)),
                                      [to_numpy(flat(ck, p.name)) for ck in self.inputs.cks])
        res = kernels.EncodeOutputs(n, len(self.inputs.cks))
        for s in range(0, n, o.chunk_size):
            kernels.encode_chunk(spec, inputs, res, s, min(n, s + o.chunk_size))
        problem = kernels.describe_problems(res.problems, p.name, self.sources)
        if problem is not None:
            raise InputError(problem)
        return res.tau, res.masks, res.stats

    def _torch(self, p: TensorPlan, ties_thr: torch.Tensor | None, mag_thr: torch.Tensor | None
               ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """The same on a torch device, chunk by chunk; the statistics then in one CPU pass per task."""
        o, dev, chunk, n = self.opts, self.device, self.opts.chunk_size, p.numel
        b = flat(self.inputs.base, p.name)
        flats = [flat(ck, p.name) for ck in self.inputs.cks]
        tau_out = np.empty(n, dtype=np.float32)
        packed = [np.empty((n + 7) // 8, dtype=np.uint8) for _ in flats]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            theta0 = b[s:e].to(dev, dtype=torch.float32)
            thetas = [f[s:e].to(dev, dtype=torch.float32) for f in flats]
            self._check_inputs(p.name, [theta0, *thetas])
            taus = [maskmath.task_vector(x, theta0) for x in thetas]
            if o.merge == "ties":
                tau_mtl = maskmath.ties_merge(taus, ties_thr, agg=o.ties_agg)
            else:
                tau_mtl = maskmath.task_arithmetic(taus)
            self._check_overflow(p.name, taus, tau_mtl)
            if o.tau_dtype == "BF16":  # the stored τ_MTL, which the masks and the decode use
                tau_mtl = tau_mtl.to(torch.bfloat16).float()
                self._check_overflow(p.name, [], tau_mtl)
            decoded = (theta0 + tau_mtl).to(torch_dtype(p.dtype))
            for t in range(len(flats)):
                if o.mask_method == "tall":
                    m = maskmath.tall_mask(taus[t], tau_mtl, self.lambdas[t])
                else:
                    m = maskmath.magnitude_mask(taus[t], mag_thr[t])
                m &= tau_mtl != 0  # a bit where τ_MTL = 0 changes no value: stored as 0 (FORMAT.md §4.3)
                if not bool(torch.isfinite(decoded[m]).all()):
                    raise InputError(f"{self.sources[1 + t]}: tensor {p.name!r}: a decoded value θ0 + τ_MTL "
                                     f"overflows the tensor's dtype")
                kernels.pack_bits_into(m.to("cpu").numpy(), packed[t][s // 8:(e + 7) // 8])
            tau_out[s:e] = tau_mtl.to("cpu").numpy()
        # sequential in element order over the whole tensor (b and flats are views, no copy), so the sums
        # do not depend on chunk_size (FORMAT.md §4.5)
        theta0_st = to_numpy(b)
        stats = np.zeros((len(flats), 5))
        for t in range(len(flats)):
            kernels.mask_stats(theta0_st, to_numpy(flats[t]), tau_out, packed[t], stats[t], dtype=p.dtype)
        return tau_out, packed, stats

    def _check_inputs(self, name: str, chunks: list[torch.Tensor]) -> None:
        for src, x in zip(self.sources, chunks):
            if not bool(torch.isfinite(x).all()):
                raise InputError(f"{src}: tensor {name!r} holds NaN or Inf values")

    def _check_overflow(self, name: str, taus: list[torch.Tensor], tau_mtl: torch.Tensor) -> None:
        """What the fused kernel flags, in its order: a τ_t, then τ_MTL, overflowing float32 (a decoded value
        that overflows the tensor's dtype is checked where the task's mask keeps it)."""
        for src, tau in zip(self.sources[1:], taus):
            if not bool(torch.isfinite(tau).all()):
                raise InputError(f"{src}: tensor {name!r}: its task vector θ_t − θ0 overflows float32")
        if not bool(torch.isfinite(tau_mtl).all()):
            raise InputError(f"{self.sources[0]}: tensor {name!r}: the merged task vector τ_MTL overflows float32")

    # --- writing (one thread, table order) -------------------------------------------------------------
    def write(self, writer: ContainerWriter, prep: Prepared) -> TensorEntry:
        """Append a prepared tensor's segments; returns its row. Statistics are added here, in table order."""
        p = prep.plan
        segs = [s if isinstance(s, BaseRef) else writer.write_stored(*s) for s in prep.stored]
        if p.role == "alias":
            return TensorEntry(p.name, "alias", target=p.target)
        if p.role == "per_task":
            it = iter(segs)
            items = [None if meta is None else Item(meta[0], meta[1], next(it)) for meta in prep.items]
            return TensorEntry(p.name, "per_task", base_item=items[0], task_items=tuple(items[1:]))
        if p.role == "shared":
            return TensorEntry(p.name, "shared", p.dtype, p.shape, data=segs[0])
        for t, s in enumerate(self.stats):
            s.add(prep.stats[t], p.numel)
            if prep.residual_sums:
                s.add_residual(*prep.residual_sums[t])
        nt = len(self.stats)
        rest = iter(segs[2 + nt:])
        found = tuple(None if r is None else Residual(r[0], r[1], next(rest), next(rest)) for r in prep.residuals)
        return TensorEntry(p.name, "masked", p.dtype, p.shape, base=segs[0], tau=segs[1], masks=tuple(segs[2:2 + nt]),
                           residuals=found if any(r is not None for r in found) else ())

