"""Residuals (FORMAT.md §11): decode time of a task with its residual vs without (target ≤ 1.1×), and
the encode time with a residual budget vs without (two more reads of the inputs), on a synthetic zoo.

    .venv/bin/python bench/bench_residual.py [--quick] [--budget 1.0] [--tasks 4] [--repeats 7]

Both archives hold the same θ0, τ_MTL and masks (task arithmetic, codec auto); one adds every task's
residual of ``--budget`` bits per masked parameter. Decode = ``Archive.decode(task)`` of every task in
turn (one decoded model at a time), the segment cache on (the later-decode case: θ0 and τ_MTL decoded
once) and off (every decode decompresses θ0 and τ_MTL again); the same archive decoded with
``residual=False`` is timed too. Timings interleave the cases round by round (bench/_common.py) and
report the best time of each and the median same-round ratio.
"""

from __future__ import annotations

import argparse
import time

import _common as C
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small zoo (hidden 128, 2 layers)")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--budget", type=float, default=1.0, help="residual bits per masked parameter")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    import tallfmt

    print(C.machine_note())
    layout = C.bert_like_layout(hidden=128, layers=2, vocab=4000) if a.quick else C.bert_like_layout(hidden=384, layers=6)
    print(f"synthetic zoo: BERT-like, {C.layout_params(layout) / 1e6:.1f}M params, T={a.tasks}, float32", flush=True)
    base, task_paths = C.write_synthetic_zoo(C.CACHE, layout, a.tasks)
    tasks = {p.stem: p for p in task_paths}
    C.OUT.mkdir(parents=True, exist_ok=True)
    plain_path, res_path = C.OUT / "residual-plain.tall", C.OUT / "residual-with.tall"

    def enc_plain() -> object:
        return tallfmt.encode(base, tasks, plain_path, overwrite=True)

    def enc_res() -> object:
        return tallfmt.encode(base, tasks, res_path, overwrite=True, residual=a.budget)

    enc = C.interleaved([("encode", enc_plain), ("encode + residual", enc_res)], max(1, a.repeats // 3), warmup=1)
    print("\n| encode | best s | vs without |\n|---|---|---|")
    print(f"| without residual | {enc['encode'].best:.2f} | 1 |")
    print(f"| residual {a.budget:g} bit/param | {enc['encode + residual'].best:.2f} | "
          f"{C.fmt_ratio(enc['encode + residual'], enc['encode'])} |")
    with tallfmt.open(res_path) as z:
        entries = sum(z.residual_info(t)["entries"] for t in z.tasks)
        rbytes = sum(z.residual_info(t)["bytes"] for t in z.tasks)
        masked = sum(e.numel for e in z.header.tensors if e.role == "masked")
        stats = {t: z.task_info(t) for t in z.tasks}
    print(f"\nresidual: {entries:,} entries over {a.tasks} tasks ({entries / a.tasks / masked:.2%} of the "
          f"{masked:,} masked parameters per task), {rbytes:,} bytes = {8 * rbytes / entries:.2f} bits per entry; "
          f"archive {plain_path.stat().st_size:,} → {res_path.stat().st_size:,} bytes")
    print("rel error per task without → with its residual: " + ", ".join(
        f"{t} {s['rel_error_mask']:.4f} → {s['rel_error']:.4f}" for t, s in stats.items()))

    for cache in (True, False):
        kw = {} if cache else {"cache_bytes": 0}
        with tallfmt.open(plain_path, **kw) as zp, tallfmt.open(res_path, **kw) as zr:
            names = zp.tasks

            def dec(z: object, residual: bool = True) -> object:
                def run() -> None:
                    for t in names:
                        sd = z.decode(t, residual=residual)
                        del sd
                return run
            cases = [("without", dec(zp)), ("with", dec(zr)), ("with, residual=False", dec(zr, False))]
            res = C.interleaved(cases, a.repeats, warmup=1)
        label = "cache on (later decodes)" if cache else "cache off (every decode decompresses)"
        print(f"\n| decode {len(names)} tasks, {label} | best s | vs without |\n|---|---|---|")
        for name, _ in cases:
            print(f"| {name} | {res[name].best:.3f} | {C.fmt_ratio(res[name], res['without'])} |")
    print("\n" + C.machine_note())


if __name__ == "__main__":
    t0 = time.perf_counter()
    with torch.inference_mode():
        main()
    print(f"({time.perf_counter() - t0:.0f} s)")
