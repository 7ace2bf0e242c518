"""encode()'s options: every default is defined here, once, and checked here (InputError naming the
bad one). The CLI takes its defaults and choices from this module and the registries."""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tallfmt.errors import InputError
from tallfmt.format import codecs
from tallfmt.format.header import MASK_METHODS, MAX_TASKS, MERGE_METHODS, TAU_DTYPES, fits_float32, name_refusal
from tallfmt.format.jsonio import is_text

#: Tensors stored per task (verbatim) when they differ, even if float: batch-norm statistics are not
#: weights, and θ0 + Σ_t of their changes can be meaningless (a negative variance).
DEFAULT_PER_TASK = ("*running_mean", "*running_var", "*num_batches_tracked")
TIES_AGGS = ("sum", "mean")
SCOPES = ("global", "per_tensor")
MISMATCH = ("error", "per_task")
#: Storage dtypes ``dtype=`` can cast every float tensor to (the maskable ones, FORMAT.md §2).
CAST_DTYPES = ("F32", "F16", "BF16")
#: Residuals (FORMAT.md §11): the value dtype written, and the cost per entry the budget assumes — an
#: estimate, not a measurement: bfloat16 values take 8–9.5 bits and u32 gaps 4.3–8.1 bits per entry
#: after byteplane-zstd (bench/RESULTS.md "Residual study"), 13.8–16.4 in all, so a budget of b bits
#: per masked parameter stores k = ⌊b·N / 16⌋ entries (N: the archive's masked parameters). The
#: report and ``tallfmt info`` show the bytes actually stored.
RESIDUAL_DTYPE = "BF16"
RESIDUAL_BITS_PER_ENTRY = 16
#: The largest budget accepted (bits per masked parameter): a dense float32 correction costs 32.
MAX_RESIDUAL_BITS = 32.0
_DTYPE_ALIASES = {"FLOAT32": "F32", "FLOAT": "F32", "FP32": "F32", "FLOAT16": "F16", "HALF": "F16", "FP16": "F16",
                  "BFLOAT16": "BF16"}


@dataclass(frozen=True)
class EncodeOptions:
    """Every encode() option that decides what the archive holds, with its default.

    ``EncodeOptions()`` is the defaults; :meth:`check` validates keyword arguments against them and
    returns the normalised options (λ per task, metadata as a dict), a picklable value that sharded
    encodes ship to their workers.

        >>> EncodeOptions.check(["a"], merge="ties").encoding()["merge"]
        {'method': 'ties', 'density': 0.2, 'agg': 'sum', 'scope': 'global'}
    """

    merge: str = "task_arithmetic"          # how τ_MTL is made: task_arithmetic or ties
    lambdas: Any = 0.4                      # TALL λ: one number, or {task: number}
    ties_density: float = 0.2               # TIES: fraction of |τ_t| kept per task
    ties_agg: str = "sum"                   # TIES: disjoint sum (the paper's masks) or mean
    ties_scope: str = "global"              # TIES: trim over all masked parameters or per tensor
    mask_method: str = "tall"               # tall (eq. 5) or magnitude (the paper's baseline)
    mask_density: float = 0.1               # magnitude masks: fraction of |τ_t| kept per task
    mask_scope: str = "global"              # magnitude masks: over all masked parameters or per tensor
    codec: str = codecs.AUTO                # segment codec id, or auto
    mask_codec: str = codecs.AUTO           # mask segments' codec id (tau-rans: FORMAT.md §5.1), or auto: codec's
    device: str | None = None               # torch device of the mask math (None: cpu)
    mismatch: str = "error"                 # tensors that differ in presence/dtype/shape: error or per_task
    per_task: tuple[str, ...] = DEFAULT_PER_TASK  # float tensors named like these stay verbatim per task
    metadata: Mapping[str, str] | None = None     # free string → string metadata
    chunk_size: int = 1 << 20               # elements per chunk of mask math
    dtype: str | None = None                # cast every float tensor of every input to this dtype first
    prefix_map: Mapping[str, str] | None = None   # rename θ0's tensors: a name starting with OLD gets NEW
    files: bool = True                      # store the non-weight files of folder inputs (FORMAT.md §10)
    residual: Any = None                    # residual budget, bits per masked parameter: one number or {task: number}
    tau_dtype: str = "F32"                  # τ_MTL's stored dtype: F32 (lossless) or BF16 (FORMAT.md §4.2)
    store_base: bool = True                 # False: θ0's bytes stay outside the archive (FORMAT.md §2.1)
    tasks: tuple[str, ...] = field(default=(), repr=False)  # filled by check()

    @classmethod
    def check(cls, task_names: Sequence[str], **kwargs: Any) -> EncodeOptions:
        """Validate encode()'s keyword arguments (unknown ones are a TypeError, as for a function)."""
        unknown = set(kwargs) - {f for f in cls.__dataclass_fields__ if f != "tasks"}
        if unknown:
            raise TypeError(f"encode() got unexpected keyword argument(s) {sorted(unknown)}")
        o = replace(cls(), **kwargs)
        names = check_task_names(task_names)
        _choice("merge", o.merge, MERGE_METHODS)
        _choice("mask_method", o.mask_method, MASK_METHODS)
        _choice("ties_agg", o.ties_agg, TIES_AGGS)
        _choice("ties_scope", o.ties_scope, SCOPES)
        _choice("mask_scope", o.mask_scope, SCOPES)
        _choice("mismatch", o.mismatch, MISMATCH)
        _choice("codec", o.codec, tuple(codecs.choices()))
        _choice("mask_codec", o.mask_codec, tuple(codecs.mask_choices()))
        tau_dtype = cast_dtype(o.tau_dtype, "tau_dtype", TAU_DTYPES) or "F32"
        if isinstance(o.chunk_size, bool) or not isinstance(o.chunk_size, int) or o.chunk_size < 8:
            raise InputError(f"chunk_size must be an integer >= 8, got {o.chunk_size!r}")
        meta = dict(o.metadata or {})
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InputError("metadata must map strings to strings")
            if not is_text(k) or not is_text(v):
                raise InputError(f"metadata {k[:80]!r}: {'key' if not is_text(k) else 'value'} is not Unicode "
                                 f"text (an unpaired surrogate, e.g. from bytes that are not UTF-8)")
        if isinstance(o.per_task, str) or not all(isinstance(p, str) for p in o.per_task):
            raise InputError(f"per_task must be a sequence of name patterns (strings), got {o.per_task!r}")
        if not isinstance(o.files, bool):
            raise InputError(f"files must be True or False, got {o.files!r}")
        if not isinstance(o.store_base, bool):
            raise InputError(f"store_base must be True or False, got {o.store_base!r}")
        if not o.store_base and (o.dtype is not None or o.prefix_map):
            # a reader is then given θ0 as the user has it, and its checksums would not match
            raise InputError("store_base=False keeps θ0 outside the archive, so θ0 must be stored as it is: it "
                             "cannot be combined with dtype= or prefix_map=, which change θ0's tensors")
        return replace(o, tasks=names, ties_density=_fraction("ties_density", o.ties_density),
                       mask_density=_fraction("mask_density", o.mask_density),
                       lambdas=_lambdas(o.lambdas, names) if o.mask_method == "tall" else {},
                       device=_device(o.device), metadata=meta, per_task=tuple(o.per_task),
                       chunk_size=o.chunk_size // 8 * 8, dtype=cast_dtype(o.dtype), tau_dtype=tau_dtype,
                       prefix_map=_prefix_map(o.prefix_map), residual=_residual(o.residual, names))

    @property
    def residual_on(self) -> bool:
        """Whether some task gets a residual budget (> 0): the encode then selects residual entries."""
        return any(b > 0 for b in self.residual.values())

    def residual_count(self, task: str, masked: int) -> int:
        """k for one task: ⌊bits · N / RESIDUAL_BITS_PER_ENTRY⌋ entries over N masked parameters.

            >>> EncodeOptions.check(["a"], residual=0.5).residual_count("a", 1000)
            31
        """
        return math.floor(Fraction(repr(self.residual.get(task, 0.0))) * masked / RESIDUAL_BITS_PER_ENTRY)

    @property
    def global_ties(self) -> bool:
        """TIES trim with one threshold per task over all masked tensors (needs a data pass first)."""
        return self.merge == "ties" and self.ties_scope == "global"

    @property
    def global_magnitude(self) -> bool:
        """Magnitude masks with one threshold per task over all masked tensors."""
        return self.mask_method == "magnitude" and self.mask_scope == "global"

    def global_steps(self) -> list[tuple[str, float]]:
        """(step, density) of each selection that needs thresholds over all masked tensors, in the
        index's order: "ties", then "magnitude"."""
        return ([("ties", self.ties_density)] if self.global_ties else []) + (
            [("magnitude", self.mask_density)] if self.global_magnitude else [])

    def encoding(self) -> dict[str, Any]:
        """The header's ``encoding`` object (FORMAT.md §1.2)."""
        encoding: dict[str, Any] = {"merge": {"method": self.merge}, "mask": {"method": self.mask_method},
                                    "compute_dtype": "F32", "bit_order": "little"}
        if self.merge == "ties":
            encoding["merge"].update(density=self.ties_density, agg=self.ties_agg, scope=self.ties_scope)
        if self.mask_method == "magnitude":
            encoding["mask"].update(density=self.mask_density, scope=self.mask_scope)
        if self.tau_dtype != "F32":  # absent for F32: such an archive stays version 1.1
            encoding["tau_dtype"] = self.tau_dtype
        return encoding


DEFAULTS = EncodeOptions()


def check_task_names(task_names: Sequence[str]) -> tuple[str, ...]:
    """Task names as a tuple: 1..4096 unique non-empty strings of at most 4096 UTF-8 bytes."""
    names = tuple(task_names)
    if not names:
        raise InputError("tasks must be a non-empty mapping {task name: checkpoint}")
    if len(names) > MAX_TASKS:
        raise InputError(f"{len(names)} tasks is over the limit of {MAX_TASKS}")
    for t in names:
        r = name_refusal(t)
        if r is not None:
            shown = repr(t[:80]) if isinstance(t, str) else repr(t)[:80]
            raise InputError(f"task name {shown}: {r.message}")
    return names


def _choice(name: str, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {v!r}")
    return v


def _fraction(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
        raise InputError(f"{name} must be a number in [0, 1], got {v!r}")
    return float(v)


def _lambdas(lambdas: Any, tasks: tuple[str, ...]) -> dict[str, float]:
    if isinstance(lambdas, Mapping):
        unknown = set(lambdas) - set(tasks)
        if unknown:
            raise InputError(f"lambdas name unknown task(s) {sorted(unknown)}")
        missing = [t for t in tasks if t not in lambdas]
        if missing:
            raise InputError(f"lambdas has no value for task(s) {missing}")
        out = {t: lambdas[t] for t in tasks}
    else:
        out = {t: lambdas for t in tasks}
    for t, v in out.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0 \
                or not fits_float32(v):  # the masks use float32(λ), FORMAT.md §4.3
            raise InputError(f"lambda for task {t!r} must be a finite number > 0 that fits in float32, got {v!r}")
    return {t: float(v) for t, v in out.items()}


def _residual(residual: Any, tasks: tuple[str, ...]) -> dict[str, float]:
    """The residual budget per task (bits per masked parameter, 0 for none): None, one number for every
    task, or {task: number} (tasks left out get none)."""
    if residual is None:
        return {t: 0.0 for t in tasks}
    if isinstance(residual, Mapping):
        unknown = [t for t in residual if t not in tasks]
        if unknown:
            raise InputError(f"residual names unknown task(s) {sorted(map(str, unknown))}")
        out = {t: residual.get(t, 0.0) for t in tasks}
    else:
        out = {t: residual for t in tasks}
    for t, v in out.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
                or not 0 <= v <= MAX_RESIDUAL_BITS:
            raise InputError(f"residual for task {t!r} must be a number of bits per masked parameter in "
                             f"[0, {MAX_RESIDUAL_BITS:g}], got {v!r}")
    return {t: float(v) for t, v in out.items()}


def _device(device: Any) -> str:
    if device is None:
        return "cpu"
    from tallfmt.compute.devices import check_device

    return str(check_device(device))


def cast_dtype(dtype: Any, what: str = "dtype", choices: tuple[str, ...] = CAST_DTYPES) -> str | None:
    """``dtype=`` (or ``tau_dtype=``, ``what``) as a safetensors dtype name among ``choices``, or None
    (keep every input's own).

        >>> cast_dtype("bf16"), cast_dtype("float16"), cast_dtype(None), cast_dtype("bf16", "tau_dtype", TAU_DTYPES)
        ('BF16', 'F16', None, 'BF16')
    """
    if dtype is None:
        return None
    name = dtype.upper() if isinstance(dtype, str) else str(dtype).removeprefix("torch.").upper()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in choices:
        raise InputError(f"{what} must be one of {list(choices)} (or bf16, fp16, float32, ...), got {dtype!r}")
    return name


def _prefix_map(m: Any) -> dict[str, str] | None:
    if m is None:
        return None
    if not isinstance(m, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        raise InputError(f"prefix_map must map name prefixes to name prefixes (strings), got {m!r}")
    if any(k == v for k, v in m.items()):
        raise InputError(f"prefix_map maps a prefix to itself: {m!r}")
    return dict(m)
