"""Checkpoints: self-describing meta, atomic save, identical forecast after a round trip, loud failures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from core.grid import get_grid
from core.schema import CHECKPOINT_META_KEYS, validate_checkpoint_meta
from models import checkpoint as ckpt
from models.data import open_analysis
from models.forecast import rollout
from tests.models.conftest import CHANNELS, moving_planet, stats_for, tiny_config


def _fresh(tmp_path: Path, seed: int = 0) -> tuple[ckpt.Normalized, dict]:
    """An untrained model of the tiny config and its meta (no training needed to test the file)."""
    from models.train import build_sfno

    config = tiny_config(tmp_path)
    ds = moving_planet()
    stats = stats_for(ds, "2000-01-01", "2000-01-15T18")
    torch.manual_seed(seed)
    model = ckpt.Normalized(build_sfno(config, 17, 32), stats["mean"].values, stats["std"].values,
                            stats["diff_std"].values)
    meta = ckpt.build_meta(config, stats, get_grid("tiny"), model.core.arch, model.state_dict(), 7,
                           ds.attrs["dataset_version"])
    return model, meta


def test_meta_is_self_describing(tmp_path: Path) -> None:
    model, meta = _fresh(tmp_path)
    validate_checkpoint_meta(meta)
    assert set(CHECKPOINT_META_KEYS) <= set(meta)
    assert meta["channels"] == CHANNELS
    assert meta["grid"] == get_grid("tiny").describe()
    assert meta["train_step"] == 7
    config = tiny_config(tmp_path)
    assert meta["task"]["time_step_hours"] == 6
    # The meta records the model section as configured, and the arch the weights were built with.
    assert meta["model"]["embed_dim"] == config.model.embed_dim == meta["arch"]["embed_dim"]
    assert meta["arch"]["nlat"] == 17 and meta["arch"]["in_channels"] == 3
    assert meta["stats"]["diff_std"] == pytest.approx(model.diff_std.tolist())
    assert meta["code_version"] and meta["dataset_version"] == "testing-0"


def test_round_trip_gives_the_identical_forecast(tmp_path: Path) -> None:
    model, meta = _fresh(tmp_path)
    path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoint.pt", model, meta, training={"step": 7})
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    loaded, loaded_meta = ckpt.load_for_inference(path)
    assert not loaded.training
    analysis = moving_planet()
    a = rollout(model.eval(), meta, analysis, "2000-01-17", 24)
    b = rollout(loaded, loaded_meta, analysis, "2000-01-17", 24)
    for name in a.data_vars:
        assert a[name].values.tobytes() == b[name].values.tobytes()
    assert a.attrs["checkpoint_weights_sha256"] == b.attrs["checkpoint_weights_sha256"]


def test_weights_sha_is_canonical_and_sensitive(tmp_path: Path) -> None:
    model, meta = _fresh(tmp_path)
    state = model.state_dict()
    assert ckpt.state_dict_sha256(state) == meta["weights_sha256"]
    assert ckpt.state_dict_sha256(dict(reversed(list(state.items())))) == meta["weights_sha256"]
    other, _ = _fresh(tmp_path, seed=1)
    assert ckpt.state_dict_sha256(other.state_dict()) != meta["weights_sha256"]


def test_truncated_file_raises_value_error(tmp_path: Path) -> None:
    model, meta = _fresh(tmp_path)
    path = ckpt.save_checkpoint(tmp_path / "checkpoint.pt", model, meta)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        ckpt.load_for_inference(path)


def test_altered_weights_fail_the_checksum(tmp_path: Path) -> None:
    model, meta = _fresh(tmp_path)
    path = ckpt.save_checkpoint(tmp_path / "checkpoint.pt", model, meta)
    obj = torch.load(path, weights_only=True)
    obj["model"]["core.decoder.2.weight"][0, 0] += 1e-3
    torch.save(obj, path)
    with pytest.raises(ValueError, match="weights_sha256 mismatch"):
        ckpt.load_for_inference(path)


def test_meta_channels_that_do_not_fit_the_weights_raise(tmp_path: Path) -> None:
    model, meta = _fresh(tmp_path)
    meta = {**meta, "channels": CHANNELS[:2],
            "stats": {k: v[:2] for k, v in meta["stats"].items()}}
    torch.save({"meta": meta, "model": model.state_dict()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"2 channels × history 1 \+ 0 clock fields \+ 0 static fields in meta"):
        ckpt.load_for_inference(tmp_path / "checkpoint.pt")


def test_meta_stats_that_disagree_with_the_weights_raise(tmp_path: Path) -> None:
    model, meta = _fresh(tmp_path)
    meta = {**meta, "stats": {**meta["stats"], "std": [s * 2 for s in meta["stats"]["std"]]}}
    torch.save({"meta": meta, "model": model.state_dict()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="stats 'std'"):
        ckpt.load_for_inference(tmp_path / "checkpoint.pt")


def test_missing_meta_and_missing_file_raise(tmp_path: Path) -> None:
    model, meta = _fresh(tmp_path)
    del meta["dataset_version"]
    torch.save({"meta": meta, "model": model.state_dict()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="dataset_version"):
        ckpt.load_for_inference(tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.load_for_inference(tmp_path / "nope.pt")


def test_save_refuses_meta_of_other_weights(tmp_path: Path) -> None:
    model, meta = _fresh(tmp_path)
    other, _ = _fresh(tmp_path, seed=3)
    with pytest.raises(ValueError, match="does not describe"):
        ckpt.save_checkpoint(tmp_path / "checkpoint.pt", other, meta)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = ckpt.atomic_torch_save({"a": torch.ones(2)}, tmp_path / "x.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.atomic_torch_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_code_version_never_fails_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    version = ckpt.code_version.__wrapped__()  # bypass the per-process cache
    assert isinstance(version, str) and version


def test_trained_checkpoint_loads_and_matches_the_store(trained) -> None:
    config, path = trained
    model, meta = ckpt.load_for_inference(path)
    analysis = open_analysis(config.paths.analysis_store)
    assert meta["dataset_version"] == analysis.attrs["dataset_version"]
    assert meta["train_step"] > 0 and os.path.getsize(path) > 0
    obj = ckpt.read_checkpoint(path)
    assert {"optimizer", "scheduler", "rng", "position"} <= set(obj["training"])


def test_registry_records_a_verified_checkpoint_and_refuses_a_damaged_one(trained, tmp_path: Path) -> None:
    import hashlib
    import json
    import shutil

    _, path = trained
    registry = tmp_path / "registry.jsonl"
    entry = ckpt.register_checkpoint(path, registry)
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["dataset_version"] == "testing-0" and entry["code_version"] and entry["channels"] == CHANNELS
    assert [json.loads(line) for line in registry.read_text().splitlines()] == [entry]
    damaged = tmp_path / "damaged.pt"
    shutil.copy(path, damaged)
    damaged.write_bytes(damaged.read_bytes()[:-100])
    with pytest.raises(ValueError, match="damaged.pt"):
        ckpt.register_checkpoint(damaged, registry)
    assert len(registry.read_text().splitlines()) == 1
