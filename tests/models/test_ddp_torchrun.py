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
    config = tiny_data(max_steps=6, batch_size=4, threads=1)
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


def test_batch_not_divisible_by_ranks_exits_nonzero_with_a_clear_message(tiny_data, tmp_path: Path) -> None:
    config = tiny_data(batch_size=3)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(dump_config(config)))
    proc = _torchrun(cfg)
    assert proc.returncode != 0
    assert "train.batch_size 3 is not divisible by the world size 2" in proc.stderr
    assert not (config.paths.runs / config.train.run_name / "checkpoint.pt").exists()
