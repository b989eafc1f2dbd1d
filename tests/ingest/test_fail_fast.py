"""Ingest fails fast and changes nothing: every bad source file, a missing time or missing CDS
credentials is refused before the store, its directory or its lock file is touched; an existing
store stays byte-identical when an append meets a bad file; the CLI says it in one line, exit 2."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import xarray as xr

from core.config import Config
from core.errors import SpherecastError, StoreWriteError, TransientSourceError, is_permanent
from ingest.build import ingest
from ingest.lock import lock_path
from tests.ingest.cds_files import write_cds_grib, write_cds_netcdf
from tests.ingest.conftest import tiny_config
from tests.ingest.faults import tree_digest

REPO = Path(__file__).resolve().parents[2]
DAY1 = pd.date_range("2000-01-01T00", periods=4, freq="6h")
DAY2 = pd.date_range("2000-01-02T00", periods=4, freq="6h")
VARIABLES = ["2m_temperature"]


def files_config(root: Path, files: Path, end: pd.Timestamp) -> Config:
    """A tiny-grid ingest of 2m temperature from the deliveries under ``files``, 2000-01-01 to ``end``."""
    ingest_section = {"source": "files", "files": {"paths": [str(files)]}, "start": str(DAY1[0]), "end": str(end),
                      "slab_size": 4, "workers": 1}
    train = {"train_start": "2000-01-01", "train_end": "2000-01-01T06",
             "val_start": "2000-01-01T12", "val_end": "2000-01-01T18"}
    return tiny_config(root, ingest=ingest_section, task={"variables": VARIABLES, "levels": []}, train=train)[0]


def truncated(path: Path) -> Path:
    good = write_cds_grib(path.with_suffix(".full"), DAY2, VARIABLES, [], grid_deg=6.0)
    path.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    good.unlink()
    return path


def garbled(path: Path) -> Path:
    data = bytearray(write_cds_grib(path, DAY2, VARIABLES, [], grid_deg=6.0).read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # inside the second message's header or data
    path.write_bytes(bytes(data))
    return path


def regional(path: Path) -> Path:
    full = write_cds_netcdf(path.with_suffix(".full.nc"), DAY2, VARIABLES, [], grid_deg=6.0)
    with xr.open_dataset(full) as ds:
        ds.sel(latitude=slice(60, 30), longitude=slice(0, 30)).load().to_netcdf(path)
    full.unlink()
    return path


def unknown_variable(path: Path) -> Path:
    full = write_cds_netcdf(path.with_suffix(".full.nc"), DAY2, VARIABLES, [], grid_deg=6.0)
    with xr.open_dataset(full) as ds:
        ds.rename({"t2m": "mystery"}).assign(mystery=lambda d: d["mystery"].assign_attrs(
            long_name="mystery field", standard_name="", units="1")).load().to_netcdf(path)
    full.unlink()
    return path


def other_grid(path: Path) -> Path:
    return write_cds_grib(path, DAY2, VARIABLES, [], grid_deg=3.0)  # day 1 is on 6°: one source, two grids


def nothing(path: Path) -> Path:
    return path.parent  # day 2 simply is in no file


BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated grib": (truncated, r"day2\.grib' is corrupt or truncated"),
    "garbled grib": (garbled, r"day2\.grib' is corrupt"),
    "regional file": (regional, r"day2\.nc.*(global|regional|covers)"),
    "unknown variable": (unknown_variable, r"day2\.nc' holds no variable spherecast knows"),
    "another grid": (other_grid, r"day1\.grib' \(31x60\) and .*day2\.grib' \(61x120\) are on different grids"),
    "missing time": (nothing, r"time 2000-01-02T00 \(and 3 more times\) is in none of the files"),
}
SUFFIX = {"regional file": ".nc", "unknown variable": ".nc"}


def with_bad_day2(root: Path, kind: str) -> Path:
    """A delivery folder: a good day 1 (GRIB, 6°) and day 2 spoilt as ``kind``."""
    files = root / "files"
    files.mkdir(parents=True)
    write_cds_grib(files / "day1.grib", DAY1, VARIABLES, [], grid_deg=6.0)
    make, _ = BAD[kind]
    make(files / f"day2{SUFFIX.get(kind, '.grib')}")
    return files


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_source_leaves_no_store_no_directory_and_no_lock(tmp_path: Path, kind: str) -> None:
    files = with_bad_day2(tmp_path, kind)
    config = files_config(tmp_path / "run", files, DAY2[-1])
    store = config.paths.analysis_store
    with pytest.raises(SpherecastError, match=BAD[kind][1]):
        ingest(config, progress=False)
    assert not store.exists() and not lock_path(store).exists() and not store.parent.exists()


@pytest.mark.parametrize("kind", list(BAD))
def test_an_append_meeting_a_bad_source_leaves_the_store_byte_identical(tmp_path: Path, kind: str) -> None:
    files = with_bad_day2(tmp_path, kind)
    # Day 1 alone is fine: the store is built from day1.grib only.
    first = files_config(tmp_path / "run", files / "day1.grib", DAY1[-1])
    ingest(first, progress=False)
    store = first.paths.analysis_store
    before = tree_digest(store.parent)
    # The append reads the whole folder, day 2 included, to extend the store to the end of day 2.
    with pytest.raises(SpherecastError, match=BAD[kind][1]):
        ingest(files_config(tmp_path / "run", files, DAY2[-1]), progress=False, append=True)
    assert tree_digest(store.parent) == before  # the store, its lock file and the statistics


def test_missing_cds_credentials_fail_at_once_and_leave_nothing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CDSAPI_URL", "CDSAPI_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CDSAPI_RC", str(tmp_path / "no-such-cdsapirc"))
    config = tiny_config(tmp_path / "run", ingest={"source": "cds", "start": "2000-01-01", "end": "2000-01-02T18"})[0]
    began = time.perf_counter()
    with pytest.raises(SpherecastError, match=r"CDS credentials are missing \(url and key\): create .*no-such-cdsapirc"):
        ingest(config, progress=False)
    took = time.perf_counter() - began
    print(f"missing credentials refused in {took:.2f} s")
    store = config.paths.analysis_store
    assert not store.exists() and not lock_path(store).exists()


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``spherecast <args>`` in a subprocess; the result and its wall time in seconds."""
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    return proc, time.perf_counter() - began


@pytest.mark.parametrize("prefect", [False, True], ids=["no-prefect", "prefect"])
def test_the_cli_says_a_bad_file_in_one_line_with_exit_2(tmp_path: Path, prefect: bool) -> None:
    files = with_bad_day2(tmp_path, "truncated grib")
    config_file = tmp_path / "run" / "config.yaml"
    files_config(tmp_path / "run", files, DAY2[-1])
    proc, took = run_cli("ingest", "--config", str(config_file), *([] if prefect else ["--no-prefect"]))
    print(f"bad file refused by the CLI in {took:.1f} s")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("spherecast: error: GRIB file ") and "day2.grib' is corrupt or truncated" in last
    assert not (tmp_path / "run" / "data").exists()


def test_the_cli_says_missing_credentials_in_one_line_before_prefect_starts(tmp_path: Path) -> None:
    _, config_file = tiny_config(tmp_path / "run", ingest={"source": "cds", "start": "2000-01-01",
                                                            "end": "2000-01-02T18"})
    env = {k: v for k, v in os.environ.items() if k not in ("CDSAPI_URL", "CDSAPI_KEY")}
    env["CDSAPI_RC"] = str(tmp_path / "no-such-cdsapirc")
    proc, took = run_cli("ingest", "--config", str(config_file), env=env)
    print(f"missing credentials refused by the CLI in {took:.1f} s")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"spherecast: error: CDS credentials are missing (url and key): create {tmp_path / 'no-such-cdsapirc'} with "
        "the lines 'url: https://cds.climate.copernicus.eu/api' and 'key: <your personal access token>', or set the "
        "CDSAPI_URL and CDSAPI_KEY environment variables"]
    assert not (tmp_path / "run" / "data").exists()


def test_permanent_and_transient_errors_are_told_apart() -> None:
    assert is_permanent(StoreWriteError(errno.ENOSPC, "disk full"))
    assert is_permanent(OSError(errno.EDQUOT, "quota"))
    assert not is_permanent(OSError(errno.ECONNRESET, "reset by peer"))
    assert not is_permanent(TransientSourceError("CDS answered 503 three times"))
    assert is_permanent(SpherecastError("bad file"))
    assert not is_permanent(RuntimeError("a bug"))  # a bug is retried as before: it may be a race
