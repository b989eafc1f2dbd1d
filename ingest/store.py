"""The analysis store writer: pre-allocate, region-write per slab, then mark the slab done.

Pattern from xarray's "distributed writes" guide: the whole period's metadata is written once
from a lazy template (``compute=False``), then each slab of times is written into its fixed
region. A slab's ``done`` flags are set only after its data is on disk, so a killed run resumes
by rewriting exactly the slabs without flags, and the result is byte-identical to an
uninterrupted build. ``to_zarr(append_dim=…)`` is never used: it rewrites metadata as it goes.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr

from core.grid import Grid
from core.schema import SCHEMA_VERSION, validate_analysis
from core.variables import get_variable

log = logging.getLogger(__name__)

FLAGS = ("done", "expver")


@dataclass(frozen=True)
class StoreLayout:
    """What a store holds: grid, variables, levels, period and the producing source."""

    grid: Grid
    variables: tuple[str, ...]
    levels: tuple[int, ...]
    times: pd.DatetimeIndex
    source: str
    dataset_version: str


def _template(layout: StoreLayout) -> xr.Dataset:
    g, nt = layout.grid, len(layout.times)
    data_vars = {}
    for name in layout.variables:
        var = get_variable(name)
        if var.level_type == "pressure":
            dims = ("time", "level", "latitude", "longitude")
            shape = (nt, len(layout.levels), g.nlat, g.nlon)
        else:
            dims = ("time", "latitude", "longitude")
            shape = (nt, g.nlat, g.nlon)
        lazy = da.zeros(shape, dtype=np.float32, chunks=(1,) + shape[1:])
        data_vars[name] = (dims, lazy, {"units": var.units, "long_name": var.long_name})
    data_vars["done"] = (("time",), da.zeros(nt, dtype=np.uint8, chunks=1),
                         {"long_name": "slab written completely (1) or not (0)"})
    data_vars["expver"] = (("time",), da.zeros(nt, dtype=np.int8, chunks=1),
                           {"long_name": "ERA5 experiment version", "flag_values": [0, 1, 5],
                            "flag_meanings": "unknown final preliminary"})
    coords = {
        "time": ("time", layout.times.values.astype("datetime64[ns]"), {"standard_name": "time"}),
        "level": ("level", np.asarray(layout.levels, dtype=np.int32), {"units": "hPa", "long_name": "pressure level"}),
        "latitude": ("latitude", g.latitudes, {"units": "degrees_north", "standard_name": "latitude"}),
        "longitude": ("longitude", g.longitudes, {"units": "degrees_east", "standard_name": "longitude"}),
    }
    attrs = {"schema_version": SCHEMA_VERSION, "grid": g.describe(), "source": layout.source,
             "dataset_version": layout.dataset_version, "Conventions": "CF-1.8"}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def create_store(path: Path, layout: StoreLayout) -> None:
    """Pre-allocate an empty store for the layout's whole period (metadata only, atomically)."""
    if path.exists():
        raise ValueError(f"store {path} already exists")
    ds = _template(layout)
    validate_analysis(ds, what=f"template for {path}")
    encoding = {name: {"fill_value": np.nan} for name in layout.variables}
    encoding.update({flag: {"fill_value": 0} for flag in FLAGS})
    encoding["time"] = {"units": "hours since 1900-01-01", "calendar": "proleptic_gregorian", "dtype": "int64"}
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_zarr(tmp, mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding)
    with warnings.catch_warnings():
        # Zarr warns that consolidated metadata is not (yet) in the v3 spec; we want it anyway
        # so readers open the store with one request.
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        zarr.consolidate_metadata(str(tmp))
    os.rename(tmp, path)  # a reader sees no store or a whole pre-allocated one


def open_store(path: Path) -> xr.Dataset:
    """Open an analysis store lazily and check it against the contract."""
    if not (path / "zarr.json").is_file():
        raise ValueError(f"{path} is not an analysis store (no zarr.json)")
    ds = xr.open_zarr(path, consolidated=None, zarr_format=3)
    return validate_analysis(ds, what=f"analysis store {path}")


def done_flags(path: Path) -> np.ndarray:
    """The per-time done flags of a store as a bool array (read fresh from disk)."""
    return zarr.open_array(str(path / "done"), mode="r")[:].astype(bool)


def remove_partial_files(path: Path) -> int:
    """Delete chunk files a killed writer left half-written (``*.partial``); return how many."""
    count = 0
    for stray in path.rglob("*.partial"):
        stray.unlink()
        count += 1
    return count


def _check_slab(store: xr.Dataset, slab: xr.Dataset, where: slice) -> None:
    times = store["time"].values[where]
    if not np.array_equal(slab["time"].values.astype("datetime64[ns]"), times):
        raise ValueError(f"slab times {slab['time'].values[[0, -1]]} do not match store region {times[[0, -1]]}")
    for dim in ("latitude", "longitude"):
        if slab.sizes.get(dim) != store.sizes[dim] or not np.allclose(slab[dim].values, store[dim].values):
            raise ValueError(f"slab {dim} does not match the store's grid {store.attrs['grid']}")
    for name in store.data_vars:
        if name in FLAGS:
            continue
        if name not in slab.data_vars:
            raise ValueError(f"slab lacks variable {name!r}")
        if slab[name].dims != store[name].dims:
            raise ValueError(f"slab variable {name!r} has dims {slab[name].dims}, store has {store[name].dims}")
    extra = set(slab.data_vars) - set(store.data_vars)
    if extra:
        raise ValueError(f"slab has variables the store does not: {sorted(extra)}")
    if "level" in slab.dims and not np.array_equal(slab["level"].values, store["level"].values):
        raise ValueError(f"slab levels {slab['level'].values.tolist()} != store levels {store['level'].values.tolist()}")


def write_slab(path: Path, store: xr.Dataset, slab: xr.Dataset, start: int) -> None:
    """Write one slab into its region, then set its done flags (data strictly first)."""
    where = slice(start, start + slab.sizes["time"])
    _check_slab(store, slab, where)
    data = slab[[v for v in store.data_vars if v not in FLAGS]].astype(np.float32)
    data = data.drop_vars([c for c in data.coords if c != "time"]).drop_vars("time")
    for name in data.data_vars:
        data[name].attrs = {}
        if not np.all(np.isfinite(data[name].values)):
            raise ValueError(f"slab {where.start}–{where.stop}: {name!r} has NaN or Inf; not written")
    data.to_zarr(path, region={"time": where}, mode="r+", zarr_format=3, consolidated=False)
    expver = slab["expver"].values.astype(np.int8) if "expver" in slab else np.zeros(slab.sizes["time"], np.int8)
    flags = xr.Dataset({"expver": ("time", expver), "done": ("time", np.ones(slab.sizes["time"], np.uint8))})
    # Flags go last so that a kill before this line leaves the slab marked "to do".
    flags[["expver"]].to_zarr(path, region={"time": where}, mode="r+", zarr_format=3, consolidated=False)
    flags[["done"]].to_zarr(path, region={"time": where}, mode="r+", zarr_format=3, consolidated=False)


def slabs_to_do(done: np.ndarray, slab_size: int) -> list[slice]:
    """Fixed slab regions (``slab_size`` times each) that are not completely done."""
    out = []
    for start in range(0, done.size, slab_size):
        where = slice(start, min(start + slab_size, done.size))
        if not done[where].all():
            out.append(where)
    return out


@dataclass(frozen=True)
class BuildReport:
    """What a build did."""

    path: Path
    written: int
    skipped: int
    total: int


def check_layout(store: xr.Dataset, layout: StoreLayout, path: Path) -> None:
    """Refuse to touch a store whose grid, variables, levels, period or version differ."""
    problems = []
    if store.attrs["grid"] != layout.grid.describe():
        problems.append(f"grid {store.attrs['grid']} != {layout.grid.describe()}")
    have = tuple(v for v in store.data_vars if v not in FLAGS)
    if sorted(have) != sorted(layout.variables):
        problems.append(f"variables {sorted(have)} != {sorted(layout.variables)}")
    if store["level"].values.tolist() != list(layout.levels):
        problems.append(f"levels {store['level'].values.tolist()} != {list(layout.levels)}")
    if store.attrs["dataset_version"] != layout.dataset_version:
        problems.append(f"dataset_version {store.attrs['dataset_version']} != {layout.dataset_version}")
    if not np.array_equal(store["time"].values, layout.times.values.astype("datetime64[ns]")):
        t = store["time"].values
        problems.append(f"period {t[0]}..{t[-1]} ({t.size} times) != requested "
                        f"{layout.times[0]}..{layout.times[-1]} ({len(layout.times)} times)")
    if problems:
        raise ValueError(f"store {path} does not match the request; nothing was modified: " + "; ".join(problems))


def build_store(path: Path, layout: StoreLayout,
                fetch: Callable[[Sequence[pd.Timestamp]], xr.Dataset],
                slab_size: int, progress: Callable[[int, int], None] | None = None) -> BuildReport:
    """Create (or resume) a store and write every slab that is not done, in time order."""
    if path.exists():
        check_layout(open_store(path), layout, path)
        removed = remove_partial_files(path)
        if removed:
            log.warning("removed %d half-written chunk files left by an interrupted writer", removed)
    else:
        create_store(path, layout)
    store = open_store(path)
    done = done_flags(path)
    todo = slabs_to_do(done, slab_size)
    skipped = sum(1 for _ in range(0, done.size, slab_size)) - len(todo)
    for k, where in enumerate(todo):
        times = list(pd.DatetimeIndex(store["time"].values[where]))
        slab = fetch(times)
        write_slab(path, store, slab, where.start)
        log.debug("wrote slab %s..%s", times[0], times[-1])
        if progress is not None:
            progress(k + 1, len(todo))
    return BuildReport(path, len(todo), skipped, len(todo) + skipped)
