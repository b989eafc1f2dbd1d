"""Retention and hygiene of the forecasts directory, and the schedule status of the newest run.

Retention keeps the newest ``keep`` published runs and never removes:

- the newest run (what ``/runs/latest`` serves),
- a run a reader holds (:func:`core.runs.reading`), checked with a non-blocking exclusive lock,
- a run made by the promoted model: ``<runs>/current.json`` names its ``checkpoint_sha256``.

Hygiene removes ``.tmp-<run>-<pid>`` staging folders and ``.old-<run>-<pid>`` leftovers of a
republication only when process ``pid`` is dead, and only when no reader holds them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import DataContractError
from core.runs import MANIFEST, exclusive, list_runs, parse_run_name, remove_unread

log = logging.getLogger(__name__)

LEFTOVER_RE = re.compile(r"^\.(tmp|old)-(\d{8}T\d{2})-(\d+)$")
CURRENT = "current.json"


@dataclass
class RetentionReport:
    """What one retention pass did."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    protected: dict[str, str] = field(default_factory=dict)
    """Runs beyond ``keep`` that were kept, with the reason."""
    swept: list[str] = field(default_factory=list)
    """Staging and replaced-run folders of dead writers that were removed."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _zombie(pid: int) -> bool:
    # A killed child not yet reaped by its parent still has a pid; its writes have stopped all the same.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"


def sweep_leftovers(forecasts_dir: Path) -> list[str]:
    """Remove ``.tmp-…-<pid>`` and ``.old-…-<pid>`` folders whose process is dead and that nobody reads."""
    removed: list[str] = []
    if not Path(forecasts_dir).is_dir():
        return removed
    for path in sorted(Path(forecasts_dir).iterdir()):
        m = LEFTOVER_RE.match(path.name)
        if not m or not path.is_dir():
            continue
        pid = int(m.group(3))
        if pid_alive(pid) and not _zombie(pid):
            continue  # its writer may still be assembling or replacing it
        if remove_unread(path):
            removed.append(path.name)
            log.info("removed %s: its writer (pid %d) is dead", path.name, pid)
    return removed


def promoted_checkpoint(runs_dir: Path | None) -> str | None:
    """The ``checkpoint_sha256`` of ``<runs>/current.json`` (the promoted model), if there is one."""
    if runs_dir is None:
        return None
    path = Path(runs_dir) / CURRENT
    if not path.is_file():
        return None
    try:
        sha = json.loads(path.read_text()).get("checkpoint_sha256")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataContractError(f"{path} is not a JSON object with checkpoint_sha256: {exc}") from None
    return str(sha) if sha else None


def _provenance_sha(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / MANIFEST).read_text())["provenance"].get("checkpoint_sha256")
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def _retire(run_dir: Path) -> bool:
    """Remove a published run unless a reader holds it: renamed aside under the lock, then deleted."""
    import shutil

    with exclusive(run_dir) as free:
        if not free:
            return False
        # Renamed first: a reader arriving now finds the name gone instead of a half-deleted run.
        old = run_dir.with_name(f".old-{run_dir.name}-{os.getpid()}")
        os.rename(run_dir, old)
        shutil.rmtree(old)
    return True


def apply_retention(forecasts_dir: Path, keep: int, runs_dir: Path | None = None) -> RetentionReport:
    """Keep the newest ``keep`` published runs (plus protected ones), remove the rest, sweep dead leftovers."""
    if keep < 1:
        raise ValueError(f"retention keep must be ≥ 1, got {keep}")
    forecasts_dir = Path(forecasts_dir)
    report = RetentionReport(swept=sweep_leftovers(forecasts_dir))
    names = list_runs(forecasts_dir)  # oldest first
    report.kept = names[-keep:]
    promoted = promoted_checkpoint(runs_dir)
    for name in names[:-keep]:
        run_dir = forecasts_dir / name
        if promoted and _provenance_sha(run_dir) == promoted:
            report.protected[name] = "made by the promoted model"
        elif not _retire(run_dir):
            report.protected[name] = "being read"
        else:
            report.removed.append(name)
            log.info("retention removed run %s", name)
    return report


def run_status(forecasts_dir: Path, cycle_hours: int, wait_minutes: float = 0.0,
               now: pd.Timestamp | None = None) -> dict[str, Any]:
    """The newest run and its age against the schedule: ``ok`` within one cycle plus the wait, else ``late``."""
    now = pd.Timestamp.now(tz="UTC") if now is None else pd.Timestamp(now)
    now = now.tz_convert("UTC") if now.tzinfo else now.tz_localize("UTC")
    allowed = pd.Timedelta(hours=cycle_hours) + pd.Timedelta(minutes=wait_minutes)
    names = list_runs(Path(forecasts_dir))
    out: dict[str, Any] = {"status": "late", "newest_run": None, "init_time": None, "published": None,
                           "age_hours": None, "cycle_hours": cycle_hours, "allowed_hours": allowed.total_seconds() / 3600}
    if not names:
        out["reason"] = "no published run"
        return out
    name = names[-1]
    try:
        created = pd.Timestamp(json.loads((Path(forecasts_dir) / name / MANIFEST).read_text())["created"])
    except (OSError, ValueError, KeyError):
        created = None
    if created is None:
        out.update(newest_run=name, init_time=parse_run_name(name).isoformat(), reason="manifest unreadable")
        return out
    created = created.tz_convert("UTC") if created.tzinfo else created.tz_localize("UTC")
    age = now - created
    out.update(newest_run=name, init_time=parse_run_name(name).isoformat(), published=created.isoformat(),
               age_hours=round(age.total_seconds() / 3600, 3), status="ok" if age <= allowed else "late")
    return out
