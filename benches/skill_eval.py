"""Models and measurements of the skill bench: the torch-harmonics reference, scores, long rollouts.

The reference is torch-harmonics' example ``SphericalFourierNeuralOperator`` as its shallow-water
registry builds it (``sfno_sc2_layers4_e32``: width 32, 4 layers, latent grid halved, instance norm,
residual prediction) with the DESIGN §4 recipe (Adam 3e-3, cosine decay, batch 8). Like
torch-harmonics' own shallow-water example it maps the normalized state ``(x − mean)/std`` to the
next normalized state and trains on the quadrature-weighted MSE of that, one step at a time.

Scores reuse :func:`models.evaluate.evaluate` (DESIGN §4 relative error: RMSE over the RMS of the
truth's anomaly from the training-period mean, averaged over channels).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from benches.skill_data import area_mean_ke, jet_latitudes
from models.data import WindowDataset
from models.evaluate import area_mse, evaluate, rollout_states
from models.losses import SphereMSE, latitude_weights
from models.schedule import BudgetCosine

log = logging.getLogger(__name__)

EXAMPLE = {"embed_dim": 32, "num_layers": 4, "scale_factor": 2, "normalization_layer": "instance_norm",
           "residual_prediction": True, "use_mlp": True, "activation_function": "gelu", "pos_embed": "none"}
EXAMPLE_LR, EXAMPLE_BATCH = 3e-3, 8
WIND = ("u_component_of_wind_500", "v_component_of_wind_500")


class StateForecaster(nn.Module):
    """A network on normalized states as a one-step forecaster in physical units."""

    def __init__(self, net: nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32))[:, None, None])
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float32))[:, None, None])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Physical state → ``(x − mean) / std``."""
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The next state in physical units."""
        return self.net(self.normalize(x)) * self.std + self.mean


def build_example(nlat: int, nlon: int, channels: int, mean: np.ndarray, std: np.ndarray, seed: int) -> StateForecaster:
    """torch-harmonics' example SFNO (registry settings) wrapped as a physical-state forecaster."""
    from torch_harmonics.examples.models.sfno import SphericalFourierNeuralOperator

    torch.manual_seed(seed)
    net = SphericalFourierNeuralOperator(img_size=(nlat, nlon), grid="equiangular", grid_internal="legendre-gauss",
                                         in_chans=channels, out_chans=channels, **EXAMPLE)
    return StateForecaster(net, mean, std)


def train_example(model: StateForecaster, data: WindowDataset, budget_minutes: float, seed: int,
                  cpu_seconds: float | None = None) -> dict[str, Any]:
    """Train the reference one step at a time for ``budget_minutes`` of wall clock, or until this process
    has used ``cpu_seconds`` of CPU (then the wall budget is only a cap); return what it did."""
    loader = DataLoader(data, batch_size=EXAMPLE_BATCH, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise ValueError(f"{len(data)} training windows cannot fill a batch of {EXAMPLE_BATCH}")
    optimizer = torch.optim.Adam(model.parameters(), lr=EXAMPLE_LR)
    schedule = BudgetCosine(optimizer, EXAMPLE_LR)
    loss_fn = SphereMSE()
    budget_s = budget_minutes * 60.0
    wall0, cpu0 = time.monotonic(), time.process_time()
    step, skipped, epoch, losses = 0, 0, 0, []
    model.train()
    while True:
        for x0, y in loader:
            elapsed, used = time.monotonic() - wall0, time.process_time() - cpu0
            progress = elapsed / budget_s if cpu_seconds is None else max(used / cpu_seconds, elapsed / budget_s)
            if progress >= 1.0:
                model.eval()
                return {"steps": step, "epochs": epoch, "skipped_steps": skipped, "wall_s": round(elapsed, 1),
                        "cpu_s": round(used, 1), "budget": "wall" if cpu_seconds is None else "cpu",
                        "first_loss": losses[0] if losses else None,
                        "last_loss": float(np.mean(losses[-50:])) if losses else None}
            schedule.update(step, progress)
            loss = loss_fn(model.net(model.normalize(x0)), model.normalize(y[:, 0]))
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                skipped += 1  # an unguarded reference would blow up here; count it and move on
                continue
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        epoch += 1


def relative_errors(model: nn.Module, test: WindowDataset, lead_steps: list[int], step_hours: int,
                    climatology: torch.Tensor) -> dict[str, Any]:
    """Relative error (and per-channel RMSE) of ``model`` and persistence at each lead, via ``evaluate``."""
    return evaluate(model, test, lead_steps, step_hours, climatology)  # type: ignore[arg-type]


@torch.no_grad()
def member_mean_errors(members: Sequence[nn.Module], test: WindowDataset, lead_steps: list[int], step_hours: int,
                       climatology: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """Relative error per lead of the mean of the members' forecasts, each member rolled out on its own.

    The mean is of whole trajectories (an ensemble of independently trained models), not of one-step outputs
    fed back, so each member sees only its own states. Same windows and relative error as :func:`relative_errors`.
    """
    if not members:
        raise ValueError("member_mean_errors needs at least one member")
    for m in members:
        m.eval()
    w = latitude_weights(test.grid_shape[0])
    sums = torch.zeros(2, len(lead_steps), len(test.channels), dtype=torch.float64)  # members' mean, climatology
    for start in range(0, len(test), batch_size):
        items = [test[i] for i in range(start, min(start + batch_size, len(test)))]
        x0, y = torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
        runs = [rollout_states(m, x0, max(lead_steps)) for m in members]
        for j, k in enumerate(lead_steps):
            truth = y[:, k - 1]
            sums[0, j] += area_mse(torch.stack([r[k - 1] for r in runs]).mean(dim=0), truth, w).double()
            sums[1, j] += area_mse(climatology.expand_as(truth), truth, w).double()
    ratio = (sums[0] / sums[1]).sqrt().mean(dim=-1)  # per channel RMSE / climatology's, then the channel mean
    return {f"{k * step_hours}h": float(ratio[j]) for j, k in enumerate(lead_steps)}


@torch.no_grad()
def long_rollout(model: nn.Module, x0: torch.Tensor, steps: int, channels: list[str], weights: np.ndarray,
                 planet_ke: float, steps_per_chunk: int = 120, latitudes: np.ndarray | None = None) -> dict[str, Any]:
    """Roll ``model`` out ``steps`` steps from the input stack ``x0``: first non-finite step, mean KE vs the planet's.

    With ``latitudes``, also where the jets are: the latitude of the zonal-mean zonal wind's maximum in each
    hemisphere, per chunk of ``steps_per_chunk`` steps (30 days of 6-h steps).
    """
    iu, iv = channels.index(WIND[0]), channels.index(WIND[1])
    model.eval()
    x = x0[None]
    kes: list[float] = []
    zonal_u: list[np.ndarray] = []
    bad_step = None
    began = time.perf_counter()
    advance = getattr(model, "advance", None)  # our SFNO's stack may hold history and a clock
    for k in range(1, steps + 1):
        new = model(x)
        if not bool(torch.isfinite(new).all()):
            bad_step = k
            break
        kes.append(float(area_mean_ke(new[0, iu].numpy(), new[0, iv].numpy(), weights)))
        zonal_u.append(new[0, iu].mean(-1).numpy())
        x = advance(x, new) if advance is not None else new
    seconds = time.perf_counter() - began
    mean_ke = float(np.mean(kes)) if kes and bad_step is None else math.nan
    chunks = [round(float(np.mean(kes[i:i + steps_per_chunk])), 2) for i in range(0, len(kes), steps_per_chunk)]
    ratio = mean_ke / planet_ke
    jets = poles = None
    if latitudes is not None and zonal_u:
        chunks_u = [np.mean(zonal_u[i:i + steps_per_chunk], axis=0) for i in range(0, len(zonal_u), steps_per_chunk)]
        jets = [list(jet_latitudes(u, latitudes)) for u in chunks_u]
        # A pole row is one point: the data's zonal mean of u there is 0 (a vector) or the wind itself (ERA5's
        # constant rows); a drifting value is the model's own (models/poles.py).
        poles = [[round(float(u[0]), 2), round(float(u[-1]), 2)] for u in chunks_u]
    return {"jets_per_30_days": jets, "pole_zonal_u_per_30_days": poles, "steps": steps, "finite": bad_step is None,
            "first_nonfinite_step": bad_step,
            "mean_ke": mean_ke, "planet_mean_ke": planet_ke, "ke_ratio": ratio,
            "ke_per_30_days": chunks, "seconds": round(seconds, 1),
            "pass": bool(bad_step is None and abs(ratio - 1.0) <= 0.2)}
