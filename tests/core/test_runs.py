import json
from pathlib import Path

import pytest

from core.runs import (
    list_runs,
    parse_run_name,
    publish,
    read_manifest,
    run_name,
    sha256_file,
    staging_dir,
    write_manifest,
)

PROV = {"checkpoint_sha256": "ab", "dataset_version": "v", "code_version": "c"}


def make_run(root: Path, name: str, payload: bytes) -> Path:
    tmp = staging_dir(root, name)
    (tmp / "maps" / "x").mkdir(parents=True)
    (tmp / "forecast.nc").write_bytes(payload)
    (tmp / "maps" / "x" / "000.png").write_bytes(b"png")
    write_manifest(tmp, parse_run_name(name), PROV)
    return tmp


def test_publish_is_a_rename_and_replaces_whole_runs(tmp_path: Path) -> None:
    assert run_name("2000-03-20T06") == "20000320T06"
    tmp = make_run(tmp_path, "20000320T06", b"one")
    assert list_runs(tmp_path) == []  # staging is invisible
    publish(tmp, tmp_path / "20000320T06")
    assert list_runs(tmp_path) == ["20000320T06"]
    manifest = read_manifest(tmp_path / "20000320T06")
    assert manifest["files"]["forecast.nc"]["sha256"] == sha256_file(tmp_path / "20000320T06" / "forecast.nc")
    assert set(manifest["files"]) == {"forecast.nc", "maps/x/000.png"}
    publish(make_run(tmp_path, "20000320T06", b"two"), tmp_path / "20000320T06")
    assert (tmp_path / "20000320T06" / "forecast.nc").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20000320T06"]


def test_refuses_unfinished_and_bad_names(tmp_path: Path) -> None:
    tmp = staging_dir(tmp_path, "20000101T00")
    with pytest.raises(ValueError, match="no manifest.json"):
        publish(tmp, tmp_path / "20000101T00")
    with pytest.raises(ValueError, match="not a run name"):
        parse_run_name("../etc")


def test_manifest_validation(tmp_path: Path) -> None:
    run = tmp_path / "20000101T00"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"schema_version": "1", "init_time": "2000-01-01",
                                                   "files": {"../x": {"size": 1, "sha256": "0"}}, "provenance": PROV}))
    with pytest.raises(ValueError, match="escapes the run directory"):
        read_manifest(run)
