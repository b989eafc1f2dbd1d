"""Live initial conditions from ECMWF open data, against a portal look-alike on 127.0.0.1.

The unmodified ``ecmwf-opendata`` client reads the portal's index and downloads byte ranges; the
GRIB2 is written by ecCodes in ``tests/ingest/opendata_portal.py``. Expected values are computed
here independently: the written file is decoded with ecCodes, ``gh`` is multiplied by g0, and
each model cell is the area-weighted mean of the portal cells whose centres fall in it (the
portal grids nest the model grid with an odd ratio, so every portal cell lies in one model cell).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import eccodes
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from core.config import Config
from core.grid import get_grid
from core.testing import analysis_dataset
from ingest.initial_conditions import InitialConditionsError, initial_conditions_source, update_initial_conditions
from ingest.opendata import G0, OpenDataSource
from ingest.regions import write_region
from ingest.sources import SyntheticSource
from ingest.store import StoreLayout, create_store, open_store, read_flags, write_slab
from tests.ingest.conftest import TINY, tiny_config
from tests.ingest.opendata_portal import OpenDataPortal

COARSE = 3.75  # nests the tiny grid's 11.25° cells 3 × 3
VARIABLES = ["geopotential", "u_component_of_wind", "2m_temperature", "mean_sea_level_pressure"]
LEVELS = [500, 850]
PARAMS = ["gh", "t", "u", "v", "2t", "10u", "msl"]  # the portal has more than is asked for
PORTAL_LEVELS = [1000, 850, 500, 250]
C0 = pd.Timestamp("2026-12-01T00")


def cyc(k: int) -> pd.Timestamp:
    return C0 + pd.Timedelta(hours=6 * k)


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[OpenDataPortal]:
    with OpenDataPortal(tmp_path / "portal", grid_deg=COARSE) as p:
        yield p


def make_config(root: Path, portal: OpenDataPortal, keep: int = 3, **task: object) -> Config:
    config, _ = tiny_config(root, task={"variables": VARIABLES, "levels": LEVELS, **task},
                            initial_conditions={"source": "opendata", "keep_cycles": keep,
                                                "opendata": {"url": portal.url, "retries": 2, "timeout": 10}})
    return config


def coarse_source(config: Config, spacing: float = COARSE) -> OpenDataSource:
    return OpenDataSource(config.grid.grid(), config.initial_conditions.opendata, config.paths.data / "dl", spacing)


def read_grib(path: Path) -> dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(shortName, level) → (values, lat, lon) of every message, decoded with ecCodes."""
    out = {}
    with open(path, "rb") as f:
        while (h := eccodes.codes_grib_new_from_file(f)) is not None:
            try:
                nj, ni = eccodes.codes_get(h, "Nj"), eccodes.codes_get(h, "Ni")
                level = eccodes.codes_get(h, "level") if eccodes.codes_get(h, "typeOfLevel") == "isobaricInhPa" else None
                out[(eccodes.codes_get(h, "shortName"), level)] = (
                    eccodes.codes_get_values(h).reshape(nj, ni),
                    eccodes.codes_get_array(h, "latitudes").reshape(nj, ni)[:, 0],
                    eccodes.codes_get_array(h, "longitudes").reshape(nj, ni)[0])
            finally:
                eccodes.codes_release(h)
    return out


def cell_mean(values: np.ndarray, lat: np.ndarray, lon: np.ndarray, grid_name: str = "tiny") -> np.ndarray:
    """Area-weighted mean of the source cells whose centres lie in each destination cell."""
    g = get_grid(grid_name)
    dlat, dlon = 180 / (g.nlat - 1), 360 / g.nlon
    slat = abs(lat[1] - lat[0])
    upper = np.minimum(lat + slat / 2, 90.0)
    lower = np.maximum(lat - slat / 2, -90.0)
    w = np.sin(np.deg2rad(upper)) - np.sin(np.deg2rad(lower))
    out = np.empty(g.shape)
    for i, la in enumerate(g.latitudes):
        rows = np.abs(lat - la) < dlat / 2
        for j, lo in enumerate(g.longitudes):
            cols = np.abs((lon - lo + 180) % 360 - 180) < dlon / 2
            block = values[np.ix_(rows, cols)]
            out[i, j] = (w[rows, None] * block).sum() / (w[rows].sum() * cols.sum())
    return out


def tree_digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def done_times(path: Path) -> list[pd.Timestamp]:
    flags = read_flags(path)
    return list(pd.DatetimeIndex(flags["time"].values[flags["done"].values.astype(bool)]))


# --- happy path ---------------------------------------------------------------------------------

def test_update_stores_regridded_geopotential_and_fields_equal_to_an_independent_computation(
        tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal)
    for k in range(3):
        portal.publish(cyc(k), PARAMS, PORTAL_LEVELS)
    report = update_initial_conditions(config, now=cyc(2) + pd.Timedelta(hours=5), source=coarse_source(config))
    assert report.stored == [cyc(0), cyc(1), cyc(2)] and not report.failed and not report.not_available
    path = config.paths.initial_conditions_store
    store = open_store(path)  # validates the analysis contract
    assert store.attrs["source"] == "ecmwf-opendata-ifs"
    assert store.attrs["dataset_version"] == coarse_source(config).dataset_version()
    assert done_times(path) == [cyc(0), cyc(1), cyc(2)] == report.kept
    assert store["expver"].values.tolist() == [1, 1, 1]
    for k in range(3):
        grib = read_grib(portal.grib_path(cyc(k)))
        for level in LEVELS:
            values, lat, lon = grib[("gh", level)]
            want = cell_mean(values * G0, lat, lon)
            got = store["geopotential"].sel(time=cyc(k), level=level).values
            np.testing.assert_allclose(got, want, rtol=2e-6)
            values, lat, lon = grib[("u", level)]
            np.testing.assert_allclose(store["u_component_of_wind"].sel(time=cyc(k), level=level).values,
                                       cell_mean(values, lat, lon), rtol=2e-6, atol=1e-5)
        for name, param in (("2m_temperature", "2t"), ("mean_sea_level_pressure", "msl")):
            values, lat, lon = grib[(param, None)]
            np.testing.assert_allclose(store[name].sel(time=cyc(k)).values, cell_mean(values, lat, lon), rtol=2e-6)
    # Only the asked fields' byte ranges travelled, not the whole files.
    data = portal.calls("data")
    assert all(r.range for r in data if r.method == "GET")
    assert sum(r.nbytes for r in data) < sum(portal.grib_path(cyc(k)).stat().st_size for k in range(3)) * 0.6


def test_a_quarter_degree_portal_through_the_config(tmp_path: Path) -> None:
    with OpenDataPortal(tmp_path / "portal", grid_deg=0.25) as portal:
        config = make_config(tmp_path / "run", portal, keep=1, variables=["geopotential", "2m_temperature"],
                             levels=[500])
        portal.publish(C0, ["gh", "t", "2t"], [500, 850])
        source = initial_conditions_source(config)
        assert isinstance(source, OpenDataSource) and source.spacing == 0.25
        report = update_initial_conditions(config, now=C0 + pd.Timedelta(hours=5))
        assert report.stored == [C0]
        store = open_store(config.paths.initial_conditions_store)
        grib = read_grib(portal.grib_path(C0))
        values, lat, lon = grib[("gh", 500)]
        assert values.shape == (721, 1440) and lon[0] == -180.0
        np.testing.assert_allclose(store["geopotential"].sel(time=C0, level=500).values,
                                   cell_mean(values * G0, lat, lon), rtol=2e-6)
        values, lat, lon = grib[("2t", None)]
        np.testing.assert_allclose(store["2m_temperature"].sel(time=C0).values, cell_mean(values, lat, lon), rtol=2e-6)


# --- faults ------------------------------------------------------------------------------------

def test_a_cycle_not_there_yet_is_reported_and_not_marked_done(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal)
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS)
    portal.publish(cyc(1), PARAMS, PORTAL_LEVELS)  # cyc(2) is not published yet
    report = update_initial_conditions(config, now=cyc(2), source=coarse_source(config))
    assert report.not_available == [cyc(2)] and report.stored == [cyc(0), cyc(1)]
    assert done_times(config.paths.initial_conditions_store) == [cyc(0), cyc(1)]
    assert any(r.status == 404 for r in portal.calls("index"))
    # Once it is published, the next update fetches that cycle only.
    portal.publish(cyc(2), PARAMS, PORTAL_LEVELS)
    before = len(portal.calls("index"))
    report = update_initial_conditions(config, now=cyc(2), source=coarse_source(config))
    assert report.stored == [cyc(2)] and report.already == [cyc(0), cyc(1)]
    assert len(portal.calls("index")) - before == 2  # one index read per request (pressure, surface)


def test_no_cycle_published_creates_no_store(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal)
    report = update_initial_conditions(config, now=cyc(2), source=coarse_source(config))
    assert report.not_available == [cyc(2), cyc(1), cyc(0)] and report.newest is None
    assert not config.paths.initial_conditions_store.exists()


def test_a_truncated_file_is_a_clear_error_and_nothing_partial_is_done(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, keep=2)
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS)
    portal.publish(cyc(1), PARAMS, PORTAL_LEVELS)
    portal.truncate(cyc(1), keep=0.5)
    with pytest.raises(InitialConditionsError, match=r"2026-12-01T06.*truncated") as err:
        update_initial_conditions(config, now=cyc(1), source=coarse_source(config))
    assert err.value.report.stored == [cyc(0)] and list(err.value.report.failed) == [cyc(1)]
    path = config.paths.initial_conditions_store
    assert done_times(path) == [cyc(0)]
    assert np.isnan(open_store(path)["geopotential"].sel(time=cyc(1)).values).all()


def test_a_5xx_is_retried_and_then_succeeds(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, keep=1)
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS)
    portal.fail(503, "index", times=1)
    portal.fail(500, "data", times=1)
    report = update_initial_conditions(config, now=cyc(0), source=coarse_source(config))
    assert report.stored == [cyc(0)]
    statuses = [r.status for r in portal.calls()]
    assert 503 in statuses and 500 in statuses
    assert done_times(config.paths.initial_conditions_store) == [cyc(0)]


def test_a_persistent_5xx_is_a_clear_error_after_the_retries(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, keep=1)
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS)
    portal.fail(503, "index", times=100)
    with pytest.raises(InitialConditionsError, match=r"HTTP 503 after 2 attempts"):
        update_initial_conditions(config, now=cyc(0), source=coarse_source(config))
    assert [r.status for r in portal.calls("index")] == [503, 503]
    assert not config.paths.initial_conditions_store.exists()


_KILLED_UPDATE = """
import sys
import pandas as pd
from tests.ingest.faults import _patch_write_region
from core.config import load_config
from ingest.initial_conditions import update_initial_conditions
from ingest.opendata import OpenDataSource
_patch_write_region("before-done", 1)  # SIGKILL once the first cycle's fields are on disk, before its flag
config = load_config(sys.argv[1], env={})
source = OpenDataSource(config.grid.grid(), config.initial_conditions.opendata, spacing=float(sys.argv[3]))
update_initial_conditions(config, now=pd.Timestamp(sys.argv[2]), source=source)
"""


def test_a_kill_before_the_done_flag_leaves_the_cycle_not_done_and_the_rerun_completes(
        tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, keep=1)
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS)
    proc = subprocess.run([sys.executable, "-c", _KILLED_UPDATE, str(tmp_path / "run" / "config.yaml"),
                           str(cyc(0)), str(COARSE)], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    path = config.paths.initial_conditions_store
    assert done_times(path) == [] and open_store(path)["expver"].values.tolist() == [1]  # data there, not done
    report = update_initial_conditions(config, now=cyc(0), source=coarse_source(config))
    assert report.stored == [cyc(0)] and done_times(path) == [cyc(0)]
    values, lat, lon = read_grib(portal.grib_path(cyc(0)))[("gh", 500)]
    np.testing.assert_allclose(open_store(path)["geopotential"].sel(time=cyc(0), level=500).values,
                               cell_mean(values * G0, lat, lon), rtol=2e-6)


# --- bad input ---------------------------------------------------------------------------------

def test_a_file_on_another_grid_is_refused_and_nothing_is_stored(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, keep=1)
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS, grid_deg=2.5)
    with pytest.raises(InitialConditionsError, match=r"grid spacing of 2\.5°×2\.5°, not the 3\.75° asked for"):
        update_initial_conditions(config, now=cyc(0), source=coarse_source(config))
    assert not config.paths.initial_conditions_store.exists()


def test_a_file_whose_parameters_differ_from_its_index_is_refused(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, keep=2)
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS, mislabel={"u": "r"})  # the index says u, the file holds r
    portal.publish(cyc(1), ["gh", "2t", "msl"], PORTAL_LEVELS)  # no u at all
    with pytest.raises(InitialConditionsError) as err:
        update_initial_conditions(config, now=cyc(1), source=coarse_source(config))
    failed = err.value.report.failed
    assert "holds 'r' at 850 hPa, which was not asked for" in failed[cyc(0)]
    assert "did not deliver [('u', 500), ('u', 850)]" in failed[cyc(1)]
    assert not config.paths.initial_conditions_store.exists()


def test_a_variable_open_data_does_not_offer_is_refused_before_any_request(tmp_path: Path,
                                                                          portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, variables=["geopotential", "total_precipitation"])
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS)
    with pytest.raises(ValueError, match=r"no analysis of \['total_precipitation'\]"):
        update_initial_conditions(config, now=cyc(0))
    assert portal.calls() == [] and not config.paths.initial_conditions_store.exists()


def test_a_store_of_other_variables_is_refused_unchanged(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, keep=1)
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS)
    update_initial_conditions(config, now=cyc(0), source=coarse_source(config))
    path = config.paths.initial_conditions_store
    before = tree_digest(path)
    other = make_config(tmp_path / "run", portal, keep=1, levels=[500])
    with pytest.raises(ValueError, match=r"does not match the request; nothing was modified: levels"):
        update_initial_conditions(other, now=cyc(1), source=coarse_source(other))
    assert tree_digest(path) == before


# --- idempotence, retention, isolation ---------------------------------------------------------

def test_a_rerun_is_a_no_op(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal)
    for k in range(3):
        portal.publish(cyc(k), PARAMS, PORTAL_LEVELS)
    update_initial_conditions(config, now=cyc(2), source=coarse_source(config))
    path = config.paths.initial_conditions_store
    before, calls = tree_digest(path), len(portal.calls())
    report = update_initial_conditions(config, now=cyc(2), source=coarse_source(config))
    assert report.stored == [] and report.already == [cyc(0), cyc(1), cyc(2)] and report.pruned == []
    assert tree_digest(path) == before
    assert len(portal.calls()) == calls  # nothing asked of the portal


def test_keep_cycles_clears_the_oldest(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, keep=2)
    for k in range(4):
        portal.publish(cyc(k), PARAMS, PORTAL_LEVELS)
    update_initial_conditions(config, now=cyc(1), source=coarse_source(config))
    path = config.paths.initial_conditions_store
    shards = len(list((path / "geopotential").glob("c.*")))
    report = update_initial_conditions(config, now=cyc(3), source=coarse_source(config))
    assert report.stored == [cyc(2), cyc(3)] and report.pruned == [cyc(0), cyc(1)]
    assert done_times(path) == [cyc(2), cyc(3)] == report.kept
    store = open_store(path)
    assert np.isnan(store["geopotential"].sel(time=[cyc(0), cyc(1)]).values).all()
    assert store["expver"].values.tolist() == [0, 0, 1, 1]
    assert len(list((path / "geopotential").glob("c.*"))) == shards  # two deleted, two written
    again = update_initial_conditions(config, now=cyc(3), source=coarse_source(config))
    assert again.pruned == [] and again.stored == []


def test_a_half_cleared_cycle_is_cleared_by_the_next_update(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, keep=2)
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS)
    portal.publish(cyc(1), PARAMS, PORTAL_LEVELS)
    update_initial_conditions(config, now=cyc(1), source=coarse_source(config))
    path = config.paths.initial_conditions_store
    # What a kill leaves right after the prune's first write: cyc(0) not done, its data and expver still there.
    write_region(path, xr.Dataset({"done": ("time", np.zeros(1, np.uint8))}), slice(0, 1))
    assert (path / "geopotential" / "c.0.0.0.0").is_file()
    report = update_initial_conditions(config, now=cyc(2), source=coarse_source(config))  # cyc(2) not published
    assert report.not_available == [cyc(2)] and report.pruned == [] and report.kept == [cyc(1)]
    assert not (path / "geopotential" / "c.0.0.0.0").exists()
    store = open_store(path)
    assert store["expver"].values.tolist() == [0, 1]  # the axis grows only when a cycle is written
    assert np.isnan(store["geopotential"].isel(time=0).values).all()


def test_the_era5_store_is_byte_identical_after_an_update(tmp_path: Path, portal: OpenDataPortal) -> None:
    config = make_config(tmp_path / "run", portal, keep=2, variables=["geopotential", "u_component_of_wind"],
                         levels=[500])
    ds = analysis_dataset(periods=4, variables=("geopotential", "u_component_of_wind"))
    era5 = config.paths.analysis_store
    create_store(era5, StoreLayout(get_grid("tiny"), ("geopotential", "u_component_of_wind"), (500,),
                                   pd.DatetimeIndex(ds.time.values), "testing", "testing-0"))
    write_slab(era5, open_store(era5), ds, 0)
    before = tree_digest(era5)
    portal.publish(cyc(0), PARAMS, PORTAL_LEVELS)
    portal.publish(cyc(1), PARAMS, PORTAL_LEVELS)
    update_initial_conditions(config, now=cyc(1), source=coarse_source(config))
    assert tree_digest(era5) == before
    assert done_times(config.paths.initial_conditions_store) == [cyc(0), cyc(1)]


# --- the planet as a live source ---------------------------------------------------------------

def test_the_synthetic_planet_arrives_six_hours_at_a_time(tmp_path: Path) -> None:
    # A short spin-up and a clock near the epoch keep the simulation to a few 6 h segments.
    planet = {**TINY["ingest"]["synthetic"], "spinup_days": 0.25}
    config, _ = tiny_config(tmp_path / "run", ingest={"synthetic": planet},
                            initial_conditions={"source": "synthetic", "keep_cycles": 2})
    end = pd.Timestamp("2000-01-01T06")
    first = update_initial_conditions(config, now=end + pd.Timedelta(hours=1))
    assert first.stored == [end - pd.Timedelta(hours=6), end]
    second = update_initial_conditions(config)  # no clock: the next 6 h arrive
    nxt = end + pd.Timedelta(hours=6)
    assert second.stored == [nxt] and second.pruned == [end - pd.Timedelta(hours=6)] and second.kept == [end, nxt]
    path = config.paths.initial_conditions_store
    store = open_store(path)
    assert store.attrs["source"] == "synthetic-shallow-water"
    source = initial_conditions_source(config)  # the same planet, continued: no second spin-up
    assert isinstance(source, SyntheticSource)
    assert store.attrs["dataset_version"] == source.dataset_version()
    want = source.fetch([nxt], config.task.variables, config.task.levels)
    for name in config.task.variables:
        np.testing.assert_array_equal(store[name].sel(time=nxt).values, want[name].isel(time=0).values)
