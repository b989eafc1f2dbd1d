from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import Config, load_config

TINY = {
    "grid": {"preset": "tiny"},
    "ingest": {
        "start": "2000-01-01T00", "end": "2000-01-04T18", "slab_size": 2,
        # A coarse solver keeps the tests fast; it is stable at this dt (see docs/operations.md).
        "synthetic": {"solver_nlat": 33, "solver_nlon": 64, "dt_seconds": 360, "spinup_days": 2},
    },
    "train": {"train_start": "2000-01-01", "train_end": "2000-01-02T18",
              "val_start": "2000-01-03", "val_end": "2000-01-04T18"},
}


def tiny_config(root: Path, **overrides: dict) -> tuple[Config, Path]:
    """A tiny-grid config rooted at ``root``, also written to ``root/config.yaml``."""
    data = {k: dict(v) for k, v in TINY.items()}
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    data["paths"] = {"root": str(root)}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, env={}), path


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Config, Path]:
    return tiny_config(tmp_path / "run")
