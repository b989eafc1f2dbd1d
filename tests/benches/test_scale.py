"""benches/scale.py on the tiny grid: a phase measured in-process and one in its own interpreter, and the fit."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.benches.conftest import REPO


@pytest.fixture(scope="module")
def scale() -> ModuleType:
    """The bench as a module, for its functions."""
    spec = importlib.util.spec_from_file_location("scale_bench", REPO / "benches" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_phases_report_time_peak_rss_and_what_they_read(scale: ModuleType, tmp_path: Path, capsys) -> None:
    data = scale.config_data(tmp_path / "x1", "tiny", 2, 1)
    ingest = scale.run_phase("ingest", data)  # in this process: builds the store the next phase reads
    assert (tmp_path / "x1" / "data" / "analysis.zarr").is_dir() and ingest["seconds"] > 0
    stats = scale.child("stats", data, 1)  # its own interpreter, as the bench runs every phase
    # 2 training days of 6-hourly times: each from-scratch pass reads every one of them.
    assert stats["times_read"] == 8 and stats["phase"] == "stats"
    assert 10 < stats["peak_rss_mib"] < ingest["peak_rss_mib"] * 10 and stats["seconds"] > 0
    rows = [{"factor": f, "days": 2 * f, **r} for f, r in ((1, stats), (2, {**stats, "seconds": 2 * stats["seconds"]}))]
    result = {"grid": "tiny", "base_days": 2, "factors": [1, 2], "threads": 1, "rows": rows, "machine": "test",
              "summary": {"stats": {"rss_ratio": 1.0, "time_r2": scale.r_squared([2, 4], [1.0, 2.0]), "cpu_r2": 0.5}}}
    scale.print_table(result)
    out = capsys.readouterr().out
    assert "stats     peak RSS 2×/1× = 1.000 (goal ≤ 1.15: ok); time vs period R² = 1.0000 (goal ≥ 0.99: ok), " \
        "CPU time R² = 0.5000" in out


def test_r_squared_is_one_on_a_line_and_lower_off_it(scale: ModuleType) -> None:
    assert abs(scale.r_squared([1, 2, 4, 8], [3, 5, 9, 17]) - 1.0) < 1e-12
    assert scale.r_squared([1, 2, 4, 8], [3, 9, 5, 17]) < 0.9
