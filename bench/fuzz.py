"""Corruption fuzzing at scale: damaged copies of real archives must raise FormatError or read back
identically (issue 6, item 1). The same cases, mutations and oracle as tests/test_fuzz.py, many more of them.

    .venv/bin/python bench/fuzz.py --cases 20000 --seed 1
    .venv/bin/python bench/fuzz.py --seed 1 --start 1234 --cases 1     # replay one case

Each batch runs in its own subprocess (a segfault or a hang is reported with its seed and case, not
fatal). Exit status 1 when any case failed; the failures are written to --failures (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _fuzz_worker as fw  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10_000, help="number of cases (default 10000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="first case number (to replay a reported case)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes at a time (default 2)")
    ap.add_argument("--batch", type=int, default=2500, help="cases per worker process (default 2500)")
    ap.add_argument("--stall", type=float, default=60.0, help="seconds on one case that count as a hang")
    ap.add_argument("--failures", type=Path, default=Path("fuzz-failures.json"),
                    help="where failing cases are written (default fuzz-failures.json)")
    ap.add_argument("--no-golden", action="store_true", help="leave the spec/golden files out of the corpus")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tallfmt-fuzz-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        archives = fw.build_archives(corpus, golden=not args.no_golden)
        print(f"corpus: {len(archives)} archives ({', '.join(p.name for p in archives)}); "
              f"seed {args.seed}, cases {args.start}..{args.start + args.cases - 1}, {args.jobs} jobs", flush=True)
        done = 0

        def on_report(r: dict) -> None:
            nonlocal done
            done += r["cases"]
            print(f"  {done}/{args.cases} cases, {len(r['failures'])} failing in this batch "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

        report = fw.run_parallel(archives, args.seed, args.cases, workdir=Path(tmp) / "work", jobs=args.jobs,
                                 batch=args.batch, stall=args.stall, start=args.start, on_report=on_report)
    wall = time.perf_counter() - t0
    print(f"{report['cases']} cases, {len(report['failures'])} failures, {wall:.0f} s wall "
          f"({report['seconds']:.0f} s in workers, {report['cases'] / max(report['seconds'], 1e-9):.0f} cases/s "
          f"per worker)")
    for k, v in sorted(report["outcomes"].items()):
        print(f"  {k:32s} {v}")
    if report["failures"]:
        args.failures.write_text(json.dumps(report["failures"], indent=1))
        for f in report["failures"][:5]:
            print(f"FAIL seed {f['seed']} case {f['case']} {f['archive']}: {f['mutation']}")
            for p in f["problems"][:3]:
                print("    " + p.replace("\n", "\n    "))
        print(f"all failures: {args.failures}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
