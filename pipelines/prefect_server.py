"""The temporary Prefect API server of one CLI command, started as this process's child so it dies with it.

Without ``PREFECT_API_URL`` Prefect starts a temporary server itself (``SubprocessASGIServer``), a
plain ``subprocess.Popen``: after a ``kill -9`` of ``spherecast ingest`` that server lived on as an
orphan holding its port and database, every time. Here the CLI starts the same server (uvicorn on
Prefect's app factory, UI off) with ``die_with_parent``, points the command's Prefect settings at it,
and stops it when the command ends; the kernel stops it when the command is killed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from core.processes import die_with_parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {proc.returncode} before "
                                   f"answering on {url}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server did not answer on {url} within {timeout_s:g} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)") from None
            time.sleep(0.2)


def _drain(timeout_s: float = 15.0) -> None:
    """Send the logs and events Prefect still queues to the server before it stops.

    Otherwise Prefect's background workers meet a closed port at interpreter exit and retry for
    about a minute (a forecast command took 82 s instead of 12 s); Prefect's own test harness drains
    them the same way before stopping its server.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)


@contextmanager
def temporary_prefect_server() -> Iterator[str]:
    """Within the block Prefect talks to a server this process owns (or to ``PREFECT_API_URL`` if set); its URL."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    given = get_current_settings().api.url  # the environment, a profile, or a test harness's settings
    if given:
        yield str(given)
        return
    import prefect

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent())
    try:
        _wait_healthy(proc, url, float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")))
        with temporary_settings(updates={PREFECT_API_URL: url}):
            os.environ["PREFECT_API_URL"] = url  # subprocesses of the command (Dask workers, torchrun) use it too
            try:
                yield url
            finally:
                _drain()
                os.environ.pop("PREFECT_API_URL", None)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
