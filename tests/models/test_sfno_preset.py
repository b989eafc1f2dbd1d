"""The ``reference`` preset: torch-harmonics' example SFNO's function class, parameter count and config rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.config import config_from_dict
from core.config_model import ModelConfig, preset_options
from models.sfno import SFNO
from models.sfno_reference import (
    copy_reference_weights,
    parameter_counts_at_scale,
    preset_sfno,
    real_parameter_count,
    reference_sfno,
)

# (nlat, nlon, scale_factor, blocks): resampling first/last blocks, a single block (data grid to data
# grid through the latent truncation), and a 1.5° grid whose synthesis takes the FFT path.
CASES = [(33, 64, 2, 3), (33, 64, 4, 1), (17, 32, 2, 2), (121, 240, 3, 4)]


def _pair(nlat: int, nlon: int, sf: int, blocks: int, width: int = 8) -> tuple[torch.nn.Module, SFNO]:
    torch.manual_seed(0)
    ref = reference_sfno(3, 2, nlat, nlon, width, blocks, scale_factor=sf)
    ours = preset_sfno(3, 2, nlat, nlon, width, blocks, scale_factor=sf)
    return ref, ours


@pytest.mark.parametrize(("nlat", "nlon", "sf", "blocks"), CASES)
def test_preset_with_the_reference_weights_computes_the_reference_function(nlat, nlon, sf, blocks) -> None:
    ref, ours = _pair(nlat, nlon, sf, blocks)
    copy_reference_weights(ref, ours)
    x = torch.randn(2, 3, nlat, nlon)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    # Both use the same float32 Legendre tables; they differ only in the order of float32 sums (DFT GEMM
    # or FFT, real-pair GEMM vs complex einsum), ~1e-6 of the output's scale.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_preset_gradients_match_the_references_parameter_by_parameter() -> None:
    ref, ours = _pair(33, 64, 2, 2)
    copy_reference_weights(ref, ours)
    x, target = torch.randn(2, 3, 33, 64), torch.randn(2, 2, 33, 64)
    (ref(x) - target).square().mean().backward()
    (ours(x) - target).square().mean().backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    spectral = grads["blocks.1.global_conv.weight"]
    # d/dW of a real loss w.r.t. a complex weight is (∂/∂re + i ∂/∂im): the real pair's two gradients.
    torch.testing.assert_close(ours.blocks[1].spectral.weight.grad, torch.view_as_real(spectral), rtol=1e-3,
                               atol=1e-5 * spectral.abs().max().item())
    torch.testing.assert_close(ours.blocks[0].mlp[0].weight.grad, grads["blocks.0.mlp.fwd.0.weight"][:, :, 0, 0],
                               rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(ours.encoder[0].weight.grad, grads["encoder.0.weight"][:, :, 0, 0], rtol=1e-3,
                               atol=1e-6)


@pytest.mark.parametrize(("nlat", "nlon", "sf", "blocks"), CASES)
def test_preset_has_the_references_real_parameter_count(nlat, nlon, sf, blocks) -> None:
    ref, ours = _pair(nlat, nlon, sf, blocks)
    assert real_parameter_count(ours) == real_parameter_count(ref)
    # The shape-only build used at 0.25° counts what the real build holds.
    counts = parameter_counts_at_scale(3, 2, nlat, nlon, 8, blocks, scale_factor=sf)
    assert counts["preset"] == counts["reference"] == real_parameter_count(ref)
    assert counts["ours"] == real_parameter_count(SFNO(3, 2, nlat, nlon, embed_dim=8, num_layers=blocks,
                                                       scale_factor=sf))


def test_parameter_counts_at_the_issues_0p25deg_setting_allocate_nothing() -> None:
    counts = parameter_counts_at_scale(73, 73, 721, 1440, embed_dim=256, num_layers=8, scale_factor=3)
    assert abs(counts["preset"] / counts["reference"] - 1) <= 0.05
    # 8 blocks of 256·256·240 complex weights (lmax = min(241, 480 // 2)) dominate: 2·8·256²·240 real.
    assert counts["reference"] > 2 * 8 * 256 * 256 * 240
    assert counts["ours"] == 254_691_072  # the issue's "254.7 M" of the default model


def test_config_preset_fills_the_layout_and_keeps_the_sizes(tmp_path: Path) -> None:
    config = config_from_dict({"paths": {"root": str(tmp_path)}, "grid": {"preset": "tiny"},
                               "model": {"preset": "reference", "embed_dim": 8, "num_layers": 2}})
    m = config.model
    assert (m.encoder_layers, m.decoder_layers, m.skip, m.pos_embed, m.block_activation) == (1, 1, "none", "none", False)
    assert (m.scale_factor, m.embed_dim, m.num_layers) == (1, 8, 2)
    n = len(config.task.channels())
    model = SFNO(n, n, 17, 32, **config.model.model_dump())  # as training builds it from the config
    assert model.arch["preset"] == "reference" and model.arch["block_activation"] is False
    ref = reference_sfno(n, n, 17, 32, 8, 2, scale_factor=1)
    assert real_parameter_count(model) == real_parameter_count(ref)


@pytest.mark.parametrize(("field", "value"), [("skip", "linear"), ("encoder_layers", 2), ("pos_embed", True),
                                              ("block_activation", True), ("activation", "silu"),
                                              ("factorization", "cp")])
def test_an_option_the_preset_fixes_is_refused_by_config_and_model(field: str, value: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{field}=.*preset 'reference'"):
        config_from_dict({"paths": {"root": str(tmp_path)}, "model": {"preset": "reference", field: value}})
    with pytest.raises(ValueError, match=f"invalid SFNO options: .*{field}="):
        SFNO(3, 3, 17, 32, **{**preset_options("reference"), field: value})
    config = config_from_dict({"paths": {"root": str(tmp_path)}, "model": {"preset": "reference"}})
    with pytest.raises(ValueError, match=field):  # assignment is validated too
        setattr(config.model, field, value)


def test_unknown_preset_is_refused_and_none_changes_nothing() -> None:
    with pytest.raises(ValueError, match="preset"):
        ModelConfig(preset="makani")
    with pytest.raises(ValueError, match="invalid SFNO options: preset='makani'"):
        SFNO(3, 3, 17, 32, preset="makani")
    with pytest.raises(ValueError, match="unknown preset"):
        preset_options("makani")
    assert ModelConfig(preset="none") == ModelConfig()


def test_preset_arch_round_trips_through_json() -> None:
    _, ours = _pair(17, 32, 2, 2)
    rebuilt = SFNO(**json.loads(json.dumps(ours.arch)))
    rebuilt.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 17, 32)
    torch.testing.assert_close(rebuilt(x), ours(x))


def test_block_activation_off_removes_only_the_activation_before_the_mlp() -> None:
    torch.manual_seed(0)
    on = SFNO(3, 3, 17, 32, embed_dim=8, num_layers=2)
    off = SFNO(3, 3, 17, 32, embed_dim=8, num_layers=2, block_activation=False)
    assert on.state_dict().keys() == off.state_dict().keys()
    off.load_state_dict(on.state_dict())
    block, x = on.blocks[1], torch.randn(32, 17, 1, 8)
    grid = on.latent_transform
    with torch.no_grad():
        # With the activation removed, the block's input to its MLP is the pre-activation sum.
        pre = block.spectral(grid.analysis(x))
        s = grid.synthesis(pre) + block.skip(x)
        torch.testing.assert_close(off.blocks[1](x, grid, grid), x + block.mlp(s), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(on.blocks[1](x, grid, grid), x + block.mlp(block.act(s)), rtol=1e-4, atol=1e-5)
