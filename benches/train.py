"""Training step time: our SFNO vs torch-harmonics' example SFNO, and the loader vs in-memory tensors.

Part 1 (goal ≤ 0.8×): one optimizer step (forward, area-weighted MSE, backward, Adam) of
``models.sfno.SFNO`` (default architecture) and of
``torch_harmonics.examples.models.sfno.SphericalFourierNeuralOperator`` at the same grid, width,
depth, MLP ratio and batch. Every variant has its own copy of the model and optimizer and they are
timed interleaved in this process (one step of each in turn, ``--steps`` times), so load from other
processes hits all of them alike; the figure is the median step (wall time, and this process's CPU
time, which other processes disturb much less).
Variants of ours: fp32 eager (the headline), bf16 autocast (as ``train.precision=bf16``: the
transforms stay fp32), and each of those under ``torch.compile``; the reference is the example
as published (fp32 eager). ``--profile`` adds a torch.profiler breakdown of where a step's time
goes for both models.

Part 2 (goal ≥ 0.95×): the same training step fed by the trainer's input pipeline — a Zarr store
on disk opened with ``models.data.open_analysis``, ``WindowDataset``, ``DistributedSampler`` and
``DataLoader`` as in ``models.train.fit`` — vs by the same batches already stacked in memory,
alternating one step of each so that both see the same machine load; the time spent fetching
batches from the loader is printed too.

Usage: python benches/train.py [--grid 5.625deg] [--width 16] [--depth 4] [--batch 8] [--steps 50]
       [--threads N] [--no-compile] [--profile]
On a shared machine ``--threads 1`` gives the steadiest figures: with several threads, one thread
descheduled by another process stalls every parallel op.
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from core.grid import get_grid
from core.testing import analysis_dataset
from models.data import WindowDataset, open_analysis
from models.losses import SphereMSE
from models.sfno import SFNO

CHANNELS = ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]
GOAL_STEP, GOAL_LOADER = 0.8, 0.95
Step = Callable[[torch.Tensor, torch.Tensor], None]
# torch.profiler op names → what they are, for the --profile breakdown.
CATEGORIES = {
    "GEMM (1×1 layers, DFT, Legendre, spectral weights)": {"mm", "bmm", "addmm", "addmm_", "baddbmm", "matmul",
                                                           "mkldnn_convolution", "convolution_backward"},
    "FFT": {"_fft_r2c", "_fft_c2r", "_fft_c2c"},
    "activation (GELU fwd/bwd)": {"gelu", "gelu_backward"},
    "copies, concatenation, padding": {"copy_", "cat", "clone", "constant_pad_nd", "fill_", "complex", "zero_"},
    "other elementwise and reductions": {"add", "add_", "mul", "mul_", "sum", "sub", "div", "neg", "pow", "sqrt",
                                         "addcdiv_", "addcmul_", "lerp_", "mean"},
}


def step_fn(model: torch.nn.Module, bf16: bool = False) -> Step:
    """One training step of ``model`` on ``(x, y)``, forward under bf16 autocast if asked (as the trainer)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = SphereMSE()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(x)
        opt.zero_grad(set_to_none=True)
        loss_fn(pred.float(), y).backward()
        opt.step()

    return step


def interleaved(steps: dict[str, Callable[[], None]], n: int) -> dict[str, tuple[float, float]]:
    """Median wall and process-CPU time of each function over ``n`` rounds of one call each, round-robin.

    One call per function per round (the starting function rotating) spreads bursts of load from other
    processes over all of them alike.
    """
    for fn in steps.values():
        for _ in range(3):
            fn()
    names = list(steps)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(n):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            steps[name]()
            times[name].append((time.perf_counter() - t, time.process_time() - c))
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for name, t in times.items()}


def compiled_step(model: torch.nn.Module, bf16: bool, x: torch.Tensor, y: torch.Tensor) -> tuple[Step | None, str]:
    """A step of ``torch.compile(model)`` after compiling it, or None and why it could not be compiled."""
    try:
        compiled = torch.compile(model)
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            eager = model(x).float()  # a fast step must be the same step: compare the outputs
            error = float((compiled(x).float() - eager).abs().max() / eager.abs().max())
        step = step_fn(compiled, bf16)
        step(x, y)
        return step, f"compiled in {time.perf_counter() - t:.0f} s; max |compiled − eager| / max |eager| {error:.1e}"
    except Exception as exc:  # inductor raises many kinds (missing compiler, codegen, …): report, don't crash
        return None, f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def profile_breakdown(step: Callable[[], None], n: int = 5) -> tuple[float, dict[str, float]]:
    """Self CPU time per step by op category (torch.profiler), and the total."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    totals: dict[str, float] = collections.Counter()
    for event in prof.key_averages():
        name = event.key.removeprefix("aten::")
        cat = next((c for c, ops in CATEGORIES.items() if event.key.startswith("aten::") and name in ops), "other")
        totals[cat] += event.self_cpu_time_total / n / 1e3
    return sum(totals.values()), totals


def lockstep_epoch(step: Step, loader: DataLoader, in_memory: list) -> tuple[float, float, float]:
    """One epoch fed by ``loader`` and one by ``in_memory``, step by step in alternation (same batches).

    Returns the loader-fed time (fetching included), the in-memory time, and the time spent fetching.
    Alternating single steps makes both epochs see the same load from other processes.
    """
    t_loader = t_memory = t_fetch = 0.0
    batches = iter(loader)
    for i, (xm, ym) in enumerate(in_memory):
        if i % 2:  # alternate which goes first, so neither always finds the caches warm
            t = time.perf_counter()
            step(xm, ym[:, 0])
            t_memory += time.perf_counter() - t
        t = time.perf_counter()
        x, y = next(batches)
        t_fetch += time.perf_counter() - t
        step(x, y[:, 0])
        t_loader += time.perf_counter() - t
        if not i % 2:
            t = time.perf_counter()
            step(xm, ym[:, 0])
            t_memory += time.perf_counter() - t
    return t_loader, t_memory, t_fetch


def bench_steps(args: argparse.Namespace) -> None:
    """Part 1: our step variants vs the torch-harmonics example's fp32 eager step."""
    from torch_harmonics.examples.models.sfno import SphericalFourierNeuralOperator

    g = get_grid(args.grid)
    torch.manual_seed(0)
    ours = SFNO(3, 3, g.nlat, g.nlon, embed_dim=args.width, num_layers=args.depth, mlp_ratio=2.0)
    theirs = SphericalFourierNeuralOperator(
        img_size=(g.nlat, g.nlon), grid="equiangular", grid_internal="legendre-gauss", scale_factor=1,
        in_chans=3, out_chans=3, embed_dim=args.width, num_layers=args.depth, mlp_ratio=2.0, pos_embed="none")
    x = torch.randn(args.batch, 3, g.nlat, g.nlon)
    y = torch.randn(args.batch, 3, g.nlat, g.nlon)
    print(f"grid {g.nlat}x{g.nlon}, width {args.width}, depth {args.depth}, batch {args.batch}; parameters "
          f"ours {sum(p.numel() for p in ours.parameters()):,} (spectral weights stored as real pairs), "
          f"torch-harmonics {sum(p.numel() for p in theirs.parameters()):,} (complex counted once)")
    reference = "torch-harmonics example, fp32 eager"
    variants: dict[str, Step] = {reference: step_fn(theirs), "ours, fp32 eager": step_fn(copy.deepcopy(ours)),
                                 "ours, bf16 autocast eager": step_fn(copy.deepcopy(ours), bf16=True)}
    if args.compile:
        for bf16 in (False, True):
            step, note = compiled_step(copy.deepcopy(ours), bf16, x, y)
            name = f"ours, {'bf16 autocast' if bf16 else 'fp32'} + torch.compile"
            print(f"{name}: {note}")
            if step is not None:
                variants[name] = step
    times = interleaved({k: (lambda s=s: s(x, y)) for k, s in variants.items()}, args.steps)
    # CPU time (all threads of this process) is far less sensitive than wall time to other processes on
    # the machine; both are medians over the same interleaved steps.
    print(f"step time, median of {args.steps} steps each, interleaved one step at a time (wall | process CPU):")
    ref_wall, ref_cpu = times[reference]
    met = []
    for name, (wall, cpu) in times.items():
        verdict = "reference"
        if name != reference:
            ok = wall / ref_wall <= GOAL_STEP
            met += [name] if ok else []
            verdict = f"{wall / ref_wall:.2f}x | {cpu / ref_cpu:.2f}x  {'meets' if ok else 'misses'}"
        print(f"  {name:<40s} {1e3 * wall:7.1f} ms | {1e3 * cpu:7.1f} ms   {verdict}")
    print(f"goal <= {GOAL_STEP}x of the reference's wall time met by: {', '.join(met) if met else 'none'}")
    if args.profile:
        for name, model in (("ours, fp32 eager", ours), (reference, theirs)):
            s = step_fn(model)
            total, cats = profile_breakdown(lambda s=s: s(x, y))
            print(f"profile of {name}: {total:.1f} ms self CPU per step (profiler overhead included)")
            for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
                print(f"  {cat:<52s} {ms:6.1f} ms  {100 * ms / total:4.1f} %")


def bench_loader(args: argparse.Namespace) -> None:
    """Part 2: the trainer's input pipeline from a Zarr store on disk vs the same batches in memory."""
    g = get_grid(args.grid)
    torch.manual_seed(0)
    step = step_fn(SFNO(3, 3, g.nlat, g.nlon, embed_dim=args.width, num_layers=args.depth, mlp_ratio=2.0))
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "analysis.zarr"
        analysis_dataset(grid=args.grid, periods=8 * args.batch * 4 + 1).to_zarr(store, zarr_format=3, consolidated=False)
        ds = open_analysis(store)
        windows = WindowDataset(ds, CHANNELS, ds.time.values[0], ds.time.values[-1], 1, 6)
        sampler = DistributedSampler(windows, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
        loader = DataLoader(windows, batch_size=args.batch, sampler=sampler, drop_last=True)
        in_memory = [(x.clone(), y.clone()) for x, y in loader]  # the same batches (sampler epoch 0), stacked once
        epochs = [lockstep_epoch(step, loader, in_memory) for _ in range(5)]
    t_loader, t_memory, t_fetch = (statistics.median(e[i] for e in epochs) for i in range(3))
    ratio = t_memory / t_loader
    print(f"epoch of {len(in_memory)} steps (median of 5, alternating loader and in-memory steps): loader from Zarr "
          f"{t_loader:.3f} s (of which fetching batches {1e3 * t_fetch / len(in_memory):.2f} ms/step), in-memory "
          f"{t_memory:.3f} s, throughput ratio {ratio:.2f}x ({'meets' if ratio >= GOAL_LOADER else 'misses'} "
          f"goal >= {GOAL_LOADER})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="5.625deg")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variants")
    parser.add_argument("--profile", action="store_true", help="print where a step's time goes (torch.profiler)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    bench_steps(args)
    bench_loader(args)
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes on these cores make wall times noisy)")


if __name__ == "__main__":
    main()
