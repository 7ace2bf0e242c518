"""Serving from the archive on CUDA: decode on the device, load_into and switch of a GPT-2-small on the
GPU, against safetensors ``load_file(..., device="cuda")`` (+ ``load_state_dict``), the same zoo as
bench_serving.py (bench/_gpt2.py).

    .venv/bin/python bench/bench_serving_gpu.py            # needs a CUDA device; says so and exits 0 without
    .venv/bin/python bench/bench_serving_gpu.py --quick    # a tiny GPT-2, 2 rounds
    .venv/bin/python bench/bench_serving_gpu.py --device cpu --quick   # the same code on the CPU (torch kernels)

Every timing ends with ``torch.cuda.synchronize()``; cases interleaved as in bench/_common.py.

- first decode: ``open`` + ``decode(task, device=...)`` (θ0 / τ_MTL decompressed on the CPU, moved, decoded
  on the device by the torch kernels) / ``load_file(original, device=...)``. Target ≤ 1.5×.
- later decode: another task from the same open archive (cache warm) / the same. Target ≤ 1.0×.
- load_into / (``load_file(device=...)`` + ``load_state_dict``) into a GPT2LMHeadModel on the device.
- switch / (``load_file(device=...)`` + ``load_state_dict``): θ0, θ1 and the masks resident on the device.
  Target ≤ 1.0×.
- resident device memory of the switcher (``torch.cuda.memory_allocated`` before/after building it,
  and ``resident_bytes``) vs the model's bytes: target ≤ (2 + T/32) × model + 10 %.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

import _common as C  # noqa: E402  (bench/ is on sys.path when run as a script)
import _gpt2  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run(a: argparse.Namespace) -> None:
    import tallfmt
    from safetensors.torch import load_file

    from tallfmt.read.serving import model_bytes

    device = torch.device(a.device)
    kernel = "auto" if device.type != "cpu" else "torch"  # on the CPU: the code CUDA runs
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    z = _gpt2.gpt2_zoo(tasks=a.tasks, dtype=dtype, small=a.quick)
    C.warm_page_cache([z.base, *z.tasks, z.archive])
    tasks = z.task_names
    paths = {p.stem: str(p) for p in z.tasks}
    dev = str(device)

    warm = tallfmt.open(z.archive, kernel=kernel)
    warm.decode(tasks[0], device=device)
    model = z.model().to(device)
    served = z.model().to(device)
    gc.collect()
    before = _allocated(device)
    switch = warm.switcher(served)
    switch(tasks[0])
    _sync(device)
    grown = _allocated(device) - before
    mb = model_bytes(served)
    T = len(tasks)
    print(_gpt2.memory_table(mb, switch.resident_bytes, grown, T, "device memory_allocated growth"), flush=True)

    turn = {"later": 0, "into": 0, "switch": 0, "base": 0}

    def nxt(kind: str) -> str:
        turn[kind] += 1
        return tasks[turn[kind] % T]

    def timed(fn):  # every case ends when the device is done
        def call():
            r = fn()
            _sync(device)
            return r
        return call

    def first():
        with tallfmt.open(z.archive, kernel=kernel) as zoo:
            return zoo.decode(tasks[0], device=device)

    cases = [
        (f"load_file(device={dev!r})", timed(lambda: load_file(paths[tasks[0]], device=dev))),
        ("first decode (open + decode on the device)", timed(first)),
        ("later decode (cache warm)", timed(lambda: warm.decode(nxt("later"), device=device))),
        (f"load_file(device={dev!r}) + load_state_dict",
         timed(lambda: model.load_state_dict(load_file(paths[nxt("base")], device=dev)))),
        ("load_into (cache warm)", timed(lambda: warm.load_into(model, nxt("into")))),
        ("switch (alternating tasks)", timed(lambda: switch(nxt("switch")))),
    ]
    t = C.interleaved(cases, a.repeats, after=gc.collect)
    names = [n for n, _ in cases]
    load, first_t, later, lsd, into, sw = (t[n] for n in names)
    print("\n" + C.md_table(["case", "best", "median"],
                            [[n, f"{t[n].best * 1e3:.1f} ms", f"{t[n].median * 1e3:.1f} ms"] for n in names]))

    def verdict(x: C.Timed, ref: C.Timed, goal: float | None) -> list[str]:
        r, med = C.ratio(x, ref)
        return [f"{r:.2f}× (median {med:.2f}×)", "—" if goal is None else f"≤ {goal:g}×",
                "" if goal is None else ("met" if r <= goal else "**missed**")]
    print("\n" + C.md_table(["ratio", "measured", "target", ""], [
        ["first decode / load_file", *verdict(first_t, load, 1.5)],
        ["later decode / load_file", *verdict(later, load, 1.0)],
        ["load_into / load_file + load_state_dict", *verdict(into, lsd, None)],
        ["switch / load_file + load_state_dict", *verdict(sw, lsd, 1.0)],
    ]))
    warm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the CUDA code path on the CPU)")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="a tiny GPT-2 config, 2 rounds (smoke test)")
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats = 2
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_serving_gpu: no CUDA device here (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a machine with a GPU, or with --device cpu for the same code on the CPU.")
        return 0
    print(C.machine_note(), flush=True)
    if a.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(torch.device(a.device))}", flush=True)
    run(a)
    print("\n" + C.machine_note())
    return 0


if __name__ == "__main__":
    sys.exit(main())
