"""Where analysis data comes from. Every source speaks the contract's names (DESIGN §3).

``Source.fetch(times, variables, levels)`` returns an ``xr.Dataset`` with dims ``time``,
``level`` (pressure variables), ``latitude`` (90 → −90) and ``longitude`` (0 → 360−Δ) on the
store's grid, ERA5 long names, float32, CF attributes, and a per-time ``expver``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import xarray as xr

from core.config import SyntheticConfig
from core.errors import ConfigError
from core.grid import Grid
from core.schema import EXPVER_FINAL
from core.variables import get_variable

log = logging.getLogger(__name__)


@runtime_checkable
class Source(Protocol):
    """A producer of analysis slabs in the contract's names, on a given grid."""

    name: str

    def dataset_version(self) -> str:
        """A string that changes whenever the data this source would deliver changes."""
        ...

    def fetch(self, times: Sequence[pd.Timestamp], variables: Sequence[str], levels: Sequence[int]) -> xr.Dataset:
        """Return the analysis at ``times`` for ``variables`` (at ``levels`` where applicable)."""
        ...


SYNTHETIC_VARIABLES = ("geopotential", "u_component_of_wind", "v_component_of_wind")
SYNTHETIC_LEVEL = 500  # the planet is one layer; we call it 500 hPa, like z500


class SyntheticSource:
    """The shallow-water planet (DESIGN §4), spectrally truncated onto the store's grid."""

    name = "synthetic-shallow-water"

    def __init__(self, grid: Grid, settings: SyntheticConfig | None = None) -> None:
        self.grid = grid
        self.settings = settings or SyntheticConfig()
        self._planet = None
        self._to_grid = None
        self._lmax = 0  # degrees the grid shows, set with the planet

    def dataset_version(self) -> str:
        """Hash of everything that determines the planet's values on this grid."""
        blob = json.dumps({"source": self.name, "grid": self.grid.describe(),
                           "settings": self.settings.model_dump(mode="json"), "v": 1}, sort_keys=True)
        return f"swe-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def _ensure(self) -> None:
        if self._planet is not None:
            return
        import torch
        import torch_harmonics as th

        from ingest.planet import Planet

        s = self.settings
        self._planet = Planet(seed=s.seed, nlat=s.solver_nlat, nlon=s.solver_nlon, dt=s.dt_seconds,
                              spinup_days=s.spinup_days, epoch=s.epoch)
        solver = self._planet.solver
        lmax = min(solver.lmax, (self.grid.nlat + 1) // 2)
        kw = dict(lmax=lmax, mmax=lmax, grid="equiangular", csphase=False)
        isht = th.InverseRealSHT(self.grid.nlat, self.grid.nlon, **kw).to(torch.float64)
        ivsht = th.InverseRealVectorSHT(self.grid.nlat, self.grid.nlon, **kw).to(torch.float64)

        def to_grid(uspec: torch.Tensor) -> np.ndarray:
            # Spectral truncation is the exact band-limited projection of the solver's state.
            spec = uspec[:, :lmax, :lmax]
            phi = isht(spec[0])
            uv = ivsht(solver.invlap[:lmax, :lmax] * spec[1:] / solver.radius)
            return torch.cat([phi[None], uv]).numpy()

        self._to_grid = to_grid
        self._lmax = lmax

    @property
    def planet(self) -> Any:
        """The planet this source samples (built on first use; an ``ingest.planet.Planet``)."""
        self._ensure()
        return self._planet

    def project(self, uspec: object) -> np.ndarray:
        """Geopotential, u, v of a solver spectral state on this source's grid, as ``fetch`` samples it."""
        self._ensure()
        return self._to_grid(uspec)

    def band_limited(self, uspec: object) -> object:
        """The solver state with every degree this source's grid cannot show set to zero (what ``project`` keeps)."""
        self._ensure()
        out = uspec.clone()
        out[:, self._lmax:, :] = 0
        return out

    def sample_index(self, t: pd.Timestamp) -> int:
        """The planet's 6-hourly sample index of time ``t``; ValueError off that axis or before the epoch."""
        offset = (t - pd.Timestamp(self.settings.epoch)) / pd.Timedelta(hours=6)
        if offset < 0 or offset != int(offset):
            raise ConfigError(f"time {t} is not on the planet's 6-hourly axis starting {self.settings.epoch}")
        return int(offset)

    def fetch(self, times: Sequence[pd.Timestamp], variables: Sequence[str], levels: Sequence[int]) -> xr.Dataset:
        """Simulate (or continue) the planet to each time and sample it onto the grid."""
        for name in variables:
            get_variable(name)
            if name not in SYNTHETIC_VARIABLES:
                raise ConfigError(f"the synthetic planet has no {name!r}; it offers {', '.join(SYNTHETIC_VARIABLES)}")
        if list(levels) != [SYNTHETIC_LEVEL]:
            raise ConfigError(f"the synthetic planet has one level, {SYNTHETIC_LEVEL} hPa; asked for {list(levels)}")
        stamps = [pd.Timestamp(t) for t in times]
        indices = [self.sample_index(t) for t in stamps]
        self._ensure()
        fields = np.empty((len(stamps), 3, self.grid.nlat, self.grid.nlon), dtype=np.float32)
        for i in np.argsort(indices, kind="stable"):
            state = self._planet.state_at(indices[i])
            fields[i] = self._to_grid(state.uspec)
        data_vars = {}
        for k, name in enumerate(SYNTHETIC_VARIABLES):
            if name in variables:
                var = get_variable(name)
                data_vars[name] = (("time", "level", "latitude", "longitude"), fields[:, k, None],
                                   {"units": var.units, "long_name": var.long_name})
        ds = xr.Dataset(
            data_vars,
            coords={"time": np.array(stamps, dtype="datetime64[ns]"), "level": np.array([SYNTHETIC_LEVEL], np.int32),
                    "latitude": self.grid.latitudes, "longitude": self.grid.longitudes},
        )
        ds["expver"] = ("time", np.full(len(stamps), EXPVER_FINAL, dtype=np.int8))
        return ds


_PLANETS: dict[tuple[str, str], SyntheticSource] = {}


def shared_planet(grid: Grid, settings: SyntheticConfig) -> SyntheticSource:
    """The one planet per grid and settings in this process: every user continues the same simulation."""
    # A planet advanced to the newest time is minutes of simulation; an append that moves ingest.end, and
    # the live initial conditions sampling the same planet, continue it instead of spinning up again.
    key = (grid.describe(), settings.model_dump_json())
    if key not in _PLANETS:
        _PLANETS.clear()  # one planet's state is tens of MB; keep only the one in use
        _PLANETS[key] = SyntheticSource(grid, settings)
    return _PLANETS[key]
