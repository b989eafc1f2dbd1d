"""Spherical Fourier Neural Operator (Bonev et al. 2023) on torch-harmonics' transforms, grid-agnostic.

Layout (after torch-harmonics' ``examples/models/sfno.py``, written as its own small module)::

    x ─ encoder (1×1 MLP) ─ + pos-embed(φ, λ) ─ block × num_layers ─ decoder (1×1 MLP) ─ y

A block maps ``x`` on grid A to grid B (A = data grid for the first block, B = data grid for the
last one, the latent Gauss–Legendre grid otherwise)::

    x̂ = SHT_A(x)                                  (complex, degrees l < L, orders m < L)
    r = x if A == B else ISHT_B(x̂)                 (spectral resampling of the skip path)
    s = ISHT_B( Σ_i W[o, i, l] · x̂[i, l, m] )       ("Driscoll–Healy": one weight per degree l,
                                                    shared by every order m → rotation-equivariant)
    out = r + MLP(GELU(s + Conv1×1(r)))

Grid-agnostic: weights are indexed by spherical-harmonic degree up to a fixed ``lmax`` chosen at
construction, and the positional embedding is an MLP of (sin φ, cos φ, cos φ·cos kλ, cos φ·sin kλ),
so :meth:`SFNO.set_grid` only rebuilds the (parameter-free) transforms for another ``nlat × nlon``
and the same weights run there (zero-shot super-/sub-resolution).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint
from torch_harmonics import InverseRealSHT, RealSHT

log = logging.getLogger(__name__)

DATA_GRID = "equiangular"  # 90 → −90 with both poles: torch-harmonics' "equiangular" nodes
LATENT_GRID = "legendre-gauss"  # exact quadrature up to degree nlat inside the network
POS_HARMONICS = 2  # longitude wavenumbers seen by the positional embedding


def latent_shape(nlat: int, nlon: int, scale_factor: int) -> tuple[int, int]:
    """Shape of the latent grid for a data grid with poles downsampled by ``scale_factor``."""
    return (nlat - 1) // scale_factor + 1, nlon // scale_factor


def default_lmax(nlat: int, nlon: int, scale_factor: int = 1) -> int:
    """Spectral truncation the torch-harmonics example uses for a grid: min(latent nlat, nlon/2)."""
    h, w = latent_shape(nlat, nlon, scale_factor)
    return min(h, w // 2)


def make_transforms(nlat: int, nlon: int, lmax: int, grid: str) -> tuple[RealSHT, InverseRealSHT]:
    """Forward and inverse real SHT pair on one grid, truncated triangularly at ``lmax``."""
    # Explicit lmax/mmax: the implicit defaults changed in torch-harmonics 0.9 and warn.
    return (RealSHT(nlat, nlon, lmax=lmax, mmax=lmax, grid=grid).float(),
            InverseRealSHT(nlat, nlon, lmax=lmax, mmax=lmax, grid=grid).float())


class Pointwise(nn.Module):
    """A 1×1 convolution written as a channel contraction (several times faster than mkldnn's on CPU)."""

    def __init__(self, cin: int, cout: int, gain: float, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(math.sqrt(gain / cin) * torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix channels of ``(batch, cin, nlat, nlon)`` independently at every grid point."""
        y = torch.einsum("bihw,oi->bohw", x, self.weight.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)[:, None, None]


def _mlp(cin: int, hidden: int, cout: int, out_gain: float) -> nn.Sequential:
    return nn.Sequential(Pointwise(cin, hidden, 2.0), nn.GELU(), Pointwise(hidden, cout, out_gain, bias=False))


class SpectralConv(nn.Module):
    """Per-degree complex weights contracted over channels: ``y[o,l,m] = Σ_i W[o,i,l] x[i,l,m]``."""

    def __init__(self, channels: int, lmax: int, gain: float = 1.0) -> None:
        super().__init__()
        # Stored as real (…, 2) rather than complex: DDP buckets and every optimizer handle it.
        scale = math.sqrt(gain / channels / 2.0)
        self.weight = nn.Parameter(scale * torch.randn(channels, channels, lmax, 2))

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Apply the weights to SHT coefficients ``(batch, channel, l, m)`` with l ≤ lmax."""
        lmax = coeffs.shape[-2]
        w = torch.view_as_complex(self.weight[:, :, :lmax].contiguous()).to(coeffs.dtype)
        return torch.einsum("bilm,oil->bolm", coeffs, w)


class SFNOBlock(nn.Module):
    """One spherical Fourier block: global spectral convolution + local skip, GELU, residual MLP."""

    def __init__(self, dim: int, lmax: int, mlp_ratio: float) -> None:
        super().__init__()
        # Spectral and 1×1 paths are summed, so each gets half the He gain.
        self.spectral = SpectralConv(dim, lmax, gain=1.0)
        self.skip = Pointwise(dim, dim, 1.0)
        self.act = nn.GELU()
        # Small output gain: the block starts close to the identity, which keeps deep rollouts tame.
        self.mlp = _mlp(dim, int(dim * mlp_ratio), dim, out_gain=0.5)

    def forward(self, x: torch.Tensor, sht: RealSHT, isht: InverseRealSHT, same_grid: bool) -> torch.Tensor:
        """Map ``x`` from ``sht``'s grid to ``isht``'s grid."""
        dtype = x.dtype
        # SHTs stay in float32 even under autocast: bf16 Legendre sums lose the small scales.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x if x.dtype in (torch.float32, torch.float64) else x.float()
            coeffs = sht(x)
            residual = x if same_grid else isht(coeffs)
            spectral = isht(self.spectral(coeffs))
        y = self.act(spectral.to(dtype) + self.skip(residual.to(dtype)))
        return residual.to(dtype) + self.mlp(y)


class PositionEmbedding(nn.Module):
    """A learned function of position on the sphere, evaluated on whatever grid is current."""

    def __init__(self, dim: int, harmonics: int = POS_HARMONICS) -> None:
        super().__init__()
        self.harmonics = harmonics
        self.net = _mlp(2 + 2 * harmonics, dim, dim, out_gain=0.1)
        self.register_buffer("features", torch.zeros(0), persistent=False)

    def set_grid(self, nlat: int, nlon: int) -> None:
        """Precompute the input features for an equiangular ``nlat × nlon`` grid."""
        lat = torch.linspace(math.pi / 2, -math.pi / 2, nlat, dtype=torch.float64)[:, None].expand(nlat, nlon)
        lon = (torch.arange(nlon, dtype=torch.float64) * (2 * math.pi / nlon))[None, :].expand(nlat, nlon)
        feats = [torch.sin(lat), torch.cos(lat)]
        for k in range(1, self.harmonics + 1):
            # cos φ factor: longitude harmonics vanish at the poles, so the embedding is continuous there.
            feats += [torch.cos(lat) * torch.cos(k * lon), torch.cos(lat) * torch.sin(k * lon)]
        self.features = torch.stack(feats)[None].float().to(self.features.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the embedding (one vector per grid point) to ``x``."""
        return x + self.net(self.features.to(x.dtype))


class SFNO(nn.Module):
    """Spherical Fourier Neural Operator mapping ``(batch, in_channels, nlat, nlon)`` to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, nlat: int, nlon: int, embed_dim: int = 32,
                 num_layers: int = 4, mlp_ratio: float = 2.0, scale_factor: int = 1, pos_embed: bool = True,
                 lmax: int | None = None) -> None:
        super().__init__()
        if num_layers < 1 or embed_dim < 1 or scale_factor < 1:
            raise ValueError(f"SFNO needs num_layers, embed_dim, scale_factor ≥ 1, got {num_layers}, {embed_dim}, {scale_factor}")
        self.lmax = lmax or default_lmax(nlat, nlon, scale_factor)
        self.scale_factor = scale_factor
        self.arch: dict[str, Any] = {
            "in_channels": in_channels, "out_channels": out_channels, "nlat": nlat, "nlon": nlon,
            "embed_dim": embed_dim, "num_layers": num_layers, "mlp_ratio": mlp_ratio,
            "scale_factor": scale_factor, "pos_embed": pos_embed, "lmax": self.lmax,
        }
        hidden = int(embed_dim * mlp_ratio)
        self.encoder = _mlp(in_channels, hidden, embed_dim, out_gain=1.0)
        self.pos_embed = PositionEmbedding(embed_dim) if pos_embed else None
        self.blocks = nn.ModuleList(SFNOBlock(embed_dim, self.lmax, mlp_ratio) for _ in range(num_layers))
        self.decoder = _mlp(embed_dim, hidden, out_channels, out_gain=1.0)
        # Training-time switch, not architecture: recompute each block in the backward pass
        # instead of keeping its activations (less memory, ~one more forward of compute).
        self.checkpoint_blocks = False
        self.set_grid(nlat, nlon)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """The ``(nlat, nlon)`` the transforms are currently built for."""
        return self.nlat, self.nlon

    def set_grid(self, nlat: int, nlon: int) -> None:
        """Rebuild the transforms (and position features) for ``nlat × nlon``, keeping all weights."""
        h, w = latent_shape(nlat, nlon, self.scale_factor)
        lmax = min(self.lmax, h, w // 2)
        if lmax < 2:
            raise ValueError(f"grid {nlat}x{nlon} is too coarse for scale_factor {self.scale_factor}")
        self.nlat, self.nlon, self.grid_lmax = nlat, nlon, lmax
        # Transforms hold only non-persistent buffers, so the state_dict is the same on every grid.
        self.sht_in, self.isht_out = make_transforms(nlat, nlon, lmax, DATA_GRID)
        self.sht_latent, self.isht_latent = make_transforms(h, w, lmax, LATENT_GRID)
        if self.pos_embed is not None:
            self.pos_embed.set_grid(nlat, nlon)
        device = next(self.parameters()).device
        self.to(device)
        log.debug("SFNO grid set to %dx%d (latent %dx%d, lmax %d)", nlat, nlon, h, w, lmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the operator to ``(batch, in_channels, nlat, nlon)`` on the current grid."""
        if tuple(x.shape[-2:]) != (self.nlat, self.nlon):
            raise ValueError(f"input grid {tuple(x.shape[-2:])} != model grid {(self.nlat, self.nlon)}; call set_grid first")
        x = self.encoder(x)
        if self.pos_embed is not None:
            x = self.pos_embed(x)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            sht = self.sht_in if i == 0 else self.sht_latent
            isht = self.isht_out if i == last else self.isht_latent
            same = (sht.nlat, sht.nlon, sht.grid) == (isht.nlat, isht.nlon, isht.grid)
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                x = activation_checkpoint(block, x, sht, isht, same_grid=same, use_reentrant=False)
            else:
                x = block(x, sht, isht, same_grid=same)
        return self.decoder(x)
