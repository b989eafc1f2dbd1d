"""The per-format decoders behind ingest.delivered: classic NetCDF checked for truncation by SciPy's mapping."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.errors import SourceError
from ingest.decode_netcdf3 import check_extent
from ingest.delivered import open_delivered, sniff_format
from tests.ingest.cds_files import write_cds_netcdf

TIMES = pd.date_range("2024-03-31T12", periods=3, freq="6h")


@pytest.mark.parametrize("fmt", ["NETCDF3_CLASSIC", "NETCDF3_64BIT"])
@pytest.mark.parametrize("record", [True, False])
def test_every_cut_of_a_classic_file_is_refused_and_the_whole_file_opens(tmp_path: Path, fmt: str, record: bool) -> None:
    ds = xr.Dataset({"t2m": (("time", "latitude", "longitude"), np.linspace(250, 300, 3 * 7 * 12, dtype="f4").reshape(3, 7, 12),
                             {"units": "K"})},
                    coords={"time": TIMES, "latitude": np.linspace(90, -90, 7), "longitude": np.arange(0, 360, 30.0)})
    ds["expver"] = ("time", np.array([1, 1, 5], dtype=np.int32))
    whole = tmp_path / "whole.nc"
    ds.to_netcdf(whole, format=fmt, engine="netcdf4", unlimited_dims=["time"] if record else None)
    assert sniff_format(whole) == "netcdf3"
    check_extent(whole)
    opened = open_delivered(whole)
    np.testing.assert_array_equal(opened["2m_temperature"].values, ds["t2m"].values)
    assert opened["expver"].values.tolist() == [1, 1, 5]
    data = whole.read_bytes()
    # A single byte short already fails: netCDF-C alone would read the missing values as fill values.
    for cut in (1, 3, 4, 100, len(data) // 2, len(data) - 40):
        short = tmp_path / f"cut{cut}.nc"
        short.write_bytes(data[: len(data) - cut])
        with pytest.raises(SourceError, match=rf"cut{cut}\.nc.*truncated or has a corrupt header"):
            open_delivered(short)


def test_a_cds_legacy_delivery_passes_and_cdf5_is_refused_with_its_reason(tmp_path: Path) -> None:
    legacy = write_cds_netcdf(tmp_path / "legacy.nc", TIMES, ["temperature"], [500], grid_deg=3.0, legacy=True)
    before = hashlib.sha256(legacy.read_bytes()).hexdigest()
    assert open_delivered(legacy)["temperature"].shape == (3, 1, 61, 120)
    assert hashlib.sha256(legacy.read_bytes()).hexdigest() == before  # read-only: nothing written beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy.nc"]
    cdf5 = tmp_path / "cdf5.nc"
    xr.open_dataset(legacy).load().to_netcdf(cdf5, format="NETCDF3_64BIT_DATA", engine="netcdf4")
    with pytest.raises(SourceError, match=r"cdf5\.nc.*CDF-5 .*nccopy -k nc4"):
        open_delivered(cdf5)
