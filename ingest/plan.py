"""Plan CDS requests for ERA5: one dataset per request, never across a month, within a field budget.

A CDS request is a Cartesian product ``year × month × day × time`` (× ``pressure_level``), so an
exact request (one that pulls no time that was not asked for) covers a set of days that all want
the same set of hours. Each month's times are cut into such blocks two ways — days grouped by
their hour set, or hours grouped by their day set — and the way with fewer requests wins (days
on a tie). A run of times from 12 UTC on day D to 06 UTC on day E costs three blocks by days
(D's afternoon, the whole days between, E's morning) but two by hours (12–18 UTC on D..E−1,
00–06 UTC on D+1..E). A block that costs more than ``max_fields`` (times × variables × levels) is
split by variable groups, then days, then levels, then hours — in that order because CDS serves
whole fields per variable cheaply and a month is its storage unit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from typing import TypeVar

import pandas as pd

from core.errors import ConfigError
from core.variables import VARIABLES, check_level, get_variable

log = logging.getLogger(__name__)

DATASETS = {"single": "reanalysis-era5-single-levels", "pressure": "reanalysis-era5-pressure-levels"}
DATA_FORMATS = {"netcdf": "nc", "grib": "grib"}
ERA5_FIRST_TIME = pd.Timestamp("1940-01-01T00")
# ERA5T (preliminary) reaches CDS about five days behind real time.
ERA5T_LAG = pd.Timedelta(days=5)
_ORDER = {name: i for i, name in enumerate(VARIABLES)}
T = TypeVar("T")


@dataclass(frozen=True)
class CdsRequest:
    """One CDS retrieve: the dataset, the exact request body cdsapi sends, and what it covers."""

    dataset: str
    request: dict
    times: tuple[pd.Timestamp, ...]
    variables: tuple[str, ...]
    levels: tuple[int, ...]
    fields: int
    key: str

    @property
    def extension(self) -> str:
        """File extension of the delivery (``nc`` or ``grib``)."""
        return DATA_FORMATS[self.request["data_format"]]

    def describe(self) -> str:
        """Short human description used in logs and error messages."""
        lv = f" at {','.join(map(str, self.levels))} hPa" if self.levels else ""
        return (f"{self.dataset} {_period(self.times)} [{', '.join(self.variables)}{lv}] "
                f"({self.fields} fields, key {self.key})")


def latest_available(now: pd.Timestamp | None = None) -> pd.Timestamp:
    """The latest hour CDS can serve at ``now`` (UTC; default the current time)."""
    now = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)
    if now.tzinfo is not None:
        now = now.tz_convert("UTC").tz_localize(None)
    return (now - ERA5T_LAG).floor("h")


def request_key(dataset: str, request: dict) -> str:
    """Stable short hash of a dataset and request body (the download's file name)."""
    blob = json.dumps({"dataset": dataset, "request": request}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _period(times: Sequence[pd.Timestamp]) -> str:
    first, last = min(times), max(times)
    if first == last:
        return f"{first:%Y-%m-%dT%H}"
    return f"{first:%Y-%m-%dT%H}→{last:%Y-%m-%dT%H}"


def _check_times(times: Sequence[pd.Timestamp], now: pd.Timestamp | None) -> list[pd.Timestamp]:
    if len(times) == 0:
        raise ConfigError("no times to request (the list of times is empty)")
    out = set()
    for raw in times:
        try:
            t = pd.Timestamp(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"time {raw!r} is not a date/time") from exc
        if t is pd.NaT:
            raise ConfigError("time NaT is not a date/time")
        if t.tzinfo is not None:
            t = t.tz_convert("UTC").tz_localize(None)
        if t != t.floor("h"):
            raise ConfigError(f"time {t} is not on the hour (ERA5 is hourly)")
        out.add(t)
    ordered = sorted(out)
    if ordered[0] < ERA5_FIRST_TIME:
        raise ConfigError(f"time {ordered[0]} is before ERA5's first time {ERA5_FIRST_TIME:%Y-%m-%dT%H}")
    latest = latest_available(now)
    if ordered[-1] > latest:
        raise ConfigError(f"time {ordered[-1]} is after the latest time CDS serves ({latest:%Y-%m-%dT%H}; "
                          f"ERA5T arrives {ERA5T_LAG.days} days behind real time)")
    return ordered


def _split(items: Sequence, size: int) -> list[tuple]:
    # Near-equal contiguous chunks, so a 31-day month at 10 days per request is 8+8+8+7, not 10+10+10+1.
    n = math.ceil(len(items) / size)
    base, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        out.append(tuple(items[start:stop]))
        start = stop
    return out


def _chunk_sizes(nvar: int, nday: int, nlev: int, nhour: int, max_fields: int) -> tuple[int, int, int, int]:
    """Largest (variables, days, levels, hours) chunk sizes, split in that order, within ``max_fields``."""
    sizes = [nvar, nday, nlev, nhour]
    for i in range(4):
        inner = math.prod(sizes[i + 1:])
        if sizes[i] * inner <= max_fields:
            break
        sizes[i] = max(1, max_fields // inner)
        if inner <= max_fields:
            break
    return tuple(sizes)  # type: ignore[return-value]


def _body(cds_vars: Sequence[str], year: int, month: int, days: Sequence[int], hours: Sequence[int],
          levels: Sequence[int], data_format: str) -> dict:
    body: dict = {
        "product_type": ["reanalysis"],
        "variable": list(cds_vars),
        "year": [f"{year:04d}"],
        "month": [f"{month:02d}"],
        "day": [f"{d:02d}" for d in days],
        "time": [f"{h:02d}:00" for h in hours],
    }
    if levels:
        body["pressure_level"] = [str(lv) for lv in levels]
    body["data_format"] = data_format
    body["download_format"] = "unarchived"
    return body


def _plan_dataset(kind: str, names: list[str], levels: list[int], times: list[pd.Timestamp],
                  max_fields: int, data_format: str) -> list[CdsRequest]:
    dataset = DATASETS[kind]
    out: list[CdsRequest] = []
    months: dict[tuple[int, int], dict[int, set[int]]] = {}
    for t in times:
        months.setdefault((t.year, t.month), {}).setdefault(t.day, set()).add(t.hour)
    for (year, month), day_hours in sorted(months.items()):
        by_day = _month_requests(dataset, kind, names, levels, year, month, _blocks_by_day(day_hours),
                                 max_fields, data_format)
        by_hour = _month_requests(dataset, kind, names, levels, year, month, _blocks_by_hour(day_hours),
                                  max_fields, data_format)
        out += by_hour if len(by_hour) < len(by_day) else by_day
    return out


def _blocks_by_day(day_hours: dict[int, set[int]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Exact (days, hours) blocks: days wanting the same hour set share one block."""
    blocks: dict[tuple[int, ...], list[int]] = {}
    for day, hours in sorted(day_hours.items()):
        blocks.setdefault(tuple(sorted(hours)), []).append(day)
    return sorted(((tuple(days), hours) for hours, days in blocks.items()), key=lambda b: (b[0][0], b[1][0]))


def _blocks_by_hour(day_hours: dict[int, set[int]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Exact (days, hours) blocks: hours wanted on the same day set share one block."""
    hour_days: dict[int, list[int]] = {}
    for day, hours in sorted(day_hours.items()):
        for h in hours:
            hour_days.setdefault(h, []).append(day)
    blocks: dict[tuple[int, ...], list[int]] = {}
    for h, days in sorted(hour_days.items()):
        blocks.setdefault(tuple(days), []).append(h)
    return sorted(((days, tuple(hours)) for days, hours in blocks.items()), key=lambda b: (b[0][0], b[1][0]))


def _month_requests(dataset: str, kind: str, names: list[str], levels: list[int], year: int, month: int,
                    blocks: list[tuple[tuple[int, ...], tuple[int, ...]]], max_fields: int,
                    data_format: str) -> list[CdsRequest]:
    """The requests of one month's exact blocks, each split within ``max_fields``."""
    nlev = len(levels) if kind == "pressure" else 1
    out: list[CdsRequest] = []
    for days, hours in blocks:
        sv, sd, sl, sh = _chunk_sizes(len(names), len(days), nlev, len(hours), max_fields)
        lv_chunks = _split(levels, sl) if kind == "pressure" else [()]
        for vs, ds, ls, hs in product(_split(names, sv), _split(days, sd), lv_chunks, _split(hours, sh)):
            body = _body([get_variable(v).cds_name for v in vs], year, month, ds, hs, ls, data_format)
            covered = tuple(pd.Timestamp(year, month, d, h) for d in ds for h in hs)
            fields = len(covered) * len(vs) * max(1, len(ls))
            out.append(CdsRequest(dataset, body, covered, tuple(vs), tuple(ls), fields, request_key(dataset, body)))
    return out


def plan_requests(times: Sequence[pd.Timestamp], variables: Sequence[str], levels: Sequence[int],
                  max_fields: int, data_format: str, *, now: pd.Timestamp | None = None) -> list[CdsRequest]:
    """Split a fetch into CDS requests covering every (time, variable, level) exactly once."""
    if data_format not in DATA_FORMATS:
        raise ConfigError(f"data_format {data_format!r} is not one of {', '.join(DATA_FORMATS)}")
    if int(max_fields) < 1:
        raise ValueError(f"max_fields must be ≥ 1, got {max_fields}")
    if len(variables) == 0:
        raise ValueError("no variables to request (the list of variables is empty)")
    names = sorted({get_variable(v).name for v in variables}, key=_ORDER.__getitem__)
    lv = sorted({check_level(v) for v in levels})
    stamps = _check_times(times, now)
    single = [v for v in names if VARIABLES[v].level_type == "single"]
    pressure = [v for v in names if VARIABLES[v].level_type == "pressure"]
    if pressure and not lv:
        raise ConfigError(f"pressure-level variables {', '.join(pressure)} need at least one level; none given")
    plan: list[CdsRequest] = []
    if pressure:
        plan += _plan_dataset("pressure", pressure, lv, stamps, int(max_fields), data_format)
    if single:
        plan += _plan_dataset("single", single, [], stamps, int(max_fields), data_format)
    log.debug("planned %d CDS requests for %d times", len(plan), len(stamps))
    return plan


def format_plan(plan: Sequence[CdsRequest]) -> str:
    """A readable table of the plan, one line per request, with totals."""
    rows = [("#", "dataset", "period", "times", "variables", "levels", "fields")]
    for i, req in enumerate(plan, 1):
        rows.append((str(i), req.dataset, _period(req.times), str(len(req.times)), ", ".join(req.variables),
                     ",".join(map(str, req.levels)) or "-", f"{req.fields:,}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if c in (0, 3, 6) else cell.ljust(w) for c, (cell, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    total_fields = sum(r.fields for r in plan)
    by_ds = Counter(r.dataset for r in plan)  # in plan order
    detail = ", ".join(f"{n} {ds}" for ds, n in by_ds.items())
    lines.append(f"total: {len(plan)} requests ({detail or 'none'}), {total_fields:,} fields")
    return "\n".join(lines)


def fields_per_time(variables: Sequence[str], levels: Sequence[int]) -> int:
    """Fields one time costs: one per single-level variable, one per level of each pressure variable."""
    nlev = max(1, len(set(levels)))
    return sum(nlev if get_variable(v).level_type == "pressure" else 1 for v in set(variables))


def pack_slabs(slabs: Sequence[Sequence[pd.Timestamp]], per_time: int, max_fields: int) -> list[list[int]]:
    """Consecutive slabs (their times to fetch) joined into jobs: one calendar month, ≤ ``max_fields`` fields.

    A request never crosses a month, so joining slabs across one saves no request and only costs
    parallelism; within a month, a job whose times fit one request's budget is planned as the whole
    month would be. A slab alone above the budget stays a job of its own.
    """
    if per_time < 1 or max_fields < 1:
        raise ValueError(f"per_time and max_fields must be ≥ 1, got {per_time} and {max_fields}")
    jobs: list[list[int]] = []
    month: tuple[int, int] | None = None
    size = 0
    for i, times in enumerate(slabs):
        if len(times) == 0:
            raise ValueError(f"slab {i} has no times to fetch")
        first = min(pd.Timestamp(t) for t in times)
        if jobs and (first.year, first.month) == month and (size + len(times)) * per_time <= max_fields:
            jobs[-1].append(i)
            size += len(times)
            continue
        jobs.append([i])
        month, size = (first.year, first.month), len(times)
    return jobs


Field = tuple[str, str, int | None, pd.Timestamp]
"""One field a delivery holds: (dataset, CDS variable name, level or None, time)."""


def covered_fields(dataset: str, request: dict) -> set[Field]:
    """Every (dataset, CDS variable, level, time) a request body delivers."""
    days = [int(d) for d in request.get("day", [])]
    hours = [int(str(h).split(":")[0]) for h in request.get("time", [])]
    levels: list[int | None] = [int(v) for v in request.get("pressure_level", [])] or [None]
    out = set()
    for year, month in product(request.get("year", []), request.get("month", [])):
        for d, h in product(days, hours):
            try:
                t = pd.Timestamp(int(year), int(month), d, h)
            except ValueError:  # 31 February and the like: CDS skips impossible dates
                continue
            out.update((dataset, var, lv, t) for var in request.get("variable", []) for lv in levels)
    return out


def plan_uncovered(held: dict[Field, list[T]], times: Sequence[pd.Timestamp], variables: Sequence[str],
                   levels: Sequence[int], max_fields: int, data_format: str) -> tuple[list[CdsRequest], list[T]]:
    """Requests for the times whose fields ``held`` (field → deliveries) lacks, per dataset; and the deliveries used.

    A time is reused only if every field it needs from that dataset is held; the rest are planned as
    :func:`plan_requests` would (same order: pressure levels, then single levels).
    """
    if not held:
        return plan_requests(times, variables, levels, max_fields, data_format), []
    plan: list[CdsRequest] = []
    used: dict[T, None] = {}
    for kind in ("pressure", "single"):
        names = [v for v in dict.fromkeys(variables) if get_variable(v).level_type == kind]
        if not names:
            continue
        lvls: list[int | None] = sorted({int(v) for v in levels}) if kind == "pressure" else [None]
        need = [(DATASETS[kind], get_variable(v).cds_name, lv) for v in names for lv in lvls]
        missing = []
        for t in sorted({pd.Timestamp(t) for t in times}):
            have = [held.get((*n, t)) for n in need]
            if all(have):
                used.update((d, None) for found in have for d in found or ())
            else:
                missing.append(t)
        if missing:
            plan += plan_requests(missing, names, levels, max_fields, data_format)
    return plan, list(used)
