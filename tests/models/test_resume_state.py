"""The pieces of exact resume, one by one: data position across world sizes, RNG streams, DDP hook memories."""

from __future__ import annotations

import copy
import io
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from models.comm_hooks import register_comm_hook
from models.distributed import DistContext
from models.normalization import Normalized, Rollout
from models.rank_state import (
    bucket_layout,
    hook_state,
    load_hook_state,
    prime_buckets,
    reseed,
    reset_hook_state,
    rng_state,
    set_rng_state,
)
from models.resume import ResumableSampler
from models.train import build_sfno
from tests.models.conftest import tiny_config

CPU = torch.device("cpu")


class Counting(Dataset):
    """Item ``i`` is ``i``; remembers which items were loaded."""

    def __init__(self, n: int) -> None:
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.loaded.append(i)
        return torch.tensor(i)


def _batches(ds: Dataset, sampler: ResumableSampler) -> list[list[int]]:
    return [b.tolist() for b in DataLoader(ds, batch_size=sampler.per_rank_batch, sampler=sampler, drop_last=True)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_global_batch_is_the_same_permutation_slice_on_any_world_size(world: int) -> None:
    n, batch, seed, epoch = 57, 4, 3, 2
    ds = Counting(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = []
    for rank in range(world):
        sampler = ResumableSampler(ds, DistContext(rank, world, 0, CPU), seed, batch // world)
        sampler.set_epoch(epoch)
        per_rank.append(_batches(ds, sampler))
    assert all(len(batches) == n // batch for batches in per_rank)  # ⌊N/B⌋ global batches whatever W is
    for j in range(n // batch):
        assert sorted(i for batches in per_rank for i in batches[j]) == sorted(perm[j * batch:(j + 1) * batch])


def test_skipped_batches_are_never_loaded_and_the_skip_applies_once() -> None:
    ds = Counting(57)
    sampler = ResumableSampler(ds, DistContext(1, 2, 0, CPU), seed=5, per_rank_batch=2)
    sampler.set_epoch(1)
    full = _batches(ds, sampler)
    ds.loaded.clear()
    sampler.skip_batches(5)
    assert _batches(ds, sampler) == full[5:]
    assert sorted(ds.loaded) == sorted(i for b in full[5:] for i in b)
    assert _batches(ds, sampler) == full


def _draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def test_rng_streams_round_trip_through_a_weights_only_file() -> None:
    buf = io.BytesIO()
    torch.save(rng_state(CPU), buf)
    expected = _draws()
    _draws()
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True), CPU)
    assert _draws() == expected
    reseed(0, 12, 1)
    one = _draws()
    reseed(0, 12, 1)
    assert _draws() == one
    reseed(0, 12, 0)
    assert _draws() != one  # each rank gets its own stream


@pytest.fixture
def world_of_one(tmp_path):
    """A real gloo process group of one rank in this process (DDP and its hooks run as with more ranks)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _setup(config, seed: int, kind: str) -> tuple[Normalized, DistributedDataParallel, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Normalized(build_sfno(config, 17, 32), [0.0] * 3, [1.0] * 3, [1.0] * 3)
    ddp = DistributedDataParallel(Rollout(model), broadcast_buffers=False)
    options = {"rank": 1, "start_iter": 2, "min_compression_rate": 1.0} if kind == "powersgd" else {}
    register_comm_hook(ddp, kind, **options)
    return model, ddp, torch.optim.Adam(model.parameters(), lr=1e-3)


def _train(ddp: DistributedDataParallel, optimizer: torch.optim.Optimizer, batches: list) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        ((ddp(x, 1)[:, 0] - y) ** 2).mean().backward()
        optimizer.step()


def _names(model: Normalized) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def test_powersgd_memories_resume_exactly_once_ddp_has_rebuilt_its_buckets(world_of_one, tmp_path) -> None:
    kind = "powersgd"
    config = tiny_config(tmp_path)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 17, 32, generator=g), torch.randn(2, 3, 17, 32, generator=g)) for _ in range(8)]
    model, ddp, optimizer = _setup(config, 0, kind)
    _train(ddp, optimizer, batches[:4])
    buf = io.BytesIO()
    torch.save({"hook": hook_state(ddp, _names(model)), "model": model.state_dict(),
                "optimizer": optimizer.state_dict()}, buf)
    _train(ddp, optimizer, batches[4:])
    for restored in (True, False):
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        other, other_ddp, other_opt = _setup(config, 1, kind)
        other.load_state_dict(saved["model"])
        other_opt.load_state_dict(copy.deepcopy(saved["optimizer"]))
        prime_buckets(other_ddp, torch.zeros(2, 3, 17, 32), 1)
        assert bucket_layout(other_ddp, _names(other)) == saved["hook"]["layout"]  # the layout after the rebuild
        if restored:
            assert load_hook_state(other_ddp, saved["hook"], _names(other), CPU)
        else:
            reset_hook_state(other_ddp, saved["hook"])
        _train(other_ddp, other_opt, batches[4:])
        same = all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
        assert same is restored  # restored memories: exact; forgotten ones: a different run


def test_signsgd_residuals_travel_by_parameter_name(world_of_one, tmp_path) -> None:
    """Residuals are keyed by parameter identity in the hook; in the file by name, so a new process maps them back."""
    config = tiny_config(tmp_path)
    model, ddp, _ = _setup(config, 0, "signsgd")
    state = ddp._comm_hooks[0][1]
    state.residuals = {id(p): torch.full_like(p, float(i)).view(-1) for i, p in enumerate(model.parameters())}
    buf = io.BytesIO()
    torch.save(hook_state(ddp, _names(model)), buf)
    buf.seek(0)
    other, other_ddp, _ = _setup(config, 1, "signsgd")
    assert load_hook_state(other_ddp, torch.load(buf, weights_only=True), _names(other), CPU)
    restored = other_ddp._comm_hooks[0][1].residuals
    assert set(restored) == {id(p) for p in other.parameters()}
    for i, p in enumerate(other.parameters()):
        assert torch.equal(restored[id(p)], torch.full((p.numel(),), float(i)))
    reset_hook_state(other_ddp)
    assert other_ddp._comm_hooks[0][1].residuals == {}
