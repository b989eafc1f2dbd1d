"""A real ``spherecast serve --workers 2`` process: downloads, metrics summed over both workers, docs, clean stop."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import make_forecast, publish_run

REPO = Path(__file__).resolve().parents[2]
REQUESTS = 40


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers of one GET on a new connection."""
    request = urllib.request.Request(url, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def wait_for_health(base: str, proc: subprocess.Popen, log: Path, deadline_s: float = 15.0) -> None:
    """Poll /health until it answers 200; fail with the server's log if the process dies or time runs out."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log.read_text()}"
        try:
            if get(base + "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no /health within {deadline_s} s:\n{log.read_text()}")


def start_serve(root: Path, *args: str) -> tuple[subprocess.Popen, str, Path]:
    """``spherecast serve`` over ``root/forecasts`` on a free 127.0.0.1 port, healthy; (process, base URL, log)."""
    port = free_port()
    config = root / "spherecast.yaml"
    config.write_text(yaml.safe_dump({"paths": {"root": str(root)},
                                      "serve": {"host": "127.0.0.1", "port": port, "shutdown_timeout_s": 2}}))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SPHERECAST_") and k not in ("PROMETHEUS_MULTIPROC_DIR", "SERVE_SPHERECAST_CONFIG")}
    env["PYTHONPATH"] = str(REPO)
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "spherecast"), "serve", "--config", str(config),
                                 *args], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(base, proc, log)
    except BaseException:
        stop_serve(proc)
        raise
    return proc, base, log


def stop_serve(proc: subprocess.Popen) -> None:
    """SIGTERM the server and wait for it (killed after 15 s)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def requests_for(metrics_text: str, route: str) -> float:
    """Sum of spherecast_http_requests_total over every method and status of one route."""
    return sum(s.value for family in text_string_to_metric_families(metrics_text) for s in family.samples
               if s.name == "spherecast_http_requests_total" and s.labels["route"] == route)


def test_two_workers_serve_downloads_share_metrics_and_stop_cleanly(tmp_path: Path) -> None:
    run_dir = publish_run(tmp_path / "forecasts", make_forecast(leads=2))
    proc, base, log = start_serve(tmp_path, "--workers", "2")
    workers: list[psutil.Process] = []
    metrics_dir: Path | None = None
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in children]

        status, body, _ = get(base + "/runs")
        assert status == 200 and [r["name"] for r in json.loads(body)] == [run_dir.name]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        status, data, headers = get(f"{base}/runs/{run_dir.name}/files/forecast.nc")
        assert status == 200 and int(headers["content-length"]) == len(data) == manifest["files"]["forecast.nc"]["size"]
        assert hashlib.sha256(data).hexdigest() == manifest["files"]["forecast.nc"]["sha256"]

        # Many short connections at once, so both workers answer some; every scrape must count all of them.
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: get(f"{base}/runs/{run_dir.name}")[0], range(REQUESTS)))
        assert statuses == [200] * REQUESTS
        metrics_dir = Path(workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
        writers = {int(m.group(1)) for f in metrics_dir.iterdir() if (m := re.fullmatch(r"counter_(\d+)\.db", f.name))}
        assert writers == {p.pid for p in workers}, "both workers answered and wrote their counts"
        for _ in range(3):  # whichever worker answers the scrape reports the sum over both
            status, text, _ = get(base + "/metrics")
            assert status == 200
            assert requests_for(text.decode(), "/runs/{run}") == REQUESTS
            assert requests_for(text.decode(), "/runs") == 1
            assert requests_for(text.decode(), "/runs/{run}/files/{path:path}") == 1
            assert "spherecast_runs_served 1.0" in text.decode()

        status, page, _ = get(base + "/docs")
        assert status == 200
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', page.decode())
        assert len(assets) == 3  # Swagger UI script, style and icon, all from this server
        for asset in assets:
            assert get(base + asset)[0] == 200, asset
    finally:
        stop_serve(proc)
    assert proc.returncode == 0, log.read_text()
    for worker in workers:  # no orphan keeps the port or the run open
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, worker.pid
    assert metrics_dir is not None and not metrics_dir.exists(), "the multiprocess metrics directory is removed on exit"
    assert "Stopping parent process" in log.read_text()
