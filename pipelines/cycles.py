"""Per-cycle forecast runs: which initial time, waiting for it, one run at a time, idempotence, backfill.

- One run per initial time. A trigger for an init that is already published returns that run
  untouched unless ``force``.
- A run waits (bounded by ``forecast.wait_minutes``, polling every ``poll_seconds``) until its
  initial conditions are complete, then fails with a clear error.
- Two forecast runs, or a run and a store append (``ingest_era5``), never overlap. Under a Prefect
  server, the global concurrency limit ``spherecast-cycle`` (one slot, created on first use)
  serializes them across workers. A file lock (``flock`` on ``<forecasts>/.cycle.lock``) holds the
  same line without a server and across processes that each started their own temporary one.
- Late runs: with ``init_time: latest``, the newest complete cycle is the only candidate (missed
  older cycles are never caught up), and it is skipped when older than ``forecast.max_age_hours``.

Every trigger appends one line to ``<forecasts>/cycles.jsonl`` (what it did, which run, and when
it held the lock), written while the lock is still held.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from core.config import Config
from core.errors import ConfigError, MissingInputError, StoreLockedError
from core.ic_select import InitChoice, choose_init, latest_cycle

log = logging.getLogger(__name__)

LIMIT_NAME = "spherecast-cycle"
LOCK_FILE = ".cycle.lock"
JOURNAL = "cycles.jsonl"
# A slot whose holder was SIGKILLed is freed when its lease runs out; the live holder renews it.
LEASE_SECONDS = 60.0


class CycleLockTimeout(StoreLockedError, TimeoutError):
    """Another forecast run or store append held the cycle lock for longer than this run may wait."""


@dataclass
class CycleResult:
    """What one trigger of a cycle did."""

    action: str
    """``published`` (a new run), ``existing`` (the init was already published: nothing done) or ``skipped``."""
    run: str | None = None
    run_dir: str | None = None
    init_time: str | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for the journal and the flow's return value."""
        return asdict(self)


def utc_now() -> pd.Timestamp:
    """The current time in UTC, timezone-naive like the stores' times."""
    return pd.Timestamp.now(tz="UTC").tz_localize(None)


def _naive_utc(t: pd.Timestamp | str) -> pd.Timestamp:
    t = pd.Timestamp(t)
    return t.tz_convert("UTC").tz_localize(None) if t.tzinfo else t


def check_request(config: Config) -> None:
    """Refuse a forecast request that cannot run, before any waiting, reading or writing."""
    step = config.task.time_step_hours
    if config.forecast.lead_hours % step:
        raise ConfigError(f"forecast.lead_hours {config.forecast.lead_hours} is not a multiple of the time step "
                          f"task.time_step_hours {step} h")


def cycle_times(start: pd.Timestamp | str, end: pd.Timestamp | str, step_hours: int) -> list[pd.Timestamp]:
    """Initial times from ``start`` to ``end`` inclusive every ``step_hours``; ``start`` must lie on a cycle."""
    start, end = _naive_utc(start), _naive_utc(end)
    if end < start:
        raise ConfigError(f"backfill end {end} is before its start {start}")
    if (start - start.normalize()) % pd.Timedelta(hours=step_hours):
        raise ConfigError(f"backfill start {start} is not on a {step_hours}-hourly cycle")
    return list(pd.date_range(start, end, freq=f"{step_hours}h"))


def wait_for_init(config: Config, init_time: pd.Timestamp | str, sleep: Callable[[float], None] = time.sleep,
                  monotonic: Callable[[], float] = time.monotonic) -> InitChoice:
    """Poll until ``init_time`` is complete in an allowed store; after ``wait_minutes`` raise ``ValueError``."""
    fc = config.forecast
    deadline = monotonic() + fc.wait_minutes * 60
    attempt = 0
    while True:
        attempt += 1
        try:
            return choose_init(config, init_time)
        except (ValueError, OSError, KeyError) as exc:
            # A store being appended to can be unreadable for an instant: that is one more poll, not a failure.
            last = exc
        if monotonic() + fc.poll_seconds > deadline:
            waited = f" after waiting {fc.wait_minutes:g} min ({attempt} checks)" if fc.wait_minutes else ""
            raise MissingInputError(f"{last}{waited}") from None
        log.info("initial conditions for %s not complete yet (%s); next check in %g s", init_time, last,
                 fc.poll_seconds)
        sleep(fc.poll_seconds)


def _live_initial_conditions(config: Config) -> bool:
    return config.forecast.source != "analysis" and config.initial_conditions.source != "none"


def pick_latest(config: Config, now: pd.Timestamp | str | None = None,
                sleep: Callable[[float], None] = time.sleep,
                monotonic: Callable[[], float] = time.monotonic) -> tuple[InitChoice | None, str]:
    """The newest complete cycle under the late policy: ``(choice, "")`` or ``(None, why it is skipped)``.

    With live initial conditions, first wait (bounded) for the cycle the schedule is due (``now`` less
    ``forecast.ic_lag_hours``, floored to ``cycle_hours``); whatever the wait ends with, only the newest complete cycle is a
    candidate, and it is skipped when older than ``max_age_hours``.
    """
    fc = config.forecast
    now = utc_now() if now is None else _naive_utc(now)
    if _live_initial_conditions(config) and fc.wait_minutes > 0:
        due = (now - pd.Timedelta(hours=fc.ic_lag_hours)).floor(f"{fc.cycle_hours}h")
        try:
            wait_for_init(config, due, sleep, monotonic)
        except ValueError as exc:
            log.warning("the due cycle %s did not arrive: %s; taking the newest complete cycle", due, exc)
    choice = latest_cycle(config)
    age = now - choice.init_time
    if age > pd.Timedelta(hours=fc.max_age_hours):
        return None, (f"newest complete cycle {choice.init_time.isoformat()} ({choice.kind} store) is "
                      f"{age.total_seconds() / 3600:.1f} h old, older than forecast.max_age_hours "
                      f"{fc.max_age_hours:g}")
    return choice, ""


@contextmanager
def file_lock(path: Path, timeout_s: float, poll_s: float = 0.5) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block, waiting at most ``timeout_s`` for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _holder(path)
                    raise CycleLockTimeout(f"{path} is held by {holder}; gave up after {timeout_s:g} s") from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": utc_now().isoformat()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock; the kernel does the same if this process dies


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "another process"


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _prefect_slot(timeout_s: float) -> Any:
    """The Prefect global concurrency slot, created with one slot if it does not exist yet."""
    from prefect import get_client
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(LIMIT_NAME, 1)
        except Exception as exc:  # noqa: BLE001 — a racing creator won; the limit exists either way
            log.debug("concurrency limit %s: %s", LIMIT_NAME, exc)
    return concurrency(LIMIT_NAME, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_SECONDS, strict=True)


def lock_timeout_s(config: Config) -> float:
    """How long a run or an append waits for the cycle lock: the cycle's wait window, at least a minute."""
    return max(60.0, config.forecast.wait_minutes * 60)


@contextmanager
def exclusive_cycle(config: Config, timeout_s: float | None = None) -> Iterator[float]:
    """Hold the Prefect slot (inside a Prefect run) and the file lock; yield when they were acquired."""
    timeout_s = lock_timeout_s(config) if timeout_s is None else timeout_s
    slot = _prefect_slot(timeout_s) if _in_prefect_run() else nullcontext()
    with slot, file_lock(config.paths.forecasts / LOCK_FILE, timeout_s):
        yield time.time()


def record(config: Config, result: CycleResult, acquired: float | None, **extra: Any) -> None:
    """Append one trigger's outcome and lock interval to ``<forecasts>/cycles.jsonl`` (call under the lock)."""
    entry = {**result.to_dict(), "pid": os.getpid(), "acquired": acquired, "released": time.time(), **extra}
    path = config.paths.forecasts / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


def read_journal(forecasts_dir: Path) -> list[dict[str, Any]]:
    """Every entry of ``<forecasts>/cycles.jsonl``, oldest first."""
    path = Path(forecasts_dir) / JOURNAL
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
