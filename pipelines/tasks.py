"""Prefect tasks: each calls one package function and passes paths. No science lives here."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

import models
from core.config import Config, dump_config
from core.errors import ConfigError, MissingInputError
from core.fields import to_channels
from core.grid import get_grid
from core.ic_select import InitChoice, check_compatible, choose_init, latest_cycle
from core.lineage import record_training_inputs
from core.processes import die_with_parent
from core.redact import redact
from core.retention import apply_retention, sweep_leftovers
from core.runs import MANIFEST, publish, run_name, sha256_file, staging_dir, write_manifest
from core.verification import score_forecast
from ingest.build import finish_ingest, ingest
from models.checkpoint import code_version, register_checkpoint
from models.data import open_analysis
from models.distributed import check_gpu_ranks, wait_for_endpoint
from models.ensemble import residual_bank, stream_ensemble
from models.forecast import load_forecaster
from models.regrid_spectral import spectral_regrid
from pipelines.cycles import CycleResult, check_request, exclusive_cycle, pick_latest, record, wait_for_init
from serve.maps import render_run_maps

PROJECT_ROOT = Path(models.__file__).resolve().parents[1]


def render_options(config: Config) -> dict[str, Any]:
    """The map rendering settings of ``config.render``, as keyword arguments of ``render_run_maps``."""
    r = config.render
    return {"dpi": r.dpi, "natural_earth_dir": r.natural_earth_dir, "products": r.products, "regions": r.regions,
            "boxes": r.boxes, "workers": r.workers, "animations": r.animations}


@task(name="ingest-analysis", cache_policy=NO_CACHE)
def ingest_task(config: Config) -> str:
    """Build or resume the analysis store and its statistics."""
    report = ingest(config, progress=True)
    get_run_logger().info("analysis store %s: %d slabs written, %d already done", report.path, report.written,
                          report.skipped)
    return str(report.path)


@task(name="ingest-statistics", cache_policy=NO_CACHE)
def stats_task(config: Config) -> str | None:
    """Recompute the normalization statistics over the training period."""
    path = finish_ingest(config)
    return str(path) if path else None


def torchrun_command(config: Config, config_file: Path) -> list[str]:
    """The torchrun invocation of this node for a training config (standalone, or a c10d rendezvous with restarts)."""
    t = config.train
    # After a rank dies torchrun restarts every rank up to max_restarts times; they resume from last.pt.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={t.nproc_per_node}", f"--nnodes={t.nnodes}",
           f"--max-restarts={t.max_restarts}"]
    if t.rdzv_endpoint:
        # torchrun ignores --node-rank under c10d (it ranks nodes itself, by their sorted host and pid), so the node
        # rank says who hosts the rendezvous store: node 0, on the endpoint's host. Every node uses the run name as
        # the rendezvous id, so all join the same run; the timeouts bound the wait for the endpoint and the nodes.
        conf = f"join_timeout={t.rdzv_timeout_s},read_timeout={t.rdzv_timeout_s},is_host={int(t.node_rank == 0)}"
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={t.rdzv_endpoint}", f"--rdzv_id={t.run_name}",
                f"--rdzv_conf={conf}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "models.train", "--config", str(config_file)]


def torchrun_environment(config: Config, base: dict[str, str]) -> dict[str, str]:
    """The environment of this node's torchrun agent: ``base`` plus the project on the path and multi-node settings."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    if config.train.rdzv_endpoint:
        # torch 2.13's shared store breaks a replaced node: the surviving rank-0 agent keeps its bootstrap address
        # and never republishes it in the new round, so the newcomer waits for MASTER_ADDR until read_timeout
        # (measured: docs/operations-training.md). Without sharing, every round publishes a fresh address.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def rendezvous_failure(config: Config, tail: list[str]) -> str | None:
    """A one-line reason when torchrun's log ``tail`` shows this node never joined its rendezvous; None otherwise."""
    t = config.train
    text = "\n".join(tail)
    if not t.rdzv_endpoint:
        return None
    if (at := text.find("nodes disagree on train.nnodes")) >= 0:  # a world formed, and every rank refused it
        return f"node {t.node_rank} of {t.nnodes} (run {t.run_name!r}): " + text[at:].splitlines()[0]
    if not any(k in text for k in ("RendezvousConnectionError", "RendezvousTimeoutError", "RendezvousClosedError")):
        return None
    return (f"node {t.node_rank} of {t.nnodes} could not join the rendezvous at {t.rdzv_endpoint} (run {t.run_name!r}) "
            f"within train.rdzv_timeout_s={t.rdzv_timeout_s} s: start every node with the same --nnodes, "
            "--rdzv-endpoint and run name, node 0 on the endpoint's host")


@task(name="train-torchrun", cache_policy=NO_CACHE)
def train_task(config: Config) -> str:
    """Run this node's ``torchrun … -m models.train`` as a subprocess, streaming its log; return the checkpoint.

    Node 0 (the head) writes ``config.yaml``, records the training inputs and registers the checkpoint;
    another node (``train.node_rank`` > 0) first waits for the head's rendezvous endpoint, then writes only
    ``config.node<R>.yaml`` for its own agent. The run directory must be shared by every node.
    """
    t = config.train
    # Before the run directory is made: too many GPU ranks, or train.device cuda without CUDA.
    check_gpu_ranks(t.nproc_per_node, "train.nproc_per_node", t.device)
    head = t.node_rank == 0
    if not head and t.rdzv_endpoint:  # node 0 hosts the endpoint; the others fail here, naming it, when it is silent
        wait_for_endpoint(t.rdzv_endpoint, t.rdzv_timeout_s)
    logger = get_run_logger()
    run_dir = config.paths.runs / t.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / ("config.yaml" if head else f"config.node{t.node_rank}.yaml")
    config_file.write_text(yaml.safe_dump(dump_config(config), sort_keys=False))
    if head:
        record_training_inputs(config)  # lineage: the dataset version and stats this run starts from
    cmd = torchrun_command(config, config_file)
    env = torchrun_environment(config, dict(os.environ))
    env.setdefault("TQDM_MININTERVAL", "20")  # a bar redraw per 20 s keeps the streamed log readable
    logger.info("launching node %d of %d: %s", t.node_rank, t.nnodes, " ".join(cmd))
    # torchrun (and its ranks, which it stops) must not outlive this task if the worker is killed hard.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=die_with_parent())
    tail: list[str] = []
    buffer = b""
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096):
        buffer += chunk
        *lines, buffer = re.split(rb"[\r\n]", buffer)
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if line:
                logger.info("%s", line)
                tail = (tail + [line])[-40:]
    code = proc.wait()
    if code != 0:
        if reason := rendezvous_failure(config, tail):
            raise ConfigError(reason)
        raise RuntimeError(f"torchrun exited with code {code}; last lines:\n" + "\n".join(tail[-20:]))
    checkpoint = run_dir / "checkpoint.pt"
    if not head:  # the head registers the run's one checkpoint
        return str(checkpoint)
    entry = register_checkpoint(checkpoint, config.paths.runs / "registry.jsonl")
    logger.info("registered checkpoint %s sha256 %s (dataset %s, code %s)", checkpoint, entry["sha256"],
                entry["dataset_version"], entry["code_version"])
    return str(checkpoint)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a run, the module logger outside (a task called as a plain function)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(name="wait-initial-conditions", cache_policy=NO_CACHE)
def wait_task(config: Config, now: str | None = None) -> tuple[InitChoice | None, str]:
    """The cycle's initial state once complete (bounded wait), or ``(None, why)`` when the late policy skips it."""
    check_request(config)
    if config.forecast.init_time == "latest":
        return pick_latest(config, now)
    return wait_for_init(config, config.forecast.init_time), ""


@task(name="forecast-publish", cache_policy=NO_CACHE)
def forecast_task(config: Config, choice: InitChoice | None = None, force: bool = False) -> dict[str, Any]:
    """One cycle under the cycle lock: a no-op if already published (unless ``force``), else roll out and publish."""
    check_request(config)
    if choice is None:
        init = config.forecast.init_time
        choice = latest_cycle(config) if init == "latest" else choose_init(config, init)
    forecasts = config.paths.forecasts
    name = run_name(choice.init_time)
    final = forecasts / name
    with exclusive_cycle(config) as acquired:
        swept = sweep_leftovers(forecasts)  # staging of killed runs, before this run stages its own
        if not force and (final / MANIFEST).is_file():
            result = CycleResult("existing", name, str(final), choice.init_time.isoformat(),
                                 "already published; force (--force) replaces it")
            record(config, result, acquired, swept=swept)
            _logger().info("run %s is already published: nothing to do", name)
            return result.to_dict()
        timings: dict[str, float] = {}
        try:
            produce_run(config, choice, name, timings)
        except BaseException as exc:
            record(config, CycleResult("failed", name, None, choice.init_time.isoformat(), str(exc)), acquired)
            raise
        result = CycleResult("published", name, str(final), choice.init_time.isoformat())
        try:
            kept = apply_retention(forecasts, config.forecast.keep_runs, config.paths.runs)
        except (OSError, ValueError) as exc:  # the run is published; a retention problem must not undo that
            _logger().warning("retention after %s failed: %s", name, exc)
            record(config, result, acquired, swept=swept, retention_error=str(exc), timings=timings)
        else:
            record(config, result, acquired, swept=swept, retention_removed=kept.removed,
                   retention_protected=kept.protected, timings=timings)
    return result.to_dict()


def produce_run(config: Config, choice: InitChoice, name: str, timings: dict[str, float] | None = None) -> Path:
    """Roll out lead by lead into Zarr (members, mean and spread for an ensemble), write the files, maps, publish.

    ``timings`` (if given) gains the seconds of each phase: load, rollout, write, render, publish.
    """
    logger = _logger()
    clock = timings if timings is not None else {}
    began = time.perf_counter()
    checkpoint = config.checkpoint_path()
    if not checkpoint.is_file():
        raise MissingInputError(f"checkpoint {checkpoint} does not exist; run `spherecast train` first")
    model, meta = load_forecaster(checkpoint)
    initial = initial_state_for(config, choice, meta)
    ens = config.forecast.ensemble
    bank = None
    if ens.members > 1 and ens.residual_scale > 0:
        # Residuals are measured on the training store (ERA5 truth), never on live initial conditions.
        bank = residual_bank(model, meta, open_analysis(config.paths.analysis_store), cache_dir=checkpoint.parent)
    clock["load"] = time.perf_counter() - began
    staging = staging_dir(config.paths.forecasts, name)
    try:
        # Each lead goes to the store as it is computed; maps then read the store one channel at a time.
        forecast = stream_ensemble(model, meta, initial, choice.init_time, config.forecast.lead_hours, staging, ens,
                                   formats=config.forecast.formats, residual_bank=bank, timings=clock)
        began = time.perf_counter()
        maps = render_run_maps(forecast, staging, provenance=choice.provenance(), **render_options(config))
        clock["render"] = time.perf_counter() - began
        began = time.perf_counter()
        provenance = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
                      "weights_sha256": meta["weights_sha256"], "dataset_version": meta["dataset_version"],
                      "code_version": code_version(), "lead_hours": config.forecast.lead_hours,
                      "channels": list(meta["channels"]), "ensemble_members": ens.members,
                      "grid": str(forecast.attrs.get("grid", "")), "model_grid": str(meta["grid"]),
                      **choice.provenance(), "config": redact(dump_config(config))}
        write_manifest(staging, choice.init_time, provenance)
        final = publish(staging, config.paths.forecasts / name)
        clock["publish"] = time.perf_counter() - began
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("published %s from the %s store (%s, %s) with %d maps", final, choice.kind, choice.source,
                choice.dataset_version, len(maps))
    return final


def initial_state_for(config: Config, choice: InitChoice, meta: dict[str, Any]) -> xr.Dataset:
    """The chosen store, checked against the checkpoint; moved to ``forecast.grid`` when that differs (zero-shot)."""
    analysis = open_analysis(choice.store)
    check_compatible(meta, analysis, choice.store, config.forecast.grid)
    if config.forecast.grid is None:
        return analysis
    target = get_grid(config.forecast.grid)
    if (analysis.sizes["latitude"], analysis.sizes["longitude"]) == target.shape:
        return analysis
    ens = config.forecast.ensemble
    if ens.members > 1 and ens.residual_scale > 0:
        raise ConfigError(f"forecast.grid {target.name} differs from the store's grid, and the ensemble's residuals are "
                          "measured on the training grid; set forecast.ensemble.residual_scale: 0 for a transfer")
    task = meta["task"]
    step, history = int(task["time_step_hours"]), int(task.get("history", 1))
    wanted = [choice.init_time - pd.Timedelta(hours=k * step) for k in range(history - 1, -1, -1)]
    present = [t for t in wanted if t in pd.DatetimeIndex(analysis["time"].values)]
    # Only the states the model starts from are moved; a missing one is reported by the rollout as usual.
    return spectral_regrid(analysis.sel(time=present).load(), target)


@task(name="score-run", cache_policy=NO_CACHE)
def score_task(config: Config, run_dir: str) -> dict[str, Any]:
    """Score a published run against the analysis, persistence and the training-period climatology."""
    import xarray as xr

    analysis = open_analysis(config.paths.analysis_store)
    channels = config.task.channels()
    t = config.train
    clim = to_channels(analysis.sel(time=slice(t.train_start, t.train_end)), channels).mean("time").load()
    with xr.open_zarr(Path(run_dir) / "forecast.zarr", consolidated=False) as fc:
        scores = score_forecast(fc.load(), analysis, channels, clim)
    table: dict[str, Any] = {}
    for i, lead in enumerate(scores["lead_hours"].values.tolist()):
        row = {}
        for ch in channels:
            s = scores.isel(lead_time=i).sel(channel=ch)
            row[ch] = {k: float(s[k]) for k in ("rmse", "rmse_persistence", "rmse_climatology", "acc")}
        rel = [row[ch]["rmse"] / row[ch]["rmse_climatology"] for ch in channels]
        rel_p = [row[ch]["rmse_persistence"] / row[ch]["rmse_climatology"] for ch in channels]
        row["relative_error"] = {"model": float(np.mean(rel)), "persistence": float(np.mean(rel_p))}
        table[int(lead)] = row
    return table


@task(name="rerender-maps", cache_policy=NO_CACHE)
def rerender_task(config: Config, name: str) -> str:
    """Copy a published run aside, re-render its maps, re-checksum, and publish it again."""
    import json

    import xarray as xr

    from core.runs import list_runs, parse_run_name

    parse_run_name(name)
    if name not in list_runs(config.paths.forecasts):
        raise MissingInputError(f"no published run {name!r} in {config.paths.forecasts}")
    src = config.paths.forecasts / name
    staging = staging_dir(config.paths.forecasts, name)
    try:
        shutil.copytree(src, staging, dirs_exist_ok=True)
        shutil.rmtree(staging / "maps", ignore_errors=True)
        with xr.open_zarr(staging / "forecast.zarr", consolidated=False) as fc:
            provenance = json.loads((src / "manifest.json").read_text())["provenance"]
            render_run_maps(fc.load(), staging, provenance=provenance, **render_options(config))
        write_manifest(staging, parse_run_name(name), provenance)
        return str(publish(staging, src))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
