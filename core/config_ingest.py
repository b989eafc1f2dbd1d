"""The ``ingest`` section of the config: period, parallelism, store encoding and each source's settings."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from core.config_base import Moment, _Section
from core.errors import ConfigError

# What Dask's own comm layer connects to; an http:// address (a dashboard URL, a common mix-up) is refused.
_SCHEDULER_RE = re.compile(r"((tcp|tls|ucx)://)?[^\s/]+\Z|inproc://\S+\Z")


class SyntheticConfig(_Section):
    seed: int = 0
    """Seed of the planet's stirring (the same seed gives the same planet)."""
    solver_nlat: int = 65
    """Latitudes of the solver grid (the analysis is spectrally truncated from it)."""
    solver_nlon: int = 128
    """Longitudes of the solver grid."""
    dt_seconds: float = 180.0
    """Solver time step; keep ≤ 0.5·a/(c·lmax)."""
    spinup_days: float = 20.0
    """Days simulated before ``epoch`` so the flow is statistically steady."""
    epoch: Moment = datetime(2000, 1, 1)
    """Valid time of the first sample after spin-up (the planet's calendar starts here)."""


class CdsConfig(_Section):
    """How ERA5 is requested from the Copernicus Climate Data Store (credentials never live here)."""

    data_format: Literal["netcdf", "grib"] = "netcdf"
    """Delivery format asked of CDS; both decode to the same contract."""
    max_fields_per_request: int = 12_000
    """Cost limit of one request in fields (times × variables × levels); the planner splits above it."""
    retry_max: int = 5
    """Attempts per HTTP call before giving up (cdsapi's own default retries for hours)."""
    sleep_max: float = 30.0
    """Longest pause between retries and between job-status polls, in seconds."""
    timeout: float = 60.0
    """Seconds a single HTTP read may stall before it counts as a failed attempt."""
    download_dir: Path | None = None
    """Where deliveries land (temporary name, size-checked, then renamed); default ``<data>/downloads``."""
    keep_downloads: bool = False
    """Keep delivered files after their slab is written (for audits); off saves disk."""

    @model_validator(mode="after")
    def _limits(self) -> CdsConfig:
        if self.max_fields_per_request < 1 or self.retry_max < 1:
            raise ConfigError("ingest.cds.max_fields_per_request and retry_max must be ≥ 1")
        if self.sleep_max < 0 or self.timeout <= 0:
            raise ConfigError("ingest.cds.sleep_max must be ≥ 0 and timeout > 0")
        return self


class FilesConfig(_Section):
    """ERA5 files already on disk, as CDS delivers them."""

    paths: list[str] = []
    """Directories or glob patterns of GRIB (``.grib``/``.grb``) or NetCDF (``.nc``) files."""


class MirrorConfig(_Section):
    """An analysis-ready ERA5 Zarr (ARCO-ERA5 or WeatherBench2 layout) at any fsspec URL."""

    url: str = "gs://gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3"
    """fsspec URL or local path of the Zarr."""
    layout: Literal["arco", "wb2"] = "arco"
    """Naming/orientation convention of the mirror."""
    storage_options: dict[str, Any] = {}
    """Passed to fsspec (e.g. ``{"token": "anon"}``)."""


class IngestConfig(_Section):
    source: Literal["synthetic", "cds", "files", "zarr"] = "synthetic"
    """Where analysis data comes from: the shallow-water planet, CDS, local files or a Zarr mirror."""
    start: Moment = datetime(2000, 1, 1)
    """First analysis time of the store."""
    end: Moment = datetime(2000, 3, 31, 18)
    """Last analysis time of the store (an append extends it)."""
    slab_size: int = 4
    """Analysis times written per region write (one done flag each)."""
    workers: int = 1
    """Dask workers fetching/regridding/writing slabs in parallel (1 = in this process)."""
    scheduler_address: str | None = None
    """Address of an existing Dask scheduler (``tcp://host:8786``) to use instead of a LocalCluster; its workers
    must see ``paths`` at the same absolute paths (a shared filesystem)."""
    retries: int = 2
    """Prefect retries of a failed slab task (a retry re-fetches and rewrites that slab only)."""
    retry_delay_seconds: float = 10.0
    """Pause before a slab task's retry."""
    checksum: bool = True
    """Add a crc32c checksum to every data chunk so corruption is detected on read."""
    compression: Literal["zstd", "none"] = "zstd"
    """Compressor of data chunks."""
    recheck_days: int = 100
    """How far back the daily append re-fetches preliminary (ERA5T) times to replace them with final ERA5."""
    recheck_probe_oldest: bool = True
    """Re-fetch the oldest preliminary slab first and the rest only once it came back final: CDS publishes final
    ERA5 in time order, so on most days the re-check costs one slab instead of the 2–3 preliminary months."""
    cds: CdsConfig = CdsConfig()
    """CDS request settings (source ``cds``)."""
    files: FilesConfig = FilesConfig()
    """Local files (source ``files``)."""
    mirror: MirrorConfig = MirrorConfig()
    """Zarr mirror (source ``zarr``)."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """Settings of the shallow-water planet."""

    @model_validator(mode="after")
    def _period(self) -> IngestConfig:
        if self.end < self.start:
            raise ConfigError(f"ingest.end {self.end} is before ingest.start {self.start}")
        if self.slab_size < 1 or self.workers < 1:
            raise ConfigError("ingest.slab_size and ingest.workers must be ≥ 1")
        if self.recheck_days < 0 or self.retries < 0 or self.retry_delay_seconds < 0:
            raise ConfigError("ingest.recheck_days, ingest.retries and ingest.retry_delay_seconds must be ≥ 0")
        if self.scheduler_address and not _SCHEDULER_RE.match(self.scheduler_address):
            raise ConfigError(f"ingest.scheduler_address {self.scheduler_address!r} is not a Dask scheduler address: "
                              "use tcp://host:port (or tls://host:port), e.g. tcp://10.0.0.5:8786")
        if self.source == "files" and not self.files.paths:
            raise ConfigError("ingest.source is 'files' but ingest.files.paths is empty")
        return self
