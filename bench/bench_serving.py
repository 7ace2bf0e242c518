"""Serving from the archive on the CPU: decode, load_into and switch against safetensors, on the
GPT-2-small shape (bench/_gpt2.py: 124M parameters, T tasks with sparse deltas, codec auto).

    .venv/bin/python bench/bench_serving.py                  # idle, then with a CPU-bound neighbour
    .venv/bin/python bench/bench_serving.py --phases idle    # one phase
    .venv/bin/python bench/bench_serving.py --quick          # a tiny GPT-2, 2 rounds (smoke test)

Every ratio is against a baseline timed in the same rounds (cases interleaved, order rotated), page
cache warm; "best" is the minimum over rounds, "median" the median of the same-round ratios.

- first decode: ``tallfmt.open`` + ``decode(task)`` + close, a fresh archive each time (cache empty)
  / ``load_file`` + materialise of that task's original checkpoint (``clone`` with one torch thread,
  and ``backend="pread"``; the better of the two is the reference). Target ≤ 1.5×.
- later decode: ``decode`` of another task from an archive that has decoded one (cache warm) /
  the same reference. Target ≤ 1.0×.
- load_into / (``load_file`` + ``model.load_state_dict``) into a GPT2LMHeadModel (tied lm_head),
  archive cache warm.
- switch / (``load_file`` + ``load_state_dict``): a switcher alternating between the tasks. Target ≤ 1.0×.
- switcher resident bytes vs the model's bytes: target ≤ (2 + T/32) × model + 10 %.
- ``tallfmt info`` wall time vs ``python -c pass`` (subprocesses): target ≤ 0.5 s.

Phase "neighbour" repeats the timings while a CPU-bound process (a busy loop) runs beside them, the
other core's worth of competition a server has.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import _common as C  # noqa: E402  (bench/ is on sys.path when run as a script)
import _gpt2  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


TARGETS = {"first decode": 1.5, "later decode": 1.0, "load_into": 1.0, "switch": 1.0}


def _cases(z: _gpt2.Gpt2Zoo, repeats: int) -> tuple[dict[str, C.Timed], dict[str, str]]:
    import tallfmt
    from safetensors.torch import load_file

    tasks = z.task_names
    paths = {p.stem: str(p) for p in z.tasks}
    warm = tallfmt.open(z.archive)
    warm.decode(tasks[0])
    model = z.model()
    switch = warm.switcher(z.model())
    switch(tasks[0])
    turn = {"later": 0, "load_into": 0, "switch": 0, "base": 0}

    def nxt(kind: str) -> str:  # later decodes / switches cycle through the other tasks
        turn[kind] += 1
        return tasks[turn[kind] % len(tasks)] if len(tasks) > 1 else tasks[0]

    def first() -> object:
        with tallfmt.open(z.archive) as a:
            return a.decode(tasks[0])

    one = lambda fn: C.with_torch_threads(1, fn)  # noqa: E731
    cases = [
        ("load_file + clone (torch threads 1)", one(lambda: C.clone_all(load_file(paths[tasks[0]])))),
        ("load_file(backend='pread')", lambda: load_file(paths[tasks[0]], backend="pread")),
        ("first decode (open + decode, cache empty)", first),
        ("later decode (another task, cache warm)", lambda: warm.decode(nxt("later"))),
        ("load_file + load_state_dict (torch threads 1)",
         one(lambda: model.load_state_dict(load_file(paths[nxt("base")])))),
        ("load_file + load_state_dict (default threads)",
         lambda: model.load_state_dict(load_file(paths[nxt("base")]))),
        ("load_into (cache warm)", lambda: warm.load_into(model, nxt("load_into"))),
        ("switch (alternating tasks)", lambda: switch(nxt("switch"))),
    ]
    t = C.interleaved(cases, repeats, after=gc.collect)
    warm.close()
    return t, {n: n for n, _ in cases}


def _cpu(fn) -> tuple[float, float]:
    """(wall, user + system CPU seconds of this process) of one call."""
    t0, c0 = time.perf_counter(), os.times()
    fn()
    c1 = os.times()
    return time.perf_counter() - t0, (c1.user - c0.user) + (c1.system - c0.system)


def _budget(z: _gpt2.Gpt2Zoo, repeats: int) -> str:
    """Where a first decode's time goes: CPU time of the decode and of decompressing θ0 and τ_MTL alone
    (one thread, every plane of every masked tensor), against load_file + clone's CPU time."""
    import tallfmt
    from safetensors.torch import load_file

    from tallfmt.format.dtypes import by_name

    def first() -> None:
        with tallfmt.open(z.archive) as a:
            a.decode(z.task_names[0])

    def decompress() -> None:
        with tallfmt.open(z.archive, cache_bytes=0) as a:
            for e in a.header.tensors:
                if e.role == "masked":
                    a.tensors.decoded_now(e, e.base, by_name(e.dtype).itemsize)
                    a.tensors.decoded_now(e, e.tau, 4)
    rows = []
    for name, fn in (("load_file + clone (torch threads 1)",
                      C.with_torch_threads(1, lambda: C.clone_all(load_file(str(z.tasks[0]))))),
                     ("first decode (2 threads)", first),
                     ("checksum + decompress θ0 and τ_MTL only, one thread", decompress)):
        runs = [_cpu(fn) for _ in range(repeats)]
        gc.collect()
        rows.append([name, f"{min(w for w, _ in runs) * 1e3:.0f} ms", f"{min(c for _, c in runs) * 1e3:.0f} ms"])
    return C.md_table(["case", "best wall", "best CPU (user + sys)"], rows)


def _rss() -> int:
    return C.proc_status().get("VmRSS", 0)


def _resident(z: _gpt2.Gpt2Zoo) -> tuple[int, int, int]:
    """(model bytes, switcher.resident_bytes, RSS growth of building one with the archive's cache off)."""
    import tallfmt
    from tallfmt.read.serving import model_bytes

    model = z.model()
    gc.collect()
    before = _rss()
    with tallfmt.open(z.archive, cache_bytes=0) as a:
        switch = a.switcher(model)
    gc.collect()
    grown = _rss() - before
    return model_bytes(model), switch.resident_bytes, grown


def _info_times(archive: Path, repeats: int) -> tuple[C.Timed, C.Timed]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    tallfmt_cmd = [sys.executable, "-m", "tallfmt.cli", "info", str(archive)]

    def run(cmd: list[str]) -> object:
        return subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    t = C.interleaved([("python -c pass", lambda: run([sys.executable, "-c", "pass"])),
                       ("tallfmt info", lambda: run(tallfmt_cmd))], repeats)
    return t["python -c pass"], t["tallfmt info"]


def _phase(name: str, z: _gpt2.Gpt2Zoo, a: argparse.Namespace) -> str:
    target = TARGETS
    neighbour = None
    if name == "neighbour":
        neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        note = C.machine_note()
        budget = _budget(z, max(2, a.repeats // 2))
        t, _ = _cases(z, a.repeats)
        py, info = _info_times(z.archive, a.info_repeats)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    names = list(t)
    clone, pread, first, later, lsd1, lsd, into, switch = (t[n] for n in names)
    ref_load = clone if clone.best <= pread.best else pread
    ref_lsd = lsd1 if lsd1.best <= lsd.best else lsd
    rows = []
    for n in names:
        x = t[n]
        rows.append([n, f"{x.best * 1e3:.0f} ms", f"{x.median * 1e3:.0f} ms"])

    def verdict(x: C.Timed, ref: C.Timed, goal: float) -> list[str]:
        r, med = C.ratio(x, ref)
        return [f"{r:.2f}× (median {med:.2f}×)", f"≤ {goal:g}×", "met" if r <= goal else "**missed**"]
    verdicts = [
        ["first decode / load_file + materialise", *verdict(first, ref_load, target["first decode"])],
        ["later decode / load_file + materialise", *verdict(later, ref_load, target["later decode"])],
        ["load_into / load_file + load_state_dict", *verdict(into, ref_lsd, target["load_into"])],
        ["switch / load_file + load_state_dict", *verdict(switch, ref_lsd, target["switch"])],
        ["tallfmt info (wall) / python -c pass", f"{info.best:.2f} s vs {py.best:.2f} s",
         "≤ 0.5 s", "met" if info.best <= 0.5 else "**missed**"],
    ]
    return (f"### Phase: {name}\n\n{note}\n\n"
            + C.md_table(["case", "best", "median"], rows) + "\n\n"
            + f"References: load = {ref_load.name}; load_state_dict = {ref_lsd.name} (the faster of each pair).\n\n"
            + C.md_table(["ratio", "measured", "target", ""], verdicts) + "\n\n"
            + "Where a first decode's time goes (CPU time counts every thread):\n\n" + budget)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--info-repeats", type=int, default=5)
    ap.add_argument("--phases", nargs="+", choices=("idle", "neighbour"), default=["idle", "neighbour"])
    ap.add_argument("--quick", action="store_true", help="a tiny GPT-2 config, 2 rounds (smoke test)")
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats, a.info_repeats = 2, 2
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    print(C.machine_note(), flush=True)
    t0 = time.perf_counter()
    z = _gpt2.gpt2_zoo(tasks=a.tasks, dtype=dtype, small=a.quick)
    C.warm_page_cache([z.base, *z.tasks, z.archive])
    mb, resident, grown = _resident(z)
    print(f"\nGPT-2 zoo: {z.folder.name}, {len(z.tasks)} tasks, {a.dtype}, archive "
          f"{z.archive.stat().st_size / 1e6:.0f} MB (built/loaded in {time.perf_counter() - t0:.0f} s)\n")
    print(_gpt2.memory_table(mb, resident, grown, len(z.tasks), "RSS growth of building it (cache off)"), flush=True)
    # the package's bytecode, as an installed package has it (this machine sets PYTHONDONTWRITEBYTECODE)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "tallfmt")], check=True)
    for phase in a.phases:
        print("\n" + _phase(phase, z, a), flush=True)
    print("\n" + C.machine_note())


if __name__ == "__main__":
    main()
