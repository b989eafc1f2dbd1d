"""What each architecture option beyond the reference costs: parameters and CPU time, vs the ``reference`` preset.

Every variant is the ``reference`` preset (torch-harmonics' example SFNO, see
``models/sfno_reference.py``) with one option of ours switched on, plus our default (every option at
its default) and torch-harmonics' own example as the reference. For each it prints

- the real-valued parameter count at the bench's size (a built model) and at the 0.25° setting of
  issue 10 (721×1440, 73 channels, width 256, 8 blocks; built on the meta device, nothing allocated);
- the median CPU time of this process (``time.process_time``: what other processes on a shared machine
  disturb least) for a forward pass (no grad) and a training step (forward, area-weighted MSE,
  backward), every variant timed round-robin in this process so machine load hits them alike;
- both as ratios to the preset.

Usage: python benches/arch_cost.py [--grid 1.5deg] [--width 32] [--depth 4] [--channels 3]
       [--scale-factor 3] [--batch 2] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, benches/ comes first on sys.path and "ingest" would name benches/ingest.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from core.config_model import preset_options
from core.grid import get_grid
from models.losses import SphereMSE
from models.sfno import SFNO
from models.sfno_reference import real_parameter_count, reference_sfno, shape_only_parameter_count

# One option of ours on top of the preset each (the preset's fixed options, one changed).
VARIANTS: dict[str, dict[str, Any]] = {
    "block activation (act before the MLP)": {"block_activation": True},
    "linear inner skip": {"skip": "linear"},
    "identity inner skip": {"skip": "identity"},
    "2-layer encoder and decoder": {"encoder_layers": 2, "decoder_layers": 2},
    "position embedding (latlon MLP)": {"pos_embed": "latlon"},
    "big skip: add (learned 1×1)": {"big_skip": "add"},
    "big skip: concat to the decoder": {"big_skip": "concat"},
    "layer norm (channels)": {"normalization": "layer"},
    "instance norm (area-weighted)": {"normalization": "instance"},
    "diagonal operator (per l, m)": {"operator_type": "diagonal"},
    "CP-factorized spectral weights, rank 0.25": {"factorization": "cp"},
    "Tucker-factorized spectral weights, rank 0.25": {"factorization": "tucker"},
}
SCALE = {"in_channels": 73, "out_channels": 73, "nlat": 721, "nlon": 1440, "embed_dim": 256, "num_layers": 8,
         "scale_factor": 3}


def variant_options(name: str) -> dict[str, Any]:
    """The SFNO keyword arguments (beyond sizes) of a named variant."""
    if name == "reference preset":
        return preset_options("reference")
    if name == "our default":
        return {}
    return {**preset_options("reference"), "preset": "none", **VARIANTS[name]}


def timed_round_robin(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median process CPU seconds per call of each function, called in turn ``repeats`` times after 2 warm-ups."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
            t = time.process_time()
            fns[name]()
            times[name].append(time.process_time() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def step_and_forward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Callable[[], None], ...]:
    """A training step (forward, loss, backward) and a no-grad forward of ``model`` on fixed data."""
    loss_fn = SphereMSE()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    return step, forward


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Parameters and times of every variant (and the torch-harmonics reference), with ratios to the preset."""
    g = get_grid(args.grid)
    sizes = {"embed_dim": args.width, "num_layers": args.depth, "scale_factor": args.scale_factor}
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, g.nlat, g.nlon)
    y = torch.randn(args.batch, args.channels, g.nlat, g.nlon)
    names = ["reference preset", "our default", *VARIANTS]
    models: dict[str, torch.nn.Module] = {
        name: SFNO(args.channels, args.channels, g.nlat, g.nlon, **sizes, **variant_options(name)) for name in names}
    models["torch-harmonics example"] = reference_sfno(args.channels, args.channels, g.nlat, g.nlon, args.width,
                                                        args.depth, scale_factor=args.scale_factor)
    fns = {name: step_and_forward(m, x, y) for name, m in models.items()}
    steps = timed_round_robin({n: f[0] for n, f in fns.items()}, args.repeats)
    forwards = timed_round_robin({n: f[1] for n, f in fns.items()}, args.repeats)
    rows = []
    for name, model in models.items():
        if name == "torch-harmonics example":
            at_scale = None
        else:
            scale = {**SCALE, **variant_options(name)}
            at_scale = shape_only_parameter_count(scale.pop("in_channels"), scale.pop("out_channels"),
                                                  scale.pop("nlat"), scale.pop("nlon"), **scale)
        rows.append({"variant": name, "params": real_parameter_count(model), "params_0p25": at_scale,
                     "step_s": steps[name], "forward_s": forwards[name]})
    base = rows[0]
    for row in rows:
        row["params_ratio"] = row["params"] / base["params"]
        row["step_ratio"] = row["step_s"] / base["step_s"]
        row["forward_ratio"] = row["forward_s"] / base["forward_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="1.5deg")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--scale-factor", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"size: {args.grid}, {args.channels} channels, width {args.width}, {args.depth} blocks, scale factor "
          f"{args.scale_factor}, batch {args.batch}; params at 0.25° = 721×1440, 73 ch, width 256, 8 blocks, sf 3")
    rows = measure(args)
    print("CPU ms = median process CPU time per call (1 thread: the time on a core)")
    print(f"{'variant':47s} {'params':>9s} {'×':>6s} {'params 0.25°':>13s} {'step ms':>8s} {'×':>6s} "
          f"{'fwd ms':>8s} {'×':>6s}")
    for r in rows:
        scale = f"{r['params_0p25'] / 1e6:10.2f} M" if r["params_0p25"] is not None else f"{'—':>12s}"
        print(f"{r['variant']:47s} {r['params']:9d} {r['params_ratio']:6.2f} {scale:>13s} {r['step_s'] * 1e3:8.1f} "
              f"{r['step_ratio']:6.2f} {r['forward_s'] * 1e3:8.1f} {r['forward_ratio']:6.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
