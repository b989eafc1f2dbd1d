"""Error maps of a verified run: forecast − analysis per lead whose truth exists.

Written by verification (not by the forecast) into ``<verification>/<run>/maps/error_<product>/<region>/
<lead_h:03d>.png`` (+ animations), beside the run's scores: a published run's files and manifest stay
as published, and these maps change whenever the truth does (new leads, ERA5T replaced by final).
``maps/index.json`` lists every file with its size and sha256, as a run's manifest does, so they are
served with the same integrity check; the whole ``maps/`` is swapped in at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from core.config import MapBox
from core.errors import ConfigError, DataContractError, MissingInputError
from core.runs import sha256_file
from serve.derived import LeadArrays, channel_field, fill_errors
from serve.layout import ERROR_MAPS_INDEX, MAPS_DIR
from serve.maps import Frame, forecast_channels, reduce_members, render_jobs
from serve.products import products_for
from serve.products_derived import ERROR_PREFIX, PROB_PREFIX, SPREAD_PREFIX, error_product, is_derived
from serve.render_batch import Job


def _base_names(products: Sequence[str] | None) -> list[str] | None:
    """Base product names of a request that may name ``error_<product>`` or ``<product>``.

    Spread and probability names (the same ``render.products`` list serves both renderings) have no error.
    """
    if products is None:
        return None
    out = []
    for name in products:
        if name.startswith((SPREAD_PREFIX, PROB_PREFIX)):
            continue
        base = name[len(ERROR_PREFIX):] if name.startswith(ERROR_PREFIX) else name
        if is_derived(base):
            raise ConfigError(f"map product {name!r} has no error map: errors are drawn for forecast products only")
        out.append(base)
    return out


def _same_grid(forecast: xr.Dataset, analysis: xr.Dataset) -> None:
    for axis in ("latitude", "longitude"):
        a, b = forecast[axis].values, analysis[axis].values
        if a.shape != b.shape or not np.allclose(a, b):
            raise DataContractError(f"forecast {axis} ({a.size} points) differs from the analysis store's ({b.size}); "
                             "error maps need both on one grid")


def write_index(maps_dir: Path) -> dict[str, Any]:
    """``maps/index.json``: run-relative path → size and sha256 of every file under ``maps_dir``."""
    files = {f"{MAPS_DIR}/{p.relative_to(maps_dir).as_posix()}": {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(maps_dir.rglob("*")) if p.is_file() and p.name != Path(ERROR_MAPS_INDEX).name}
    index = {"files": files}
    (maps_dir / Path(ERROR_MAPS_INDEX).name).write_text(json.dumps(index, indent=1, sort_keys=True))
    return index


def render_error_maps(forecast: xr.Dataset, analysis: xr.Dataset, truth_leads: Sequence[tuple[int, int]],
                      out_dir: Path, dpi: int = 80, natural_earth_dir: Path | None = None,
                      products: Sequence[str] | None = None, regions: Sequence[str] | None = ("global",),
                      boxes: Sequence[MapBox] = (), workers: int = 1, progress: bool = False,
                      animations: bool = True, provenance: Mapping[str, Any] | None = None,
                      stats: dict[str, float] | None = None) -> list[Path]:
    """Draw forecast − analysis of each verified lead into ``out_dir/maps/error_<product>/…``; the paths written.

    ``truth_leads`` pairs a lead index of the forecast with the analysis time index that verifies it
    (:func:`core.verify_runs.truth_state`). An ensemble's error is that of its member mean. Products
    are the run's forecast products whose channels the analysis also holds (or those named).
    """
    if forecast.sizes.get("init_time") != 1:
        raise DataContractError(f"forecast has init_time of size {forecast.sizes.get('init_time')}, expected 1")
    if not truth_leads:
        raise MissingInputError("no lead of this run has its analysis yet: there is no error to map")
    mean, prefix = reduce_members(forecast)
    have = set(forecast_channels(analysis))
    channels = [ch for ch in forecast_channels(mean) if ch in have]
    if not channels:
        raise DataContractError("the analysis store holds none of the forecast's channels: there is no error to map")
    bases = products_for(channels, _base_names(products))
    _same_grid(mean, analysis)
    leads = [int(k) for k, _ in truth_leads]
    frame = Frame.of(mean, provenance, natural_earth_dir, regions, boxes, dpi, animations, lead_index=leads)
    derived = [error_product(b) for b in bases]
    needed = list(dict.fromkeys(ch for b in bases for ch in b.channels))

    def build(stage: Path) -> list[Job]:
        shape = (len(truth_leads), mean.sizes["latitude"], mean.sizes["longitude"])
        out = LeadArrays(stage / ".arrays", [key for d in derived for key in d.channels], shape)
        for j, (k, i) in enumerate(truth_leads):
            fc = {ch: channel_field(mean, ch, init_time=0, lead_time=int(k)) for ch in needed}
            truth = {ch: channel_field(analysis, ch, time=int(i)) for ch in needed}
            fill_errors(out, j, bases, fc, truth)
        arrays = out.close()
        return [job for d in derived for job in frame.job(d, arrays, stage, prefix)]

    return render_jobs(out_dir, build, workers, progress, stats, finish=write_index)
