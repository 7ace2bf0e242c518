"""Files stored beside the tensors (FORMAT.md §10, format 1.1): which files of a folder are taken, how
they are deduplicated and written back, every reader check, sharded archives (the index holds them),
and that a 1.0 reader still reads a 1.1 archive (it ignores the key, as §7 says)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import _tallcraft as tc
import tallfmt
from tallfmt.errors import ChecksumError, FormatError, InputError, LimitError
from tallfmt.format.container import ContainerReader
from tallfmt.format.files import MAX_FILE_BYTES, Files, name_problem
from tallfmt.write.files import folder_files

ROOT = Path(__file__).resolve().parents[1]
SPIECE = bytes(range(256)) * 3  # a binary file (a sentencepiece model stands in)


def model_folder(path: Path, seed: int, config: dict, extra: dict[str, bytes] | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {"enc.w": torch.randn(8, 8, generator=g), "head.b": torch.zeros(3)}
    g2 = torch.Generator().manual_seed(seed)
    if seed:
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g2) * (torch.rand(v.shape, generator=g2) < 0.5)
              for k, v in sd.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "b": 1}}}' * 50)
    (path / "spiece.model").write_bytes(SPIECE)
    for name, data in (extra or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    model_folder(tmp_path / "base", 0, {"model_type": "bert"})
    model_folder(tmp_path / "sst2", 1, {"model_type": "bert", "num_labels": 2},
                 {"README.md": b"# sst2\n", "1_Pooling/config.json": b"{}", "optimizer.pt": b"not stored",
                  ".hidden.json": b"{}", "checkpoint-500/config.json": b"{}", "model.safetensors.index.json": b"{}"})
    model_folder(tmp_path / "mnli", 2, {"model_type": "bert", "num_labels": 3})
    tallfmt.encode(tmp_path / "base", {"sst2": tmp_path / "sst2", "mnli": tmp_path / "mnli"}, tmp_path / "zoo.tall")
    return tmp_path


def test_folders_files_are_stored_deduplicated_and_written_back(zoo: Path) -> None:
    with tallfmt.open(zoo / "zoo.tall") as z:
        assert z.header.version == (1, 1)
        assert z.file_names() == ["config.json", "spiece.model", "tokenizer.json"]
        assert z.file_names("sst2") == ["1_Pooling/config.json", "README.md", "config.json", "spiece.model",
                                        "tokenizer.json"]
        # tokenizer and spiece once for all three models; three configs; README; the pooling config
        assert len(z.header.files.blobs) == 7
        assert z.files("mnli")["config.json"] == (zoo / "mnli" / "config.json").read_bytes()
        assert z.files("sst2")["spiece.model"] == SPIECE
        written = z.decode_to("sst2", zoo / "out")
        z.merge_to(zoo / "merged")
    assert {p.relative_to(zoo / "out").as_posix() for p in written} == {
        "model.safetensors", "1_Pooling/config.json", "README.md", "config.json", "spiece.model", "tokenizer.json"}
    for name in ("config.json", "README.md", "1_Pooling/config.json", "spiece.model"):
        assert (zoo / "out" / name).read_bytes() == (zoo / "sst2" / name).read_bytes()
    assert (zoo / "merged" / "config.json").read_bytes() == (zoo / "base" / "config.json").read_bytes()
    assert not (zoo / "merged" / "README.md").exists()


def test_a_file_output_and_files_false_store_or_write_no_files(zoo: Path) -> None:
    with tallfmt.open(zoo / "zoo.tall") as z:
        assert [p.name for p in z.decode_to("sst2", zoo / "one.safetensors")] == ["one.safetensors"]
    tallfmt.encode(zoo / "base", {"sst2": zoo / "sst2"}, zoo / "nofiles.tall", files=False)
    with tallfmt.open(zoo / "nofiles.tall") as z:
        assert z.header.version == (1, 1) and z.header.files is None and z.files("sst2") == {}
        assert [p.name for p in z.decode_to("sst2", zoo / "plain")] == ["model.safetensors"]
    # in-memory and file inputs have no files (every archive is 1.1 for its mask rule, FORMAT.md §4.3)
    tallfmt.encode(zoo / "base" / "model.safetensors", {"a": zoo / "sst2" / "model.safetensors"}, zoo / "f.tall")
    with tallfmt.open(zoo / "f.tall") as z:
        assert z.header.version == (1, 1) and z.header.files is None


def test_sharded_archives_keep_files_in_the_index(zoo: Path) -> None:
    tallfmt.encode(zoo / "base", {"sst2": zoo / "sst2", "mnli": zoo / "mnli"}, zoo / "sharded", shards=2)
    index = json.loads((zoo / "sharded" / "tall.index.json").read_text())
    assert index["version"] == [1, 1] and "files" in index
    shards = [s["file"] for s in index["shards"]]
    assert len(shards) == 2
    for shard in shards:
        with ContainerReader(zoo / "sharded" / shard) as r:
            assert r.header.files is None and r.header.version == (1, 1)
    with tallfmt.open(zoo / "sharded") as s, tallfmt.open(zoo / "zoo.tall") as z:
        assert s.header.files == z.header.files
        s.verify()
        s.decode_to("mnli", zoo / "from-shards")
    assert (zoo / "from-shards" / "config.json").read_bytes() == (zoo / "mnli" / "config.json").read_bytes()


def test_which_files_of_a_folder_are_taken(tmp_path: Path) -> None:
    f = tmp_path / "m"
    f.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "README.md", "tokenizer.tiktoken",
                 "model.safetensors", "pytorch_model.bin", "optimizer.pt", "training_args.bin", "rng_state.pth",
                 "model.safetensors.index.json", "pytorch_model.bin.index.json", ".gitattributes", "LICENSE"):
        (f / name).write_bytes(b"x")
    for sub in ("checkpoint-10", ".git", "runs", "tokenizer"):
        (f / sub).mkdir()
        (f / sub / "config.json").write_bytes(b"{}")
    assert sorted(folder_files(f)) == sorted([
        "config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
        "merges.txt", "spiece.model", "chat_template.jinja", "README.md", "tokenizer.tiktoken",
        "tokenizer/config.json"])


def test_hf_cache_symlinks_are_followed_other_special_files_refused(tmp_path: Path) -> None:
    snap = tmp_path / "models--org--name" / "snapshots" / "abc123"
    blobs = tmp_path / "models--org--name" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "1f2e").write_bytes(b'{"model_type": "gpt2"}')
    (snap / "config.json").symlink_to(os.path.relpath(blobs / "1f2e", snap))
    assert folder_files(snap) == {"config.json": b'{"model_type": "gpt2"}'}
    os.mkfifo(snap / "vocab.txt")  # opening must not wait for a writer
    with pytest.raises(InputError, match="vocab.txt: not a regular file"):
        folder_files(snap)


def test_a_file_over_the_limit_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "huge.txt").write_bytes(b"")
    os.truncate(tmp_path / "huge.txt", MAX_FILE_BYTES + 1)
    with pytest.raises(InputError, match=r"huge\.txt: .* over the .* limit.*files=False"):
        folder_files(tmp_path)


def test_names_that_cannot_be_stored() -> None:
    for bad in ("", "/abs", "a//b", "../up", "a/./b", "a\\b", "nul\x00", "model.safetensors",
                "x/model-00001-of-00002.safetensors", "model.safetensors.index.json", "a" * 256):
        assert name_problem(bad) is not None, bad
    for good in ("config.json", "1_Pooling/config.json", "tokénizer.json", "a" * 255):
        assert name_problem(good) is None, good


def test_pack_deduplicates_by_content_and_picks_the_smaller_codec() -> None:
    f = Files.pack({"a.txt": b"same"}, [{"a.txt": b"same", "b.txt": b"same"}, {"big.txt": b"x" * 10_000}])
    assert len(f.blobs) == 2 and f.base == {"a.txt": 0} and f.tasks == ({"a.txt": 0, "b.txt": 0}, {"big.txt": 1})
    assert [b.codec for b in f.blobs] == ["raw", "zstd"]
    assert f.read(1, "x")["big.txt"] == b"x" * 10_000
    assert Files.pack({}, [{}]) is None


# ----------------------------------------------------------------------------------------------
# Reader checks (FORMAT.md §6, §10)


def _files_archive(tmp_path: Path, files: dict | None = None, minor: int = 1) -> Path:
    p = tc.build(tmp_path / "f.tall")
    h = tc.split(p).header_json()
    h["version"] = [1, minor]
    h["files"] = files if files is not None else Files.pack({"config.json": b"{}"}, [{"config.json": b'{"a": 1}'},
                                                                                    {}]).to_json()
    return tc.with_header(p, h, minor=minor)


def test_a_crafted_1_1_header_with_files_reads(tmp_path: Path) -> None:
    with tallfmt.open(_files_archive(tmp_path)) as z:
        assert z.files("a") == {"config.json": b'{"a": 1}'} and z.files() == {"config.json": b"{}"}
        assert z.files("b") == {}
        z.verify()


def test_files_in_a_1_0_header_are_an_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match=r"unknown key\(s\) \['files'\]"):
        ContainerReader(_files_archive(tmp_path, minor=0))


def _blob_case(tmp_path: Path, change) -> Path:
    files = Files.pack({"config.json": b"{}" * 100}, [{}, {}]).to_json()
    change(files)
    return _files_archive(tmp_path, files)


@pytest.mark.parametrize("change, error, needles", [
    (lambda f: f["blobs"][0].update(data="@@@@"), FormatError, ("files.blobs[0].data", "base64")),
    (lambda f: f["blobs"][0].update(codec="byteplane-zstd"), FormatError, ("files.blobs[0].codec",)),
    (lambda f: f["blobs"][0].update(xxh3="XYZ"), FormatError, ("files.blobs[0].xxh3",)),
    (lambda f: f["blobs"][0].update(size=MAX_FILE_BYTES + 1), FormatError, ("files.blobs[0].size",)),
    (lambda f: f["blobs"][0].update(size=10**8 // 2), LimitError, ("files.blobs[0]", "expansion")),
    (lambda f: f["blobs"][0].update(codec="raw"), FormatError, ("files.blobs[0].size", "raw")),
    (lambda f: f["blobs"].append(dict(f["blobs"][0])), FormatError, ("files.blobs", "belong to no model")),
    (lambda f: f["base"].update({"../evil": 0}), FormatError, ("files.base", "../evil")),
    (lambda f: f["base"].update({"model.safetensors": 0}), FormatError, ("files.base", "weight file")),
    (lambda f: f["base"].update({"config.json/x": 0}), FormatError, ("both a file and a folder",)),
    (lambda f: f["base"].update({"config.json": 1}), FormatError, ("files.base.config.json",)),
    (lambda f: f["tasks"].pop(), FormatError, ("files.tasks", "1 entries for 2 tasks")),
    (lambda f: f.update(extra=1), FormatError, ("files", "unknown key")),
])
def test_malformed_files_are_refused_on_open(tmp_path: Path, change, error, needles) -> None:
    path = _blob_case(tmp_path, change)
    with pytest.raises(error) as info:
        ContainerReader(path)
    assert str(path) in str(info.value) and all(n in str(info.value) for n in needles), str(info.value)


def test_damaged_file_bytes_are_a_checksum_error_on_read_and_verify(tmp_path: Path) -> None:
    def damage(f: dict) -> None:  # other bytes of the same size, a valid encoding: only the checksum tells
        f["blobs"][0]["codec"] = "raw"
        f["blobs"][0]["data"] = base64.b64encode(b"[]" * 100).decode()
    path = _blob_case(tmp_path, damage)
    with tallfmt.open(path) as z:
        with pytest.raises(ChecksumError, match=r"files\.blobs\[0\] \('config.json'\): checksum mismatch"):
            z.files()
        with pytest.raises(ChecksumError):
            z.verify()
        with pytest.raises(ChecksumError):
            z.merge_to(tmp_path / "out")  # θ0's files go with a merge
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_a_1_0_reader_reads_a_1_1_archive_ignoring_its_files(zoo: Path, tmp_path: Path) -> None:
    """The reader of format 1.0 (the package as it was before 1.1, from git history) opens, decodes and
    verifies an archive with files: it ignores the key of a newer minor version (§7)."""
    old = tmp_path / "old"
    try:
        tree = subprocess.run(["git", "-C", str(ROOT), "archive", "f6bf168", "tallfmt"], capture_output=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no git history here to take the 1.0 reader from")
    old.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old)], input=tree, check=True)
    code = ("import tallfmt, sys\n"
            "from tallfmt.format.header import MINOR\n"
            "assert MINOR == 0\n"
            "z = tallfmt.open(sys.argv[1]); z.verify(); sd = z.decode('sst2')\n"
            "print(z.header.version, len(sd))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(zoo / "zoo.tall")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(old)}, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(1,", "1)", "2"]
    shutil.rmtree(old)
