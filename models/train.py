"""Train the SFNO: ``torchrun --nproc_per_node=N -m models.train --config cfg.yaml`` (or ``train(config)``).

Each rank holds the training and validation periods of the analysis store in memory, or reads each
window from the store as it is drawn (``train.loader``; ``auto`` picks by size, see
:func:`models.prepare.choose_loader`), takes an equal share of every global batch (``DistributedSampler``), and DDP averages the gradients. The
loss is the area-weighted MSE of normalized tendencies over a multistep rollout whose length grows
from ``train.rollout_start`` by ``train.rollout_increment`` to ``train.rollout_steps`` over
``train.rollout_ramp`` of the run (curriculum). Adam with warm-up and cosine decay.

Progress ∈ [0, 1] drives the schedules: ``step / max_steps`` when ``train.max_steps`` is set (a
function of the step alone, so a resumed run repeats an uninterrupted one exactly), else the
fraction of ``train.budget_minutes`` used over all attempts. Rank 0 owns the clock and broadcasts
progress, the stop decision and the checkpoint decision, so every rank acts at the same step.
Validation (RMSE of model vs persistence at ``train.val_lead_hours``, 6 h and 24 h by default) runs
every tenth of the run (before the next batch, mid-epoch too) and at the end. ``last.pt`` is written
at each validation, every ``checkpoint_every_steps`` steps, every ``checkpoint_every_minutes`` and at
the end; ``checkpoint.pt`` holds the best validation score (``train.val_score``). With
``train.resume=auto`` a run continues from ``last.pt`` (see models/resume.py). With ``train.ema_decay`` both are
scored and saved with the weights averaged over the run's tail (models/averaging.py).

Layout: :func:`models.prepare.prepare` checks and builds everything a run needs (all its errors come
before a file is written); :class:`Trainer` runs it — :meth:`Trainer.setup` builds the live objects
(DDP through :mod:`models.ddp`, optimizer, loader) and restores ``last.pt``, :meth:`Trainer.step` is
one optimizer step, :meth:`Trainer.validate` and :meth:`Trainer.checkpoint` do what they say, and
:class:`TrainState` holds the loop's counters. Files are written by :class:`models.recorder.Recorder`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from core.config import Config, dump_config, load_config
from core.errors import SpherecastError
from models import ddp
from models.averaging import WeightAverage
from models.checkpoint import build_meta, code_version
from models.data import training_loader
from models.distributed import (
    broadcast_floats,
    check_nodes_agree,
    init_distributed,
    per_rank_batch,
    select_device,
    shutdown_distributed,
    world_size_from_env,
)
from models.evaluate import evaluate
from models.guards import NonFiniteGuard
from models.losses import SphereMSE
from models.normalization import Rollout
from models.prepare import Setup, build_sfno, channel_loss_weights, prepare, training_windows, validation_steps
from models.recorder import LAST, Recorder, peak_memory_mb
from models.resume import Position, ResumableSampler, TrainingParts, capture, restore
from models.runtime import autocast, grad_scaler, join_attempt_group, training_model
from models.schedule import BudgetCosine, rollout_steps_at
from models.tracking import Tracker
from models.tracking_mlflow import open_sink

__all__ = ["Setup", "TrainState", "Trainer", "build_sfno", "channel_loss_weights", "fit", "main", "prepare", "train",
           "training_windows", "validation_steps"]

log = logging.getLogger(__name__)

# Fraction of the run between validations, taken before the next batch, not at the next epoch end: on three
# years of the planet a 15-minute run spans two epochs, so epoch ends offered three checkpoints to choose from
# (on decades of ERA5 an epoch can outlast the run).
VAL_EVERY = 0.1
GRAD_CLIP = 1.0


@dataclass
class TrainState:
    """The loop's counters: the checkpointed :class:`Position`, and this attempt's clocks, rollout length and losses."""

    pos: Position = field(default_factory=lambda: Position(next_val=VAL_EVERY))
    rollout_steps: int = 1  # of the latest step (validation records report it)
    progress: float = 0.0  # of the run ∈ [0, 1], as rank 0 last broadcast it
    losses: list[float] = field(default_factory=list)  # training losses since the last validation
    started: float = 0.0  # monotonic time this attempt's loop started
    last_save: float = 0.0  # monotonic time of the latest checkpoint
    last_step: float = 0.0  # monotonic time the latest step (or validation) ended: throughput counts steps only

    def start_clock(self) -> None:
        """Start this attempt's wall clock (the budget adds it to the earlier attempts' time)."""
        self.started = self.last_save = self.last_step = time.monotonic()

    def elapsed(self) -> float:
        """Training wall time over all attempts so far."""
        return self.pos.elapsed_s + time.monotonic() - self.started

    def mean_loss(self) -> float | None:
        """The mean training loss since the last call (None without steps), starting a new mean."""
        mean = sum(self.losses) / len(self.losses) if self.losses else None
        self.losses.clear()
        return mean

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the loop: the position, with the wall time used until now."""
        return self.pos.as_dict(self.elapsed())

    def load_state_dict(self, position: dict[str, Any]) -> None:
        """Continue from a checkpoint's position (its step counts as saved)."""
        self.pos = Position.from_dict(position)


def _summary(result: dict[str, Any]) -> str:
    parts = [f"{lead}: rel.err {v['model']:.3f} (persistence {v['persistence']:.3f})"
             for lead, v in result["relative_error"].items()]
    return "; ".join(parts)


class Trainer:
    """One training run of a :class:`Setup`: :meth:`run` it; every rank makes the same calls in the same order."""

    def __init__(self, s: Setup) -> None:
        self.s, self.cfg, self.ctx, self.model = s, s.config.train, s.ctx, s.model
        self.state = TrainState(rollout_steps=self._rollout_steps(0.0))
        self.average = WeightAverage(s.model, s.config.train.ema_decay, s.config.train.ema_start)

    def _rollout_steps(self, progress: float) -> int:
        cfg = self.cfg
        return rollout_steps_at(progress, cfg.rollout_steps, cfg.rollout_ramp, cfg.rollout_start, cfg.rollout_increment)

    # ---- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build the live objects (DDP-wrapped rollout, optimizer, loader, loss), restore ``last.pt``, open the files."""
        s, cfg, ctx, model = self.s, self.cfg, self.ctx, self.model
        model.core.checkpoint_blocks = cfg.activation_checkpointing
        self.rollout, self.comm = ddp.wrap(Rollout(training_model(model, cfg.compile)), ctx, cfg)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.schedule = BudgetCosine(self.optimizer, cfg.lr)
        self.scaler = grad_scaler(s.precision, ctx.device)
        self.sampler = ResumableSampler(s.train_ds, ctx, cfg.seed, s.per_rank_batch)
        self.loader = training_loader(s.train_ds, self.sampler, s.per_rank_batch, cfg.num_workers, ctx.device)
        self.loss_fn = SphereMSE(channel_loss_weights(s.config))
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps, ctx)
        self.parts = TrainingParts(ctx, model, self.rollout, self.optimizer, self.schedule, self.scaler, self.guard,
                                   s.signature, cfg.seed)
        if s.resume is not None:
            self.load_state_dict(s.resume)
        self.sampler.skip_batches(self.state.pos.batch)
        self.climatology = s.train_ds.time_mean()
        self.recorder = Recorder(s.run_dir, ctx.is_main, model, self._describe, self._start_record())
        sink = open_sink(s.config, s.run_dir, s.dataset_version, code_version(), s.resume is not None, ctx.is_main)
        self.tracker = Tracker(s.run_dir, cfg.tensorboard and ctx.is_main, mlflow=sink,
                               resumed_step=self.state.pos.step if s.resume is not None else None)
        self.state.start_clock()

    def _describe(self, state: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        s = self.s
        return build_meta(s.config, s.stats, s.grid, self.model.core.arch, state, step, s.dataset_version,
                          self.model.pole_modes)

    def _start_record(self) -> dict[str, Any]:
        """The first metrics line of an attempt: ``start`` for a fresh run, ``resume`` with where it continues."""
        s, pos = self.s, self.state.pos
        if s.resume is None:
            record: dict[str, Any] = {"event": "start", "resume": self.cfg.resume}
        else:
            log.info("resuming %s at step %d (epoch %d, batch %d, %.0f s of budget used); written by %d rank(s), "
                     "now %d", s.run_dir / LAST, pos.step, pos.epoch, pos.batch, pos.elapsed_s, s.resume["world_size"],
                     self.ctx.world_size)
            record = {"event": "resume", "step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch,
                      "elapsed_s": round(pos.elapsed_s, 2), "previous_world_size": s.resume["world_size"]}
        return {**record, "world_size": self.ctx.world_size, "device": str(self.ctx.device),
                "backend": self.ctx.backend, "grid": s.grid.describe(),
                "train_windows": len(s.train_ds), "val_windows": len(s.val_ds), "dataset_version": s.dataset_version,
                "config": dump_config(s.config)}

    def state_dict(self) -> dict[str, Any] | None:
        """The checkpoint's ``training`` dict on rank 0 (None elsewhere); a collective: every rank must call it."""
        training = capture(self.parts, self.state.state_dict())
        if training is not None and self.average.enabled:
            training["average"] = self.average.state_dict()
        return training

    def load_state_dict(self, training: dict[str, Any]) -> None:
        """Continue from a checkpoint's ``training`` dict (model weights were loaded by :func:`prepare`)."""
        prime = torch.zeros(self.s.per_rank_batch, *self.s.train_ds[0][0].shape, device=self.ctx.device)
        restore(self.parts, training, prime, self.cfg.rollout_start)
        self.average.load_state_dict(training.get("average"))  # the file's weights were the average: back to training's
        self.state.load_state_dict(training["position"])

    # ---- the loop --------------------------------------------------------------------------------

    def run(self) -> Path:
        """Set up, then train until the step cap or budget, validating and checkpointing; the best checkpoint."""
        self.setup()
        st, ctx = self.state, self.ctx
        if st.pos.val_step < 0:
            self.validate()
        self.bar = tqdm(total=100, desc="train", unit="%", disable=not ctx.is_main, mininterval=1.0)
        self.model.train()
        stop = False
        with logging_redirect_tqdm() if ctx.is_main else nullcontext():  # log lines above the bar, not through it
            while not stop:
                self.sampler.set_epoch(st.pos.epoch)
                for batch, (x0, y) in enumerate(self.loader, start=st.pos.batch):
                    st.pos.batch = batch
                    stop, due = self.control()
                    if stop:
                        break
                    # Before this batch: a checkpoint's position reads "pos.batch batches consumed".
                    if st.progress >= st.pos.next_val:  # progress is rank 0's, so every rank validates here
                        st.pos.next_val = st.progress + VAL_EVERY  # before validate(): its checkpoint carries it
                        self.validate()
                    elif due:
                        self.checkpoint(self._due_reason())
                    self.step(x0, y)
                else:
                    self.end_epoch()
        self.bar.close()
        return self.finish()

    def control(self) -> tuple[bool, bool]:
        """Rank 0's progress, stop and checkpoint-due decisions, the same on every rank (progress goes to the state)."""
        cfg, pos = self.cfg, self.state.pos
        el, now = self.state.elapsed(), time.monotonic()
        budget_s = cfg.budget_minutes * 60.0
        progress = pos.step / cfg.max_steps if cfg.max_steps else (el / budget_s if budget_s > 0 else 1.0)
        at_cap = cfg.max_steps is not None and pos.step >= cfg.max_steps
        stop = at_cap or el >= budget_s
        if stop and not at_cap and cfg.max_steps and self.ctx.is_main:
            log.warning("budget of %.1f min used up at step %d of max_steps %d: stopping early", cfg.budget_minutes,
                        pos.step, cfg.max_steps)
        every_n, every_m = cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes
        due = pos.step != pos.saved_step and ((every_n is not None and pos.step % every_n == 0)
                                              or (every_m is not None and now - self.state.last_save >= every_m * 60))
        self.state.progress, stop_f, due_f = broadcast_floats([min(progress, 1.0), float(stop), float(due)], self.ctx)
        return stop_f > 0.5, due_f > 0.5

    def _due_reason(self) -> str:
        every_n, step = self.cfg.checkpoint_every_steps, self.state.pos.step
        return "steps" if every_n and step % every_n == 0 else "minutes"

    def step(self, x0: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on a batch; a step with a non-finite loss or gradient is skipped (and counted)."""
        cfg, ctx, st, model = self.cfg, self.ctx, self.state, self.model
        k = st.rollout_steps = self._rollout_steps(st.progress)
        lr = self.schedule.update(st.pos.step, st.progress)
        # Pinned batches (CUDA) copy asynchronously; the first kernel that reads them waits for the copy.
        x0, target = x0.to(ctx.device, non_blocking=True), y[:, :k].to(ctx.device, non_blocking=True)
        if cfg.input_noise > 0:  # drawn from the rank's torch RNG, which checkpoints carry: resume stays exact
            scale = model.std.repeat(model.history) * cfg.input_noise
            scale = torch.cat([scale, scale.new_zeros(x0.shape[1] - len(scale))])[:, None, None]  # no clock noise
            x0 = x0 + torch.randn_like(x0) * scale
        with autocast(self.s.precision, ctx.device):
            pred = self.rollout(x0, k, cfg.rollout_grad_steps, cfg.rollout_grad_first)
        loss = self.loss_fn(model.scale_tendency(pred.float()), model.scale_tendency(target))
        optimizer, scaler = self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        # With a loss scale, overflowing gradients are the scaler's to skip (it lowers the scale).
        checked = grad_norm if scaler is None else loss.new_zeros(())
        if not self.guard.step_is_finite(loss.detach(), checked, st.pos.step, lr):
            if scaler is not None:
                scaler.update()
            optimizer.zero_grad(set_to_none=True)  # skipped: the weights and Adam's moments stay as they were
            return
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        self.average.update(st.progress)
        value = loss.item()
        st.losses.append(value)
        now = time.monotonic()
        self.tracker.step(st.pos.step, {
            "loss": value, "lr": lr, "grad_norm": float(grad_norm), "rollout_steps": k,
            "samples_per_s": self.s.per_rank_batch * ctx.world_size / max(now - st.last_step, 1e-9),
            "peak_memory_mb": peak_memory_mb(ctx.device)})
        st.last_step = now
        st.pos.step += 1
        self.bar.update(int(st.progress * 100) - self.bar.n)
        self.bar.set_postfix(step=st.pos.step, loss=f"{value:.4f}", lr=f"{lr:.1e}", k=k,
                             mem=f"{peak_memory_mb(ctx.device):.0f}MB", refresh=False)

    def end_epoch(self) -> None:
        """Count a finished epoch (the next one starts at its first batch)."""
        st = self.state
        st.pos.epoch, st.pos.batch = st.pos.epoch + 1, 0

    def validate(self) -> None:
        """Score the model on the validation windows, record it, and checkpoint (the best file when it improved)."""
        s, ctx, st = self.s, self.ctx, self.state
        pos = st.pos
        with self.average.applied():  # what the checkpoint will hold is what is scored
            result = evaluate(self.model, s.val_ds, s.lead_steps, s.config.task.time_step_hours, self.climatology,
                              ctx, score=s.config.train.val_score, stride=s.config.train.val_stride)
        record = {"event": "val", "step": pos.step, "epoch": pos.epoch, "elapsed_s": round(st.elapsed(), 2),
                  "lr": self.schedule.last_lr, "rollout_steps": st.rollout_steps, "train_loss": st.mean_loss(),
                  "skipped_steps": self.guard.skipped, "precision": s.precision,
                  "peak_memory_mb": peak_memory_mb(ctx.device), **result}
        if self.average.enabled:  # 0 until ema_start: then the training weights were scored
            record["averaged_steps"] = self.average.count
        if self.comm is not None:  # bytes this rank sent per step through the DDP hook
            record["comm"] = self.comm.as_record()
        self.recorder.append(record)
        self.tracker.validation(pos.step, result)
        if ctx.is_main:
            log.info("validation at step %d (epoch %d): %s", pos.step, pos.epoch, _summary(result))
        best = result["score"] < pos.best
        pos.val_step, pos.best = pos.step, min(pos.best, result["score"])
        self.checkpoint("validation", result["score"], best)
        st.last_step = time.monotonic()  # throughput counts training steps, not validation

    def checkpoint(self, reason: str, score: float | None = None, best: bool = False) -> None:
        """Write ``last.pt`` (and ``checkpoint.pt`` when ``best``) with the full training state; a collective."""
        pos = self.state.pos
        training = self.state_dict()  # before the swap: it keeps the training weights beside the average
        with self.average.applied():
            self.recorder.save(pos.step, training, reason, score, best)
        pos.saved_step, self.state.last_save = pos.step, time.monotonic()

    def finish(self) -> Path:
        """Validate or checkpoint the final step if not done yet, write the ``end`` record; the best checkpoint."""
        s, st, ctx, comm = self.s, self.state, self.ctx, self.comm
        pos = st.pos
        if pos.val_step != pos.step:
            self.validate()
        elif pos.saved_step != pos.step:
            self.checkpoint("end")
        best_path = s.run_dir / "checkpoint.pt"
        self.tracker.close({"checkpoint": str(best_path), "best_score": f"{pos.best:.6g}", "steps": str(pos.step)})
        self.recorder.append({"event": "end", "steps": pos.step, "epochs": pos.epoch, "elapsed_s": round(st.elapsed(), 2),
                              "best_score": pos.best, "checkpoint": str(best_path),
                              **({"comm": comm.as_record()} if comm is not None else {})})
        if ctx.is_main:
            log.info("finished after %d steps (%d epochs, %.0f s); best score %.4f", pos.step, pos.epoch, st.elapsed(),
                     pos.best)
            if comm is not None:
                log.info("DDP hook %r sent %d bytes/step (plain all-reduce: %d)", comm.kind, comm.bytes_per_step(),
                         comm.dense_bytes_per_step())
        return best_path


def fit(s: Setup) -> Path:
    """Run (or continue) the training loop until the step cap or budget; return the best checkpoint's path."""
    return Trainer(s).run()


def train(config: Config) -> Path:
    """Train per ``config`` (in-process or as one torchrun rank); return the best checkpoint's path."""
    batch = per_rank_batch(config.train.batch_size, world_size_from_env())  # fail before joining a group
    device = select_device(config.train.device)  # also fails before joining: more local ranks than GPUs, no CUDA
    deterministic = torch.are_deterministic_algorithms_enabled()
    join_attempt_group(device, config.train.rdzv_endpoint)  # before init_distributed, which then finds it joined
    ctx = init_distributed(device)
    try:
        check_nodes_agree(ctx, config.train.nnodes, config.train.node_rank)
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
    except SpherecastError as exc:  # what the user can fix; anything else is a bug and keeps its traceback
        log.error("%s", exc)
        return 2
    if rank == 0:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
