"""Merge methods: a registry, the one source of truth for the names, parameters and defaults the
Python API and the CLI offer (each method declares its parameters, as mergekit's methods do).

A method computes, in float32 on the device, the merged value of a masked tensor from θ0 (float32),
τ_MTL and — if it needs them — the per-parameter counts of task masks that keep it; tensors that are
not masked take θ0's value. Nothing here imports torch until a merge runs.

    >>> MERGES["consensus"].check({"k": 1}, num_tasks=3)
    {'k': 1, 'alpha': 0.4}

Register your own with :func:`register_merge` (for the command line: an entry point in the
``tallfmt.merges`` group naming the MergeMethod).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tallfmt.errors import InputError, TallWarning
from tallfmt.format.header import fits_float32


@dataclass(frozen=True)
class Param:
    """A merge parameter: its name, type (int or float), default, help, and the smallest value allowed."""

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None

    def check(self, value: Any) -> Any:
        """``value`` as this parameter's type, or InputError naming it."""
        if self.type is int:
            at_least = f" >= {self.minimum:g}" if self.minimum is not None else ""
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (
                    self.minimum is not None and value < self.minimum):
                raise InputError(f"{self.name} must be an integer{at_least}, got {value!r}")
            return int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InputError(f"{self.name} must be a finite number, got {value!r}")
            try:
                x = float(value)
            except OverflowError:
                x = math.inf
            if not math.isfinite(x):
                raise InputError(f"{self.name} must be a finite number, got {str(value)[:40]}")
            value = x
            if not fits_float32(value):  # applied as float32 (FORMAT.md §4.4)
                raise InputError(f"{self.name} must fit in float32 (|{self.name}| < 3.4028235678e38), got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise InputError(f"{self.name} must be >= {self.minimum}, got {value!r}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A merge: ``apply(theta0, tau, counts, **params)`` → the merged float32 values of a masked tensor.

    ``needs`` is what apply reads: "tau" (τ_MTL), "counts" (how many task masks keep each parameter).
    """

    name: str
    help: str
    params: tuple[Param, ...]
    needs: frozenset[str]
    apply: Callable[..., Any]

    def check(self, params: dict[str, Any], num_tasks: int) -> dict[str, Any]:
        """The parameters with defaults filled in and each checked; InputError for unknown ones."""
        unknown = set(params) - {p.name for p in self.params}
        if unknown:
            raise InputError(f"merge {self.name!r} takes no parameter(s) {sorted(unknown)}; it takes "
                             f"{[p.name for p in self.params] or 'none'}")
        out = {p.name: p.check(params.get(p.name, p.default)) for p in self.params}
        if "k" in out and out["k"] > num_tasks:
            warnings.warn(f"consensus k={out['k']} is above the archive's {num_tasks} tasks: no parameter "
                          f"can be kept by k masks, so the merge is θ0", TallWarning, stacklevel=3)
        return out


MERGES: dict[str, MergeMethod] = {}


def register_merge(method: MergeMethod) -> MergeMethod:
    """Add a merge method (its name must be new). Returns it."""
    if not isinstance(method, MergeMethod):
        raise InputError(f"{method!r} is not a MergeMethod")
    if method.name in MERGES:
        raise InputError(f"merge method {method.name!r} is already registered")
    MERGES[method.name] = method
    return method


def get_merge(name: str) -> MergeMethod:
    try:
        return MERGES[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown merge method {name!r}; known: {sorted(MERGES)}") from None


ALPHA = Param("alpha", float, 0.4, "scale of τ_MTL (negative subtracts, as in task negation)")


def _zeroshot(theta0: Any, **_: Any) -> Any:
    return theta0


def _task_arithmetic(theta0: Any, tau: Any, alpha: float, **_: Any) -> Any:
    from tallfmt.compute import maskmath

    return maskmath.merge_chunk(theta0, tau, None, alpha)


def _consensus(theta0: Any, tau: Any, counts: Any, k: int, alpha: float, **_: Any) -> Any:
    from tallfmt.compute import maskmath

    return maskmath.merge_chunk(theta0, tau, maskmath.consensus_mask(counts, k), alpha)


register_merge(MergeMethod("zeroshot", "θ0, the pretrained model", (), frozenset(), _zeroshot))
register_merge(MergeMethod("task_arithmetic", "θ0 + α·τ_MTL", (ALPHA,), frozenset({"tau"}), _task_arithmetic))
register_merge(MergeMethod(
    "consensus", "θ0 + α·(1{Σ_t m_t ≥ k} ∘ τ_MTL): keep what at least k task masks keep (paper eq. 8)",
    (Param("k", int, 2, "minimum number of task masks that keep a parameter", minimum=0), ALPHA),
    frozenset({"tau", "counts"}), _consensus))

#: The merge ``Archive.merge()`` and ``tallfmt merge`` make when none is named.
DEFAULT_MERGE = "task_arithmetic"

#: What a merge does with tensors it cannot merge (role ``per_task``: heads, adapters, batch-norm
#: statistics, tensors only some tasks have): ``base`` takes θ0's copy and leaves out those θ0 lacks,
#: ``drop`` leaves them all out, ``error`` refuses to merge.
PER_TASK_POLICIES = ("base", "drop", "error")
DEFAULT_PER_TASK = "base"


def check_per_task(policy: Any) -> str:
    """``per_task=`` of a merge, checked (InputError naming the choices)."""
    if policy not in PER_TASK_POLICIES:
        raise InputError(f"per_task must be one of {list(PER_TASK_POLICIES)}, got {policy!r}")
    return policy
