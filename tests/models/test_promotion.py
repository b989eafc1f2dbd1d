"""Promotion of a retrained model: scored against the current one on the same windows, promoted only when
better, refused (and recorded) when worse, switched atomically, and followed by ``Config.checkpoint_path``.

The two models are real checkpoints from the project's training on the tiny grid: ``good`` trained 60 steps,
``poor`` 2 steps at a negligible learning rate (about 14× the good model's error at 6 h).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.config import Config
from core.fields import to_channels
from core.grid import get_grid
from core.lineage import CURRENT, PROMOTIONS, read_current
from core.runs import sha256_file
from models.data import open_analysis
from models.forecast import forecast_states, load_forecaster
from models.promotion import Comparison, compare_checkpoints, promote
from models.train import train
from tests.models.conftest import REPO, moving_planet, tiny_config, write_data

LEADS = [6, 24]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One store and three real checkpoints: good, poor, and one predicting other channels."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("promotion")
    write_data(root, moving_planet())
    good = train(tiny_config(root, max_steps=60, run_name="good"))
    poor = train(tiny_config(root, max_steps=2, lr=1e-5, run_name="poor"))
    other = tiny_config(root, max_steps=2, run_name="two-channels")
    other.task.variables = ["geopotential", "u_component_of_wind"]
    config = tiny_config(root)
    return {"config": config, "good": good, "poor": poor, "other": train(other),
            "store": config.paths.analysis_store, "period": (config.train.val_start, config.train.val_end)}


def compare(m: dict, candidate: str, current: str | None, **kw: object) -> Comparison:
    return compare_checkpoints(m[candidate], None if current is None else m[current], m["store"], m["period"],
                               LEADS, **kw)


def lines(runs: Path) -> list[dict]:
    return [json.loads(x) for x in (runs / PROMOTIONS).read_text().splitlines()]


def runs_config(models: dict, runs: Path) -> Config:
    config = models["config"].model_copy(deep=True)
    config.paths.runs_dir = runs
    return config


def test_the_first_model_becomes_current_and_the_forecast_follows_it(models: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    config = runs_config(models, runs)
    assert config.checkpoint_path() == runs / "sfno-demo" / "checkpoint.pt"  # nothing promoted: the old default
    first = compare(models, "good", None)
    assert first.beats and first.current_rmse is None and "no current model" in first.reason
    assert promote(runs, models["good"], first)
    record = read_current(runs)
    assert record["checkpoint_sha256"] == sha256_file(models["good"]) and record["scores"]["current"] is None
    assert record["previous"] is None and record["run_name"] == "good"
    assert config.checkpoint_path() == models["good"]
    assert [x["decision"] for x in lines(runs)] == ["promoted"]
    config.forecast.checkpoint = models["poor"]  # an explicit checkpoint still wins over the promoted one
    assert config.checkpoint_path() == models["poor"]


def test_a_worse_candidate_is_refused_recorded_and_changes_nothing(models: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert promote(runs, models["good"], compare(models, "good", None))
    before = (runs / CURRENT).read_bytes()
    verdict = compare(models, "poor", "good")
    assert not verdict.beats
    assert all(r > 1 for r in verdict.ratio.values()), verdict.ratio
    assert not promote(runs, models["poor"], verdict)
    assert (runs / CURRENT).read_bytes() == before
    assert runs_config(models, runs).checkpoint_path() == models["good"]
    refused = lines(runs)[-1]
    assert refused["decision"] == "refused" and refused["candidate_sha256"] == sha256_file(models["poor"])
    assert refused["scores"]["candidate"] == verdict.candidate_rmse and refused["scores"]["current"] == verdict.current_rmse
    assert refused["period"] == [pd.Timestamp(t).isoformat() for t in models["period"]]


def test_a_better_candidate_is_promoted_with_both_scorecards(models: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert promote(runs, models["poor"], compare(models, "poor", None))
    verdict = compare(models, "good", "poor")
    assert verdict.beats and all(r < 1 for r in verdict.ratio.values())
    assert promote(runs, models["good"], verdict)
    record = read_current(runs)
    assert record["checkpoint_sha256"] == sha256_file(models["good"])
    assert record["previous"]["checkpoint_sha256"] == sha256_file(models["poor"])
    assert record["scores"] == {"candidate": verdict.candidate_rmse, "current": verdict.current_rmse}
    assert record["ratio"] == verdict.ratio and record["lead_hours"] == LEADS
    assert runs_config(models, runs).checkpoint_path() == models["good"]
    assert [x["decision"] for x in lines(runs)] == ["promoted", "promoted"]
    # The same candidate again: nothing to switch, and that is recorded too.
    again = compare(models, "good", "good")
    assert not promote(runs, models["good"], again)
    assert lines(runs)[-1]["decision"] == "unchanged" and (runs / CURRENT).read_text().count("promoted_at") == 1


def test_scores_are_each_models_rmse_on_the_same_initial_times(models: dict) -> None:
    verdict = compare(models, "good", "poor")
    # Every analysis time of the period from which 24 h of truth lies inside it: 16 of its 20 times.
    expected = pd.date_range("2000-01-16T00", "2000-01-19T18", freq="6h")
    assert verdict.init_times == [t.isoformat() for t in expected]
    analysis = open_analysis(models["store"])
    channels = list(verdict.candidate_rmse["6h"])
    g = get_grid("tiny")
    w = g.weights / g.weights.sum()
    for name, scores in (("good", verdict.candidate_rmse), ("poor", verdict.current_rmse)):
        model, meta = load_forecaster(models[name])
        mse = np.zeros((len(LEADS), len(channels)))
        for t in expected:
            states = list(forecast_states(model, meta, analysis, t, 24))
            for j, lead in enumerate(LEADS):
                truth = to_channels(analysis.sel(time=t + pd.Timedelta(hours=lead)), channels).values
                err = (states[lead // 6].astype(np.float64) - truth) ** 2
                mse[j] += (err.mean(axis=-1) * w).sum(axis=-1)
        rmse = np.sqrt(mse / len(expected))
        for j, lead in enumerate(LEADS):
            np.testing.assert_allclose([scores[f"{lead}h"][c] for c in channels], rmse[j], rtol=1e-4)


def test_beating_means_below_one_minus_the_margin_at_every_lead(models: dict) -> None:
    same = compare(models, "good", "good")
    assert same.ratio == {"6h": 1.0, "24h": 1.0} and not same.beats  # a tie is not an improvement
    strict = compare(models, "good", "poor", margin=0.95)  # must be 20× better at every lead
    assert strict.ratio["24h"] < 0.05 < strict.ratio["6h"] and not strict.beats
    assert "not below 0.05 at 6h (" in strict.reason


def test_current_json_is_switched_atomically_under_a_reading_process(models: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = compare(models, "good", None)
    assert promote(runs, models["good"], first)
    shas = {name: sha256_file(models[name]) for name in ("good", "poor")}
    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c",
         "import json, sys; from pathlib import Path; from core.lineage import read_current\n"
         "runs, stop, ok, bad, seen = Path(sys.argv[1]), Path(sys.argv[2]), 0, [], set()\n"
         "while not stop.exists():\n"
         "    try:\n"
         "        seen.add(read_current(runs)['checkpoint_sha256']); ok += 1\n"
         "    except Exception as exc:\n"
         "        bad.append(repr(exc))\n"
         "    if ok == 1:\n"
         "        (stop.parent / 'reading').touch()\n"
         "print(json.dumps({'ok': ok, 'bad': bad[:5], 'n_bad': len(bad), 'seen': sorted(seen)}))\n",
         str(runs), str(stop)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "reading").exists():
            time.sleep(0.05)  # start switching once the reader is reading
        templates = {"good": first, "poor": replace(first, candidate=str(models["poor"]),
                                                    candidate_sha256=shas["poor"])}
        now = "good"
        for i in range(300):
            nxt = "poor" if now == "good" else "good"
            assert promote(runs, models[nxt], replace(templates[nxt], current=str(models[now]),
                                                      current_sha256=shas[now]))
            now = nxt
            if i == 150:
                time.sleep(0.5)  # let the reader run while promotions continue
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    report = json.loads(out)
    assert report["n_bad"] == 0, report["bad"]
    assert report["ok"] > 0 and set(report["seen"]) <= set(shas.values())
    assert len(lines(runs)) == 301 and read_current(runs)["checkpoint_sha256"] == shas[now]


def test_a_stale_comparison_or_a_changed_candidate_is_refused_untouched(models: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    stale = compare(models, "good", None)  # made while nothing was current
    assert promote(runs, models["poor"], compare(models, "poor", None))
    before = (runs / CURRENT).read_bytes(), (runs / PROMOTIONS).read_bytes()
    with pytest.raises(ValueError, match="comparison was made against none"):
        promote(runs, models["good"], stale)
    with pytest.raises(ValueError, match="the comparison is of .*good.*not of .*poor"):
        promote(runs, models["poor"], stale)
    with pytest.raises(ValueError, match="changed since it was compared"):
        promote(runs, models["good"], replace(stale, candidate_sha256="0" * 64))
    assert ((runs / CURRENT).read_bytes(), (runs / PROMOTIONS).read_bytes()) == before


@pytest.mark.parametrize(("kw", "needle"), [
    ({"current": "other"}, "cannot be compared"),
    ({"leads": [9]}, r"leads \[9\] h are not multiples of the model step 6 h"),
    ({"leads": []}, "must list positive lead times"),
    ({"period": ("2000-01-20T00", "2000-01-20T18")}, "no initial time in .* has complete analyses for 24 h"),
    ({"period": ("2000-01-20", "2000-01-19")}, "ends .* before it starts"),
    ({"margin": 1.0}, r"margin 1.0 must be in \[0, 1\)"),
])
def test_bad_comparisons_are_clear_errors(models: dict, kw: dict, needle: str) -> None:
    args = {"current": "poor", "leads": LEADS, "period": models["period"], "margin": 0.0, **kw}
    with pytest.raises(ValueError, match=needle):
        compare_checkpoints(models["good"], models[args["current"]], models["store"], args["period"], args["leads"],
                            args["margin"])


def test_a_damaged_current_json_is_a_clear_error(models: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / CURRENT).write_text('{"checkpoint": "good/checkpoint.pt"')
    with pytest.raises(ValueError, match="current.json is not valid JSON"):
        runs_config(models, runs).checkpoint_path()
    (runs / CURRENT).write_text('{"checkpoint": "good/checkpoint.pt"}')
    with pytest.raises(ValueError, match=r"current.json lacks \['checkpoint_sha256'"):
        runs_config(models, runs).checkpoint_path()
