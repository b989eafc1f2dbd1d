"""The SFNO at the sizes users run: every grid, every option, fp32/bf16, eager and compiled.

A crash at 1.5° once shipped because every model test used grids ≤ 65×128 (an irfft output that is
not contiguous reached a ``view`` only on grids wider than 128 longitudes with three or more
blocks). Here every architecture option meets every other option and every grid — the presets up to
0.25° (721×1440) and grids a user might give — in a pairwise covering array (:mod:`covering`), and
every (grid, scale factor) pair that divides the grid appears once. Each row builds the model at
width 4, runs forward and backward, and must equal the plain computation of
:mod:`tests.models.sfno_plain` (torch-harmonics' own transforms, no folding) within float32
rounding, or within bf16 rounding under autocast.

At 0.25° the scale factors 1 and 2 are left to ``test_finest_latent_grids_at_quarter_degree``: their
data-grid Legendre tables alone are 1.5 GB and 0.37 GB, so they run forward and backward once
without the (as costly again) plain computation. Compilation is slow on a CPU (tens of seconds per
graph), so ``torch.compile`` is covered per option value rather than per pair: each compiled model
runs on grids up to 0.25° through TorchDynamo and AOTAutograd, and one through inductor's code.
"""

from __future__ import annotations

import re

import pytest
import torch

from core.grid import PRESETS, scale_factors
from models.sfno import SFNO
from tests.models.covering import pairwise, required_pairs
from tests.models.sfno_plain import plain_forward

GRIDS: dict[str, tuple[int, int]] = {**PRESETS, "91x180": (91, 180), "129x256": (129, 256)}
# The largest data-grid Legendre table (nlat × lmax² entries) built per row; see the module docstring.
MAX_TABLE = 50_000_000

FACTORS: dict[str, list] = {
    "grid": list(GRIDS),
    "num_layers": list(range(1, 9)),
    "skip": ["linear", "identity", "none"],
    "normalization": ["none", "layer", "instance"],
    "big_skip": ["none", "add", "concat"],
    "use_mlp": [True, False],
    "block_activation": [True, False],
    "pos_embed": ["latlon", "lat", "none"],
    "activation": ["gelu", "silu", "relu"],
    "operator_type": ["driscoll-healy", "diagonal"],
    "factorization": ["dense", "cp", "tucker"],
    "model_grid": ["legendre-gauss", "equiangular", "lobatto", "equiangular-trapezoidal"],
    "data_grid": ["equiangular", "legendre-gauss"],
    "encoder_layers": [1, 2, 3],
    "decoder_layers": [1, 2, 3],
    "mlp_ratio": [1.0, 2.0],
    "precision": ["fp32", "bf16"],
}


def _table_size(grid: str, scale_factor: int) -> int:
    nlat, nlon = GRIDS[grid]
    lmax = min((nlat - 1) // scale_factor + 1, nlon // scale_factor // 2)
    return nlat * lmax * lmax


def _allowed(a: str, x: object, b: str, y: object) -> bool:
    return True  # every pair of these options is a valid model


def _cost(name: str, level: object) -> float:
    # Prefer small grids and few layers where either would do: the big ones are needed only for their pairs.
    if name == "grid":
        nlat, nlon = GRIDS[str(level)]
        return nlat * nlon / 1000.0
    return float(level) if name == "num_layers" else 0.0


DEFAULTS = {"num_layers": 4, "skip": "linear", "normalization": "none", "big_skip": "none", "use_mlp": True,
            "block_activation": True, "pos_embed": "latlon", "activation": "gelu", "operator_type": "driscoll-healy",
            "factorization": "dense", "model_grid": "legendre-gauss", "data_grid": "equiangular", "encoder_layers": 2,
            "decoder_layers": 2, "mlp_ratio": 2.0, "precision": "fp32"}


def _rows() -> list[dict]:
    """The default model on every grid, then pairwise rows with each grid's scale factors dealt out over them.

    The default rows are there because a pair is not enough to reach some paths: the 1.5° crash needed
    a linear skip, no norm, three or more blocks and a latent grid wider than 128 longitudes at once.
    """
    rows = pairwise(FACTORS, _allowed, _cost)
    # The 0.25° setting keeps a 3× smaller latent grid; elsewhere the default scale factor 1.
    out = [{"grid": g, **DEFAULTS, "scale_factor": 3 if g == "0.25deg" else 1,
            **({"num_layers": 8} if g == "0.25deg" else {})} for g in GRIDS]
    for grid in GRIDS:
        mine = [r for r in rows if r["grid"] == grid]
        factors = [s for s in scale_factors(*GRIDS[grid]) if _table_size(grid, s) <= MAX_TABLE]
        for i in range(max(len(mine), len(factors))):
            out.append({**mine[i % len(mine)], "scale_factor": factors[i % len(factors)]})
    return out


ROWS = _rows()


ROW_IDS = [f"{i:03d}-{r['grid']}-sf{r['scale_factor']}-L{r['num_layers']}-{r['precision']}" for i, r in enumerate(ROWS)]


def _build(row: dict) -> tuple[SFNO, torch.Tensor]:
    options = {k: v for k, v in row.items() if k not in ("grid", "precision")}
    nlat, nlon = GRIDS[row["grid"]]
    torch.manual_seed(0)
    model = SFNO(3, 2, nlat, nlon, embed_dim=4, **options)
    return model, torch.randn(1, 3, nlat, nlon)


def test_rows_cover_every_pair_and_every_scale_factor() -> None:
    names = list(FACTORS)
    covered = {(a, r[a], b, r[b]) for r in ROWS for i, a in enumerate(names) for b in names[i + 1:]}
    assert required_pairs(FACTORS, _allowed) <= covered
    for grid, shape in GRIDS.items():
        used = {r["scale_factor"] for r in ROWS if r["grid"] == grid}
        assert used == {s for s in scale_factors(*shape) if _table_size(grid, s) <= MAX_TABLE}, grid
    assert {(s, g) for g in ("0.25deg",) for s in (1, 2)}.isdisjoint({(r["scale_factor"], r["grid"]) for r in ROWS})


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_every_option_on_every_grid_equals_the_plain_computation(row: dict) -> None:
    model, x = _build(row)
    if row["precision"] == "bf16":
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
    else:
        y = model(x)
    assert y.shape == (1, 2, *GRIDS[row["grid"]]) and torch.isfinite(y).all()
    y.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        ref = plain_forward(model, x)
    scale = float(ref.abs().max())
    if row["precision"] == "bf16":
        # 1×1 layers in bf16 keep ~3 significant digits (the transforms stay in float32): ≤ 1.7 % measured
        # over these rows. A channel layer norm over only 4 channels divides by a small spread and
        # amplifies that rounding (3.8–8.1 % measured at width 4, < 1 % at width 16); fp32 rows check
        # the same option pairs tightly, so here the test looks for bf16-only failures, which are O(1).
        tolerance = 0.1 if row["normalization"] == "layer" else 0.03
        assert float((y.detach().float() - ref).norm() / ref.norm()) < tolerance
    else:
        torch.testing.assert_close(y.detach(), ref, atol=1e-4 * scale, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("scale_factor", [2, 1])
def test_finest_latent_grids_at_quarter_degree(scale_factor: int) -> None:
    torch.manual_seed(0)
    model = SFNO(3, 2, 721, 1440, embed_dim=4, num_layers=3, scale_factor=scale_factor)
    y = model(torch.randn(1, 3, 721, 1440))
    assert y.shape == (1, 2, 721, 1440) and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# Each option value appears in at least one compiled model (a covering per value, not per pair).
COMPILED = [
    {"skip": "linear", "normalization": "instance", "big_skip": "add", "pos_embed": "latlon", "activation": "gelu",
     "operator_type": "driscoll-healy", "factorization": "cp", "model_grid": "legendre-gauss", "use_mlp": True,
     "block_activation": True, "encoder_layers": 2, "decoder_layers": 1, "num_layers": 3, "scale_factor": 1},
    {"skip": "identity", "normalization": "layer", "big_skip": "concat", "pos_embed": "lat", "activation": "silu",
     "operator_type": "diagonal", "factorization": "tucker", "model_grid": "equiangular", "use_mlp": False,
     "block_activation": False, "encoder_layers": 1, "decoder_layers": 3, "num_layers": 2, "scale_factor": 2},
    {"skip": "none", "normalization": "none", "big_skip": "none", "pos_embed": "none", "activation": "relu",
     "operator_type": "driscoll-healy", "factorization": "dense", "model_grid": "lobatto", "use_mlp": True,
     "block_activation": True, "encoder_layers": 3, "decoder_layers": 2, "num_layers": 8, "scale_factor": 4},
]
COMPILED_GRIDS = {1: [(17, 32), (129, 256)], 2: [(17, 32), (121, 240)], 4: [(17, 32), (121, 240), (721, 1440)]}


def _check_compiled(model: SFNO, compiled: torch.nn.Module, nlat: int, nlon: int, bf16: bool) -> None:
    model.set_grid(nlat, nlon)
    x = torch.randn(1, 3, nlat, nlon)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
        y = compiled(x)
    y.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()
    with torch.no_grad():
        ref = plain_forward(model, x)
    if bf16:
        assert float((y.detach().float() - ref).norm() / ref.norm()) < 0.1
    else:
        torch.testing.assert_close(y.detach(), ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("options", COMPILED, ids=lambda o: f"{o['skip']}-{o['normalization']}-{o['factorization']}")
def test_every_option_traces_and_compiles_on_every_grid(options: dict) -> None:
    # aot_eager runs TorchDynamo's capture and AOTAutograd's joint forward/backward graph (where
    # graph breaks, data-dependent shapes and in-place updates on views fail) without the C++ code
    # generation, which costs tens of seconds per graph on a CPU and is the inductor test's job below.
    torch.manual_seed(0)
    grids = COMPILED_GRIDS[options["scale_factor"]]
    model = SFNO(3, 2, *grids[0], embed_dim=4, **options)
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    for i, (nlat, nlon) in enumerate(grids):
        _check_compiled(model, compiled, nlat, nlon, bf16=bool(i % 2))


@pytest.mark.slow
def test_inductor_compiled_model_equals_the_plain_computation() -> None:
    torch.manual_seed(0)
    model = SFNO(3, 2, 33, 64, embed_dim=4, **COMPILED[0])
    _check_compiled(model, torch.compile(model), 33, 64, bf16=False)


@pytest.mark.parametrize(("nlat", "nlon", "scale_factor", "needle"), [
    (2, 32, 1, "grid 2x32 cannot be used by the spherical harmonic transform"),
    (17, 2, 1, "grid 17x2 cannot be used"),
    (33, 64, 3, "scale_factor 3 does not fit grid 33x64: it must divide nlat−1 = 32 and nlon = 64"),
    (721, 1440, 7, "allowed: 1, 2, 3, 4, 5, 6, 8, 9, 10,"),
    (17, 32, 16, "scale_factor 16 does not fit grid 17x32"),  # divides, but leaves a 2×2 latent grid
])
def test_a_grid_or_scale_factor_the_transforms_cannot_use_is_one_clear_error(nlat: int, nlon: int,
                                                                             scale_factor: int, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        SFNO(3, 2, nlat, nlon, embed_dim=4, scale_factor=scale_factor)


def test_zero_shot_to_a_grid_the_scale_factor_does_not_divide_is_refused_and_keeps_the_model() -> None:
    model = SFNO(3, 2, 33, 64, embed_dim=4, scale_factor=4)
    with pytest.raises(ValueError, match="scale_factor 4 does not fit grid 91x180"):
        model.set_grid(91, 180)
    assert model.grid_shape == (33, 64) and torch.isfinite(model(torch.randn(1, 3, 33, 64))).all()
    model.set_grid(121, 240)  # 120 and 240 are multiples of 4: the same weights run there
    assert model(torch.randn(1, 3, 121, 240)).shape == (1, 2, 121, 240)


def test_config_refuses_a_scale_factor_that_does_not_fit_its_grid(tmp_path) -> None:
    from core.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("grid: {preset: 1.5deg}\nmodel: {scale_factor: 7}\n")
    with pytest.raises(ValueError, match=r"model.scale_factor does not fit grid.preset '1.5deg'.*allowed: 1, 2, 3"):
        load_config(path, env={})
    assert load_config(overrides={"grid": {"preset": "1.5deg"}, "model": {"scale_factor": 3}}, env={})
