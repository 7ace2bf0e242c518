"""Every command and the Python example in README.md run as written, so README never drifts from the code.

The set-up part of the two top commands (scripts/install.sh) and the test run itself are not repeated
here (CI has just run them); everything else is executed: the demo, every `tallfmt ...` example against
small checkpoints made in a temporary folder, and each Python block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli import make_checkpoints, tallfmt_script

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TOP_COMMANDS = ["bash scripts/install.sh && .venv/bin/tallfmt demo",
                "bash scripts/install.sh && .venv/bin/python -m pytest -q"]
SETUP = "bash scripts/install.sh && "


def code_blocks(*languages: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S) if lang in languages]


def shell_commands() -> list[str]:
    """Every command of the README's bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in code_blocks("bash", "sh", "shell"):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.strip()
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


def shell(cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a README command with the venv's tallfmt first on PATH."""
    env = {**os.environ, "PATH": f"{Path(tallfmt_script()).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_two_commands_come_first() -> None:
    assert shell_commands()[:2] == TOP_COMMANDS
    text = README.read_text(encoding="utf-8")
    assert all(text.index(c) < text.index("\n## ") for c in TOP_COMMANDS)
    assert "<!-- results -->" in text
    for link in ("FORMAT.md", "spec/header.schema.json", "spec/golden/", "bench/RESULTS.md"):
        assert f"]({link})" in text, link
    for target in ("FORMAT.md", "spec/header.schema.json", "spec/golden", "scripts/install.sh", ".ci/run"):
        assert (ROOT / target).exists(), target


def test_every_command_is_one_this_test_runs() -> None:
    for cmd in shell_commands():
        assert cmd in TOP_COMMANDS or cmd.startswith("tallfmt "), f"README command not covered by tests: {cmd}"


def test_the_demo_command_runs() -> None:
    demo = TOP_COMMANDS[0].removeprefix(SETUP).replace(".venv/bin/tallfmt", tallfmt_script())
    proc = shell(demo, ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6. Verifying" in proc.stdout and "Done in" in proc.stdout


def hf_block() -> str:
    """The "Hugging Face models" example: it builds the folders the section's commands use."""
    [block] = [b for b in code_blocks("python") if "from transformers" in b]
    return block


def run_python(source: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", source], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_every_cli_example_runs(tmp_path: Path) -> None:
    make_checkpoints(tmp_path)
    assert run_python(hf_block(), tmp_path).returncode == 0
    commands = [c for c in shell_commands() if c.startswith("tallfmt ")]
    assert len(commands) >= 11
    for cmd in commands:
        proc = shell(cmd, tmp_path)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout}{proc.stderr}"
    assert (tmp_path / "agreement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "mnli-model" / "model.safetensors").exists()
    for folder in ("bert-mnli-decoded", "bert-merged"):
        assert {p.name for p in (tmp_path / folder).iterdir()} == {"config.json", "model.safetensors"}, folder


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_example_runs(tmp_path: Path, index: int) -> None:
    make_checkpoints(tmp_path)
    source = code_blocks("python")[index]
    assert len(source.strip().splitlines()) <= 12, "the README's example should stay about 10 lines"
    proc = run_python(source, tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json

    import tallfmt

    if source == hf_block():  # decoded with its own config, loaded by from_pretrained: 3 labels
        assert proc.stdout.split() == ["3"]
        assert json.loads((tmp_path / "mnli-decoded" / "config.json").read_text())["id2label"] == \
            json.loads((tmp_path / "bert-mnli" / "config.json").read_text())["id2label"]
        return
    # what the example prints is what the archive it wrote holds
    with tallfmt.open(tmp_path / "zoo.tall") as zoo:
        assert proc.stdout.strip().splitlines()[-1] == f"{zoo.tasks} {zoo.agreement().tolist()}"
        assert sum(zoo.agreement().tolist()) == sum(e.numel for e in zoo.header.tensors if e.role == "masked") > 0
