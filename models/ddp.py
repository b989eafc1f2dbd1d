"""DistributedDataParallel in one place: wrapping the loop's module, its gradient hook, and DDP's private parts.

Exact resume needs two things torch keeps private on a DDP model: the (hook, state) pairs installed
with ``register_comm_hook`` (``DistributedDataParallel._comm_hooks``), and the parameters of each
gradient bucket in the reducer's current layout (``reducer._get_zeros_like_grad_buckets()``), because
PowerSGD keys its memories by bucket index. No public API gives either; every such read goes through
this module, so a torch release that renames them breaks here, where tests/models/test_resume_state.py
exercises both.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.comm_hooks import CommStats, comm_hook_options, register_comm_hook
from models.distributed import DistContext

if TYPE_CHECKING:
    from core.config import TrainConfig

log = logging.getLogger(__name__)


def device_ids(ctx: DistContext) -> list[int] | None:
    """DDP's ``device_ids`` for this rank: its one GPU, or None for CPU modules."""
    return [ctx.local_rank] if ctx.device.type == "cuda" else None


def wrap(module: nn.Module, ctx: DistContext, train: TrainConfig) -> tuple[nn.Module, CommStats | None]:
    """``module`` in DDP with the configured gradient hook when distributed (and its byte counter); else as is."""
    if not ctx.distributed:
        if train.comm_hook != "none":
            log.warning("train.comm_hook=%r needs a distributed run; training with one process and no hook",
                        train.comm_hook)
        return module, None
    # Buffers (stats, position features) are constants: no need to re-broadcast them every step.
    ddp = DistributedDataParallel(module, device_ids=device_ids(ctx), broadcast_buffers=False)
    return ddp, register_comm_hook(ddp, train.comm_hook, **comm_hook_options(train))


def is_ddp(module: nn.Module) -> bool:
    """True when ``module`` is DDP-wrapped (it has a reducer, buckets and maybe a hook)."""
    return isinstance(module, DistributedDataParallel)


def comm_hook_states(module: nn.Module) -> list[Any]:
    """The state objects of the hooks installed on a DDP model (empty for a plain module or no hook)."""
    return [state for _, state in getattr(module, "_comm_hooks", [])]


def gradient_buckets(module: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of each DDP gradient bucket in the reducer's current order (empty for a plain module)."""
    reducer = getattr(module, "reducer", None)
    if reducer is None:
        return []
    return [list(bucket.parameters()) for bucket in reducer._get_zeros_like_grad_buckets()]
