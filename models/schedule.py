"""Schedules driven by the fraction of the training budget used (wall clock or step cap).

Training stops on a wall-clock budget, so the cosine decay and the multistep curriculum follow
``progress`` ∈ [0, 1] (decided on rank 0 and broadcast) rather than a precomputed step count.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class BudgetCosine:
    """``lr = peak · min(1, (step+1)/warmup) · (final + (1−final)·½(1 + cos π·progress))``."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak: float, warmup_steps: int = 25,
                 final_fraction: float = 0.02) -> None:
        self.optimizer = optimizer
        self.peak = peak
        self.warmup_steps = max(1, warmup_steps)
        self.final_fraction = final_fraction
        self.last_lr = 0.0
        self.last_progress = 0.0

    def lr_at(self, step: int, progress: float) -> float:
        """The learning rate for optimizer step ``step`` at budget fraction ``progress``."""
        p = min(max(progress, 0.0), 1.0)
        warm = min(1.0, (step + 1) / self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * p))
        return self.peak * warm * (self.final_fraction + (1.0 - self.final_fraction) * cosine)

    def update(self, step: int, progress: float) -> float:
        """Set the optimizer's learning rate for this step and return it."""
        lr = self.lr_at(step, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_lr, self.last_progress = lr, progress
        return lr

    def state_dict(self) -> dict[str, Any]:
        """Resumable state."""
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "final_fraction": self.final_fraction,
                "last_lr": self.last_lr, "last_progress": self.last_progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for key in ("peak", "warmup_steps", "final_fraction", "last_lr", "last_progress"):
            setattr(self, key, state[key])


def rollout_steps_at(progress: float, max_steps: int, ramp: float = 0.3, start: int = 1, increment: int = 1) -> int:
    """Multistep curriculum: ``start`` steps at first, ``+increment`` per stage, ``max_steps`` from ``ramp`` of the budget on."""
    start = max(1, min(start, max_steps))
    if max_steps <= start or ramp <= 0:
        return max(1, max_steps)
    stages = -(-(max_steps - start) // max(1, increment))  # stages after the first, evenly spaced over the ramp
    frac = min(1.0, max(progress, 0.0) / ramp)
    return min(max_steps, start + max(1, increment) * int(frac * (stages + 1)))
