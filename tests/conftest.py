"""Shared fixtures: quiet, offline, deterministic."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message="Default SHT truncation changed")

REANALYSIS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reanalysis")


@pytest.fixture(autouse=True)
def _no_spherecast_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's SPHERECAST_* variables must not change what the tests see.
    for key in list(os.environ):
        if key.startswith("SPHERECAST_"):
            monkeypatch.delenv(key)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
