"""The ``model`` section of the config: the SFNO's architecture options."""

from __future__ import annotations

from core.config_base import _Section


class ModelConfig(_Section):
    embed_dim: int = 16
    """Width of the SFNO's latent channels."""
    num_layers: int = 4
    """Number of spherical Fourier blocks."""
    mlp_ratio: float = 2.0
    """Hidden width of each block's MLP as a multiple of ``embed_dim``."""
    scale_factor: int = 1
    """Downsampling of the latent grid relative to the data grid (1 = none)."""
    pos_embed: bool = True
    """Add a learned positional embedding (latitude-dependent physics needs it)."""
