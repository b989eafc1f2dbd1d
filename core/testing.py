"""Factories of small, contract-valid datasets for tests (WeatherBench ``mock_data`` style)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from core.grid import get_grid
from core.schema import EXPVER_FINAL, SCHEMA_VERSION, validate_analysis
from core.variables import get_variable


def analysis_dataset(
    grid: str = "tiny",
    start: str = "2000-01-01",
    periods: int = 8,
    variables: tuple[str, ...] = ("geopotential", "u_component_of_wind", "v_component_of_wind"),
    levels: tuple[int, ...] = (500,),
    step_hours: int = 6,
    seed: int = 0,
) -> xr.Dataset:
    """A small analysis dataset that passes :func:`validate_analysis`, with smooth random fields."""
    g = get_grid(grid)
    rng = np.random.default_rng(seed)
    times = pd.date_range(start, periods=periods, freq=f"{step_hours}h")
    lat, lon = np.deg2rad(g.latitudes), np.deg2rad(g.longitudes)
    base = np.cos(lat)[:, None] * np.cos(2 * lon)[None, :]
    data_vars = {}
    for name in variables:
        var = get_variable(name)
        lo, hi = var.valid_range
        centre, scale = (lo + hi) / 2, (hi - lo) / 20
        shape_lv = (len(levels),) if var.level_type == "pressure" else ()
        phase = rng.uniform(0, 2 * np.pi, size=(periods,) + shape_lv)
        field = centre + scale * np.cos(phase)[..., None, None] * base
        dims = ("time",) + (("level",) if shape_lv else ()) + ("latitude", "longitude")
        data_vars[name] = (dims, field.astype(np.float32), {"units": var.units, "long_name": var.long_name})
    ds = xr.Dataset(
        data_vars,
        coords={
            "time": times.values.astype("datetime64[ns]"),
            "level": np.asarray(levels, dtype=np.int32),
            "latitude": g.latitudes,
            "longitude": g.longitudes,
        },
        attrs={"schema_version": SCHEMA_VERSION, "grid": g.describe(), "source": "testing",
               "dataset_version": f"testing-{seed}"},
    )
    ds["done"] = ("time", np.ones(periods, dtype=np.uint8))
    ds["expver"] = ("time", np.full(periods, EXPVER_FINAL, dtype=np.int8))
    return validate_analysis(ds)
