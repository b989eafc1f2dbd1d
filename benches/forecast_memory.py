"""Host memory of a streamed 10-day forecast at 0.25°: RSS at every lead, flat from lead 1 to lead 40.

Runs the forecast path the ``forecast`` task runs (``models.forecast.stream_forecast``: a pre-allocated
Zarr store, each lead written into its region as it is computed, then the NetCDF copied from the
store) with an untrained small-width SFNO on the 0.25° grid (721×1440; the model's size does not
change what the writer holds), and samples this process's resident set size (RSS) as each lead lands
in the store. Then, in the same process, the in-memory path it replaced (``rollout`` holding every
lead, then ``write_forecast``) as the reference, whose RSS grows with the lead count.

Goal (issue 10): RSS at lead 40 within 10 % of lead 1. Prints RSS per lead, the ratio, and the
in-memory path's growth for comparison.

Usage: python benches/forecast_memory.py [--grid 0.25deg] [--days 10] [--width 8] [--depth 2]
       [--scale-factor 3] [--threads 2] [--no-reference]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, benches/ comes first on sys.path and "ingest" would name benches/ingest.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import torch
import xarray as xr

from core.config import config_from_dict
from core.grid import get_grid
from core.testing import analysis_dataset
from models.checkpoint import build_meta
from models.forecast import rollout, stream_forecast, write_forecast
from models.normalization import Normalized
from models.sfno import SFNO

STEP_HOURS = 6
GOAL = 1.10


def rss_mib() -> float:
    """This process's resident set size in MiB."""
    return psutil.Process().memory_info().rss / 2**20


def forecaster(args: argparse.Namespace, root: Path) -> tuple[Normalized, dict, xr.Dataset]:
    """An untrained small SFNO with contract metadata, and a 2-time analysis on the bench's grid."""
    g = get_grid(args.grid)
    config = config_from_dict({"paths": {"root": str(root)}, "grid": {"preset": args.grid},
                               "model": {"embed_dim": args.width, "num_layers": args.depth,
                                         "scale_factor": args.scale_factor}})
    channels = config.task.channels()
    n = len(channels)
    analysis = analysis_dataset(args.grid, periods=2)
    # Stats of the same order as the fields, so the untrained model's tendencies stay finite for 40 steps.
    from core.fields import to_channels

    stack = to_channels(analysis, channels)
    mean, std = stack.mean(("time", "latitude", "longitude")).values, stack.std(("time", "latitude", "longitude")).values
    stats = xr.Dataset({"mean": ("channel", mean), "std": ("channel", std + 1.0), "diff_std": ("channel", 0.01 * (std + 1.0))},
                       coords={"channel": channels}, attrs={"period_start": "2000-01-01", "period_end": "2000-01-01"})
    torch.manual_seed(0)
    core = SFNO(n, n, g.nlat, g.nlon, **config.model.model_dump())
    model = Normalized(core, mean, std + 1.0, 0.01 * (std + 1.0))
    meta = build_meta(config, stats, g, core.arch, model.state_dict(), 0, "bench")
    return model.eval(), meta, analysis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="0.25deg")
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--scale-factor", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the in-memory path (it holds every lead: ~0.5 GB at 0.25° for 3 channels)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, {torch.get_num_threads()} threads")
    lead_hours = args.days * 24
    with tempfile.TemporaryDirectory(prefix="forecast-memory-") as tmp:
        root = Path(tmp)
        model, meta, analysis = forecaster(args, root)
        init = analysis["time"].values[-1]
        lead_mb = len(meta["channels"]) * analysis.sizes["latitude"] * analysis.sizes["longitude"] * 4 / 2**20
        print(f"setting: {args.grid} {analysis.sizes['latitude']}x{analysis.sizes['longitude']}, "
              f"{len(meta['channels'])} channels ({lead_mb:.1f} MiB per lead), width {args.width}, {args.depth} "
              f"blocks, scale factor {args.scale_factor}, {lead_hours // STEP_HOURS} steps of {STEP_HOURS} h")
        rss: dict[int, float] = {}
        t = time.perf_counter()

        def sample(k: int) -> None:
            rss[k] = rss_mib()
            if k in (0, 1, 2, 5) or k % 10 == 0:
                print(f"  lead {k:2d} ({k * STEP_HOURS:3d} h): RSS {rss[k]:7.1f} MiB  ({time.perf_counter() - t:.0f} s)",
                      flush=True)

        before = rss_mib()
        stream_forecast(model, meta, analysis, init, lead_hours, root / "streamed", on_lead=sample)
        after_nc = rss_mib()
        last = max(rss)
        ratio = rss[last] / rss[1]
        print(f"streamed: RSS before {before:.1f} MiB, lead 1 {rss[1]:.1f} MiB, lead {last} {rss[last]:.1f} MiB, "
              f"ratio {ratio:.3f} (goal ≤ {GOAL:.2f}: {'met' if ratio <= GOAL else 'NOT met'}); "
              f"after the NetCDF and GRIB2 copies {after_nc:.1f} MiB; {time.perf_counter() - t:.0f} s")
        if args.reference:
            t = time.perf_counter()
            start = rss_mib()
            ds = rollout(model, meta, analysis, init, lead_hours)
            held = rss_mib()
            write_forecast(ds, root / "in-memory")
            print(f"in-memory (the replaced path): RSS {start:.1f} MiB before the rollout, {held:.1f} MiB holding "
                  f"{ds.sizes['lead_time']} leads (+{held - start:.0f} MiB; the leads are {ds.sizes['lead_time'] * lead_mb:.0f} MiB); "
                  f"{time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
