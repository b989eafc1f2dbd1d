"""Fault injection for the ingest fault tests: a kill -9 driver, a tmpfs "disk", a full-disk writer.

The driver runs one real ingest in a subprocess (``python -m tests.ingest.faults <point> <nth>
<config.yaml>``) after patching exactly one function so that the process sends itself SIGKILL at
the ``nth`` time it reaches that point; nothing is cleaned up, exactly as after a crash. Points:

``download``            while a CDS delivery streams into its ``.part`` file, after ``KILL_AFTER_CHUNKS``
                        chunks of ``DOWNLOAD_CHUNK`` bytes are on disk (the ``nth`` download);
``region-write``        inside ``ingest.regions.write_region``: the first variable of the ``nth`` data
                        region is written, the others are not;
``mid-chunk``           the ``nth`` field shard file is half on disk, in its ``*.partial`` temporary file;
``before-done``         the ``nth`` slab's data and ``expver`` are written, its ``done`` flag is not;
``before-consolidate``  every slab is written; the final metadata refresh never happens.

A driver whose kill point is never reached exits with ``NOT_REACHED`` instead of -9.

Chunk-level faults hook ``os.replace``, the rename that publishes every chunk file whichever
writer made it (Zarr's LocalStore and a direct chunk writer alike write a ``*.partial`` temporary
file and rename it), so they do not depend on which of the two the store writer uses.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests
    import xarray as xr

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
POINTS = ("download", "region-write", "mid-chunk", "before-done", "before-consolidate")
NOT_REACHED = 3
DOWNLOAD_CHUNK = 16384  # above Python's 8 KiB write buffer: each chunk reaches the file before the next
KILL_AFTER_CHUNKS = 4
PAGE = 4096
_CHUNK_KEY = re.compile(r"c[./](\d+)(?:[./]|$)")


def chunk_time(store: Path, path: Path) -> tuple[str, int] | None:
    """(array, chunk or shard index along time) if ``path`` is a chunk/shard file of ``store``, else None."""
    try:
        rel = Path(path).resolve().relative_to(Path(store).resolve()).parts
    except ValueError:
        return None  # outside the store, e.g. the store being created under its temporary name
    match = _CHUNK_KEY.match("/".join(rel[1:])) if len(rel) > 1 else None
    return (rel[0], int(match.group(1))) if match else None


def die() -> None:
    """SIGKILL this process: no finally blocks, no atexit, no flushing (a crash, not an exit)."""
    os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def on_replace(hook: Callable[[Path, Path], None]) -> Iterator[None]:
    """Call ``hook(src, dst)`` before every ``os.replace`` (and ``Path.replace``) in this process."""
    real = os.replace

    def replace(src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
        hook(Path(src), Path(dst))
        real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    os.replace = replace
    try:
        yield
    finally:
        os.replace = real


def _patch_download(nth: int) -> None:
    import requests

    import ingest.cds as cds

    cds._CHUNK = DOWNLOAD_CHUNK
    real_download, real_iter = cds._download_once, requests.Response.iter_content
    state = {"calls": 0, "armed": False}

    def download_once(session: requests.Session, url: str, part: Path, timeout: float) -> int:
        state["calls"] += 1
        state["armed"] = state["calls"] == nth
        return real_download(session, url, part, timeout)

    def iter_content(self: requests.Response, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        for i, chunk in enumerate(real_iter(self, *args, **kwargs)):
            if state["armed"] and i == KILL_AFTER_CHUNKS:
                die()  # the loop has written KILL_AFTER_CHUNKS chunks and asks for the next one
            yield chunk

    cds._download_once = download_once
    requests.Response.iter_content = iter_content


def _patch_write_region(point: str, nth: int) -> None:
    import ingest.regions as regions
    from core.schema import FLAG_VARIABLES

    real = regions.write_region
    counts = {"data": 0, "done": 0}

    def write_region(path: Path, data: xr.Dataset, where: slice) -> None:
        flags = set(data.data_vars) & set(FLAG_VARIABLES)
        if "done" not in flags:  # the fields (with expver): everything before the done flag
            counts["data"] += 1
            if point == "region-write" and counts["data"] == nth:
                real(path, data[[list(data.data_vars)[0]]], where)
                die()
        elif "done" in flags:
            counts["done"] += 1
            if point == "before-done" and counts["done"] == nth:
                die()
        real(path, data, where)

    regions.write_region = write_region


def _kill_mid_chunk(store: Path, fields: set[str], nth: int) -> Callable[[Path, Path], None]:
    lock, state = threading.Lock(), {"calls": 0}

    def hook(src: Path, dst: Path) -> None:
        found = chunk_time(store, dst)
        if found is None or found[0] not in fields:
            return
        with lock:
            state["calls"] += 1
            hit = state["calls"] == nth
        if hit:
            # On disk this is a kill half-way through writing the chunk: half its bytes, never renamed.
            os.truncate(src, src.stat().st_size // 2)
            die()

    return hook


def main(argv: list[str]) -> int:
    """Run one ingest with the kill point ``argv = [point, nth, config.yaml]`` armed."""
    point, nth, config_path = argv[0], int(argv[1]), argv[2]
    if point not in POINTS:
        raise ValueError(f"unknown kill point {point!r}; known: {', '.join(POINTS)}")
    from core.config import load_config
    from ingest.build import ingest

    config = load_config(config_path, env={})
    armed: AbstractContextManager[object] = nullcontext()
    match point:
        case "download":
            _patch_download(nth)
        case "region-write" | "before-done":
            _patch_write_region(point, nth)
        case "mid-chunk":
            armed = on_replace(_kill_mid_chunk(config.paths.analysis_store, set(config.task.variables), nth))
        case "before-consolidate":
            import ingest.orchestrate as orchestrate  # the one ingest path's session consolidates at its end

            orchestrate.consolidate = lambda path: die()
    with armed:
        ingest(config, progress=False)
    print(f"kill point {point} #{nth} was never reached", file=sys.stderr)
    return NOT_REACHED


def run_killed(point: str, nth: int, config_path: Path, log_path: Path, timeout: float = 120) -> int:
    """Run the driver in a subprocess (stderr to ``log_path``); return its exit code (-9 = killed)."""
    with log_path.open("wb") as err:
        proc = subprocess.run([sys.executable, "-m", "tests.ingest.faults", point, str(nth), str(config_path)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, timeout=timeout, check=False)
    return proc.returncode


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, by relative path."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def stray_files(root: Path) -> list[str]:
    """Half-written downloads (``*.part``) and chunks (``*.partial``) anywhere under ``root``."""
    return sorted(str(p) for pattern in ("*.part", "*.partial") for p in root.rglob(pattern))


# -- disk full --------------------------------------------------------------------------------------
def used_bytes(mount: Path) -> int:
    """Bytes in use on the filesystem holding ``mount`` (what a size limit counts)."""
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def mount_tmpfs(mount: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes at ``mount``; None on success, else why it is impossible here."""
    mount.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return "no mount command"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"mount exited {proc.returncode}")


def resize_tmpfs(mount: Path, size: int) -> None:
    """Change a mounted tmpfs's size limit (``mount -o remount``), keeping its files."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], capture_output=True, text=True, check=True)


def unmount(mount: Path) -> None:
    """Unmount ``mount``, lazily if something still holds it."""
    if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


@contextmanager
def full_disk_after(store: Path, chunk_writes: int) -> Iterator[Callable[[], int]]:
    """Make every write into ``store`` fail with ENOSPC once ``chunk_writes`` chunk files were written.

    The fallback where no tmpfs can be mounted. Every file of the store (chunk or metadata) is
    published by renaming its temporary file; once full, that rename raises what a full disk
    raises (``[Errno 28] No space left on device``, no file name) and the writer removes its
    temporary file, as after a failed write. Yields a function returning how many were refused.
    """
    root, lock, state = store.resolve(), threading.Lock(), {"chunks": 0, "refused": 0}

    def hook(src: Path, dst: Path) -> None:
        if not dst.resolve().is_relative_to(root):
            return
        with lock:
            full = state["chunks"] >= chunk_writes
            if full:
                state["refused"] += 1
            elif chunk_time(store, dst) is not None:
                state["chunks"] += 1
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with on_replace(hook):
        yield lambda: state["refused"]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
