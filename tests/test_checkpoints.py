"""Tests of tallfmt.checkpoints: readers (safetensors, sharded folders, torch files, dicts) and writers."""

from __future__ import annotations

import doctest
import gc
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tallfmt.checkpoints.readers as ckpts
import tallfmt.checkpoints.writers as ckpt_writers
from tallfmt.checkpoints import SafetensorsWriter, open_checkpoint, save_safetensors, save_state_dict
from tallfmt.checkpoints.readers import MAX_HEADER_BYTES
from tallfmt.compute.tensors import from_torch, to_numpy, to_torch
from tallfmt.format.dtypes import DTYPES
from tallfmt.errors import InputError

SHAPES = [(), (0,), (2, 0, 3), (1,), (3, 5), (2, 3, 4)]
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def rand_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs included for floats); bools are 0/1."""
    d = DTYPES[name]
    raw = np.random.default_rng(seed).integers(0, 256, math.prod(shape) * d.itemsize, dtype=np.uint8)
    if name == "BOOL":
        raw &= 1
    return to_torch(raw.view(d.storage).reshape(shape), d)


def bits(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    return t.dtype, tuple(t.shape), to_numpy(t).tobytes()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert bits(a[k]) == bits(b[k]), k


def read_all(source: object) -> dict[str, torch.Tensor]:
    with open_checkpoint(source) as ck:
        return {n: ck.get(n).clone() for n in ck.names()}


def sample_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return {f"{name}.{i}": rand_tensor(name, shape, seed + i)
            for name in DTYPES for i, shape in enumerate(SHAPES)}


# ---------------------------------------------------------------------------------------------------
# Round trips and agreement with the safetensors library
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_writer_reader_round_trip_every_dtype(tmp_path: Path, dt: str, shape: tuple[int, ...]) -> None:
    t = rand_tensor(dt, shape, seed=len(shape))
    path = tmp_path / "m.safetensors"
    with SafetensorsWriter(path, [("x", dt, shape), ("y", dt, shape)]) as w:
        w.write("x", t)
        w.write("y", t)
    with open_checkpoint(path) as ck:
        assert ck.names() == ["x", "y"]
        assert ck.info("x") == (dt, shape)
        assert bits(ck.get("x")) == bits(t) == bits(ck.get("y"))
        assert ck.storage_key("x") is None
    assert bits(load_file(path)["x"]) == bits(t)


def test_official_files_read_by_ours(tmp_path: Path) -> None:
    sd = sample_dict(1)
    path = tmp_path / "official.safetensors"
    save_file(sd, path, metadata={"format": "pt", "note": "ü"})
    with open_checkpoint(path) as ck:
        assert ck.metadata == {"format": "pt", "note": "ü"}
        assert sorted(ck.names()) == sorted(sd)
        for n in sd:
            assert bits(ck.get(n)) == bits(sd[n]), n


def test_ours_read_by_official(tmp_path: Path) -> None:
    sd = sample_dict(2)
    path = tmp_path / "ours.safetensors"
    save_safetensors(sd, path, metadata={"k": "v"})
    theirs = load_file(path)
    assert sorted(theirs) == sorted(sd)
    for n in sd:
        assert bits(theirs[n]) == bits(sd[n]), n


def test_header_bytes_match_official_writer(tmp_path: Path) -> None:
    """Same tensors in the same order: our file is byte-identical to safetensors' own."""
    sd = {"b.weight": rand_tensor("F32", (3, 5)), "a": rand_tensor("BF16", (7,)), "z": rand_tensor("U8", (3,)),
          "e": rand_tensor("I64", (0, 2)), "s": rand_tensor("F16", ())}
    theirs = tmp_path / "theirs.safetensors"
    save_file(sd, theirs, metadata={"format": "pt"})
    with open_checkpoint(theirs) as ck:
        order = ck.names()
    ours = tmp_path / "ours.safetensors"
    save_safetensors({n: sd[n] for n in order}, ours, metadata={"format": "pt"})
    data = ours.read_bytes()
    assert data == theirs.read_bytes()
    assert struct.unpack("<Q", data[:8])[0] % 8 == 0


def test_output_is_deterministic(tmp_path: Path) -> None:
    sd = sample_dict(3)
    save_safetensors(sd, tmp_path / "a.safetensors", metadata={"x": "1"})
    save_safetensors(sd, tmp_path / "b.safetensors", metadata={"x": "1"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    save_state_dict(sd, tmp_path / "f1", max_shard_size=200)
    save_state_dict(sd, tmp_path / "f2", max_shard_size=200)
    files = sorted(p.name for p in (tmp_path / "f1").iterdir())
    assert len(files) > 2 and files == sorted(p.name for p in (tmp_path / "f2").iterdir())
    for f in files:
        assert (tmp_path / "f1" / f).read_bytes() == (tmp_path / "f2" / f).read_bytes()


_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12).filter(
    lambda s: s != "__metadata__")
_state_dicts = st.dictionaries(
    _names,
    st.tuples(st.sampled_from(list(DTYPES)), st.lists(st.integers(0, 4), max_size=3).map(tuple),
              st.integers(0, 2**16)),
    max_size=8,
).map(lambda d: {k: rand_tensor(dt, shape, seed) for k, (dt, shape, seed) in d.items()})


@SETTINGS
@given(sd=_state_dicts, shard=st.integers(1, 300))
def test_random_state_dicts_round_trip(tmp_path_factory: pytest.TempPathFactory, sd: dict[str, torch.Tensor],
                                       shard: int) -> None:
    tmp = tmp_path_factory.mktemp("h")
    f = tmp / "m.safetensors"
    save_safetensors(sd, f)
    assert_same(read_all(f), sd)
    theirs = load_file(f)
    assert sorted(theirs) == sorted(sd) and all(bits(theirs[k]) == bits(sd[k]) for k in sd)
    official = tmp / "o.safetensors"
    save_file(sd, official)
    back = read_all(official)
    assert sorted(back) == sorted(sd) and all(bits(back[k]) == bits(sd[k]) for k in sd)
    written = save_state_dict(iter(sd.items()), tmp / "dir", entries=[(k, from_torch(t.dtype).name,
                                                                         tuple(t.shape)) for k, t in sd.items()],
                              max_shard_size=shard)
    assert all(p.exists() for p in written)
    assert_same(read_all(tmp / "dir"), sd)


# ---------------------------------------------------------------------------------------------------
# Sharded folders
# ---------------------------------------------------------------------------------------------------
def test_sharded_folder_round_trip(tmp_path: Path) -> None:
    sd = {"emb": rand_tensor("F32", (10, 4)), "big": rand_tensor("BF16", (100,)), "s": rand_tensor("I8", ()),
          "bias": rand_tensor("F16", (3,)), "empty": rand_tensor("F32", (0, 5))}
    written = save_state_dict(sd, tmp_path / "out", max_shard_size=120, metadata={"who": "me"})
    names = [p.name for p in written]
    assert names[-1] == "model.safetensors.index.json"
    assert names[:-1] == [f"model-{i:05d}-of-{len(names) - 1:05d}.safetensors" for i in range(1, len(names))]
    index = json.loads(written[-1].read_text())
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in sd.values())}
    assert list(index["weight_map"]) == list(sd)
    # a 200-byte tensor over the 120-byte limit gets a shard of its own
    assert sum(1 for v in index["weight_map"].values() if v == index["weight_map"]["big"]) == 1
    assert all(load_file(p).keys() <= sd.keys() for p in written[:-1])
    assert open_checkpoint(written[0]).metadata == {"format": "pt", "who": "me"}
    with open_checkpoint(tmp_path / "out") as ck:
        assert ck.source.endswith("model.safetensors.index.json")
        assert ck.names() == list(sd)
        assert ck.info("big") == ("BF16", (100,))
        for n in sd:
            assert bits(ck.get(n)) == bits(sd[n])


def test_small_folder_is_one_file(tmp_path: Path) -> None:
    sd = {"a": torch.ones(3)}
    assert save_state_dict(sd, tmp_path / "out") == [tmp_path / "out" / "model.safetensors"]
    assert open_checkpoint(tmp_path / "out").metadata == {"format": "pt"}
    assert_same(read_all(tmp_path / "out"), sd)


def test_resave_removes_the_other_layout(tmp_path: Path) -> None:
    big = {"a": torch.zeros(10), "b": torch.ones(10), "c": torch.full((10,), 2.0)}
    out = tmp_path / "out"
    save_state_dict(big, out)
    save_state_dict(big, out, max_shard_size=40)
    assert not (out / "model.safetensors").exists()
    assert_same(read_all(out), big)
    save_state_dict(big, out, max_shard_size=80)  # 2 shards now: the 3-shard files must go
    assert sorted(p.name for p in out.iterdir()) == ["model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors",
                                                     "model.safetensors.index.json"]
    small = {"x": torch.ones(1)}
    save_state_dict(small, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert_same(read_all(out), small)


def test_save_state_dict_streams(tmp_path: Path) -> None:
    """With entries, tensors are consumed one at a time and each shard is on disk (in the folder being
    built beside the target) before the next starts; the target appears only when all are written."""
    out = tmp_path / "out"
    entries = [(f"t{i}", "F32", (4,)) for i in range(4)]

    def gen():
        for i in range(4):
            if i == 2:
                (building,) = tmp_path.glob(".out.*.tmp")
                assert (building / "model-00001-of-00002.safetensors").exists()
                assert not (building / "model-00002-of-00002.safetensors").exists()
                assert not out.exists()
            yield f"t{i}", torch.full((4,), float(i))

    save_state_dict(gen(), out, entries=entries, max_shard_size=32)
    assert [float(t[0]) for t in read_all(out).values()] == [0.0, 1.0, 2.0, 3.0]


def test_save_state_dict_single_file_and_iterable_without_entries(tmp_path: Path) -> None:
    sd = sample_dict(4)
    assert save_state_dict(list(sd.items()), tmp_path / "x.safetensors") == [tmp_path / "x.safetensors"]
    assert_same(read_all(tmp_path / "x.safetensors"), sd)


@pytest.mark.parametrize("count", [1, 3])
def test_save_state_dict_wrong_number_of_tensors(tmp_path: Path, count: int) -> None:
    entries = [("a", "F32", (1,)), ("b", "F32", (1,))]
    items = [(n, torch.zeros(1)) for n in "abc"[:count]]
    with pytest.raises(InputError, match="ran out|more tensors"):
        save_state_dict(iter(items), tmp_path / "x.safetensors", entries=entries)
    assert list(tmp_path.iterdir()) == []


SHARDED = {"a": torch.zeros(4), "b": torch.ones(4), "c": torch.full((4,), 2.0)}


def _sharded(tmp_path: Path, name: str = "sh") -> Path:
    """Two shards: a and b in the first, c in the second."""
    out = tmp_path / name
    save_state_dict(SHARDED, out, max_shard_size=32)
    assert len(list(out.iterdir())) == 3
    return out


def _edit_index(folder: Path, fn) -> None:
    p = folder / "model.safetensors.index.json"
    obj = json.loads(p.read_text())
    fn(obj)
    p.write_text(json.dumps(obj))


def test_index_missing_shard(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match=r"index\.json.*'model-00002-of-00002\.safetensors' does not exist"):
        open_checkpoint(out)


def test_index_name_not_in_shard(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    _edit_index(out, lambda o: o["weight_map"].update(c="model-00001-of-00002.safetensors"))
    with pytest.raises(InputError, match=r"index\.json.*puts 1 tensor\(s\) in 'model-00001-of-00002.*'c'"):
        open_checkpoint(out)


def test_index_extra_name_in_shard(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    _edit_index(out, lambda o: o["weight_map"].pop("b"))
    with pytest.raises(InputError, match=r"holds 1 tensor\(s\) the weight_map does not give it: 'b'"):
        open_checkpoint(out)


@pytest.mark.parametrize("bad", ["../sh2/model-00001-of-00002.safetensors", "/etc/passwd", "sub/../../x",
                                 "C:\\x.safetensors", ""])
def test_index_path_escaping_folder(tmp_path: Path, bad: str) -> None:
    out = _sharded(tmp_path)
    _sharded(tmp_path, "sh2")
    _edit_index(out, lambda o: o["weight_map"].update(a=bad))
    with pytest.raises(InputError, match=r"index\.json.*weight_map\['a'\]"):
        open_checkpoint(out)


def test_index_bad_json_and_shape(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    idx = out / "model.safetensors.index.json"
    idx.write_text('{"weight_map": {"a": "x"}, "weight_map": {}}')
    with pytest.raises(InputError, match="duplicate key 'weight_map'"):
        open_checkpoint(out)
    idx.write_text('{"metadata": {}}')
    with pytest.raises(InputError, match="no weight_map"):
        open_checkpoint(out)


def test_index_symlinked_shards_are_fine(tmp_path: Path) -> None:
    """Hugging Face cache snapshots link each shard to a blob outside the folder."""
    out = _sharded(tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for p in out.glob("model-*.safetensors"):
        p.rename(blobs / p.name)
        p.symlink_to(blobs / p.name)
    assert_same(read_all(out), SHARDED)


# ---------------------------------------------------------------------------------------------------
# Folder resolution and source errors
# ---------------------------------------------------------------------------------------------------
def test_folder_with_one_safetensors_file(tmp_path: Path) -> None:
    save_safetensors({"a": torch.ones(2)}, tmp_path / "weights.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with open_checkpoint(tmp_path) as ck:
        assert ck.source == str(tmp_path / "weights.safetensors")
    save_safetensors({"b": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="holds 2 .safetensors files"):
        open_checkpoint(tmp_path)
    save_safetensors({"m": torch.ones(2)}, tmp_path / "model.safetensors")
    assert read_all(tmp_path).keys() == {"m"}


def test_folder_with_pytorch_model_bin(tmp_path: Path) -> None:
    torch.save({"a": torch.arange(3)}, tmp_path / "pytorch_model.bin")
    assert_same(read_all(tmp_path), {"a": torch.arange(3)})


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "nope.safetensors", "nope.safetensors: no such file or folder; expected"),
    (lambda p: (p / "w.npz").write_bytes(b"x") and p / "w.npz", r"w\.npz: unknown kind of file '\.npz'; expected"),
    (lambda p: p, "no weights found; expected model.safetensors"),
])
def test_bad_sources(tmp_path: Path, make, match: str) -> None:
    with pytest.raises(InputError, match=match):
        open_checkpoint(make(tmp_path))


def test_not_a_source() -> None:
    with pytest.raises(InputError, match="path or a"):
        open_checkpoint(42)  # type: ignore[arg-type]


def test_dict_sources() -> None:
    w = torch.arange(12.0).reshape(3, 4)
    ck = open_checkpoint({"w": w, "tied": w, "copy": w.clone(), "t": w.t(), "e1": torch.zeros(0),
                          "e2": torch.zeros(0)}, label="sst2")
    assert ck.source == "<dict 'sst2'>" and ck.label == "sst2"
    assert ck.get("t") is not None and not ck.get("t").is_contiguous()  # returned as given
    assert ck.info("t") == ("F32", (4, 3))
    assert ck.storage_key("w") == ck.storage_key("tied")
    assert ck.storage_key("w") != ck.storage_key("copy")
    assert ck.storage_key("w") != ck.storage_key("t")  # same data_ptr, other shape
    sq = torch.arange(9.0).reshape(3, 3)
    sq_ck = open_checkpoint({"sq": sq, "sq_t": sq.t()})
    assert sq_ck.storage_key("sq") != sq_ck.storage_key("sq_t")  # same data_ptr and shape, other strides
    assert ck.storage_key("e1") is None
    assert "w" in ck and "nope" not in ck
    with pytest.raises(KeyError, match="nope"):
        ck.get("nope")


@pytest.mark.parametrize("sd, match", [
    ({"a": torch.zeros(1), "b": [1.0]}, r"<dict 'x'>: 'b' is a list, not a torch.Tensor"),
    ({"m": torch.empty(3, device="meta")}, "'m' is on the meta device"),
    ({"c": torch.zeros(2, dtype=torch.complex64)}, "'c' has dtype torch.complex64"),
    ({1: torch.zeros(1)}, "key 1 is a int"),
    ({"s": torch.zeros(3).to_sparse()}, "'s' has layout"),
])
def test_dict_source_errors(sd: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        open_checkpoint(sd, label="x")


# ---------------------------------------------------------------------------------------------------
# torch files
# ---------------------------------------------------------------------------------------------------
class Pickled:
    """A custom class: a file holding one needs full unpickling, which we refuse."""

    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_torch_file_loads(tmp_path: Path, suffix: str) -> None:
    sd = {n: rand_tensor(n, (2, 3)) for n in DTYPES}
    path = tmp_path / f"m{suffix}"
    torch.save(sd, path)
    with open_checkpoint(path) as ck:
        assert ck.source == str(path)
        assert ck.names() == list(sd)
        assert ck.info("BF16") == ("BF16", (2, 3))
        for n in sd:
            assert bits(ck.get(n)) == bits(sd[n])


def test_torch_file_legacy_format_and_state_dict_key(tmp_path: Path) -> None:
    legacy = tmp_path / "old.bin"
    torch.save({"a": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert_same(read_all(legacy), {"a": torch.ones(2)})
    wrapped = tmp_path / "lightning.pt"
    torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(2)}}, wrapped)
    assert_same(read_all(wrapped), {"w": torch.zeros(2)})


def test_torch_file_with_custom_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": Pickled()}, path)
    with pytest.raises(InputError, match=r"evil\.pt: refuses to unpickle untrusted code.*Pickled"):
        open_checkpoint(path)


@pytest.mark.parametrize("obj, match", [
    ([torch.zeros(1)], "holds a list, not a flat"),
    ({"w": torch.zeros(1), "step": 3}, "'step' is a int, not a torch.Tensor"),
    ({"nested": {"w": torch.zeros(1)}}, "'nested' is a dict"),
])
def test_torch_file_not_a_state_dict(tmp_path: Path, obj: object, match: str) -> None:
    path = tmp_path / "m.pt"
    torch.save(obj, path)
    with pytest.raises(InputError, match=rf"m\.pt: .*{match}"):
        open_checkpoint(path)


def test_torch_file_damaged(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match=r"m\.bin: cannot load as a torch file"):
        open_checkpoint(path)


def test_torch_file_tied_weights_share_storage_key(tmp_path: Path) -> None:
    emb = torch.randn(5, 3)
    path = tmp_path / "tied.pt"
    torch.save({"embed.weight": emb, "lm_head.weight": emb, "other": emb.clone()}, path)
    with open_checkpoint(path) as ck:
        k = [ck.storage_key(n) for n in ck.names()]
        assert k[0] is not None and k[0] == k[1] != k[2]
    # written out as two copies, which safetensors itself loads
    out = tmp_path / "tied.safetensors"
    save_safetensors(read_all(path), out)
    loaded = load_file(out)
    assert torch.equal(loaded["embed.weight"], emb) and torch.equal(loaded["lm_head.weight"], emb)


def test_tied_dict_written_as_copies(tmp_path: Path) -> None:
    w = torch.randn(4)
    with pytest.raises(RuntimeError):
        save_file({"a": w, "b": w}, tmp_path / "theirs.safetensors")  # the library refuses shared tensors
    save_safetensors({"a": w, "b": w}, tmp_path / "ours.safetensors")
    got = load_file(tmp_path / "ours.safetensors")
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w)


# ---------------------------------------------------------------------------------------------------
# Crafted bad safetensors files: one rule each
# ---------------------------------------------------------------------------------------------------
def craft(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if not isinstance(header, bytes):
        raw += b" " * (-len(raw) % 8)  # as safetensors pads: the data starts aligned
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def t_(dtype: str, shape: list, offs: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offs}


GOOD = {"a": t_("F32", [2], [0, 8]), "b": t_("U8", [3], [8, 11])}

BAD_FILES = {
    "too short": (lambda p: p.write_bytes(b"\x01\x00") and p, "too short for the 8-byte header length"),
    "header too long": (lambda p: craft(p, b"{}", length=MAX_HEADER_BYTES + 1), "over the 100000000-byte limit"),
    "header past file": (lambda p: craft(p, b"{}", length=50), "header length 50 runs past the end"),
    "not utf8": (lambda p: craft(p, b'{"\xff": 1}'), "not valid UTF-8"),
    "leading space": (lambda p: craft(p, b' {}'), "starting with"),
    "bad json": (lambda p: craft(p, b'{"a": '), "not valid JSON"),
    "nan": (lambda p: craft(p, b'{"a": NaN}'), "not valid JSON"),
    "duplicate key": (lambda p: craft(p, b'{"a":' + json.dumps(GOOD["a"]).encode() + b',"a":'
                                      + json.dumps(GOOD["a"]).encode() + b"}", bytes(8)), "duplicate key 'a'"),
    "metadata value": (lambda p: craft(p, {"__metadata__": {"k": 1}}), r"__metadata__\['k'\] is a int"),
    "metadata type": (lambda p: craft(p, {"__metadata__": ["x"]}), "__metadata__ must be an object"),
    "bad dtype": (lambda p: craft(p, {"a": t_("F33", [2], [0, 8])}, bytes(8)), "tensor 'a': unknown dtype 'F33'"),
    "extra field": (lambda p: craft(p, {"a": {**t_("F32", [2], [0, 8]), "x": 1}}, bytes(8)),
                    "tensor 'a': expected an object with exactly"),
    "negative dim": (lambda p: craft(p, {"a": t_("F32", [-2], [0, 8])}, bytes(8)), "tensor 'a': shape"),
    "float dim": (lambda p: craft(p, {"a": t_("F32", [2.0], [0, 8])}, bytes(8)), "tensor 'a': shape"),
    "bad offsets": (lambda p: craft(p, {"a": t_("F32", [0], [8, 0])}, bytes(8)), "tensor 'a': data_offsets"),
    "shape mismatch": (lambda p: craft(p, {"a": t_("F32", [3], [0, 8])}, bytes(8)),
                       r"tensor 'a': shape \[3\] of F32 needs 12 bytes, but data_offsets \[0, 8\] span 8"),
    "shape overflow": (lambda p: craft(p, {"a": t_("F32", [2**62, 2**62, 2**62, 4], [0, 8])}, bytes(8)),
                       "needs more than 2\\*\\*64 bytes"),
    "overlap": (lambda p: craft(p, {"a": t_("F32", [2], [0, 8]), "b": t_("U8", [4], [4, 8])}, bytes(8)),
                "tensor 'b': data_offsets .* overlap"),
    "hole": (lambda p: craft(p, {"a": t_("F32", [1], [0, 4]), "b": t_("U8", [4], [8, 12])}, bytes(12)),
             r"tensor 'b': hole in the data buffer: bytes \[4, 8\)"),
    "hole at start": (lambda p: craft(p, {"a": t_("F32", [1], [4, 8])}, bytes(8)), "tensor 'a': hole"),
    "trailing bytes": (lambda p: craft(p, GOOD, bytes(12)), "data buffer is 12 bytes but the tensors end at 11"),
    "truncated": (lambda p: craft(p, GOOD, bytes(10)), "tensor 'b': data_offsets end 11 is past"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_safetensors_file(tmp_path: Path, case: str) -> None:
    make, match = BAD_FILES[case]
    path = make(tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match=match) as exc:
        open_checkpoint(path)
    assert str(exc.value).startswith(str(path) + ": ")


def test_crafted_good_file_is_accepted(tmp_path: Path) -> None:
    """The crafting helper itself produces valid files: the failures above are the rules, not the helper."""
    path = craft(tmp_path / "ok.safetensors", {**GOOD, "z": t_("I64", [0, 3], [11, 11])},
                 struct.pack("<2f", 1.5, 2.5) + b"\x01\x02\x03")
    with open_checkpoint(path) as ck:
        assert ck.names() == ["a", "b", "z"]
        assert ck.get("a").tolist() == [1.5, 2.5] and ck.get("b").tolist() == [1, 2, 3]
    assert load_file(path)["a"].tolist() == [1.5, 2.5]


def test_we_reject_what_safetensors_accepts(tmp_path: Path) -> None:
    dup = BAD_FILES["duplicate key"][0](tmp_path / "dup.safetensors")
    load_file(dup)  # the library takes the last duplicate
    with pytest.raises(InputError, match="duplicate"):
        open_checkpoint(dup)


# ---------------------------------------------------------------------------------------------------
# Zero copy and mmap lifetime
# ---------------------------------------------------------------------------------------------------
def test_get_is_a_view_of_the_mmap(tmp_path: Path) -> None:
    path = craft(tmp_path / "m.safetensors", {"a": t_("F32", [2], [0, 8]), "b": t_("F32", [4], [8, 24])},
                 bytes(24))
    with open_checkpoint(path) as ck:
        a, b, b2 = ck.get("a"), ck.get("b"), ck.get("b")
        # a copy could not sit at the same address twice, nor exactly 8 bytes after its neighbour
        assert b.data_ptr() == b2.data_ptr() == a.data_ptr() + 8
        b[0] = 7.0  # private copy-on-write page: visible through the mapping, never written to the file
        assert float(ck.get("b")[0]) == 7.0
    assert open_checkpoint(path).get("b").tolist() == [0.0] * 4


def test_unaligned_tensor_is_copied_and_correct(tmp_path: Path) -> None:
    header = json.dumps({"u": t_("U8", [1], [0, 1]), "f": t_("F32", [2], [1, 9])}).encode()
    header += b" " * (-len(header) % 8)
    path = craft(tmp_path / "m.safetensors", header, b"\x05" + struct.pack("<2f", 1.0, -2.0))
    with open_checkpoint(path) as ck:
        f = ck.get("f")
        assert f.data_ptr() % 4 == 0 and f.tolist() == [1.0, -2.0]


def test_tensors_outlive_close(tmp_path: Path) -> None:
    sd = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10)}
    save_safetensors(sd, tmp_path / "m.safetensors")
    ck = open_checkpoint(tmp_path / "m.safetensors")
    a = ck.get("a")
    ck.close()
    del ck
    gc.collect()
    assert torch.equal(a, sd["a"])  # the mapping stays alive while a view exists
    ck = open_checkpoint(tmp_path / "m.safetensors")
    ck.close()
    with pytest.raises(InputError, match="closed"):
        ck.get("a")


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_close_unmaps_once_views_are_gone(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_safetensors({"a": torch.ones(4)}, path)
    ck = open_checkpoint(path)
    assert _mapped(path)
    ck.close()
    assert not _mapped(path)  # no views: unmapped at once
    ck = open_checkpoint(path)
    a = ck.get("a")
    ck.close()
    assert _mapped(path) and a.tolist() == [1.0] * 4
    del a
    gc.collect()
    assert not _mapped(path)  # the last view took the mapping with it


def test_sharded_and_folder_gets_are_views(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    with open_checkpoint(out) as ck:
        assert ck.get("a").data_ptr() == ck.get("a").data_ptr()


# ---------------------------------------------------------------------------------------------------
# Writer contract
# ---------------------------------------------------------------------------------------------------
def test_exception_mid_write_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, [("a", "F32", (2,)), ("b", "F32", (2,))]) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_exception_mid_write_keeps_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_safetensors({"old": torch.zeros(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path, [("a", "F32", (2,))]) as w:
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert w.closed


def test_sharded_failure_keeps_nothing_half_written(tmp_path: Path) -> None:
    def gen():
        yield "a", torch.zeros(4)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        save_state_dict(gen(), tmp_path / "out", entries=[("a", "F32", (4,)), ("b", "F32", (4,))],
                        max_shard_size=8)
    # the first shard finished, but only in the folder built beside the target: the whole folder is gone
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, tensor, match", [
    ("b", torch.zeros(2), "expected tensor 'a'"),
    ("a", torch.zeros(3), r"must be torch.float32 \(2,\), got torch.float32 \(3,\)"),
    ("a", torch.zeros(2, dtype=torch.float16), "got torch.float16"),
    ("a", [0.0, 0.0], "got list"),
    ("a", torch.empty(2, device="meta"), "meta device"),
])
def test_write_checks_order_dtype_shape(tmp_path: Path, name: str, tensor: object, match: str) -> None:
    path = tmp_path / "m.safetensors"
    w = SafetensorsWriter(path, [("a", "F32", (2,))])
    with pytest.raises(InputError, match=match):
        w.write(name, tensor)  # type: ignore[arg-type]
    assert w.closed and list(tmp_path.iterdir()) == []  # any error aborts


def test_close_checks_all_written(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "m.safetensors", [("a", "F32", (2,)), ("b", "I8", ())])
    w.write("a", torch.zeros(2))
    with pytest.raises(InputError, match=r"only 1 of 2 tensors.*'b'"):
        w.close()
    assert list(tmp_path.iterdir()) == []
    w = SafetensorsWriter(tmp_path / "n.safetensors", [("a", "F32", (2,))])
    w.write("a", torch.zeros(2))
    with pytest.raises(InputError, match="after all 1 entries"):
        w.write("a", torch.zeros(2))


def test_writer_accepts_noncontiguous_and_grad_tensors(tmp_path: Path) -> None:
    w = torch.arange(6.0).reshape(2, 3).t()
    p = torch.nn.Parameter(torch.ones(2))
    save_safetensors({"t": w, "p": p}, tmp_path / "m.safetensors")
    got = load_file(tmp_path / "m.safetensors")
    assert torch.equal(got["t"], w) and torch.equal(got["p"], p.detach())


@pytest.mark.parametrize("entries, metadata, match", [
    ([("a", "F32", (1,)), ("a", "F32", (1,))], None, "repeats"),
    ([("__metadata__", "F32", (1,))], None, "reserved"),
    ([("a", "C64", (1,))], None, "unknown dtype 'C64'"),
    ([("a", "F32", (-1,))], None, "shape"),
    ([("a", "F32")], None, "not \\(name, dtype, shape\\)"),
    ([], {"k": 1}, "metadata must map strings to strings"),
])
def test_writer_rejects_bad_entries(tmp_path: Path, entries: list, metadata: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        SafetensorsWriter(tmp_path / "m.safetensors", entries, metadata)
    assert list(tmp_path.iterdir()) == []


def test_writer_path_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        SafetensorsWriter(tmp_path, [])
    with pytest.raises(InputError, match="does not exist"):
        SafetensorsWriter(tmp_path / "no" / "m.safetensors", [])
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        save_state_dict({}, tmp_path / "file")
    with pytest.raises(InputError, match="max_shard_size"):
        save_state_dict({}, tmp_path / "d", max_shard_size=0)


def test_writer_refuses_header_over_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_writers, "MAX_HEADER_BYTES", 64)  # a real 100 MB header takes ~1M entries
    with pytest.raises(InputError, match="header would be 112 bytes, over safetensors' 64-byte limit"):
        SafetensorsWriter(tmp_path / "m.safetensors", [("a", "F32", (1,)), ("b", "F32", (1,))])
    assert list(tmp_path.iterdir()) == []


def test_empty_checkpoint(tmp_path: Path) -> None:
    save_safetensors({}, tmp_path / "e.safetensors")
    assert load_file(tmp_path / "e.safetensors") == {}
    assert open_checkpoint(tmp_path / "e.safetensors").names() == []


def test_unicode_names(tmp_path: Path) -> None:
    sd = {"ß.权重": torch.ones(1), "": torch.zeros(1)}
    save_safetensors(sd, tmp_path / "u.safetensors")
    assert_same(read_all(tmp_path / "u.safetensors"), sd)
    assert load_file(tmp_path / "u.safetensors").keys() == sd.keys()


def test_docstring_examples() -> None:
    cwd = os.getcwd()
    results = [doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE) for m in (ckpts, ckpt_writers)]
    assert os.getcwd() == cwd
    assert sum(r.attempted for r in results) >= 15 and not any(r.failed for r in results)
