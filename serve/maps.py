"""Map products of a forecast run: ``maps/<product>/<region>/<lead_h:03d>.png`` plus animations.

What is drawn is data: the products (:mod:`serve.products`: fields, display units, fixed levels,
overlays) and the regions (:mod:`serve.regions`: projection, extent). How it is drawn fast is
:mod:`serve.render` (one figure per product and region, reused across leads). This module turns a
forecast into jobs, checks every request before anything is written, renders into a staging
directory next to ``maps/`` and only then swaps it in, so a bad request or a failure leaves an
existing ``maps/`` untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from tqdm import tqdm

from core.config import MapBox
from core.errors import ConfigError, DataContractError
from core.variables import VARIABLES
from serve.cartopy_offline import check_natural_earth_dir, offline_natural_earth
from serve.derived import LeadArrays, channel_field, fill_ensemble
from serve.layout import MAPS_DIR
from serve.products import Product, fallback, products_for
from serve.products_derived import (
    ERROR_PREFIX,
    PROB_PREFIX,
    PROBABILITIES,
    SPREAD_PREFIX,
    Threshold,
    is_derived,
    probability_product,
    spread_product,
    thresholds_for,
)
from serve.regions import REGIONS, Region, resolve_regions
from serve.render import MapRenderer
from serve.render_batch import Job, JobResult, run_jobs, spill_arrays

log = logging.getLogger(__name__)

_TIME_FMT = "%Y-%m-%d %HUTC"
SYNTHETIC_ATTRIBUTION = "Synthetic shallow-water planet (no real geography) · spherecast"
ERA5_ATTRIBUTION = "Contains modified Copernicus Climate Change Service information (ERA5) · spherecast"
IFS_ATTRIBUTION = "Initial conditions: ECMWF IFS open data (CC-BY-4.0) · spherecast"


def forecast_channels(forecast: xr.Dataset) -> list[str]:
    """Channels (``geopotential_500``, ``2m_temperature``) held by a forecast dataset."""
    channels: list[str] = []
    for name in forecast.data_vars:
        var = VARIABLES.get(str(name))
        if var is None:
            continue
        if var.level_type == "pressure":
            channels.extend(f"{name}_{int(lv)}" for lv in forecast["level"].values)
        else:
            channels.append(str(name))
    return channels


def lead_hours(forecast: xr.Dataset) -> list[int]:
    """Lead times of a forecast in whole hours; ``ValueError`` if one is not a whole hour."""
    hours = forecast["lead_time"].values / np.timedelta64(1, "h")
    if not np.allclose(hours, np.round(hours)):
        raise DataContractError(f"forecast lead_time {hours.tolist()} h are not whole hours (map names need them)")
    return [int(h) for h in np.round(hours)]


def attribution(attrs: Mapping[str, Any], provenance: Mapping[str, Any] | None = None) -> tuple[str, bool]:
    """The data credit line of a run and whether it is the real Earth (False: the synthetic planet).

    Read from the initial conditions' source first (manifest provenance ``init_source`` /
    ``init_dataset_version``, the forecast's ``analysis_dataset_version``), then the training data's.
    The synthetic planet's dataset versions start ``swe-`` and its source is ``synthetic-shallow-water``.
    """
    prov = dict(provenance or {})
    marks = [prov.get("init_source"), prov.get("init_dataset_version"), attrs.get("analysis_dataset_version"),
             prov.get("dataset_version"), attrs.get("dataset_version"), attrs.get("source")]
    for mark in (str(m).lower() for m in marks if m):
        if mark.startswith("swe-") or "synthetic" in mark or "shallow" in mark:
            return SYNTHETIC_ATTRIBUTION, False
        if "opendata" in mark or "ifs" in mark:
            return IFS_ATTRIBUTION, True
        if "era5" in mark:
            return ERA5_ATTRIBUTION, True
    return "spherecast forecast", True


def map_title(product: Product, init: pd.Timestamp, lead_h: int, valid: pd.Timestamp, prefix: str = "") -> str:
    """Title of one map: product, init time, lead and valid time."""
    return (f"{prefix}{product.title}\ninit {init.strftime(_TIME_FMT)}   +{lead_h}h   "
            f"valid {valid.strftime(_TIME_FMT)}")


def reduce_members(forecast: xr.Dataset) -> tuple[xr.Dataset, str]:
    """An ensemble's member mean and the title prefix saying so (a single forecast unchanged, no prefix)."""
    if "member" in forecast.dims:
        return forecast.mean("member", keep_attrs=True), "Ensemble mean: "
    return forecast, ""


def _swap_in(stage_maps: Path, final: Path) -> None:
    """Replace ``final`` by the fully rendered ``stage_maps`` (old one removed only after the rename)."""
    old = final.with_name(f".{final.name}-old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(stage_maps, final)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Frame:
    """What every map of one run shares: grid, times, regions, credit line and drawing settings."""

    lat: np.ndarray
    lon: np.ndarray
    init: pd.Timestamp
    leads: list[int]
    valid: list[pd.Timestamp]
    areas: list[Region]
    dpi: int
    natural_earth_dir: Path | None
    earth: bool
    credit: str
    animations: bool

    @classmethod
    def of(cls, forecast: xr.Dataset, provenance: Mapping[str, Any] | None, natural_earth_dir: Path | None,
           regions: Sequence[str] | None, boxes: Sequence[MapBox], dpi: int, animations: bool,
           lead_index: Sequence[int] | None = None) -> Frame:
        """The frame of a forecast (of the leads at ``lead_index``, default all); checks regions and map data."""
        areas = resolve_regions(regions, boxes)
        hours = lead_hours(forecast)
        check_natural_earth_dir(Path(natural_earth_dir) if natural_earth_dir else
                                Path(__file__).resolve().parent / "naturalearth")
        credit, earth = attribution(forecast.attrs, provenance)
        valid = [pd.Timestamp(v) for v in forecast["valid_time"].values[0]]
        pick = list(range(len(hours))) if lead_index is None else list(lead_index)
        return cls(np.asarray(forecast["latitude"].values, dtype=float),
                   np.asarray(forecast["longitude"].values, dtype=float),
                   pd.Timestamp(forecast["init_time"].values[0]), [hours[i] for i in pick], [valid[i] for i in pick],
                   areas, dpi, natural_earth_dir, earth, credit, animations)

    def job(self, product: Product, arrays: Mapping[str, Any], stage: Path, prefix: str = "") -> list[Job]:
        """One job per region: every lead of ``product`` there."""
        titles = [map_title(product, self.init, lead, self.valid[i], prefix) for i, lead in enumerate(self.leads)]
        return [Job(product, region, self.lat, self.lon, {ch: arrays[ch] for ch in product.channels}, self.leads,
                    titles, stage, self.dpi, self.natural_earth_dir, self.earth, self.credit, self.animations)
                for region in self.areas]


def render_jobs(out_dir: Path, build: Callable[[Path], list[Job]], workers: int, progress: bool,
                stats: dict[str, float] | None, finish: Callable[[Path], Any] | None = None) -> list[Path]:
    """Render the jobs ``build`` makes in a staging directory, then swap them in as ``out_dir/maps``.

    ``finish`` (if given) runs on the staged ``maps`` directory, complete, just before the swap.
    """
    began_wall, began_cpu = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    workers = (os.cpu_count() or 1) if workers == 0 else workers
    stage = out_dir / f".{MAPS_DIR}-staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        jobs = build(stage)
        relpaths: list[str] = []
        n_leads = len(jobs[0].leads) if jobs else 0
        with tqdm(total=len(jobs) * n_leads, unit="map", desc="maps", disable=not progress) as bar:
            def done(result: JobResult) -> None:
                relpaths.extend(result.relpaths)
                bar.update(result.frames)

            worker_cpu = run_jobs(jobs, workers, done)
        shutil.rmtree(stage / ".arrays", ignore_errors=True)
        (stage / MAPS_DIR).mkdir(exist_ok=True)  # no frame (no lead) still replaces the old maps
        if finish is not None:
            finish(stage / MAPS_DIR)
        _swap_in(stage / MAPS_DIR, out_dir / MAPS_DIR)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    wall = time.perf_counter() - began_wall
    cpu = (time.process_time() - began_cpu) + (worker_cpu if workers > 1 else 0.0)
    frames = len(jobs) * n_leads
    used = min(workers, len(jobs)) if jobs else 0
    cores = os.cpu_count() or 1
    summary = {"wall_s": wall, "cpu_s": cpu, "frames": float(frames), "workers": float(used), "cores": float(cores),
               "cpu_per_wall": cpu / wall if wall else 0.0, "utilisation": cpu / wall / cores if wall else 0.0}
    if stats is not None:
        stats.update(summary)
    log.info("rendered %d maps (%d jobs of product × region) into %s in %.1f s, %.1f CPU s (%.0f%% of %d cores)",
             frames, len(jobs), out_dir / MAPS_DIR, wall, cpu, 100 * summary["utilisation"], cores)
    return sorted(out_dir / rel for rel in relpaths)


def choose_products(channels: Sequence[str], requested: Sequence[str] | None, ensemble: bool
                    ) -> tuple[list[Product], list[Product], list[Threshold]]:
    """(base products, bases whose spread is drawn, probability rows) of a run; checked before any drawing.

    Unrequested (None): every base product the run's channels allow and, for an ensemble, the spread
    of each and every probability row it can make. A requested derived name the run cannot make is a
    ``ValueError`` naming why.
    """
    if requested is None:
        bases = products_for(channels)
        return bases, (bases if ensemble else []), (thresholds_for(channels) if ensemble else [])
    plain = [n for n in requested if not is_derived(n)]
    spreads = [n[len(SPREAD_PREFIX):] for n in requested if n.startswith(SPREAD_PREFIX)]
    probs = [n for n in requested if n.startswith(PROB_PREFIX)]
    errors = [n for n in requested if n.startswith(ERROR_PREFIX)]
    if errors:
        raise ConfigError(f"map products {', '.join(errors)} are error maps: verification draws them once the "
                         "analysis of each lead exists (spherecast verify), not the forecast's rendering")
    if (spreads or probs) and not ensemble:
        raise ConfigError(f"map products {', '.join([SPREAD_PREFIX + s for s in spreads] + probs)} need an "
                         "ensemble run (forecast.ensemble.members > 1); this run has one member")
    known = {row.name: row for row in PROBABILITIES}
    rows = []
    for name in probs:
        if name not in known:
            raise ConfigError(f"unknown probability product {name!r}; known: {', '.join(known)}")
        missing = sorted(set(known[name].field) - set(channels))
        if missing:
            raise ConfigError(f"map product {name!r} needs {', '.join(missing)}, which the run does not hold")
        rows.append(known[name])
    return products_for(channels, plain), products_for(channels, spreads), rows


def render_run_maps(forecast: xr.Dataset, out_dir: Path, dpi: int = 80, natural_earth_dir: Path | None = None,
                    products: Sequence[str] | None = None, regions: Sequence[str] | None = ("global",),
                    boxes: Sequence[MapBox] = (), workers: int = 1, progress: bool = False,
                    animations: bool = True, provenance: Mapping[str, Any] | None = None,
                    stats: dict[str, float] | None = None) -> list[Path]:
    """Render every product × region × lead of a run to ``out_dir/maps/…``; the paths written.

    ``products`` None: every product the run's variables allow (an ensemble's spread and probability
    maps included); ``regions`` None: every built-in region (and box); by default the global map
    only, as the config's ``render.regions``. ``workers`` > 1 renders in that many processes (0: one
    per core). ``stats`` (if given) gains wall and CPU seconds, frames and CPU utilisation of the batch.
    """
    if forecast.sizes.get("init_time") != 1:
        raise DataContractError(f"forecast has init_time of size {forecast.sizes.get('init_time')}, expected 1")
    channels = forecast_channels(forecast)
    if not channels:
        raise DataContractError("forecast holds no variables from the vocabulary to map")
    ensemble = "member" in forecast.dims
    # Every request is checked before the first file is written.
    bases, spread_bases, rows = choose_products(channels, products, ensemble)
    mean, prefix = reduce_members(forecast)
    frame = Frame.of(mean, provenance, natural_earth_dir, regions, boxes, dpi, animations)
    derived = [spread_product(b) for b in spread_bases] + [probability_product(r) for r in rows]

    def build(stage: Path) -> list[Job]:
        needed = list(dict.fromkeys(ch for p in bases for ch in p.channels))
        # One channel in memory at a time: at 0.25° a run's full stack is gigabytes.
        loaded = {ch: np.ascontiguousarray(channel_field(mean, ch, init_time=0)) for ch in needed}
        arrays: dict[str, Any] = spill_arrays(loaded, stage / ".arrays") if workers not in (0, 1) else loaded
        if derived:
            arrays.update(_ensemble_arrays(forecast, spread_bases, rows, derived, stage / ".arrays"))
        return [job for p in bases + derived for job in frame.job(p, arrays, stage, prefix if p in bases else "")]

    return render_jobs(out_dir, build, workers, progress, stats)


def _ensemble_arrays(forecast: xr.Dataset, bases: Sequence[Product], rows: Sequence[Threshold],
                     derived: Sequence[Product], directory: Path) -> dict[str, str]:
    """Spread and probability fields of an ensemble run, lead by lead, as ``.npy`` paths."""
    needed = list(dict.fromkeys([ch for p in bases for ch in p.shade] + [ch for r in rows for ch in r.field]))
    n_leads = forecast.sizes["lead_time"]
    shape = (n_leads, forecast.sizes["latitude"], forecast.sizes["longitude"])
    out = LeadArrays(directory, [key for p in derived for key in p.channels], shape)
    for i in range(n_leads):
        members = {ch: channel_field(forecast, ch, init_time=0, lead_time=i) for ch in needed}
        fill_ensemble(out, i, bases, rows, members)
    return out.close()


def render_map_png(field: xr.DataArray, channel: str | None = None, title: str | None = None, dpi: int = 80,
                   natural_earth_dir: Path | None = None, region: str = "global", borders: bool = False,
                   earth: bool = True) -> bytes:
    """Render one (latitude, longitude) field as map PNG bytes with its channel's generic product."""
    name = str(field.name)
    if channel is None:
        if name in VARIABLES and VARIABLES[name].level_type == "pressure":
            if "level" not in field.coords or field["level"].size != 1:
                raise ConfigError(f"field {name!r} needs a single 'level' coordinate to be mapped")
            channel = f"{name}_{int(field['level'].values)}"
        else:
            channel = name
    product = fallback(channel)
    field = field.squeeze(drop=False)
    if set(field.dims) != {"latitude", "longitude"}:
        raise ValueError(f"render_map_png needs a (latitude, longitude) field, got dims {field.dims}")
    field = field.transpose("latitude", "longitude")
    if region not in REGIONS:
        raise ConfigError(f"unknown map region {region!r}; known: {', '.join(REGIONS)}")
    area: Region = REGIONS[region]
    with offline_natural_earth(natural_earth_dir):
        renderer = MapRenderer(product, area, np.asarray(field["latitude"].values, dtype=float),
                               np.asarray(field["longitude"].values, dtype=float), dpi, earth=earth,
                               borders=borders)
    try:
        png, _ = renderer.render({channel: np.asarray(field.values)}, title or product.title)
        return png
    finally:
        renderer.close()
