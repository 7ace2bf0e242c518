"""The ``tau-rans`` mask codec (FORMAT.md §5.1) against the default zstd masks on the real zoo
(bench/zoo: all-MiniLM-L6-v2 and its fine-tunes), for task arithmetic and TIES.

    .venv/bin/python bench/bench_maskcodec.py                 # every task of the zoo, 5 rounds
    .venv/bin/python bench/bench_maskcodec.py --tasks 4 --repeats 3
    .venv/bin/python bench/bench_maskcodec.py --quick         # 2 tasks, 2 rounds (smoke test)

Without a built zoo it says so and exits 0.

For each merge it encodes the zoo twice (``mask_codec="auto"``, i.e. zstd-1, and ``"tau-rans"``) and
reports, each figure measured in this run:

- bits per parameter per mask: 8 · Σ stored mask bytes / (P' · T) (P' = masked parameters);
- the archive against the paper's formula (64+T)·P' + 32·F bits (``tallfmt.summary``);
- decode speed of one task's masks (every masked tensor; τ_MTL already decoded, as a reader has it
  after the first task), Mbit/s of mask bits on one thread, idle and with a CPU-bound neighbour (a
  busy loop in another process), tau-rans against zstd in the same rounds;
- single-task decode: ``open`` + ``decode(task)`` (cache empty) and a later ``decode`` of another task
  (cache warm), tau-rans archive over the default one, interleaved rounds;
- encode time, tau-rans over default (the best of two encodes each, in swapped order).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import _common as C  # noqa: E402  (bench/ is on sys.path when run as a script)

import tallfmt
from tallfmt.format.codecs import decode as decode_segment
from tallfmt.format.container import ContainerReader
from tallfmt.summary import summary

MERGES = ("task_arithmetic", "ties")
CODECS = ("auto", "tau-rans")


def encode_all(theta0: Path, tasks: list[Path]) -> dict[tuple[str, str], tuple[Path, float]]:
    out = {}
    C.OUT.mkdir(parents=True, exist_ok=True)
    srcs = {p.stem: str(p) for p in tasks}
    for merge in MERGES:
        for rnd in range(2):  # two rounds, the order swapped: the best of two encodes each
            for codec in CODECS[::1 if rnd == 0 else -1]:
                path = C.OUT / f"maskcodec-{merge}-{codec}-{len(tasks)}.tall"
                t0 = time.perf_counter()
                tallfmt.encode(str(theta0), srcs, path, merge=merge, mask_codec=codec, overwrite=True)
                dt = time.perf_counter() - t0
                out[(merge, codec)] = (path, min(dt, out.get((merge, codec), (path, dt))[1]))
    return out


def sizes(path: Path) -> dict[str, float]:
    with tallfmt.open(path) as z:
        s = summary(z)
        masked = [e for e in z.header.tensors if e.role == "masked"]
        p_masked = sum(e.numel for e in masked)
        mask_bytes = sum(m.length for e in masked for m in e.masks)
        T = len(z.tasks)
    return {"bits_per_mask": 8 * mask_bytes / (p_masked * T), "total": s["bytes"]["total"],
            "formula": s["paper_formula"]["bytes"], "P": p_masked, "T": T}


class MaskReader:
    """One task's stored mask segments and each tensor's decoded τ_MTL, held in memory."""

    def __init__(self, path: Path, task: int) -> None:
        self.items = []
        with ContainerReader(path) as r:
            for e in r.header.tensors:
                if e.role != "masked":
                    continue
                tau = np.frombuffer(bytes(r.read(e.tau, 4)), dtype=np.float32)
                seg = e.masks[task]
                self.items.append((bytes(r.stored(seg)), seg.decoded_length, seg.codec, tau))
        self.bits = sum(t.size for *_, t in self.items)
        self.outs = [np.empty(dl, np.uint8) for _, dl, _, _ in self.items]

    def run(self) -> None:
        for (stored, dl, codec, tau), out in zip(self.items, self.outs):
            decode_segment(codec, stored, dl, 1, out, tau)


def mask_speed(paths: dict[str, Path], repeats: int, neighbour: bool
               ) -> tuple[dict[str, C.Timed], dict[str, MaskReader]]:
    readers = {codec: MaskReader(p, 0) for codec, p in paths.items()}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if neighbour else None
    try:
        return C.interleaved([(c, r.run) for c, r in readers.items()], repeats), readers
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def decode_times(paths: dict[str, Path], repeats: int) -> dict[str, C.Timed]:
    warm = {c: tallfmt.open(p) for c, p in paths.items()}
    tasks = warm["auto"].tasks
    for z in warm.values():
        z.decode(tasks[0])
    turn = {c: 0 for c in paths}

    def first(c: str):
        def run() -> object:
            with tallfmt.open(paths[c]) as z:
                return z.decode(tasks[0])
        return run

    def later(c: str):
        def run() -> object:
            turn[c] += 1
            return warm[c].decode(tasks[turn[c] % len(tasks)])
        return run

    cases = [(f"first {c}", first(c)) for c in paths] + [(f"later {c}", later(c)) for c in paths]
    out = C.interleaved(cases, repeats)
    for z in warm.values():
        z.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=None, help="use the first N tasks of the zoo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 tasks, 2 rounds")
    args = ap.parse_args()
    found = C.find_zoo()
    if found is None:
        print("no real zoo built (bench/zoo/README.md): nothing to measure")
        return
    theta0, tasks = found
    n_tasks, repeats = (2, 2) if args.quick else (args.tasks, args.repeats)
    tasks = tasks[:n_tasks] if n_tasks else tasks
    args.repeats = repeats
    print(C.machine_note())
    print(f"zoo: {theta0.parent.name}, {len(tasks)} tasks")
    archives = encode_all(theta0, tasks)
    rows = []
    for merge in MERGES:
        s = {c: sizes(archives[(merge, c)][0]) for c in CODECS}
        a, b = s["auto"], s["tau-rans"]
        rows.append([merge, f"{a['bits_per_mask']:.4f}", f"{b['bits_per_mask']:.4f}",
                     f"{b['bits_per_mask'] / a['bits_per_mask'] - 1:+.1%}",
                     f"{a['total'] / a['formula']:.3f}×", f"{b['total'] / b['formula']:.3f}×",
                     f"{archives[(merge, 'tau-rans')][1] / archives[(merge, 'auto')][1]:.2f}×"])
        P, T = a["P"], a["T"]
    print(f"\nP' = {P:,} masked parameters, T = {T}")
    print(C.md_table(["merge", "bits/param/mask zstd (auto)", "tau-rans", "change", "archive / formula, zstd",
                      "tau-rans", "encode time tau-rans / auto"], rows))
    ta = {c: archives[("task_arithmetic", c)][0] for c in CODECS}
    speed_rows = []
    for phase in ("idle", "neighbour"):
        timed, readers = mask_speed(ta, args.repeats, phase == "neighbour")
        bits = readers["auto"].bits
        r = C.fmt_ratio(timed["tau-rans"], timed["auto"])
        speed_rows.append([phase, f"{bits / timed['auto'].best / 1e6:,.0f}", f"{bits / timed['tau-rans'].best / 1e6:,.0f}",
                           f"{timed['tau-rans'].best * 1e3:.1f} ms vs {timed['auto'].best * 1e3:.1f} ms", r])
    print("\nOne task's masks (task arithmetic archive, every masked tensor, one thread, τ_MTL decoded):")
    print(C.md_table(["phase", "zstd Mbit/s", "tau-rans Mbit/s", "time", "tau-rans / zstd"], speed_rows))
    dt = decode_times(ta, args.repeats)
    print("\nSingle-task decode (task arithmetic archive):")
    print(C.md_table(["case", "zstd (auto) best s", "tau-rans best s", "tau-rans / auto"],
                     [[k, f"{dt[f'{k} auto'].best:.3f}", f"{dt[f'{k} tau-rans'].best:.3f}",
                       C.fmt_ratio(dt[f"{k} tau-rans"], dt[f"{k} auto"])] for k in ("first", "later")]))
    print(C.machine_note())


if __name__ == "__main__":
    main()
