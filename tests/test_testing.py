"""tallfmt.testing itself: the strategies generate what they claim, and the assertions pass on correct
archives and fail — with a message that says where — on broken decoders, merges, masks and archives."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import hypothesis
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

import tallfmt
from tallfmt import kernels
from tallfmt.read.archive import Archive
from tallfmt.read.decoding import ArchiveTensors
from tallfmt.write.options import EncodeOptions
from tallfmt.testing import (FLOAT_DTYPES, archives, assert_archives_equal, assert_roundtrip,
                             assert_state_dicts_equal, assert_tensors_equal, checkpoint_collections,
                             encode_options, reference, state_dicts)

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# find() returns the first example that shows the property: no shrinking, which would cost minutes
FIND = settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool, "F64": torch.float64}


def _has_negative_zero(t: torch.Tensor) -> bool:
    return t.is_floating_point() and bool(((t == 0) & torch.signbit(t)).any())


# --------------------------------------------------------------------------------------------------
# Strategies


@pytest.mark.parametrize("what, predicate", [
    ("a 0-dim tensor", lambda sd: any(t.dim() == 0 for t in sd.values())),
    ("a 0-size tensor", lambda sd: any(t.numel() == 0 and t.dim() > 0 for t in sd.values())),
    ("a 3-dim tensor", lambda sd: any(t.dim() == 3 and t.numel() > 0 for t in sd.values())),
    ("−0.0", lambda sd: any(_has_negative_zero(t) for t in sd.values())),
    ("an exact duplicate", lambda sd: any(t.is_floating_point() and t.numel() > 1 and t.unique().numel() < t.numel()
                                          and bool((t != 0).all()) for t in sd.values())),
    *[(f"a {dt} tensor", lambda sd, dt=dt: any(t.dtype == _TORCH[dt] for t in sd.values()))
      for dt in ("F32", "F16", "BF16", "I64", "I32", "U8", "BOOL")],
])
def test_state_dicts_generate(what, predicate):
    find(state_dicts(), predicate, settings=FIND)


@SETTINGS
@given(state_dicts(min_tensors=2, max_tensors=4, dtypes=["BF16", "I32"], max_dims=2, max_side=3))
def test_state_dicts_respect_their_bounds(sd):
    assert 2 <= len(sd) <= 4
    for t in sd.values():
        assert t.dtype in (torch.bfloat16, torch.int32)
        assert t.dim() <= 2 and all(d <= 3 for d in t.shape)
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()) and (t.numel() == 0 or float(t.abs().max()) < 1.0)


@SETTINGS
@given(checkpoint_collections(min_tasks=2, max_tasks=4, per_task=True))
def test_collections_respect_their_bounds(coll):
    base, tasks = coll
    assert 2 <= len(tasks) <= 4 and len(set(tasks)) == len(tasks)
    for sd in (base, *tasks.values()):
        for n, t in sd.items():
            assert n and (not t.is_floating_point() or bool(torch.isfinite(t).all()))
    reference(base, tasks, **coll.encode_kwargs)  # raises unless coll.mismatch is what encode needs


@SETTINGS
@given(checkpoint_collections(per_task=False))
def test_collections_without_per_task_need_no_mismatch_option(coll):
    assert coll.mismatch == "error" and coll.encode_kwargs == {"mismatch": "error"}
    assert all(set(sd) == set(coll.base) for sd in coll.tasks.values())


@SETTINGS
@given(checkpoint_collections(change_fraction=0.0, non_float=False))
def test_change_fraction_zero_changes_nothing(coll):
    assert "masked" not in reference(*coll).roles.values()


@pytest.mark.parametrize("what, predicate", [
    ("six tasks", lambda c: len(c.tasks) == 6),
    ("one task", lambda c: len(c.tasks) == 1),
    ("a tied tensor", lambda c: "alias" in reference(*c, **c.encode_kwargs).roles.values()),
    ("a shared tensor", lambda c: "shared" in reference(*c, **c.encode_kwargs).roles.values()),
    *[(f"a masked {dt} tensor", lambda c, dt=dt: any(
        c.base[n].dtype == _TORCH[dt] for n, r in reference(*c, **c.encode_kwargs).roles.items() if r == "masked"))
      for dt in FLOAT_DTYPES],
    ("a differing non-float tensor", lambda c: any(
        not c.base[n].is_floating_point() or c.base[n].dtype == torch.float64
        for n, r in reference(*c, **c.encode_kwargs).roles.items() if r == "per_task" and n in c.base
        and all(n in sd and sd[n].shape == c.base[n].shape and sd[n].dtype == c.base[n].dtype
                for sd in c.tasks.values()))),
    ("a tensor absent from the base", lambda c: any(n not in c.base for sd in c.tasks.values() for n in sd)),
    ("a tensor absent from a task", lambda c: any(set(c.base) - set(sd) for sd in c.tasks.values())),
    ("a tensor of another shape in a task", lambda c: any(
        n in c.base and c.base[n].dtype == t.dtype and c.base[n].shape != t.shape
        for sd in c.tasks.values() for n, t in sd.items())),
    ("a non-contiguous tensor", lambda c: any(not t.is_contiguous() for t in c.base.values())),
    ("a task that copies another", lambda c: any(
        a != b and all(torch.equal(c.tasks[a][n], c.tasks[b][n]) for n in c.base
                       if n in c.tasks[a] and n in c.tasks[b]) and
        any(not torch.equal(c.tasks[a][n], c.base[n]) for n in c.base if n in c.tasks[a])
        for a in c.tasks for b in c.tasks)),
    ("a tied tensor some tasks leave out (save_pretrained)", lambda c: any(
        n not in sd and any(c.base[n] is c.base[m] for m in c.base if m != n)
        for sd in c.tasks.values() for n in c.base)),
    ("−0.0 in a task where the base has +0.0", lambda c: any(
        bool(((c.base[n] == 0) & ~torch.signbit(c.base[n]) & torch.signbit(sd[n]) & (sd[n] == 0)).any())
        for sd in c.tasks.values() for n in c.base
        if n in sd and c.base[n].is_floating_point() and sd[n].shape == c.base[n].shape)),
])
def test_collections_generate(what, predicate):
    find(checkpoint_collections(per_task=True), predicate, settings=FIND)


@SETTINGS
@given(st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=4, unique=True).flatmap(
    lambda names: st.tuples(st.just(names), encode_options(names))))
def test_encode_options_are_valid(drawn):
    names, kw = drawn
    assert kw["merge"] in ("task_arithmetic", "ties") and kw["mask_method"] in ("tall", "magnitude")
    if isinstance(kw.get("lambdas"), dict):
        assert set(kw["lambdas"]) == set(names)
    EncodeOptions.check(names, **kw)  # raises InputError when invalid


_PATHS: list[Path] = []


@settings(SETTINGS, max_examples=10)
@given(archives())
def test_archives_are_valid_and_match_their_inputs(drawn):
    path, base, tasks, kw = drawn
    _PATHS.append(path)
    assert path.exists()
    with tallfmt.open(path) as zoo:
        zoo.verify()
        assert zoo.tasks == list(tasks)
    assert_roundtrip(base, tasks, path, **kw)


def test_archives_are_removed_after_each_example():
    _PATHS.clear()
    test_archives_are_valid_and_match_their_inputs()
    assert _PATHS and not any(p.exists() for p in _PATHS)


def test_import_error_names_the_testing_extra():
    code = "import sys; sys.modules['hypothesis'] = None\ntry:\n import tallfmt.testing\nexcept ImportError as e:\n print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "tallfmt[testing]" in out and "hypothesis" in out


# --------------------------------------------------------------------------------------------------
# The reference on hand-checked values


def test_reference_by_hand():
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "i": torch.tensor([1, 2])}
    tasks = {"a": {"w": torch.tensor([1.5, 2.0, 2.0, 4.0]), "i": torch.tensor([1, 3])},
             "b": {"w": torch.tensor([1.0, 2.5, 4.0, 4.0]), "i": torch.tensor([1, 2])}}
    ref = reference(base, tasks, lambdas=1.0)
    assert ref.roles == {"w": "masked", "i": "per_task"}
    # τ_a = [.5, 0, −1, 0], τ_b = [0, .5, 1, 0], τ_MTL = [.5, .5, 0, 0]
    assert ref.tau_mtl["w"].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert ref.masks["a"]["w"].tolist() == [True, False, False, False]  # 0 where τ_MTL = 0 (FORMAT §4.3)
    assert ref.decode("a")["w"].tolist() == [1.5, 2.0, 3.0, 4.0]
    assert ref.decode("a")["i"].tolist() == [1, 3]
    assert ref.merge("task_arithmetic", alpha=0.5)["w"].tolist() == [1.25, 2.25, 3.0, 4.0]
    assert ref.merge("consensus", k=2, alpha=1.0)["w"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert ref.agreement().tolist() == [2, 2, 0]
    ties = reference(base, tasks, merge="ties", ties_density=0.25)  # k = 1: each task keeps its largest
    assert ties.tau_mtl["w"].tolist() == [0.0, 0.0, 0.0, 0.0]       # −1 and +1 cancel: nothing elected
    assert reference(base, tasks, merge="ties", ties_density=0.5).tau_mtl["w"].tolist() == [0.5, 0.5, 0.0, 0.0]


def test_reference_refuses_what_encode_must_refuse():
    with pytest.raises(AssertionError, match="mismatch='per_task'"):
        reference({"w": torch.zeros(2)}, {"a": {"w": torch.zeros(3)}})
    with pytest.raises(AssertionError, match="NaN or Inf"):
        reference({"w": torch.zeros(2)}, {"a": {"w": torch.tensor([0.0, math.nan])}})
    with pytest.raises(TypeError, match="unknown encode option"):
        reference({"w": torch.zeros(2)}, {"a": {"w": torch.ones(2)}}, lambda_=0.3)


def test_assert_tensors_equal_messages():
    assert_tensors_equal(torch.tensor([1.0, -0.0]), torch.tensor([1.0, -0.0]), "ok")
    with pytest.raises(AssertionError, match=r"w: 1 of 4 elements differ; first at index \(1, 0\): got 0.0, "
                                             r"expected -0.0"):
        assert_tensors_equal(torch.zeros(2, 2), torch.tensor([[0.0, 0.0], [-0.0, 0.0]]), "w")
    with pytest.raises(AssertionError, match="dtype torch.float16, expected torch.bfloat16"):
        assert_tensors_equal(torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.bfloat16), "w")
    with pytest.raises(AssertionError, match=r"shape \(2,\), expected \(\)"):
        assert_tensors_equal(torch.zeros(2), torch.tensor(0.0), "w")
    with pytest.raises(AssertionError, match="tied"):
        w = torch.ones(2)
        assert_state_dicts_equal({"a": w, "b": w.clone()}, {"a": w, "b": w}, "sd")
    with pytest.raises(AssertionError, match=r"unexpected \['x'\], missing \['b'\]"):
        assert_state_dicts_equal({"a": w, "x": w}, {"a": w, "b": w}, "sd")


# --------------------------------------------------------------------------------------------------
# assert_roundtrip fails on broken archives and readers


def _masked_collections() -> st.SearchStrategy:
    # every task changes every entry of the first tensor, so there is a masked tensor to break
    return checkpoint_collections(max_tasks=4, change_fraction=1.0, per_task=True).filter(
        lambda c: "masked" in reference(*c, **c.encode_kwargs).roles.values())


def _encoded(coll, tmp: Path, **kw) -> Path:
    path = tmp / "zoo.tall"
    tallfmt.encode(coll.base, coll.tasks, path, **coll.encode_kwargs, **kw)
    return path


def _flip_first(arr: np.ndarray) -> np.ndarray:
    if arr.size:
        arr.reshape(-1).view(np.uint8)[0] ^= 1
    return arr


@settings(SETTINGS, max_examples=10)
@given(coll=_masked_collections())
def test_roundtrip_fails_with_a_broken_decoder(coll, tmp_path_factory):
    path = _encoded(coll, tmp_path_factory.mktemp("zoo"), merge="ties")
    assert_roundtrip(coll.base, coll.tasks, path, **coll.encode_kwargs, merge="ties")
    decode_into = kernels.decode_into

    def broken(base, tau, packed, out, **kwargs):  # the first element of every range the kernel decodes
        decode_into(base, tau, packed, out, **kwargs)
        _flip_first(out[kwargs.get("start", 0):kwargs.get("stop")])

    with mock.patch.object(kernels, "decode_into", broken):
        with pytest.raises(AssertionError, match=r"decode\(.*1 of \d+ elements differ; first at index"):
            assert_roundtrip(coll.base, coll.tasks, path, **coll.encode_kwargs, merge="ties")


@settings(SETTINGS, max_examples=10)
@given(coll=checkpoint_collections(max_tasks=3, per_task=True, change_fraction=0.0))
def test_roundtrip_fails_when_a_shared_or_per_task_tensor_is_off(coll, tmp_path_factory):
    """decode_entry perturbs one value of every non-empty shared / per-task / θ0 tensor it returns."""
    path = _encoded(coll, tmp_path_factory.mktemp("zoo"))
    decode_entry = ArchiveTensors.decode_entry

    def broken(self, e, i):
        t = decode_entry(self, e, i)
        if t is not None and t.numel() and e.role != "masked":
            t = t.clone()
            _flip_first(t.reshape(-1).view(torch.uint8).numpy())
        return t

    with mock.patch.object(ArchiveTensors, "decode_entry", broken):  # the first base tensor has elements
        with pytest.raises(AssertionError, match="elements differ"):
            assert_roundtrip(coll.base, coll.tasks, path, **coll.encode_kwargs)


@settings(SETTINGS, max_examples=8)
@given(coll=_masked_collections(), wrong=st.sampled_from([0.3, 0.5, 2.0]))
def test_roundtrip_fails_with_a_wrong_lambda(coll, wrong, tmp_path_factory):
    path = _encoded(coll, tmp_path_factory.mktemp("zoo"), lambdas=1.0)
    with pytest.raises(AssertionError, match=rf"λ 1.0, expected {wrong}"):
        assert_roundtrip(coll.base, coll.tasks, path, **coll.encode_kwargs, lambdas=wrong)


def test_roundtrip_fails_on_other_encode_options(tmp_path):
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    tasks = {"a": {"w": torch.tensor([1.5, 2.0, 2.0, 4.0])}, "b": {"w": torch.tensor([1.0, 2.5, 4.0, 4.5])}}
    tallfmt.encode(base, tasks, tmp_path / "zoo.tall", merge="ties", metadata={"k": "v"})
    for kw, match in ((dict(merge="task_arithmetic"), "encoding"), (dict(merge="ties", ties_density=0.5), "encoding"),
                      (dict(merge="ties", metadata={"k": "w"}), "metadata"),
                      (dict(merge="ties", mask_method="magnitude"), "encoding")):
        with pytest.raises(AssertionError, match=match):
            assert_roundtrip(base, tasks, tmp_path / "zoo.tall", **kw)
    tallfmt.encode(base, tasks, tmp_path / "ta.tall")
    tasks["b"]["w"] = torch.tensor([1.0, 2.5, 4.0, 4.25])  # other inputs than those encoded
    with pytest.raises(AssertionError, match="differ"):
        assert_roundtrip(base, tasks, tmp_path / "ta.tall")


@pytest.mark.parametrize("target, attribute, match", [
    ("merge", "tallfmt.compute.maskmath.merge_chunk", r"merge\('task_arithmetic'"),
    ("mask", "tallfmt.kernels.unpack_bits", r"mask\("),
    ("agreement", "tallfmt.compute.maskmath.agreement_histogram", r"agreement\(\)"),
])
def test_roundtrip_fails_with_broken_merges_masks_and_agreement(tmp_path, target, attribute, match):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, generator=g) * 0.02, "h": (torch.randn(9, generator=g) * 0.02).to(torch.bfloat16)}
    tasks = {t: {n: (x.float() + torch.randn(x.shape, generator=g) * 0.01).to(x.dtype) for n, x in base.items()}
             for t in ("a", "b", "c")}
    tallfmt.encode(base, tasks, tmp_path / "zoo.tall")
    assert_roundtrip(base, tasks, tmp_path / "zoo.tall")
    module, name = attribute.rsplit(".", 1)
    original = getattr(sys.modules[module], name)

    def broken(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, np.ndarray):
            return _flip_first(out.copy())
        out = out.clone()
        out.reshape(-1)[0] += 1
        return out

    with mock.patch.object(sys.modules[module], name, broken):
        with pytest.raises(AssertionError, match=match):
            assert_roundtrip(base, tasks, tmp_path / "zoo.tall")


def test_roundtrip_fails_when_tied_tensors_come_back_untied(tmp_path):
    w = torch.randn(6)
    base = {"embed": w, "lm_head": w}
    ft = w + 0.01
    tasks = {"a": {"embed": ft, "lm_head": ft}}
    tallfmt.encode(base, tasks, tmp_path / "zoo.tall")
    assert_roundtrip(base, tasks, tmp_path / "zoo.tall")
    decode = Archive.decode
    with mock.patch.object(Archive, "decode", lambda self, t, **kw: {k: v.clone() for k, v in decode(self, t, **kw).items()}):
        with pytest.raises(AssertionError, match="tied"):
            assert_roundtrip(base, tasks, tmp_path / "zoo.tall")


def test_roundtrip_fails_on_wrong_statistics(tmp_path):
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    tasks = {"a": {"w": torch.tensor([1.5, 2.0, 2.0, 4.0])}, "b": {"w": torch.tensor([1.0, 2.5, 4.0, 4.5])}}
    tallfmt.encode(base, tasks, tmp_path / "zoo.tall")
    task_info = Archive.task_info

    def off(self, task):
        info = task_info(self, task)
        return {**info, "rel_error": info["rel_error"] * (1 + 1e-6)}

    with mock.patch.object(Archive, "task_info", off):
        with pytest.raises(AssertionError, match="statistic rel_error"):
            assert_roundtrip(base, tasks, tmp_path / "zoo.tall")


# --------------------------------------------------------------------------------------------------
# assert_archives_equal


@settings(SETTINGS, max_examples=10)
@given(coll=_masked_collections(), data=st.data())
def test_archives_equal_passes_on_the_same_content_and_fails_on_another(coll, data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    kw = data.draw(encode_options(list(coll.tasks), mask_methods=["tall"], codecs=["auto"]))
    tallfmt.encode(coll.base, coll.tasks, tmp / "a.tall", **coll.encode_kwargs, **kw)
    tallfmt.encode(coll.base, coll.tasks, tmp / "raw.tall", **coll.encode_kwargs, **{**kw, "codec": "raw"})
    assert_archives_equal(tmp / "a.tall", tmp / "raw.tall")
    lam = kw["lambdas"]
    other = {t: 2 * v for t, v in lam.items()} if isinstance(lam, dict) else 2 * lam
    tallfmt.encode(coll.base, coll.tasks, tmp / "lam.tall", **coll.encode_kwargs, **{**kw, "lambdas": other})
    with pytest.raises(AssertionError, match="info differs"):
        assert_archives_equal(tmp / "a.tall", tmp / "lam.tall")
    # θ0 one bit off in one masked entry, everything else the same
    name = next(n for n, r in reference(*coll, **coll.encode_kwargs).roles.items() if r == "masked")
    # contiguous first: reshape(-1) of a transposed clone would be a copy, and the flip would change nothing
    changed = coll.base[name].clone(memory_format=torch.contiguous_format)
    changed.view(-1).view(torch.uint8)[0] ^= 1
    assert not torch.equal(changed.view(-1).view(torch.uint8), coll.base[name].contiguous().view(-1).view(torch.uint8))
    base = {n: changed if t is coll.base[name] else t for n, t in coll.base.items()}  # tied names too
    tallfmt.encode(base, coll.tasks, tmp / "theta0.tall", **coll.encode_kwargs, **kw)
    with pytest.raises(AssertionError):
        assert_archives_equal(tmp / "a.tall", tmp / "theta0.tall")


def test_archives_equal_fails_on_other_tasks_roles_and_encodings(tmp_path):
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "s": torch.zeros(2)}
    tasks = {"a": {"w": torch.tensor([1.5, 2.0, 2.0, 4.0]), "s": torch.zeros(2)},
             "b": {"w": torch.tensor([1.0, 2.5, 4.0, 4.5]), "s": torch.zeros(2)}}
    tallfmt.encode(base, tasks, tmp_path / "a.tall")
    cases = {
        "tasks": (base, {"b": tasks["b"], "a": tasks["a"]}, {}),
        "encoding": (base, tasks, {"merge": "ties"}),
        "metadata": (base, tasks, {"metadata": {"x": "y"}}),
        "roles": (base, {t: {**sd, "s": torch.ones(2)} for t, sd in tasks.items()}, {}),
    }
    for what, (b, t, kw) in cases.items():
        tallfmt.encode(b, t, tmp_path / f"{what}.tall", **kw)
        with pytest.raises(AssertionError, match=what):
            assert_archives_equal(tmp_path / "a.tall", tmp_path / f"{what}.tall")


def test_archives_equal_fails_on_another_mask(tmp_path):
    base = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    tasks = {"a": {"w": torch.tensor([1.5, 2.0, 2.0, 4.0])}, "b": {"w": torch.tensor([1.0, 2.5, 4.0, 4.5])}}
    tallfmt.encode(base, tasks, tmp_path / "a.tall")
    tallfmt.encode(base, tasks, tmp_path / "b.tall")
    unpack = kernels.unpack_bits
    calls = []

    def second_archive_differs(packed, n):
        calls.append(1)
        bits = unpack(packed, n)
        return ~bits if len(calls) % 2 == 0 else bits

    with mock.patch.object(kernels, "unpack_bits", second_archive_differs):
        with pytest.raises(AssertionError, match="mask of task"):
            assert_archives_equal(tmp_path / "a.tall", tmp_path / "b.tall")


# --------------------------------------------------------------------------------------------------
# The README's example


def test_readme_example_runs(tmp_path):
    """The "Testing your pipeline" example of README.md, run as a user would (pytest calls it; so do we)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Testing your pipeline", 1)[1].split("\n## ", 1)[0]
    source = re.search(r"^```py\n(.*?)^```", section, re.M | re.S).group(1)
    assert len(source.strip().splitlines()) <= 12
    proc = subprocess.run([sys.executable, "-c", source + "\ntest_pipeline()\nprint('passed')"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "passed" in proc.stdout, proc.stderr


@settings(SETTINGS, max_examples=10)
@given(coll=checkpoint_collections(max_tasks=3, change_fraction=0.5, shared=False, non_float=False, tied=False),
       globs=st.sampled_from([None, ()]))
def test_reference_follows_the_per_task_globs(coll, globs, tmp_path_factory):
    """Batch-norm statistics that differ stay verbatim per task under the default globs (FORMAT §2), and
    are masked like any float with per_task=(); the reference and the archive agree either way."""
    kw = {} if globs is None else {"per_task": globs}
    ref = reference(*coll, **kw)
    for n, role in ref.roles.items():
        if role in ("masked", "per_task") and n.endswith((".running_mean", ".running_var")):
            assert role == ("per_task" if globs is None else "masked")
    path = _encoded(coll, tmp_path_factory.mktemp("zoo"), **kw)
    assert_roundtrip(coll.base, coll.tasks, path, **kw)


@pytest.mark.parametrize("suffix", [".running_var", ".num_batches_tracked"])  # a float and the I64 counter
def test_collections_hold_batch_norm_statistics(suffix):
    # find() raises NoSuchExample when the generator never makes such a name
    small = checkpoint_collections(max_tasks=2, max_tensors=4, max_dims=1, max_side=3)
    hypothesis.find(small, lambda c: any(n.endswith(suffix) for n in c.base), settings=FIND)
