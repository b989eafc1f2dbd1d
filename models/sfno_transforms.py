"""Real spherical harmonic transforms in the SFNO's working layout, built on torch-harmonics' tables.

Inside the network a field lives as ``(nlon, nlat, batch, channel)`` — longitude-major, channels
last — so that every 1×1 layer is one GEMM over the contiguous channel axis and both steps of the
transform are plain (batched) GEMMs over the leading axes, with no complex tensors, transposes or
padding in between::

    X_r[m, k, ·] = Σ_λ F_r[m, λ] f[λ, k, ·]              longitude DFT, r ∈ {re, im}  (one GEMM)
    c_r[m, l, ·] = Σ_k P[m, l, k] X_r[m, k, ·]            Legendre analysis, batched over m
    z_r[m, k, ·] = Σ_l Q[m, k, l] c_r[m, l, ·]            Legendre synthesis, batched over m
    f[λ, k, ·]   = Σ_{r,m} G_r[λ, m] z_r[m, k, ·]         inverse DFT (two GEMMs, one fused add)

``P`` (quadrature weights × 2π × associated Legendre functions) and ``Q`` are exactly the buffers of
``torch_harmonics.RealSHT`` / ``InverseRealSHT`` for the same grid, normalisation ("ortho") and
truncation, so the transforms compute the same function (to float rounding; see the tests).
Coefficients are one real ``(2, mmax, lmax, batch, channel)`` tensor (real part, imaginary part). The imaginary
part of order 0 is ignored by the synthesis (``G_im[λ, 0] = −sin 0 = 0``), like torch-harmonics' irfft.
For wide grids (see ``DFT_MAX_NLON_*``) the longitude step uses ``torch.fft`` instead of a DFT matrix.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch import nn
from torch_harmonics.legendre import legpoly
from torch_harmonics.quadrature import precompute_latitudes

from core.errors import ConfigError

log = logging.getLogger(__name__)

GRIDS = ("equiangular", "legendre-gauss", "lobatto", "equiangular-trapezoidal")
# Above these many longitudes the longitude step uses torch.fft instead of a DFT GEMM. Measured on
# this project's CPU (1 thread, fwd+bwd, batch·channels 64): the GEMM is faster for the analysis up to
# 512 longitudes (rfft along the leading axis plus the real/imaginary split costs more) and for the
# synthesis up to 128 (even there; the FFT is ~27 % faster at 256).
DFT_MAX_NLON_ANALYSIS = 512
DFT_MAX_NLON_SYNTHESIS = 128
# Legendre tables up to this many entries are stored twice (for the real and the imaginary rows) so
# that each Legendre step is one batched GEMM; larger ones (≥ 1° grids) are shared by two GEMMs.
DUPLICATE_MAX = 1 << 24


def latitudes(nlat: int, grid: str) -> torch.Tensor:
    """Latitudes in radians, north to south, of a grid type (float64)."""
    if grid == "equiangular":
        # Written out (rather than arccos of the quadrature nodes) so positions are bit-identical to
        # those the model has always been trained with.
        return torch.linspace(math.pi / 2, -math.pi / 2, nlat, dtype=torch.float64)
    colat, _ = precompute_latitudes(nlat, grid=grid)
    return math.pi / 2 - colat.to(torch.float64)


@functools.lru_cache(maxsize=4)
def legendre_tables(nlat: int, lmax: int, grid: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The analysis ``(m, l, k)`` and synthesis ``(m, k, l)`` float32 tables of torch-harmonics' real SHT pair.

    Equal to ``RealSHT(…).weights`` and ``InverseRealSHT(…).pct`` with "ortho" normalisation (for which
    the forward and inverse Legendre values coincide), but the associated Legendre functions are
    evaluated once instead of once per module: at 721 latitudes and lmax 240 that recurrence is most of
    the cost of building a 0.25° model. Cached (a few grids), since ``set_grid`` swaps back and forth;
    callers must not modify the returned tensors in place.
    """
    colat, quad = precompute_latitudes(nlat, grid=grid)
    pct = legpoly(lmax, lmax, torch.cos(colat), norm="ortho", csphase=True)  # float64 (m, l, k)
    analysis = (pct * (2.0 * math.pi * quad)).float()
    return analysis, pct.permute(0, 2, 1).float()


class GridTransform(nn.Module):
    """Forward (analysis) and inverse (synthesis) real SHT on one ``nlat × nlon`` grid, truncated at ``lmax``."""

    def __init__(self, nlat: int, nlon: int, lmax: int, grid: str) -> None:
        super().__init__()
        if grid not in GRIDS:
            raise ConfigError(f"unknown grid type {grid!r}; expected one of {', '.join(GRIDS)}")
        if lmax > nlon // 2:
            raise ConfigError(f"lmax {lmax} exceeds the longitude Nyquist limit {nlon // 2} of a {nlat}x{nlon} grid")
        self.nlat, self.nlon, self.lmax, self.grid = nlat, nlon, lmax, grid
        self.analysis_fft, self.synthesis_fft = nlon > DFT_MAX_NLON_ANALYSIS, nlon > DFT_MAX_NLON_SYNTHESIS
        analysis, synthesis = legendre_tables(nlat, lmax, grid)  # (m, l, k) and (m, k, l)
        # All buffers are non-persistent: the state_dict is the same on every grid.
        if analysis.numel() <= DUPLICATE_MAX:
            # One table per real row (re m…, im m…): each Legendre step is then a single batched GEMM.
            analysis, synthesis = torch.cat([analysis, analysis]), torch.cat([synthesis, synthesis])
        # Value of the field synthesised from a unit real (l=0, m=0) coefficient (1/√(4π) with "ortho");
        # a Python float so using it never synchronises a GPU.
        self.constant = float(synthesis[0, 0, 0])
        self.register_buffer("analysis_legendre", analysis.contiguous(), persistent=False)
        self.register_buffer("synthesis_legendre", synthesis.contiguous(), persistent=False)
        _, quad = precompute_latitudes(nlat, grid=grid)
        # Area weights of the grid points, summing to 1 over the sphere (for spherical statistics).
        self.register_buffer("area", (quad / quad.sum() / nlon).float(), persistent=False)
        lon = torch.arange(nlon, dtype=torch.float64) * (2 * math.pi / nlon)
        angle = torch.arange(lmax, dtype=torch.float64)[:, None] * lon[None, :]  # (m, λ)
        if not self.analysis_fft:  # the rows of rfft(norm="forward")
            dft = torch.cat([torch.cos(angle), -torch.sin(angle)]) / nlon  # (re m…, im m…) × λ
            self.register_buffer("dft", dft.float().contiguous(), persistent=False)
        if not self.synthesis_fft:  # the columns of irfft(norm="forward"), Hermitian doubling for m > 0
            double = torch.full((lmax, 1), 2.0, dtype=torch.float64)
            double[0] = 1.0
            idft = torch.cat([torch.cos(angle) * double, -torch.sin(angle) * double]).T  # λ × (re m…, im m…)
            self.register_buffer("idft", idft.float().contiguous(), persistent=False)

    def extra_repr(self) -> str:
        return f"nlat={self.nlat}, nlon={self.nlon}, lmax={self.lmax}, grid={self.grid}"

    def same_grid(self, other: GridTransform) -> bool:
        """Whether ``other`` samples the sphere at the same points."""
        return (self.nlat, self.nlon, self.grid) == (other.nlat, other.nlon, other.grid)

    def _legendre(self, table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Batched GEMM of the per-order ``table`` with the real and imaginary rows ``(2m, ·, ·)`` of ``x``."""
        table = table.to(x.dtype)
        if table.shape[0] == x.shape[0]:
            return torch.bmm(table, x)
        m = table.shape[0]
        return torch.cat([torch.bmm(table, x[:m]), torch.bmm(table, x[m:])])

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """``(nlon, nlat, batch, channel)`` field → coefficients ``(2, mmax, lmax, batch, channel)`` (re, im)."""
        w, k, *rest = x.shape
        m = self.lmax
        flat = x.reshape(w, -1)
        if self.analysis_fft:
            spec = torch.fft.rfft(flat, dim=0, norm="forward")[:m]
            rows = torch.cat([spec.real, spec.imag])
        else:
            rows = self.dft.to(x.dtype) @ flat  # (2m, k·batch·channel): real rows, then imaginary rows
        return self._legendre(self.analysis_legendre, rows.view(2 * m, k, -1)).view(2, m, self.lmax, *rest)

    def synthesis(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Coefficients ``(2, mmax, lmax, batch, channel)`` → ``(nlon, nlat, batch, channel)`` field."""
        _, m, lmax, *rest = coeffs.shape
        z = self._legendre(self.synthesis_legendre, coeffs.reshape(2 * m, lmax, -1))  # (2m, k, batch·channel)
        if self.synthesis_fft:
            # Order 0 of a real field has no imaginary part; drop it as torch-harmonics' irfft does.
            im = torch.cat([torch.zeros_like(z[m:m + 1]), z[m + 1:]])
            spec = torch.complex(z[:m], im)
            pad = spec.new_zeros((self.nlon // 2 + 1 - m, *spec.shape[1:]))
            # irfft along a leading axis returns longitude innermost in memory (a transposed view);
            # the layout contract is a contiguous (nlon, nlat, batch, channel) field, which every 1×1
            # GEMM and in-place update downstream relies on, so make the one copy here.
            out = torch.fft.irfft(torch.cat([spec, pad]), n=self.nlon, dim=0, norm="forward").contiguous()
        else:
            out = self.idft.to(coeffs.dtype) @ z.view(2 * m, -1)
        return out.view(self.nlon, self.nlat, *rest)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Area-weighted mean over the sphere of ``(nlon, nlat, batch, channel)`` → ``(batch, channel)``."""
        return torch.einsum("wk...,k->...", x, self.area.to(x.dtype))
