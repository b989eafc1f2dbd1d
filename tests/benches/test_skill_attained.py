"""The skill bench's verdicts on fabricated reports: attained fraction, jet goal, ``--bound`` checks, printing.

No planet is simulated and nothing is trained: the reports are built by hand, so each figure's
verdict is known in advance. The figures are those of the 2026-12-03 run (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from benches import skill_bound as sb
from benches import skill_report as sr
from benches import skill_swe as sw

# SFNO, persistence (all test times) and the unstirred bound at 6/24/72/120 h, 2026-12-03.
SFNO = {"6h": 0.290, "24h": 0.458, "72h": 0.683, "120h": 0.795}
PERSISTENCE = {"6h": 0.359, "24h": 0.737, "72h": 1.159, "120h": 1.187}
BOUND = {"6h": 0.189, "24h": 0.372, "72h": 0.605, "120h": 0.722}
PLANET_JETS = {"north": [39.4, 56.2], "south": [-56.2, -39.4]}


def _bound_report(**extra: Any) -> dict[str, Any]:
    rows = {lead: {"unstirred": b, "ensemble_mean": b + 0.02, "ensemble_mean_infinite": b + 0.002,
                   "persistence": PERSISTENCE[lead], "climatology": 1.0} for lead, b in BOUND.items()}
    return {"command": "python benches/skill_bound.py", "initial_times": ["2000-01-01 00:00:00"],
            "members": 8, "member_seeds": list(range(1, 9)), "test_initial_times_available": 16,
            "max_reproduction_difference": 3.4e-8, "seconds": 1.0, "relative_error": rows, **extra}


def _start(jets: list[list[float]] | None, finite: bool = True, ke: float = 0.9) -> dict[str, Any]:
    return {"initial_time": "2001-03-01T00:00:00", "finite": finite, "ke_ratio": ke if finite else math.nan,
            "ke_per_30_days": [ke], "pass": finite and abs(ke - 1) <= 0.2, "jets_per_30_days": jets}


def _report(bound: dict[str, Any] | None, starts: list[dict[str, Any]]) -> dict[str, Any]:
    """A skill-bench report as ``run`` leaves it before ``goals``, with the given bound and stochastic starts."""
    errors = {lead: {"sfno": SFNO[lead], "example": SFNO[lead] * 1.1, "persistence": PERSISTENCE[lead],
                     "climatology": 1.0} for lead in SFNO}
    ro = {"steps": 1460, "finite": True, "first_nonfinite_step": None, "mean_ke": 130.0, "planet_mean_ke": 145.0,
          "ke_ratio": 0.9, "ke_per_30_days": [130.0], "jets_per_30_days": [[45.0, -45.0]]}
    r: dict[str, Any] = {
        "machine": {"machine": "x86_64", "cores": 2, "torch": "2", "load_average_start": [1.0],
                    "load_average_end": [1.0]},
        "settings": {"days": 487.0, "periods": {"train": ["a", "b"], "test": ["c", "d"]}, "grid": "5.625deg",
                     "zero_shot_grid": "2.8125deg", "budget_minutes": 5.0, "overrides": {}},
        "data": {"test_initial_times": 272, "same_truth_max_diff_std": 1e-7},
        "training_sfno": {"steps": 1086, "parameters": 1000, "wall_s": 300.0, "cpu_s": 300.0},
        "relative_error": errors,
        "residual_noise": {"windows": 512, "rms": {"geopotential_500": 230.0}},
        "rollout": {"initial_time": "2001-03-01", "sfno": ro, sr.STOCHASTIC: ro, "planet_jets": PLANET_JETS},
        "rollout_starts": {sr.STOCHASTIC: starts},
        "zero_shot": {"grid": "2.8125deg:65x128", "initial_times": 272,
                      "leads": {lead: {"native": v, "zero_shot": v * 1.05, "ratio": 1.05, "persistence_fine": 1.0}
                                for lead, v in SFNO.items()}},
    }
    r["jets"] = {sr.STOCHASTIC: sr.jet_verdict(starts, PLANET_JETS)}
    if bound is not None:
        r["bound"] = {"path": "bound.json", "command": bound["command"], "initial_times": 16,
                      "leads": sr.attained_per_lead(errors, bound)}
    return r


def _goals(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["goal"]: g for g in sr.goals(r, argparse.Namespace(year_steps=1460))}


def test_attained_is_the_fraction_of_the_way_from_persistence_to_the_bound() -> None:
    # The figures: 0.458 against persistence 0.737 and bound 0.372 is 0.76 of the attainable.
    assert sr.attained(0.737, 0.458, 0.372) == pytest.approx(0.7644, abs=1e-4)
    assert sr.attained(1.187, 0.795, 0.722) == pytest.approx(0.8430, abs=1e-4)
    assert sr.attained(0.7, 0.7, 0.3) == 0.0  # persistence itself attains nothing
    assert sr.attained(0.7, 0.3, 0.3) == 1.0  # the perfect model attains all
    assert sr.attained(0.7, 0.9, 0.3) == pytest.approx(-0.5)  # worse than persistence: negative
    assert sr.attained(0.3, 0.2, 0.3) is None  # no room between persistence and the bound: no fraction
    assert sr.attained(None, 0.2, 0.1) is None and sr.attained(0.5, 0.2, None) is None
    assert math.isnan(sr.attained(0.7, math.nan, 0.3))  # a diverged model's score stays non-finite


def test_attained_goals_at_24_and_120_h() -> None:
    starts = [_start([[45.0, -45.0]])] * 4
    goals = _goals(_report(_bound_report(), starts))
    g24, g120 = goals["attained at 24h (bound: the planet's solver)"], goals["attained at 120h (bound: the planet's solver)"]
    assert g24["value"] == pytest.approx(0.7644, abs=1e-4) and g24["pass"] is False
    assert g120["value"] == pytest.approx(0.8430, abs=1e-4) and g120["pass"] is False
    # A model at 0.40 at 24 h attains (0.737 − 0.40) / 0.365 = 0.92: met.
    r = _report(_bound_report(), starts)
    r["relative_error"]["24h"]["sfno"] = 0.40
    r["bound"]["leads"] = sr.attained_per_lead(r["relative_error"], _bound_report())
    assert _goals(r)["attained at 24h (bound: the planet's solver)"]["pass"] is True
    # Without --bound both are "not measured", never a silent pass or fail.
    unmeasured = _goals(_report(None, starts))
    assert [g["pass"] for name, g in unmeasured.items() if name.startswith("attained")] == [None, None]
    assert len(unmeasured) == 6


@pytest.mark.parametrize(("jets", "finite", "worst", "passed"), [
    ([[39.4, -56.2], [56.2, -39.4], [50.6, -45.0]], True, 0.0, True),  # the planet's own range
    ([[45.0, -61.9], [45.0, -45.0]], True, 5.7, True),  # 62° S: 5.7° beyond, within 10°
    ([[45.0, -45.0], [84.4, -45.0]], True, 28.2, False),  # month 2's northern westerlies at 84° N
    ([[28.1, -45.0]], True, 11.3, False),  # equatorward too
    ([[45.0, -45.0]], False, math.inf, False),  # the year went non-finite: its circulation is lost
    (None, True, math.inf, False),  # no jets measured: no pass
])
def test_jet_verdict_judges_every_30_days(jets: list[list[float]] | None, finite: bool, worst: float,
                                          passed: bool) -> None:
    v = sr.jet_verdict([_start(jets, finite)], PLANET_JETS)
    assert v["worst_deg"] == pytest.approx(worst, abs=1e-9) and v["pass"] is passed


def test_jet_goal_fails_when_any_start_strays() -> None:
    good, bad = _start([[45.0, -45.0]] * 12), _start([[45.0, -45.0]] * 10 + [[84.4, -84.4]] * 2)
    goals = _goals(_report(_bound_report(), [good, good, bad, good]))
    g = next(g for name, g in goals.items() if "jets" in name)
    assert g["pass"] is False and g["value"] == pytest.approx(84.4 - 56.2)
    g = next(g for name, g in _goals(_report(_bound_report(), [good] * 4)).items() if "jets" in name)
    assert g["pass"] is True and g["value"] == 0.0


def test_summary_line_prints_attained_per_lead(capsys: pytest.CaptureFixture[str]) -> None:
    r = _report(_bound_report(), [_start([[45.0, -45.0]])] * 4)
    r["goals"] = sr.goals(r, argparse.Namespace(year_steps=1460))
    sr.print_report(r)
    out = capsys.readouterr().out
    goals_section = out[out.index("\ngoals"):]
    assert "attained per lead: 6h 0.41, 24h 0.76, 72h 0.86, 120h 0.84" in goals_section
    assert " 24h    0.458" in out and "0.372      0.76" in out  # the table's bound and attained columns
    assert goals_section.count(" FAIL") == 2 and goals_section.count(" PASS") == 4


def test_bound_of_another_run_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coarse, _, periods, _ = sw.plan(sw.parse_args(["--quick", "--out", str(tmp_path / "plan")]))
    planet = coarse.ingest.synthetic.model_dump(mode="json")
    inside = [str(periods.test_start)]
    cases = [
        ("not json", "is not a JSON report of benches/skill_bound.py"),
        (json.dumps({"relative_error": {"6h": {"unstirred": 0.2}}, "initial_times": inside}),
         "has no perfect-model bound at 24h, 72h, 120h"),
        (json.dumps(_bound_report(initial_times=["1999-01-01 00:00:00"])), "outside this run's test period"),
        (json.dumps(_bound_report(initial_times=inside, periods={"test": ["x", "y"]})), "was measured on the periods"),
        (json.dumps(_bound_report(initial_times=inside, periods=periods.as_dict(), planet={**planet, "seed": 7})),
         "was measured on another planet (differs in seed)"),
    ]
    out = tmp_path / "never"
    for text, message in cases:
        path = tmp_path / "bound.json"
        path.write_text(text)
        assert sw.main(["--quick", "--out", str(out), "--bound", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()  # refused before any store was created
    # The bound of this very planet and period passes the same checks.
    good = _bound_report(initial_times=inside, periods=periods.as_dict(), planet=planet)
    sw.check_bound(Path("bound.json"), good, periods, coarse)


def test_bound_report_prints_attained_beside_the_bound(capsys: pytest.CaptureFixture[str]) -> None:
    r = _bound_report()
    skill = {"relative_error": {lead: {"sfno": SFNO[lead], "persistence": PERSISTENCE[lead]} for lead in SFNO}}
    leads = sb.attained_vs(r, skill)
    assert leads["24h"]["attained"] == pytest.approx(0.7644, abs=1e-4)
    sb.print_report(r, skill)
    out = capsys.readouterr().out
    assert "SFNO/p, attained" in out and "| 0.62, 0.76" in out and "| 0.67, 0.84" in out
    assert leads["24h"]["attained_truncated"] is None  # a report from before the truncated run prints "—"
    assert "| 0.62, 0.76, —" in out


# The solver from the truncated state at 6/24/72/120 h, 2026-12-05 (benches/skill_bound.py).
TRUNCATED = {"6h": 0.193, "24h": 0.380, "72h": 0.614, "120h": 0.728}


def test_truncated_bound_gets_its_own_attained_fraction(capsys: pytest.CaptureFixture[str]) -> None:
    bound = _bound_report()
    for lead, v in TRUNCATED.items():
        bound["relative_error"][lead]["truncated"] = v
    skill = {"relative_error": {lead: {"sfno": SFNO[lead], "persistence": PERSISTENCE[lead]} for lead in SFNO}}
    # (0.737 − 0.458) / (0.737 − 0.380): a little more of the way to the nearer bound.
    assert sb.attained_vs(bound, skill)["24h"]["attained_truncated"] == pytest.approx(0.7815, abs=1e-4)
    sb.print_report(bound, skill)
    assert "| 0.62, 0.76, 0.78" in capsys.readouterr().out
    r = _report(bound, [_start([[45.0, -45.0]])] * 4)
    assert r["bound"]["leads"]["120h"]["attained_truncated"] == pytest.approx((1.187 - 0.795) / (1.187 - 0.728))
    r["goals"] = sr.goals(r, argparse.Namespace(year_steps=1460))
    sr.print_report(r)
    out = capsys.readouterr().out
    assert "0.372      0.76      0.380      0.78" in out  # both bounds and both fractions in the table
    # The goal stays against the exact-state bound: the truncated one is context, not a second verdict.
    assert out[out.index("\ngoals"):].count(" FAIL") == 2
