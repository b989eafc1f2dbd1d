"""The SFNO written out plainly: NCHW fields, torch-harmonics' own RealSHT/InverseRealSHT, einsum.

The model in :mod:`models.sfno` computes the same function in a fast layout (channels-last, DFT
GEMMs, the linear skip folded into the spectral weights, fused residual GEMMs). This module is the
unfolded computation it must equal for every architecture option: it reads the weights of a built
model and applies them step by step, with no code shared with the model beyond those weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch_harmonics import InverseRealSHT, RealSHT
from torch_harmonics.quadrature import precompute_latitudes

from models.sfno import SFNO
from models.sfno_layers import ChannelLayerNorm, Pointwise, SphereInstanceNorm


def _pointwise(layer: Pointwise, x: torch.Tensor) -> torch.Tensor:
    y = torch.einsum("bihw,oi->bohw", x, layer.weight)
    return y if layer.bias is None else y + layer.bias[:, None, None]


def _sequential(seq: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for mod in seq:
        x = _pointwise(mod, x) if isinstance(mod, Pointwise) else mod(x)
    return x


def _latitudes(nlat: int, grid: str) -> torch.Tensor:
    colat, _ = precompute_latitudes(nlat, grid=grid)
    return math.pi / 2 - colat.to(torch.float64)


def _position_features(model: SFNO) -> torch.Tensor:
    """(1, features, nlat, nlon): sin φ, cos φ, then cos φ·(cos kλ, sin kλ) for each longitude harmonic."""
    lat = _latitudes(model.nlat, model.data_grid)[:, None].expand(model.nlat, model.nlon)
    lon = (torch.arange(model.nlon, dtype=torch.float64) * (2 * math.pi / model.nlon))[None, :].expand_as(lat)
    feats = [torch.sin(lat), torch.cos(lat)]
    for k in range(1, model.pos_embed.harmonics + 1):
        feats += [torch.cos(lat) * torch.cos(k * lon), torch.cos(lat) * torch.sin(k * lon)]
    return torch.stack(feats)[None].float()


def _spectral_weight(spectral: nn.Module, lmax: int) -> torch.Tensor:
    """The block's complex weight ``(o, i, l)`` or ``(o, i, l, m)``, truncated to the current grid's lmax."""
    dense = spectral.weight.dense() if hasattr(spectral.weight, "dense") else spectral.weight
    index = (slice(None), slice(None), slice(0, lmax)) + ((slice(0, lmax),) if dense.dim() == 5 else ())
    return torch.view_as_complex(dense[index].contiguous())


def _norm(norm: nn.Module, x: torch.Tensor, nlat: int, grid: str) -> torch.Tensor:
    if isinstance(norm, ChannelLayerNorm):
        return torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias,
                                              norm.eps).permute(0, 3, 1, 2)
    assert isinstance(norm, SphereInstanceNorm)
    _, quad = precompute_latitudes(nlat, grid=grid)
    area = (quad / quad.sum() / x.shape[-1]).float()[:, None]  # (nlat, 1): sums to 1 over the grid

    def mean(t: torch.Tensor) -> torch.Tensor:
        return (t * area).sum(dim=(-2, -1), keepdim=True)

    centred = x - mean(x)
    return centred * torch.rsqrt(mean(centred.square()) + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]


def plain_forward(model: SFNO, x: torch.Tensor) -> torch.Tensor:
    """The output of ``model`` for ``x`` ``(batch, channel, nlat, nlon)``, computed the plain way (float32)."""
    nlat, nlon, lmax, sf = model.nlat, model.nlon, model.grid_lmax, model.scale_factor
    h, w = (nlat - 1) // sf + 1, nlon // sf
    data = (nlat, nlon, model.data_grid)
    latent = (h, w, model.model_grid)

    def transforms(grid: tuple[int, int, str]) -> tuple[RealSHT, InverseRealSHT]:
        a, b, kind = grid
        return (RealSHT(a, b, lmax=lmax, mmax=lmax, grid=kind).float(),
                InverseRealSHT(a, b, lmax=lmax, mmax=lmax, grid=kind).float())

    pairs = {data: transforms(data)}
    pairs.setdefault(latent, transforms(latent))  # one pair when the latent grid is the data grid
    inp = x
    x = _sequential(model.encoder, x)
    if model.pos_embed is not None:
        x = x + _sequential(model.pos_embed.net, _position_features(model))
    last = len(model.blocks) - 1
    for i, blk in enumerate(model.blocks):
        src, dst = (data if i == 0 else latent), (data if i == last else latent)
        sht, isht = pairs[src][0], pairs[dst][1]
        coeffs = sht(x)
        residual = x if src == dst else isht(coeffs)
        weight = _spectral_weight(blk.spectral, lmax)
        rule = "bilm,oilm->bolm" if weight.dim() == 4 else "bilm,oil->bolm"
        s = isht(torch.einsum(rule, coeffs, weight))
        if blk.norm is not None:
            s = _norm(blk.norm, s, dst[0], dst[2])
        if blk.skip is not None:
            s = s + _pointwise(blk.skip, residual)
        elif blk.skip_kind == "identity":
            s = s + residual
        y = blk.act(s)
        x = residual + (_sequential(blk.mlp, y) if blk.mlp is not None else y)
    if model.big_skip == "concat":
        x = torch.cat([x, inp], dim=1)
    out = _sequential(model.decoder, x)
    if model.residual_transform is not None:
        out = out + _pointwise(model.residual_transform, inp)
    return out
