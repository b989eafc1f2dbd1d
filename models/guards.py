"""Non-finite guard: skip a step whose loss or gradients are NaN/Inf, abort after K in a row.

One bad batch (a rare overflow under bf16, a spike) should cost one step, not the run; a
persistent problem (learning rate too high, corrupt data) must stop the run with a message that
says so. Every rank takes the same decision: the flag is all-reduced (max), because with a
compressing DDP hook a NaN on one rank need not survive into the averaged gradients.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from core.errors import ConfigError
from models.distributed import DistContext

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Counts and skips non-finite steps; raises FloatingPointError after ``limit`` in a row."""

    def __init__(self, limit: int, ctx: DistContext) -> None:
        if limit < 1:
            raise ConfigError(f"train.max_nonfinite_steps must be ≥ 1, got {limit}")
        self.limit, self.ctx = limit, ctx
        self.skipped = 0
        self.in_a_row = 0

    def step_is_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, lr: float) -> bool:
        """True if this step may be applied; False (counted) if it must be skipped."""
        bad = torch.tensor([0.0 if math.isfinite(loss.item()) and math.isfinite(grad_norm.item()) else 1.0],
                           device=loss.device)
        if self.ctx.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() == 0.0:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.ctx.is_main:
            log.warning("step %d skipped: loss %s, gradient norm %s (%d in a row, %d in all)", step,
                        loss.item(), grad_norm.item(), self.in_a_row, self.skipped)
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_a_row} training steps in a row had a non-finite loss or gradient (last at step {step}, "
                f"lr {lr:.2e}); stopping. Lower train.lr, check the data with `spherecast data check`, "
                f"or raise train.max_nonfinite_steps")
        return False
