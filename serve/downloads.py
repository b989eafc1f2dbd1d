"""HTTP responses for run files: ETag from the manifest's sha256, 304, byte ranges, large-block sending.

The ETag is the sha256 the manifest recorded at publication, so it names the content exactly
and a client can check what it downloaded.

Ranges (RFC 9110 §14): one range is a 206 with ``Content-Range``; several are a 206
``multipart/byteranges`` body whose parts come in the order they were asked for, each with its
own ``Content-Type`` and ``Content-Range``. Ranges that start past the end are dropped; if none
is left the answer is 416 with ``Content-Range: bytes */<size>``. As RFC 9110 §14.2 allows, the
``Range`` header is ignored and the whole file sent with 200 when it is malformed, when it asks
for more than :data:`MAX_RANGES` ranges, when its ranges together add up to more bytes than the
file (overlapping ranges: a cheap amplification otherwise), or when ``If-Range`` does not name
the current ETag.

Speed: uvicorn (0.55 here) offers neither the ASGI ``http.response.pathsend`` nor the
``http.response.zerocopysend`` extension, so a true ``sendfile`` is not reachable through ASGI.
The body is instead read in large blocks (``chunk_size``, a few MiB) with ``os.pread`` in a worker
thread and handed to ``send`` as they are, one event-loop step and one thread hop per block rather
than per 64 KiB: on loopback that is as fast as ``python -m http.server`` (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from core.runs import RunGone, reading
from serve.catalog import RunFile

log = logging.getLogger(__name__)

MAX_RANGES = 16
"""Most ranges one request may ask for; more and the whole file is sent (200)."""
DEFAULT_BLOCK = 4 << 20
"""Bytes read per step when the caller does not say (``ServeSettings.chunk_size`` does)."""

_UNIT_RE = re.compile(r"^\s*bytes\s*=(.*)$", re.IGNORECASE | re.DOTALL)
_SPEC_RE = re.compile(r"^(\d*)\s*-\s*(\d*)$")
MEDIA_TYPES = {
    ".nc": "application/x-netcdf",
    ".json": "application/json",
    ".png": "image/png",
    ".gif": "image/gif",
    ".mp4": "video/mp4",
    ".grib2": "application/x-grib2",
    ".grib": "application/x-grib",
    ".html": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
# Files a browser should save rather than display.
_ATTACHMENT_SUFFIXES = {".nc", ".grib2", ".grib"}

# A body is a list of segments: literal bytes (multipart headers) or (offset, length) of the file.
Segment = bytes | tuple[int, int]


class RangeNotSatisfiable(ValueError):
    """None of the requested byte ranges lies inside the file."""


def media_type(relpath: str) -> str:
    """Content type of a run file by its suffix (Zarr chunks and unknowns are octet streams)."""
    return MEDIA_TYPES.get(Path(relpath).suffix.lower(), "application/octet-stream")


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """Inclusive (first, last) bytes of a ``bytes=`` header, in order; ``None``: ignore it, send everything."""
    match = _UNIT_RE.match(header)
    if match is None:
        return None
    specs = [s.strip() for s in match.group(1).split(",")]
    specs = [s for s in specs if s]  # RFC 9110 §5.6.1: empty list elements are allowed and ignored
    if not specs or len(specs) > MAX_RANGES:
        return None
    ranges, why = [], ""
    for spec in specs:
        m = _SPEC_RE.match(spec)
        if m is None or not (m.group(1) or m.group(2)):
            return None
        first, last = m.group(1), m.group(2)
        if not first:  # suffix range: the last N bytes
            suffix = int(last)
            if suffix == 0 or size == 0:
                why = f"suffix range of {suffix} bytes of a {size}-byte file"
                continue
            ranges.append((max(0, size - suffix), size - 1))
            continue
        start = int(first)
        if last and int(last) < start:
            return None  # invalid range-spec: the whole header is ignored
        if start >= size:
            why = f"range starts at byte {start} of a {size}-byte file"
            continue
        ranges.append((start, min(int(last), size - 1) if last else size - 1))
    if not ranges:
        raise RangeNotSatisfiable(why)
    return ranges


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The single (first, last) range of a header; ``None`` when it is not exactly one range."""
    ranges = parse_ranges(header, size)
    return ranges[0] if ranges is not None and len(ranges) == 1 else None


def multipart_body(ranges: list[tuple[int, int]], size: int, kind: str, boundary: str) -> list[Segment]:
    """The segments of a ``multipart/byteranges`` body (RFC 9110 §14.6) for these ranges."""
    segments: list[Segment] = []
    crlf = b""  # the CRLF ending a part's data opens the next delimiter
    for first, last in ranges:
        head = f"--{boundary}\r\nContent-Type: {kind}\r\nContent-Range: bytes {first}-{last}/{size}\r\n\r\n"
        segments += [crlf + head.encode("latin-1"), (first, last - first + 1)]
        crlf = b"\r\n"
    segments.append(crlf + f"--{boundary}--\r\n".encode("latin-1"))
    return segments


def body_length(segments: list[Segment]) -> int:
    """Bytes the segments add up to (the Content-Length)."""
    return sum(len(s) if isinstance(s, bytes) else s[1] for s in segments)


class RunFileResponse(Response):
    """Sends file segments in large blocks, holding the run's reader lock until the last byte or a disconnect."""

    def __init__(self, held: contextlib.ExitStack, fd: int, segments: list[Segment], block: int,
                 status_code: int, headers: dict[str, str], media_type: str) -> None:
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.body = b""
        self.init_headers(headers)
        self._fd, self._segments, self._block = fd, segments, block
        # A response that is never sent (a middleware dropped it) must still let go of the run.
        self._release = weakref.finalize(self, held.close)

    def close(self) -> None:
        """Close the file and release the run's reader lock (idempotent)."""
        self._release()

    @property
    def body_iterator(self) -> AsyncIterator[bytes]:
        """The body's blocks, for callers that drive the response themselves; releases the run at the end."""
        return self._blocks()

    async def _blocks(self) -> AsyncIterator[bytes]:
        try:
            for segment in self._segments:
                if isinstance(segment, bytes):
                    yield segment
                    continue
                offset, remaining = segment
                while remaining > 0:
                    # One thread hop per block of MiBs: the read never stalls the event loop, and costs little.
                    data = await anyio.to_thread.run_sync(os.pread, self._fd, min(self._block, remaining), offset)
                    if not data:
                        raise RuntimeError(f"file ended {remaining} bytes early")
                    offset += len(data)
                    remaining -= len(data)
                    yield data
        finally:
            self.close()

    async def _send_body(self, send: Send) -> None:
        blocks = self._blocks()
        try:
            async for data in blocks:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await blocks.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the status line, then the body, stopping (and releasing the run) if the client goes away."""
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async with anyio.create_task_group() as group:
                async def body() -> None:
                    await self._send_body(send)
                    group.cancel_scope.cancel()

                group.start_soon(body)
                # uvicorn's send() drops bytes silently after a disconnect; only receive() tells.
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()
        finally:
            self.close()


def _etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    # Weak comparison, as If-None-Match requires: W/"x" matches "x".
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return etag in tags


def _open(file: RunFile) -> tuple[contextlib.ExitStack, int]:
    # The run's reader lock is held until the last byte, so retention never removes a run mid-download;
    # a run removed or replaced between the catalog lookup and here is a clean 404 (RunGone).
    run_dir = file.lock_dir or file.path.parents[len(Path(file.relpath).parts) - 1]
    held = contextlib.ExitStack()
    try:
        held.enter_context(reading(run_dir))
        fd = os.open(file.path, os.O_RDONLY | os.O_CLOEXEC)
        held.callback(os.close, fd)
    except FileNotFoundError:
        held.close()
        raise RunGone(f"run {file.run} no longer has {file.relpath}") from None
    except BaseException:
        held.close()
        raise
    return held, fd


def file_response(request: Request, file: RunFile, chunk_size: int = DEFAULT_BLOCK) -> Response:
    """Serve one run file honouring If-None-Match, Range and If-Range; send the body in large blocks."""
    etag = f'"{file.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        # A run can be republished under the same name, so clients must revalidate (cheap: 304).
        "Cache-Control": "no-cache",
        "X-Checksum-Sha256": file.sha256,
    }
    suffix = Path(file.relpath).suffix.lower()
    if suffix in _ATTACHMENT_SUFFIXES:
        headers["Content-Disposition"] = f'attachment; filename="spherecast_{file.run}_{Path(file.relpath).name}"'
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)

    kind = media_type(file.relpath)
    segments: list[Segment] = [(0, file.size)]
    status = 200
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header is not None and (if_range is None or if_range.strip() == etag):
        try:
            ranges = parse_ranges(range_header, file.size)
        except RangeNotSatisfiable as exc:
            log.debug("416 for %s/%s: %s", file.run, file.relpath, exc)
            return JSONResponse({"detail": f"header 'Range' ({range_header}) not satisfiable: {exc}"},
                                status_code=416, headers={**headers, "Content-Range": f"bytes */{file.size}"})
        if ranges is not None and sum(last - first + 1 for first, last in ranges) <= file.size:
            status = 206
            if len(ranges) == 1:
                first, last = ranges[0]
                segments = [(first, last - first + 1)]
                headers["Content-Range"] = f"bytes {first}-{last}/{file.size}"
            else:
                boundary = secrets.token_hex(16)
                segments = multipart_body(ranges, file.size, kind, boundary)
                kind = f"multipart/byteranges; boundary={boundary}"
    headers["Content-Length"] = str(body_length(segments))
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=kind)
    try:
        held, fd = _open(file)  # takes the reader lock and opens the file before the status line is sent
    except RunGone as exc:
        return JSONResponse({"detail": str(exc)}, status_code=404)
    return RunFileResponse(held, fd, segments, chunk_size, status, headers, kind)
