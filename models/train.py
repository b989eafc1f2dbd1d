"""Train the SFNO: ``torchrun --nproc_per_node=N -m models.train --config cfg.yaml`` (or ``train(config)``).

Each rank loads the training and validation periods of the analysis store into memory, takes an
equal share of every global batch (``DistributedSampler``), and DDP averages the gradients. The
loss is the area-weighted MSE of normalized tendencies over a multistep rollout whose length grows
from ``train.rollout_start`` by ``train.rollout_increment`` to ``train.rollout_steps`` over
``train.rollout_ramp`` of the budget (curriculum). Adam with warm-up and cosine decay over the budget;
rank 0 owns the clock and broadcasts progress and the stop decision, so every rank stops at the same
step. Validation (RMSE of model vs persistence at 6 h and 24 h) runs at epoch ends roughly every
tenth of the budget and at the end; rank 0 appends it to ``metrics.jsonl`` and writes
``checkpoint.pt`` (best validation score) and ``last.pt`` atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from core.config import Config, dump_config, load_config
from core.grid import Grid, parse_grid_attr
from models.checkpoint import build_meta, save_checkpoint
from models.comm_hooks import CommStats, comm_hook_options, register_comm_hook
from models.data import WindowDataset, open_analysis
from models.distributed import (
    DistContext,
    broadcast_floats,
    init_distributed,
    per_rank_batch,
    set_threads,
    shutdown_distributed,
    world_size_from_env,
)
from models.evaluate import evaluate
from models.guards import NonFiniteGuard
from models.losses import SphereMSE
from models.normalization import Normalized, Rollout
from models.schedule import BudgetCosine, rollout_steps_at
from models.sfno import SFNO
from models.stats import load_stats
from models.tracking import Tracker

log = logging.getLogger(__name__)

VAL_LEAD_HOURS = (6, 24)
VAL_EVERY = 0.1  # fraction of the budget between validations (taken at the next epoch end)
GRAD_CLIP = 1.0


@dataclass
class Setup:
    """Everything a training run needs, built and checked before the first step."""

    config: Config
    ctx: DistContext
    per_rank_batch: int
    grid: Grid
    stats: xr.Dataset
    dataset_version: str
    train_ds: WindowDataset
    val_ds: WindowDataset
    lead_steps: list[int]
    model: Normalized
    run_dir: Path


def build_sfno(config: Config, nlat: int, nlon: int) -> SFNO:
    """The SFNO the config describes, for the task's channels on an ``nlat × nlon`` grid."""
    n = len(config.task.channels())
    # The model section's field names are SFNO's keyword arguments: a new option is one field and one kwarg.
    return SFNO(n, n, nlat, nlon, **config.model.model_dump())


def prepare(config: Config, ctx: DistContext, batch: int) -> Setup:
    """Open and check data and stats, build datasets and model; every ``ValueError`` comes from here."""
    threads = set_threads(config.train.threads, ctx.world_size)
    t = config.train
    if config.task.history != 1:
        raise ValueError(f"task.history={config.task.history}: the SFNO trainer supports history 1 only")
    analysis = open_analysis(config.paths.analysis_store)
    grid = parse_grid_attr(str(analysis.attrs["grid"]))
    if grid.shape != config.grid.grid().shape:
        raise ValueError(f"analysis store grid {grid.describe()} does not match config grid {config.grid.preset!r}")
    channels = config.task.channels()
    dt = config.task.time_step_hours
    stats = load_stats(config.paths.stats_file, analysis, channels, dt, (t.val_start, t.val_end))
    lead_steps = sorted({max(1, h // dt) for h in VAL_LEAD_HOURS})
    train_ds = WindowDataset(analysis, channels, t.train_start, t.train_end, t.rollout_steps, dt)
    val_ds = WindowDataset(analysis, channels, t.val_start, t.val_end, max(lead_steps), dt)
    if len(train_ds) // ctx.world_size < batch:
        raise ValueError(f"{len(train_ds)} complete training windows in {t.train_start}..{t.train_end} "
                         f"cannot fill a batch of {t.batch_size} over {ctx.world_size} ranks")
    if len(val_ds) == 0:
        raise ValueError(f"no complete validation windows of {max(lead_steps)} steps in {t.val_start}..{t.val_end}")
    torch.manual_seed(t.seed)  # same seed on every rank: identical initial weights
    model = Normalized(build_sfno(config, grid.nlat, grid.nlon), stats["mean"].values, stats["std"].values,
                       stats["diff_std"].values).to(ctx.device)
    run_dir = config.paths.runs / t.run_name
    if ctx.is_main:
        log.info("training on %s, %d train / %d val windows, batch %d (%d/rank × %d ranks), %d threads/rank, "
                 "%d parameters", grid.describe(), len(train_ds), len(val_ds), t.batch_size, batch,
                 ctx.world_size, threads, sum(p.numel() for p in model.parameters()))
    return Setup(config, ctx, batch, grid, stats, str(analysis.attrs["dataset_version"]), train_ds, val_ds,
                 lead_steps, model, run_dir)


class _Recorder:
    """Rank 0's side effects: metrics lines and checkpoints."""

    def __init__(self, s: Setup) -> None:
        self.s = s
        self.metrics = s.run_dir / "metrics.jsonl"
        self.best = float("inf")
        if s.ctx.is_main:
            s.run_dir.mkdir(parents=True, exist_ok=True)
            # A fresh run starts a fresh metrics file: it describes the checkpoint beside it.
            self.metrics.write_text("")
            self.append({"event": "start", "world_size": s.ctx.world_size, "grid": s.grid.describe(),
                         "train_windows": len(s.train_ds), "val_windows": len(s.val_ds),
                         "dataset_version": s.dataset_version, "config": dump_config(s.config)})

    def append(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (rank 0 only)."""
        if self.s.ctx.is_main:
            with open(self.metrics, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def save(self, step: int, training: dict[str, Any], score: float) -> None:
        """Write ``last.pt``, and ``checkpoint.pt`` when ``score`` is the best so far (rank 0 only)."""
        if not self.s.ctx.is_main:
            return
        model = self.s.model
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        meta = build_meta(self.s.config, self.s.stats, self.s.grid, model.core.arch, state, step, self.s.dataset_version)
        meta["val_score"] = score
        save_checkpoint(self.s.run_dir / "last.pt", model, meta, training)
        if score < self.best:
            self.best = score
            save_checkpoint(self.s.run_dir / "checkpoint.pt", model, meta, training)
            log.info("step %d: new best validation score %.4f → %s", step, score, self.s.run_dir / "checkpoint.pt")


def _summary(result: dict[str, Any]) -> str:
    parts = [f"{lead}: rel.err {v['model']:.3f} (persistence {v['persistence']:.3f})"
             for lead, v in result["relative_error"].items()]
    return "; ".join(parts)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank so far: CUDA allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def channel_loss_weights(config: Config) -> list[float]:
    """The loss weight of every channel in order; ValueError naming unknown or negative entries."""
    channels = config.task.channels()
    given = config.train.channel_weights
    unknown = sorted(set(given) - set(channels))
    if unknown:
        raise ValueError(f"train.channel_weights names {unknown}, not channels of this task: {channels}")
    weights = [float(given.get(c, 1.0)) for c in channels]
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"train.channel_weights must be ≥ 0 with a positive sum, got {given}")
    return weights


def fit(s: Setup) -> Path:
    """Run the training loop until the budget or step cap; return the best checkpoint's path."""
    cfg, ctx, model = s.config.train, s.ctx, s.model
    model.core.checkpoint_blocks = cfg.activation_checkpointing
    rollout: torch.nn.Module = Rollout(model)
    if ctx.distributed:
        # Buffers (stats, position features) are constants: no need to re-broadcast them every step.
        rollout = DistributedDataParallel(rollout, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                                          broadcast_buffers=False)
    comm: CommStats | None = None
    if ctx.distributed:
        comm = register_comm_hook(rollout, cfg.comm_hook, **comm_hook_options(cfg))
    elif cfg.comm_hook != "none":
        log.warning("train.comm_hook=%r needs a distributed run; training with one process and no hook", cfg.comm_hook)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = BudgetCosine(optimizer, cfg.lr)
    sampler = DistributedSampler(s.train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(s.train_ds, batch_size=s.per_rank_batch, sampler=sampler, drop_last=True)
    loss_fn = SphereMSE(channel_loss_weights(s.config))
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ctx.device.type == "cuda")
    climatology = s.train_ds.time_mean()
    recorder = _Recorder(s)
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, ctx)
    tracker = Tracker(s.run_dir, cfg.tensorboard and ctx.is_main)
    budget_s = cfg.budget_minutes * 60.0
    dt = s.config.task.time_step_hours
    t0 = time.monotonic()
    step, epoch, losses = 0, 0, []
    state = {"k": 1, "val_step": -1, "batch": 0, "t": time.monotonic()}

    def validate() -> None:
        result = evaluate(model, s.val_ds, s.lead_steps, dt, climatology, ctx)
        train_loss = sum(losses) / len(losses) if losses else None
        losses.clear()
        record = {"event": "val", "step": step, "epoch": epoch, "elapsed_s": round(time.monotonic() - t0, 2),
                  "lr": schedule.last_lr, "rollout_steps": state["k"], "train_loss": train_loss,
                  "skipped_steps": guard.skipped, "precision": "bf16" if bf16 else "fp32",
                  "peak_memory_mb": peak_memory_mb(ctx.device), **result}
        if comm is not None:  # bytes this rank sent per step through the DDP hook
            record["comm"] = comm.as_record()
        recorder.append(record)
        tracker.validation(step, result)
        if ctx.is_main:
            log.info("validation at step %d (epoch %d): %s", step, epoch, _summary(result))
        training = {"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                    "position": {"step": step, "epoch": epoch, "batch_in_epoch": state["batch"],
                                 "elapsed_s": time.monotonic() - t0}}
        recorder.save(step, training, result["score"])
        state["val_step"] = step
        state["t"] = time.monotonic()  # throughput counts training steps, not validation

    def control() -> tuple[float, bool]:
        elapsed = time.monotonic() - t0
        progress = elapsed / budget_s if budget_s > 0 else 1.0
        if cfg.max_steps:
            progress = max(progress, step / cfg.max_steps)
        stop = elapsed >= budget_s or (cfg.max_steps is not None and step >= cfg.max_steps)
        progress, stop_f = broadcast_floats([min(progress, 1.0), float(stop)], ctx)
        return progress, stop_f > 0.5

    validate()
    next_val = VAL_EVERY
    bar = tqdm(total=100, desc="train", unit="%", disable=not ctx.is_main, mininterval=1.0)
    model.train()
    stop = False
    with logging_redirect_tqdm() if ctx.is_main else nullcontext():  # log lines above the bar, not through it
        while not stop:
            sampler.set_epoch(epoch)
            for state["batch"], (x0, y) in enumerate(loader):
                progress, stop = control()
                if stop:
                    break
                k = state["k"] = rollout_steps_at(progress, cfg.rollout_steps, cfg.rollout_ramp, cfg.rollout_start,
                                                  cfg.rollout_increment)
                lr = schedule.update(step, progress)
                x0, target = x0.to(ctx.device), y[:, :k].to(ctx.device)
                with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
                    pred = rollout(x0, k)
                loss = loss_fn(model.scale_tendency(pred.float()), model.scale_tendency(target))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                if not guard.step_is_finite(loss.detach(), grad_norm, step, lr):
                    optimizer.zero_grad(set_to_none=True)  # skipped: the weights and Adam's moments stay as they were
                    continue
                optimizer.step()
                value = loss.item()
                losses.append(value)
                now = time.monotonic()
                tracker.step(step, {"loss": value, "lr": lr, "grad_norm": float(grad_norm), "rollout_steps": k,
                                    "samples_per_s": s.per_rank_batch * ctx.world_size / max(now - state["t"], 1e-9),
                                    "peak_memory_mb": peak_memory_mb(ctx.device)})
                state["t"] = now
                step += 1
                bar.update(int(progress * 100) - bar.n)
                bar.set_postfix(step=step, loss=f"{value:.4f}", lr=f"{lr:.1e}", k=k,
                                mem=f"{peak_memory_mb(ctx.device):.0f}MB", refresh=False)
            else:
                epoch += 1
                if progress >= next_val:
                    validate()
                    next_val = progress + VAL_EVERY
    bar.close()
    if state["val_step"] != step:
        validate()
    tracker.close()
    recorder.append({"event": "end", "steps": step, "epochs": epoch, "elapsed_s": round(time.monotonic() - t0, 2),
                     "best_score": recorder.best, "checkpoint": str(s.run_dir / "checkpoint.pt"),
                     **({"comm": comm.as_record()} if comm is not None else {})})
    if ctx.is_main:
        log.info("finished after %d steps (%d epochs, %.0f s); best score %.4f", step, epoch,
                 time.monotonic() - t0, recorder.best)
        if comm is not None:
            log.info("DDP hook %r sent %d bytes/step (plain all-reduce: %d)", comm.kind, comm.bytes_per_step(),
                     comm.dense_bytes_per_step())
    return s.run_dir / "checkpoint.pt"


def train(config: Config) -> Path:
    """Train per ``config`` (in-process or as one torchrun rank); return the best checkpoint's path."""
    batch = per_rank_batch(config.train.batch_size, world_size_from_env())  # fail before joining a group
    ctx = init_distributed()
    try:
        path = fit(prepare(config, ctx, batch))
    except BaseException:
        shutdown_distributed(ctx, clean=False)
        raise
    shutdown_distributed(ctx, clean=True)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse ``--config``, configure logging, train; exit code 2 on a config/data error."""
    parser = argparse.ArgumentParser(prog="python -m models.train", description="Train the spherecast SFNO.")
    parser.add_argument("--config", type=Path, default=None, help="YAML config (SPHERECAST_* variables override it)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    try:
        path = train(load_config(args.config))
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if rank == 0:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
