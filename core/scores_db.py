"""The scores table in a real database through SQLAlchemy Core (SQLite by default, any SQLAlchemy URL).

One row per (run, lead, channel, system, metric). A run's rows are replaced in one transaction,
so a reader sees either the old scores of a run or the new ones, never a mix, and a failed
re-score leaves the old rows in place. ``fingerprint`` is the truth state the rows were scored
against (see :mod:`core.verify_runs`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from core.errors import ConfigError

METADATA = MetaData()
SCORES = Table(
    "scores", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run", String(32), nullable=False, index=True),
    Column("init_time", DateTime, nullable=False),
    Column("lead_hours", Integer, nullable=False),
    Column("valid_time", DateTime, nullable=False),
    Column("channel", String(64), nullable=False),
    Column("system", String(16), nullable=False),
    Column("metric", String(32), nullable=False),
    Column("value", Float, nullable=True),
    Column("truth_expver", Integer, nullable=False),
    Column("truth_replaced", Boolean, nullable=False),
    Column("dataset_version", String(128), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("scored_at", DateTime, nullable=False),
    UniqueConstraint("run", "lead_hours", "channel", "system", "metric", name="uq_scores_cell"),
)
SYSTEMS = ("model", "persistence", "climatology")
COLUMNS = tuple(c.name for c in SCORES.columns if c.name != "id")


def database_url(configured: str | None, verification_dir: Path) -> str:
    """The configured SQLAlchemy URL, or SQLite at ``<verification>/scores.sqlite``."""
    if configured:
        try:
            make_url(configured)
        except ArgumentError as exc:
            raise ConfigError(f"verify.database_url {configured!r} is not an SQLAlchemy URL: {exc}") from None
        return configured
    return f"sqlite:///{(Path(verification_dir) / 'scores.sqlite').resolve()}"


def open_database(url: str) -> Engine:
    """An engine on ``url`` with the scores table created if absent."""
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite") and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    METADATA.create_all(engine)
    return engine


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise ValueError(f"score row lacks columns {missing}: {dict(row)}")
    if row["system"] not in SYSTEMS:
        raise ValueError(f"score row has system {row['system']!r}; expected one of {SYSTEMS}")
    out = {c: row[c] for c in COLUMNS}
    value = out["value"]
    out["value"] = None if value is None or not math.isfinite(float(value)) else float(value)
    return out


def replace_run(engine: Engine, run: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Replace every row of ``run`` by ``rows`` in one transaction; return how many were written."""
    clean = [_clean(r) for r in rows]
    others = {r["run"] for r in clean} - {run}
    if others:
        raise ValueError(f"rows for run {run!r} include rows of other runs {sorted(others)}")
    with engine.begin() as conn:
        conn.execute(delete(SCORES).where(SCORES.c.run == run))
        if clean:
            conn.execute(insert(SCORES), clean)
    return len(clean)


def run_fingerprint(engine: Engine, run: str) -> str | None:
    """The truth fingerprint ``run``'s rows were scored against, or None if it has no (consistent) rows."""
    with engine.connect() as conn:
        found = conn.execute(select(SCORES.c.fingerprint).where(SCORES.c.run == run).distinct()).scalars().all()
    return found[0] if len(found) == 1 else None


def read_rows(engine: Engine, runs: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Rows (as dicts) of the given runs, or of every run, ordered by run, lead, channel, system, metric."""
    query = select(*[SCORES.c[c] for c in COLUMNS])
    if runs is not None:
        query = query.where(SCORES.c.run.in_(list(runs)))
    query = query.order_by(SCORES.c.run, SCORES.c.lead_hours, SCORES.c.channel, SCORES.c.system, SCORES.c.metric)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def newest_runs(engine: Engine, limit: int) -> list[str]:
    """The ``limit`` scored runs with the latest initial times, oldest first."""
    query = (select(SCORES.c.run, func.max(SCORES.c.init_time).label("init")).group_by(SCORES.c.run)
             .order_by(func.max(SCORES.c.init_time).desc()).limit(limit))
    with engine.connect() as conn:
        return sorted(r.run for r in conn.execute(query))


def aggregate(engine: Engine, runs: list[str]) -> list[dict[str, Any]]:
    """Mean value and number of runs per (lead, channel, system, metric) over ``runs``."""
    query = (select(SCORES.c.lead_hours, SCORES.c.channel, SCORES.c.system, SCORES.c.metric,
                    func.avg(SCORES.c.value).label("value"), func.count(SCORES.c.value).label("runs"))
             .where(SCORES.c.run.in_(runs))
             .group_by(SCORES.c.lead_hours, SCORES.c.channel, SCORES.c.system, SCORES.c.metric)
             .order_by(SCORES.c.lead_hours, SCORES.c.channel, SCORES.c.system, SCORES.c.metric))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]
