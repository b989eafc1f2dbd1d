"""CdsSource with the real cdsapi client against the CDS-protocol server, both protocols and formats."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.config import CdsConfig
from core.grid import get_grid
from core.schema import EXPVER_FINAL, EXPVER_PRELIMINARY
from core.variables import VARIABLES
from ingest.cds import CdsSource
from ingest.plan import plan_requests
from ingest.regrid import regrid
from tests.ingest.cds_files import cds_field, cds_grid
from tests.ingest.cds_server import CdsServer, serve_cds

GRID = get_grid("tiny")
TIMES = pd.date_range("2000-01-01T00", "2000-01-02T18", freq="6h")  # 2 days, 8 times
PRESSURE = ["geopotential", "temperature"]
LEVELS = [500, 850]
SINGLE = "2m_temperature"
FAST = {"retry_max": 2, "sleep_max": 0.1, "timeout": 5.0}


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[CdsServer]:
    yield from serve_cds(tmp_path_factory, monkeypatch)


def make_source(tmp_path: Path, **settings: object) -> CdsSource:
    return CdsSource(GRID, CdsConfig(**{**FAST, **settings}), tmp_path / "downloads")


def use_api(server: CdsServer, monkeypatch: pytest.MonkeyPatch, api: str) -> None:
    for key, value in server.env(api).items():
        monkeypatch.setenv(key, value)


def files_in(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def oracle(times, variables, levels, grid_deg: float = 1.0, seed: int = 0) -> xr.Dataset:
    """The factory's fields on its native grid in contract names, regridded to the test grid."""
    lat, lon = cds_grid(grid_deg)
    data = {}
    for name in variables:
        if VARIABLES[name].level_type == "pressure":
            cube = np.stack([np.stack([cds_field(name, lv, t, lat, lon, seed) for lv in levels]) for t in times])
            data[name] = (("time", "level", "latitude", "longitude"), cube)
        else:
            data[name] = (("time", "latitude", "longitude"), np.stack([cds_field(name, None, t, lat, lon, seed)
                                                                        for t in times]))
    coords = {"time": pd.DatetimeIndex(times).values, "latitude": lat, "longitude": lon}
    if any(VARIABLES[n].level_type == "pressure" for n in variables):
        coords["level"] = np.asarray(levels)
    return regrid(xr.Dataset(data, coords=coords), GRID)


def assert_matches_factory(got: xr.Dataset, variables, levels, times=TIMES) -> None:
    want = oracle(times, variables, levels)
    for name in variables:
        # GRIB and legacy NetCDF are 16-bit packed over the field's (or the variable's valid) range.
        lo, hi = VARIABLES[name].valid_range
        atol = (hi - lo) / 65532.0
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize(("api", "fmt"), [("new", "netcdf"), ("new", "grib"), ("legacy", "netcdf"), ("legacy", "grib")])
def test_fetch_returns_the_contract_slab_and_sends_the_planned_requests(
        server: CdsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str, fmt: str) -> None:
    use_api(server, monkeypatch, api)
    server.set_era5t(TIMES[5])  # the last two times are still ERA5T
    source = make_source(tmp_path, data_format=fmt)
    variables = PRESSURE + [SINGLE]
    slab = source.fetch(list(TIMES), variables, LEVELS)

    assert set(slab.data_vars) == set(variables) | {"expver"}
    assert slab["geopotential"].dims == ("time", "level", "latitude", "longitude")
    assert slab["geopotential"].shape == (8, 2, 17, 32) and slab[SINGLE].shape == (8, 17, 32)
    assert slab["level"].values.tolist() == LEVELS
    np.testing.assert_allclose(slab["latitude"].values, GRID.latitudes)
    np.testing.assert_allclose(slab["longitude"].values, GRID.longitudes)
    assert pd.DatetimeIndex(slab["time"].values).equals(TIMES)
    for name in variables:
        assert slab[name].dtype == np.float32
        assert slab[name].attrs["units"] == VARIABLES[name].units
        assert slab[name].attrs["long_name"] == VARIABLES[name].long_name
    assert slab["expver"].dtype == np.int8
    assert slab["expver"].values.tolist() == [EXPVER_FINAL] * 6 + [EXPVER_PRELIMINARY] * 2
    assert_matches_factory(slab, variables, LEVELS)

    plan = plan_requests(list(TIMES), variables, LEVELS, source.settings.max_fields_per_request, fmt)
    assert server.submissions(api) == [(r.dataset, r.request) for r in plan]
    assert {c.api for c in server.calls("submit")} == {api}
    # keep_downloads is off: the deliveries stay until the caller has written the result, then go.
    assert len(files_in(source.download_dir)) == 2 * len(plan)
    source.release()
    assert files_in(source.download_dir) == []


def test_completed_downloads_are_reused_and_a_damaged_one_is_fetched_again(
        server: CdsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = make_source(tmp_path, keep_downloads=True)
    first = source.fetch(list(TIMES), PRESSURE + [SINGLE], LEVELS)
    plan = plan_requests(list(TIMES), PRESSURE + [SINGLE], LEVELS, source.settings.max_fields_per_request, "netcdf")
    assert files_in(source.download_dir) == sorted(n for r in plan for n in (f"{r.key}.nc", f"{r.key}.json"))
    assert len(server.submissions()) == 2

    # A resumed ingest needs no credentials and no server when everything is on disk.
    monkeypatch.delenv("CDSAPI_KEY")
    again = source.fetch(list(TIMES), PRESSURE + [SINGLE], LEVELS)
    xr.testing.assert_identical(first, again)
    assert len(server.submissions()) == 2

    # A delivery whose size no longer matches its sidecar is not trusted: only that one is re-fetched.
    monkeypatch.setenv("CDSAPI_KEY", server.key_new)
    damaged = source.final_path(plan[1])
    damaged.write_bytes(damaged.read_bytes()[:100])
    third = source.fetch(list(TIMES), PRESSURE + [SINGLE], LEVELS)
    xr.testing.assert_identical(first, third)
    assert server.submissions()[2:] == [(plan[1].dataset, plan[1].request)]


@pytest.mark.parametrize("api", ["new", "legacy"])
@pytest.mark.parametrize("status", ["500", "429"])
def test_a_transient_http_error_is_retried_and_the_fetch_succeeds(
        server: CdsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str, status: str) -> None:
    use_api(server, monkeypatch, api)
    # Retry-After of an hour: the client must wait its own bounded sleep_max, not the server's hint.
    server.faults.push(status, route="submit", retry_after=3600)
    started = time.monotonic()
    slab = make_source(tmp_path).fetch(list(TIMES[:2]), [SINGLE], [])
    assert time.monotonic() - started < 30
    assert [c.status for c in server.calls("submit")] == [int(status), 202 if api == "legacy" else 201]
    assert_matches_factory(slab, [SINGLE], [], TIMES[:2])


@pytest.mark.parametrize(("api", "kind"), [("new", "rejected"), ("new", "failed"), ("new", "dismissed"),
                                           ("legacy", "failed"), ("legacy", "rejected")])
def test_a_failed_job_raises_the_servers_message_and_publishes_nothing(
        server: CdsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str, kind: str) -> None:
    use_api(server, monkeypatch, api)
    message = f"Request too large ({kind}); please split it"
    server.faults.push(kind, message=message)
    source = make_source(tmp_path)
    expected = "API state 'dismissed'" if kind == "dismissed" else r"Request too large \(" + kind
    with pytest.raises(ValueError, match=r"CDS request reanalysis-era5-pressure-levels .*" + expected):
        source.fetch(list(TIMES), PRESSURE + [SINGLE], LEVELS)
    assert files_in(source.download_dir) == []
    assert server.calls("download") == []


def test_a_short_download_is_retried_and_never_published(server: CdsServer, tmp_path: Path) -> None:
    server.faults.push("short", nbytes=1000)
    source = make_source(tmp_path, keep_downloads=True)
    slab = source.fetch(list(TIMES[:2]), [SINGLE], [])
    assert len(server.calls("download")) == 2 and len(server.submissions()) == 1
    (req,) = plan_requests(list(TIMES[:2]), [SINGLE], [], 10**6, "netcdf")
    assert files_in(source.download_dir) == [f"{req.key}.json", f"{req.key}.nc"]
    assert source.is_complete(req)
    assert_matches_factory(slab, [SINGLE], [], TIMES[:2])


def test_an_undecodable_delivery_is_not_trusted_on_the_next_attempt(server: CdsServer, tmp_path: Path) -> None:
    server.faults.push("corrupt")
    source = make_source(tmp_path)
    (req,) = plan_requests(list(TIMES[:2]), [SINGLE], [], 10**6, "netcdf")
    with pytest.raises(ValueError, match=req.key):
        source.fetch(list(TIMES[:2]), [SINGLE], [])
    assert not source.is_complete(req)  # bytes kept for inspection, sidecar gone
    slab = source.fetch(list(TIMES[:2]), [SINGLE], [])
    assert len(server.submissions()) == 2
    assert_matches_factory(slab, [SINGLE], [], TIMES[:2])


@pytest.mark.parametrize("api", ["new", "legacy"])
def test_a_download_always_longer_than_announced_fails_without_a_file(
        server: CdsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str) -> None:
    use_api(server, monkeypatch, api)
    server.faults.push("long", times=None)
    source = make_source(tmp_path, keep_downloads=True)
    with pytest.raises(ValueError, match=r"downloaded \d+ bytes but the server announced \d+ after 2 attempts"):
        source.fetch(list(TIMES[:2]), [SINGLE], [])
    assert len(server.calls("download")) == 2
    assert files_in(source.download_dir) == []


@pytest.mark.parametrize(("api", "route", "match"), [
    ("new", "submit", "Read timed out"), ("legacy", "submit", "Could not connect"),
    ("new", "download", "download failed.*Read timed out"),
])
def test_a_stalled_server_fails_in_bounded_time(
        server: CdsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api: str, route: str, match: str) -> None:
    use_api(server, monkeypatch, api)
    server.faults.push("stall", route=route, times=None, seconds=20)
    # 3 s, not 1: on a loaded machine (tests in parallel) the answers that do not stall must still beat it.
    source = make_source(tmp_path, timeout=3.0, retry_max=2, sleep_max=0.1)
    started = time.monotonic()
    with pytest.raises(ValueError, match=match):
        source.fetch(list(TIMES[:2]), [SINGLE], [])
    assert time.monotonic() - started < 30
    assert len(server.calls(route)) == 2  # retry_max attempts, no more
    assert files_in(source.download_dir) == []


def test_missing_credentials_are_a_clear_error_before_any_request(
        server: CdsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDSAPI_URL")
    monkeypatch.delenv("CDSAPI_KEY")
    with pytest.raises(ValueError, match=r"CDS credentials are missing \(url and key\).*\.cdsapirc.*"
                                         r"CDSAPI_URL and CDSAPI_KEY"):
        make_source(tmp_path).fetch(list(TIMES[:2]), [SINGLE], [])
    monkeypatch.setenv("CDSAPI_URL", server.url)
    with pytest.raises(ValueError, match=r"missing \(key\)"):
        make_source(tmp_path).fetch(list(TIMES[:2]), [SINGLE], [])
    assert server.received == []


def test_credentials_from_cdsapirc_alone_work(server: CdsServer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDSAPI_URL")
    monkeypatch.delenv("CDSAPI_KEY")
    rc = Path.home() / ".cdsapirc"
    rc.write_text(f"url: {server.url}\nkey: {server.key_legacy}\n")
    slab = make_source(tmp_path).fetch(list(TIMES[:2]), [SINGLE], [])
    assert {c.api for c in server.calls("submit")} == {"legacy"}
    assert_matches_factory(slab, [SINGLE], [], TIMES[:2])


def test_era5t_times_are_replaced_by_final_ones_once_the_server_has_them(
        server: CdsServer, tmp_path: Path) -> None:
    server.set_era5t(TIMES[3])
    source = make_source(tmp_path)
    preliminary = source.fetch(list(TIMES), ["geopotential"], [500])
    assert preliminary["expver"].values.tolist() == [1] * 4 + [5] * 4
    server.set_era5t(None)
    final = source.fetch(list(TIMES), ["geopotential"], [500])
    assert final["expver"].values.tolist() == [1] * 8
    xr.testing.assert_identical(preliminary.drop_vars("expver"), final.drop_vars("expver"))


def test_bad_requests_fail_before_contacting_the_server(server: CdsServer, tmp_path: Path) -> None:
    source = make_source(tmp_path)
    with pytest.raises(ValueError, match="unknown variable 'z500'"):
        source.fetch(list(TIMES), ["z500"], [500])
    with pytest.raises(ValueError, match="pressure level 501 hPa"):
        source.fetch(list(TIMES), ["geopotential"], [501])
    with pytest.raises(ValueError, match="before ERA5's first time"):
        source.fetch([pd.Timestamp("1900-01-01")], [SINGLE], [])
    assert server.received == []


def test_dataset_version_depends_on_grid_not_on_settings_or_period(tmp_path: Path) -> None:
    a = CdsSource(GRID, CdsConfig(), tmp_path)
    b = CdsSource(GRID, CdsConfig(data_format="grib", retry_max=1), tmp_path / "elsewhere")
    c = CdsSource(get_grid("5.625deg"), CdsConfig(), tmp_path)
    assert a.dataset_version() == b.dataset_version() != c.dataset_version()
    assert a.dataset_version().startswith("era5-cds-") and a.name == "era5-cds"
