"""The CDS request planner: exact coverage, CDS limits, stable keys, clear errors."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pandas as pd
import pytest

from core.variables import VARIABLES
from ingest.plan import (
    DATASETS,
    ERA5_FIRST_TIME,
    ERA5T_LAG,
    CdsRequest,
    format_plan,
    latest_available,
    plan_requests,
)

NOW = pd.Timestamp("2024-06-10T12:34")
BY_CDS = {v.cds_name: v.name for v in VARIABLES.values()}
MIXED = ["temperature", "geopotential", "2m_temperature", "mean_sea_level_pressure", "u_component_of_wind"]


def expand(req: CdsRequest) -> list[tuple[pd.Timestamp, str, int | None]]:
    """Every (time, variable, level) the request body asks CDS for, as CDS would read it."""
    body = req.request
    levels = [int(v) for v in body.get("pressure_level", [None])] if "pressure_level" in body else [None]
    out = []
    for y, m, d, t, v, lv in itertools.product(body["year"], body["month"], body["day"], body["time"],
                                               body["variable"], levels):
        out.append((pd.Timestamp(int(y), int(m), int(d), int(t[:2])), BY_CDS[v], lv))
    return out


def wanted(times, variables, levels) -> Counter:
    out = Counter()
    for t in set(times):
        for v in set(variables):
            for lv in (sorted(set(levels)) if VARIABLES[v].level_type == "pressure" else [None]):
                out[(pd.Timestamp(t), v, lv)] += 1
    return out


def irregular_times() -> list[pd.Timestamp]:
    # 6-hourly across a month end (partial first/last days), plus odd hours on two days.
    base = list(pd.date_range("2000-01-29T12", "2000-02-02T06", freq="6h"))
    return base + [pd.Timestamp("2000-01-30T03"), pd.Timestamp("2000-02-01T23"), pd.Timestamp("2000-03-15T09")]


@pytest.mark.parametrize("max_fields", [10**9, 40, 7, 1])
def test_every_time_variable_level_is_requested_exactly_once(max_fields: int) -> None:
    times = irregular_times()
    levels = [850, 500, 1000]
    plan = plan_requests(times, MIXED, levels, max_fields, "netcdf", now=NOW)
    got = Counter(cell for req in plan for cell in expand(req))
    assert got == wanted(times, MIXED, levels)
    for req in plan:
        cells = expand(req)
        assert req.fields == len(cells) <= max_fields
        assert set(req.times) == {c[0] for c in cells}
        assert len(req.times) == len(set(req.times))
        assert set(req.variables) == {c[1] for c in cells}


def test_one_dataset_and_one_month_per_request_with_the_exact_cdsapi_body() -> None:
    times = pd.date_range("2000-01-31T00", "2000-02-01T18", freq="6h")
    plan = plan_requests(times, ["2m_temperature", "geopotential"], [500], 10**6, "grib", now=NOW)
    assert [(r.dataset, r.request["month"]) for r in plan] == [
        (DATASETS["pressure"], ["01"]), (DATASETS["pressure"], ["02"]),
        (DATASETS["single"], ["01"]), (DATASETS["single"], ["02"]),
    ]
    assert plan[0].request == {
        "product_type": ["reanalysis"], "variable": ["geopotential"], "year": ["2000"], "month": ["01"],
        "day": ["31"], "time": ["00:00", "06:00", "12:00", "18:00"], "pressure_level": ["500"],
        "data_format": "grib", "download_format": "unarchived",
    }
    assert "pressure_level" not in plan[2].request and plan[2].variables == ("2m_temperature",)
    assert plan[0].levels == (500,) and plan[2].levels == ()
    assert plan[0].extension == "grib" and plan[0].fields == 4
    for req in plan:
        assert len(req.request["year"]) == len(req.request["month"]) == 1
        assert {t.month for t in req.times} == {int(req.request["month"][0])}


def test_days_with_different_hours_are_separate_cartesian_blocks() -> None:
    # 29 Jan 12,18; 30 Jan 00..18 (+03); 31 Jan full: three different hour sets in one month.
    times = [t for t in irregular_times() if t.month == 1]
    plan = plan_requests(times, ["2m_temperature"], [], 10**6, "netcdf", now=NOW)
    blocks = sorted((tuple(r.request["day"]), tuple(r.request["time"])) for r in plan)
    assert blocks == [
        (("29",), ("12:00", "18:00")),
        (("30",), ("00:00", "03:00", "06:00", "12:00", "18:00")),
        (("31",), ("00:00", "06:00", "12:00", "18:00")),
    ]


def test_a_regular_month_is_one_request_when_within_the_limit() -> None:
    times = pd.date_range("2001-03-01", "2001-03-31T18", freq="6h")
    plan = plan_requests(times, ["geopotential", "temperature"], [500, 850], 10**6, "netcdf", now=NOW)
    assert len(plan) == 1
    assert plan[0].fields == 124 * 2 * 2 and len(plan[0].request["day"]) == 31


def test_over_the_limit_splits_by_variables_first_then_days() -> None:
    times = pd.date_range("2001-03-01", "2001-03-31T18", freq="6h")  # 124 times
    names = ["geopotential", "temperature", "u_component_of_wind"]
    by_vars = plan_requests(times, names, [500, 850], 124 * 2 * 2, "netcdf", now=NOW)
    assert [r.variables for r in by_vars] == [("geopotential", "temperature"), ("u_component_of_wind",)]
    assert all(len(r.times) == 124 for r in by_vars)
    by_days = plan_requests(times, names, [500, 850], 100, "netcdf", now=NOW)
    assert {len(r.variables) for r in by_days} == {1}
    assert all(r.request["pressure_level"] == ["500", "850"] for r in by_days)
    # 12 days of 4 times at 2 levels is 96 ≤ 100: 31 days split into three near-equal groups.
    assert sorted(len(r.request["day"]) for r in by_days if r.variables == ("geopotential",)) == [10, 10, 11]
    assert max(r.fields for r in by_days) <= 100


def test_levels_then_hours_split_when_one_variable_day_is_too_big() -> None:
    times = pd.date_range("2001-03-01", "2001-03-01T23", freq="1h")
    plan = plan_requests(times, ["temperature"], [500, 850, 1000], 30, "netcdf", now=NOW)
    assert [r.request["pressure_level"] for r in plan] == [["500"], ["850"], ["1000"]]
    tiny = plan_requests(times, ["temperature"], [500], 5, "netcdf", now=NOW)
    assert [len(r.request["time"]) for r in tiny] == [5, 5, 5, 5, 4]
    assert all(r.fields <= 5 for r in tiny)


def test_keys_are_stable_distinct_and_independent_of_input_order() -> None:
    times = irregular_times()
    plan = plan_requests(times, MIXED, [500, 850], 40, "netcdf", now=NOW)
    again = plan_requests(times, MIXED, [500, 850], 40, "netcdf", now=NOW)
    shuffled = list(times)
    random.Random(1).shuffle(shuffled)
    permuted = plan_requests(shuffled, MIXED[::-1], [850, 500, 850], 40, "netcdf", now=NOW)
    keys = [r.key for r in plan]
    assert keys == [r.key for r in again] == [r.key for r in permuted]
    assert len(set(keys)) == len(keys) and all(len(k) == 16 for k in keys)
    grib = plan_requests(times, MIXED, [500, 850], 40, "grib", now=NOW)
    assert not set(keys) & {r.key for r in grib}


def test_latest_available_is_now_minus_the_era5t_lag_floored_to_the_hour() -> None:
    assert ERA5T_LAG == pd.Timedelta(days=5)
    assert latest_available(NOW) == pd.Timestamp("2024-06-05T12")
    assert latest_available(pd.Timestamp("2024-06-10T14:34", tz="Europe/Paris")) == pd.Timestamp("2024-06-05T12")
    latest = latest_available(NOW)
    assert plan_requests([latest], ["2m_temperature"], [], 10, "netcdf", now=NOW)[0].times == (latest,)
    assert plan_requests([ERA5_FIRST_TIME], ["2m_temperature"], [], 10, "netcdf", now=NOW)


@pytest.mark.parametrize(("times", "variables", "levels", "fmt", "max_fields", "match"), [
    (["2000-01-01"], ["t2m"], [], "netcdf", 10, "unknown variable 't2m'.*did you mean '2m_temperature'"),
    (["2000-01-01"], ["temperature"], [501], "netcdf", 10, "pressure level 501 hPa is not an ERA5 level"),
    (["2000-01-01"], ["temperature"], [], "netcdf", 10, "need at least one level"),
    ([], ["temperature"], [500], "netcdf", 10, "no times"),
    (["2000-01-01"], [], [500], "netcdf", 10, "no variables"),
    (["1939-12-31T18"], ["temperature"], [500], "netcdf", 10, "before ERA5's first time 1940-01-01T00"),
    (["2024-06-05T13"], ["temperature"], [500], "netcdf", 10, "after the latest time CDS serves"),
    (["2000-01-01T06:30"], ["temperature"], [500], "netcdf", 10, "not on the hour"),
    (["not-a-date"], ["temperature"], [500], "netcdf", 10, "'not-a-date' is not a date/time"),
    (["2000-01-01"], ["temperature"], [500], "zarr", 10, "data_format 'zarr'"),
    (["2000-01-01"], ["temperature"], [500], "netcdf", 0, "max_fields must be ≥ 1"),
])
def test_bad_inputs_raise_one_clear_value_error(times, variables, levels, fmt, max_fields, match) -> None:
    with pytest.raises(ValueError, match=match):
        plan_requests(times, variables, levels, max_fields, fmt, now=NOW)


def test_format_plan_lists_each_request_and_totals() -> None:
    times = pd.date_range("2000-01-31T00", "2000-02-01T18", freq="6h")
    plan = plan_requests(times, ["2m_temperature", "geopotential"], [500, 850], 10**6, "netcdf", now=NOW)
    text = format_plan(plan)
    lines = text.splitlines()
    assert len(lines) == 2 + len(plan) + 1
    assert "dataset" in lines[0] and "fields" in lines[0]
    assert "2000-01-31T00→2000-01-31T18" in text and "500,850" in text
    assert lines[-1] == ("total: 4 requests (2 reanalysis-era5-pressure-levels, 2 reanalysis-era5-single-levels), "
                         "24 fields")
    assert format_plan([]).splitlines()[-1] == "total: 0 requests (none), 0 fields"
