"""Serving from an archive: the decoded-segment cache, decode on a device (the torch path, run on the
CPU here), load_into and the Switcher (bit-identical to decode, in place, ties kept, strict errors),
the kernels they use, the job graph, and `tallfmt decode` with several tasks."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tallfmt
from tallfmt import kernels
from tallfmt.compute import fused
from tallfmt.errors import FormatError, InputError
from tallfmt.format.planes import split_planes
from tallfmt.read.defaults import SMALL_TENSOR
from tallfmt.read.jobs import Jobs
from tallfmt.read.serving import model_bytes

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
TASKS = ("a", "b", "c")


class Net(torch.nn.Module):
    """Every role: emb (masked, tied to head: alias), lin (masked), norm (shared), bn.running_mean
    (per_task by the default glob), steps (an integer buffer: per_task)."""

    def __init__(self, dtype: torch.dtype = torch.float32, vocab: int = 3000) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 24, dtype=dtype)
        self.lin = torch.nn.Linear(24, 70, dtype=dtype)
        self.norm = torch.nn.LayerNorm(70, dtype=dtype)
        self.head = torch.nn.Linear(24, vocab, bias=False, dtype=dtype)
        self.head.weight = self.emb.weight
        self.register_buffer("bn_running_mean", torch.zeros(70, dtype=dtype))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def _zoo(path: Path, dtype: str = "F32", codec: str = "auto", same_mask_task: bool = False) -> Path:
    """θ0 = Net(dtype) and three tasks that change a random 30 % of emb and lin, the running mean and
    the step count (task c: the same as a when ``same_mask_task``)."""
    torch.manual_seed(0)
    net = Net(DTYPES[dtype])
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    base["head.weight"] = base["emb.weight"]
    tasks = {}
    for t, name in enumerate(TASKS):
        g = torch.Generator().manual_seed(1 if same_mask_task and name == "c" else t + 1)
        sd = {}
        for k, v in base.items():
            if k in ("emb.weight", "lin.weight", "lin.bias"):
                keep = torch.rand(v.shape, generator=g) < 0.3
                v = (v.float() + 0.05 * torch.randn(v.shape, generator=g) * keep).to(v.dtype)
            elif k == "bn_running_mean":
                v = v + 0.1 * (t + 1)
            elif k == "steps":
                v = v + 100 * (t + 1)
            sd[k] = v
        sd["head.weight"] = sd["emb.weight"]
        tasks[name] = sd
    tallfmt.encode(base, tasks, path, codec=codec, per_task=("*running_mean",))
    return path


@pytest.fixture(scope="module")
def zoos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serving")
    out = {dt: _zoo(d / f"{dt}.tall", dt) for dt in DTYPES}
    out["raw"] = _zoo(d / "raw.tall", "F32", codec="raw")
    out["zstd"] = _zoo(d / "zstd.tall", "BF16", codec="zstd")
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8).cpu()


def assert_holds(model: torch.nn.Module | dict, expected: dict[str, torch.Tensor], where: str) -> None:
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    assert sd.keys() == expected.keys(), where
    for k, v in sd.items():
        assert v.dtype == expected[k].dtype and v.shape == expected[k].shape, (where, k)
        assert torch.equal(bits(v), bits(expected[k])), (where, k)


def pointers(model: torch.nn.Module) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}


# --- the roles the fixture is meant to cover -------------------------------------------------------
def test_fixture_has_every_role(zoos: dict[str, Path]) -> None:
    with tallfmt.open(zoos["F32"]) as zoo:
        assert zoo.roles == {"emb.weight": "masked", "lin.weight": "masked", "lin.bias": "masked",
                             "norm.weight": "shared", "norm.bias": "shared", "head.weight": "alias",
                             "bn_running_mean": "per_task", "steps": "per_task"}
        assert zoo.entry("emb.weight").base.codec == "byteplane-zstd"
        assert zoo.entry("emb.weight").numel >= SMALL_TENSOR  # decoded by plane and range jobs


# --- the cache ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["F32", "BF16", "raw", "zstd"])
def test_decodes_agree_with_and_without_cache(zoos: dict[str, Path], kind: str) -> None:
    with tallfmt.open(zoos[kind], cache_bytes=0) as cold:
        want = {t: cold.decode(t) for t in TASKS}
        assert cold.cache_info()["bytes"] == 0
    with tallfmt.open(zoos[kind]) as zoo:
        for t in TASKS + TASKS:
            assert_holds(zoo.decode(t), want[t], f"{kind} decode {t}")
            assert_holds(dict(zoo.iter_decode(t)), want[t], f"{kind} iter_decode {t}")
        info = zoo.cache_info()
        assert info["segments"] == 6 and info["hits"] > 0  # θ0 and τ of the three masked tensors
        zoo.clear_cache()
        assert zoo.cache_info()["bytes"] == 0
        assert_holds(zoo.decode("b"), want["b"], f"{kind} after clear_cache")


def test_cache_budget_keeps_what_fits(zoos: dict[str, Path]) -> None:
    with tallfmt.open(zoos["F32"]) as zoo:
        e = zoo.entry("emb.weight")
        budget = e.base.decoded_length + e.tau.decoded_length  # emb's θ0 and τ, nothing more
        want = zoo.decode("a")
    with tallfmt.open(zoos["F32"], cache_bytes=budget) as zoo:
        assert_holds(zoo.decode("a"), want, "small budget")
        info = zoo.cache_info()
        assert info["bytes"] <= budget and info["segments"] >= 1
    with pytest.raises(InputError, match="cache_bytes"):
        tallfmt.open(zoos["F32"], cache_bytes=-1)


def test_decoded_tensors_do_not_share_cached_memory(zoos: dict[str, Path]) -> None:
    with tallfmt.open(zoos["F32"]) as zoo:
        first = zoo.decode("a")
        for v in first.values():
            if v.is_floating_point():
                v.add_(1.0)  # a caller may write its tensors
        again = zoo.decode("a")
        merged = zoo.merge("task_arithmetic", alpha=1.0)
    with tallfmt.open(zoos["F32"], cache_bytes=0) as cold:
        assert_holds(again, cold.decode("a"), "decode after writing a decoded model")
        assert_holds(merged, cold.merge("task_arithmetic", alpha=1.0), "merge through the cache")


# --- the torch path (what CUDA runs), on the CPU -------------------------------------------------
@pytest.mark.parametrize("kind", ["F32", "BF16", "F16", "raw", "zstd"])
def test_torch_kernel_decodes_like_numba(zoos: dict[str, Path], kind: str) -> None:
    with tallfmt.open(zoos[kind]) as zoo, tallfmt.open(zoos[kind], kernel="torch") as tz:
        for t in TASKS:
            want = zoo.decode(t)
            assert_holds(tz.decode(t, device="cpu"), want, f"{kind} torch decode {t}")
            assert_holds(tz.decode(t), want, f"{kind} torch decode {t}, no device")
        # θ0 and τ of the three masked tensors are kept as tensors on each device they were decoded on
        assert tz.cache_info()["segments"] == 12 and tz.cache_info()["hits"] >= 24
    with pytest.raises(InputError, match="kernel"):
        tallfmt.open(zoos["F32"], kernel="cuda")


def test_decode_on_a_device_decodes_there(zoos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # the meta device runs the torch path's shapes and dtypes without data: nothing is decoded on the CPU
    # (users are refused the meta device, which holds no data; this test lets it through)
    import torch

    from tallfmt.compute import devices
    monkeypatch.setattr(devices, "check_device", lambda d: torch.device(d))
    with tallfmt.open(zoos["BF16"]) as zoo:
        sd = zoo.decode("a", device="meta")
        want = zoo.decode("a")
    assert {k: (v.device.type, v.dtype, v.shape) for k, v in sd.items()} == \
        {k: ("meta", v.dtype, v.shape) for k, v in want.items()}


SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.17549435e-38, 6.0e-8, 6.1e-5, 65504.0, 65520.0, 3.0e38,
                    3.4028235e38, np.inf, -np.inf, 1e-3, 2.0 ** -24, 2.0 ** -25, 2.0 ** -133, 1.0 + 2.0 ** -8],
                   np.float32)


def _same_or_both_nan(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype) -> None:
    w = torch.from_numpy(want.copy()).view(dtype)
    g_bits, w_bits = bits(got), bits(w)
    nan = torch.isnan(got.float()) & torch.isnan(w.float())
    diff = (got.reshape(-1).view(torch.int16 if dtype != torch.float32 else torch.int32)
            != w.reshape(-1).view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert not (diff & ~nan).any(), (dtype, int((diff & ~nan).sum()))
    assert g_bits.numel() == w_bits.numel()


@pytest.mark.parametrize("dt", ["F32", "BF16", "F16"])
def test_fused_torch_equals_the_kernel(dt: str) -> None:
    tdt = DTYPES[dt]
    rng = np.random.default_rng(3)
    b, t = np.meshgrid(SPECIAL, SPECIAL, indexing="ij")
    base = torch.from_numpy(b.ravel().copy()).to(tdt)
    tau = np.ascontiguousarray(t.ravel())
    width = np.uint32 if dt == "F32" else np.uint16
    n = 100_003  # and random bit patterns: subnormals, infinities, NaNs of every payload
    rb = rng.integers(0, np.iinfo(width).max, n, dtype=width, endpoint=True)
    base = torch.cat([base, torch.from_numpy(rb.view(np.int32 if dt == "F32" else np.int16)).view(tdt)])
    rt = rng.integers(0, 2**32, n, dtype=np.uint32).view(np.float32)
    rt[::2] = (rng.standard_normal(n // 2 + 1) * 1e-2).astype(np.float32)
    tau = np.concatenate([tau, rt])
    storage = base.view(torch.int32 if dt == "F32" else torch.int16).numpy().view(
        {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}[dt])
    for mask in (np.ones(base.numel(), bool), rng.random(base.numel()) < 0.5):
        packed = kernels.pack_bits(mask)
        want = kernels.decode_masked(storage, tau, packed, dtype=dt)
        got = fused.decode(base, torch.from_numpy(tau), torch.from_numpy(packed))
        _same_or_both_nan(got, want.view(np.int32 if dt == "F32" else np.int16), tdt)
    if dt != "F32":  # every 16-bit pattern against a few τ
        every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(tdt)
        for tv in (0.0, 1e-3, -1.0, 65504.0, 3.0e38, np.inf):
            tau = np.full(65536, tv, np.float32)
            packed = kernels.pack_bits(np.ones(65536, bool))
            want = kernels.decode_masked(every.view(torch.int16).numpy().view(storage.dtype), tau, packed, dtype=dt)
            got = fused.decode(every, torch.from_numpy(tau), torch.from_numpy(packed))
            _same_or_both_nan(got, want.view(np.int16), tdt)


def test_fused_pieces() -> None:
    rng = np.random.default_rng(4)
    for n in (0, 1, 7, 8, 9, 64, 1000):
        m = rng.random(n) < 0.5
        p = kernels.pack_bits(m)
        assert torch.equal(fused.unpack_bits(torch.from_numpy(p), n), torch.from_numpy(m))
        x = rng.standard_normal(n).astype(np.float32)
        planes = torch.from_numpy(split_planes(x.view(np.uint8), 4))
        assert torch.equal(fused.join_planes(planes, torch.float32), torch.from_numpy(x))
        on, off = torch.from_numpy(x), torch.from_numpy(-x)
        out = torch.empty(n)
        assert fused.select(torch.from_numpy(m), on, off, out=out) is out
        assert torch.equal(out, torch.where(torch.from_numpy(m), on, off))
    with pytest.raises(InputError, match="packed mask"):
        fused.unpack_bits(torch.zeros(3, dtype=torch.uint8), 30)
    with pytest.raises(InputError, match="byte planes"):
        fused.join_planes(torch.zeros(2, 5, dtype=torch.uint8), torch.float32)
    with pytest.raises(InputError, match="float32, bfloat16 or float16"):
        fused.add_rounded(torch.zeros(3, dtype=torch.float64), torch.zeros(3))
    with pytest.raises(InputError, match="tau"):
        fused.add_rounded(torch.zeros(3), torch.zeros(4))


# --- the planar and select kernels -------------------------------------------------------------
@pytest.mark.parametrize("dt", ["F32", "BF16", "F16"])
def test_decode_into_layouts_and_ranges(dt: str) -> None:
    rng = np.random.default_rng(5)
    storage = {"F32": np.float32, "BF16": np.uint16, "F16": np.float16}[dt]
    itemsize = np.dtype(storage).itemsize
    for n in (0, 1, 63, 64, 65, 200, 4099):
        base = (rng.standard_normal(n) * 0.02).astype(np.float32)
        base = torch.from_numpy(base).to(DTYPES[dt]).view(torch.int32 if dt == "F32" else torch.int16).numpy().view(storage)
        tau = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        packed = kernels.pack_bits(rng.random(n) < 0.4)
        want = kernels.decode_masked(base, tau, packed, dtype=dt)
        bp, tp = split_planes(base.view(np.uint8), itemsize), split_planes(tau.view(np.uint8), 4)
        for b, t in itertools.product((base, bp), (tau, tp)):
            out = np.zeros(n, storage)
            kernels.decode_into(b, t, packed, out, dtype=dt)
            assert out.tobytes() == want.tobytes(), (dt, n, b.ndim, t.ndim)
            out = np.zeros(n, storage)
            for a in range(0, n, 64):  # ranges, in any order
                kernels.decode_into(b, t, packed, out, dtype=dt, start=a, stop=min(n, a + 64))
            assert out.tobytes() == want.tobytes()
        on = kernels.decode_masked(base, tau, kernels.pack_bits(np.ones(n, bool)), dtype=dt)
        out = np.zeros(n, storage)
        kernels.select_into(on, base, packed, out)
        assert out.tobytes() == want.tobytes()


def test_decode_into_and_select_into_refuse_bad_arguments() -> None:
    f = np.zeros(16, np.float32)
    p = np.zeros(2, np.uint8)
    with pytest.raises(InputError, match="multiple of 8"):
        kernels.decode_into(f, f, p, np.zeros(16, np.float32), dtype="F32", start=3, stop=16)
    with pytest.raises(InputError, match="start, stop"):
        kernels.decode_into(f, f, p, np.zeros(16, np.float32), dtype="F32", start=8, stop=17)
    with pytest.raises(InputError, match="byte planes"):
        kernels.decode_into(np.zeros((2, 16), np.uint8), f, p, np.zeros(16, np.float32), dtype="F32")
    with pytest.raises(InputError, match="overlaps"):
        kernels.decode_into(f, f, p, f, dtype="F32")
    with pytest.raises(InputError, match="read-only"):
        ro = np.zeros(16, np.float32)
        ro.setflags(write=False)
        kernels.decode_into(f, f.copy(), p, ro, dtype="F32")
    with pytest.raises(FormatError, match="padding"):
        kernels.decode_into(f[:4], f[:4], np.array([0x10], np.uint8), np.zeros(4, np.float32), dtype="F32")
    with pytest.raises(InputError, match="on"):
        kernels.select_into(np.zeros(16, np.float16), f, p, np.zeros(16, np.float32))
    with pytest.raises(InputError, match="2- or 4-byte"):
        kernels.select_into(f, f, p, np.zeros(16, np.float64))


# --- load_into ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["F32", "BF16", "F16", "raw"])
def test_load_into_is_in_place_and_bit_identical(zoos: dict[str, Path], kind: str) -> None:
    dt = DTYPES["F32" if kind == "raw" else kind]
    net = Net(dt)
    ptrs = pointers(net)
    emb = net.emb.weight
    with tallfmt.open(zoos[kind]) as zoo:
        for t in TASKS + ("a",):
            assert zoo.load_into(net, t) == ([], [])
            assert_holds(net, {k: v for k, v in zoo.decode(t).items()}, f"{kind} load_into {t}")
    assert net.head.weight is net.emb.weight is emb and pointers(net) == ptrs


def test_load_into_a_state_dict_and_non_contiguous_tensors(zoos: dict[str, Path]) -> None:
    with tallfmt.open(zoos["F32"]) as zoo:
        want = zoo.decode("b")
        sd = {k: torch.zeros_like(v) for k, v in want.items()}
        sd["lin.weight"] = torch.zeros(24, 70).t()  # a transposed view: written through copy_
        zoo.load_into(sd, "b")
        assert_holds(sd, want, "state dict")
        with tallfmt.open(zoos["F32"], kernel="torch") as tz:
            sd2 = {k: torch.zeros_like(v) for k, v in want.items()}
            tz.load_into(sd2, "b")
            assert_holds(sd2, want, "torch kernel")


def test_load_into_names_prefix_and_map(zoos: dict[str, Path]) -> None:
    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = Net()
    with tallfmt.open(zoos["F32"]) as zoo:
        want = zoo.decode("c")
        outer = Outer()
        zoo.load_into(outer, "c", prefix="bert.")
        assert_holds(outer.bert, want, "prefix")
        renamed = {("W_" + k): torch.zeros_like(v) for k, v in want.items()}
        zoo.load_into(renamed, "c", name_map=lambda n: "W_" + n)
        assert all(torch.equal(bits(renamed["W_" + k]), bits(v)) for k, v in want.items())
        net = Net()
        sd = dict(net.state_dict(keep_vars=True))
        sd["tok"] = sd.pop("emb.weight")
        res = zoo.load_into(sd, "c", name_map={"emb.weight": "tok"})
        assert res == ([], []) and torch.equal(sd["tok"], want["emb.weight"])
        res = zoo.load_into(Net(), "c", name_map=lambda n: None if n == "steps" else n, strict=False)
        assert res.missing_keys == ["steps"] and res.unexpected_keys == []


def test_load_into_refuses_mismatched_targets(zoos: dict[str, Path]) -> None:
    with tallfmt.open(zoos["F32"]) as zoo:
        net = Net()
        net.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
        with pytest.raises(InputError, match=r"missing in the archive: 'extra'"):
            zoo.load_into(net, "a")
        before = {k: v.clone() for k, v in net.state_dict().items()}
        res = zoo.load_into(net, "a", strict=False)
        assert res.missing_keys == ["extra"] and res.unexpected_keys == []
        assert torch.equal(net.extra, before["extra"])
        small = {k: v for k, v in Net().state_dict().items() if k != "lin.bias"}
        with pytest.raises(InputError, match=r"not in the target: 'lin.bias'"):
            zoo.load_into(small, "a")
        assert zoo.load_into(small, "a", strict=False).unexpected_keys == ["lin.bias"]
        with pytest.raises(InputError, match=r"'emb.weight' has shape \[3000, 24\].*\[3001, 24\]"):
            zoo.load_into(Net(vocab=3001), "a", strict=False)
        half = Net(torch.float16)
        with pytest.raises(InputError, match="is F32, the target's '.*' is torch.float16 \\(pass cast=True"):
            zoo.load_into(half, "a")
        zoo.load_into(half, "a", cast=True)
        assert torch.equal(half.lin.weight, zoo.decode("a")["lin.weight"].half())
        with pytest.raises(InputError, match="no task"):
            zoo.load_into(Net(), "zz")
        with pytest.raises(InputError, match="nn.Module or a mapping"):
            zoo.load_into([1, 2], "a")  # type: ignore[arg-type]
        untied = Net()
        untied.head.weight = torch.nn.Parameter(torch.zeros(3000, 24))
        zoo.load_into(untied, "a")  # the archive's alias is written into both
        assert torch.equal(untied.head.weight, untied.emb.weight)


def test_ties_the_archive_does_not_have(tmp_path: Path) -> None:
    # the target ties two tensors the archive stores apart (e.g. encoded from files, where ties are
    # copies): fine when they decode equal for the task (load_into) or every task (switcher), else refused
    torch.manual_seed(0)
    w = torch.randn(8, 4)
    base = {"a": w, "b": w.clone()}
    equal = {"s": {"a": w + 1, "b": w + 1}, "t": {"a": w - 1, "b": w - 1}}
    tallfmt.encode(base, equal, tmp_path / "equal.tall")
    differ = {"s": {"a": w + 1, "b": w + 1}, "t": {"a": w + 1, "b": w - 1}}
    tallfmt.encode(base, differ, tmp_path / "differ.tall")
    shared = torch.zeros(8, 4)
    with tallfmt.open(tmp_path / "equal.tall") as zoo:
        want = zoo.decode("t")["a"]
        zoo.load_into({"a": shared, "b": shared}, "t")
        assert torch.equal(shared, want)
        switch = zoo.switcher({"a": shared, "b": shared})
        switch("s")
        assert torch.equal(shared, zoo.decode("s")["b"])
    with tallfmt.open(tmp_path / "differ.tall") as zoo:
        assert not torch.equal(zoo.decode("t")["a"], zoo.decode("t")["b"])
        with pytest.raises(InputError, match="one tensor in the target but differ"):
            zoo.load_into({"a": shared, "b": shared}, "t")
        with pytest.raises(InputError, match="one tensor in the target but differ in the archive for some task"):
            zoo.switcher({"a": shared, "b": shared})


# --- the switcher ----------------------------------------------------------------------------------
SEQUENCES = [("a", "b", "a"), ("a", "a"), ("c", "b", "a", "c", "c", "b")] + [p for p in itertools.permutations(TASKS)]


@pytest.mark.parametrize("kind", ["F32", "BF16", "F16", "zstd"])
@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_switch_sequences_are_bit_identical(zoos: dict[str, Path], kind: str, kernel: str) -> None:
    dt = DTYPES["BF16" if kind == "zstd" else kind]
    with tallfmt.open(zoos[kind]) as zoo:
        want = {t: zoo.decode(t) for t in TASKS}
        net = Net(dt)
        ptrs = pointers(net)
        switch = zoo.switcher(net, kernel=kernel)
        assert switch.task is None
    for seq in SEQUENCES:  # the archive is closed: a switch reads nothing from it
        for t in seq:
            switch(t)
            assert switch.task == t
            assert_holds(net, want[t], f"{kind} {kernel} {seq} at {t}")
    assert net.head.weight is net.emb.weight and pointers(net) == ptrs


def test_switcher_memory_and_skips(tmp_path: Path) -> None:
    path = _zoo(tmp_path / "z.tall", same_mask_task=True)  # task c is task a again
    with tallfmt.open(path) as zoo:
        net = Net()
        switch = zoo.switcher(net)
        T = len(zoo.tasks)
        masked = [zoo.entry(n) for n in ("emb.weight", "lin.weight", "lin.bias")]
        want = sum(2 * e.numel * 4 + T * ((e.numel + 7) // 8) for e in masked) + 3 * 70 * 4 + 3 * 8
        assert switch.resident_bytes == want
        assert switch.resident_bytes <= (2 + T / 32) * 1.1 * model_bytes(net)
        decoded_a = zoo.decode("a")
    switch("a")
    net.lin.weight.data.fill_(7.0)  # not rewritten by a switch to a task with the same masks ...
    switch("c")
    assert (net.lin.weight == 7.0).all()
    switch("b")  # ... rewritten by one whose masks differ
    switch("a")
    assert_holds(net, decoded_a, "a again")
    with pytest.raises(InputError, match="no task 'zz'"):
        switch("zz")
    assert switch.task == "a"
    assert "3 tasks" in repr(switch)


def test_switcher_refuses_what_it_cannot_serve(zoos: dict[str, Path]) -> None:
    with tallfmt.open(zoos["F32"]) as zoo:
        with pytest.raises(InputError, match="is F32, the target's '.*' is torch.bfloat16"):
            zoo.switcher(Net(torch.bfloat16))
        net = Net()
        net.register_buffer("extra", torch.zeros(2))
        with pytest.raises(InputError, match="missing in the archive: 'extra'"):
            zoo.switcher(net)
        switch = zoo.switcher(net, strict=False)
        switch("b")
        assert torch.equal(net.lin.weight, zoo.decode("b")["lin.weight"])
        with pytest.raises(InputError, match="kernel"):
            zoo.switcher(Net(), kernel="cuda")


# --- decode errors through the plane jobs ---------------------------------------------------------
def test_a_damaged_plane_names_the_file_and_segment(tmp_path: Path, zoos: dict[str, Path]) -> None:
    import xxhash

    data = bytearray(zoos["F32"].read_bytes())
    with tallfmt.open(zoos["F32"]) as zoo:
        seg = zoo.entry("emb.weight").tau
        header_offset = zoo.shards[0].header_offset
    raw = bytes(data[header_offset:]).decode()
    # garble the last plane's frame, then reseal the segment checksum and the header
    start = seg.offset + seg.length - 40
    data[start:start + 8] = b"\x00" * 8
    new_sum = xxhash.xxh3_64_hexdigest(bytes(data[seg.offset:seg.offset + seg.length]))
    raw = raw.replace(seg.xxh3, new_sum)
    from tallfmt.format.container import _PREAMBLE  # noqa: PLC2701 - the test reseals the preamble
    hdr = raw.encode()
    data[header_offset:] = hdr
    pre = bytearray(data[:64])
    magic, major, minor, flags, h_off, h_len, _, _ = _PREAMBLE.unpack_from(pre)
    _PREAMBLE.pack_into(pre, 0, magic, major, minor, flags, h_off, len(hdr), xxhash.xxh3_64_intdigest(hdr), 0)
    pre[40:48] = xxhash.xxh3_64_intdigest(bytes(pre[:40])).to_bytes(8, "little")
    data[:64] = pre
    bad = tmp_path / "bad.tall"
    bad.write_bytes(bytes(data))
    with tallfmt.open(bad) as zoo:
        with pytest.raises(FormatError, match=rf"{bad}: tensors\[\d\] \('emb.weight'\).tau .*byteplane-zstd plane 3: corrupt"):
            zoo.decode("a")
        with pytest.raises(FormatError, match=rf"{bad}: .*\('emb.weight'\).tau"):
            zoo.switcher(Net())


# --- the job graph ---------------------------------------------------------------------------------
def test_jobs_chain_and_fail_early() -> None:
    with Jobs(2) as jobs:
        a = jobs.submit(lambda: 2)
        b = jobs.after([a], lambda: jobs.submit(lambda: a.result() * 10))  # a job handing on to another
        assert b.result() == 20
        boom = jobs.submit(lambda: 1 / 0)
        c = jobs.after([a, boom], lambda: "never")
        with pytest.raises(ZeroDivisionError):
            c.result()
        seen = []
        jobs.ranges(10, 3, lambda s, e: seen.append((s, e))).result()
        assert sorted(seen) == [(0, 3), (3, 6), (6, 9), (9, 10)]
        assert jobs.ranges(0, 3, lambda s, e: seen.append("x"), "empty").result() == "empty"
        assert jobs.after([], lambda: 5).result() == 5


# --- the CLI ---------------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tallfmt.cli", *args], cwd=cwd, capture_output=True, text=True)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc


def test_cli_decodes_several_tasks(zoos: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _cli("decode", str(zoos["BF16"]), "a", "c", "-o", "models", cwd=tmp_path)
    with tallfmt.open(zoos["BF16"]) as zoo:
        for t in ("a", "c"):
            got = load_file(str(tmp_path / "models" / t / "model.safetensors"))
            want = zoo.decode(t)
            assert got.keys() == want.keys()
            assert all(torch.equal(bits(got[k]), bits(want[k])) for k in got)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["a", "c"]
    proc = _cli("decode", str(zoos["BF16"]), "a", "b", "-o", "models", cwd=tmp_path, ok=False)
    assert "models/a: already holds a model" in proc.stderr and not (tmp_path / "models" / "b").exists()
    _cli("decode", str(zoos["BF16"]), "a", "b", "-o", "models", "--force", cwd=tmp_path)
    proc = _cli("decode", str(zoos["BF16"]), "a", "zz", "-o", "other", cwd=tmp_path, ok=False)
    assert "no task 'zz'" in proc.stderr and not (tmp_path / "other").exists()
    proc = _cli("decode", str(zoos["BF16"]), "a", "a", "-o", "other", cwd=tmp_path, ok=False)
    assert "tasks repeat: a" in proc.stderr
    proc = _cli("decode", str(zoos["BF16"]), "a", "b", "-o", "two.safetensors", cwd=tmp_path, ok=False)
    assert "several tasks go to a folder" in proc.stderr
