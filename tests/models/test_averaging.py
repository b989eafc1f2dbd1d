"""Weight averaging over the tail of a run: the arithmetic, what validation scores and checkpoints hold, exact resume
after a crash with an average in flight, and the settings a resume refuses to change."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from core.config import Config, config_from_dict
from models.averaging import WeightAverage, main
from models.checkpoint import load_for_inference, read_checkpoint
from models.evaluate import SINGLE, evaluate
from models.prepare import prepare
from models.train import Trainer, train
from tests.models.conftest import moving_planet, write_data
from tests.models.test_resume import STEPS, assert_identical, run_config, run_dir
from tests.models.torchrun_harness import records

EMA = {"ema_decay": 0.9, "ema_start": 0.5}  # 18 steps averaged: 10 uniform, then exponential


class Crash(Exception):
    """Stands for the process dying mid-run (after a checkpoint, before the next)."""


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_a_uniform_mean_then_an_exponential_one_by_hand() -> None:
    model = nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.75, start=0.5)
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    for i, v in enumerate(values):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(v)
        average.update(progress=i / 6)  # 0, 1/6, 2/6 before the start; 4.0 (at 3/6) is the first averaged
    # 4 alone; then min(0.75, n/(n+1)): 1/2 → mean(4, 5) = 4.5; 2/3 → mean(4, 5, 6) = 5; 3/4 → 0.75·5 + 0.25·7
    assert average.count == 4
    expected = 0.75 * 5.0 + 0.25 * 7.0
    with average.applied():
        assert all(torch.allclose(p, torch.full_like(p, expected)) for p in model.parameters())
    assert all(torch.equal(p, torch.full_like(p, 7.0)) for p in model.parameters())  # its own weights again


def test_the_state_round_trips_the_training_weights_and_the_average() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.5, start=0.0)
    for _ in range(3):
        average.update(1.0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    own = _weights(model)
    state = average.state_dict()
    with average.applied():  # what a checkpoint's model holds
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}
        averaged = _weights(model)
    fresh = nn.Linear(3, 2)
    fresh.load_state_dict(saved_model)
    restored = WeightAverage(fresh, decay=0.5, start=0.0)
    restored.load_state_dict(state)
    assert restored.count == 3
    assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), own, strict=True))
    with restored.applied():
        assert all(torch.equal(a, b) for a, b in zip(_weights(fresh), averaged, strict=True))


def test_off_by_default_and_nothing_is_averaged_before_the_start() -> None:
    model = nn.Linear(2, 2)
    off = WeightAverage(model, decay=0.0, start=0.0)
    off.update(1.0)
    assert not off.enabled and not off.active and off.state_dict() is None
    late = WeightAverage(model, decay=0.9, start=0.5)
    late.update(0.49)
    assert late.enabled and not late.active
    assert late.state_dict() == {"decay": 0.9, "start": 0.5, "count": 0, "training_weights": None}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("averaging")
    write_data(path, moving_planet())
    return path


@pytest.fixture(scope="module")
def averaged(root: Path) -> Config:
    """An uninterrupted averaging run of STEPS steps."""
    config = run_config(root, "ema-ref", **EMA)
    train(config)
    return config


def test_validation_scores_and_checkpoints_hold_the_average(averaged: Config) -> None:
    directory = run_dir(averaged)
    vals = [r for r in records(directory) if r["event"] == "val"]
    # Before half the run the training weights are scored; then the average of every step since.
    assert [r["averaged_steps"] for r in vals if r["step"] <= STEPS // 2] == [0] * 5
    assert vals[-1]["step"] == STEPS and vals[-1]["averaged_steps"] == STEPS // 2
    last = read_checkpoint(directory / "last.pt")
    entry = last["training"]["average"]
    assert (entry["decay"], entry["start"], entry["count"]) == (0.9, 0.5, STEPS // 2)
    trained = entry["training_weights"]
    assert any(not torch.equal(last["model"][name], w) for name, w in trained.items())  # the file holds the average
    # The final score is the saved model's: re-scoring the file gives the recorded number.
    setup = prepare(averaged, SINGLE, averaged.train.batch_size)
    model, _ = load_for_inference(directory / "last.pt")
    again = evaluate(model, setup.val_ds, setup.lead_steps, averaged.task.time_step_hours,
                     setup.train_ds.time_mean(), SINGLE, score=averaged.train.val_score)
    assert again["score"] == pytest.approx(vals[-1]["score"], rel=1e-6)


def test_a_crash_with_an_average_in_flight_resumes_bit_identical(averaged: Config, root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = run_config(root, "ema-crash", **EMA)
    real_step = Trainer.step

    def dying_step(self: Trainer, x0: torch.Tensor, y: torch.Tensor) -> None:
        if self.state.pos.step == 27:  # averaging since step 18; last.pt was written at step 25
            raise Crash
        real_step(self, x0, y)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "step", dying_step)
        with pytest.raises(Crash):
            train(config)
    saved = read_checkpoint(run_dir(config) / "last.pt")["training"]
    assert saved["position"]["step"] == 25 and saved["average"]["count"] == 25 - STEPS // 2
    train(config)
    assert_identical(run_dir(averaged), run_dir(config))
    ref, resumed = (read_checkpoint(run_dir(c) / "last.pt")["training"]["average"] for c in (averaged, config))
    assert ref["count"] == resumed["count"]
    assert all(torch.equal(ref["training_weights"][k], w) for k, w in resumed["training_weights"].items())


@pytest.mark.parametrize(("change", "needle"), [
    ({"ema_decay": 0.0}, "train.ema_decay is 0.9 in the checkpoint but 0.0"),
    ({"ema_decay": 0.99}, "train.ema_decay is 0.9 in the checkpoint but 0.99"),
    ({"ema_start": 0.25}, "train.ema_start is 0.5 in the checkpoint but 0.25"),
])
def test_a_resume_refuses_other_averaging_settings(averaged: Config, tmp_path: Path, change: dict,
                                                    needle: str) -> None:
    config = averaged.model_copy(deep=True)
    config.paths.runs_dir = tmp_path / "runs"
    shutil.copytree(run_dir(averaged), run_dir(config))
    before = (run_dir(config) / "last.pt").read_bytes()
    for key, value in change.items():
        setattr(config.train, key, value)
    with pytest.raises(ValueError, match="cannot resume") as info:
        train(config)
    assert needle in str(info.value)
    assert (run_dir(config) / "last.pt").read_bytes() == before


def test_a_run_without_averaging_resumes_a_last_pt_from_before_the_setting(root: Path) -> None:
    config = run_config(root, "old-file", max_steps=4)
    train(config)
    last = run_dir(config) / "last.pt"
    obj = read_checkpoint(last)
    del obj["training"]["data"]["ema_decay"]  # as written before the setting existed
    torch.save(obj, last)
    config.train.max_steps = 4
    train(config)  # resumes (already finished): no refusal
    assert [r["event"] for r in records(run_dir(config))][-2:] == ["resume", "end"]


@pytest.mark.parametrize(("bad", "needle"), [
    ({"ema_decay": 1.0}, "ema_decay 1.0 must be in [0, 1)"),
    ({"ema_decay": -0.1}, "ema_decay -0.1 must be in [0, 1)"),
    ({"ema_start": 1.0}, "ema_start 1.0 must be in [0, 1)"),
])
def test_averaging_settings_are_checked(bad: dict, needle: str) -> None:
    with pytest.raises(ValueError, match="invalid config") as info:
        config_from_dict({"train": bad})
    assert needle in str(info.value)



def test_the_training_weights_come_out_as_a_checkpoint_of_their_own(averaged: Config, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    last = run_dir(averaged) / "last.pt"
    before = last.read_bytes()
    out = tmp_path / "training-weights.pt"
    assert main([str(last), str(out)]) == 0 and str(out) in capsys.readouterr().out
    model, meta = load_for_inference(out)  # checks the sha against the weights
    trained = read_checkpoint(last)["training"]["average"]["training_weights"]
    assert all(torch.equal(model.state_dict()[name], w) for name, w in trained.items())
    assert meta["train_step"] == STEPS and last.read_bytes() == before


@pytest.mark.parametrize("case", ["no average", "same file"])
def test_a_file_without_training_weights_or_the_same_path_is_refused(root: Path, averaged: Config, tmp_path: Path,
                                                                    case: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    if case == "no average":
        plain = run_config(root, "plain", max_steps=2)
        train(plain)
        source, target, needle = run_dir(plain) / "last.pt", tmp_path / "x.pt", "holds no training weights"
    else:
        source = target = run_dir(averaged) / "last.pt"
        needle = "is the checkpoint being read"
    before = source.read_bytes()
    assert main([str(source), str(target)]) == 2
    assert needle in capsys.readouterr().out
    assert source.read_bytes() == before and (case == "same file" or not target.exists())
