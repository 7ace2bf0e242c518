"""Encode options for real zoos (issue 13): the storage-dtype cast, θ0's prefix map, tied copies some
checkpoints leave out, what merges do with per-task tensors, and the warnings of report and info —
checked against tallfmt.testing's independent reference where the math is concerned."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tallfmt
from tallfmt.errors import InputError, TallWarning
from tallfmt.testing import assert_roundtrip, checkpoint_collections, encode_options, reference
from tallfmt.write.options import EncodeOptions, cast_dtype

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.data())
def test_dtype_cast_matches_the_reference(data: st.DataObject) -> None:
    coll = data.draw(checkpoint_collections(max_tasks=3, per_task=True))
    kw = {**coll.encode_kwargs, **data.draw(encode_options(list(coll.tasks), dtypes=("F32", "F16", "BF16")))}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "zoo.tall"
        tallfmt.encode(coll.base, coll.tasks, path, **kw)
        assert_roundtrip(coll.base, coll.tasks, path, **kw)
        with tallfmt.open(path) as zoo:
            cast = {e.dtype for e in zoo.header.tensors if e.role in ("masked", "shared") and e.dtype[0] in "FB"}
            assert cast <= {kw["dtype"], "BOOL"}


@SETTINGS
@given(checkpoint_collections(max_tasks=3))
def test_tied_copies_left_out_are_aliases_in_every_output(coll) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "zoo.tall"
        tallfmt.encode(coll.base, coll.tasks, path, **coll.encode_kwargs)
        ref = reference(coll.base, coll.tasks, **coll.encode_kwargs)
        assert_roundtrip(coll.base, coll.tasks, path, **coll.encode_kwargs)
        with tallfmt.open(path) as zoo:
            for n, target in ref.targets.items():
                assert zoo.roles[n] == "alias"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", TallWarning)
                    for sd in (zoo.merge("task_arithmetic"), zoo.merge("consensus", k=1), *map(zoo.decode, zoo.tasks)):
                        assert sd[n] is sd[target]


def test_a_tied_copy_only_the_base_has() -> None:
    w = torch.randn(4, 3)
    base = {"emb": w, "head": w}            # torch.save keeps both names
    tasks = {"a": {"emb": w + 0.1}, "b": {"emb": w - 0.1}}  # save_pretrained drops the tied one
    ref = reference(base, tasks)
    assert ref.roles == {"emb": "masked", "head": "alias"} and ref.targets == {"head": "emb"}
    with tempfile.TemporaryDirectory() as tmp:
        tallfmt.encode(base, tasks, Path(tmp) / "z.tall")
        assert_roundtrip(base, tasks, Path(tmp) / "z.tall")
        with tallfmt.open(Path(tmp) / "z.tall") as zoo:
            assert zoo.roles == {"emb": "masked", "head": "alias"}
            decoded = zoo.decode("a")
            assert decoded["head"] is decoded["emb"]  # the decoded task has the tied name, as θ0 had
    # tied to different tensors in different checkpoints: not one alias, a mismatch
    tasks["a"] = {"emb": tasks["a"]["emb"], "other": torch.zeros(4, 3)}
    tasks["a"]["head"] = tasks["a"]["other"]
    with pytest.raises(InputError, match="'head'"):
        tallfmt.encode(base, tasks, "never.tall")


def test_prefix_map_renames_the_base_and_matches_the_reference(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"embeddings.w": torch.randn(6, 4, generator=g), "pooler.b": torch.randn(4, generator=g),
            "cls.bias": torch.randn(3, generator=g)}
    tasks = {t: {"bert.embeddings.w": base["embeddings.w"] + 0.01 * torch.randn(6, 4, generator=g),
                 "bert.pooler.b": base["pooler.b"].clone(), "classifier.w": torch.randn(n, 4, generator=g)}
             for t, n in (("sst2", 2), ("mnli", 3))}
    kw = dict(prefix_map={"": "bert.", "cls.": "mlm."}, mismatch="per_task")
    tallfmt.encode(base, tasks, tmp_path / "z.tall", **kw)
    assert_roundtrip(base, tasks, tmp_path / "z.tall", **kw)
    with tallfmt.open(tmp_path / "z.tall") as zoo:
        assert zoo.roles == {"bert.embeddings.w": "masked", "bert.pooler.b": "shared", "mlm.bias": "per_task",
                             "classifier.w": "per_task"}
    with pytest.raises(InputError, match="prefix_map gives 'a.x' and 'b.x' the same name 'c.x'"):
        tallfmt.encode({"a.x": torch.ones(1), "b.x": torch.ones(1)}, {"t": {"c.x": torch.ones(1)}},
                       tmp_path / "y.tall", prefix_map={"a.": "c.", "b.": "c."})


def test_dtype_option_checks_and_overflow(tmp_path: Path) -> None:
    assert [cast_dtype(d) for d in ("bf16", "BF16", "bfloat16", "fp16", "half", "float32", torch.float16)] == \
        ["BF16", "BF16", "BF16", "F16", "F16", "F32", "F16"]
    for bad in ("int8", "F64", "fp8", 3):
        with pytest.raises(InputError, match="dtype must be one of"):
            EncodeOptions.check(["a"], dtype=bad)
    big = {"w": torch.tensor([1e5, 1.0])}
    with pytest.raises(InputError, match=r"'w' has values outside the range of F16 .* cast to BF16 instead"):
        tallfmt.encode(big, {"a": {"w": torch.tensor([1e5, 2.0])}}, tmp_path / "x.tall", dtype="F16")
    assert not (tmp_path / "x.tall").exists()
    # integer buffers are never cast
    tallfmt.encode({"w": torch.ones(3, dtype=torch.float64), "n": torch.arange(3)},
                   {"a": {"w": torch.full((3,), 2.0, dtype=torch.float64), "n": torch.arange(3) + 1}},
                   tmp_path / "c.tall", dtype="bf16")
    with tallfmt.open(tmp_path / "c.tall") as zoo:
        assert zoo.roles == {"w": "masked", "n": "per_task"} and zoo.entry("w").dtype == "BF16"
        assert zoo.decode("a")["n"].dtype == torch.int64


def _head_zoo(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(8, generator=g), "bn.running_mean": torch.zeros(2)}
    tasks = {t: {"w": base["w"] + 0.1 * torch.randn(8, generator=g), "bn.running_mean": torch.rand(2, generator=g),
                 "head": torch.randn(i + 2, generator=g)} for i, t in enumerate("ab")}
    tallfmt.encode(base, tasks, tmp_path / "h.tall", mismatch="per_task")
    return tmp_path / "h.tall"


def test_merge_per_task_policies(tmp_path: Path) -> None:
    with tallfmt.open(_head_zoo(tmp_path)) as zoo:
        assert zoo.unmergeable() == {"bn.running_mean": "θ0", "head": "none"}
        with pytest.warns(TallWarning, match=r"2 tensors stored per task cannot be merged; taken from θ0: "
                                             r"bn.running_mean; left out \(θ0 has none\): head"):
            merged = zoo.merge("task_arithmetic")
        assert set(merged) == {"w", "bn.running_mean"} and torch.equal(merged["bn.running_mean"], torch.zeros(2))
        with pytest.warns(TallWarning, match="left out: bn.running_mean, head"):
            dropped = zoo.merge("task_arithmetic", per_task="drop")
        assert set(dropped) == {"w"} and torch.equal(dropped["w"], merged["w"])
        with pytest.warns(TallWarning):
            files = zoo.merge_to(tmp_path / "dropped.safetensors", per_task="drop")
        from safetensors.torch import load_file

        assert set(load_file(str(files[0]))) == {"w"}
        with pytest.raises(InputError, match="cannot be merged: bn.running_mean, head"):
            zoo.merge("consensus", per_task="error")
        with pytest.raises(InputError, match="per_task must be one of"):
            zoo.merge(per_task="keep")


def test_info_and_report_warn_when_compression_is_mostly_lost(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"ids": torch.arange(1000), "w": torch.randn(10, generator=g)}
    tasks = {"a": {"ids": torch.arange(1000) + 1, "w": base["w"] + 0.1}}
    report = tallfmt.encode(base, tasks, tmp_path / "z.tall")
    [w] = report.warnings
    assert w.startswith("compression is mostly lost: 99% of the parameters are stored verbatim per task: 99% "
                        "because their dtype is not F32, F16 or BF16")
    assert f"warning: {w}" in str(report)
    from tallfmt.summary import format_summary, summary

    with tallfmt.open(tmp_path / "z.tall") as zoo:
        s = summary(zoo)
    assert s["warnings"] == [w]
    assert "warning" not in format_summary(s)  # the CLI prints them to stderr, as warnings
