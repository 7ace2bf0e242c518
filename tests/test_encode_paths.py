"""The two encode paths — the fused numba kernels (the CPU) and the torch mask math (other devices) —
write the same archive bit for bit, for every option: the torch path is forced here on the CPU."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallfmt
from tallfmt.testing import checkpoint_collections, encode_options
from tallfmt.write import thresholds

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow])


@SETTINGS
@given(coll=checkpoint_collections(max_tasks=4, per_task=True), data=st.data())
def test_fused_and_torch_paths_write_the_same_bytes(coll, data, tmp_path_factory, monkeypatch):
    kw = {**coll.encode_kwargs, **data.draw(encode_options(list(coll.tasks), tau_dtypes=("F32", "BF16")))}
    tmp = tmp_path_factory.mktemp("paths")
    tallfmt.encode(coll.base, coll.tasks, tmp / "fused.tall", **kw)
    with monkeypatch.context() as m:
        m.setattr(thresholds, "fused_on", lambda device: False)
        tallfmt.encode(coll.base, coll.tasks, tmp / "torch.tall", **kw)
    assert (tmp / "fused.tall").read_bytes() == (tmp / "torch.tall").read_bytes()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("case, message", [
    ("nan", "holds NaN or Inf"),
    ("tau overflow", "its task vector θ_t − θ0 overflows float32"),
    ("sum overflow", "the merged task vector τ_MTL overflows float32"),
    ("f16 decode overflow", "a decoded value θ0 + τ_MTL overflows the tensor's dtype"),
])
def test_overflow_and_nan_are_refused_by_name_on_both_paths(tmp_path, monkeypatch, fused, case, message):
    """Issue 15 defect 5: finite inputs whose τ_t, τ_MTL or decoded value overflow are refused, naming
    the tensor, instead of decoding to a wrong number."""
    import torch

    if case == "nan":
        base, tasks = {"w": torch.zeros(4)}, {"a": {"w": torch.tensor([0.0, float("nan"), 0.0, 0.0])}}
    elif case == "tau overflow":  # [-3e38, …] − θ0 of 3e38: the float32 difference is −inf
        base, tasks = {"w": torch.full((4,), 3e38)}, {"a": {"w": torch.tensor([-3e38, 0.0, 0.0, 0.0])}}
    elif case == "sum overflow":  # two tasks of +3e38 each: τ_MTL = 6e38 overflows
        base = {"w": torch.zeros(4)}
        tasks = {t: {"w": torch.tensor([3e38, 0.0, 0.0, 0.0])} for t in ("a", "b")}
    else:  # float16: θ0 = 60000, τ = 8000 rounds to inf in float16
        base = {"w": torch.full((4,), 60000.0).half()}
        tasks = {"a": {"w": torch.tensor([65504.0, 60000.0, 60000.0, 60000.0]).half()},
                 "b": {"w": torch.tensor([65504.0, 60000.0, 60000.0, 60000.0]).half()}}
    monkeypatch.setattr(thresholds, "fused_on", lambda device: fused)
    with pytest.raises(tallfmt.InputError, match=re.escape(message)) as info:
        tallfmt.encode(base, tasks, tmp_path / "z.tall")
    assert "'w'" in str(info.value)
    assert not (tmp_path / "z.tall").exists()


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_tensors_encode_and_their_nan_is_refused(tmp_path, dtype):
    """Issue 15 defect 2: any float8 tensor encodes (per task when it differs, shared when not); a NaN
    byte pattern in one is refused by name."""
    import torch

    dt = getattr(torch, dtype)
    w = torch.tensor([0.5, -1.0, 2.0, 0.0]).to(dt)
    base = {"f8": w, "same": w.clone(), "x": torch.zeros(3)}
    tasks = {"a": {"f8": (w.float() * 2).to(dt), "same": w.clone(), "x": torch.ones(3)}}
    tallfmt.encode(base, tasks, tmp_path / "z.tall")
    with tallfmt.open(tmp_path / "z.tall") as zoo:
        assert zoo.roles == {"f8": "per_task", "same": "shared", "x": "masked"}
        got = zoo.decode("a")
        assert torch.equal(got["f8"].view(torch.uint8), tasks["a"]["f8"].view(torch.uint8))
    nan = w.clone()
    nan.view(torch.uint8)[1] = 0x7F if dtype == "float8_e4m3fn" else 0x7E
    with pytest.raises(tallfmt.InputError, match=r"tensor 'f8' holds NaN or Inf values \(first at element 1\)"):
        tallfmt.encode({**base, "f8": nan}, tasks, tmp_path / "n.tall")


def _global_zoo():
    import torch

    g = torch.Generator().manual_seed(5)
    base = {f"w{i}": torch.randn(512, 384, generator=g) * 0.02 for i in range(6)}
    base["frozen"] = torch.randn(50, generator=g)
    tasks = {}
    for t in range(3):
        sd = {k: v + (torch.rand(v.shape, generator=g) < 0.3) * torch.randn(v.shape, generator=g) * 1e-3
              for k, v in base.items()}
        sd["frozen"] = base["frozen"].clone()
        tasks[f"t{t}"] = sd
    return base, tasks


@pytest.mark.parametrize("kw", [dict(merge="ties"), dict(mask_method="magnitude", mask_density=0.15),
                                dict(merge="ties", mask_method="magnitude")])
def test_global_selection_reads_the_inputs_twice(tmp_path, monkeypatch, kw):
    """Issue 12: a global TIES trim or magnitude mask reads every masked tensor once in pass 1 and once
    to encode, besides a sample of under 1/32 of it."""
    base, tasks = _global_zoo()
    reads: dict[str, list[float]] = {}
    real = thresholds._accumulate

    def counting(inputs, plan, device, chunk, hi, starts, lo, differs, ranges=None):
        covered = plan.numel if ranges is None else sum(e - s for s, e in ranges)
        reads.setdefault(plan.name, []).append(covered / plan.numel)
        return real(inputs, plan, device, chunk, hi, starts, lo, differs, ranges)

    monkeypatch.setattr(thresholds, "_accumulate", counting)
    monkeypatch.setattr(thresholds, "lo_pass", lambda *a, **k: pytest.fail("a third pass was needed"))
    tallfmt.encode(base, tasks, tmp_path / "z.tall", **kw)
    for name in (f"w{i}" for i in range(6)):
        sample, *full = reads[name]
        assert sample < 1 / 32 and full == [1.0], (name, reads[name])


@pytest.mark.parametrize("kw", [dict(merge="ties", ties_density=0.3), dict(mask_method="magnitude", mask_density=0.1)])
def test_a_misjudged_sample_costs_a_pass_not_exactness(tmp_path, monkeypatch, kw):
    """When the sample puts the window away from a threshold's bin, one more pass counts the true bin:
    the archive is byte-identical to the one the right window gives."""
    base, tasks = _global_zoo()
    tallfmt.encode(base, tasks, tmp_path / "right.tall", **kw)
    real = thresholds.sample_windows
    calls = []
    lo_pass = thresholds.lo_pass

    def wrong(*a, **k):
        w = real(*a, **k)
        return thresholds.Windows(np.zeros_like(w.starts), 1)  # bin 0 only: |τ| < 2^-126, never the threshold

    def counted(*a, **k):
        calls.append(1)
        return lo_pass(*a, **k)

    monkeypatch.setattr(thresholds, "sample_windows", wrong)
    monkeypatch.setattr(thresholds, "lo_pass", counted)
    tallfmt.encode(base, tasks, tmp_path / "wrong.tall", **kw)
    assert calls and (tmp_path / "wrong.tall").read_bytes() == (tmp_path / "right.tall").read_bytes()
