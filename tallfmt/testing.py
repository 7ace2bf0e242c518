"""Property-based testing for tallfmt and for the pipelines built around it.

Hypothesis strategies that generate checkpoint collections (a base model plus T fine-tunes of it) and
encoded archives, and assertions that compare an archive against an independent plain-torch
reference of FORMAT.md §4 — the reference never calls tallfmt's mask math or kernels. Needs the
``testing`` extra (``pip install "tallfmt[testing]"``, which installs hypothesis).

    >>> import tempfile
    >>> from hypothesis import given, settings
    >>> import tallfmt
    >>> from tallfmt.testing import assert_roundtrip, checkpoint_collections
    >>> @settings(max_examples=5, deadline=None)
    ... @given(checkpoint_collections(max_tasks=3))
    ... def test_roundtrip(collection):
    ...     base, tasks = collection
    ...     with tempfile.TemporaryDirectory() as tmp:
    ...         tallfmt.encode(base, tasks, f"{tmp}/zoo.tall", merge="ties")
    ...         assert_roundtrip(base, tasks, f"{tmp}/zoo.tall", merge="ties")
    >>> test_roundtrip()                                                          # doctest: +SKIP

Public API:

* strategies: :func:`state_dicts`, :func:`checkpoint_collections` (→ :class:`CheckpointCollection`),
  :func:`encode_options`, :func:`archives` (→ :class:`EncodedArchive`), and their parts
  :func:`names`, :func:`shapes`;
* the reference: :func:`reference` (→ :class:`Reference`: roles, τ_MTL, masks, decode, merges,
  agreement, statistics, computed from the inputs alone);
* assertions: :func:`assert_roundtrip`, :func:`assert_archives_equal`, :func:`assert_state_dicts_equal`,
  :func:`assert_tensors_equal` (AssertionError naming the task, tensor, number of differing elements
  and the first one).
"""

from __future__ import annotations

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("tallfmt.testing needs hypothesis, which comes with the 'testing' extra: "
                      "pip install 'tallfmt[testing]'") from exc

import atexit
import fnmatch
import inspect
import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES", "OTHER_DTYPES", "names", "shapes",
    "state_dicts", "checkpoint_collections", "CheckpointCollection", "encode_options", "archives",
    "EncodedArchive", "reference", "Reference", "assert_roundtrip", "assert_archives_equal",
    "assert_tensors_equal", "assert_state_dicts_equal",
]

# Our own small dtype table (safetensors names), so the reference does not lean on tallfmt.dtypes.
_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MASKABLE = (torch.float32, torch.float16, torch.bfloat16)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

#: dtypes whose changed tensors are stored masked (FORMAT §2).
FLOAT_DTYPES: tuple[str, ...] = ("F32", "F16", "BF16")
#: dtypes of buffers that are never masked: integer and bool buffers, and float64.
OTHER_DTYPES: tuple[str, ...] = ("I64", "I32", "U8", "BOOL", "F64")

# Encode options that change what an archive holds, and those that must not (codec, device, chunking).
_MATH_OPTIONS = ("merge", "lambdas", "ties_density", "ties_agg", "ties_scope", "mask_method",
                 "mask_density", "mask_scope", "mismatch", "metadata", "per_task", "dtype", "prefix_map")
_NEUTRAL_OPTIONS = ("codec", "device", "overwrite", "chunk_size", "progress", "shards", "max_shard_size",
                    "scheduler", "retries", "threads", "files")
# Batch-norm statistics, named as torch names them: the encoder's default per-task globs match these.
_BATCH_NORM = (".running_mean", ".running_var", ".num_batches_tracked")

# Task and tensor names: mostly ASCII, with a few multi-byte characters and separators.
_NAME_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789._-") + ["é", "λ", "数", "/", " "]


# ==================================================================================================
# Strategies
# ==================================================================================================


def names(max_size: int = 10) -> st.SearchStrategy[str]:
    """Non-empty tensor or task names (ASCII plus a few multi-byte characters).

        >>> names().example()                                                    # doctest: +SKIP
        'w.0λ'
    """
    return st.text(alphabet=st.sampled_from(_NAME_CHARS), min_size=1, max_size=max_size)


def shapes(max_dims: int = 3, max_side: int = 5, *, min_side: int = 0) -> st.SearchStrategy[tuple[int, ...]]:
    """Tensor shapes: 0-dim (``()``), 0-size (a 0 side, unless ``min_side`` > 0) and ordinary ones.

        >>> shapes().example()                                                   # doctest: +SKIP
        (3, 0)
    """
    return st.lists(st.integers(min_side, max_side), max_size=max_dims).map(tuple)


def _seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**32 - 1)


def _random_tensor(g: torch.Generator, shape: tuple[int, ...], dtype: str, *, std: float = 0.02,
                   quantized: bool = False) -> Tensor:
    """Finite random values of `dtype`. Floats: N(0, std) with about 10% ±0.0 and 10% exact
    duplicates; `quantized` rounds to multiples of 2^-10, which float16/bfloat16/float32 all hold
    exactly (so τ = θ_t − θ0 is exact and ties in |τ| and exact cancellations are common)."""
    tdt = _TORCH[dtype]
    n = math.prod(shape)
    if tdt == torch.bool:
        return (torch.rand(n, generator=g) < 0.5).reshape(shape)
    if not tdt.is_floating_point:
        lo, hi = (0, 256) if tdt == torch.uint8 else (-1000, 1000)
        return torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64).to(tdt).reshape(shape)
    x = torch.randn(n, generator=g, dtype=torch.float64) * std
    if quantized:
        # |x| < 2^-3 keeps 7 significant bits: exact in bfloat16's 8
        x = (x * 1024).round().clamp(-127, 127) / 1024
    if n:
        u = torch.rand(n, generator=g)
        src = torch.randint(0, n, (n,), generator=g)
        x = torch.where(u < 0.1, x[src], x)                             # exact duplicates
        signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
        x = torch.where(u > 0.9, signs * 0.0, x)                          # +0.0 and −0.0
    return x.to(tdt).reshape(shape)


@st.composite
def state_dicts(draw: st.DrawFn, *, min_tensors: int = 0, max_tensors: int = 6,
                dtypes: Sequence[str] = FLOAT_DTYPES + ("I64", "I32", "U8", "BOOL"), max_dims: int = 3,
                max_side: int = 5) -> dict[str, Tensor]:
    """A ``{name: tensor}`` state dict: shapes include 0-dim and 0-size, dtypes from ``dtypes``
    (safetensors names), float values N(0, 0.02) with ±0.0 and exact duplicates.

    Values come from a seeded torch generator (hypothesis draws the seed), so large tensors cost
    no hypothesis data; names, shapes and dtypes shrink.

        >>> sd = state_dicts(dtypes=["BF16"]).example()                           # doctest: +SKIP
        >>> {t.dtype for t in sd.values()} <= {torch.bfloat16}                    # doctest: +SKIP
        True
    """
    keys = draw(st.lists(names(), min_size=min_tensors, max_size=max_tensors, unique=True))
    g = torch.Generator().manual_seed(draw(_seeds()))
    out = {}
    for k in keys:
        dt = draw(st.sampled_from(list(dtypes)))
        out[k] = _random_tensor(g, draw(shapes(max_dims, max_side)), dt, quantized=draw(st.booleans()))
    return out


def _differing(base: Mapping[str, Tensor], tasks: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """Names whose presence, dtype or shape differ between the base and the tasks."""
    seen = {n: None for sd in (base, *tasks.values()) for n in sd}
    bad = []
    for n in seen:
        infos = {(sd[n].dtype, tuple(sd[n].shape)) if n in sd else None for sd in (base, *tasks.values())}
        if len(infos) > 1 or None in infos:
            bad.append(n)
    return bad


def _partial_ties(base: Mapping[str, Tensor], tasks: Mapping[str, Mapping[str, Tensor]]) -> dict[str, str]:
    """FORMAT §2: names missing from some checkpoints that, in every checkpoint holding them, are the
    same memory as one tensor that every checkpoint has and whose dtype and shape agree everywhere
    (save_pretrained leaves tied copies out): {name: that tensor}."""
    cks = [base, *tasks.values()]
    differing = set(_differing(base, tasks))
    first: list[dict[tuple, str]] = [{} for _ in cks]
    for n in dict.fromkeys(n for sd in cks for n in sd):
        if n not in differing:
            for f, ck in zip(first, cks):
                k = _storage_key(ck[n])
                if k is not None:
                    f.setdefault(k, n)
    tied = {}
    for n in differing:
        found = {first[i].get(_storage_key(ck[n])) if _storage_key(ck[n]) is not None else None
                 for i, ck in enumerate(cks) if n in ck}
        if len(found) == 1 and None not in found:
            tied[n] = found.pop()
    return tied


def _mismatched(base: Mapping[str, Tensor], tasks: Mapping[str, Mapping[str, Tensor]]) -> list[str]:
    """Names whose presence, dtype or shape differ between the base and the tasks (FORMAT §2), but for
    tied copies some checkpoints leave out (those are aliases)."""
    tied = _partial_ties(base, tasks)
    return [n for n in _differing(base, tasks) if n not in tied]


class CheckpointCollection(NamedTuple):
    """A base state dict and ``{task name: fine-tuned state dict}``; unpacks as ``base, tasks``."""

    base: dict[str, Tensor]
    tasks: dict[str, dict[str, Tensor]]

    @property
    def mismatch(self) -> str:
        """The ``encode(mismatch=...)`` this collection needs: "per_task" when some tensor's
        presence, dtype or shape differs between checkpoints, else "error" (the default)."""
        return "per_task" if _mismatched(self.base, self.tasks) else "error"

    @property
    def encode_kwargs(self) -> dict[str, Any]:
        """Keyword arguments ``encode`` needs for this collection (``{"mismatch": ...}``)."""
        return {"mismatch": self.mismatch}


def _fractions(change_fraction: float | None) -> st.SearchStrategy[float]:
    if change_fraction is not None:
        if not 0 <= change_fraction <= 1:
            raise ValueError(f"change_fraction must be in [0, 1] or None, got {change_fraction!r}")
        return st.just(float(change_fraction))
    return st.sampled_from([0.0, 0.1, 0.5, 1.0]) | st.floats(0, 1)


def _fine_tune(g: torch.Generator, theta0: Tensor, fraction: float, quantized: bool) -> Tensor:
    """θ0 changed in about `fraction` of its entries: N(0, 0.01) deltas (floats; some set to ±0.0),
    new random values (integers), flips (bool)."""
    flat = theta0.reshape(-1)
    n = flat.numel()
    where = torch.rand(n, generator=g) < fraction
    if theta0.dtype == torch.bool:
        return torch.where(where, ~flat, flat).reshape(theta0.shape)
    if not theta0.dtype.is_floating_point:
        return torch.where(where, _random_tensor(g, (n,), _name_of(theta0.dtype)), flat).reshape(theta0.shape)
    delta = _random_tensor(g, (n,), "F64", std=0.01, quantized=quantized)
    new = (flat.double() + delta).to(theta0.dtype)
    # a few changed entries become ±0.0: θ0 = +0.0 → −0.0 changes only the sign bit
    zero = (torch.rand(n, generator=g) < 0.1) & where
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(theta0.dtype)
    new = torch.where(zero, signs * 0.0, new)
    return torch.where(where, new, flat).reshape(theta0.shape)


def _name_of(dtype: torch.dtype) -> str:
    return next(k for k, v in _TORCH.items() if v == dtype)


def _noncontiguous(x: Tensor) -> Tensor:
    # same values and shape, transposed strides (how a checkpoint can hold a transposed view)
    return x.t().contiguous().t() if x.dim() == 2 and min(x.shape) > 1 else x


@st.composite
def checkpoint_collections(draw: st.DrawFn, min_tasks: int = 1, max_tasks: int = 6, *,
                           change_fraction: float | None = None, max_tensors: int = 6,
                           float_dtypes: Sequence[str] = FLOAT_DTYPES, other_dtypes: Sequence[str] = OTHER_DTYPES,
                           shared: bool = True, non_float: bool = True, per_task: bool = False,
                           tied: bool = True, noncontiguous: bool = True, batch_norm: bool = True,
                           max_dims: int = 3, max_side: int = 6) -> CheckpointCollection:
    """A base plus T fine-tunes of it (``min_tasks`` ≤ T ≤ ``max_tasks``), as a CheckpointCollection.

    Every collection has changed float tensors (``float_dtypes``; each task changes about
    ``change_fraction`` of the entries, drawn per tensor and task when None; some tasks copy an
    earlier task exactly, which makes ties in the masks). Optional kinds:

    * ``shared``: tensors equal bit for bit in every checkpoint (clones or the very same object);
    * ``non_float``: ``other_dtypes`` buffers (integers, bool, float64) that differ between tasks;
    * ``per_task``: tensors absent from the base or some tasks, or of another shape or dtype in some
      task — encode them with ``mismatch="per_task"`` (``collection.encode_kwargs`` says so);
    * ``tied``: an extra name that is the same tensor object as another in every checkpoint that has
      it (with ``per_task``, some may leave it out, as ``save_pretrained`` leaves out tied weights);
    * ``noncontiguous``: some 2-D tensors are transposed views;
    * ``batch_norm``: batch-norm statistics (``<name>.running_mean`` / ``.running_var`` float,
      ``.num_batches_tracked`` I64) that each task changes, which the encoder's default ``per_task``
      globs keep verbatim per task.

    Values are finite: base N(0, 0.02), deltas N(0, 0.01), with ±0.0 and exact duplicates.

        >>> base, tasks = checkpoint_collections(max_tasks=3).example()           # doctest: +SKIP
        >>> 1 <= len(tasks) <= 3                                                  # doctest: +SKIP
        True
    """
    if not 1 <= min_tasks <= max_tasks:
        raise ValueError(f"need 1 <= min_tasks <= max_tasks, got {min_tasks}, {max_tasks}")
    fractions = _fractions(change_fraction)
    task_names = draw(st.lists(names(), min_size=min_tasks, max_size=max_tasks, unique=True))
    kinds = (["changed"] + ["shared"] * shared + ["other"] * non_float + ["per_task"] * per_task
             + ["batch_norm"] * batch_norm)
    # the first tensor is a changed one with elements, so that there is something to mask
    specs = [("changed", draw(shapes(max_dims, max_side, min_side=1)))]
    specs += draw(st.lists(st.tuples(st.sampled_from(kinds), shapes(max_dims, max_side)), max_size=max_tensors - 1))
    tensor_names = draw(st.lists(names(), min_size=len(specs) + 2, max_size=len(specs) + 2, unique=True))
    # an earlier task to copy exactly, or None
    copies = [draw(st.none() | st.integers(0, i - 1)) if i else None for i in range(len(task_names))]
    g = torch.Generator().manual_seed(draw(_seeds()))
    base: dict[str, Tensor] = {}
    tasks: dict[str, dict[str, Tensor]] = {t: {} for t in task_names}
    common = []
    for (kind, shape), name in zip(specs, tensor_names):
        if kind == "per_task":
            _per_task_tensor(draw, g, name, shape, base, tasks, float_dtypes, other_dtypes)
            continue
        if kind == "batch_norm":
            suffix = draw(st.sampled_from(_BATCH_NORM))
            name += suffix
            dtype = "I64" if suffix == ".num_batches_tracked" else draw(st.sampled_from(list(float_dtypes)))
        else:
            dtype = draw(st.sampled_from(list(other_dtypes if kind == "other" else float_dtypes)))
        quantized = draw(st.booleans())
        theta0 = _random_tensor(g, shape, dtype, quantized=quantized)
        base[name] = theta0
        for i, t in enumerate(task_names):
            if kind == "shared":
                tasks[t][name] = theta0 if draw(st.booleans()) else theta0.clone()
            elif copies[i] is not None:
                tasks[t][name] = tasks[task_names[copies[i]]][name].clone()
            else:
                tasks[t][name] = _fine_tune(g, theta0, draw(fractions), quantized)
        common.append(name)
    if noncontiguous:
        for sd in (base, *tasks.values()):
            for n in common:
                if draw(st.booleans()):
                    sd[n] = _noncontiguous(sd[n])
    if tied:
        targets = [n for n in common if base[n].numel() > 0]
        for tie in tensor_names[len(specs):]:
            if targets and draw(st.booleans()):
                target = draw(st.sampled_from(targets))
                holders = [base, *tasks.values()]
                # with per_task: a tied copy some checkpoints leave out, as save_pretrained does
                kept = draw(st.lists(st.booleans(), min_size=len(holders), max_size=len(holders)))
                if not per_task or not any(kept) or draw(st.booleans()):
                    kept = [True] * len(holders)
                for sd, keep in zip(holders, kept):
                    if keep:
                        sd[tie] = sd[target]
    if draw(st.booleans()):  # the tasks need not list their tensors in the base's order
        order = draw(st.permutations(list(base)))
        for t in task_names:
            tasks[t] = {**{n: tasks[t][n] for n in order if n in tasks[t]}, **tasks[t]}
    return CheckpointCollection(base, tasks)


def _per_task_tensor(draw: st.DrawFn, g: torch.Generator, name: str, shape: tuple[int, ...], base: dict,
                     tasks: dict, float_dtypes: Sequence[str], other_dtypes: Sequence[str]) -> None:
    """A tensor whose presence, shape or dtype differs between checkpoints (FORMAT §2 per_task)."""
    dtypes = list(float_dtypes) + list(other_dtypes)
    how = draw(st.sampled_from(["presence", "shape", "dtype"]))
    dtype = draw(st.sampled_from(dtypes))
    holders = [base, *tasks.values()]
    present = draw(st.lists(st.booleans(), min_size=len(holders), max_size=len(holders)))
    if how == "presence":
        present[draw(st.integers(0, len(holders) - 1))] = False  # at least one checkpoint lacks it
    for sd, here in zip(holders, present):
        if how == "presence" and not here:
            continue
        s, d = shape, dtype
        if how == "shape" and here:
            s = shape + (draw(st.integers(0, 3)),)
        if how == "dtype" and here:
            d = draw(st.sampled_from(dtypes))
        sd[name] = _random_tensor(g, s, d, quantized=draw(st.booleans()))
    if not any(name in sd for sd in holders):
        holders[-1][name] = _random_tensor(g, shape, dtype)
    if not _mismatched({name: base[name]} if name in base else {},
                       {t: {name: sd[name]} if name in sd else {} for t, sd in tasks.items()}):
        # the draws happened to agree: without the base's copy the tensor is per-task after all
        base.pop(name)


@st.composite
def encode_options(draw: st.DrawFn, task_names: Sequence[str], *,
                   merges: Sequence[str] = ("task_arithmetic", "ties"),
                   mask_methods: Sequence[str] = ("tall", "magnitude"),
                   codecs: Sequence[str] = ("auto", "raw", "zstd", "byteplane-zstd"),
                   chunk_sizes: Sequence[int | None] = (None, 8, 16, 64),
                   per_task_globs: Sequence[tuple[str, ...] | None] = (None, (), ("*running_*",)),
                   dtypes: Sequence[str | None] = (None,),
                   tau_dtypes: Sequence[str] = ("F32",)) -> dict[str, Any]:
    """Keyword arguments for ``tallfmt.encode``: merge and its TIES parameters, λ (one float or one
    per task, including 1.0 where TALL masks tie), mask method, codec, chunk size, per-task globs
    (None: the default), the storage dtype every float tensor is cast to (``dtypes``; None: none)
    and τ_MTL's stored dtype (``tau_dtypes``; F32 is left out of the arguments, as the default).

        >>> encode_options(["a", "b"]).example()                                 # doctest: +SKIP
        {'merge': 'ties', 'ties_density': 0.5, ..., 'lambdas': {'a': 1.0, 'b': 0.4}, ...}
    """
    fraction = st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]) | st.floats(0, 1)
    lam = st.sampled_from([0.2, 0.4, 0.5, 1.0, 2.0]) | st.floats(1e-3, 4.0)
    kw: dict[str, Any] = {"merge": draw(st.sampled_from(list(merges)))}
    if kw["merge"] == "ties":
        kw.update(ties_density=draw(fraction), ties_agg=draw(st.sampled_from(["sum", "mean"])),
                  ties_scope=draw(st.sampled_from(["global", "per_tensor"])))
    kw["mask_method"] = draw(st.sampled_from(list(mask_methods)))
    if kw["mask_method"] == "tall":
        kw["lambdas"] = draw(lam | st.fixed_dictionaries({t: lam for t in task_names}))
    else:
        kw.update(mask_density=draw(fraction), mask_scope=draw(st.sampled_from(["global", "per_tensor"])))
    kw["codec"] = draw(st.sampled_from(list(codecs)))
    chunk = draw(st.sampled_from(list(chunk_sizes)))
    if chunk is not None:
        kw["chunk_size"] = chunk
    globs = draw(st.sampled_from(list(per_task_globs)))
    if globs is not None:
        kw["per_task"] = globs
    dtype = draw(st.sampled_from(list(dtypes)))
    if dtype is not None:
        kw["dtype"] = dtype
    tau_dtype = draw(st.sampled_from(list(tau_dtypes)))
    if tau_dtype != "F32":
        kw["tau_dtype"] = tau_dtype
    return kw


class EncodedArchive(NamedTuple):
    """What :func:`archives` draws; unpacks as ``path, base, tasks, encode_kwargs``."""

    path: Path
    base: dict[str, Tensor]
    tasks: dict[str, dict[str, Tensor]]
    encode_kwargs: dict[str, Any]


def _temp_folder() -> Path:
    """A fresh folder, removed when the current hypothesis test case ends (or at exit outside one)."""
    folder = Path(tempfile.mkdtemp(prefix="tallfmt-testing-"))
    try:
        hypothesis.control.cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    except hypothesis.errors.InvalidArgument:  # drawn outside a test, e.g. by .example()
        atexit.register(shutil.rmtree, folder, True)
    return folder


@st.composite
def archives(draw: st.DrawFn, collections: st.SearchStrategy[CheckpointCollection] | None = None, *,
             merges: Sequence[str] = ("task_arithmetic", "ties"),
             mask_methods: Sequence[str] = ("tall", "magnitude"),
             codecs: Sequence[str] = ("auto", "raw", "zstd", "byteplane-zstd"),
             chunk_sizes: Sequence[int | None] = (None, 8, 16, 64)) -> EncodedArchive:
    """A collection (default: ``checkpoint_collections(per_task=True)``) encoded with random
    :func:`encode_options` into ``zoo.tall`` in a temporary folder that lives until the test case ends.

    Encoding happens while drawing, so add ``suppress_health_check=[HealthCheck.too_slow]``.

        >>> @given(archives())                                                    # doctest: +SKIP
        ... def test_zoo(drawn):
        ...     path, base, tasks, kwargs = drawn
        ...     assert_roundtrip(base, tasks, path, **kwargs)
    """
    import tallfmt

    coll = draw(collections if collections is not None else checkpoint_collections(per_task=True))
    kw = {**coll.encode_kwargs, **draw(encode_options(list(coll.tasks), merges=merges, mask_methods=mask_methods,
                                                      codecs=codecs, chunk_sizes=chunk_sizes))}
    path = _temp_folder() / "zoo.tall"
    tallfmt.encode(coll.base, coll.tasks, path, **kw)
    return EncodedArchive(path, coll.base, coll.tasks, kw)


# ==================================================================================================
# The reference: FORMAT.md §2 and §4 in plain torch, from the inputs alone
# ==================================================================================================


def _load(source: Any) -> dict[str, Tensor]:
    """A source as a name → tensor dict. Files are read with tallfmt's reader (the reference checks
    the math, not the file parsers, which have tests of their own)."""
    if isinstance(source, Mapping):
        return dict(source)
    from tallfmt.checkpoints import open_checkpoint

    with open_checkpoint(source) as ck:
        return {n: ck.get(n) for n in ck.names()}


def _storage_key(t: Tensor) -> tuple | None:
    # the same memory, viewed the same way: tied weights (empty tensors may share pointers by chance)
    if t.numel() == 0:
        return None
    return (str(t.device), t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _bits(t: Tensor) -> Tensor:
    """The tensor's elements as same-width integers (compares −0.0 ≠ +0.0, bf16 exactly)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(_BITS[flat.element_size()])


def _bit_equal(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(_bits(a), _bits(b)))


def _f32(x: Tensor) -> Tensor:
    """float32(x), flattened: exact for float16, bfloat16 and float32 (FORMAT §4.1)."""
    return x.detach().cpu().contiguous().reshape(-1).to(torch.float32)


def _topk_keep(values: Sequence[Tensor], density: float) -> list[Tensor]:
    """FORMAT §4.2 trim: keep |x| ≥ v, v the k-th largest |x| over all `values`, k = ⌈p·N⌉, by sorting.

    p is the decimal number the header records (json.dumps writes a float's shortest repr)."""
    mags = [v.abs() for v in values]
    everything = torch.cat(mags) if mags else torch.zeros(0)
    k = math.ceil(Fraction(repr(float(density))) * everything.numel())
    if k == 0:
        return [torch.zeros_like(m, dtype=torch.bool) for m in mags]
    v = torch.sort(everything, descending=True).values[k - 1]
    return [m >= v for m in mags]


def _seq_sum(xs: Sequence[Tensor]) -> Tensor:
    """((x1 + x2) + x3) + …, float32 after each addition, in task order."""
    acc = xs[0].clone()
    for x in xs[1:]:
        acc = acc + x
    return acc


def _ties(taus: list[Tensor], keep: list[Tensor], agg: str) -> Tensor:
    """FORMAT §4.2 TIES from the trim masks: elect by the sign of the sum, disjoint sum or mean."""
    trimmed = [torch.where(k, t, torch.zeros_like(t)) for t, k in zip(taus, keep)]
    elected = torch.sign(_seq_sum(trimmed))
    kept = [(torch.sign(tr) == elected) & (elected != 0) for tr in trimmed]
    total = _seq_sum([torch.where(k, tr, torch.zeros_like(tr)) for k, tr in zip(kept, trimmed)])
    if agg == "sum":
        return total
    count = _seq_sum([k.to(torch.float32) for k in kept])
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _sequential_sum(x: Tensor) -> float:
    """((x0 + x1) + x2) + … in float64 (numpy's accumulate is a plain loop; sum() is pairwise)."""
    return float(np.cumsum(x.numpy())[-1]) if x.numel() else 0.0


def _round_like(x_f32: Tensor, dtype: torch.dtype) -> Tensor:
    """One rounding from float32 to `dtype`, to nearest even (torch's conversion)."""
    return x_f32.to(dtype)


def _float32(v: float) -> Tensor:
    return torch.tensor(float(v), dtype=torch.float32)


@dataclass
class _Masked:
    dtype: torch.dtype
    shape: tuple[int, ...]
    theta0: Tensor            # original dtype, flat
    tau_mtl: Tensor           # float32, flat
    masks: list[Tensor]       # bool, flat, one per task
    taus: list[Tensor]        # float32, flat
    thetas: list[Tensor]      # original dtype, flat


class Reference:
    """FORMAT.md §2/§4 applied to the inputs in plain torch; see :func:`reference`.

    Attributes: ``tasks`` (names, in order), ``names`` (tensor names: the base's, then new ones in
    task order), ``roles`` ({name: role}), ``targets`` ({alias: its target}), ``tau_mtl`` and
    ``masks`` of masked tensors ({name: float32 tensor}, {task: {name: bool tensor}}), ``lambdas``.
    """

    def __init__(self, base: Mapping[str, Tensor], tasks: Mapping[str, Mapping[str, Tensor]], options: dict[str, Any]):
        self.base = dict(base)
        self.task_sds = {t: dict(sd) for t, sd in tasks.items()}
        self.tasks = list(tasks)
        self.options = options
        self.lambdas = self._lambdas()
        self.names = list(dict.fromkeys([n for sd in (self.base, *self.task_sds.values()) for n in sd]))
        self.roles, self.targets = self._roles()
        self._masked: dict[str, _Masked] = {}
        self._compute_masked()
        self.tau_mtl = {n: m.tau_mtl.reshape(m.shape) for n, m in self._masked.items()}
        self.masks = {t: {n: m.masks[i].reshape(m.shape) for n, m in self._masked.items()}
                      for i, t in enumerate(self.tasks)}

    # --- setup -----------------------------------------------------------------------------------
    def _lambdas(self) -> dict[str, float | None]:
        if self.options["mask_method"] != "tall":
            return {t: None for t in self.tasks}
        lam = self.options["lambdas"]
        return {t: float(lam[t] if isinstance(lam, Mapping) else lam) for t in self.tasks}

    def _checkpoints(self) -> list[dict[str, Tensor]]:
        return [self.base, *(self.task_sds[t] for t in self.tasks)]

    def _roles(self) -> tuple[dict[str, str], dict[str, str]]:
        """FORMAT §2: alias, shared, masked or per_task, per tensor."""
        cks = self._checkpoints()
        for ck, label in zip(cks, ["base", *self.tasks]):
            for n, t in ck.items():
                if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                    raise AssertionError(f"{label}: tensor {n!r} holds NaN or Inf, so encode should have "
                                         f"refused it")
        tied = _partial_ties(self.base, self.task_sds)
        mismatched = set(_mismatched(self.base, self.task_sds))
        if mismatched and self.options["mismatch"] != "per_task":
            raise AssertionError(f"the inputs differ in presence, dtype or shape of {sorted(mismatched)}, "
                                 f"so encode should have refused them without mismatch='per_task'")
        roles: dict[str, str] = {}
        targets: dict[str, str] = {}
        first_of: dict[tuple, str] = {}
        for n in self.names:
            if n in mismatched:
                roles[n] = "per_task"
                continue
            if n in tied:
                roles[n] = "alias"
                continue
            keys = tuple(_storage_key(ck[n]) for ck in cks)
            if None not in keys:
                if keys in first_of:
                    roles[n], targets[n] = "alias", first_of[keys]
                    continue
                first_of[keys] = n
            t0 = self.base[n]
            if all(_bit_equal(ck[n], t0) for ck in cks[1:]):
                roles[n] = "shared"
            elif t0.dtype in _MASKABLE and not any(fnmatch.fnmatchcase(n, g) for g in self.options["per_task"]):
                roles[n] = "masked"
            else:  # FORMAT §2: differing non-floats, and floats named like a per-task glob
                roles[n] = "per_task"
        for n, t in tied.items():
            targets[n] = targets[t] if roles[t] == "alias" else t
        return roles, targets

    # --- τ_MTL and masks (§4.1–4.3) ----------------------------------------------------------------
    def _compute_masked(self) -> None:
        o = self.options
        names = [n for n in self.names if self.roles[n] == "masked"]
        for n in names:
            theta0 = self.base[n].detach().cpu().contiguous().reshape(-1)
            thetas = [self.task_sds[t][n].detach().cpu().contiguous().reshape(-1) for t in self.tasks]
            taus = [_f32(th) - _f32(theta0) for th in thetas]
            self._masked[n] = _Masked(theta0.dtype, tuple(self.base[n].shape), theta0, torch.empty(0), [], taus, thetas)
        ms = [self._masked[n] for n in names]
        n_tasks = len(self.tasks)

        def trim(density: float, scope: str) -> list[list[Tensor]]:
            """keep[tensor][task] for a top-k trim of the given scope."""
            if scope == "global":
                per_task = [_topk_keep([m.taus[i] for m in ms], density) for i in range(n_tasks)]
                return [[per_task[i][j] for i in range(n_tasks)] for j in range(len(ms))]
            return [[_topk_keep([m.taus[i]], density)[0] for i in range(n_tasks)] for m in ms]

        if o["merge"] == "ties":
            keeps = trim(o["ties_density"], o["ties_scope"])
            for m, keep in zip(ms, keeps):
                m.tau_mtl = _ties(m.taus, keep, o["ties_agg"])
        else:
            for m in ms:
                m.tau_mtl = _seq_sum(m.taus)
        if o["mask_method"] == "magnitude":
            for m, keep in zip(ms, trim(o["mask_density"], o["mask_scope"])):
                m.masks = keep
        else:
            for m in ms:
                m.masks = [tau.abs() >= _float32(self.lambdas[t]) * (m.tau_mtl - tau).abs()
                           for t, tau in zip(self.tasks, m.taus)]
        for m in ms:  # FORMAT §4.3: where τ_MTL = 0 the bit changes nothing and is stored as 0
            m.masks = [keep & (m.tau_mtl != 0) for keep in m.masks]

    # --- decoding and merging (§4.4) --------------------------------------------------------------
    def _assemble(self, value: Any) -> dict[str, Tensor]:
        """{name: tensor} in table order: value(name) for non-aliases (None: left out), aliases
        the very same object as their target."""
        out: dict[str, Tensor] = {}
        for n in self.names:
            if self.roles[n] == "alias":
                if self.targets[n] in out:
                    out[n] = out[self.targets[n]]
                continue
            v = value(n)
            if v is not None:
                out[n] = v
        return out

    def decode(self, task: str) -> dict[str, Tensor]:
        """θ̂_t: masked tensors θ0 + m_t∘τ_MTL rounded once (θ0's bits where the bit is clear), the
        rest as the task's checkpoint has them."""
        i = self.tasks.index(task)

        def value(n: str) -> Tensor | None:
            if self.roles[n] == "masked":
                m = self._masked[n]
                full = _round_like(_f32(m.theta0) + m.tau_mtl, m.dtype)
                return torch.where(m.masks[i], full, m.theta0).reshape(m.shape)
            sd = self.task_sds[task]
            return sd[n].detach().cpu() if n in sd else None
        return self._assemble(value)

    def merge(self, method: str = "task_arithmetic", *, alpha: float = 0.4, k: int = 2) -> dict[str, Tensor]:
        """zeroshot θ0; task_arithmetic round(θ0_f + float32(α)·τ_MTL); consensus the same where at
        least k masks keep the entry, θ0 elsewhere. Non-masked tensors come from the base."""
        if method not in ("zeroshot", "task_arithmetic", "consensus"):
            raise ValueError(f"the reference knows no merge {method!r}")
        a32 = _float32(alpha)

        def value(n: str) -> Tensor | None:
            if self.roles[n] != "masked" or method == "zeroshot":
                return self.base[n].detach().cpu() if n in self.base else None
            m = self._masked[n]
            full = _round_like(_f32(m.theta0) + a32 * m.tau_mtl, m.dtype)
            if method == "consensus":
                full = torch.where(self._counts(m) >= k, full, m.theta0)
            return full.reshape(m.shape)
        return self._assemble(value)

    @staticmethod
    def _counts(m: _Masked) -> Tensor:
        return torch.stack(m.masks).sum(0, dtype=torch.int64) if m.masks else torch.zeros(0, dtype=torch.int64)

    def agreement(self) -> Tensor:
        """int64, length T+1: entry n counts the masked parameters exactly n task masks keep."""
        total = torch.zeros(len(self.tasks) + 1, dtype=torch.int64)
        for m in self._masked.values():
            total += torch.bincount(self._counts(m), minlength=len(self.tasks) + 1)
        return total

    def stats(self, task: str) -> dict[str, float | None]:
        """mask_density, rel_error ‖θ̂_t − θ_t‖/‖τ_t‖ and cosine(m_t∘τ_MTL, τ_t) over masked tensors
        (FORMAT §1.2, §4.5): float64 sums, sequential in element order within each tensor, the tensors'
        sums added in table order; None where undefined."""
        i = self.tasks.index(task)
        decoded = self.decode(task)
        sums = [0.0] * 5  # Σ(θ̂−θ)², Σ τ², Σ (m∘τ_MTL)·τ, Σ (m∘τ_MTL)², kept
        total = 0
        for n, m in self._masked.items():
            tau = m.taus[i].double()
            masked = m.tau_mtl.double() * m.masks[i].double()
            err = decoded[n].reshape(-1).double() - m.thetas[i].double()
            for j, terms in enumerate((err * err, tau * tau, masked * tau, masked * masked, m.masks[i].double())):
                sums[j] += _sequential_sum(terms)
            total += m.theta0.numel()
        err2, tau2, dot, masked2, kept = sums
        return {"mask_density": kept / total if total else None,
                "rel_error": math.sqrt(err2 / tau2) if tau2 > 0 else None,
                "cosine": max(-1.0, min(1.0, dot / math.sqrt(masked2 * tau2))) if tau2 > 0 and masked2 > 0 else None}

    def encoding(self) -> dict[str, Any]:
        """The header's ``encoding`` object these options must produce (FORMAT §1.2)."""
        o = self.options
        merge: dict[str, Any] = {"method": o["merge"]}
        if o["merge"] == "ties":
            merge.update(density=float(o["ties_density"]), agg=o["ties_agg"], scope=o["ties_scope"])
        mask: dict[str, Any] = {"method": o["mask_method"]}
        if o["mask_method"] == "magnitude":
            mask.update(density=float(o["mask_density"]), scope=o["mask_scope"])
        return {"merge": merge, "mask": mask, "compute_dtype": "F32", "bit_order": "little"}


def _options(encode_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The encode options that matter for the math, with encode's defaults filled in."""
    import tallfmt

    unknown = set(encode_kwargs) - set(_MATH_OPTIONS) - set(_NEUTRAL_OPTIONS)
    if unknown:
        raise TypeError(f"unknown encode option(s) {sorted(unknown)}")
    params = inspect.signature(tallfmt.encode).parameters
    return {k: encode_kwargs.get(k, params[k].default) for k in _MATH_OPTIONS}


def reference(base: Any, tasks: Mapping[str, Any], **encode_kwargs: Any) -> Reference:
    """What ``tallfmt.encode(base, tasks, path, **encode_kwargs)`` must store, by FORMAT.md alone.

    Sources may be mappings or files (read with tallfmt's checkpoint reader). Raises AssertionError
    when encode should have refused the inputs (mismatches without ``mismatch="per_task"``, NaN/Inf).

        >>> ref = reference({"w": torch.zeros(2)}, {"a": {"w": torch.tensor([0.5, 0.0])}})
        >>> ref.roles, ref.decode("a")["w"], ref.masks["a"]["w"]
        ({'w': 'masked'}, tensor([0.5000, 0.0000]), tensor([True, True]))
    """
    o = _options(encode_kwargs)
    return Reference(_as_encoded(_load(base), o["dtype"], o["prefix_map"]),
                     {t: _as_encoded(_load(sd), o["dtype"], None) for t, sd in tasks.items()}, o)


_CAST = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "BFLOAT16": torch.bfloat16,
         "FLOAT16": torch.float16, "FLOAT32": torch.float32, "FP16": torch.float16, "FP32": torch.float32}


def _as_encoded(sd: dict[str, Tensor], dtype: Any, prefix_map: Mapping[str, str] | None) -> dict[str, Tensor]:
    """A checkpoint as ``encode(dtype=, prefix_map=)`` sees it (FORMAT §4.1): names starting with a
    key of ``prefix_map`` (the longest) start with its value instead; every float tensor cast to
    ``dtype`` (one rounding to nearest even), tied tensors still one object."""
    if prefix_map:
        keys = sorted(prefix_map, key=len, reverse=True)
        renamed = {}
        for n, t in sd.items():
            old = next((k for k in keys if n.startswith(k)), None)
            renamed[n if old is None else prefix_map[old] + n[len(old):]] = t
        sd = renamed
    if dtype is None:
        return sd
    target = _CAST[str(dtype).upper()]
    cast: dict[Any, Tensor] = {}
    out = {}
    for n, t in sd.items():
        if not t.dtype.is_floating_point or t.dtype == target:
            out[n] = t
            continue
        key = _storage_key(t) or id(t)
        if key not in cast:
            cast[key] = t.to(target)
            if bool(torch.isfinite(t).all()) and not bool(torch.isfinite(cast[key]).all()):
                raise AssertionError(f"tensor {n!r} overflows {dtype}, so encode should have refused it")
        out[n] = cast[key]
    return out


# ==================================================================================================
# Assertions
# ==================================================================================================


def assert_tensors_equal(actual: Any, expected: Tensor, where: str) -> None:
    """``actual`` is a tensor of ``expected``'s dtype and shape with the same bits in every element
    (−0.0 ≠ +0.0); the AssertionError says where, how many elements differ and the first one.

        >>> assert_tensors_equal(torch.tensor([0.0]), torch.tensor([-0.0]), "w")
        Traceback (most recent call last):
        AssertionError: w: 1 of 1 elements differ; first at index (0,): got 0.0, expected -0.0
    """
    if not isinstance(actual, Tensor):
        raise AssertionError(f"{where}: got a {type(actual).__name__}, expected a torch.Tensor")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{where}: dtype {actual.dtype}, expected {expected.dtype}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{where}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    diff = _bits(actual) != _bits(expected)
    if bool(diff.any()):
        first = int(diff.nonzero()[0, 0])
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), expected.shape)) \
            if expected.dim() else ()
        got = actual.detach().cpu().reshape(-1)[first].item()
        want = expected.detach().cpu().reshape(-1)[first].item()
        raise AssertionError(f"{where}: {int(diff.sum())} of {diff.numel()} elements differ; first at index "
                             f"{index}: got {got!r}, expected {want!r}")


def assert_state_dicts_equal(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor], where: str) -> None:
    """Same names, each tensor bit-identical, and names that are one object in ``expected`` (tied
    weights) one object in ``actual`` too."""
    if set(actual) != set(expected):
        extra, missing = sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual))
        raise AssertionError(f"{where}: tensor names differ; unexpected {extra}, missing {missing}")
    for n, e in expected.items():
        assert_tensors_equal(actual[n], e, f"{where}, tensor {n!r}")
    first: dict[int, str] = {}
    for n, e in expected.items():
        if id(e) in first and actual[n] is not actual[first[id(e)]]:
            raise AssertionError(f"{where}: tensors {first[id(e)]!r} and {n!r} are tied (one object) in the "
                                 f"original but not in the result")
        first.setdefault(id(e), n)


@contextmanager
def _opened(archive: Any) -> Iterator[Any]:
    import tallfmt

    if isinstance(archive, tallfmt.Archive):
        yield archive
    else:
        with tallfmt.open(archive) as zoo:
            yield zoo


#: Tolerance of the recorded statistics: FORMAT.md fixes their float64 sums, not how the ratios are
#: formed from them (sqrt(a/b) or sqrt(a)/sqrt(b)), which may differ in the last bits.
STATS_REL_TOL = 1e-9


def _close(a: float | None, b: float | None, rel_tol: float) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=rel_tol * 1e-3)


def assert_roundtrip(base: Any, tasks: Mapping[str, Any], archive: Any, *,
                     check_alphas: Sequence[float] = (0.4, 1.0), check_ks: Sequence[int] | None = None,
                     check_merges: bool = True, check_stats: bool = True, **encode_kwargs: Any) -> None:
    """Check an archive against the independent :func:`reference` of what it must hold.

    ``archive`` is a path or an open :class:`tallfmt.Archive` made by
    ``tallfmt.encode(base, tasks, archive, **encode_kwargs)``. Checked, bit for bit: tasks and their
    order, λ, the header's encoding and metadata, every tensor's role, ``decode`` and
    ``decode_tensor`` of every task (names, dtypes, shapes, values; tied tensors one object,
    per-task tensors exactly as given), ``mask`` of every masked tensor, ``agreement``; with
    ``check_merges``, ``task_arithmetic`` for each α in ``check_alphas`` and ``consensus`` for each
    k in ``check_ks`` (default 0..T+1, with the first α); with ``check_stats``, the recorded
    per-task statistics (to ``STATS_REL_TOL``). θ0 (``zeroshot``) and the stored τ_MTL are always
    checked (τ_MTL by value, see ``_check_stored``).

        >>> tallfmt.encode(base, tasks, "zoo.tall", merge="ties", lambdas=0.5)  # doctest: +SKIP
        >>> assert_roundtrip(base, tasks, "zoo.tall", merge="ties", lambdas=0.5)  # doctest: +SKIP
    """
    ref = reference(base, tasks, **encode_kwargs)
    with _opened(archive) as zoo:
        where = str(zoo.path)
        if zoo.tasks != ref.tasks:
            raise AssertionError(f"{where}: tasks {zoo.tasks}, expected {ref.tasks}")
        if zoo.encoding != ref.encoding():
            raise AssertionError(f"{where}: header encoding {zoo.encoding}, expected {ref.encoding()}")
        if zoo.metadata != dict(ref.options["metadata"] or {}):
            raise AssertionError(f"{where}: metadata {zoo.metadata}, expected {ref.options['metadata']}")
        for t in ref.tasks:
            lam = zoo.task_info(t)["lambda"]
            if lam != ref.lambdas[t]:
                raise AssertionError(f"{where}: task {t!r} has λ {lam!r}, expected {ref.lambdas[t]!r}")
        _check_roles(zoo, ref, where)
        _check_stored(zoo, ref, where)
        for t in ref.tasks:
            expected = ref.decode(t)
            assert_state_dicts_equal(zoo.decode(t), expected, f"{where}: decode({t!r})")
            for n, e in expected.items():
                assert_tensors_equal(zoo.decode_tensor(t, n), e, f"{where}: decode_tensor({t!r}, {n!r})")
            for n, m in ref.masks[t].items():
                assert_tensors_equal(zoo.mask(t, n), m, f"{where}: mask({t!r}, {n!r})")
        assert_tensors_equal(zoo.agreement(), ref.agreement(), f"{where}: agreement()")
        if check_merges:
            _check_merges(zoo, ref, where, check_alphas, check_ks)
        if check_stats:
            for t in ref.tasks:
                got, want = zoo.task_info(t), ref.stats(t)
                for key, v in want.items():
                    if not _close(got.get(key), v, STATS_REL_TOL):
                        raise AssertionError(f"{where}: task {t!r} statistic {key} is {got.get(key)!r}, "
                                             f"expected {v!r}")


def _check_roles(zoo: Any, ref: Reference, where: str) -> None:
    if set(zoo.tensor_names) != set(ref.names):
        raise AssertionError(f"{where}: tensors {sorted(zoo.tensor_names)}, expected {sorted(ref.names)}")
    roles = zoo.roles
    for n in ref.names:
        if roles[n] != ref.roles[n]:
            raise AssertionError(f"{where}: tensor {n!r} has role {roles[n]!r}, expected {ref.roles[n]!r}")


def _check_stored(zoo: Any, ref: Reference, where: str) -> None:
    """θ0 (the zeroshot merge) and τ_MTL as stored. τ_MTL is compared by value: the encoder sums from
    +0.0 (0 + τ_1 + …) where FORMAT writes τ_1 + …, which differs only in the sign of some zeros —
    invisible in every decode and merge, since such a zero is always added to θ0 = +0.0."""
    assert_state_dicts_equal(_merge(zoo, "zeroshot"), ref.merge("zeroshot"), f"{where}: θ0 (merge('zeroshot'))")
    for n, m in ref._masked.items():
        tau = zoo.tau(n).reshape(-1)
        if tau.shape != m.tau_mtl.shape or bool((tau != m.tau_mtl).any()):
            assert_tensors_equal(tau, m.tau_mtl, f"{where}: stored τ_MTL of {n!r}")


def _merge(zoo: Any, method: str, **params: Any) -> dict[str, Tensor]:
    # the warnings say what the merge does with per-task tensors, or that k = T + 1 gives θ0: the
    # reference is checked against exactly that
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return zoo.merge(method, **params)


def _check_merges(zoo: Any, ref: Reference, where: str, alphas: Sequence[float], ks: Sequence[int] | None) -> None:
    for a in alphas:
        assert_state_dicts_equal(_merge(zoo, "task_arithmetic", alpha=a), ref.merge("task_arithmetic", alpha=a),
                                 f"{where}: merge('task_arithmetic', alpha={a})")
    alpha = alphas[0] if alphas else 0.4
    for k in (range(len(ref.tasks) + 2) if ks is None else ks):
        merged = _merge(zoo, "consensus", k=k, alpha=alpha)
        assert_state_dicts_equal(merged, ref.merge("consensus", k=k, alpha=alpha),
                                 f"{where}: merge('consensus', k={k}, alpha={alpha})")


def assert_archives_equal(a: Any, b: Any, *, check_alphas: Sequence[float] = (0.4,),
                          stats_rel_tol: float = STATS_REL_TOL) -> None:
    """Two archives hold the same collection: tasks (in order), λ, encoding, metadata, tensor table
    (names, roles, dtypes, shapes, alias targets; rows in any order), θ0, τ_MTL, every mask and
    per-task copy, every task's decode and the merges, bit for bit. Codecs may differ; the
    statistics may differ by rounding (``stats_rel_tol``; e.g. sharded encodes sum per shard).

        >>> assert_archives_equal("zoo.tall", "zoo-chunked.tall")               # doctest: +SKIP
    """
    with _opened(a) as za, _opened(b) as zb:
        where = f"{za.path} vs {zb.path}"
        for what in ("tasks", "encoding", "metadata", "roles"):  # roles: a dict, so row order is free
            va, vb = getattr(za, what), getattr(zb, what)
            if va != vb:
                raise AssertionError(f"{where}: {what} differ: {va} vs {vb}")
        for t in za.tasks:
            ia, ib = za.task_info(t), zb.task_info(t)
            if set(ia) != set(ib) or ia["lambda"] != ib["lambda"]:
                raise AssertionError(f"{where}: task {t!r} info differs: {ia} vs {ib}")
            for key in ia:
                if key not in ("name", "lambda") and not _close(ia[key], ib[key], stats_rel_tol):
                    raise AssertionError(f"{where}: task {t!r} statistic {key}: {ia[key]!r} vs {ib[key]!r}")
        rows_b = {e.name: e for e in zb.header.tensors}
        for ea in za.header.tensors:
            _compare_entries(za, zb, ea, rows_b[ea.name], where)
        for t in za.tasks:
            assert_state_dicts_equal(za.decode(t), zb.decode(t), f"{where}: decode({t!r})")
        assert_state_dicts_equal(_merge(za, "zeroshot"), _merge(zb, "zeroshot"), f"{where}: merge('zeroshot')")
        for alpha in check_alphas:
            assert_state_dicts_equal(_merge(za, "task_arithmetic", alpha=alpha),
                                     _merge(zb, "task_arithmetic", alpha=alpha),
                                     f"{where}: merge('task_arithmetic', alpha={alpha})")
            for k in range(len(za.tasks) + 2):
                assert_state_dicts_equal(_merge(za, "consensus", k=k, alpha=alpha),
                                         _merge(zb, "consensus", k=k, alpha=alpha),
                                         f"{where}: merge('consensus', k={k}, alpha={alpha})")
        assert_tensors_equal(za.agreement(), zb.agreement(), f"{where}: agreement()")


def _compare_entries(za: Any, zb: Any, ea: Any, eb: Any, where: str) -> None:
    """One tensor-table row of each archive: same fields, τ_MTL and masks (θ0 and per-task copies are
    compared through the zeroshot merge and every task's decode)."""
    here = f"{where}: tensor {ea.name!r}"
    for field in ("role", "dtype", "shape", "target"):
        if getattr(ea, field) != getattr(eb, field):
            raise AssertionError(f"{here}: {field} {getattr(ea, field)!r} vs {getattr(eb, field)!r}")
    if ea.role == "masked":
        assert_tensors_equal(za.tau(ea.name), zb.tau(eb.name), f"{here}: τ_MTL")
        for t in za.tasks:
            assert_tensors_equal(za.mask(t, ea.name), zb.mask(t, eb.name), f"{here}: mask of task {t!r}")
