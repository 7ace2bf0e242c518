"""Choosing λ per task and the α of merges on the user's validation data. It sits above both sides:
it encodes (write) and decodes (read)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tallfmt.errors import InputError
from tallfmt.read.archive import open as open_archive
from tallfmt.read.merges import DEFAULT_MERGE
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
