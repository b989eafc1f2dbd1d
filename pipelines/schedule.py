"""``spherecast schedule``: a Prefect server, the ``spherecast-local`` worker and flows.yaml's deployments, in the foreground."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.processes import die_with_parent
from pipelines.cli import prefect_environment


def _start(cmd: list[str], env: dict[str, str], cwd: Path) -> Any:
    import subprocess

    print("starting:", " ".join(cmd), flush=True)
    # Own process group: Ctrl-C reaches this process alone, and each child is stopped in order; and if this
    # process is killed hard, the kernel stops them (no server or worker left holding the port).
    return subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, preexec_fn=die_with_parent())


def _stop(procs: list[Any], grace_s: float = 20.0) -> None:
    import signal
    import subprocess

    for proc in reversed(procs):  # the worker first, the server last
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def schedule(host: str, port: int) -> int:
    """Run a Prefect server, the ``spherecast-local`` worker and flows.yaml's deployments until Ctrl-C."""
    import subprocess
    import time
    import urllib.request

    user_ui = os.environ.get("PREFECT_UI_ENABLED")
    prefect_environment()
    root = Path(__file__).resolve().parents[1]
    prefect = [sys.executable, "-m", "prefect"]
    api = f"http://{host}:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "SPHERECAST_HOME": os.environ.get("SPHERECAST_HOME", str(root))}
    env["PREFECT_UI_ENABLED"] = user_ui or "true"  # the operator watches the runs in the UI
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    procs = [_start(prefect + ["server", "start", "--host", host, "--port", str(port)], env, root)]
    try:
        deadline = time.monotonic() + float(env.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    raise ConfigError(f"the Prefect server did not answer on {api} (is the port taken?)") from None
                time.sleep(1)
        pool = subprocess.run(prefect + ["work-pool", "create", "spherecast-local", "--type", "process"], env=env,
                              cwd=root, capture_output=True, text=True)
        if pool.returncode and "already exists" not in pool.stdout + pool.stderr:
            raise ValueError(f"could not create work pool spherecast-local: {pool.stdout}{pool.stderr}")
        deploy = subprocess.run(prefect + ["--no-prompt", "deploy", "--prefect-file", "flows.yaml", "--all"], env=env,
                                cwd=root, capture_output=True, text=True)
        if deploy.returncode:
            raise ValueError(f"prefect deploy failed:\n{deploy.stdout[-3000:]}{deploy.stderr[-3000:]}")
        procs.append(_start(prefect + ["worker", "start", "--pool", "spherecast-local"], env, root))
        print(f"spherecast schedule: server and UI on http://{host}:{port}, worker on pool spherecast-local, "
              "deployments from flows.yaml. Ctrl-C stops them.", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        raise ValueError("a child stopped on its own: " + ", ".join(f"pid {p.pid} exit {p.returncode}" for p in procs))
    except KeyboardInterrupt:
        print("stopping the worker and the server…", flush=True)
        return 0
    finally:
        _stop(procs)
