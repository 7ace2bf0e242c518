"""The command line's rough edges, each a one-line error or a fix (issue 13): devices, plot paths,
progress totals, --quiet after the verb, Ctrl-C, output names, overwrite rules shared with the API,
warnings as one line, merge options, task names from Hugging Face caches and Trainer folders."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import tallfmt
from tallfmt import cli
from tallfmt.errors import InputError
from test_cli import TASKS, make_checkpoints, run


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("edges")
    make_checkpoints(folder)
    run("encode", "base.safetensors", *(f"{t}.safetensors" for t in TASKS), "-o", "zoo.tall", cwd=folder)
    return folder


def one_error_line(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    return line


def test_devices_this_torch_cannot_use_are_one_line(zoo: Path, tmp_path: Path) -> None:
    args = ("encode", str(zoo / "base.safetensors"), str(zoo / "sst2.safetensors"), "-o", "x.tall")
    line = one_error_line(run(*args, "--device", "foo", cwd=tmp_path, ok=False))
    assert line.startswith("tallfmt: error: device 'foo' is not a torch device")
    if not torch.cuda.is_available():
        line = one_error_line(run(*args, "--device", "cuda:0", cwd=tmp_path, ok=False))
        assert line.startswith("tallfmt: error: device 'cuda:0' is not usable by this torch")
    line = one_error_line(run(*args, "--device", "meta", cwd=tmp_path, ok=False))
    assert "meta device holds no data" in line
    assert not (tmp_path / "x.tall").exists()
    with tallfmt.open(zoo / "zoo.tall") as z, pytest.raises(InputError, match="'foo' is not a torch device"):
        z.merge(device="foo")


def test_plot_paths(zoo: Path, tmp_path: Path) -> None:
    line = one_error_line(run("stats", str(zoo / "zoo.tall"), "--plot", "x.xyz", cwd=tmp_path, ok=False))
    assert "x.xyz: cannot draw a '.xyz' image" in line and ".png" in line and ".svg" in line
    line = one_error_line(run("stats", str(zoo / "zoo.tall"), "--plot", "/missing/dir/a.png", cwd=tmp_path, ok=False))
    assert line == "tallfmt: error: /missing/dir/a.png: folder /missing/dir does not exist"
    run("stats", str(zoo / "zoo.tall"), "--plot", "agreement", cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agreement"]  # exactly the given name, a PNG
    assert (tmp_path / "agreement").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (tmp_path / "agreement").read_bytes()
    line = one_error_line(run("stats", str(zoo / "zoo.tall"), "--plot", "agreement", cwd=tmp_path, ok=False))
    assert "agreement: already exists (pass --force to replace it)" in line
    assert (tmp_path / "agreement").read_bytes() == before
    run("stats", str(zoo / "zoo.tall"), "--plot", "agreement.svg", cwd=tmp_path)
    assert b"<svg" in (tmp_path / "agreement.svg").read_bytes()[:1000]
    run("stats", str(zoo / "zoo.tall"), "--plot", "agreement", "--force", cwd=tmp_path)


def test_verify_bar_counts_each_stored_byte_once_and_matches_the_summary(zoo: Path, monkeypatch) -> None:
    seen: dict[str, list[int]] = {}

    from contextlib import contextmanager

    @contextmanager
    def fake_progress(total, desc):
        seen[desc] = [total, 0]

        def update(n, total=None):
            seen[desc][1] += n
        yield update

    monkeypatch.setattr(cli, "progress", fake_progress)
    result = CliRunner().invoke(cli.cli, ["verify", str(zoo / "zoo.tall")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    total, counted = seen["verify"]
    with tallfmt.open(zoo / "zoo.tall") as z:
        stored = sum(s.length for e in z.header.tensors for s in e.segments())
    assert total == counted == stored
    from tallfmt.summary import human_bytes

    assert f"({human_bytes(stored)})" in result.output and "3 tasks' masks" in result.output


def test_quiet_and_debug_work_after_the_verb(zoo: Path, tmp_path: Path) -> None:
    proc = run("decode", str(zoo / "zoo.tall"), "sst2", "-o", "sst2", "--quiet", cwd=tmp_path)
    assert proc.stdout == "" and proc.stderr == ""
    proc = run("info", "missing.tall", "--debug", cwd=tmp_path, ok=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    proc = run("merge", str(zoo / "zoo.tall"), "-o", "m.safetensors", "-q", cwd=tmp_path)
    assert proc.stdout == "" and proc.stderr == ""


def test_ctrl_c_exits_130_and_leaves_no_folder(zoo: Path, tmp_path: Path) -> None:
    code = ("import tallfmt.read.archive as a, tallfmt.cli as c\n"
            "inner = a.Archive.iter_decode\n"
            "def interrupted(self, *args, **kw):\n"
            "    it = inner(self, *args, **kw)\n"
            "    yield next(it)\n"
            "    raise KeyboardInterrupt\n"
            "a.Archive.iter_decode = interrupted\n"
            f"c.main(['decode', {str(zoo / 'zoo.tall')!r}, 'sst2', '-o', 'out', '--max-shard-size', '10KB'])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "tallfmt: interrupted"
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary file


def test_model_outputs_named_like_other_files_are_refused(zoo: Path, tmp_path: Path) -> None:
    for args in (("decode", str(zoo / "zoo.tall"), "sst2", "-o", "x.bin"),
                 ("merge", str(zoo / "zoo.tall"), "-o", "x.pt")):
        line = one_error_line(run(*args, cwd=tmp_path, ok=False))
        assert "a model is written as one .safetensors file or as a folder" in line
    assert list(tmp_path.iterdir()) == []
    with tallfmt.open(zoo / "zoo.tall") as z, pytest.raises(InputError, match="x.bin"):
        z.decode_to("sst2", tmp_path / "x.bin")


def test_max_shard_size_for_a_file_output_is_a_usage_error(zoo: Path, tmp_path: Path) -> None:
    proc = run("decode", str(zoo / "zoo.tall"), "sst2", "-o", "x.safetensors", "--max-shard-size", "1MB",
               cwd=tmp_path, ok=False)
    assert proc.returncode == 2 and "--max-shard-size" in proc.stderr and "folder output" in proc.stderr
    with tallfmt.open(zoo / "zoo.tall") as z, pytest.raises(InputError, match="max_shard_size applies to a folder"):
        z.decode_to("sst2", tmp_path / "x.safetensors", max_shard_size=10)
    assert list(tmp_path.iterdir()) == []


def test_encode_refuses_its_own_inputs_as_output(zoo: Path, tmp_path: Path) -> None:
    before = (zoo / "sst2.safetensors").read_bytes()
    line = one_error_line(run("encode", "base.safetensors", "sst2.safetensors", "-o", "sst2.safetensors", "--force",
                              cwd=zoo, ok=False))
    assert "sst2.safetensors: is task 'sst2''s own file" in line
    assert (zoo / "sst2.safetensors").read_bytes() == before
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(before)
    with pytest.raises(InputError, match="the base's own"):
        tallfmt.encode(folder, {"a": zoo / "mnli.safetensors"}, folder, shards=2, overwrite=True)
    with pytest.raises(InputError, match="the base's own file"):
        tallfmt.encode(folder, {"a": zoo / "mnli.safetensors"}, folder / "model.safetensors", overwrite=True)


def test_the_api_refuses_to_overwrite_like_the_cli(zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "z.tall"
    tallfmt.encode(zoo / "base.safetensors", {"a": zoo / "sst2.safetensors"}, out)
    with pytest.raises(InputError, match="already exists"):
        tallfmt.encode(zoo / "base.safetensors", {"a": zoo / "sst2.safetensors"}, out)
    tallfmt.encode(zoo / "base.safetensors", {"b": zoo / "mnli.safetensors"}, out, overwrite=True)
    with tallfmt.open(out) as z:
        assert z.tasks == ["b"]
        z.decode_to("b", tmp_path / "b")
        with pytest.raises(InputError, match="already holds a model"):
            z.decode_to("b", tmp_path / "b")
        z.decode_to("b", tmp_path / "b", overwrite=True)
        z.merge_to(tmp_path / "m.safetensors")
        with pytest.raises(InputError, match="already exists"):
            z.merge_to(tmp_path / "m.safetensors")


def test_a_missing_archive_is_an_input_error_naming_it(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.tall", tmp_path / "nope" / "tall.index.json"):
        with pytest.raises(InputError, match=f"{path}: no such file or folder"):
            tallfmt.open(path)
    line = one_error_line(run("info", "nope.tall", cwd=tmp_path, ok=False))
    assert line.startswith("tallfmt: error: nope.tall: no such file or folder")


def test_one_task_grammar(zoo: Path, tmp_path: Path) -> None:
    proc = run("encode", str(zoo / "base.safetensors"), str(zoo / "qqp.safetensors"), "-o", "one.tall", cwd=tmp_path)
    assert "one.tall: 1 task (qqp)," in proc.stdout
    assert "masked parameters, 1 task\n" in run("stats", "one.tall", cwd=tmp_path).stdout
    assert "1 task" in run("info", "one.tall", cwd=tmp_path).stdout.splitlines()[0]
    assert "1 task' masks" in run("verify", "one.tall", cwd=tmp_path).stdout
    with tallfmt.open(tmp_path / "one.tall") as z:
        assert ": 1 task, " in repr(z)


def test_merge_help_and_options(zoo: Path, tmp_path: Path) -> None:
    text = " ".join(run("merge", "--help", cwd=tmp_path).stdout.split())
    assert "--merge [zeroshot|task_arithmetic|consensus]" in text and "--method" not in text
    assert "--alpha X" in text and "(task_arithmetic, consensus; default 0.4)" in text
    assert "--k N" in text and "≥ 0 (consensus; default 2)" in text
    assert "--per-task [base|drop|error]" in text and "[default: base]" in text
    assert "[2]" not in text and "x>=0" not in text
    # the old spelling still works, hidden
    run("merge", str(zoo / "zoo.tall"), "--method", "zeroshot", "-o", "zs.safetensors", cwd=tmp_path)
    with tallfmt.open(zoo / "zoo.tall") as z:
        want = z.merge("zeroshot")
    got = load_file(str(tmp_path / "zs.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_merge_k_above_t_warns_in_one_line(zoo: Path, tmp_path: Path) -> None:
    proc = run("merge", str(zoo / "zoo.tall"), "--merge", "consensus", "--k", "5", "-o", "k5.safetensors", cwd=tmp_path)
    warnings_ = [ln for ln in proc.stderr.splitlines() if ln.startswith("tallfmt: warning: ")]
    assert warnings_ == ["tallfmt: warning: consensus k=5 is above the archive's 3 tasks: no parameter can be kept "
                         "by k masks, so the merge is θ0"]
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr


def test_alpha_may_be_negative_lambda_must_be_positive(zoo: Path, tmp_path: Path) -> None:
    run("merge", str(zoo / "zoo.tall"), "--alpha", "-3", "-o", "neg.safetensors", cwd=tmp_path)
    with tallfmt.open(zoo / "zoo.tall") as z:
        want = z.merge("task_arithmetic", alpha=-3)
    got = load_file(str(tmp_path / "neg.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    for lam in ("-0.5", "0"):
        line = one_error_line(run("encode", str(zoo / "base.safetensors"), str(zoo / "sst2.safetensors"), "-o",
                                  "x.tall", "--lambda", lam, cwd=tmp_path, ok=False))
        assert "lambda for task 'sst2' must be a finite number > 0" in line


def test_weights_only_refusals_keep_torch_line_and_hide_its_warnings(zoo: Path, tmp_path: Path) -> None:
    import argparse

    sd = {k: v for k, v in load_file(str(zoo / "sst2.safetensors")).items()}
    torch.save({**sd, "args": argparse.Namespace(lr=1)}, tmp_path / "zip.bin")
    torch.save({**sd, "args": argparse.Namespace(lr=1)}, tmp_path / "raw.bin", _use_new_zipfile_serialization=False)
    with open(tmp_path / "plain.bin", "wb") as f:
        pickle.dump({"w": 1}, f, protocol=4)  # not torch.save's format: torch warns about the protocol
    for name, needle in (("zip.bin", "GLOBAL argparse.Namespace"), ("raw.bin", "GLOBAL argparse.Namespace"),
                         ("plain.bin", "Unsupported operand")):
        proc = run("--quiet", "encode", str(zoo / "base.safetensors"), name, "-o", "x.tall", cwd=tmp_path, ok=False)
        line = one_error_line(proc)
        assert needle in line and "weights_only=True" in line, line


def test_task_names_from_hf_cache_snapshots_and_repeated_checkpoints(zoo: Path, tmp_path: Path) -> None:
    for repo in ("models--textattack--bert-sst2", "models--bert-mnli"):
        snap = tmp_path / "hub" / repo / "snapshots" / "0123abcd"
        snap.mkdir(parents=True)
        blob = tmp_path / "hub" / repo / "blobs" / "f00d"
        blob.parent.mkdir()
        blob.write_bytes((zoo / "sst2.safetensors").read_bytes())
        (snap / "model.safetensors").symlink_to(os.path.relpath(blob, snap))
    snaps = sorted(str(p) for p in (tmp_path / "hub").glob("*/snapshots/*"))
    assert [cli.task_name_of(s) for s in snaps] == ["bert-mnli", "bert-sst2"]
    assert cli.task_name_of(snaps[0] + "/model.safetensors") == "bert-mnli"
    run("encode", str(zoo / "base.safetensors"), *snaps, "-o", "hub.tall", cwd=tmp_path)
    with tallfmt.open(tmp_path / "hub.tall") as z:
        assert z.tasks == ["bert-mnli", "bert-sst2"]
    for run_name in ("run1", "run2"):
        ck = tmp_path / run_name / "checkpoint-500"
        ck.mkdir(parents=True)
        (ck / "model.safetensors").write_bytes((zoo / "mnli.safetensors").read_bytes())
    proc = run("encode", str(zoo / "base.safetensors"), "run1/checkpoint-500", "run2/checkpoint-500", "-o", "c.tall",
               cwd=tmp_path, ok=False)
    assert proc.returncode == 2
    text = " ".join(proc.stderr.split())
    assert ("task names repeat: 'checkpoint-500' for run1/checkpoint-500, run2/checkpoint-500 (Trainer "
            "checkpoint-N folders of different runs share their names); name the tasks with --name") in text


def test_lambda_warning_when_a_task_decodes_worse_than_theta0(tmp_path: Path) -> None:
    """Dense, unrelated fine-tunes with a tiny λ keep almost all of τ_MTL = Σ τ_t, so each decoded
    task carries the others' changes: further from its fine-tune than θ0 is."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for t in ("a", "b", "c"):
        save_file({"w": base["w"] + 0.1 * torch.randn(64, 64, generator=g)}, str(tmp_path / f"{t}.safetensors"))
    proc = run("encode", "base.safetensors", "a.safetensors", "b.safetensors", "c.safetensors", "-o", "z.tall",
               "--lambda", "0.01", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("tallfmt: warning: ")]
    assert len(lines) == 3 and all("≥ 1" in ln and "select_lambdas" in ln for ln in lines), proc.stderr
    assert "task 'a': rel error 1.4" in lines[0]
    info = run("info", "z.tall", cwd=tmp_path)
    assert [ln for ln in info.stderr.splitlines() if "select_lambdas" in ln] == lines
    s = json.loads(run("info", "z.tall", "--json", cwd=tmp_path).stdout)
    assert [w for w in s["warnings"] if "select_lambdas" in w] == [
        ln.removeprefix("tallfmt: warning: ") for ln in lines]
    report = tallfmt.encode(tmp_path / "base.safetensors", {"a": tmp_path / "a.safetensors"}, tmp_path / "one.tall",
                            lambdas=0.4)
    assert report.warnings == []  # one task: τ_MTL = τ_a, nothing lost


def test_different_architectures_are_named_as_such(zoo: Path, tmp_path: Path) -> None:
    save_file({"conv.weight": torch.ones(3, 3), "fc.weight": torch.ones(2, 2)}, str(tmp_path / "resnet.safetensors"))
    line = one_error_line(run("encode", str(zoo / "base.safetensors"), "resnet.safetensors", "-o", "x.tall",
                              cwd=tmp_path, ok=False))
    assert "most tensors differ (8 of 8)" in line and "different architectures?" in line


def test_dtype_prefix_map_and_files_options(zoo: Path, tmp_path: Path) -> None:
    sd = load_file(str(zoo / "sst2.safetensors"))
    save_file({f"bert.{k}": v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()},
              str(tmp_path / "sst2.safetensors"))
    run("encode", str(zoo / "base.safetensors"), "sst2.safetensors", "-o", "z.tall", "--dtype", "BF16",
        "--prefix-map", "=bert.", cwd=tmp_path)
    with tallfmt.open(tmp_path / "z.tall") as z:
        assert all(n.startswith("bert.") for n in z.tensor_names)
        assert z.roles["bert.encoder.layer.0.attention.self.query.weight"] == "masked"
        assert {z.entry(n).dtype for n in z.tensor_names if z.roles[n] == "masked"} == {"BF16"}
    proc = run("encode", "a", "b", "-o", "x.tall", "--prefix-map", "bert.", cwd=tmp_path, ok=False)
    assert proc.returncode == 2 and "expected OLD=NEW" in proc.stderr


def test_merge_per_task_policies_on_the_command_line(zoo: Path, tmp_path: Path) -> None:
    for t, n in (("sst2", 2), ("mnli", 3)):
        sd = load_file(str(zoo / f"{t}.safetensors"))
        sd["classifier.weight"] = torch.ones(n, 32)
        save_file(sd, str(tmp_path / f"{t}.safetensors"))
    run("encode", str(zoo / "base.safetensors"), "sst2.safetensors", "mnli.safetensors", "-o", "h.tall",
        "--mismatch", "per_task", cwd=tmp_path)
    proc = run("merge", "h.tall", "-o", "m.safetensors", cwd=tmp_path)
    [w] = [ln for ln in proc.stderr.splitlines() if ln.startswith("tallfmt: warning: ")]
    assert "1 tensor stored per task cannot be merged; left out (θ0 has none): classifier.weight" in w
    line = one_error_line(run("merge", "h.tall", "-o", "e.safetensors", "--per-task", "error", cwd=tmp_path, ok=False))
    assert "cannot be merged: classifier.weight" in line
    assert not (tmp_path / "e.safetensors").exists()
