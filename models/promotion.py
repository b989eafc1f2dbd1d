"""Model promotion: a retrained checkpoint replaces the "current" model only if it scores better.

**The comparison.** Both checkpoints roll out from the same initial times — every analysis time of the
validation period from which each model's input and every lead's truth are complete (``done``) — to the
same leads, and each lead's latitude-weighted RMSE per channel is averaged over those windows
(:func:`models.evaluate.evaluate`, the same numbers as the training's validation).

**"Beats".** For each lead ``L`` let ``r(L)`` be the mean over channels of ``RMSE_candidate / RMSE_current``
(a ratio, so channels of different units count alike). The candidate beats the current model when
``r(L) < 1 − margin`` at *every* compared lead: better on average over the variables at each lead, with no
lead traded for another. A non-finite candidate RMSE never beats anything.

**The switch.** ``<runs>/current.json`` names the promoted checkpoint (path relative to ``<runs>`` when it
lies inside it, and its sha256), the scores of both models, the period and the time. It is written to a
temporary file, fsynced and ``os.replace``d, so a reader sees the old record or the new one, whole. Every
decision, promotion or refusal, is appended as one line to ``<runs>/promotions.jsonl``. A lock file
serialises promoters, and a comparison made against a model that is no longer current is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.errors import ConfigError, DataContractError, MissingInputError
from core.grid import parse_grid_attr
from core.lineage import CURRENT, PROMOTIONS, read_current
from core.runs import sha256_file
from models.checkpoint import load_for_inference
from models.data import WindowDataset, open_analysis
from models.distributed import DistContext
from models.evaluate import evaluate

log = logging.getLogger(__name__)

Scores = dict[str, dict[str, float]]  # lead ("24h") → channel → RMSE


@dataclass(frozen=True)
class Comparison:
    """Validation scores of a candidate and the current model on the same windows, and the verdict."""

    candidate: str
    candidate_sha256: str
    current: str | None  # None: there is no current model yet
    current_sha256: str | None
    period: tuple[str, str]
    lead_hours: list[int]
    init_times: list[str]
    candidate_rmse: Scores
    current_rmse: Scores | None
    ratio: dict[str, float] | None  # lead → mean over channels of RMSE_candidate / RMSE_current
    margin: float
    beats: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _load(path: Path, grid_shape: tuple[int, int], what: str) -> tuple[Any, dict[str, Any]]:
    model, meta = load_for_inference(path)
    if parse_grid_attr(meta["grid"]).shape != grid_shape:
        raise DataContractError(f"{what} checkpoint {path} is for grid {meta['grid']}, the analysis store is "
                                f"{grid_shape[0]}x{grid_shape[1]}: compare on the grid both were trained on")
    return model, meta


def _windows(analysis: Any, meta: dict[str, Any], model: Any, period: tuple[pd.Timestamp, pd.Timestamp],
             steps: int) -> WindowDataset:
    task = meta["task"]
    return WindowDataset(analysis, list(meta["channels"]), period[0], period[1], steps, int(task["time_step_hours"]),
                         int(getattr(model, "history", task.get("history", 1))), task.get("time_features", []))


def _restrict(ds: WindowDataset, init_times: np.ndarray) -> None:
    # Keep only the windows both models can start from, so both are scored on the same initial times.
    ds.index = ds.index[np.isin(ds.init_times, init_times)]


def _verdict(cand: Scores, cur: Scores, margin: float) -> tuple[dict[str, float], bool, str]:
    ratio = {lead: float(np.mean([cand[lead][ch] / cur[lead][ch] for ch in cand[lead]])) for lead in cand}
    if not all(math.isfinite(v) for lead in cand for v in cand[lead].values()):
        return ratio, False, "the candidate's RMSE is not finite"
    worse = [lead for lead, r in ratio.items() if not r < 1 - margin]
    shown = ", ".join(f"{lead} {r:.4f}" for lead, r in ratio.items())
    if worse:
        return ratio, False, (f"mean RMSE ratio to the current model not below {1 - margin:g} at {', '.join(worse)} "
                              f"({shown})")
    return ratio, True, f"mean RMSE ratio to the current model below {1 - margin:g} at every lead ({shown})"


def compare_checkpoints(candidate: Path | str, current: Path | str | None, analysis_store: Path | str,
                        period: tuple[Any, Any], leads: list[int], margin: float = 0.0,
                        device: str | torch.device = "cpu") -> Comparison:
    """Score ``candidate`` and ``current`` (None: no current model) on the same windows of ``period`` at ``leads`` h."""
    if not 0 <= margin < 1:
        raise ConfigError(f"promotion margin {margin} must be in [0, 1)")
    if not leads or min(leads) < 1:
        raise ConfigError(f"leads {leads} must list positive lead times in hours")
    start, end = pd.Timestamp(period[0]), pd.Timestamp(period[1])
    if end < start:
        raise ConfigError(f"comparison period ends ({end}) before it starts ({start})")
    analysis = open_analysis(analysis_store)
    shape = (analysis.sizes["latitude"], analysis.sizes["longitude"])
    cand_path = Path(candidate)
    cand_model, cand_meta = _load(cand_path, shape, "candidate")
    step_h = int(cand_meta["task"]["time_step_hours"])
    odd = [h for h in leads if h % step_h]
    if odd:
        raise ConfigError(f"leads {odd} h are not multiples of the model step {step_h} h")
    steps = sorted({h // step_h for h in leads})
    cand_ds = _windows(analysis, cand_meta, cand_model, (start, end), max(steps))
    common = cand_ds.init_times
    cur_model = cur_ds = None
    if current is not None:
        cur_model, cur_meta = _load(Path(current), shape, "current")
        if list(cur_meta["channels"]) != list(cand_meta["channels"]):
            raise DataContractError(f"candidate {cand_path} predicts {cand_meta['channels']} but the current model "
                                    f"{current} predicts {cur_meta['channels']}: their scores cannot be compared")
        if int(cur_meta["task"]["time_step_hours"]) != step_h:
            raise DataContractError(f"candidate steps {step_h} h but the current model {current} steps "
                                    f"{cur_meta['task']['time_step_hours']} h")
        cur_ds = _windows(analysis, cur_meta, cur_model, (start, end), max(steps))
        common = np.intersect1d(common, cur_ds.init_times)
    if len(common) == 0:
        raise MissingInputError(f"no initial time in {start}..{end} has complete analyses for {max(steps) * step_h} h "
                                f"of leads{' for both models' if current is not None else ''}")
    _restrict(cand_ds, common)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    clim = cand_ds.time_mean()  # only for the relative errors evaluate also reports; the verdict uses RMSE
    cand = evaluate(cand_model.to(ctx.device), cand_ds, steps, step_h, clim, ctx)["rmse"]
    cur = ratio = None
    if cur_ds is not None:
        _restrict(cur_ds, common)
        cur = evaluate(cur_model.to(ctx.device), cur_ds, steps, step_h, clim, ctx)["rmse"]
        ratio, beats, reason = _verdict(cand, cur, margin)
    else:
        beats, reason = True, "there is no current model: the first model becomes current"
    times = [pd.Timestamp(t).isoformat() for t in common]
    log.info("compared %s with %s on %d initial times: %s", cand_path, current, len(times), reason)
    return Comparison(str(cand_path), sha256_file(cand_path), None if current is None else str(current),
                      None if current is None else sha256_file(Path(current)), (start.isoformat(), end.isoformat()),
                      sorted(set(leads)), times, cand, cur, ratio, float(margin), beats, reason)


def _stored_path(path: Path, runs_dir: Path) -> str:
    try:
        return path.resolve().relative_to(runs_dir.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _atomic_json(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def _append(line: dict[str, Any], path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())  # one write: whole lines, never torn
    finally:
        os.close(fd)


def promote(runs_dir: Path | str, candidate: Path | str, comparison: Comparison) -> bool:
    """Make ``candidate`` current if ``comparison`` says it beats the current model; record the decision either way."""
    runs_dir, candidate = Path(runs_dir), Path(candidate)
    if candidate.resolve() != Path(comparison.candidate).resolve():
        raise ValueError(f"the comparison is of {comparison.candidate}, not of {candidate}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / ".promotion.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if sha256_file(candidate) != comparison.candidate_sha256:
            raise DataContractError(f"candidate {candidate} changed since it was compared (sha256 differs): compare again")
        now = read_current(runs_dir)
        now_sha = now["checkpoint_sha256"] if now else None
        if now_sha != comparison.current_sha256:
            raise DataContractError(f"the current model is {now_sha or 'none'} but the comparison was made against "
                                    f"{comparison.current_sha256 or 'none'}: compare again with the current model")
        if now_sha == comparison.candidate_sha256:
            decision = "unchanged"  # the candidate already is the current model (a rerun of the same retrain)
        elif comparison.beats:
            decision = "promoted"
        else:
            decision = "refused"
        at = datetime.now(UTC).isoformat(timespec="seconds")
        scores = {"candidate": comparison.candidate_rmse, "current": comparison.current_rmse}
        if decision == "promoted":
            previous = {k: now[k] for k in ("checkpoint", "checkpoint_sha256", "run_name")} if now else None
            _atomic_json({"checkpoint": _stored_path(candidate, runs_dir),
                          "checkpoint_sha256": comparison.candidate_sha256, "run_name": candidate.resolve().parent.name, "promoted_at": at,
                          "period": list(comparison.period), "lead_hours": comparison.lead_hours,
                          "init_times": len(comparison.init_times), "scores": scores, "ratio": comparison.ratio,
                          "margin": comparison.margin, "reason": comparison.reason, "previous": previous},
                         runs_dir / CURRENT)
        _append({"decided_at": at, "decision": decision, "candidate": str(candidate.resolve()),
                 "candidate_sha256": comparison.candidate_sha256, "current": comparison.current,
                 "current_sha256": comparison.current_sha256, "period": list(comparison.period),
                 "lead_hours": comparison.lead_hours, "init_times": len(comparison.init_times),
                 "ratio": comparison.ratio, "margin": comparison.margin, "reason": comparison.reason,
                 "scores": scores}, runs_dir / PROMOTIONS)
    log.info("promotion of %s: %s (%s)", candidate, decision, comparison.reason)
    return decision == "promoted"
