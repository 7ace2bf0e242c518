"""Choosing λ per task, the residual budgets and the α of merges on the user's validation data. It
sits above both sides: it encodes (write) and decodes (read)."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tallfmt.errors import InputError
from tallfmt.format.header import align
from tallfmt.read.archive import open as open_archive
from tallfmt.read.merges import DEFAULT_MERGE
from tallfmt.summary import summary
from tallfmt.write.pipeline import encode

if TYPE_CHECKING:
    import torch


DEFAULT_LAMBDA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _check_grid(name: str, grid: Any) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in grid)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a sequence of numbers, got {grid!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise InputError(f"{name} must be a non-empty sequence of finite numbers, got {grid!r}")
    return values


def select_lambdas(base: Any, tasks: Mapping[str, Any], evaluate: Callable[[str, dict[str, torch.Tensor]], float],
                   *, grid: Any = DEFAULT_LAMBDA_GRID, workdir: str | Path | None = None,
                   scores: dict[str, dict[float, float]] | None = None, **encode_kwargs: Any) -> dict[str, float]:
    """Pick each task's λ from ``grid`` by ``evaluate(task, state_dict) -> score`` (higher is better).

    One archive per grid value is encoded into ``workdir`` (a temporary folder by default) and each
    task decoded from it in turn, so at most one decoded model is held at a time. Ties go to the
    first grid value. ``scores``, if given, is filled with {task: {λ: score}}.

        >>> lams = select_lambdas("base.safetensors", {"a": "a.safetensors"},
        ...                       lambda task, sd: accuracy(sd, task, "validation"))   # doctest: +SKIP
        >>> encode("base.safetensors", {"a": "a.safetensors"}, "zoo.tall", lambdas=lams)  # doctest: +SKIP
    """
    values = _check_grid("grid", grid)
    if any(v <= 0 for v in values):
        raise InputError(f"λ grid values must be > 0, got {values}")
    if "lambdas" in encode_kwargs:
        raise InputError("select_lambdas chooses lambdas itself; do not pass lambdas=")
    table: dict[str, dict[float, float]] = {t: {} for t in tasks}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="tallfmt-lambdas-") as tmp:
        for lam in values:
            path = Path(tmp) / "sweep.tall"
            encode(base, tasks, path, lambdas=lam, overwrite=True, **encode_kwargs)
            with open_archive(path) as zoo:
                for t in zoo.tasks:
                    table[t][lam] = float(evaluate(t, zoo.decode(t)))
    if scores is not None:
        scores.update(table)
    return {t: max(values, key=lambda v: (table[t][v], -values.index(v))) for t in table}


def select_alpha(archive: Any, evaluate: Callable[[str, dict[str, torch.Tensor]], float], *,
                 method: str = DEFAULT_MERGE, grid: Any = DEFAULT_ALPHA_GRID, tasks: list[str] | None = None,
                 scores: dict[float, float] | None = None, **params: Any) -> float:
    """Pick the α of a merge from ``grid`` by the mean of ``evaluate(task, merged)`` over ``tasks``.

    Holds one merged model at a time. ``archive`` is an open Archive. Ties go to the first grid value.

        >>> alpha = select_alpha(zoo, lambda t, sd: accuracy(sd, t, "validation"),
        ...                      method="consensus", k=2)                           # doctest: +SKIP
    """
    values = _check_grid("grid", grid)
    names = list(tasks) if tasks is not None else archive.tasks
    table: dict[float, float] = {}
    for a in values:
        merged = archive.merge(method, alpha=a, **params)
        table[a] = sum(float(evaluate(t, merged)) for t in names) / max(1, len(names))
        del merged
    if scores is not None:
        scores.update(table)
    return max(values, key=lambda v: (table[v], -values.index(v)))


DEFAULT_BUDGET_GRID = (0.0, 0.1, 0.25, 0.5, 1.0)
#: Cost buckets of the knapsack: each option's bytes are rounded up to 1/this of the space the tasks
#: share, so a choice never exceeds the limit through rounding.
KNAPSACK_BUCKETS = 4096


@dataclass
class ResidualSelection:
    """What :func:`select_residuals` chose: λ and the residual budget (bits per masked parameter) per
    task, the validation scores of every grid point {task: {(λ, bits): score}}, and the size of the
    archive encoded with the choice against the limit and the paper's formula."""

    lambdas: dict[str, float]
    residual: dict[str, float]
    scores: dict[str, dict[tuple[float, float], float]]
    archive_bytes: int
    limit_bytes: int
    paper_bytes: int
    costs: dict[str, dict[tuple[float, float], int]]  # the bytes the knapsack counts per task and grid point
    fixed_bytes: int                                  # and for the rest of the archive

    @property
    def ratio(self) -> float:
        """The chosen archive's size / the paper's formula (64+T)·P' + 32·F bits (as ``tallfmt info``)."""
        return self.archive_bytes / self.paper_bytes


def select_residuals(base: Any, tasks: Mapping[str, Any], evaluate: Callable[[str, dict[str, torch.Tensor]], float],
                     *, max_ratio: float, lambda_grid: Any = DEFAULT_LAMBDA_GRID, budget_grid: Any = DEFAULT_BUDGET_GRID,
                     path: str | Path | None = None, workdir: str | Path | None = None,
                     **encode_kwargs: Any) -> ResidualSelection:
    """Pick each task's λ and residual budget together on ``evaluate(task, state_dict) -> score`` (higher
    is better) so that the archive is at most ``max_ratio`` × the paper's storage formula
    (64+T)·P' + 32·F bits (``tallfmt info``'s "paper formula"): the largest sum of the tasks' scores that
    fits, a multiple-choice knapsack over the grid (ties: the smaller archive).

    One archive per (λ, budget) of the grids is encoded into ``workdir`` (a temporary folder by default):
    task t's mask depends on its own λ only and its residual on its own (λ, budget), so that archive
    gives every task's model and stored bytes at that grid point. Each task is decoded and scored in
    turn: at most one decoded model is held at a time. The cost of a choice is the task's mask and
    residual bytes, the rest of the archive (θ0, τ_MTL, ...) its largest size over the sweep. The
    choice is then encoded (to ``path``, if given) and measured; should it come out over the limit,
    the knapsack runs again with that much less room (at most three times). InputError when even the
    cheapest choice does not fit. ``encode_kwargs`` go to every encode (not ``lambdas``/``residual``).

        >>> sel = select_residuals("base.safetensors", {"a": "a.safetensors", "b": "b.safetensors"},
        ...                        lambda task, sd: accuracy(sd, task, "validation"), max_ratio=0.7)  # doctest: +SKIP
        >>> encode("base.safetensors", {...}, "zoo.tall", lambdas=sel.lambdas, residual=sel.residual)  # doctest: +SKIP
    """
    lams = _check_grid("lambda_grid", lambda_grid)
    if any(v <= 0 for v in lams):
        raise InputError(f"λ grid values must be > 0, got {lams}")
    budgets = _check_grid("budget_grid", budget_grid)
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not math.isfinite(max_ratio) \
            or max_ratio <= 0:
        raise InputError(f"max_ratio must be a finite number > 0, got {max_ratio!r}")
    for key in ("lambdas", "residual"):
        if key in encode_kwargs:
            raise InputError(f"select_residuals chooses {key} itself; do not pass {key}=")
    scores: dict[str, dict[tuple[float, float], float]] = {t: {} for t in tasks}
    costs: dict[str, dict[tuple[float, float], int]] = {t: {} for t in tasks}
    fixed = paper = 0
    with tempfile.TemporaryDirectory(dir=workdir, prefix="tallfmt-residuals-") as tmp:
        sweep = Path(tmp) / "sweep.tall"
        for lam in lams:
            for b in budgets:
                encode(base, tasks, sweep, lambdas=lam, residual=b, overwrite=True, **encode_kwargs)
                with open_archive(sweep) as zoo:
                    own = {t: _task_bytes(zoo, i) for i, t in enumerate(zoo.tasks)}
                    fixed = max(fixed, zoo.sizes()["total"] - sum(own.values()))
                    paper = summary(zoo)["paper_formula"]["bytes"]
                    for t in zoo.tasks:
                        costs[t][(lam, b)] = own[t]
                        scores[t][(lam, b)] = float(evaluate(t, zoo.decode(t)))
        limit = math.floor(max_ratio * paper)
        room = limit - fixed
        final = Path(path) if path is not None else Path(tmp) / "chosen.tall"
        for _ in range(3):
            choice = _knapsack(scores, costs, room, limit, paper)
            lambdas = {t: c[0] for t, c in choice.items()}
            residual = {t: c[1] for t, c in choice.items()}
            encode(base, tasks, final, lambdas=lambdas, residual=residual, overwrite=True, **encode_kwargs)
            with open_archive(final) as zoo:
                size = zoo.sizes()["total"]
            if size <= limit:
                break
            room -= size - limit
        else:
            raise InputError(f"the chosen archive is {size:,} bytes, over the limit of {limit:,} bytes "
                             f"({max_ratio} × the paper's formula) after three tries; lower the budgets in budget_grid")
    return ResidualSelection(lambdas, residual, scores, size, limit, paper, costs, fixed)


def _task_bytes(zoo: Any, i: int) -> int:
    """Bytes of the archive that belong to task i alone: its masks and residual segments (each with the
    padding that aligns it, up to 64 bytes) and its residual entries in the header."""
    own = 0
    for e in zoo.header.tensors:
        if e.role == "masked":
            own += align(e.masks[i].length)
            r = e.residual(i)
            if r is not None:
                own += align(r.positions.length) + align(r.values.length) + len(json.dumps(r.to_json())) + 1
    return own


def _knapsack(scores: dict[str, dict[tuple[float, float], float]], costs: dict[str, dict[tuple[float, float], int]],
              room: int, limit: int, paper: int) -> dict[str, tuple[float, float]]:
    """One grid point per task: the largest total score whose costs fit in ``room`` bytes (each cost
    rounded up to a bucket of room / KNAPSACK_BUCKETS); ties go to the smaller total cost."""
    cheapest = sum(min(c.values()) for c in costs.values())
    if room <= 0 or cheapest > room:
        raise InputError(f"no choice fits: the limit is {limit:,} bytes ({limit / paper:.3f} × the paper's formula) and "
                         f"the smallest choice needs about {limit - room + cheapest:,} (raise max_ratio)")
    unit = room / KNAPSACK_BUCKETS
    # best[c] = (total score, −total bytes, choices) over the tasks so far, c buckets used
    best: list[tuple[float, int, tuple] | None] = [None] * (KNAPSACK_BUCKETS + 1)
    best[0] = (0.0, 0, ())
    for t in scores:
        nxt: list[tuple[float, int, tuple] | None] = [None] * (KNAPSACK_BUCKETS + 1)
        for c, cur in enumerate(best):
            if cur is None:
                continue
            for key, v in scores[t].items():
                w = costs[t][key]
                c2 = c + math.ceil(w / unit)
                if c2 > KNAPSACK_BUCKETS:
                    continue
                cand = (cur[0] + v, cur[1] - w, cur[2] + ((t, key),))
                if nxt[c2] is None or cand[:2] > nxt[c2][:2]:
                    nxt[c2] = cand
        best = nxt
    top = max((b for b in best if b is not None), key=lambda b: b[:2])
    return dict(top[2])
