"""Self-describing, atomically written checkpoints (GraphCast style: the file is enough to forecast).

Layout of ``checkpoint.pt`` (a ``torch.save`` dict)::

    meta      channels, grid, stats, task, model, arch, code/dataset version, weights_sha256, train_step
    model     state_dict of the ``Normalized`` model (stats buffers included)
    training  optional: optimizer, scheduler, RNG states and data position, for resuming

``weights_sha256`` is the sha256 of the state_dict serialized canonically (sorted keys; per tensor
its name, dtype, shape and raw little-endian bytes), so it can be recomputed after loading and does
not depend on pickle or zip details.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from core.config import Config
from core.errors import DataContractError, MissingInputError
from core.grid import Grid, parse_grid_attr
from core.schema import SCHEMA_VERSION, validate_checkpoint_meta
from models.normalization import Normalized
from models.sfno import SFNO

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe`` of the source tree, else the installed package version, else ``unknown``."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=_REPO,
                             capture_output=True, text=True, timeout=10, check=True)
        if out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return metadata.version("spherecast")
    except metadata.PackageNotFoundError:
        return "unknown"


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of a state_dict serialized canonically (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_meta(config: Config, stats: xr.Dataset, grid: Grid, arch: Mapping[str, Any],
               state: Mapping[str, torch.Tensor], train_step: int, dataset_version: str,
               pole_modes: list[list[int]] | None = None) -> dict[str, Any]:
    """The metadata that lets a checkpoint run alone; validated against the contract."""
    channels = config.task.channels()
    sel = stats.sel(channel=channels)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "channels": channels,
        "grid": grid.describe(),
        "stats": {k: [float(v) for v in sel[k].values] for k in ("mean", "std", "diff_std")},
        "stats_period": [str(stats.attrs.get("period_start")), str(stats.attrs.get("period_end"))],
        "task": config.task.model_dump(mode="json"),
        "model": config.model.model_dump(mode="json"),
        "arch": dict(arch),
        "code_version": code_version(),
        "dataset_version": dataset_version,
        "weights_sha256": state_dict_sha256(state),
        "train_step": int(train_step),
    }
    if pole_modes is not None:  # task.pole_rows="data": the form of the training data's pole rows (models.poles)
        meta["pole_modes"] = pole_modes
    validate_checkpoint_meta(meta)
    return meta


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temp file beside ``path``, fsync, then ``os.replace`` (never a torn file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # fsync the directory too, so the rename itself survives a crash.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def save_checkpoint(path: Path, model: Normalized, meta: Mapping[str, Any],
                    training: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically; ``meta['weights_sha256']`` must describe ``model``'s weights."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if meta["weights_sha256"] != state_dict_sha256(state):
        raise ValueError("checkpoint meta weights_sha256 does not describe the model being saved")
    validate_checkpoint_meta(meta)
    obj: dict[str, Any] = {"meta": dict(meta), "model": state}
    if training is not None:
        obj["training"] = dict(training)
    return atomic_torch_save(obj, path)


def read_checkpoint(path: Path | str, weights_only: bool = True) -> dict[str, Any]:
    """Load a checkpoint dict; ``ValueError`` naming the file if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError … on damage
        raise DataContractError(f"checkpoint {path} is corrupt or unreadable: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict) or "meta" not in obj or "model" not in obj:
        raise DataContractError(f"checkpoint {path} lacks 'meta' or 'model'")
    return obj


def build_model(meta: Mapping[str, Any]) -> Normalized:
    """An untrained ``Normalized(SFNO)`` with the architecture and stats a checkpoint describes."""
    arch = dict(meta["arch"])
    stats = meta["stats"]
    history, names, clock = model_inputs(meta)
    # The static fields' values are weights-side buffers: zeros here, filled by load_state_dict.
    static = np.zeros((len(names), *parse_grid_attr(meta["grid"]).shape), np.float32) if names else None
    return Normalized(SFNO(**arch), stats["mean"], stats["std"], stats["diff_std"], history, static, names, clock,
                      float(meta.get("task", {}).get("time_step_hours", 6)), meta.get("pole_modes"))


def model_inputs(meta: Mapping[str, Any]) -> tuple[int, list[str], list[str]]:
    """``(history, static field names, time features)`` of a checkpoint (1, none, none where older than them)."""
    task = meta.get("task", {})
    return int(task.get("history", 1)), list(task.get("static_fields", [])), list(task.get("time_features", []))


def load_for_inference(path: Path | str) -> tuple[Normalized, dict[str, Any]]:
    """Load a checkpoint as an eval-mode model after checking its metadata and weights checksum."""
    obj = read_checkpoint(path)
    meta = dict(obj["meta"])
    what = f"checkpoint {path}"
    validate_checkpoint_meta(meta, what=what)
    if "arch" not in meta:
        raise DataContractError(f"{what}: missing metadata 'arch'")
    state = obj["model"]
    digest = state_dict_sha256(state)
    if digest != meta["weights_sha256"]:
        raise DataContractError(f"{what}: weights_sha256 mismatch (meta {meta['weights_sha256'][:12]}…, "
                                f"weights {digest[:12]}…): the weights are corrupt or were altered")
    n = len(meta["channels"])
    history, names, clock = model_inputs(meta)
    if meta["arch"].get("in_channels") != history * n + 2 * len(clock) + len(names) or meta["arch"].get("out_channels") != n:
        raise DataContractError(f"{what}: {n} channels × history {history} + {2 * len(clock)} clock fields + {len(names)} "
                                f"static fields in meta but the "
                                f"network maps {meta['arch'].get('in_channels')} → {meta['arch'].get('out_channels')}")
    model = build_model(meta)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataContractError(f"{what}: weights do not fit the described architecture: {exc}") from exc
    for key in ("mean", "std", "diff_std"):
        if not np.allclose(getattr(model, key).numpy(), meta["stats"][key], rtol=1e-6):
            raise DataContractError(f"{what}: stats {key!r} in meta disagree with the weights' buffers")
    model.eval()
    return model, meta



def register_checkpoint(path: Path | str, registry: Path | str) -> dict[str, Any]:
    """Append a verified checkpoint's identity (file sha256, weights, data, code, config) to a JSONL registry."""
    import json
    from datetime import UTC, datetime

    path = Path(path)
    _, meta = load_for_inference(path)  # only a checkpoint that loads and verifies is registered
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    entry = {"registered_at": datetime.now(UTC).isoformat(timespec="seconds"), "checkpoint": str(path.resolve()),
             "sha256": digest.hexdigest(), "weights_sha256": meta["weights_sha256"],
             "dataset_version": meta["dataset_version"], "code_version": meta["code_version"],
             "train_step": meta["train_step"], "channels": list(meta["channels"]), "grid": meta["grid"],
             "task": meta["task"], "model": meta["model"]}
    registry = Path(registry)
    registry.parent.mkdir(parents=True, exist_ok=True)
    # One line per write with O_APPEND: concurrent registrations interleave whole lines, never bytes.
    fd = os.open(registry, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)
    return entry
