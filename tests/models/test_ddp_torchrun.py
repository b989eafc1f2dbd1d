"""Two CPU ranks (gloo) through a real ``torchrun -m models.train`` subprocess on the tiny grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from core.config import dump_config
from models.checkpoint import load_for_inference
from tests.models.conftest import REPO


def _torchrun(config_path: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPHERECAST_", "WORLD_SIZE", "RANK", "LOCAL_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "models.train", "--config", str(config_path)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_rank_gloo_training_writes_a_valid_checkpoint(tiny_data, tmp_path: Path) -> None:
    config = tiny_data(max_steps=6, batch_size=4, threads=1, device="cpu")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dump_config(config)))
    proc = _torchrun(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = config.paths.runs / config.train.run_name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start, end = records[0], records[-1]
    assert start["event"] == "start" and start["world_size"] == 2  # only rank 0 wrote, once
    assert end["event"] == "end" and end["steps"] == 6  # both ranks stopped at the same step
    assert sum(r["event"] == "start" for r in records) == 1
    model, meta = load_for_inference(run_dir / "checkpoint.pt")
    assert meta["train_step"] in {r["step"] for r in records if r["event"] == "val"}
    assert "joined the gloo process group" in proc.stderr


def test_one_torchrun_rank_joins_a_gloo_group_and_trains_under_ddp(tiny_data, tmp_path: Path) -> None:
    """A world of one under torchrun takes the multi-rank path: a process group (gloo on the CPU) and DDP."""
    config = tiny_data(max_steps=4, batch_size=4, threads=1, device="cpu")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dump_config(config)))
    proc = _torchrun(cfg, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/1 joined the gloo process group" in proc.stderr
    run_dir = config.paths.runs / config.train.run_name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start, end = records[0], records[-1]
    assert (start["event"], start["world_size"], start["device"], start["backend"]) == ("start", 1, "cpu", "gloo")
    assert end["event"] == "end" and end["steps"] == 4
    assert end["comm"]["kind"] == "none" and end["comm"]["steps"] == 4  # DDP's all-reduce hook ran every step


def test_batch_not_divisible_by_ranks_exits_nonzero_with_a_clear_message(tiny_data, tmp_path: Path) -> None:
    config = tiny_data(batch_size=3, device="cpu")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dump_config(config)))
    proc = _torchrun(cfg)
    assert proc.returncode != 0
    assert "train.batch_size 3 is not divisible by the world size 2" in proc.stderr
    assert not (config.paths.runs / config.train.run_name / "checkpoint.pt").exists()


def test_two_ranks_end_with_the_weights_of_one_rank_at_the_same_global_batch(tiny_data, tmp_path: Path) -> None:
    """DDP with the global batch split over 2 ranks is the same optimisation as 1 rank (fp tolerance)."""
    import torch

    from models.checkpoint import read_checkpoint
    from models.train import train

    # A budget far beyond the run makes progress (hence lr and rollout length) a function of the step
    # alone, so the two runs see the same schedule; the step cap ends both.
    config = tiny_data(max_steps=6, batch_size=4, threads=1, budget_minutes=100000.0, device="cpu")
    two = config.model_copy(deep=True)
    two.train.run_name = "two-ranks"
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(dump_config(two)))
    proc = _torchrun(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = config.model_copy(deep=True)
    one.train.run_name = "one-rank"
    train(one)
    w1 = read_checkpoint(config.paths.runs / "one-rank" / "last.pt")["model"]
    w2 = read_checkpoint(config.paths.runs / "two-ranks" / "last.pt")["model"]
    assert w1.keys() == w2.keys()
    assert read_checkpoint(config.paths.runs / "one-rank" / "last.pt")["meta"]["train_step"] == 6
    for name, a in w1.items():
        if a.is_floating_point():
            torch.testing.assert_close(w2[name], a, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # The comparison can tell runs apart: half the global batch is a different optimisation.
    half = config.model_copy(deep=True)
    half.train.run_name, half.train.batch_size = "half-batch", 2
    train(half)
    w3 = read_checkpoint(config.paths.runs / "half-batch" / "last.pt")["model"]
    gaps = [float((w3[n] - a).abs().max()) for n, a in w1.items() if a.is_floating_point()]
    assert max(gaps) > 1e-3
