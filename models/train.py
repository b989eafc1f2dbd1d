"""Train the SFNO: ``torchrun --nproc_per_node=N -m models.train --config cfg.yaml`` (or ``train(config)``).

Each rank loads the training and validation periods of the analysis store into memory, takes an
equal share of every global batch (``DistributedSampler``), and DDP averages the gradients. The
loss is the area-weighted MSE of normalized tendencies over a multistep rollout whose length grows
from ``train.rollout_start`` by ``train.rollout_increment`` to ``train.rollout_steps`` over
``train.rollout_ramp`` of the run (curriculum). Adam with warm-up and cosine decay.

Progress ∈ [0, 1] drives the schedules: ``step / max_steps`` when ``train.max_steps`` is set (a
function of the step alone, so a resumed run repeats an uninterrupted one exactly), else the
fraction of ``train.budget_minutes`` used over all attempts. Rank 0 owns the clock and broadcasts
progress, the stop decision and the checkpoint decision, so every rank acts at the same step.
Validation (RMSE of model vs persistence at ``train.val_lead_hours``, 6 h and 24 h by default) runs
at epoch ends every tenth of the run and at the end. ``last.pt`` is written at each validation,
every ``checkpoint_every_steps`` steps, every ``checkpoint_every_minutes`` and at the end;
``checkpoint.pt`` holds the best validation score (at the longest lead). With ``train.resume=auto`` a run continues from ``last.pt`` (see models/resume.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from core.config import Config, load_config
from core.grid import Grid, parse_grid_attr
from models.checkpoint import build_meta, code_version
from models.comm_hooks import CommStats, comm_hook_options, register_comm_hook
from models.data import WindowDataset, open_analysis, training_loader
from models.distributed import (
    DistContext,
    broadcast_floats,
    init_distributed,
    per_rank_batch,
    select_device,
    set_threads,
    shutdown_distributed,
    world_size_from_env,
)
from models.evaluate import evaluate
from models.guards import NonFiniteGuard
from models.losses import SphereMSE
from models.normalization import Normalized, Rollout
from models.recorder import LAST, Recorder, peak_memory_mb, start_record
from models.resume import Position, ResumableSampler, TrainingParts, capture, data_signature, load_resumable, restore
from models.runtime import (
    autocast,
    check_compile,
    grad_scaler,
    join_attempt_group,
    resolve_precision,
    set_deterministic,
    training_model,
)
from models.schedule import BudgetCosine, rollout_steps_at
from models.sfno import SFNO
from models.statics import static_fields
from models.stats import load_stats
from models.tracking import Tracker
from models.tracking_mlflow import open_sink
from models.zarr_windows import ZarrWindowDataset

log = logging.getLogger(__name__)

VAL_EVERY = 0.1  # fraction of the run between validations (taken at the next epoch end)
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
    train_ds: WindowDataset | ZarrWindowDataset
    val_ds: WindowDataset
    lead_steps: list[int]
    model: Normalized
    run_dir: Path
    precision: str
    signature: dict[str, Any]
    resume: dict[str, Any] | None  # the checked ``last.pt`` to continue, weights already loaded into ``model``


def build_sfno(config: Config, nlat: int, nlon: int) -> SFNO:
    """The SFNO the config describes: the history stack, clock and static fields in, the task's channels out."""
    n = len(config.task.channels())
    n_in = config.task.history * n + 2 * len(config.task.time_features) + len(config.task.static_fields)
    # The model section's field names are SFNO's keyword arguments: a new option is one field and one kwarg.
    return SFNO(n_in, n, nlat, nlon, **config.model.model_dump())


def validation_steps(config: Config) -> list[int]:
    """The validation leads in model steps, sorted; ValueError for a lead that is not a whole number of steps."""
    dt = config.task.time_step_hours
    odd = [h for h in config.train.val_lead_hours if h % dt]
    if odd:
        raise ValueError(f"train.val_lead_hours {odd} are not multiples of the model step {dt} h")
    return sorted({h // dt for h in config.train.val_lead_hours})


def training_windows(config: Config, analysis: xr.Dataset) -> tuple[Dataset, WindowDataset]:
    """The training windows (in memory, or read from the store per item) and the validation windows."""
    t, task = config.train, config.task
    channels, dt = task.channels(), task.time_step_hours
    lead_steps = max(validation_steps(config))
    if t.loader == "zarr":
        train_ds: Dataset = ZarrWindowDataset(config.paths.analysis_store, channels, t.train_start, t.train_end,
                                              t.rollout_steps, dt, task.history, time_features=task.time_features)
    else:
        train_ds = WindowDataset(analysis, channels, t.train_start, t.train_end, t.rollout_steps, dt, task.history,
                                 task.time_features)
    val_ds = WindowDataset(analysis, channels, t.val_start, t.val_end, lead_steps, dt, task.history, task.time_features)
    return train_ds, val_ds


def prepare(config: Config, ctx: DistContext, batch: int) -> Setup:
    """Open and check data, stats and any ``last.pt`` to resume, build datasets and model; all ValueErrors are here."""
    threads = set_threads(config.train.threads, ctx.world_size)
    t = config.train
    precision = resolve_precision(t.precision, ctx.device)
    if t.compile:
        check_compile(ctx.device)
    analysis = open_analysis(config.paths.analysis_store)
    grid = parse_grid_attr(str(analysis.attrs["grid"]))
    if grid.shape != config.grid.grid().shape:
        raise ValueError(f"analysis store grid {grid.describe()} does not match config grid {config.grid.preset!r}")
    channels = config.task.channels()
    dt = config.task.time_step_hours
    stats = load_stats(config.paths.stats_file, analysis, channels, dt, (t.val_start, t.val_end))
    lead_steps = validation_steps(config)
    static = static_fields(analysis, config.task.static_fields) if config.task.static_fields else None
    train_ds, val_ds = training_windows(config, analysis)
    if len(train_ds) // ctx.world_size < batch:
        raise ValueError(f"{len(train_ds)} complete training windows in {t.train_start}..{t.train_end} "
                         f"cannot fill a batch of {t.batch_size} over {ctx.world_size} ranks")
    if len(val_ds) == 0:
        raise ValueError(f"no complete validation windows of {max(lead_steps)} steps in {t.val_start}..{t.val_end}")
    set_deterministic(t.deterministic)
    torch.manual_seed(t.seed)  # same seed on every rank: identical initial weights
    model = Normalized(build_sfno(config, grid.nlat, grid.nlon), stats["mean"].values, stats["std"].values,
                       stats["diff_std"].values, config.task.history, static, config.task.static_fields,
                       config.task.time_features, dt).to(ctx.device)
    run_dir = config.paths.runs / t.run_name
    dataset_version = str(analysis.attrs["dataset_version"])
    signature = data_signature(config, len(train_ds))
    resumed = None
    if t.resume == "auto":
        expected = build_meta(config, stats, grid, model.core.arch, model.state_dict(), 0, dataset_version)
        resumed = load_resumable(run_dir / LAST, expected, signature, ctx)
        if resumed is not None:
            model.load_state_dict(resumed["model"])
    elif ctx.is_main and (run_dir / LAST).exists():
        log.warning("train.resume=never: starting %s over; its last.pt is replaced at this run's first checkpoint",
                    run_dir)
    if ctx.is_main:
        log.info("training on %s, %d train / %d val windows, batch %d (%d/rank × %d ranks), %d threads/rank, "
                 "%d parameters, %s", grid.describe(), len(train_ds), len(val_ds), t.batch_size, batch,
                 ctx.world_size, threads, sum(p.numel() for p in model.parameters()), precision)
    return Setup(config, ctx, batch, grid, stats, dataset_version, train_ds, val_ds, lead_steps, model, run_dir,
                 precision, signature, resumed["training"] if resumed is not None else None)


def _summary(result: dict[str, Any]) -> str:
    parts = [f"{lead}: rel.err {v['model']:.3f} (persistence {v['persistence']:.3f})"
             for lead, v in result["relative_error"].items()]
    return "; ".join(parts)


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
    """Run (or continue) the training loop until the step cap or budget; return the best checkpoint's path."""
    cfg, ctx, model = s.config.train, s.ctx, s.model
    model.core.checkpoint_blocks = cfg.activation_checkpointing
    rollout: torch.nn.Module = Rollout(training_model(model, cfg.compile))
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
    scaler = grad_scaler(s.precision, ctx.device)
    sampler = ResumableSampler(s.train_ds, ctx, cfg.seed, s.per_rank_batch)
    loader = training_loader(s.train_ds, sampler, s.per_rank_batch, cfg.num_workers, ctx.device)
    loss_fn = SphereMSE(channel_loss_weights(s.config))
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, ctx)
    parts = TrainingParts(ctx, model, rollout, optimizer, schedule, scaler, guard, s.signature, cfg.seed)
    pos = Position(next_val=VAL_EVERY)
    if s.resume is not None:
        prime = torch.zeros(s.per_rank_batch, *s.train_ds[0][0].shape, device=ctx.device)
        pos = restore(parts, s.resume, prime, cfg.rollout_start)
    sampler.skip_batches(pos.batch)
    climatology = s.train_ds.time_mean()
    recorder = Recorder(s, start_record(s, pos))
    sink = open_sink(s.config, s.run_dir, s.dataset_version, code_version(), s.resume is not None, ctx.is_main)
    tracker = Tracker(s.run_dir, cfg.tensorboard and ctx.is_main, mlflow=sink,
                      resumed_step=pos.step if s.resume is not None else None)
    budget_s, dt = cfg.budget_minutes * 60.0, s.config.task.time_step_hours
    t0 = last_save = time.monotonic()
    losses: list[float] = []
    k = rollout_steps_at(0.0, cfg.rollout_steps, cfg.rollout_ramp, cfg.rollout_start, cfg.rollout_increment)
    progress, clock = 0.0, {"t": t0}

    def elapsed() -> float:
        return pos.elapsed_s + time.monotonic() - t0

    def checkpoint(reason: str, score: float | None = None, best: bool = False) -> None:
        nonlocal last_save
        recorder.save(pos.step, capture(parts, pos, elapsed()), reason, score, best)
        pos.saved_step, last_save = pos.step, time.monotonic()

    def validate() -> None:
        result = evaluate(model, s.val_ds, s.lead_steps, dt, climatology, ctx)
        train_loss = sum(losses) / len(losses) if losses else None
        losses.clear()
        record = {"event": "val", "step": pos.step, "epoch": pos.epoch, "elapsed_s": round(elapsed(), 2),
                  "lr": schedule.last_lr, "rollout_steps": k, "train_loss": train_loss,
                  "skipped_steps": guard.skipped, "precision": s.precision,
                  "peak_memory_mb": peak_memory_mb(ctx.device), **result}
        if comm is not None:  # bytes this rank sent per step through the DDP hook
            record["comm"] = comm.as_record()
        recorder.append(record)
        tracker.validation(pos.step, result)
        if ctx.is_main:
            log.info("validation at step %d (epoch %d): %s", pos.step, pos.epoch, _summary(result))
        best = result["score"] < pos.best
        pos.val_step, pos.best = pos.step, min(pos.best, result["score"])
        checkpoint("validation", result["score"], best)
        clock["t"] = time.monotonic()  # throughput counts training steps, not validation

    def control() -> tuple[float, bool, bool]:
        el, now = elapsed(), time.monotonic()
        progress = pos.step / cfg.max_steps if cfg.max_steps else (el / budget_s if budget_s > 0 else 1.0)
        at_cap = cfg.max_steps is not None and pos.step >= cfg.max_steps
        stop = at_cap or el >= budget_s
        if stop and not at_cap and cfg.max_steps and ctx.is_main:
            log.warning("budget of %.1f min used up at step %d of max_steps %d: stopping early", cfg.budget_minutes,
                        pos.step, cfg.max_steps)
        every_n, every_m = cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes
        due = pos.step != pos.saved_step and ((every_n is not None and pos.step % every_n == 0)
                                              or (every_m is not None and now - last_save >= every_m * 60))
        progress, stop_f, due_f = broadcast_floats([min(progress, 1.0), float(stop), float(due)], ctx)
        return progress, stop_f > 0.5, due_f > 0.5

    if pos.val_step < 0:
        validate()
    bar = tqdm(total=100, desc="train", unit="%", disable=not ctx.is_main, mininterval=1.0)
    model.train()
    stop = False
    with logging_redirect_tqdm() if ctx.is_main else nullcontext():  # log lines above the bar, not through it
        while not stop:
            sampler.set_epoch(pos.epoch)
            for batch, (x0, y) in enumerate(loader, start=pos.batch):
                pos.batch = batch
                progress, stop, due = control()
                if stop:
                    break
                if due:  # before this batch: the position reads "pos.batch batches consumed"
                    checkpoint("steps" if cfg.checkpoint_every_steps and pos.step % cfg.checkpoint_every_steps == 0
                               else "minutes")
                k = rollout_steps_at(progress, cfg.rollout_steps, cfg.rollout_ramp, cfg.rollout_start,
                                     cfg.rollout_increment)
                lr = schedule.update(pos.step, progress)
                # Pinned batches (CUDA) copy asynchronously; the first kernel that reads them waits for the copy.
                x0, target = x0.to(ctx.device, non_blocking=True), y[:, :k].to(ctx.device, non_blocking=True)
                if cfg.input_noise > 0:  # drawn from the rank's torch RNG, which checkpoints carry: resume stays exact
                    scale = model.std.repeat(model.history) * cfg.input_noise
                    scale = torch.cat([scale, scale.new_zeros(x0.shape[1] - len(scale))])[:, None, None]  # no clock noise
                    x0 = x0 + torch.randn_like(x0) * scale
                with autocast(s.precision, ctx.device):
                    pred = rollout(x0, k, cfg.rollout_grad_steps)
                loss = loss_fn(model.scale_tendency(pred.float()), model.scale_tendency(target))
                optimizer.zero_grad(set_to_none=True)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                # With a loss scale, overflowing gradients are the scaler's to skip (it lowers the scale).
                checked = grad_norm if scaler is None else loss.new_zeros(())
                if not guard.step_is_finite(loss.detach(), checked, pos.step, lr):
                    if scaler is not None:
                        scaler.update()
                    optimizer.zero_grad(set_to_none=True)  # skipped: the weights and Adam's moments stay as they were
                    continue
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                value = loss.item()
                losses.append(value)
                now = time.monotonic()
                tracker.step(pos.step, {"loss": value, "lr": lr, "grad_norm": float(grad_norm), "rollout_steps": k,
                                        "samples_per_s": s.per_rank_batch * ctx.world_size / max(now - clock["t"], 1e-9),
                                        "peak_memory_mb": peak_memory_mb(ctx.device)})
                clock["t"] = now
                pos.step += 1
                bar.update(int(progress * 100) - bar.n)
                bar.set_postfix(step=pos.step, loss=f"{value:.4f}", lr=f"{lr:.1e}", k=k,
                                mem=f"{peak_memory_mb(ctx.device):.0f}MB", refresh=False)
            else:
                pos.epoch, pos.batch = pos.epoch + 1, 0
                if progress >= pos.next_val:
                    pos.next_val = progress + VAL_EVERY  # before validate(): its checkpoint carries it
                    validate()
    bar.close()
    if pos.val_step != pos.step:
        validate()
    elif pos.saved_step != pos.step:
        checkpoint("end")
    tracker.close({"checkpoint": str(s.run_dir / "checkpoint.pt"), "best_score": f"{pos.best:.6g}",
                   "steps": str(pos.step)})
    recorder.append({"event": "end", "steps": pos.step, "epochs": pos.epoch, "elapsed_s": round(elapsed(), 2),
                     "best_score": pos.best, "checkpoint": str(s.run_dir / "checkpoint.pt"),
                     **({"comm": comm.as_record()} if comm is not None else {})})
    if ctx.is_main:
        log.info("finished after %d steps (%d epochs, %.0f s); best score %.4f", pos.step, pos.epoch, elapsed(),
                 pos.best)
        if comm is not None:
            log.info("DDP hook %r sent %d bytes/step (plain all-reduce: %d)", comm.kind, comm.bytes_per_step(),
                     comm.dense_bytes_per_step())
    return s.run_dir / "checkpoint.pt"


def train(config: Config) -> Path:
    """Train per ``config`` (in-process or as one torchrun rank); return the best checkpoint's path."""
    batch = per_rank_batch(config.train.batch_size, world_size_from_env())  # fail before joining a group
    device = select_device()  # also fails before joining: more local ranks than GPUs
    deterministic = torch.are_deterministic_algorithms_enabled()
    join_attempt_group(device)  # before init_distributed, which then finds the group joined
    ctx = init_distributed(device)
    try:
        path = fit(prepare(config, ctx, batch))
    except BaseException:
        shutdown_distributed(ctx, clean=False)
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic)  # in-process callers get their mode back
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
