"""The analysis store writer: pre-allocate, region-write per slab, then mark the slab done.

Pattern from xarray's "distributed writes" guide: the whole period's metadata is written once
from a lazy template (``compute=False``), then each slab of times is written into its fixed
region. A slab's ``done`` flags are set only after its data is on disk, so a killed run resumes
by rewriting exactly the times without flags, and the result is byte-identical to an
uninterrupted build. ``to_zarr(append_dim=…)`` is never used: it rewrites metadata as it goes;
a longer period is made by :func:`ingest.append.extend_store`, which only grows array shapes.

Every field and flag chunk is compressed with zstd (or not) and ends with a crc32c checksum, so a
flipped bit fails to decode instead of becoming a wrong value. This module is the package's
facade: the low-level reads/writes (``ingest.regions``), the append (``ingest.append``), the
ERA5T replacement (``ingest.append``) and the lock (``ingest.lock``) are re-exported here.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from zarr.codecs import Crc32cCodec, ZstdCodec

from core.errors import ConfigError, DataContractError
from core.grid import Grid
from core.location import as_location, is_remote, remove_tree, upload_tree
from core.schema import SCHEMA_VERSION, validate_analysis
from core.variables import get_variable
from ingest.append import (
    complete_pending_append,
    extend_store,
    intent_path,
    replace_preliminary,
    replace_slab,
    store_lock,
)
from ingest.lock import StoreLockedError, lock_holder, lock_path
from ingest.regions import (
    FLAGS,
    consolidate,
    contiguous_runs,
    done_flags,
    missing_times,
    open_store,
    preliminary_times,
    read_flags,
    remove_partial_files,
    store_exists,
    store_slab_size,
    write_slab,
)

__all__ = [
    "DEFAULT_SLAB", "FLAGS", "TIME_CHUNK", "BuildReport", "StoreLayout", "StoreLockedError", "build_store", "check_layout",
    "complete_pending_append", "consolidate", "contiguous_runs", "create_store", "done_flags", "extend_store",
    "intent_path", "lock_holder", "lock_path", "missing_times", "open_store", "preliminary_times", "read_flags",
    "remove_partial_files", "replace_preliminary", "replace_slab", "slabs_to_do", "store_exists", "store_lock",
    "store_slab_size",
    "write_slab",
]

log = logging.getLogger(__name__)

# Times per chunk of the `time` coordinate (~11 years at 6 h): an append rewrites only its last chunk.
TIME_CHUNK = 16384
DEFAULT_SLAB = 4  # times per slab and per shard file when the caller does not say


@dataclass(frozen=True)
class StoreLayout:
    """What a store holds: grid, variables, levels, period and the producing source."""

    grid: Grid
    variables: tuple[str, ...]
    levels: tuple[int, ...]
    times: pd.DatetimeIndex
    source: str
    dataset_version: str


def _template(layout: StoreLayout, slab_size: int) -> xr.Dataset:
    g, nt = layout.grid, len(layout.times)
    per = max(1, min(slab_size, nt))  # dask chunks of the lazy template: aligned with the shards
    data_vars = {}
    for name in layout.variables:
        var = get_variable(name)
        if var.level_type == "pressure":
            dims = ("time", "level", "latitude", "longitude")
            shape = (nt, len(layout.levels), g.nlat, g.nlon)
        else:
            dims = ("time", "latitude", "longitude")
            shape = (nt, g.nlat, g.nlon)
        lazy = da.zeros(shape, dtype=np.float32, chunks=(per,) + shape[1:])
        data_vars[name] = (dims, lazy, {"units": var.units, "long_name": var.long_name})
    data_vars["done"] = (("time",), da.zeros(nt, dtype=np.uint8, chunks=per),
                         {"long_name": "slab written completely (1) or not (0)"})
    data_vars["expver"] = (("time",), da.zeros(nt, dtype=np.int8, chunks=per),
                           {"long_name": "ERA5 experiment version", "flag_values": [0, 1, 5],
                            "flag_meanings": "unknown final preliminary"})
    data_vars["replaced"] = (("time",), da.zeros(nt, dtype=np.uint8, chunks=per),
                             {"long_name": "preliminary values replaced by final (1) or not (0)"})
    coords = {
        "time": ("time", layout.times.values.astype("datetime64[ns]"), {"standard_name": "time"}),
        "level": ("level", np.asarray(layout.levels, dtype=np.int32), {"units": "hPa", "long_name": "pressure level"}),
        "latitude": ("latitude", g.latitudes, {"units": "degrees_north", "standard_name": "latitude"}),
        "longitude": ("longitude", g.longitudes, {"units": "degrees_east", "standard_name": "longitude"}),
    }
    attrs = {"schema_version": SCHEMA_VERSION, "grid": g.describe(), "source": layout.source,
             "dataset_version": layout.dataset_version, "Conventions": "CF-1.8"}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def chunk_codecs(compression: Literal["zstd", "none"] = "zstd", checksum: bool = True) -> list:
    """The bytes-to-bytes codecs of field and flag chunks: zstd (or none), then a crc32c checksum."""
    if compression not in ("zstd", "none"):
        raise ConfigError(f"compression {compression!r} is not 'zstd' or 'none'")
    codecs: list = [ZstdCodec(level=3)] if compression == "zstd" else []
    return codecs + ([Crc32cCodec()] if checksum else [])


def create_store(path: Path, layout: StoreLayout, *, slab_size: int = DEFAULT_SLAB,
                 compression: Literal["zstd", "none"] = "zstd", checksum: bool = True) -> None:
    """Pre-allocate an empty store for the layout's whole period (metadata only, atomically)."""
    path = as_location(path)
    if store_exists(path):
        raise ConfigError(f"store {path} already exists")
    if slab_size < 1:
        raise ValueError(f"slab_size {slab_size} must be ≥ 1")
    codecs = chunk_codecs(compression, checksum)
    ds = _template(layout, slab_size)
    validate_analysis(ds, what=f"template for {path}")
    # One time per chunk (a reader fetches a single time), one slab of times per shard file (a
    # slab write is one file per variable: per-file cost dominated writes with a file per time).
    # "c.<k>.0.0" keys: one flat directory per array. Nested "c/<k>/0/0" keys cost a chain of
    # mkdir calls per file, which measured ≈ 2 ms per file here — more than writing a chunk.
    flat = {"name": "default", "separator": "."}

    def sharded(var: xr.DataArray, fill: float) -> dict:
        rest = tuple(var.shape[1:])
        return {"fill_value": fill, "compressors": codecs, "chunk_key_encoding": flat, "chunks": (1, *rest),
                "shards": (slab_size, *rest)}

    encoding = {name: sharded(ds[name], np.nan) for name in layout.variables}
    encoding.update({flag: sharded(ds[flag], 0) for flag in FLAGS})
    encoding["time"] = {"units": "hours since 1900-01-01", "calendar": "proleptic_gregorian", "dtype": "int64",
                        "chunks": (TIME_CHUNK,)}
    if is_remote(path):
        # No rename on an object store: the metadata (a few kB, no chunks yet) is built in a local
        # directory and uploaded with the root zarr.json last, so a reader sees no store or a whole one;
        # what a killed upload left (no root zarr.json) is not a store and is replaced here.
        with tempfile.TemporaryDirectory(prefix="spherecast-create-") as local:
            built = Path(local) / path.name
            ds.to_zarr(built, mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding)
            consolidate(built)
            remove_tree(path)
            upload_tree(built, path, last="zarr.json")
        return
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_zarr(tmp, mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding)
    consolidate(tmp)
    os.rename(tmp, path)  # a reader sees no store or a whole pre-allocated one


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
    """Slabs that were not done and have been written."""
    skipped: int
    """Slabs already done."""
    total: int
    rechecked: int = 0
    """Slabs whose preliminary (ERA5T) times were fetched again."""
    replaced: int = 0
    """Preliminary times replaced by final ERA5."""


def _period_mismatch(have: pd.DatetimeIndex, want: pd.DatetimeIndex) -> str | None:
    """Why the stored period is not a prefix of the requested one (None if it is)."""
    if have.size <= want.size and have.equals(want[: have.size]):
        return None
    if have[0] != want[0]:
        why = f"start {have[0]} != {want[0]}"
    elif min(have.size, want.size) > 1 and have[1] - have[0] != want[1] - want[0]:
        why = f"step {have[1] - have[0]} != {want[1] - want[0]}"
    elif have.size > want.size:
        why = f"store ends at {have[-1]}, after the requested end {want[-1]}"
    else:
        why = "the times differ"
    return (f"period {have[0]}..{have[-1]} ({have.size} times) is not a prefix of the requested "
            f"{want[0]}..{want[-1]} ({want.size} times): {why}")


def check_layout(store: xr.Dataset, layout: StoreLayout, path: Path) -> int:
    """Refuse a store that differs from the request except by a shorter period; return times to append."""
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
    mismatch = _period_mismatch(pd.DatetimeIndex(store["time"].values), pd.DatetimeIndex(layout.times))
    if mismatch:
        problems.append(mismatch)
    if problems:
        raise DataContractError(f"store {path} does not match the request; nothing was modified: " + "; ".join(problems))
    return int(len(layout.times) - store.sizes["time"])


def build_store(path: Path, layout: StoreLayout,
                fetch: Callable[[Sequence[pd.Timestamp]], xr.Dataset],
                slab_size: int, progress: Callable[[int, int], None] | None = None, *,
                compression: Literal["zstd", "none"] = "zstd", checksum: bool = True) -> BuildReport:
    """Create, resume or extend a store from a fetch callable, in this process, through the one ingest path."""
    # A test helper: the same orchestration as ``ingest.build.ingest`` (lock, plan, create, slabs, consolidate),
    # with the fetch run inline instead of a source rebuilt from a config on a worker.
    from ingest.orchestrate import StoreRequest, plan_store, run_slabs, write_missing
    from ingest.parallel import SlabExecutor

    path = as_location(path)
    request = StoreRequest(path, layout, slab_size, compression, checksum)
    opened: list[xr.Dataset] = []

    def job(start: int, stop: int, replace: bool) -> dict:
        if not opened:  # the store exists once the session has begun
            opened.append(open_store(path))
        write_missing(path, opened[0], fetch, start, stop)
        return {"replaced": 0}

    plan, _ = run_slabs(path, lambda: plan_store(request), SlabExecutor(None), job,
                        lambda s, replace: (s.start, s.stop, replace), progress)
    n_slabs = -(-len(plan.layout.times) // plan.slab_size)
    return BuildReport(path, len(plan.todo), n_slabs - len(plan.todo), n_slabs)
