"""The ``model`` section of the config: the SFNO's architecture options.

Each field is passed to ``models.sfno.SFNO`` as the keyword argument of the same name, and the model
records every one of them in its checkpoint (``arch``). The defaults are the architecture spherecast
has always trained, so checkpoints written before an option existed load with identical behaviour.
The allowed values live here (``typing.Literal``) so the config and the model check the same lists.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from core.config_base import _Section
from core.errors import ConfigError

Activation = Literal["gelu", "silu", "relu"]
Skip = Literal["linear", "identity", "none"]
BigSkip = Literal["none", "add", "concat"]
Normalization = Literal["none", "layer", "instance"]
OperatorType = Literal["driscoll-healy", "diagonal"]
Factorization = Literal["dense", "cp", "tucker"]
# At most a quarter of the dense spectral parameters (a ≥ 4× saving); its skill against dense: docs/benchmarks.md.
DEFAULT_RANK = 0.25
GridType = Literal["equiangular", "legendre-gauss", "lobatto", "equiangular-trapezoidal"]
PosEmbed = Literal["none", "lat", "latlon"]
Preset = Literal["none", "reference"]

# The layout of torch-harmonics 0.9.3's example ``SphericalFourierNeuralOperator`` (the reference the
# benches compare against): block ``out = r + MLP(norm(s))``, one linear encoder/decoder layer, nothing
# else. A preset fixes these options; the sizes (width, depth, MLP ratio, scale factor, activation
# gelu/relu, grids) stay free because the reference takes them as arguments too.
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {"encoder_layers": 1, "decoder_layers": 1, "pos_embed": "none", "skip": "none",
                  "big_skip": "none", "normalization": "none", "operator_type": "driscoll-healy",
                  "block_activation": False, "factorization": "dense"},
}
PRESET_ACTIVATIONS: dict[str, tuple[str, ...]] = {"reference": ("gelu", "relu")}


def _preset_value(name: str, value: Any) -> Any:
    # pos_embed also accepts booleans (true = "latlon"); compare the kind it means.
    if name == "pos_embed" and isinstance(value, bool):
        return "latlon" if value else "none"
    return value


def preset_conflicts(preset: str, options: dict[str, Any]) -> list[str]:
    """Descriptions of the ``options`` whose values the named ``preset`` does not allow (empty if none)."""
    bad = [f"{k}={v!r} (preset {preset!r} needs {PRESETS[preset][k]!r})" for k, v in options.items()
           if k in PRESETS.get(preset, {}) and _preset_value(k, v) != PRESETS[preset][k]]
    allowed = PRESET_ACTIVATIONS.get(preset)
    if allowed and options.get("activation", allowed[0]) not in allowed:
        bad.append(f"activation={options['activation']!r} (preset {preset!r} allows {', '.join(map(repr, allowed))})")
    return bad


def preset_options(preset: str) -> dict[str, Any]:
    """The SFNO keyword arguments a named preset sets (``SFNO(…, **preset_options("reference"))``)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {', '.join(map(repr, PRESETS))}")
    return {"preset": preset, **PRESETS[preset]}


def rank_problem(rank: Any) -> str | None:
    """Why ``rank`` is not a factorization rank (a fraction in (0, 1] or an integer ≥ 1), or None if it is one."""
    # bool is an int to Python; a fraction above 1 would hold more than the dense tensor.
    if isinstance(rank, bool) or not isinstance(rank, int | float) or not (
            rank >= 1 if isinstance(rank, int) else 0.0 < rank <= 1.0):
        return f"rank={rank!r} (expected a fraction in (0, 1] of the dense spectral weights, or an integer rank ≥ 1)"
    return None


class ModelConfig(_Section):
    preset: Preset = "none"
    """A named architecture: ``reference`` is torch-harmonics' example SFNO (``out = r + MLP(norm(s))`` per
    block, 1-layer encoder and decoder, no skip, position embedding or normalization). It fills the options
    it fixes; giving one of them another value is an error. Sizes stay yours: the reference's own
    ``scale_factor`` is 3 (set it where 3 divides the grid, as at 1.5° and 0.25°). ``none``: every option as
    given."""
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
    block_activation: bool = True
    """Apply the activation to the block's spectral + skip sum before its MLP (``out = r + MLP(act(s + skip))``);
    false gives the reference block ``out = r + MLP(s + skip)``, whose MLP holds the only nonlinearity."""
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
    factorization: Factorization = "dense"
    """How the spectral weights ``W[o, i, l(, m)]`` are held: ``dense``; ``cp``, a sum of ``r`` rank-1 complex
    outer products over the output, input, degree (and order) modes; or ``tucker``, a small complex core and one
    factor matrix per mode. Factorized weights are applied factor by factor, never expanded to the dense tensor."""
    rank: int | float = DEFAULT_RANK
    """Size of a ``cp``/``tucker`` factorization (ignored by ``dense``). A float in (0, 1] is the fraction of the
    dense weight's parameters the factors may hold (tensorly-torch's convention: 0.25 = at most a quarter, the
    recommended setting); an int ≥ 1 is the CP rank, or the Tucker rank of every mode. The model refuses a rank
    larger than the full tensor (more numbers than the dense weight, or a Tucker rank above a mode's size)."""
    data_grid: GridType = "equiangular"
    """Latitude grid of the input/output fields (torch-harmonics grid type). spherecast's analysis stores are
    equiangular with both poles; other values are for data sampled on those grids."""
    model_grid: GridType = "legendre-gauss"
    """Latitude grid of the latent fields between blocks; Gauss–Legendre integrates exactly up to degree nlat."""

    @field_validator("rank", mode="before")
    @classmethod
    def _check_rank(cls, value: Any) -> Any:
        problem = rank_problem(value)
        if problem:
            raise ConfigError(problem)
        return value

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        # Before field validation, so the preset's values are validated like any other and a conflicting
        # explicit value is reported rather than silently overridden.
        if not isinstance(data, dict) or data.get("preset", "none") not in PRESETS:
            return data
        preset = data["preset"]
        bad = preset_conflicts(preset, data)
        if bad:
            raise ConfigError("model options conflict with the preset: " + "; ".join(bad))
        return {**data, **PRESETS[preset]}
