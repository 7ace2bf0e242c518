"""The mask math of TALL-masks in torch: task vectors, TALL / magnitude / consensus masks, an exact
streaming top-k threshold, TIES, task arithmetic, merges and encode-time statistics.

Rules every function here keeps:

* Device-agnostic: results live on the device of the inputs; nothing is copied to the host except
  a handful of scalars (`.item()`) where a Python number is the result.
* Chunk-friendly: callers stream each tensor in flat 1-D chunks. Every element-wise function gives
  the same bits whatever the chunking; the accumulators (`TopKThreshold`, `TaskStats`) take chunks
  in any split and any order (the threshold is exact; the float64 statistics agree to rounding).
* float32 math. float16 / bfloat16 inputs are widened to float32 exactly; float64 and non-float
  inputs raise `InputError` (narrowing them here would be a hidden extra rounding).
* Python scalars (λ, α, thresholds) are rounded to float32 once, up front, so every product and
  comparison is a float32 operation on float32 operands, the same on every device and torch build.
* No file I/O.
"""

from __future__ import annotations

import math
import struct
from typing import Sequence

import torch
from torch import Tensor

from tallfmt.errors import InputError, check_count
from tallfmt.format import header

__all__ = [
    "task_vector",
    "tall_mask",
    "magnitude_mask",
    "topk_count",
    "topk_threshold_dense",
    "TopKThreshold",
    "task_arithmetic",
    "ties_merge",
    "mask_counts",
    "consensus_mask",
    "agreement_histogram",
    "merge_chunk",
    "TaskStats",
]

_WIDEN_EXACTLY = (torch.float16, torch.bfloat16)
_NBINS = 1 << 16


def _f32(x: object, name: str) -> Tensor:
    """`x` as a float32 tensor: float32 as is, float16/bfloat16 widened (exact), anything else refused."""
    if not isinstance(x, Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.float32:
        return x
    if x.dtype in _WIDEN_EXACTLY:
        return x.float()
    raise InputError(f"{name}: expected float32 (or float16/bfloat16), got {x.dtype}")


def _bool(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dtype != torch.bool:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"{name}: expected a torch.bool tensor, got {got}")
    return x


def _same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise InputError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def _real(value: object, name: str) -> float:
    """A real number as a Python float: ints, floats, numpy scalars, one-element tensors; not bool/str."""
    if isinstance(value, (bool, str, bytes)):
        raise InputError(f"{name}: expected a real number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{name}: expected a real number, got {type(value).__name__}") from None


def _float32_scalar(value: object, name: str, *, allow_inf: bool = False) -> float:
    """`value` rounded to the nearest float32 (round-half-even), returned as a Python float."""
    v = _real(value, name)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise InputError(f"{name}: expected a finite number, got {v}")
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    except OverflowError:
        raise InputError(f"{name}: {v} does not fit in float32") from None




def task_vector(theta_t: Tensor, theta0: Tensor) -> Tensor:
    """τ_t = θ_t − θ0 in float32: `theta_t.float() - theta0.float()`.

    Inputs may be float32, float16 or bfloat16 (widening is exact), so the one rounding is the single
    float32 subtraction. float64 and non-float tensors raise InputError.

    >>> task_vector(torch.tensor([1.5, 2.0]), torch.tensor([1.0, 2.0]))
    tensor([0.5000, 0.0000])
    """
    a = _f32(theta_t, "theta_t")
    b = _f32(theta0, "theta0")
    _same_shape("theta_t", a, "theta0", b)
    return a - b


def tall_mask(tau_t: Tensor, tau_mtl: Tensor, lam: float) -> Tensor:
    """TALL mask (paper eq. 5): m_t = 1{|τ_t| >= λ·|τ_MTL − τ_t|}.

    Exact float32 operation order: λ32 = float32(λ); d = τ_MTL − τ_t; r = λ32 · |d|; m = |τ_t| >= r,
    each step rounded to float32. We use `>=` where the paper's code uses strict `>`, so a task alone
    in its collection (τ_MTL = τ_t, d = 0) keeps every entry, including τ_t = 0. λ must be finite,
    >= 0 and fit in float32.

    >>> tall_mask(torch.tensor([1.0, 0.1]), torch.tensor([1.5, 2.0]), 0.5)
    tensor([ True, False])
    """
    t = _f32(tau_t, "tau_t")
    mtl = _f32(tau_mtl, "tau_mtl")
    _same_shape("tau_t", t, "tau_mtl", mtl)
    lam32 = _float32_scalar(lam, "lam")
    if lam32 < 0:
        raise InputError(f"lam: must be >= 0, got {lam}")
    r = (mtl - t).abs_().mul_(lam32)
    return t.abs() >= r


def magnitude_mask(tau_t: Tensor, threshold: float | Tensor) -> Tensor:
    """Magnitude mask (the paper's baseline): 1{|τ_t| >= threshold}, compared in float32.

    `threshold` comes from `TopKThreshold` run with the task's own density (+inf keeps nothing).

    >>> magnitude_mask(torch.tensor([-3.0, 1.0, 2.0]), 2.0)
    tensor([ True, False,  True])
    """
    t = _f32(tau_t, "tau_t")
    return t.abs() >= _threshold_operand(threshold, "threshold")


def _threshold_operand(threshold: object, name: str) -> float | Tensor:
    if isinstance(threshold, Tensor):
        if threshold.numel() != 1:
            raise InputError(f"{name}: expected one value, got shape {tuple(threshold.shape)}")
        return _f32(threshold, name).reshape(())
    return _float32_scalar(threshold, name, allow_inf=True)


# ---------------------------------------------------------------------------------------------
# Exact top-k threshold
# ---------------------------------------------------------------------------------------------


def topk_count(total: int, density: float) -> int:
    """k = ceil(density · total), the number of entries a top-k trim keeps (before ties).

    `density` is read as the shortest decimal that round-trips the float (its `repr`) and the product
    is exact, so 0.07 · 100 gives 7 (`math.ceil(0.07 * 100)` gives 8, and the float's exact binary
    value 0.1000000000000000055… would make 0.1 · 10 give 2). density must be in [0, 1].

    >>> topk_count(100, 0.07), topk_count(10, 0.1), topk_count(3, 0.5), topk_count(5, 0.0)
    (7, 1, 2, 0)
    """
    n = check_count(total, "total")
    d = _real(density, "density")
    if not 0.0 <= d <= 1.0:
        raise InputError(f"density: must be in [0, 1], got {density}")
    return header.topk_count(n, d)  # the rule readers check the index's thresholds with


def topk_threshold_dense(x: Tensor, density: float) -> float:
    """Reference for `TopKThreshold`: sort all of |x| and take the k-th largest (k = topk_count).

    Returns +inf when k == 0. Holds the whole tensor; tests use it, the codec does not.

    >>> topk_threshold_dense(torch.tensor([0.5, -3.0, 2.0, 1.0]), 0.5)
    2.0
    """
    a = _f32(x, "x").reshape(-1).abs()
    k = topk_count(a.numel(), density)
    if k == 0:
        return math.inf
    return float(torch.sort(a, descending=True).values[k - 1].item())


def _bits_to_float32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


class TopKThreshold:
    """Exact k-th largest |x| over a stream of chunks, by a two-pass radix select on float32 bits.

    Rule: k = topk_count(total, density) = ceil(density · total). The threshold v is the k-th largest
    |x| over all `total` entries; every entry with |x| >= v is kept, so ties at v are all kept and
    `kept` may exceed k. k == 0 (density 0 or total 0) keeps nothing: v = +inf.

    How: for a non-negative float32 the int32 bit pattern orders like the value (−0 counts as +0).
    Pass 1 (`update_hi`) histograms the top 16 bits of |x| into 65536 bins; `finish_hi` picks the bin
    B holding the k-th largest. Pass 2 (`update_lo`) histograms the low 16 bits of the entries whose
    top 16 bits equal B; `finish_lo` picks the low half L, and v has the bits (B << 16) | L. Counts are
    integers, so the answer is exact for any chunking and chunk order. Inputs must be NaN-free
    (the caller rejects NaN/Inf); float16/bfloat16 chunks are widened exactly.

    Several workers: `fork()` gives an empty copy in the same pass (after `finish_hi`, with the chosen
    bin); each worker updates its fork; `merge(fork)` adds their histograms back before `finish_*`.
    `hist_hi` / `hist_lo` expose the histograms (int64, 65536 bins).

    Histograms live on `device`, or on the first chunk's device when `device` is None.

    >>> x = torch.tensor([0.5, -3.0, 2.0, 1.0, 2.0])
    >>> sel = TopKThreshold(total=5, density=0.4)   # k = 2
    >>> sel.update_hi(x[:2]); sel.update_hi(x[2:]); sel.finish_hi()
    >>> sel.update_lo(x); sel.finish_lo()
    >>> sel.threshold, sel.kept                      # both 2.0 entries are kept
    (2.0, 3)
    """

    def __init__(self, total: int, density: float, device: torch.device | str | None = None) -> None:
        self.total = check_count(total, "total")
        self.density = density
        self.k = topk_count(self.total, density)
        self.device = torch.device(device) if device is not None else None
        # per pass: the histogram and how many entries it has seen. Pass 2 has 65538 bins:
        # 0 = below bin B, 1..65536 = low 16 bits inside B, 65537 = above B
        self._hist: dict[str, Tensor | None] = {"hi": None, "lo": None}
        self._seen = {"hi": 0, "lo": 0}
        self._bin: int | None = None
        self._above = 0          # entries whose top 16 bits exceed B
        self._in_bin = 0         # entries whose top 16 bits equal B
        self._threshold_bits: int | None = None
        self._kept = 0
        self.phase = "hi" if self.k > 0 else "done"

    # -- inspection ----------------------------------------------------------------------------
    @property
    def needs_second_pass(self) -> bool:
        """False when no data pass is needed at all (k == 0)."""
        return self.k > 0

    @property
    def hist_hi(self) -> Tensor | None:
        """Pass-1 histogram of the top 16 bits of |x| (int64, 65536 bins), None before any chunk."""
        return self._hist["hi"]

    @property
    def hist_lo(self) -> Tensor | None:
        """Pass-2 histogram of the low 16 bits of |x| inside the chosen bin (int64, 65536 bins)."""
        h = self._hist["lo"]
        return None if h is None else h[1:_NBINS + 1]

    @property
    def selected_bin(self) -> int | None:
        """The top-16-bit bin holding the k-th largest |x| (known after `finish_hi`)."""
        return self._bin

    @property
    def threshold(self) -> float:
        """The k-th largest |x| as a Python float holding a float32 value (+inf when k == 0)."""
        if self.k == 0:
            return math.inf
        self._expect("done", "threshold")
        return _bits_to_float32(self._threshold_bits)

    @property
    def threshold_bits(self) -> int | None:
        """The int32 bit pattern of `threshold` (None when k == 0 or not yet known)."""
        return self._threshold_bits

    @property
    def kept(self) -> int:
        """How many entries have |x| >= threshold (>= k; more when there are ties)."""
        if self.k == 0:
            return 0
        self._expect("done", "kept")
        return self._kept

    # -- the two passes ----------------------------------------------------------------------------
    def update_hi(self, chunk: Tensor) -> None:
        """Pass 1: add a chunk (any shape; flattened) to the top-16-bit histogram."""
        self._update("hi", chunk, lambda bits: (bits.bitwise_right_shift_(16), _NBINS))

    def finish_hi(self) -> None:
        """End pass 1: choose the bin holding the k-th largest |x|. Checks that `total` entries came."""
        if not self._finish("hi"):
            return
        h = self._hist["hi"]
        self._bin, at_or_above = _from_top(h, self.k)
        self._in_bin = int(h[self._bin].item())
        self._above = at_or_above - self._in_bin
        self.phase = "lo"

    def update_lo(self, chunk: Tensor) -> None:
        """Pass 2: histogram the low 16 bits of the entries of `chunk` that fall in the chosen bin."""
        # one bincount, no boolean gather: entries below/above the bin land in the two end bins
        self._update("lo", chunk,
                     lambda bits: (bits.sub_(self._bin << 16).clamp_(-1, _NBINS).add_(1), _NBINS + 2))

    def finish_lo(self) -> None:
        """End pass 2: fix the threshold. Checks that pass 2 saw the same data as pass 1."""
        if not self._finish("lo"):
            return
        h = self._hist["lo"]
        inside = h[1:_NBINS + 1]
        if int(h[_NBINS + 1].item()) != self._above or int(inside.sum().item()) != self._in_bin:
            raise InputError("TopKThreshold: pass 2 data differs from pass 1 data")
        low, at_or_above = _from_top(inside, self.k - self._above)
        self._threshold_bits = (self._bin << 16) | low
        self._kept = self._above + at_or_above
        self.phase = "done"

    def _update(self, phase: str, chunk: Tensor, bins_of) -> None:
        if self.k == 0:  # nothing to select; only count, so `finish_*` can check the total
            self._seen[phase] += _f32(chunk, "chunk").numel()
            return
        self._expect(phase, f"update_{phase}")
        # clearing the sign bit is |x| for floats, and maps −0 to +0
        bits = _f32(chunk, "chunk").reshape(-1).view(torch.int32).bitwise_and(0x7FFFFFFF)
        idx, nbins = bins_of(bits)
        counts = torch.bincount(idx, minlength=nbins).to(self._home(chunk))
        self._hist[phase] = self._add(self._hist[phase], counts)
        self._seen[phase] += bits.numel()

    def _finish(self, phase: str) -> bool:
        """Check the entry count of a pass; False when there is nothing to select (k == 0)."""
        if self._seen[phase] != self.total:
            raise InputError(f"TopKThreshold: pass {phase!r} saw {self._seen[phase]} entries, "
                             f"expected total={self.total}")
        if self.k == 0:
            return False
        self._expect(phase, f"finish_{phase}")
        return True

    def _expect(self, phase: str, what: str) -> None:
        if self.phase != phase:
            raise InputError(f"TopKThreshold.{what}: called in phase {self.phase!r}, needs {phase!r}")

    def _home(self, chunk: Tensor) -> torch.device:
        if self.device is None:
            self.device = chunk.device
        return self.device

    def _add(self, mine: Tensor | None, theirs: Tensor | None) -> Tensor | None:
        if theirs is None:
            return mine
        if mine is None:
            if self.device is None:
                self.device = theirs.device
            return theirs.to(self.device, copy=True)
        return mine.add_(theirs.to(mine.device))

    # -- several workers -------------------------------------------------------------------------
    def fork(self) -> TopKThreshold:
        """An empty accumulator for the current pass (same total, density, device and chosen bin)."""
        other = TopKThreshold(self.total, self.density, self.device)
        other.phase, other._bin, other._above, other._in_bin = self.phase, self._bin, self._above, self._in_bin
        return other

    def merge(self, other: TopKThreshold) -> TopKThreshold:
        """Add `other`'s histograms of the current pass into this one (same total, density, pass, bin)."""
        if (other.total, other.k, other.phase, other._bin) != (self.total, self.k, self.phase, self._bin):
            raise InputError("TopKThreshold.merge: the two accumulators are for different selections or passes")
        if self.k == 0:
            phases = ("hi", "lo")
        elif self.phase in ("hi", "lo"):
            phases = (self.phase,)
        else:
            raise InputError("TopKThreshold.merge: both passes are already finished")
        for p in phases:
            self._seen[p] += other._seen[p]
            self._hist[p] = self._add(self._hist[p], other._hist[p])
        return self


def _from_top(hist: Tensor, k: int) -> tuple[int, int]:
    """The highest bin b with at least k entries in bins >= b, and that number of entries."""
    cum = hist.flip(0).cumsum(0)  # cum[j] = entries in the top j + 1 bins
    j = int(torch.searchsorted(cum, k).item())
    return hist.numel() - 1 - j, int(cum[j].item())


# ---------------------------------------------------------------------------------------------
# Merging: task arithmetic and TIES
# ---------------------------------------------------------------------------------------------


def _rows(taus: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    """The T task rows of a T×n tensor or a sequence of equal-shape tensors, as float32."""
    if isinstance(taus, Tensor):
        if taus.dim() != 2:
            raise InputError(f"{name}: expected a T×n tensor, got shape {tuple(taus.shape)}")
        rows = list(_f32(taus, name).unbind(0))
    else:
        rows = [_f32(r, f"{name}[{i}]") for i, r in enumerate(taus)]
        for i, r in enumerate(rows[1:], 1):
            _same_shape(f"{name}[{i}]", r, f"{name}[0]", rows[0])
    return rows


def _seq_sum(rows: Sequence[Tensor], like: Tensor) -> Tensor:
    # left to right, one float32 rounding per task, so the result never depends on reduction order
    acc = torch.zeros_like(like, dtype=torch.float32)
    for r in rows:
        acc.add_(r)
    return acc


def _empty_width(taus: Tensor | Sequence[Tensor]) -> Tensor:
    # a 0×n tensor sums to zeros(n); an empty sequence says neither n nor the device
    if isinstance(taus, Tensor):
        return taus.new_zeros(taus.shape[1:], dtype=torch.float32)
    raise InputError("taus: need at least one task vector")


def task_arithmetic(taus: Tensor | Sequence[Tensor]) -> Tensor:
    """τ_MTL = Σ_t τ_t in task order, float32: acc = 0; acc = acc + τ_t for t = 1..T.

    `taus` is a T×n tensor or a sequence of T equal-shape tensors (no stacking needed). The
    accumulation is sequential on purpose, so the bits do not depend on torch's reduction order.

    >>> task_arithmetic(torch.tensor([[1.0, 2.0], [0.5, -2.0]]))
    tensor([1.5000, 0.0000])
    """
    rows = _rows(taus, "taus")
    if not rows:
        return _empty_width(taus)
    return _seq_sum(rows, rows[0])


def ties_merge(
    taus: Tensor | Sequence[Tensor],
    thresholds: Tensor | Sequence[float],
    agg: str = "sum",
) -> Tensor:
    """TIES merge of T task vectors for the same n parameters, float32.

    1. Trim: trimmed_t = τ_t where |τ_t| >= thr_t, else 0 (thr_t from `TopKThreshold`, per task;
       +inf trims everything; thresholds are float32 values, Python floats are rounded to float32).
    2. Elect: s = sign(Σ_t trimmed_t), the sum taken left to right in task order in float32.
    3. Disjoint: keep trimmed_t where sign(trimmed_t) == s and s != 0. Where the sum is exactly 0
       nothing is kept (the paper's code assigns the global majority sign there instead; this only
       matters on exact cancellations). Zero entries are never kept.
    4. agg "sum": Σ kept (task order); "mean": Σ kept / (number kept), 0 where none is kept.

    `taus` is a T×n tensor or a sequence of T equal-shape tensors. Memory: T trimmed copies of the
    chunk besides the inputs, so callers stream chunks of bounded size.

    >>> taus = torch.tensor([[3.0, -1.0, 0.5], [-1.0, -2.0, 4.0]])
    >>> ties_merge(taus, torch.tensor([1.0, 1.0]), "sum")
    tensor([ 3., -3.,  4.])
    >>> ties_merge(taus, torch.tensor([1.0, 1.0]), "mean")
    tensor([ 3.0000, -1.5000,  4.0000])
    """
    if agg not in ("sum", "mean"):
        raise InputError(f"agg: expected 'sum' or 'mean', got {agg!r}")
    rows = _rows(taus, "taus")
    thr = _per_task_thresholds(thresholds, len(rows))
    if not rows:
        return _empty_width(taus)

    # Trimmed once per task (T chunk-sized temporaries; callers bound the chunk size).
    trimmed = [torch.where(r.abs() >= thr[t], r, 0.0) for t, r in enumerate(rows)]
    elected = _seq_sum(trimmed, rows[0]).sign_()
    acc = torch.zeros_like(rows[0])
    n_kept = torch.zeros_like(rows[0]) if agg == "mean" else None
    for tr in trimmed:
        # sign(tr) == s also drops zero entries (sign 0) wherever s != 0; where s == 0 it only matches
        # zeros, which add nothing to the sum and leave a mean of 0: the rule of step 3 either way.
        keep = tr.sign() == elected
        acc.add_(torch.where(keep, tr, 0.0))
        if n_kept is not None:
            n_kept.add_(keep)
    if n_kept is None:
        return acc
    return acc.div_(n_kept.clamp_(min=1))


def _per_task_thresholds(thresholds: object, n_tasks: int) -> list[float | Tensor]:
    if isinstance(thresholds, Tensor):
        if thresholds.dim() != 1 or thresholds.shape[0] != n_tasks:
            raise InputError(f"thresholds: expected shape ({n_tasks},), got {tuple(thresholds.shape)}")
        return list(_f32(thresholds, "thresholds").unbind(0))
    values = list(thresholds)
    if len(values) != n_tasks:
        raise InputError(f"thresholds: expected {n_tasks} values, got {len(values)}")
    return [_float32_scalar(v, f"thresholds[{i}]", allow_inf=True) for i, v in enumerate(values)]


# ---------------------------------------------------------------------------------------------
# Consensus and agreement
# ---------------------------------------------------------------------------------------------


def mask_counts(masks: Tensor | Sequence[Tensor]) -> Tensor:
    """Σ_t m_t: how many of the T masks keep each entry (uint8 for T <= 255, else int32).

    `masks` is a T×n bool tensor or a sequence of T equal-shape bool tensors.

    >>> mask_counts([torch.tensor([True, False, True]), torch.tensor([True, False, False])])
    tensor([2, 0, 1], dtype=torch.uint8)
    """
    if isinstance(masks, Tensor):
        if masks.dim() < 1:
            raise InputError("masks: expected a T×n bool tensor or a sequence of bool tensors")
        masks = list(_bool(masks, "masks").unbind(0))
    rows = [_bool(m, f"masks[{i}]") for i, m in enumerate(masks)]
    if not rows:
        raise InputError("masks: need at least one mask")
    for i, m in enumerate(rows[1:], 1):
        _same_shape(f"masks[{i}]", m, "masks[0]", rows[0])
    acc = torch.zeros_like(rows[0], dtype=torch.uint8 if len(rows) <= 255 else torch.int32)
    for m in rows:
        acc.add_(m)
    return acc


def _counts(counts: object) -> Tensor:
    if not isinstance(counts, Tensor) or counts.dtype.is_floating_point or counts.dtype.is_complex \
            or counts.dtype == torch.bool:
        got = counts.dtype if isinstance(counts, Tensor) else type(counts).__name__
        raise InputError(f"counts: expected an integer tensor, got {got}")
    return counts


def consensus_mask(counts: Tensor, k: int) -> Tensor:
    """Consensus mask (paper eq. 8): 1{Σ_t m_t >= k}. k = 0 keeps all; k > T keeps none; k < 0 is an error.

    >>> consensus_mask(torch.tensor([0, 1, 2, 3]), 2)
    tensor([False, False,  True,  True])
    """
    c = _counts(counts)
    kk = check_count(k, "k")
    if kk > torch.iinfo(c.dtype).max:
        # torch would wrap k into the counts' dtype (uint8: 257 -> 1); no count can reach k
        return torch.zeros_like(c, dtype=torch.bool)
    return c >= kk


def agreement_histogram(counts: Tensor, num_tasks: int) -> Tensor:
    """Mask agreement (paper eq. 7, as counts): entry n is how many parameters exactly n of the T masks
    keep, n = 0..T. int64, length T + 1, on the device of `counts`; sums across tensors and chunks.

    >>> agreement_histogram(torch.tensor([0, 2, 2, 1]), 3)
    tensor([1, 1, 2, 0])
    """
    c = _counts(counts).reshape(-1)
    t = check_count(num_tasks, "num_tasks")
    if c.numel() and c.dtype != torch.uint8 and bool((c < 0).any()):
        raise InputError("counts: negative entries")
    hist = torch.bincount(c, minlength=t + 1)
    if hist.numel() > t + 1:
        raise InputError(f"counts: entries above num_tasks={t}")
    return hist


# ---------------------------------------------------------------------------------------------
# Decode / merge
# ---------------------------------------------------------------------------------------------


def merge_chunk(theta0_f32: Tensor, tau_mtl: Tensor, keep: Tensor | None, alpha: float) -> Tensor:
    """θ0 + α·(keep ∘ τ_MTL) in float32; exactly θ0 where `keep` is False. keep None = everywhere.

    Op order: α32 = float32(α); a = α32 · τ (rounded to float32); out = θ0 + a (rounded to float32),
    selected by `torch.where(keep, θ0 + a, θ0)`. Decoding a task is α = 1 with keep = m_t (then a = τ
    exactly); task arithmetic is keep = None; consensus is keep = consensus_mask(...). The caller casts
    the result to the tensor's original dtype once, at the end.

    >>> merge_chunk(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), torch.tensor([True, False]), 0.5)
    tensor([2., 1.])
    """
    base = _f32(theta0_f32, "theta0_f32")
    tau = _f32(tau_mtl, "tau_mtl")
    _same_shape("theta0_f32", base, "tau_mtl", tau)
    a32 = _float32_scalar(alpha, "alpha")
    merged = base + tau * a32
    if keep is None:
        return merged
    _same_shape("keep", _bool(keep, "keep"), "tau_mtl", tau)
    return torch.where(keep, merged, base)


# ---------------------------------------------------------------------------------------------
# Encode-time statistics
# ---------------------------------------------------------------------------------------------


def _f64(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"{name}: expected a float tensor, got {got}")
    return x.double()


class TaskStats:
    """Per-task statistics accumulated over chunks (see issue 3: what users lose).

    `add(sums, count)` per chunk adds ‖θ̂_t − θ_t‖², ‖τ_t‖², ⟨m_t∘τ_MTL, τ_t⟩, ‖m_t∘τ_MTL‖² and the
    kept count (float64; `tallfmt.kernels.mask_stats` computes them on the CPU from the values decode
    returns, in a fixed order, so the recorded statistics are the same on every machine). `result()`:

    * mask_density = kept / entries (None when no entries),
    * rel_error = ‖θ̂_t − θ_t‖ / ‖τ_t‖ (None when ‖τ_t‖ = 0),
    * cosine = ⟨m_t∘τ_MTL, τ_t⟩ / (‖m_t∘τ_MTL‖·‖τ_t‖), clamped to [−1, 1] (None when a norm is 0).

    Partial accumulators (other chunks or workers) combine with `merge`.

    >>> s = TaskStats()
    >>> s.add([0.0, 1.0, 1.0, 1.0, 1.0], 2)   # err², τ², dot, masked², kept over 2 entries
    >>> s.result()
    {'mask_density': 0.5, 'rel_error': 0.0, 'cosine': 1.0}
    """

    def __init__(self) -> None:
        self._sums: Tensor | None = None  # [err², tau², dot, masked², kept] as float64
        self.total = 0
        self._residual: list[float] | None = None  # [Δ err² of the residual entries, their count], FORMAT.md §4.5

    def add_residual(self, delta_err2: float, entries: int) -> None:
        """Add a tensor's residual: what its entries change in Σ(θ̂−θ)² and how many there are. Once
        called, :meth:`result` reports ``rel_error`` with the residual, ``rel_error_mask`` without it and
        ``residual_entries``."""
        if self._residual is None:
            self._residual = [0.0, 0]
        self._residual[0] += float(delta_err2)
        self._residual[1] += int(entries)

    def add(self, sums: Sequence[float], count: int) -> None:
        """Add one chunk's sums [Σ(θ̂−θ)², Σ τ_t², Σ (m∘τ_MTL)·τ_t, Σ (m∘τ_MTL)², kept] over ``count``
        entries (``tallfmt.kernels.mask_stats`` computes them from the decoded values)."""
        part = torch.tensor([float(x) for x in sums], dtype=torch.float64)
        if part.shape != (5,) or count < 0:
            raise InputError(f"TaskStats.add: expected 5 sums and a count >= 0, got {len(part)} and {count}")
        self._sums = part if self._sums is None else self._sums.add_(part.to(self._sums.device))
        self.total += int(count)

    def merge(self, other: TaskStats) -> TaskStats:
        """Add another accumulator's sums into this one."""
        if other._sums is not None:
            theirs = other._sums
            self._sums = theirs.clone() if self._sums is None else self._sums.add_(theirs.to(self._sums.device))
        self.total += other.total
        if other._residual is not None:
            self.add_residual(*other._residual)
        return self

    @property
    def kept(self) -> int:
        """Entries the mask keeps, over all chunks so far."""
        return 0 if self._sums is None else int(self._sums[4].item())

    def result(self) -> dict[str, float | None]:
        """{'mask_density', 'rel_error', 'cosine'} as Python floats (None where undefined)."""
        err2, tau2, dot, masked2, kept = (0.0,) * 5 if self._sums is None else self._sums.tolist()
        density = kept / self.total if self.total else None
        # one square root per ratio, so equal vectors give exactly 1.0 / 0.0
        rel_error = math.sqrt(err2 / tau2) if tau2 > 0 else None
        cosine = None
        if tau2 > 0 and masked2 > 0:
            cosine = max(-1.0, min(1.0, dot / math.sqrt(masked2 * tau2)))
        out: dict[str, float | None] = {"mask_density": density, "rel_error": rel_error, "cosine": cosine}
        if self._residual is not None:
            delta, entries = self._residual
            out["rel_error"] = math.sqrt(max(0.0, err2 + delta) / tau2) if tau2 > 0 else None
            out["rel_error_mask"] = rel_error
            out["residual_entries"] = entries
        return out
