"""FileSource: ERA5 files already on disk, as CDS delivers them, served as analysis slabs.

``paths`` are directories (searched recursively for ``*.grib``, ``*.grb``, ``*.grib2``, ``*.grb2``,
``*.nc`` and CDS ``*.zip`` deliveries; hidden files are skipped), glob patterns (``**`` allowed) or
single files. On first use every file is described once — GRIB from its message headers, NetCDF
from its coordinates (:func:`ingest.delivered.describe_delivered`) — into an index
(variable, level) → times, and the files are checked to be global and on one grid. ``fetch``
then decodes only the files holding the requested times, merges them (final ERA5 wins over
ERA5T where both are present), selects, regrids conservatively onto the store's grid and
returns the loaded slab. Ensemble files contribute their first member (see :mod:`ingest.delivered`).

``dataset_version`` deliberately ignores which files exist: appending a month adds files but
must not change the version of the store being appended to. It changes with the grid and with
:data:`FORMAT_VERSION` (bumped whenever decoding or regridding would give different values).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from core.errors import ConfigError, SourceError
from core.grid import Grid
from core.variables import check_level, get_variable
from ingest.delivered import Delivery, decode_many, describe_delivered
from ingest.regrid import check_global, regrid

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".grib", ".grb", ".grib2", ".grb2", ".nc", ".zip")
FORMAT_VERSION = "1"
_SHOW = 3  # missing items named in an error before "… and N more"


def _stamp(t: np.datetime64) -> str:
    return pd.Timestamp(t).strftime("%Y-%m-%dT%H")


def _field_label(variable: str, level: int | None) -> str:
    return variable if level is None else f"{variable} at {level} hPa"


class FileSource:
    """ERA5 deliveries on disk (GRIB, NetCDF, zip) as a :class:`ingest.sources.Source`."""

    name = "era5-files"

    def __init__(self, paths: Sequence[str], grid: Grid) -> None:
        if isinstance(paths, str | Path):
            paths = [str(paths)]
        if not paths:
            raise ConfigError("FileSource needs at least one directory, file or glob pattern")
        self.paths = [str(p) for p in paths]
        self.grid = grid
        self._index: list[Delivery] | None = None

    def dataset_version(self) -> str:
        """Source name, grid and decoder version hashed; independent of which files or period exist."""
        blob = json.dumps({"source": self.name, "grid": self.grid.describe(), "format": FORMAT_VERSION},
                          sort_keys=True)
        return f"era5-files-{self.grid.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def files(self) -> list[Path]:
        """The delivery files the paths currently match, sorted; ``ValueError`` naming the paths if none."""
        found: dict[Path, None] = {}
        for pattern in self.paths:
            expanded = str(Path(pattern).expanduser())
            if Path(expanded).is_dir():
                hits = [p for p in Path(expanded).rglob("*") if p.suffix.lower() in FILE_SUFFIXES]
            elif glob.has_magic(expanded):
                hits = [Path(p) for p in glob.glob(expanded, recursive=True)]
            else:
                hits = [Path(expanded)] if Path(expanded).exists() else []
            hits = [p for p in hits if p.is_file() and not p.name.startswith(".")]
            if not hits:
                log.warning("FileSource: %r matches no delivery files", pattern)
            found.update((p.resolve(), None) for p in sorted(hits))
        if not found:
            raise ConfigError(f"no ERA5 files match {self.paths} (directories are searched for "
                              f"{', '.join(FILE_SUFFIXES)})")
        return sorted(found)

    def refresh(self) -> None:
        """Forget the index so the next call rescans the paths (e.g. after new deliveries arrived)."""
        self._index = None

    def _scan(self) -> list[Delivery]:
        if self._index is not None:
            return self._index
        index: list[Delivery] = []
        for path in self.files():
            info = describe_delivered(path)
            check_global(info.latitude, info.longitude, f"ERA5 file {str(path)!r}")
            if index:
                ref = index[0]
                same = (info.latitude.shape == ref.latitude.shape and info.longitude.shape == ref.longitude.shape
                        and np.allclose(info.latitude, ref.latitude) and np.allclose(info.longitude, ref.longitude))
                if not same:
                    raise SourceError(
                        f"ERA5 files {str(ref.path)!r} ({ref.latitude.size}x{ref.longitude.size}) and "
                        f"{str(path)!r} ({info.latitude.size}x{info.longitude.size}) are on different grids")
            index.append(info)
        log.info("FileSource indexed %d files under %s", len(index), self.paths)
        self._index = index
        return index

    def _coverage(self, variable: str, level: int | None) -> set[np.datetime64]:
        covered: set[np.datetime64] = set()
        for info in self._scan():
            covered |= info.fields.get((variable, level), set())
        return covered

    @staticmethod
    def _fields(variables: Sequence[str], levels: Sequence[int]) -> list[tuple[str, int | None]]:
        out: list[tuple[str, int | None]] = []
        for name in variables:
            if get_variable(name).level_type == "pressure":
                if not levels:
                    raise ValueError(f"pressure-level variable {name!r} requested without levels")
                out.extend((name, check_level(lv)) for lv in levels)
            else:
                out.append((name, None))
        return out

    def available_times(self, variables: Sequence[str], levels: Sequence[int]) -> pd.DatetimeIndex:
        """Times at which every requested variable (at every requested level) is in some file."""
        fields = self._fields(variables, levels)
        common = set.intersection(*(self._coverage(v, lv) for v, lv in fields)) if fields else set()
        return pd.DatetimeIndex(sorted(common), name="time")

    def _check_covered(self, wanted: set[np.datetime64], fields: list[tuple[str, int | None]]) -> None:
        for variable, level in fields:
            missing = sorted(wanted - self._coverage(variable, level))
            if missing:
                more = f" (and {len(missing) - 1} more times)" if len(missing) > 1 else ""
                raise SourceError(f"time {_stamp(missing[0])}{more} is in none of the files under {self.paths} "
                                  f"for {_field_label(variable, level)}")

    def validate(self, times: Sequence[pd.Timestamp], variables: Sequence[str], levels: Sequence[int]) -> None:
        """Read every file's header (corrupt, truncated, regional, mixed grids, unknown variables) and check
        that the files hold every one of ``times``; raise naming the first problem. Reads no field values."""
        stamps = pd.DatetimeIndex([pd.Timestamp(t) for t in times]).as_unit("ns")
        self._scan()
        self._check_covered(set(stamps.values), self._fields(variables, levels))

    def fetch(self, times: Sequence[pd.Timestamp], variables: Sequence[str], levels: Sequence[int]) -> xr.Dataset:
        """Decode, merge, select and regrid the requested slab from the files holding it."""
        fields = self._fields(variables, levels)
        stamps = pd.DatetimeIndex([pd.Timestamp(t) for t in times]).as_unit("ns")
        if stamps.has_duplicates or len(stamps) == 0:
            raise ValueError(f"times must be non-empty and distinct, got {list(map(str, stamps))}")
        wanted = set(stamps.values)
        self._check_covered(wanted, fields)
        names = list(dict.fromkeys(v for v, _ in fields))
        needed = [info.path for info in self._scan()
                  if any(v in names and times_ & wanted for (v, _), times_ in info.fields.items())]
        log.debug("FileSource.fetch %d times from %d files", len(stamps), len(needed))
        slab = decode_many(needed, variables=names).sel(time=stamps.values)
        out = {}
        level_values = sorted({lv for _, lv in fields if lv is not None}, key=list(levels).index)
        for name in names:
            da = slab[name]
            out[name] = da.sel(level=level_values) if "level" in da.dims else da
        ds = xr.Dataset(out)
        if not level_values:
            ds = ds.drop_vars("level", errors="ignore")
        ds = regrid(ds, self.grid)
        try:
            ds = ds.load(scheduler="threads")
        except Exception as exc:  # a damaged chunk inside an otherwise readable file
            raise SourceError(f"reading {[str(p) for p in needed]} failed ({type(exc).__name__}: {exc})") from exc
        ds["expver"] = ("time", np.asarray(slab["expver"].values, dtype=np.int8))
        if level_values:
            ds = ds.assign_coords(level=np.asarray(level_values, dtype=np.int32))
        ds.attrs = {"source": self.name, "dataset_version": self.dataset_version()}
        return ds
