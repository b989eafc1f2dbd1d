"""Forecast cycle: wall time per phase, rollout overhead and memory, and the bytes of the daily ERA5T re-check.

1. **Whole cycle** on the demo's planet (5.625°, 33×64, the default model width, trained a few hundred steps;
   the store and checkpoint are built once under ``--root`` and reused). One cycle is what the scheduled
   deployments run, through Prefect (a temporary local server): ``wait_task`` (the initial conditions are
   already complete, so this is the check itself), ``forecast_task`` (its phases load, rollout, write, render,
   publish come from the ``timings`` of its line in ``<forecasts>/cycles.jsonl``; "lock" runs from the task call to
   the lock's ``acquired`` time in that line (task start, Prefect concurrency slot, flock); "other" is the rest of
   the task: sweep, retention, journal, task finish), then ``verify_forecasts`` scoring the run on every lead (the
   truth exists). A first cycle warms up (Prefect server start, climatology build, imports); the second is timed.
2. **Rollout overhead**: the forecast's 40-step rollout (``models.forecast.forecast_states``: 40 steps plus lead 0,
   each state copied to host memory and checked finite) vs 40 plain forward passes of the same model on the same
   input, at 1.5° (121×240) with the default model width, untrained (the cost does not depend on the weights).
   Goal ≤ 1.05×. Then the peak RSS of a fresh process streaming a 40-step forecast to Zarr, NetCDF and GRIB2
   (``stream_forecast``) vs one streaming a 1-step forecast. Goal ≤ 1.10.
3. **Daily re-check bytes**: ``benches/recheck.py --json`` in a subprocess (CDS look-alike on 127.0.0.1).

Usage: python benches/forecast.py [--json out.json] [--root spherecast-out/bench-forecast] [--train-steps 300]
       [--grid 1.5deg] [--repeats 7] [--threads N] [--skip-cycle] [--skip-recheck]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, benches/ comes first on sys.path and "ingest" would name benches/ingest.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import xarray as xr  # noqa: E402

from core.config import config_from_dict  # noqa: E402
from core.fields import to_channels  # noqa: E402
from core.grid import get_grid  # noqa: E402
from core.testing import analysis_dataset  # noqa: E402
from models.checkpoint import build_meta  # noqa: E402
from models.forecast import forecast_states, initial_stack, stream_forecast  # noqa: E402
from models.normalization import Normalized  # noqa: E402
from models.sfno import SFNO  # noqa: E402

STEPS = 40
STEP_HOURS = 6
GOAL_SPEED = 1.05
GOAL_MEMORY = 1.10
PHASES = ("wait", "lock", "load", "rollout", "write", "render", "publish", "other", "score")


# ---------------------------------------------------------------- rollout overhead and memory (1.5°)

def untrained(grid: str, root: Path) -> tuple[Normalized, dict, xr.Dataset]:
    """The default-width SFNO on ``grid`` (untrained) with contract metadata, and a 2-time analysis."""
    g = get_grid(grid)
    config = config_from_dict({"paths": {"root": str(root)}, "grid": {"preset": grid}})
    channels = config.task.channels()
    analysis = analysis_dataset(grid, periods=2)
    stack = to_channels(analysis, channels)
    mean = stack.mean(("time", "latitude", "longitude")).values
    std = stack.std(("time", "latitude", "longitude")).values + 1.0
    # Small tendencies keep the untrained model finite for 40 steps; the cost is the same as a trained one's.
    stats = xr.Dataset({"mean": ("channel", mean), "std": ("channel", std), "diff_std": ("channel", 0.01 * std)},
                       coords={"channel": channels}, attrs={"period_start": "2000-01-01", "period_end": "2000-01-01"})
    torch.manual_seed(0)
    core = SFNO(len(channels), len(channels), g.nlat, g.nlon, **config.model.model_dump())
    model = Normalized(core, mean, std, 0.01 * std)
    meta = build_meta(config, stats, g, core.arch, model.state_dict(), 0, "bench")
    return model.eval(), meta, analysis


def rollout_vs_forward(grid: str, repeats: int) -> dict:
    """Seconds of the 40-step forecast rollout and of 40 forward passes on one input (medians, interleaved)."""
    with tempfile.TemporaryDirectory(prefix="bench-forecast-") as tmp:
        model, meta, analysis = untrained(grid, Path(tmp))
    init = analysis["time"].values[-1]
    x0 = torch.from_numpy(initial_stack(analysis, list(meta["channels"]), init, 1, STEP_HOURS))[None]

    def rollout() -> None:
        for _ in forecast_states(model, meta, analysis, init, STEPS * STEP_HOURS):
            pass

    @torch.no_grad()
    def forward() -> None:
        for _ in range(STEPS):
            model(x0)

    rollout(), forward()  # warm-up: SHT plans, allocator
    times: dict[str, list[float]] = {"rollout": [], "forward": []}
    for _ in range(repeats):
        for name, fn in (("rollout", rollout), ("forward", forward)):
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    # The fastest of the repeats is the cost; slower ones measure whoever else shares the cores.
    r, f = min(times["rollout"]), min(times["forward"])
    median = statistics.median(times["rollout"]) / statistics.median(times["forward"])
    arch = {k: meta["model"].get(k) for k in ("embed_dim", "num_layers", "scale_factor")}
    return {"grid": grid, "shape": [analysis.sizes["latitude"], analysis.sizes["longitude"]],
            "channels": len(meta["channels"]), "model": arch, "steps": STEPS, "repeats": repeats,
            "rollout_s": round(r, 3), "forward_s": round(f, 3), "ratio": round(r / f, 4),
            "ratio_of_medians": round(median, 4), "goal": GOAL_SPEED, "met": r / f <= GOAL_SPEED,
            "all_s": {k: [round(v, 3) for v in vs] for k, vs in times.items()}}


def child_memory(steps: int, grid: str, threads: int) -> None:
    """In a fresh process: stream a ``steps``-step forecast to disk and print this process's peak RSS as JSON."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-forecast-mem-") as tmp:
        model, meta, analysis = untrained(grid, Path(tmp))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        began = time.perf_counter()
        stream_forecast(model, meta, analysis, analysis["time"].values[-1], steps * STEP_HOURS, Path(tmp) / "run")
        seconds = time.perf_counter() - began
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"steps": steps, "peak_rss_mib": round(peak, 1), "before_rss_mib": round(before, 1),
                      "seconds": round(seconds, 1)}))


def memory(grid: str, threads: int) -> dict:
    """Peak RSS of a fresh process streaming 1 step vs one streaming 40 steps (Zarr, NetCDF, GRIB2)."""
    out = {}
    for steps in (1, STEPS):
        cmd = [sys.executable, __file__, "--child-memory", str(steps), "--grid", grid, "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        if done.returncode:
            raise RuntimeError(f"memory child ({steps} steps) failed:\n{done.stderr[-3000:]}")
        out[steps] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = out[STEPS]["peak_rss_mib"] / out[1]["peak_rss_mib"]
    # Above the peak the process had reached before the forecast (imports, model, analysis): what the forecast adds.
    added = {k: round(v["peak_rss_mib"] - v["before_rss_mib"], 1) for k, v in out.items()}
    return {"grid": grid, "one_step": out[1], "forty_steps": out[STEPS], "ratio": round(ratio, 4),
            "added_mib": {"one_step": added[1], "forty_steps": added[STEPS]}, "goal": GOAL_MEMORY,
            "met": ratio <= GOAL_MEMORY}


# ---------------------------------------------------------------- the whole cycle (5.625°, the demo planet)

def cycle_config(root: Path, train_steps: int) -> Path:
    """The bench's config file: the demo's grid and model, a 46-day planet, a short training run."""
    doc = {"paths": {"root": str(root)},
           "ingest": {"start": "2000-01-01T00", "end": "2000-02-15T18"},
           "train": {"train_start": "2000-01-01", "train_end": "2000-01-31T18", "val_start": "2000-02-01",
                     "val_end": "2000-02-05T18", "max_steps": train_steps, "budget_minutes": 10, "device": "cpu",
                     "nproc_per_node": 1, "tensorboard": False},
           "forecast": {"source": "analysis", "lead_hours": 120, "wait_minutes": 0}}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "bench.yaml"
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return path


def build(path: Path) -> dict:
    """The planet's store and stats, and a trained checkpoint (each reused when already there)."""
    from core.config import load_config
    from ingest.build import ingest
    from models.train import train

    config = load_config(path, env={})
    out = {}
    began = time.perf_counter()
    ingest(config, progress=False)  # idempotent: a complete store is only checked
    out["ingest_s"] = round(time.perf_counter() - began, 1)
    checkpoint = config.paths.runs / config.train.run_name / "checkpoint.pt"
    began = time.perf_counter()
    if not checkpoint.is_file():
        train(config)
    out["train_s"] = round(time.perf_counter() - began, 1)
    out["checkpoint"] = str(checkpoint)
    return out


def run_cycle(path: Path, init_time: str) -> dict:
    """One cycle through Prefect, as the deployments run it: wait, forecast (force), verify; seconds per step."""
    from prefect import flow

    from core.config import load_config
    from pipelines.tasks import forecast_task, wait_task
    from pipelines.verify import verify_forecasts

    @flow(name="bench_forecast_cycle")
    def cycle(config_path: str, init: str) -> dict:
        overrides = {"forecast": {"init_time": init}}
        config = load_config(config_path, overrides=overrides)
        began = time.perf_counter()
        choice, why = wait_task(config)
        if choice is None:
            raise ValueError(f"the bench's cycle was skipped: {why}")
        wait = time.perf_counter() - began
        began, called = time.perf_counter(), time.time()
        result = forecast_task(config, choice, True)
        forecast = time.perf_counter() - began
        began = time.perf_counter()
        verified = verify_forecasts(config_path, overrides)
        score = time.perf_counter() - began
        return {"wait": wait, "forecast": forecast, "called": called, "score": score, "run": result["run"],
                "scored": verified["scored"]}

    return cycle(str(path), init_time)


def forecast_cycle(root: Path, train_steps: int) -> dict:
    """Build (or reuse) the inputs, run a warm-up cycle and a timed one; phases from the journal."""
    import shutil

    from core.config import load_config
    from pipelines.cli import prefect_environment
    from pipelines.cycles import read_journal

    path = cycle_config(root, train_steps)
    config = load_config(path, env={})
    for leftover in (config.paths.forecasts, config.paths.verification):  # a clean cycle each time
        shutil.rmtree(leftover, ignore_errors=True)
    built = build(path)
    prefect_environment()
    began = time.perf_counter()
    warm = run_cycle(path, "2000-02-08T00")
    warm_s = time.perf_counter() - began
    warm_phases = next(e for e in reversed(read_journal(config.paths.forecasts)) if e.get("run") == warm["run"])
    timed = run_cycle(path, "2000-02-08T06")
    entry = [e for e in read_journal(config.paths.forecasts) if e.get("run") == timed["run"]][-1]
    phases = entry.get("timings")
    if not phases:
        raise RuntimeError("the journal line has no 'timings': pipelines/tasks.py does not record them")
    out = {"wait": timed["wait"], **{k: phases.get(k, 0.0) for k in ("load", "rollout", "write", "render", "publish")}}
    # From the task call until the journal says the cycle lock was held: task start, Prefect slot, flock.
    out["lock"] = entry["acquired"] - timed["called"]
    out["other"] = timed["forecast"] - out["lock"] - sum(phases.get(k, 0.0) for k in ("load", "rollout", "write",
                                                                                       "render", "publish"))
    out["score"] = timed["score"]
    g = config.grid.grid()
    return {"grid": g.name, "shape": [g.nlat, g.nlon], "lead_hours": config.forecast.lead_hours,
            "model": {"embed_dim": config.model.embed_dim, "num_layers": config.model.num_layers},
            "train_steps": train_steps, "formats": list(config.forecast.formats), "dpi": config.render.dpi,
            "run": timed["run"], "scored_runs": timed["scored"], "build": built, "warm_up_cycle_s": round(warm_s, 1),
            "warm_up_phases_s": {**{k: round(v, 3) for k, v in (warm_phases.get("timings") or {}).items()},
                                 "wait": round(warm["wait"], 3), "score": round(warm["score"], 3)},
            "phases_s": {k: round(v, 3) for k, v in out.items()}, "total_s": round(sum(out.values()), 3)}


# ---------------------------------------------------------------- the daily re-check

def recheck_bytes() -> dict:
    """The figures of ``benches/recheck.py`` (its defaults), run in a subprocess as its own command."""
    cmd = [sys.executable, str(REPO / "benches" / "recheck.py"), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode:
        raise RuntimeError(f"benches/recheck.py failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])


# ---------------------------------------------------------------- report

def machine() -> str:
    """One line describing this machine."""
    import psutil

    return (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def report(out: dict) -> None:
    """Print the table."""
    print(f"machine: {out['machine']}")
    c = out.get("cycle")
    if c:
        print(f"\nwhole cycle: {c['grid']} {c['shape'][0]}x{c['shape'][1]}, {c['lead_hours']} h, width "
              f"{c['model']['embed_dim']} x {c['model']['num_layers']} blocks, trained {c['train_steps']} steps, "
              f"{'+'.join(c['formats'])}, maps at {c['dpi']} dpi (warm-up cycle {c['warm_up_cycle_s']} s)")
        print(f"  {'phase':8s} {'seconds':>8s} {'share':>6s}")
        for k in PHASES:
            v = c["phases_s"][k]
            print(f"  {k:8s} {v:8.2f} {100 * v / c['total_s']:5.1f}%")
        print(f"  {'total':8s} {c['total_s']:8.2f}")
    r = out["rollout"]
    print(f"\nrollout vs forward passes: {r['grid']} {r['shape'][0]}x{r['shape'][1]}, {r['channels']} channels, "
          f"model {r['model']}, {r['steps']} steps (fastest of {r['repeats']}, interleaved)")
    print(f"  forecast rollout {r['rollout_s']:.3f} s, {r['steps']} forward passes {r['forward_s']:.3f} s, "
          f"ratio {r['ratio']:.3f} (goal ≤ {r['goal']}: {'met' if r['met'] else 'NOT met'}; "
          f"ratio of medians {r['ratio_of_medians']:.3f})")
    m = out["memory"]
    print(f"  peak RSS streaming to Zarr+NetCDF+GRIB2: 1 step {m['one_step']['peak_rss_mib']:.0f} MiB, "
          f"{STEPS} steps {m['forty_steps']['peak_rss_mib']:.0f} MiB, ratio {m['ratio']:.3f} "
          f"(goal ≤ {m['goal']}: {'met' if m['met'] else 'NOT met'}); above the process's peak before the forecast: "
          f"+{m['added_mib']['one_step']:.0f} MiB vs +{m['added_mib']['forty_steps']:.0f} MiB")
    rc = out.get("recheck")
    if rc:
        d, st = rc["daily_bytes"], rc["store"]
        print(f"\ndaily ERA5T re-check (benches/recheck.py defaults: {st['days']} days in slabs of {st['slab_size']}, "
              f"{st['preliminary_times']} preliminary times, recheck_days {st['recheck_days']}):")
        print(f"  {'':8s} {'requests':>8s} {'fields':>7s} {'bytes':>11s}")
        for name in ("before", "after", "probe", "new_day"):
            x = rc[name]
            print(f"  {name:8s} {x['requests']:8d} {x['fields']:7d} {x['bytes']:11,d}")
        print(f"  per daily run (new day + re-check): before {d['before']:,}, after {d['after']:,}, "
              f"probe {d['probe']:,} bytes; re-check bytes before/after {rc['ratio_bytes']}x, "
              f"before/probe {rc['ratio_bytes_probe']}x")


def main() -> int:
    """Run the parts asked for, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    ap.add_argument("--root", type=Path, default=REPO / "spherecast-out" / "bench-forecast",
                    help="where the cycle's store, checkpoint and runs are built (reused across runs)")
    ap.add_argument("--train-steps", type=int, default=300, help="training steps of the cycle's checkpoint")
    ap.add_argument("--grid", default="1.5deg", help="grid of the rollout and memory measurements")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats of the rollout comparison")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-cycle", action="store_true", help="skip the whole-cycle measurement")
    ap.add_argument("--skip-recheck", action="store_true", help="skip the re-check bytes")
    ap.add_argument("--child-memory", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_memory is not None:
        child_memory(args.child_memory, args.grid, args.threads)
        return 0
    torch.set_num_threads(args.threads)
    out: dict = {"machine": machine()}
    began = time.perf_counter()
    out["rollout"] = rollout_vs_forward(args.grid, args.repeats)
    out["memory"] = memory(args.grid, args.threads)
    if not args.skip_cycle:
        out["cycle"] = forecast_cycle(args.root.resolve(), args.train_steps)
    if not args.skip_recheck:
        out["recheck"] = recheck_bytes()
    out["bench_seconds"] = round(time.perf_counter() - began, 1)
    report(out)
    print(f"\n(bench took {out['bench_seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
