"""EDR point-query latency: spherecast's ``/collections/{run}/position`` vs xpublish-edr on the same forecast.zarr.

One forecast (the testing factory's fields relabelled as leads of one init time, one Zarr chunk per
variable and lead like the forecast writer) is published as a run. Two servers start in their own
processes on 127.0.0.1: (a) the spherecast app under uvicorn, (b) xpublish with the xpublish-edr
plugin serving a view of the same store (init_time squeezed, valid time as the ``time`` dimension,
CF axis attributes). The same random POINT queries (one parameter, one level, one valid time) go to
both, interleaved A/B over keep-alive connections after one warm-up each; the p50 and p99 latencies
and the p50 ratio ours / xpublish-edr are printed as JSON. Before timing, a point on a grid node must
give the same value from both (xpublish-edr picks the nearest node, ours is bilinear: equal there).

Usage: python benches/serve_edr.py [--n 200] [--grid 1.5deg] [--leads 41]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# Run as a script, benches/ comes first on sys.path; the project root must be importable instead.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benches"]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.grid import get_grid  # noqa: E402
from core.runs import publish, run_name, staging_dir, write_manifest  # noqa: E402
from core.schema import validate_forecast  # noqa: E402
from core.testing import analysis_dataset  # noqa: E402

INIT = "2000-01-01T00"
PARAM = "geopotential"
DEADLINE_S = 120.0

XPUBLISH_SERVER = textwrap.dedent("""
    import sys
    import xarray as xr
    import xpublish
    from xpublish_edr import CfEdrPlugin

    zarr_path, port = sys.argv[1], int(sys.argv[2])
    ds = xr.open_zarr(zarr_path, consolidated=False)
    ds = ds.isel(init_time=0).swap_dims(lead_time="valid_time").drop_vars(["lead_time", "init_time"])
    ds = ds.rename(valid_time="time")
    ds["time"].attrs.update(axis="T", standard_name="time")
    ds["latitude"].attrs.update(axis="Y", standard_name="latitude", units="degrees_north")
    ds["longitude"].attrs.update(axis="X", standard_name="longitude", units="degrees_east")
    ds["level"].attrs.update(axis="Z", standard_name="air_pressure", units="hPa", positive="down")
    rest = xpublish.Rest({"forecast": ds}, plugins={"edr": CfEdrPlugin()})
    rest.serve(host="127.0.0.1", port=port, log_level="warning")
""")

OURS_SERVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    import uvicorn
    from serve.app import create_app
    from serve.settings import ServeSettings

    app = create_app(ServeSettings(forecasts_dir=Path(sys.argv[1])))
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
""")


def build_run(forecasts_dir: Path, grid: str, leads: int) -> Path:
    """Publish one forecast run (forecast.zarr + manifest) and return its directory."""
    a = analysis_dataset(grid=grid, start=INIT, periods=leads, step_hours=6).drop_vars(["done", "expver"])
    lead = a["time"].values - a["time"].values[0]
    ds = a.rename(time="lead_time").assign_coords(lead_time=lead)
    ds = ds.expand_dims(init_time=[pd.Timestamp(INIT).to_datetime64()])
    ds = ds.assign_coords(valid_time=(("init_time", "lead_time"), ds["init_time"].values[:, None] + lead[None, :]))
    validate_forecast(ds)
    name = run_name(INIT)
    tmp = staging_dir(forecasts_dir, name)
    chunks = {v: {"chunks": tuple(1 if d in ("init_time", "lead_time") else ds.sizes[d] for d in ds[v].dims)}
              for v in ds.data_vars}
    ds.to_zarr(tmp / "forecast.zarr", zarr_format=3, consolidated=False, encoding=chunks)
    write_manifest(tmp, pd.Timestamp(INIT), provenance={"checkpoint_sha256": "0" * 64,
                                                         "dataset_version": "bench", "code_version": "bench"})
    return publish(tmp, forecasts_dir / name)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(code: str, args: list[str], url: str, log: Path) -> subprocess.Popen:
    """Start a server script in its own process and wait until ``url`` answers."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server at {url} did not start: {log.read_text()[-2000:]}")


def _timed(client: httpx.Client, url: str, params: dict) -> tuple[float, httpx.Response]:
    t = time.perf_counter()
    resp = client.get(url, params=params)
    elapsed = time.perf_counter() - t
    resp.raise_for_status()
    return elapsed, resp


def _ours_value(resp: httpx.Response) -> float:
    return float(resp.json()["ranges"][PARAM]["values"][0])


def _theirs_value(resp: httpx.Response) -> float:
    return float(np.asarray(resp.json()["ranges"][PARAM]["values"], dtype=float).ravel()[0])


def point_latency(n_queries: int = 200, grid: str = "1.5deg", leads: int = 41) -> dict:
    """p50/p99 latency of one-point EDR queries on ours and on xpublish-edr, and the p50 ratio."""
    started = time.monotonic()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="bench-edr-") as tmp:
        run_dir = build_run(Path(tmp) / "forecasts", grid, leads)
        run = run_dir.name
        ours_port, theirs_port = free_port(), free_port()
        ours = f"http://127.0.0.1:{ours_port}/collections/{run}/position"
        theirs = f"http://127.0.0.1:{theirs_port}/datasets/forecast/edr/position"
        try:
            procs.append(start(OURS_SERVER, [str(run_dir.parent), str(ours_port), str(ROOT)],
                               f"http://127.0.0.1:{ours_port}/health", Path(tmp) / "ours.log"))
            procs.append(start(XPUBLISH_SERVER, [str(run_dir / "forecast.zarr"), str(theirs_port)],
                               f"http://127.0.0.1:{theirs_port}/datasets", Path(tmp) / "theirs.log"))
            rng = np.random.default_rng(0)
            g = get_grid(grid)
            lats, lons, nlon = g.latitudes, g.longitudes, g.nlon
            times = pd.date_range(INIT, periods=leads, freq="6h")
            with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
                # Agreement on a grid node (and the warm-up of both).
                when = times[leads // 2].strftime("%Y-%m-%dT%H:%M:%S")
                node = {"coords": f"POINT({lons[7]} {lats[11]})", "parameter-name": PARAM, "z": "500",
                        "datetime": when}
                _, ra = _timed(a, ours, node)
                _, rb = _timed(b, theirs, node)
                agree = _ours_value(ra) == _theirs_value(rb)
                if not agree:
                    raise RuntimeError(f"answers differ at a node: ours {_ours_value(ra)}, "
                                       f"xpublish-edr {_theirs_value(rb)}")
                ta, tb = [], []
                for _ in range(n_queries):
                    if time.monotonic() - started > DEADLINE_S - 10:
                        break  # stay inside the bench's time bound; n reports what was measured
                    q = {"coords": f"POINT({rng.uniform(0, 360 - 360 / nlon):.4f} {rng.uniform(-89, 89):.4f})",
                         "parameter-name": PARAM, "z": "500",
                         "datetime": times[rng.integers(leads)].strftime("%Y-%m-%dT%H:%M:%S")}
                    ta.append(_timed(a, ours, q)[0])
                    tb.append(_timed(b, theirs, q)[0])
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)
    p = {k: float(np.percentile(np.asarray(v) * 1e3, q)) for k, v, q in
         (("ours_p50_ms", ta, 50), ("ours_p99_ms", ta, 99), ("xpublish_edr_p50_ms", tb, 50),
          ("xpublish_edr_p99_ms", tb, 99))}
    return {**p, "p50_ratio_ours_over_xpublish_edr": p["ours_p50_ms"] / p["xpublish_edr_p50_ms"],
            "n": len(ta), "grid": grid, "leads": leads, "agree_at_node": agree,
            "wall_s": round(time.monotonic() - started, 1),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}"}


def main() -> None:
    """Run the benchmark and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--grid", default="1.5deg")
    parser.add_argument("--leads", type=int, default=41)
    args = parser.parse_args()
    print(json.dumps(point_latency(args.n, args.grid, args.leads), indent=2))


if __name__ == "__main__":
    main()
