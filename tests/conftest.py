"""Test-wide settings: offline hubs, a bounded CPU thread count, seeded RNGs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread is fastest and robust to a busy machine (see federation config).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests grouped for one pytest process (``xdist_group``: the deployment tests that run
    one after the other) first: they are the longest chain of ``make test``."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
