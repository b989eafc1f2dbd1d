"""Area-weighted sphere MSE: weights from core.grid, per-channel values, channel weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from core.grid import get_grid
from core.metrics import rmse
from models.losses import SphereMSE, latitude_weights, sphere_mse_per_channel


@pytest.mark.parametrize("preset", ["tiny", "5.625deg"])
def test_latitude_weights_are_the_grid_area_weights(preset: str) -> None:
    g = get_grid(preset)
    w = latitude_weights(g.nlat, g.nlon)
    np.testing.assert_allclose(w.numpy(), g.weights, rtol=1e-6)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert w[g.nlat // 2] > w[1] > w[0]  # equator rows own more area than polar rows


def test_uniform_error_gives_its_square() -> None:
    pred = torch.full((2, 3, 17, 32), 3.0)
    per = SphereMSE().per_channel(pred, torch.zeros_like(pred))
    torch.testing.assert_close(per, torch.full((3,), 9.0))


def test_error_in_one_row_is_weighted_by_its_area() -> None:
    w = latitude_weights(17)
    for row in (0, 4, 8):
        pred = torch.zeros(1, 1, 17, 32)
        pred[..., row, :] = 2.0
        loss = SphereMSE()(pred, torch.zeros_like(pred))
        assert float(loss) == pytest.approx(4.0 * float(w[row]), rel=1e-6)
    pole = torch.zeros(1, 1, 17, 32)
    pole[..., 0, :] = 1.0
    equator = torch.zeros(1, 1, 17, 32)
    equator[..., 8, :] = 1.0
    assert SphereMSE()(pole, torch.zeros_like(pole)) < SphereMSE()(equator, torch.zeros_like(equator))


def test_channel_weights_combine_per_channel_errors() -> None:
    pred = torch.zeros(2, 3, 9, 16)
    pred[:, 0] = 1.0
    pred[:, 2] = 2.0
    target = torch.zeros_like(pred)
    assert float(SphereMSE()(pred, target)) == pytest.approx((1 + 0 + 4) / 3)
    assert float(SphereMSE([1.0, 0.0, 0.0])(pred, target)) == pytest.approx(1.0)
    assert float(SphereMSE([1.0, 1.0, 2.0])(pred, target)) == pytest.approx((1 + 0 + 8) / 4)


def test_leading_dims_are_averaged_per_channel() -> None:
    pred = torch.randn(2, 4, 3, 9, 16)  # (batch, rollout step, channel, lat, lon)
    per = SphereMSE().per_channel(pred, torch.zeros_like(pred))
    expected = torch.stack([SphereMSE().per_channel(pred[:, k], torch.zeros_like(pred[:, k])) for k in range(4)]).mean(0)
    torch.testing.assert_close(per, expected)


def test_matches_core_metrics_rmse_squared() -> None:
    g = get_grid("tiny")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(g.nlat, g.nlon))
    b = rng.normal(size=(g.nlat, g.nlon))
    coords = {"latitude": g.latitudes, "longitude": g.longitudes}
    da, db = (xr.DataArray(v, dims=("latitude", "longitude"), coords=coords) for v in (a, b))
    ours = sphere_mse_per_channel(torch.tensor(a)[None, None], torch.tensor(b)[None, None],
                                  latitude_weights(g.nlat).double())
    assert float(ours[0]) == pytest.approx(float(rmse(da, db)) ** 2, rel=1e-6)


def test_shape_and_weight_mismatches_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        SphereMSE()(torch.zeros(1, 3, 9, 16), torch.zeros(1, 3, 9, 8))
    with pytest.raises(ValueError, match="channel weights"):
        SphereMSE([1.0, 1.0])(torch.zeros(1, 3, 9, 16), torch.zeros(1, 3, 9, 16))
    with pytest.raises(ValueError, match="non-negative"):
        SphereMSE([1.0, -1.0, 1.0])


def test_channel_weights_come_from_the_config_by_name() -> None:
    from core.config import config_from_dict
    from models.train import channel_loss_weights

    cfg = config_from_dict({"train": {"channel_weights": {"geopotential_500": 3.0}}})
    assert channel_loss_weights(cfg) == [3.0, 1.0, 1.0]  # z500, u500, v500
    with pytest.raises(ValueError, match=r"names \['temperature_850'\], not channels"):
        channel_loss_weights(config_from_dict({"train": {"channel_weights": {"temperature_850": 1.0}}}))
    with pytest.raises(ValueError, match="positive sum"):
        channel_loss_weights(config_from_dict({"train": {"channel_weights": {
            "geopotential_500": 0, "u_component_of_wind_500": 0, "v_component_of_wind_500": 0}}}))
