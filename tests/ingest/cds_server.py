"""A Copernicus CDS look-alike on 127.0.0.1 that the unmodified ``cdsapi`` client talks to.

It speaks both protocols the installed cdsapi chooses between by the key's shape:

- new ``retrieve/v1`` (key without ``:``; ecmwf-datastores-client): ``GET catalogue/v1/messages``,
  ``GET retrieve/v1/processes/{dataset}``, ``POST …/execution`` → job with a ``monitor`` link,
  ``GET retrieve/v1/jobs/{id}`` (status), ``GET …/results`` → asset ``href`` + ``file:size``;
- legacy (key ``uid:secret``): ``GET status.json``, ``POST resources/{dataset}`` → ``queued``,
  ``GET tasks/{id}`` → ``completed`` with ``location`` + ``content_length`` (or ``failed``).

Every submission is turned into a delivery by ``tests/ingest/cds_files.py`` from the request's
variables × year × month × day × time (× pressure_level), with the server's ``seed``, so values
depend only on (variable, level, time) and any request split ingests the same numbers. Times
after ``era5t_after`` are delivered as ERA5T (expver 5). Every HTTP call is recorded in
``received``; ``faults`` injects failures one call (or job, or download) at a time.

Deliveries are written in a child process of their own. HDF5 (under netCDF4) is not thread-safe,
and the code under test reads deliveries with it in this process, from Dask worker threads too: a
write in a server thread next to those reads crashed the whole test run once (a segfault in
``netCDF4.Dataset.close``), so the server keeps HDF5 out of this process entirely.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import multiprocessing
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
import pytest

from core.variables import VARIABLES

log = logging.getLogger(__name__)

API = "/api"
HTTP_FAULTS = ("500", "429", "stall")
JOB_FAULTS = ("rejected", "failed", "dismissed")
SIZE_FAULTS = ("short", "long", "corrupt")
_DEFAULT_ROUTE = {"500": "submit", "429": "submit", "stall": "submit",
                  "rejected": "job", "failed": "job", "dismissed": "job", "short": "download", "long": "download",
                  "corrupt": "download"}
_BY_CDS_NAME = {v.cds_name: v.name for v in VARIABLES.values()}


@dataclass
class Fault:
    """One injected failure: what, where (route), how many more times (None = forever)."""

    kind: str
    route: str
    remaining: int | None = 1
    message: str = ""
    seconds: float = 5.0
    nbytes: int = 64
    retry_after: int = 1
    hits: int = 0


class Faults:
    """Queue of faults the server applies to matching calls, first pushed first served."""

    def __init__(self) -> None:
        self._items: list[Fault] = []
        self._lock = threading.Lock()

    def push(self, kind: str, *, route: str | None = None, times: int | None = 1, message: str = "",
             seconds: float = 5.0, nbytes: int = 64, retry_after: int = 1) -> Fault:
        """Add a fault: ``500``/``429``/``stall`` (HTTP, default on ``submit``), ``rejected``/``failed``/
        ``dismissed`` (the next job ends so), ``short``/``long`` (download bytes ≠ announced size),
        ``corrupt`` (the announced number of bytes, but garbage)."""
        if kind not in _DEFAULT_ROUTE:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(_DEFAULT_ROUTE)}")
        fault = Fault(kind, route or _DEFAULT_ROUTE[kind], times, message or f"injected {kind} fault",
                      seconds, nbytes, retry_after)
        with self._lock:
            self._items.append(fault)
        return fault

    def clear(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._items.clear()

    def take(self, route: str, kinds: tuple[str, ...]) -> Fault | None:
        """The first pending fault of ``kinds`` for ``route`` (consuming one use), or None."""
        with self._lock:
            for fault in self._items:
                if fault.kind in kinds and fault.route in (route, "any"):
                    fault.hits += 1
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._items.remove(fault)
                    return fault
        return None


@dataclass
class Received:
    """One HTTP call the server answered."""

    method: str
    path: str
    route: str
    api: str
    status: int
    dataset: str | None = None
    request: dict | None = None


@dataclass
class Job:
    """A submitted retrieve and its delivery."""

    id: str
    api: str
    dataset: str
    request: dict
    outcome: Fault | None
    path: Path | None = None
    size: int = 0
    polls: int = 0
    expver: list[int] = field(default_factory=list)


def request_times(request: dict) -> list[pd.Timestamp]:
    """Every valid time of a CDS request's year × month × day × time product (invalid dates skipped)."""
    out = []
    for y, m, d, t in itertools.product(request["year"], request["month"], request["day"], request["time"]):
        try:
            out.append(pd.Timestamp(int(y), int(m), int(d), int(str(t).split(":")[0])))
        except ValueError:
            continue  # CDS ignores impossible dates such as 30 February
    return sorted(set(out))


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


class CdsServer:
    """The server: ``url``, ``key_new``, ``key_legacy``, ``faults``, ``received``; start/close."""

    def __init__(self, root: Path, *, seed: int = 0, grid_deg: float = 1.0, polls_before_done: int = 0,
                 era5t_after: pd.Timestamp | None = None, legacy_netcdf: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self.grid_deg = grid_deg
        self.polls_before_done = polls_before_done
        self.era5t_after = None if era5t_after is None else pd.Timestamp(era5t_after)
        self.legacy_netcdf = legacy_netcdf  # the legacy API delivered the pre-2024 NetCDF layout
        self.key_new = "00000000-0000-4000-8000-spherecast00"
        self.key_legacy = "12345:00000000-0000-4000-8000-spherecast01"
        self.faults = Faults()
        self.received: list[Received] = []
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._deliver_lock = threading.Lock()  # one delivery at a time, as one writer process
        self._writer: ProcessPoolExecutor | None = None
        self._release = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> CdsServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.cds = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="cds-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Release stalled handlers and stop serving."""
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._writer is not None:
            self._writer.shutdown(cancel_futures=True)
            self._writer = None

    def __enter__(self) -> CdsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def base(self) -> str:
        """``http://127.0.0.1:<port>``."""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def url(self) -> str:
        """The CDSAPI_URL clients use."""
        return self.base + API

    # -- test-facing helpers ---------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the defaults a module-scoped server starts each test with (its request log is kept)."""
        self.faults.clear()
        self.set_era5t(None)
        self.seed = 0
        self.__dict__.pop("_submit", None)  # a per-test override of submissions (e.g. a failure injected)

    def fail_jobs_covering(self, times: Sequence[pd.Timestamp], kind: str = "failed",
                           message: str = "injected: these times are not available") -> None:
        """Make every job whose request covers any of ``times`` end as ``kind``, until :meth:`reset`."""
        submit, wanted, guard = CdsServer._submit.__get__(self), set(times), threading.Lock()

        def failing_submit(api: str, dataset: str, request: dict) -> Job:
            # Push and consume the fault under one lock, so a concurrent submission cannot take it.
            with guard:
                if wanted & set(request_times(request)):
                    self.faults.push(kind, message=message)
                return submit(api, dataset, request)

        self._submit = failing_submit  # type: ignore[method-assign]

    def set_era5t(self, after: pd.Timestamp | None) -> None:
        """Deliver times after ``after`` as ERA5T (expver 5); None = everything final (expver 1)."""
        self.era5t_after = None if after is None else pd.Timestamp(after)

    def calls(self, route: str | None = None, api: str | None = None) -> list[Received]:
        """Recorded HTTP calls, optionally of one route and/or protocol."""
        with self._lock:
            return [r for r in self.received if (route is None or r.route == route) and (api is None or r.api == api)]

    def submissions(self, api: str | None = None) -> list[tuple[str, dict]]:
        """(dataset, request) of every accepted submission, in arrival order."""
        return [(r.dataset, r.request) for r in self.calls("submit", api) if r.status < 300]

    def env(self, api: str = "new") -> dict[str, str]:
        """CDSAPI_URL/CDSAPI_KEY for the new (``retrieve/v1``) or the legacy protocol."""
        return {"CDSAPI_URL": self.url, "CDSAPI_KEY": self.key_new if api == "new" else self.key_legacy}

    # -- deliveries -----------------------------------------------------------------------------
    def _deliver(self, job: Job) -> None:
        from tests.ingest.cds_files import write_cds_grib, write_cds_netcdf

        req = job.request
        times = request_times(req)
        variables = [_BY_CDS_NAME.get(v, v) for v in _as_list(req["variable"])]
        levels = [int(v) for v in _as_list(req.get("pressure_level", []))]
        fmt = req.get("data_format", req.get("format", "grib"))
        cutoff = self.era5t_after
        job.expver = [5 if cutoff is not None and t > cutoff else 1 for t in times]
        ext = "grib" if fmt == "grib" else "nc"
        path = self.root / f"{job.id}.{ext}"
        if self._writer is None:  # spawned, not forked: this process has threads (and maybe HDF5 state)
            self._writer = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        if fmt == "grib":
            done = self._writer.submit(write_cds_grib, path, times, variables, levels, grid_deg=self.grid_deg,
                                       expver=job.expver, seed=self.seed)
        else:
            done = self._writer.submit(write_cds_netcdf, path, times, variables, levels, grid_deg=self.grid_deg,
                                       expver=job.expver, seed=self.seed,
                                       legacy=job.api == "legacy" and self.legacy_netcdf)
        done.result()
        job.path, job.size = path, path.stat().st_size

    def _submit(self, api: str, dataset: str, request: dict) -> Job:
        outcome = self.faults.take("job", JOB_FAULTS)
        job = Job(uuid.uuid4().hex, api, dataset, request, outcome)
        if outcome is None:
            with self._deliver_lock:
                self._deliver(job)
        with self._lock:
            self.jobs[job.id] = job
        return job

    def _state(self, job: Job) -> str:
        # Jobs advance one step per status poll, so polls_before_done controls how long clients wait.
        job.polls += 1
        if job.polls <= self.polls_before_done:
            return "running"
        if job.outcome is None:
            return "successful"
        return "failed" if job.outcome.kind == "failed" else job.outcome.kind


class _Handler(BaseHTTPRequestHandler):
    server_version = "cds-test/1"

    @property
    def cds(self) -> CdsServer:
        return self.server.cds  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("cds-server: " + format, *args)

    # -- plumbing -------------------------------------------------------------------------------
    def _record(self, route: str, api: str, status: int, dataset: str | None = None,
                request: dict | None = None) -> None:
        with self.cds._lock:
            self.cds.received.append(Received(self.command, self.path, route, api, status, dataset, request))

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers=headers)

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def _http_fault(self, route: str, api: str, dataset: str | None = None) -> bool:
        fault = self.cds.faults.take(route, HTTP_FAULTS)
        if fault is None:
            return False
        if fault.kind == "stall":
            # Recorded on arrival; sleeps longer than the client's timeout, released when the server closes.
            self._record(route, api, 0, dataset)
            self.cds._release.wait(fault.seconds)
            try:
                self._json(503, {"title": "stalled"})
            except OSError:
                pass  # the client has long hung up
            return True
        status = int(fault.kind)
        headers = {"Retry-After": str(fault.retry_after)} if status == 429 else None
        self._record(route, api, status, dataset)
        self._json(status, {"title": fault.message, "reason": fault.message}, headers)
        return True

    def _auth(self, api: str) -> bool:
        if api == "new":
            ok = self.headers.get("PRIVATE-TOKEN") == self.cds.key_new
        else:
            expected = "Basic " + base64.b64encode(self.cds.key_legacy.encode()).decode()
            ok = self.headers.get("Authorization") == expected
        if not ok:
            self._record("auth", api, 401)
            self._json(401, {"title": "Authentication failed", "message": "Authentication failed"})
        return ok

    # -- routing --------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        parts = [p for p in path[len(API):].split("/") if p] if path.startswith(API + "/") else None
        try:
            if path.startswith("/download/") and method in ("GET", "HEAD"):
                return self._download(path.rsplit("/", 1)[1], head=method == "HEAD")
            if parts is None:
                return self._not_found(method)
            match (method, parts):
                case ("GET", ["catalogue", "v1", "messages"]):
                    return self._reply("messages", "new", 200, {"messages": []})
                case ("GET", ["retrieve", "v1", "processes", dataset]):
                    return self._process(dataset)
                case ("POST", ["retrieve", "v1", "processes", dataset, "execution"]):
                    return self._submit_new(dataset)
                case ("GET", ["retrieve", "v1", "jobs", job_id]):
                    return self._status_new(job_id)
                case ("GET", ["retrieve", "v1", "jobs", job_id, "results"]):
                    return self._results_new(job_id)
                case ("DELETE", ["retrieve", "v1", "jobs", job_id]):
                    return self._reply("delete", "new", 200, {"jobID": job_id, "status": "dismissed"})
                case ("GET", ["status.json"]):
                    return self._reply("legacy-status", "legacy", 200, {"info": [], "warning": []})
                case ("POST", ["resources", dataset]):
                    return self._submit_legacy(dataset)
                case ("GET", ["tasks", job_id]):
                    return self._status_legacy(job_id)
                case ("DELETE", ["tasks", job_id]):
                    return self._reply("delete", "legacy", 204, {})
            return self._not_found(method)
        except Exception as exc:  # a bug in a test server must show up as a 500, not a hung client
            log.exception("cds-server failed on %s %s", method, self.path)
            self._record("error", "-", 500)
            self._json(500, {"title": "test server error", "message": repr(exc)})

    def _not_found(self, method: str) -> None:
        self._record("unknown", "-", 404)
        self._json(404, {"title": f"no route for {method} {self.path}", "message": "not found"})

    def _reply(self, route: str, api: str, status: int, payload: object) -> None:
        if self._http_fault(route, api):
            return
        self._record(route, api, status)
        self._json(status, payload)

    def _job(self, job_id: str) -> Job | None:
        job = self.cds.jobs.get(job_id)
        if job is None:
            self._record("status", "-", 404)
            self._json(404, {"title": f"job {job_id} not found", "message": f"job {job_id} not found"})
        return job

    # -- new retrieve/v1 API --------------------------------------------------------------------
    def _jobs_url(self, job_id: str) -> str:
        return f"{self.cds.url}/retrieve/v1/jobs/{job_id}"

    def _process(self, dataset: str) -> None:
        if self._http_fault("process", "new", dataset) or not self._auth("new"):
            return
        url = f"{self.cds.url}/retrieve/v1/processes/{dataset}"
        self._record("process", "new", 200, dataset)
        self._json(200, {"id": dataset, "title": dataset, "links": [{"href": url, "rel": "self"}]})

    def _job_json(self, job: Job, status: str) -> dict:
        href = self._jobs_url(job.id)
        return {"processID": job.dataset, "type": "process", "jobID": job.id, "status": status,
                "created": "2000-01-01T00:00:00", "updated": "2000-01-01T00:00:01",
                "metadata": {"request": {"ids": job.request}, "log": []},
                "links": [{"href": href, "rel": "monitor", "type": "application/json"},
                          {"href": href, "rel": "self", "type": "application/json"},
                          {"href": f"{href}/results", "rel": "results"}]}

    def _submit_new(self, dataset: str) -> None:
        if self._http_fault("submit", "new", dataset) or not self._auth("new"):
            return
        request = self._body().get("inputs", {})
        job = self.cds._submit("new", dataset, request)
        self._record("submit", "new", 201, dataset, request)
        self._json(201, self._job_json(job, "accepted"))

    def _status_new(self, job_id: str) -> None:
        if self._http_fault("status", "new"):
            return
        job = self._job(job_id)
        if job is None:
            return
        state = self.cds._state(job)
        self._record("status", "new", 200, job.dataset)
        self._json(200, self._job_json(job, state))

    def _results_new(self, job_id: str) -> None:
        if self._http_fault("results", "new"):
            return
        job = self._job(job_id)
        if job is None:
            return
        if job.outcome is not None:
            # Real CDS answers the results of a failed job with a 400 and the reason.
            self._record("results", "new", 400, job.dataset)
            title = {"rejected": "The job has been rejected", "failed": "The job has failed"}.get(
                job.outcome.kind, f"The job was {job.outcome.kind}")
            self._json(400, {"type": "job failed", "title": title, "detail": job.outcome.message})
            return
        fmt = "application/x-grib" if job.path.suffix == ".grib" else "application/netcdf"
        self._record("results", "new", 200, job.dataset)
        self._json(200, {"asset": {"value": {"type": fmt, "href": f"{self.cds.base}/download/{job.path.name}",
                                             "file:size": job.size, "file:checksum": ""}}})

    # -- legacy API -----------------------------------------------------------------------------
    def _legacy_reply(self, job: Job, state: str) -> dict:
        reply = {"state": state, "request_id": job.id}
        if state == "completed":
            ctype = "application/x-grib" if job.path.suffix == ".grib" else "application/x-netcdf"
            reply.update(location=f"{self.cds.base}/download/{job.path.name}", content_length=job.size,
                         content_type=ctype)
        elif state == "failed":
            reply["error"] = {"message": job.outcome.message, "reason": f"job {job.outcome.kind}",
                              "context": {"traceback": ""}}
        return reply

    def _submit_legacy(self, dataset: str) -> None:
        if self._http_fault("submit", "legacy", dataset) or not self._auth("legacy"):
            return
        request = self._body()
        job = self.cds._submit("legacy", dataset, request)
        self._record("submit", "legacy", 202, dataset, request)
        self._json(202, self._legacy_reply(job, "queued"))

    def _status_legacy(self, job_id: str) -> None:
        if self._http_fault("status", "legacy"):
            return
        job = self._job(job_id)
        if job is None:
            return
        state = {"successful": "completed", "running": "running"}.get(self.cds._state(job), "failed")
        self._record("status", "legacy", 200, job.dataset)
        self._json(200, self._legacy_reply(job, state))

    # -- downloads ------------------------------------------------------------------------------
    def _download(self, name: str, head: bool) -> None:
        job = next((j for j in list(self.cds.jobs.values()) if j.path is not None and j.path.name == name), None)
        if job is None:
            self._record("download", "-", 404)
            self._json(404, {"title": f"no file {name}"})
            return
        if self._http_fault("download", job.api):
            return
        data = job.path.read_bytes()
        fault = None if head else self.cds.faults.take("download", SIZE_FAULTS)
        if fault is not None and fault.kind == "short":
            data = data[: max(0, len(data) - fault.nbytes)]
        elif fault is not None and fault.kind == "long":
            data = data + os.urandom(fault.nbytes)
        elif fault is not None:
            data = os.urandom(len(data))
        self._record("download", job.api, 200, job.dataset)
        ctype = "application/x-grib" if name.endswith(".grib") else "application/netcdf"
        self._send(200, data, ctype, head=head)


def serve_cds(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
              **options: object) -> Iterator[CdsServer]:
    """Run a server for one test: CDSAPI_URL/CDSAPI_KEY point at it (new API), HOME has no ~/.cdsapirc.

    ``options`` go to :class:`CdsServer` (seed, grid_deg, polls_before_done, era5t_after…). Use it
    as ``yield from serve_cds(...)`` inside a fixture of your own to change them.
    """
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for name in ("CDSAPI_RC", "ECMWF_DATASTORES_URL", "ECMWF_DATASTORES_KEY", "ECMWF_DATASTORES_RC_FILE"):
        monkeypatch.delenv(name, raising=False)
    with CdsServer(tmp_path_factory.mktemp("cds-server"), **options) as server:  # type: ignore[arg-type]
        for key, value in server.env("new").items():
            monkeypatch.setenv(key, value)
        yield server


@pytest.fixture
def cds_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[CdsServer]:
    """A running server with default options (see :func:`serve_cds`)."""
    yield from serve_cds(tmp_path_factory, monkeypatch)


def module_server_fixtures(**options: object) -> tuple[Any, Any]:
    """A module-scoped ``server`` fixture (``options`` as for :func:`serve_cds`) and an autouse fixture that
    resets it after each test; bind both in a test module: ``server, _clean_server = module_server_fixtures()``."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CdsServer]:
        # One server for the module (its request log is read per test); the module's own MonkeyPatch.
        with pytest.MonkeyPatch.context() as mp:
            yield from serve_cds(tmp_path_factory, mp, **options)

    @pytest.fixture(autouse=True)
    def _clean_server(server: CdsServer) -> Iterator[None]:
        yield
        server.reset()  # faults pushed by a test, ERA5T setting: back to the module's defaults

    return server, _clean_server
