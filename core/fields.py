"""Conversion between contract datasets (ERA5 names, ``level`` dim) and channel stacks.

Models see a ``channel`` axis (``geopotential_500``, ``2m_temperature`` …); files keep the
contract layout. These two functions are the only bridge, so channel order is decided once.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from core.errors import DataContractError
from core.variables import get_variable, parse_channel


def to_channels(ds: xr.Dataset, channels: list[str]) -> xr.DataArray:
    """Stack the requested channels of ``ds`` into one array with a ``channel`` dim before lat/lon."""
    parts = []
    for ch in channels:
        name, level = parse_channel(ch)
        if name not in ds.data_vars:
            raise DataContractError(f"dataset has no variable {name!r} (needed for channel {ch!r})")
        da = ds[name]
        if level is not None:
            if "level" not in da.dims or level not in ds["level"].values:
                raise DataContractError(f"dataset has no level {level} for {name!r} (needed for channel {ch!r})")
            da = da.sel(level=level, drop=True)
        parts.append(da.drop_attrs() if hasattr(da, "drop_attrs") else da)
    out = xr.concat(parts, dim="channel", coords="minimal", compat="override")
    out = out.assign_coords(channel=np.asarray(channels, dtype=object))
    order = [d for d in out.dims if d not in ("channel", "latitude", "longitude")]
    return out.transpose(*order, "channel", "latitude", "longitude")


def from_channels(arr: xr.DataArray, channels: list[str]) -> xr.Dataset:
    """Inverse of :func:`to_channels`: one float32 variable per name, with ``level`` where needed."""
    grouped: dict[str, dict[int | None, xr.DataArray]] = {}
    for ch in channels:
        name, level = parse_channel(ch)
        grouped.setdefault(name, {})[level] = arr.sel(channel=ch, drop=True)
    data_vars = {}
    for name, by_level in grouped.items():
        var = get_variable(name)
        if var.level_type == "pressure":
            levels = sorted(by_level)  # type: ignore[type-var]
            da = xr.concat([by_level[lv] for lv in levels], dim="level")
            da = da.assign_coords(level=np.asarray(levels, dtype=np.int32))
            lead = [d for d in da.dims if d not in ("level", "latitude", "longitude")]
            da = da.transpose(*lead, "level", "latitude", "longitude")
        else:
            da = by_level[None]
        da = da.astype(np.float32)
        da.attrs = {"units": var.units, "long_name": var.long_name}
        data_vars[name] = da
    return xr.Dataset(data_vars)
