"""SFNO building blocks in the longitude-major, channels-last layout ``(nlon, nlat, batch, channel)``.

A block maps ``x`` on grid A to grid B (see :mod:`models.sfno`)::

    c = SHT_A(x)                              (re, im) coefficients, degrees l < L, orders m < L
    r = x if A == B else ISHT_B(c)            spectral resampling of the residual path
    s = norm(ISHT_B(K c))                     K: per-degree ("Driscoll–Healy") or per-(l, m) weights
    y = act(s + skip(r))                      skip: linear 1×1 | identity | none; act: none without
                                              block_activation (the reference layout, models.sfno_reference)
    out = r + MLP(y)                          (or r + y without the MLP)

Every 1×1 layer is one GEMM on the contiguous channel axis and the residual additions are folded
into the GEMM that precedes them (``addmm``). Without a norm, the linear skip is folded into the
spectral path (same function, fewer passes over memory): its bias becomes a degree-0 coefficient,
and on a resampling block its weights join the spectral weights, since ``S·ISHT(c) = ISHT(S·c)``.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.nn import functional

from core.config_model import DEFAULT_RANK
from models.sfno_factorized import FactorizedWeight, factorized_weight
from models.sfno_transforms import GridTransform

log = logging.getLogger(__name__)

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


class Pointwise(nn.Module):
    """A 1×1 convolution on channels-last fields: one GEMM over the last axis."""

    def __init__(self, cin: int, cout: int, gain: float, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(math.sqrt(gain / cin) * torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the channels of ``(…, cin)`` independently at every grid point."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return functional.linear(x, self.weight.to(x.dtype), bias)

    def add_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``base + self(x)`` as one fused GEMM (``addmm``), ``base`` of shape ``(…, cout)``."""
        w = self.weight.to(x.dtype)
        out = torch.addmm(base.reshape(-1, w.shape[0]).to(x.dtype), x.reshape(-1, w.shape[1]), w.t())
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.view(base.shape)


class MLP(nn.Sequential):
    """``layers`` 1×1 layers with activations between them (keys ``0``, ``2``, … as in ``nn.Sequential``)."""

    def __init__(self, cin: int, hidden: int, cout: int, layers: int, out_gain: float, act: str) -> None:
        mods: list[nn.Module] = []
        for _ in range(layers - 1):
            mods += [Pointwise(cin, hidden, 2.0), ACTIVATIONS[act]()]
            cin = hidden
        # No bias on the output layer, as in the original architecture (checkpoints hold its parameter list).
        mods.append(Pointwise(cin, cout, out_gain, bias=False))
        super().__init__(*mods)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the layers to ``x``; with ``residual``, return ``residual + MLP(x)`` (fused into the last GEMM)."""
        *hidden, last = self
        for mod in hidden:
            x = mod(x)
        return last(x) if residual is None else last.add_to(residual, x)


class SpectralConv(nn.Module):
    """Complex weights contracted over channels, per degree (``W[o,i,l]``) or per degree and order (``W[o,i,l,m]``)."""

    def __init__(self, channels: int, lmax: int, gain: float, operator_type: str = "driscoll-healy",
                 factorization: str = "dense", rank: float = DEFAULT_RANK) -> None:
        super().__init__()
        self.operator_type = operator_type
        # Stored as real (…, 2) rather than complex: DDP buckets and every optimizer handle it.
        scale = math.sqrt(gain / channels / 2.0)
        orders = (lmax,) if operator_type == "diagonal" else ()
        if factorization == "dense":
            self.weight = nn.Parameter(scale * torch.randn(channels, channels, lmax, *orders, 2))
        else:  # CP / Tucker factors (models.sfno_factorized), applied without forming the dense tensor
            self.weight = factorized_weight(factorization, (channels, channels, lmax, *orders), rank, scale)

    def forward(self, coeffs: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients ``(2, m, l, batch, ci)`` (re, im) → filtered ``(2, m, l, batch, co)``.

        ``local`` ``(co, ci)``, if given, is a real channel map applied at every (l, m) on top of the
        weights — a 1×1 layer acting on the band-limited field, folded into the same GEMM.
        """
        if isinstance(self.weight, FactorizedWeight):
            return self.weight.contract(coeffs, local)
        _, m, lmax, b, ci = coeffs.shape
        w = self.weight[:, :, :lmax, :m] if self.operator_type == "diagonal" else self.weight[:, :, :lmax]
        # (l[, m], ci, co) real and imaginary parts, contiguous so the batched GEMM below is one BLAS call.
        dims = (2, 3, 1, 0) if self.operator_type == "diagonal" else (2, 1, 0)
        wr, wi = w[..., 0].permute(*dims).to(coeffs.dtype), w[..., 1].permute(*dims).to(coeffs.dtype)
        if local is not None:
            wr = wr + local.t().to(coeffs.dtype)
        co = wr.shape[-1]
        # Real form of the complex product: [re im] @ [[Wr Wi], [−Wi Wr]] (one GEMM per degree, or per
        # degree and order, instead of four), rows (order, batch), columns (part, channel).
        block = torch.cat([torch.cat([wr, wi], dim=-1), torch.cat([-wi, wr], dim=-1)], dim=-2)  # (…, 2ci, 2co)
        rows = coeffs.permute(2, 1, 3, 0, 4)  # (l, m, batch, part, ci): the one copy is made by reshape
        if self.operator_type == "diagonal":
            out = torch.bmm(rows.reshape(lmax * m, b, 2 * ci), block.reshape(lmax * m, 2 * ci, 2 * co))
        else:
            out = torch.bmm(rows.reshape(lmax, m * b, 2 * ci), block)
        return out.view(lmax, m, b, 2, co).permute(3, 1, 0, 2, 4).contiguous()


class SphereInstanceNorm(nn.Module):
    """Instance norm with area-weighted statistics over the sphere, so it means the same on every grid."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, grid: GridTransform) -> torch.Tensor:
        """Normalize each (sample, channel) of ``(nlon, nlat, batch, channel)`` to zero mean, unit variance."""
        centred = x - grid.mean(x)
        var = grid.mean(centred.square())
        return centred * torch.rsqrt(var + self.eps) * self.weight + self.bias


class ChannelLayerNorm(nn.LayerNorm):
    """Layer norm over the channels at each grid point (grid-agnostic, unlike a norm over ``(nlat, nlon)``)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-6)

    def forward(self, x: torch.Tensor, grid: GridTransform | None = None) -> torch.Tensor:  # noqa: ARG002
        """Normalize the channel vector of every grid point."""
        return super().forward(x)


def make_norm(kind: str, channels: int) -> nn.Module | None:
    """The block normalization ``kind`` ("none" | "layer" | "instance") for ``channels``, or None."""
    if kind == "layer":
        return ChannelLayerNorm(channels)
    if kind == "instance":
        return SphereInstanceNorm(channels)
    return None


class SFNOBlock(nn.Module):
    """One spherical Fourier block: global spectral convolution + local skip, activation, residual MLP."""

    def __init__(self, dim: int, lmax: int, mlp_ratio: float, *, use_mlp: bool = True, skip: str = "linear",
                 normalization: str = "none", activation: str = "gelu", operator_type: str = "driscoll-healy",
                 block_activation: bool = True, factorization: str = "dense", rank: float = DEFAULT_RANK) -> None:
        super().__init__()
        # Spectral and skip paths are summed, so each gets half the He gain (all of it without a skip).
        self.spectral = SpectralConv(dim, lmax, gain=1.0 if skip != "none" else 2.0, operator_type=operator_type,
                                     factorization=factorization, rank=rank)
        self.skip_kind = skip
        self.skip = Pointwise(dim, dim, 1.0) if skip == "linear" else None
        # Without the block activation (the reference layout) the MLP's hidden activation is the only one.
        self.act = ACTIVATIONS[activation]() if block_activation else nn.Identity()
        # Small output gain: the block starts close to the identity, which keeps deep rollouts tame. The
        # reference layout keeps the reference's initialisation (output gain 1) so the two train alike.
        out_gain = 0.5 if block_activation else 1.0
        self.mlp = MLP(dim, int(dim * mlp_ratio), dim, 2, out_gain=out_gain, act=activation) if use_mlp else None
        self.norm = make_norm(normalization, dim)

    def forward(self, x: torch.Tensor, sht: GridTransform, isht: GridTransform) -> torch.Tensor:
        """Map ``x`` ``(nlon, nlat, batch, dim)`` from ``sht``'s grid to ``isht``'s grid."""
        dtype = x.dtype
        same = sht.same_grid(isht)
        # Without a norm between them the linear skip is folded into the spectral path (module docstring).
        fold = self.norm is None and self.skip is not None
        # Transforms stay in float32 even under autocast: bf16 Legendre sums lose the small scales.
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
            coeffs = sht.analysis(xf)
            residual = xf if same else isht.synthesis(coeffs)
            filtered = self.spectral(coeffs, self.skip.weight if fold and not same else None)
            if fold:
                filtered[0, 0, 0] += self.skip.bias.to(filtered.dtype) / isht.constant
            s = isht.synthesis(filtered)
            if fold and same:
                s.view(-1, s.shape[-1]).addmm_(residual.reshape(-1, s.shape[-1]), self.skip.weight.to(s.dtype).t())
        if self.norm is not None:
            s = self.norm(s, isht)
        if self.skip is not None and not fold:
            s = self.skip.add_to(s, residual.to(dtype))
        elif self.skip_kind == "identity":
            s = s + residual
        y = self.act(s)
        if self.mlp is None:
            return (residual + y).to(dtype)
        return self.mlp(y, residual=residual.to(y.dtype))
