"""In-process training on the tiny grid: loss goes down, files appear, bad setups fail before a step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xarray as xr

from core.schema import validate_checkpoint_meta
from models.checkpoint import load_for_inference
from models.schedule import BudgetCosine, rollout_steps_at
from models.train import main, train


def _records(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_short_run_learns_and_writes_checkpoints(tiny_data) -> None:
    config = tiny_data(max_steps=40, rollout_steps=2)
    path = train(config)
    run_dir = config.paths.runs / config.train.run_name
    assert path == run_dir / "checkpoint.pt" and path.is_file() and (run_dir / "last.pt").is_file()
    vals = _records(run_dir, "val")
    assert vals[0]["step"] == 0 and vals[-1]["step"] == 40
    losses = [v["train_loss"] for v in vals[1:]]
    assert losses[-1] < 0.5 * losses[0]  # the training loss falls
    # The drifting pattern is predictable: the model must end better than it started on held-out time.
    assert vals[-1]["relative_error"]["24h"]["model"] < vals[0]["relative_error"]["24h"]["model"]
    assert set(vals[-1]["rmse"]) == {"6h", "24h"}
    assert set(vals[-1]["rmse"]["24h"]) == set(config.task.channels())
    assert max(v["rollout_steps"] for v in vals) == 2  # the multistep curriculum reached its target
    model, meta = load_for_inference(path)
    validate_checkpoint_meta(meta)
    assert meta["val_score"] == min(v["score"] for v in vals)  # checkpoint.pt is the best one
    end = _records(run_dir, "end")[0]
    assert end["steps"] == 40


def test_times_not_done_are_never_used(tiny_data) -> None:
    config = tiny_data(not_done=tuple(range(0, 30)), max_steps=2)
    train(config)
    run_dir = config.paths.runs / config.train.run_name
    # 60 training times, 0–29 not done: 2-step windows can start at 30 … 57 only.
    assert _records(run_dir, "start")[0]["train_windows"] == 28
    assert _records(run_dir, "val")[0]["windows"] == 16  # the validation period is untouched


def test_missing_stats_fail_before_training(tiny_data) -> None:
    config = tiny_data()
    config.paths.stats_file.unlink()
    with pytest.raises(ValueError, match="statistics file .* does not exist"):
        train(config)
    assert not (config.paths.runs / config.train.run_name).exists()


def test_stats_of_another_dataset_version_fail(tiny_data) -> None:
    config = tiny_data()
    stats = xr.load_dataset(config.paths.stats_file)
    stats.attrs["dataset_version"] = "something-else"
    stats.to_netcdf(config.paths.stats_file)
    with pytest.raises(ValueError, match="dataset_version 'something-else'"):
        train(config)


def test_grid_mismatch_between_config_and_store_fails(tiny_data) -> None:
    config = tiny_data()
    config.grid.preset = "5.625deg"
    with pytest.raises(ValueError, match="does not match config grid"):
        train(config)


def test_batch_not_divisible_by_world_size_fails_first(tiny_data, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_data(batch_size=4)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        train(config)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"paths: {{root: {tmp_path}}}\ngrid: {{preset: tiny}}\n")
    assert main(["--config", str(cfg)]) == 2  # no store there


def test_cosine_schedule_warms_up_and_decays() -> None:
    import torch

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = BudgetCosine(opt, peak=1e-3, warmup_steps=10, final_fraction=0.0)
    assert sched.update(0, 0.0) == pytest.approx(1e-4)
    assert sched.update(9, 0.0) == pytest.approx(1e-3)
    assert sched.update(100, 0.5) == pytest.approx(5e-4)
    assert sched.update(200, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert [rollout_steps_at(p, 4, ramp=0.4) for p in (0.05, 0.15, 0.25, 0.35, 0.5)] == [1, 2, 3, 4, 4]
    # Start 2, +2 per stage, at most 8: stages at 0, 1/4, 2/4, 3/4 of a 0.4 ramp.
    assert [rollout_steps_at(p, 8, 0.4, 2, 2) for p in (0.0, 0.09, 0.11, 0.21, 0.31, 0.9)] == [2, 2, 4, 6, 8, 8]
    # An increment that overshoots is capped at the maximum; start = max means no curriculum.
    assert [rollout_steps_at(p, 5, 0.5, 1, 3) for p in (0.0, 0.26, 0.5)] == [1, 4, 5]
    assert rollout_steps_at(0.0, 3, 0.3, 3, 1) == 3


@pytest.mark.parametrize("bad", [{"rollout_start": 0}, {"rollout_start": 3, "rollout_steps": 2},
                                 {"rollout_increment": 0}, {"rollout_ramp": 0.0}, {"rollout_ramp": 1.5}])
def test_rollout_schedule_settings_are_checked(bad: dict) -> None:
    from core.config import config_from_dict

    with pytest.raises(ValueError, match="rollout_"):
        config_from_dict({"train": bad})


def test_bf16_autocast_on_cpu_learns_and_reports_precision_and_memory(tiny_data) -> None:
    # With activation checkpointing on as well: the two memory savers combine.
    config = tiny_data(max_steps=30, rollout_steps=1, precision="bf16", activation_checkpointing=True, device="cpu")
    train(config)
    vals = _records(config.paths.runs / config.train.run_name, "val")
    assert {v["precision"] for v in vals} == {"bf16"}
    assert vals[-1]["train_loss"] < 0.7 * vals[1]["train_loss"]
    assert all(v["peak_memory_mb"] > 50 for v in vals)  # a Python + torch process: well above 50 MB
    fp32 = config.model_copy(deep=True)
    fp32.train.run_name, fp32.train.precision, fp32.train.max_steps = "fp32", "auto", 2
    train(fp32)
    assert {v["precision"] for v in _records(fp32.paths.runs / "fp32", "val")} == {"fp32"}  # auto on CPU


def test_tensorboard_holds_training_and_validation_scalars(tiny_data) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_data(max_steps=8)
    train(config)
    logdir = config.paths.runs / config.train.run_name / "tensorboard"
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss", "lr", "grad_norm", "samples_per_s", "peak_memory_mb", "rollout_steps"):
        assert f"train/{name}" in tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(8))
    assert all(e.value > 0 for e in events.Scalars("train/samples_per_s"))
    # add_scalars writes one run per series: model and persistence side by side, per lead and channel.
    runs = {p.relative_to(logdir).as_posix() for p in logdir.rglob("events.*")}
    assert any(r.startswith("val_relative_error_24h_persistence") for r in runs), runs
    assert any(r.startswith("val_rmse_24h_geopotential_500_model") for r in runs), runs


def test_input_noise_is_seeded_and_changes_what_is_learned(tiny_data) -> None:
    import torch

    from core.config import config_from_dict, deep_merge, dump_config
    from models.checkpoint import read_checkpoint

    base = tiny_data(max_steps=4, deterministic=True, tensorboard=False)

    def weights(run_name: str, noise: float) -> dict:
        config = config_from_dict(deep_merge(dump_config(base), {"train": {"run_name": run_name, "input_noise": noise}}))
        train(config)
        return read_checkpoint(config.paths.runs / run_name / "last.pt")["model"]

    noisy, again, clean = weights("noisy", 0.1), weights("noisy-again", 0.1), weights("clean", 0.0)
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)  # the noise comes from the seeded RNG
    assert not all(torch.equal(noisy[k], clean[k]) for k in noisy)  # and it reaches the training step
    with pytest.raises(ValueError, match="input_noise 1.5 must be in"):
        config_from_dict({"train": {"input_noise": 1.5}})


def test_rollout_grad_first_reaches_the_training_step(tiny_data) -> None:
    import torch

    from core.config import config_from_dict, deep_merge, dump_config
    from models.checkpoint import read_checkpoint

    base = tiny_data(max_steps=3, deterministic=True, tensorboard=False, rollout_steps=3, rollout_start=3,
                     rollout_grad_steps=1)

    def weights(run_name: str, first: int) -> dict:
        config = config_from_dict(deep_merge(dump_config(base), {"train": {"run_name": run_name,
                                                                           "rollout_grad_first": first}}))
        train(config)
        return read_checkpoint(config.paths.runs / run_name / "last.pt")["model"]

    last_only, with_first, again = weights("last", 0), weights("first", 1), weights("first-again", 1)
    assert all(torch.equal(with_first[k], again[k]) for k in with_first)
    assert not all(torch.equal(with_first[k], last_only[k]) for k in with_first)  # the first step's gradient counts
    with pytest.raises(ValueError, match="rollout_grad_first -1 must be ≥ 0"):
        config_from_dict({"train": {"rollout_grad_first": -1}})


def test_validation_leads_are_configurable_and_the_longest_picks_the_best(tiny_data) -> None:
    config = tiny_data(max_steps=4, val_lead_hours=[6, 12, 48], tensorboard=False)
    train(config)
    vals = _records(config.paths.runs / config.train.run_name, "val")
    assert set(vals[-1]["rmse"]) == {"6h", "12h", "48h"}
    assert all(v["score"] == v["relative_error"]["48h"]["model"] for v in vals)
    from core.config import config_from_dict, deep_merge, dump_config

    odd = config_from_dict(deep_merge(dump_config(config), {"train": {"run_name": "odd", "val_lead_hours": [6, 9]}}))
    with pytest.raises(ValueError, match=r"val_lead_hours \[9\] are not multiples of the model step 6 h"):
        train(odd)
    assert not (odd.paths.runs / "odd").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="val_lead_hours"):
        config_from_dict({"train": {"val_lead_hours": []}})


def test_mean_validation_score_weighs_every_lead_against_persistence(tiny_data) -> None:
    config = tiny_data(max_steps=6, val_lead_hours=[6, 24], val_score="mean", tensorboard=False)
    path = train(config)
    vals = _records(config.paths.runs / config.train.run_name, "val")
    assert len(vals) >= 2
    for v in vals:
        ratios = [e["model"] / e["persistence"] for e in v["relative_error"].values()]
        assert v["score"] == pytest.approx(sum(ratios) / 2, rel=1e-12)
        assert v["score"] != pytest.approx(v["relative_error"]["24h"]["model"])  # not the longest lead's error
    _, meta = load_for_inference(path)
    assert meta["val_score"] == pytest.approx(min(v["score"] for v in vals))  # the best file holds the lowest
    from core.config import config_from_dict

    with pytest.raises(ValueError, match="val_score"):
        config_from_dict({"train": {"val_score": "median"}})


def test_validation_score_ranks_by_longest_lead_or_mean_gain_over_persistence() -> None:
    from models.evaluate import validation_score

    errors = {"6h": {"model": 0.2, "persistence": 0.4}, "120h": {"model": 0.9, "persistence": 1.0},
              "24h": {"model": 0.3, "persistence": 0.6}}
    assert validation_score(errors, "longest") == 0.9  # by hours, not by the order of the keys
    assert validation_score(errors, "mean") == pytest.approx((0.5 + 0.9 + 0.5) / 3)
    assert validation_score({"6h": {"model": 0.2, "persistence": 0.0}}, "mean") == float("inf")


def test_validation_stride_scores_every_nth_window(tiny_data) -> None:
    from core.config import config_from_dict, deep_merge, dump_config

    full = tiny_data(max_steps=2, tensorboard=False, run_name="full")
    train(full)
    strided = config_from_dict(deep_merge(dump_config(full), {"train": {"run_name": "strided", "val_stride": 2}}))
    train(strided)
    n = _records(full.paths.runs / "full", "val")[0]["windows"]
    vals = _records(strided.paths.runs / "strided", "val")
    assert n >= 3 and all(v["windows"] == (n + 1) // 2 for v in vals)  # windows 0, 2, 4, …
    with pytest.raises(ValueError, match="val_stride 0 must be ≥ 1"):
        config_from_dict({"train": {"val_stride": 0}})
