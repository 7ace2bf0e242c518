"""encode / decode / merges / masks against the independent reference of tallfmt.testing (FORMAT.md §2, §4).

Random collections (1–6 tasks; 0-dim and 0-size shapes; float32/float16/bfloat16; shared, per-task,
non-float, tied and non-contiguous tensors) are encoded with random options and checked bit for bit.
Then: determinism, chunking invariance, sources given as files, the encode report, decode_to,
λ/α selection, the CPU device, and every documented input error.
"""

from __future__ import annotations

import gc
import json
import math
import tempfile
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tallfmt
from tallfmt.checkpoints import open_checkpoint, save_state_dict
from tallfmt.testing import (assert_archives_equal, assert_roundtrip, assert_state_dicts_equal,
                             checkpoint_collections, encode_options, reference)

# Encoding happens inside the examples; a busy 2-core CI machine must not trip the speed checks.
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encode(coll, folder: Path, name: str = "zoo.tall", **kw) -> tuple[Path, tallfmt.EncodeReport]:
    path = folder / name
    report = tallfmt.encode(coll.base, coll.tasks, path, **{**coll.encode_kwargs, **kw})
    return path, report


def check_report(report: tallfmt.EncodeReport, path: Path, coll) -> None:
    """The EncodeReport describes the file that was written."""
    with tallfmt.open(path) as zoo:
        assert report.path == path
        assert report.tasks == zoo.tasks == list(coll.tasks)
        assert report.roles == dict(Counter(zoo.roles.values()))
        role_bytes: Counter = Counter()
        params: Counter = Counter()
        for e in zoo.header.tensors:
            role_bytes[e.role] += sum(s.length for s in e.segments())
            if e.role in ("masked", "shared"):
                params[e.role] += math.prod(coll.base[e.name].shape)
        assert report.role_bytes == dict(role_bytes)
        assert report.params == dict(params)
        assert report.archive_bytes == path.stat().st_size
        assert sum(role_bytes.values()) < report.archive_bytes
        raw = sum(t.numel() * t.element_size() for sd in (coll.base, *coll.tasks.values()) for t in sd.values())
        assert report.input_bytes == raw
        assert report.ratio == pytest.approx(raw / report.archive_bytes)
        assert report.task_stats == {t: {k: v for k, v in zoo.task_info(t).items() if k not in ("name", "lambda")}
                                     for t in zoo.tasks}
        assert str(path) in str(report)


# --------------------------------------------------------------------------------------------------
# Round trips against the reference


@SETTINGS
@given(checkpoint_collections(per_task=True), st.data())
def test_roundtrip_random_options(coll, data):
    kw = data.draw(encode_options(list(coll.tasks)))
    with tempfile.TemporaryDirectory() as tmp:
        path, report = _encode(coll, Path(tmp), **kw)
        check_report(report, path, coll)
        assert_roundtrip(coll.base, coll.tasks, path, **coll.encode_kwargs, **kw)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("agg", ["sum", "mean"])
@settings(SETTINGS, max_examples=12)
@given(coll=checkpoint_collections(per_task=True), density=st.sampled_from([0.0, 0.2, 1.0]) | st.floats(0, 1),
       lam=st.sampled_from([0.5, 1.0]) | st.floats(0.01, 3))
def test_roundtrip_ties(coll, density, lam, scope, agg):
    kw = dict(merge="ties", ties_density=density, ties_agg=agg, ties_scope=scope, lambdas=lam)
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = _encode(coll, Path(tmp), **kw)
        assert_roundtrip(coll.base, coll.tasks, path, **coll.encode_kwargs, **kw)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@settings(SETTINGS, max_examples=12)
@given(coll=checkpoint_collections(per_task=True), density=st.sampled_from([0.0, 0.1, 1.0]) | st.floats(0, 1),
       merge=st.sampled_from(["task_arithmetic", "ties"]))
def test_roundtrip_magnitude_masks(coll, density, merge, scope):
    kw = dict(merge=merge, mask_method="magnitude", mask_density=density, mask_scope=scope)
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = _encode(coll, Path(tmp), **kw)
        with tallfmt.open(path) as zoo:
            assert all(zoo.task_info(t)["lambda"] is None for t in zoo.tasks)
        assert_roundtrip(coll.base, coll.tasks, path, **coll.encode_kwargs, **kw)


def test_roundtrip_hand_made_ties_and_signed_zeros(tmp_path):
    """Exact ties the random collections hit only sometimes: |τ_1| = λ·|τ_MTL − τ_1| (kept, `≥`),
    TIES elected sums of exactly 0, top-k thresholds shared by several entries, −0.0 in θ0."""
    base = {"w": torch.tensor([0.5, -0.0, 0.25, 1.0, 0.0, -0.0], dtype=torch.bfloat16)}
    tasks = {"a": {"w": torch.tensor([0.75, -0.0, 0.5, 1.25, -0.0, 0.25], dtype=torch.bfloat16)},
             "b": {"w": torch.tensor([0.25, 0.25, 0.0, 1.25, 0.0, -0.0], dtype=torch.bfloat16)}}
    for kw in (dict(lambdas=1.0), dict(lambdas={"a": 1.0, "b": 0.5}),
               dict(merge="ties", ties_density=0.5, lambdas=1.0),
               dict(merge="ties", ties_density=0.5, ties_agg="mean", ties_scope="per_tensor"),
               dict(mask_method="magnitude", mask_density=0.5)):
        tallfmt.encode(base, tasks, tmp_path / "zoo.tall", overwrite=True, **kw)
        assert_roundtrip(base, tasks, tmp_path / "zoo.tall", **kw)
    ref = reference(base, tasks, lambdas=1.0)
    # τ_a = [.25, 0, .25, .25, −0, .25], τ_b = [−.25, .25, −.25, .25, 0, 0], τ_MTL = [0, .25, 0, .5, 0, .25]:
    # entry 3 of task a ties (.25 ≥ 1·.25) and is kept; entries 0, 2, 4 tie too, but τ_MTL = 0 there, so
    # their bits are 0 (FORMAT §4.3, 1.1); a's entry 1 keeps θ0 = −0.0
    assert ref.masks["a"]["w"].tolist() == [False, False, False, True, False, True]
    assert ref.masks["b"]["w"].tolist() == [False, True, False, True, False, False]
    assert str(ref.decode("a")["w"][1].item()) == "-0.0"


def test_empty_collection_and_single_scalar(tmp_path):
    for base, tasks in (({}, {"a": {}}), ({"s": torch.tensor(1.0)}, {"a": {"s": torch.tensor(-1.0)}})):
        tallfmt.encode(base, tasks, tmp_path / "zoo.tall", overwrite=True)
        assert_roundtrip(base, tasks, tmp_path / "zoo.tall")


# --------------------------------------------------------------------------------------------------
# Determinism and invariance


@settings(SETTINGS, max_examples=12)
@given(checkpoint_collections(per_task=True), st.data())
def test_deterministic_and_codec_independent(coll, data):
    """Identical inputs and options give byte-identical files; another codec the same content."""
    kw = data.draw(encode_options(list(coll.tasks), codecs=["auto"]))
    with tempfile.TemporaryDirectory() as tmp:
        a, _ = _encode(coll, Path(tmp), "a.tall", **kw)
        b, _ = _encode(coll, Path(tmp), "b.tall", **kw)
        assert a.read_bytes() == b.read_bytes()
        raw, _ = _encode(coll, Path(tmp), "raw.tall", **{**kw, "codec": "raw"})
        assert_archives_equal(a, raw)


@settings(SETTINGS, max_examples=12)
@given(checkpoint_collections(max_tasks=4, per_task=True, max_dims=1, max_side=300), st.data())
def test_chunking_invariance(coll, data):
    """Masks, τ_MTL, the global TIES / magnitude thresholds and the statistics do not depend on
    chunk_size: the files are byte-identical."""
    kw = data.draw(encode_options(list(coll.tasks), chunk_sizes=[None], codecs=["auto"]))
    with tempfile.TemporaryDirectory() as tmp:
        default, _ = _encode(coll, Path(tmp), "default.tall", **kw)
        for chunk in (8, 16):
            path, _ = _encode(coll, Path(tmp), f"chunk{chunk}.tall", chunk_size=chunk, **kw)
            if path.read_bytes() != default.read_bytes():
                assert_archives_equal(default, path, stats_rel_tol=0.0)  # says what differs
                pytest.fail(f"chunk_size={chunk} gave another file")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, dict(merge="ties"), dict(merge="ties", ties_scope="per_tensor", ties_agg="mean"),
                                dict(mask_method="magnitude", mask_density=0.3)])
def test_chunking_invariance_many_chunks(tmp_path, dtype, kw):
    g = torch.Generator().manual_seed(1)
    base = {"w": (torch.randn(19, 13, generator=g) * 0.02).to(dtype), "b": torch.randn(101, generator=g).to(dtype)}
    tasks = {t: {n: (x.float() + torch.randn(x.shape, generator=g) * 0.01).to(dtype) for n, x in base.items()}
             for t in ("a", "b", "c")}
    files = [tallfmt.encode(base, tasks, tmp_path / f"{c}.tall", chunk_size=c, **kw).path for c in (16, 1 << 20)]
    assert files[0].read_bytes() == files[1].read_bytes()


@settings(SETTINGS, max_examples=8)
@given(checkpoint_collections(max_tasks=3, per_task=True), st.data(), st.integers(1, 3))
def test_sharded_archive_decodes_like_one_file(coll, data, shards):
    kw = data.draw(encode_options(list(coll.tasks)))
    with tempfile.TemporaryDirectory() as tmp:
        single, _ = _encode(coll, Path(tmp), "one.tall", **kw)
        folder, _ = _encode(coll, Path(tmp), "sharded", shards=shards, **kw)
        assert_roundtrip(coll.base, coll.tasks, folder, **coll.encode_kwargs, **kw)
        assert_archives_equal(single, folder)


# --------------------------------------------------------------------------------------------------
# Sources given as files


def _save(sd: dict[str, torch.Tensor], kind: str, where: Path) -> Path:
    """Write a state dict as a checkpoint of the given kind; returns what encode() takes."""
    contiguous = {k: v.contiguous() for k, v in sd.items()}
    if kind == "safetensors":
        save_file(contiguous, where.with_suffix(".safetensors"))
        return where.with_suffix(".safetensors")
    if kind == "hf_folder":
        where.mkdir()
        save_file(contiguous, where / "model.safetensors")
        return where
    if kind == "sharded":
        save_state_dict(sd, where, max_shard_size=48)
        return where
    torch.save(sd, where.with_suffix(".pt"))
    return where.with_suffix(".pt")


def _in_file_order(sd: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    # safetensors files keep their own tensor order (by dtype, then name), not the dict's
    with open_checkpoint(source) as ck:
        return {n: sd[n] for n in ck.names()}


@settings(SETTINGS, max_examples=12)
@given(checkpoint_collections(max_tasks=3, per_task=True, tied=False), st.data())
def test_sources_as_files_give_the_same_archive(coll, data):
    """A .safetensors file, an HF folder, a sharded HF folder and a .pt file give the archive of the
    same tensors given as dicts in the file's order, byte for byte; in the dicts' order, equal content."""
    kw = {**data.draw(encode_options(list(coll.tasks), chunk_sizes=[None])), **coll.encode_kwargs}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tallfmt.encode(coll.base, coll.tasks, folder / "dicts.tall", **kw)
        for kind in ("safetensors", "hf_folder", "sharded", "pt"):
            base = _save(coll.base, kind, folder / f"{kind}-base")
            tasks = {t: _save(sd, kind, folder / f"{kind}-task{i}") for i, (t, sd) in enumerate(coll.tasks.items())}
            out = folder / f"{kind}.tall"
            tallfmt.encode(base, tasks, out, **kw)
            same_order = folder / f"{kind}-dicts.tall"
            tallfmt.encode(_in_file_order(coll.base, base),
                           {t: _in_file_order(coll.tasks[t], tasks[t]) for t in coll.tasks}, same_order, **kw)
            assert out.read_bytes() == same_order.read_bytes(), f"{kind} sources gave another archive than dicts"
            assert_archives_equal(out, folder / "dicts.tall")
        assert_roundtrip(base, tasks, out, **kw)


@settings(SETTINGS, max_examples=10)
@given(checkpoint_collections(max_tasks=3, tied=True))
def test_torch_file_keeps_tied_tensors(coll):
    """A .pt file keeps storage sharing, so tied tensors become aliases as they do from dicts."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tallfmt.encode(coll.base, coll.tasks, folder / "dicts.tall")
        base = _save(coll.base, "pt", folder / "base")
        tasks = {t: _save(sd, "pt", folder / f"task{i}") for i, (t, sd) in enumerate(coll.tasks.items())}
        tallfmt.encode(base, tasks, folder / "pt.tall")
        assert (folder / "pt.tall").read_bytes() == (folder / "dicts.tall").read_bytes()


# --------------------------------------------------------------------------------------------------
# decode_to, devices


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(json.loads(index.read_text())["weight_map"].values()):
        out.update(load_file(folder / shard))
    return out


@settings(SETTINGS, max_examples=15)
@given(checkpoint_collections(max_tasks=3, per_task=True))
def test_decode_to_file_and_folders(coll):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, _ = _encode(coll, folder)
        with tallfmt.open(path) as zoo:
            for i, t in enumerate(zoo.tasks):
                decoded = zoo.decode(t)
                zoo.decode_to(t, folder / f"t{i}.safetensors", metadata={"task": t})
                assert_state_dicts_equal(decoded, load_file(folder / f"t{i}.safetensors"), f"file of {t!r}")
                zoo.decode_to(t, folder / f"t{i}")
                assert (folder / f"t{i}" / "model.safetensors").exists()
                assert_state_dicts_equal(decoded, _load_folder(folder / f"t{i}"), f"folder of {t!r}")
                zoo.decode_to(t, folder / f"s{i}", max_shard_size=32)
                assert_state_dicts_equal(decoded, _load_folder(folder / f"s{i}"), f"sharded folder of {t!r}")


@settings(SETTINGS, max_examples=10)
@given(checkpoint_collections(max_tasks=3, per_task=True), st.sampled_from(["cpu", torch.device("cpu")]))
def test_cpu_device_explicitly(coll, device):
    with tempfile.TemporaryDirectory() as tmp:
        default, _ = _encode(coll, Path(tmp), "default.tall", merge="ties")
        on_cpu, _ = _encode(coll, Path(tmp), "cpu.tall", merge="ties", device=device)
        assert on_cpu.read_bytes() == default.read_bytes()
        with tallfmt.open(on_cpu) as zoo:
            for t in zoo.tasks:
                sd = zoo.decode(t, device=device)
                assert all(x.device.type == "cpu" for x in sd.values())
                assert_state_dicts_equal(sd, zoo.decode(t), f"decode({t!r}, device={device!r})")
            merged = zoo.merge("consensus", k=1, device=device)
            assert_state_dicts_equal(merged, zoo.merge("consensus", k=1), "merge on cpu")
            assert torch.equal(zoo.agreement(device=device), zoo.agreement())
        assert_roundtrip(coll.base, coll.tasks, on_cpu, merge="ties", device=device, **coll.encode_kwargs)


# --------------------------------------------------------------------------------------------------
# λ and α selection


class OneModelAtATime:
    """An evaluate callback that fails when an earlier state dict is still alive at a later call."""

    def __init__(self, score) -> None:
        self.score = score
        self.current: list[weakref.ref] = []
        self.calls = 0

    def __call__(self, task: str, sd: dict[str, torch.Tensor]) -> float:
        self.calls += 1
        same = bool(self.current) and all(r() is not None for r in self.current) and \
            {id(r()) for r in self.current} == {id(v) for v in sd.values()}
        if not same:
            gc.collect()
            alive = sum(r() is not None for r in self.current)
            assert alive == 0, f"{alive} tensors of an earlier model are still alive"
            self.current = [weakref.ref(v) for v in sd.values()]
        return self.score(task, sd)


def _distance(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> float:
    """−Σ|sd − target| over float tensors both have with the same shape, in float64."""
    total = 0.0
    for n, x in sd.items():
        y = target.get(n)
        if x.dtype.is_floating_point and y is not None and y.shape == x.shape and y.dtype == x.dtype:
            total += float((x.double() - y.double()).abs().sum())
    return -round(total, 6)  # rounded, so that nearly equal models tie and the first grid value wins


@settings(SETTINGS, max_examples=8)
@given(checkpoint_collections(min_tasks=2, max_tasks=3, per_task=True),
       st.lists(st.sampled_from([0.1, 0.3, 0.5, 1.0, 2.0]), min_size=1, max_size=4, unique=True),
       st.sampled_from(["task_arithmetic", "ties"]))
def test_select_lambdas(coll, grid, merge):
    def score(task, sd):
        return _distance(sd, coll.tasks[task])

    evaluate = OneModelAtATime(score)
    table: dict = {}
    chosen = tallfmt.select_lambdas(coll.base, coll.tasks, evaluate, grid=grid, scores=table, merge=merge,
                                    **coll.encode_kwargs)
    assert evaluate.calls == len(grid) * len(coll.tasks)
    expected = {t: {lam: score(t, reference(coll.base, coll.tasks, lambdas=lam, merge=merge,
                                                **coll.encode_kwargs).decode(t)) for lam in grid}
                for t in coll.tasks}
    assert table == expected
    for t in coll.tasks:
        best = max(expected[t].values())
        assert chosen[t] == next(lam for lam in grid if expected[t][lam] == best)


@settings(SETTINGS, max_examples=8)
@given(checkpoint_collections(min_tasks=2, max_tasks=4, per_task=True),
       st.lists(st.sampled_from([-0.5, 0.1, 0.3, 0.5, 1.0, 1.5]), min_size=1, max_size=4, unique=True),
       st.sampled_from([("task_arithmetic", {}), ("consensus", {"k": 1}), ("consensus", {"k": 2})]))
def test_select_alpha(coll, grid, method):
    name, params = method
    ref = reference(coll.base, coll.tasks, **coll.encode_kwargs)
    # the best α brings the merge closest to θ0 + 0.5·τ_MTL on masked tensors
    target = ref.merge("task_arithmetic", alpha=0.5)

    def score(task, sd):
        return _distance(sd, target)

    with tempfile.TemporaryDirectory() as tmp:
        path, _ = _encode(coll, Path(tmp))
        evaluate = OneModelAtATime(score)
        table: dict = {}
        with tallfmt.open(path) as zoo:
            chosen = tallfmt.select_alpha(zoo, evaluate, method=name, grid=grid, scores=table, **params)
        assert evaluate.calls == len(grid) * len(coll.tasks)
    expected = {a: score(None, ref.merge(name, alpha=a, **params)) for a in grid}
    assert table == pytest.approx(expected, abs=1e-12)  # the mean over tasks of one value, rounded
    assert chosen == next(a for a in grid if table[a] == max(table.values()))


# --------------------------------------------------------------------------------------------------
# Input errors


def _tiny() -> tuple[dict, dict]:
    base = {"w": torch.zeros(4), "b": torch.zeros(2, dtype=torch.bfloat16)}
    tasks = {"sst2": {"w": torch.ones(4), "b": torch.ones(2, dtype=torch.bfloat16)},
             "mnli": {"w": -torch.ones(4), "b": torch.zeros(2, dtype=torch.bfloat16)}}
    return base, tasks


def _refused(tmp_path: Path, base, tasks, match: str, **kw) -> None:
    """encode raises InputError matching `match` and leaves nothing behind in the folder."""
    out = tmp_path / "sub"
    out.mkdir(exist_ok=True)
    with pytest.raises(tallfmt.InputError, match=match):
        tallfmt.encode(base, tasks, out / "zoo.tall", **kw)
    assert list(out.iterdir()) == []


def test_mismatched_names_list_the_first_few_and_the_count(tmp_path):
    base, tasks = _tiny()
    extra = {f"extra{i}": torch.zeros(3) for i in range(7)}
    tasks["sst2"] = {**tasks["sst2"], **extra}
    _refused(tmp_path, base, tasks, r"'extra0', 'extra1', 'extra2', 'extra3', 'extra4' and 2 more \(7 in all\)")
    _refused(tmp_path, base, tasks, r"mismatch='per_task'")
    tallfmt.encode(base, tasks, tmp_path / "ok.tall", mismatch="per_task")
    assert_roundtrip(base, tasks, tmp_path / "ok.tall", mismatch="per_task")


def test_mismatched_shapes_and_dtypes(tmp_path):
    base, tasks = _tiny()
    tasks["mnli"]["w"] = torch.zeros(5)
    _refused(tmp_path, base, tasks, r"'w' \(1 in all\)")
    base, tasks = _tiny()
    tasks["mnli"]["b"] = torch.zeros(2, dtype=torch.float16)
    _refused(tmp_path, base, tasks, r"'b' \(1 in all\)")
    _refused(tmp_path, base, tasks, "bogus", mismatch="bogus")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["base", "sst2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nan_and_inf_name_the_checkpoint_and_tensor(tmp_path, bad, where, dtype):
    base = {"ok": torch.zeros(3), "x": torch.zeros(5, dtype=dtype)}
    tasks = {"sst2": {"ok": torch.ones(3), "x": torch.ones(5, dtype=dtype)},
             "mnli": {"ok": torch.ones(3), "x": torch.ones(5, dtype=dtype)}}
    sd = base if where == "base" else tasks[where]
    sd["x"] = sd["x"].clone()
    sd["x"][3] = bad
    _refused(tmp_path, base, tasks, rf"'{where}'.*'x'.*NaN or Inf")


def test_nan_in_shared_and_per_task_tensors(tmp_path):
    nan = torch.tensor([0.0, math.nan])
    base, tasks = _tiny()
    base["s"], tasks["sst2"]["s"], tasks["mnli"]["s"] = nan, nan.clone(), nan.clone()  # equal bits
    _refused(tmp_path, base, tasks, r"'base'.*'s'.*NaN or Inf")
    base, tasks = _tiny()
    tasks["mnli"]["head"] = nan
    _refused(tmp_path, base, tasks, r"'mnli'.*'head'.*NaN or Inf", mismatch="per_task")


@pytest.mark.parametrize("lambdas", [0, -0.4, math.nan, math.inf, "0.4", True, None, 1e39,
                                     {"sst2": 0.4}, {"sst2": 0.4, "mnli": 0.4, "qqp": 0.4},
                                     {"sst2": 0.4, "mnli": 0.0}])
def test_bad_lambdas(tmp_path, lambdas):
    base, tasks = _tiny()
    _refused(tmp_path, base, tasks, "lambda", lambdas=lambdas)


@pytest.mark.parametrize("kw", [dict(ties_density=-0.1), dict(ties_density=1.5), dict(ties_density=math.nan),
                                dict(ties_density="0.2"), dict(ties_agg="median"), dict(ties_scope="layer"),
                                dict(mask_method="magnitude", mask_density=2.0),
                                dict(mask_method="magnitude", mask_scope="row")])
def test_bad_ties_and_mask_parameters(tmp_path, kw):
    base, tasks = _tiny()
    name = next(iter(kw)) if len(kw) == 1 else list(kw)[1]
    _refused(tmp_path, base, tasks, name, merge="ties", **kw)


def test_bad_merge_and_other_options(tmp_path):
    base, tasks = _tiny()
    _refused(tmp_path, base, tasks, "merge", merge="dare")
    _refused(tmp_path, base, tasks, "mask_method", mask_method="random")
    _refused(tmp_path, base, tasks, "chunk_size", chunk_size=4)
    with pytest.raises(tallfmt.InputError, match="tasks"):
        tallfmt.encode(base, {}, tmp_path / "zoo.tall")
    with pytest.raises(tallfmt.InputError, match="task name '': a name is 1..4096 UTF-8 bytes"):
        tallfmt.encode(base, {"": tasks["sst2"]}, tmp_path / "zoo.tall")


@pytest.fixture
def tiny_archive(tmp_path):
    base, tasks = _tiny()
    tallfmt.encode(base, tasks, tmp_path / "zoo.tall")
    with tallfmt.open(tmp_path / "zoo.tall") as zoo:
        yield zoo


@pytest.mark.parametrize("method, params, match", [
    ("dare", {}, "unknown merge method 'dare'"),
    (None, {}, "unknown merge method"),
    ("consensus", {"k": -1}, "k must be an integer >= 0"),
    ("consensus", {"k": 1.5}, "k must be an integer"),
    ("consensus", {"k": True}, "k must be an integer"),
    ("task_arithmetic", {"alpha": math.nan}, "alpha must be a finite number"),
    ("task_arithmetic", {"alpha": math.inf}, "alpha must be a finite number"),
    ("consensus", {"alpha": math.nan}, "alpha must be a finite number"),
    ("task_arithmetic", {"alpha": "0.4"}, "alpha must be a finite number"),
    ("zeroshot", {"alpha": 0.4}, "takes no parameter"),
    ("task_arithmetic", {"k": 2}, "takes no parameter"),
])
def test_bad_merge_parameters(tiny_archive, method, params, match):
    with pytest.raises(tallfmt.InputError, match=match):
        tiny_archive.merge(method, **params)


def test_consensus_k_bounds(tiny_archive, tmp_path):
    """k = 0 is task arithmetic, k > T is θ0, for any k however large."""
    zoo = tiny_archive
    assert_state_dicts_equal(zoo.merge("consensus", k=0, alpha=0.7), zoo.merge("task_arithmetic", alpha=0.7), "k=0")
    for k in (3, 300, 2**40):
        assert_state_dicts_equal(zoo.merge("consensus", k=k), zoo.merge("zeroshot"), f"k={k}")


def test_bad_task_and_tensor_names_in_queries(tiny_archive):
    with pytest.raises(tallfmt.InputError, match="no task 'qqp'"):
        tiny_archive.decode("qqp")
    with pytest.raises(tallfmt.InputError, match="no tensor 'nope'"):
        tiny_archive.mask("sst2", "nope")
