"""``train.compile``: a compiled run trains and writes a plain checkpoint; without a C++ compiler it is refused.

Inductor compiles C++ kernels with g++ on CPU: a cold compile cache costs tens of seconds even for a
one-layer SFNO (each kernel is one g++ call), hence the smallest model that still has every part.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoint import load_for_inference, read_checkpoint
from models.train import build_sfno, train
from tests.models.conftest import moving_planet, tiny_config, write_data


def _config(root: Path, **train_opts: object):
    # The CPU's compile path (a C++ compiler, no Triton) is what these tests are about, on any host.
    config = tiny_config(root, max_steps=3, rollout_steps=1, tensorboard=False, compile=True, run_name="compiled",
                         device="cpu", **train_opts)
    config.model.embed_dim, config.model.num_layers, config.model.mlp_ratio = 4, 1, 1.0
    return config


@pytest.mark.slow
def test_a_compiled_run_trains_and_its_checkpoint_loads_for_inference(tmp_path: Path, monkeypatch) -> None:
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "compile_threads", 1)  # no compile-worker pool on a shared 2-core machine
    write_data(tmp_path, moving_planet())
    config = _config(tmp_path)
    torch.manual_seed(0)
    path = train(config)
    saved = read_checkpoint(path.parent / "last.pt")
    assert saved["meta"]["train_step"] == 3
    assert not any("_orig_mod" in key for key in saved["model"])  # plain names: the file is not tied to compile
    model, meta = load_for_inference(path.parent / "last.pt")
    torch.manual_seed(config.train.seed)
    initial = build_sfno(config, 17, 32).state_dict()  # what prepare() built before the 3 steps
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert any(not torch.equal(saved["model"][f"core.{k}"], v) for k, v in initial.items())  # it trained
    x = torch.stack([torch.from_numpy(moving_planet()[name].values[0, 0]) for name in
                     ("geopotential", "u_component_of_wind", "v_component_of_wind")])[None]
    assert torch.isfinite(model(x)).all() and meta["weights_sha256"] == saved["meta"]["weights_sha256"]

def test_compile_without_a_cpp_compiler_is_refused_before_any_step(tmp_path: Path, monkeypatch) -> None:
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    write_data(tmp_path, moving_planet())
    config = _config(tmp_path)
    with pytest.raises(ValueError, match="train.compile=true: .* no working C\\+\\+ compiler was found"):
        train(config)
    assert not (config.paths.runs / "compiled").exists()
