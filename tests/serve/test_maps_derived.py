"""Error, spread and probability maps: the values handed to the plotting calls, the files, and their serving."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from fastapi.testclient import TestClient

from core.runs import run_name
from serve.app import create_app
from serve.layout import ERROR_MAPS_INDEX, map_index
from serve.maps import render_run_maps
from serve.maps_error import render_error_maps
from serve.products import G0, products_for
from serve.products_derived import ERROR_CMAP, PROBABILITIES, error_product
from serve.render import MapRenderer
from serve.settings import ServeSettings
from tests.serve.conftest import pixels, publish_run
from tests.serve.test_maps import DPI, as_forecast
from tests.serve.test_products import weather

T2M, U10, V10 = "2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind"


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict[str, np.ndarray]]]:
    """Every frame's (product, title, fields) as handed to the renderer, recorded around the real call."""
    calls: list[tuple[str, str, dict[str, np.ndarray]]] = []
    real = MapRenderer.prepare

    def spy(self: MapRenderer, fields: dict[str, np.ndarray], title: str):  # noqa: ANN202
        calls.append((self.product.name, title, {k: np.array(v) for k, v in fields.items()}))
        return real(self, fields, title)

    monkeypatch.setattr(MapRenderer, "prepare", spy)
    return calls


def fields_of(calls: list, product: str) -> list[dict[str, np.ndarray]]:
    """The fields of every frame of one product, in lead order."""
    return [f for name, _, f in calls if name == product]


def tree_digest(root: Path) -> dict[str, str]:
    """Path → sha256 of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def members_of(ds: xr.Dataset, offsets: list[float]) -> xr.Dataset:
    """An ensemble forecast: member k is ``ds`` with temperatures shifted by offsets[k] K and winds scaled."""
    parts = []
    for k, off in enumerate(offsets):
        m = ds.copy(deep=True)
        m[T2M] = m[T2M] + off
        m["temperature"] = m["temperature"] + off
        m[U10] = m[U10] * (1 + 0.5 * k)
        m["mean_sea_level_pressure"] = m["mean_sea_level_pressure"] - 800 * k
        parts.append(m)
    out = xr.concat(parts, dim="member").assign_coords(member=np.arange(len(offsets)))
    return out.transpose("init_time", "lead_time", "member", ...).assign_coords(valid_time=ds["valid_time"])


def test_error_products_shade_on_a_diverging_palette_centred_on_zero() -> None:
    bases = products_for([T2M, U10, V10, "temperature_850", "geopotential_500", "mean_sea_level_pressure"])
    for base in bases:
        err = error_product(base)
        assert err.name == f"error_{base.name}" and err.cmap == ERROR_CMAP
        assert err.levels == tuple(-v for v in reversed(err.levels)) and 0.0 in err.levels, err.name
        assert err.convert.units == {"°C": "K"}.get(base.convert.units, base.convert.units)
    z = error_product(next(b for b in bases if b.name == "z500_t850"))
    assert z.contour and 0.0 not in z.contour_levels and z.contour_levels == tuple(-v for v in reversed(z.contour_levels))
    assert "dam" in z.title


def test_error_maps_draw_forecast_minus_analysis_of_the_verified_leads(tmp_path: Path, drawn: list) -> None:
    fc = as_forecast(weather(periods=3))
    truth = weather(periods=3, seed=5)
    truth["2m_temperature"] = truth["2m_temperature"] + 1.5
    truth["geopotential"] = truth["geopotential"] - 196.133  # 2 dam lower everywhere
    written = render_error_maps(fc, truth, [(0, 0), (1, 1)], tmp_path, dpi=DPI, animations=True)

    rel = [p.relative_to(tmp_path).as_posix() for p in written]
    index = map_index(rel)
    assert set(index) == {f"error_{p.name}" for p in products_for(
        ["2m_temperature", "10m_u_component_of_wind", "10m_v_component_of_wind", "mean_sea_level_pressure",
         "geopotential_500", "geopotential_850", "temperature_500", "temperature_850",
         "u_component_of_wind_500", "u_component_of_wind_850", "v_component_of_wind_500",
         "v_component_of_wind_850"])}
    assert all(regions == {"global": [0, 6]} for regions in index.values())  # lead 12 has no truth yet
    t2m = fields_of(drawn, "error_t2m")
    assert len(t2m) == 2
    for i, frame in enumerate(t2m):
        expected = fc[T2M].isel(init_time=0, lead_time=i).values - truth[T2M].isel(time=i).values
        np.testing.assert_allclose(frame["error__t2m__shade"], expected, atol=1e-4)
    z = fields_of(drawn, "error_z500_t850")[1]
    dz = (fc["geopotential"].isel(init_time=0, lead_time=1).sel(level=500)
          - truth["geopotential"].isel(time=1).sel(level=500)).values / (10 * G0)
    np.testing.assert_allclose(z["error__z500_t850__contour"], dz, atol=1e-3)
    wind = fields_of(drawn, "error_wind10m")[0]
    speed = lambda ds, **i: np.hypot(ds[U10].isel(**i).values, ds[V10].isel(**i).values)  # noqa: E731
    np.testing.assert_allclose(wind["error__wind10m__shade"], speed(fc, init_time=0, lead_time=0) - speed(truth, time=0),
                               atol=1e-4)
    assert any("forecast − analysis" in title for _, title, _ in drawn)
    # The index covers every file with its size and sha256, as a manifest does.
    files = json.loads((tmp_path / ERROR_MAPS_INDEX).read_text())["files"]
    assert sorted(files) == sorted(rel)
    for key, entry in files.items():
        data = (tmp_path / key).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert pixels(tmp_path / "maps/error_t2m/global/006.png").std() > 10


def test_error_maps_refuse_bad_requests_and_leave_the_old_maps(tmp_path: Path) -> None:
    fc = as_forecast(weather(periods=2))
    truth = weather(periods=2, seed=1)
    render_error_maps(fc, truth, [(0, 0)], tmp_path, dpi=DPI, products=["error_t2m", "spread_t2m"], animations=False)
    before = tree_digest(tmp_path)
    assert set(map_index(before)) == {"error_t2m"}  # spread names in the shared products list are skipped
    cases = [
        ({"truth_leads": []}, "no lead of this run has its analysis"),
        ({"products": ["error_rainbow"]}, "unknown map product 'rainbow'"),
        ({"regions": ["mars"]}, "mars"),
        ({"analysis": weather(grid="5.625deg", periods=2)}, "differs from the analysis store"),
        ({"analysis": truth[["done"]]}, "holds none of the forecast's channels"),
    ]
    for change, message in cases:
        kwargs = {"analysis": truth, "truth_leads": [(0, 0), (1, 1)], "products": None, "regions": ["global"], **change}
        with pytest.raises(ValueError, match=message):
            render_error_maps(fc, kwargs.pop("analysis"), kwargs.pop("truth_leads"), tmp_path, dpi=DPI, **kwargs)
        assert tree_digest(tmp_path) == before, change


def test_ensemble_runs_get_spread_and_probability_maps(tmp_path: Path, drawn: list) -> None:
    fc = as_forecast(weather(periods=2))
    ens = members_of(fc, [-3.0, 0.0, 3.0, 6.0])
    written = render_run_maps(ens, tmp_path, dpi=DPI, animations=False)
    products = set(map_index([p.relative_to(tmp_path).as_posix() for p in written]))
    bases = {p.name for p in products_for([c for c in ["2m_temperature", "10m_u_component_of_wind",
                                                       "10m_v_component_of_wind", "mean_sea_level_pressure",
                                                       "geopotential_500", "geopotential_850", "temperature_500",
                                                       "temperature_850", "u_component_of_wind_500",
                                                       "u_component_of_wind_850", "v_component_of_wind_500",
                                                       "v_component_of_wind_850"]])}
    assert products == bases | {f"spread_{b}" for b in bases} | {row.name for row in PROBABILITIES}
    assert [len(fields_of(drawn, p)) for p in ("spread_t2m", "spread_wind10m", "prob_t2m_below_0C",
                                               "prob_mslp_below_990hPa")] == [2, 2, 2, 2]
    # Spread of T2m: members differ by −3, 0, 3, 6 K, so the std is that of those offsets everywhere.
    for frame in fields_of(drawn, "spread_t2m"):
        np.testing.assert_allclose(frame["spread__t2m__shade"], np.std([-3.0, 0.0, 3.0, 6.0]), atol=1e-4)
    # Spread of 10 m wind speed and P(T2m < 0 °C), P(MSLP < 990 hPa) against xarray over the members.
    for i, frame in enumerate(fields_of(drawn, "spread_wind10m")):
        speed = np.hypot(ens[U10], ens[V10]).isel(init_time=0, lead_time=i)
        np.testing.assert_allclose(frame["spread__wind10m__shade"], speed.std("member").values, atol=1e-4)
    for i, frame in enumerate(fields_of(drawn, "prob_t2m_below_0C")):
        frost = (ens[T2M].isel(init_time=0, lead_time=i) < 273.15).mean("member") * 100
        np.testing.assert_allclose(frame["prob__prob_t2m_below_0C__shade"], frost.values, atol=1e-4)
        assert 0 < frost.values.mean() < 100  # the test planet has frost in some members only
    for i, frame in enumerate(fields_of(drawn, "prob_mslp_below_990hPa")):
        low = (ens["mean_sea_level_pressure"].isel(init_time=0, lead_time=i) < 99000).mean("member") * 100
        np.testing.assert_allclose(frame["prob__prob_mslp_below_990hPa__shade"], low.values, atol=1e-4)
    # The mean map is still the member mean, titled so; spread and probability maps are not "Ensemble mean".
    titles = {name: title for name, title, _ in drawn}
    assert titles["t2m"].startswith("Ensemble mean: ") and not titles["spread_t2m"].startswith("Ensemble mean")
    assert pixels(tmp_path / "maps/prob_t2m_below_0C/global/000.png").std() > 10


def test_derived_product_requests_are_checked_before_drawing(tmp_path: Path) -> None:
    fc = as_forecast(weather(periods=1))
    ens = members_of(fc, [0.0, 1.0])
    one = render_run_maps(ens, tmp_path, dpi=DPI, products=["spread_mslp", "prob_wind10m_above_15ms"],
                          animations=False)
    assert set(map_index([p.relative_to(tmp_path).as_posix() for p in one])) == {"spread_mslp",
                                                                                  "prob_wind10m_above_15ms"}
    before = tree_digest(tmp_path)
    for source, products, message in [
        (fc, ["spread_t2m"], "need an ensemble run"),
        (ens, ["error_t2m"], "error maps: verification draws them"),
        (ens, ["prob_rain"], "unknown probability product 'prob_rain'"),
        (ens.drop_vars([U10]), ["prob_wind10m_above_15ms"], "needs 10m_u_component_of_wind"),
        (ens, ["spread_rainbow"], "unknown map product 'rainbow'"),
    ]:
        with pytest.raises(ValueError, match=message):
            render_run_maps(source, tmp_path, dpi=DPI, products=products, animations=False)
        assert tree_digest(tmp_path) == before, products


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, Path, str]]:
    """A published run, its error maps under the verification directory, and the app over both."""
    fc = as_forecast(weather(periods=2))
    forecasts, verification = tmp_path / "forecasts", tmp_path / "verification"
    publish_run(forecasts, fc, dpi=DPI, regions=("global",))
    name = run_name(fc["init_time"].values[0])
    render_error_maps(fc, weather(periods=2, seed=2), [(0, 0), (1, 1)], verification / name, dpi=DPI,
                      products=["t2m"])
    settings = ServeSettings(forecasts_dir=forecasts, verification_dir=verification)
    yield TestClient(create_app(settings)), verification / name, name


def test_error_maps_are_listed_and_served_with_their_checksums(served: tuple[TestClient, Path, str]) -> None:
    client, vdir, run = served
    detail = client.get(f"/runs/{run}").json()
    assert detail["maps"]["error_t2m"] == {"global": [0, 6]} and "t2m" in detail["maps"]
    assert detail["animations"]["error_t2m"] == {"global": ["gif", "mp4"]}
    listing = next(e for e in client.get("/runs").json() if e["name"] == run)
    assert "error_t2m" in listing["maps"]
    png = client.get(f"/runs/{run}/maps/error_t2m/global/006.png")
    data = (vdir / "maps/error_t2m/global/006.png").read_bytes()
    assert png.status_code == 200 and png.content == data
    assert png.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert client.get(f"/runs/{run}/maps/error_t2m/global/animation.mp4").headers["content-type"] == "video/mp4"
    assert client.get(f"/runs/{run}/maps/error_t2m/global/012.png").status_code == 404
    assert client.get(f"/runs/{run}/maps/error_mslp/global/000.png").status_code == 404
    # Damaged in place (same size): a neutral 503, never the wrong bytes under the old ETag.
    target = vdir / "maps/error_t2m/global/000.png"
    raw = bytearray(target.read_bytes())
    raw[-20] ^= 0xFF
    target.write_bytes(bytes(raw))
    broken = client.get(f"/runs/{run}/maps/error_t2m/global/000.png")
    assert broken.status_code == 503 and str(vdir) not in broken.text


def test_an_error_index_cannot_add_forecast_maps_or_hide_the_run(served: tuple[TestClient, Path, str]) -> None:
    client, vdir, run = served
    index = vdir / ERROR_MAPS_INDEX
    files = json.loads(index.read_text())["files"]
    forged = {**files, "maps/t2m/global/999.png": files["maps/error_t2m/global/000.png"],
              "maps/error_t2m/global/048.png": {"size": 1, "sha256": "0" * 64}}
    index.write_text(json.dumps({"files": forged}))
    maps = client.get(f"/runs/{run}").json()["maps"]
    assert maps["t2m"]["global"] == [0, 6]  # from the run's manifest only
    assert client.get(f"/runs/{run}/maps/t2m/global/999.png").status_code == 404
    assert client.get(f"/runs/{run}/maps/error_t2m/global/048.png").status_code == 503  # listed, not on disk
    index.write_text("{not json")
    detail = client.get(f"/runs/{run}")
    assert detail.status_code == 200 and "error_t2m" not in detail.json()["maps"] and "t2m" in detail.json()["maps"]
