"""What EDR answers look like on the wire: collection metadata (EDR JSON), CoverageJSON and CSV.

CoverageJSON follows the 2023 OGC Community Standard: every range is an ``NdArray`` over all the
domain's axes (``t``, [``z``,] ``y``, ``x``, length-1 axes included), NaN written as ``null``.
CSV is one row per (time, [level,] latitude, longitude) with one column per parameter; rows where
every parameter is null (outside an area's polygon) are left out.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
import pandas as pd

from core.variables import VARIABLES
from serve.edr import Answer, RunData

COVJSON = "application/prs.coverage+json"
CSV = "text/csv"
OUTPUT_FORMATS = ["CoverageJSON", "CSV"]
CRS84 = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
CRS84_WKT = ('GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
             'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433],AXIS["Longitude",EAST],AXIS["Latitude",NORTH]]')
PRESSURE_VRS = "pressure level (hPa)"


def iso(t: np.datetime64) -> str:
    """A valid time as ISO 8601 UTC with a ``Z``."""
    return pd.Timestamp(t).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unit(units: str) -> dict[str, Any]:
    return {"label": {"en": units}, "symbol": {"value": units, "type": "http://www.opengis.net/def/uom/UDUNITS/"}}


def parameter(name: str, levels: np.ndarray | None = None) -> dict[str, Any]:
    """One parameter as EDR collection metadata and CoverageJSON share it (units from core.variables)."""
    var = VARIABLES[name]
    out: dict[str, Any] = {
        "type": "Parameter", "id": name, "description": {"en": var.long_name}, "unit": _unit(var.units),
        "observedProperty": {"id": var.standard_name or name, "label": {"en": var.long_name}},
    }
    if levels is not None and var.level_type == "pressure":
        out["extent"] = {"vertical": {"interval": [[str(levels.min()), str(levels.max())]],
                                      "values": [str(v) for v in levels], "vrs": PRESSURE_VRS}}
    return out


def collection(data: RunData, base: str) -> dict[str, Any]:
    """EDR collection metadata of one run: links, extent, parameters, data queries, CRS and formats."""
    href = f"{base}/collections/{data.run}"
    dlon = 360.0 / data.lon.size
    extent: dict[str, Any] = {
        "spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]], "crs": CRS84,
                    "grid": {"x": {"start": 0.0, "stop": 360.0 - dlon, "num": int(data.lon.size)},
                             "y": {"start": 90.0, "stop": -90.0, "num": int(data.lat.size)}}},
        "temporal": {"interval": [[iso(data.valid_times[0]), iso(data.valid_times[-1])]],
                     "values": [iso(t) for t in data.valid_times], "trs": "TIMECRS[\"DateTime\",TDATUM[\"Gregorian Calendar\"],"
                     "CS[TemporalDateTime,1],AXIS[\"Time (T)\",future]]"},
    }
    if data.levels.size and any(VARIABLES[p].level_type == "pressure" for p in data.parameters):
        extent["vertical"] = {"interval": [[str(data.levels.min()), str(data.levels.max())]],
                              "values": [str(v) for v in data.levels], "vrs": PRESSURE_VRS}

    def query(kind: str, title: str) -> dict[str, Any]:
        return {"link": {"href": f"{href}/{kind}", "rel": "data", "title": title, "variables": {
            "title": title, "query_type": kind, "output_formats": OUTPUT_FORMATS,
            "default_output_format": "CoverageJSON",
            "crs_details": [{"crs": "CRS84", "wkt": CRS84_WKT}]}}}

    return {
        "id": data.run, "title": f"Forecast initialised {data.run}",
        "description": "Forecast fields by valid time; point values bilinear on the sphere, area values at grid nodes.",
        "links": [{"href": href, "rel": "self", "type": "application/json", "title": "this collection"},
                  {"href": f"{base}/runs/{data.run}", "rel": "alternate", "type": "application/json",
                   "title": "the run's manifest and downloadable files"}],
        "extent": extent,
        "data_queries": {"position": query("position", "Values at a point (bilinear)"),
                         "area": query("area", "Grid values inside a polygon")},
        "crs": ["CRS84"],
        "output_formats": OUTPUT_FORMATS,
        "parameter_names": {p: parameter(p, data.levels) for p in data.parameters},
    }


def _nullable(a: np.ndarray) -> list[float | None]:
    return [None if v != v else v for v in np.asarray(a, dtype=np.float64).ravel().tolist()]


def _axes(answer: Answer) -> tuple[list[str], list[int]]:
    names, shape = ["t"], [answer.times.size]
    if answer.levels is not None:
        names.append("z")
        shape.append(answer.levels.size)
    return names + ["y", "x"], shape + [answer.y.size, answer.x.size]


def coverage(answer: Answer) -> dict[str, Any]:
    """The answer as one CoverageJSON ``Coverage``."""
    axes: dict[str, Any] = {"x": {"values": answer.x.tolist()}, "y": {"values": answer.y.tolist()},
                            "t": {"values": [iso(t) for t in answer.times]}}
    referencing = [
        {"coordinates": ["x", "y"], "system": {"type": "GeographicCRS", "id": CRS84}},
        {"coordinates": ["t"], "system": {"type": "TemporalRS", "calendar": "Gregorian"}},
    ]
    if answer.levels is not None:
        axes["z"] = {"values": [int(v) for v in answer.levels]}
        referencing.append({"coordinates": ["z"], "system": {
            "type": "VerticalCRS", "cs": {"csAxes": [{"name": {"en": "Pressure"}, "direction": "down",
                                                      "unit": {"symbol": "hPa"}}]}}})
    domain: dict[str, Any] = {"type": "Domain", "axes": axes, "referencing": referencing}
    if answer.domain_type:
        domain["domainType"] = answer.domain_type
    names, shape = _axes(answer)
    return {
        "type": "Coverage", "domain": domain,
        "parameters": {p: parameter(p) for p in answer.values},
        "ranges": {p: {"type": "NdArray", "dataType": "float", "axisNames": names, "shape": shape,
                       "values": _nullable(v)} for p, v in answer.values.items()},
    }


def to_csv(answer: Answer) -> str:
    """The answer as CSV: ``datetime,[z,]latitude,longitude,<parameter>…``, exact float reprs, empty for null."""
    names, shape = _axes(answer)
    params = list(answer.values)
    columns = np.stack([np.asarray(answer.values[p], np.float64).reshape(shape) for p in params], axis=-1)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["datetime"] + (["z"] if "z" in names else []) + ["latitude", "longitude"] + params)
    times = [iso(t) for t in answer.times]
    levels = [None] if answer.levels is None else [int(v) for v in answer.levels]
    flat = columns.reshape(len(times), len(levels), answer.y.size, answer.x.size, len(params))
    for it, t in enumerate(times):
        for iz, z in enumerate(levels):
            for iy, lat in enumerate(answer.y.tolist()):
                for ix, lon in enumerate(answer.x.tolist()):
                    row = flat[it, iz, iy, ix]
                    if np.isnan(row).all():
                        continue
                    cells = ["" if v != v else repr(v) for v in row.tolist()]
                    writer.writerow([t] + ([z] if z is not None else []) + [repr(lat), repr(lon)] + cells)
    return out.getvalue()
