"""The training loop's structure: its state object, its phases, and what the modules around it may import."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import models.train as train_module
from models.checkpoint import read_checkpoint
from models.distributed import DistContext
from models.prepare import prepare
from models.resume import Position
from models.train import Trainer, TrainState

MODELS = Path(train_module.__file__).parent
CPU = DistContext(0, 1, 0, torch.device("cpu"))


def test_train_state_round_trips_through_its_state_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 107.5])  # start_clock(), then state_dict()'s elapsed()
    monkeypatch.setattr(train_module.time, "monotonic", lambda: next(clock))
    state = TrainState(pos=Position(step=7, epoch=1, batch=3, elapsed_s=20.0, next_val=0.3, val_step=6, best=0.4))
    state.start_clock()
    saved = state.state_dict()
    assert saved == {"step": 7, "epoch": 1, "batch": 3, "elapsed_s": 27.5, "next_val": 0.3, "val_step": 6,
                     "best": 0.4}  # this attempt's 7.5 s added to the earlier attempts' 20 s
    other = TrainState()
    other.load_state_dict(json.loads(json.dumps(saved)))  # what a checkpoint stores is plain JSON
    assert other.pos == Position(step=7, epoch=1, batch=3, elapsed_s=27.5, next_val=0.3, val_step=6, best=0.4)
    assert other.pos.saved_step == 7  # the restored step counts as saved: no second checkpoint of it


def test_mean_loss_starts_a_new_mean_after_each_validation() -> None:
    state = TrainState(losses=[1.0, 2.0, 6.0])
    assert state.mean_loss() == 3.0 and state.losses == [] and state.mean_loss() is None


def test_the_phases_step_validate_and_checkpoint_one_by_one(tiny_data) -> None:
    """Drive the trainer by hand: setup, two steps, validate; its state_dict continues in a fresh trainer."""
    config = tiny_data(tensorboard=False, max_steps=4)
    trainer = Trainer(prepare(config, CPU, config.train.batch_size))
    trainer.setup()
    trainer.bar = train_module.tqdm(disable=True)
    batches = iter(trainer.loader)
    for _ in range(2):
        trainer.step(*next(batches))
    assert trainer.state.pos.step == 2 and len(trainer.state.losses) == 2
    trainer.validate()  # scores, records, and writes last.pt (and checkpoint.pt: the first score is a best)
    assert trainer.state.pos.val_step == 2 and trainer.state.losses == [] and math.isfinite(trainer.state.pos.best)
    run_dir = config.paths.runs / config.train.run_name
    saved = read_checkpoint(run_dir / "last.pt")
    assert saved["meta"]["train_step"] == 2 and saved["training"]["position"]["step"] == 2
    assert (run_dir / "checkpoint.pt").is_file()
    events = [json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events == ["start", "val", "checkpoint"]
    fresh = Trainer(prepare(config, CPU, config.train.batch_size))
    fresh.setup()
    fresh.load_state_dict(trainer.state_dict())
    kept = ("step", "epoch", "batch", "next_val", "val_step", "best")
    assert [getattr(fresh.state.pos, k) for k in kept] == [getattr(trainer.state.pos, k) for k in kept]
    assert fresh.state.pos.elapsed_s > 0  # the wall time of the first trainer's attempt carried over
    assert fresh.optimizer.state_dict()["state"][0]["step"] == trainer.optimizer.state_dict()["state"][0]["step"] == 2


def test_the_loop_parts_do_not_import_the_loop() -> None:
    """Recorder, preparation, resume state and the DDP adapter sit below models.train (no cycle, even for typing)."""
    import grimp

    graph = grimp.build_graph("models", "core", cache_dir=None)
    for part in ("models.recorder", "models.prepare", "models.resume", "models.rank_state", "models.ddp"):
        assert graph.find_shortest_chain(importer=part, imported="models.train") is None, part


def test_private_ddp_members_are_read_in_the_adapter_only() -> None:
    private = re.compile(r"\._comm_hooks|_get_zeros_like_grad_buckets|\"_comm_hooks\"|\breducer\b")
    users = sorted(p.name for p in MODELS.glob("*.py") if private.search(p.read_text()))
    assert users == ["ddp.py"]
