"""SFNO: shapes, grid-agnostic weights, longitude equivariance, the torch-harmonics reference, bf16 paths."""

from __future__ import annotations

import pytest
import torch

from models.sfno import SFNO, default_lmax
from tests.models.sfno_plain import plain_forward


def _model(**kw: object) -> SFNO:
    torch.manual_seed(0)
    args = {"in_channels": 3, "out_channels": 3, "nlat": 17, "nlon": 32, "embed_dim": 8, "num_layers": 2}
    return SFNO(**{**args, **kw})


def test_forward_shape_and_finite() -> None:
    model = _model(out_channels=2)
    y = model(torch.randn(2, 3, 17, 32))
    assert y.shape == (2, 2, 17, 32)
    assert torch.isfinite(y).all()


def test_same_weights_run_on_two_grids() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 17, 32)
    y_tiny = model(x)
    model.set_grid(33, 64)
    y_big = model(torch.randn(2, 3, 33, 64))
    assert y_big.shape == (2, 3, 33, 64) and torch.isfinite(y_big).all()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.set_grid(17, 32)
    torch.testing.assert_close(model(x), y_tiny)


def test_coarse_weights_run_on_fine_grid_with_their_own_truncation() -> None:
    model = _model()  # lmax 16 from 17×32
    assert model.lmax == default_lmax(17, 32) == 16
    model.set_grid(65, 128)
    assert model.grid_lmax == 16  # higher degrees have no weights: they are truncated, not invented
    assert torch.isfinite(model(torch.randn(1, 3, 65, 128))).all()


def test_wrong_grid_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="set_grid"):
        _model()(torch.randn(1, 3, 33, 64))


def test_scale_factor_downsamples_inside() -> None:
    model = _model(scale_factor=2)
    assert model.latent_transform.nlat == 9 and model.latent_transform.nlon == 16
    assert model.latent_transform.grid == "legendre-gauss" and model.data_transform.grid == "equiangular"
    assert model(torch.randn(1, 3, 17, 32)).shape == (1, 3, 17, 32)


@pytest.mark.parametrize("shift", [1, 5])
def test_equivariant_to_longitude_rotation_without_position_embedding(shift: int) -> None:
    model = _model(pos_embed=False).double()
    x = torch.randn(1, 3, 17, 32, dtype=torch.float64)
    rolled = model(torch.roll(x, shift, dims=-1))
    torch.testing.assert_close(rolled, torch.roll(model(x), shift, dims=-1), atol=1e-4, rtol=1e-4)


def test_position_embedding_breaks_rotation_symmetry() -> None:
    model = _model(pos_embed=True)
    x = torch.zeros(1, 3, 17, 32)
    y = model(x)
    assert not torch.allclose(y, torch.roll(y, 3, dims=-1))  # latitude/longitude now matter


@pytest.mark.gpu
def test_bf16_autocast_forward_backward_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    model = _model().cuda()
    x = torch.randn(2, 3, 17, 32, device="cuda")
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        y = model(x)
    y.float().pow(2).mean().backward()
    assert torch.isfinite(y.float()).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch) -> None:
    import models.sfno as sfno_module

    calls = []
    real = sfno_module.activation_checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sfno_module, "activation_checkpoint", counting)
    torch.manual_seed(0)
    model = sfno_module.SFNO(3, 3, 17, 32, embed_dim=8, num_layers=3)
    x = torch.randn(2, 3, 17, 32)
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.checkpoint_blocks = on
        model(x).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 3  # every block went through the checkpoint, only when asked
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        model(x)  # inference never checkpoints (nothing to recompute)
    assert len(calls) == 3


@pytest.mark.parametrize(("nlat", "nlon", "scale_factor"), [(17, 32, 1), (33, 64, 1), (33, 64, 2)])
def test_default_model_computes_the_torch_harmonics_formulation(nlat: int, nlon: int, scale_factor: int) -> None:
    # The fast layout (real DFT GEMMs, folded skip, channels-last) must be the same function, with the
    # same gradients, as the plain formulation on torch-harmonics' transforms: old checkpoints keep
    # their behaviour and the demo's skill is untouched.
    model = _model(nlat=nlat, nlon=nlon, scale_factor=scale_factor, num_layers=3)
    x = torch.randn(2, 3, nlat, nlon)
    y, ref = model(x), plain_forward(model, x)
    torch.testing.assert_close(y, ref, atol=2e-5 * float(ref.detach().abs().max()), rtol=0)
    grads = torch.autograd.grad(y.square().mean(), list(model.parameters()))
    ref_grads = torch.autograd.grad(ref.square().mean(), list(model.parameters()))
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4 * float(r.abs().max()) + 1e-9, rtol=0, msg=name)


def test_default_parameters_are_the_legacy_ones() -> None:
    # Checkpoints written before the architecture options existed load strictly into the default model.
    model = _model()
    expected = {"encoder.0.weight": (16, 3), "encoder.0.bias": (16,), "encoder.2.weight": (8, 16),
                "pos_embed.net.0.weight": (8, 6), "pos_embed.net.0.bias": (8,), "pos_embed.net.2.weight": (8, 8),
                "decoder.0.weight": (16, 8), "decoder.0.bias": (16,), "decoder.2.weight": (3, 16)}
    for i in range(2):
        expected |= {f"blocks.{i}.spectral.weight": (8, 8, 16, 2), f"blocks.{i}.skip.weight": (8, 8),
                     f"blocks.{i}.skip.bias": (8,), f"blocks.{i}.mlp.0.weight": (16, 8),
                     f"blocks.{i}.mlp.0.bias": (16,), f"blocks.{i}.mlp.2.weight": (8, 16)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_bf16_autocast_on_cpu_keeps_transforms_in_float32() -> None:
    model = _model()
    x = torch.randn(2, 3, 17, 32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 1×1 layers lose ~3 digits; bf16 transforms would lose the small scales entirely.
    ref = model(x)
    assert float((y.float() - ref).norm() / ref.norm()) < 0.05
