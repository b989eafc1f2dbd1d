"""Two torchrun agents as two "nodes" on 127.0.0.1 (c10d rendezvous, one gloo rank each): the same weights as one
agent with two ranks; a lost node replaced mid-run resumes to the exact weights; bad rendezvous input fails clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import Config
from models.checkpoint import read_checkpoint
from tests.models.conftest import moving_planet, write_data
from tests.models.test_resume import run_config, run_dir
from tests.models.torchrun_harness import (
    finish,
    free_port,
    kill_tree,
    launch,
    launch_node,
    log_tail,
    records,
    wait_for_checkpoint,
    wait_until_joined,
    write_config,
)

STEPS = 12  # batch 4 over 2 ranks; last.pt every 4 steps
EVERY = 4


def node_config(root: Path, name: str, port: int, node_rank: int, **train: object) -> Config:
    """Node ``node_rank`` of a 2-node run ``name`` whose rendezvous is 127.0.0.1:``port``."""
    opts = {"max_steps": STEPS, "checkpoint_every_steps": EVERY, "nnodes": 2, "node_rank": node_rank,
            "rdzv_endpoint": f"127.0.0.1:{port}", "rdzv_timeout_s": 60, **train}
    return run_config(root, name, **opts)


def start_node(config: Config, tag: str = "") -> tuple:
    """Write node R's config file (``tag`` tells apart two agents of one rank) and start its agent; (process, path)."""
    name = f"{config.train.run_name}.node{config.train.node_rank}{tag}.yaml"
    path = write_config(config, config.paths.root / name)
    return launch_node(config, path), path


def stop_all(*procs) -> None:
    """Kill every agent still running (and its workers), so no run outlives its test."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            kill_tree(proc)


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit-identical ``last.pt`` weights (every tensor and the sha) at the same final step."""
    x, y = read_checkpoint(a / "last.pt"), read_checkpoint(b / "last.pt")
    assert x["meta"]["train_step"] == y["meta"]["train_step"] == STEPS
    assert x["model"].keys() == y["model"].keys()
    for key, tensor in x["model"].items():
        assert torch.equal(tensor, y["model"][key]), f"{key}: max |diff| {(tensor - y['model'][key]).abs().max()}"
    assert x["meta"]["weights_sha256"] == y["meta"]["weights_sha256"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("multinode")
    write_data(path, moving_planet())
    return path


@pytest.fixture(scope="module")
def runs(root: Path) -> dict[str, Path]:
    """One agent with 2 ranks (--standalone), and at the same time two agents of one rank each (--nnodes 2)."""
    ref = run_config(root, "standalone", max_steps=STEPS, checkpoint_every_steps=EVERY)
    ref_path = write_config(ref, root / "standalone.yaml")
    port = free_port()
    configs = [node_config(root, "two-nodes", port, r) for r in (0, 1)]
    reference = nodes = None
    try:
        reference = launch(ref_path, 2)
        nodes = [start_node(c) for c in configs]
        finish(reference, ref_path)
        for proc, path in nodes:
            finish(proc, path)
    finally:
        stop_all(reference, *[p for p, _ in nodes or []])
    return {"standalone": run_dir(ref), "two-nodes": run_dir(configs[0]), "log": root / "two-nodes.node0.log"}


@pytest.mark.slow
def test_two_agents_of_one_rank_train_the_weights_of_one_agent_with_two_ranks(runs: dict[str, Path]) -> None:
    assert_same_weights(runs["standalone"], runs["two-nodes"])
    recs = records(runs["two-nodes"])
    start, end = recs[0], recs[-1]
    assert (start["event"], start["world_size"], start["backend"]) == ("start", 2, "gloo")
    assert end["event"] == "end" and end["steps"] == STEPS
    assert sum(r["event"] == "start" for r in recs) == 1  # one rank 0 over both nodes wrote the run
    scores = [{r["step"]: r["score"] for r in records(runs[k]) if r["event"] == "val"} for k in ("standalone", "two-nodes")]
    assert scores[0] == scores[1]
    assert "store of rank 0" in runs["log"].read_text()  # the rank-0 worker hosted its own store, not the agent's


@pytest.mark.slow
def test_a_lost_node_replaced_by_a_new_agent_resumes_to_the_exact_weights(runs: dict[str, Path], root: Path) -> None:
    """SIGKILL node 1's agent and worker after a checkpoint; node 0 waits in the rendezvous; a new node 1 joins."""
    port = free_port()
    n0, n1 = (node_config(root, "replaced", port, r, max_restarts=1) for r in (0, 1))
    first = second = replacement = None
    try:
        (first, p0), (second, p1) = start_node(n0), start_node(n1)
        seen = wait_for_checkpoint(first, run_dir(n0), EVERY)
        kill_tree(second)  # a node lost: its agent and its worker, no cleanup
        assert first.poll() is None, log_tail(p0)  # the survivor's agent lives on and rendezvouses again
        replacement, _ = start_node(n1)  # same --node-rank, as a scheduler restarts a node
        finish(first, p0)
        finish(replacement, p1)
    finally:
        stop_all(first, second, replacement)
    recs = records(run_dir(n0))
    resume = [r for r in recs if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] >= seen and resume[0]["world_size"] == 2, resume
    assert recs[-1]["event"] == "end" and recs[-1]["steps"] == STEPS
    assert_same_weights(runs["standalone"], run_dir(n0))


def test_a_node_whose_endpoint_never_answers_fails_naming_it_and_writes_nothing(root: Path) -> None:
    from pipelines.tasks import rendezvous_failure

    port = free_port()  # nobody listens: node 0 never started
    config = node_config(root, "unreachable", port, 1, rdzv_timeout_s=2)
    proc, path = start_node(config)
    try:
        code = proc.wait(timeout=120)
    finally:
        stop_all(proc)
    assert code != 0
    tail = log_tail(path).splitlines()
    assert any("RendezvousConnectionError" in line for line in tail), "\n".join(tail)
    reason = rendezvous_failure(config, tail)
    assert reason is not None and f"127.0.0.1:{port}" in reason and "rdzv_timeout_s=2" in reason
    assert not run_dir(config).exists()


def start_in_order(first: Config, second: Config) -> list:
    """Start ``first``'s agent, wait until it is a participant of the rendezvous, then start ``second``'s."""
    procs = [start_node(first)]
    port = int(first.train.rdzv_endpoint.rsplit(":", 1)[1])
    wait_until_joined(procs[0][0], port, first.train.run_name)
    procs.append(start_node(second))
    return procs


def wait_both(procs: list) -> list[int]:
    """Every agent's exit code (each killed, with its workers, if it outlives the wait)."""
    try:
        return [p.wait(timeout=120) for p, _ in procs]
    finally:
        stop_all(*[p for p, _ in procs])


def test_a_node_expecting_more_nodes_times_out_and_closes_the_rendezvous_for_the_other(root: Path) -> None:
    """The node started with --nnodes 2 joins first; the one expecting 3 never sees its third node and times out."""
    from pipelines.tasks import rendezvous_failure

    port = free_port()
    two = node_config(root, "short", port, 0, rdzv_timeout_s=30)
    three = node_config(root, "short", port, 1, nnodes=3, rdzv_timeout_s=4)
    procs = start_in_order(two, three)
    codes = wait_both(procs)
    assert codes[0] != 0 and codes[1] != 0, codes
    logs = [log_tail(path, 20000) for _, path in procs]
    assert "RendezvousTimeoutError" in logs[1], logs[1][-3000:]
    assert "RendezvousClosedError" in logs[0], logs[0][-3000:]
    for config, text in zip((two, three), logs, strict=True):
        assert rendezvous_failure(config, text.splitlines()) is not None
    assert not run_dir(two).exists()  # no rank ever started


def test_a_world_formed_by_nodes_with_different_nnodes_is_refused_by_every_rank(root: Path) -> None:
    """The node started with --nnodes 2 joins second and completes a world of 2 (torch lets the joiner that fills
    its own --nnodes do so); every rank compares the nodes' --nnodes first and refuses before writing anything."""
    from pipelines.tasks import rendezvous_failure

    port = free_port()
    three = node_config(root, "formed", port, 0, nnodes=3, rdzv_timeout_s=30)
    two = node_config(root, "formed", port, 1, rdzv_timeout_s=30)
    procs = start_in_order(three, two)
    codes = wait_both(procs)
    assert codes[0] != 0 and codes[1] != 0, codes
    for config, (_, path) in zip((three, two), procs, strict=True):
        text = log_tail(path, 20000)
        assert ("nodes disagree on train.nnodes: the rendezvous formed a world of 2 nodes from node 0 with --nnodes 3, "
                "node 1 with --nnodes 2; start every node with the same --nnodes") in text, text[-3000:]
        reason = rendezvous_failure(config, text.splitlines())
        assert reason is not None and reason.startswith(f"node {config.train.node_rank} of {config.train.nnodes}")
        assert "nodes disagree on train.nnodes" in reason
    assert not run_dir(three).exists()  # refused before rank 0 made the run directory


def test_two_nodes_started_with_one_node_rank_are_refused_by_every_rank(root: Path) -> None:
    """Three nodes of --nnodes 3 form a world, but two say --node-rank 1: every rank refuses before writing."""
    port = free_port()
    configs = [node_config(root, "twins", port, r, nnodes=3, batch_size=3, rdzv_timeout_s=30) for r in (0, 1, 1)]
    procs = start_in_order(configs[0], configs[1])
    procs.append(start_node(configs[2], tag="-twin"))
    codes = wait_both(procs)
    assert all(code != 0 for code in codes), codes
    for _, path in procs:
        text = log_tail(path, 20000)
        assert ("nodes share a --node-rank: a world of 3 nodes holds only node ranks [0, 1]; give each node its own "
                "--node-rank in 0..2") in text, text[-3000:]
    assert not run_dir(configs[0]).exists()


def test_the_train_task_of_a_node_waits_for_the_endpoint_then_fails_naming_it(tmp_path: Path) -> None:
    from core.errors import ConfigError
    from pipelines.tasks import train_task

    port = free_port()
    config = node_config(tmp_path, "silent", port, 1, rdzv_timeout_s=1)
    with pytest.raises(ConfigError, match=rf"rendezvous endpoint 127.0.0.1:{port} \(train.rdzv_endpoint\) did not "
                                          r"answer within 1 s \(train.rdzv_timeout_s\)"):
        train_task.fn(config)
    assert not config.paths.runs.exists()  # nothing written before the endpoint answers
