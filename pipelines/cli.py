"""``spherecast`` command line: each subcommand runs one Prefect flow (or the server)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from core.errors import ConfigError, SpherecastError

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "core,ingest,models,serve",
    "PREFECT_UI_ENABLED": "false",
    # The server (and code run outside a flow) logs through the same loggers; without a flow run there
    # is nothing to attach API logs to, and the console handler already shows them.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


NPROC_SETTING = "train.nproc_per_node (--nproc-per-node)"


def prefect_environment() -> None:
    """Offline-friendly Prefect defaults; a value the user already set wins."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _render_run(args: argparse.Namespace) -> str:
    run = args.run_name or args.run
    if not run or (args.run_name and args.run and args.run_name != args.run):
        raise ConfigError("render needs one run name: spherecast render RUN [--products …] [--regions …]")
    return run


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing: give comma-separated names, e.g. global,europe")
    return names


def _moment(text: str) -> str:
    """An argparse type: ``text`` unchanged if it reads as a date/time, else a usage error (exit 2)."""
    import pandas as pd

    try:
        pd.Timestamp(text)
    except ValueError as exc:  # pandas' own parse error, a bare ValueError, would otherwise be a traceback
        raise argparse.ArgumentTypeError(f"{text!r} is not a date/time (use e.g. 2000-01-05T18)") from exc
    return text


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, (section, key) in {
        "start": ("ingest", "start"), "end": ("ingest", "end"), "workers": ("ingest", "workers"),
        "scheduler_address": ("ingest", "scheduler_address"),
        "budget_minutes": ("train", "budget_minutes"), "nproc_per_node": ("train", "nproc_per_node"),
        "nnodes": ("train", "nnodes"), "node_rank": ("train", "node_rank"), "rdzv_endpoint": ("train", "rdzv_endpoint"),
        "max_restarts": ("train", "max_restarts"),
        "device": ("train", "device"),
        "init_time": ("forecast", "init_time"), "lead_hours": ("forecast", "lead_hours"), "grid": ("forecast", "grid"),
        "host": ("serve", "host"), "port": ("serve", "port"), "serve_workers": ("serve", "workers"),
        "products": ("render", "products"), "regions": ("render", "regions"), "render_workers": ("render", "workers"),
    }.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    if getattr(args, "members", None) is not None:
        out.setdefault("forecast", {})["ensemble"] = {"members": args.members}
    return out


def _print_scores(scores: dict[int, Any]) -> None:
    print("\nlead   model rel.err   persistence rel.err   (RMSE / RMS of anomaly; climatology = 1)")
    for lead, row in scores.items():
        rel = row["relative_error"]
        print(f"{lead:4d} h   {rel['model']:.3f}           {rel['persistence']:.3f}")
    if 24 in scores:
        print("\n24 h RMSE by channel (model vs persistence, same initial time):")
        for ch, v in scores[24].items():
            if ch != "relative_error":
                print(f"  {ch:28s} {v['rmse']:10.3f}  vs {v['rmse_persistence']:10.3f}")
        rel = scores[24]["relative_error"]
        verdict = "beats" if rel["model"] < rel["persistence"] else "DOES NOT beat"
        print(f"→ the SFNO {verdict} persistence at 24 h ({rel['model']:.3f} vs {rel['persistence']:.3f})")


H11_MAX_INCOMPLETE_EVENT = 64 * 1024  # bytes of request line + headers uvicorn (h11) buffers before refusing the request


def _serve(config: Any) -> None:
    """Run the HTTP server: in this process, or as ``serve.workers`` uvicorn worker processes sharing the port."""
    import json
    import tempfile
    import threading

    import uvicorn

    from core.config import dump_config
    from serve.app import CONFIG_ENV, app_from_config
    from serve.metrics import MULTIPROC_ENV

    serve = config.serve
    options: dict[str, Any] = {
        "host": serve.host, "port": serve.port, "log_level": "info", "timeout_keep_alive": serve.timeout_keep_alive_s,
        "limit_concurrency": serve.limit_concurrency, "h11_max_incomplete_event_size": H11_MAX_INCOMPLETE_EVENT,
        "timeout_graceful_shutdown": serve.shutdown_timeout_s}
    # Worker processes need the main thread's signal handling; the demo serves from a background thread.
    workers = serve.workers if threading.current_thread() is threading.main_thread() else 1
    print(f"serving {config.paths.forecasts} on http://{serve.host}:{serve.port}{serve.root_path}/ "
          f"with {workers} worker{'s' if workers > 1 else ''} (Ctrl-C stops)")
    if workers == 1:
        uvicorn.run(app_from_config(config), **options)
        return
    with tempfile.TemporaryDirectory(prefix="spherecast-serve-") as tmp:
        # Workers import the app by name, so they get the resolved config through a file, and their metrics
        # through a fresh multiprocess directory (stale counts of an earlier server must not be summed in).
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(dump_config(config)))
        metrics_dir = Path(tmp) / "metrics"
        metrics_dir.mkdir()
        saved = {key: os.environ.get(key) for key in (CONFIG_ENV, MULTIPROC_ENV)}
        os.environ[CONFIG_ENV], os.environ[MULTIPROC_ENV] = str(config_file), str(metrics_dir)
        try:
            uvicorn.run("serve.app:app_from_env", factory=True, workers=workers, **options)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _data(config: Any, args: argparse.Namespace) -> int:
    from core.location import as_location
    from ingest.check import check_store, inspect_store

    store = as_location(args.store) if args.store else config.paths.analysis_store
    if args.action == "inspect":
        print(inspect_store(store))
        return 0
    if args.action == "repair":
        from ingest.repair import repair_store

        result = repair_store(config, store, progress=True)
        print(result.report())
        return 0 if result.ok else 1
    # A store with times not yet done is a failed check unless the caller says a partial store is expected.
    report = check_store(store, full=not args.quick, require_complete=not args.allow_incomplete)
    print(report.report())
    return 0 if report.ok else 1


def _ingest_without_prefect(config: Any, append: bool) -> int:
    """The one ingest path with its executor and the cycle lock, but no Prefect: print what it did."""
    from ingest.build import executor_for, ingest
    from pipelines.cycles import exclusive_cycle

    with exclusive_cycle(config), executor_for(config) as executor:
        report = ingest(config, progress=True, append=append, executor=executor)
    print(f"{report.path}: {report.written} slabs written, {report.skipped} already done, {report.rechecked} "
          f"re-checked, {report.replaced} preliminary times replaced")
    return 0


def _describe_cycle(result: dict[str, Any]) -> str:
    """One line per cycle: what the trigger did."""
    match result["action"]:
        case "published":
            return f"published {result['run_dir']}"
        case "existing":
            return f"already published (nothing done; --force replaces it): {result['run_dir']}"
        case _:
            return f"{result['action']} {result.get('init_time') or ''}: {result['reason']}".replace("  ", " ")


def _status(config: Any) -> int:
    """Print the newest run and its age against the schedule; exit 1 when late."""
    from core.retention import run_status

    st = run_status(config.paths.forecasts, config.forecast.cycle_hours, config.forecast.wait_minutes)
    if st["newest_run"] is None:
        print(f"late: {st['reason']} in {config.paths.forecasts}")
    else:
        print(f"{st['status']}: newest run {st['newest_run']} (init {st['init_time']}) published {st['published']}, "
              f"{st['age_hours']:.1f} h ago; allowed {st['allowed_hours']:g} h "
              f"(cycle {st['cycle_hours']} h + wait)")
    return 0 if st["status"] == "ok" else 1


def run(args: argparse.Namespace) -> int:
    """Dispatch one parsed command."""
    from core.config import load_config

    config_path = str(args.config) if args.config else None
    overrides = _overrides(args)
    config = load_config(config_path, overrides=overrides)  # fail fast, before Prefect starts
    if args.command in ("train", "demo", "retrain"):
        from models.distributed import check_gpu_ranks

        # train.device cpu skips the GPU count; cuda without CUDA is refused here, before Prefect starts.
        check_gpu_ranks(config.train.nproc_per_node, NPROC_SETTING, config.train.device)
    if args.command == "serve":
        _serve(config)
        return 0
    if args.command == "data":
        return _data(config, args)
    if args.command == "status":
        return _status(config)
    if args.command == "lineage":
        return _lineage(config, args)
    if args.command == "schedule":
        from pipelines.schedule import schedule

        return schedule(args.prefect_host, args.prefect_port)
    if args.command == "forecast":
        from pipelines.cycles import check_request, cycle_times

        check_request(config)  # a bad horizon fails here, before Prefect starts
        if args.backfill:
            cycle_times(*args.backfill, config.forecast.cycle_hours)
    if args.command == "render":
        from serve.regions import resolve_regions

        _render_run(args)
        resolve_regions(config.render.regions, config.render.boxes)  # an unknown region fails before Prefect starts
    if args.command == "ingest":
        from core.config import absolute_paths
        from ingest.build import plan_ingest, source_for
        from ingest.orchestrate import validate_source

        source = source_for(absolute_paths(config))
        plan = plan_ingest(config, append=args.append, source=source)  # a bad request fails here, before Prefect
        if args.plan:
            print(plan.describe())
            return 0
        # Bad files, missing times or credentials fail here in seconds, not after Prefect's start-up.
        validate_source(source, plan, config.task.variables, config.task.levels)
        if args.no_prefect:
            return _ingest_without_prefect(config, args.append)
    prefect_environment()
    from pipelines.prefect_server import temporary_prefect_server

    with temporary_prefect_server():  # dies with this process, even on kill -9 (Prefect's own would not)
        return _run_flow(args, config, config_path, overrides)


def _run_flow(args: argparse.Namespace, config: Any, config_path: str | None, overrides: dict[str, Any]) -> int:
    """Run the Prefect flow of a parsed command (a server is already there) and print its result."""
    from pipelines import flows

    if args.command == "demo":
        result = flows.demo(config_path, overrides)
        _print_scores(result["scores"])
        print(f"\ncheckpoint: {result['checkpoint']}\nforecast run: {result['run_dir']}")
        if args.live:
            _live(config, config_path, overrides, args)
        elif not args.no_serve:
            _serve(config)
    elif args.command == "ingest":
        print(flows.ingest_era5(config_path, overrides, append=args.append))
    elif args.command == "train":
        print(flows.train_sfno(config_path, overrides))
    elif args.command == "forecast" and args.backfill:
        for result in flows.backfill_forecasts(*args.backfill, config_path, overrides, force=args.force):
            print(_describe_cycle(result))
    elif args.command == "forecast":
        print(_describe_cycle(flows.run_forecast(config_path, overrides, force=args.force)))
    elif args.command == "render":
        print(flows.rerender(config_path, overrides, _render_run(args)))
    elif args.command == "verify":
        r = flows.verify_forecasts(config_path, overrides)
        print(f"scored {r['scored']}, up to date {len(r['skipped'])}, awaiting truth {r['pending']}\n"
              f"database {r['database_url']}")
    elif args.command == "retrain":
        r = flows.retrain_weekly(config_path, overrides)
        print(f"{r['decision']}: {r['run_name']} ({r['comparison']['reason']}); current model {r['current']}")
    elif args.command == "initial-conditions":
        print(flows.update_initial_conditions_flow(config_path, overrides, now=args.now))
    return 0


def _lineage(config: Any, args: argparse.Namespace) -> int:
    """Print a published run's lineage, as text or JSON."""
    import json

    from core.lineage import format_lineage, lineage

    record = lineage(config, args.run)
    print(json.dumps(record, indent=2) if args.json else format_lineage(record))
    return 0


def _live(config: Any, config_path: str | None, overrides: dict[str, Any], args: argparse.Namespace) -> None:
    """After the demo: the planet as a live source, with the viewer served from a background thread."""
    import threading

    from pipelines.live import live_demo

    if not args.no_serve:
        threading.Thread(target=_serve, args=(config,), name="viewer", daemon=True).start()
    summary = live_demo(config_path, overrides, cycles=args.cycles, interval_seconds=args.interval)
    print(f"live demo: {summary}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="spherecast", description="AI weather forecasting: ingest → train → forecast → maps → HTTP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, help="YAML config file (SPHERECAST_* variables override it)")
        return p

    p = add("demo", "Simulate the planet, train, forecast 5 days, render maps, print skill, then serve.")
    p.add_argument("--no-serve", action="store_true", help="stop after printing the results")
    p.add_argument("--budget-minutes", type=float, help="training budget")
    p.add_argument("--live", action="store_true",
                   help="then feed the planet as a live source: 6 h arrive per interval, a cycle runs, runs are scored")
    p.add_argument("--cycles", type=int, help="--live: cycles to run (default: until Ctrl-C)")
    p.add_argument("--interval", type=float, default=180.0, help="--live: seconds between cycles (default 180)")
    p = add("ingest", "Build, resume or append to the analysis store and refresh its statistics.")
    p.add_argument("--start", help="first analysis time, e.g. 2000-01-01T00")
    p.add_argument("--end", help="last analysis time (later than the store's: the store is extended)")
    p.add_argument("--append", action="store_true",
                   help="extend the store to the newest time the source serves and re-check preliminary (ERA5T) times")
    p.add_argument("--plan", action="store_true", help="print what would be fetched and written, then stop")
    p.add_argument("--no-prefect", action="store_true",
                   help="run the same ingest in this process, without a Prefect server or flow run (no per-slab "
                        "task retries, no verification afterwards): for scripts and one-off builds")
    p.add_argument("--workers", type=int, help="Dask LocalCluster workers")
    p.add_argument("--scheduler-address", help="use an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    p = add("data", "Inspect, check or repair the analysis store.")
    p.add_argument("action", choices=["inspect", "check", "repair"],
                   help="inspect: summary; check: exit 1 on any problem; repair: re-fetch the slabs whose chunks "
                        "check finds damaged or missing, exit 1 if damage remains")
    p.add_argument("--store", help="store path (default: the config's analysis store)")
    p.add_argument("--quick", action="store_true", help="check: skip decoding every chunk")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="check: times not yet ingested are a note, not a problem (an ingest still under way)")
    p = add("train", "Train the SFNO under torchrun (on each node of a multi-node run: docs/operations-training.md).")
    p.add_argument("--budget-minutes", type=float, help="training budget")
    p.add_argument("--nproc-per-node", type=int, help="ranks on this machine")
    p.add_argument("--nnodes", type=int, help="nodes in the run (train.nnodes); the same on every node")
    p.add_argument("--node-rank", type=int, help="this node's index 0..nnodes-1 (train.node_rank); 0 on the endpoint host")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="rendezvous of a multi-node run (train.rdzv_endpoint): node 0's host and a free port")
    p.add_argument("--max-restarts", type=int,
                   help="restarts of all ranks after a failure or a lost node (train.max_restarts); they resume")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where each rank trains (train.device): auto = cuda where it exists, else cpu")
    p = add("forecast", "Run and publish a forecast.")
    p.add_argument("--init-time", help="initial time, or 'latest'")
    p.add_argument("--lead-hours", type=int, help="forecast length in hours")
    p.add_argument("--members", type=int, help="ensemble members (forecast.ensemble.members; 1 = deterministic)")
    p.add_argument("--grid", help="grid preset to run on (forecast.grid): the same weights, the initial state moved there")
    p.add_argument("--force", action="store_true", help="replace a run already published for this initial time")
    p.add_argument("--backfill", nargs=2, metavar=("START", "END"), type=_moment,
                   help="run every cycle from START to END (forecast.cycle_hours apart), skipping published ones")
    p = add("status", "Report the newest published run and its age against the schedule (exit 1 when late).")
    p = add("schedule", "Start a Prefect server, a worker and the deployments of flows.yaml; Ctrl-C stops them.")
    p.add_argument("--prefect-host", default="127.0.0.1", help="interface the Prefect server binds to")
    p.add_argument("--prefect-port", type=int, default=4200, help="port of the Prefect server and its UI")
    p = add("verify", "Score every published run whose truth has arrived; write scores, the table and scorecards.")
    p = add("lineage", "Show a published run's lineage: dataset version → stats → checkpoint → forecast → scores.")
    p.add_argument("run", help="run name, e.g. 20000320T00")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p = add("retrain", "Train a dated run on the rolling window; promote it only if it beats the current model.")
    p.add_argument("--budget-minutes", type=float, help="training budget of the new run")
    p.add_argument("--nproc-per-node", type=int, help="ranks on this machine")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where each rank trains (train.device)")
    p = add("initial-conditions", "Fetch the newest live initial conditions (initial_conditions.source) into their store.")
    p.add_argument("--now", type=_moment, help="the clock to judge which cycles exist (default: now, UTC)")
    p = add("render", "Re-render the maps of a published run (republished by rename, maps/ replaced whole).")
    p.add_argument("run_name", nargs="?", metavar="RUN", help="run name, e.g. 20000320T00")
    p.add_argument("--run", help="the run name, as an option (older spelling)")
    p.add_argument("--products", type=_names, help="comma-separated products (docs/maps.md); default render.products")
    p.add_argument("--regions", type=_names, help="comma-separated regions or boxes; default render.regions")
    p.add_argument("--workers", dest="render_workers", type=int, help="rendering processes (0: every core)")
    p = add("serve", "Serve published runs, maps and the viewer over HTTP.")
    p.add_argument("--host", help="interface to bind")
    p.add_argument("--port", type=int, help="port")
    p.add_argument("--workers", type=int, dest="serve_workers",
                   help="server processes sharing the port (serve.workers); /metrics covers them all")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spherecast`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's API chatter drowns the progress
    try:
        return run(args)
    except SpherecastError as exc:  # what the user can fix; anything else is a bug and keeps its traceback
        print(f"spherecast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
