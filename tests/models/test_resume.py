"""Crash-safe training: kill real torchrun runs (whole group, or one rank under --max-restarts), resume, and end
with the uninterrupted run's exact weights; resume on another world size; refuse a last.pt that does not fit."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import xarray as xr
import zarr

from core.config import Config, config_from_dict
from models.checkpoint import read_checkpoint
from models.train import train
from tests.models.conftest import TRAIN, moving_planet, write_data
from tests.models.torchrun_harness import (
    cleanup_on_error,
    finish,
    kill_tree,
    launch,
    rank_pid,
    records,
    wait_for_checkpoint,
    write_config,
)

STEPS = 36  # 14 batches per epoch: the runs cross two epoch ends; validations every 4 steps, mid-epoch too
EVERY = 5  # not a multiple of the validations' 4: checkpoints "by steps" fall between them
KILL_AT = 16  # mid-epoch: the resume must skip the batches already consumed


def run_config(root: Path, name: str, **train_opts: object) -> Config:
    """Deterministic tiny-grid run whose schedule follows the step count (the budget never ends it).

    On the CPU (gloo) unless ``device`` is given, so the 2-rank runs work the same on a 1-GPU host.
    """
    t = {**TRAIN, "max_steps": STEPS, "batch_size": 4, "threads": 1, "rollout_steps": 2, "budget_minutes": 1e5,
         "checkpoint_every_steps": EVERY, "deterministic": True, "tensorboard": False, "run_name": name,
         "device": "cpu", **train_opts}
    return config_from_dict({"paths": {"root": str(root)}, "grid": {"preset": "tiny"}, "train": t})


def run_dir(config: Config) -> Path:
    return config.paths.runs / config.train.run_name


def assert_identical(a: Path, b: Path) -> None:
    """Same final weights bit for bit (every tensor and the sha), same best file, same validation scores."""
    for name in ("last.pt", "checkpoint.pt"):
        x, y = read_checkpoint(a / name), read_checkpoint(b / name)
        assert x["meta"]["train_step"] == y["meta"]["train_step"]
        assert x["meta"]["weights_sha256"] == y["meta"]["weights_sha256"], name
        assert x["model"].keys() == y["model"].keys()
        for key, tensor in x["model"].items():
            assert torch.equal(tensor, y["model"][key]), f"{name}: {key} differs"
    assert read_checkpoint(a / "last.pt")["meta"]["train_step"] == STEPS
    scores = [{r["step"]: r["score"] for r in records(d) if r["event"] == "val"} for d in (a, b)]
    assert scores[0] == scores[1]  # the resumed run validated at the same steps with the same results


def kill_after_checkpoint(config: Config, nproc: int) -> tuple[Path, int]:
    """Launch a run, SIGKILL torchrun and its ranks once a checkpoint at step ≥ KILL_AT exists; its config file."""
    path = write_config(config, config.paths.root / f"{config.train.run_name}.yaml")
    with cleanup_on_error(launch(path, nproc)) as proc:
        seen = wait_for_checkpoint(proc, run_dir(config), KILL_AT)
        kill_tree(proc)
    saved = read_checkpoint(run_dir(config) / "last.pt")["meta"]["train_step"]
    assert KILL_AT <= seen <= saved < STEPS  # killed mid-run, after the awaited checkpoint
    assert not any(r["event"] == "end" for r in records(run_dir(config)))
    return path, saved


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume")
    write_data(path, moving_planet())
    return path


@pytest.fixture(scope="module")
def one_rank(root: Path) -> dict[str, Path]:
    """An uninterrupted 1-rank run (in-process) and a 1-rank torchrun killed after a checkpoint."""
    ref = run_config(root, "ref-1")
    train(ref)
    killed = run_config(root, "killed-1")
    kill_after_checkpoint(killed, 1)
    shutil.copytree(run_dir(killed), root / "runs" / "killed-1-copy")  # resumed on 2 ranks below
    return {"ref": run_dir(ref), "killed": run_dir(killed), "copy": root / "runs" / "killed-1-copy"}


@pytest.fixture(scope="module")
def two_ranks(root: Path) -> dict[str, Path]:
    """An uninterrupted 2-rank torchrun run, and one killed after a checkpoint (with an untouched copy)."""
    ref = run_config(root, "ref-2")
    ref_path = write_config(ref, root / "ref-2.yaml")
    killed = run_config(root, "killed-2", max_restarts=1)
    with cleanup_on_error(launch(ref_path, 2)) as reference:  # independent of the killed run: both start now
        path, _ = kill_after_checkpoint(killed, 2)
        finish(reference, ref_path)
    shutil.copytree(run_dir(killed), root / "runs" / "killed-2-copy")
    return {"ref": run_dir(ref), "killed": run_dir(killed), "copy": root / "runs" / "killed-2-copy", "config": path}


def test_killed_one_rank_run_resumes_bit_identical(one_rank: dict[str, Path], root: Path) -> None:
    saved = read_checkpoint(one_rank["killed"] / "last.pt")["meta"]["train_step"]
    train(run_config(root, "killed-1"))  # the rerun, in this process: no torch import to pay again
    assert_identical(one_rank["ref"], one_rank["killed"])
    recs = records(one_rank["killed"])
    events = [r["event"] for r in recs]
    assert events.count("start") == 1 and events.count("resume") == 1 and events[-1] == "end"
    resume = next(r for r in recs if r["event"] == "resume")
    assert resume["step"] == saved and resume["elapsed_s"] > 0  # the budget used before the kill carries over
    assert next(r for r in recs if r["event"] == "end")["elapsed_s"] > resume["elapsed_s"]
    by_steps = {r["step"] for r in recs if r["event"] == "checkpoint" and r["reason"] == "steps"}
    assert by_steps and all(step % EVERY == 0 for step in by_steps)
    # Validation every tenth of the run, mid-epoch too (an epoch is 14 steps here), not only at epoch ends.
    vals = [(r["epoch"], r["step"]) for r in records(one_rank["ref"]) if r["event"] == "val"]
    assert vals[:5] == [(0, 0), (0, 4), (0, 8), (0, 12), (1, 16)] and vals[-1] == (2, STEPS)
    assert not list(one_rank["killed"].glob(".*.tmp"))  # a write torn by the kill is cleaned up


def test_two_rank_group_resumes_and_torchrun_restarts_a_killed_rank(two_ranks: dict[str, Path]) -> None:
    """Resume a SIGKILLed 2-rank group; in that attempt kill rank 1: torchrun restarts both, they resume again."""
    path, directory = two_ranks["config"], two_ranks["killed"]
    saved = read_checkpoint(directory / "last.pt")["meta"]["train_step"]
    before = len(records(directory))
    with cleanup_on_error(launch(path, 2, max_restarts=1)) as proc:
        victim = rank_pid(proc.pid, 1)
        step = wait_for_checkpoint(proc, directory, saved + EVERY, after=before)
        os.kill(victim, signal.SIGKILL)
        finish(proc, path)
    resumes = [r for r in records(directory)[before:] if r["event"] == "resume"]
    assert len(resumes) == 2, resumes  # the relaunch, then torchrun's restart of the group
    assert resumes[0]["step"] == saved and resumes[1]["step"] >= step
    assert all(r["previous_world_size"] == 2 for r in resumes)
    assert_identical(two_ranks["ref"], directory)


def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks: dict[str, Path], root: Path) -> None:
    """Same global batch, data position in global batches: 2 → 1 ranks ends where the 2-rank run ends (fp)."""
    config = run_config(root, "killed-2-copy")
    saved = read_checkpoint(two_ranks["copy"] / "last.pt")["meta"]["train_step"]
    train(config)
    assert_resumed_near(two_ranks["copy"], two_ranks["ref"], saved, previous_world_size=2)


def assert_resumed_near(directory: Path, reference: Path, saved: int, previous_world_size: int) -> None:
    """One resume from ``saved`` on another world size, ending at the reference run's weights (fp tolerance)."""
    resume = [r for r in records(directory) if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["previous_world_size"] == previous_world_size and resume[0]["step"] == saved
    ref = read_checkpoint(reference / "last.pt")["model"]
    mine = read_checkpoint(directory / "last.pt")
    assert mine["meta"]["train_step"] == STEPS
    for key, tensor in ref.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(mine["model"][key], tensor, rtol=1e-4, atol=1e-6)


def test_one_rank_checkpoint_resumes_on_two_ranks(one_rank: dict[str, Path], root: Path) -> None:
    """1 → 2 ranks: the same global batches, split over two ranks, end where the 1-rank run ends (fp)."""
    config = run_config(root, "killed-1-copy")
    saved = read_checkpoint(one_rank["copy"] / "last.pt")["meta"]["train_step"]
    path = write_config(config, root / "killed-1-copy.yaml")
    with cleanup_on_error(launch(path, 2)) as proc:
        finish(proc, path)
    assert_resumed_near(one_rank["copy"], one_rank["ref"], saved, previous_world_size=1)


@pytest.fixture(scope="module")
def signsgd(root: Path) -> dict[str, Path]:
    """2-rank runs with the signSGD hook (error feedback on): one uninterrupted, one killed after a checkpoint."""
    ref = run_config(root, "sign-ref", comm_hook="signsgd")
    ref_path = write_config(ref, root / "sign-ref.yaml")
    killed = run_config(root, "sign-killed", comm_hook="signsgd")
    with cleanup_on_error(launch(ref_path, 2)) as reference:
        path, _ = kill_after_checkpoint(killed, 2)
        finish(reference, ref_path)
    return {"ref": run_dir(ref), "killed": run_dir(killed), "config": path}


def test_a_killed_signsgd_run_resumes_bit_identical(signsgd: dict[str, Path]) -> None:
    """The hook's per-rank residuals (error feedback) are restored: without them the weights would drift."""
    saved = read_checkpoint(signsgd["killed"] / "last.pt")["meta"]["train_step"]
    with cleanup_on_error(launch(signsgd["config"], 2)) as proc:
        finish(proc, signsgd["config"])
    resume = [r for r in records(signsgd["killed"]) if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == saved
    assert_identical(signsgd["ref"], signsgd["killed"])
    end = next(r for r in records(signsgd["killed"]) if r["event"] == "end")
    assert end["comm"]["kind"] == "signsgd" and end["comm"]["bytes_per_step"] < end["comm"]["dense_bytes_per_step"] / 16


# ---- bad input: refused before any step, nothing on disk touched ---------------------------------

def _fingerprint(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A short finished in-process run to resume against."""
    base = tmp_path_factory.mktemp("finished")
    write_data(base, moving_planet())
    config = run_config(base, "base", max_steps=4, checkpoint_every_steps=2, deterministic=False)
    train(config)
    return config


def _other_data(config: Config, tmp: Path, change: str) -> Config:
    """The same run over a copy of the data with one thing changed."""
    data = tmp / "data"
    if change == "grid":
        write_data(tmp, moving_planet("5.625deg"))
    else:
        shutil.copytree(config.paths.data, data)
        stats = xr.load_dataset(data / "stats.nc")
        if change == "stats":
            stats["mean"] = stats["mean"] * 1.01
        else:
            stats.attrs["dataset_version"] = "testing-9"
            zarr.open_group(data / "analysis.zarr", mode="r+").attrs["dataset_version"] = "testing-9"
        stats.to_netcdf(data / "stats.nc")
    out = config.model_copy(deep=True)
    out.paths.data_dir, out.paths.runs_dir = data, config.paths.runs
    if change == "grid":
        out.grid.preset = "5.625deg"
    return out


@pytest.mark.parametrize(("change", "needle"), [
    ("model", "model.embed_dim is 16 in the checkpoint but 8"),
    ("channels", "task.channels is ['geopotential_500', 'u_component_of_wind_500', 'v_component_of_wind_500'] in "
                 "the checkpoint but ['geopotential_500', 'u_component_of_wind_500']"),
    ("grid", "grid is 'tiny:17x32:equiangular-poles' in the checkpoint but '5.625deg:33x64"),
    ("dataset_version", "dataset_version is 'testing-0' in the checkpoint but 'testing-9'"),
    ("stats", "stats mean is"),
    ("batch_size", "train.batch_size is 4 in the checkpoint but 8"),
])
def test_a_last_pt_that_does_not_fit_is_refused_before_any_step(finished: Config, tmp_path: Path, change: str,
                                                                 needle: str) -> None:
    config = finished.model_copy(deep=True)
    if change == "model":
        config.model.embed_dim = 8
    elif change == "channels":
        config.task.variables = ["geopotential", "u_component_of_wind"]
    elif change == "batch_size":
        config.train.batch_size = 8
    else:
        config = _other_data(finished, tmp_path, change)
    before = _fingerprint(run_dir(finished))
    with pytest.raises(ValueError, match="cannot resume") as info:
        train(config)
    assert needle in str(info.value) and "new train.run_name" in str(info.value)
    assert _fingerprint(run_dir(finished)) == before


def test_a_corrupt_last_pt_is_an_error_not_a_fresh_start(finished: Config, tmp_path: Path) -> None:
    config = finished.model_copy(deep=True)
    config.paths.runs_dir = tmp_path / "runs"
    shutil.copytree(run_dir(finished), run_dir(config))
    last = run_dir(config) / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    before = _fingerprint(run_dir(config))
    with pytest.raises(ValueError, match="corrupt or unreadable.*Refusing to start over"):
        train(config)
    assert _fingerprint(run_dir(config)) == before


def test_resuming_a_finished_run_changes_nothing_and_never_starts_over(finished: Config, tmp_path: Path) -> None:
    config = finished.model_copy(deep=True)
    config.paths.runs_dir = tmp_path / "runs"
    shutil.copytree(run_dir(finished), run_dir(config))
    last = (run_dir(config) / "last.pt").read_bytes()
    old_lines = (run_dir(config) / "metrics.jsonl").read_text()
    train(config)  # resume=auto: already at max_steps, so it only records that
    text = (run_dir(config) / "metrics.jsonl").read_text()
    assert text.startswith(old_lines)
    assert [json.loads(x)["event"] for x in text[len(old_lines):].splitlines()] == ["resume", "end"]
    assert (run_dir(config) / "last.pt").read_bytes() == last
    config.train.resume, config.train.max_steps = "never", 2
    train(config)
    text = (run_dir(config) / "metrics.jsonl").read_text()
    assert text.startswith(old_lines)  # the earlier run's lines stay, the new run starts below them
    assert [r["event"] for r in records(run_dir(config))].count("start") == 2
    assert read_checkpoint(run_dir(config) / "last.pt")["meta"]["train_step"] == 2


def test_fp16_on_cpu_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    write_data(tmp_path, moving_planet())
    config = run_config(tmp_path, "fp16", precision="fp16")
    with pytest.raises(ValueError, match="train.precision=fp16 needs CUDA"):
        train(config)
    assert not run_dir(config).exists()


@pytest.mark.parametrize(("bad", "needle"), [
    ({"checkpoint_every_steps": 0}, "checkpoint_every_steps 0 must be ≥ 1"),
    ({"checkpoint_every_minutes": 0}, "checkpoint_every_minutes 0.0 must be > 0"),
    ({"max_restarts": -1}, "max_restarts -1 must be ≥ 0"),
    ({"max_restarts": 2, "resume": "never"}, "max_restarts > 0 needs resume: auto"),
    ({"resume": "always"}, "train.resume"),
])
def test_resume_settings_are_checked(bad: dict, needle: str) -> None:
    with pytest.raises(ValueError, match="invalid config") as info:
        config_from_dict({"train": bad})
    assert needle in str(info.value)



def test_checkpoints_also_follow_the_wall_clock(finished: Config, tmp_path: Path) -> None:
    config = finished.model_copy(deep=True)
    config.paths.runs_dir = tmp_path / "runs"
    config.train.max_steps, config.train.checkpoint_every_steps, config.train.checkpoint_every_minutes = 12, None, 1e-6
    train(config)
    saves = [(r["step"], r["reason"]) for r in records(run_dir(config)) if r["event"] == "checkpoint"]
    # A 60 µs interval is due before every step; never twice for one step: the validations every tenth of the run
    # (here every other step, mid-epoch) write the checkpoint of theirs.
    assert saves == [(s, "validation" if s % 2 == 0 else "minutes") for s in range(13)]


@pytest.mark.gpu
def test_fp16_on_cuda_checkpoints_and_resumes_its_loss_scale(tmp_path: Path) -> None:
    write_data(tmp_path, moving_planet())
    config = run_config(tmp_path, "fp16", precision="fp16", max_steps=4, deterministic=False, device="cuda")
    train(config)
    scaler = read_checkpoint(run_dir(config) / "last.pt")["training"]["scaler"]
    assert scaler and scaler["scale"] > 0
    config.train.max_steps = 6  # continue the finished run for two more steps
    train(config)
    resume = [r for r in records(run_dir(config)) if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 4
    assert read_checkpoint(run_dir(config) / "last.pt")["meta"]["train_step"] == 6


# ---- bf16 under torchrun: one rank on the CPU (gloo), and on one GPU (nccl) where there is one -----

def killed_and_resumed(root: Path, name: str, **train_opts: object) -> dict[str, Path]:
    """A 1-rank torchrun run, and its twin SIGKILLed after a checkpoint then relaunched; asserts they end identical."""
    ref = run_config(root, f"{name}-ref", **train_opts)
    ref_path = write_config(ref, root / f"{name}-ref.yaml")
    killed = run_config(root, f"{name}-killed", **train_opts)
    with cleanup_on_error(launch(ref_path, 1)) as reference:  # independent of the killed run: both start now
        path, saved = kill_after_checkpoint(killed, 1)
        finish(reference, ref_path)
    with cleanup_on_error(launch(path, 1)) as proc:
        finish(proc, path)
    resume = [r for r in records(run_dir(killed)) if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == saved
    assert_identical(run_dir(ref), run_dir(killed))
    return {"ref": run_dir(ref), "killed": run_dir(killed)}


def test_a_killed_bf16_torchrun_run_resumes_bit_identical(root: Path) -> None:
    """The code path of the one-GPU test below on the CPU: a lone torchrun rank in a gloo group, under DDP."""
    runs = killed_and_resumed(root, "bf16", precision="bf16")
    vals = [r for d in runs.values() for r in records(d) if r["event"] == "val"]
    assert vals and {v["precision"] for v in vals} == {"bf16"}
    starts = [r for d in runs.values() for r in records(d) if r["event"] in ("start", "resume")]
    assert len(starts) == 3 and {(r["backend"], r["world_size"]) for r in starts} == {("gloo", 1)}


@pytest.mark.gpu
def test_a_killed_bf16_run_on_one_gpu_resumes_bit_identical(root: Path) -> None:
    """torchrun on one GPU: its rank takes cuda:0 from LOCAL_RANK, joins an nccl group of one and trains
    under DDP, with bf16 autocast and deterministic kernels; the CUDA RNG stream and pinned batches resume too."""
    runs = killed_and_resumed(root, "gpu-bf16", precision="bf16", device="cuda")
    starts = [r for d in runs.values() for r in records(d) if r["event"] in ("start", "resume")]
    assert len(starts) == 3 and {r["device"] for r in starts} == {"cuda:0"}
    assert {(r["backend"], r["world_size"]) for r in starts} == {("nccl", 1)}
    ends = [r for d in runs.values() for r in records(d) if r["event"] == "end"]
    assert len(ends) == 2 and all(e["comm"]["kind"] == "none" for e in ends)  # the DDP hook counted the all-reduce
    vals = [r for d in runs.values() for r in records(d) if r["event"] == "val"]
    assert {v["precision"] for v in vals} == {"bf16"}
