"""Sharded encode on Dask: wall time with 1 vs 2 local worker processes (ratio, same run), and the
memory each worker holds at peak.

    .venv/bin/python bench/bench_sharded.py                    # BERT-like zoo, 4 tasks, 3 rounds
    .venv/bin/python bench/bench_sharded.py --quick            # a small zoo, 1 round (smoke test)
    .venv/bin/python bench/bench_sharded.py --write-results    # also (re)write our section of RESULTS.md

Both clusters are up for the whole run and the two cases are timed in the same rounds, interleaved, the
order rotated (bench/_common.interleaved): the ratio is the figure, not the absolute times. Every worker
is one process with one thread (torch, OpenMP and numba limited to 1), so "2 workers" means 2 cores. Both
runs write the same shards (same ``shards=``), and the script checks the files are byte-identical.

The machine is shared, so the wall-time speed-up depends on what else runs (the load average is in
the machine note). The CPU seconds each worker process spends in an encode (/proc/PID/stat utime +
stime) do not: "CPU-bound speed-up" is the 1-worker CPU time over the busiest of the 2 workers' CPU
time, the speed-up 2 free cores would give (the driver's own CPU time is listed too).

Worker memory: a thread samples /proc/PID/status of every worker process every 10 ms during each
encode (peak RssAnon: memory the worker itself holds; file-backed pages of the memory-mapped
checkpoints are page cache, counted in VmHWM but not held), and VmHWM (peak RSS, reset before each
encode) is read after it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CACHE, OUT, ROOT, MB, bert_like_layout, files_bytes, fmt_ratio, interleaved,  # noqa: E402
                     layout_params, machine_note, md_table, proc_status, reset_hwm, warm_page_cache,
                     write_synthetic_zoo)

import tallfmt  # noqa: E402

SECTION = "## Sharded encode on Dask"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1"}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Peak RssAnon and VmRSS of some processes, sampled every ``period`` seconds in a thread."""

    def __init__(self, pids: list[int], period: float = 0.01) -> None:
        self.pids, self.period = pids, period
        self.anon = dict.fromkeys(pids, 0)
        self.rss = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                s = proc_status(pid)
                self.anon[pid] = max(self.anon[pid], s.get("RssAnon", 0))
                self.rss[pid] = max(self.rss[pid], s.get("VmRSS", 0))
            self._stop.wait(self.period)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small zoo, one round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--shards", type=int, default=4, help="shards of every encode (the same in both cases)")
    ap.add_argument("--write-results", action="store_true", help=f"replace {SECTION!r} in bench/RESULTS.md")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    layout = (bert_like_layout(hidden=128, layers=2, vocab=4096) if args.quick
              else bert_like_layout(hidden=384, layers=6, vocab=30522))

    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)  # worker restarts etc. are not results
    print(machine_note())
    base, task_paths = write_synthetic_zoo(CACHE, layout, args.tasks)
    tasks = {f"task{i}": str(p) for i, p in enumerate(task_paths)}
    inputs = [base, *task_paths]
    warm_page_cache(inputs)
    params = layout_params(layout)
    print(f"zoo: {params / 1e6:.1f} M parameters F32, {args.tasks} tasks, {files_bytes(inputs) / MB:.0f} MB "
          f"of checkpoints; {args.shards} shards")
    OUT.mkdir(parents=True, exist_ok=True)

    clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                env=ONE_THREAD, silence_logs=40) for n in (1, 2)}
    clients = {n: Client(c) for n, c in clusters.items()}
    pids = {n: sorted(c.run(os.getpid).values()) for n, c in clients.items()}
    configs = {"task_arithmetic": {}, "ties (global)": {"merge": "ties"}}
    rows, mem_rows = [], []
    try:
        for label, opts in configs.items():
            peaks: dict[int, dict[str, list[float]]] = {n: {"anon": [], "hwm": [], "cpu_max": [], "cpu_sum": [],
                                                            "driver": []} for n in clients}

            def run(n: int, opts: dict = opts) -> None:
                out = OUT / f"sharded-{n}w"
                shutil.rmtree(out, ignore_errors=True)
                for pid in pids[n]:
                    reset_hwm(pid)
                cpu0 = [cpu_seconds(p) for p in pids[n]]
                driver0 = time.process_time()
                with Sampler(pids[n]) as s:
                    tallfmt.encode(base, tasks, out, shards=args.shards, scheduler=clients[n], overwrite=True, **opts)
                cpu = [cpu_seconds(p) - c for p, c in zip(pids[n], cpu0)]
                peaks[n]["cpu_max"].append(max(cpu))
                peaks[n]["cpu_sum"].append(sum(cpu))
                peaks[n]["driver"].append(time.process_time() - driver0)
                peaks[n]["anon"].append(max(s.anon.values()))
                peaks[n]["hwm"].append(max(proc_status(p).get("VmHWM", 0) for p in pids[n]))

            timed = interleaved([(f"{n} worker{'s' if n > 1 else ''}", lambda n=n: run(n)) for n in (1, 2)],
                                rounds, warmup=1)
            a, b = OUT / "sharded-1w", OUT / "sharded-2w"
            same = sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()) and all(
                (a / f.name).read_bytes() == (b / f.name).read_bytes() for f in a.iterdir())
            if not same:
                raise SystemExit("the 1-worker and 2-worker archives differ")
            one, two = timed["1 worker"], timed["2 workers"]
            med = {n: {k: sorted(v)[len(v) // 2] for k, v in peaks[n].items()} for n in (1, 2)}
            rows.append([label, f"{one.best:.2f} s", f"{two.best:.2f} s", fmt_ratio(one, two),
                         f"{med[1]['cpu_sum']:.2f} s", f"{med[2]['cpu_sum']:.2f} s ({med[2]['cpu_max']:.2f} s)",
                         f"{med[1]['cpu_max'] / med[2]['cpu_max']:.2f}×",
                         f"{med[1]['driver']:.2f} s / {med[2]['driver']:.2f} s"])
            for n in (1, 2):
                mem_rows.append([label, n, f"{max(peaks[n]['anon']) / MB:.0f} MB",
                                 f"{max(peaks[n]['hwm']) / MB:.0f} MB"])
            print(f"{label}: 1 worker {one.best:.2f} s, 2 workers {two.best:.2f} s, speed-up {fmt_ratio(one, two)}; "
                  f"CPU-bound speed-up {med[1]['cpu_max'] / med[2]['cpu_max']:.2f}×")
    finally:
        for c in clients.values():
            c.close()
        for c in clusters.values():
            c.close()

    cmd = "bench/bench_sharded.py" + (" --quick" if args.quick else "") + (
        f" --rounds {args.rounds}" if args.rounds else "")
    text = "\n".join([
        SECTION, "",
        f"`.venv/bin/python {cmd}` — {machine_note()}", "",
        f"Synthetic BERT-like zoo: {params / 1e6:.1f} M F32 parameters, θ0 + {args.tasks} tasks "
        f"({files_bytes(inputs) / MB:.0f} MB of safetensors, page cache warm), `shards={args.shards}`, "
        f"Dask `LocalCluster(processes=True, threads_per_worker=1)`, one thread per worker for torch/OpenMP/numba. "
        f"Best of {rounds} interleaved round(s); speed-up = 1-worker time / 2-worker time (best/best, and the "
        f"median of the same-round ratios). Worker CPU: utime + stime of the worker processes during one "
        f"encode (median over rounds); CPU-bound speed-up = 1-worker CPU time / the busier 2-worker's, "
        f"what two free cores give whatever the machine's load. The 1- and 2-worker archives are byte-identical.",
        "",
        md_table(["merge", "1 worker (wall)", "2 workers (wall)", "wall speed-up", "worker CPU, 1 worker",
                  "worker CPU, 2 workers (busier)", "CPU-bound speed-up", "driver CPU (1 / 2 workers)"], rows),
        "",
        "Peak memory per worker process during an encode (max over the workers and rounds): RssAnon is what "
        "the worker holds (τ_MTL and masks of the tensor in hand, chunks, histograms, torch and numba); "
        "VmHWM adds the pages of the memory-mapped checkpoints, which are page cache.", "",
        md_table(["merge", "workers", "peak RssAnon / worker", "peak VmHWM / worker"], mem_rows), ""])
    print()
    print(text)
    if args.write_results:
        write_section(ROOT / "bench" / "RESULTS.md", text)


def write_section(path: Path, text: str) -> None:
    """Replace our section of RESULTS.md (up to the next '## ' heading), or append it; the rest of the
    file, which others edit, is left as it is. Read right before writing."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old, count=1) if pattern.search(old) else (
        old.rstrip("\n") + "\n\n" + text)
    path.write_text(new)
    print(f"wrote {SECTION!r} into {path}")


if __name__ == "__main__":
    main()
