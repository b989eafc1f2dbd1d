"""Surrogate speed-up: a 5-day SFNO rollout vs the shallow-water solver simulating the same 5 days.

The solver is the truth the SFNO learns (DESIGN §4), so its cost is the natural reference. Both
run in this process, on this machine, single-threaded and then with every core; the ratio is
printed with the absolute figures and the machine's description.

Usage: python benches/forecast_speed.py [--checkpoint PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Run as a script, benches/ comes first on sys.path and "ingest" would name benches/ingest.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch

from core.config import SyntheticConfig, load_config
from ingest.planet import Planet
from models.checkpoint import build_model, read_checkpoint
from models.train import build_sfno

LEAD_STEPS = 20  # 5 days of 6-hour steps


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up (SHT precomputation, allocator)
    return statistics.median(_once(fn) for _ in range(repeats))


def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=Path("spherecast-out/runs/sfno-demo/checkpoint.pt"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(env={})
    grid = cfg.grid.grid()
    if args.checkpoint.is_file():
        model = build_model(read_checkpoint(args.checkpoint)["meta"])
        source = f"checkpoint {args.checkpoint}"
    else:
        model = build_sfno(cfg, grid.nlat, grid.nlon)  # same architecture, untrained: same cost
        source = "untrained default architecture (no checkpoint found)"
    model.eval()
    syn = SyntheticConfig()
    planet = Planet(nlat=syn.solver_nlat, nlon=syn.solver_nlon, dt=syn.dt_seconds, spinup_days=0)
    state0 = planet.state_at(0)
    x0 = torch.randn(1, len(cfg.task.channels()), grid.nlat, grid.nlon)

    def sfno() -> None:
        with torch.no_grad():
            x = x0
            for _ in range(LEAD_STEPS):
                x = model(x)

    def solver() -> None:
        state = state0
        for _ in range(LEAD_STEPS):
            state = planet._advance(state)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"SFNO: {source}; grid {grid.describe()}; solver {syn.solver_nlat}x{syn.solver_nlon}, dt {syn.dt_seconds:g} s")
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        t_sfno = time_it(sfno, args.repeats)
        t_solver = time_it(solver, args.repeats)
        print(f"threads={threads}: 5-day SFNO rollout {t_sfno:.3f} s, solver {t_solver:.3f} s, "
              f"speed-up ×{t_solver / t_sfno:.1f} (solver time / SFNO time)")


if __name__ == "__main__":
    main()
