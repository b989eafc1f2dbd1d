"""benches/gpu.py: it refuses cleanly without CUDA, and its measuring code runs (tiny, on the CPU) so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.benches.conftest import REPO, bench_env

SCRIPT = REPO / "benches" / "gpu.py"
TINY = ["--device", "cpu", "--allow-cpu", "--grid", "tiny", "--channels", "3", "--width", "8", "--depth", "2",
        "--scale-factor", "2", "--steps", "2", "--repeats", "1", "--warmup", "0", "--compile", "default",
        "--compile-backend", "eager"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env or bench_env(),
                          capture_output=True, text=True, timeout=300)


def test_without_cuda_it_refuses_with_a_clear_message_before_any_work() -> None:
    proc = _run("--json", "never-written.json", env={**bench_env(), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "needs a CUDA device" in proc.stderr and "torch.cuda.is_available() is False" in proc.stderr
    assert proc.stdout == "" and not (REPO / "never-written.json").exists()


def test_the_cpu_is_refused_without_the_test_switch() -> None:
    proc = _run("--device", "cpu")
    assert proc.returncode == 2 and "not a CUDA device" in proc.stderr and proc.stdout == ""


def test_it_imports_neither_prefect_nor_xarray() -> None:
    # What the GPU machine lacks: the bench must start (and refuse) with torch, torch-harmonics, numpy, pydantic.
    code = ("import runpy, sys\nsys.argv = ['gpu.py', '--device', 'cpu']\ntry:\n"
            f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\nprint(sorted(m for m in ('prefect', 'xarray', 'zarr') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=bench_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split("\n")[:2] == ["exit 2", "[]"], proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def gpu():
    """The bench as a module, for its functions."""
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_argument_accepts_presets_and_shapes_and_names_a_bad_one(gpu) -> None:
    assert gpu.grid_shape("0.25deg") == (721, 1440) and gpu.grid_shape("91x180") == (91, 180)
    with pytest.raises(ValueError, match="'quarter'.*NLATxNLON"):
        gpu.grid_shape("quarter")


def test_every_measurement_runs_at_a_tiny_size_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = _run(*TINY, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "machine: CPU" in proc.stdout and "| train step, bf16 |" in proc.stdout
    models = json.loads(out.read_text())["models"]
    assert set(models) == {"ours (default)", "ours (default), compiled", "ours (reference preset)",
                           "torch-harmonics reference"}
    preset, ref = models["ours (reference preset)"], models["torch-harmonics reference"]
    assert preset["params"] == ref["params"] and models["ours (default)"]["params"] > ref["params"]
    for name in ("ours (default)", "ours (reference preset)"):
        m = models[name]
        assert "errors" not in m, m.get("errors")
        for key in ("forward_bf16_s", "rollout_bf16_s", "train_fp32_s", "train_bf16_s"):
            assert m[key] > 0, (name, key)
    compiled = models["ours (default), compiled"]
    assert compiled["compile_note"].startswith("compiled"), compiled["compile_note"]
    assert all(compiled[k] > 0 for k in ("forward_bf16_s", "rollout_bf16_s", "train_bf16_s"))
    # The reference runs in fp32 here; its bf16 path keeps the transforms out of autocast only on CUDA.
    assert ref["train_fp32_s"] > 0 and ref["train_fp32_peak_gib"] is None  # no peak counter on the CPU


def test_the_cuda_graph_rollout_loop_computes_the_plain_rollout(gpu) -> None:
    # The loop used with a CUDA-graph-compiled model (step marks, a copy of each state) on an eager model.
    from models.sfno import SFNO

    torch.manual_seed(0)
    model, x = SFNO(3, 3, 17, 32, embed_dim=4, num_layers=1), torch.randn(1, 3, 17, 32)
    torch.testing.assert_close(gpu.rollout_fn(model, x, 3, graphs=True)(), gpu.rollout_fn(model, x, 3)())
    plain = x
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            plain = model(plain)
    torch.testing.assert_close(gpu.rollout_fn(model, x, 3)(), plain)
