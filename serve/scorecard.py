"""Scorecard PNGs: a channel × lead grid of the model's skill against persistence and climatology.

Each panel colours a cell by the model's RMSE improvement over a reference,
``100 · (1 − RMSE_model / RMSE_reference)`` % (blue: the model is better, red: worse, white:
equal) and prints the number in it; a third panel shows the model's ACC where a climatology
gave one. The same drawing serves one run (its ``scores.json`` payload) and the aggregate over
the newest runs (``aggregate.json``). Like :mod:`serve.maps`, figures are plain Agg figures,
never pyplot, and are written to a temporary name and renamed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from core.errors import DataContractError
from core.verify_runs import scorecard_grid

SKILL_LIMIT = 50.0  # % beyond which the colour saturates
_PNG_METADATA = {"Software": None}


def rmse_skill(model: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``100 · (1 − model / reference)`` where the reference error is positive, NaN elsewhere."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(reference > 0, 100.0 * (1.0 - model / reference), np.nan)


def _panel(fig: Figure, ax: Any, values: np.ndarray, channels: list[str], hours: list[int], title: str,
           norm: Normalize, cmap: str, fmt: str) -> None:
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(hours)), [f"{h}h" for h in hours], fontsize=7)
    ax.set_yticks(range(len(channels)), channels, fontsize=7)
    ax.set_title(title, fontsize=9)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = "–" if not np.isfinite(v) else fmt.format(v)
            dark = np.isfinite(v) and abs(norm(v) - 0.5) > 0.35
            ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)


def render_scorecard(payload: dict[str, Any], path: Path, title: str | None = None, dpi: int = 100) -> Path:
    """Draw the scorecard of a run's or an aggregate's score payload to the PNG ``path``."""
    channels, hours, rmse = scorecard_grid(payload, "rmse")
    if not channels or not hours or "model" not in rmse:
        raise DataContractError("the score payload has no model RMSE to draw a scorecard from")
    _, _, acc = scorecard_grid(payload, "acc")
    panels = []
    for ref in ("persistence", "climatology"):
        if ref in rmse:
            panels.append((rmse_skill(rmse["model"], rmse[ref]), f"RMSE skill vs {ref} (%)",
                           Normalize(-SKILL_LIMIT, SKILL_LIMIT), "RdBu", "{:+.0f}"))
    if "model" in acc:
        panels.append((acc["model"], "model ACC", Normalize(-1.0, 1.0), "RdBu", "{:.2f}"))
    width = max(6.0, 1.2 + 0.45 * len(hours))
    fig = Figure(figsize=(width, 0.9 + len(panels) * (0.7 + 0.32 * len(channels))), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (values, label, norm, cmap, fmt) in zip(axes, panels, strict=True):
        _panel(fig, ax, values, channels, hours, label, norm, cmap, fmt)
    if title is None:
        title = (f"run {payload['run']} (init {payload['init_time']})" if "run" in payload
                 else f"mean of {len(payload.get('runs', []))} runs")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi, metadata=_PNG_METADATA)
    os.replace(tmp, path)
    return path
