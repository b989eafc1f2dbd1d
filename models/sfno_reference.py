"""torch-harmonics' example SFNO (the reference) beside this project's ``reference`` preset of :class:`SFNO`.

The reference is ``torch_harmonics.examples.models.SphericalFourierNeuralOperator`` (0.9.3) with its
defaults: per block ``x, r = SpectralConvS2(x)`` (SHT → complex weights ``W[o, i, l]`` → ISHT; ``r`` is
the input resampled spectrally when the grid changes), ``x = r + MLP(norm(x))`` with no norm and no
inner skip, a bias-free 1×1 encoder and decoder, no position embedding, latent Gauss–Legendre grid
downsampled by ``scale_factor`` and ``lmax = mmax = min(h, w // 2)``. :func:`preset_sfno` builds the
same function class from :class:`models.sfno.SFNO` (``model.preset: reference``), and
:func:`copy_reference_weights` loads a reference's weights into it (complex → real pairs, 1×1 convs →
pointwise weights), which is how the tests show the two compute the same function.

Parameter counts here are real-valued: a complex weight counts twice (ours stores it as a real pair).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from core.config_model import preset_options
from models.sfno import SFNO


def reference_sfno(in_channels: int, out_channels: int, nlat: int, nlon: int, embed_dim: int, num_layers: int,
                   mlp_ratio: float = 2.0, scale_factor: int = 3, activation: str = "gelu") -> nn.Module:
    """torch-harmonics' example SFNO on an equiangular ``nlat × nlon`` grid with its default layout."""
    from torch_harmonics.examples.models import SphericalFourierNeuralOperator

    return SphericalFourierNeuralOperator(img_size=(nlat, nlon), scale_factor=scale_factor, in_chans=in_channels,
                                          out_chans=out_channels, embed_dim=embed_dim, num_layers=num_layers,
                                          activation_function=activation, mlp_ratio=mlp_ratio)


def preset_sfno(in_channels: int, out_channels: int, nlat: int, nlon: int, embed_dim: int, num_layers: int,
                **options: Any) -> SFNO:
    """This project's SFNO with the ``reference`` preset (``options`` may change only what the preset leaves free)."""
    return SFNO(in_channels, out_channels, nlat, nlon, embed_dim=embed_dim, num_layers=num_layers,
                **{**preset_options("reference"), **options})


def real_parameter_count(module: nn.Module) -> int:
    """Number of real-valued parameters, a complex one counting twice."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in module.parameters())


def copy_reference_weights(reference: nn.Module, ours: SFNO) -> None:
    """Load a reference model's weights into a ``reference``-preset SFNO of the same sizes."""
    ref = dict(reference.named_parameters())
    mapping = {"encoder.0.weight": "encoder.0.weight", "decoder.0.weight": "decoder.0.weight"}
    for i in range(len(ours.blocks)):
        mapping |= {f"blocks.{i}.spectral.weight": f"blocks.{i}.global_conv.weight",
                    f"blocks.{i}.mlp.0.weight": f"blocks.{i}.mlp.fwd.0.weight",
                    f"blocks.{i}.mlp.0.bias": f"blocks.{i}.mlp.fwd.0.bias",
                    f"blocks.{i}.mlp.2.weight": f"blocks.{i}.mlp.fwd.2.weight"}
    state = {}
    for name, p in ours.named_parameters():
        if name not in mapping:
            raise ValueError(f"parameter {name} has no counterpart in the reference: is this the reference preset?")
        src = ref.pop(mapping[name]).detach()
        # Complex (o, i, l) → real pairs (o, i, l, 2); 1×1 conv (o, i, 1, 1) → (o, i).
        state[name] = torch.view_as_real(src) if src.is_complex() else src.reshape(p.shape)
        if state[name].shape != p.shape:
            raise ValueError(f"{name}: reference shape {tuple(state[name].shape)} != ours {tuple(p.shape)}")
    if ref:
        raise ValueError(f"reference parameters without a counterpart: {sorted(ref)}")
    ours.load_state_dict(state, strict=False)  # transforms hold only non-persistent buffers


class _TransformShape:
    """Stands in for a torch-harmonics SHT where only the sizes matter (parameter shapes, not values)."""

    def __init__(self, nlat: int, nlon: int, lmax: int | None = None, mmax: int | None = None, **_: Any) -> None:
        self.nlat, self.nlon, self.lmax, self.mmax = nlat, nlon, lmax, mmax

    def float(self) -> _TransformShape:
        return self


class _ShapeOnlySFNO(SFNO):
    """An SFNO without transforms: its parameters only, so it can be built on the meta device."""

    def set_grid(self, nlat: int, nlon: int) -> None:
        self.nlat, self.nlon = nlat, nlon


class _AllocateOnMeta(TorchFunctionMode):
    """Puts new tensors from the factories parameters come from on the meta device (no memory, no values).

    Not ``torch.device("meta")``: that also moves the reference's ``linspace`` of drop-path rates,
    whose ``.item()`` then fails.
    """

    FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.randn)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def _shape_only_transforms() -> Iterator[None]:
    from torch_harmonics.examples.models import sfno as module

    saved = module.RealSHT, module.InverseRealSHT
    module.RealSHT = module.InverseRealSHT = _TransformShape
    try:
        yield
    finally:
        module.RealSHT, module.InverseRealSHT = saved


def shape_only_parameter_count(in_channels: int, out_channels: int, nlat: int, nlon: int, **options: Any) -> int:
    """Real-valued parameter count of ``SFNO(in_channels, out_channels, nlat, nlon, **options)``, allocating nothing."""
    with _AllocateOnMeta():
        return real_parameter_count(_ShapeOnlySFNO(in_channels, out_channels, nlat, nlon, **options))


def parameter_counts_at_scale(in_channels: int, out_channels: int, nlat: int, nlon: int, embed_dim: int,
                              num_layers: int, scale_factor: int = 3, **options: Any) -> dict[str, int]:
    """Real-valued parameter counts of ours (default and preset) and the reference, built on the meta device.

    Nothing is allocated and no transform table is computed, so 0.25° at width 256 costs nothing.
    ``options`` go to our default model (e.g. a factorization); the preset takes only the sizes.
    """
    sizes = {"embed_dim": embed_dim, "num_layers": num_layers, "scale_factor": scale_factor}
    with _AllocateOnMeta(), _shape_only_transforms():
        reference = reference_sfno(in_channels, out_channels, nlat, nlon, embed_dim, num_layers,
                                   scale_factor=scale_factor)
    return {"ours": shape_only_parameter_count(in_channels, out_channels, nlat, nlon, **sizes, **options),
            "preset": shape_only_parameter_count(in_channels, out_channels, nlat, nlon,
                                                 **{**preset_options("reference"), **sizes}),
            "reference": real_parameter_count(reference)}
