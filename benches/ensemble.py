"""Ensembles on the shallow-water planet: does the ensemble mean beat the deterministic run, and is the spread right?

From ``--inits`` initial times spread evenly over the store's held-out tail (the last 15 %, after the
checkpoint's training and validation periods), runs the deterministic forecast
(``models.forecast.forecast_states``) and an ensemble of ``--members`` (``models.ensemble.ensemble_states``:
member 0 the control, the others with spherical-harmonic initial perturbations and the model's own
one-step residuals) for each (ic_scale, residual_scale) pair asked, and scores them against the store:

* relative error (DESIGN §4: latitude-weighted RMSE / RMS of the truth's anomaly from the training-period
  mean, averaged over channels) of the deterministic run and of the ensemble mean;
* the spread/error ratio: ``sqrt((M+1)/M) · spread / RMSE(mean)`` with ``spread² `` the area-mean unbiased
  member variance and both averaged (as squares) over initial times — 1 for an ensemble whose members
  and the truth are exchangeable (Fortin et al. 2014; the factor corrects for a finite M). The
  uncorrected ratio is reported too;
* CRPS (``scores.probability.crps_for_ensemble``, fair estimator, area weights) of the ensemble and,
  for reference, the deterministic run's MAE (its CRPS), per channel and relative (divided by the
  anomaly RMS, averaged over channels).

Goals: relative error of the ensemble mean < the deterministic run's at 72 h and 120 h; spread/error
ratio 0.8–1.2 at 120 h (channel mean of the corrected ratio).

Usage: python benches/ensemble.py [--checkpoint FILE] [--data DIR] [--members 51] [--inits 16]
       [--ic-scale 0.5 ...] [--residual-scale 1.0 ...] [--bank 512] [--json FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

# As in skill_swe.py: put the project root first so "ingest" is the package, not benches/ingest.py.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scores.probability as sp  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402

from core.config_ops import EnsembleConfig  # noqa: E402
from core.fields import to_channels  # noqa: E402
from core.grid import grid_for_shape  # noqa: E402
from models.checkpoint import load_for_inference  # noqa: E402
from models.ensemble import ensemble_states, residual_bank  # noqa: E402
from models.forecast import forecast_states  # noqa: E402

LEADS_H = (24, 72, 120)
GOAL_RATIO = (0.8, 1.2)
SKILL = Path("spherecast-out/skill_swe/5.625deg")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=SKILL / "runs/sfno-default/checkpoint.pt",
                   help="a planet checkpoint (default the skill bench's)")
    p.add_argument("--data", type=Path, default=SKILL / "data", help="folder holding the checkpoint's analysis.zarr")
    p.add_argument("--members", type=int, default=51, help="members per ensemble, control included (default 51)")
    p.add_argument("--inits", type=int, default=16, help="initial times over the held-out tail (default 16)")
    p.add_argument("--ic-scale", type=float, nargs="+", default=[EnsembleConfig().ic_scale])
    p.add_argument("--residual-scale", type=float, nargs="+", default=[EnsembleConfig().residual_scale])
    p.add_argument("--ic-lmax", type=int, default=EnsembleConfig().ic_lmax)
    p.add_argument("--bank", type=int, default=512, help="training windows in the residual bank (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not args.checkpoint.is_file():
        p.error(f"--checkpoint {args.checkpoint} is not a file")
    if not (args.data / "analysis.zarr").is_dir():
        p.error(f"--data {args.data} holds no analysis.zarr")
    if args.members < 2 or args.inits < 1:
        p.error("--members must be ≥ 2 and --inits ≥ 1")
    return args


def init_times(analysis: xr.Dataset, count: int, lead_h: int) -> list[pd.Timestamp]:
    """``count`` initial times evenly over the last 15 % of the store that still have ``lead_h`` of truth.

    The same held-out test period as ``benches/skill_swe.py`` (``benches.skill_data.split_periods``).
    """
    times = pd.DatetimeIndex(analysis["time"].values)
    tail = times[len(times) - round(0.15 * len(times)):]
    usable = tail[tail + pd.Timedelta(hours=lead_h) <= times[-1]]
    picks = np.unique(np.linspace(0, len(usable) - 1, count).round().astype(int))
    return [usable[i] for i in picks]


def truth_at(analysis: xr.Dataset, channels: list[str], init: pd.Timestamp, step_h: int) -> np.ndarray:
    """The analysis at each scored lead ``(lead, channel, lat, lon)`` float64."""
    valid = [init + pd.Timedelta(hours=h) for h in LEADS_H]
    return to_channels(analysis.sel(time=valid), channels).values.astype(np.float64)


def score_init(det: np.ndarray, ens: np.ndarray, truth: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Per lead and channel: area-mean squared errors, member variance, CRPS and the deterministic MAE."""
    def amean(a: np.ndarray) -> np.ndarray:
        return (a * w).sum(axis=-2).mean(axis=-1)

    mean = ens.mean(axis=1)
    fc = xr.DataArray(ens, dims=("lead", "member", "channel", "latitude", "longitude"))
    obs = xr.DataArray(truth, dims=("lead", "channel", "latitude", "longitude"))
    crps = sp.crps_for_ensemble(fc, obs, "member", method="fair", reduce_dims=["latitude", "longitude"],
                                weights=xr.DataArray(w[:, 0], dims=("latitude",)))
    return {"mse_det": amean((det - truth) ** 2), "mse_mean": amean((mean - truth) ** 2),
            "var": amean(ens.var(axis=1, ddof=1)), "crps": crps.values, "mae_det": amean(np.abs(det - truth))}


def run_setting(model: torch.nn.Module, meta: dict[str, Any], analysis: xr.Dataset, inits: list[pd.Timestamp],
                setting: EnsembleConfig, bank: Any, dets: dict, truths: dict, anomaly_rms: np.ndarray,
                w: np.ndarray) -> dict[str, Any]:
    """Score one (ic_scale, residual_scale) setting over all initial times."""
    step_h = int(meta["task"]["time_step_hours"])
    idx = [h // step_h for h in LEADS_H]
    parts = []
    for init in inits:
        states = list(ensemble_states(model, meta, analysis, init, max(LEADS_H), setting, bank))
        ens = np.stack([states[i] for i in idx]).astype(np.float64)
        parts.append(score_init(dets[init], ens, truths[init], w))
    agg = {k: np.mean([p[k] for p in parts], axis=0) for k in parts[0]}  # (lead, channel), squares averaged
    m = setting.members
    rows = {}
    for j, h in enumerate(LEADS_H):
        rel_det = np.sqrt(agg["mse_det"][j]) / anomaly_rms
        rel_mean = np.sqrt(agg["mse_mean"][j]) / anomaly_rms
        ratio_raw = np.sqrt(agg["var"][j]) / np.sqrt(agg["mse_mean"][j])
        ratio = np.sqrt((m + 1) / m) * ratio_raw
        rows[f"{h}h"] = {
            "relative_error_deterministic": float(rel_det.mean()), "relative_error_mean": float(rel_mean.mean()),
            "spread_error_ratio": float(ratio.mean()), "spread_error_ratio_uncorrected": float(ratio_raw.mean()),
            "relative_crps": float((agg["crps"][j] / anomaly_rms).mean()),
            "relative_mae_deterministic": float((agg["mae_det"][j] / anomaly_rms).mean()),
            "per_channel": {"rmse_deterministic": np.sqrt(agg["mse_det"][j]).tolist(),
                            "rmse_mean": np.sqrt(agg["mse_mean"][j]).tolist(),
                            "spread": np.sqrt(agg["var"][j]).tolist(), "spread_error_ratio": ratio.tolist(),
                            "crps": agg["crps"][j].tolist(), "mae_deterministic": agg["mae_det"][j].tolist()}}
    lo, hi = GOAL_RATIO
    goals = {"mean_beats_deterministic_72h": rows["72h"]["relative_error_mean"] < rows["72h"]["relative_error_deterministic"],
             "mean_beats_deterministic_120h": rows["120h"]["relative_error_mean"] < rows["120h"]["relative_error_deterministic"],
             "spread_error_ratio_120h_in_range": lo <= rows["120h"]["spread_error_ratio"] <= hi}
    return {"ic_scale": setting.ic_scale, "residual_scale": setting.residual_scale, "ic_lmax": setting.ic_lmax,
            "members": m, "leads": rows, "goals": goals, "pass": all(goals.values())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The bench; prints a table and returns the report."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.monotonic()
    model, meta = load_for_inference(args.checkpoint)
    analysis = xr.open_zarr(args.data / "analysis.zarr", consolidated=False)
    channels, step_h = list(meta["channels"]), int(meta["task"]["time_step_hours"])
    inits = init_times(analysis, args.inits, max(LEADS_H))
    period = slice(*meta["stats_period"])
    clim = to_channels(analysis.sel(time=period), channels).mean("time").values.astype(np.float64)
    w = grid_for_shape(analysis.sizes["latitude"], analysis.sizes["longitude"]).weights[:, None]
    w = w / w.sum()
    truths = {t: truth_at(analysis, channels, t, step_h) for t in inits}
    anomaly = np.stack([truths[t] - clim for t in inits])  # (init, lead, channel, lat, lon)
    anomaly_rms = np.sqrt((anomaly**2 * w).sum(axis=-2).mean(axis=-1).mean(axis=(0, 1)))
    idx = [h // step_h for h in LEADS_H]
    dets = {}
    for t in inits:
        states = list(forecast_states(model, meta, analysis, t, max(LEADS_H)))
        dets[t] = np.stack([states[i] for i in idx]).astype(np.float64)
    needs_bank = any(r > 0 for r in args.residual_scale)
    tb = time.monotonic()
    bank = residual_bank(model, meta, analysis, count=args.bank, seed=args.seed) if needs_bank else None
    bank_s = time.monotonic() - tb
    results = []
    for ic, res in itertools.product(args.ic_scale, args.residual_scale):
        setting = EnsembleConfig(members=args.members, seed=args.seed, ic_scale=ic, residual_scale=res,
                                 ic_lmax=args.ic_lmax)
        ts = time.monotonic()
        results.append(run_setting(model, meta, analysis, inits, setting, bank, dets, truths, anomaly_rms, w))
        results[-1]["seconds"] = round(time.monotonic() - ts, 1)
        print_row(results[-1])
    report = {"command": " ".join(["python benches/ensemble.py", *args.argv]),
              "machine": {"machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "load_average": [round(v, 2) for v in os.getloadavg()]},
              "checkpoint": str(args.checkpoint), "channels": channels,
              "initial_times": [str(t) for t in inits], "residual_bank_windows": args.bank if needs_bank else 0,
              "residual_bank_seconds": round(bank_s, 1), "settings": results,
              "wall_s": round(time.monotonic() - t0, 1)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def print_row(r: dict[str, Any]) -> None:
    """One setting as a line per lead."""
    for lead, row in r["leads"].items():
        print(f"ic {r['ic_scale']:<5g} res {r['residual_scale']:<5g} {lead:>5}: rel.err det "
              f"{row['relative_error_deterministic']:.3f} mean {row['relative_error_mean']:.3f}  spread/error "
              f"{row['spread_error_ratio']:.2f} (raw {row['spread_error_ratio_uncorrected']:.2f})  rel.CRPS "
              f"{row['relative_crps']:.3f} (det MAE {row['relative_mae_deterministic']:.3f})", flush=True)
    print(f"   goals {r['goals']}  pass={r['pass']}  ({r['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
