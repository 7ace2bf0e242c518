"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def toy_zoo(tmp_path_factory):
    """The toy model zoo of tests/_zoo_toy.py, built once per session: (folder, manifest). Test modules
    that use it import _zoo_toy first, which skips them when the zoo's packages are missing."""
    import _zoo_toy

    return _zoo_toy.build(tmp_path_factory.mktemp("zoo"))
