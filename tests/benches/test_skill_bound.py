"""benches/skill_bound.py, the perfect-model bound, on the quick skill run's stores: the real script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.benches.conftest import REPO, bench_env

SCRIPT = REPO / "benches" / "skill_bound.py"


@pytest.mark.slow
def test_bound_beats_persistence_and_scores_as_the_skill_bench(quick: dict[str, Any], tmp_path: Path,
                                                              digest: Any) -> None:
    before = digest(quick["out"])
    out = tmp_path / "bound.json"
    # --starts above the test period's count takes every test initial time: the skill bench's own set.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(quick["out"]), "--starts", "99",
                           "--members", "2", "--skill-report", str(quick["report_path"]), "--json", str(out)],
                          cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert digest(quick["out"]) == before  # the stores were reused, not re-simulated or touched
    r = json.loads(out.read_text())
    skill = quick["report"]
    assert len(r["initial_times"]) == r["test_initial_times_available"] == skill["data"]["test_initial_times"]
    assert r["max_reproduction_difference"] < 1e-5  # the re-run planet is the store's planet
    assert len(set(r["member_seeds"])) == 2 and 0 not in r["member_seeds"]  # never the truth's own kicks
    for lead, row in r["relative_error"].items():
        assert all(v is not None and math.isfinite(v) and v > 0 for v in row.values()), (lead, row)
        assert row["climatology"] == pytest.approx(1.0, abs=1e-9)
        # Same initial times, same definition: persistence scores what the skill bench's evaluate() gave.
        assert row["persistence"] == pytest.approx(skill["relative_error"][lead]["persistence"], rel=1e-4)
        # The members' kicks differ (their seeds are used), so the two-member mean carries sampling error.
        assert row["ensemble_mean_infinite"] < row["ensemble_mean"]
    for lead in ("6h", "24h"):
        # The planet's own solver from the exact state, missing only the kicks, beats persistence.
        row = r["relative_error"][lead]
        assert row["unstirred"] < 0.8 * row["persistence"], (lead, row)
        # From only the degrees the store shows, and no solver history, the same solver does worse.
        assert row["unstirred"] < row["truncated"], (lead, row)
    assert "SFNO/p" in proc.stdout and "Perfect-model bound" in proc.stdout and "truncated" in proc.stdout
    for lead, row in r["skill_report"]["leads"].items():
        assert row["attained_truncated"] is not None and math.isfinite(row["attained_truncated"]), (lead, row)


@pytest.mark.parametrize(("argv", "message"), [
    (["--members", "0"], "--starts and --members must be ≥ 1"),
    (["--starts", "-1"], "--starts and --members must be ≥ 1"),
    (["--skill-report", "nowhere.json"], "--skill-report nowhere.json is not a file"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path: Path, argv: list[str], message: str) -> None:
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *argv], cwd=tmp_path,
                          env=bench_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_store_of_another_planet_is_refused_and_untouched(quick: dict[str, Any], digest: Any, capsys) -> None:
    from benches.skill_bound import main

    before = digest(quick["out"])
    assert main(["--quick", "--out", str(quick["out"]), "--set", "ingest.synthetic.seed=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the request" in err[0], err
    assert digest(quick["out"]) == before
