"""The quick skill-bench run shared by the bench tests (its stores are reused by skill_bound.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benches" / "skill_swe.py"


def bench_env() -> dict[str, str]:
    """The environment a user runs a bench in: no SPHERECAST_* overrides, no warning noise."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return {k: v for k, v in env.items() if not k.startswith("SPHERECAST_")}


@pytest.fixture(scope="session")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run ``python benches/skill_swe.py --quick`` once, as a user would, and return its outputs."""
    out = tmp_path_factory.mktemp("skill")
    report = out / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out / "work"), "--json", str(report)],
                          cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out / "work", "report": json.loads(report.read_text()), "report_path": report, "stdout": proc.stdout}


def tree_digest(root: Path) -> str:
    """sha256 over every file's path and bytes under ``root`` (stores, stats, checkpoints, metrics)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def digest() -> Any:
    """:func:`tree_digest`, for tests that check nothing on disk changed."""
    return tree_digest
