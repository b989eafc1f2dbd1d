"""Map rendering speed: serve.render (figure reused, grid projected once) vs a naive cartopy loop.

Per frame at 0.25° (721 × 1440) for the products z500_t850, mslp, t2m, wind10m and wind500 on the
global PlateCarree map, at the same figure size and dpi:

* ours: one :class:`serve.render.MapRenderer` per product, built once (setup timed separately),
  then gather + imshow + contours/barbs + PNG per frame;
* naive: per frame ``plt.figure`` + GeoAxes + ``pcolormesh(transform=PlateCarree())`` (+ the same
  contours / barbs through cartopy's transform) + coastlines + colorbar + ``savefig``.

Then the batch of a 10-day run (41 leads × those products × the regions, animations included) with
every core through :func:`serve.maps.render_run_maps`, with its CPU utilisation.

Usage: python benches/render.py [--quick] [--frames 4] [--regions global,europe] [--no-batch | --batch-only]
``--quick`` runs at 1.5° (121 × 240) with fewer frames.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path and "serve" would name benches/serve.py, not the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cartopy.crs as ccrs  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from serve.cartopy_offline import offline_natural_earth  # noqa: E402
from serve.maps import render_run_maps  # noqa: E402
from serve.products import products_for  # noqa: E402
from serve.regions import REGIONS  # noqa: E402
from serve.render import MapRenderer  # noqa: E402

PRODUCTS = ["z500_t850", "mslp", "t2m", "wind10m", "wind500"]
CHANNELS = ["geopotential_500", "temperature_850", "mean_sea_level_pressure", "2m_temperature",
            "10m_u_component_of_wind", "10m_v_component_of_wind", "u_component_of_wind_500", "v_component_of_wind_500"]
DPI = 80


def grid(step: float) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes (90 → -90, poles included) and longitudes (0 → 360 - step) of an equiangular grid."""
    return np.linspace(90, -90, int(round(180 / step)) + 1), np.arange(0, 360, step)


def fields(lat: np.ndarray, lon: np.ndarray, t: int) -> dict[str, np.ndarray]:
    """Smooth realistic-range fields at lead index t (travelling waves plus small-scale texture)."""
    la, lo = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    wave = (np.cos(la) * np.cos(5 * lo + 0.15 * t) + 0.2 * np.sin(3 * la) * np.sin(17 * lo - 0.3 * t))
    pole = np.cos(la) + 0 * lo
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return {
        "geopotential_500": f32(98.0665 * (520 + 50 * pole + 12 * wave)),
        "temperature_850": f32(250 + 40 * pole + 6 * wave),
        "mean_sea_level_pressure": f32(101300 + 1800 * wave),
        "2m_temperature": f32(250 + 45 * pole + 5 * wave),
        "10m_u_component_of_wind": f32(9 * wave),
        "10m_v_component_of_wind": f32(-7 * np.roll(wave, 40, axis=1)),
        "u_component_of_wind_500": f32(30 * wave + 10 * pole),
        "v_component_of_wind_500": f32(20 * np.roll(wave, 40, axis=1)),
    }


def naive_frame(product: object, data: dict[str, np.ndarray], lat: np.ndarray, lon: np.ndarray) -> bytes:
    """The straightforward way: a new pyplot figure, cartopy pcolormesh with transform, savefig."""
    from matplotlib.colors import BoundaryNorm

    p = product
    fig = plt.figure(figsize=REGIONS["global"].figsize, dpi=DPI)
    ax = fig.add_axes((0.02, 0.2, 0.96, 0.73), projection=ccrs.PlateCarree())
    pc = ccrs.PlateCarree()
    if p.speed:
        shade = p.convert(np.hypot(data[p.shade[0]], data[p.shade[1]]))
    else:
        shade = p.convert(data[p.shade[0]])
    cmap = plt.get_cmap(p.cmap)
    mesh = ax.pcolormesh(lon, lat, shade, transform=pc, cmap=cmap, norm=BoundaryNorm(p.levels, cmap.N, extend="both"))
    if p.contour:
        ax.contour(lon, lat, p.contour_convert(data[p.contour]), levels=list(p.contour_levels), colors="black",
                   linewidths=0.7, transform=pc)
    if p.barbs:
        k = max(1, lon.size // 22)
        ax.barbs(lon[::k], lat[::k], data[p.barbs[0]][::k, ::k] * 1.94, data[p.barbs[1]][::k, ::k] * 1.94,
                 length=4.2, linewidth=0.45, transform=pc)
    ax.coastlines(resolution="110m", linewidth=0.6)
    ax.set_global()
    fig.colorbar(mesh, cax=fig.add_axes((0.2, 0.12, 0.6, 0.03)), orientation="horizontal")
    ax.set_title(p.title, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def per_frame(step: float, frames: int) -> list[dict[str, float]]:
    """ms per frame of ours and naive for each product (mean over ``frames`` leads)."""
    lat, lon = grid(step)
    data = [fields(lat, lon, t) for t in range(frames)]
    rows = []
    with offline_natural_earth():
        for product in products_for(CHANNELS, PRODUCTS):
            began = time.perf_counter()
            renderer = MapRenderer(product, REGIONS["global"], lat, lon, DPI, attribution="bench")
            setup = time.perf_counter() - began
            renderer.render(data[0], "warm-up")
            ours = []
            for t in range(frames):
                began = time.perf_counter()
                renderer.render(data[t], f"{product.title} +{6 * t}h")
                ours.append(time.perf_counter() - began)
            renderer.close()
            naive_frame(product, data[0], lat, lon)  # warm-up: cartopy's caches, fonts
            naive = []
            for t in range(frames):
                began = time.perf_counter()
                naive_frame(product, data[t], lat, lon)
                naive.append(time.perf_counter() - began)
            rows.append({"product": product.name, "setup_ms": 1000 * setup, "ours_ms": 1000 * statistics.mean(ours),
                         "naive_ms": 1000 * statistics.mean(naive)})
            print(f"{product.name:10s} ours {rows[-1]['ours_ms']:7.1f} ms/frame (setup {rows[-1]['setup_ms']:6.0f} ms)"
                  f"   naive {rows[-1]['naive_ms']:8.1f} ms/frame   speedup {rows[-1]['naive_ms'] / rows[-1]['ours_ms']:5.1f}×",
                  flush=True)
    return rows


def forecast(step: float, leads: int) -> xr.Dataset:
    """A forecast dataset (init_time, lead_time, [level,] lat, lon) of the bench fields."""
    lat, lon = grid(step)
    per = [fields(lat, lon, t) for t in range(leads)]
    init = np.datetime64("2024-01-01T00", "ns")
    lead = np.arange(leads) * np.timedelta64(6, "h").astype("timedelta64[ns]")
    dims = ("init_time", "lead_time", "latitude", "longitude")
    pdims = ("init_time", "lead_time", "level", "latitude", "longitude")
    out: dict[str, tuple] = {}
    for ch in CHANNELS:
        name, _, level = ch.rpartition("_")
        stack = np.stack([p[ch] for p in per])[None]
        if level.isdigit():
            out.setdefault(name, {})[int(level)] = stack  # type: ignore[index]
        else:
            out[ch] = (dims, stack)
    for name in ("geopotential", "temperature", "u_component_of_wind", "v_component_of_wind"):
        levels = out.pop(name)
        both = [levels.get(lv, np.full_like(next(iter(levels.values())), np.nan)) for lv in (500, 850)]
        out[name] = (pdims, np.stack(both, axis=2))
    ds = xr.Dataset(out, coords={"init_time": [init], "lead_time": lead, "level": [500, 850],
                                 "latitude": lat, "longitude": lon},
                    attrs={"dataset_version": "era5-files-bench"})
    return ds.assign_coords(valid_time=(("init_time", "lead_time"), (init + lead)[None, :]))


def batch(step: float, leads: int, regions: list[str]) -> dict[str, float]:
    """The whole run with every core: frames, wall, CPU and utilisation."""
    ds = forecast(step, leads)
    stats: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        render_run_maps(ds, Path(tmp), dpi=DPI, products=PRODUCTS, regions=regions, workers=0, progress=True,
                        stats=stats)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1.5° instead of 0.25°, fewer frames and leads")
    parser.add_argument("--frames", type=int, default=None, help="timed frames per product (default 4, quick 3)")
    parser.add_argument("--regions", default=",".join(REGIONS), help="regions of the batch (comma-separated)")
    parser.add_argument("--leads", type=int, default=None, help="leads of the batch (default 41: 10 days)")
    parser.add_argument("--no-batch", action="store_true", help="per-frame comparison only")
    parser.add_argument("--batch-only", action="store_true", help="the run batch only, no per-frame comparison")
    args = parser.parse_args()
    step = 1.5 if args.quick else 0.25
    frames = args.frames or (3 if args.quick else 4)
    leads = args.leads or (9 if args.quick else 41)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"matplotlib {matplotlib.__version__}; grid {step}° ({int(180 / step) + 1}×{int(360 / step)}), "
          f"{REGIONS['global'].figsize[0]}×{REGIONS['global'].figsize[1]} in at {DPI} dpi")
    if not args.batch_only:
        rows = per_frame(step, frames)
        ours = sum(r["ours_ms"] for r in rows) / len(rows)
        naive = sum(r["naive_ms"] for r in rows) / len(rows)
        print(f"mean over products: ours {ours:.1f} ms/frame, naive {naive:.1f} ms/frame, speedup {naive / ours:.1f}×")
    if not args.no_batch:
        regions = [r for r in args.regions.split(",") if r]
        s = batch(step, leads, regions)
        print(f"batch: {int(s['frames'])} frames ({len(PRODUCTS)} products × {len(regions)} regions × {leads} leads) "
              f"+ {len(PRODUCTS) * len(regions)} GIF+MP4 in {s['wall_s']:.1f} s wall, {s['cpu_s']:.1f} CPU s on "
              f"{int(s['workers'])} workers: {1000 * s['wall_s'] / s['frames']:.1f} ms wall per frame, "
              f"CPU utilisation {100 * s['utilisation']:.0f}% of {int(s['cores'])} cores")
    print(pd.Timestamp.now(tz="UTC").isoformat())


if __name__ == "__main__":
    main()
