"""Ensemble forecasts: seeded initial-condition perturbations plus the model's own stochastic residuals.

Member ``m`` starts from the analysis plus a smooth, global perturbation: spherical-harmonic noise
(independent Gaussian coefficients for degrees 1 … ``ic_lmax``, equal power per degree, synthesised
with torch-harmonics' ``InverseRealSHT`` on the run's grid), drawn independently per channel and
rescaled so that its area-weighted rms is exactly ``ic_scale`` × the channel's 6 h tendency std
(``diff_std`` from the checkpoint's stats). Each step then adds, per member, one residual drawn
from a :class:`models.noise.ResidualNoise` bank (the model's one-step errors on training windows)
times ``residual_scale``: the weather no analysis foresees, which an MSE-trained model averages away.

Member 0 is the unperturbed **control**: no initial perturbation and no residuals, so it is
bit-for-bit the deterministic forecast (as in operational ensembles). The ensemble then contains
the run a user would otherwise get, and ``members=1`` is exactly the deterministic path.

Everything random comes from generators seeded by ``(seed, init_time, member, purpose)``, so a
member's forecast depends only on those (not on how many members run beside it).

Output (``run_dir``): ``forecast.zarr`` with a ``member`` dimension (after ``lead_time``), written
lead by lead with all members of a lead computed as one batch, and ``ensemble.zarr``: ``<var>``
the ensemble mean and ``<var>_spread`` the standard deviation over members (``ddof=0``),
validated by :func:`core.schema.validate_ensemble_summary`. See docs/ensembles.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import dask.array
import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from core.config_ops import EnsembleConfig
from core.errors import ConfigError, DataContractError
from core.fields import from_channels
from core.forecast_files import write_formats
from core.grid import grid_for_shape, parse_grid_attr
from core.schema import validate_ensemble_summary, validate_forecast
from models.clock import clock_fields
from models.data import WindowDataset
from models.forecast import COORD_ATTRS, _to_dataset, initial_stack, stream_forecast, timed
from models.noise import ResidualNoise
from models.normalization import Normalized, Rollout
from models.poles import pole_masks, project_pole_rows

log = logging.getLogger(__name__)

CONTROL = 0  # the unperturbed member
FORECAST_STORE, SUMMARY_STORE = "forecast.zarr", "ensemble.zarr"
_IC, _RESIDUAL = 0, 1  # purposes: separate random streams, so changing one never moves the other
MEMBER_ATTRS = {"standard_name": "realization", "long_name": "ensemble member number (0 = unperturbed control)",
                "units": "1", "axis": "E"}


def member_generator(seed: int, init_time: datetime | str | pd.Timestamp, member: int, purpose: int) -> torch.Generator:
    """A CPU generator seeded only by ``(seed, init_time, member, purpose)``."""
    if seed < 0 or member < 0:
        raise ValueError(f"ensemble seed and member must be ≥ 0, got seed {seed}, member {member}")
    init_ns = int(pd.Timestamp(init_time).value) + (1 << 63)  # SeedSequence wants non-negative entropy
    state = np.random.SeedSequence([seed, init_ns, member, purpose]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def effective_lmax(nlat: int, nlon: int, ic_lmax: int) -> int:
    """``ic_lmax`` capped at what the grid resolves (degree < nlat and < nlon/2)."""
    return max(1, min(int(ic_lmax), nlat - 1, nlon // 2 - 1))


def sh_noise(nlat: int, nlon: int, lmax: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` fields ``(count, nlat, nlon)`` of unit area-weighted rms, band-limited to degrees 1 … ``lmax``."""
    from torch_harmonics import InverseRealSHT

    if lmax != effective_lmax(nlat, nlon, lmax):
        raise ConfigError(f"degree {lmax} is beyond what a {nlat}x{nlon} grid resolves")
    size = lmax + 1
    re = torch.randn(count, size, size, generator=generator, dtype=torch.float64)
    im = torch.randn(count, size, size, generator=generator, dtype=torch.float64)
    ell = torch.arange(size, dtype=torch.float64)[:, None]
    m = torch.arange(size)[None, :]
    # Degree 0 (a global offset) is left out; 1/√(2l+1) gives every degree the same power.
    amp = torch.where((m <= ell) & (ell >= 1), 1.0 / torch.sqrt(2 * ell + 1), torch.zeros(()))
    im = torch.where(m == 0, torch.zeros(()), im)  # m = 0 coefficients of a real field are real
    coeffs = torch.complex(re * amp, im * amp).to(torch.complex64)
    fields = InverseRealSHT(nlat, nlon, lmax=size, mmax=size, grid="equiangular", norm="ortho")(coeffs).double()
    return fields / area_rms(fields)[:, None, None]


def area_rms(fields: torch.Tensor) -> torch.Tensor:
    """Area-weighted root-mean-square over the last two (lat, lon) axes of ``fields``."""
    w = torch.from_numpy(grid_for_shape(*fields.shape[-2:]).weights).to(fields.dtype)
    w = w / w.sum()
    return (fields.pow(2).mean(dim=-1) * w).sum(dim=-1).sqrt()


def ic_perturbation(meta: Mapping[str, Any], nlat: int, nlon: int, ensemble: EnsembleConfig,
                    init_time: datetime | str | pd.Timestamp, member: int) -> torch.Tensor:
    """Member ``member``'s initial perturbation ``(channel, lat, lon)`` float32 (zeros for the control)."""
    diff_std = torch.as_tensor(meta["stats"]["diff_std"], dtype=torch.float64)
    if member == CONTROL or ensemble.ic_scale == 0:
        return torch.zeros(len(diff_std), nlat, nlon)
    gen = member_generator(ensemble.seed, init_time, member, _IC)
    noise = sh_noise(nlat, nlon, effective_lmax(nlat, nlon, ensemble.ic_lmax), len(diff_std), gen)
    perturbation = (noise * (ensemble.ic_scale * diff_std)[:, None, None]).float()
    if meta.get("pole_modes") is not None:  # scalar harmonics are constant on a pole row: not a wind's form there
        perturbation = project_pole_rows(perturbation, pole_masks(meta["pole_modes"]))
    return perturbation


def residual_bank(model: Normalized, meta: Mapping[str, Any], analysis: xr.Dataset, count: int = 512,
                  seed: int = 0, cache_dir: Path | None = None) -> ResidualNoise:
    """The model's one-step residuals on ``count`` windows of its stats period (training data), scale 1.

    With ``cache_dir`` the bank is kept there as ``residuals-<weights sha>-<grid>-<count>-<seed>.pt``
    (written atomically) and reused, so a scheduled cycle measures it once per checkpoint.
    """
    period = meta.get("stats_period")
    if not period:
        raise DataContractError("the checkpoint records no stats_period, so there are no known training windows "
                                "to measure its residuals on")
    nlat, nlon = analysis.sizes["latitude"], analysis.sizes["longitude"]
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / f"residuals-{str(meta['weights_sha256'])[:16]}-{nlat}x{nlon}-{count}-{seed}.pt"
        if cached.is_file():
            return ResidualNoise(torch.load(cached, weights_only=True), center=False)  # stored centred
    task = meta["task"]
    windows = WindowDataset(analysis, list(meta["channels"]), period[0], period[1], 1, int(task["time_step_hours"]),
                            int(task.get("history", 1)), task.get("time_features", []))
    bank = ResidualNoise.fit(model, windows, count=count, seed=seed)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        torch.save(bank.bank, tmp)
        os.replace(tmp, cached)
    return bank


class _Members(nn.Module):
    """One step of every member as a batch: the model, plus each non-control member's own residual."""

    def __init__(self, model: Normalized, bank: ResidualNoise | None, scale: float,
                 generators: Sequence[torch.Generator | None]) -> None:
        super().__init__()
        self.model, self.bank, self.scale, self.generators = model, bank, float(scale), list(generators)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.model(x)
        if self.bank is None or self.scale == 0:
            return new
        noise = torch.zeros_like(new)
        for i, gen in enumerate(self.generators):
            if gen is not None:
                noise[i] = self.bank.sample(1, gen)[0].to(new.device, new.dtype) * self.scale
        return new + noise

    def advance(self, x: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return self.model.advance(x, new)


@torch.no_grad()
def ensemble_states(model: Normalized, meta: Mapping[str, Any], analysis: xr.Dataset,
                    init_time: datetime | str | pd.Timestamp, lead_hours: int, ensemble: EnsembleConfig,
                    residual_bank: ResidualNoise | None = None) -> Iterator[np.ndarray]:
    """Each lead's states of all members ``(member, channel, lat, lon)`` float32, lead 0 first, as computed."""
    step_h = int(meta["task"]["time_step_hours"])
    if lead_hours < 0 or lead_hours % step_h:
        raise ConfigError(f"lead_hours {lead_hours} is not a non-negative multiple of the model step {step_h} h")
    n, channels = ensemble.members, list(meta["channels"])
    if ensemble.residual_scale > 0 and residual_bank is None and n > 1:
        raise ConfigError(f"forecast.ensemble.residual_scale is {ensemble.residual_scale} but no residual bank was "
                          "given: pass one (models.ensemble.residual_bank) or set residual_scale 0")
    nlat, nlon = analysis.sizes["latitude"], analysis.sizes["longitude"]
    if residual_bank is not None and tuple(residual_bank.bank.shape[1:]) != (len(channels), nlat, nlon):
        raise DataContractError(f"residual bank is {tuple(residual_bank.bank.shape[1:])} (channel, lat, lon), the forecast "
                                f"is {(len(channels), nlat, nlon)}: measure the bank on this grid and task")
    history = getattr(model, "history", 1)
    stack = torch.from_numpy(initial_stack(analysis, channels, init_time, history, step_h))
    perturb = torch.stack([ic_perturbation(meta, nlat, nlon, ensemble, init_time, m) for m in range(n)])
    # The same perturbation on every history state: the model's tendencies across its history stay the analysis's.
    x = stack[None] + perturb.repeat(1, history, 1, 1)
    features = getattr(model, "time_features", [])
    if features:
        clock = clock_fields([pd.Timestamp(init_time).to_datetime64()], features, nlat, nlon)
        x = torch.cat([x, clock.expand(n, -1, -1, -1)], dim=1)
    if parse_grid_attr(meta["grid"]).shape != (nlat, nlon):
        log.warning("analysis grid %dx%d differs from the training grid %s: running zero-shot", nlat, nlon, meta["grid"])
    if (nlat, nlon) != tuple(model.core.grid_shape):
        model.set_grid(nlat, nlon)
    model.eval()
    x = x.to(next(model.parameters()).device)
    gens = [None if m == CONTROL else member_generator(ensemble.seed, init_time, m, _RESIDUAL) for m in range(n)]
    yield model.latest(x).cpu().numpy().astype(np.float32)
    for k, state in enumerate(Rollout(_Members(model, residual_bank, ensemble.residual_scale, gens)).states(
            x, lead_hours // step_h), start=1):
        out = state.cpu().numpy().astype(np.float32)
        if not np.all(np.isfinite(out)):
            bad = sorted({int(i) for i in np.nonzero(~np.isfinite(out))[0]})
            raise FloatingPointError(f"ensemble from {init_time}: members {bad} became non-finite at lead "
                                     f"{k * step_h} h (of {lead_hours} h)")
        yield out


def stream_ensemble(model: Normalized, meta: Mapping[str, Any], analysis: xr.Dataset,
                    init_time: datetime | str | pd.Timestamp, lead_hours: int, run_dir: Path,
                    ensemble: EnsembleConfig, formats: Sequence[str] = ("netcdf", "grib2"),
                    residual_bank: ResidualNoise | None = None,
                    timings: dict[str, float] | None = None) -> xr.Dataset:
    """Write an ensemble run into ``run_dir`` lead by lead (members, mean and spread); return the member store.

    With ``members == 1`` this is the deterministic path (:func:`models.forecast.stream_forecast`) and
    the same files. Publication (manifest, rename) stays the caller's job. ``timings`` as in ``stream_forecast``.
    """
    if ensemble.members == 1:
        return stream_forecast(model, meta, analysis, init_time, lead_hours, run_dir, formats=formats, timings=timings)
    clock = timings if timings is not None else {}
    init = pd.Timestamp(init_time)
    step_h = int(meta["task"]["time_step_hours"])
    if lead_hours < 0 or lead_hours % step_h:
        raise ConfigError(f"lead_hours {lead_hours} is not a non-negative multiple of the model step {step_h} h")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    channels = list(meta["channels"])
    shape = (lead_hours // step_h + 1, len(channels), analysis.sizes["latitude"], analysis.sizes["longitude"])
    # Lazy zeros never computed: compute=False writes only the metadata and the coordinates.
    base = _to_dataset(dask.array.zeros(shape, chunks=(1, *shape[1:]), dtype=np.float32), meta, analysis, init, step_h)
    members = member_template(base, ensemble)
    summary = summary_template(base, ensemble)
    paths = {"members": run_dir / FORECAST_STORE, "summary": run_dir / SUMMARY_STORE}
    for name, template in (("members", members), ("summary", summary)):
        template.to_zarr(paths[name], mode="w", zarr_format=3, consolidated=False, encoding=_encoding(template),
                         compute=False)
    dims = ("init_time", "lead_time", "member", "channel", "latitude", "longitude")
    for k, states in enumerate(timed(ensemble_states(model, meta, analysis, init, lead_hours, ensemble, residual_bank),
                                     clock)):
        started = time.perf_counter()
        region = {"lead_time": slice(k, k + 1)}
        part = from_channels(xr.DataArray(states[None, None], dims=dims, coords={"channel": channels}), channels)
        part.drop_vars(list(part.coords)).to_zarr(paths["members"], region=region, consolidated=False)
        mean, spread = ensemble_mean_spread(states)
        stats = {}
        for label, values in (("", mean), ("_spread", spread)):
            ds = from_channels(xr.DataArray(values[None, None], dims=dims[:2] + dims[3:], coords={"channel": channels}),
                               channels)
            stats.update({f"{v}{label}": ds[v] for v in ds.data_vars})
        xr.Dataset(stats).drop_vars(list(part.coords)).to_zarr(paths["summary"], region=region, consolidated=False)
        clock["write"] = clock.get("write", 0.0) + time.perf_counter() - started
    started = time.perf_counter()
    forecast = validate_forecast(xr.open_zarr(paths["members"], consolidated=False), what=f"forecast store {paths['members']}")
    validate_ensemble_summary(xr.open_zarr(paths["summary"], consolidated=False),
                              what=f"ensemble summary {paths['summary']}")
    write_formats(forecast, run_dir, formats)
    clock["write"] = clock.get("write", 0.0) + time.perf_counter() - started
    return forecast


def ensemble_mean_spread(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (``ddof=0``) over the leading member axis, float32 (summed in float64)."""
    x = states.astype(np.float64)
    return x.mean(axis=0).astype(np.float32), x.std(axis=0).astype(np.float32)


def member_template(base: xr.Dataset, ensemble: EnsembleConfig) -> xr.Dataset:
    """``base`` (a one-member forecast layout) with a ``member`` dimension after ``lead_time`` and the settings."""
    ds = base.expand_dims(member=np.arange(ensemble.members, dtype=np.int32), axis=2)
    ds["member"].attrs = dict(MEMBER_ATTRS)
    ds.attrs = {**base.attrs, **ensemble_attrs(ensemble), "title": "spherecast SFNO ensemble forecast"}
    return validate_forecast(ds)


def summary_template(base: xr.Dataset, ensemble: EnsembleConfig) -> xr.Dataset:
    """``base`` as the ensemble mean, plus a ``<var>_spread`` (std over members) beside each variable."""
    ds = base.copy()
    for name in list(base.data_vars):
        attrs = dict(base[name].attrs)
        ds[name].attrs = {**attrs, "long_name": f"ensemble mean of {attrs['long_name']}",
                          "cell_methods": "realization: mean"}
        ds[f"{name}_spread"] = base[name].copy()
        ds[f"{name}_spread"].attrs = {**attrs, "long_name": f"ensemble standard deviation of {attrs['long_name']}",
                                      "cell_methods": "realization: standard_deviation"}
    ds.attrs = {**base.attrs, **ensemble_attrs(ensemble), "title": "spherecast SFNO ensemble mean and spread"}
    for name, attrs in COORD_ATTRS.items():
        if name in ds.coords:
            ds[name].attrs = dict(attrs)
    return validate_ensemble_summary(ds)


def ensemble_attrs(ensemble: EnsembleConfig) -> dict[str, Any]:
    """The ensemble's settings as root attributes (what makes the run reproducible)."""
    return {"ensemble_members": ensemble.members, "ensemble_seed": ensemble.seed,
            "ensemble_control_member": CONTROL, "ensemble_ic_scale": ensemble.ic_scale,
            "ensemble_ic_lmax": ensemble.ic_lmax, "ensemble_residual_scale": ensemble.residual_scale}


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """One chunk per (init, lead, member): a reader of one member's lead reads one chunk per variable."""
    return {str(name): {"chunks": tuple(1 if d in ("init_time", "lead_time", "member") else ds.sizes[d]
                                        for d in da.dims)} for name, da in ds.data_vars.items()}

