from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_config
from pipelines.cli import build_parser, main
from pipelines.tasks import torchrun_command


def test_torchrun_command_standalone_and_rendezvous(tmp_path: Path) -> None:
    cfg = load_config(env={}, overrides={"train": {"nproc_per_node": 2}})
    cmd = torchrun_command(cfg, tmp_path / "c.yaml")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=2" in cmd
    assert cmd[-4:] == ["-m", "models.train", "--config", str(tmp_path / "c.yaml")]
    multi = load_config(env={}, overrides={"train": {"nnodes": 2, "rdzv_endpoint": "node0:29400", "run_name": "r1"}})
    cmd = torchrun_command(multi, tmp_path / "c.yaml")
    assert "--rdzv_endpoint=node0:29400" in cmd and "--nnodes=2" in cmd and "--standalone" not in cmd
    assert "--rdzv_backend=c10d" in cmd and "--rdzv_id=r1" in cmd  # every node joins the run of the same name
    # Node 0 hosts the rendezvous store; the timeout bounds the wait for the endpoint and for every node.
    assert "--rdzv_conf=join_timeout=600,read_timeout=600,is_host=1" in cmd
    other = load_config(env={}, overrides={"train": {"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "node0:29400",
                                                     "rdzv_timeout_s": 30}})
    assert "--rdzv_conf=join_timeout=30,read_timeout=30,is_host=0" in torchrun_command(other, tmp_path / "c.yaml")
    # torchrun restarts every rank after one fails, train.max_restarts times (0 by default); they resume from last.pt.
    assert "--max-restarts=0" in cmd
    again = load_config(env={}, overrides={"train": {"max_restarts": 3}})
    cmd = torchrun_command(again, tmp_path / "c.yaml")
    assert "--max-restarts=3" in cmd and cmd.index("--max-restarts=3") < cmd.index("models.train")


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("train: {epochs: 3}\n", "unknown key 'train.epochs'"),
        ("grid: {preset: 7deg}\n", "unknown grid preset '7deg'"),
        ("task: {variables: [vorticity]}\n", "unknown variable 'vorticity'"),
    ],
)
def test_bad_config_is_one_clear_error_and_touches_nothing(tmp_path: Path, capsys, yaml_text: str, needle: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"paths: {{root: {tmp_path / 'out'}}}\n" + yaml_text)
    assert main(["ingest", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spherecast: error: invalid config") and needle in err
    assert not (tmp_path / "out").exists()


def test_store_failing_its_contract_is_reported_and_untouched(tmp_path: Path, capsys) -> None:
    import hashlib

    import xarray as xr

    from core.testing import analysis_dataset

    root = tmp_path / "out"
    store = root / "data" / "analysis.zarr"
    analysis_dataset().drop_attrs().to_zarr(store, zarr_format=3, consolidated=False)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in store.rglob("*") if p.is_file()}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths: {{root: {root}}}\ngrid: {{preset: tiny}}\n")
    assert main(["ingest", "--config", str(cfg)]) == 2
    assert "missing root attribute 'schema_version'" in capsys.readouterr().err
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in store.rglob("*") if p.is_file()} == before
    assert xr.open_zarr(store, consolidated=False).sizes["time"] == 8


def test_console_script_help_lists_every_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True, check=True)
    for word in ("demo", "ingest", "train", "forecast", "render", "serve"):
        assert word in out.stdout
    assert build_parser().parse_args(["demo", "--no-serve"]).no_serve


def test_serve_answers_http_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:  # a free port for this test
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths: {{root: {tmp_path / 'out'}}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--config", str(cfg), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.monotonic() + 60, None
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.3)
        assert body is not None and '"ok"' in body, f"no /health answer; server output:\n{proc.stdout.read()}"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "serving published runs" in out


def test_logs_outside_a_flow_run_print_without_prefect_warnings() -> None:
    # `spherecast demo` serves after its flows ran, with Prefect's logging set up for our loggers: each log
    # line of the server used to come with a UserWarning that the API handler had no flow run to attach it to.
    code = ("from pipelines.cli import prefect_environment; prefect_environment()\n"
            "from prefect.logging.configuration import setup_logging; setup_logging()\n"
            "import logging; logging.getLogger('serve.app').warning('serving published runs from x')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    both = out.stdout + out.stderr
    assert "serving published runs from x" in both
    assert "UserWarning" not in both and "without a flow run id" not in both, both


@pytest.fixture
def two_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.cuda`` reporting two GPUs, as on a CUDA host (nothing runs on them)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("command", ["train", "demo"])
def test_more_ranks_than_gpus_is_one_clear_error_before_any_work(tmp_path: Path, capsys, two_fake_gpus,
                                                                command: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths: {{root: {tmp_path / 'out'}}}\n")
    args = [command, "--config", str(cfg)] + (["--nproc-per-node", "4"] if command == "train" else [])
    if command == "demo":
        cfg.write_text(cfg.read_text() + "train: {nproc_per_node: 3}\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    wanted = "4" if command == "train" else "3"
    assert err.startswith(f"spherecast: error: train.nproc_per_node (--nproc-per-node) is {wanted} but 2 GPU(s) "
                          "are visible"), err
    assert "use 1..2 ranks per node" in err
    assert not (tmp_path / "out").exists()


def test_the_train_task_refuses_more_ranks_than_gpus_before_writing_its_config(tmp_path: Path, two_fake_gpus) -> None:
    from pipelines.tasks import train_task

    config = load_config(env={}, overrides={"paths": {"root": str(tmp_path / "out")}, "train": {"nproc_per_node": 3}})
    with pytest.raises(ValueError, match=r"train.nproc_per_node is 3 but 2 GPU\(s\) are visible"):
        train_task.fn(config)
    assert not (tmp_path / "out").exists()
    cpu = load_config(env={}, overrides={"train": {"nproc_per_node": 3}})
    assert "--nproc_per_node=3" in torchrun_command(cpu, tmp_path / "c.yaml")  # the command itself never checks


def test_device_cuda_without_cuda_is_one_clear_error_before_any_work(tmp_path: Path, capsys, monkeypatch) -> None:
    import torch

    from pipelines.tasks import train_task

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths: {{root: {tmp_path / 'out'}}}\n")
    assert main(["train", "--config", str(cfg), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spherecast: error: train.device is 'cuda' but "), err
    assert "use train.device cpu or auto" in err
    config = load_config(env={}, overrides={"paths": {"root": str(tmp_path / "out")}, "train": {"device": "cuda"}})
    with pytest.raises(ValueError, match="^train.device is 'cuda' but "):
        train_task.fn(config)
    assert not (tmp_path / "out").exists()


def test_device_cpu_launches_more_cpu_ranks_than_gpus(tmp_path: Path, two_fake_gpus, monkeypatch) -> None:
    from pipelines import cli, flows

    launched = []
    monkeypatch.setattr(cli, "prefect_environment", lambda: None)
    monkeypatch.setattr(flows, "train_sfno", lambda path, overrides: launched.append(overrides) or "checkpoint.pt")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths: {{root: {tmp_path / 'out'}}}\n")
    assert main(["train", "--config", str(cfg), "--nproc-per-node", "4", "--device", "cpu"]) == 0
    assert launched == [{"train": {"nproc_per_node": 4, "device": "cpu"}}]
    assert main(["train", "--config", str(cfg), "--nproc-per-node", "4"]) == 2  # auto: the 2 GPUs, refused
    assert len(launched) == 1


def test_train_takes_the_node_and_rendezvous_options(tmp_path: Path, monkeypatch) -> None:
    from pipelines import cli, flows

    launched = []
    monkeypatch.setattr(cli, "prefect_environment", lambda: None)
    monkeypatch.setattr(flows, "train_sfno", lambda path, overrides: launched.append(overrides) or "checkpoint.pt")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths: {{root: {tmp_path / 'out'}}}\ntrain: {{device: cpu}}\n")
    args = ["train", "--config", str(cfg), "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29400",
            "--nproc-per-node", "2", "--max-restarts", "3"]
    assert main(args) == 0
    assert launched == [{"train": {"nproc_per_node": 2, "nnodes": 2, "node_rank": 1, "rdzv_endpoint": "node0:29400",
                                   "max_restarts": 3}}]


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "node0:29400"], "node_rank 2 must be in 0..1 (nnodes 2)"),
        (["--nnodes", "2", "--node-rank", "-1", "--rdzv-endpoint", "node0:29400"], "node_rank -1 must be in 0..1"),
        (["--nnodes", "2"], "nnodes 2 needs rdzv_endpoint (host:port of node 0"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0"], "rdzv_endpoint 'node0' is not host:port"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0:http"], "rdzv_endpoint 'node0:http' is not host:port"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0:70000"], "rdzv_endpoint 'node0:70000' is not host:port"),
        (["--nnodes", "0"], "nnodes 0 and nproc_per_node 1 must be ≥ 1"),
    ],
)
def test_bad_node_options_are_one_line_errors_before_any_work(tmp_path: Path, capsys, options: list[str],
                                                              needle: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"paths: {{root: {tmp_path / 'out'}}}\n")
    assert main(["train", "--config", str(cfg), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spherecast: error: invalid config") and needle in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
