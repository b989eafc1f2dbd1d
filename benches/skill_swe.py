"""Skill on the shallow-water planet: our SFNO vs persistence, climatology and torch-harmonics' example SFNO.

1. Simulates the planet once per grid through the real ingest (the training grid and a finer one
   for the zero-shot test: same seed, same times, same 65×128 solver, so one truth at two
   resolutions), split ~75 % train / 10 % validation / 15 % held-out test: by default 487 days, so
   a whole year of seasons is trained on (about 15 min of simulation per grid on one core, once;
   stores in ``--out`` are reused when they match).
2. Trains our SFNO with ``models.train.train`` (wall-clock budget ``--budget-minutes``, overrides with
   ``--set``), then torch-harmonics' example SFNO on the same normalized data until it has used the
   same CPU seconds (one torch thread each, so CPU time is work, not spinning; see ``FULL``).
3. Scores relative error (DESIGN §4; climatology = 1) at 6/24/72/120 h from every test initial time
   for SFNO, example, persistence and climatology.
4. Rolls the SFNO out ``--year-steps`` steps (1,460 = one simulated year) from ``--rollout-starts``
   test initial times (default 4): bounded, and mean kinetic energy within ±20 % of the planet's
   from every one of them? (From one start the verdict depended on the start.) Also where the
   rolled-out jets are, per 30 days, against the range the planet's jets span. Each year runs twice:
   deterministic, and stochastic — each step adds one of the SFNO's own one-step residuals on
   training windows (``models.noise``), the unforeseeable stirring a mean-squared-error model
   averages away; the KE goal is judged on the stochastic run, the deterministic one is reported.
5. Runs the same weights zero-shot on the finer grid against its truth: error ratio per lead.
6. With ``--bound`` (the ``--json`` of ``benches/skill_bound.py`` on the same stores), states skill as the
   fraction of the attainable improvement over persistence, per lead:
   ``attained = (persistence − SFNO) / (persistence − bound)``, the bound being the planet's own solver
   from the exact state (the planet is stirred at random, so no forecast reaches zero error; DESIGN §4).
7. With ``--member CHECKPOINT`` (repeatable; other runs of this bench on the same stores), also scores the
   mean of the SFNO's and the members' forecasts, each rolled out on its own: how much of the SFNO's error
   is the one run's own (training noise that another run does not share) rather than the recipe's.

Goals: attained ≥ 0.90 at 24 h and at 120 h; 24 h SFNO ≤ 1.0× the example; the stochastic year stays
bounded with mean KE within ±20 % and each hemisphere's jet within 10° of the planet's own range of
30-day means in every 30 days, from every start; zero-shot 24 h error ≤ 1.5× the native one. Figures
print as a table and go to ``--json``. ``--quick`` is the smoke-test size (tiny grid, a 25×48 solver,
seconds of training).

Usage: python benches/skill_swe.py [--days 487] [--budget-minutes 5] [--out DIR] [--json FILE] [--bound FILE]
       [--rollout-starts 4] [--set train.rollout_steps=4 ...] [--tag NAME] [--no-example] [--example-budget cpu|wall]
       [--checkpoint FILE] [--member FILE ...] [--noise-scale 1.0] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path and "ingest" would name benches/ingest.py,
# not the package; put the project root there instead (it also makes the benches.* helpers importable).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402
from torch import nn  # noqa: E402

from benches import skill_data as sd  # noqa: E402
from benches.skill_eval import (  # noqa: E402
    EXAMPLE,
    EXAMPLE_BATCH,
    EXAMPLE_LR,
    build_example,
    long_rollout,
    member_mean_errors,
    relative_errors,
    train_example,
)
from benches.skill_report import (  # noqa: E402
    STOCHASTIC,
    attained,
    attained_per_lead,
    goals,
    jet_verdict,
    json_safe,
    print_report,
)
from core.config import Config, config_from_dict  # noqa: E402
from core.grid import get_grid  # noqa: E402
from models.data import WindowDataset  # noqa: E402
from models.noise import ResidualNoise, StochasticForecaster  # noqa: E402
from models.poles import measure_pole_modes  # noqa: E402

log = logging.getLogger("benches.skill_swe")  # not __name__: that is "__main__" when run as a script

LEADS_H = (6, 24, 72, 120)
# One torch thread per model: on a shared 2-core machine two threads made a training step 5–12× slower
# (OpenMP threads spin waiting for a core), so wall and CPU time stopped measuring the model.
# The planet has seasons (its jets swing ±10° of latitude over the year), so a one-year rollout needs a
# model with a clock (task.time_features) trained on a whole year: 487 days split 75/10/15 give 365 days
# of training. Without either the rollout carried one season's drift on for months (docs/benchmarks.md).
# The recipe: 8-step (2-day) rollouts with gradients through the last 2 only (pushforward), 3 % input noise,
# and the checkpoint chosen by its 120 h error: by 24 h the choice could fall on early weights that had not
# yet trained on long rollouts (the 24 h score plateaus), and one such run lost its year.
FULL = {"grid": "5.625deg", "zero_shot_grid": "2.8125deg", "days": 487.0, "budget_minutes": 5.0, "year_steps": 1460,
        "rollout_starts": 4, "set": ["train.threads=1", "task.time_features=[day_of_year]", "train.rollout_steps=8",
                                     "train.rollout_grad_steps=2", "train.input_noise=0.03",
                                     "train.val_lead_hours=[6,24,120]"]}
EXAMPLE_WALL_CAP = 3.0  # the reference may take this many times the wall budget to get the SFNO's CPU seconds
# Smoke-test size: the planet's solver on 25×48 (dt about half its CFL limit) and a 1-day spin-up.
QUICK = {"grid": "tiny", "zero_shot_grid": "5.625deg", "days": 12.0, "budget_minutes": 0.03, "year_steps": 60,
         "rollout_starts": 2, "set": ["ingest.synthetic.solver_nlat=25", "ingest.synthetic.solver_nlon=48",
                 "ingest.synthetic.dt_seconds=540", "ingest.synthetic.spinup_days=1", "train.threads=1",
                 "train.tensorboard=false", "task.time_features=[day_of_year]"]}


class Climatology(nn.Module):
    """The climatology forecast: the training-period mean whatever the initial state."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("clim", mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The climatology, shaped like ``x``."""
        return self.clim.expand_as(x)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``--quick`` or full-size defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=float, help="simulated days (default 487: a year to train on; quick 12)")
    p.add_argument("--budget-minutes", type=float, help="wall-clock training budget per model (default 5)")
    p.add_argument("--out", type=Path, default=Path("spherecast-out/skill_swe"), help="stores and runs (reused)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--bound", type=Path,
                   help="the perfect-model bound (benches/skill_bound.py --json on the same --out/--days/--set), "
                        "to report attained = (persistence − SFNO) / (persistence − bound) per lead")
    p.add_argument("--grid", help="training grid preset (default 5.625deg; quick tiny)")
    p.add_argument("--zero-shot-grid", help="finer grid for the zero-shot test (default 2.8125deg; quick 5.625deg)")
    p.add_argument("--year-steps", type=int, help="steps of the long rollout (default 1460 = one year)")
    p.add_argument("--rollout-starts", type=int,
                   help="initial times of the long rollout, evenly over the test period (default 4; quick 2): "
                        "one start is not a measurement of a chaotic system")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for our SFNO and the planet, e.g. train.rollout_steps=4 (repeatable)")
    p.add_argument("--tag", default="default", help="run name suffix, so variants keep their own checkpoints")
    p.add_argument("--no-example", action="store_true", help="skip torch-harmonics' example SFNO (tuning runs)")
    p.add_argument("--example-budget", choices=("cpu", "wall"), default="cpu",
                   help="give the example the SFNO run's CPU seconds (default) or the same wall-clock budget")
    p.add_argument("--noise-scale", type=float, default=1.0,
                   help="scale of the one-step residuals the stochastic year adds (default 1: as measured)")
    p.add_argument("--checkpoint", type=Path,
                   help="score this SFNO checkpoint (trained on the same stores) instead of training one; "
                        "implies --no-example, since the equal-budget comparison needs both trained here")
    p.add_argument("--pole-rows", choices=("checkpoint", "data", "free"), default="checkpoint",
                   help="with --checkpoint: keep each step's pole rows as the checkpoint says (default), to the form "
                        "the store's training data gives them (models/poles.py; also for a checkpoint trained "
                        "without), or leave them free. A trained run follows --set task.pole_rows")
    p.add_argument("--member", type=Path, action="append", default=[], metavar="CHECKPOINT",
                   help="also score the mean of the SFNO's forecasts and this checkpoint's (trained on the same "
                        "stores and task; repeatable): an ensemble of independently trained models. The goals "
                        "stay on the SFNO alone")
    p.add_argument("--quick", action="store_true", help="smoke-test size: tiny grid, 12 days, seconds of training")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    files = [("bound", args.bound), ("checkpoint", args.checkpoint), *(("member", m) for m in args.member)]
    for name, path in files:
        if path is not None and not path.is_file():
            p.error(f"--{name} {path} is not a file")
    if not args.noise_scale >= 0:
        p.error(f"--noise-scale must be ≥ 0, got {args.noise_scale}")
    if args.pole_rows != "checkpoint" and args.checkpoint is None:
        p.error(f"--pole-rows {args.pole_rows} needs --checkpoint; a run trained here follows --set task.pole_rows")
    args.no_example = args.no_example or args.checkpoint is not None
    preset = QUICK if args.quick else FULL
    for key in ("grid", "zero_shot_grid", "days", "budget_minutes", "year_steps", "rollout_starts"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.overrides = list(preset.get("set", [])) + args.overrides
    return args


def plan(args: argparse.Namespace) -> tuple[Config, Config, sd.Periods, dict[str, Any]]:
    """Check every input and build both grids' configs; ValueError naming the first bad one."""
    for name in ("grid", "zero_shot_grid"):
        get_grid(getattr(args, name))
    if args.grid == args.zero_shot_grid:
        raise ValueError(f"--zero-shot-grid must differ from --grid (both {args.grid})")
    if not args.budget_minutes > 0:
        raise ValueError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.year_steps < 1 or args.rollout_starts < 1:
        raise ValueError(f"--year-steps and --rollout-starts must be ≥ 1, got {args.year_steps}, {args.rollout_starts}")
    overrides = sd.parse_overrides(args.overrides)
    epoch = pd.Timestamp(sd.synthetic_settings(overrides).epoch)
    step_h = config_from_dict({"task": overrides.get("task", {})}, "--set").task.time_step_hours
    if step_h != 6:
        raise ValueError(f"task.time_step_hours={step_h}: the bench's leads are 6-hourly, keep the 6 h step")
    periods = sd.split_periods(args.days, step_h, max(LEADS_H) // step_h, epoch)
    coarse = sd.bench_config(args.out, args.grid, periods, args.budget_minutes, args.tag, overrides)
    fine = sd.bench_config(args.out, args.zero_shot_grid, periods, args.budget_minutes, args.tag, overrides)
    from models.train import build_sfno

    build_sfno(coarse, *coarse.grid.grid().shape)  # a bad model section fails here, before any simulation
    if args.bound is not None:
        check_bound(args.bound, load_bound(args.bound), periods, coarse)
    for path in args.member:
        check_member(path, coarse)
    return coarse, fine, periods, overrides


def check_member(path: Path, config: Config) -> None:
    """ValueError unless the checkpoint at ``path`` loads and forecasts this run's channels from the same inputs."""
    from models.checkpoint import load_for_inference, model_inputs

    _, meta = load_for_inference(path)
    task = config.task
    want = (config.grid.grid().describe(), task.channels(), (task.history, task.static_fields, task.time_features))
    have = (meta["grid"], meta["channels"], model_inputs(meta))
    if have != want:
        raise ValueError(f"--member {path} forecasts {have[1]} on {have[0]} from (history, statics, clock) "
                         f"{have[2]}; this run's SFNO forecasts {want[1]} on {want[0]} from {want[2]}: members "
                         "must share the grid and task")


def load_bound(path: Path) -> dict[str, Any]:
    """The report of ``benches/skill_bound.py --json``; ValueError naming what is missing if it is not one."""
    try:
        r = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--bound {path} is not a JSON report of benches/skill_bound.py ({exc})") from None
    rows = r.get("relative_error") if isinstance(r, dict) else None
    missing = [f"{h}h" for h in LEADS_H
               if not (isinstance(rows, dict) and isinstance(rows.get(f"{h}h"), dict)
                       and isinstance(rows[f"{h}h"].get("unstirred"), int | float))]
    if missing or not r.get("initial_times"):
        raise ValueError(f"--bound {path} has no perfect-model bound at {', '.join(missing) or 'any initial time'}: "
                         "give the --json of benches/skill_bound.py")
    return r


def check_bound(path: Path, bound: dict[str, Any], periods: sd.Periods, config: Config) -> None:
    """ValueError unless ``bound`` was measured on this run's planet and test period."""
    again = "run benches/skill_bound.py with the same --out, --days and --set"
    if "periods" in bound and bound["periods"] != periods.as_dict():
        raise ValueError(f"--bound {path} was measured on the periods {bound['periods']}, this run's are "
                         f"{periods.as_dict()}: {again}")
    planet = config.ingest.synthetic.model_dump(mode="json")
    if "planet" in bound and bound["planet"] != planet:
        diff = sorted(k for k in planet if bound["planet"].get(k) != planet[k])
        raise ValueError(f"--bound {path} was measured on another planet (differs in {', '.join(diff)}): {again}")
    # Reports that predate the two keys above still name their initial times: all must be test times.
    times = pd.DatetimeIndex(bound["initial_times"])
    if times.min() < periods.test_start or times.max() > periods.end:
        raise ValueError(f"--bound {path} starts at {times.min()} … {times.max()}, outside this run's test period "
                         f"{periods.test_start} … {periods.end}: {again}")


def train_sfno(config: Config) -> tuple[Path, dict[str, Any]]:
    """Train our SFNO through the real trainer; return its best checkpoint and what the run did."""
    from models.train import train

    wall0, cpu0 = time.monotonic(), time.process_time()
    checkpoint = train(config)
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    records = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    end = [r for r in records if r["event"] == "end"][-1]  # earlier runs' lines may stay above this one's
    return checkpoint, {"steps": end["steps"], "epochs": end["epochs"], "wall_s": round(wall, 1),
                        "cpu_s": round(cpu, 1), "best_val_score": end["best_score"],
                        "checkpoint": str(checkpoint), "model": config.model.model_dump(),
                        "train": {k: v for k, v in config.train.model_dump(mode="json").items()
                                  if k in ("lr", "batch_size", "rollout_steps", "rollout_start", "rollout_ramp",
                                           "budget_minutes", "max_steps", "threads", "precision",
                                           "val_lead_hours", "val_score", "val_stride", "rollout_grad_steps",
                                           "rollout_grad_first", "input_noise")}}


def trained_before(checkpoint: Path) -> dict[str, Any]:
    """What the run that wrote ``checkpoint`` did, from its ``metrics.jsonl`` (``None`` where it is absent)."""
    metrics = checkpoint.parent / "metrics.jsonl"
    ends = ([r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("event") == "end"]
            if metrics.is_file() else [])
    end = ends[-1] if ends else {}
    return {"steps": end.get("steps"), "epochs": end.get("epochs"), "wall_s": None, "cpu_s": None,
            "best_val_score": end.get("best_score"), "checkpoint": str(checkpoint), "from_checkpoint": True}


@dataclass
class Data:
    """The two stores and the datasets the scores are computed on."""

    coarse: xr.Dataset
    fine: xr.Dataset
    channels: list[str]
    step_h: int
    test: WindowDataset  # held-out windows to the longest lead, training grid
    clim: torch.Tensor  # training-period mean, training grid
    fine_test: WindowDataset
    fine_clim: torch.Tensor
    sfno_test: WindowDataset  # the same windows as our SFNO's task sees them (history stack, clock)
    sfno_fine_test: WindowDataset


def load_data(coarse_cfg: Config, fine_cfg: Config, periods: sd.Periods, quick: bool) -> tuple[Data, dict[str, Any]]:
    """Build or reuse both stores and cut the test windows and climatologies out of them."""
    stores = [sd.build_store(c, progress=not quick) for c in (coarse_cfg, fine_cfg)]
    coarse, fine = sd.open_store(coarse_cfg), sd.open_store(fine_cfg)
    channels, step_h, t = coarse_cfg.task.channels(), coarse_cfg.task.time_step_hours, coarse_cfg.train
    max_lead = max(LEADS_H) // step_h

    def windows(ds: xr.Dataset) -> tuple[WindowDataset, torch.Tensor]:
        test = WindowDataset(ds, channels, periods.test_start, periods.end, max_lead, step_h)
        return test, WindowDataset(ds, channels, t.train_start, t.train_end, 1, step_h).time_mean()

    def sfno_windows(ds: xr.Dataset, plain: WindowDataset) -> WindowDataset:
        task = coarse_cfg.task
        if task.history == 1 and not task.time_features:
            return plain
        return WindowDataset(ds, channels, periods.test_start, periods.end, max_lead, step_h, task.history,
                             task.time_features)

    test, clim = windows(coarse)
    fine_test, fine_clim = windows(fine)
    data = Data(coarse, fine, channels, step_h, test, clim, fine_test, fine_clim, sfno_windows(coarse, test),
                sfno_windows(fine, fine_test))
    times = pd.DatetimeIndex(data.test.times)
    info = {"stores": stores, "test_initial_times": len(data.test),
            "same_truth_max_diff_std": sd.truth_consistency(coarse, fine, [times[0], times[len(times) // 2], times[-1]])}
    return data, info


def train_models(args: argparse.Namespace, config: Config, data: Data, report: dict[str, Any]) -> dict[str, nn.Module]:
    """Our SFNO through the trainer, then (unless ``--no-example``) the reference on the same CPU seconds."""
    from models.checkpoint import load_for_inference
    from models.distributed import set_threads

    t = config.train
    if args.checkpoint is not None:
        set_threads(t.threads, 1)  # scoring runs on the trainer's threads (as after training), not on every core
        checkpoint, report["training_sfno"] = args.checkpoint, trained_before(args.checkpoint)
    else:
        checkpoint, report["training_sfno"] = train_sfno(config)
    sfno, meta = load_for_inference(checkpoint)
    if args.pole_rows != "checkpoint":
        sfno.set_pole_modes(measure_pole_modes(data.coarse, data.channels, t.train_start, t.train_end)
                            if args.pole_rows == "data" else None)
    report["training_sfno"]["parameters"] = sum(p.numel() for p in sfno.parameters())
    report["training_sfno"]["pole_modes"] = sfno.pole_modes  # task.pole_rows="data" (models/poles.py), or None
    models: dict[str, nn.Module] = {"sfno": sfno}
    if args.no_example:
        return models
    threads = set_threads(t.threads, 1)  # the reference gets the trainer's thread count
    stats = meta["stats"]  # the trainer's normalization: both models see the same normalized data
    example = build_example(*data.coarse["geopotential"].shape[-2:], len(data.channels), stats["mean"], stats["std"],
                            t.seed)
    train_ds = WindowDataset(data.coarse, data.channels, t.train_start, t.train_end, 1, data.step_h)
    # Same CPU seconds as the SFNO's whole run (validations included), so other people's jobs on the
    # machine cannot favour either model; --example-budget wall gives it the same wall clock instead.
    cpu = report["training_sfno"]["cpu_s"] if args.example_budget == "cpu" else None
    minutes = args.budget_minutes * (EXAMPLE_WALL_CAP if cpu else 1.0)
    log.info("training torch-harmonics' example SFNO (%d threads) for %s", threads,
             f"{cpu} CPU seconds" if cpu else f"{minutes:g} min")
    info = train_example(example, train_ds, minutes, t.seed, cpu_seconds=cpu)
    info.update(settings=dict(EXAMPLE), lr=EXAMPLE_LR, batch_size=EXAMPLE_BATCH, threads=threads,
                parameters=sum(p.numel() for p in example.net.parameters()))
    report["training_example"] = info
    models["example"] = example
    return models


def score(models: dict[str, nn.Module], data: Data) -> dict[str, Any]:
    """Relative error at every lead for each model, persistence and climatology (per-channel RMSE too)."""
    lead_steps = [h // data.step_h for h in LEADS_H]
    forecasters = {**models, "climatology": Climatology(data.clim)}
    scores = {name: relative_errors(m, data.sfno_test if name == "sfno" else data.test, lead_steps, data.step_h, data.clim)
              for name, m in forecasters.items()}
    table: dict[str, dict[str, float | None]] = {}
    for lead in (f"{h}h" for h in LEADS_H):
        table[lead] = {name: scores[name]["relative_error"][lead]["model"] if name in scores else None
                       for name in ("sfno", "example", "climatology")}
        table[lead]["persistence"] = scores["sfno"]["relative_error"][lead]["persistence"]
    return {"relative_error": table, "rmse_sfno": scores["sfno"]["rmse"],
            "rmse_persistence": scores["sfno"]["persistence_rmse"]}


def score_members(paths: list[Path], sfno: nn.Module, data: Data, report: dict[str, Any],
                  bound: dict[str, Any] | None) -> dict[str, Any]:
    """Relative error (and attained, with a bound) per lead of the mean of the SFNO's and the members' forecasts."""
    from models.checkpoint import load_for_inference

    members = [sfno, *(load_for_inference(p)[0] for p in paths)]
    errors = member_mean_errors(members, data.sfno_test, [h // data.step_h for h in LEADS_H], data.step_h, data.clim)
    out: dict[str, Any] = {"checkpoints": [report["training_sfno"]["checkpoint"], *map(str, paths)],
                           "relative_error": errors}
    if bound is not None:
        out["attained"] = {lead: attained(report["relative_error"][lead]["persistence"], e,
                                          bound["relative_error"][lead]["unstirred"]) for lead, e in errors.items()}
    return out


def residual_noise(sfno: nn.Module, config: Config, data: Data, scale: float = 1.0) -> ResidualNoise:
    """The SFNO's one-step residuals on training windows (never the test period's), times ``scale``, for stochastic
    rollouts."""
    t, task = config.train, config.task
    train = WindowDataset(data.coarse, data.channels, t.train_start, t.train_end, 1, data.step_h, task.history,
                          task.time_features)
    return ResidualNoise.fit(sfno, train, seed=t.seed, scale=scale)


def zero_shot(sfno: nn.Module, data: Data, native: dict[str, dict[str, float | None]], grid: str) -> dict[str, Any]:
    """The same weights on the finer grid against its truth, per lead, and the ratio to the native error."""
    lead_steps = [h // data.step_h for h in LEADS_H]
    sfno.set_grid(*data.fine["geopotential"].shape[-2:])
    try:
        zs = relative_errors(sfno, data.sfno_fine_test, lead_steps, data.step_h, data.fine_clim)["relative_error"]
    finally:
        sfno.set_grid(*data.coarse["geopotential"].shape[-2:])
    leads = {lead: {"native": native[lead]["sfno"], "zero_shot": zs[lead]["model"],
                    "ratio": zs[lead]["model"] / native[lead]["sfno"], "persistence_fine": zs[lead]["persistence"]}
             for lead in native}
    return {"grid": grid, "initial_times": len(data.fine_test), "leads": leads}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole bench; returns the report."""
    coarse_cfg, fine_cfg, periods, overrides = plan(args)
    report: dict[str, Any] = {
        "command": " ".join(["python benches/skill_swe.py", *args.argv]),
        "machine": {"machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_average_start": [round(v, 2) for v in os.getloadavg()]},
        "settings": {"grid": args.grid, "zero_shot_grid": args.zero_shot_grid, "days": args.days,
                     "budget_minutes": args.budget_minutes, "year_steps": args.year_steps,
                     "rollout_starts": args.rollout_starts, "overrides": overrides, "pole_rows": args.pole_rows,
                     "periods": periods.as_dict(), "leads_h": list(LEADS_H)},
    }
    data, report["data"] = load_data(coarse_cfg, fine_cfg, periods, args.quick)
    bound = load_bound(args.bound) if args.bound is not None else None
    if bound is not None and bound.get("test_initial_times_available", len(data.test)) != len(data.test):
        raise ValueError(f"--bound {args.bound} saw {bound['test_initial_times_available']} test initial times, "
                         f"this run has {len(data.test)}: run benches/skill_bound.py on the same stores")
    models = train_models(args, coarse_cfg, data, report)
    report.update(score(models, data))
    if bound is not None:
        report["bound"] = {"path": str(args.bound), "command": bound.get("command"),
                           "initial_times": len(bound["initial_times"]),
                           "leads": attained_per_lead(report["relative_error"], bound)}
    if args.member:
        report["members"] = score_members(args.member, models["sfno"], data, report, bound)
    planet_ke = sd.planet_mean_ke(data.coarse)
    weights = coarse_cfg.grid.grid().weights
    starts = sorted({round(k) for k in np.linspace(0, len(data.sfno_test) - 1,
                                                   min(args.rollout_starts, len(data.sfno_test)))})
    lat = data.coarse["latitude"].values
    noise = residual_noise(models["sfno"], coarse_cfg, data, args.noise_scale)
    report["residual_noise"] = {"windows": len(noise.bank), "scale": args.noise_scale,
                                "rms": dict(zip(data.channels, noise.rms(), strict=True))}
    # The year also runs stochastically (models/noise.py): the SFNO plus, each step, one of its own one-step
    # residuals on training windows — the stirring no analysis shows, which a mean-squared-error model smooths away.
    rollers = {name: [m] * len(starts) for name, m in models.items()}
    rollers[STOCHASTIC] = [StochasticForecaster(models["sfno"], noise, seed=k) for k in starts]
    # Window k is the same initial time in both datasets while the task's history is 1 (the default).
    runs = {name: [long_rollout(m, (data.sfno_test if name != "example" else data.test)[k][0], args.year_steps,
                                data.channels, weights, planet_ke, latitudes=lat) for m, k in zip(ms, starts, strict=True)]
            for name, ms in rollers.items()}
    report["rollout"] = {name: r[0] for name, r in runs.items()}  # the first start, in full
    report["rollout"]["initial_time"] = str(pd.Timestamp(data.sfno_test.init_times[starts[0]]))
    jets = np.asarray(sd.planet_jets(data.coarse))
    # Where the planet's jets went (30-day means over the whole store): the range a rollout should stay in.
    report["rollout"]["planet_jets"] = {"north": [float(jets[:, 0].min()), float(jets[:, 0].max())],
                                        "south": [float(jets[:, 1].min()), float(jets[:, 1].max())]}
    report["rollout_starts"] = {
        name: [{"initial_time": str(pd.Timestamp(data.sfno_test.init_times[k])), "finite": r["finite"],
                "ke_ratio": r["ke_ratio"], "ke_per_30_days": r["ke_per_30_days"], "pass": r["pass"],
                "jets_per_30_days": r["jets_per_30_days"], "pole_zonal_u_per_30_days": r["pole_zonal_u_per_30_days"]}
               for k, r in zip(starts, rs, strict=True)] for name, rs in runs.items()}
    report["jets"] = {name: jet_verdict(rs, report["rollout"]["planet_jets"])
                      for name, rs in report["rollout_starts"].items()}
    report["zero_shot"] = zero_shot(models["sfno"], data, report["relative_error"], fine_cfg.grid.grid().describe())
    report["goals"] = goals(report, args)
    report["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: run the bench, print the report, write ``--json``; exit 2 on a bad input."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = run(args)
    except ValueError as exc:
        print(f"skill_swe: error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(report), indent=2, default=str, allow_nan=False))
        print(f"\nreport written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
