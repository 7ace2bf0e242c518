"""Encode at the speed of the machine (issue 12): encode against zstd-3 of every input file and against
one materialised read of every input, default threads against threads=1, on an idle machine and with a
CPU-bound neighbour process on the other core — every ratio from timings taken side by side in one run.

    .venv/bin/python bench/bench_encode.py                    # both zoos, both conditions
    .venv/bin/python bench/bench_encode.py --zoo synthetic    # 24 × 1024² float32, 8 fine-tunes (96 MiB each)
    .venv/bin/python bench/bench_encode.py --zoo gpt2         # the GPT-2-small shape (124M params), 4 fine-tunes
    .venv/bin/python bench/bench_encode.py --quick            # small sizes, one round (smoke test)

Cases (page cache warm, archives written and fsynced to bench/_out/):
  zstd-3      zstandard.ZstdCompressor(level=3).compress of every input file's bytes (the lossless baseline)
  read        safetensors load_file + clone of every tensor of every input (one materialised read)
  TA          tallfmt.encode, task arithmetic, default options (threads = one per core)
  TA t=1      the same with threads=1
  TIES        merge="ties" (global trim: a histogram pass, then the encode pass)
  TIES t=1    the same with threads=1
The neighbour is `python -c "while True: pass"` started before the rounds and killed after them.
Targets: TA / zstd-3 ≤ 0.5, TIES / zstd-3 ≤ 1.0, TA / read ≤ 4, default / threads=1 ≤ 1.1, both conditions.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import _common as C  # noqa: E402  (bench/ is on sys.path when run as a script)


def synthetic_layout(layers: int = 24, side: int = 1024) -> list[tuple[str, tuple[int, ...], str]]:
    return [(f"layer{i}.weight", (side, side), "w") for i in range(layers)]


def gpt2_layout(layers: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024
                ) -> list[tuple[str, tuple[int, ...], str]]:
    """The tensors of GPT-2 small as transformers names them (lm_head tied to wte, so not stored)."""
    out = [("transformer.wte.weight", (vocab, d), "w"), ("transformer.wpe.weight", (ctx, d), "w")]
    for i in range(layers):
        p = f"transformer.h.{i}."
        out += [(p + "ln_1.weight", (d,), "w"), (p + "ln_1.bias", (d,), "w"),
                (p + "attn.c_attn.weight", (d, 3 * d), "w"), (p + "attn.c_attn.bias", (3 * d,), "w"),
                (p + "attn.c_proj.weight", (d, d), "w"), (p + "attn.c_proj.bias", (d,), "w"),
                (p + "ln_2.weight", (d,), "w"), (p + "ln_2.bias", (d,), "w"),
                (p + "mlp.c_fc.weight", (d, 4 * d), "w"), (p + "mlp.c_fc.bias", (4 * d,), "w"),
                (p + "mlp.c_proj.weight", (4 * d, d), "w"), (p + "mlp.c_proj.bias", (d,), "w")]
    return out + [("transformer.ln_f.weight", (d,), "w"), ("transformer.ln_f.bias", (d,), "w")]


@contextmanager
def neighbour(busy: bool) -> Iterator[None]:
    """A CPU-bound process on the machine while the block runs (none when not busy)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def cases(base: Path, tasks: list[Path], out: Path, quick: bool) -> list[tuple[str, object]]:
    import zstandard
    from safetensors.torch import load_file

    import tallfmt

    inputs = [base, *tasks]
    srcs = {p.stem: p for p in tasks}

    def zstd3() -> int:
        c = zstandard.ZstdCompressor(level=3)
        return sum(len(c.compress(p.read_bytes())) for p in inputs)

    def read() -> int:
        n = 0
        for p in inputs:
            n += len(C.clone_all(load_file(str(p))))
        return n

    def enc(name: str, **kw: object):
        return lambda: tallfmt.encode(base, srcs, out / f"{name}.tall", overwrite=True, **kw)

    return [("zstd-3", zstd3), ("read", read),
            ("TA", enc("ta")), ("TA t=1", enc("ta1", threads=1)),
            ("TIES", enc("ties", merge="ties")), ("TIES t=1", enc("ties1", merge="ties", threads=1))]


def run(zoo: str, quick: bool, repeats: int) -> str:
    layout = (synthetic_layout(4, 256) if quick else synthetic_layout()) if zoo == "synthetic" else (
        gpt2_layout(2, 128, 4000, 256) if quick else gpt2_layout())
    n_tasks = 8 if zoo == "synthetic" else 4
    base, tasks = C.write_synthetic_zoo(C.CACHE, layout, n_tasks)
    inputs = [base, *tasks]
    total = C.files_bytes(inputs)
    out = C.OUT / f"bench-encode-{zoo}"
    out.mkdir(parents=True, exist_ok=True)
    # kernels compiled (cached on disk) and zstd contexts made before any timed round
    import tallfmt
    tallfmt.encode(base, {p.stem: p for p in tasks[:1]}, out / "warmup.tall", merge="ties", overwrite=True)
    lines = [f"### {zoo}: {len(layout)} tensors, {C.layout_params(layout) / 1e6:.1f}M params per model, "
             f"{n_tasks} fine-tunes + θ0, inputs {total / 2**20:,.0f} MiB\n"]
    for busy in (False, True):
        C.warm_page_cache(inputs)
        with neighbour(busy):
            t = C.interleaved(cases(base, tasks, out, quick), repeats, warmup=0, after=gc.collect)
            note = C.machine_note()
        rows = []
        for name in ("zstd-3", "read", "TA", "TA t=1", "TIES", "TIES t=1"):
            x = t[name]
            rows.append([name, f"{x.best:.2f} s", f"{total / x.best / 2**20:,.0f}", C.fmt_ratio(x, t["zstd-3"]),
                         C.fmt_ratio(x, t["read"])])
        rows.append(["TA default / TA t=1", "", "", C.fmt_ratio(t["TA"], t["TA t=1"]), ""])
        rows.append(["TIES default / TIES t=1", "", "", C.fmt_ratio(t["TIES"], t["TIES t=1"]), ""])
        lines.append(f"\n**{'with a CPU-bound neighbour process' if busy else 'idle'}** — best of {repeats} "
                     f"rounds, cases interleaved; {note}\n")
        lines.append(C.md_table(["case", "best", "MiB/s of inputs", "× zstd-3 (median)", "× read (median)"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", choices=("synthetic", "gpt2", "both"), default="both")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # the baselines' clone() must not spin torch's threads either
    print(C.machine_note())
    for zoo in (("synthetic", "gpt2") if a.zoo == "both" else (a.zoo,)):
        print(run(zoo, a.quick, 1 if a.quick else a.repeats), flush=True)


if __name__ == "__main__":
    main()
