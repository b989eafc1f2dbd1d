"""Data for the skill bench: the shallow-water planet at two grids, split into train / validation / test.

Both stores come from the real ingest (``ingest.build.ingest``) with the same ``SyntheticConfig``:
the same seeded 65×128 solver, sampled at the same times, spectrally truncated onto each store's
grid (``SyntheticSource``), so the coarse and fine stores are one truth at two resolutions. A rerun
with the same settings finds every slab done and re-simulates nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
import yaml

from core.config import Config, SyntheticConfig, TrainConfig, config_from_dict, deep_merge
from core.fields import to_channels
from core.grid import get_grid, parse_grid_attr

log = logging.getLogger(__name__)

TEST_FRACTION, VAL_FRACTION = 0.15, 0.10  # the rest (75 %) trains, as in DESIGN §4
MIN_TEST_INITS = 4  # initial times with a complete window to the longest lead
VAL_STEPS = 4  # the trainer validates at 24 h
MIN_VAL_WINDOWS = 4
MIN_TRAIN_TIMES = 16
# Keys the bench owns: they are set from its own flags so both stores and both models agree.
RESERVED = ("paths", "grid", "ingest.start", "ingest.end", "ingest.source", "train.train_start", "train.train_end",
            "train.val_start", "train.val_end", "train.budget_minutes", "train.run_name", "train.resume")


@dataclass(frozen=True)
class Periods:
    """Consecutive training, validation and held-out test periods of the simulated planet."""

    start: pd.Timestamp
    train_end: pd.Timestamp
    val_start: pd.Timestamp
    val_end: pd.Timestamp
    test_start: pd.Timestamp
    end: pd.Timestamp

    def as_dict(self) -> dict[str, list[str]]:
        """ISO strings of each period's first and last time."""
        return {"train": [str(self.start), str(self.train_end)], "validation": [str(self.val_start), str(self.val_end)],
                "test": [str(self.test_start), str(self.end)]}


def split_periods(days: float, step_hours: int, max_lead_steps: int, epoch: pd.Timestamp) -> Periods:
    """Split ``days`` from ``epoch`` into ~75/10/15 % periods; ValueError if a period would be too short."""
    if not days > 0:
        raise ValueError(f"--days must be positive, got {days}")
    n = int(round(days * 24 / step_hours))
    test_n = max(round(TEST_FRACTION * n), max_lead_steps + MIN_TEST_INITS)
    val_n = max(round(VAL_FRACTION * n), VAL_STEPS + MIN_VAL_WINDOWS)
    train_n = n - test_n - val_n
    if train_n < MIN_TRAIN_TIMES:
        need = (MIN_TRAIN_TIMES + test_n + val_n) * step_hours / 24
        raise ValueError(f"--days {days:g} gives {n} analysis times; need at least {need:g} days "
                         f"({MIN_TRAIN_TIMES} training times, {val_n} validation, {test_n} test times for "
                         f"{max_lead_steps * step_hours} h leads from {MIN_TEST_INITS} initial times)")
    step = pd.Timedelta(hours=step_hours)
    t = [pd.Timestamp(epoch) + i * step for i in (0, train_n - 1, train_n, train_n + val_n - 1, train_n + val_n, n - 1)]
    return Periods(*t)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY.PATH=VALUE`` strings (values parsed as YAML) → nested dict; ValueError on bad or reserved keys."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ValueError(f"--set {item!r} is not KEY.PATH=VALUE (e.g. --set train.lr=1e-3)")
        dotted = ".".join(parts)
        if any(dotted == r or dotted.startswith(r + ".") for r in RESERVED):
            raise ValueError(f"--set {dotted} is set by the bench itself (use --grid, --days, --budget-minutes, "
                             "--out or --tag)")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {dotted} conflicts with another --set of {part!r}")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else raw
    return out


def synthetic_settings(overrides: Mapping[str, Any]) -> SyntheticConfig:
    """The planet's settings after ``--set ingest.synthetic.*`` overrides (validated)."""
    data = overrides.get("ingest", {}).get("synthetic", {})
    return config_from_dict({"ingest": {"synthetic": data}}, "--set").ingest.synthetic


def bench_config(out: Path, grid: str, periods: Periods, budget_minutes: float, tag: str,
                 overrides: Mapping[str, Any]) -> Config:
    """The config of one grid's store and training run under ``out/<grid>`` (ValueError if invalid)."""
    get_grid(grid)
    base = {
        "paths": {"root": str(out / grid)},
        "grid": {"preset": grid},
        "ingest": {"source": "synthetic", "start": str(periods.start), "end": str(periods.end)},
        "train": {"train_start": str(periods.start), "train_end": str(periods.train_end),
                  "val_start": str(periods.val_start), "val_end": str(periods.val_end),
                  "budget_minutes": budget_minutes, "run_name": f"sfno-{tag}"},
    }
    if "resume" in TrainConfig.model_fields:
        base["train"]["resume"] = "never"  # a measurement trains from scratch, never from an earlier run's last.pt
    return config_from_dict(deep_merge(base, overrides), f"skill bench config for {grid}")


def build_store(config: Config, progress: bool) -> dict[str, Any]:
    """Simulate (or resume, or reuse) the planet's analysis store and stats for ``config``."""
    from ingest.build import ingest

    began = time.perf_counter()
    threads = torch.get_num_threads()
    # The solver's transforms are small: a second thread buys nothing and, on a loaded 2-core
    # machine, made the planet 6× slower (measured 37 s vs 6.4 s for 6 days at 33×64).
    torch.set_num_threads(1)
    try:
        report = ingest(config, progress=progress)
    finally:
        torch.set_num_threads(threads)
    info = {"path": str(report.path), "grid": config.grid.grid().describe(), "slabs_written": report.written,
            "slabs_reused": report.skipped, "reused": report.written == 0, "seconds": round(time.perf_counter() - began, 1)}
    log.info("store %s: %d slabs written, %d reused (%.0f s)", report.path, report.written, report.skipped,
             info["seconds"])
    return info


def open_store(config: Config) -> xr.Dataset:
    """The analysis store of ``config``, checked against the contract."""
    from models.data import open_analysis

    return open_analysis(config.paths.analysis_store)


def area_mean_ke(u: np.ndarray | torch.Tensor, v: np.ndarray | torch.Tensor, weights: np.ndarray) -> np.ndarray:
    """Area-weighted mean of ½(u²+v²) over the last two (lat, lon) axes."""
    ke = 0.5 * (np.asarray(u, dtype=np.float64) ** 2 + np.asarray(v, dtype=np.float64) ** 2)
    return (ke.mean(axis=-1) * weights).sum(axis=-1)


def jet_latitudes(zonal_mean_u: np.ndarray, latitudes: np.ndarray) -> tuple[float, float]:
    """Latitudes (degrees) of the strongest zonal-mean westerly in the northern and the southern hemisphere."""
    lat = np.asarray(latitudes, dtype=np.float64)
    north, south = lat > 0, lat < 0
    u = np.asarray(zonal_mean_u, dtype=np.float64)
    return float(lat[north][np.argmax(u[north])]), float(lat[south][np.argmax(u[south])])


def planet_jets(analysis: xr.Dataset, times_per_chunk: int = 120) -> list[list[float]]:
    """The planet's jet latitudes (north, south) per chunk of the store's done times (30 days of 6-h times)."""
    done = np.flatnonzero(analysis["done"].values.astype(bool))
    u = to_channels(analysis.isel(time=done), ["u_component_of_wind_500"]).values[:, 0].mean(axis=-1)
    lat = analysis["latitude"].values
    return [list(jet_latitudes(u[i:i + times_per_chunk].mean(axis=0), lat)) for i in range(0, len(u), times_per_chunk)]


def planet_mean_ke(analysis: xr.Dataset) -> float:
    """Mean kinetic energy of the planet over every done time of the store."""
    done = analysis["done"].values.astype(bool)
    uv = to_channels(analysis.isel(time=np.flatnonzero(done)),
                     ["u_component_of_wind_500", "v_component_of_wind_500"]).values
    weights = parse_grid_attr(str(analysis.attrs["grid"])).weights
    return float(area_mean_ke(uv[:, 0], uv[:, 1], weights).mean())


def truth_consistency(coarse: xr.Dataset, fine: xr.Dataset, times: list[pd.Timestamp]) -> float:
    """Largest difference of the coarse store's geopotential from the fine one's truncated onto it (in stds).

    The coarse store is the fine truth spectrally truncated (its ``lmax``), so transforming the fine
    geopotential with the coarse truncation and back onto the coarse grid reproduces it to float32
    precision when both come from the same planet.
    """
    import torch_harmonics as th

    nlat, nlon = coarse.sizes["latitude"], coarse.sizes["longitude"]
    lmax = (nlat + 1) // 2
    kw = {"lmax": lmax, "mmax": lmax, "grid": "equiangular"}
    sht = th.RealSHT(fine.sizes["latitude"], fine.sizes["longitude"], **kw).to(torch.float64)
    isht = th.InverseRealSHT(nlat, nlon, **kw).to(torch.float64)
    worst = 0.0
    for t in times:
        hi = torch.from_numpy(fine["geopotential"].sel(time=t).isel(level=0).values.astype(np.float64))
        lo = coarse["geopotential"].sel(time=t).isel(level=0).values.astype(np.float64)
        diff = isht(sht(hi)).numpy() - lo
        worst = max(worst, float(np.abs(diff).max() / lo.std()))
    return worst
