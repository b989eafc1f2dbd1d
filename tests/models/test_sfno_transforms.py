"""The SFNO's transforms: same function as torch-harmonics' RealSHT/InverseRealSHT, exact round trips, area means."""

from __future__ import annotations

import math

import pytest
import torch
from torch_harmonics import InverseRealSHT, RealSHT

import models.sfno_transforms as transforms
from models.sfno_transforms import GRIDS, GridTransform, latitudes


def _to_layout(field: torch.Tensor) -> torch.Tensor:
    """``(batch, channel, nlat, nlon)`` → the network's ``(nlon, nlat, batch, channel)``."""
    return field.permute(3, 2, 0, 1).contiguous()


def _from_coeffs(coeffs: torch.Tensor) -> torch.Tensor:
    """``(2, m, l, batch, channel)`` real coefficients → torch-harmonics' complex ``(batch, channel, l, m)``."""
    return torch.complex(coeffs[0], coeffs[1]).permute(2, 3, 1, 0)


def _to_coeffs(c: torch.Tensor) -> torch.Tensor:
    """torch-harmonics' complex ``(batch, channel, l, m)`` → ``(2, m, l, batch, channel)``."""
    return torch.stack([c.real, c.imag]).permute(0, 4, 3, 1, 2).contiguous()


# (nlat, nlon, lmax): the demo grid, the tiny grid, a Gauss latent grid, a grid whose synthesis uses the
# FFT, and one where both directions do.
CASES = [(33, 64, 32), (17, 32, 16), (9, 16, 8), (9, transforms.DFT_MAX_NLON_SYNTHESIS + 2, 8),
         (9, transforms.DFT_MAX_NLON_ANALYSIS + 2, 8)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(("nlat", "nlon", "lmax"), CASES)
def test_analysis_and_synthesis_match_torch_harmonics(grid: str, nlat: int, nlon: int, lmax: int) -> None:
    torch.manual_seed(0)
    ours = GridTransform(nlat, nlon, lmax, grid)
    assert ours.analysis_fft == (nlon > transforms.DFT_MAX_NLON_ANALYSIS)
    assert ours.synthesis_fft == (nlon > transforms.DFT_MAX_NLON_SYNTHESIS)
    sht = RealSHT(nlat, nlon, lmax=lmax, mmax=lmax, grid=grid).float()
    isht = InverseRealSHT(nlat, nlon, lmax=lmax, mmax=lmax, grid=grid).float()
    x = torch.randn(2, 3, nlat, nlon)
    ref = sht(x)
    got = _from_coeffs(ours.analysis(_to_layout(x)))
    torch.testing.assert_close(got, ref, atol=2e-6 * float(ref.abs().max()), rtol=0)
    # Random coefficients, including imaginary parts at m = 0 and m > l, which both must ignore.
    c = torch.randn(2, 3, lmax, lmax, dtype=torch.complex64)
    ref_field = isht(c)
    got_field = ours.synthesis(_to_coeffs(c)).permute(2, 3, 1, 0)
    torch.testing.assert_close(got_field, ref_field, atol=2e-6 * float(ref_field.abs().max()), rtol=0)


def test_shared_tables_path_gives_the_same_coefficients(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tables above DUPLICATE_MAX are not duplicated; the two-GEMM path must compute the same thing.
    x = _to_layout(torch.randn(2, 3, 17, 32))
    big = GridTransform(17, 32, 16, "equiangular")
    monkeypatch.setattr(transforms, "DUPLICATE_MAX", 0)
    small = GridTransform(17, 32, 16, "equiangular")
    assert small.analysis_legendre.shape[0] == 16 and big.analysis_legendre.shape[0] == 32
    torch.testing.assert_close(small.analysis(x), big.analysis(x))
    c = big.analysis(x)
    torch.testing.assert_close(small.synthesis(c), big.synthesis(c))


def _band_limited(lmax: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.view_as_complex(torch.randn(2, 1, lmax, lmax, 2, generator=g))
    c = c * torch.tril(torch.ones(lmax, lmax))  # m ≤ l only
    c[..., 0] = c[..., 0].real  # m = 0 coefficients of a real field are real
    return _to_coeffs(c)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("nlat", "nlon", "grid"), [(17, 32, "equiangular"), (33, 64, "equiangular"),
                                                   (33, 64, "legendre-gauss"), (9, 16, "legendre-gauss"),
                                                   (9, 16, "lobatto")])
def test_round_trip_of_band_limited_fields(nlat: int, nlon: int, grid: str, seed: int) -> None:
    # Exactness: Clenshaw–Curtis (equiangular) quadrature integrates degree < (nlat+1)/2 products
    # exactly, Gauss–Legendre up to nlat, Lobatto up to nlat − 1. Within that band, SHT ∘ ISHT = id.
    lmax = {"equiangular": (nlat + 1) // 2, "legendre-gauss": min(nlat, nlon // 2), "lobatto": nlat - 1}[grid]
    lmax = min(lmax, nlon // 2)
    t = GridTransform(nlat, nlon, lmax, grid)
    coeffs = _band_limited(lmax, seed)
    field = t.synthesis(coeffs)
    assert field.shape == (nlon, nlat, 2, 1)
    torch.testing.assert_close(t.analysis(field), coeffs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(t.synthesis(t.analysis(field)), field, atol=2e-5, rtol=1e-5)


def test_y10_is_recognised_and_constants_are_degree_zero() -> None:
    # sin(latitude) = cos(colatitude) ∝ Y_1^0: all its energy lands in (l=1, m=0).
    t = GridTransform(17, 32, 9, "equiangular")
    lat = latitudes(17, "equiangular").float()
    field = torch.sin(lat)[None, :, None, None].expand(32, 17, 1, 1)
    energy = t.analysis(field.contiguous()).square().sum(dim=0)[..., 0, 0]  # (m, l)
    assert energy[0, 1] / energy.sum() > 1 - 1e-6
    # A unit (l=0, m=0) real coefficient synthesises the constant field `constant` = 1/√(4π).
    c = torch.zeros(2, 9, 9, 1, 1)
    c[0, 0, 0] = 1.0
    torch.testing.assert_close(t.synthesis(c), torch.full((32, 17, 1, 1), t.constant))
    assert t.constant == pytest.approx(1 / math.sqrt(4 * math.pi), rel=1e-6)


@pytest.mark.parametrize("grid", GRIDS)
def test_area_mean_is_a_mean_over_the_sphere(grid: str) -> None:
    t = GridTransform(33, 64, 16, grid)
    assert float(t.area.sum()) * 64 == pytest.approx(1.0, abs=1e-6)  # per latitude, for each of 64 longitudes
    lat = latitudes(33, grid).float()
    ones = torch.ones(64, 33, 2, 3)
    torch.testing.assert_close(t.mean(ones), torch.ones(2, 3))
    # The mean of sin²(latitude) over the sphere is 1/3 (it would be 1/2 without area weights).
    field = torch.sin(lat)[None, :, None, None].square().expand(64, 33, 1, 1)
    assert float(t.mean(field)) == pytest.approx(1 / 3, abs=1e-3)


def test_latitudes_follow_the_grid_type() -> None:
    eq = latitudes(5, "equiangular")
    torch.testing.assert_close(eq, torch.tensor([90.0, 45.0, 0.0, -45.0, -90.0], dtype=torch.float64).deg2rad())
    gauss = latitudes(4, "legendre-gauss")
    assert gauss[0] < math.pi / 2 and gauss[-1] > -math.pi / 2  # Gauss nodes exclude the poles
    torch.testing.assert_close(gauss, -gauss.flip(0))  # symmetric about the equator
    with pytest.raises(ValueError, match="unknown grid type 'healpix'"):
        GridTransform(9, 16, 4, "healpix")
    with pytest.raises(ValueError, match="Nyquist"):
        GridTransform(9, 16, 9, "equiangular")


def test_transforms_have_correct_gradients() -> None:
    t = GridTransform(5, 8, 3, "legendre-gauss").double()
    x = torch.randn(8, 5, 1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(t.analysis, (x,))
    c = torch.randn(2, 3, 3, 1, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(t.synthesis, (c,))
