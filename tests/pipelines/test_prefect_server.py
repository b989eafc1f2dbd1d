"""The temporary Prefect server of a CLI command is the command's child and dies with it, even on kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.ingest.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]


def children(pid: int) -> list[int]:
    """PIDs of the direct children of ``pid``."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_kill_minus_9_of_spherecast_ingest_takes_its_prefect_server_along(tmp_path: Path) -> None:
    _, config = tiny_config(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "SPHERECAST_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # its own database: nothing shared with other tests
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ingest", "--config", str(config)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = None
    try:
        deadline = time.monotonic() + 120
        while server is None and time.monotonic() < deadline:
            assert proc.poll() is None, f"spherecast ingest ended ({proc.returncode}) before its server was seen"
            server = next((c for c in children(proc.pid) if "prefect.server.api.server:create_app" in cmdline(c)),
                          None)
            time.sleep(0.1)
        assert server is not None, "no temporary Prefect server among the children of spherecast ingest"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(server), f"the Prefect server {server} outlived spherecast ingest killed by SIGKILL"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if server is not None and alive(server):
            os.kill(server, signal.SIGKILL)
