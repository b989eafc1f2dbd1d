"""The ``train`` section of the config: periods, budget, optimisation, precision, distribution and tracking."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from pydantic import NonNegativeFloat, model_validator

from core.config_base import Moment, _Section
from core.errors import ConfigError


class TrainConfig(_Section):
    run_name: str = "sfno-demo"
    """Name of the run directory under ``paths.runs``."""
    train_start: Moment = datetime(2000, 1, 1)
    """First analysis time used for training (and statistics)."""
    train_end: Moment = datetime(2000, 3, 5, 18)
    """Last analysis time used for training (and statistics)."""
    val_start: Moment = datetime(2000, 3, 6)
    """First validation time (must come after ``train_end``)."""
    val_end: Moment = datetime(2000, 3, 15, 18)
    """Last validation time."""
    budget_minutes: float = 5.0
    """Wall-clock training budget, summed over every attempt of the run (resumes and restarts); training stops at
    the first step past it. Without ``max_steps`` the learning rate, rollout curriculum and validation points follow
    the fraction of this budget used."""
    max_steps: int | None = None
    """Optimizer steps of the run. When set, the schedules (learning rate, rollout curriculum, validation points)
    follow ``step / max_steps`` — a function of the step alone, so a resumed run repeats an uninterrupted one bit for
    bit — and ``budget_minutes`` only stops a run that is too slow (a safety net; it logs a warning)."""
    batch_size: int = 8
    """Global batch size (split evenly over ranks)."""
    lr: float = 2e-3
    """Peak learning rate (cosine decay over the budget)."""
    rollout_steps: int = 2
    """Autoregressive steps in the multistep loss at the end of the curriculum (its maximum)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Forward-pass precision: bf16 autocast (CPU or CUDA; SHTs stay fp32), fp16 autocast with a dynamic loss scale
    (``torch.amp.GradScaler``; CUDA only), fp32, or auto (bf16 on a GPU that supports it, fp32 otherwise). bf16 on a
    GPU without bfloat16 is refused before training starts."""
    tensorboard: bool = True
    """Write TensorBoard event files to ``<run>/tensorboard`` (loss, lr, grad norm, throughput, memory, val RMSE)."""
    mlflow_tracking_uri: str | None = None
    """Also log params and metrics to MLflow at this URI (e.g. ``sqlite:///mlflow.db``, ``http://host:5000``)."""
    mlflow_experiment: str = "spherecast"
    """MLflow experiment the runs are filed under."""
    activation_checkpointing: bool = False
    """Recompute SFNO blocks in the backward pass instead of storing activations (less memory, more compute)."""
    channel_weights: dict[str, float] = {}
    """Loss weight per channel name (e.g. ``{geopotential_500: 2.0}``); channels not listed weigh 1."""
    val_lead_hours: list[int] = [6, 24]
    """Validation leads (hours); ``checkpoint.pt`` is the weights with the lowest validation score (``val_score``)."""
    val_stride: int = 1
    """Score every n-th validation window (initial times n × the model step apart; 1 = all). Neighbouring 6-hourly
    windows are near-duplicates, so a stride divides validation's cost (it counts against the budget) and loses
    little: on three years of the planet all 564 windows took about a minute per validation."""
    val_score: Literal["longest", "mean"] = "longest"
    """The validation score that picks ``checkpoint.pt``: ``longest`` — the relative error at the longest of
    ``val_lead_hours``; ``mean`` — the mean over those leads of the model's error as a fraction of persistence's,
    so a gain over persistence weighs the same at every lead (one lead cannot be bought with another)."""
    rollout_grad_steps: int | None = None
    """Backpropagate through only the last N steps of each rollout; earlier steps run without gradients (the
    pushforward trick: the model learns from its own drifted states at the cost of N steps). None = all steps."""
    rollout_grad_first: int = 0
    """With ``rollout_grad_steps``, also backpropagate through the first N steps of each rollout (from the
    analysis): the short leads learn from clean inputs while the last steps learn from the model's own drifted
    states. 0 = only the last steps."""
    input_noise: float = 0.0
    """Std of Gaussian noise added to each training window's input state, in units of each channel's std
    (0 = none): the model learns to pull states slightly off the data back (a remedy for autoregressive drift)."""
    ema_decay: float = 0.0
    """Average the weights over the tail of the run and forecast from the average (0 = off): from ``ema_start`` on,
    a uniform mean of the steps for the first 1/(1 − ema_decay) of them, then an exponential moving average with
    this decay (e.g. 0.999). Validation and both checkpoint files then use the average (see models/averaging.py)."""
    ema_start: float = 0.5
    """Fraction of the run after which ``ema_decay`` averaging begins (the early, fast-moving weights stay out)."""
    rollout_start: int = 1
    """Autoregressive steps at the start of training."""
    rollout_increment: int = 1
    """Steps added at each stage of the curriculum."""
    rollout_ramp: float = 0.3
    """Fraction of the budget over which the rollout grows from ``rollout_start`` to ``rollout_steps``."""
    seed: int = 0
    """Seed of weights and data order."""
    threads: int = 0
    """torch intra-op threads per rank (0 = cores / ranks)."""
    loader: Literal["auto", "memory", "zarr"] = "auto"
    """Where training and validation windows come from: ``memory`` — both periods loaded into every rank's memory
    (small periods); ``zarr`` — each window read from the store when it is drawn (years of ERA5); ``auto`` —
    ``memory`` while the two periods' fields (times × channels × grid × 4 bytes) stay below ``loader_memory_gib``,
    else ``zarr`` (the choice is logged)."""
    loader_memory_gib: NonNegativeFloat = 2.0
    """With ``loader: auto``, the largest training + validation field volume (GiB per rank) held in memory."""
    num_workers: int = 0
    """DataLoader worker processes prefetching windows (spawned; useful with ``loader: zarr``)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each rank trains: ``cuda`` — GPU ``LOCAL_RANK`` of its node, torchrun ranks in an nccl group, refused
    where CUDA is absent; ``cpu`` — the CPU even where CUDA exists, ranks in a gloo group (``precision: auto`` is
    then fp32); ``auto`` — ``cuda`` where CUDA exists, ``cpu`` otherwise."""
    nproc_per_node: int = 1
    """Ranks torchrun starts on this machine (GPUs per node, or CPU processes)."""
    nnodes: int = 1
    """Number of nodes in the torchrun rendezvous."""
    node_rank: int = 0
    """This node's index in a multi-node run, 0..nnodes-1 (``--node-rank``; Slurm ``$SLURM_NODEID``). Node 0 runs on
    the ``rdzv_endpoint`` host and hosts the rendezvous store; torchrun's c10d rendezvous assigns the ranks."""
    rdzv_endpoint: str | None = None
    """host:port of the rendezvous for multi-node runs (None = standalone on this machine); every node gives the same
    one, the host of node 0. Needed when ``nnodes > 1``."""
    rdzv_timeout_s: int = 600
    """Seconds a node waits for the rendezvous endpoint to answer and for every node to join
    (torchrun ``--rdzv-conf join_timeout=…,read_timeout=…``)."""
    max_nonfinite_steps: int = 5
    """Steps with a NaN/Inf loss or gradient are skipped and counted; this many in a row stop the run."""
    comm_hook: Literal["none", "powersgd", "signsgd"] = "none"
    """DDP gradient communication: plain all-reduce, PowerSGD low-rank, or 1-bit signSGD with majority vote."""
    powersgd_rank: int = 2
    """Rank of PowerSGD's low-rank approximation of each gradient matrix (smaller = stronger compression)."""
    powersgd_start_iter: int = 10
    """Steps of plain all-reduce before PowerSGD starts compressing (≥ 2: DDP rebuilds its buckets after step 1)."""
    signsgd_error_feedback: bool = True
    """Carry each rank's compression residual into its next gradient (what makes signSGD converge reliably)."""
    resume: Literal["auto", "never"] = "auto"
    """``auto``: continue from ``<run>/last.pt`` when it exists (exactly: weights, optimizer, schedule, loss scale,
    RNGs, data position, budget used, best score) and append to ``metrics.jsonl``; start fresh otherwise. ``never``:
    always start fresh — an existing ``last.pt`` is kept until the new run's first checkpoint replaces it (with a
    warning) and the old metrics lines stay above the new ``start`` record. A ``last.pt`` that does not fit the
    config or data (channels, grid, model, dataset version, stats, batch size, seed, training windows) or cannot be
    read stops the run before any step, naming what differs."""
    checkpoint_every_steps: int | None = None
    """Also write ``last.pt`` every this many optimizer steps (None = not by step count)."""
    checkpoint_every_minutes: float | None = 10.0
    """Also write ``last.pt`` when this many minutes passed since the previous checkpoint (None = not by time).
    ``last.pt`` is always written at each validation and at the end; ``checkpoint.pt`` holds the best validation."""
    deterministic: bool = False
    """Use only deterministic kernels (``torch.use_deterministic_algorithms``, no cuDNN autotuning, a fixed cuBLAS
    workspace): with ``max_steps`` set, a killed and resumed run ends with the uninterrupted run's exact weights."""
    max_restarts: int = 0
    """How often torchrun restarts all ranks after one fails (``--max-restarts``); each restart resumes from
    ``last.pt`` (needs ``resume: auto``)."""
    window_days: float | None = None
    """Rolling window of the weekly retrain (``retrain_weekly``): train on this many days that end where its
    validation period begins. None = keep the fixed ``train_start``..``train_end`` and ``val_start``..``val_end``."""
    val_days: float = 10.0
    """Length in days of the weekly retrain's validation period, which ends at the newest complete analysis (only with
    ``window_days``). The new model and the current one are compared on its windows."""
    promotion_margin: float = 0.0
    """A retrained model becomes "current" only if at every ``val_lead_hours`` lead the mean over channels of
    RMSE(new) / RMSE(current) is below 1 − this margin (0 = any improvement at every lead)."""
    compile: bool = False
    """Compile the SFNO's training forward with ``torch.compile`` (inductor; on CPU it needs a C++ compiler, and the
    first steps spend tens of seconds compiling). Checkpoints keep the plain parameter names."""

    @model_validator(mode="after")
    def _periods(self) -> TrainConfig:
        if self.train_end < self.train_start:
            raise ConfigError(f"train_end {self.train_end} is before train_start {self.train_start}")
        if self.val_start <= self.train_end:
            raise ConfigError(f"val_start {self.val_start} must come after train_end {self.train_end}")
        if self.val_end < self.val_start:
            raise ConfigError(f"val_end {self.val_end} is before val_start {self.val_start}")
        if self.batch_size < 1 or self.rollout_steps < 1:
            raise ConfigError("batch_size and rollout_steps must be ≥ 1")
        if not 1 <= self.rollout_start <= self.rollout_steps or self.rollout_increment < 1:
            raise ConfigError(f"rollout_start {self.rollout_start} must be in 1..rollout_steps ({self.rollout_steps}) "
                              f"and rollout_increment {self.rollout_increment} ≥ 1")
        if not 0 < self.rollout_ramp <= 1:
            raise ConfigError(f"rollout_ramp {self.rollout_ramp} must be in (0, 1]")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"max_nonfinite_steps {self.max_nonfinite_steps} must be ≥ 1")
        if self.powersgd_rank < 1:
            raise ConfigError(f"powersgd_rank {self.powersgd_rank} must be ≥ 1")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ConfigError(f"checkpoint_every_steps {self.checkpoint_every_steps} must be ≥ 1 (or null)")
        if self.checkpoint_every_minutes is not None and not self.checkpoint_every_minutes > 0:
            raise ConfigError(f"checkpoint_every_minutes {self.checkpoint_every_minutes} must be > 0 (or null)")
        if not self.val_lead_hours or min(self.val_lead_hours) < 1:
            raise ConfigError(f"val_lead_hours {self.val_lead_hours} must list positive lead times in hours")
        if self.val_stride < 1:
            raise ConfigError(f"val_stride {self.val_stride} must be ≥ 1 (1 = every validation window)")
        if self.rollout_grad_steps is not None and self.rollout_grad_steps < 1:
            raise ConfigError(f"rollout_grad_steps {self.rollout_grad_steps} must be ≥ 1 (or null for every step)")
        if self.rollout_grad_first < 0:
            raise ConfigError(f"rollout_grad_first {self.rollout_grad_first} must be ≥ 0 (0 = only the last steps)")
        if not 0 <= self.input_noise < 1:
            raise ConfigError(f"input_noise {self.input_noise} must be in [0, 1) (a fraction of each channel's std)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay {self.ema_decay} must be in [0, 1) (0 = no weight averaging)")
        if not 0 <= self.ema_start < 1:
            raise ConfigError(f"ema_start {self.ema_start} must be in [0, 1) (the fraction of the run before averaging)")
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts {self.max_restarts} must be ≥ 0")
        self._check_nodes()
        if self.num_workers < 0:
            raise ConfigError(f"num_workers {self.num_workers} must be ≥ 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps {self.max_steps} must be ≥ 1 (or null)")
        if self.max_restarts > 0 and self.resume == "never":
            raise ConfigError("max_restarts > 0 needs resume: auto (a restarted rank must continue from last.pt, "
                              "not start over)")
        if self.window_days is not None and not self.window_days > 0:
            raise ConfigError(f"window_days {self.window_days} must be > 0 (or null for the fixed periods)")
        if not self.val_days > 0:
            raise ConfigError(f"val_days {self.val_days} must be > 0")
        if not 0 <= self.promotion_margin < 1:
            raise ConfigError(f"promotion_margin {self.promotion_margin} must be in [0, 1)")
        if self.powersgd_start_iter < 2:
            raise ConfigError(f"powersgd_start_iter {self.powersgd_start_iter} must be ≥ 2 (DDP rebuilds its "
                              "gradient buckets after the first step)")
        return self

    def _check_nodes(self) -> None:
        """One-line errors for the multi-node settings (node rank, rendezvous endpoint, timeout)."""
        if self.nnodes < 1 or self.nproc_per_node < 1:
            raise ConfigError(f"nnodes {self.nnodes} and nproc_per_node {self.nproc_per_node} must be ≥ 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank {self.node_rank} must be in 0..{self.nnodes - 1} (nnodes {self.nnodes})")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError(f"nnodes {self.nnodes} needs rdzv_endpoint (host:port of node 0, the same on every node)")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or host.startswith(":") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"rdzv_endpoint {self.rdzv_endpoint!r} is not host:port (e.g. node0:29400)")
        if self.rdzv_timeout_s < 1:
            raise ConfigError(f"rdzv_timeout_s {self.rdzv_timeout_s} must be ≥ 1")

    def rolling(self, newest: datetime, time_step_hours: int) -> TrainConfig:
        """This section for a weekly retrain: run ``<run_name>-YYYYMMDDTHH`` (newest analysis), periods rolled to it."""
        # The name comes from the data, not the wall clock: a second trigger on the same data continues (or finds
        # finished) the same run instead of training a twin, and newer data always means a run of its own, with its
        # own budget and its own last.pt.
        changes: dict[str, object] = {"run_name": f"{self.run_name}-{newest:%Y%m%dT%H}"}
        if self.window_days is not None:
            step = timedelta(hours=time_step_hours)
            n_val = round(self.val_days * 24 / time_step_hours)
            n_train = round(self.window_days * 24 / time_step_hours)
            longest = max(self.val_lead_hours) // time_step_hours
            if n_val - 1 < longest:
                raise ConfigError(f"train.val_days {self.val_days} holds {n_val} analysis times, too few for one "
                                  f"validation window of the longest val_lead_hours ({max(self.val_lead_hours)} h)")
            if n_train < 2:
                raise ConfigError(f"train.window_days {self.window_days} holds fewer than 2 analysis times")
            val_start = newest - (n_val - 1) * step
            train_end = val_start - step
            changes |= {"val_start": val_start, "val_end": newest, "train_end": train_end,
                        "train_start": train_end - (n_train - 1) * step}
        return TrainConfig.model_validate({**self.model_dump(), **changes})
