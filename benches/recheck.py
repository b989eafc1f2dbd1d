"""Bytes and fields the daily ERA5T re-check asks of CDS: whole slabs (before) vs preliminary times only (after).

A store of ``--days`` days at 6 h (tiny grid, ``--slab`` times per slab) is built from the CDS
look-alike of the tests (the unmodified ``cdsapi`` client on 127.0.0.1, deliveries on a
``--grid-deg`` grid). The server delivers the last ``--prelim-hours`` of it as ERA5T. Then one daily
re-check (``ingest.recheck_days`` = ``--recheck-days``) runs twice, each on its own copy of the
store, while the server still calls those times ERA5T (the usual day):

- **before**: what the code before this change did, re-implemented here (``old_recheck_slabs`` is
  ``ingest/build.py``'s ``_recheck_slabs`` of commit 6e65700): every slab holding a preliminary time
  from ``since`` on is fetched whole, one ``source.fetch`` per slab, then ``replace_slab``. Its
  requests come from today's planner; for whole slabs it can only give the same or fewer requests
  than the old one did, with the same fields (both plans are exact).
- **after**: ``recheck_regions`` + ``recheck_region`` (what the daily append now runs): the
  preliminary times only, every slab's group planned together.
- **probe**: the same with ``probe_oldest=True``: the oldest slab's preliminary times first, the
  rest only if all of them came back final (CDS publishes final ERA5 in time order).

Counted on the server: accepted submissions, fields (times × variables × levels of each request)
and delivered bytes (the size of each delivery). The new day's times an append also fetches are
the same both ways and measured once, for the per-run totals.

Usage: python benches/recheck.py [--days 120] [--prelim-hours 120] [--slab 4] [--recheck-days 100]
       [--grid-deg 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from core.config import Config, load_config  # noqa: E402
from ingest.append import group_fetcher, recheck_region, recheck_regions, replace_slab, store_lock  # noqa: E402
from ingest.build import ingest, source_for  # noqa: E402
from ingest.regions import open_store, preliminary_times  # noqa: E402
from tests.ingest.cds_server import CdsServer, request_times  # noqa: E402

VARIABLES = ["geopotential", "u_component_of_wind", "v_component_of_wind"]
LEVELS = [500]
START = pd.Timestamp("2000-01-01T00")


def config(root: Path, days: int, slab: int, recheck_days: int) -> Config:
    """A tiny-grid CDS ingest of ``days`` days at 6 h in slabs of ``slab``."""
    end = START + pd.Timedelta(days=days) - pd.Timedelta(hours=6)
    return load_config(env={}, overrides={
        "paths": {"root": str(root)}, "grid": {"preset": "tiny"},
        "task": {"variables": VARIABLES, "levels": LEVELS},
        "ingest": {"source": "cds", "start": str(START), "end": str(end), "slab_size": slab, "retries": 0,
                   "recheck_days": recheck_days, "cds": {"retry_max": 2, "sleep_max": 0.5, "timeout": 120.0}},
        "train": {"train_start": str(START), "train_end": str(START + pd.Timedelta(hours=18)),
                  "val_start": str(START + pd.Timedelta(days=1)), "val_end": str(end)}})


def old_recheck_slabs(path: Path, times: pd.DatetimeIndex, slab_size: int, since: pd.Timestamp) -> list[slice]:
    """ingest/build.py ``_recheck_slabs`` before this change: every slab holding a preliminary time."""
    prelim = preliminary_times(path)
    prelim = prelim[prelim >= since]
    index = times.get_indexer(prelim)
    starts = sorted({int(i) // slab_size * slab_size for i in index if i >= 0})
    return [slice(s, min(s + slab_size, len(times))) for s in starts]


def before(cfg: Config, since: pd.Timestamp) -> int:
    """The old re-check: one whole-slab fetch per slab, then ``replace_slab``."""
    path, source = cfg.paths.analysis_store, source_for(cfg)
    with store_lock(path):
        store = open_store(path)
        times = pd.DatetimeIndex(store["time"].values)
        return sum(replace_slab(path, store, source.fetch(list(times[s]), VARIABLES, LEVELS), s.start)
                   for s in old_recheck_slabs(path, times, cfg.ingest.slab_size, since))


def after(cfg: Config, since: pd.Timestamp) -> int:
    """The new re-check: only the preliminary times of each region, all slab groups planned together."""
    path = cfg.paths.analysis_store
    fetch = group_fetcher(source_for(cfg), VARIABLES, LEVELS)
    with store_lock(path):
        store = open_store(path)
        return sum(recheck_region(path, store, fetch, where)
                   for where in recheck_regions(path, cfg.ingest.slab_size, since))


def probe(cfg: Config, since: pd.Timestamp) -> int:
    """The new re-check, probing the oldest slab's preliminary times first."""
    path = cfg.paths.analysis_store
    fetch = group_fetcher(source_for(cfg), VARIABLES, LEVELS)
    with store_lock(path):
        store = open_store(path)
        return sum(recheck_region(path, store, fetch, where, probe_oldest=True)
                   for where in recheck_regions(path, cfg.ingest.slab_size, since))


def measure(server: CdsServer, run) -> dict:  # noqa: ANN001 - a zero-argument callable
    """Requests, fields and delivered bytes the server saw while ``run()`` ran."""
    mark, jobs = len(server.received), set(server.jobs)
    began = time.perf_counter()
    replaced = run()
    seconds = time.perf_counter() - began
    subs = [r.request for r in server.received[mark:] if r.route == "submit" and r.status < 300]
    fields = sum(len(request_times(r)) * len(r["variable"]) * max(1, len(r.get("pressure_level", [])))
                 for r in subs)
    times = sorted({t for r in subs for t in request_times(r)})
    delivered = sum(j.size for k, j in server.jobs.items() if k not in jobs)
    return {"requests": len(subs), "fields": fields, "bytes": delivered, "times": len(times),
            "replaced": replaced, "seconds": round(seconds, 2)}


def main() -> int:
    """Build the store, run both re-checks on copies, print (or ``--json``) the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=120, help="days in the store (6-hourly)")
    ap.add_argument("--prelim-hours", type=int, default=120, help="the store's last hours delivered as ERA5T")
    ap.add_argument("--slab", type=int, default=4, help="times per slab (ingest.slab_size)")
    ap.add_argument("--recheck-days", type=int, default=100, help="ingest.recheck_days")
    ap.add_argument("--grid-deg", type=float, default=1.0, help="the server's delivery grid spacing")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="recheck-bench-") as tmp:
        root = Path(tmp)
        os.environ.update(HOME=str(root))
        for name in ("CDSAPI_RC", "ECMWF_DATASTORES_URL", "ECMWF_DATASTORES_KEY", "ECMWF_DATASTORES_RC_FILE"):
            os.environ.pop(name, None)
        with CdsServer(root / "server", grid_deg=args.grid_deg) as server:
            os.environ.update(server.env("new"))
            cfg = config(root / "built", args.days, args.slab, args.recheck_days)
            times = pd.date_range(cfg.ingest.start, cfg.ingest.end, freq="6h")
            server.set_era5t(times[-1] - pd.Timedelta(hours=args.prelim_hours))
            began = time.perf_counter()
            ingest(cfg, progress=False)
            build_s = time.perf_counter() - began
            since = times[-1] - pd.Timedelta(days=args.recheck_days)
            prelim = preliminary_times(cfg.paths.analysis_store)
            out: dict = {"store": {"days": args.days, "times": len(times), "slab_size": args.slab,
                                   "preliminary_times": len(prelim), "recheck_days": args.recheck_days,
                                   "delivery_grid_deg": args.grid_deg, "build_seconds": round(build_s, 1)}}
            for name, run in (("before", before), ("after", after), ("probe", probe)):
                copy = root / name
                shutil.copytree(cfg.paths.analysis_store.parent, copy / cfg.paths.analysis_store.parent.name)
                mine = config(copy, args.days, args.slab, args.recheck_days)
                out[name] = measure(server, lambda run=run, mine=mine: run(mine, since))
            new_day = pd.date_range(times[-1] + pd.Timedelta(hours=6), periods=4, freq="6h")
            source = source_for(cfg)
            out["new_day"] = measure(server, lambda: source.fetch(list(new_day), VARIABLES, LEVELS) and 0)
    b, a, n = out["before"], out["after"], out["new_day"]
    out["ratio_bytes"] = round(b["bytes"] / a["bytes"], 3) if a["bytes"] else None
    out["ratio_fields"] = round(b["fields"] / a["fields"], 3) if a["fields"] else None
    out["ratio_requests"] = round(b["requests"] / a["requests"], 3) if a["requests"] else None
    p = out["probe"]
    out["ratio_bytes_probe"] = round(b["bytes"] / p["bytes"], 3) if p["bytes"] else None
    out["daily_bytes"] = {name: out[name]["bytes"] + n["bytes"] for name in ("before", "after", "probe")}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    s = out["store"]
    print(f"store: {s['days']} days at 6 h ({s['times']} times), slabs of {s['slab_size']}, "
          f"{s['preliminary_times']} preliminary times, recheck_days {s['recheck_days']}, "
          f"deliveries on a {s['delivery_grid_deg']}° grid (built in {s['build_seconds']} s)")
    print(f"{'':>10} {'requests':>9} {'fields':>8} {'times':>6} {'bytes':>12}")
    for name in ("before", "after", "probe", "new_day"):
        r = out[name]
        print(f"{name:>10} {r['requests']:>9} {r['fields']:>8} {r['times']:>6} {r['bytes']:>12,}")
    print(f"re-check ratio before/after: bytes {out['ratio_bytes']}x, fields {out['ratio_fields']}x, "
          f"requests {out['ratio_requests']}x; with the probe: bytes {out['ratio_bytes_probe']}x")
    d = out["daily_bytes"]
    print(f"per daily run (new day + re-check): before {d['before']:,}, after {d['after']:,}, "
          f"probe {d['probe']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
