"""The store's single-writer lock, across real processes (fcntl.flock on ``<store>.lock``)."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core.grid import get_grid
from core.testing import analysis_dataset
from ingest.store import StoreLayout, StoreLockedError, build_store, lock_holder, lock_path, store_lock

VARS = ("geopotential", "u_component_of_wind", "v_component_of_wind")
REPO = Path(__file__).resolve().parents[2]

HOLD = """
import sys
from ingest.store import store_lock
with store_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin (or kills us)
"""

SECOND_WRITER = """
import sys
import pandas as pd
from core.grid import get_grid
from core.testing import analysis_dataset
from ingest.store import StoreLayout, build_store
ds = analysis_dataset(periods=4)
layout = StoreLayout(get_grid("tiny"), tuple(ds.data_vars)[:3], (500,), pd.DatetimeIndex(ds.time.values), "t", "v")
build_store(sys.argv[1], layout, lambda times: ds.sel(time=times), slab_size=2)
"""


def holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def digest(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_second_writer_in_another_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    ds = analysis_dataset(periods=4)
    layout = StoreLayout(get_grid("tiny"), VARS, (500,), pd.DatetimeIndex(ds.time.values), "t", "v")
    with store_lock(path):
        build_store(path, layout, lambda times: ds.sel(time=times), slab_size=2)  # re-entrant in one process
        before = digest(path)
        proc = subprocess.run([sys.executable, "-c", SECOND_WRITER, str(path)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("ingest.lock.StoreLockedError: store ") and str(path) in last
        assert f"pid {os.getpid()} on host {socket.gethostname()} since " in last
        assert digest(path) == before
    assert lock_path(path) == tmp_path / "a.zarr.lock" and lock_path(path).is_file()
    # Released on exit: another process can now take it.
    assert subprocess.run([sys.executable, "-c", SECOND_WRITER, str(path)], cwd=REPO, capture_output=True,
                          timeout=120).returncode == 0


def test_a_held_lock_refuses_at_once_and_a_sigkilled_holder_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    proc = holder(path)
    try:
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid} on host") as info:
            with store_lock(path):
                pass
        assert isinstance(info.value, ValueError) and str(path) in str(info.value)
        assert lock_holder(path)["pid"] == proc.pid
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    # The dead holder's lock file is still there with its details, and blocks nobody.
    assert json.loads(lock_path(path).read_text())["pid"] == proc.pid
    with store_lock(path):
        assert lock_holder(path)["pid"] == os.getpid()
        with store_lock(path):  # re-entrant
            pass
        assert lock_holder(path)["pid"] == os.getpid()


def test_lock_is_released_when_the_block_raises(tmp_path: Path) -> None:
    path = tmp_path / "a.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with store_lock(path):
            raise RuntimeError("boom")
    proc = holder(path)  # would fail to lock if we still held it
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    proc.stdout.close()
    proc.stderr.close()
