"""Per-task sparse residuals (FORMAT.md §11, issue 17): encode selects the entries of largest
|τ_t − m_t∘τ_MTL| exactly; every decode path adds them with one rounding; the torch and the fused
encode paths write the same bytes; sharded archives decode the same; hostile residual segments are
refused with FormatError. Expected values come from numpy, from the inputs and the stored τ_MTL and
masks, independently of the library's decode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import tallfmt
from tallfmt.errors import FormatError, InputError
from tallfmt.format.header import parse_header
from tallfmt.write import thresholds
from tests import _tallcraft as craft

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
STEP = 1 << 20  # tallfmt.read.defaults.KERNEL_STEP: the decode's range jobs meet here


# --- the reference, in numpy ------------------------------------------------------------------------
def widen(t: torch.Tensor) -> np.ndarray:
    """float32 values of a float32/float16/bfloat16 tensor, exactly, flat."""
    t = t.detach().reshape(-1)
    if t.dtype == torch.bfloat16:
        return (t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return t.numpy().astype(np.float32)


def storage(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 → the dtype's storage, round to nearest even (no NaN here)."""
    if dtype == "F32":
        return x.astype(np.float32)
    if dtype == "F16":
        return x.astype(np.float16)
    u = x.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def stored_residual(zoo: tallfmt.Archive, name: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and float32 values of a residual, from its segments' bytes (own gap decoding)."""
    e = zoo.entry(name)
    r = e.residual(i)
    if r is None:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    reader = zoo.layout.reader(name)
    gaps = np.frombuffer(reader.read(r.positions, 4), dtype="<u4").astype(np.int64)
    pos = np.cumsum(gaps + 1) - 1
    bits = np.frombuffer(reader.read(r.values, 2), dtype="<u2")
    return pos, (bits.astype(np.uint32) << 16).view(np.float32)


def expected(zoo: tallfmt.Archive, base: dict, task: str, name: str) -> np.ndarray:
    """FORMAT.md §11: round(θ0_f + m·τ_MTL + r) at the residual's entries, §4.4 elsewhere."""
    e = zoo.entry(name)
    i = zoo.task_index(task)
    b = base[name]
    theta0 = widen(b)
    tau = zoo.tau(name).reshape(-1).numpy()
    bit = zoo.mask(task, name).reshape(-1).numpy().astype(bool)
    a = np.where(bit, theta0 + tau, theta0).astype(np.float32)
    out = storage(b).copy()
    out[bit] = round_to(a[bit], e.dtype)
    pos, vals = stored_residual(zoo, name, i)
    out[pos] = round_to((a[pos] + vals).astype(np.float32), e.dtype)
    return out


def differences(zoo: tallfmt.Archive, base: dict, tasks: dict, task: str) -> np.ndarray:
    """d_t over the masked tensors in table order, float32."""
    parts = []
    for name, role in zoo.roles.items():
        if role != "masked":
            continue
        tau_t = widen(tasks[task][name]) - widen(base[name])
        m = zoo.mask(task, name).reshape(-1).numpy().astype(bool)
        parts.append(tau_t - np.where(m, zoo.tau(name).reshape(-1).numpy(), np.float32(0)))
    return np.concatenate(parts)


def make_zoo(rng: np.random.Generator, shapes: dict[str, tuple[tuple[int, ...], str]], n_tasks: int,
             scale: float = 0.01) -> tuple[dict, dict]:
    base = {k: torch.from_numpy(rng.standard_normal(math.prod(s)).astype(np.float32)).reshape(s).to(TORCH[d])
            for k, (s, d) in shapes.items()}
    tasks = {}
    for t in range(n_tasks):
        tasks[f"t{t}"] = {k: (v.float() + torch.from_numpy(
            (rng.standard_normal(v.numel()) * scale).astype(np.float32)).reshape(v.shape)).to(v.dtype)
            for k, v in base.items()}
    return base, tasks


def check_decodes(zoo: tallfmt.Archive, base: dict) -> None:
    for task in zoo.tasks:
        sd = zoo.decode(task)
        for name, role in zoo.roles.items():
            if role == "masked":
                assert np.array_equal(storage(sd[name]), expected(zoo, base, task, name)), (task, name)


def check_selection(zoo: tallfmt.Archive, base: dict, tasks: dict, budgets: dict[str, float]) -> None:
    """The stored entries are exactly the nonzero d_t with |d_t| ≥ the k-th largest (ties kept)."""
    n = sum(math.prod(zoo.entry(nm).shape) for nm, r in zoo.roles.items() if r == "masked")
    for i, task in enumerate(zoo.tasks):
        d = differences(zoo, base, tasks, task)
        a = np.abs(d)
        k = min(math.floor(budgets.get(task, 0) * n / 16), int((a > 0).sum()))
        chosen = []
        off = 0
        for name, role in zoo.roles.items():
            if role == "masked":
                pos, vals = stored_residual(zoo, name, i)
                chosen.append(pos + off)
                off += math.prod(zoo.entry(name).shape)
        chosen = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
        if k == 0:
            assert chosen.size == 0
            continue
        v = np.sort(a[a > 0])[::-1][k - 1]
        want = np.flatnonzero(a >= v)
        assert np.array_equal(chosen, want), task


# --- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_round_trip_every_dtype_odd_lengths(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(1)
    shapes = {"w": ((13, 7), dtype), "v": ((1,), dtype), "u": ((1001,), dtype), "ids": ((5,), "F32")}
    base, tasks = make_zoo(rng, shapes, 3)
    tasks["t1"]["ids"] = base["ids"].clone()  # equal in t1
    budgets = {"t0": 4.0, "t1": 1.0, "t2": 0.0}
    rep = tallfmt.encode(base, tasks, tmp_path / "z.tall", residual=budgets)
    with tallfmt.open(tmp_path / "z.tall") as zoo:
        assert zoo.header.version == (1, 2)
        zoo.verify()
        check_decodes(zoo, base)
        check_selection(zoo, base, tasks, budgets)
        assert zoo.residual_info("t2") == {"entries": 0, "bytes": 0}
        info = zoo.residual_info("t0")
        assert info["entries"] == rep.task_stats["t0"]["residual_entries"] > 0 and info["bytes"] > 0
        # the statistics: with the residual the error is smaller, without it it is what decode(residual=False) gives
        s = rep.task_stats["t0"]
        assert s["rel_error"] < s["rel_error_mask"]
        masked = [k for k, r in zoo.roles.items() if r == "masked"]
        for task in zoo.tasks:
            plain, sd = zoo.decode(task, residual=False), zoo.decode(task)
            err = sum(float(((plain[k].double() - tasks[task][k].double()) ** 2).sum()) for k in masked)
            err_r = sum(float(((sd[k].double() - tasks[task][k].double()) ** 2).sum()) for k in masked)
            tau2 = sum(float(((tasks[task][k].double() - base[k].double()) ** 2).sum()) for k in masked)
            st_ = rep.task_stats[task]
            assert st_["rel_error_mask"] == pytest.approx(math.sqrt(err / tau2), rel=1e-9)
            assert st_["rel_error"] == pytest.approx(math.sqrt(err_r / tau2), rel=1e-9)
            assert zoo.task_info(task)["rel_error"] == st_["rel_error"]


def test_entries_at_tensor_and_chunk_boundaries(tmp_path: Path) -> None:
    """Large differences placed at the first and last element, at the encoder's chunk boundaries and at
    the decode's range boundaries (KERNEL_STEP) are selected and decoded there."""
    rng = np.random.default_rng(2)
    n = STEP + 77
    base, tasks = make_zoo(rng, {"big": ((n,), "F32"), "small": ((37,), "BF16")}, 2, scale=1e-4)
    spots = [0, 1, 63, 64, 127, 128, STEP - 1, STEP, STEP + 1, n - 1]
    # opposite changes of two tasks: τ_MTL ≈ 0 there, so d_t = τ_t − m_t∘τ_MTL ≈ ±0.5 whatever the mask
    for name, where in (("big", spots), ("small", [0, 36])):
        for p in where:
            tasks["t0"][name][p] += 0.5
            tasks["t1"][name][p] -= 0.5
    budgets = {"t0": 16 * (len(spots) + 2.5) / (n + 37)}
    tallfmt.encode(base, tasks, tmp_path / "z.tall", residual=budgets, chunk_size=64)
    with tallfmt.open(tmp_path / "z.tall") as zoo:
        pos, _ = stored_residual(zoo, "big", 0)
        assert pos.tolist() == spots
        pos, _ = stored_residual(zoo, "small", 0)
        assert pos.tolist() == [0, 36]
        check_decodes(zoo, base)
        check_selection(zoo, base, tasks, budgets)
        # one tensor decoded straight into a target (load_into), and switched to
        target = {k: torch.empty_like(v) for k, v in base.items()}
        zoo.load_into(target, "t0")
        sd = zoo.decode("t0")
        assert all(torch.equal(target[k], sd[k]) for k in sd)
        switch = zoo.switcher(target)
        for task in ("t0", "t1", "t0"):
            switch(task)
            sd = zoo.decode(task)
            assert all(torch.equal(target[k].view(torch.uint8), sd[k].view(torch.uint8)) for k in sd), task
        assert torch.equal(zoo.decode_tensor("t0", "big"), zoo.decode("t0")["big"])


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_torch_kernel_decodes_and_switches_the_same_bits(tmp_path: Path, dtype: str) -> None:
    """kernel="torch" (the path of CUDA devices, here on the CPU) applies residuals bit for bit as numba."""
    rng = np.random.default_rng(11)
    base, tasks = make_zoo(rng, {"w": ((70_001,), dtype), "s": ((33,), dtype)}, 3, scale=0.05)
    tallfmt.encode(base, tasks, tmp_path / "z.tall", residual={"t0": 3.0, "t2": 1.0})
    with tallfmt.open(tmp_path / "z.tall") as zn, tallfmt.open(tmp_path / "z.tall", kernel="torch") as zt:
        target = {k: torch.empty_like(v) for k, v in base.items()}
        switch = zt.switcher(target)
        for task in ("t0", "t1", "t2", "t0"):
            a, b = zn.decode(task), zt.decode(task)
            assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a), task
            switch(task)
            assert all(torch.equal(target[k].view(torch.uint8), a[k].view(torch.uint8)) for k in a), task
        check_decodes(zt, base)


def test_empty_residuals(tmp_path: Path) -> None:
    """k = 0 (no budget, or one too small for an entry) stores nothing: a 1.1 archive like one without."""
    rng = np.random.default_rng(3)
    base, tasks = make_zoo(rng, {"w": ((40,), "F32")}, 2)
    tallfmt.encode(base, tasks, tmp_path / "none.tall")
    for i, residual in enumerate([0.0, {"t0": 0.0}, 0.3]):  # 0.3 · 40 / 16 < 1
        tallfmt.encode(base, tasks, tmp_path / f"z{i}.tall", residual=residual)
        with tallfmt.open(tmp_path / f"z{i}.tall") as zoo:
            assert zoo.header.version == (1, 1)
            assert all(not e.residuals for e in zoo.header.tensors)
            with tallfmt.open(tmp_path / "none.tall") as plain:
                for t in zoo.tasks:
                    assert all(torch.equal(a, b) for a, b in zip(zoo.decode(t).values(), plain.decode(t).values()))


def test_residual_option_is_checked(tmp_path: Path) -> None:
    base, tasks = make_zoo(np.random.default_rng(4), {"w": ((8,), "F32")}, 1)
    for bad in (-1, float("nan"), 33, "1", True, {"nope": 1.0}, {"t0": -0.5}):
        with pytest.raises(InputError, match="residual"):
            tallfmt.encode(base, tasks, tmp_path / "z.tall", residual=bad)
    assert not (tmp_path / "z.tall").exists()
    tallfmt.encode(base, tasks, tmp_path / "z.tall", residual=1)
    with tallfmt.open(tmp_path / "z.tall") as zoo, pytest.raises(InputError, match="residual"):
        zoo.decode("t0", residual="no")


@pytest.mark.parametrize("merge, mask", [("task_arithmetic", "tall"), ("ties", "tall"), ("ties", "magnitude")])
def test_fused_and_torch_paths_write_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    merge: str, mask: str) -> None:
    rng = np.random.default_rng(5)
    base, tasks = make_zoo(rng, {"w": ((301,), "BF16"), "x": ((9, 9), "F16"), "y": ((100,), "F32")}, 3)
    kw = dict(residual=2.0, merge=merge, mask_method=mask, chunk_size=64)
    tallfmt.encode(base, tasks, tmp_path / "fused.tall", **kw)
    monkeypatch.setattr(thresholds, "fused_on", lambda device: False)
    tallfmt.encode(base, tasks, tmp_path / "torch.tall", **kw)
    assert (tmp_path / "fused.tall").read_bytes() == (tmp_path / "torch.tall").read_bytes()
    with tallfmt.open(tmp_path / "torch.tall") as zoo:
        assert zoo.header.version == (1, 2)
        check_decodes(zoo, base)
        check_selection(zoo, base, tasks, {t: 2.0 for t in tasks})


def test_sharded_archive_decodes_as_the_single_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    base, tasks = make_zoo(rng, {f"w{j}": ((50 + j,), "F32") for j in range(5)}, 2)
    budgets = {"t0": 3.0, "t1": 1.0}
    tallfmt.encode(base, tasks, tmp_path / "one.tall", residual=budgets, merge="ties")
    tallfmt.encode(base, tasks, tmp_path / "sh", residual=budgets, merge="ties", shards=3)
    with tallfmt.open(tmp_path / "one.tall") as one, tallfmt.open(tmp_path / "sh") as sh:
        sh.verify()
        for t in one.tasks:
            a, b = one.decode(t), sh.decode(t)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert one.residual_info(t)["entries"] == sh.residual_info(t)["entries"]
            assert one.task_info(t)["residual_entries"] == sh.task_info(t)["residual_entries"]
            assert sh.task_info(t)["rel_error"] == pytest.approx(one.task_info(t)["rel_error"], rel=1e-12)
        check_selection(sh, base, tasks, budgets)


def test_merges_ignore_residuals(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    base, tasks = make_zoo(rng, {"w": ((64,), "F32")}, 2)
    tallfmt.encode(base, tasks, tmp_path / "r.tall", residual=4.0)
    tallfmt.encode(base, tasks, tmp_path / "p.tall")
    with tallfmt.open(tmp_path / "r.tall") as r, tallfmt.open(tmp_path / "p.tall") as p:
        for method in ("task_arithmetic", "consensus", "zeroshot"):
            assert torch.equal(r.merge(method)["w"], p.merge(method)["w"])
        assert torch.equal(r.decode("t0", residual=False)["w"], p.decode("t0")["w"])
        assert not torch.equal(r.decode("t0")["w"], p.decode("t0")["w"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(["F32", "F16", "BF16"]), n=st.integers(1, 200), n_tasks=st.integers(1, 3),
       budget=st.sampled_from([0.5, 2.0, 8.0, 32.0]), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 0.3]))
def test_property_decode_is_the_reference_formula(tmp_path_factory: pytest.TempPathFactory, dtype: str, n: int,
                                                  n_tasks: int, budget: float, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    base, tasks = make_zoo(rng, {"w": ((n,), dtype), "z": ((3,), "F32")}, n_tasks, scale)
    path = tmp_path_factory.mktemp("prop") / "z.tall"
    budgets = {t: budget for t in tasks}
    tallfmt.encode(base, tasks, path, residual=budgets)
    with tallfmt.open(path) as zoo:
        check_decodes(zoo, base)
        check_selection(zoo, base, tasks, budgets)


# --- hostile residual segments ----------------------------------------------------------------------
@pytest.fixture
def residual_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(8)
    base, tasks = make_zoo(rng, {"w": ((20,), "F32"), "h": ((9,), "BF16")}, 2)
    path = tmp_path / "r.tall"
    tallfmt.encode(base, tasks, path, residual={"t0": 6.0}, codec="raw")
    return path


def _residual(h: dict) -> dict:
    return h["tensors"][0]["residuals"][0]


@pytest.mark.parametrize("change, needle", [
    (lambda h: _residual(h).__setitem__("count", 21), "count"),
    (lambda h: _residual(h).__setitem__("count", 0), "count"),
    (lambda h: _residual(h).__setitem__("dtype", "F64"), "dtype"),
    (lambda h: _residual(h).__setitem__("dtype", "I32"), "dtype"),
    (lambda h: _residual(h)["positions"].__setitem__("decoded_length", 4), "decoded_length"),
    (lambda h: _residual(h)["values"].__setitem__("decoded_length", 3), "decoded_length"),
    (lambda h: _residual(h).pop("values"), "missing"),
    (lambda h: _residual(h).__setitem__("extra", 1), "unknown"),
    (lambda h: h["tensors"][0]["residuals"].pop(), "2 tasks"),
    (lambda h: h["tensors"][0].__setitem__("residuals", {}), "array"),
    (lambda h: h.__setitem__("version", [1, 1]), "unknown key"),
])
def test_hostile_residual_headers_are_refused_on_open(residual_file: Path, change, needle: str) -> None:
    def fn(h: dict) -> None:
        change(h)
    craft.rewrite_header(residual_file, fn)
    if needle == "unknown key":  # the preamble says 1.1 too
        parts = craft.split(residual_file)
        craft.write(residual_file, craft.assemble(parts, minor=1))
    with pytest.raises(FormatError, match=needle) as exc:
        tallfmt.open(residual_file)
    assert str(residual_file) in str(exc.value) and "residuals" in str(exc.value)


def _patch_segment(path: Path, which: str, data: bytes) -> None:
    """Overwrite a raw residual segment's bytes in place (same length), its checksum fixed."""
    h = json.loads(craft.split(path).header)
    seg = _residual(h)[which]
    assert seg["codec"] == "raw" and len(data) == seg["length"]
    import xxhash

    raw = bytearray(path.read_bytes())
    raw[seg["offset"]:seg["offset"] + seg["length"]] = data
    path.write_bytes(bytes(raw))
    craft.rewrite_header(path, lambda hh: _residual(hh)[which].__setitem__("xxh3", xxhash.xxh3_64_hexdigest(data)))


@pytest.mark.parametrize("which, make, needle", [
    ("positions", lambda k: np.array([0] * (k - 1) + [25], "<u4").tobytes(), "out of range"),
    ("positions", lambda k: np.array([19] + [0] * (k - 1), "<u4").tobytes(), "out of range"),
    ("positions", lambda k: np.array([0xFFFFFFFF] * k, "<u4").tobytes(), "out of range"),
    ("values", lambda k: np.array([0x7FC0] * k, "<u2").tobytes(), "not finite"),
    ("values", lambda k: np.array([0x7F80] + [0] * (k - 1), "<u2").tobytes(), "not finite"),
])
def test_hostile_residual_data_is_refused_on_read(residual_file: Path, which: str, make, needle: str) -> None:
    k = _residual(json.loads(craft.split(residual_file).header))["count"]
    assert k >= 2
    _patch_segment(residual_file, which, make(k))
    with tallfmt.open(residual_file) as zoo:
        for fn in (zoo.verify, lambda: zoo.decode("t0"), lambda: zoo.decode_tensor("t0", "w"),
                   lambda: zoo.switcher({k: torch.empty(s) for k, s in (("w", (20,)),)}, strict=False)):
            with pytest.raises(FormatError, match=needle) as exc:
                fn()
            assert "residuals[0]" in str(exc.value)
        assert zoo.decode("t0", residual=False)["w"].shape == (20,)  # the residual is only read when applied


def test_a_1_1_reader_refuses_an_archive_with_residuals(residual_file: Path) -> None:
    """A 1.1 reader ignores the key of a newer minor, but the residual segments it does not know are
    then gaps in the data section: it refuses the file (§6 layout, §7) instead of decoding it wrongly."""
    raw = craft.split(residual_file).header

    def without_residuals(h: dict) -> dict:
        for row in h["tensors"]:
            row.pop("residuals", None)
        return h
    with pytest.raises(FormatError, match="gap|follow"):
        from tallfmt.format.header import check_layout

        hdr = parse_header(json.dumps(without_residuals(json.loads(raw))).encode())
        size = residual_file.stat().st_size
        check_layout(hdr, size, size - len(raw), str(residual_file))


def test_cli_residual_option_and_info(tmp_path: Path) -> None:
    """--residual (one number and task=number) reaches encode; info shows each task's entries, bytes and
    both errors, header-only."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    rng = np.random.default_rng(9)
    base, tasks = make_zoo(rng, {"w": ((500,), "F32")}, 2)
    save_file(base, str(tmp_path / "base.safetensors"))
    for t, sd in tasks.items():
        save_file(sd, str(tmp_path / f"{t}.safetensors"))
    from click.testing import CliRunner

    from tallfmt.cli import cli
    r = CliRunner().invoke(cli, ["encode", str(tmp_path / "base.safetensors"), str(tmp_path / "t0.safetensors"),
                                 str(tmp_path / "t1.safetensors"), "-o", str(tmp_path / "z.tall"),
                                 "--residual", "1", "--residual", "t1=4"])
    assert r.exit_code == 0, r.output
    with tallfmt.open(tmp_path / "z.tall") as zoo:
        assert [zoo.residual_info(t)["entries"] for t in zoo.tasks] == [500 // 16, 4 * 500 // 16]
    for flag in ([], ["--no-residual"]):
        r = CliRunner().invoke(cli, ["decode", str(tmp_path / "z.tall"), "t1", "-o", str(tmp_path / "t1.safetensors"),
                                     "--force", *flag])
        assert r.exit_code == 0, r.output
        from safetensors.torch import load_file

        got = load_file(str(tmp_path / "t1.safetensors"))["w"]
        with tallfmt.open(tmp_path / "z.tall") as zoo:
            assert torch.equal(got, zoo.decode("t1", residual=not flag)["w"])
    code = ("import sys, json, tallfmt.cli\n"
            "from click.testing import CliRunner\n"
            "r = CliRunner().invoke(tallfmt.cli.cli, ['info', '--json', sys.argv[1]])\n"
            "assert 'torch' not in sys.modules and 'numba' not in sys.modules, 'info imported torch'\n"
            "print(r.output)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "z.tall")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    t1 = s["tasks"][1]
    assert t1["residual_entries"] == 4 * 500 // 16 and t1["residual_bytes"] > 0
    assert t1["rel_error"] < t1["rel_error_mask"] and s["bytes"]["residuals"] > 0 and s["format_version"] == [1, 2]


# --- choosing λ and the budget on validation ----------------------------------------------------
def test_select_residuals_under_a_size_limit(tmp_path: Path) -> None:
    """A synthetic validation score (minus the distance to the fine-tune): the choice fits the limit,
    is the best sum of scores among all combinations whose estimated cost fits, uses the largest budget
    when the limit is loose, and only one decoded model is alive at a time."""
    import itertools
    import weakref

    rng = np.random.default_rng(10)
    base, tasks = make_zoo(rng, {"w": ((3000,), "F32"), "x": ((500,), "BF16")}, 2, scale=0.02)
    alive: list[weakref.ref] = []

    def evaluate(task: str, sd: dict) -> float:
        assert all(r() is None for r in alive), "an earlier decoded model is still held"
        alive.append(weakref.ref(sd["w"]))
        return -sum(float((sd[k].double() - tasks[task][k].double()).norm()) for k in ("w", "x"))

    grid = dict(lambda_grid=(0.3, 0.5), budget_grid=(0.0, 0.5, 2.0))
    loose = tallfmt.select_residuals(base, tasks, evaluate, max_ratio=5.0, path=tmp_path / "loose.tall", **grid)
    assert loose.residual == {"t0": 2.0, "t1": 2.0}
    assert loose.archive_bytes == (tmp_path / "loose.tall").stat().st_size <= loose.limit_bytes
    with tallfmt.open(tmp_path / "loose.tall") as zoo:
        from tallfmt.summary import summary

        assert summary(zoo)["paper_formula"]["bytes"] == loose.paper_bytes
        assert loose.ratio == pytest.approx(zoo.sizes()["total"] / loose.paper_bytes)
    # a limit between the cheapest and the dearest choice
    plain = tallfmt.encode(base, tasks, tmp_path / "plain.tall", lambdas=0.3).archive_bytes
    ratio = (plain + 0.5 * (loose.archive_bytes - plain)) / loose.paper_bytes
    alive.clear()
    tight = tallfmt.select_residuals(base, tasks, evaluate, max_ratio=ratio, workdir=tmp_path, **grid)
    assert tight.archive_bytes <= tight.limit_bytes == math.floor(ratio * tight.paper_bytes)
    assert tight.residual != loose.residual
    chosen = sum(tight.scores[t][(tight.lambdas[t], tight.residual[t])] for t in tasks)
    # every combination of the grid that scores better does not fit by the costs the knapsack counts
    # (each rounded up to a bucket of the room), and those costs are close to what encode then stores
    slack = len(tasks) * (tight.limit_bytes - tight.fixed_bytes) / 4096
    better = 0
    for combo in itertools.product(*[list(tight.scores[t]) for t in tasks]):
        total = sum(tight.scores[t][k] for t, k in zip(tasks, combo))
        cost = tight.fixed_bytes + sum(tight.costs[t][k] for t, k in zip(tasks, combo))
        if total > chosen + 1e-12:
            better += 1
            assert cost > tight.limit_bytes - slack, combo
    assert better > 0  # the limit bound the choice
    est = tight.fixed_bytes + sum(tight.costs[t][(tight.lambdas[t], tight.residual[t])] for t in tasks)
    assert abs(tight.archive_bytes - est) <= 512  # header numbers and nulls differ a little
    with pytest.raises(InputError, match="max_ratio"):
        tallfmt.select_residuals(base, tasks, evaluate, max_ratio=0.01, **grid)
    with pytest.raises(InputError, match="residual"):
        tallfmt.select_residuals(base, tasks, evaluate, max_ratio=1.0, residual=1.0)
