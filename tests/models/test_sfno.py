"""SFNO: shapes, grid-agnostic weights, longitude equivariance, SHT round trips, CUDA/bf16 path."""

from __future__ import annotations

import pytest
import torch

from models.sfno import LATENT_GRID, SFNO, default_lmax, make_transforms


def _model(**kw: object) -> SFNO:
    torch.manual_seed(0)
    args = {"in_channels": 3, "out_channels": 3, "nlat": 17, "nlon": 32, "embed_dim": 8, "num_layers": 2}
    return SFNO(**{**args, **kw})


def test_forward_shape_and_finite() -> None:
    model = _model(out_channels=2)
    y = model(torch.randn(2, 3, 17, 32))
    assert y.shape == (2, 2, 17, 32)
    assert torch.isfinite(y).all()


def test_same_weights_run_on_two_grids() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 17, 32)
    y_tiny = model(x)
    model.set_grid(33, 64)
    y_big = model(torch.randn(2, 3, 33, 64))
    assert y_big.shape == (2, 3, 33, 64) and torch.isfinite(y_big).all()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.set_grid(17, 32)
    torch.testing.assert_close(model(x), y_tiny)


def test_coarse_weights_run_on_fine_grid_with_their_own_truncation() -> None:
    model = _model()  # lmax 16 from 17×32
    assert model.lmax == default_lmax(17, 32) == 16
    model.set_grid(65, 128)
    assert model.grid_lmax == 16  # higher degrees have no weights: they are truncated, not invented
    assert torch.isfinite(model(torch.randn(1, 3, 65, 128))).all()


def test_wrong_grid_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="set_grid"):
        _model()(torch.randn(1, 3, 33, 64))


def test_scale_factor_downsamples_inside() -> None:
    model = _model(scale_factor=2)
    assert model.sht_latent.nlat == 9 and model.sht_latent.nlon == 16
    assert model(torch.randn(1, 3, 17, 32)).shape == (1, 3, 17, 32)


@pytest.mark.parametrize("shift", [1, 5])
def test_equivariant_to_longitude_rotation_without_position_embedding(shift: int) -> None:
    model = _model(pos_embed=False).double()
    x = torch.randn(1, 3, 17, 32, dtype=torch.float64)
    rolled = model(torch.roll(x, shift, dims=-1))
    torch.testing.assert_close(rolled, torch.roll(model(x), shift, dims=-1), atol=1e-4, rtol=1e-4)


def test_position_embedding_breaks_rotation_symmetry() -> None:
    model = _model(pos_embed=True)
    x = torch.zeros(1, 3, 17, 32)
    y = model(x)
    assert not torch.allclose(y, torch.roll(y, 3, dims=-1))  # latitude/longitude now matter


def _random_coeffs(lmax: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(2, lmax, lmax, 2, generator=g)
    c = torch.view_as_complex(c)
    mask = torch.tril(torch.ones(lmax, lmax, dtype=torch.bool))  # m ≤ l only
    c = c * mask
    c[..., 0] = c[..., 0].real  # m = 0 coefficients of a real field are real
    return c


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("nlat", "nlon", "grid"), [(17, 32, "equiangular"), (33, 64, "equiangular"),
                                                   (33, 64, LATENT_GRID), (9, 16, LATENT_GRID)])
def test_sht_round_trip_of_band_limited_fields(nlat: int, nlon: int, grid: str, seed: int) -> None:
    # Exactness: equiangular (Clenshaw–Curtis) quadrature integrates degree < (nlat+1)/2 products
    # exactly; Gauss–Legendre up to nlat. Within that band, SHT ∘ ISHT = id.
    lmax = (nlat + 1) // 2 if grid == "equiangular" else min(nlat, nlon // 2)
    sht, isht = make_transforms(nlat, nlon, lmax, grid)
    coeffs = _random_coeffs(lmax, seed)
    field = isht(coeffs)
    assert field.shape == (2, nlat, nlon)
    torch.testing.assert_close(sht(field), coeffs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(isht(sht(field)), field, atol=2e-5, rtol=1e-5)


def test_spherical_harmonic_y10_is_recognised() -> None:
    # cos(colatitude) = sin(latitude) is proportional to Y_1^0: all its energy lands in (l=1, m=0).
    sht, _ = make_transforms(17, 32, 9, "equiangular")
    lat = torch.linspace(torch.pi / 2, -torch.pi / 2, 17)
    field = torch.sin(lat)[:, None].expand(17, 32)
    c = sht(field.float())
    energy = c.abs() ** 2
    assert energy[1, 0] / energy.sum() > 1 - 1e-6


@pytest.mark.gpu
def test_bf16_autocast_forward_backward_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    model = _model().cuda()
    x = torch.randn(2, 3, 17, 32, device="cuda")
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        y = model(x)
    y.float().pow(2).mean().backward()
    assert torch.isfinite(y.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch) -> None:
    import models.sfno as sfno_module

    calls = []
    real = sfno_module.activation_checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sfno_module, "activation_checkpoint", counting)
    torch.manual_seed(0)
    model = sfno_module.SFNO(3, 3, 17, 32, embed_dim=8, num_layers=3)
    x = torch.randn(2, 3, 17, 32)
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.checkpoint_blocks = on
        model(x).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 3  # every block went through the checkpoint, only when asked
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        model(x)  # inference never checkpoints (nothing to recompute)
    assert len(calls) == 3
