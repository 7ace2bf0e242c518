"""Evaluate the model zoo: TALL-masks compression and model merging on real fine-tunes (paper Table 2, Fig. 3).

    .venv/bin/python -m bench.zoo.evaluate [--zoo DIR] [--tasks T ...] [--out bench/_out/zoo_eval] [--quick]

On the zoo built by ``bench.zoo.build`` (θ0 = all-MiniLM-L6-v2, one frozen linear-probe head and one full
fine-tune per task) this measures, on the TEST split, per task and on average, absolute accuracy,
normalized accuracy (acc / acc_finetuned, paper eq. 10) and gain retention ((acc − acc_θ0) /
(acc_ft − acc_θ0)) of:

    fine-tuned and zero-shot θ0 (+ frozen heads)    recorded in zoo.json at build time (one is re-checked)
    task arithmetic, TIES                            merges, α on validation (select_alpha)
    Consensus TA, Consensus TIES (k = 1, 2)          merges from the archives' masks, α on validation
    TALL mask + TA, TALL mask + TIES                 decoded from archives, λ per task on validation
    magnitude masking (top 10 % of |τ_t|)            decoded from an archive

plus the bytes of every storage option and the mask agreement histogram (Fig. 3). Output: a Markdown
section in ``bench/RESULTS.md`` (only that section is replaced), the agreement plot, and in ``--out`` the
archives, ``report.md``, ``results.json`` and a step cache (``cache.json``: a re-run with the same zoo and
settings reuses finished steps; ``--fresh`` ignores it).

TIES: the merge baseline uses TIES' own disjoint MEAN (``ties_agg="mean"``: τ_MTL is then on the scale
of one task vector, and α rescales it), as the paper's TIES baseline; TALL mask + TIES and Consensus
TIES use the disjoint SUM (``ties_agg="sum"``), as the paper's code does for masks: eq. 5 compares
|τ_t| with |τ_MTL − τ_t|, and a decoded θ̂_t = θ0 + m_t ∘ τ_MTL adds τ_MTL unscaled, so τ_MTL must be
on the scale of the sum of the task vectors, like task arithmetic's.

Cost: every accuracy is one forward pass of a 6-layer BERT over a split on 2 shared cores; the α sweeps
(6 merges × 10 α × every task's validation split) dominate, so α is chosen on the first 100 validation
examples of each task (λ on all of them). ``--quick`` selects on 100 validation examples with coarser grids;
``--lambda-val-max`` / ``--alpha-val-max`` / ``--test-max`` cap the splits independently.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: python bench/zoo/evaluate.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "bench.zoo"

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see build.py: spinning OpenMP waits hurt on 2 shared cores

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import platform
import re
import shlex
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from safetensors import safe_open

import tallfmt
from tallfmt.compute.tensors import to_numpy
from tallfmt.summary import agreement_table, plot_agreement, summary as archive_summary
from tallfmt.format.codecs import CODECS

from .config import write_json_atomic
from .data import Split
from .evaluate_lib import ZooEvaluator

EVAL_VERSION = "zoo-eval/1"  # bump when a cached step's meaning changes
REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "bench" / "_out" / "zoo_eval"
DEFAULT_RESULTS = REPO / "bench" / "RESULTS.md"
DEFAULT_PLOT = REPO / "bench" / "zoo_agreement.png"
SECTION_PREFIX = "## Real model zoo (all-MiniLM-L6-v2"

LAMBDA_SPLIT = "select_lambda"  # validation, or its first lambda_val_max examples
ALPHA_SPLIT = "select_alpha"    # validation, or its first alpha_val_max examples
TEST_SPLIT = "evaluation"       # test, or its first test_max examples


@dataclasses.dataclass(frozen=True)
class Settings:
    lambda_grid: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)  # paper app. A.2
    alpha_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    lambda_val_max: int | None = None  # validation examples per task for λ selection (None: all)
    # α is one number for all tasks, picked by the mean over T tasks: 100 examples per task (a random subset)
    # resolve it well enough, and the α sweeps (6 merges × 10 values) are most of a full run's cost
    alpha_val_max: int | None = 100    # validation examples per task for α selection (None: all)
    test_max: int | None = None    # test examples per task (None: all, and the recorded accuracies are used)
    ties_density: float = 0.2      # TIES trim: keep the top 20 % of each |τ_t| (TIES' default k)
    magnitude_density: float = 0.1  # magnitude masking keeps the top 10 % of each |τ_t| (paper sec. 6.2)
    consensus_k: tuple[int, ...] = (1, 2)

    def key(self) -> dict:
        return dataclasses.asdict(self)


QUICK = Settings(lambda_grid=(0.2, 0.4, 0.6), alpha_grid=(0.2, 0.4, 0.6, 0.8, 1.0), lambda_val_max=100,
                 alpha_val_max=100)


# ----------------------------------------------------------------------------------------------- helpers

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _T0:6.0f}s] {msg}", flush=True)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def mean(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(vals) / len(vals) if vals else None


class StepCache:
    """JSON file of finished steps, keyed by a digest of everything the step's result depends on."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.data: dict[str, Any] = {}
        if enabled and path.exists():
            try:
                self.data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.data = {}

    def get(self, key: str) -> Any:
        return self.data.get(key, {}).get("value")

    def seconds(self, key: str) -> float:
        """How long the step took when it was computed."""
        return float(self.data.get(key, {}).get("seconds", 0.0))

    def put(self, key: str, what: str, value: Any, seconds: float = 0.0) -> Any:
        self.data[key] = {"what": what, "value": value, "seconds": seconds}
        write_json_atomic(self.path, self.data)
        return value


class Evaluator(ZooEvaluator):
    """ZooEvaluator with capped split views and accounting.

    ``select_lambda`` / ``select_alpha`` = the first ``lambda_val_max`` / ``alpha_val_max`` validation
    examples (splits are random permutations, so a prefix is a random subset), ``evaluation`` = the first
    ``test_max`` test examples. Counts forward
    examples, padded tokens and seconds, and skips reloading a state dict it was just given (the same
    dict object holding the same tensor objects: select_alpha scores one merged model on every task).
    """

    def __init__(self, zoo_dir: Path | None, settings: Settings):
        super().__init__(zoo_dir)
        self.caps = {LAMBDA_SPLIT: ("validation", settings.lambda_val_max),
                     ALPHA_SPLIT: ("validation", settings.alpha_val_max), TEST_SPLIT: ("test", settings.test_max)}
        self.calls = self.examples = self.tokens = 0
        self.seconds = 0.0
        self._loaded: tuple[int, str, torch.Tensor] | None = None  # id(sd), probe name, probe tensor

    def task_data(self, task: str):
        td = super().task_data(task)
        if TEST_SPLIT not in td.splits:
            for name, (src, cap) in self.caps.items():
                s = td.splits[src]
                n = len(s) if cap is None else min(cap, len(s))
                td.splits[name] = Split(s.texts[:n], s.labels[:n])
        return td

    def split_tokens(self, task: str, split: str) -> int:
        return sum(int(b[0].numel()) for b in self.batches(task, split))

    def accuracy(self, state_dict, task: str, split: str = "test") -> float:
        t = time.perf_counter()
        if state_dict is not None:
            probe = self._loaded
            if probe is not None and probe[0] == id(state_dict) and state_dict.get(probe[1]) is probe[2]:
                state_dict = None  # already in the model
            else:
                name = min((k for k, v in state_dict.items() if v.is_floating_point()),
                           key=lambda k: state_dict[k].numel())
                self._loaded = (id(state_dict), name, state_dict[name])
        acc = super().accuracy(state_dict, task, split)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        self.examples += len(self.task_data(task).splits[split])
        self.tokens += self.split_tokens(task, split)
        return acc

    def forget_loaded(self) -> None:
        self._loaded = None

    def throughput(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (f"{self.calls} accuracy calls, {self.examples:,} examples, {self.tokens:,} padded tokens "
                f"in {self.seconds:.0f} s ({rate:,.0f} tokens/s)")


# ----------------------------------------------------------------------------------------------- storage

def checkpoint_codec_bytes(path: Path, codecs: Iterable[str]) -> dict[str, int]:
    """Bytes of one safetensors checkpoint with each codec applied to each tensor separately."""
    codecs = list(codecs)
    out = dict.fromkeys(codecs, 0)
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            arr = to_numpy(t).reshape(-1)
            itemsize = arr.dtype.itemsize
            for c in codecs:
                out[c] += len(CODECS[c].encode(arr.view(np.uint8), itemsize))
    return out


# ----------------------------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Method:
    key: str
    label: str
    group: str  # "merging" or "compression"


METHODS = [
    Method("zeroshot", "Zero-shot θ0 (+ frozen heads)", "merging"),
    Method("ta", "Task arithmetic", "merging"),
    Method("ties", "TIES (disjoint mean)", "merging"),
    Method("cta_k1", "Consensus TA, k=1", "merging"),
    Method("cta_k2", "Consensus TA, k=2", "merging"),
    Method("cties_k1", "Consensus TIES, k=1", "merging"),
    Method("cties_k2", "Consensus TIES, k=2", "merging"),
    Method("finetuned", "Fine-tuned", "compression"),
    Method("magnitude", "Magnitude masking (10 %)", "compression"),
    Method("tall_ta", "TALL mask + TA", "compression"),
    Method("tall_ties", "TALL mask + TIES (disjoint sum)", "compression"),
]


class Run:
    def __init__(self, zoo_dir: Path | None, tasks: list[str] | None, out: Path, settings: Settings,
                 fresh: bool = False):
        self.settings = settings
        self.ev = Evaluator(zoo_dir, settings)
        built = self.ev.tasks
        if tasks:
            missing = [t for t in tasks if t not in built]
            if missing:
                raise SystemExit(f"tasks {missing} are not built in {self.ev.dir}; built: {built}")
            self.tasks = list(tasks)
        else:
            self.tasks = built
        if not self.tasks:
            raise SystemExit(f"no complete task in {self.ev.dir}")
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.cache = StepCache(out / "cache.json", enabled=not fresh)
        m = self.ev.manifest
        self.base = self.ev.path("theta0")
        self.ft = {t: self.ev.path(t) for t in self.tasks}
        self.zoo_key = {
            "version": EVAL_VERSION, "tallfmt": tallfmt.__version__, "config_hash": m["config_hash"],
            "theta0": m["base"]["sha256"], "tasks": {t: m["tasks"][t]["finetuned"]["sha256"] for t in self.tasks},
            "heads": {t: m["tasks"][t]["head"]["sha256"] for t in self.tasks},
        }
        self.results: dict[str, Any] = {"tasks": self.tasks, "settings": settings.key(), "zoo": str(self.ev.dir)}
        self.acc: dict[str, dict[str, float]] = {}
        self.hparams: dict[str, str] = {}
        self.selection: dict[str, Any] = {}
        self.archives: dict[str, Path] = {}
        self.timings: dict[str, float] = {}  # wall seconds per phase, this run (cached steps cost ~0)
        self.reused_seconds = 0.0  # what the steps taken from the cache took when they were computed

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    # -- keys and cached steps
    def key(self, step: str, **params: Any) -> str:
        return f"{step}:{_digest({'zoo': self.zoo_key, 'settings': self.settings.key(), 'step': step, **params})}"

    def cached(self, step: str, fn: Callable[[], Any], **params: Any) -> Any:
        k = self.key(step, **params)
        hit = self.cache.get(k)
        if hit is not None:
            self.reused_seconds += self.cache.seconds(k)
            log(f"{step}: cached")
            return hit
        t = time.perf_counter()
        value = fn()
        return self.cache.put(k, step, value, time.perf_counter() - t)

    # -- evaluation callables
    def select_fn(self, label: str, split: str, grid: tuple[float, ...], name: str) -> Callable:
        """evaluate(task, state_dict) for select_lambdas / select_alpha, logging once per model/grid value."""
        state = {"calls": 0, "t": time.perf_counter(), "accs": []}

        def fn(task: str, sd) -> float:
            a = self.ev.accuracy(sd, task, split)
            state["accs"].append(a)
            state["calls"] += 1
            if state["calls"] % len(self.tasks) == 0:
                i = state["calls"] // len(self.tasks) - 1
                v = grid[i] if i < len(grid) else float("nan")
                log(f"  {label}: {name}={v:g}  mean validation accuracy {np.mean(state['accs']):.4f}  "
                    f"({time.perf_counter() - state['t']:.1f} s)")
                state["accs"], state["t"] = [], time.perf_counter()
            return a
        return fn

    def test_all(self, sd) -> dict[str, float]:
        return {t: self.ev.accuracy(sd, t, TEST_SPLIT) for t in self.tasks}

    # -- steps
    def reference(self) -> None:
        """Fine-tuned and zero-shot accuracies: recorded in zoo.json (one task re-checked), or measured on
        the capped test split."""
        ev = self.ev
        if self.settings.test_max is None:
            for which in ("finetuned", "zeroshot"):
                self.acc[which] = {t: ev.recorded(t, which, "test") for t in self.tasks}
            task = min(self.tasks, key=lambda t: ev.split_tokens(t, TEST_SPLIT))

            def check() -> dict:
                return {"task": task, "finetuned": ev.accuracy(ev.state_dict(task), task, TEST_SPLIT),
                        "zeroshot": ev.accuracy(ev.state_dict("theta0"), task, TEST_SPLIT)}
            got = self.cached("check_recorded", check, task=task)
            for which in ("finetuned", "zeroshot"):
                if got[which] != self.acc[which][task]:
                    raise SystemExit(f"{task} {which}: measured {got[which]} != recorded {self.acc[which][task]} "
                                     f"in zoo.json: the evaluator does not reproduce the build")
            self.results["recorded_check"] = {**got, "equal": True}
            log(f"reference: recorded accuracies from zoo.json; re-checked {task}: fine-tuned "
                f"{got['finetuned']:.4f}, zero-shot {got['zeroshot']:.4f} (equal)")
        else:
            def measure(which: str) -> dict:
                if which == "zeroshot":
                    return self.test_all(ev.state_dict("theta0"))
                return {t: ev.accuracy(ev.state_dict(t), t, TEST_SPLIT) for t in self.tasks}
            for which in ("finetuned", "zeroshot"):
                self.acc[which] = self.cached(f"reference_{which}", lambda w=which: measure(w))
            log("reference: fine-tuned and zero-shot measured on the capped test split")
        self.hparams["finetuned"] = self.hparams["zeroshot"] = "—"

    def select_lambdas(self, name: str, **encode_kwargs: Any) -> dict[str, float]:
        grid = self.settings.lambda_grid

        def run() -> dict:
            t = time.perf_counter()
            scores: dict[str, dict[float, float]] = {}
            lams = tallfmt.select_lambdas(
                self.base, self.ft, self.select_fn(f"λ sweep {name}", LAMBDA_SPLIT, grid, "λ"),
                grid=grid, scores=scores, workdir=self.out, **encode_kwargs)
            return {"lambdas": lams, "scores": {t: {str(k): v for k, v in s.items()} for t, s in scores.items()},
                    "seconds": time.perf_counter() - t}
        log(f"λ selection for {name} over {grid} ({len(self.tasks)} tasks, validation)")
        got = self.cached(f"lambdas_{name}", run, encode=encode_kwargs)
        self.selection[f"lambda_{name}"] = got
        log(f"λ for {name}: " + ", ".join(f"{t}={v:g}" for t, v in got["lambdas"].items()))
        return got["lambdas"]

    def archive(self, name: str, **encode_kwargs: Any) -> Path:
        """Encode (or reuse) out/<name>.tall."""
        path = self.out / f"{name}.tall"
        k = self.key(f"archive_{name}", encode=encode_kwargs)
        if path.exists():
            try:
                with tallfmt.open(path) as z:
                    if z.metadata.get("zoo_eval_key") == k:
                        log(f"archive {name}: reused {path.name}")
                        self.archives[name] = path
                        return path
            except tallfmt.TallError:
                pass
        t = time.perf_counter()
        rep = tallfmt.encode(self.base, self.ft, path, metadata={"zoo_eval_key": k}, overwrite=True,
                             **encode_kwargs)
        log(f"archive {name}: {rep.archive_bytes:,} bytes ({rep.ratio:.2f}× smaller than the raw collection) "
            f"in {time.perf_counter() - t:.1f} s")
        self.archives[name] = path
        return path

    def decode_each(self, key: str, archive: str) -> None:
        def run() -> dict:
            out = {}
            with tallfmt.open(self.archives[archive]) as z:
                for t in self.tasks:
                    sd = z.decode(t)
                    out[t] = self.ev.accuracy(sd, t, TEST_SPLIT)
                    del sd
            return out
        t = time.perf_counter()
        self.acc[key] = self.cached(f"test_{key}", run, archive=self._archive_key(archive))
        log(f"{key}: mean test accuracy {mean(self.acc[key].values()):.4f} ({time.perf_counter() - t:.1f} s)")

    def _archive_key(self, archive: str) -> str:
        with tallfmt.open(self.archives[archive]) as z:
            return z.metadata["zoo_eval_key"]

    def merge(self, key: str, archive: str, method: str, **params: Any) -> None:
        grid = self.settings.alpha_grid

        def run() -> dict:
            t = time.perf_counter()
            scores: dict[float, float] = {}
            with tallfmt.open(self.archives[archive]) as z:
                alpha = tallfmt.select_alpha(z, self.select_fn(f"α sweep {key}", ALPHA_SPLIT, grid, "α"),
                                             method=method, grid=grid, scores=scores, **params)
                t_sel = time.perf_counter() - t
                merged = z.merge(method, alpha=alpha, **params)
                acc = self.test_all(merged)
                del merged
            self.ev.forget_loaded()
            return {"alpha": alpha, "scores": {str(a): s for a, s in scores.items()}, "test": acc,
                    "select_seconds": t_sel, "seconds": time.perf_counter() - t}
        log(f"{key}: {method} {params or ''} from {archive}.tall, α over {grid}")
        got = self.cached(f"merge_{key}", run, archive=self._archive_key(archive), method=method, params=params)
        self.acc[key] = got["test"]
        self.selection[f"alpha_{key}"] = {k: v for k, v in got.items() if k != "test"}
        self.hparams[key] = f"α={got['alpha']:g}" + (f", k={params['k']}" if "k" in params else "")
        log(f"{key}: α={got['alpha']:g}, mean test accuracy {mean(got['test'].values()):.4f}")

    def storage(self) -> dict:
        codecs = ("zstd", "byteplane-zstd")
        files = [self.base, *self.ft.values()]
        m = self.ev.manifest

        def per_checkpoint() -> dict:
            sha = {str(self.base): m["base"]["sha256"], **{str(self.ft[t]): m["tasks"][t]["finetuned"]["sha256"]
                                                          for t in self.tasks}}
            out = {}
            for f in files:
                k = f"ckpt_codec:{sha[str(f)]}"
                got = self.cache.get(k)
                if got is None:
                    t = time.perf_counter()
                    got = self.cache.put(k, f"codecs of {f.name}", checkpoint_codec_bytes(f, codecs))
                    log(f"  {f.name}: " + ", ".join(f"{c} {v:,}" for c, v in got.items())
                        + f" ({time.perf_counter() - t:.1f} s)")
                out[f.name if f == self.base else f"finetuned/{f.name}"] = got
            return out
        log("storage: every checkpoint with each codec, tensor by tensor")
        ckpts = per_checkpoint()
        s: dict[str, Any] = {"raw_collection_files": sum(f.stat().st_size for f in files),
                             "model_file": self.base.stat().st_size}
        for c in codecs:
            s[f"checkpoints_{c}"] = sum(v[c] for v in ckpts.values())
        s["checkpoints"] = ckpts
        with tallfmt.open(self.archives["tall_ta"]) as z:
            summ = archive_summary(z)
        T = len(self.tasks)
        p_masked, p_shared = summ["params"]["masked"], summ["params"]["shared"]
        s["params"] = summ["params"]
        s["raw_collection_tensors"] = summ["raw_collection"]["bytes"]
        s["paper_formula_bits"] = summ["paper_formula"]["bits"]
        s["paper_formula"] = summ["paper_formula"]["bytes"]
        s["paper_finetuned"] = math.ceil(32 * (T * p_masked + p_shared) / 8)
        s["paper_single_model"] = math.ceil(32 * (p_masked + p_shared) / 8)
        s["archives"] = {}
        for name, path in self.archives.items():
            with tallfmt.open(path) as z:
                s["archives"][name] = {"sizes": z.sizes(), "encoding": z.encoding}
        s["heads_bytes"] = sum((self.ev.path("head:" + t)).stat().st_size for t in self.tasks)
        return s

    def agreement(self) -> dict:
        """Eq. 7 histograms of the two TALL archives, and per task the parameters of its mask and its
        selfish ones (kept by its mask only: what consensus with k = 2 takes from it)."""
        out = {}
        for name in ("tall_ta", "tall_ties"):
            with tallfmt.open(self.archives[name]) as z:
                counts = [int(c) for c in z.agreement().tolist()]
                tasks = archive_summary(z)["tasks"]
                kept = dict.fromkeys(z.tasks, 0)
                selfish = dict.fromkeys(z.tasks, 0)
                for tensor, role in z.roles.items():
                    if role != "masked":
                        continue
                    masks = [z.mask(t, tensor).reshape(-1) for t in z.tasks]
                    alone = torch.stack(masks).sum(0, dtype=torch.int32) == 1
                    for t, m in zip(z.tasks, masks):
                        kept[t] += int(m.sum())
                        selfish[t] += int((m & alone).sum())
                    del masks, alone
            out[name] = {"counts": counts, "rows": agreement_table(counts), "mask": tasks,
                         "kept": kept, "selfish": selfish}
        return out

    # -- everything
    def run(self) -> dict:
        t_run = time.perf_counter()
        s = self.settings
        ev = self.ev
        log(f"zoo {ev.dir}: {len(self.tasks)} tasks: {', '.join(self.tasks)}")
        tok = {sp: sum(ev.split_tokens(t, sp) for t in self.tasks) for sp in (LAMBDA_SPLIT, ALPHA_SPLIT, TEST_SPLIT)}
        passes = {LAMBDA_SPLIT: 2 * len(s.lambda_grid), ALPHA_SPLIT: len(s.alpha_grid) * (2 + 2 * len(s.consensus_k)),
                  TEST_SPLIT: 3 + 2 + 2 * len(s.consensus_k)}
        log("work: " + ", ".join(f"{n} passes over {sp} ({tok[sp]:,} padded tokens each)" for sp, n in passes.items())
            + f": {sum(n * tok[sp] for sp, n in passes.items()):,} tokens in all")
        with self.phase("reference"):
            self.reference()
        if ev.seconds:
            log(f"  throughput so far: {ev.throughput()}")

        ties = dict(merge="ties", ties_density=s.ties_density)
        with self.phase("λ selection"):
            lam_ta = self.select_lambdas("tall_ta", merge="task_arithmetic")
            lam_ties = self.select_lambdas("tall_ties", ties_agg="sum", **ties)
        self.hparams["tall_ta"] = "λ per task: " + _lam_list(lam_ta)
        self.hparams["tall_ties"] = "λ per task: " + _lam_list(lam_ties)

        with self.phase("encoding"):
            self.archive("tall_ta", merge="task_arithmetic", lambdas=lam_ta, codec="auto")
            self.archive("tall_ties", lambdas=lam_ties, ties_agg="sum", codec="auto", **ties)
            self.archive("ties_mean", ties_agg="mean", codec="auto", **ties)
            self.archive("magnitude", merge="task_arithmetic", mask_method="magnitude",
                         mask_density=s.magnitude_density, codec="auto")
        self.hparams["magnitude"] = f"top {s.magnitude_density:.0%} of each |τ_t| (global)"

        with self.phase("decodes on test"):
            self.decode_each("tall_ta", "tall_ta")
            self.decode_each("tall_ties", "tall_ties")
            self.decode_each("magnitude", "magnitude")

        with self.phase("merges (α sweeps, test)"):
            self.merge("ta", "tall_ta", "task_arithmetic")
            self.merge("ties", "ties_mean", "task_arithmetic")
            for k in s.consensus_k:
                self.merge(f"cta_k{k}", "tall_ta", "consensus", k=k)
            for k in s.consensus_k:
                self.merge(f"cties_k{k}", "tall_ties", "consensus", k=k)

        with self.phase("storage"):
            # the same archive as tall_ta with the other codecs: sizes only
            self.archive("tall_ta_raw", merge="task_arithmetic", lambdas=lam_ta, codec="raw")
            self.archive("tall_ta_zstd", merge="task_arithmetic", lambdas=lam_ta, codec="zstd")
            storage = self.storage()
            agreement = self.agreement()
        self.results.update(accuracy=self.acc, hparams=self.hparams, selection=self.selection, storage=storage,
                            agreement=agreement, forward=ev.throughput(), seconds=time.perf_counter() - t_run,
                            timings=self.timings, reused_seconds=self.reused_seconds)
        log(f"done in {time.perf_counter() - t_run:.0f} s; {ev.throughput()}")
        return self.results


def _lam_list(lams: Mapping[str, float]) -> str:
    return " ".join(f"{v:g}" for v in lams.values())


# ----------------------------------------------------------------------------------------------- report

def _pct(x: float | None, nd: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{nd}f}"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def metrics(acc: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: per-task and mean absolute accuracy, normalized accuracy (eq. 10), gain retention."""
    ft, zs = acc["finetuned"], acc["zeroshot"]
    out = {}
    for m, a in acc.items():
        norm = {t: a[t] / ft[t] if ft[t] else None for t in tasks}
        gain = {t: (a[t] - zs[t]) / (ft[t] - zs[t]) if ft[t] != zs[t] else None for t in tasks}
        gain_den = sum(ft[t] - zs[t] for t in tasks)
        out[m] = {
            "acc": dict(a), "norm": norm, "gain": gain,
            "mean_acc": mean(a[t] for t in tasks), "mean_norm": mean(norm.values()),
            "mean_gain": mean(gain.values()),
            # Σ(acc − acc0) / Σ(ft − acc0): the mean gain over the mean fine-tuning gain
            "pooled_gain": sum(a[t] - zs[t] for t in tasks) / gain_den if gain_den else None,
        }
    return out


def _storage_of(method: str, st: dict) -> tuple[str, str]:
    """(paper-formula MB, stored MB) of a method, as in Table 2's Bits column."""
    if method in ("zeroshot", "ta", "ties") or method.startswith(("cta", "cties")):
        return _mb(st["paper_single_model"]), _mb(st["model_file"])
    if method == "finetuned":
        return _mb(st["paper_finetuned"]), _mb(st["raw_collection_files"])
    arch = {"magnitude": "magnitude", "tall_ta": "tall_ta", "tall_ties": "tall_ties"}[method]
    return _mb(st["paper_formula"]), _mb(st["archives"][arch]["sizes"]["total"])


def diagnostics(res: dict, met: dict) -> list[str]:
    """Facts behind each missed target, for the report."""
    out = []
    tasks, st, s = res["tasks"], res["storage"], res["settings"]
    grid = s["lambda_grid"]
    for m, label, sel in (("tall_ta", "TALL mask + TA", "lambda_tall_ta"), ("tall_ties", "TALL mask + TIES",
                                                                            "lambda_tall_ties")):
        if met[m]["mean_norm"] is None or met[m]["mean_norm"] >= 0.99:
            continue
        lams = res["selection"][sel]["lambdas"]
        low = [f"{t} {100 * met[m]['norm'][t]:.1f} % (λ={lams[t]:g}"
               + (", the grid's smallest: a smaller λ keeps more of τ_MTL" if lams[t] == min(grid) else "")
               + f"; {100 * met[m]['acc'][t]:.1f} vs fine-tuned {100 * met['finetuned']['acc'][t]:.1f})"
               for t in tasks if met[m]["norm"][t] is not None and met[m]["norm"][t] < 0.99]
        out.append(f"{label}: {100 * met[m]['mean_norm']:.2f} % on average; tasks below 99 %: "
                   + ("; ".join(low) if low else "none (the mean is pulled down by several small losses)") + ".")
    ta = met["ta"]["mean_acc"]
    for k in s["consensus_k"]:
        c = met[f"cta_k{k}"]
        if c["mean_acc"] >= ta:
            continue
        rows = res["agreement"]["tall_ta"]["rows"]
        removed = sum(r["fraction"] for r in rows if r["n"] < k)
        diff = ", ".join(f"{t} {100 * (c['acc'][t] - met['ta']['acc'][t]):+.1f}" for t in tasks)
        text = (f"Consensus TA k={k} ({res['hparams'][f'cta_k{k}']}) vs task arithmetic "
                f"({res['hparams']['ta']}): {100 * (c['mean_acc'] - ta):+.2f} points; it zeroes "
                f"{100 * removed:.1f} % of τ_MTL ({'kept by no mask' if k == 1 else f'kept by fewer than {k} masks'}); "
                f"per task (points): {diff}.")
        sc_c = res["selection"][f"alpha_cta_k{k}"]["scores"].values()
        sc_t = res["selection"]["alpha_ta"]["scores"].values()
        verdict = (": not an artefact of choosing α." if max(sc_c) < max(sc_t) else
                   ": a tie on validation." if max(sc_c) == max(sc_t) else ": validation ranks them the other way.")
        text += (f" On the validation subset its best α scores {100 * max(sc_c):.1f} against task arithmetic's "
                 f"{100 * max(sc_t):.1f}{verdict}")
        hurt = [t for t in tasks if met["ta"]["acc"][t] < met["zeroshot"]["acc"][t]]
        if hurt:
            text += f" Task arithmetic itself is below zero-shot on {', '.join(hurt)}."
        ag = res["agreement"]["tall_ta"]
        if k >= 2 and "selfish" in ag:
            worst = sorted(tasks, key=lambda t: c["acc"][t] - met["ta"]["acc"][t])[:2]
            share = {t: ag["selfish"][t] / ag["kept"][t] if ag["kept"][t] else 0.0 for t in tasks}
            avg = sum(share.values()) / len(share)
            text += (" The two tasks that lose most have " + " and ".join(
                f"{100 * share[t]:.1f} % ({t})" for t in worst) + f" of their own mask selfish, against "
                f"{100 * avg:.1f} % on average")
            if all(share[t] <= avg for t in worst):
                text += (": k=2 takes little of their own weights, so what costs them accuracy is losing the other "
                         "tasks' selfish (and the catastrophic) weights, the ones the paper expects to interfere.")
            else:
                text += ": that much of their own masks is zeroed by k=2."
        out.append(text)
    z = st["archives"]["tall_ta"]["sizes"]
    ratio = z["total"] / st["paper_formula"]
    if ratio > 0.8:
        p1 = st["params"]["masked"]
        out.append(f"Archive {ratio:.3f} × the formula: θ0 takes {8 * z['theta0'] / p1:.1f} bits per parameter, "
                   f"τ_MTL {8 * z['tau'] / p1:.1f}, the {len(tasks)} masks {8 * z['masks'] / p1:.2f} together, "
                   f"against the formula's 32 + 32 + {len(tasks)}: float32 weights keep most of their entropy "
                   f"in the mantissa, which lossless coding cannot remove.")
    return out


def render(res: dict, command: str, date: str) -> str:
    tasks = res["tasks"]
    T = len(tasks)
    st = res["storage"]
    met = metrics(res["accuracy"], tasks)
    s = res["settings"]
    L: list[str] = []
    add = L.append
    add(f"{SECTION_PREFIX}, {T} tasks)")
    add("")
    reused = res.get("reused_seconds", 0.0)
    add(f"Measured {date} with `{command}` in {res['seconds'] / 60:.1f} min"
        + (f" (plus {reused / 60:.1f} min of steps reused from an earlier run's cache)" if reused >= 30 else "")
        + " on this machine "
        f"({os.cpu_count()} cores, shared; {res['forward']}). Zoo: `{Path(res['zoo']).name}` "
        f"(bench/zoo/README.md): θ0 = all-MiniLM-L6-v2 (22.7 M parameters), frozen linear-probe heads, "
        f"every encoder weight fine-tuned per task. Tasks: {', '.join(tasks)}.")
    add("")
    if res.get("timings"):
        load = res.get("load_average", {})
        add("Time per phase (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings"].items())
            + (f"; 1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the end "
               f"(other work shared the 2 cores)." if load else "."))
        add("")
    def val(n: int | None) -> str:
        return "all of each task's validation split" if n is None else f"the first {n} validation examples of each task"
    test = "the whole test split" if s["test_max"] is None else f"the first {s['test_max']} test examples"
    add(f"Accuracy is on {test} of each task. λ per task (grid {list(s['lambda_grid'])}) was chosen with "
        f"`tallfmt.select_lambdas` on {val(s['lambda_val_max'])}, for TALL + TA and TALL + TIES separately; α per "
        f"merge (grid {list(s['alpha_grid'])}) by the mean accuracy over tasks with `tallfmt.select_alpha` on "
        f"{val(s['alpha_val_max'])} (splits are shuffled, so a prefix is a random subset; the α sweeps are most "
        f"of the run's cost). "
        f"Normalized accuracy = acc / acc_fine-tuned per task, averaged (paper eq. 10); gain retention = "
        f"(acc − acc_θ0) / (acc_ft − acc_θ0) per task, averaged (tasks where fine-tuning changed nothing are "
        f"left out), and pooled = Σ(acc − acc_θ0) / Σ(acc_ft − acc_θ0).")
    add("")

    # targets
    tall = {m: met[m]["mean_norm"] for m in ("tall_ta", "tall_ties")}
    ratio = st["archives"]["tall_ta"]["sizes"]["total"] / st["paper_formula"]
    add("| target | measured | |")
    add("|---|---|---|")
    for m, label in (("tall_ta", "TALL mask + TA"), ("tall_ties", "TALL mask + TIES")):
        v = tall[m]
        add(f"| {label} ≥ 99 % normalized accuracy (mean) | {_pct(v, 2)} % | "
            f"{'met' if v >= 0.99 else f'missed by {100 * (0.99 - v):.2f} points'} |")
    ta = met["ta"]["mean_acc"]
    for k in s["consensus_k"]:
        c = met[f"cta_k{k}"]["mean_acc"]
        add(f"| Consensus TA (k={k}) ≥ Task arithmetic (mean accuracy) | {_pct(c, 2)} % vs {_pct(ta, 2)} % | "
            + (f"met ({100 * (c - ta):+.2f} points)" if c >= ta else f"missed by {100 * (ta - c):.2f} points") + " |")
    add(f"| archive ≤ 0.8 × paper formula (lossless, codec auto) | {ratio:.3f} × "
        f"({_mb(st['archives']['tall_ta']['sizes']['total'])} MB vs {_mb(st['paper_formula'])} MB) | "
        f"{'met' if ratio <= 0.8 else f'missed by {ratio - 0.8:.3f} ×'} |")
    add("")
    why = diagnostics(res, met)
    if why:
        add("Why the missed targets missed (measured facts):")
        add("")
        L.extend(f"- {w}" for w in why)
        add("")
    add(f"Method notes. TIES trims each τ_t to its top {s['ties_density']:.0%} by magnitude (one threshold per "
        "task over all parameters) and elects signs; the TIES *merge* row uses TIES' own disjoint mean "
        "(τ_MTL on the scale of one task vector, then α), as the paper's TIES baseline; TALL mask + TIES and "
        "Consensus TIES use the disjoint sum, as the paper's code does for masks: eq. 5 compares |τ_t| with "
        "|τ_MTL − τ_t| and a decoded θ̂_t = θ0 + m_t ∘ τ_MTL adds τ_MTL unscaled, so τ_MTL must be on the scale "
        "of the summed task vectors, like task arithmetic's. Consensus merges use the masks stored in the TALL "
        "archives (λ as selected for TALL), so they cost no storage beyond one merged model. Magnitude masking "
        f"keeps the top {s['magnitude_density']:.0%} of each |τ_t| (over all parameters) and decodes "
        "θ0 + m_t ∘ τ_MTL with task arithmetic's τ_MTL. The heads are linear probes fitted on θ0's embeddings, "
        "so zero-shot θ0 + head is already strong: gain retention shows what a method keeps of the fine-tuning "
        "gain, which normalized accuracy hides.")
    add("")

    # Table 2
    add("### Accuracy on the test split (like the paper's Table 2)")
    add("")
    add("| | method | selected on validation | acc. % | normalized % | gain retention % (mean / pooled) "
        "| paper's storage formula (MB) | stored (MB) |")
    add("|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        if m.key not in met:
            continue
        r = met[m.key]
        paper_mb, stored_mb = _storage_of(m.key, st)
        add(f"| {m.group} | {m.label} | {res['hparams'].get(m.key, '')} | {_pct(r['mean_acc'])} | "
            f"{_pct(r['mean_norm'])} | {_pct(r['mean_gain'])} / {_pct(r['pooled_gain'])} | {paper_mb} | {stored_mb} |")
    add("")
    add("Storage columns: merged models and zero-shot are one model (32·P bits; stored = one safetensors "
        "file); fine-tuned is 32·(T·P' + F) bits (stored = θ0 + T safetensors files); masks are "
        "(64 + T)·P' + 32·F bits (stored = the archive, codec auto). Per-task heads (Linear(384, C), "
        f"{st['heads_bytes']:,} bytes for all tasks) are kept beside every option and not counted.")
    add("")

    short = {t: t.replace("vader_", "v_").replace("warriner_valence", "warriner") for t in tasks}
    for title, field, nd in (("absolute accuracy (%)", "acc", 1), ("normalized accuracy (%)", "norm", 1),
                             ("gain retention (%)", "gain", 0)):
        add(f"#### Per task: {title}")
        add("")
        add("| method | " + " | ".join(short[t] for t in tasks) + " | mean |")
        add("|---|" + "---|" * (T + 1))
        for m in METHODS:
            if m.key not in met:
                continue
            r = met[m.key]
            mean_key = {"acc": "mean_acc", "norm": "mean_norm", "gain": "mean_gain"}[field]
            add(f"| {m.label} | " + " | ".join(_pct(r[field][t], nd) for t in tasks) + f" | {_pct(r[mean_key], nd)} |")
        add("")

    # selection
    add("### Selection on validation")
    add("")
    add("| task | λ TALL + TA | λ TALL + TIES | validation accuracy at λ = " + ", ".join(
        f"{v:g}" for v in s["lambda_grid"]) + " (TA) |")
    add("|---|---|---|---|")
    sel_ta, sel_ties = res["selection"]["lambda_tall_ta"], res["selection"]["lambda_tall_ties"]
    for t in tasks:
        sc = sel_ta["scores"][t]
        add(f"| {t} | {sel_ta['lambdas'][t]:g} | {sel_ties['lambdas'][t]:g} | "
            + " ".join(_pct(sc.get(str(float(v)))) for v in s["lambda_grid"]) + " |")
    add("")
    add("| merge | α | mean validation accuracy over α = " + ", ".join(f"{a:g}" for a in s["alpha_grid"]) + " |")
    add("|---|---|---|")
    for m in METHODS:
        a = res["selection"].get(f"alpha_{m.key}")
        if a:
            add(f"| {m.label} | {a['alpha']:g} | " + " ".join(f"{100 * v:.1f}" for v in a["scores"].values()) + " |")
    add("")

    # storage
    P1, F = st["params"]["masked"], st["params"]["shared"]
    raw = st["raw_collection_files"]
    add("### Storage")
    add("")
    add(f"P' = {P1:,} masked (fine-tuned) parameters, F = {F:,} shared ones (the unused pooler and the int64 "
        f"position ids, equal in every checkpoint), T = {T}.")
    add("")
    add("| storage option | bytes | MB | vs raw collection | vs paper formula |")
    add("|---|---|---|---|---|")

    def row(label: str, n: int) -> None:
        add(f"| {label} | {n:,} | {_mb(n)} | {n / raw:.3f} × | {n / st['paper_formula']:.3f} × |")
    row(f"raw collection: θ0 + {T} fine-tunes as safetensors files", raw)
    row("each checkpoint zstd-compressed separately (tensor by tensor)", st["checkpoints_zstd"])
    row("each checkpoint byte-plane-zstd-compressed separately", st["checkpoints_byteplane-zstd"])
    row("paper, fine-tuned models: 32·(T·P' + F) bits", st["paper_finetuned"])
    row("paper, TALL masks: (64 + T)·P' + 32·F bits", st["paper_formula"])
    for name, label in (("tall_ta_raw", "archive TALL + TA, codec raw"), ("tall_ta_zstd", "archive TALL + TA, codec zstd"),
                        ("tall_ta", "archive TALL + TA, codec auto (byte-plane-zstd floats, zstd masks)"),
                        ("tall_ties", "archive TALL + TIES, codec auto"),
                        ("magnitude", "archive magnitude masking 10 %, codec auto"),
                        ("ties_mean", "archive TIES (disjoint mean) merge, codec auto")):
        if name in st["archives"]:
            row(label, st["archives"][name]["sizes"]["total"])
    row("one model (a merge): 32·P bits", st["paper_single_model"])
    add("")
    add("Archive parts (codec auto), bits per masked parameter:")
    add("")
    add("| archive | θ0 | τ_MTL | all T masks | shared + header + padding |")
    add("|---|---|---|---|---|")
    for name in ("tall_ta", "tall_ties", "magnitude", "tall_ta_raw"):
        if name not in st["archives"]:
            continue
        z = st["archives"][name]["sizes"]
        rest = z["shared"] + z["per_task"] + z["header"] + z["padding"]
        add(f"| {name} | {8 * z['theta0'] / P1:.2f} | {8 * z['tau'] / P1:.2f} | {8 * z['masks'] / P1:.2f} | "
            f"{rest:,} bytes |")
    add("")

    # agreement
    ag = res["agreement"]
    add("### Mask agreement (paper eq. 7, Fig. 3)")
    add("")
    add("Fraction of the masked parameters kept by exactly n of the T task masks (TALL masks with the selected λ).")
    add("")
    add("| n | kind | TALL + TA: parameters | % | TALL + TIES: parameters | % |")
    add("|---|---|---|---|---|---|")
    for ra, rt in zip(ag["tall_ta"]["rows"], ag["tall_ties"]["rows"]):
        add(f"| {ra['n']} | {ra['kind']} | {ra['params']:,} | {100 * ra['fraction']:.2f} | {rt['params']:,} | "
            f"{100 * rt['fraction']:.2f} |")
    add("")
    dens = " ".join(f"{short[m['name']]} {100 * (m['mask_density'] or 0):.1f}" for m in ag["tall_ta"]["mask"])
    add(f"Mask density per task (TALL + TA, % of P'): {dens}.")
    add("")
    if "selfish" in ag["tall_ta"]:
        for name, label in (("tall_ta", "TALL + TA"), ("tall_ties", "TALL + TIES")):
            a = ag[name]
            add(f"Selfish share of each task's mask ({label}: parameters only that task keeps, what consensus "
                "with k = 2 takes from it), %: " + " ".join(
                    f"{short[t]} {100 * a['selfish'][t] / a['kept'][t]:.1f}" if a["kept"][t] else f"{short[t]} –"
                    for t in tasks) + ".")
            add("")
    if res.get("plot"):
        add(f"![mask agreement, TALL + TA]({res['plot']})")
        add("")
    return "\n".join(L) + "\n"


def replace_section(path: Path, section: str, prefix: str = SECTION_PREFIX) -> None:
    """Replace the section of ``path`` whose heading starts with ``prefix`` (from that heading to the next
    ``## `` heading), or append it; the rest of the file is left as it is (re-read right before writing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.startswith(prefix)), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if re.match(r"##\s", lines[j])), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(res: dict, out: Path, results_path: Path, plot_path: Path, command: str, date: str) -> str:
    ag = res["agreement"]["tall_ta"]
    T = len(res["tasks"])
    plot_agreement(plot_path, f"TALL masks (λ per task) on τ_MTL of task arithmetic: {T} tasks, "
                   f"{sum(ag['counts']):,} masked parameters", ag["rows"], ag["mask"], overwrite=True)
    res["plot"] = os.path.relpath(plot_path, results_path.parent)
    section = render(res, command, date)
    (out / "report.md").write_text(section, encoding="utf-8")
    write_json_atomic(out / "results.json", {**res, "command": command, "date": date})
    replace_section(results_path, section)
    return section


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: $TALLFMT_ZOO or the build's cache)")
    ap.add_argument("--tasks", nargs="+", default=None, help="tasks to use (default: every complete task)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="archives, report.md, results.json, cache.json")
    ap.add_argument("--quick", action="store_true",
                    help=f"select λ and α on {QUICK.lambda_val_max} validation examples per task, λ grid "
                         f"{QUICK.lambda_grid}, α grid {QUICK.alpha_grid}")
    ap.add_argument("--lambda-val-max", type=int, default=None,
                    help="validation examples per task for λ selection (default: all)")
    ap.add_argument("--alpha-val-max", type=int, default=None,
                    help=f"validation examples per task for α selection (default: {Settings.alpha_val_max}; "
                         f"0: all)")
    ap.add_argument("--test-max", type=int, default=None, help="test examples per task (default: all)")
    ap.add_argument("--lambda-grid", type=float, nargs="+", default=None)
    ap.add_argument("--alpha-grid", type=float, nargs="+", default=None)
    ap.add_argument("--results", type=Path, default=None,
                    help="Markdown file whose zoo section is replaced (default: bench/RESULTS.md; with --quick, "
                         "OUT/RESULTS.md)")
    ap.add_argument("--plot", type=Path, default=None,
                    help="agreement PNG (default: bench/zoo_agreement.png; with --quick, OUT/zoo_agreement.png)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="ignore cached steps in OUT/cache.json")
    args = ap.parse_args(argv)

    s = QUICK if args.quick else Settings()
    over = {k: v for k, v in (("lambda_val_max", args.lambda_val_max), ("test_max", args.test_max),
                              ("alpha_val_max", args.alpha_val_max),
                              ("lambda_grid", tuple(args.lambda_grid) if args.lambda_grid else None),
                              ("alpha_grid", tuple(args.alpha_grid) if args.alpha_grid else None)) if v is not None}
    s = dataclasses.replace(s, **over)
    if s.alpha_val_max == 0:
        s = dataclasses.replace(s, alpha_val_max=None)
    partial = args.quick or bool(over)
    results_path = args.results or (args.out / "RESULTS.md" if partial else DEFAULT_RESULTS)
    plot_path = args.plot or (args.out / "zoo_agreement.png" if partial else DEFAULT_PLOT)
    torch.set_num_threads(args.threads)
    command = ".venv/bin/python -m bench.zoo.evaluate" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    log(f"{command}  (torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    load_start = os.getloadavg()[0]
    res = Run(args.zoo, args.tasks, args.out, s, fresh=args.fresh).run()
    res["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    section = write_outputs(res, args.out, results_path, plot_path, command, date)
    print(section, flush=True)
    log(f"wrote {results_path} (section), {plot_path}, {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
