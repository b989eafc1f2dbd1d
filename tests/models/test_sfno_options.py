"""SFNO architecture options: each works, trains (gradients), is grid-agnostic, round-trips, and is validated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import config_from_dict
from core.config_model import ModelConfig
from models.checkpoint import build_model
from models.sfno import SFNO, complete_arch
from models.sfno_layers import ChannelLayerNorm, SphereInstanceNorm
from models.sfno_transforms import GridTransform, latitudes

# One non-default value per option (and the interesting second values); {} is the default model.
OPTIONS = [
    {}, {"encoder_layers": 1, "decoder_layers": 1}, {"encoder_layers": 3, "decoder_layers": 3},
    {"use_mlp": False}, {"skip": "identity"}, {"skip": "none"}, {"big_skip": "add"}, {"big_skip": "concat"},
    {"pos_embed": "lat"}, {"pos_embed": "none"}, {"pos_embed": False}, {"normalization": "layer"},
    {"normalization": "instance"}, {"activation": "silu"}, {"activation": "relu"},
    {"operator_type": "diagonal"}, {"model_grid": "equiangular"}, {"model_grid": "lobatto"},
    {"data_grid": "legendre-gauss"}, {"skip": "identity", "use_mlp": False, "normalization": "instance"},
    *({"factorization": kind, "operator_type": op, "rank": 0.1} for kind in ("cp", "tucker")
      for op in ("driscoll-healy", "diagonal")),
]


def _model(**kw: object) -> SFNO:
    torch.manual_seed(0)
    args = {"in_channels": 3, "out_channels": 2, "nlat": 17, "nlon": 32, "embed_dim": 8, "num_layers": 3}
    return SFNO(**{**args, **kw})


def _ids(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_option_runs_and_every_parameter_gets_a_gradient(options: dict) -> None:
    model = _model(**options)
    y = model(torch.randn(2, 3, 17, 32))
    assert y.shape == (2, 2, 17, 32) and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # Zero-initialised biases and norm shifts of a fresh model may have tiny but never all-zero grads.
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("scale_factor", [1, 2])
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_option_is_grid_agnostic(options: dict, scale_factor: int) -> None:
    model = _model(scale_factor=scale_factor, **options).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 17, 32)
    with torch.no_grad():
        y_tiny = model(x)
        model.set_grid(33, 64)  # the same weights at another resolution: the SHTs are rebuilt
        y_big = model(torch.randn(2, 3, 33, 64))
        assert y_big.shape == (2, 2, 33, 64) and torch.isfinite(y_big).all()
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        model.set_grid(17, 32)
        torch.testing.assert_close(model(x), y_tiny)


@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_arch_is_complete_json_and_rebuilds_the_same_network(options: dict) -> None:
    model = _model(**options)
    arch = json.loads(json.dumps(model.arch))
    assert set(ModelConfig.model_fields) <= set(arch)  # every config option is recorded in checkpoints
    rebuilt = SFNO(**arch)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 17, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_checkpoint_arch_from_before_the_options_loads_with_identical_behaviour() -> None:
    # The arch a checkpoint recorded before the options existed: no encoder_layers, skip, grids, …
    old_arch = {"in_channels": 3, "out_channels": 3, "nlat": 17, "nlon": 32, "embed_dim": 8, "num_layers": 2,
                "mlp_ratio": 2.0, "scale_factor": 1, "pos_embed": True, "lmax": 16}
    torch.manual_seed(0)
    trained = SFNO(3, 3, 17, 32, embed_dim=8, num_layers=2)
    stats = {"mean": [5.5e4, 0.0, 0.0], "std": [2e3, 10.0, 5.0], "diff_std": [300.0, 3.0, 3.0]}
    model = build_model({"arch": old_arch, "stats": stats})
    model.core.load_state_dict(trained.state_dict(), strict=True)
    x = torch.randn(2, 3, 17, 32)
    torch.testing.assert_close(model.core(x), trained(x))
    # The options the old arch lacks took the config defaults, which describe the original architecture.
    new = set(ModelConfig.model_fields) - set(old_arch)
    assert new and all(model.core.arch[k] == getattr(ModelConfig(), k) for k in new)
    assert model.core.arch["pos_embed"] == "latlon"  # true, normalised
    # complete_arch: what code comparing an old checkpoint's arch with a new run's should compare.
    assert complete_arch(old_arch) == model.core.arch


def test_config_fields_are_sfno_keyword_arguments(tmp_path: Path) -> None:
    from models.train import build_sfno

    values = {"embed_dim": 8, "num_layers": 2, "encoder_layers": 1, "decoder_layers": 3, "use_mlp": False,
              "skip": "identity", "big_skip": "concat", "pos_embed": "lat", "normalization": "layer",
              "activation": "silu", "operator_type": "diagonal", "data_grid": "equiangular", "model_grid": "lobatto"}
    config = config_from_dict({"paths": {"root": str(tmp_path)}, "grid": {"preset": "tiny"}, "model": values})
    model = build_sfno(config, 17, 32)
    assert {k: model.arch[k] for k in values} == values
    assert model(torch.randn(1, len(config.task.channels()), 17, 32)).shape[-2:] == (17, 32)


@pytest.mark.parametrize(("field", "value"), [
    ("skip", "residual"), ("big_skip", "yes"), ("normalization", "batch"), ("activation", "tanh"),
    ("operator_type", "block-diagonal"), ("data_grid", "healpix"), ("model_grid", "gaussian"),
    ("pos_embed", "sequence"), ("embed_dim", 0), ("num_layers", 0), ("encoder_layers", 0),
    ("decoder_layers", -1), ("scale_factor", 0), ("mlp_ratio", 0.0),
])
def test_bad_option_values_are_rejected_by_config_and_model(field: str, value: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=field):
        config_from_dict({"paths": {"root": str(tmp_path)}, "model": {field: value}})
    with pytest.raises(ValueError, match=f"invalid SFNO options: {field}="):
        _model(**{field: value})


def test_several_bad_options_are_named_in_one_error() -> None:
    with pytest.raises(ValueError, match=r"skip='x'.*activation='y'"):
        _model(skip="x", activation="y")


def test_structure_follows_the_options() -> None:
    assert len(_model(encoder_layers=1).encoder) == 1 and len(_model(encoder_layers=3).encoder) == 5
    assert len(_model(decoder_layers=1).decoder) == 1
    assert all(b.mlp is None for b in _model(use_mlp=False).blocks)
    assert all(b.skip is None for b in _model(skip="identity").blocks)
    assert isinstance(_model(activation="silu").blocks[0].act, torch.nn.SiLU)
    assert isinstance(_model(normalization="layer").blocks[0].norm, ChannelLayerNorm)
    assert isinstance(_model(normalization="instance").blocks[0].norm, SphereInstanceNorm)
    assert _model(operator_type="diagonal").blocks[0].spectral.weight.shape == (8, 8, 16, 16, 2)
    assert _model(big_skip="concat").decoder[0].weight.shape == (16, 8 + 3)
    same = _model(model_grid="equiangular")
    assert same.latent_transform is same.data_transform  # no resampling between identical grids


def test_big_skip_add_is_a_learned_map_of_the_input() -> None:
    model = _model(big_skip="add")
    with torch.no_grad():
        model.decoder[-1].weight.zero_()  # silence the network path: only the big skip is left
    x = torch.randn(2, 3, 17, 32)
    expected = torch.einsum("bihw,oi->bohw", x, model.residual_transform.weight)
    torch.testing.assert_close(model(x), expected)


def test_big_skip_concat_feeds_the_input_to_the_decoder() -> None:
    model = _model(big_skip="concat")
    with torch.no_grad():
        for block in model.blocks:  # the latent path carries nothing from the input …
            block.spectral.weight.zero_()
            block.skip.weight.zero_()
            block.mlp[-1].weight.zero_()
        model.encoder[-1].weight.zero_()
    x = torch.randn(2, 3, 17, 32, requires_grad=True)
    model(x).square().sum().backward()
    assert x.grad.abs().sum() > 0  # … yet the output still depends on it, through the concatenation


@pytest.mark.parametrize("shift", [3, 8])
def test_latitude_only_position_embedding_keeps_longitude_equivariance(shift: int) -> None:
    x = torch.randn(1, 3, 17, 32, dtype=torch.float64)
    lat_only = _model(pos_embed="lat").double()
    torch.testing.assert_close(lat_only(torch.roll(x, shift, -1)), torch.roll(lat_only(x), shift, -1),
                               atol=1e-4, rtol=1e-4)
    latlon = _model(pos_embed="latlon").double()
    assert not torch.allclose(latlon(torch.roll(x, shift, -1)), torch.roll(latlon(x), shift, -1), atol=1e-4)


def test_position_features_use_the_data_grid_latitudes() -> None:
    model = _model(data_grid="legendre-gauss")
    sin_lat = model.pos_embed.features[0, :, 0].double()
    np.testing.assert_allclose(sin_lat.numpy(), torch.sin(latitudes(17, "legendre-gauss")).numpy(), atol=1e-6)
    assert model.data_transform.grid == "legendre-gauss"


@pytest.mark.parametrize(("nlat", "nlon", "grid"), [(17, 32, "equiangular"), (33, 64, "legendre-gauss")])
def test_norms_standardise_on_any_grid(nlat: int, nlon: int, grid: str) -> None:
    t = GridTransform(nlat, nlon, 8, grid)
    lat = latitudes(nlat, grid).float()
    x = 3.0 + 5.0 * torch.randn(nlon, nlat, 2, 4) + 4.0 * torch.sin(lat)[None, :, None, None]
    y = SphereInstanceNorm(4)(x, t)
    torch.testing.assert_close(t.mean(y), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.mean(y.square()), torch.ones(2, 4), atol=1e-4, rtol=0)
    z = ChannelLayerNorm(4)(x, t)
    torch.testing.assert_close(z.mean(-1), torch.zeros(nlon, nlat, 2), atol=1e-5, rtol=0)
