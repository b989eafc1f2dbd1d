"""Pick the initial state of a forecast cycle: which store, which time, from which source.

Two stores follow the analysis contract: the ERA5 analysis (training and verification truth, days
behind real time) and the live initial-conditions store (e.g. ECMWF open data, hours behind). A
time counts only once its ``done`` flag is set; completeness is never inferred from values.
``forecast.source`` restricts the choice; ``auto`` takes the store with the newest complete time
and prefers the initial conditions when both hold it.

Stores are opened lazily (xarray, no dask, no consolidated metadata): only ``time``, ``done`` and
the root attributes are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from core.config import Config
from core.errors import DataContractError, MissingInputError
from core.grid import parse_grid_attr
from core.location import as_location, exists, zarr_url
from core.variables import parse_channel

ANALYSIS = "analysis"
INITIAL_CONDITIONS = "initial_conditions"


@dataclass(frozen=True)
class InitChoice:
    """The initial state of a run: the store it is read from, its time, and the store's labels."""

    store: Path
    init_time: pd.Timestamp
    source: str
    """The store's ``source`` root attribute (e.g. ``era5``, ``opendata``, ``synthetic``)."""
    dataset_version: str
    """The store's ``dataset_version`` root attribute."""
    kind: str = ANALYSIS
    """Which configured store: ``analysis`` or ``initial_conditions``."""

    def provenance(self) -> dict[str, str]:
        """The choice as manifest provenance fields."""
        return {"init_store": str(self.store), "init_store_kind": self.kind, "init_source": self.source,
                "init_dataset_version": self.dataset_version, "cycle": self.init_time.isoformat()}


@dataclass(frozen=True)
class _StoreTimes:
    kind: str
    path: Path
    complete: pd.DatetimeIndex
    source: str
    dataset_version: str


def candidate_stores(config: Config) -> list[tuple[str, Path]]:
    """The stores ``forecast.source`` allows, in tie-break order (initial conditions first)."""
    both = [(INITIAL_CONDITIONS, config.paths.initial_conditions_store), (ANALYSIS, config.paths.analysis_store)]
    wanted = config.forecast.source
    return [(k, p) for k, p in both if wanted == "auto" or wanted == k]


def complete_times(store: Path) -> pd.DatetimeIndex:
    """Times of a store whose ``done`` flag is set (empty if the store does not exist)."""
    return _read(ANALYSIS, as_location(store)).complete if exists(as_location(store)) else pd.DatetimeIndex([])


def _read(kind: str, path: Path) -> _StoreTimes:
    with xr.open_zarr(zarr_url(as_location(path)), consolidated=False, chunks=None) as ds:
        if "time" not in ds.coords or "done" not in ds:
            raise DataContractError(f"store {path} has no 'time' coordinate or 'done' flags; it is not an analysis-contract store")
        times = pd.DatetimeIndex(ds["time"].values)
        done = np.asarray(ds["done"].values).astype(bool)
        attrs = dict(ds.attrs)
    return _StoreTimes(kind, path, times[done], str(attrs.get("source", "unknown")),
                       str(attrs.get("dataset_version", "unknown")))


def _existing(config: Config) -> list[_StoreTimes]:
    return [_read(kind, path) for kind, path in candidate_stores(config) if path.exists()]


def _describe(config: Config) -> str:
    return " and ".join(f"{kind} store {path}" for kind, path in candidate_stores(config))


def latest_cycle(config: Config) -> InitChoice:
    """The newest complete time across the allowed stores (initial conditions win a tie)."""
    best: _StoreTimes | None = None
    for st in _existing(config):  # tie-break order: the first store holding the newest time wins
        if len(st.complete) and (best is None or st.complete[-1] > best.complete[-1]):
            best = st
    if best is None:
        raise MissingInputError(f"no complete time in {_describe(config)} (forecast.source {config.forecast.source!r})")
    t = best.complete[-1]
    return InitChoice(best.path, pd.Timestamp(t), best.source, best.dataset_version, best.kind)


def choose_init(config: Config, init_time: datetime | pd.Timestamp | str) -> InitChoice:
    """The store holding ``init_time`` complete (initial conditions first); ``ValueError`` if none does."""
    t = pd.Timestamp(init_time)
    if t.tzinfo is not None:
        t = t.tz_convert("UTC").tz_localize(None)
    for st in _existing(config):
        if t in st.complete:
            return InitChoice(st.path, t, st.source, st.dataset_version, st.kind)
    raise MissingInputError(f"init time {t.isoformat()} has no complete data in {_describe(config)}")


def check_compatible(meta: Mapping[str, Any], ds: xr.Dataset, store: Path, transfer_grid: str | None = None) -> None:
    """Refuse a checkpoint whose channels the store lacks, or whose grid differs without ``forecast.grid``."""
    missing = []
    for ch in meta["channels"]:
        name, level = parse_channel(ch)
        if name not in ds.data_vars or (level is not None and ("level" not in ds.coords
                                                               or level not in ds["level"].values)):
            missing.append(ch)
    if missing:
        raise DataContractError(f"checkpoint is incompatible with the initial conditions in {store}: the store lacks "
                                f"channel(s) {missing} the model needs")
    if transfer_grid is None:
        shape = (ds.sizes.get("latitude"), ds.sizes.get("longitude"))
        trained = parse_grid_attr(str(meta["grid"]))
        if shape != trained.shape:
            raise DataContractError(f"checkpoint is incompatible with the initial conditions in {store}: the model was "
                                    f"trained on {trained.name} ({trained.nlat}x{trained.nlon}) but the store's grid is "
                                    f"{shape[0]}x{shape[1]}; set forecast.grid to run the same weights on another grid")
