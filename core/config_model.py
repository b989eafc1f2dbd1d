"""The ``model`` section of the config: the SFNO's architecture options.

Each field is passed to ``models.sfno.SFNO`` as the keyword argument of the same name, and the model
records every one of them in its checkpoint (``arch``). The defaults are the architecture spherecast
has always trained, so checkpoints written before an option existed load with identical behaviour.
The allowed values live here (``typing.Literal``) so the config and the model check the same lists.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config_base import _Section

Activation = Literal["gelu", "silu", "relu"]
Skip = Literal["linear", "identity", "none"]
BigSkip = Literal["none", "add", "concat"]
Normalization = Literal["none", "layer", "instance"]
OperatorType = Literal["driscoll-healy", "diagonal"]
GridType = Literal["equiangular", "legendre-gauss", "lobatto", "equiangular-trapezoidal"]
PosEmbed = Literal["none", "lat", "latlon"]


class ModelConfig(_Section):
    embed_dim: int = Field(16, ge=1)
    """Width of the SFNO's latent channels (makani ``embed_dim``)."""
    num_layers: int = Field(4, ge=1)
    """Number of spherical Fourier blocks."""
    mlp_ratio: float = Field(2.0, gt=0)
    """Hidden width of each block's MLP, and of the encoder/decoder MLPs, as a multiple of ``embed_dim``."""
    scale_factor: int = Field(1, ge=1)
    """Downsampling of the latent grid relative to the data grid (1 = none; 2 halves nlat−1 and nlon)."""
    pos_embed: bool | PosEmbed = True
    """Learned positional embedding, an MLP of position features so it works on any grid: ``latlon`` (or
    ``true``) sees sin/cos latitude and cos φ·(cos, sin) of longitude wavenumbers 1–2; ``lat`` sees latitude
    only, which keeps the model equivariant to rotations in longitude; ``none`` (or ``false``) adds nothing."""
    encoder_layers: int = Field(2, ge=1)
    """Number of 1×1 layers in the encoder MLP (input channels → ``embed_dim``); 1 = a single linear map."""
    decoder_layers: int = Field(2, ge=1)
    """Number of 1×1 layers in the decoder MLP (``embed_dim`` → output channels); 1 = a single linear map."""
    use_mlp: bool = True
    """Give each block its residual 1×1 MLP (off: a block is spectral convolution + skip + activation)."""
    skip: Skip = "linear"
    """The block's local skip path added to the spectral convolution before the activation: a learned
    1×1 ``linear`` map, the ``identity``, or ``none``."""
    big_skip: BigSkip = "none"
    """Model-level skip from the input: ``concat`` feeds the input channels to the decoder next to the latent
    state; ``add`` adds a learned 1×1 map of the input to the output (makani's ``big_skip``); ``none``."""
    normalization: Normalization = "none"
    """Normalization of the spectral convolution's output in every block: ``layer`` (over channels at each
    point), ``instance`` (per sample and channel, with area-weighted statistics over the sphere), or ``none``."""
    activation: Activation = "gelu"
    """Activation function of the blocks, the encoder/decoder MLPs and the position embedding."""
    operator_type: OperatorType = "driscoll-healy"
    """Spectral filter: ``driscoll-healy`` (one complex weight per degree l, shared by all orders m:
    rotation-equivariant) or ``diagonal`` (one per degree and order: more parameters, not equivariant)."""
    data_grid: GridType = "equiangular"
    """Latitude grid of the input/output fields (torch-harmonics grid type). spherecast's analysis stores are
    equiangular with both poles; other values are for data sampled on those grids."""
    model_grid: GridType = "legendre-gauss"
    """Latitude grid of the latent fields between blocks; Gauss–Legendre integrates exactly up to degree nlat."""
