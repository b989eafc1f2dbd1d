"""Spherical Fourier Neural Operator (Bonev et al. 2023) on torch-harmonics' transforms, grid-agnostic.

Layout (after torch-harmonics' ``examples/models/sfno.py`` and makani's SFNO, as its own small module)::

    x ─ encoder (1×1 MLP) ─ + pos-embed(φ, λ) ─ block × num_layers ─ decoder (1×1 MLP) ─ y
    └───────────────────────── big skip (optional: concat to decoder input, or add) ──────┘

The first block maps the data grid to the latent grid (Gauss–Legendre by default, downsampled by
``scale_factor``), the last one maps back; see :mod:`models.sfno_layers` for a block and
:mod:`models.sfno_transforms` for the transforms. Internally fields are ``(nlon, nlat, batch,
channel)``: 1×1 layers are single GEMMs and the transforms need no complex tensors or transposes.

Grid-agnostic: spectral weights are indexed by spherical-harmonic degree up to a fixed ``lmax``
chosen at construction, every other layer is pointwise, normalizations use area-weighted
statistics, and the positional embedding is an MLP of (sin φ, cos φ, cos φ·cos kλ, cos φ·sin kλ), so
:meth:`SFNO.set_grid` only rebuilds the (parameter-free) transforms for another ``nlat × nlon`` and
the same weights run there (zero-shot super-/sub-resolution).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from typing import Any, get_args

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from core.config_model import (
    DEFAULT_RANK,
    Activation,
    BigSkip,
    Factorization,
    GridType,
    Normalization,
    OperatorType,
    PosEmbed,
    Preset,
    Skip,
    preset_conflicts,
    rank_problem,
)
from core.errors import ConfigError
from core.grid import check_scale_factor, latent_shape
from models.sfno_factorized import resolve_rank
from models.sfno_layers import MLP, Pointwise, SFNOBlock
from models.sfno_transforms import GridTransform, latitudes

log = logging.getLogger(__name__)

DATA_GRID = "equiangular"  # 90 → −90 with both poles: torch-harmonics' "equiangular" nodes
LATENT_GRID = "legendre-gauss"  # exact quadrature up to degree nlat inside the network
POS_HARMONICS = 2  # longitude wavenumbers seen by the positional embedding
_CHOICES = {"skip": Skip, "big_skip": BigSkip, "normalization": Normalization, "activation": Activation,
            "operator_type": OperatorType, "data_grid": GridType, "model_grid": GridType, "pos_embed": PosEmbed,
            "preset": Preset, "factorization": Factorization}


def default_lmax(nlat: int, nlon: int, scale_factor: int = 1) -> int:
    """Spectral truncation the torch-harmonics example uses for a grid: min(latent nlat, nlon/2)."""
    h, w = latent_shape(nlat, nlon, scale_factor)
    return min(h, w // 2)


def pos_embed_kind(value: bool | str) -> str:
    """The position embedding kind for a config value: ``true`` → "latlon", ``false`` → "none"."""
    if isinstance(value, bool):
        return "latlon" if value else "none"
    return value


def complete_arch(arch: Mapping[str, Any]) -> dict[str, Any]:
    """``arch`` as this version records it: options it lacks (older checkpoints) get their defaults."""
    defaults = {name: p.default for name, p in inspect.signature(SFNO.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    full = {**defaults, **arch}
    full["pos_embed"] = pos_embed_kind(full["pos_embed"])
    if full["lmax"] is None:
        full["lmax"] = default_lmax(full["nlat"], full["nlon"], full["scale_factor"])
    return full


def check_options(**options: Any) -> None:
    """Raise one ``ValueError`` naming every SFNO option whose value is not allowed."""
    bad = []
    for name, value in options.items():
        if name in _CHOICES:
            allowed = get_args(_CHOICES[name])
            if (pos_embed_kind(value) if name == "pos_embed" else value) not in allowed:
                bad.append(f"{name}={value!r} (expected one of {', '.join(map(repr, allowed))})")
        elif name == "rank":
            if rank_problem(value):
                bad.append(rank_problem(value))
        elif name == "mlp_ratio":
            if not (isinstance(value, int | float) and not isinstance(value, bool) and value > 0):
                bad.append(f"mlp_ratio={value!r} (expected > 0)")
        elif name in ("use_mlp", "block_activation"):
            if not isinstance(value, bool):
                bad.append(f"{name}={value!r} (expected true or false)")
        elif not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            bad.append(f"{name}={value!r} (expected an integer ≥ 1)")
    if bad:
        raise ConfigError("invalid SFNO options: " + "; ".join(bad))


class PositionEmbedding(nn.Module):
    """A learned function of position on the sphere, evaluated on whatever grid is current."""

    def __init__(self, dim: int, kind: str = "latlon", harmonics: int = POS_HARMONICS, act: str = "gelu") -> None:
        super().__init__()
        self.harmonics = harmonics if kind == "latlon" else 0
        self.net = MLP(2 + 2 * self.harmonics, dim, dim, 2, out_gain=0.1, act=act)
        self.register_buffer("features", torch.zeros(0), persistent=False)

    def set_grid(self, nlat: int, nlon: int, grid: str = DATA_GRID) -> None:
        """Precompute the input features ``(nlon, nlat, feature)`` for a grid."""
        lat = latitudes(nlat, grid)[None, :].expand(nlon, nlat)
        lon = (torch.arange(nlon, dtype=torch.float64) * (2 * math.pi / nlon))[:, None].expand(nlon, nlat)
        feats = [torch.sin(lat), torch.cos(lat)]
        for k in range(1, self.harmonics + 1):
            # cos φ factor: longitude harmonics vanish at the poles, so the embedding is continuous there.
            feats += [torch.cos(lat) * torch.cos(k * lon), torch.cos(lat) * torch.sin(k * lon)]
        self.features = torch.stack(feats, dim=-1).float().to(self.features.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the embedding (one vector per grid point, shared by the batch) to ``(nlon, nlat, batch, dim)``."""
        return x + self.net(self.features.to(x.dtype))[:, :, None, :]


class SFNO(nn.Module):
    """Spherical Fourier Neural Operator mapping ``(batch, in_channels, nlat, nlon)`` to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, nlat: int, nlon: int, embed_dim: int = 32,
                 num_layers: int = 4, mlp_ratio: float = 2.0, scale_factor: int = 1, pos_embed: bool | str = True,
                 lmax: int | None = None, *, encoder_layers: int = 2, decoder_layers: int = 2, use_mlp: bool = True,
                 preset: str = "none", block_activation: bool = True,
                 skip: str = "linear", big_skip: str = "none", normalization: str = "none", activation: str = "gelu",
                 operator_type: str = "driscoll-healy", data_grid: str = DATA_GRID,
                 model_grid: str = LATENT_GRID, factorization: str = "dense", rank: float = DEFAULT_RANK) -> None:
        super().__init__()
        check_options(in_channels=in_channels, out_channels=out_channels, nlat=nlat, nlon=nlon,
                      embed_dim=embed_dim, num_layers=num_layers, mlp_ratio=mlp_ratio, scale_factor=scale_factor,
                      encoder_layers=encoder_layers, decoder_layers=decoder_layers, use_mlp=use_mlp, skip=skip,
                      big_skip=big_skip, normalization=normalization, activation=activation,
                      operator_type=operator_type, data_grid=data_grid, model_grid=model_grid, pos_embed=pos_embed)
        if lmax is not None:
            check_options(lmax=lmax)
        check_options(preset=preset, block_activation=block_activation)
        # A preset names a layout; options that leave it are refused rather than silently changing it.
        conflicts = preset_conflicts(preset, {
            "encoder_layers": encoder_layers, "decoder_layers": decoder_layers, "pos_embed": pos_embed, "skip": skip,
            "big_skip": big_skip, "normalization": normalization, "operator_type": operator_type,
            "block_activation": block_activation, "activation": activation, "factorization": factorization})
        if conflicts:
            raise ConfigError("invalid SFNO options: " + "; ".join(conflicts))
        self.lmax = lmax or default_lmax(nlat, nlon, scale_factor)
        check_options(factorization=factorization, rank=rank)
        if factorization != "dense":  # a rank larger than the full tensor fails here, before any weight is made
            resolve_rank(factorization, (embed_dim, embed_dim, self.lmax, *(
                (self.lmax,) if operator_type == "diagonal" else ())), rank)
        self.scale_factor, self.data_grid, self.model_grid, self.big_skip = scale_factor, data_grid, model_grid, big_skip
        kind = pos_embed_kind(pos_embed)
        # Complete and JSON-serialisable: checkpoint.build_model rebuilds the network as SFNO(**arch).
        self.arch: dict[str, Any] = {
            "in_channels": in_channels, "out_channels": out_channels, "nlat": nlat, "nlon": nlon,
            "embed_dim": embed_dim, "num_layers": num_layers, "mlp_ratio": mlp_ratio,
            "scale_factor": scale_factor, "pos_embed": kind, "lmax": self.lmax,
            "encoder_layers": encoder_layers, "decoder_layers": decoder_layers, "use_mlp": use_mlp, "skip": skip,
            "big_skip": big_skip, "normalization": normalization, "activation": activation,
            "operator_type": operator_type, "data_grid": data_grid, "model_grid": model_grid,
            "factorization": factorization, "rank": rank,
        }
        self.arch.update(preset=preset, block_activation=block_activation)
        hidden = int(embed_dim * mlp_ratio)
        # Construction order is part of the contract: with the default options the same seed gives the
        # same initial weights as every earlier version of this model.
        self.encoder = MLP(in_channels, hidden, embed_dim, encoder_layers, out_gain=1.0, act=activation)
        self.pos_embed = PositionEmbedding(embed_dim, kind, act=activation) if kind != "none" else None
        self.blocks = nn.ModuleList(
            SFNOBlock(embed_dim, self.lmax, mlp_ratio, use_mlp=use_mlp, skip=skip, normalization=normalization,
                      activation=activation, operator_type=operator_type, block_activation=block_activation,
                      factorization=factorization, rank=rank)
            for _ in range(num_layers))
        decoder_in = embed_dim + (in_channels if big_skip == "concat" else 0)
        self.decoder = MLP(decoder_in, hidden, out_channels, decoder_layers, out_gain=0.5 if big_skip == "add" else 1.0,
                           act=activation)
        # makani's big skip: a learned 1×1 map of the input added to the output (no channel-count constraint).
        self.residual_transform = Pointwise(in_channels, out_channels, 0.5, bias=False) if big_skip == "add" else None
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
        check_scale_factor(nlat, nlon, self.scale_factor)
        h, w = latent_shape(nlat, nlon, self.scale_factor)
        lmax = min(self.lmax, h, w // 2)
        self.nlat, self.nlon, self.grid_lmax = nlat, nlon, lmax
        # Transforms hold only non-persistent buffers, so the state_dict is the same on every grid.
        self.data_transform = GridTransform(nlat, nlon, lmax, self.data_grid)
        if (h, w, self.model_grid) == (nlat, nlon, self.data_grid):
            self.latent_transform = self.data_transform  # one set of tables; blocks then skip the resampling
        else:
            self.latent_transform = GridTransform(h, w, lmax, self.model_grid)
        if self.pos_embed is not None:
            self.pos_embed.set_grid(nlat, nlon, self.data_grid)
        device = next(self.parameters()).device
        self.to(device)
        log.debug("SFNO grid set to %dx%d (latent %dx%d %s, lmax %d)", nlat, nlon, h, w, self.model_grid, lmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the operator to ``(batch, in_channels, nlat, nlon)`` on the current grid."""
        if tuple(x.shape[-2:]) != (self.nlat, self.nlon):
            raise ValueError(f"input grid {tuple(x.shape[-2:])} != model grid {(self.nlat, self.nlon)}; call set_grid first")
        inp = x.permute(3, 2, 0, 1).contiguous()  # (nlon, nlat, batch, channel)
        h = self.encoder(inp)
        if self.pos_embed is not None:
            h = self.pos_embed(h)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            sht = self.data_transform if i == 0 else self.latent_transform
            isht = self.data_transform if i == last else self.latent_transform
            if self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                h = activation_checkpoint(block, h, sht, isht, use_reentrant=False)
            else:
                h = block(h, sht, isht)
        if self.big_skip == "concat":
            h = torch.cat([h, inp.to(h.dtype)], dim=-1)
        residual = self.residual_transform(inp) if self.residual_transform is not None else None
        return self.decoder(h, residual=residual).permute(2, 3, 1, 0).contiguous()
