"""Memory and time of each stage as the period grows: 1×, 2×, 4×, 8× days of a 1.5° synthetic store.

For each training-period length a fresh data root gets, each phase in its own subprocess (so the peak
resident set size, ``ru_maxrss``, is that phase's alone):

- ``ingest``: the synthetic planet (a coarse solver, regridded to 1.5°) into the analysis store, as
  ``spherecast ingest`` runs it (including its statistics refresh);
- ``stats``: from-scratch statistics passes over the training period (``ingest.stats.compute_stats``,
  ``incremental=False``: every time is read) with a 4 MiB block budget, below the 1× period's bytes; the
  fastest of 5 passes after a warm-up on two times;
- ``train``: one epoch with ``train.loader: zarr`` (tiny SFNO, ``max_steps`` = one epoch), with the
  validation at its start and end, also read from the store;
- ``forecast``: a 40-lead (10-day) streamed forecast from the trained checkpoint.

The training period is ``days × factor`` days; validation is the 2 days after it at every length (its
batches of up to 16 windows cost the same whatever the training period: a longer validation period would
grow the first batches, not what this bench is about). Goals (issue 14): peak RSS at 8× within 15 % of 1× in
every phase; stats and ingest time linear in the period (R² of a least-squares line ≥ 0.99; wall and CPU
time are both fitted: on a shared machine the wall time also measures the neighbours). Prints a table and,
with ``--json``, a line ``JSON {…}``.

Usage: python benches/scale.py [--days 8] [--factors 1 2 4 8] [--grid 1.5deg] [--threads 2]
       [--phases ingest stats train forecast] [--no-warmup] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

# Run as a script, benches/ comes first on sys.path and "ingest" would name benches/ingest.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

PHASES = ("ingest", "stats", "train", "forecast")
LEADS = 40
VAL_DAYS = 2  # the same validation period at every length: its batches (up to 16 windows) cost the same
STATS_BUDGET = 4 * 2**20  # below the 1× training period's bytes, so every length streams several blocks
STATS_REPEATS = 5
START = datetime(2000, 1, 1)
RSS_GOAL, R2_GOAL = 1.15, 0.99


def config_data(root: Path, grid: str, days: int, threads: int) -> dict:
    """The config of one period length: ``days`` of training, then ``VAL_DAYS`` of validation, a tiny model."""
    train_end = START + timedelta(days=days) - timedelta(hours=6)
    end = train_end + timedelta(days=VAL_DAYS)
    return {
        "paths": {"root": str(root)},
        "grid": {"preset": grid},
        "ingest": {"start": START.isoformat(), "end": end.isoformat(), "slab_size": 4,
                   "synthetic": {"solver_nlat": 33, "solver_nlon": 64, "dt_seconds": 360, "spinup_days": 1}},
        "model": {"embed_dim": 8, "num_layers": 1, "scale_factor": 3 if grid == "1.5deg" else 1,
                  "encoder_layers": 1, "decoder_layers": 1},
        "train": {"train_start": START.isoformat(), "train_end": train_end.isoformat(),
                  "val_start": (train_end + timedelta(hours=6)).isoformat(), "val_end": end.isoformat(),
                  "loader": "zarr", "batch_size": 4, "threads": threads, "budget_minutes": 60.0,
                  "tensorboard": False, "val_lead_hours": [6], "rollout_steps": 1, "device": "cpu"},
    }


def run_phase(phase: str, data: dict) -> dict:
    """One phase, in this process (the child): its wall time and this process's peak RSS."""
    from core.config import config_from_dict

    config = config_from_dict(data)
    started, cpu0 = time.perf_counter(), time.process_time()
    extra: dict = {}
    if phase == "ingest":
        from ingest.build import ingest

        ingest(config, progress=False)
    elif phase == "stats":
        from ingest.stats import READS, compute_stats

        t, store, channels = config.train, config.paths.analysis_store, config.task.channels()
        # Warm-up on the first two times: imports' lazy parts and Zarr's event loop are not the pass's cost.
        compute_stats(store, channels, t.train_start, t.train_start + timedelta(hours=6), incremental=False)
        runs = []
        for _ in range(STATS_REPEATS):  # a few from-scratch passes
            before, begun, cpu0 = READS.times, time.perf_counter(), time.process_time()
            compute_stats(store, channels, t.train_start, t.train_end, incremental=False, budget_bytes=STATS_BUDGET)
            runs.append((time.perf_counter() - begun, time.process_time() - cpu0, READS.times - before))
        seconds, cpu, extra["times_read"] = min(runs)  # the least disturbed pass on a shared machine
        return {"phase": phase, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak_mib(), **extra}
    elif phase == "train":
        from models.train import train
        from models.zarr_windows import ZarrWindowDataset

        t = config.train
        windows = len(ZarrWindowDataset(config.paths.analysis_store, config.task.channels(), t.train_start,
                                        t.train_end, t.rollout_steps, config.task.time_step_hours))
        data["train"]["max_steps"] = extra["steps"] = windows // t.batch_size  # one epoch
        train(config_from_dict(data))
    elif phase == "forecast":
        from models.data import open_analysis
        from models.forecast import load_forecaster, stream_forecast

        model, meta = load_forecaster(config.paths.runs / config.train.run_name / "checkpoint.pt")
        analysis = open_analysis(config.paths.analysis_store)
        init = analysis["time"].values[-1]
        stream_forecast(model, meta, analysis, init, LEADS * 6, config.paths.root / "forecast", formats=("netcdf",))
    return {"phase": phase, "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu0,
            "peak_rss_mib": peak_mib(), **extra}


def peak_mib() -> float:
    """This process's peak resident set size in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(phase: str, data: dict, threads: int) -> dict:
    """Run ``phase`` in a fresh interpreter and return what it measured."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, __file__, "--child", phase, json.dumps(data)], capture_output=True,
                         text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def r_squared(x: list[float], y: list[float]) -> float:
    """R² of the least-squares line through ``(x, y)``."""
    a, b = np.polyfit(x, y, 1)
    resid = np.asarray(y) - (a * np.asarray(x) + b)
    total = np.asarray(y) - np.mean(y)
    return float(1 - (resid @ resid) / (total @ total)) if total @ total > 0 else 1.0


def measure(days: int, factors: list[int], grid: str, threads: int, workdir: Path,
            phases: tuple[str, ...] = PHASES, warmup: bool = True) -> dict:
    """Every phase at every period length; the ratios and fits of the goals."""
    rows = []
    if warmup:  # the smallest length once, unrecorded: the first processes pay for cold caches and .pyc files
        for phase in phases:
            child(phase, config_data(workdir / "warmup", grid, days * min(factors), threads), threads)
    for f in factors:
        root = workdir / f"x{f}"
        data = config_data(root, grid, days * f, threads)
        for phase in phases:
            r = child(phase, data, threads)
            rows.append({"factor": f, "days": days * f, **r})
            print(f"  {f}× ({days * f} d) {phase:8s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mib']:7.1f} MiB",
                  file=sys.stderr, flush=True)
    summary = {}
    for phase in phases:
        mine = [r for r in rows if r["phase"] == phase]
        rss = {r["factor"]: r["peak_rss_mib"] for r in mine}
        x = [r["days"] for r in mine]
        summary[phase] = {"rss_ratio": rss[max(factors)] / rss[min(factors)],
                          "time_r2": r_squared(x, [r["seconds"] for r in mine]),
                          "cpu_r2": r_squared(x, [r["cpu_seconds"] for r in mine])}
    return {"grid": grid, "base_days": days, "factors": factors, "threads": threads, "rows": rows,
            "summary": summary, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                          f"Python {platform.python_version()}"}


def print_table(result: dict) -> None:
    """The figures per phase and period length, then the goals."""
    print(f"scale bench: {result['grid']}, base {result['base_days']} days, {result['threads']} threads; "
          f"{result['machine']}")
    print(f"{'phase':9s} {'factor':>6s} {'train days':>10s} {'seconds':>9s} {'CPU s':>8s} {'peak RSS MiB':>13s}")
    for r in result["rows"]:
        print(f"{r['phase']:9s} {r['factor']:>5d}× {r['days']:>10d} {r['seconds']:>9.2f} {r['cpu_seconds']:>8.2f} "
              f"{r['peak_rss_mib']:>13.1f}")
    for phase, s in result["summary"].items():
        ok_rss = "ok" if s["rss_ratio"] <= RSS_GOAL else "MISSED"
        line = f"{phase:9s} peak RSS {max(result['factors'])}×/1× = {s['rss_ratio']:.3f} (goal ≤ {RSS_GOAL}: {ok_rss})"
        if phase in ("ingest", "stats"):
            ok_r2 = "ok" if s["time_r2"] >= R2_GOAL else "MISSED"
            line += (f"; time vs period R² = {s['time_r2']:.4f} (goal ≥ {R2_GOAL}: {ok_r2}), "
                     f"CPU time R² = {s['cpu_r2']:.4f}")
        print(line)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run every phase at every period length, print the table (and JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--days", type=int, default=8, help="training days of the 1× period")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--grid", default="1.5deg")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="phases to run, in order (each needs the ones before it)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the unrecorded run of the 1× length")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--child", nargs=2, metavar=("PHASE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(run_phase(args.child[0], json.loads(args.child[1]))))
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result = measure(args.days, args.factors, args.grid, args.threads, Path(tmp), tuple(args.phases),
                         not args.no_warmup)
    print_table(result)
    if args.json:
        print("JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
