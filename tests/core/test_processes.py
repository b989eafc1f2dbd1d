"""A child started with die_with_parent() ends when its parent is killed hard; one started without it does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from core.processes import die_with_parent
    guard = sys.argv[1] == "guarded"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             preexec_fn=die_with_parent() if guard else None, start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _orphan(mode: str) -> int:
    """Start a parent that starts a child, SIGKILL the parent, and return the child's pid."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    return child


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_guarded_child_ends_with_its_parent_and_an_unguarded_one_is_left_behind() -> None:
    guarded = _orphan("guarded")
    deadline = time.monotonic() + 10
    while _alive(guarded) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(guarded)
    loose = _orphan("unguarded")
    try:
        time.sleep(1.0)
        assert _alive(loose)  # what every child of the train task and of `spherecast schedule` did before
    finally:
        os.kill(loose, signal.SIGKILL)
