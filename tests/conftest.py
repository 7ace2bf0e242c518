"""Fixtures shared by several test modules."""

from __future__ import annotations

import os

import pytest

# torch's OpenMP threads wait passively, not spinning, when a test (or the CI job beside this one) keeps the
# other core busy: read by the OpenMP runtime when torch is first imported, which is after this file.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def toy_zoo(tmp_path_factory):
    """The toy model zoo of tests/_zoo_toy.py, built once per session: (folder, manifest). Test modules
    that use it import _zoo_toy first, which skips them when the zoo's packages are missing."""
    import _zoo_toy

    return _zoo_toy.build(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module with one torch intra-op thread: on tiny tensors more threads only add contention
    (seconds per test on a loaded machine). Restores the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
