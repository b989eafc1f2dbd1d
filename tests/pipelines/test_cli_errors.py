"""Exit codes of the real console scripts: a mistake the user can fix is one line and exit 2; a bug
(any other exception, a bare ValueError included) keeps its traceback and exits 1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPHERECAST = Path(sys.executable).with_name("spherecast")


def _env(tmp_path: Path, patch: str | None = None) -> dict[str, str]:
    """The test environment, plus a ``sitecustomize`` that replaces one internal function when ``patch`` is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPHERECAST_")}
    path = [str(REPO)]
    if patch is not None:
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(textwrap.dedent(patch))
        path.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"paths: {{root: {tmp_path / 'out'}}}\n{extra}")
    return cfg


def _spherecast(tmp_path: Path, *args: str, patch: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SPHERECAST), *args], cwd=tmp_path, env=_env(tmp_path, patch), capture_output=True,
                          text=True, timeout=120)


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("spherecast: error: "), proc.stderr
    return lines[0]


RAISE_IN_STATUS = """
    import core.retention

    def run_status(*args, **kwargs):
        raise {exc}

    core.retention.run_status = run_status
"""


def test_an_unknown_grid_preset_in_the_config_file_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = _spherecast(tmp_path, "status", "--config", str(_config(tmp_path, "grid: {preset: 7deg}\n")))
    line = _one_error_line(proc)
    assert "grid.preset" in line and "unknown grid preset '7deg'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["forecast", "--grid", "7deg"], "unknown grid preset '7deg'"),
    (["render", "20000320T00", "--run", "20000321T00"], "render needs one run name: spherecast render RUN"),
])
def test_a_bad_command_line_value_is_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    line = _one_error_line(_spherecast(tmp_path, *args, "--config", str(_config(tmp_path))))
    assert needle in line


def test_an_internal_value_error_keeps_its_traceback_and_exits_1(tmp_path: Path) -> None:
    proc = _spherecast(tmp_path, "status", "--config", str(_config(tmp_path)),
                       patch=RAISE_IN_STATUS.format(exc='ValueError("internal")'))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: internal"
    assert "spherecast: error:" not in proc.stderr


def test_a_user_error_raised_deep_inside_is_still_one_line(tmp_path: Path) -> None:
    patch = RAISE_IN_STATUS.format(exc='__import__("core.errors").errors.DataContractError("store broken")')
    proc = _spherecast(tmp_path, "status", "--config", str(_config(tmp_path)), patch=patch)
    assert _one_error_line(proc) == "spherecast: error: store broken"


def test_ctrl_c_exits_130_and_argparse_keeps_its_usage_errors(tmp_path: Path) -> None:
    proc = _spherecast(tmp_path, "status", "--config", str(_config(tmp_path)),
                       patch=RAISE_IN_STATUS.format(exc="KeyboardInterrupt"))
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    proc = _spherecast(tmp_path, "no-such-command")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: spherecast"), proc.stderr
    assert "invalid choice: 'no-such-command'" in proc.stderr
    # A date pandas cannot read is a usage error too, not pandas' bare ValueError with a traceback.
    proc = _spherecast(tmp_path, "forecast", "--backfill", "garbage", "2000-01-01T00")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("spherecast forecast: error: argument --backfill: 'garbage' is not "
                                                    "a date/time (use e.g. 2000-01-05T18)")


TRAIN_TWICE = """
import sys

import models.train

print("exit", models.train.main(["--config", sys.argv[1]]), file=sys.stderr, flush=True)


def load_config(*args, **kwargs):
    raise ValueError("internal")


models.train.load_config = load_config
raise SystemExit(models.train.main(["--config", sys.argv[2]]))
"""


def test_the_training_entry_point_draws_the_same_line(tmp_path: Path) -> None:
    # One process for both cases: importing torch twice would double this test's time.
    bad = _config(tmp_path, "train: {epochs: 3}\n")
    good = tmp_path / "good.yaml"
    good.write_text(f"paths: {{root: {tmp_path / 'out'}}}\n")
    proc = subprocess.run([sys.executable, "-c", TRAIN_TWICE, str(bad), str(good)], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    mistake, _, bug = proc.stderr.partition("exit 2\n")
    assert _ and "unknown key 'train.epochs'" in mistake and "Traceback" not in mistake, proc.stderr
    assert proc.returncode == 1 and "Traceback (most recent call last)" in bug, proc.stderr
    assert bug.strip().splitlines()[-1] == "ValueError: internal"
