"""A batch of map frames: jobs of (product, region) × all leads, in this process or in worker processes.

Each job ends with the animations of its product over its region: a looping GIF and an H.264 MP4,
one frame per lead, from the frames it just drew (no PNG is read back).

A job holds every lead of one (product, region), so a worker builds the figure and the pixel grid
once and reuses them for all frames. Workers get the fields as paths to ``.npy`` files they map
read-only (never a pickled xarray), start by ``forkserver`` (no inherited threads or locks), and
return the files they wrote with the CPU seconds they spent.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import imageio_ffmpeg
import numpy as np

from serve.cartopy_offline import offline_natural_earth
from serve.layout import animation_relpath, map_relpath
from serve.products import Product
from serve.regions import Region
from serve.render import MapRenderer

FRAME_SECONDS = 0.5
"""Each lead shows for half a second: 41 leads of a 10-day run play in 20 s."""


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad to even width and height with white (H.264 in yuv420p needs both even)."""
    h, w, _ = frame.shape
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)


def write_gif(path: Path, frames: Sequence[np.ndarray]) -> Path:
    """An endlessly looping GIF of RGB frames, written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=int(FRAME_SECONDS * 1000), loop=0)
    os.replace(tmp, path)
    return path


def write_mp4(path: Path, frames: Sequence[np.ndarray]) -> Path:
    """An H.264 MP4 (yuv420p, plays in browsers) of RGB frames, written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    first = _even(frames[0])
    writer = imageio_ffmpeg.write_frames(str(tmp), (first.shape[1], first.shape[0]), fps=1 / FRAME_SECONDS,
                                         codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1,
                                         ffmpeg_log_level="error", output_params=["-threads", "1"])
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(_even(frame)))
    writer.close()
    os.replace(tmp, path)
    return path


@dataclass
class Job:
    """Every lead of one product over one region."""

    product: Product
    region: Region
    lat: np.ndarray
    lon: np.ndarray
    arrays: dict[str, np.ndarray | str]
    """Channel → (lead, lat, lon) array, or the path of a ``.npy`` file holding it."""
    leads: list[int]
    titles: list[str]
    stage: Path
    dpi: int
    natural_earth_dir: Path | None
    earth: bool
    attribution: str
    animations: bool


@dataclass
class JobResult:
    """Run-relative paths a job wrote and the CPU seconds it took."""

    relpaths: list[str]
    cpu_s: float
    frames: int


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def run_job(job: Job) -> JobResult:
    """Render one job's frames (and animations) into its staging directory."""
    began = time.process_time()
    arrays = {ch: np.load(a, mmap_mode="r") if isinstance(a, str) else a for ch, a in job.arrays.items()}
    written: list[str] = []
    frames: list[np.ndarray] = []
    with offline_natural_earth(job.natural_earth_dir):
        renderer = MapRenderer(job.product, job.region, job.lat, job.lon, job.dpi, earth=job.earth,
                               attribution=job.attribution)
    try:
        for i, lead in enumerate(job.leads):
            fields = {ch: np.asarray(a[i]) for ch, a in arrays.items()}
            png, rgb = renderer.render(fields, job.titles[i])
            rel = map_relpath(job.product.name, job.region.name, lead)
            _write(job.stage / rel, png)
            written.append(rel)
            if job.animations:
                frames.append(rgb)
    finally:
        renderer.close()
    if frames:
        for fmt, writer in (("gif", write_gif), ("mp4", write_mp4)):
            rel = animation_relpath(job.product.name, job.region.name, fmt)
            writer(job.stage / rel, frames)
            written.append(rel)
    return JobResult(written, time.process_time() - began, len(job.leads))


def spill_arrays(arrays: dict[str, np.ndarray], directory: Path) -> dict[str, str]:
    """Write each channel to ``<directory>/<channel>.npy`` for workers to map; channel → path."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for channel, values in arrays.items():
        path = directory / f"{channel}.npy"
        np.save(path, np.ascontiguousarray(values, dtype=np.float32))
        out[channel] = str(path)
    return out


def run_jobs(jobs: Sequence[Job], workers: int, on_done: Callable[[JobResult], None]) -> float:
    """Run jobs (in ``workers`` forkserver processes if > 1); CPU seconds of all workers together."""
    if workers <= 1 or len(jobs) <= 1:
        total = 0.0
        for job in jobs:
            result = run_job(job)
            total += result.cpu_s
            on_done(result)
        return total
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    # Biggest jobs first keeps the tail short when jobs outnumber workers unevenly.
    order = sorted(jobs, key=lambda j: -np.prod(j.region.figsize) * len(j.leads))
    total = 0.0
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                             initializer=_quiet_worker) as pool:
        pending = {pool.submit(run_job, job) for job in order}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()
                    total += result.cpu_s
                    on_done(result)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return total


def _quiet_worker() -> None:
    # One render per core: BLAS or numexpr threads inside a worker would only oversubscribe.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
