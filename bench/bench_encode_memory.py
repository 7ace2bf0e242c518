"""Encode peak memory against the streaming bound of issue 3:

    peak RSS ≤ about (T + 3) × the largest tensor + the interpreter-and-torch baseline

    .venv/bin/python bench/bench_encode_memory.py [--tasks 4] [--largest 8388608] [--factor 10]
    .venv/bin/python bench/bench_encode_memory.py --quick        # small zoo, factor 2 (smoke test)

How: a synthetic zoo is written to bench/_cache/ (float32; one largest tensor of --largest elements
and many smaller ones) whose total input size is ≥ --factor × the bound. Each encode runs in a fresh
subprocess that (1) imports tallfmt, torch and numba and runs a tiny encode of a 2-task file zoo — its
RSS then is the *baseline* — (2) resets its VmHWM (``echo 5 > /proc/self/clear_refs``), (3) encodes
the big zoo and prints its VmHWM. Meanwhile the parent samples /proc/PID/status (VmRSS, RssAnon,
RssFile) every --interval seconds.

Inputs are memory-mapped, so the pages of the input files that the encoder has touched count in
VmRSS/VmHWM (as RssFile) for as long as the files stay mapped: they are page cache, shared and clean,
which the kernel drops under memory pressure, not memory the encoder allocated. The bound is about
what the encoder allocates, so it is checked against RssAnon (the peak of the samples); VmHWM is
reported as well, to show how much of the inputs was mapped at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common as C  # noqa: E402

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# The child: baseline, then the big encode


def _child(spec: dict) -> None:
    import numba  # noqa: F401  (part of the baseline, as the brief says)
    import torch

    import tallfmt
    from tallfmt.checkpoints import save_safetensors

    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    tiny = Path(spec["tiny_dir"])
    tiny.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(64, 64, generator=g), "b": torch.randn(1000, generator=g)}
    paths = []
    for t in range(3):
        sd = base if t == 0 else {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        p = tiny / f"m{t}.safetensors"
        save_safetensors(sd, p)
        paths.append(p)
    tallfmt.encode(paths[0], {"x": paths[1], "y": paths[2]}, tiny / "tiny.tall", merge=spec["merge"],
                   overwrite=True)
    st = C.proc_status()
    reset = C.reset_hwm()
    print("BASELINE " + json.dumps({**st, "hwm_reset": reset}), flush=True)
    t0 = time.perf_counter()
    rep = tallfmt.encode(spec["base"], {Path(p).stem: p for p in spec["tasks"]}, spec["out"], overwrite=True,
                         merge=spec["merge"], codec=spec["codec"])
    dt = time.perf_counter() - t0
    st = C.proc_status()
    import resource

    print("DONE " + json.dumps({**st, "seconds": dt, "archive_bytes": rep.archive_bytes,
                                "input_bytes": rep.input_bytes,
                                "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
          flush=True)


def run_child(spec: dict, interval: float) -> dict:
    """Run one encode in a subprocess, sampling its /proc status; returns baseline, final, peaks."""
    proc = subprocess.Popen([sys.executable, str(HERE / "bench_encode_memory.py"), "--child", json.dumps(spec)],
                            stdout=subprocess.PIPE, text=True)
    baseline: dict = {}
    done: dict = {}
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    samples = [0]
    sampling = threading.Event()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            if sampling.is_set():
                st = C.proc_status(proc.pid)
                if st:
                    samples[0] += 1
                    for k in peaks:
                        peaks[k] = max(peaks[k], st.get(k, 0))
            time.sleep(interval)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("BASELINE "):
            baseline = json.loads(line[9:])
            sampling.set()
        elif line.startswith("DONE "):
            done = json.loads(line[5:])
            sampling.clear()
        else:
            print("  child:", line.rstrip())
    proc.wait()
    stop.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"encode subprocess failed with exit code {proc.returncode}")
    return {"baseline": baseline, "done": done, "peaks": peaks, "samples": samples[0]}


# ----------------------------------------------------------------------------------------------
# The parent


def layout_for(largest: int, total_params: int) -> list[tuple[str, tuple[int, ...], str]]:
    """One tensor of `largest` elements, then smaller ones (cycling through 1/2, 1/4, 1/8 of it and a
    bias-sized one) until `total_params` per checkpoint is reached."""
    cols = 1024
    out = [("big.weight", (largest // cols, cols), "w")]
    sizes = [largest // 2, largest // 4, largest // 8, 4096]
    n, i = largest // cols * cols, 0
    while n < total_params:
        s = sizes[i % len(sizes)]
        shape = (s // cols, cols) if s >= cols else (s,)
        out.append((f"layer{i}.{'bias' if s < cols else 'weight'}", shape, "w"))
        n += s
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--largest", type=int, default=8 * 1024 * 1024, help="elements of the largest tensor (float32)")
    ap.add_argument("--factor", type=float, default=10.0, help="total input size ≥ factor × the bound")
    ap.add_argument("--merge", choices=("task_arithmetic", "ties"), default="task_arithmetic")
    ap.add_argument("--codec", default="auto")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads in the encode subprocess (0: torch's default; 1 keeps a loaded machine fast)")
    ap.add_argument("--interval", type=float, default=0.005, help="seconds between /proc samples")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(json.loads(a.child))
        return
    if a.quick:
        a.largest, a.factor = 1 << 20, 2.0
    print(C.machine_note(), flush=True)
    T, L = a.tasks, a.largest // 1024 * 1024
    C.OUT.mkdir(parents=True, exist_ok=True)
    tiny = C.OUT / "memtiny"
    # 1. the baseline alone (a child with an empty big encode is not possible, so: a tiny zoo as "big")
    probe_dir = C.OUT / "memprobe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    from tallfmt.checkpoints import save_safetensors
    import torch

    ps = []
    for t in range(T + 1):
        p = probe_dir / f"p{t}.safetensors"
        save_safetensors({"w": torch.full((8,), float(t))}, p)
        ps.append(str(p))
    spec = {"tiny_dir": str(tiny), "base": ps[0], "tasks": ps[1:], "out": str(probe_dir / "probe.tall"),
            "merge": a.merge, "codec": a.codec,
            "torch_threads": a.torch_threads}
    probe = run_child(spec, a.interval)
    base_rss = probe["baseline"]["VmRSS"]
    term = (T + 3) * L * 4
    bound = term + base_rss
    per_ckpt = int(a.factor * bound / (T + 1) / 4) + 1
    layout = layout_for(L, per_ckpt)
    params = C.layout_params(layout)
    print(f"baseline RSS (imports + tiny encode) {base_rss / 1e6:.0f} MB; largest tensor {L:,} float32 = "
          f"{L * 4 / 1e6:.1f} MB; bound = (T+3) × largest + baseline = {term / 1e6:.0f} + {base_rss / 1e6:.0f} = "
          f"{bound / 1e6:.0f} MB; zoo: {len(layout)} tensors, {params / 1e6:.0f}M params per checkpoint, "
          f"{(T + 1) * params * 4 / 1e9:.2f} GB of inputs", flush=True)
    base, tasks = C.write_synthetic_zoo(C.CACHE, layout, T)
    inputs = [base, *tasks]
    total = C.files_bytes(inputs)
    C.warm_page_cache(inputs)
    spec = {"tiny_dir": str(tiny), "base": str(base), "tasks": [str(p) for p in tasks],
            "out": str(C.OUT / "bench-memory.tall"), "merge": a.merge, "codec": a.codec,
            "torch_threads": a.torch_threads}
    r = run_child(spec, a.interval)
    b, d, pk = r["baseline"], r["done"], r["peaks"]
    anon_growth = pk["RssAnon"] - b["RssAnon"]
    rows = [
        ["inputs on disk (θ0 + T tasks)", f"{total / 1e6:,.0f} MB", f"{total / bound:.1f}× the bound"],
        ["largest tensor (float32)", f"{L * 4 / 1e6:.1f} MB", f"(T+3) × largest = {term / 1e6:.0f} MB"],
        ["baseline VmRSS / RssAnon (imports + tiny encode)", f"{b['VmRSS'] / 1e6:.0f} / {b['RssAnon'] / 1e6:.0f} MB", ""],
        ["bound = (T+3) × largest + baseline VmRSS", f"{bound / 1e6:.0f} MB", ""],
        ["VmHWM during the encode (VmHWM reset after the baseline)", f"{d['VmHWM'] / 1e6:,.0f} MB",
         f"{d['VmHWM'] / bound:.2f}× the bound"],
        ["peak sampled VmRSS", f"{pk['VmRSS'] / 1e6:,.0f} MB", f"{pk['VmRSS'] / bound:.2f}× the bound"],
        ["peak sampled RssFile (mapped input pages + libraries)", f"{pk['RssFile'] / 1e6:,.0f} MB", ""],
        ["peak sampled RssAnon", f"{pk['RssAnon'] / 1e6:,.0f} MB",
         f"baseline RssAnon + {anon_growth / 1e6:.0f} MB = {anon_growth / term:.2f}× (T+3) × largest"],
        ["peak RssAnon + baseline RssFile", f"{(pk['RssAnon'] + b['RssFile']) / 1e6:,.0f} MB",
         f"{(pk['RssAnon'] + b['RssFile']) / bound:.2f}× the bound"],
        ["encode time", f"{d['seconds']:.1f} s", f"{d['input_bytes'] / d['seconds'] / 1e6:.0f} MB/s of inputs"],
    ]
    print(f"\nT = {T}, merge {a.merge}, codec {a.codec}, torch threads {a.torch_threads or 'default'}, "
          f"{len(layout)} tensors; {r['samples']} samples every "
          f"{a.interval * 1e3:g} ms; VmHWM reset {'worked' if b.get('hwm_reset') else 'FAILED (VmHWM includes the baseline phase)'}\n")
    print(C.md_table(["quantity", "value", "vs"], rows))
    ok = pk["RssAnon"] + b["RssFile"] <= bound
    print(f"\nbound on private memory (peak RssAnon + baseline RssFile ≤ bound): {'met' if ok else 'MISSED'}; "
          f"VmHWM including mapped input pages: {'within' if d['VmHWM'] <= bound else 'over'} the bound")
    print("\n" + C.machine_note())


if __name__ == "__main__":
    main()
