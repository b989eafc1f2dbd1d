"""Real ``torchrun -m models.train`` subprocesses for fault tests: launch, watch checkpoints, kill by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from core.config import Config, dump_config
from tests.models.conftest import REPO

DEADLINE_S = 300.0


def write_config(config: Config, path: Path) -> Path:
    """The config as the YAML file torchrun's ranks read."""
    path.write_text(yaml.safe_dump(dump_config(config)))
    return path


def launch(config_path: Path, nproc: int, max_restarts: int = 0) -> subprocess.Popen:
    """Start ``torchrun --standalone`` in its own session; its log goes to ``<config>.log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPHERECAST_", "WORLD_SIZE", "RANK", "LOCAL_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.1", "-m", "models.train", "--config",
           str(config_path)]
    log = open(config_path.with_suffix(".log"), "a")  # noqa: SIM115 - the child owns it until it exits
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous endpoint)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Dead-node detection after 1 s × 3 missed heartbeats instead of torchrun's 5 s × 3: the test waits less.
FAST_HEARTBEAT = "keep_alive_interval=1,keep_alive_max_attempt=3"


def launch_node(config: Config, config_path: Path) -> subprocess.Popen:
    """Start this node's torchrun agent — the product's ``torchrun_command`` — in its own session.

    The log goes to ``<config>.log``; the monitor polls every 0.1 s and heartbeats come every second.
    """
    from pipelines.tasks import torchrun_command, torchrun_environment

    cmd = torchrun_command(config, config_path)
    at = cmd.index("-m", 3)  # the module of the workers: agent options go before it
    conf = next(i for i, a in enumerate(cmd) if a.startswith("--rdzv_conf="))
    cmd[conf] += "," + FAST_HEARTBEAT
    cmd[at:at] = ["--monitor-interval=0.1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPHERECAST_", "WORLD_SIZE", "RANK", "LOCAL_"))}
    env = torchrun_environment(config, env)
    log = open(config_path.with_suffix(".log"), "a")  # noqa: SIM115 - the child owns it until it exits
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def log_tail(config_path: Path, chars: int = 3000) -> str:
    """The end of a launch's log, for assertion messages."""
    path = config_path.with_suffix(".log")
    return path.read_text()[-chars:] if path.exists() else "(no log)"


def finish(proc: subprocess.Popen, config_path: Path) -> None:
    """Wait for a launch and fail with its log unless it exits 0."""
    try:
        code = proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"torchrun did not finish in {DEADLINE_S} s:\n{log_tail(config_path)}") from None
    assert code == 0, f"torchrun exited {code}:\n{log_tail(config_path)}"


def records(run_dir: Path) -> list[dict]:
    """Complete lines of ``metrics.jsonl`` (a line being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, min_step: int, after: int = 0) -> int:
    """Block until a ``checkpoint`` record with step ≥ ``min_step`` appears after line ``after``; its step."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        steps = [r["step"] for r in records(run_dir)[after:] if r["event"] == "checkpoint" and r["step"] >= min_step]
        if steps:
            return steps[0]
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited {proc.returncode} before a checkpoint at step ≥ {min_step}")
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step ≥ {min_step} within {DEADLINE_S} s")


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (read from /proc: torchrun starts its workers in their own sessions)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def rank_pid(torchrun_pid: int, rank: int) -> int:
    """The worker process of ``rank`` under a torchrun agent (its ``RANK`` environment variable)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid in children(torchrun_pid):
            try:
                env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under torchrun {torchrun_pid}")


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL torchrun, then its workers (a power cut: nothing gets to clean up); the workers' PIDs."""
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} survived SIGKILL"
        time.sleep(0.02)
    return workers


def _state(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@contextmanager
def cleanup_on_error(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Kill a launch (torchrun and its workers) if the block fails, so no run outlives its test."""
    try:
        yield proc
    except BaseException:
        if proc.poll() is None:
            kill_tree(proc)
        raise


def wait_until_joined(proc: subprocess.Popen, port: int, run_id: str, participants: int = 1) -> None:
    """Block until the c10d rendezvous ``run_id`` on 127.0.0.1:``port`` lists ``participants`` nodes.

    Reads the state torchrun keeps in its store, so a test can order two nodes' joins exactly.
    """
    import base64
    import pickle
    from datetime import timedelta

    import torch.distributed as dist

    key = f"torch.rendezvous.{run_id}"
    deadline = time.monotonic() + 120
    store = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"torchrun exited {proc.returncode} before joining rendezvous {run_id!r}")
        try:
            store = store or dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=2))
            if store.check([key]):
                raw = store.get(key)
                if raw != b"Y2FuaW1hZGFt":  # torch's sentinel for "no state yet"
                    state = pickle.loads(base64.b64decode(raw))  # noqa: S301 - torch's own state, local test store
                    if len(state.participants) >= participants:
                        return
        except (RuntimeError, TimeoutError, ValueError):
            store = None  # the agent has not opened its store yet
        time.sleep(0.05)
    raise AssertionError(f"rendezvous {run_id!r} on port {port} never had {participants} participants")
