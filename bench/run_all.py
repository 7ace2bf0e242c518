"""Run every benchmark in its quick (smoke-test) form, one after the other, each in its own process.

    .venv/bin/python bench/run_all.py                 # quick forms, a few minutes
    .venv/bin/python bench/run_all.py --full          # the full runs recorded in RESULTS.md (long)
    .venv/bin/python bench/run_all.py --only codec maskmath

Exit status 1 if any bench failed. The figures of quick runs are too small to mean much; they check
that every bench still runs. bench_sharded is skipped when dask.distributed is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES = {  # name: (script, quick args, full args)
    "kernels": ("bench_kernels.py", ["--n", "1000000", "--repeats", "3"], ["--n", "64000000", "--repeats", "21"]),
    "codec": ("bench_codec.py", ["--quick"], []),
    "maskmath": ("bench_maskmath.py", ["--quick"], []),
    "encode_memory": ("bench_encode_memory.py", ["--quick"], []),
    "sharded": ("bench_sharded.py", ["--quick"], []),
    "serving": ("bench_serving.py", ["--quick"], []),
    "serving_gpu": ("bench_serving_gpu.py", ["--quick"], []),
    "open": ("bench_open.py", ["--mib", "2"], ["--mib", "100"]),
    "encode": ("bench_encode.py", ["--quick"], []),
    "maskcodec": ("bench_maskcodec.py", ["--quick"], []),
    "residual": ("bench_residual.py", ["--quick", "--repeats", "3"], ["--repeats", "7"]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES))
    a = ap.parse_args(argv)
    failed = []
    for name in a.only or list(BENCHES):
        script, quick, full = BENCHES[name]
        if name == "sharded" and importlib.util.find_spec("distributed") is None:
            print(f"== {name}: skipped (dask.distributed not installed)")
            continue
        cmd = [sys.executable, str(HERE / script), *(full if a.full else quick)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s\n", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("FAILED:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
