"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


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
