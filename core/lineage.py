"""Lineage of a forecast run: dataset version → stats → checkpoint → forecast run → scores.

Every link is read from what the stages already leave on disk, never reconstructed from today's config:

- the run's ``manifest.json`` provenance (checkpoint path and sha256, dataset version, code version);
- the checkpoint registry ``<runs>/registry.jsonl`` (one line per registered checkpoint, matched by file sha256);
- the training run's ``config.yaml`` (train and validation periods) and ``inputs.json`` (dataset version and
  stats file sha256 + period as they were when the run started, written by :func:`record_training_inputs`);
  without ``inputs.json`` the stats file as it is now is reported, marked as not recorded at training time;
- the promoted model ``<runs>/current.json`` and the decisions ``<runs>/promotions.jsonl``;
- verification's ``<paths.verification>/<run>/scores.json`` when it exists.

This module also reads ``current.json`` for :meth:`core.config.Config.checkpoint_path`; ``models.promotion``
writes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from core.config import Config
from core.errors import DataContractError, MissingInputError
from core.location import as_location, exists, local_copy, zarr_url
from core.runs import MANIFEST, list_runs, parse_run_name, read_manifest, sha256_file

CURRENT = "current.json"
PROMOTIONS = "promotions.jsonl"
REGISTRY = "registry.jsonl"
INPUTS = "inputs.json"
CURRENT_KEYS = ("checkpoint", "checkpoint_sha256", "run_name", "promoted_at")


def read_current(runs_dir: Path) -> dict[str, Any] | None:
    """The promoted model's record from ``<runs>/current.json`` (None if nothing was promoted yet)."""
    path = Path(runs_dir) / CURRENT
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataContractError(f"{path} is not valid JSON ({exc}); restore it from {PROMOTIONS} or delete it") from None
    missing = [k for k in CURRENT_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise DataContractError(f"{path} lacks {missing}; restore it from {PROMOTIONS} or delete it")
    return record


def current_checkpoint(runs_dir: Path) -> Path | None:
    """Path of the promoted model's checkpoint (relative paths are under ``runs_dir``), or None."""
    record = read_current(runs_dir)
    if record is None:
        return None
    path = Path(record["checkpoint"])
    return path if path.is_absolute() else Path(runs_dir) / path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, skipping lines that do not parse (an empty list if it is absent)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # whole lines are appended with O_APPEND; a stray one is not worth failing the report for
        if isinstance(item, dict):
            out.append(item)
    return out


def _store_version(store: Path) -> str | None:
    import xarray as xr

    store = as_location(store)
    if not exists(store):
        return None
    with xr.open_zarr(zarr_url(store), consolidated=False) as ds:
        return str(ds.attrs.get("dataset_version"))


def stats_identity(stats_file: Path) -> dict[str, Any]:
    """The stats file's sha256, period and dataset version (``ValueError`` if it is missing)."""
    import xarray as xr

    stats_file = as_location(stats_file)
    if not exists(stats_file):
        raise MissingInputError(f"statistics file {stats_file} does not exist")
    with local_copy(stats_file) as local, xr.open_dataset(local) as ds:
        attrs = dict(ds.attrs)
        digest = sha256_file(local)
    return {"path": str(stats_file), "sha256": digest,
            "period": [str(attrs.get("period_start")), str(attrs.get("period_end"))],
            "dataset_version": str(attrs.get("dataset_version"))}


def record_training_inputs(config: Config) -> Path:
    """Write ``<runs>/<train.run_name>/inputs.json``: the dataset version and stats a run starts from."""
    t = config.train
    run_dir = config.paths.runs / t.run_name
    if (run_dir / INPUTS).is_file() and t.resume == "auto":
        return run_dir / INPUTS  # a resumed run continues from what its first attempt started with
    run_dir.mkdir(parents=True, exist_ok=True)
    inputs = {"dataset_version": _store_version(config.paths.analysis_store),
              "analysis_store": str(config.paths.analysis_store), "stats": stats_identity(config.paths.stats_file),
              "train_period": [t.train_start.isoformat(), t.train_end.isoformat()],
              "val_period": [t.val_start.isoformat(), t.val_end.isoformat()],
              "recorded_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")}
    tmp = run_dir / f".{INPUTS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(inputs, indent=2, sort_keys=True))
    os.replace(tmp, run_dir / INPUTS)
    return run_dir / INPUTS


def training_run(checkpoint: Path, entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training run behind a checkpoint: name, directory, periods (from its ``config.yaml``) and ``inputs.json``."""
    run_dir = Path(entry["checkpoint"]).parent if entry else checkpoint.parent
    out: dict[str, Any] = {"name": run_dir.name, "dir": str(run_dir)}
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        train = (yaml.safe_load(config_file.read_text()) or {}).get("train", {})
        out["train_period"] = [str(train.get("train_start")), str(train.get("train_end"))]
        out["val_period"] = [str(train.get("val_start")), str(train.get("val_end"))]
    inputs = run_dir / INPUTS
    out["inputs"] = json.loads(inputs.read_text()) if inputs.is_file() else None
    return out


def lineage(config: Config, run: str) -> dict[str, Any]:
    """The lineage record of published forecast run ``run``; ``ValueError`` for a run that is not published."""
    p = config.paths
    return lineage_at(run, p.forecasts, p.runs, p.verification, stats_file=p.stats_file,
                      analysis_store=p.analysis_store)


def lineage_at(run: str, forecasts: Path, runs_dir: Path, verification: Path | None,
               stats_file: Path | None = None, analysis_store: Path | None = None,
               sha256: Callable[[Path], str] = sha256_file) -> dict[str, Any]:
    """The lineage record of run ``run`` from the directories it is read from (a missing stats file or store: unknown).

    ``sha256`` hashes the checkpoint, manifest and scores files (a server passes a cached one).
    """
    parse_run_name(run)
    forecasts, runs_dir = Path(forecasts), Path(runs_dir)
    if run not in list_runs(forecasts):
        known = list_runs(forecasts)
        hint = f"published: {', '.join(known[-5:])}" if known else "no run is published there"
        raise MissingInputError(f"no published forecast run {run!r} in {forecasts} ({hint})")
    run_dir = forecasts / run
    manifest = read_manifest(run_dir)
    prov = manifest.get("provenance", {})
    if "checkpoint" not in prov or "checkpoint_sha256" not in prov:
        raise DataContractError(f"manifest of run {run} records no checkpoint and checkpoint_sha256 in its provenance")
    checkpoint, digest = Path(prov["checkpoint"]), str(prov["checkpoint_sha256"])
    entries = [e for e in read_jsonl(runs_dir / REGISTRY) if e.get("sha256") == digest]
    entry = entries[-1] if entries else None
    training = training_run(checkpoint, entry)
    current = read_current(runs_dir)
    promotions = [p for p in read_jsonl(runs_dir / PROMOTIONS) if p.get("candidate_sha256") == digest]
    # A relative path in the manifest is relative to where the forecast ran; the registry holds it resolved.
    on_disk = checkpoint if checkpoint.is_file() or entry is None else Path(entry["checkpoint"])
    now_sha = sha256(on_disk) if on_disk.is_file() else None
    record_ckpt = {"path": str(checkpoint), "sha256": digest, "file_now": "missing" if now_sha is None else
                   ("same" if now_sha == digest else f"changed (sha256 {now_sha})"),
                   "registered_at": entry.get("registered_at") if entry else None,
                   "train_step": entry.get("train_step") if entry else None,
                   "weights_sha256": prov.get("weights_sha256"), "training_run": training,
                   "current": bool(current and current.get("checkpoint_sha256") == digest),
                   "promotion": promotions[-1] if promotions else None}
    inputs = training.pop("inputs")
    if inputs is not None:
        stats = {**inputs["stats"], "recorded_at_training": True}
    elif stats_file is not None and exists(as_location(stats_file)):
        stats = {**stats_identity(as_location(stats_file)), "recorded_at_training": False}
    else:
        stats = None
    dataset = {"dataset_version": prov.get("dataset_version"),
               "store": str(analysis_store) if analysis_store is not None else None,
               "store_version_now": _store_version(as_location(analysis_store)) if analysis_store is not None else None}
    scores_file = Path(verification) / run / "scores.json" if verification is not None else None
    scores = ({"path": str(scores_file), "sha256": sha256(scores_file)}
              if scores_file is not None and scores_file.is_file() else None)
    forecast = {"name": run, "init_time": manifest["init_time"], "created": manifest.get("created"),
                "dir": str(run_dir), "manifest_sha256": sha256(run_dir / MANIFEST),
                "code_version": prov.get("code_version"), "lead_hours": prov.get("lead_hours"),
                "init_source": prov.get("init_source"), "init_store_kind": prov.get("init_store_kind")}
    return {"run": run, "dataset": dataset, "stats": stats, "checkpoint": record_ckpt, "forecast": forecast,
            "scores": scores}


def _short(digest: str | None) -> str:
    return f"{digest[:12]}…" if digest else "?"


def format_lineage(record: dict[str, Any]) -> str:
    """The lineage record as readable lines, oldest link first."""
    d, s, c, f, sc = (record[k] for k in ("dataset", "stats", "checkpoint", "forecast", "scores"))
    t = c["training_run"]
    now = d["store_version_now"]
    lines = [f"lineage of forecast run {record['run']}",
             f"  dataset     version {d['dataset_version']} (store {d['store']} now "
             f"{'the same' if now == d['dataset_version'] else now or 'absent'})"]
    if s is None:
        lines.append("  stats       unknown (no inputs.json in the training run and no stats file)")
    else:
        when = "as recorded when training started" if s["recorded_at_training"] else "the file now, not recorded at training"
        lines.append(f"  stats       {s['path']} sha256 {_short(s['sha256'])} period {s['period'][0]} → "
                     f"{s['period'][1]} ({when})")
    period = t.get("train_period")
    lines.append(f"  checkpoint  {c['path']} sha256 {_short(c['sha256'])} (file {c['file_now']})")
    lines.append(f"              training run {t['name']}"
                 + (f", trained on {period[0]} → {period[1]}, validated on {t['val_period'][0]} → "
                    f"{t['val_period'][1]}" if period else "")
                 + (f", step {c['train_step']}, registered {c['registered_at']}" if c["registered_at"] else
                    ", not in the registry"))
    promo = c["promotion"]
    lines.append("              " + ("the current model" if c["current"] else "not the current model")
                 + (f"; promotion {promo.get('decision')} at {promo.get('decided_at')}" if promo else ""))
    source = f", initial state from the {f['init_store_kind']} store ({f['init_source']})" if f.get("init_source") else ""
    lines.append(f"  forecast    {f['name']} init {f['init_time']} manifest sha256 {_short(f['manifest_sha256'])} "
                 f"(code {f['code_version']}{source})")
    lines.append(f"  scores      {sc['path']} sha256 {_short(sc['sha256'])}" if sc else
                 "  scores      not yet (no scores.json for this run)")
    return "\n".join(lines)
