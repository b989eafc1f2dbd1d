"""Serving benchmark on loopback: file download speed and CPU against ``python -m http.server``, and a load test.

Part 1 (download): one 200 MiB file of random bytes is published in a temporary forecasts
directory as a real run (manifest with sha256, so each download goes through the catalog and
its checksum check; a warm-up request pays the one-off sha256). ``spherecast``'s app under
uvicorn and ``python -m http.server`` (serving the run directory itself, so the very same file)
run as subprocesses on free 127.0.0.1 ports; ``curl`` in its own process downloads the file from
each in turn, interleaved, ``--repeats`` times. Reported: median MB/s of each and the ratio, and
the server's CPU per byte (utime+stime from ``/proc/<pid>/stat`` of the server and its worker
children, before and after each download) and the ratio.
Part 2 (load): ``--clients`` concurrent httpx clients in a separate process hit the app for
``--load-seconds`` with a mix of /runs, /runs/{run}, a 64 KiB byte range and a map PNG:
requests, errors, req/s, p50/p99 latency and the server's cores used (CPU s / wall s).
Part 3 (points): ``benches.serve_edr.point_latency`` when that module exists.

``--workers N`` runs N uvicorn worker processes through the factory :func:`bench_app` (the same
``create_app`` with the bench's settings). ``serve.app.app_from_env`` is not used: it needs a whole
project config file, and the config does not carry ``chunk_size``.

Usage: python benches/serve.py [--quick] [--json PATH] [--workers N] [--load-seconds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and "serve" would name this file, not the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from core.runs import publish, staging_dir, write_manifest  # noqa: E402

RUN = "20000101T00"
BIG = "big.bin"
SMALL = "small.bin"
MAP = "maps/geopotential_500/006.png"
CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVER = """
import sys, uvicorn
from pathlib import Path
from serve.app import create_app
from serve.settings import ServeSettings
forecasts, port, chunk, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
kw = dict(host="127.0.0.1", port=port, log_level="warning")
if workers > 1:  # each worker process builds its own app from the environment
    import os
    os.environ.update(BENCH_SERVE_FORECASTS=forecasts, BENCH_SERVE_CHUNK=chunk)
    uvicorn.run("benches.serve:bench_app", factory=True, workers=workers, **kw)
else:
    uvicorn.run(create_app(ServeSettings(forecasts_dir=Path(forecasts), chunk_size=int(chunk))), **kw)
"""

READER = """
import sys, time, urllib.request
for _ in range(int(sys.argv[2])):
    t, n = time.perf_counter(), 0
    with urllib.request.urlopen(sys.argv[1]) as r:
        while block := r.read(1 << 20):
            n += len(block)
        status = r.status
    print(n / (time.perf_counter() - t), n, status)
"""

# A plain asyncio HTTP/1.1 client on kept-alive connections: httpx's pool spent ~4 ms of client CPU per request
# with 50 connections here and capped the load at ~170 req/s, measuring the client rather than the server.
LOAD_CLIENT = """
import asyncio, json, sys, time
base, clients, seconds, mix = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
host, port = base.split("//")[1].split(":")
lat, errors = [], []
async def get(reader, writer, path, headers):
    extra = "".join(f"{k}: {v}\\r\\n" for k, v in headers.items())
    writer.write(f"GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\n{extra}\\r\\n".encode())
    head = (await reader.readuntil(b"\\r\\n\\r\\n")).decode("latin-1").split("\\r\\n")
    fields = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
    body = await reader.readexactly(int(fields["content-length"]))
    return int(head[0].split()[1]), body
async def worker(i, deadline):
    reader, writer = await asyncio.open_connection(host, int(port))
    k = i
    while time.perf_counter() < deadline:
        path, headers, want = mix[k % len(mix)]
        k += 1
        t = time.perf_counter()
        try:
            status, body = await get(reader, writer, path, headers)
            ok, what = status == want and len(body) > 0, status
        except Exception as exc:
            ok, what = False, repr(exc)
            writer.close()
            reader, writer = await asyncio.open_connection(host, int(port))
        lat.append(time.perf_counter() - t)
        if not ok:
            errors.append(f"{path}: {what}")
    writer.close()
async def main():
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i, t0 + seconds) for i in range(clients)))
    return time.perf_counter() - t0
wall = asyncio.run(main())
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
print(json.dumps({"requests": len(lat), "errors": len(errors), "error_examples": errors[:3], "wall_s": wall,
                  "req_per_s": len(lat) / wall, "p50_ms": q(0.5), "p99_ms": q(0.99)}))
"""


def bench_app() -> Any:
    """The app of one uvicorn worker process, with the settings the bench put in the environment."""
    from serve.app import create_app
    from serve.settings import ServeSettings

    return create_app(ServeSettings(forecasts_dir=Path(os.environ["BENCH_SERVE_FORECASTS"]),
                                    chunk_size=int(os.environ["BENCH_SERVE_CHUNK"])))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_png() -> bytes:
    """A small real PNG (a gradient), standing in for a rendered map."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (120, 1))).save(buf, format="PNG")
    return buf.getvalue()


def build_site(root: Path, big_mib: int) -> Path:
    """A forecasts directory with one published run: the big file, a small one and a map; returns the run dir."""
    forecasts = root / "forecasts"
    tmp = staging_dir(forecasts, RUN)
    with open(tmp / BIG, "wb") as fh:
        for _ in range(big_mib):
            fh.write(os.urandom(1 << 20))
    (tmp / SMALL).write_bytes(os.urandom(1 << 18))
    (tmp / MAP).parent.mkdir(parents=True)
    (tmp / MAP).write_bytes(tiny_png())
    write_manifest(tmp, pd.Timestamp("2000-01-01"), provenance={"checkpoint_sha256": "0" * 64, "dataset_version": "bench", "code_version": "bench"})
    return publish(tmp, forecasts / RUN)


def descendants(pid: int) -> list[int]:
    """The process and all its live descendants (uvicorn's worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process tree, in seconds."""
    ticks = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5), counted after the name
    return ticks / CLK_TCK


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Poll until the server answers (or fail if it died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.args}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:
                r.read()
                return
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not start in {timeout} s")


@contextlib.contextmanager
def server(args: list[str], ready_url: str) -> Iterator[subprocess.Popen]:
    """Start a server subprocess, wait until it answers, stop it at the end (its log is shown if it fails)."""
    log = tempfile.TemporaryFile()  # a file, not a pipe: http.server logs every request and would fill a pipe
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_ready(ready_url, proc)
        yield proc
    except BaseException:
        log.seek(0)
        sys.stderr.write(log.read()[-4000:].decode(errors="replace"))
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def download(url: str, size: int, rounds: int = 1) -> float:
    """Bytes per second of ``rounds`` downloads in one separate client process (curl, else a Python reader)."""
    if shutil.which("curl"):
        cmd = ["curl", "-s", "-w", "%{speed_download} %{size_download} %{http_code}\\n"]
        for _ in range(rounds):
            cmd += ["-o", "/dev/null", url]
    else:
        cmd = [sys.executable, "-c", READER, url, str(rounds)]
    lines = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout.splitlines()
    seconds = 0.0
    for line in lines:
        speed, got, code = line.split()
        if code != "200" or int(float(got)) != size:
            raise RuntimeError(f"download of {url} gave HTTP {code} and {got} of {size} bytes")
        seconds += size / float(speed)
    if len(lines) != rounds:
        raise RuntimeError(f"{len(lines)} of {rounds} downloads of {url} reported")
    return rounds * size / seconds


def bench_download(run_dir: Path, repeats: int, rounds: int, chunk: int, workers: int) -> dict:
    """Paired, interleaved downloads of the big file from both servers: speed and server CPU per byte."""
    size = (run_dir / BIG).stat().st_size
    sc_port, hs_port = free_port(), free_port()
    sc_url, hs_url = f"http://127.0.0.1:{sc_port}/runs/{RUN}/files/{BIG}", f"http://127.0.0.1:{hs_port}/{BIG}"
    sc_args = [sys.executable, "-c", SERVER, str(run_dir.parent), str(sc_port), str(chunk), str(workers)]
    hs_args = [sys.executable, "-m", "http.server", str(hs_port), "--bind", "127.0.0.1", "--directory", str(run_dir)]
    samples: dict[str, list[tuple[float, float, float]]] = {"spherecast": [], "http.server": []}
    with server(sc_args, f"http://127.0.0.1:{sc_port}/runs") as sc, server(hs_args, f"http://127.0.0.1:{hs_port}/") as hs:
        targets = {"spherecast": (sc, sc_url), "http.server": (hs, hs_url)}
        for _, url in targets.values():
            download(url, size)  # warm-up: page cache, and the catalog's one-off sha256 of the file
        for i in range(repeats):
            order = list(targets) if i % 2 == 0 else list(reversed(targets))
            for name in order:
                proc, url = targets[name]
                cpu0, client0 = cpu_seconds(proc.pid), os.times()
                speed = download(url, size, rounds)
                client1 = os.times()
                client = client1.children_user + client1.children_system - client0.children_user - client0.children_system
                samples[name].append((speed, (cpu_seconds(proc.pid) - cpu0) / (rounds * size), client / (rounds * size)))
    out: dict = {"file_mib": size / 2**20, "repeats": repeats, "downloads_per_repeat": rounds, "chunk_size": chunk, "workers": workers}
    for name, rows in samples.items():
        out[name] = {"mb_per_s": [round(s / 1e6, 1) for s, _, _ in rows],
                     "median_mb_per_s": round(statistics.median(s for s, _, _ in rows) / 1e6, 1),
                     "median_cpu_ns_per_byte": round(statistics.median(c for _, c, _ in rows) * 1e9, 3),
                     "median_cpu_ns_per_byte_with_client": round(statistics.median(c + k for _, c, k in rows) * 1e9, 3)}
    sc_, hs_ = out["spherecast"], out["http.server"]
    out["throughput_ratio"] = round(sc_["median_mb_per_s"] / hs_["median_mb_per_s"], 3)
    for ratio, key in (("cpu_per_byte_ratio", "median_cpu_ns_per_byte"),
                       ("cpu_per_byte_ratio_with_client", "median_cpu_ns_per_byte_with_client")):
        out[ratio] = round(sc_[key] / max(hs_[key], 1e-9), 3)
    return out


def bench_load(run_dir: Path, clients: int, seconds: float, chunk: int, workers: int) -> dict:
    """Many concurrent clients on the catalog, a small range and a map: counts, latency, server cores used."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    gzip = {"Accept-Encoding": "gzip"}  # as browsers send it: the catalog's JSON is compressed
    mix = [("/runs", gzip, 200), (f"/runs/{RUN}", gzip, 200),
           (f"/runs/{RUN}/files/{SMALL}", {"Range": "bytes=1000-66535"}, 206),
           (f"/runs/{RUN}/maps/geopotential_500/6.png", {}, 200)]
    args = [sys.executable, "-c", SERVER, str(run_dir.parent), str(port), str(chunk), str(workers)]
    with server(args, f"{base}/runs") as proc:
        for path, headers, _ in mix:  # warm-up: sha256 of each file once
            urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=30).read()
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        done = subprocess.run([sys.executable, "-c", LOAD_CLIENT, base, str(clients), str(seconds), json.dumps(mix)],
                              cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
        cpu, wall = cpu_seconds(proc.pid) - cpu0, time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"load client failed: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    report.update(clients=clients, seconds=seconds, server_cpu_s=round(cpu, 2), server_cores_used=round(cpu / wall, 2))
    for key in ("wall_s", "req_per_s", "p50_ms", "p99_ms"):
        report[key] = round(report[key], 2)
    return report


def bench_points(quick: bool) -> dict:
    """EDR point-query latency from ``benches.serve_edr`` (another benchmark), when it exists."""
    try:
        module = importlib.import_module("benches.serve_edr")
    except ImportError as exc:
        print(f"points: skipped, benches/serve_edr.py is not available ({exc})", file=sys.stderr)
        return {"skipped": f"benches.serve_edr not available: {exc}"}
    fn = module.point_latency
    params = inspect.signature(fn).parameters
    kwargs = {"quick": quick} if "quick" in params else {}
    if quick and "n_queries" in params:
        kwargs["n_queries"] = 50
    return fn(**kwargs)


def main() -> None:
    """Run the parts and print one JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="≤ 1 minute: 64 MiB file, 5 repeats, 10 s load")
    parser.add_argument("--repeats", type=int, default=None, help="downloads per server (default 7, quick 5)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="downloads per repeat, timed and CPU-counted together (default: ~1 GiB per repeat)")
    parser.add_argument("--file-mib", type=int, default=None, help="size of the downloaded file (default 200)")
    parser.add_argument("--chunk-size", type=int, default=4 << 20, help="ServeSettings.chunk_size of the server")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the app")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--load-seconds", type=float, default=None, help="default 30, quick 10")
    parser.add_argument("--skip", nargs="*", default=[], choices=["download", "load", "points"])
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 7)
    file_mib = args.file_mib or (64 if args.quick else 200)
    load_seconds = args.load_seconds or (10.0 if args.quick else 30.0)
    workers = args.workers
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()}, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        run_dir = build_site(Path(tmp), file_mib)
        if "download" not in args.skip:
            rounds = args.rounds or max(1, -(-1024 // file_mib))
            report["download"] = bench_download(run_dir, repeats, rounds, args.chunk_size, workers)
        if "load" not in args.skip:
            report["load"] = bench_load(run_dir, args.clients, load_seconds, args.chunk_size, workers)
    if "points" not in args.skip:
        report["points"] = bench_points(args.quick)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
