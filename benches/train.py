"""Training step time: our SFNO vs torch-harmonics' example SFNO, and the loader vs in-memory tensors.

Part 1 (goal ≤ 0.8×): one optimizer step (forward, area-weighted MSE, backward, Adam) of
``models.sfno.SFNO`` and of ``torch_harmonics.examples.models.sfno.SphericalFourierNeuralOperator``
at the same grid, width, depth, MLP ratio and batch, interleaved in this process; median of
``--steps`` steps after warm-up. Part 2 (goal ≥ 0.95×): the same training step fed by
``DataLoader(WindowDataset)`` (the trainer's loader) vs by batches already in memory.

Usage: python benches/train.py [--grid 5.625deg] [--width 16] [--depth 4] [--batch 8] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch.utils.data import DataLoader

from core.grid import get_grid
from core.testing import analysis_dataset
from models.data import WindowDataset
from models.losses import SphereMSE
from models.sfno import SFNO

CHANNELS = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]


def step_fn(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One training step of ``model`` on ``(x, y)``."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = SphereMSE()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def median_time(fn: Callable[[], None], n: int) -> float:
    """Median wall time of ``n`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def epoch_time(step: Callable[[torch.Tensor, torch.Tensor], None], batches: Iterable) -> float:
    """Wall time of one pass over ``batches`` (one-step targets)."""
    t = time.perf_counter()
    for x, y in batches:
        step(x, y[:, 0])
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="5.625deg")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    from torch_harmonics.examples.models.sfno import SphericalFourierNeuralOperator

    g = get_grid(args.grid)
    torch.manual_seed(0)
    ours = SFNO(3, 3, g.nlat, g.nlon, embed_dim=args.width, num_layers=args.depth, mlp_ratio=2.0)
    theirs = SphericalFourierNeuralOperator(
        img_size=(g.nlat, g.nlon), grid="equiangular", grid_internal="legendre-gauss", scale_factor=1,
        in_chans=3, out_chans=3, embed_dim=args.width, num_layers=args.depth, mlp_ratio=2.0, pos_embed="none")
    x = torch.randn(args.batch, 3, g.nlat, g.nlon)
    y = torch.randn(args.batch, 3, g.nlat, g.nlon)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"grid {g.nlat}x{g.nlon}, width {args.width}, depth {args.depth}, batch {args.batch}; "
          f"parameters ours {sum(p.numel() for p in ours.parameters()):,}, "
          f"torch-harmonics {sum(p.numel() for p in theirs.parameters()):,}")
    a, b = step_fn(ours), step_fn(theirs)
    rounds = [(median_time(lambda: a(x, y), args.steps), median_time(lambda: b(x, y), args.steps)) for _ in range(3)]
    t_ours = statistics.median(r[0] for r in rounds)
    t_theirs = statistics.median(r[1] for r in rounds)
    print(f"step time: ours {1e3 * t_ours:.1f} ms, torch-harmonics example {1e3 * t_theirs:.1f} ms, "
          f"ratio {t_ours / t_theirs:.2f}× (goal ≤ 0.8)")

    ds = analysis_dataset(grid=args.grid, periods=8 * args.batch * 4 + 1)
    windows = WindowDataset(ds, CHANNELS, ds.time.values[0], ds.time.values[-1], 1, 6)
    loader = DataLoader(windows, batch_size=args.batch, shuffle=True, drop_last=True)
    in_memory = [(torch.stack([windows[i][0] for i in idx]), torch.stack([windows[i][1] for i in idx]))
                 for idx in torch.randperm(len(windows)).split(args.batch) if len(idx) == args.batch]
    pairs = [(epoch_time(a, loader), epoch_time(a, in_memory)) for _ in range(5)]
    t_loader = statistics.median(p[0] for p in pairs)
    t_memory = statistics.median(p[1] for p in pairs)
    print(f"epoch of {len(in_memory)} steps: loader {t_loader:.3f} s, in-memory {t_memory:.3f} s, "
          f"throughput ratio {t_memory / t_loader:.2f}× (goal ≥ 0.95)")


if __name__ == "__main__":
    main()
