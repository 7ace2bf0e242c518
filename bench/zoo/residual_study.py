"""Residual study (prototype for issue 17): what a per-task sparse residual r_t ≈ τ_t − m_t∘τ_MTL buys the
tasks TALL masks serve worst, on the real zoo, and what it costs in bytes.

    .venv/bin/python -m bench.zoo.residual_study [--zoo DIR] [--tasks T ...] [--out bench/_out/residual_study]

Only tallfmt's public API is used (encode, Archive.decode / mask / tau / header, summary, CODECS); the
residual is computed and applied here, outside the library:

    d_t    = τ_t − m_t∘τ_MTL over the task's masked tensors, float32 (τ_t = θ_t − θ0 rounded once)
    r_t    = the k entries of largest |d_t|, chosen globally over all masked tensors (exact top-k; ties
             go to the lower flat index)
    θ̂_t    = decode(t) + r_t (the value rounded to the residual's dtype, then added in float32)

Stored bits of r_t are measured, not estimated: per masked tensor a u32 count; positions as u32 gaps
(first = flat index, then index − previous − 1, restarting at each tensor) in one segment, values in the
chosen dtype in a second, both with tallfmt's ``byteplane-zstd`` codec. A budget of b bits per parameter
is the largest k whose measured bytes fit in b·P'/8. Other position codings (zstd, LEB128 varints + zstd,
the order-0 entropy of the gaps, Elias–Fano) and value dtypes are measured beside it.

Steps (each cached in OUT/cache.json; a re-run reuses finished steps):

1. Sweep: one archive per λ of the grid (task arithmetic, codec auto; with task arithmetic τ_MTL does not
   depend on λ, so task t's mask in the λ archive is its mask at λ). For every task, λ and budget: the
   validation accuracy of θ̂_t, the residual's bytes and the task's mask bytes. One decoded model at a time
   (the budgets' residuals are nested, so each budget adds its new entries to the same decoded model).
2. λ per task on validation at budget 0 (TALL as bench/zoo/evaluate.py does; ties to the first λ); the
   archive with those λ; per task and budget the test accuracy of θ̂_t and the archive + residual bytes.
   At the largest budget, the same positions with each value dtype (float32, float16, bfloat16).
3. Tasks still below 98 % at the largest budget: larger budgets (--reach-budgets) on test, to say what it
   would take (a diagnostic, not a selection).
4. λ and budget together per task on validation under size limits (× the paper's formula
   (64+T)·P' + 32·F bits): a multiple-choice knapsack per limit and objective (the mean normalized
   validation accuracy; or first the shortfall below 98 %, then the mean), and the cheapest (λ, budget)
   per task reaching 98 % normalized accuracy on validation. Each choice is encoded for real and scored
   on test.

Output: a section "Residual study (prototype)" in bench/RESULTS.md (or --results), OUT/report.md and
OUT/results.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: python bench/zoo/residual_study.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "bench.zoo"

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see build.py: spinning OpenMP waits hurt on 2 shared cores

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import platform
import shlex
import time
from typing import Any

import numpy as np
import torch
import zstandard
from safetensors import safe_open

import tallfmt
from tallfmt.summary import summary as archive_summary

from .config import write_json_atomic
from .evaluate import StepCache, log, replace_section
from .evaluate_lib import ZooEvaluator

STUDY_VERSION = "residual-study/1"  # bump when a cached step's meaning changes
REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "bench" / "_out" / "residual_study"
DEFAULT_RESULTS = REPO / "bench" / "RESULTS.md"
SECTION_PREFIX = "## Residual study (prototype)"
TARGET_NORM = 0.98
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
PLANES = tallfmt.CODECS["byteplane-zstd"]


@dataclasses.dataclass(frozen=True)
class Settings:
    lambda_grid: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
    budgets: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)  # residual bits per masked parameter
    value_dtype: str = "bfloat16"
    limits: tuple[float, ...] = (0.7, 0.75, 0.8)  # total size limits for the joint choice, × the paper's formula
    reach_budgets: tuple[float, ...] = (2.0, 4.0)  # tried on test for the tasks still below 98 % at the largest budget

    def key(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ residual coding

@dataclasses.dataclass
class Layout:
    """The archive's masked tensors in table order, as one flat index space."""
    names: list[str]
    offsets: np.ndarray  # int64, len(names) + 1

    @classmethod
    def of(cls, zoo: tallfmt.Archive) -> "Layout":
        names = [n for n in zoo.tensor_names if zoo.roles[n] == "masked"]
        sizes = [math.prod(zoo.entry(n).shape) for n in names]
        return cls(names, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    @property
    def numel(self) -> int:
        return int(self.offsets[-1])

    def split(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tensor number, index inside the tensor) of sorted flat positions."""
        tid = np.searchsorted(self.offsets, pos, side="right") - 1
        return tid, pos - self.offsets[tid]


def residual(zoo: tallfmt.Archive, layout: Layout, task: str, theta0: dict[str, torch.Tensor],
             ft_path: Path) -> np.ndarray:
    """d_t = τ_t − m_t∘τ_MTL over the masked tensors, flat float32, streamed tensor by tensor."""
    d = np.empty(layout.numel, dtype=np.float32)
    with safe_open(str(ft_path), "pt") as f:
        for i, name in enumerate(layout.names):
            tau_t = (f.get_tensor(name).double() - theta0[name].double()).float()
            part = tau_t - zoo.mask(task, name).float() * zoo.tau(name)
            d[layout.offsets[i]:layout.offsets[i + 1]] = part.reshape(-1).numpy()
    return d


def ranked(d: np.ndarray, kmax: int) -> np.ndarray:
    """Flat positions of the kmax largest |d|, largest first (ties: lower position first)."""
    a = np.abs(d)
    kmax = min(kmax, a.size)
    part = np.argpartition(a, a.size - kmax)[a.size - kmax:]
    thr = a[part].min()
    cand = np.flatnonzero(a >= thr)  # every entry tied with the threshold, so the tie rule is exact
    order = np.lexsort((cand, -a[cand]))
    return cand[order[:kmax]]


def gaps(layout: Layout, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted flat positions -> (u32 gaps restarting at each tensor, per-tensor counts)."""
    tid, local = layout.split(pos)
    g = np.empty(len(pos), dtype=np.int64)
    if len(pos):
        g[0] = local[0]
        g[1:] = local[1:] - local[:-1] - 1
        first = np.ones(len(pos), dtype=bool)
        first[1:] = tid[1:] != tid[:-1]
        g[first] = local[first]
    counts = np.bincount(tid, minlength=len(layout.names))
    return g.astype("<u4"), counts


def value_bits(vals: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(values rounded to dtype, back in float32; their stored bit patterns as bytes)."""
    v = torch.from_numpy(vals).to(dtype)
    return v.float().numpy(), v.view(BITS_VIEW[dtype]).numpy().view(np.uint8)


def coded_bytes(layout: Layout, pos: np.ndarray, vals: np.ndarray, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the residual as the study stores it (see the module docstring)."""
    g, counts = gaps(layout, pos)
    _, vb = value_bits(vals, dtype)
    out = {"counts": 4 * len(counts), "positions": len(PLANES.encode(g.view(np.uint8), 4)),
           "values": len(PLANES.encode(vb, dtype.itemsize)) if len(vals) else 0}
    out["total"] = sum(out.values())
    return out


def varint(g: np.ndarray) -> np.ndarray:
    """LEB128 bytes of non-negative integers < 2**35."""
    g = g.astype(np.uint64)
    n = np.ones(len(g), dtype=np.int64)
    for s in (7, 14, 21, 28):
        n += (g >> np.uint64(s)) > 0
    out = np.empty(int(n.sum()), dtype=np.uint8)
    start = np.cumsum(n) - n
    for j in range(5):
        sel = n > j
        low = ((g[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        out[start[sel] + j] = low | ((n[sel] > j + 1).astype(np.uint8) << 7)
    return out


def coding_alternatives(layout: Layout, pos: np.ndarray, vals: np.ndarray) -> dict[str, float]:
    """Bits per entry of other position codings and value dtypes, for the report."""
    k = max(1, len(pos))
    g, counts = gaps(layout, pos)
    z1, z19 = zstandard.ZstdCompressor(level=1), zstandard.ZstdCompressor(level=19)
    _, uniq = np.unique(g, return_counts=True)
    p = uniq / k
    sizes = np.diff(layout.offsets)
    nz = counts > 0
    ef = float(np.sum(counts[nz] * (2 + np.maximum(0, np.ceil(np.log2(sizes[nz] / counts[nz]))))))
    out = {
        "pos: u32 gaps, byteplane-zstd": len(PLANES.encode(g.view(np.uint8), 4)) * 8 / k,
        "pos: u32 gaps, zstd 1": len(z1.compress(g.tobytes())) * 8 / k,
        "pos: u32 gaps, zstd 19": len(z19.compress(g.tobytes())) * 8 / k,
        "pos: LEB128 gaps, zstd 1": len(z1.compress(varint(g).tobytes())) * 8 / k,
        "pos: order-0 entropy of the gaps (bound)": float(-(p * np.log2(p)).sum()),
        "pos: Elias–Fano per tensor": ef / k,
    }
    ref = np.linalg.norm(vals.astype(np.float64)) or 1.0
    for name, dt in DTYPES.items():
        r, vb = value_bits(vals, dt)
        out[f"val: {name}, byteplane-zstd"] = len(PLANES.encode(vb, dt.itemsize)) * 8 / k
        out[f"val: {name}, relative rounding error"] = float(np.linalg.norm((r - vals).astype(np.float64)) / ref)
    return out


def fit_budget(layout: Layout, d: np.ndarray, top: np.ndarray, budget_bits: float,
               dtype: torch.dtype) -> tuple[int, dict[str, int]]:
    """The largest k (to 0.5 %) whose measured bytes fit in budget_bits / 8."""
    if budget_bits <= 0:
        return 0, {"counts": 0, "positions": 0, "values": 0, "total": 0}
    limit = budget_bits / 8

    def measure(k: int) -> dict[str, int]:
        pos = np.sort(top[:k])
        return coded_bytes(layout, pos, d[pos], dtype)

    k = max(1, min(len(top), int(budget_bits / 16)))
    for _ in range(4):  # bits per entry change slowly with k: a few fixed-point steps converge
        b = measure(k)
        k_new = max(1, min(len(top), int(k * limit / b["total"])))
        if abs(k_new - k) <= 0.002 * k:
            break
        k = k_new
    b = measure(k)
    while b["total"] > limit and k > 1:
        k = max(1, int(k * 0.995))
        b = measure(k)
    if k == len(top) and b["total"] < 0.99 * limit:
        raise SystemExit(f"budget {budget_bits / layout.numel:g} bits/param needs more than the "
                         f"{len(top):,} ranked entries")
    return k, b


def add_residual(sd: dict[str, torch.Tensor], layout: Layout, pos: np.ndarray, vals: np.ndarray) -> None:
    """sd[tensor].flat[i] += value, in place, for sorted flat positions (each position once)."""
    tid, local = layout.split(pos)
    bounds = np.flatnonzero(np.diff(tid)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(pos)]])):
        if hi > lo:
            flat = sd[layout.names[tid[lo]]].view(-1)
            idx = torch.from_numpy(local[lo:hi])
            flat[idx] += torch.from_numpy(vals[lo:hi]).to(flat.dtype)


# ---------------------------------------------------------------------------------------------- the study

class Study:
    def __init__(self, zoo_dir: Path | None, tasks: list[str] | None, out: Path, settings: Settings,
                 fresh: bool = False):
        self.s = settings
        self.ev = ZooEvaluator(zoo_dir)
        built = self.ev.tasks
        if tasks:
            missing = [t for t in tasks if t not in built]
            if missing:
                raise SystemExit(f"tasks {missing} are not built in {self.ev.dir}; built: {built}")
        self.tasks = list(tasks or built)
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.cache = StepCache(out / "cache.json", enabled=not fresh)
        m = self.ev.manifest
        self.base = self.ev.path("theta0")
        self.ft = {t: self.ev.path(t) for t in self.tasks}
        self.zoo_key = {"version": STUDY_VERSION, "tallfmt": tallfmt.__version__, "theta0": m["base"]["sha256"],
                        "tasks": {t: m["tasks"][t]["finetuned"]["sha256"] for t in self.tasks},
                        "heads": {t: m["tasks"][t]["head"]["sha256"] for t in self.tasks}}
        self.theta0 = self.ev.state_dict("theta0")
        self.reused_seconds = 0.0  # what the steps taken from the cache took when they were computed
        self.dtype = DTYPES[settings.value_dtype]
        self.acc_ft = {sp: {t: self.ev.recorded(t, "finetuned", sp) for t in self.tasks} for sp in ("validation", "test")}
        self.acc_zs = {sp: {t: self.ev.recorded(t, "zeroshot", sp) for t in self.tasks} for sp in ("validation", "test")}

    def key(self, step: str, **params: Any) -> str:
        blob = json.dumps({"zoo": self.zoo_key, "step": step, **params}, sort_keys=True, default=str)
        return f"{step}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def cached(self, step: str, fn, **params: Any) -> Any:
        k = self.key(step, **params)
        hit = self.cache.get(k)
        if hit is not None:
            self.reused_seconds += self.cache.seconds(k)
            return hit
        t = time.perf_counter()
        value = fn()
        return self.cache.put(k, step, value, time.perf_counter() - t)

    def archive(self, name: str, lambdas: float | dict[str, float]) -> Path:
        """out/<name>.tall: task arithmetic, codec auto, these λ (reused when its key matches)."""
        path = self.out / f"{name}.tall"
        k = self.key("archive", lambdas=lambdas)
        if path.exists():
            with tallfmt.open(path) as z:
                if z.metadata.get("residual_study_key") == k:
                    return path
        t = time.perf_counter()
        tallfmt.encode(self.base, self.ft, path, merge="task_arithmetic", lambdas=lambdas, codec="auto",
                       metadata={"residual_study_key": k})
        log(f"encoded {path.name} in {time.perf_counter() - t:.1f} s")
        return path

    @staticmethod
    def mask_bytes(zoo: tallfmt.Archive) -> dict[str, int]:
        out = dict.fromkeys(zoo.tasks, 0)
        for e in zoo.header.tensors:
            if e.role == "masked":
                for t, m in zip(zoo.tasks, e.masks):
                    out[t] += m.length
        return out

    def sizes(self, path: Path) -> dict[str, Any]:
        with tallfmt.open(path) as z:
            s = archive_summary(z)
            return {"total": s["bytes"]["total"], "paper": s["paper_formula"]["bytes"], "masks": self.mask_bytes(z),
                    "P": s["params"]["masked"], "F": s["params"]["shared"],
                    "lambdas": {t: z.task_info(t)["lambda"] for t in z.tasks}}

    def scored(self, zoo: tallfmt.Archive, layout: Layout, task: str, budgets: list[float], split: str,
               extra: bool = False) -> dict[str, dict]:
        """Accuracy on ``split`` and residual bytes of θ̂ for each budget (ascending, nested residuals)."""
        d = residual(zoo, layout, task, self.theta0, self.ft[task])
        # every entry costs more than 8 bits (a bf16 value alone is ~8): b·P'/8 entries are enough
        top = ranked(d, min(layout.numel, math.ceil(max(budgets) * layout.numel / 8) + 1))
        sd = zoo.decode(task)
        out, k_prev = {}, 0
        for b in sorted(budgets):
            k, nbytes = fit_budget(layout, d, top, b * layout.numel, self.dtype)
            new = np.sort(top[k_prev:k])
            vals, _ = value_bits(d[new], self.dtype)
            add_residual(sd, layout, new, vals)
            k_prev = k
            row = {"k": k, "bytes": nbytes, "acc": self.ev.accuracy(sd, task, split),
                   "threshold": float(abs(d[top[k - 1]])) if k else None,
                   "energy": float(np.sum(np.square(d[top[:k]], dtype=np.float64)) / np.sum(np.square(d, dtype=np.float64)))}
            if extra and k:
                pos = np.sort(top[:k])
                row["coding"] = coding_alternatives(layout, pos, d[pos])
            out[str(b)] = row
        del sd
        if extra:  # the largest budget's positions with every value dtype
            k = out[str(max(budgets))]["k"]
            pos = np.sort(top[:k])
            out["dtypes"] = {}
            for name, dt in DTYPES.items():
                if dt == self.dtype:
                    out["dtypes"][name] = out[str(max(budgets))]["acc"]
                    continue
                sd = zoo.decode(task)
                vals, _ = value_bits(d[pos], dt)
                add_residual(sd, layout, pos, vals)
                out["dtypes"][name] = self.ev.accuracy(sd, task, split)
                del sd
        return out

    # -- steps
    def sweep(self) -> dict[str, Any]:
        res: dict[str, Any] = {"val": {}, "sizes": {}}
        for lam in self.s.lambda_grid:
            path = self.archive(f"sweep-{lam:g}", lam)
            res["sizes"][str(lam)] = self.sizes(path)
            with tallfmt.open(path) as zoo:
                layout = Layout.of(zoo)
                for task in self.tasks:
                    t = time.perf_counter()
                    got = self.cached("validation", lambda: self.scored(zoo, layout, task, list(self.s.budgets),
                                                                         "validation"),
                                      lam=lam, task=task, budgets=self.s.budgets, dtype=self.s.value_dtype)
                    res["val"].setdefault(task, {})[str(lam)] = got
                    log(f"λ={lam:g} {task}: validation " + " ".join(
                        f"{b}:{got[str(b)]['acc']:.3f}" for b in self.s.budgets)
                        + f" (ft {self.acc_ft['validation'][task]:.3f}; {time.perf_counter() - t:.0f} s)")
        return res

    def test_at(self, name: str, choice: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """Encode the archive with these λ, score each task at its budget on test."""
        lambdas = {t: lam for t, (lam, _) in choice.items()}
        path = self.archive(name, lambdas)
        size = self.sizes(path)
        acc, res_bytes = {}, {}
        with tallfmt.open(path) as zoo:
            layout = Layout.of(zoo)
            for task, (lam, b) in choice.items():
                got = self.cached("test", lambda: self.scored(zoo, layout, task, [b], "test"),
                                  lam=lam, task=task, budgets=[b], dtype=self.s.value_dtype)
                acc[task] = got[str(b)]["acc"]
                res_bytes[task] = got[str(b)]["bytes"]["total"]
        total = size["total"] + sum(res_bytes.values())
        return {"choice": {t: list(c) for t, c in choice.items()}, "acc": acc, "residual_bytes": res_bytes,
                "archive_bytes": size["total"], "total_bytes": total, "paper": size["paper"],
                "ratio": total / size["paper"]}

    def run(self) -> dict[str, Any]:
        t_run = time.perf_counter()
        s = self.s
        log(f"zoo {self.ev.dir}: {len(self.tasks)} tasks: {', '.join(self.tasks)}")
        sweep = self.sweep()
        grid = list(s.lambda_grid)
        lam0 = {t: max(grid, key=lambda v: (sweep["val"][t][str(v)]["0.0"]["acc"], -grid.index(v)))
                for t in self.tasks}
        log("λ per task at budget 0: " + ", ".join(f"{t}={v:g}" for t, v in lam0.items()))

        # per task × budget at λ0, on test
        path = self.archive("tall", lam0)
        size0 = self.sizes(path)
        table: dict[str, Any] = {}
        with tallfmt.open(path) as zoo:
            layout = Layout.of(zoo)
            for task in self.tasks:
                t = time.perf_counter()
                table[task] = self.cached("test_budgets", lambda: self.scored(zoo, layout, task, list(s.budgets),
                                                                               "test", extra=True),
                                          lam=lam0[task], task=task, budgets=s.budgets, dtype=s.value_dtype)
                log(f"test {task} λ={lam0[task]:g}: " + " ".join(
                    f"{b}:{table[task][str(b)]['acc']:.3f}" for b in s.budgets)
                    + f" (ft {self.acc_ft['test'][task]:.3f}; {time.perf_counter() - t:.0f} s)")

        # what it would take: larger budgets for the tasks still below 98 % at the largest one (on test:
        # a diagnostic, not a selection)
        reach = {}
        if s.reach_budgets:
            with tallfmt.open(path) as zoo:
                layout = Layout.of(zoo)
                for task in self.tasks:
                    if table[task][str(max(s.budgets))]["acc"] / self.acc_ft["test"][task] < TARGET_NORM:
                        reach[task] = self.cached("test", lambda: self.scored(zoo, layout, task, list(s.reach_budgets),
                                                                              "test"),
                                                  lam=lam0[task], task=task, budgets=list(s.reach_budgets),
                                                  dtype=s.value_dtype)
                        log(f"reach {task}: " + " ".join(f"{b}:{reach[task][str(b)]['acc']:.3f}" for b in s.reach_budgets))

        # λ and budget together under each size limit
        joint = self.joint(sweep, size0["paper"])
        picked: dict[str, Any] = {"fixed_bytes": joint["fixed_bytes"], "rules": {}}
        tested: dict[str, dict] = {}  # rules that chose the same λ and budgets share one test
        for i, (rule, choice) in enumerate(joint["rules"].items()):
            if choice is None:
                picked["rules"][rule] = None
                continue
            k = json.dumps(choice["choice"], sort_keys=True)
            if k not in tested:
                tested[k] = self.test_at(f"joint-{len(tested)}", choice["choice"])
            picked["rules"][rule] = {**tested[k], "estimate": choice}
            log(f"{rule}: {tested[k]['ratio']:.3f}× the formula; test "
                + " ".join(f"{t}={a:.3f}" for t, a in tested[k]["acc"].items()))
        return {"tasks": self.tasks, "settings": s.key(), "zoo": str(self.ev.dir), "sweep": sweep,
                "lambda0": lam0, "size0": size0, "table": table, "reach": reach, "joint": picked,
                "acc_ft": self.acc_ft, "acc_zs": self.acc_zs, "seconds": time.perf_counter() - t_run,
                "reused_seconds": self.reused_seconds}

    def options(self, sweep: dict[str, Any]) -> tuple[int, dict[str, list[Option]]]:
        """(bytes that do not depend on λ, per task every (λ, budget) with its bytes and validation score)."""
        sizes = sweep["sizes"]
        # θ0, τ_MTL, shared tensors, header: the largest over the sweep (the header's stats vary a little)
        fixed = max(v["total"] - sum(v["masks"].values()) for v in sizes.values())
        out = {}
        for t in self.tasks:
            out[t] = [Option(lam, b, sizes[str(lam)]["masks"][t] + sweep["val"][t][str(lam)][str(b)]["bytes"]["total"],
                             sweep["val"][t][str(lam)][str(b)]["acc"] / self.acc_ft["validation"][t])
                      for lam in self.s.lambda_grid for b in self.s.budgets]
        return fixed, out

    def joint(self, sweep: dict[str, Any], paper: int) -> dict[str, Any]:
        """Per task one (λ, budget), chosen on validation: a knapsack under each size limit for each
        objective, and the cheapest option reaching 98 % (the best one where none does)."""
        fixed, options = self.options(sweep)
        out: dict[str, Any] = {"fixed_bytes": fixed, "rules": {}}
        for limit in self.s.limits:
            for objective in OBJECTIVES:
                got = knapsack(options, fixed, limit * paper, objective)
                out["rules"][f"{objective} ≤ {limit:g}×"] = got and {**got, "limit": limit, "objective": objective}
                if got is None:
                    log(f"{objective} ≤ {limit:g}×: infeasible")
        choice, est = {}, fixed
        for t, opts in options.items():
            ok = [o for o in opts if o.score >= TARGET_NORM]
            o = min(ok, key=lambda o: o.bytes) if ok else max(opts, key=lambda o: (o.score, -o.bytes))
            choice[t] = (o.lam, o.budget)
            est += o.bytes
        out["rules"]["cheapest ≥ 98 %"] = {"choice": choice, "estimated_bytes": est, "limit": None,
                                           "objective": "cheapest"}
        return out


@dataclasses.dataclass(frozen=True)
class Option:
    lam: float
    budget: float
    bytes: int     # the task's mask bytes at λ + its residual's bytes at the budget
    score: float   # normalized validation accuracy


#: knapsack objectives: "mean" maximises the mean normalized validation accuracy; "shortfall" first
#: minimises the total shortfall below 98 % (every task up to 98 % before any goes beyond), then the mean
OBJECTIVES = ("mean", "shortfall")


def knapsack(options: dict[str, list[Option]], fixed: int, limit: float, objective: str,
             unit: int = 4096) -> dict[str, Any] | None:
    """One option per task maximising the objective with fixed + Σ bytes ≤ limit (a multiple-choice
    knapsack on integer scores, costs in ``unit`` bytes rounded up); None when even the smallest
    options do not fit. Ties: the cheapest total, then the earlier options (smaller λ and budget)."""
    tasks = list(options)
    cap = int((limit - fixed) // unit)
    cost = {t: [math.ceil(o.bytes / unit) for o in options[t]] for t in tasks}
    if cap < sum(min(c) for c in cost.values()):
        return None

    def score(o: Option) -> int:
        if objective == "mean":
            return round(1e6 * o.score)
        return round(1e5 * min(o.score, TARGET_NORM)) * 2_000_000 + round(1e5 * o.score)

    neg = np.iinfo(np.int64).min // 4
    dp = np.full(cap + 1, neg, dtype=np.int64)
    dp[0] = 0
    pick = np.zeros((len(tasks), cap + 1), dtype=np.int16)
    for i, t in enumerate(tasks):
        new = np.full(cap + 1, neg, dtype=np.int64)
        for j, o in enumerate(options[t]):
            c = cost[t][j]
            if c > cap:
                continue
            cand = np.full(cap + 1, neg, dtype=np.int64)
            cand[c:] = dp[:cap + 1 - c] + score(o)
            better = cand > new
            new[better] = cand[better]
            pick[i][better] = j
        dp = new
    c = int(np.flatnonzero(dp == dp.max())[0])  # the cheapest way to the best score
    chosen: dict[str, Option] = {}
    for i in range(len(tasks) - 1, -1, -1):
        o = options[tasks[i]][pick[i][c]]
        chosen[tasks[i]] = o
        c -= cost[tasks[i]][pick[i][c]]
    return {"choice": {t: (chosen[t].lam, chosen[t].budget) for t in tasks},
            "estimated_bytes": fixed + sum(o.bytes for o in chosen.values()),
            "mean_val_norm": sum(o.score for o in chosen.values()) / len(tasks)}


# ----------------------------------------------------------------------------------------------- report

def _p(x: float | None, nd: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{nd}f}"


def render(res: dict, command: str, date: str) -> str:
    tasks, s = res["tasks"], res["settings"]
    budgets = [str(float(b)) for b in s["budgets"]]
    ft, zs = res["acc_ft"]["test"], res["acc_zs"]["test"]
    tab, size0 = res["table"], res["size0"]
    P, T = size0["P"], len(tasks)
    L: list[str] = []
    add = L.append
    add(f"{SECTION_PREFIX}")
    add("")
    reused = (f" ({res['reused_seconds'] / 60:.1f} min more of cached steps from earlier runs of the same code)"
              if res["reused_seconds"] > 1 else "")
    add(f"Measured {date} with `{command}` in {res['seconds'] / 60:.1f} min{reused} on this machine (2 cores, shared; "
        f"1-minute load average {res['load_average']['start']:.1f} at the start, {res['load_average']['end']:.1f} "
        f"at the end). Zoo: `{Path(res['zoo']).name}` (bench/zoo/README.md), T = {T} tasks: {', '.join(tasks)}. "
        f"P' = {P:,} masked parameters, F = {size0['F']:,} shared.")
    add("")
    add("What it is: a prototype outside the library (bench/zoo/residual_study.py, public API only). Per task, "
        "d_t = τ_t − m_t∘τ_MTL over the masked tensors (float32); r_t = the k entries of largest |d_t| chosen "
        "globally (exact top-k); θ̂_t = decode(t) + r_t. r_t is stored as one u32 count per masked tensor, "
        "the positions as u32 gaps (restarting at each tensor) and the values in "
        f"{s['value_dtype']}, each a `byteplane-zstd` segment; a budget of b bits per parameter is the "
        "largest k whose **measured** bytes fit in b·P'/8. λ per task from "
        f"{list(s['lambda_grid'])} on validation at budget 0 (as bench/zoo/evaluate.py does, task arithmetic, "
        "codec auto); accuracies on the whole test split. Normalized = acc / acc_fine-tuned; gain retention = "
        "(acc − acc_θ0+head) / (acc_ft − acc_θ0+head).")
    add("")
    lam0 = res["lambda0"]
    add("### Per task and residual budget (bits per masked parameter), test split")
    add("")
    add("| task | λ | θ0+head | fine-tuned | " + " | ".join(f"b={float(b):g}" for b in budgets) + " |")
    add("|---|---|---|---|" + "---|" * len(budgets))
    for t in tasks:
        cells = []
        for b in budgets:
            a = tab[t][b]["acc"]
            g = (a - zs[t]) / (ft[t] - zs[t]) if ft[t] != zs[t] else None
            cells.append(f"{_p(a)} / **{_p(a / ft[t])}** / {_p(g, 0)}")
        add(f"| {t} | {lam0[t]:g} | {_p(zs[t])} | {_p(ft[t])} | " + " | ".join(cells) + " |")
    means = []
    for b in budgets:
        norm = [tab[t][b]["acc"] / ft[t] for t in tasks]
        gain = [(tab[t][b]["acc"] - zs[t]) / (ft[t] - zs[t]) for t in tasks if ft[t] != zs[t]]
        means.append(f"{_p(np.mean([tab[t][b]['acc'] for t in tasks]))} / **{_p(np.mean(norm))}** / "
                     f"{_p(np.mean(gain), 0)}")
    add("| **mean** | | " + f"{_p(np.mean([zs[t] for t in tasks]))} | {_p(np.mean([ft[t] for t in tasks]))} | "
        + " | ".join(means) + " |")
    worst = []
    for b in budgets:
        norm = {t: tab[t][b]["acc"] / ft[t] for t in tasks}
        w = min(norm, key=norm.get)
        worst.append(f"{_p(norm[w])} ({w}); {sum(v < TARGET_NORM for v in norm.values())} below 98")
    add("| **worst normalized** | | | | " + " | ".join(worst) + " |")
    sizes = []
    for b in budgets:
        total = size0["total"] + sum(tab[t][b]["bytes"]["total"] for t in tasks)
        sizes.append(f"{total / 1e6:.2f} MB = {total / size0['paper']:.3f}×")
    add("| **archive + residuals** | | | | " + " | ".join(sizes) + " |")
    add("")
    add("Cells: accuracy % / **normalized %** / gain retention %. Archive: the TALL archive with these λ "
        f"({size0['total']:,} bytes) plus every task's residual, against the paper's formula (64+T)·P' + 32·F "
        f"bits = {size0['paper']:,} bytes.")
    add("")
    if len(budgets) > 1:
        L.extend(render_coding(res))
    L.extend(render_joint(res))
    return "\n".join(L) + "\n"


def render_coding(res: dict) -> list[str]:
    tasks, s = res["tasks"], res["settings"]
    budgets = [str(float(b)) for b in s["budgets"]]
    tab, P = res["table"], res["size0"]["P"]
    L: list[str] = []
    add = L.append
    add("### What the residual holds (mean over tasks)")
    add("")
    add("| budget | entries k (% of P') | |d| threshold | share of ‖d‖² | positions bits/entry | "
        "values bits/entry | total bits/entry |")
    add("|---|---|---|---|---|---|---|")
    for b in budgets[1:]:
        rows = [tab[t][b] for t in tasks]
        k = np.mean([r["k"] for r in rows])
        pb = np.mean([8 * r["bytes"]["positions"] / r["k"] for r in rows])
        vb = np.mean([8 * r["bytes"]["values"] / r["k"] for r in rows])
        tb = np.mean([8 * r["bytes"]["total"] / r["k"] for r in rows])
        add(f"| {float(b):g} | {k:,.0f} ({100 * k / P:.2f} %) | {np.mean([r['threshold'] for r in rows]):.2e} | "
            f"{100 * np.mean([r['energy'] for r in rows]):.1f} % | {pb:.2f} | {vb:.2f} | {tb:.2f} |")
    add("")
    add("Other codings of the same entries (bits per entry, mean over tasks; the budget's positions and "
        "values measured again; relative rounding error = ‖round(v) − v‖ / ‖v‖):")
    add("")
    keys = list(tab[tasks[0]][budgets[1]]["coding"])
    add("| coding | " + " | ".join(f"b={float(b):g}" for b in budgets[1:]) + " |")
    add("|---|" + "---|" * (len(budgets) - 1))
    for key in keys:
        vals = [np.mean([tab[t][b]["coding"][key] for t in tasks]) for b in budgets[1:]]
        fmt = (lambda v: f"{v:.2e}") if "error" in key else (lambda v: f"{v:.2f}")
        add(f"| {key} | " + " | ".join(fmt(v) for v in vals) + " |")
    add("")
    bmax = budgets[-1]
    add(f"Value dtype at b={float(bmax):g} (the same positions, test accuracy %):")
    add("")
    add("| task | " + " | ".join(DTYPES) + " |")
    add("|---|" + "---|" * len(DTYPES))
    for t in tasks:
        add(f"| {t} | " + " | ".join(_p(tab[t]["dtypes"][n]) for n in DTYPES) + " |")
    add("")
    return L


def render_joint(res: dict) -> list[str]:
    tasks, s = res["tasks"], res["settings"]
    ft = res["acc_ft"]["test"]
    size0 = res["size0"]
    L: list[str] = []
    add = L.append
    if res.get("reach"):
        bmax = max(s["budgets"])
        add(f"Tasks still below 98 % at b={bmax:g}, with larger budgets (on test: what it would take, not a "
            "selection):")
        add("")
        add("| task | λ | " + " | ".join(f"b={b:g}" for b in s["reach_budgets"]) + " |")
        add("|---|---|" + "---|" * len(s["reach_budgets"]))
        for t, r in res["reach"].items():
            add(f"| {t} | {res['lambda0'][t]:g} | " + " | ".join(
                f"{_p(r[str(float(b))]['acc'])} / **{_p(r[str(float(b))]['acc'] / ft[t])}**" for b in s["reach_budgets"])
                + " |")
        add("")
    j = res["joint"]
    add("### λ and budget chosen together on validation, under a size limit")
    add("")
    add(f"Options per task: λ in {list(s['lambda_grid'])} × budget in {list(s['budgets'])} bits per parameter, each "
        "with its measured mask bytes (from the sweep archives) + residual bytes and its normalized validation "
        "accuracy. Knapsack objectives: **mean** = the mean normalized validation accuracy; **shortfall** = first "
        "the total shortfall below 98 % (every task up to 98 % before any goes beyond), then the mean. What does "
        f"not depend on λ (θ0, τ_MTL, shared tensors, header): {j['fixed_bytes']:,} bytes = "
        f"{j['fixed_bytes'] / size0['paper']:.3f}× the formula; the archive with no residual and λ as above: "
        f"{size0['total'] / size0['paper']:.3f}×. Every feasible choice was encoded for real and scored on test.")
    add("")
    add("| rule | archive + residuals (× formula) | residual bytes | test mean normalized % | worst % | tasks < 98 % |")
    add("|---|---|---|---|---|---|")
    shown = []
    for rule, r in j["rules"].items():
        if r is None:
            add(f"| {rule} | infeasible: the smallest options exceed the limit | | | | |")
            continue
        norm = {t: r["acc"][t] / ft[t] for t in tasks}
        w = min(norm, key=norm.get)
        add(f"| {rule} | {r['total_bytes'] / 1e6:.2f} MB = **{r['ratio']:.3f}×** | {sum(r['residual_bytes'].values()):,} | "
            f"{_p(np.mean(list(norm.values())))} | {_p(norm[w])} ({w}) | {sum(v < TARGET_NORM for v in norm.values())} |")
        shown.append(rule)
    add("")
    add("Per task (λ, budget → test accuracy % / normalized %):")
    add("")
    add("| task | " + " | ".join(shown) + " |")
    add("|---|" + "---|" * len(shown))
    for t in tasks:
        cells = []
        for rule in shown:
            r = j["rules"][rule]
            lam, b = r["choice"][t]
            cells.append(f"{lam:g}, {b:g} → {_p(r['acc'][t])} / {_p(r['acc'][t] / ft[t])}")
        add(f"| {t} | " + " | ".join(cells) + " |")
    add("")
    add("Validation accuracy per λ and budget, and every task's mask bytes per λ: OUT/results.json (`sweep`).")
    return L


def main(argv: list[str] | None = None) -> None:
    d = Settings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: $TALLFMT_ZOO or the default cache)")
    ap.add_argument("--tasks", nargs="+", default=None, help="default: every built task")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--lambda-grid", type=float, nargs="+", default=list(d.lambda_grid))
    ap.add_argument("--budgets", type=float, nargs="+", default=list(d.budgets),
                    help="residual bits per masked parameter (0 is always included)")
    ap.add_argument("--value-dtype", choices=list(DTYPES), default=d.value_dtype)
    ap.add_argument("--limits", type=float, nargs="+", default=list(d.limits),
                    help="size limits of the joint choice, × the formula")
    ap.add_argument("--reach-budgets", type=float, nargs="*", default=list(d.reach_budgets),
                    help="budgets tried on test for the tasks still below 98 %% at the largest budget")
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="ignore cached steps in OUT/cache.json")
    args = ap.parse_args(argv)
    budgets = tuple(sorted({0.0, *map(float, args.budgets)}))
    s = Settings(tuple(args.lambda_grid), budgets, args.value_dtype, tuple(args.limits), tuple(args.reach_budgets))
    torch.set_num_threads(args.threads)
    command = ".venv/bin/python -m bench.zoo.residual_study" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()[0]
    log(f"{command} (torch {torch.__version__}, {torch.get_num_threads()} threads, python "
        f"{platform.python_version()}, load average {load_start:.1f})")
    res = Study(args.zoo, args.tasks, args.out, s, fresh=args.fresh).run()
    res["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    section = render(res, command, date)
    (args.out / "report.md").write_text(section, encoding="utf-8")
    write_json_atomic(args.out / "results.json", {**res, "command": command, "date": date})
    replace_section(args.results, section, SECTION_PREFIX)
    print(section, flush=True)
    log(f"wrote {args.results} (section), {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
