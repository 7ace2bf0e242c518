"""Role decisions that are encoder policy rather than format: batch-norm statistics, early refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tallfmt


def _bn_zoo() -> tuple[dict, dict]:
    torch.manual_seed(0)
    base = {"conv.weight": torch.randn(4, 3), "bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4),
            "bn.num_batches_tracked": torch.tensor(0)}
    tasks = {}
    for i, t in enumerate(("a", "b", "c")):
        tasks[t] = {"conv.weight": base["conv.weight"] + 0.1 * torch.randn(4, 3),
                    "bn.running_mean": base["bn.running_mean"] + 0.5 * torch.randn(4),
                    # variances that shrink: summed as a task vector they would go negative
                    "bn.running_var": torch.full((4,), 0.3 + 0.1 * i),
                    "bn.num_batches_tracked": torch.tensor(100 + i)}
    return base, tasks


def test_batchnorm_statistics_are_stored_per_task(tmp_path: Path) -> None:
    base, tasks = _bn_zoo()
    report = tallfmt.encode(base, tasks, tmp_path / "bn.tall")
    with tallfmt.open(tmp_path / "bn.tall") as zoo:
        assert zoo.roles == {"conv.weight": "masked", "bn.running_mean": "per_task",
                             "bn.running_var": "per_task", "bn.num_batches_tracked": "per_task"}
        for t, sd in tasks.items():
            got = zoo.decode(t)
            for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
                assert torch.equal(got[k], sd[k]), (t, k)
        assert torch.equal(zoo.merge("task_arithmetic", alpha=1.0)["bn.running_var"], base["bn.running_var"])
    assert report.roles["per_task"] == 3


def test_per_task_patterns_can_be_turned_off(tmp_path: Path) -> None:
    base, tasks = _bn_zoo()
    tallfmt.encode(base, tasks, tmp_path / "bn.tall", per_task=())
    with tallfmt.open(tmp_path / "bn.tall") as zoo:
        assert zoo.roles["bn.running_var"] == "masked"
        assert zoo.roles["bn.num_batches_tracked"] == "per_task"  # integers are never masked


def test_per_task_must_be_patterns() -> None:
    base, tasks = _bn_zoo()
    with pytest.raises(tallfmt.InputError, match="per_task"):
        tallfmt.encode(base, tasks, "unused.tall", per_task="*running_var")


def test_overwrite_false_refuses_before_reading_inputs(tmp_path: Path) -> None:
    target = tmp_path / "zoo.tall"
    target.write_bytes(b"precious")
    with pytest.raises(tallfmt.InputError, match="already exists"):
        tallfmt.encode(tmp_path / "missing-base.safetensors", {"a": tmp_path / "missing.safetensors"}, target,
                       overwrite=False)
    assert target.read_bytes() == b"precious"


def test_cli_per_task_option(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    from safetensors.torch import save_file

    base, tasks = _bn_zoo()
    save_file(base, str(tmp_path / "base.safetensors"))
    files = []
    for t, sd in tasks.items():
        save_file(sd, str(tmp_path / f"{t}.safetensors"))
        files.append(str(tmp_path / f"{t}.safetensors"))
    exe = shutil.which("tallfmt", path=str(Path(sys.executable).parent)) or "tallfmt"
    for flags, role in (([], "per_task"), (["--per-task", ""], "masked")):
        out = tmp_path / "zoo.tall"
        subprocess.run([exe, "-q", "encode", str(tmp_path / "base.safetensors"), *files, "-o", str(out), "--force",
                        *flags], check=True)
        with tallfmt.open(out) as zoo:
            assert zoo.roles["bn.running_var"] == role, flags


def test_encode_threads_change_no_byte_and_torch_threads_are_restored(tmp_path: Path) -> None:
    """encode runs its own pool; torch's intra-op threads are 1 while it runs (they would spin on
    chunk-sized copies) and restored afterwards, whatever ``threads`` is."""
    base, tasks = _bn_zoo()
    before = torch.get_num_threads()
    seen: list[int] = []
    for i, threads in enumerate((1, 2, 3, None)):
        tallfmt.encode(base, tasks, tmp_path / f"{i}.tall", threads=threads,
                       progress=lambda n, total: seen.append(torch.get_num_threads()))
        assert torch.get_num_threads() == before
    assert set(seen) == {1}
    assert len({(tmp_path / f"{i}.tall").read_bytes() for i in range(4)}) == 1
    with pytest.raises(tallfmt.InputError, match="threads"):
        tallfmt.encode(base, tasks, tmp_path / "c.tall", threads=0)
