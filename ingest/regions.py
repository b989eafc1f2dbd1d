"""Reads and region writes on an existing analysis store (the writer's low-level half).

Readers see the store through its consolidated metadata, which is refreshed only at the end of a
create, append or replacement: while an append is half done (some arrays already resized), they
still see the previous, consistent period. Writes never change metadata: each slab goes into its
fixed region, data strictly before its flags, so a kill leaves the slab marked "to do".
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from core.errors import DataContractError, SourceError
from core.location import as_location, exists, is_remote, zarr_url
from core.schema import EXPVER_PRELIMINARY, FLAG_VARIABLES, validate_analysis
from ingest.chunkio import chunk_writer, map_parallel, run_all

log = logging.getLogger(__name__)

FLAGS = FLAG_VARIABLES


def consolidate(path: Path) -> None:
    """Rewrite the store's consolidated metadata from the arrays' own metadata."""
    with warnings.catch_warnings():
        # Zarr warns that consolidated metadata is not (yet) in the v3 spec; we want it anyway
        # so readers open the store with one request and never see a half-done append.
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        zarr.consolidate_metadata(zarr_url(as_location(path)))


def store_exists(path: Path) -> bool:
    """Whether something is at the store's location (on an object store: a whole store, its root zarr.json)."""
    path = as_location(path)
    # An object store has no directories, and a store's root zarr.json is uploaded last (create_store):
    # objects without it are what a killed creation left, not a store.
    return exists(path / "zarr.json") if is_remote(path) else path.exists()


def open_store(path: Path) -> xr.Dataset:
    """Open an analysis store lazily and check it against the contract."""
    path = as_location(path)
    if not (path / "zarr.json").is_file():
        raise DataContractError(f"{path} is not an analysis store (no zarr.json)")
    ds = xr.open_zarr(zarr_url(path), consolidated=None, zarr_format=3)
    return validate_analysis(ds, what=f"analysis store {path}")


_UNITS = {"days": "D", "hours": "h", "minutes": "min", "seconds": "s", "milliseconds": "ms",
          "microseconds": "us", "nanoseconds": "ns"}


def encode_times(times: pd.DatetimeIndex, units: str, dtype: np.dtype, what: str) -> np.ndarray:
    """Times as the integers a CF ``<unit> since <reference>`` coordinate stores."""
    unit, sep, ref = units.partition(" since ")
    if not sep or unit.strip() not in _UNITS:
        raise DataContractError(f"{what}: time units {units!r} are not '<unit> since <date>'")
    step = pd.Timedelta(1, unit=_UNITS[unit.strip()]).as_unit("ns").value
    offsets = (times.as_unit("ns") - pd.Timestamp(ref.strip()).as_unit("ns")).asi8
    if np.any(offsets % step):
        raise DataContractError(f"{what}: times are not whole multiples of {unit.strip()} since {ref.strip()}")
    return (offsets // step).astype(dtype)


def decode_times(raw: np.ndarray, units: str, what: str) -> pd.DatetimeIndex:
    """The datetimes a CF ``<unit> since <reference>`` integer coordinate stands for."""
    unit, sep, ref = units.partition(" since ")
    if not sep or unit.strip() not in _UNITS:
        raise DataContractError(f"{what}: time units {units!r} are not '<unit> since <date>'")
    return pd.Timestamp(ref.strip()) + pd.to_timedelta(np.asarray(raw, dtype=np.int64), unit=_UNITS[unit.strip()])


def read_flags(path: Path) -> xr.Dataset:
    """The per-time flags of a store with its times, read fresh from disk (``replaced`` 0 if absent)."""
    # Plain Zarr through the consolidated metadata: cheap enough to poll, and the length is the
    # published one even while an append is half done.
    path = as_location(path)
    if not (path / "zarr.json").is_file():
        raise DataContractError(f"{path} is not an analysis store (no zarr.json)")
    group = zarr.open_group(zarr_url(path), mode="r", use_consolidated=None)
    tarr = group["time"]
    n = tarr.shape[0]
    times = decode_times(tarr[:], str(tarr.attrs.get("units", "")), f"analysis store {path}")
    flags = {}
    for name in FLAGS:
        if name in group:
            flags[name] = ("time", group[name][:n])
        elif name == "replaced":
            flags[name] = ("time", np.zeros(n, np.uint8))
        else:
            raise DataContractError(f"analysis store {path}: missing per-time variable {name!r}(time)")
    return xr.Dataset(flags, coords={"time": times.values.astype("datetime64[ns]")})


def done_flags(path: Path) -> np.ndarray:
    """The per-time done flags of a store as a bool array (read fresh from disk)."""
    return read_flags(path)["done"].values.astype(bool)


def store_slab_size(path: Path) -> int | None:
    """Times per shard file of a store's arrays (its slab size), or None for a store without shards."""
    try:
        meta = json.loads((as_location(path) / "done" / "zarr.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataContractError(f"analysis store {path}: cannot read done/zarr.json ({exc})") from exc
    if meta.get("codecs", [{}])[0].get("name") != "sharding_indexed":
        return None
    return int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])


def done_in(path: Path, where: slice) -> np.ndarray:
    """The done flags of one region only (a slab's writer must not read the whole store's flags)."""
    reader = chunk_writer(as_location(path) / "done")
    if reader is not None and where.stop <= reader.shape[0]:
        return reader.read(where.start, where.stop).astype(bool)  # a shard read: no Zarr event loop round trip
    return zarr.open_array(zarr_url(as_location(path) / "done"), mode="r")[where].astype(bool)


def missing_times(path: Path) -> pd.DatetimeIndex:
    """Times of the store that are not done (never written, or interrupted)."""
    flags = read_flags(path)
    return pd.DatetimeIndex(flags["time"].values[~flags["done"].values.astype(bool)])


def preliminary_times(path: Path) -> pd.DatetimeIndex:
    """Done times whose values are still preliminary (ERA5T, expver 5)."""
    flags = read_flags(path)
    prelim = flags["done"].values.astype(bool) & (flags["expver"].values == EXPVER_PRELIMINARY)
    return pd.DatetimeIndex(flags["time"].values[prelim])


def remove_partial_files(path: Path) -> int:
    """Delete chunk files a killed writer left half-written (``*.partial``); return how many."""
    path = as_location(path)
    if is_remote(path):  # Zarr writes each object with one PUT: an object store never holds half a file
        return 0
    count = 0
    for stray in path.rglob("*.partial"):
        stray.unlink()
        count += 1
    return count


def contiguous_runs(mask: np.ndarray) -> list[slice]:
    """The maximal runs of True in a 1-d mask, as slices."""
    edges = np.diff(np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]]))
    return [slice(int(a), int(b)) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True)]


def check_slab(store: xr.Dataset, slab: xr.Dataset, where: slice) -> None:
    """Refuse a slab whose times, grid, variables or levels do not fit the store region."""
    # Through ``.variables`` (no DataArray built per access): this runs once per slab, and the
    # DataArray route cost ~0.5 ms of a coarse slab's few milliseconds.
    have, mine = slab.variables, store.variables
    times = mine["time"].values[where]
    got = have["time"].values.astype("datetime64[ns]")
    if not np.array_equal(got, times):
        raise ValueError(f"slab times {got[[0, -1]] if got.size else got} do not match store region "
                         f"{times[[0, -1]] if times.size else where}")
    for dim in ("latitude", "longitude"):
        a, b = have[dim].values, mine[dim].values
        if slab.sizes.get(dim) != store.sizes[dim] or not (np.array_equal(a, b) or np.allclose(a, b)):
            raise ValueError(f"slab {dim} does not match the store's grid {store.attrs['grid']}")
    for name in store.data_vars:
        if name in FLAGS:
            continue
        if name not in slab.data_vars:
            raise ValueError(f"slab lacks variable {name!r}")
        if have[name].dims != mine[name].dims:
            raise ValueError(f"slab variable {name!r} has dims {have[name].dims}, store has {mine[name].dims}")
    extra = set(slab.data_vars) - set(store.data_vars)
    if extra:
        raise ValueError(f"slab has variables the store does not: {sorted(extra)}")
    if "level" in slab.dims and not np.array_equal(have["level"].values, mine["level"].values):
        raise ValueError(f"slab levels {have['level'].values.tolist()} != store levels {mine['level'].values.tolist()}")


def _sum(values: np.ndarray) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        return float(values.sum())


def slab_fields(store: xr.Dataset, slab: xr.Dataset, where: slice, expver: np.ndarray | None = None) -> xr.Dataset:
    """The slab's fields as float32 without coordinates (and ``expver`` if given), ready for a region write; NaN/Inf refused."""
    # Plain arrays, not xarray operations on the slab: those cost milliseconds per slab, which
    # was most of a slab write on coarse grids.
    have = slab.variables
    fields = {name: np.asarray(have[name].values, dtype=np.float32) for name in store.data_vars if name not in FLAGS}
    data = xr.Dataset({name: (have[name].dims, values) for name, values in fields.items()}
                      | ({} if expver is None else {"expver": ("time", expver)}))
    # A finite sum proves every value finite (NaN and ±Inf propagate) in one pass with no boolean
    # temporary; float32 sums run ~4× faster than float64, and one per variable on the writer
    # threads (numpy releases the GIL) uses every core. A non-finite sum may only be an overflow
    # of huge values, so the exact per-element test decides then.
    totals = dict(zip(fields, map_parallel(_sum, list(fields.values())), strict=True))
    for name, values in fields.items():
        if not np.isfinite(totals[name]) and not np.isfinite(values).all():
            bad = ~np.isfinite(values).reshape(values.shape[0], -1).all(axis=1)
            first = pd.Timestamp(slab["time"].values[bad][0])
            raise SourceError(f"slab {where.start}–{where.stop}: {name!r} has NaN or Inf "
                              f"(first at {first:%Y-%m-%dT%H}); not written")
    return data


def write_region(path: Path, data: xr.Dataset, where: slice) -> None:
    """Write a coordinate-free dataset into the store region ``where`` along time."""
    # Plain Zarr, not xarray's region writes: the store's arrays already carry every encoding, and
    # xarray re-opens and re-validates the whole store on each call (≈ 50× slower per slab).
    group = None
    tasks = []
    for name in data.data_vars:
        var = data.variables[name]
        values = np.asarray(var.values)
        fast = chunk_writer(as_location(path) / str(name))
        if fast is not None and var.dims[:1] == ("time",) and values.ndim == len(fast.shape):
            tasks += fast.tasks(where.start, values)  # every variable's files written side by side
            continue
        group = group or zarr.open_group(zarr_url(as_location(path)), mode="r+", use_consolidated=False)
        target = group[str(name)]
        if var.dims != tuple(target.metadata.dimension_names or ()):
            raise DataContractError(f"{path}: {name!r} has dims {var.dims}, store has {target.metadata.dimension_names}")
        target[where] = values.astype(target.dtype, copy=False)
    run_all(tasks)


def write_slab(path: Path, store: xr.Dataset, slab: xr.Dataset, start: int) -> int:
    """Write a slab's not-yet-done times into their region, then set their flags; return how many."""
    # Times already done are left alone (a partially done slab is completed, never rewritten), so
    # a final value is never overwritten here: replacing preliminary data is replace_slab's job.
    where = slice(start, start + slab.sizes["time"])
    check_slab(store, slab, where)
    n = slab.sizes["time"]
    expver = slab.variables["expver"].values.astype(np.int8) if "expver" in slab else np.zeros(n, np.int8)
    data = slab_fields(store, slab, where, expver)  # expver goes with the fields: only `done` must come after them
    done = done_in(path, where)
    runs = contiguous_runs(~done)
    done_flag = xr.Dataset({"done": ("time", np.ones(n, np.uint8))})
    whole = runs == [slice(0, n)]  # the usual case: no selection to make (≈ 0.3 ms each on xarray)
    for run in runs:
        write_region(path, data if whole else data.isel(time=run), slice(start + run.start, start + run.stop))
    # The done flag goes last, so that a kill before it leaves the times marked "to do".
    for run in runs:
        write_region(path, done_flag if whole else done_flag.isel(time=run), slice(start + run.start, start + run.stop))
    return int(sum(r.stop - r.start for r in runs))


def ensure_replaced_flag(path: Path) -> bool:
    """Add the ``replaced(time)`` flag to a store written before it existed; True if added."""
    path = as_location(path)
    if not (path / "zarr.json").is_file():
        return False
    group = zarr.open_group(zarr_url(path), mode="r+", use_consolidated=False)
    if "replaced" in group.array_keys():
        return False
    done = group["done"]
    group.create_array("replaced", shape=done.shape, chunks=done.chunks, dtype=np.uint8, fill_value=0,
                       compressors=done.compressors, dimension_names=("time",),
                       attributes={"long_name": "preliminary values replaced by final (1) or not (0)"})
    consolidate(path)
    return True
