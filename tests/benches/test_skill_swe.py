"""Smoke test of benches/skill_swe.py: the real script, end to end, at its ``--quick`` size.

One run (tiny grid, a 25×48 planet, 12 days, 1.8 s of training per model) is shared by the tests:
its JSON report must hold every figure, finite and sane; a rerun must reuse both stores; bad
inputs must fail with one clear error before anything is simulated, trained or overwritten.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

LEADS = ("6h", "24h", "72h", "120h")


def _finite_positive(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and v > 0


@pytest.mark.slow
def test_report_has_every_figure_finite_and_sane(quick: dict[str, Any]) -> None:
    r = quick["report"]
    assert set(r["relative_error"]) == set(LEADS)
    for lead in LEADS:
        row = r["relative_error"][lead]
        assert set(row) == {"sfno", "example", "persistence", "climatology"}
        assert all(_finite_positive(v) for v in row.values()), (lead, row)
        assert row["climatology"] == pytest.approx(1.0, abs=1e-6)  # the definition's normalization
    # A 6 h persistence forecast of a continuous flow is far better than its climatology.
    assert r["relative_error"]["6h"]["persistence"] < 0.9
    assert r["data"]["test_initial_times"] >= 4
    # Both stores are the same planet: the coarse one is the fine one spectrally truncated.
    assert r["data"]["same_truth_max_diff_std"] < 1e-4
    assert [s["reused"] for s in r["data"]["stores"]] == [False, False]
    for name in ("training_sfno", "training_example"):
        assert r[name]["steps"] > 0 and r[name]["wall_s"] > 0 and r[name]["parameters"] > 0
    for lead in LEADS:
        assert set(r["rmse_sfno"][lead]) == {"geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"}
    ro = r["rollout"]["sfno"]
    assert ro["steps"] == 60 and _finite_positive(ro["planet_mean_ke"])
    # The planet's mean kinetic energy is that of a jet of tens of m/s, not a number off by units.
    assert 20 < ro["planet_mean_ke"] < 1000
    if ro["finite"]:
        assert _finite_positive(ro["mean_ke"]) and ro["ke_ratio"] == pytest.approx(ro["mean_ke"] / ro["planet_mean_ke"])
        assert len(ro["ke_per_30_days"]) == 1
        (north, south), = ro["jets_per_30_days"]  # one 30-day chunk: where its westerlies peak
        assert 0 < north <= 90 and -90 <= south < 0
    else:
        assert 1 <= ro["first_nonfinite_step"] <= 60 and ro["pass"] is False
    pj = r["rollout"]["planet_jets"]  # the quick planet's jets sit in mid-latitudes of their hemispheres
    assert 20 <= pj["north"][0] <= pj["north"][1] <= 70 and -70 <= pj["south"][0] <= pj["south"][1] <= -20
    starts = r["rollout_starts"]["sfno"]
    # The stochastic year: the same starts, its own noise bank measured on training windows.
    noisy = r["rollout_starts"]["sfno+residuals"]
    assert [x["initial_time"] for x in noisy] == [x["initial_time"] for x in starts]
    rn = r["residual_noise"]
    assert rn["windows"] > 0 and set(rn["rms"]) == set(r["rmse_sfno"]["6h"])
    # The planet's pole rows: geopotential constant, each wind one vector (wavenumber 1); the model keeps that form,
    # so the zonal-mean zonal wind on both pole rows stays the data's 0 over the whole rollout.
    assert r["training_sfno"]["pole_modes"] == [[0, 1, 1], [0, 1, 1]]
    for run in (*starts, *noisy):
        assert all(abs(u) < 1e-3 for month in run["pole_zonal_u_per_30_days"] for u in month), run
    assert all(_finite_positive(v) for v in rn["rms"].values())
    assert len(starts) == 2 and starts[0]["initial_time"] < starts[1]["initial_time"]  # two distinct initial times
    assert starts[0]["ke_ratio"] == ro["ke_ratio"] or not ro["finite"]  # the first start is the one shown in full
    z = r["zero_shot"]
    assert "33x64" in z["grid"] and z["initial_times"] == r["data"]["test_initial_times"]
    for lead in LEADS:
        v = z["leads"][lead]
        assert v["native"] == r["relative_error"][lead]["sfno"]
        assert _finite_positive(v["zero_shot"]) and v["ratio"] == pytest.approx(v["zero_shot"] / v["native"])
    goals = {g["goal"]: g for g in r["goals"]}
    assert len(goals) == 6
    # Without --bound the attained goals are not measured; every other goal has a verdict.
    attained = [g for name, g in goals.items() if name.startswith("attained at")]
    assert [g["pass"] for g in attained] == [None, None] and "bound" not in r
    assert all(isinstance(g["pass"], bool) for g in goals.values() if g not in attained)
    gke = next(g for name, g in goals.items() if "stochastic rollout KE" in name)
    assert gke["pass"] == all(x["pass"] for x in noisy)  # every start must stay bounded
    # The jet goal is judged on every stochastic start's 30-day jets against the planet's range.
    assert all(x["jets_per_30_days"] or not x["finite"] for x in noisy)
    gjet = next(g for name, g in goals.items() if "jets" in name)
    assert gjet["pass"] == r["jets"]["sfno+residuals"]["pass"]
    assert len(r["jets"]["sfno+residuals"]["per_start_deg"]) == len(noisy)
    # The printed report carries the table and one verdict per measured goal.
    assert "relative error" in quick["stdout"] and "zero-shot" in quick["stdout"]
    assert "attained per lead: not measured" in quick["stdout"]
    assert sum(quick["stdout"].count(w) for w in (" PASS", " FAIL")) == 4


@pytest.mark.slow
def test_rerun_reuses_both_stores(quick: dict[str, Any], digest: Any) -> None:
    from benches import skill_data as sd
    from benches.skill_swe import parse_args, plan

    coarse, fine, _, _ = plan(parse_args(["--quick", "--out", str(quick["out"])]))
    before = digest(quick["out"] / "tiny" / "data")
    infos = [sd.build_store(c, progress=False) for c in (coarse, fine)]
    assert [(i["reused"], i["slabs_written"]) for i in infos] == [(True, 0), (True, 0)]
    assert infos[0]["slabs_reused"] == 12  # 12 days in slabs of 4 six-hourly times
    # Nothing was re-simulated: the store is byte-identical (the stats are recomputed identically).
    assert digest(quick["out"] / "tiny" / "data") == before


@pytest.mark.slow
def test_store_of_another_planet_is_refused_and_untouched(quick: dict[str, Any], capsys, digest: Any) -> None:
    from benches.skill_swe import main

    before = digest(quick["out"])
    rc = main(["--quick", "--out", str(quick["out"]), "--set", "ingest.synthetic.seed=7"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "does not match the request" in err[0] and "dataset_version" in err[0]
    assert digest(quick["out"]) == before  # stores, stats, checkpoint and metrics untouched


@pytest.mark.parametrize(("argv", "message"), [
    (["--days", "3"], "--days 3 gives 12 analysis times; need at least 12 days"),
    (["--budget-minutes", "0"], "--budget-minutes must be positive"),
    (["--set", "grid.preset=1.5deg"], "--set grid.preset is set by the bench itself"),
    (["--set", "train.lr"], "--set 'train.lr' is not KEY.PATH=VALUE"),
    (["--set", "train.lr=fast"], "train.lr: Input should be a valid number"),
    (["--set", "model.scale_factor=16"], "scale_factor 16 does not fit grid 17x32"),  # caught by the config itself
    (["--zero-shot-grid", "tiny"], "--zero-shot-grid must differ from --grid"),
    (["--grid", "3deg"], "unknown grid preset '3deg'"),
])
def test_bad_input_fails_first_with_one_clear_error(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    from benches.skill_swe import main

    out = tmp_path / "never"
    assert main(["--quick", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()  # refused before any store was created


@pytest.mark.slow
def test_checkpoint_is_rescored_without_training(quick: dict[str, Any], tmp_path: Path, digest: Any) -> None:
    import json

    import torch

    from benches.skill_swe import main

    r0 = quick["report"]
    before = digest(quick["out"])
    out = tmp_path / "again.json"
    checkpoint = r0["training_sfno"]["checkpoint"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["--quick", "--out", str(quick["out"]), "--checkpoint", checkpoint, "--noise-scale", "0.5",
                     "--json", str(out)]) == 0
        assert torch.get_num_threads() == 1  # scored on the trainer's threads (train.threads=1), as after training
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    assert digest(quick["out"]) == before  # nothing trained, nothing re-simulated
    assert r["training_sfno"]["from_checkpoint"] and r["training_sfno"]["steps"] == r0["training_sfno"]["steps"]
    assert "training_example" not in r and r["relative_error"]["24h"]["example"] is None
    for lead in LEADS:  # the same weights on the same test windows score the same
        assert r["relative_error"][lead]["sfno"] == pytest.approx(r0["relative_error"][lead]["sfno"], rel=1e-6)
    assert r["residual_noise"]["scale"] == 0.5
    assert r["rollout"]["sfno"]["ke_ratio"] == pytest.approx(r0["rollout"]["sfno"]["ke_ratio"], rel=1e-6)


@pytest.mark.slow
def test_pole_rows_can_be_scored_free_or_kept_to_the_data_form(quick: dict[str, Any], tmp_path: Path,
                                                                digest: Any) -> None:
    import json

    from benches.skill_swe import main

    r0, before = quick["report"], digest(quick["out"])
    checkpoint, reports = r0["training_sfno"]["checkpoint"], {}
    for how in ("free", "data"):
        out = tmp_path / f"{how}.json"
        assert main(["--quick", "--out", str(quick["out"]), "--checkpoint", checkpoint, "--pole-rows", how,
                     "--year-steps", "20", "--json", str(out)]) == 0
        reports[how] = json.loads(out.read_text())
    assert digest(quick["out"]) == before
    free, data = reports["free"], reports["data"]
    assert free["training_sfno"]["pole_modes"] is None and free["settings"]["pole_rows"] == "free"
    assert data["training_sfno"]["pole_modes"] == r0["training_sfno"]["pole_modes"]  # measured again: the same form
    for lead in LEADS:  # kept as trained: the trained run's scores; free: the pole rows move, the scores barely
        assert data["relative_error"][lead]["sfno"] == pytest.approx(r0["relative_error"][lead]["sfno"], rel=1e-6)
        assert free["relative_error"][lead]["sfno"] == pytest.approx(r0["relative_error"][lead]["sfno"], rel=0.05)
    drift = max(abs(u) for u in free["rollout"]["sfno"]["pole_zonal_u_per_30_days"][0])
    assert drift > 1e-3  # left free, the network's own pole rows hold a zonal-mean wind the data does not


@pytest.mark.parametrize(("argv", "message"), [
    (["--noise-scale", "-1"], "--noise-scale must be ≥ 0, got -1.0"),
    (["--checkpoint", "nowhere.pt"], "--checkpoint nowhere.pt is not a file"),
    (["--bound", "nowhere.json"], "--bound nowhere.json is not a file"),
    (["--member", "nowhere.pt"], "--member nowhere.pt is not a file"),
    (["--pole-rows", "data"], "--pole-rows data needs --checkpoint"),
])
def test_bad_option_is_refused_by_the_parser(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    from benches.skill_swe import main

    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--out", str(out), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_member_mean_of_the_sfno_with_itself_scores_as_the_sfno(quick: dict[str, Any], tmp_path: Path, digest: Any,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from benches.skill_swe import main

    r0, before = quick["report"], digest(quick["out"])
    checkpoint, out = r0["training_sfno"]["checkpoint"], tmp_path / "members.json"
    assert main(["--quick", "--out", str(quick["out"]), "--checkpoint", checkpoint, "--member", checkpoint,
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert digest(quick["out"]) == before
    assert r["members"]["checkpoints"] == [checkpoint, checkpoint]
    for lead in LEADS:  # two identical members average to the member itself
        assert r["members"]["relative_error"][lead] == pytest.approx(r0["relative_error"][lead]["sfno"], rel=1e-5)
    assert "mean of 2 independently trained SFNOs' forecasts" in capsys.readouterr().out


def test_member_of_another_grid_is_refused_before_any_work(quick: dict[str, Any], tmp_path: Path, digest: Any,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from benches.skill_swe import main

    obj = torch.load(quick["report"]["training_sfno"]["checkpoint"], map_location="cpu", weights_only=True)
    obj["meta"]["grid"] = "5.625deg:33x64:equiangular-poles"  # still loads: the weights do not depend on the grid
    other = tmp_path / "other.pt"
    torch.save(obj, other)
    before = digest(quick["out"])
    assert main(["--quick", "--out", str(quick["out"]), "--checkpoint", quick["report"]["training_sfno"]["checkpoint"],
                 "--member", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--member {other} forecasts" in err and "on 5.625deg:33x64" in err and "must share the grid and task" in err
    assert digest(quick["out"]) == before
