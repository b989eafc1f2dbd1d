"""The embedded default truth: a forced-dissipative rotating shallow-water planet.

Built on torch-harmonics' spectral shallow-water solver (``ShallowWaterSolver``: state is the
spectral geopotential φ, vorticity ζ and divergence δ). Forcing that keeps it weather-like and
statistically steady (DESIGN §4):

* φ relaxes (τ = 3 days) toward the balanced state of a zonal jet in each hemisphere, Gaussian in
  |latitude| (width 12°, 45 m/s) around 45° that moves ±10° with the season;
* linear drag on ζ and δ (τ = 15 days);
* once per 6 h, a random vorticity kick in total degrees 8–16 (6e-7 s⁻¹ per coefficient,
  m = 0 coefficients real), drawn from ``default_rng([seed, sample index])`` so any segment of
  the planet is reproducible without replaying the random stream.

Relaxation and drag sit *inside* the tendency of the 3rd-order Adams–Bashforth step, and the
AB3 history is carried across 6-hour segments: restarting the scheme with forward Euler on every
call (what ``solver.timestep(u, 1)`` in a loop does) blows up.

torch is imported lazily so ``ingest`` stays light for everything but the synthetic world.

The solver runs with denormal floats flushed to zero: the Gaussian jets' tails seed float64
coefficients near 1e-308, and on some CPUs (AMD EPYC here) every operation on them is ~200× slower —
a 6-hour step took 32 s instead of 0.15 s until the flow had filled them in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from core.errors import ConfigError

log = logging.getLogger(__name__)

DAY = 86400.0
SAMPLE_SECONDS = 6 * 3600.0
MEAN_DEPTH = 5600.0
GRAVITY = 9.80616
JET_SPEED, JET_WIDTH_DEG, JET_LAT_DEG, JET_SWING_DEG = 45.0, 12.0, 45.0, 10.0
TAU_RELAX, TAU_DRAG = 3 * DAY, 15 * DAY
STIR_AMPLITUDE, STIR_LMIN, STIR_LMAX = 6e-7, 8, 16
YEAR_DAYS = 365.25


@contextmanager
def flushing_denormals() -> Iterator[None]:
    """Flush denormal floats to zero inside the block (torch's default, off, is restored after)."""
    import torch

    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@dataclass
class PlanetState:
    """Spectral state plus the Adams–Bashforth history needed to continue exactly."""

    sample: int  # index of the 6-hourly sample this state is valid at (0 = epoch)
    uspec: object  # torch complex tensor (3, lmax, mmax)
    history: list = field(default_factory=list)  # up to two previous tendencies, newest first


class Planet:
    """A seeded, continuous shallow-water planet sampled every 6 hours."""

    def __init__(self, seed: int = 0, nlat: int = 65, nlon: int = 128, dt: float = 180.0,
                 spinup_days: float = 20.0, epoch: datetime = datetime(2000, 1, 1)) -> None:
        import torch
        from torch_harmonics.examples.shallow_water_equations import ShallowWaterSolver

        if SAMPLE_SECONDS % dt:
            raise ConfigError(f"solver dt={dt}s must divide 6 h exactly")
        self.seed, self.epoch, self.spinup_days = seed, epoch, spinup_days
        self.steps_per_sample = int(SAMPLE_SECONDS // dt)
        self._torch = torch
        # lmax given explicitly: the same truncation torch-harmonics defaults to, without its warning.
        lmax = (nlat + 1) // 2
        self.solver = ShallowWaterSolver(nlat, nlon, dt, lmax=lmax, mmax=lmax, grid="equiangular", havg=MEAN_DEPTH, hamp=0.0)
        self.solver = self.solver.to(torch.float64)
        s = self.solver
        self.lat = s.lats.reshape(-1, 1)
        ell = torch.arange(s.lmax, dtype=torch.float64).reshape(-1, 1)
        mm = torch.arange(s.mmax, dtype=torch.float64).reshape(1, -1)
        self._stir_mask = ((ell >= STIR_LMIN) & (ell <= STIR_LMAX) & (mm <= ell)).to(torch.complex128)
        self._state: PlanetState | None = None

    # -- forcing -----------------------------------------------------------------------------
    def _jet_center(self, sample: float) -> float:
        """Jet latitude (deg) at a sample index: poleward in local summer."""
        days = self.epoch.timetuple().tm_yday - 1 + sample * SAMPLE_SECONDS / DAY
        return JET_LAT_DEG + JET_SWING_DEG * math.sin(2 * math.pi * (days - 80) / YEAR_DAYS)

    def _balanced_phi(self, sample: float):
        """Spectral geopotential in gradient-wind balance with the seasonal double jet."""
        torch, s = self._torch, self.solver
        lat_deg = torch.rad2deg(self.lat).expand(s.nlat, s.nlon)
        north = self._jet_center(sample)
        south = JET_LAT_DEG + (JET_LAT_DEG - north)  # opposite season in the other hemisphere
        centre = torch.where(lat_deg >= 0, torch.full_like(lat_deg, north), torch.full_like(lat_deg, south))
        u = JET_SPEED * torch.exp(-(((lat_deg.abs() - centre) / JET_WIDTH_DEG) ** 2))
        uv = torch.stack((u, torch.zeros_like(u)))
        vrtdiv = s.vrtdivspec(uv)
        vrt = s.spec2grid(vrtdiv)[0]
        tmp = s.vrtdivspec(uv * (vrt + s.coriolis))
        ke = s.grid2spec(0.5 * (uv**2).sum(0))
        return s.invlap * tmp[0] - ke + s.grid2spec(torch.full_like(u, GRAVITY * MEAN_DEPTH))

    def _tendency(self, uspec, phi_eq):
        d = self.solver.dudtspec(uspec)
        d[0] = d[0] - (uspec[0] - phi_eq) / TAU_RELAX
        d[1:] = d[1:] - uspec[1:] / TAU_DRAG
        return d

    def _stir(self, sample: int, seed: int | None = None):
        torch = self._torch
        rng = np.random.default_rng([self.seed if seed is None else seed, sample + 1_000_000])
        shape = tuple(self._stir_mask.shape)
        re, im = rng.standard_normal(shape), rng.standard_normal(shape)
        im[:, 0] = 0.0  # m = 0 coefficients of a real field are real
        kick = torch.complex(torch.from_numpy(re), torch.from_numpy(im)) * STIR_AMPLITUDE
        return kick * self._stir_mask

    # -- integration ---------------------------------------------------------------------------
    def _advance(self, state: PlanetState, kick=None) -> PlanetState:
        """Integrate one 6-hour segment (stir, then AB3 steps) and return the next sample.

        ``kick`` replaces this planet's own stirring (a vorticity increment; zeros for none).
        """
        s = self.solver
        uspec = state.uspec.clone()
        uspec[1] = uspec[1] + (self._stir(state.sample) if kick is None else kick)
        phi_eq = self._balanced_phi(state.sample + 0.5)
        hist = list(state.history)
        for _ in range(self.steps_per_sample):
            d = self._tendency(uspec, phi_eq)
            if len(hist) == 0:
                incr = d
            elif len(hist) == 1:
                incr = 1.5 * d - 0.5 * hist[0]
            else:
                incr = (23.0 * d - 16.0 * hist[0] + 5.0 * hist[1]) / 12.0
            uspec = uspec + s.dt * incr
            uspec[1:] = s.hyperdiff * uspec[1:]
            hist = [d] + hist[:1]
        if not bool(self._torch.isfinite(uspec).all()):
            raise FloatingPointError(f"planet blew up at sample {state.sample + 1}; reduce the solver dt")
        return PlanetState(state.sample + 1, uspec, hist)

    def _initial(self) -> PlanetState:
        """Spun-up state at sample 0: balanced jets plus small seeded noise, run ``spinup_days``."""
        torch, s = self._torch, self.solver
        n_spin = int(round(self.spinup_days * DAY / SAMPLE_SECONDS))
        uspec = torch.zeros(3, s.lmax, s.mmax, dtype=torch.complex128)
        uspec[0] = self._balanced_phi(-n_spin)
        lat_deg = torch.rad2deg(self.lat).expand(s.nlat, s.nlon)
        u = JET_SPEED * torch.exp(-(((lat_deg.abs() - JET_LAT_DEG) / JET_WIDTH_DEG) ** 2))
        uspec[1:] = s.vrtdivspec(torch.stack((u, torch.zeros_like(u))))
        uspec[2] = 0.0
        state = PlanetState(-n_spin, torch.tril(uspec), [])
        for _ in range(n_spin):
            state = self._advance(state)
        return state

    def state_at(self, sample: int) -> PlanetState:
        """The state at a sample index ≥ 0, continuing from the cached state when possible."""
        if sample < 0:
            raise ConfigError(f"sample {sample} is before the planet's epoch {self.epoch}")
        with flushing_denormals():
            if self._state is None or self._state.sample > sample:
                log.info("spinning up the planet (%.0f days, seed %d)", self.spinup_days, self.seed)
                self._state = self._initial()
            while self._state.sample < sample:
                self._state = self._advance(self._state)
        return self._state

    def forecast_step(self, state: PlanetState, stir_seed: int | None) -> PlanetState:
        """One 6-hour segment from ``state`` stirred as a planet of ``stir_seed`` would be (None: unstirred)."""
        if stir_seed == self.seed:
            raise ConfigError(f"stir_seed {stir_seed} is the planet's own seed: that is the truth, not a forecast")
        kick = self._torch.zeros_like(self._stir_mask) if stir_seed is None else self._stir(state.sample, stir_seed)
        with flushing_denormals():
            return self._advance(state, kick)

    def solver_fields(self, state: PlanetState) -> np.ndarray:
        """Geopotential, u, v on the solver grid, shape (3, nlat, nlon), float64."""
        return self.solver.gethuv(state.uspec).numpy()

    def energy(self, state: PlanetState) -> tuple[float, float]:
        """Area-mean kinetic energy and its eddy (non-zonal) part, in m²/s²."""
        f = self.solver_fields(state)
        ke = 0.5 * (f[1] ** 2 + f[2] ** 2)
        zonal = 0.5 * (f[1].mean(1, keepdims=True) ** 2 + f[2].mean(1, keepdims=True) ** 2)
        w = self.solver.quad_weights.numpy().reshape(-1, 1) / 2.0
        return float((ke.mean(1, keepdims=True) * w).sum()), float(((ke - zonal).mean(1, keepdims=True) * w).sum())
