"""Ingest entry point used by the CLI and flows: config in, analysis store and stats out."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from core.config import Config
from ingest.sources import make_source
from ingest.stats import compute_stats, write_stats
from ingest.store import BuildReport, StoreLayout, build_store

log = logging.getLogger(__name__)


def layout_for(config: Config, dataset_version: str, source: str) -> StoreLayout:
    """The store layout a config asks for."""
    ing = config.ingest
    times = pd.date_range(ing.start, ing.end, freq=f"{config.task.time_step_hours}h")
    return StoreLayout(config.grid.grid(), tuple(config.task.variables), tuple(config.task.levels),
                       times, source, dataset_version)


def ingest(config: Config, progress: bool = True) -> BuildReport:
    """Build or resume the analysis store for ``config.ingest``, then write the statistics."""
    source = make_source(config.ingest.source, config.grid.grid(), config.ingest.synthetic)
    layout = layout_for(config, source.dataset_version(), source.name)
    variables, levels = list(config.task.variables), list(config.task.levels)
    path: Path = config.paths.analysis_store
    bar = tqdm(total=None, desc="ingest slabs", unit="slab", disable=not progress)

    def tick(done: int, total: int) -> None:
        bar.total = total
        bar.update(1)

    try:
        report = build_store(path, layout, lambda times: source.fetch(times, variables, levels),
                             config.ingest.slab_size, tick)
    finally:
        bar.close()
    log.info("store %s: %d slabs written, %d already done", path, report.written, report.skipped)
    stats = compute_stats(path, config.task.channels(), config.train.train_start, config.train.train_end)
    write_stats(stats, config.paths.stats_file)
    return report
