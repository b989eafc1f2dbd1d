"""GPU performance at ERA5 scale: our SFNO (default and ``reference`` preset) vs torch-harmonics' example SFNO.

Issue 10's table, in one process on one CUDA device: for each model, the real-valued parameter count
(a complex weight counts twice), a forward pass in bf16 autocast, a 28-step (7-day) autoregressive
rollout in bf16 under ``no_grad``, a training step (forward, MSE, backward, Adam) in fp32 and in bf16
autocast with its peak memory, and our models again under ``torch.compile`` (the rollout with
``mode="reduce-overhead"``, i.e. CUDA graphs on a GPU). Each model is built, measured and freed in
turn, so a peak is that model's alone (weights, gradients, Adam state and activations); every time is
the median of ``--repeats`` calls after ``--warmup``, synchronised with the device. Ratios are ours /
the reference.

Default setting (issue 10): 0.25° (721×1440), 73 channels in and out, width 256, 8 blocks, latent grid
3× coarser, batch 1. A quick run: ``--grid 1.5deg --width 64 --depth 4 --channels 3``.

It needs a CUDA device and refuses to run without one (exit status 2) before building anything;
``--device cpu --allow-cpu`` exists only so the tests can run this code at a tiny size.
It imports only torch, torch_harmonics, numpy, pydantic and this project's ``core``/``models``
(no prefect, no xarray), so it runs on a GPU machine with only those wheels (docs/benchmarks.md).

Usage: python benches/gpu.py [--grid 0.25deg|NLATxNLON] [--channels 73] [--width 256] [--depth 8]
       [--scale-factor 3] [--batch 1] [--steps 28] [--repeats 10] [--warmup 3]
       [--compile all|default|preset|none] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
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
from core.grid import PRESETS as GRIDS
from models.sfno import SFNO
from models.sfno_reference import real_parameter_count, reference_sfno

MODELS = ("ours (default)", "ours (reference preset)", "torch-harmonics reference")
NO_CUDA = ("benches/gpu.py measures GPU performance and needs a CUDA device, but torch.cuda.is_available() is False "
           "here (torch {version}, CUDA build {cuda}). Run it on a GPU machine (see docs/benchmarks.md); "
           "--device cpu --allow-cpu exists only for the tests.")


def grid_shape(text: str) -> tuple[int, int]:
    """``(nlat, nlon)`` of a grid preset name (``0.25deg``) or an explicit ``NLATxNLON``."""
    if text in GRIDS:
        return GRIDS[text]
    try:
        nlat, nlon = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"grid {text!r} is neither a preset ({', '.join(GRIDS)}) nor NLATxNLON") from None
    return nlat, nlon


def refusal(device: str, allow_cpu: bool) -> str | None:
    """Why the bench must not run on ``device`` (no CUDA, or the CPU without the test switch), or None."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return NO_CUDA.format(version=torch.__version__, cuda=torch.version.cuda)
        if not torch.cuda.is_bf16_supported():
            return f"{torch.cuda.get_device_name(device)} has no bf16 support; this bench measures bf16"
        return None
    if device == "cpu" and allow_cpu:
        return None
    return f"--device {device} is not a CUDA device; only the tests run this bench on the CPU (--allow-cpu)"


def describe_machine(device: torch.device) -> str:
    """One line naming the device, torch, CUDA and torch-harmonics versions."""
    import torch_harmonics

    versions = f"torch {torch.__version__}, torch-harmonics {torch_harmonics.__version__}, Python {platform.python_version()}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}"
                f"{props.minor}), CUDA {torch.version.cuda}, {versions}")
    return f"CPU {platform.machine()} (test mode, not a GPU figure), {versions}"


def build(name: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """One of :data:`MODELS` at the bench's size, on ``device``."""
    nlat, nlon = grid_shape(args.grid)
    c, sizes = args.channels, {"embed_dim": args.width, "num_layers": args.depth, "scale_factor": args.scale_factor}
    torch.manual_seed(0)
    if name == MODELS[0]:
        model = SFNO(c, c, nlat, nlon, **sizes)
    elif name == MODELS[1]:
        model = SFNO(c, c, nlat, nlon, **sizes, **preset_options("reference"))
    else:
        model = reference_sfno(c, c, nlat, nlon, args.width, args.depth, scale_factor=args.scale_factor)
    return model.to(device)


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup``, waiting for the device each time."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def forward_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A bf16-autocast, no-grad forward pass of ``model`` on ``x``."""
    def run() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            return model(x)
    return run


def rollout_fn(model: torch.nn.Module, x: torch.Tensor, steps: int, graphs: bool = False) -> Callable[[], torch.Tensor]:
    """A ``steps``-step autoregressive bf16 rollout from ``x`` under no_grad (``graphs``: a CUDA-graph-compiled model)."""
    def run() -> torch.Tensor:
        state = x
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
            for _ in range(steps):
                if graphs:
                    # Each replay reuses the graph's output memory: mark the step and keep a copy of the state.
                    torch.compiler.cudagraph_mark_step_begin()
                    state = model(state).clone()
                else:
                    state = model(state)
        return state
    return run


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool,
                  params: torch.nn.Module | None = None) -> Callable[[], None]:
    """One training step (forward, MSE, backward, Adam) of ``model``; ``params``: the module owning the weights."""
    opt = torch.optim.Adam((params or model).parameters(), lr=1e-5)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(x)
        opt.zero_grad(set_to_none=True)
        (pred.float() - y).square().mean().backward()
        opt.step()
    return step


def peak_gib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak device memory (GiB) allocated while running ``fn`` once (None on the CPU, which has no such counter)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**30


def attempt(out: dict[str, Any], keys: tuple[str, ...], fn: Callable[[], Any]) -> None:
    """Store ``fn()`` under ``keys`` (one value or a tuple); on failure store None and the error under ``errors``.

    One figure failing (out of memory, or the reference's bf16 path on a CPU, where its transforms
    stay under autocast) must not lose the rest of a long run's table.
    """
    try:
        values = fn()
        out.update(zip(keys, values if len(keys) > 1 else (values,), strict=True))
    except Exception as exc:
        out.update(dict.fromkeys(keys))
        out.setdefault("errors", {})[", ".join(keys)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_model(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The eager figures of one model: parameters, forward, rollout, train steps and their peaks."""
    nlat, nlon = grid_shape(args.grid)
    x = torch.randn(args.batch, args.channels, nlat, nlon, device=device)
    y = torch.randn_like(x)
    timing = {"device": device, "repeats": args.repeats, "warmup": args.warmup}
    out: dict[str, Any] = {"params": real_parameter_count(model)}
    attempt(out, ("forward_bf16_s",), lambda: median_time(forward_fn(model, x), **timing))
    attempt(out, ("rollout_bf16_s",),
            lambda: median_time(rollout_fn(model, x, args.steps), device, max(1, args.repeats // 3), 1))
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        step = train_step_fn(model, x, y, bf16)
        attempt(out, (f"train_{precision}_s", f"train_{precision}_peak_gib"),
                lambda step=step: (median_time(step, **timing), peak_gib(step, device)))
    return out


def measure_compiled(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The same figures for ``model`` under ``torch.compile``; a failure is reported, not raised."""
    nlat, nlon = grid_shape(args.grid)
    x = torch.randn(args.batch, args.channels, nlat, nlon, device=device)
    y = torch.randn_like(x)
    timing = {"device": device, "repeats": args.repeats, "warmup": args.warmup}
    out: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        compiled = torch.compile(model, backend=args.compile_backend)
        out["forward_bf16_s"] = median_time(forward_fn(compiled, x), **timing)
        step = train_step_fn(compiled, x, y, True, params=model)
        out["train_bf16_s"] = median_time(step, **timing)
        out["train_bf16_peak_gib"] = peak_gib(step, device)
        graphs = device.type == "cuda" and args.compile_backend == "inductor"
        torch.compiler.reset()  # or the no-grad bf16 graph compiled above would be reused without CUDA graphs
        looped = torch.compile(model, backend=args.compile_backend, mode="reduce-overhead" if graphs else None)
        out["rollout_bf16_s"] = median_time(rollout_fn(looped, x, args.steps, graphs), device,
                                            max(1, args.repeats // 3), 2)
        out["compile_note"] = f"compiled and measured in {time.perf_counter() - t:.0f} s"
    except Exception as exc:  # inductor fails in many ways (no compiler, codegen …): report it, keep the table
        out["compile_note"] = f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every model in turn (built, measured, freed) and return the figures by model."""
    device = torch.device(args.device)
    results: dict[str, Any] = {"machine": describe_machine(device), "setting": setting(args), "models": {}}
    compile_for = {"all": MODELS[:2], "default": MODELS[:1], "preset": MODELS[1:2], "none": ()}[args.compile]
    for name in MODELS:
        model = build(name, args, device)
        results["models"][name] = measure_model(model, args, device)
        if name in compile_for:
            results["models"][f"{name}, compiled"] = measure_compiled(model, args, device)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def setting(args: argparse.Namespace) -> str:
    """The measured setting in words."""
    nlat, nlon = grid_shape(args.grid)
    return (f"{nlat}x{nlon}, {args.channels} channels in/out, width {args.width}, {args.depth} blocks, "
            f"scale factor {args.scale_factor}, batch {args.batch}, rollout {args.steps} steps")


ROWS = [("params", "parameters (real)", lambda v: f"{v / 1e6:.1f} M" if v >= 1e5 else f"{v:,}"),
        ("forward_bf16_s", "forward, bf16", lambda v: f"{v * 1e3:.1f} ms"),
        ("rollout_bf16_s", "rollout, bf16", lambda v: f"{v:.3f} s"),
        ("train_fp32_s", "train step, fp32", lambda v: f"{v:.3f} s"),
        ("train_bf16_s", "train step, bf16", lambda v: f"{v:.3f} s"),
        ("train_fp32_peak_gib", "train peak, fp32", lambda v: f"{v:.2f} GiB"),
        ("train_bf16_peak_gib", "train peak, bf16", lambda v: f"{v:.2f} GiB")]


def table(results: dict[str, Any]) -> str:
    """The figures as a Markdown table: one column per model, ratios to the reference's eager figure."""
    ref = results["models"][MODELS[2]]
    names = list(results["models"])
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label, fmt in ROWS:
        cells = []
        for name in names:
            v = results["models"][name].get(key)
            ratio = f" ({v / ref[key]:.2f}×)" if v is not None and ref.get(key) and name != MODELS[2] else ""
            cells.append("—" if v is None else fmt(v) + ratio)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = [f"{n}: {m['compile_note']}" for n, m in results["models"].items() if "compile_note" in m]
    notes += [f"{n}: {k} failed: {e}" for n, m in results["models"].items() for k, e in m.get("errors", {}).items()]
    return "\n".join(lines + [""] + notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (defaults: issue 10's 0.25° setting)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="0.25deg", help="grid preset or NLATxNLON")
    p.add_argument("--channels", type=int, default=73)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--scale-factor", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=28, help="rollout steps (28 = 7 days of 6 h)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", choices=("all", "default", "preset", "none"), default="all",
                   help="which of our models to measure again under torch.compile")
    p.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: "eager"
    p.add_argument("--device", default="cuda")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # the tests' switch
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Refuse without a CUDA device; otherwise measure and print the table (and JSON if asked)."""
    args = parse_args(argv)
    why = refusal(args.device, args.allow_cpu)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    grid_shape(args.grid)  # a bad grid fails here, before any model is built
    results = run(args)
    print(f"machine: {results['machine']}\nsetting: {results['setting']}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({**results, "models": results["models"]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
