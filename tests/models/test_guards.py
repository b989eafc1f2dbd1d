"""Non-finite steps are skipped and counted; a run of them stops training with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import models.train as train_module
from models.checkpoint import read_checkpoint
from models.losses import SphereMSE
from models.train import train


def poisoned_loss(bad_calls: set[int] | None) -> type[SphereMSE]:
    """A SphereMSE whose training calls listed in ``bad_calls`` (all if None) come out NaN."""

    class Poisoned(SphereMSE):
        calls = 0

        def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            loss = super().forward(pred, target)
            Poisoned.calls += 1
            if bad_calls is None or Poisoned.calls in bad_calls:
                return loss * float("nan")  # NaN through the graph: the gradients are NaN too
            return loss

    return Poisoned


def test_nan_steps_are_skipped_counted_and_the_weights_stay_finite(tiny_data, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "SphereMSE", poisoned_loss({3, 4}))
    config = tiny_data(max_steps=10)
    path = train(config)
    run_dir = config.paths.runs / config.train.run_name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in records if r["event"] == "val"][-1]
    assert last_val["skipped_steps"] == 2
    assert [r for r in records if r["event"] == "end"][0]["steps"] == 10  # 10 applied steps, 2 skipped on top
    weights = read_checkpoint(run_dir / "last.pt")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert path.is_file()


def test_k_non_finite_steps_in_a_row_stop_with_a_clear_message(tiny_data, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "SphereMSE", poisoned_loss(None))
    config = tiny_data(max_steps=10, max_nonfinite_steps=3)
    with pytest.raises(FloatingPointError, match=r"3 training steps in a row had a non-finite loss or gradient"):
        train(config)


def test_the_limit_must_be_positive(tmp_path: Path) -> None:
    from core.config import config_from_dict

    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        config_from_dict({"train": {"max_nonfinite_steps": 0}})
