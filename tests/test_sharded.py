"""Sharded archives (FORMAT.md §9): same decoded models as a single file, strict index, Dask encode.

The Dask tests run a LocalCluster of 2 worker processes (one thread each) for the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

import tallfmt
from tallfmt.checkpoints import open_checkpoint
from tallfmt.compute.maskmath import task_vector, topk_threshold_dense
from tallfmt.errors import ChecksumError, FormatError, InputError, LimitError
from tallfmt.format.index import INDEX_NAME, seal_index, shard_name
from tallfmt.write.plan import TensorPlan, group_into_shards

TASKS = ("sst2", "mnli", "qqp")
CONFIGS: dict[str, dict[str, Any]] = {
    "ta": {},
    "ties": {"merge": "ties", "ties_density": 0.3, "chunk_size": 512},  # several chunks per tensor
    "magnitude": {"mask_method": "magnitude", "mask_density": 0.2, "chunk_size": 1000},
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert list(a) == list(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
        assert torch.equal(_bits(a[k]), _bits(b[k])), f"{what}: {k} differs"


def _zoo_tensors(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """θ0 and three fine-tunes: masked F32/BF16/F16 tensors of several sizes, a shared float and a
    shared int tensor, an int buffer that differs per task (per_task)."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "emb.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "layer0.w": torch.randn(96, 40, generator=g),
        "layer0.b": torch.randn(40, generator=g),
        "ln.w": torch.ones(40),
        "layer1.w": torch.randn(48, 32, generator=g).half(),
        "pos_ids": torch.arange(16),
        "counter": torch.zeros(4, dtype=torch.int32),
        "head.w": torch.randn(10, 8, generator=g),
    }
    tasks = {}
    for i, t in enumerate(TASKS):
        sd = {}
        for k, v in base.items():
            if k in ("ln.w", "pos_ids"):
                sd[k] = v.clone()
            elif k == "counter":
                sd[k] = v + i + 1
            else:
                noise = torch.randn(v.shape, generator=g) * (0.02 * (i + 1))
                sd[k] = (v.float() + noise).to(v.dtype)
        tasks[t] = sd
    return base, tasks


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """The synthetic zoo as safetensors files (paths every Dask worker can read)."""
    d = tmp_path_factory.mktemp("zoo")
    base, tasks = _zoo_tensors()
    save_file(base, str(d / "base.safetensors"))
    for t, sd in tasks.items():
        save_file(sd, str(d / f"{t}.safetensors"))
    return str(d / "base.safetensors"), {t: str(d / f"{t}.safetensors") for t in TASKS}


@pytest.fixture(scope="module")
def singles(zoo: tuple[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One single-file archive per configuration, the reference for every sharded one."""
    d = tmp_path_factory.mktemp("single")
    base, tasks = zoo
    out = {}
    for name, opts in CONFIGS.items():
        out[name] = d / f"{name}.tall"
        tallfmt.encode(base, tasks, out[name], **opts)
    return out


@pytest.fixture(scope="module")
def sharded(zoo: tuple[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
            ) -> Callable[[str, int], Path]:
    """sharded(config, n): a sharded archive of the zoo, encoded locally (cached per module)."""
    cache: dict[tuple[str, int], Path] = {}

    def make(config: str, n: int) -> Path:
        if (config, n) not in cache:
            d = tmp_path_factory.mktemp(f"{config}-{n}")
            tallfmt.encode(zoo[0], zoo[1], d, shards=n, **CONFIGS[config])
            cache[config, n] = d
        return cache[config, n]
    return make


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def _edit_index(folder: Path, edit: Callable[[dict], Any]) -> None:
    """Change the index's JSON with ``edit(obj)`` and re-seal it with a valid checksum."""
    p = folder / INDEX_NAME
    obj = json.loads(p.read_bytes())
    del obj["checksum"]
    edit(obj)
    p.write_bytes(seal_index(json.dumps(obj, indent=2)))


# ----------------------------------------------------------------------------------------------
# Same models as a single file


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_sharded_reads_exactly_like_single_file(config: str, n: int, singles: dict[str, Path],
                                                sharded: Callable[[str, int], Path]) -> None:
    folder = sharded(config, n)
    files = _shard_files(folder)  # named by content: model-0000i-of-0000n-<header xxh3>.tall
    assert sorted(p.name for p in folder.iterdir()) == sorted([INDEX_NAME, *files])
    assert files == [shard_name(i, n, tallfmt.format.index.read_header_xxh3(folder / f)) for i, f in
                     enumerate(files, 1)]
    with tallfmt.open(singles[config]) as one, tallfmt.open(folder) as many:
        assert len(many.shards) == n and many.index is not None and one.index is None
        assert many.tasks == one.tasks and many.encoding == one.encoding and many.metadata == one.metadata
        assert many.tensor_names == one.tensor_names and many.roles == one.roles
        assert set(one.roles.values()) >= {"masked", "shared", "per_task"}
        for t in one.tasks:
            _same(one.decode(t), many.decode(t), f"decode {t}")
            a, b = one.task_info(t), many.task_info(t)
            assert a["lambda"] == b["lambda"] and a["mask_density"] == b["mask_density"]  # a count ratio: exact
            for k in ("rel_error", "cosine"):  # float64 sums added in another order
                assert b[k] == pytest.approx(a[k], rel=1e-9), (t, k)
            for name, role in one.roles.items():
                if role == "masked":
                    assert torch.equal(one.mask(t, name), many.mask(t, name))
            assert torch.equal(one.decode_tensor(t, "counter"), many.decode_tensor(t, "counter"))
        _same(one.merge("zeroshot"), many.merge("zeroshot"), "zeroshot")
        _same(one.merge("task_arithmetic", alpha=0.3), many.merge("task_arithmetic", alpha=0.3), "TA")
        for k in (1, 2):
            _same(one.merge("consensus", k=k, alpha=0.7), many.merge("consensus", k=k, alpha=0.7), f"k={k}")
        assert torch.equal(one.agreement(), many.agreement())
        many.verify()
        sizes = many.sizes()
        assert sizes["total"] == sum(p.stat().st_size for p in folder.iterdir())
        assert min(sizes.values()) >= 0


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_each_shard_is_a_complete_archive(config: str, sharded: Callable[[str, int], Path]) -> None:
    folder = sharded(config, 3)
    with tallfmt.open(folder / INDEX_NAME) as whole:
        seen = []
        for info in whole.index.shards:
            with tallfmt.open(folder / info.file) as shard:
                shard.verify()
                assert shard.tasks == whole.tasks and shard.encoding == whole.encoding
                assert shard.tensor_names == whole.index.tensors_of(info.file)
                for t in whole.tasks:
                    for name, tensor in shard.iter_decode(t):
                        assert torch.equal(_bits(tensor), _bits(whole.decode_tensor(t, name)))
                seen += shard.tensor_names
        assert seen == whole.tensor_names  # every tensor in exactly one shard, archive order kept


@pytest.mark.parametrize("config,key,density", [("ties", "ties", 0.3), ("magnitude", "magnitude", 0.2)])
def test_global_thresholds_equal_the_single_file_ones(config: str, key: str, density: float,
                                                       zoo: tuple[str, dict[str, str]],
                                                       sharded: Callable[[str, int], Path]) -> None:
    base, tasks = zoo
    with tallfmt.open(sharded(config, 2)) as z:
        masked = [n for n, r in z.roles.items() if r == "masked"]
    # the dense reference: sort every |τ_t| of the masked tensors at once
    with open_checkpoint(base) as b:
        theta0 = {n: b.get(n).float().reshape(-1) for n in masked}
    want = []
    for t, src in tasks.items():
        with open_checkpoint(src) as ck:
            taus = torch.cat([task_vector(ck.get(n).float().reshape(-1), theta0[n]) for n in masked])
        want.append(topk_threshold_dense(taus, density))
    for n in (2, 3):
        with tallfmt.open(sharded(config, n)) as zoo_:
            assert list(zoo_.index.thresholds[key]) == want
            other = "magnitude" if key == "ties" else "ties"
            assert zoo_.index.thresholds[other] is None


def test_aliases_stay_with_their_targets(tmp_path: Path) -> None:
    base, tasks = _zoo_tensors(1)
    for sd in (base, *tasks.values()):
        sd["lm_head.weight"] = sd["emb.weight"]  # tied: the same storage in every checkpoint
    tallfmt.encode(base, tasks, tmp_path / "one.tall")
    tallfmt.encode(base, tasks, tmp_path / "many", shards=4)
    with tallfmt.open(tmp_path / "one.tall") as one, tallfmt.open(tmp_path / "many") as many:
        assert many.roles["lm_head.weight"] == "alias"
        wm = many.index.weight_map
        assert wm["lm_head.weight"] == wm["emb.weight"]
        assert list(wm) == one.tensor_names
        for t in one.tasks:
            sd = many.decode(t)
            _same(one.decode(t), sd, t)
            assert sd["lm_head.weight"] is sd["emb.weight"]


def test_mismatched_tensors_per_task(tmp_path: Path) -> None:
    base, tasks = _zoo_tensors(2)
    tasks["mnli"]["extra.head"] = torch.randn(3, 8)
    kw = {"mismatch": "per_task"}
    tallfmt.encode(base, tasks, tmp_path / "one.tall", **kw)
    tallfmt.encode(base, tasks, tmp_path / "many", shards=3, **kw)
    with tallfmt.open(tmp_path / "one.tall") as one, tallfmt.open(tmp_path / "many") as many:
        assert many.roles["extra.head"] == "per_task"
        for t in one.tasks:
            _same(one.decode(t), many.decode(t), t)
        _same(one.merge("consensus", k=2), many.merge("consensus", k=2), "consensus")


def test_max_shard_size_and_report(zoo: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    report = tallfmt.encode(*zoo, tmp_path / "z", max_shard_size=20_000, progress=lambda n, total: calls.append((n, total)))
    files = sorted(p.name for p in (tmp_path / "z").iterdir())
    assert len(files) > 3 and files[-1] == INDEX_NAME
    assert len(calls) == 8  # every tensor reported once, in bytes of input, against the inputs' total
    assert sum(n for n, _ in calls) == calls[0][1] == report.input_bytes
    assert report.path == tmp_path / "z"
    assert report.archive_bytes == sum(p.stat().st_size for p in (tmp_path / "z").iterdir())
    assert report.roles == {"masked": 5, "shared": 2, "per_task": 1}
    with tallfmt.open(tmp_path / "z") as z:
        assert len(z.shards) == len(files) - 1
        assert report.task_stats == {t: {k: v for k, v in z.task_info(t).items() if k not in ("name", "lambda")}
                                     for t in z.tasks}


def test_reencode_replaces_the_old_shards(zoo: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    tallfmt.encode(*zoo, tmp_path, shards=3)
    with pytest.raises(InputError, match="already exists"):  # refused by default, as on the command line
        tallfmt.encode(*zoo, tmp_path, shards=2)
    tallfmt.encode(*zoo, tmp_path, shards=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*_shard_files(tmp_path), INDEX_NAME])
    assert len(_shard_files(tmp_path)) == 2


def test_failed_encode_leaves_no_index_and_no_temporary_files(zoo: tuple[str, dict[str, str]],
                                                              tmp_path: Path) -> None:
    base, tasks = _zoo_tensors(3)
    tasks["qqp"]["head.w"][1, 2] = float("nan")  # in the last shard: the others are written first
    with pytest.raises(InputError, match="NaN"):
        tallfmt.encode(base, tasks, tmp_path / "new", shards=3)
    assert not (tmp_path / "new").exists()  # the folder this encode made goes with it
    # over an existing archive: it is left as it was
    tallfmt.encode(*zoo, tmp_path / "old", shards=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(InputError, match="NaN"):
        tallfmt.encode(base, tasks, tmp_path / "old", shards=3, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


def test_bad_arguments(zoo: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not both"):
        tallfmt.encode(*zoo, tmp_path / "a", shards=2, max_shard_size=10)
    for bad in (0, -1, 1.5, True, 100_000):
        with pytest.raises(InputError, match="shards"):
            tallfmt.encode(*zoo, tmp_path / "a", shards=bad)
    with pytest.raises(InputError, match="retries"):
        tallfmt.encode(*zoo, tmp_path / "a", shards=2, retries=-1)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(InputError, match="not a folder"):
        tallfmt.encode(*zoo, tmp_path / "file", shards=2)
    with pytest.raises(InputError, match="lambda"):  # the usual option checks come first
        tallfmt.encode(*zoo, tmp_path / "a", shards=2, lambdas=-1)


def test_scheduler_refuses_in_memory_sources(tmp_path: Path) -> None:
    base, tasks = _zoo_tensors()
    # refused before any connection is tried: the address is never contacted
    with pytest.raises(InputError, match="cannot be sent to a Dask cluster"):
        tallfmt.encode(base, tasks, tmp_path / "x", shards=2, scheduler="tcp://127.0.0.1:9")
    assert not any((tmp_path / "x").glob("*")) if (tmp_path / "x").exists() else True


def test_assign_shards_balances_bytes_in_order() -> None:
    plans = [TensorPlan(f"t{i}", "masked") for i in range(10)]
    sizes = [5, 1, 1, 1, 1, 1, 1, 1, 1, 5]
    groups = group_into_shards(plans, sizes, shards=3)
    assert [p.name for g in groups for p in g] == [p.name for p in plans]
    assert [sum(sizes[int(p.name[1:])] for p in g) for g in groups] == [6, 6, 6]
    # never more shards than tensors, and never an empty one
    assert [len(g) for g in group_into_shards(plans[:2], sizes[:2], shards=5)] == [1, 1]
    assert [len(g) for g in group_into_shards(plans, [0] * 10, shards=4)] == [7, 1, 1, 1]
    # an alias goes with its target, wherever it is listed
    plans.append(TensorPlan("tied", "alias", target="t0"))
    groups = group_into_shards(plans, [*sizes, 0], shards=3)
    assert [p.name for p in groups[0]][:1] == ["t0"] and "tied" in [p.name for p in groups[0]]
    # max_shard_size: greedy, a larger tensor alone
    groups = group_into_shards(plans[:10], sizes, max_shard_size=4)
    assert [[p.name for p in g] for g in groups][:2] == [["t0"], ["t1", "t2", "t3", "t4"]]


# ----------------------------------------------------------------------------------------------
# Damage and index validation


def test_damaged_shard_is_named(sharded: Callable[[str, int], Path], tmp_path: Path) -> None:
    folder = _copy(sharded("ta", 3), tmp_path)
    shard = folder / _shard_files(folder)[1]
    raw = bytearray(shard.read_bytes())
    raw[200] ^= 0x01  # a segment byte: open works, the read or verify finds it
    shard.write_bytes(bytes(raw))
    with tallfmt.open(folder) as z:
        with pytest.raises(ChecksumError, match=shard.name):
            z.verify()
    raw[-10] ^= 0x01  # now the header too
    shard.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=str(shard)):
        tallfmt.open(folder)
    shard.write_bytes(bytes(raw[:-1]))
    with pytest.raises(FormatError, match=rf"{shard}.*shards\[1\]\.size"):
        tallfmt.open(folder)
    shard.unlink()
    with pytest.raises(FormatError, match=r"shards\[1\]\.file.*does not exist"):
        tallfmt.open(folder)


def test_damaged_index_is_named(sharded: Callable[[str, int], Path], tmp_path: Path) -> None:
    folder = _copy(sharded("ta", 2), tmp_path)
    index = folder / INDEX_NAME
    raw = bytearray(index.read_bytes())
    for pos in (10, len(raw) // 2, len(raw) - 40):
        bad = bytearray(raw)
        bad[pos] ^= 0x04
        index.write_bytes(bytes(bad))
        with pytest.raises(FormatError, match=INDEX_NAME):
            tallfmt.open(folder)
    index.write_bytes(bytes(raw[:-30]))
    with pytest.raises(FormatError, match="index checksum"):
        tallfmt.open(index)
    index.unlink()
    with pytest.raises(FormatError, match="without tall.index.json"):
        tallfmt.open(folder)


def test_shard_from_another_encode_is_refused(zoo: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    tallfmt.encode(*zoo, tmp_path / "a", shards=2)
    tallfmt.encode(*zoo, tmp_path / "b", shards=2, lambdas=0.3)
    mine = _shard_files(tmp_path / "a")[0]
    shutil.copy(tmp_path / "b" / _shard_files(tmp_path / "b")[0], tmp_path / "a" / mine)
    # same size (the λ differs only in the header's digits) is possible; the header checksum catches it
    with pytest.raises(FormatError, match=rf"{mine}.*(size|header_xxh3)"):
        tallfmt.open(tmp_path / "a")


def _shard_files(folder: Path) -> list[str]:
    """The shard files the folder's index lists, in order."""
    return [s["file"] for s in json.loads((folder / INDEX_NAME).read_bytes())["shards"]]


def _fresh(sharded: Callable[[str, int], Path], tmp_path: Path, config: str = "ta") -> Path:
    return _copy(sharded(config, 3), tmp_path)


def _first_tensor(obj: dict, shard: int) -> str:
    return next(k for k, v in obj["weight_map"].items() if v == obj["shards"][shard]["file"])


def _spare_tensor(obj: dict) -> str:
    """A tensor whose shard holds others too (so that taking it away leaves no shard empty)."""
    files = list(obj["weight_map"].values())
    return next(k for k, v in obj["weight_map"].items() if files.count(v) > 1)


INDEX_RULES: list[tuple[str, Callable[[dict], Any], str]] = [
    ("format", lambda o: o.update(format="tallfmt"), r"index format"),
    ("major version", lambda o: o.update(version=[2, 0]), r"index version: major version 2"),
    ("missing key", lambda o: o.pop("thresholds"), r"index : missing key\(s\) \['thresholds'\]"),
    ("unknown key", lambda o: o.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    ("no tasks", lambda o: o.update(tasks=[]), r"index tasks"),
    ("duplicate task", lambda o: o["tasks"].append(dict(o["tasks"][0])), r"index tasks: duplicate"),
    ("lambda differs", lambda o: o["tasks"][1].update({"lambda": 0.5}), r"header tasks .* differ from"),
    ("task order", lambda o: o["tasks"].reverse(), r"header tasks .* differ from"),
    ("encoding differs", lambda o: o["encoding"]["merge"].update(method="ties", density=0.2, agg="sum",
                                                                 scope="per_tensor"), r"header encoding"),
    ("bad encoding", lambda o: o["encoding"].update(bit_order="big"), r"index encoding\.bit_order"),
    ("stats not finite", lambda o: o["tasks"][0]["stats"].update(cosine="x"), r"tasks\[0\]\.stats\.cosine"),
    ("thresholds without a global step", lambda o: o["thresholds"].update(ties=[0.1, 0.1, 0.1]),
     r"thresholds\.ties: must be null"),
    ("no shards", lambda o: o.update(shards=[]), r"index shards"),
    ("path separator", lambda o: o["shards"][0].update(file="sub/x.tall"), r"shards\[0\]\.file"),
    ("parent folder", lambda o: o["shards"][0].update(file=".."), r"shards\[0\]\.file"),
    ("absolute path", lambda o: o["shards"][0].update(file="/etc/passwd"), r"shards\[0\]\.file"),
    ("backslash", lambda o: o["shards"][0].update(file="..\\x.tall"), r"shards\[0\]\.file"),
    ("the index itself", lambda o: o["shards"][0].update(file=INDEX_NAME), r"shards\[0\]\.file"),
    ("shard listed twice", lambda o: o["shards"].append(dict(o["shards"][0])), r"listed twice"),
    ("size type", lambda o: o["shards"][0].update(size="12"), r"shards\[0\]\.size"),
    ("size wrong", lambda o: o["shards"][0].update(size=o["shards"][0]["size"] + 64), r"shards\[0\]\.size says"),
    ("header checksum", lambda o: o["shards"][2].update(header_xxh3="0" * 16), r"shards\[2\]\.header_xxh3"),
    ("checksum format", lambda o: o["shards"][2].update(header_xxh3="ABC"), r"16 lowercase hex"),
    ("unknown shard", lambda o: o["weight_map"].update({_first_tensor(o, 0): "model-9.tall"}),
     r"not a file listed in shards"),
    ("tensor in the wrong shard", lambda o: o["weight_map"].update({_first_tensor(o, 0): o["shards"][1]["file"]}),
     r"header tensors differ"),
    ("tensor missing from the map", lambda o: o["weight_map"].pop(_spare_tensor(o)), r"header tensors differ"),
    ("tensor not in any shard", lambda o: o["weight_map"].update(ghost=o["shards"][0]["file"]),
     r"header tensors differ"),
    ("tensor order", lambda o: o.update(weight_map=dict(reversed(list(o["weight_map"].items())))),
     r"another order"),
    ("idle shard", lambda o: o["shards"].append({"file": "spare.tall", "size": 64, "header_xxh3": "0" * 16}),
     r"hold no tensor"),
    ("metadata type", lambda o: o["metadata"].update(k=1), r"metadata\.k"),
    ("unpaired surrogate", lambda o: o["metadata"].update(k="\ud800"), r"metadata\.k.*surrogate"),
]


@pytest.mark.parametrize("rule", [r[0] for r in INDEX_RULES])
def test_index_rules(rule: str, sharded: Callable[[str, int], Path], tmp_path: Path) -> None:
    _, edit, message = next(r for r in INDEX_RULES if r[0] == rule)
    folder = _fresh(sharded, tmp_path)
    _edit_index(folder, edit)
    with pytest.raises(FormatError, match=message) as exc:
        tallfmt.open(folder)
    assert str(folder) in str(exc.value)  # names the index or the shard


def test_index_threshold_rules(sharded: Callable[[str, int], Path], tmp_path: Path) -> None:
    folder = _fresh(sharded, tmp_path, "ties")
    good = json.loads((folder / INDEX_NAME).read_bytes())["thresholds"]["ties"]
    for bad, message in (([*good, 0.5], r"4 thresholds for 3 tasks"), ([-1.0, *good[1:]], r"float32"),
                         ([0.1, *good[1:]], r"float32"), (None, r"thresholds are required"),
                         (["x", *good[1:]], r"thresholds\.ties\[0\]")):
        _edit_index(folder, lambda o: o["thresholds"].update(ties=bad))
        with pytest.raises(FormatError, match=message):
            tallfmt.open(folder)
    # null exactly when k = ⌈density · N⌉ = 0, N the masked parameters of all shards (checked after
    # every shard is read): here k > 0, so a null is refused
    _edit_index(folder, lambda o: o["thresholds"].update(ties=[None, *good[1:]]))
    with pytest.raises(FormatError, match=r"thresholds\.ties\[0\]: None, but k = .* \(null exactly when k = 0\)"):
        tallfmt.open(folder)
    _edit_index(folder, lambda o: o["thresholds"].update(ties=good))
    tallfmt.open(folder).close()


def test_index_json_rules(sharded: Callable[[str, int], Path], tmp_path: Path) -> None:
    folder = _fresh(sharded, tmp_path)
    index = folder / INDEX_NAME
    text = json.dumps({k: v for k, v in json.loads(index.read_bytes()).items() if k != "checksum"}, indent=2)
    index.write_bytes(seal_index(text.replace('"metadata": {}', '"metadata": {}, "metadata": {}')))
    with pytest.raises(FormatError, match="duplicate key 'metadata'"):
        tallfmt.open(folder)
    index.write_bytes(seal_index(text.replace('"metadata": {}', '"metadata": NaN')))
    with pytest.raises(FormatError, match="not valid JSON"):
        tallfmt.open(folder)
    index.write_bytes(seal_index(text.replace('"metadata": {}', '"metadata": ' + "[" * 20 + "]" * 20)))
    with pytest.raises(LimitError, match="nests deeper"):
        tallfmt.open(folder)
    newer = json.loads(text)
    newer["version"] = [1, 7]
    newer["added_in_1_7"] = {"ok": True}  # a newer minor version may add keys
    index.write_bytes(seal_index(json.dumps(newer)))
    with tallfmt.open(folder) as z:
        z.verify()


# ----------------------------------------------------------------------------------------------
# Dask


@pytest.fixture(scope="module")
def client() -> Any:
    import distributed  # in the `test` extra: a missing Dask fails here, it is never skipped
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.mark.parametrize("config", ["ta", "ties"])
def test_dask_encode_is_identical_to_local(config: str, client: Any, zoo: tuple[str, dict[str, str]],
                                           sharded: Callable[[str, int], Path], tmp_path: Path) -> None:
    local = sharded(config, 3)
    report = tallfmt.encode(*zoo, tmp_path / "d", shards=3, scheduler=client, **CONFIGS[config])
    assert report.path == tmp_path / "d"
    files = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == files
    for f in files:
        assert (tmp_path / "d" / f).read_bytes() == (local / f).read_bytes(), f
    with tallfmt.open(local) as a, tallfmt.open(tmp_path / "d") as b:
        for t in a.tasks:
            _same(a.decode(t), b.decode(t), t)
        _same(a.merge("consensus", k=2), b.merge("consensus", k=2), "consensus")


def test_dask_default_shards_and_address(client: Any, zoo: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    tallfmt.encode(*zoo, tmp_path / "d", scheduler=client.scheduler.address)  # an address; one shard a thread
    with tallfmt.open(tmp_path / "d") as z:
        assert len(z.shards) == 2
        z.verify()


def _kill_on_third_segment(marker: str) -> None:
    """Runs in each worker: the first worker to write its third segment creates ``marker`` and dies."""
    from tallfmt.format.container import ContainerWriter

    original = ContainerWriter.write_stored
    count = [0]

    def write_stored(self: Any, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] == 3:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # exactly one kill
            except FileExistsError:
                pass
            else:
                os._exit(1)  # the worker process dies mid-encode, its shard half written
        return original(self, *args, **kwargs)

    ContainerWriter.write_stored = write_stored


def test_killed_worker_is_retried_and_the_result_is_identical(client: Any, zoo: tuple[str, dict[str, str]],
                                                              sharded: Callable[[str, int], Path],
                                                              tmp_path: Path) -> None:
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    marker = tmp_path / "killed"
    client.run(_kill_on_third_segment, str(marker))
    try:
        tallfmt.encode(*zoo, tmp_path / "d", shards=3, scheduler=client, retries=2, **CONFIGS["ties"])
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        client.restart()  # workers without the patch for whatever runs next
    assert marker.exists()  # a worker really died
    local = sharded("ties", 3)
    files = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == files  # no temporary file left behind
    for f in files:
        assert (tmp_path / "d" / f).read_bytes() == (local / f).read_bytes(), f
