"""Retention and hygiene of the forecasts directory, across real processes (flock on run directories)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core.retention import apply_retention, pid_alive, run_status, sweep_leftovers
from core.runs import RunGone, list_runs, parse_run_name, publish, reading, staging_dir, write_manifest

REPO = Path(__file__).resolve().parents[2]
SHA = "a" * 64
PROMOTED = "b" * 64

READER = """
import sys, time
from pathlib import Path
from core.runs import reading
with reading(Path(sys.argv[1])):
    print("reading", flush=True)
    sys.stdin.readline()  # hold the run until the parent closes stdin
"""


def make_run(forecasts: Path, name: str, sha: str = SHA) -> Path:
    """Publish a small run through the real staging, manifest and rename."""
    tmp = staging_dir(forecasts, name)
    (tmp / "forecast.nc").write_bytes(name.encode())
    write_manifest(tmp, parse_run_name(name), {"checkpoint_sha256": sha, "dataset_version": "v", "code_version": "c"})
    return publish(tmp, forecasts / name)


def names(n: int) -> list[str]:
    return [t.strftime("%Y%m%dT%H") for t in pd.date_range("2000-01-01", periods=n, freq="6h")]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def hold_reader(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", READER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "reading"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(30) == 0


def test_keeps_the_newest_n_and_removes_the_rest(tmp_path: Path) -> None:
    for name in names(5):
        make_run(tmp_path, name)
    report = apply_retention(tmp_path, keep=2)
    assert list_runs(tmp_path) == names(5)[-2:]
    assert report.removed == names(5)[:3] and report.kept == names(5)[-2:] and not report.protected
    assert sorted(p.name for p in tmp_path.iterdir()) == names(5)[-2:]  # nothing renamed aside is left


def test_a_run_being_read_by_another_process_is_never_removed(tmp_path: Path) -> None:
    for name in names(4):
        make_run(tmp_path, name)
    oldest = tmp_path / names(4)[0]
    reader = hold_reader(oldest)
    try:
        report = apply_retention(tmp_path, keep=1)
        assert report.protected == {names(4)[0]: "being read"}
        assert list_runs(tmp_path) == [names(4)[0], names(4)[-1]]
        assert (oldest / "forecast.nc").read_bytes() == names(4)[0].encode()  # whole, not half-deleted
    finally:
        release(reader)
    assert apply_retention(tmp_path, keep=1).removed == [names(4)[0]]
    assert list_runs(tmp_path) == [names(4)[-1]]


def test_the_newest_run_stays_even_with_keep_one_and_the_promoted_models_runs_stay(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "current.json").write_text(json.dumps({"checkpoint_sha256": PROMOTED, "run_name": "sfno-2026w49"}))
    all_names = names(4)
    make_run(tmp_path / "fc", all_names[0], sha=PROMOTED)
    for name in all_names[1:]:
        make_run(tmp_path / "fc", name)
    report = apply_retention(tmp_path / "fc", keep=1, runs_dir=runs)
    assert report.protected == {all_names[0]: "made by the promoted model"}
    assert list_runs(tmp_path / "fc") == [all_names[0], all_names[-1]]
    with pytest.raises(ValueError, match="keep must be ≥ 1"):
        apply_retention(tmp_path / "fc", keep=0)


def test_sweep_removes_only_leftovers_of_dead_writers_that_nobody_reads(tmp_path: Path) -> None:
    make_run(tmp_path, "20000101T00")
    dead = dead_pid()
    dead_tmp = tmp_path / f".tmp-20000101T06-{dead}"
    dead_old = tmp_path / f".old-20000101T00-{dead}"
    live_tmp = tmp_path / f".tmp-20000101T12-{os.getpid()}"
    read_tmp = tmp_path / f".tmp-20000101T18-{dead}"
    other = tmp_path / ".tmp-notarun"
    for path in (dead_tmp, dead_old, live_tmp, read_tmp, other):
        (path / "forecast.zarr").mkdir(parents=True)
    (read_tmp / "manifest.json").write_text("{}")  # reading() needs a manifest to hold a run
    reader = hold_reader(read_tmp)
    try:
        assert sorted(sweep_leftovers(tmp_path)) == sorted([dead_tmp.name, dead_old.name])
    finally:
        release(reader)
    assert live_tmp.is_dir() and read_tmp.is_dir() and other.is_dir()
    assert list_runs(tmp_path) == ["20000101T00"]
    assert sweep_leftovers(tmp_path) == [read_tmp.name]


def test_a_republication_keeps_the_replaced_run_for_its_reader_then_the_sweep_removes_it(tmp_path: Path) -> None:
    run = make_run(tmp_path, "20000101T00")
    with reading(run) as held:
        code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]);"
                "from tests.core.test_retention import make_run; make_run(Path(sys.argv[1]), '20000101T00')")
        subprocess.run([sys.executable, "-c", code, str(tmp_path), str(REPO)], check=True, cwd=REPO)
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".old-")]
        assert len(leftovers) == 1  # the reader's copy, renamed aside, still whole
        assert (leftovers[0] / "forecast.nc").read_bytes() == b"20000101T00"
        assert held == run
    assert sweep_leftovers(tmp_path) == [leftovers[0].name]  # its writer exited, its reader is done
    with pytest.raises(RunGone, match="not published"):
        with reading(tmp_path / "20000101T06"):
            pass


def test_status_is_ok_within_a_cycle_and_late_after(tmp_path: Path) -> None:
    assert run_status(tmp_path, 6)["status"] == "late"
    run = make_run(tmp_path, "20000101T00")
    created = pd.Timestamp(json.loads((run / "manifest.json").read_text())["created"])
    ok = run_status(tmp_path, 6, wait_minutes=30, now=created + pd.Timedelta(hours=6, minutes=29))
    assert ok["status"] == "ok" and ok["newest_run"] == "20000101T00" and ok["allowed_hours"] == 6.5
    late = run_status(tmp_path, 6, wait_minutes=30, now=created + pd.Timedelta(hours=6, minutes=31))
    assert late["status"] == "late" and late["age_hours"] == pytest.approx(6 + 31 / 60, abs=1e-3)
