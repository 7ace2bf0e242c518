"""The driver the real-zoo benches share: parse --zoo/--out/--no-results, measure on the built zoo, write
results.json and replace the bench's own section of bench/RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.zoo.evaluate import replace_section
from bench.zoo.evaluate_lib import ZooEvaluator


def run(module: str, doc: str, section: str, default_out: str,
        measure: Callable[[ZooEvaluator, Path, list[str], argparse.Namespace], dict[str, Any]],
        render: Callable[[dict[str, Any], str, str, float], str], argv: list[str] | None,
        extra: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--zoo", default=None, help="the zoo folder (default: the built one)")
    ap.add_argument("--out", default=default_out, help="archives and results.json")
    ap.add_argument("--no-results", action="store_true", help="do not write bench/RESULTS.md")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    command = f".venv/bin/python -m {module}" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    torch.set_num_threads(2)
    ev = ZooEvaluator(args.zoo)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = measure(ev, out, list(ev.tasks), args)
    res["zoo"] = str(ev.dir)
    seconds = time.perf_counter() - t0
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    text = render(res, command, date, seconds)
    print(text)
    if not args.no_results:
        replace_section(Path(__file__).resolve().parents[1] / "RESULTS.md", text, section)
