"""Encoding one tensor into an open archive: verbatim items (shared, per-task), or θ0, τ_MTL and one
packed mask per task (masked), chunk by chunk, with the per-task statistics of FORMAT.md §4.4."""

from __future__ import annotations

import math

import numpy as np
import torch

from tallfmt import kernels
from tallfmt.checkpoints import Checkpoint
from tallfmt.compute import maskmath
from tallfmt.compute.tensors import to_numpy
from tallfmt.errors import InputError
from tallfmt.format import codecs
from tallfmt.format.container import ContainerWriter
from tallfmt.format.dtypes import by_name
from tallfmt.format.header import Item, TensorEntry
from tallfmt.write.inputs import Inputs, flat
from tallfmt.write.options import EncodeOptions
from tallfmt.write.plan import TensorPlan
from tallfmt.write.thresholds import tensor_thresholds


class TensorEncoder:
    """Writes tensors of one archive (or shard) and keeps the per-task statistics of its masked ones.

    ``thresholds`` maps "ties" / "magnitude" to the global per-task thresholds (float32, one per task)
    when that step has a global scope.
    """

    def __init__(self, inputs: Inputs, opts: EncodeOptions, thresholds: dict[str, torch.Tensor | None]) -> None:
        self.inputs, self.opts = inputs, opts
        self.device = torch.device(opts.device)
        self.thresholds = {k: (v.to(self.device) if v is not None else None) for k, v in thresholds.items()}
        self.stats = [maskmath.TaskStats() for _ in inputs.cks]
        self.lambdas = [opts.lambdas.get(t) for t in inputs.tasks]

    def write(self, writer: ContainerWriter, plan: TensorPlan) -> TensorEntry:
        """The tensor's row, its segments written; its mapped input pages are released afterwards."""
        try:
            return self._write(writer, plan)
        finally:
            self.inputs.release(plan.name)

    def _write(self, writer: ContainerWriter, p: TensorPlan) -> TensorEntry:
        inputs = self.inputs
        if p.role == "alias":
            return TensorEntry(p.name, "alias", target=p.target)
        if p.role == "per_task":
            base_item = self._item(writer, inputs.base, p.name) if p.name in inputs.base_names else None
            items = tuple(self._item(writer, ck, p.name) if p.name in names else None
                          for ck, names in zip(inputs.cks, inputs.task_name_sets))
            return TensorEntry(p.name, "per_task", base_item=base_item, task_items=items)
        item = self._item(writer, inputs.base, p.name, check=p.role == "shared")
        if p.role == "shared":
            return TensorEntry(p.name, "shared", item.dtype, item.shape, data=item.data)
        tau, packed = self._masked(p)
        tau_seg = writer.write_segment(tau, codecs.choose(self.opts.codec, 4), 4)
        mask_codec = codecs.choose(self.opts.codec, 1)
        masks = tuple(writer.write_segment(m, mask_codec, 1) for m in packed)
        return TensorEntry(p.name, "masked", item.dtype, item.shape, base=item.data, tau=tau_seg, masks=masks)

    def _item(self, writer: ContainerWriter, ck: Checkpoint, name: str, check: bool = True) -> Item:
        if check:
            self._check_finite(ck, name)
        dt, shape = ck.info(name)
        d = by_name(dt)
        arr = to_numpy(ck.get(name).contiguous())
        return Item(dt, tuple(shape), writer.write_segment(arr, codecs.choose(self.opts.codec, d.itemsize), d.itemsize))

    def _chunks(self, n: int) -> range:
        return range(0, n, self.opts.chunk_size)

    def _check_finite(self, ck: Checkpoint, name: str) -> None:
        x = flat(ck, name)
        if not x.dtype.is_floating_point:
            return
        for s in self._chunks(x.numel()):
            if not bool(torch.isfinite(x[s:s + self.opts.chunk_size]).all()):
                raise InputError(f"{ck.source}: tensor {name!r} holds NaN or Inf values")

    def _check_chunk(self, probe: torch.Tensor, inputs: list[torch.Tensor], name: str) -> None:
        """NaN/Inf check at the cost of one reduction: any NaN or Inf in θ0 or a θ_t makes Σ_t τ_t
        non-finite. Only then is each input checked, to name the culprit (a merely overflowing sum
        of finite values passes)."""
        if bool(torch.isfinite(probe.sum())):
            return
        for ck, x in zip(self.inputs.all, inputs):
            if not bool(torch.isfinite(x).all()):
                raise InputError(f"{ck.source}: tensor {name!r} holds NaN or Inf values")

    def _masked(self, p: TensorPlan) -> tuple[np.ndarray, list[np.ndarray]]:
        """τ_MTL (float32) and one packed mask per task for one tensor, chunk by chunk."""
        o, dev, chunk = self.opts, self.device, self.opts.chunk_size
        n = math.prod(p.shape)
        ties_thr, mag_thr = self.thresholds.get("ties"), self.thresholds.get("magnitude")
        if o.merge == "ties" and o.ties_scope == "per_tensor":
            ties_thr = tensor_thresholds(self.inputs, p, o.ties_density, dev, chunk)
        if o.mask_method == "magnitude" and o.mask_scope == "per_tensor":
            mag_thr = tensor_thresholds(self.inputs, p, o.mask_density, dev, chunk)
        b = flat(self.inputs.base, p.name)
        flats = [flat(ck, p.name) for ck in self.inputs.cks]
        tau_out = np.empty(n, dtype=np.float32)
        packed = [np.empty((n + 7) // 8, dtype=np.uint8) for _ in flats]
        for s in self._chunks(n):
            e = min(n, s + chunk)
            theta0 = b[s:e].to(dev, dtype=torch.float32)
            thetas = [f[s:e].to(dev, dtype=torch.float32) for f in flats]
            taus = [maskmath.task_vector(th, theta0) for th in thetas]
            if o.merge == "ties":
                tau_mtl = maskmath.ties_merge(taus, ties_thr, agg=o.ties_agg)
                self._check_chunk(maskmath.task_arithmetic(taus), [theta0, *thetas], p.name)
            else:
                tau_mtl = maskmath.task_arithmetic(taus)
                self._check_chunk(tau_mtl, [theta0, *thetas], p.name)
            for t in range(len(flats)):
                if o.mask_method == "tall":
                    m = maskmath.tall_mask(taus[t], tau_mtl, self.lambdas[t])
                else:
                    m = maskmath.magnitude_mask(taus[t], mag_thr[t])
                kernels.pack_bits_into(m.to("cpu").numpy(), packed[t][s // 8:(e + 7) // 8])
            tau_out[s:e] = tau_mtl.to("cpu").numpy()
        # What users lose, measured on θ̂ exactly as decode will produce it: one sequential pass over the
        # whole tensor (b and flats are views, no copy), so the sums — and the header — do not depend
        # on chunk_size (FORMAT.md §4.4: sequential in element order, tensor by tensor).
        theta0_st = to_numpy(b)
        for t in range(len(flats)):
            sums = np.zeros(5)
            kernels.mask_stats(theta0_st, to_numpy(flats[t]), tau_out, packed[t], sums, dtype=p.dtype)
            self.stats[t].add(sums, n)
        return tau_out, packed
