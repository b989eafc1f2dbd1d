"""An ECMWF open-data portal look-alike on 127.0.0.1 that the unmodified ``ecmwf-opendata`` client reads.

Layout, as on ``https://data.ecmwf.int/forecasts``::

    {root}/{YYYYMMDD}/{HH}z/ifs/0p25/oper/{YYYYMMDD}{HH}0000-0h-oper-fc.grib2
    {root}/{YYYYMMDD}/{HH}z/ifs/0p25/oper/{YYYYMMDD}{HH}0000-0h-oper-fc.index

The GRIB2 is written here with ecCodes, one message per (parameter, level), as the portal's: ECMWF
local section (``class=od``, ``stream=oper``, ``type=fc``, ``expver=0001``), step 0, a regular
global latitude/longitude grid from 90° to −90° and from −180° eastwards, 16-bit simple packing.
The index holds one JSON line per message in the portal's key order (``domain``, ``date``,
``time``, ``expver``, ``class``, ``type``, ``stream``, ``step``, [``levelist``], ``levtype``,
``param``, ``_offset``, ``_length``). Files are served with HEAD, ``Accept-Ranges: bytes``, single
ranges (206), several ranges (``multipart/byteranges``, as the portal answers the client's
multi-range requests) and 416 for a range wholly past the end.

Faults: a run not published (404 on both files), :meth:`OpenDataPortal.truncate` (the GRIB cut
short, its index intact), and HTTP 5xx answers queued per route (``index`` or ``data``).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import eccodes
import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ROOT = "/forecasts"
# param → (typeOfLevel, level or None for pressure levels, typical value, amplitude of the pattern)
PARAMS = {
    "gh": ("isobaricInhPa", None, 5500.0, 300.0), "t": ("isobaricInhPa", None, 250.0, 20.0),
    "u": ("isobaricInhPa", None, 5.0, 20.0), "v": ("isobaricInhPa", None, 0.0, 15.0),
    "q": ("isobaricInhPa", None, 0.004, 0.003), "w": ("isobaricInhPa", None, 0.0, 0.5),
    "r": ("isobaricInhPa", None, 60.0, 30.0),
    "2t": ("heightAboveGround", 2, 280.0, 25.0), "10u": ("heightAboveGround", 10, 2.0, 8.0),
    "10v": ("heightAboveGround", 10, 0.0, 8.0), "msl": ("meanSea", None, 101325.0, 1500.0),
    "sp": ("surface", None, 98000.0, 3000.0), "tcwv": ("entireAtmosphere", None, 25.0, 15.0),
}


def portal_grid(grid_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes 90 → −90 and longitudes −180 → 180−Δ of the portal's grid at ``grid_deg``."""
    nlat, nlon = round(180 / grid_deg) + 1, round(360 / grid_deg)
    return np.linspace(90.0, -90.0, nlat), -180.0 + np.arange(nlon) * grid_deg


def portal_field(param: str, level: int | None, cycle: pd.Timestamp, lat: np.ndarray, lon: np.ndarray,
                 seed: int = 0) -> np.ndarray:
    """The deterministic field (lat × lon) the portal publishes for one parameter, level and run."""
    _, _, typical, amp = PARAMS[param]
    rng = np.random.default_rng([seed, list(PARAMS).index(param), level or 0, int(pd.Timestamp(cycle).value // 10**9)])
    phi, lam = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    m = rng.integers(1, 6, size=3)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    out = np.zeros((lat.size, lon.size))
    for k in range(3):
        out += np.cos(phi) ** m[k] * np.cos(m[k] * lam + phase[k]) / 3
    scale = (1000.0 / level) ** 0.3 if level else 1.0  # levels differ, so a swapped level shows
    return typical * scale + amp * (out + 0.3 * np.sin(phi))


@dataclass
class Received:
    """One request the portal answered."""

    method: str
    path: str
    route: str  # index | data | unknown
    range: str | None
    status: int
    nbytes: int


class OpenDataPortal:
    """A thread serving a directory tree laid out as the open-data portal; publish runs into it."""

    def __init__(self, root: Path, *, grid_deg: float = 2.0, seed: int = 0) -> None:
        self.root = Path(root)
        self.grid_deg = grid_deg
        self.seed = seed
        self.received: list[Received] = []
        self.faults: list[list] = []  # [status, route, remaining]
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> OpenDataPortal:
        """Listen on an ephemeral port of 127.0.0.1."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.portal = self  # type: ignore[attr-defined]
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="opendata-portal").start()
        return self

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OpenDataPortal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The portal's root URL (what ``initial_conditions.opendata.url`` points at)."""
        assert self._server is not None, "portal not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}{ROOT}"

    # -- content --------------------------------------------------------------------------------
    def grib_path(self, cycle: pd.Timestamp) -> Path:
        """Where a run's step-0 GRIB2 file lives under the portal root."""
        c = pd.Timestamp(cycle)
        return self.root / f"{c:%Y%m%d}" / f"{c:%H}z" / "ifs" / "0p25" / "oper" / f"{c:%Y%m%d%H}0000-0h-oper-fc.grib2"

    def publish(self, cycle: pd.Timestamp, params: Sequence[str], levels: Sequence[int], *,
                grid_deg: float | None = None, mislabel: dict[str, str] | None = None) -> Path:
        """Write a run's GRIB2 (pressure params at every level, then single-level ones) and its index.

        ``mislabel={"t": "r"}`` writes ``r`` where the index says ``t`` (a file that is not what its
        index promises).
        """
        cycle = pd.Timestamp(cycle)
        deg = grid_deg or self.grid_deg
        lat, lon = portal_grid(deg)
        path = self.grib_path(cycle)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines, offset = [], 0
        entries = [(p, lv) for p in params if PARAMS[p][1] is None and PARAMS[p][0] == "isobaricInhPa"
                   for lv in levels] + [(p, None) for p in params if PARAMS[p][0] != "isobaricInhPa"]
        with open(path, "wb") as out:
            for param, level in entries:
                written = (mislabel or {}).get(param, param)
                blob = _message(written, level, cycle, portal_field(param, level, cycle, lat, lon, self.seed), deg)
                out.write(blob)
                line = {"domain": "g", "date": f"{cycle:%Y%m%d}", "time": f"{cycle:%H}00", "expver": "0001",
                        "class": "od", "type": "fc", "stream": "oper", "step": "0"}
                if level is not None:
                    line["levelist"] = str(level)
                line |= {"levtype": "pl" if level is not None else "sfc", "param": param,
                         "_offset": offset, "_length": len(blob)}
                lines.append(json.dumps(line))
                offset += len(blob)
        path.with_suffix(".index").write_text("\n".join(lines) + "\n")
        return path

    def truncate(self, cycle: pd.Timestamp, keep: float = 0.5) -> None:
        """Cut a published run's GRIB2 to a fraction of its bytes; its index still promises all of them."""
        path = self.grib_path(cycle)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    def fail(self, status: int, route: str = "index", times: int = 1) -> None:
        """Answer the next ``times`` requests on ``route`` (``index`` or ``data``) with HTTP ``status``."""
        with self._lock:
            self.faults.append([status, route, times])

    def _take_fault(self, route: str) -> int | None:
        with self._lock:
            for fault in self.faults:
                if fault[1] == route and fault[2] > 0:
                    fault[2] -= 1
                    return int(fault[0])
        return None

    def calls(self, route: str | None = None) -> list[Received]:
        """Requests answered so far (optionally on one route)."""
        with self._lock:
            return [r for r in self.received if route is None or r.route == route]


def _message(param: str, level: int | None, cycle: pd.Timestamp, values: np.ndarray, deg: float) -> bytes:
    type_of_level, fixed_level, _, _ = PARAMS[param]
    pressure = type_of_level == "isobaricInhPa"
    h = eccodes.codes_grib_new_from_samples("regular_ll_pl_grib2" if pressure else "regular_ll_sfc_grib2")
    try:
        eccodes.codes_set(h, "setLocalDefinition", 1)
        eccodes.codes_set(h, "localDefinitionNumber", 1)
        for key, value in (("class", "od"), ("stream", "oper"), ("type", "fc"), ("expver", "0001")):
            eccodes.codes_set(h, key, value)
        eccodes.codes_set(h, "dataDate", int(f"{cycle:%Y%m%d}"))
        eccodes.codes_set(h, "dataTime", int(f"{cycle:%H}00"))
        eccodes.codes_set(h, "stepRange", "0")
        nj, ni = values.shape
        eccodes.codes_set_long(h, "Ni", ni)
        eccodes.codes_set_long(h, "Nj", nj)
        for key, value in (("latitudeOfFirstGridPointInDegrees", 90.0), ("longitudeOfFirstGridPointInDegrees", 180.0),
                           ("latitudeOfLastGridPointInDegrees", -90.0),
                           ("longitudeOfLastGridPointInDegrees", 180.0 - deg),
                           ("iDirectionIncrementInDegrees", deg), ("jDirectionIncrementInDegrees", deg)):
            eccodes.codes_set(h, key, value)
        eccodes.codes_set(h, "shortName", param)
        eccodes.codes_set(h, "typeOfLevel", type_of_level)
        if pressure or fixed_level is not None:
            eccodes.codes_set(h, "level", level if pressure else fixed_level)
        eccodes.codes_set(h, "bitsPerValue", 16)
        eccodes.codes_set_values(h, values.astype(np.float64).ravel())
        return eccodes.codes_get_message(h)
    finally:
        eccodes.codes_release(h)


def _ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """Satisfiable (start, end) pairs of a ``bytes=`` header, clipped to the file; None if not a byte range."""
    if not header.startswith("bytes="):
        return None
    out = []
    for spec in header[len("bytes="):].split(","):
        first, _, last = spec.strip().partition("-")
        if first == "":
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), min(int(last) if last else size - 1, size - 1)
        if start < size and start <= end:
            out.append((start, end))
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "opendata-test/1"

    @property
    def portal(self) -> OpenDataPortal:
        return self.server.portal  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("opendata-portal: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _reply(self, route: str, status: int, body: bytes, ctype: str = "application/octet-stream",
               headers: dict[str, str] | None = None, head: bool = False) -> None:
        with self.portal._lock:
            self.portal.received.append(Received(self.command, self.path, route, self.headers.get("Range"), status,
                                                 0 if head else len(body)))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        path = urlsplit(self.path).path
        route = "index" if path.endswith(".index") else "data" if path.endswith(".grib2") else "unknown"
        rel = path[len(ROOT) + 1:] if path.startswith(ROOT + "/") else None
        target = (self.portal.root / rel) if rel and ".." not in rel.split("/") else None
        if target is None or not target.is_file():
            return self._reply(route, 404, b"Not Found", "text/plain", head=head)
        status = self.portal._take_fault(route)
        if status is not None:
            return self._reply(route, status, b"Service Unavailable", "text/plain", head=head)
        data = target.read_bytes()
        size = len(data)
        accept = {"Accept-Ranges": "bytes"}
        header = self.headers.get("Range")
        ranges = _ranges(header, size) if header else None
        if ranges is None:
            return self._reply(route, 200, data, headers=accept, head=head)
        if not ranges:
            return self._reply(route, 416, b"", headers={"Content-Range": f"bytes */{size}"}, head=head)
        if len(ranges) == 1:
            start, end = ranges[0]
            return self._reply(route, 206, data[start:end + 1], head=head,
                               headers=accept | {"Content-Range": f"bytes {start}-{end}/{size}"})
        boundary = uuid.uuid4().hex
        parts = []
        for start, end in ranges:
            parts.append(f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                         f"Content-Range: bytes {start}-{end}/{size}\r\n\r\n".encode())
            parts.append(data[start:end + 1] + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        self._reply(route, 206, b"".join(parts), f"multipart/byteranges; boundary={boundary}", accept, head)
