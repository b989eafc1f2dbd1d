"""Child processes that end with their parent: Linux's parent-death signal, set in the child before exec.

A supervisor killed hard (SIGKILL, the OOM killer, a cluster scheduler's timeout) cannot stop its
children, and a torchrun agent or Prefect server left behind keeps ports, GPUs and store locks. The
kernel can: ``prctl(PR_SET_PDEATHSIG)`` sends the child a signal the moment the thread that started
it exits. The callers start children from a thread that waits for them (the train task streams
torchrun's output until it exits; ``spherecast schedule`` supervises its children from the main
thread), so "that thread exits" means "the supervisor is gone".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the child gets ``sig`` when this process dies; None where the OS has no such signal."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolved here, in the parent: the child between fork and exec should do as little as possible.
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    parent = os.getpid()
    number = int(sig)

    def set_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, number, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: nobody will send it
            os.kill(os.getpid(), number)

    return set_signal
