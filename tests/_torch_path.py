"""The torch encode path for one masked tensor, as the encoder ran it before the fused kernel (and runs it
on non-CPU devices): per chunk, torch task vectors → task_arithmetic or ties_merge → tall_mask or
magnitude_mask → pack_bits_into, with the codec's NaN/Inf probe; then one kernels.mask_stats pass per task
over the whole tensor. The tests compare the fused kernel with it bit for bit; the benchmark times it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tallfmt import kernels
from tallfmt.compute import maskmath
from tallfmt.compute.tensors import to_torch
from tallfmt.format import dtypes
from tallfmt.errors import InputError


def encode_masked(dtype: str, base: np.ndarray, thetas: Sequence[np.ndarray], chunk: int, *,
                  merge: str = "task_arithmetic", ties_agg: str = "sum", ties_thr: Sequence[float] | None = None,
                  mask: str = "tall", lambdas: Sequence[float] | None = None,
                  mask_thr: Sequence[float] | None = None, zero_tau_clears_mask: bool = False
                  ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(τ_MTL, packed masks, stats T×5) for flat storage arrays ``base`` and ``thetas`` of ``dtype``.

    Thresholds travel as float32 tensors, as the codec passes its global ones. ``zero_tau_clears_mask``
    models the planned format change (mask bit cleared where τ_MTL == 0) on top of today's masks.
    """
    d = dtypes.by_name(dtype)
    b = to_torch(base, d)
    flats = [to_torch(f, d) for f in thetas]
    n, nt = b.numel(), len(flats)
    ties_t = None if ties_thr is None else torch.tensor(list(ties_thr), dtype=torch.float32)
    mag_t = None if mask_thr is None else torch.tensor(list(mask_thr), dtype=torch.float32)
    tau_out = np.empty(n, dtype=np.float32)
    packed = [np.empty((n + 7) // 8, dtype=np.uint8) for _ in range(nt)]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        theta0 = b[s:e].to(dtype=torch.float32)
        taus = [maskmath.task_vector(f[s:e].to(dtype=torch.float32), theta0) for f in flats]
        if merge == "ties":
            tau_mtl = maskmath.ties_merge(taus, ties_t, agg=ties_agg)
            probe = maskmath.task_arithmetic(taus)
        else:
            tau_mtl = probe = maskmath.task_arithmetic(taus)
        if not bool(torch.isfinite(probe.sum())):  # the codec's NaN/Inf check (_check_chunk)
            raise InputError("NaN or Inf in an input (or an overflowing sum)")
        for t in range(nt):
            if mask == "tall":
                m = maskmath.tall_mask(taus[t], tau_mtl, lambdas[t])
            else:
                m = maskmath.magnitude_mask(taus[t], mag_t[t])
            if zero_tau_clears_mask:
                m &= tau_mtl != 0
            kernels.pack_bits_into(m.numpy(), packed[t][s // 8:(e + 7) // 8])
        tau_out[s:e] = tau_mtl.numpy()
    stats = np.zeros((nt, 5))
    for t in range(nt):
        kernels.mask_stats(base, thetas[t], tau_out, packed[t], stats[t], dtype=dtype)
    return tau_out, packed, stats
