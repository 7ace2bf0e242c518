"""Per-task sparse residuals at encode time (FORMAT.md §11): which entries of d_t = τ_t − m_t∘τ_MTL a
task stores, exactly and streaming.

With a budget of k_t entries (:meth:`~tallfmt.write.options.EncodeOptions.residual_count`), task t
keeps the entries with |d_t| ≥ v_t, v_t the k_t-th largest nonzero |d_t| over all masked tensors of
the archive (every shard) — ties at v_t kept, as the TIES trim keeps them (§4.2). v_t is found by a
radix select on the float32 bits, as :mod:`tallfmt.write.thresholds` finds the TIES thresholds: one
read of the masked tensors counts the top 16 bits of |d_t| per task (:func:`scan`, which also decides
the roles nothing decided yet), a second counts the low 16 bits inside the chosen bin; the counts are
integers, so shards and workers add them up exactly. The encode pass then selects, tensor by tensor,
the entries at or above v_t (:func:`select`). An encode with residuals therefore reads its inputs two
more times than one without. Memory: two (T, 65536) int64 histograms, and per tensor in flight its
entries (at most T × its size).

d_t is float32, computed from the same τ_MTL and mask bits the archive stores (on the CPU, whichever
device made them), so the fused and the torch paths give the same residuals byte for byte.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tallfmt import kernels
from tallfmt.compute.tensors import to_numpy
from tallfmt.errors import InputError
from tallfmt.format.residual import positions_to_gaps
from tallfmt.write.inputs import Inputs, flat
from tallfmt.write.options import RESIDUAL_DTYPE, EncodeOptions
from tallfmt.write.plan import COMMON, TensorPlan, decide_role
from tallfmt.write.thresholds import HI, from_top

VALUE_DTYPE = RESIDUAL_DTYPE
_ABS = np.uint32(0x7FFFFFFF)


def as_f32(storage: np.ndarray, dtype: str) -> np.ndarray:
    """A masked tensor's storage (F32, F16, BF16 bits) widened exactly to float32."""
    if dtype == "BF16":
        return (storage.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return storage.astype(np.float32, copy=False)


def differences(inputs: Inputs, p: TensorPlan, tau: np.ndarray, packed: np.ndarray, t: int, s: int, e: int
                ) -> np.ndarray:
    """d_t = τ_t − m_t∘τ_MTL of elements [s, e) (s a multiple of 8), float32: τ_t = float32(θ_t) −
    float32(θ0) (FORMAT.md §4.1) minus τ_MTL where the task's bit is set."""
    theta0 = as_f32(to_numpy(flat(inputs.base, p.name)[s:e]), p.dtype)
    tau_t = as_f32(to_numpy(flat(inputs.cks[t], p.name)[s:e]), p.dtype) - theta0
    bits = kernels.unpack_bits(np.ascontiguousarray(packed[s // 8:(e + 7) // 8]), e - s, check_padding=False)
    return tau_t - np.where(bits, tau[s:e], np.float32(0))


@dataclass
class Scan:
    """One shard's residual histograms: roles decided on the way, and per task the counts of the nonzero
    |d_t| by their top 16 bits (``bins`` None) or by their low 16 bits inside bin ``bins[t]``."""

    roles: list[str]
    hist: np.ndarray   # (T, 65536) int64
    masked: int        # elements of the shard's masked tensors


def scan(inputs: Inputs, plans: Sequence[TensorPlan], enc: Any, opts: EncodeOptions,
         bins: Sequence[int] | None = None, progress: Callable[[int], None] | None = None) -> Scan:
    """Count |d_t| of the masked tensors into per-task histograms, reading each tensor once; ``enc``
    (a :class:`~tallfmt.write.tensor.TensorEncoder` of the final thresholds) makes τ_MTL and the masks."""
    nt = len(inputs.cks)
    hist = np.zeros((nt, HI), dtype=np.int64)
    roles, masked = [], 0
    for p in plans:
        role = p.role
        if role == COMMON:
            role = decide_role(inputs, p, opts.per_task)
        roles.append(role)
        if role == "masked":
            p = p.with_role(role)
            tau, masks, _ = enc.masked_math(p)
            for s in range(0, p.numel, opts.chunk_size):
                e = min(p.numel, s + opts.chunk_size)
                for t in range(nt):
                    a = differences(inputs, p, tau, masks[t], t, s, e).view(np.uint32) & _ABS
                    a = a[a != 0]
                    if bins is None:
                        hist[t] += np.bincount(a >> np.uint32(16), minlength=HI)
                    else:
                        inside = a[(a >> np.uint32(16)) == np.uint32(bins[t])]
                        hist[t] += np.bincount(inside & np.uint32(0xFFFF), minlength=HI)
            masked += p.numel
            inputs.release(p.name)
        if progress is not None:
            progress(inputs.tensor_bytes(p.name))
    return Scan(roles, hist, masked)


def first_bins(hi: np.ndarray, counts: Sequence[int]) -> list[tuple[int, int] | None]:
    """Per task, (the top-16-bit bin of its k-th largest nonzero |d_t|, entries above that bin), or None
    where it keeps nothing (k = 0, or no nonzero difference); k is capped at the nonzero count."""
    out: list[tuple[int, int] | None] = []
    for t, k in enumerate(counts):
        k = min(k, int(hi[t].sum()))
        out.append(from_top(hi[t], k) if k > 0 else None)
    return out


def thresholds(bins: Sequence[tuple[int, int] | None], lo: np.ndarray, hi: np.ndarray, counts: Sequence[int]
               ) -> list[float]:
    """v_t per task from both histograms (+inf where nothing is kept): the exact k-th largest |d_t|."""
    out = []
    for t, b in enumerate(bins):
        if b is None:
            out.append(math.inf)
            continue
        k = min(counts[t], int(hi[t].sum()))
        low, _ = from_top(lo[t], k - b[1])
        out.append(struct.unpack("<f", struct.pack("<I", (b[0] << 16) | low))[0])
    return out


@dataclass
class Entries:
    """One task's residual on one tensor: the stored gaps and bfloat16 bits, and what it changes in the
    task's squared error (for the statistics, FORMAT.md §4.5)."""

    count: int
    gaps: np.ndarray          # u32 or u64, little-endian
    values: np.ndarray        # bfloat16 bits, uint16
    delta_err2: float         # Σ over the entries, in element order, of (θ̂ − θ)² with minus without them


def select(inputs: Inputs, p: TensorPlan, tau: np.ndarray, masks: Sequence[np.ndarray], limits: Sequence[float],
           chunk: int, sources: Sequence[str]) -> list[Entries | None]:
    """Per task, the entries of one masked tensor with d_t ≠ 0 and |d_t| ≥ its limit (+inf: none), their
    values rounded to bfloat16 (to nearest even; an entry whose value rounds to zero is left out)."""
    out: list[Entries | None] = []
    n = p.numel
    base = to_numpy(flat(inputs.base, p.name))
    for t, v in enumerate(limits):
        if not math.isfinite(v):
            out.append(None)
            continue
        pos_parts, val_parts = [], []
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            d = differences(inputs, p, tau, masks[t], t, s, e)
            keep = np.flatnonzero((np.abs(d) >= np.float32(v)) & (d != 0))
            pos_parts.append(keep + s)
            val_parts.append(d[keep])
        pos = np.concatenate(pos_parts) if pos_parts else np.zeros(0, np.int64)
        d = np.concatenate(val_parts) if val_parts else np.zeros(0, np.float32)
        bf = torch.from_numpy(d).to(torch.bfloat16)
        if not bool(torch.isfinite(bf).all()):
            raise InputError(f"{sources[1 + t]}: tensor {p.name!r}: a residual value τ_t − m_t∘τ_MTL overflows "
                             f"bfloat16")
        nonzero = (bf != 0).numpy()
        pos, bits = pos[nonzero], bf[torch.from_numpy(nonzero)].view(torch.int16).numpy().view(np.uint16)
        if pos.shape[0] == 0:
            out.append(None)
            continue
        r = as_f32(bits, "BF16")
        before = kernels.residual_values(base, tau, masks[t], pos, np.zeros_like(r), dtype=p.dtype)
        after = kernels.residual_values(base, tau, masks[t], pos, r, dtype=p.dtype)
        after_f = as_f32(after, p.dtype)
        if not bool(np.isfinite(after_f).all()):
            raise InputError(f"{sources[1 + t]}: tensor {p.name!r}: a decoded value θ0 + m_t∘τ_MTL + r_t overflows "
                             f"the tensor's dtype")
        theta = as_f32(to_numpy(flat(inputs.cks[t], p.name))[pos], p.dtype).astype(np.float64)
        terms = (after_f.astype(np.float64) - theta) ** 2 - (as_f32(before, p.dtype).astype(np.float64) - theta) ** 2
        out.append(Entries(int(pos.shape[0]), positions_to_gaps(pos, n), bits, float(np.cumsum(terms)[-1])))
    return out
