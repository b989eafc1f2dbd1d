"""The trainer's CUDA branches, exercised on the CPU by faking what ``torch.cuda`` reports.

Each test patches the few ``torch.cuda`` functions a branch calls (availability, device count, the
current device, bf16 support, RNG state, the allocator's peak) and checks the decision the branch
takes: which device a rank gets, pinned batches, the backend, the precision, what a checkpoint
carries. Kernels never run on the fake device; the ``gpu``-marked tests do that on a CUDA host.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch.utils.data import SequentialSampler, TensorDataset

from models import ddp
from models.data import training_loader
from models.distributed import DistContext, backend_for, check_gpu_ranks, init_distributed, select_device
from models.rank_state import rng_state, set_rng_state
from models.recorder import peak_memory_mb
from models.runtime import autocast, check_compile, grad_scaler, resolve_precision

CUDA1 = torch.device("cuda", 1)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Two fake GPUs with bf16: ``torch.cuda`` answers as on a CUDA host; the calls that change state are recorded."""
    calls: dict[str, list] = {"set_device": [], "set_rng_state": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(torch.device(device)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    return calls


# ---- which device a rank trains on ---------------------------------------------------------------

@pytest.mark.parametrize("local_rank", [0, 1])
def test_each_local_rank_gets_its_own_gpu_made_current(fake_cuda, monkeypatch, local_rank: int) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    device = select_device()
    assert device == torch.device("cuda", local_rank)
    assert fake_cuda["set_device"] == [device]  # made current once, for nccl, autocast and pinned memory


def test_without_cuda_every_rank_trains_on_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device without CUDA"))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert select_device() == torch.device("cpu")
    assert backend_for(torch.device("cpu")) == "gloo"
    assert ddp.device_ids(DistContext(3, 4, 3, torch.device("cpu"))) is None


def test_cuda_ranks_use_nccl_and_ddp_gets_the_rank_gpu() -> None:
    assert backend_for(CUDA1) == "nccl"
    assert ddp.device_ids(DistContext(1, 2, 1, CUDA1)) == [1]


def test_more_local_ranks_than_gpus_is_refused_before_any_device_is_touched(fake_cuda, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"torchrun --nproc-per-node is 3 but 2 GPU\(s\) are visible .* 1\.\.2 ranks"):
        select_device()
    assert fake_cuda["set_device"] == []


def test_the_gpu_count_check_names_the_setting_and_ignores_cpu_runs(fake_cuda, monkeypatch) -> None:
    check_gpu_ranks(2)
    with pytest.raises(ValueError, match=r"^train.nproc_per_node is 4 but 2 GPU\(s\) are visible"):
        check_gpu_ranks(4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_gpu_ranks(16)  # CPU ranks: any number


# ---- train.device: auto, cpu, cuda ----------------------------------------------------------------

def test_device_auto_and_cuda_pick_the_rank_gpu_nccl_and_bf16_on_a_cuda_host(fake_cuda, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for requested in ("auto", "cuda"):
        device = select_device(requested)
        assert device == CUDA1 and backend_for(device) == "nccl"
        assert resolve_precision("auto", device) == "bf16"
    assert fake_cuda["set_device"] == [CUDA1, CUDA1]
    for requested in ("auto", "cuda"):
        with pytest.raises(ValueError, match=r"is 3 but 2 GPU\(s\) are visible"):
            check_gpu_ranks(3, device=requested)


def test_device_cpu_keeps_gloo_fp32_and_unpinned_batches_on_a_cuda_host(fake_cuda, monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # more ranks than the 2 GPUs: no matter, they are not used
    device = select_device("cpu")
    assert device == torch.device("cpu") and fake_cuda["set_device"] == []
    assert backend_for(device) == "gloo" and resolve_precision("auto", device) == "fp32"
    check_gpu_ranks(16, device="cpu")
    ds = TensorDataset(torch.arange(4.0))
    assert not training_loader(ds, SequentialSampler(ds), 2, 0, device).pin_memory


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables torchrun gives the only rank of a standalone job."""
    for name, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)


def test_a_device_cpu_torchrun_rank_trains_in_a_gloo_group_under_ddp_on_a_cuda_host(tiny_data, fake_cuda,
                                                                                   monkeypatch) -> None:
    """A lone torchrun rank (its variables set here) with ``train.device: cpu`` where CUDA is reported."""
    import json

    import torch.distributed as dist

    from models.train import train

    _as_torchrun_rank(monkeypatch)
    config = tiny_data(max_steps=2, device="cpu")
    train(config)
    lines = (config.paths.runs / config.train.run_name / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    start, end = recs[0], recs[-1]
    assert (start["event"], start["device"], start["backend"], start["world_size"]) == ("start", "cpu", "gloo", 1)
    assert {r["precision"] for r in recs if r["event"] == "val"} == {"fp32"}  # auto on the CPU
    assert end["event"] == "end" and end["comm"]["kind"] == "none"  # DDP's all-reduce hook ran, on one rank
    assert fake_cuda["set_device"] == [] and not dist.is_initialized()  # no GPU touched; the group is left


def test_without_torchrun_no_process_group_is_formed(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed(torch.device("cpu"))
    assert ctx.backend is None and not ctx.distributed and ctx.world_size == 1


def test_device_cuda_without_cuda_is_refused_before_anything_is_written(tiny_data, monkeypatch) -> None:
    from models.train import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device without CUDA"))
    needle = r"^train.device is 'cuda' but (this torch build has no CUDA|torch \(CUDA .*\) sees no GPU).*; use train.device cpu or auto"
    with pytest.raises(ValueError, match=needle):
        select_device("cuda")
    with pytest.raises(ValueError, match=needle):
        check_gpu_ranks(1, device="cuda")
    assert select_device("auto") == torch.device("cpu")
    config = tiny_data(device="cuda")
    before = _fingerprint(config.paths.root)
    with pytest.raises(ValueError, match=needle):
        train(config)
    assert _fingerprint(config.paths.root) == before


def test_the_loader_pins_batches_for_a_cuda_device_only() -> None:
    ds = TensorDataset(torch.arange(10.0))
    cuda = training_loader(ds, SequentialSampler(ds), 4, 0, CUDA1)
    cpu = training_loader(ds, SequentialSampler(ds), 4, 0, torch.device("cpu"))
    assert cuda.pin_memory and not cpu.pin_memory
    assert cuda.batch_size == 4 and cuda.drop_last  # whole per-rank batches, as the data position counts them
    assert [b[0].tolist() for b in cpu] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_the_trainer_builds_a_pinned_loader_on_a_cuda_rank(tiny_data, fake_cuda) -> None:
    """Set up (no step) a run whose context says cuda:1: the trainer's loader pins, batches per rank, no workers."""
    import dataclasses

    from models.prepare import prepare
    from models.train import Trainer

    config = tiny_data(tensorboard=False)
    s = prepare(config, DistContext(0, 1, 0, torch.device("cpu")), config.train.batch_size)
    on_gpu = Trainer(dataclasses.replace(s, ctx=DistContext(0, 1, 1, CUDA1), precision="fp32"))
    on_gpu.setup()  # builds every live object; nothing in it runs a kernel on the device
    on_cpu = Trainer(dataclasses.replace(s, run_dir=s.run_dir.with_name("cpu")))
    on_cpu.setup()
    assert on_gpu.loader.pin_memory and not on_cpu.loader.pin_memory
    assert on_gpu.loader.batch_size == config.train.batch_size and on_gpu.loader.sampler is on_gpu.sampler


# ---- precision ---------------------------------------------------------------------------------

def test_bf16_on_a_gpu_without_it_is_refused_and_auto_falls_back_to_fp32(fake_cuda, monkeypatch) -> None:
    assert resolve_precision("auto", CUDA1) == "bf16"
    assert resolve_precision("bf16", CUDA1) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(ValueError, match=r"train.precision=bf16 but the GPU cuda:1 \(Fake GPU\) does not support "
                                         r"bfloat16; use train.precision fp16 .*, fp32 or auto"):
        resolve_precision("bf16", CUDA1)
    assert resolve_precision("auto", CUDA1) == "fp32"
    assert resolve_precision("fp16", CUDA1) == "fp16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # CPU autocast has bf16 everywhere


def test_cuda_autocast_and_loss_scale_are_built_for_cuda(fake_cuda) -> None:
    ctx = autocast("bf16", CUDA1)
    assert ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16 and ctx._enabled
    scaler = grad_scaler("fp16", CUDA1)
    assert scaler is not None and scaler.is_enabled()
    assert grad_scaler("bf16", CUDA1) is None


def test_compile_on_cuda_without_triton_is_refused(monkeypatch) -> None:
    import torch.utils._triton as triton

    monkeypatch.setattr(triton, "has_triton", lambda: False)
    with pytest.raises(ValueError, match="train.compile=true needs Triton for inductor on CUDA"):
        check_compile(CUDA1)


# ---- per-rank state a checkpoint carries ----------------------------------------------------------

def test_a_cuda_rank_saves_and_restores_its_cuda_rng_stream(fake_cuda, monkeypatch) -> None:
    stream = torch.arange(16, dtype=torch.uint8)
    asked = []

    def get_rng_state(device):
        asked.append(device)
        return stream.clone()

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: fake_cuda["set_rng_state"].append((state.clone(), device)))
    saved = rng_state(CUDA1)
    assert asked == [CUDA1] and torch.equal(saved["cuda"], stream)
    set_rng_state(saved, CUDA1)
    (restored, device), = fake_cuda["set_rng_state"]
    assert device == CUDA1 and torch.equal(restored, stream)
    cpu = rng_state(torch.device("cpu"))
    assert "cuda" not in cpu
    set_rng_state(cpu, CUDA1)  # a CPU-written state on a CUDA rank: nothing to put back for CUDA
    assert len(fake_cuda["set_rng_state"]) == 1


def test_peak_memory_on_cuda_is_the_allocator_peak_of_the_rank_gpu(monkeypatch) -> None:
    asked = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: asked.append(device) or 3 * 2**20 + 2**19)
    assert peak_memory_mb(CUDA1) == 3.5 and asked == [CUDA1]


# ---- bad requests leave the disk as it was ---------------------------------------------------------

def _fingerprint(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_bf16_training_on_a_gpu_without_bf16_fails_before_anything_is_written(tiny_data, fake_cuda,
                                                                              monkeypatch) -> None:
    from models.train import train

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    config = tiny_data(precision="bf16")
    before = _fingerprint(config.paths.root)
    with pytest.raises(ValueError, match=r"train.precision=bf16 but the GPU cuda:0 \(Fake GPU\) does not support"):
        train(config)
    assert fake_cuda["set_device"] == [torch.device("cuda", 0)]  # the rank's device was chosen first
    assert _fingerprint(config.paths.root) == before
    assert not (config.paths.runs / config.train.run_name).exists()


def test_torchrun_with_more_ranks_than_gpus_fails_before_anything_is_written(tiny_data, fake_cuda,
                                                                            monkeypatch) -> None:
    from models.train import train

    config = tiny_data()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    before = _fingerprint(config.paths.root)
    with pytest.raises(ValueError, match=r"torchrun --nproc-per-node is 4 but 2 GPU\(s\) are visible"):
        train(config)
    assert fake_cuda["set_device"] == []
    assert _fingerprint(config.paths.root) == before
