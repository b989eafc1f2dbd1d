"""Factorized (CP, Tucker) spectral weights: the same function as their dense tensor, smaller, grid-agnostic, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.config import config_from_dict
from core.config_model import DEFAULT_RANK, ModelConfig
from core.grid import get_grid
from models import checkpoint as ckpt
from models.forecast import rollout
from models.sfno import SFNO, complete_arch
from models.sfno_factorized import FactorizedWeight, dense_size, factorized_size, resolve_rank
from models.sfno_layers import SpectralConv
from tests.models.conftest import moving_planet, stats_for, tiny_config

KINDS = ["cp", "tucker"]
OPERATORS = ["driscoll-healy", "diagonal"]


def _model(**kw: object) -> SFNO:
    torch.manual_seed(0)
    args = {"in_channels": 3, "out_channels": 2, "nlat": 17, "nlon": 32, "embed_dim": 8, "num_layers": 3}
    return SFNO(**{**args, **kw})


def _spectral_parameters(model: SFNO) -> int:
    return sum(p.numel() for block in model.blocks for p in block.spectral.parameters())


def _as_dense(model: SFNO) -> SFNO:
    """The dense model with the same weights: every factorization expanded to its full tensor."""
    arch = {**model.arch, "factorization": "dense"}
    dense = SFNO(**arch)
    state = {k: v for k, v in model.state_dict().items() if ".spectral.weight." not in k}
    for i, block in enumerate(model.blocks):
        state[f"blocks.{i}.spectral.weight"] = block.spectral.weight.dense()
    dense.load_state_dict(state, strict=True)
    return dense


@pytest.mark.parametrize("local", [False, True], ids=["no-local", "local"])
@pytest.mark.parametrize("rank", [0.05, 0.25, 1.0, 1, 3])
@pytest.mark.parametrize("operator_type", OPERATORS)
@pytest.mark.parametrize("kind", KINDS)
def test_factorized_contraction_equals_the_reconstructed_dense_one(kind: str, operator_type: str, rank: float,
                                                                   local: bool) -> None:
    torch.manual_seed(0)
    conv = SpectralConv(6, 9, gain=1.0, operator_type=operator_type, factorization=kind, rank=rank).double()
    oracle = SpectralConv(6, 9, gain=1.0, operator_type=operator_type).double()
    with torch.no_grad():
        oracle.weight.copy_(conv.weight.dense())
    # Fewer degrees and orders than the weights hold, as on a coarser grid (set_grid truncates).
    for lmax, m in ((9, 9), (7, 5)):
        coeffs = torch.randn(2, m, lmax, 3, 6, dtype=torch.float64, requires_grad=True)
        skip = torch.randn(6, 6, dtype=torch.float64) if local else None
        y, ref = conv(coeffs, skip), oracle(coeffs, skip)
        assert y.shape == (2, m, lmax, 3, 6)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
        g, = torch.autograd.grad(y.square().sum(), coeffs)
        g_ref, = torch.autograd.grad(ref.square().sum(), coeffs)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"scale_factor": 2}, {"normalization": "layer"}, {"skip": "identity"},
                                     {"operator_type": "diagonal", "scale_factor": 2}],
                         ids=["folded-skip", "resampling", "norm", "identity", "diagonal-resampling"])
@pytest.mark.parametrize("kind", KINDS)
def test_factorized_model_is_its_dense_model(kind: str, options: dict) -> None:
    # End to end, through every path the skip takes (folded on a resampling block, added after the synthesis,
    # behind a norm): the factorized network computes what its expanded dense twin computes.
    model = _model(factorization=kind, **options)
    dense = _as_dense(model)
    assert not isinstance(dense.blocks[0].spectral.weight, FactorizedWeight)
    x = torch.randn(2, 3, 17, 32)
    ref = dense(x)
    torch.testing.assert_close(model(x), ref, atol=1e-5 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_recommended_rank_stores_at_least_4x_fewer_spectral_parameters_at_the_demo_setting(kind: str) -> None:
    config = config_from_dict({"grid": {"preset": "5.625deg"}, "model": {"factorization": kind}})
    assert config.model.rank == DEFAULT_RANK and config.model.embed_dim == 16 and config.model.num_layers == 4
    from models.train import build_sfno

    nlat, nlon = config.grid.grid().shape
    assert (nlat, nlon) == (33, 64)
    factorized = _spectral_parameters(build_sfno(config, nlat, nlon))
    config.model.factorization = "dense"
    dense = _spectral_parameters(build_sfno(config, nlat, nlon))
    assert dense == 4 * 16 * 16 * 32 * 2  # 4 blocks of complex (co, ci, lmax) weights
    assert dense / factorized >= 4.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(16, 16, 32), (16, 16, 32, 32), (4, 6, 9), (8, 8, 16, 16)])
@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.25, 0.5, 1.0])
def test_a_fraction_rank_is_the_largest_that_fits_the_budget(kind: str, shape: tuple, fraction: float) -> None:
    ranks = resolve_rank(kind, shape, fraction)
    size = factorized_size(kind, shape, ranks)
    one = factorized_size(kind, shape, (1,) * len(ranks))
    assert size <= max(fraction * dense_size(shape), one)
    if kind == "cp" and size >= one:  # one more rank-1 term would not fit
        assert factorized_size(kind, shape, (ranks[0] + 1,)) > fraction * dense_size(shape)
    if kind == "tucker":
        assert all(1 <= r <= n for r, n in zip(ranks, shape, strict=True))


def test_default_dense_model_keeps_its_initial_weights() -> None:
    # The new options do not move the random stream of the default model (same seed, same weights).
    default, explicit = _model(), _model(factorization="dense", rank=0.5)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values(),
                                                  strict=True))
    assert isinstance(default.blocks[0].spectral.weight, torch.nn.Parameter)


@pytest.mark.parametrize("kind", KINDS)
def test_arch_records_the_factorization_and_rebuilds_the_same_network(kind: str) -> None:
    model = _model(factorization=kind, rank=2)
    arch = json.loads(json.dumps(model.arch))
    assert (arch["factorization"], arch["rank"]) == (kind, 2)
    rebuilt = SFNO(**arch)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 17, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_checkpoint_round_trip_records_the_factorization_and_gives_the_identical_forecast(tmp_path: Path) -> None:
    from models.train import build_sfno

    config = tiny_config(tmp_path)
    config.model.factorization, config.model.rank = "tucker", 0.5
    ds = moving_planet()
    stats = stats_for(ds, "2000-01-01", "2000-01-15T18")
    torch.manual_seed(0)
    model = ckpt.Normalized(build_sfno(config, 17, 32), stats["mean"].values, stats["std"].values,
                            stats["diff_std"].values)
    meta = ckpt.build_meta(config, stats, get_grid("tiny"), model.core.arch, model.state_dict(), 7,
                           ds.attrs["dataset_version"])
    path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoint.pt", model, meta, training={"step": 7})
    loaded, loaded_meta = ckpt.load_for_inference(path)
    assert (loaded_meta["arch"]["factorization"], loaded_meta["arch"]["rank"]) == ("tucker", 0.5)
    assert isinstance(loaded.core.blocks[0].spectral.weight, FactorizedWeight)
    a = rollout(model.eval(), meta, ds, "2000-01-17", 24)
    b = rollout(loaded, loaded_meta, ds, "2000-01-17", 24)
    for name in a.data_vars:
        assert a[name].values.tobytes() == b[name].values.tobytes()


def test_checkpoint_arch_without_the_factorization_loads_as_dense() -> None:
    old_arch = {"in_channels": 3, "out_channels": 3, "nlat": 17, "nlon": 32, "embed_dim": 8, "num_layers": 2,
                "mlp_ratio": 2.0, "scale_factor": 1, "pos_embed": True, "lmax": 16}
    assert complete_arch(old_arch)["factorization"] == "dense" == ModelConfig().factorization
    torch.manual_seed(0)
    trained = SFNO(3, 3, 17, 32, embed_dim=8, num_layers=2)
    stats = {"mean": [5.5e4, 0.0, 0.0], "std": [2e3, 10.0, 5.0], "diff_std": [300.0, 3.0, 3.0]}
    model = ckpt.build_model({"arch": old_arch, "stats": stats})
    model.core.load_state_dict(trained.state_dict(), strict=True)
    assert model.core.arch["factorization"] == "dense"
    x = torch.randn(2, 3, 17, 32)
    torch.testing.assert_close(model.core(x), trained(x))


@pytest.mark.parametrize("operator_type", OPERATORS)
@pytest.mark.parametrize("kind", KINDS)
def test_factorized_model_runs_zero_shot_on_finer_and_coarser_grids(kind: str, operator_type: str) -> None:
    torch.manual_seed(0)
    model = SFNO(3, 3, 33, 64, embed_dim=8, num_layers=3, factorization=kind, operator_type=operator_type).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 33, 64)
    with torch.no_grad():
        y = model(x)
        model.set_grid(65, 128)  # 2.8125°: the same factors, new transforms
        fine = model(torch.randn(1, 3, 65, 128))
        assert fine.shape == (1, 3, 65, 128) and torch.isfinite(fine).all()
        model.set_grid(17, 32)  # coarser: the degree (and order) factors are truncated
        assert torch.isfinite(model(torch.randn(1, 3, 17, 32))).all()
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        model.set_grid(33, 64)
        torch.testing.assert_close(model(x), y)


@pytest.mark.parametrize(("kind", "rank", "allowed"), [
    ("cp", 1000, r"rank=1000 .*larger than the full tensor.*integer rank from 1 to 32"),
    ("tucker", 9, r"rank=9 .*larger than the full tensor.*mode's size.*integer rank from 1 to 8"),
    ("cp", 1.5, r"rank=1.5 .*fraction in \(0, 1\]"),
])
def test_a_rank_larger_than_the_full_tensor_is_refused_at_construction(kind: str, rank: float, allowed: str) -> None:
    # embed_dim 8, lmax 16 (17×32): the dense weight is 8·8·16 = 1,024 complex entries; CP rank r holds r·32.
    with pytest.raises(ValueError, match=allowed):
        _model(factorization=kind, rank=rank)


@pytest.mark.parametrize(("field", "value"), [("rank", 1.5), ("rank", 0), ("rank", -0.1), ("rank", True),
                                              ("rank", "quarter"), ("factorization", "svd")])
def test_bad_factorization_options_are_rejected_by_config_and_model(field: str, value: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=field):
        config_from_dict({"paths": {"root": str(tmp_path)}, "model": {"factorization": "cp", field: value}})
    with pytest.raises(ValueError, match=f"invalid SFNO options: {field}="):
        _model(**{"factorization": "cp", field: value})
