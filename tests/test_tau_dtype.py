"""τ_MTL stored in bfloat16 (``encode(tau_dtype="BF16")``, FORMAT.md §4.2, version 1.2): the stored τ is
float32 τ_MTL rounded to nearest even, masks and decodes follow the formula computed here independently
in numpy, both encode paths write the same bytes, F32 archives stay 1.1, and readers refuse what §6 says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import _tallcraft as tc
import test_residual as residual_tests
import tallfmt
from tallfmt.cli import cli
from tallfmt.write import thresholds


def _bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 → float32, round to nearest even, in integer arithmetic (no torch)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
    return r.view(np.float32)


def _storage_f32(t: torch.Tensor) -> np.ndarray:
    """A float tensor's values widened exactly to float32, in numpy."""
    if t.dtype == torch.bfloat16:
        return (t.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return t.numpy().astype(np.float32)


def _round_to(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 values rounded to ``dtype`` (nearest even), as float32 again."""
    if dtype == torch.float32:
        return x
    if dtype == torch.float16:
        return x.astype(np.float16).astype(np.float32)
    return _bf16_rne(x)


def _zoo(seed: int = 0, n_tasks: int = 3) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {"w32": torch.randn(37, 13, generator=g), "w16": torch.randn(101, generator=g).half(),
            "wbf": torch.randn(9, 7, generator=g).bfloat16(), "one": torch.randn(1, generator=g),
            "frozen": torch.randn(5, generator=g)}
    tasks = {}
    for i in range(n_tasks):
        sd = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.6)
                  ).to(v.dtype) for k, v in base.items() if k != "frozen"}
        sd["frozen"] = base["frozen"].clone()
        tasks[f"t{i}"] = sd
    return base, tasks


@pytest.mark.parametrize("shards", [None, 2])
def test_bf16_tau_matches_the_formula_computed_independently(tmp_path, shards):
    base, tasks = _zoo()
    lam = {"t0": 0.3, "t1": 0.4, "t2": 0.7}
    path = tmp_path / ("z" if shards else "z.tall")
    tallfmt.encode(base, tasks, path, tau_dtype="BF16", lambdas=lam, shards=shards)
    z = tallfmt.open(path)
    assert z.header.version == (1, 2) and z.header.encoding["tau_dtype"] == "BF16"
    decoded = {t: z.decode(t) for t in tasks}
    for name, b in base.items():
        if name == "frozen":
            assert z.header.tensors[[e.name for e in z.header.tensors].index(name)].role == "shared"
            continue
        b32 = _storage_f32(b).reshape(-1)
        taus = [_storage_f32(tasks[t][name]).reshape(-1) - b32 for t in tasks]
        mtl = np.zeros_like(b32)
        for tau in taus:  # task arithmetic in task order, float32 after each addition
            mtl = (mtl + tau).astype(np.float32)
        stored = _bf16_rne(mtl)
        assert np.array_equal(z.tau(name).numpy().reshape(-1), stored), name
        for i, t in enumerate(tasks):
            r = np.float32(lam[t]) * np.abs(stored - taus[i])
            bits = (np.abs(taus[i]) >= r) & (stored != 0)  # masks from the stored τ_MTL, §4.3
            assert np.array_equal(z.mask(t, name).numpy().reshape(-1), bits), (name, t)
            hat = np.where(bits, _round_to((b32 + stored).astype(np.float32), b.dtype), b32)
            assert np.array_equal(_storage_f32(decoded[t][name]).reshape(-1), hat), (name, t)
    z.verify()
    # merges use the stored τ: task arithmetic α = 0.5 is round(θ0 + 0.5·τ_stored)
    merged = z.merge("task_arithmetic", alpha=0.5)
    for name in ("w32", "w16", "wbf"):
        b32 = _storage_f32(base[name]).reshape(-1)
        want = _round_to((b32 + np.float32(0.5) * z.tau(name).numpy().reshape(-1)).astype(np.float32),
                         base[name].dtype)
        assert np.array_equal(_storage_f32(merged[name]).reshape(-1), want), name


@pytest.mark.parametrize("merge", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("codec", ["auto", "raw", "zstd"])
def test_both_encode_paths_write_the_same_bf16_archive(tmp_path, monkeypatch, merge, codec):
    base, tasks = _zoo(seed=3, n_tasks=4)
    kw = dict(tau_dtype="BF16", merge=merge, codec=codec, chunk_size=16)
    tallfmt.encode(base, tasks, tmp_path / "fused.tall", **kw)
    monkeypatch.setattr(thresholds, "fused_on", lambda device: False)
    tallfmt.encode(base, tasks, tmp_path / "torch.tall", **kw)
    assert (tmp_path / "fused.tall").read_bytes() == (tmp_path / "torch.tall").read_bytes()


def test_bf16_tau_is_half_the_tau_bytes_and_byteplane_has_two_planes(tmp_path):
    base, tasks = _zoo()
    tallfmt.encode(base, tasks, tmp_path / "f.tall")
    tallfmt.encode(base, tasks, tmp_path / "b.tall", tau_dtype="bf16")
    f, b = tallfmt.open(tmp_path / "f.tall"), tallfmt.open(tmp_path / "b.tall")
    for ef, eb in zip(f.header.tensors, b.header.tensors):
        if ef.role == "masked":
            assert eb.tau.decoded_length * 2 == ef.tau.decoded_length
            if eb.tau.codec == "byteplane-zstd":  # two u64 frame lengths, then two frames
                raw = (tmp_path / "b.tall").read_bytes()[eb.tau.offset:eb.tau.offset + eb.tau.length]
                lens = np.frombuffer(raw[:16], "<u8")
                assert 16 + int(lens.sum()) == eb.tau.length
    assert f.sizes()["tau"] > b.sizes()["tau"]


def test_f32_default_is_unchanged_and_stays_version_1_1(tmp_path):
    base, tasks = _zoo()
    tallfmt.encode(base, tasks, tmp_path / "default.tall")
    tallfmt.encode(base, tasks, tmp_path / "f32.tall", tau_dtype="F32")
    assert (tmp_path / "default.tall").read_bytes() == (tmp_path / "f32.tall").read_bytes()
    z = tallfmt.open(tmp_path / "default.tall")
    assert z.header.version == (1, 1) and "tau_dtype" not in z.header.encoding


def test_bad_tau_dtype_is_an_input_error(tmp_path):
    base, tasks = _zoo()
    with pytest.raises(tallfmt.InputError, match="tau_dtype must be one of"):
        tallfmt.encode(base, tasks, tmp_path / "z.tall", tau_dtype="F16")
    assert not (tmp_path / "z.tall").exists()


def test_tau_that_rounds_to_inf_in_bf16_is_refused_on_both_paths(tmp_path, monkeypatch):
    """3.4e38 is finite in float32 but past bfloat16's largest value plus half an ulp."""
    base = {"w": torch.zeros(4)}
    tasks = {"a": {"w": torch.tensor([3.4e38, 0.0, 0.0, 0.0])}}
    for fused in (True, False):
        monkeypatch.setattr(thresholds, "fused_on", lambda device, f=fused: f)
        with pytest.raises(tallfmt.InputError, match="'w'"):
            tallfmt.encode(base, tasks, tmp_path / "z.tall", tau_dtype="BF16")
        assert not (tmp_path / "z.tall").exists()


def _bf16_archive(tmp_path):
    base, tasks = _zoo()
    p = tmp_path / "z.tall"
    tallfmt.encode(base, tasks, p, tau_dtype="BF16", codec="raw")
    return p


def test_reader_refuses_tau_dtype_in_a_1_1_file(tmp_path):
    p = _bf16_archive(tmp_path)

    def to_1_1(h):
        h["version"] = [1, 1]
    tc.with_header(p, _edited(p, to_1_1), minor=1)
    with pytest.raises(tallfmt.FormatError, match=r"encoding: unknown key\(s\) \['tau_dtype'\]"):
        tallfmt.open(p)


def test_reader_refuses_an_unknown_tau_dtype(tmp_path):
    p = _bf16_archive(tmp_path)
    tc.rewrite_header(p, lambda h: h["encoding"].__setitem__("tau_dtype", "F16"))
    with pytest.raises(tallfmt.FormatError, match="encoding.tau_dtype"):
        tallfmt.open(p)


def test_a_1_1_reader_would_refuse_a_bf16_archive(tmp_path):
    """What a 1.1 reader sees: tau_dtype is a key of a newer minor (ignored), τ's decoded_length is 2n, not 4n."""
    p = _bf16_archive(tmp_path)
    tc.rewrite_header(p, lambda h: h["encoding"].pop("tau_dtype"))
    with pytest.raises(tallfmt.FormatError, match=r"\.tau\.decoded_length"):
        tallfmt.open(p)


def _edited(p, fn):
    obj = tc.split(p).header_json()
    fn(obj)
    return obj


def test_cli_tau_dtype(tmp_path):
    base, tasks = _zoo()
    save_file(base, tmp_path / "base.safetensors")
    for t, sd in tasks.items():
        save_file(sd, tmp_path / f"{t}.safetensors")
    fts = [str(tmp_path / f"{t}.safetensors") for t in tasks]
    r = CliRunner().invoke(cli, ["encode", str(tmp_path / "base.safetensors"), *fts, "-o", str(tmp_path / "z.tall"),
                                 "--tau-dtype", "bf16"])
    assert r.exit_code == 0, r.output
    z = tallfmt.open(tmp_path / "z.tall")
    assert z.header.encoding["tau_dtype"] == "BF16"
    info = CliRunner().invoke(cli, ["info", str(tmp_path / "z.tall")])
    assert info.exit_code == 0 and "stored in BF16" in info.output and "format 1.2" in info.output
    js = json.loads(CliRunner().invoke(cli, ["info", "--json", str(tmp_path / "z.tall")]).output)
    assert js["encoding"]["tau_dtype"] == "BF16" and js["format_version"] == [1, 2]
    bad = CliRunner().invoke(cli, ["encode", str(tmp_path / "base.safetensors"), *fts, "-o",
                                   str(tmp_path / "y.tall"), "--tau-dtype", "f16"])
    assert bad.exit_code != 0 and "--tau-dtype" in bad.output



def test_bf16_tau_with_tau_rans_masks_decodes_as_with_zstd_masks(tmp_path):
    """tau-rans reads a BF16 τ_MTL widened to float32 (FORMAT.md §5.1): same masks as zstd's, read back."""
    base, tasks = _zoo()
    plain = tallfmt.encode(base, tasks, tmp_path / "zstd.tall", tau_dtype="BF16").path
    rans = tallfmt.encode(base, tasks, tmp_path / "rans.tall", tau_dtype="BF16", mask_codec="tau-rans").path
    with tallfmt.open(plain) as a, tallfmt.open(rans) as b:
        b.verify()
        assert b.header.version == (1, 2)
        assert any(m.codec == "tau-rans" for e in b.header.tensors for m in e.masks)
        for t in a.tasks:
            da, db = a.decode(t), b.decode(t)
            assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da), t
        masked = [k for k, r in a.roles.items() if r == "masked"]
        assert all(torch.equal(a.mask(t, k), b.mask(t, k)) for t in a.tasks for k in masked)
        assert torch.equal(torch.as_tensor(a.agreement()), torch.as_tensor(b.agreement()))


def test_bf16_tau_with_residuals_follows_the_formula(tmp_path, monkeypatch):
    """A residual on a BF16 τ_MTL: FORMAT.md §11 with τ_MTL widened; both encode paths write the same bytes."""
    base, tasks = _zoo()
    budgets = {"t0": 4.0, "t1": 1.0}
    p = tallfmt.encode(base, tasks, tmp_path / "r.tall", tau_dtype="BF16", residual=budgets).path
    monkeypatch.setattr(thresholds, "fused_on", lambda device: False)
    q = tallfmt.encode(base, tasks, tmp_path / "q.tall", tau_dtype="BF16", residual=budgets).path
    assert p.read_bytes() == q.read_bytes()
    with tallfmt.open(p) as zoo:
        zoo.verify()
        assert zoo.residual_info("t0")["entries"] > 0
        residual_tests.check_decodes(zoo, base)   # FORMAT.md §11 computed in numpy from the stored bytes
        residual_tests.check_selection(zoo, base, tasks, budgets)
