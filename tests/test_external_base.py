"""θ0 kept outside the archive (``encode(store_base=False)``, FORMAT.md §2.1, version 1.2): BASEREFs in
place of θ0's segments; ``tallfmt.open(path, base=...)`` decodes exactly what the self-contained archive
decodes, and refuses a base that differs (missing tensor, dtype, shape, checksum) or no base at all."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import tallfmt
from tallfmt.cli import cli
from tallfmt.write import thresholds


def _zoo(seed: int = 0, n_tasks: int = 3) -> tuple[dict, dict]:
    """Every θ0 dtype a masked row has (odd lengths), a shared float and integer tensor, a per-task head
    θ0 also has, a head only the tasks have, and tied weights."""
    g = torch.Generator().manual_seed(seed)
    base = {"w32": torch.randn(37, 13, generator=g), "w16": torch.randn(101, generator=g).half(),
            "wbf": torch.randn(9, 7, generator=g).bfloat16(), "scalar": torch.randn((), generator=g),
            "frozen": torch.randn(5, generator=g), "pos": torch.arange(7), "steps": torch.tensor([0]),
            "empty": torch.zeros(0, 3)}
    base["tied"] = base["w32"]
    tasks = {}
    for i in range(n_tasks):
        sd = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
              for k, v in base.items() if k in ("w32", "w16", "wbf", "scalar")}
        sd.update(frozen=base["frozen"].clone(), pos=base["pos"].clone(), empty=base["empty"].clone(),
                  steps=torch.tensor([10 * (i + 1)]), head=torch.randn(2 + i, generator=g))
        sd["tied"] = sd["w32"]
        tasks[f"t{i}"] = sd
    return base, tasks


def _pair(tmp_path, shards=None, **kw):
    base, tasks = _zoo()
    names = ("ref", "ext") if shards is None else ("ref_dir", "ext_dir")
    paths = [tmp_path / (n if shards else f"{n}.tall") for n in names]
    tallfmt.encode(base, tasks, paths[0], mismatch="per_task", shards=shards, **kw)
    tallfmt.encode(base, tasks, paths[1], mismatch="per_task", shards=shards, store_base=False, **kw)
    return base, tasks, paths[0], paths[1]


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("shards", [None, 3])
def test_external_base_decodes_what_the_stored_base_decodes(tmp_path, shards):
    base, tasks, ref, ext = _pair(tmp_path, shards)
    with tallfmt.open(ref) as r, tallfmt.open(ext, base=base) as z:
        assert z.external_base and not r.external_base
        # each file by its own version (§7): a shard is 1.2 where it holds a BASEREF
        assert all(s.header.version == ((1, 2) if s.header.external_base else (1, 1)) for s in z.shards)
        assert any(s.header.external_base for s in z.shards)
        assert all(s.header.version == (1, 1) for s in r.shards)
        sizes = z.sizes()
        assert sizes["theta0"] == 0 and sizes["shared"] == 0 and sizes["total"] < r.sizes()["total"]
        assert sizes["masks"] == r.sizes()["masks"] and sizes["tau"] == r.sizes()["tau"]
        for t in tasks:
            _same(z.decode(t), r.decode(t))
        with pytest.warns(tallfmt.TallWarning):
            _same(z.merge("consensus", k=2, alpha=0.5), r.merge("consensus", k=2, alpha=0.5))
        assert torch.equal(z.agreement(), r.agreement())
        z.verify()


def test_load_into_and_switcher_with_an_external_base(tmp_path):
    base, tasks, ref, ext = _pair(tmp_path)
    with tallfmt.open(ext, base=base) as z:
        want = tallfmt.open(ref).decode("t2")
        model = {k: torch.zeros_like(v) for k, v in tasks["t2"].items()}
        z.load_into(model, "t2")
        assert all(torch.equal(model[k], want[k]) for k in model)
        served = {k: v.clone() for k, v in base.items() if k in ("w32", "w16", "wbf", "scalar", "frozen", "pos")}
        switch = z.switcher(served, strict=False)
        switch("t1")
        got = tallfmt.open(ref).decode("t1")
        assert all(torch.equal(served[k], got[k]) for k in served)


def test_base_from_a_file_and_a_folder(tmp_path):
    base, tasks, ref, ext = _pair(tmp_path)
    flat = {k: v.clone() for k, v in base.items()}  # safetensors refuses shared storage
    save_file(flat, tmp_path / "theta0.safetensors")
    (tmp_path / "folder").mkdir()
    save_file(flat, tmp_path / "folder" / "model.safetensors")
    want = tallfmt.open(ref).decode("t1")
    for source in (tmp_path / "theta0.safetensors", tmp_path / "folder", str(tmp_path / "theta0.safetensors")):
        with tallfmt.open(ext, base=source) as z:
            _same(z.decode("t1"), want)


def test_without_a_base_what_needs_theta0_is_refused_naming_the_archive(tmp_path):
    base, tasks, ref, ext = _pair(tmp_path)
    z = tallfmt.open(ext)
    model = {k: v.clone() for k, v in tasks["t0"].items()}
    calls = [lambda: z.decode("t0"), lambda: z.decode_tensor("t0", "w32"), lambda: z.merge("task_arithmetic"),
             lambda: z.load_into(model, "t0", strict=False), lambda: z.switcher(model, strict=False),
             lambda: z.decode_to("t0", tmp_path / "out.safetensors"),
             lambda: z.merge_to(tmp_path / "merged.safetensors"), lambda: z.iter_decode("t0")]
    for call in calls:
        with pytest.raises(tallfmt.InputError, match="θ0 is not stored in this archive") as info:
            call()
        assert str(ext) in str(info.value)
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "merged.safetensors").exists()
    assert all(torch.equal(model[k], tasks["t0"][k]) for k in model)  # load_into changed nothing
    r = tallfmt.open(ref)  # what does not read θ0 still works
    assert torch.equal(z.mask("t1", "w16"), r.mask("t1", "w16"))
    assert torch.equal(z.tau("wbf"), r.tau("wbf")) and torch.equal(z.agreement(), r.agreement())
    assert z.tasks == r.tasks and z.roles == r.roles
    z.verify()


@pytest.mark.parametrize("case, match", [
    ("missing", "the base has no tensor 'w16'"),
    ("dtype", r"tensor 'w16' is F32 \[101\], but the θ0 .* has F16 \[101\]"),
    ("shape", r"tensor 'w16' is F16 \[100\], but the θ0 .* has F16 \[101\]"),
    ("checksum", "tensor 'w16' differs from the θ0"),
    ("shared", "tensor 'frozen' differs from the θ0"),
    ("per_task", "tensor 'steps' differs from the θ0"),
])
def test_a_base_that_differs_is_refused_naming_the_tensor(tmp_path, case, match):
    base, tasks, ref, ext = _pair(tmp_path)
    bad = dict(base)
    if case == "missing":
        del bad["w16"]
    elif case == "dtype":
        bad["w16"] = base["w16"].float()
    elif case == "shape":
        bad["w16"] = base["w16"][:100].clone()
    elif case == "checksum":
        bad["w16"] = base["w16"].clone()
        bad["w16"][50] = -bad["w16"][50]
    elif case == "shared":
        bad["frozen"] = base["frozen"] + 1
    else:
        bad["steps"] = torch.tensor([1])
    with pytest.raises(tallfmt.InputError, match=match):
        tallfmt.open(ext, base=bad)


def test_extra_tensors_in_the_base_are_ignored_and_verify_checks_again(tmp_path):
    base, tasks, ref, ext = _pair(tmp_path)
    given = {k: v.clone() for k, v in base.items()}
    given["pooler.unused"] = torch.ones(3)
    z = tallfmt.open(ext, base=given)
    z.verify()
    given["w32"][0, 0] += 1  # the state dict changed after open
    with pytest.raises(tallfmt.InputError, match="tensor 'w32' differs"):
        z.verify()


def test_a_base_for_an_archive_that_stores_theta0_is_refused(tmp_path):
    base, tasks, ref, ext = _pair(tmp_path)
    with pytest.raises(tallfmt.InputError, match="this archive stores θ0"):
        tallfmt.open(ref, base=base)


def test_encode_refuses_store_base_false_with_options_that_change_theta0(tmp_path):
    base, tasks = _zoo()
    for kw in ({"dtype": "BF16"}, {"prefix_map": {"": "m."}}):
        with pytest.raises(tallfmt.InputError, match="store_base=False"):
            tallfmt.encode(base, tasks, tmp_path / "z.tall", store_base=False, mismatch="per_task", **kw)
    with pytest.raises(tallfmt.InputError, match="store_base must be True or False"):
        tallfmt.encode(base, tasks, tmp_path / "z.tall", store_base="no", mismatch="per_task")
    assert not (tmp_path / "z.tall").exists()


def test_both_encode_paths_and_bf16_tau_with_external_base(tmp_path, monkeypatch):
    base, tasks = _zoo(seed=5)
    kw = dict(store_base=False, tau_dtype="BF16", mismatch="per_task", merge="ties")
    tallfmt.encode(base, tasks, tmp_path / "fused.tall", **kw)
    monkeypatch.setattr(thresholds, "fused_on", lambda device: False)
    tallfmt.encode(base, tasks, tmp_path / "torch.tall", **kw)
    assert (tmp_path / "fused.tall").read_bytes() == (tmp_path / "torch.tall").read_bytes()
    monkeypatch.undo()
    tallfmt.encode(base, tasks, tmp_path / "stored.tall", **{**kw, "store_base": True})
    with tallfmt.open(tmp_path / "fused.tall", base=base) as z, tallfmt.open(tmp_path / "stored.tall") as r:
        for t in tasks:
            _same(z.decode(t), r.decode(t))


def test_cli_external_base(tmp_path):
    base, tasks = _zoo()
    save_file({k: v.clone() for k, v in base.items()}, tmp_path / "base.safetensors")
    for t, sd in tasks.items():
        save_file({k: v.clone() for k, v in sd.items()}, tmp_path / f"{t}.safetensors")
    fts = [str(tmp_path / f"{t}.safetensors") for t in tasks]
    run = CliRunner().invoke
    r = run(cli, ["encode", str(tmp_path / "base.safetensors"), *fts, "-o", str(tmp_path / "z.tall"),
                  "--no-store-base", "--mismatch", "per_task"])
    assert r.exit_code == 0, r.output
    info = run(cli, ["info", str(tmp_path / "z.tall")])
    assert info.exit_code == 0 and "θ0: external, not stored" in info.output
    no_base = run(cli, ["decode", str(tmp_path / "z.tall"), "t0", "-o", str(tmp_path / "out0.safetensors")])
    assert no_base.exit_code == 1 and "--base PATH" in no_base.output and "Traceback" not in no_base.output
    assert not (tmp_path / "out0.safetensors").exists()
    ok = run(cli, ["decode", str(tmp_path / "z.tall"), "t0", "-o", str(tmp_path / "out0.safetensors"),
                   "--base", str(tmp_path / "base.safetensors")])
    assert ok.exit_code == 0, ok.output
    merged = run(cli, ["merge", str(tmp_path / "z.tall"), "-o", str(tmp_path / "m.safetensors"), "--base",
                       str(tmp_path / "base.safetensors")])
    assert merged.exit_code == 0, merged.output
    wrong = run(cli, ["merge", str(tmp_path / "z.tall"), "-o", str(tmp_path / "w.safetensors"), "--base",
                      fts[0]])
    assert wrong.exit_code == 1 and "differs from the θ0" in wrong.output
    v = run(cli, ["verify", str(tmp_path / "z.tall"), "--base", str(tmp_path / "base.safetensors")])
    assert v.exit_code == 0 and "θ0 from" in v.output
    v = run(cli, ["verify", str(tmp_path / "z.tall")])
    assert v.exit_code == 0 and "not checked: give --base" in v.output
