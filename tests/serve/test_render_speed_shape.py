"""The renderer's cost shape: figures and projections per (product, region), never per frame."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cartopy.crs as ccrs
import pytest

import serve.render as render
from serve.maps import render_run_maps
from tests.serve.conftest import make_forecast


def counted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, leads: int) -> Counter:
    """Render 2 products × 2 regions × ``leads`` in this process; count the expensive calls."""
    calls: Counter = Counter()
    with monkeypatch.context() as mp:
        mp.setattr(render, "_PIXEL_GRIDS", {})

        def spy(name: str, real: object) -> object:
            def wrapper(*args: object, **kwargs: object) -> object:
                calls[name] += 1
                return real(*args, **kwargs)  # type: ignore[operator]
            return wrapper

        mp.setattr(render, "pixel_grid", spy("pixel_grid", render.pixel_grid))
        mp.setattr(render, "Figure", spy("figure", render.Figure))
        mp.setattr(ccrs.CRS, "transform_points", spy("transform_points", ccrs.CRS.transform_points))
        mp.setattr(render.Axes, "imshow", spy("imshow", render.Axes.imshow))
        mp.setattr(render.MapRenderer, "prepare", spy("frames", render.MapRenderer.prepare))
        written = render_run_maps(make_forecast(leads=leads), tmp_path / str(leads), dpi=30,
                                  regions=["global", "europe"], animations=False)
        assert len(written) == 2 * 2 * leads
    return calls


def test_projection_and_figures_are_built_once_not_per_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = counted_run(tmp_path, monkeypatch, leads=1)
    four = counted_run(tmp_path, monkeypatch, leads=4)
    assert one["frames"] == 4 and four["frames"] == 16
    # One pixel grid per region, shared by both products; one figure and one image per (product, region).
    assert one["pixel_grid"] == four["pixel_grid"] == 2
    assert one["figure"] == four["figure"] == 4
    assert one["imshow"] == four["imshow"] == 4
    # No reprojection per frame: four times the frames, the same number of coordinate transforms.
    assert four["transform_points"] == one["transform_points"] > 0
