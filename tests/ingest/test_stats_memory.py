"""The statistics pass under an address-space cap that the old whole-period float64 load cannot live in.

Store: 1.5° (121 × 240 = 29,040 points), 3 channels, 360 times (90 days at 6 h).

- old approach: the period loaded as float32 (360 · 3 · 29,040 · 4 B = 125.5 MB), then copied to float64
  (251.0 MB), then ``x * w`` and the deviations (another 251 MB each, transient): ≥ 376 MB at once;
- streaming pass with a 16 MiB block budget: one block of float32 (the channels' stack and the variables
  they are read from, ≤ 16 MiB: 24 times) plus Zarr's decode buffers, a few float64 fields of one time
  (3 · 29,040 · 8 B = 0.7 MB each) and ``(360, 3)`` moments; it passed here under a 40 MiB cap.

The child process imports everything and reads two times through both code paths (so that Zarr's threads
and pools exist), then caps its address space (``RLIMIT_AS``) at its current size + 96 MiB: more than twice
what the streaming pass needed, and less than the old approach's float32 load plus its float64 copy.
Under that cap the streaming pass succeeds and gives the uncapped result; the old load fails with
``MemoryError``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.grid import get_grid
from core.testing import analysis_dataset
from ingest.stats import compute_stats
from ingest.store import StoreLayout, create_store, open_store, write_slab

GRID, N, CH = "1.5deg", 360, ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]
HEADROOM = 96 * 2**20
BUDGET = 16 * 2**20

CHILD = r"""
import json, resource, sys, threading
import numpy as np, pandas as pd
from core.fields import to_channels
from ingest.stats import compute_stats
from ingest.store import open_store

path, mode, headroom, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
CH = json.loads(sys.argv[5])
store = open_store(path)
t = store["time"].values
# Warm up both paths on two times: imports, Zarr's event loop and codec threads exist before the cap.
compute_stats(path, CH, t[0], t[1], incremental=False, budget_bytes=budget)
to_channels(store.isel(time=slice(0, 2)), CH).values
vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, vm + headroom))
try:
    if mode == "stream":
        st = compute_stats(path, CH, t[0], t[-1], incremental=False, budget_bytes=budget)
        print(json.dumps({"ok": True, "std": st["std"].values.tolist(), "mean": st["mean"].values.tolist()}))
    else:  # the old compute_stats: the whole period as float64 in one array
        x = to_channels(store, CH).values.astype(np.float64)
        print(json.dumps({"ok": True, "bytes": x.nbytes}))
except MemoryError:
    print(json.dumps({"ok": False, "error": "MemoryError"}))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cap") / "analysis.zarr"
    ds = analysis_dataset(GRID, periods=N)
    create_store(path, StoreLayout(get_grid(GRID), tuple(ds.data_vars)[:3], (500,), pd.DatetimeIndex(ds.time.values),
                                   "t", "v1"), slab_size=24, compression="none")
    write_slab(path, open_store(path), ds, 0)
    return path


def run_capped(store: Path, mode: str) -> dict:
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}  # no per-thread malloc arenas
    out = subprocess.run([sys.executable, "-c", CHILD, str(store), mode, str(HEADROOM), str(BUDGET), json.dumps(CH)],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_streaming_stats_fit_under_a_cap_the_old_float64_load_does_not(store: Path) -> None:
    g = get_grid(GRID)
    old_float64 = N * len(CH) * g.nlat * g.nlon * 8
    old_float32 = old_float64 // 2
    assert old_float32 + old_float64 > 3 * HEADROOM  # the arithmetic of the docstring: 376 MB vs a 96 MiB cap
    assert BUDGET * 5 < HEADROOM
    capped = run_capped(store, "stream")
    assert capped["ok"], capped
    free = compute_stats(store, CH, pd.Timestamp("2000-01-01"), pd.Timestamp("2000-03-31T18"), incremental=False)
    np.testing.assert_allclose(capped["std"], free["std"].values, rtol=1e-12)
    old = run_capped(store, "old")
    assert old == {"ok": False, "error": "MemoryError"}
