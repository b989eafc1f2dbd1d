"""The ``verify_forecasts`` flow: score published runs whose truth has arrived, then draw their scorecards and error maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import xarray as xr
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import Config, load_config
from core.errors import DataContractError
from core.runs import read_manifest
from core.verify_runs import AGGREGATE_JSON, SCORES_JSON, VerifyReport, open_store, verified_leads, verify_runs
from serve.layout import ERROR_MAPS_INDEX
from serve.maps_error import render_error_maps
from serve.scorecard import render_scorecard

SCORECARD_PNG = "scorecard.png"
AGGREGATE_PNG = "aggregate.png"


@task(name="verify-runs", cache_policy=NO_CACHE)
def verify_task(config: Config) -> VerifyReport:
    """Score every out-of-date run into JSON and the scores table."""
    report = verify_runs(config)
    get_run_logger().info("verification: %d scored %s, %d up to date, %d awaiting truth, %d failed",
                          len(report.scored), report.scored, len(report.skipped), len(report.pending),
                          len(report.failed))
    return report


@task(name="render-scorecards", cache_policy=NO_CACHE)
def scorecard_task(report: VerifyReport, dpi: int) -> list[str]:
    """Draw the scorecard of each re-scored run (and any missing one) and the aggregate."""
    out: list[str] = []
    for name, payload in report.runs.items():
        png = report.verification_dir / name / SCORECARD_PNG
        json_file = report.verification_dir / name / SCORES_JSON
        if name in report.scored or not png.is_file() or png.stat().st_mtime < json_file.stat().st_mtime:
            out.append(str(render_scorecard(payload, png, dpi=dpi)))
    if report.aggregate is not None:
        out.append(str(render_scorecard(report.aggregate, report.verification_dir / AGGREGATE_PNG, dpi=dpi)))
    return out


@task(name="render-error-maps", cache_policy=NO_CACHE)
def error_maps_task(config: Config, report: VerifyReport) -> list[str]:
    """Draw forecast − analysis maps of each re-scored run (and any whose error maps are missing or older)."""
    logger = get_run_logger()
    r = config.render
    drawn: list[str] = []
    store = None
    for name in report.runs:
        index = report.verification_dir / name / ERROR_MAPS_INDEX
        scores = report.verification_dir / name / SCORES_JSON
        if name not in report.scored and index.is_file() and index.stat().st_mtime >= scores.stat().st_mtime:
            continue
        store = store if store is not None else open_store(config.paths.analysis_store)
        run_dir = config.paths.forecasts / name
        try:
            with xr.open_zarr(run_dir / "forecast.zarr", consolidated=False, chunks=None) as fc:
                pairs = verified_leads(fc, store)
                written = render_error_maps(fc, store, pairs, report.verification_dir / name, dpi=r.dpi,
                                            natural_earth_dir=r.natural_earth_dir, products=r.products,
                                            regions=r.regions, boxes=r.boxes, workers=r.workers,
                                            animations=r.animations, provenance=read_manifest(run_dir)["provenance"])
        except (ValueError, OSError, KeyError) as exc:
            # Scores stand without their maps; the next pass retries (the index is still missing or old).
            logger.error("error maps of run %s could not be drawn: %s", name, exc)
            continue
        drawn.append(name)
        logger.info("error maps of run %s: %d files over %d verified leads", name, len(written), len(pairs))
    return drawn


@flow(name="verify_forecasts", log_prints=True)
def verify_forecasts(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every published run against the truth that now exists; write JSON, table rows and scorecards."""
    config = load_config(config_path, overrides=overrides)
    report = verify_task(config)
    pngs = scorecard_task(report, config.render.dpi)
    error_maps = error_maps_task(config, report)
    summary = {"scored": report.scored, "skipped": report.skipped, "pending": report.pending,
               "failed": report.failed, "database_url": report.database_url, "scorecards": pngs,
               "error_maps": error_maps,
               "aggregate": str(Path(report.verification_dir) / AGGREGATE_JSON) if report.aggregate else None}
    if report.failed:
        # Every other run was scored and drawn first; the flow still fails so the operator sees it.
        raise DataContractError(f"runs that could not be scored: {report.failed}")
    return summary
