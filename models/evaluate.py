"""Validation: area-weighted RMSE per channel of the model and of persistence at fixed leads.

Errors are accumulated as area-weighted mean squared errors per window and channel, summed over
windows (and ranks), and reported as ``sqrt(mean MSE)``. The relative error of DESIGN §4 divides
each RMSE by the RMS of the truth's anomaly from a climatology (the training-period time mean),
averaged over channels, so that climatology scores 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from core.errors import MissingInputError
from models.data import WindowDataset
from models.distributed import DistContext, all_reduce_sum
from models.losses import latitude_weights
from models.normalization import Normalized, Rollout
from models.zarr_windows import ZarrWindowDataset

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def area_mse(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(batch, channel)`` area-weighted MSE summed over the batch → ``(channel,)``."""
    return ((a - b).pow(2).mean(dim=-1) * w).sum(dim=-1).sum(dim=0)


@torch.no_grad()
def rollout_states(model: Normalized, x0: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """States after 1 … ``steps`` autoregressive model steps from the input stack ``x0``."""
    return list(Rollout(model)(x0, steps).unbind(1))


@torch.no_grad()
def evaluate(model: Normalized, dataset: WindowDataset | ZarrWindowDataset, lead_steps: list[int], time_step_hours: int,
             climatology: torch.Tensor, ctx: DistContext = SINGLE, batch_size: int = 16,
             score: str = "longest", stride: int = 1) -> dict[str, Any]:
    """RMSE per channel of model, persistence and climatology at ``lead_steps`` over every ``stride``-th window."""
    if score not in ("longest", "mean"):
        raise ValueError(f"score {score!r} must be 'longest' or 'mean'")
    if stride < 1:
        raise ValueError(f"stride {stride} must be ≥ 1")
    if max(lead_steps) > dataset.steps:
        raise ValueError(f"lead of {max(lead_steps)} steps needs windows of that many steps, have {dataset.steps}")
    was_training = model.training
    model.eval()
    device = ctx.device
    w = latitude_weights(dataset.grid_shape[0]).to(device)
    clim = climatology.to(device)
    nch = len(dataset.channels)
    sums = torch.zeros(3, len(lead_steps), nch, dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    mine = list(range(0, len(dataset), stride))[ctx.rank::ctx.world_size]  # each rank scores its own share
    for start in range(0, len(mine), batch_size):
        items = [dataset[i] for i in mine[start:start + batch_size]]
        x0 = torch.stack([it[0] for it in items]).to(device)
        y = torch.stack([it[1] for it in items]).to(device)
        states = rollout_states(model, x0, max(lead_steps))
        now = model.latest(x0) if hasattr(model, "latest") else x0  # persistence keeps the latest input state
        for j, k in enumerate(lead_steps):
            truth = y[:, k - 1]
            sums[0, j] += area_mse(states[k - 1], truth, w).double()
            sums[1, j] += area_mse(now, truth, w).double()
            sums[2, j] += area_mse(clim.expand_as(truth), truth, w).double()
        count += len(items)
    all_reduce_sum(sums, ctx)
    all_reduce_sum(count, ctx)
    if was_training:
        model.train()
    if count.item() == 0:
        raise MissingInputError("no validation windows to evaluate")
    rmse = (sums / count).sqrt().cpu()
    out: dict[str, Any] = {"windows": int(count.item()), "rmse": {}, "persistence_rmse": {}, "relative_error": {}}
    for j, k in enumerate(lead_steps):
        lead = f"{k * time_step_hours}h"
        out["rmse"][lead] = dict(zip(dataset.channels, rmse[0, j].tolist(), strict=True))
        out["persistence_rmse"][lead] = dict(zip(dataset.channels, rmse[1, j].tolist(), strict=True))
        out["relative_error"][lead] = {
            "model": float((rmse[0, j] / rmse[2, j]).mean()),
            "persistence": float((rmse[1, j] / rmse[2, j]).mean()),
        }
    value = validation_score(out["relative_error"], score)
    out["score"] = value if math.isfinite(value) else float("inf")
    return out


def validation_score(relative_error: dict[str, dict[str, float]], score: str) -> float:
    """The one number that ranks checkpoints, from ``evaluate``'s relative errors per lead (see ``val_score``)."""
    if score == "longest":
        return relative_error[max(relative_error, key=lambda lead: int(lead[:-1]))]["model"]
    # Persistence's error is positive wherever the truth changes; a zero would make the ratio meaningless.
    ratios = [e["model"] / e["persistence"] if e["persistence"] > 0 else math.inf for e in relative_error.values()]
    return sum(ratios) / len(ratios)
