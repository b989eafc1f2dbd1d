"""Error, spread and probability maps at a real grid size: wall time, frames and peak memory.

Error maps (forecast − analysis) of three products over the globe for every lead of a synthetic
forecast against a second synthetic analysis, then the spread and probability maps of a 4-member
ensemble of it, each with animations, rendered by two worker processes.

Usage: python benches/render_derived.py [--grid 0.25deg] [--leads 5]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path and "serve" would name benches/serve.py, not the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.maps import render_run_maps  # noqa: E402
from serve.maps_error import render_error_maps  # noqa: E402
from tests.serve.test_maps import as_forecast  # noqa: E402
from tests.serve.test_maps_derived import members_of  # noqa: E402
from tests.serve.test_products import weather  # noqa: E402


def main() -> None:
    """Render both batches and print their timings and the peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="0.25deg")
    parser.add_argument("--leads", type=int, default=5)
    args = parser.parse_args()
    forecast = as_forecast(weather(grid=args.grid, periods=args.leads))
    truth = weather(grid=args.grid, periods=args.leads, seed=3)
    with tempfile.TemporaryDirectory(prefix="bench-derived-") as tmp:
        stats: dict[str, float] = {}
        began = time.perf_counter()
        files = render_error_maps(forecast, truth, [(i, i) for i in range(args.leads)], Path(tmp) / "error",
                                  products=["t2m", "z500_t850", "wind10m"], workers=2, stats=stats)
        print(f"{args.grid}: error maps, {stats['frames']:.0f} frames + animations ({len(files)} files) in "
              f"{time.perf_counter() - began:.1f} s, {stats['cpu_s']:.1f} CPU s")
        ensemble = members_of(forecast, [-2.0, 0.0, 2.0, 4.0])
        began = time.perf_counter()
        files = render_run_maps(ensemble, Path(tmp) / "ens", products=["spread_t2m", "spread_wind10m",
                                                                        "prob_t2m_below_0C", "prob_wind10m_above_15ms"],
                                workers=2, stats=stats)
        print(f"{args.grid}: 4-member spread and probability maps, {stats['frames']:.0f} frames + animations "
              f"({len(files)} files) in {time.perf_counter() - began:.1f} s, {stats['cpu_s']:.1f} CPU s")
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          "(mostly the synthetic inputs, built whole in memory here)")


if __name__ == "__main__":
    main()
