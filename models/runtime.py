"""How a training run uses the machine: process group, precision, deterministic kernels and ``torch.compile``.

Each helper checks its setting against the device first, so an impossible request (fp16 on CPU, bf16 on a
GPU without it, compile without a C++ compiler) is a ``ValueError`` before any step runs.

**Process group under torchrun restarts.** torchrun's ranks all talk to one key-value store (the
agent's, or rank 0's) on the same ``MASTER_PORT`` in every attempt. Gloo publishes each rank's
listening address there under the same keys each attempt, so after a ``--max-restarts`` restart a
rank can read an address a dead rank of the previous attempt published and fail with
"connectFullMesh … Connection refused" (measured with torch 2.13, a 2-rank ``--standalone`` run
whose rank 1 is killed: 1 of 4 restarts connected). :func:`join_attempt_group` namespaces the store
by ``TORCHELASTIC_RESTART_COUNT`` so every attempt has fresh keys (6 of 6 connected). On one node
every rank agrees on that count; across nodes it does not (a node lost and replaced by a fresh agent
counts 0, the survivors 1). Multi-node runs therefore opt out of the shared agent store
(``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, see pipelines.tasks.torchrun_environment): every rendezvous
round then publishes a new port, rank 0 hosts a new, empty store there, and one fixed namespace fits.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager
from datetime import timedelta

import torch
import torch.distributed as dist

from core.errors import ConfigError
from models.distributed import backend_for, launched_by_torchrun
from models.normalization import Normalized

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
GROUP_TIMEOUT = timedelta(minutes=10)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16``, ``fp16`` or ``fp32`` for ``train.precision`` on ``device``; ValueError for what the device cannot do."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA (fp16 autocast with a loss scale); on CPU use bf16 or fp32")
    # Asked after select_device made ``device`` current: is_bf16_supported() looks at the current GPU.
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if device.type == "cuda" and bf16_ok else "fp32"
    if precision == "bf16" and not bf16_ok:
        raise ConfigError(f"train.precision=bf16 but the GPU {device} ({torch.cuda.get_device_name(device)}) does not "
                          "support bfloat16; use train.precision fp16 (with a loss scale), fp32 or auto")
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast context for a resolved precision (disabled for fp32)."""
    dtype = _DTYPES[precision]
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (its state is checkpointed); None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels only (and no cuDNN autotuning) when ``enabled``; the previous mode otherwise stays."""
    if not enabled:
        return
    # cuBLAS reads this when it creates its handle (first matmul), after this call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def check_compile(device: torch.device) -> None:
    """ValueError if ``torch.compile``'s inductor backend cannot build kernels for ``device`` here."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("train.compile=true needs Triton for inductor on CUDA and it is not installed; "
                              "install triton or set train.compile=false")
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own InvalidCxxCompiler, or import errors on odd builds
        raise ConfigError("train.compile=true: torch.compile's inductor backend compiles C++ kernels on CPU, and no "
                          f"working C++ compiler was found ({type(exc).__name__}: {exc}); install g++ (or point CXX "
                          "at one) or set train.compile=false") from exc


def training_model(model: Normalized, compile: bool) -> Normalized:
    """The module the loop calls: ``model`` itself, or a twin whose core is compiled and shares its parameters.

    Only the training forward is compiled — validation stays eager (no second compilation for
    ``no_grad``) — and ``model`` keeps its plain state_dict names (no ``_orig_mod.``).
    """
    if not compile:
        return model
    core = torch.compile(model.core)
    static = model.static.cpu() if model.static_names else None
    twin = Normalized(core, model.mean.cpu(), model.std.cpu(), model.diff_std.cpu(), model.history, static,
                      model.static_names, model.time_features, model.step_hours, model.pole_modes)
    log.info("SFNO core compiled with torch.compile (inductor); the first steps include compilation")
    return twin.to(model.mean.device)


def join_attempt_group(device: torch.device, rdzv_endpoint: str | None = None) -> bool:
    """Under torchrun (any world size), join the process group in a store namespace of this attempt; True if joined.

    ``rdzv_endpoint`` (``train.rdzv_endpoint``) marks a multi-node run, which should come without the shared
    agent store: with it, a warning says that a replaced node cannot rejoin.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or not launched_by_torchrun() or dist.is_initialized():
        return False
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    # With the agent's store every rank is a client; otherwise rank 0 hosts it, as torch's env:// does.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0, timeout=GROUP_TIMEOUT)
    backend = backend_for(device)  # the device is already current (select_device)
    if rdzv_endpoint and agent_store and rank == 0:
        log.warning("multi-node run (rendezvous %s) on torchrun's shared agent store: a node lost and restarted will "
                    "wait for the rendezvous until it times out; launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                    "(spherecast train does)", rdzv_endpoint)
    # The agent's store outlives attempts, so each attempt gets keys of its own; a store hosted by this
    # attempt's rank 0 (multi-node runs) is new and empty, and the nodes' restart counts may differ.
    namespace = f"spherecast/attempt_{attempt}" if agent_store else "spherecast/own_store"
    dist.init_process_group(backend, store=dist.PrefixStore(namespace, store), rank=rank, world_size=world,
                            timeout=GROUP_TIMEOUT)
    log.info("rank %d/%d joined the %s process group (torchrun attempt %s%s)", rank, world, backend, attempt,
             "" if agent_store else " on this node, store of rank 0")
    return True
