"""Store writer throughput vs ``numpy.save`` of the same bytes to the same disk, and ingest scaling.

Part 1: the same in-memory analysis (float32) is written (a) by ``numpy.save``, one file per
variable per slab, and also one file per variable per time (as many files as the store has
chunks: this isolates the writer's own overhead from the filesystem's per-file cost), and (b) by
the store writer (region writes + done flags into a pre-allocated store, opened once, from slabs
as a source delivers them: the steady state of an ingest worker; and the whole build including
pre-allocation and metadata consolidation), uncompressed and with the default codec (zstd +
crc32c). Throughput ratio = raw time / writer time (goal ≥ 0.7 uncompressed, slab writes).
Part 2: writer time for 4 period lengths, to see whether it is linear.
Each measurement starts after a sync and, unless ``--page-cache``, ends with one: the time is
for the bytes reaching the disk, the same for both sides. Page-cache-only timings (``--page-cache``)
measured memory copies whose speed varied tenfold between runs on a shared VM (writeback and
reclaim of other processes' pages), which decided the ratio more than either writer did.

Usage: python benches/ingest.py [--grid 1.5deg] [--times 96] [--dir /path/on/disk] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and "ingest" would name this file,
# not the package; the benchmark keeps the file name, so drop that entry.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import pandas as pd
import xarray as xr

from core.grid import get_grid
from core.schema import EXPVER_FINAL
from core.variables import get_variable
from ingest.store import StoreLayout, consolidate, create_store, open_store, write_slab

VARIABLES = ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind", "2m_temperature",
             "mean_sea_level_pressure")
LEVELS = (250, 500, 700, 850)
SLAB = 4
DURABLE = True  # set by --page-cache: whether each timing ends with the bytes on the disk (sync)


def analysis(grid_name: str, n: int) -> xr.Dataset:
    """Random-but-smooth-ish float32 fields in the contract's layout (zstd gets realistic work)."""
    g = get_grid(grid_name)
    rng = np.random.default_rng(0)
    times = pd.date_range("2000-01-01", periods=n, freq="6h")
    base = np.cos(np.deg2rad(g.latitudes))[:, None] * np.ones(g.nlon)
    data = {}
    for name in VARIABLES:
        var = get_variable(name)
        lo, hi = var.valid_range
        pressure = var.level_type == "pressure"
        shape = (n, len(LEVELS), g.nlat, g.nlon) if pressure else (n, g.nlat, g.nlon)
        field = (lo + hi) / 2 + (hi - lo) / 8 * (base + 0.01 * rng.standard_normal(shape))
        dims = ("time", "level", "latitude", "longitude") if pressure else ("time", "latitude", "longitude")
        data[name] = (dims, field.astype(np.float32), {"units": var.units, "long_name": var.long_name})
    ds = xr.Dataset(data, coords={"time": times.values, "level": np.asarray(LEVELS, np.int32),
                                  "latitude": g.latitudes, "longitude": g.longitudes})
    ds["expver"] = ("time", np.full(n, EXPVER_FINAL, np.int8))
    return ds


def layout_of(ds: xr.Dataset, grid_name: str) -> StoreLayout:
    """The store layout that holds ``ds``."""
    return StoreLayout(get_grid(grid_name), VARIABLES, LEVELS, pd.DatetimeIndex(ds["time"].values), "bench", "bench-1")


def write_raw(ds: xr.Dataset, root: Path) -> None:
    """numpy.save of every variable's slab: the same bytes, no format around them."""
    root.mkdir()
    for start in range(0, ds.sizes["time"], SLAB):
        for name in VARIABLES:
            np.save(root / f"{name}-{start}.npy", ds[name].values[start:start + SLAB])


def write_raw_per_chunk(ds: xr.Dataset, root: Path) -> None:
    """numpy.save of every variable at every time: the same bytes in as many files as the store has chunks."""
    root.mkdir()
    for t in range(ds.sizes["time"]):
        for name in VARIABLES:
            np.save(root / f"{name}-{t}.npy", ds[name].values[t])


def write_store(ds: xr.Dataset, root: Path, grid_name: str, compression: str, checksum: bool) -> None:
    """The whole build: pre-allocate, region-write each slab, flags last, consolidate."""
    create_store(root, layout_of(ds, grid_name), slab_size=SLAB, compression=compression, checksum=checksum)
    write_slabs(ds, root)
    consolidate(root)


def slabs_of(ds: xr.Dataset) -> list[tuple[int, xr.Dataset]]:
    """The writer's input: ``(start, slab)`` as a source delivers them (numpy.save's are free array views)."""
    return [(start, ds.isel(time=slice(start, start + SLAB))) for start in range(0, ds.sizes["time"], SLAB)]


def write_slabs(ds: xr.Dataset, root: Path, store: xr.Dataset | None = None,
                slabs: list[tuple[int, xr.Dataset]] | None = None) -> None:
    """The steady state of an ingest: region-write each slab (data, then its flags) into the store."""
    # An ingest worker opens the store once and keeps it (ingest.build._cached_store).
    store = open_store(root) if store is None else store
    for start, slab in slabs_of(ds) if slabs is None else slabs:
        write_slab(root, store, slab, start)


def paired(ds: xr.Dataset, workdir: Path, grid_name: str, compression: str, checksum: bool,
           repeats: int) -> list[tuple[float, float, float]]:
    """``(numpy.save per slab, numpy.save per chunk, store slab writes)`` seconds, measured side by side.

    The page cache's writeback state drifts over a run (other processes, earlier runs' dirty
    pages), so each store measurement is paired with references taken right beside it, in an
    order that rotates, and the ratio is taken per pair.
    """
    out = []
    for k in range(repeats):
        target = workdir / f"slabs-{k}"
        create_store(target, layout_of(ds, grid_name), slab_size=SLAB, compression=compression, checksum=checksum)
        store, slabs = open_store(target), slabs_of(ds)
        times = [0.0, 0.0, 0.0]
        for j in [(k + i) % 3 for i in range(3)]:
            if j == 2:
                os.sync()
                t = time.perf_counter()
                write_slabs(ds, target, store, slabs)
                if DURABLE:
                    os.sync()
                times[2] = time.perf_counter() - t
            else:
                times[j] = timed(write_raw if j == 0 else write_raw_per_chunk, workdir, 1, ds)
        shutil.rmtree(target)
        out.append((times[0], times[1], times[2]))
    return out


def timed(fn: Callable[..., None], workdir: Path, repeats: int, *args: object) -> float:
    """Median wall time of ``fn(*args, target)`` writing into a fresh directory."""
    times = []
    for k in range(repeats):
        target = workdir / f"run-{k}"
        os.sync()  # earlier runs' dirty pages must not be flushed on this run's clock
        t = time.perf_counter()
        fn(*args, target)
        if DURABLE:
            os.sync()
        times.append(time.perf_counter() - t)
        shutil.rmtree(target)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="1.5deg")
    parser.add_argument("--times", type=int, default=96)
    parser.add_argument("--dir", type=Path, default=None, help="directory on the disk to measure (default: cwd)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--page-cache", action="store_true",
                        help="stop each clock when the writes return (page cache), not after a sync to the disk")
    parser.add_argument("--writer", choices=["chunkio", "zarr"], default="chunkio",
                        help="zarr: every write through zarr-python's own sharded region writes (the hand encoder off)")
    parser.add_argument("--skip-build", action="store_true", help="slab writes only (no whole build, no scaling)")
    args = parser.parse_args()
    if args.writer == "zarr":
        # Without the direct writer every chunk and shard goes through zarr.Array's own (async, concurrent) writes.
        import ingest.regions

        ingest.regions.chunk_writer = lambda path: None  # type: ignore[assignment]
    global DURABLE
    DURABLE = not args.page_cache
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.dir or Path.cwd()))
    try:
        ds = analysis(args.grid, args.times)
        nbytes = sum(ds[v].nbytes for v in VARIABLES)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; disk of {workdir}")
        print(f"data: grid {args.grid}, {args.times} times × {len(VARIABLES)} variables "
              f"({len(LEVELS)} levels) = {nbytes / 1e6:.0f} MB float32, slabs of {SLAB}")
        print("slab writes only (store pre-allocated; the steady state of an ingest), each run paired with "
              "numpy.save of the same slabs and of the same bytes one file per time, in rotating order:")
        raw_all: list[float] = []
        for compression, checksum, label in (("none", False, "uncompressed        "),
                                             ("none", True, "crc32c only         "),
                                             ("zstd", True, "zstd + crc32c       ")):
            runs = paired(ds, workdir, args.grid, compression, checksum, args.repeats)
            raw_all += [r for r, _, _ in runs]
            store = statistics.median(t for _, _, t in runs)
            per_slab = statistics.median(r / t for r, _, t in runs)
            per_chunk = statistics.median(c / t for _, c, t in runs)
            print(f"  {label} {store:7.3f} s  {nbytes / store / 1e6:8.1f} MB/s  ratio {per_slab:.2f}× numpy.save "
                  f"per slab, {per_chunk:.2f}× per chunk (medians of {len(runs)} paired runs)")
        raw = statistics.median(raw_all)
        print(f"numpy.save per slab: median {raw:.3f} s ({nbytes / raw / 1e6:.1f} MB/s) over {len(raw_all)} runs, "
              f"range {min(raw_all):.3f}–{max(raw_all):.3f} s")
        print(f"writer: {args.writer}")
        if args.skip_build:
            return
        print("whole build (pre-allocate + slabs + consolidate):")
        for compression, checksum, label in (("none", False, "uncompressed        "),
                                             ("zstd", True, "zstd + crc32c       ")):
            t = timed(lambda p, c=compression, k=checksum: write_store(ds, p, args.grid, c, k), workdir, args.repeats)
            print(f"  {label} {t:7.3f} s  {nbytes / t / 1e6:8.1f} MB/s  ratio {raw / t:.2f}× numpy.save")
        print("\nscaling (store, zstd + crc32c):")
        sizes = [args.times // 8, args.times // 4, args.times // 2, args.times]
        per = []
        for n in sizes:
            part = ds.isel(time=slice(0, n))
            t = timed(lambda p, d=part: write_store(d, p, args.grid, "zstd", True), workdir, args.repeats)
            per.append(t / n)
            print(f"  {n:5d} times  {t:7.3f} s  {1e3 * t / n:7.2f} ms/time")
        print(f"  ms/time at the largest / smallest size: {per[-1] / per[0]:.2f} (1.0 = linear)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
