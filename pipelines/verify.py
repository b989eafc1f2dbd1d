"""The ``verify_forecasts`` flow: score published runs whose truth has arrived, then draw their scorecards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from core.config import Config, load_config
from core.verify_runs import AGGREGATE_JSON, SCORES_JSON, VerifyReport, verify_runs
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


@flow(name="verify_forecasts", log_prints=True)
def verify_forecasts(config_path: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every published run against the truth that now exists; write JSON, table rows and scorecards."""
    config = load_config(config_path, overrides=overrides)
    report = verify_task(config)
    pngs = scorecard_task(report, config.render.dpi)
    summary = {"scored": report.scored, "skipped": report.skipped, "pending": report.pending,
               "failed": report.failed, "database_url": report.database_url, "scorecards": pngs,
               "aggregate": str(Path(report.verification_dir) / AGGREGATE_JSON) if report.aggregate else None}
    if report.failed:
        # Every other run was scored and drawn first; the flow still fails so the operator sees it.
        raise ValueError(f"runs that could not be scored: {report.failed}")
    return summary
