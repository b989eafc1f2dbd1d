"""HTTP responses for run files: ETag from the manifest's sha256, 304, single byte ranges, streaming.

The ETag is the sha256 the manifest recorded at publication, so it names the content exactly
and a client can check what it downloaded. Multiple ranges (``bytes=0-1,5-6``) and malformed
``Range`` headers are ignored and the whole file is sent, as RFC 9110 allows.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from core.runs import RunGone, reading
from serve.catalog import RunFile

log = logging.getLogger(__name__)

_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
MEDIA_TYPES = {
    ".nc": "application/x-netcdf",
    ".json": "application/json",
    ".png": "image/png",
    ".grib2": "application/x-grib2",
    ".grib": "application/x-grib",
    ".html": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
# Files a browser should save rather than display.
_ATTACHMENT_SUFFIXES = {".nc", ".grib2", ".grib"}


class RangeNotSatisfiable(ValueError):
    """The requested byte range lies outside the file."""


def media_type(relpath: str) -> str:
    """Content type of a run file by its suffix (Zarr chunks and unknowns are octet streams)."""
    return MEDIA_TYPES.get(Path(relpath).suffix.lower(), "application/octet-stream")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Inclusive (first, last) byte of a single ``bytes=`` range; ``None`` means send the whole file."""
    match = _RANGE_RE.match(header)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"suffix range of {suffix} bytes of a {size}-byte file")
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at byte {start} of a {size}-byte file")
    return start, min(end, size - 1)


def _etag_matches(header: str, etag: str) -> bool:
    if header.strip() == "*":
        return True
    # Weak comparison, as If-None-Match requires: W/"x" matches "x".
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return etag in tags


def _iter_file(file: RunFile, start: int, length: int, chunk_size: int) -> Iterator[bytes]:
    # The run's reader lock is held until the last byte, so retention never removes a run mid-download;
    # a run removed or replaced between the catalog lookup and here is a clean 404 (RunGone).
    run_dir = file.path.parents[len(Path(file.relpath).parts) - 1]
    with reading(run_dir), open(file.path, "rb") as fh:
        fh.seek(start)
        remaining = length
        while remaining > 0:
            block = fh.read(min(chunk_size, remaining))
            if not block:
                break
            remaining -= len(block)
            yield block


def file_response(request: Request, file: RunFile, chunk_size: int = 1 << 16) -> Response:
    """Serve one run file honouring If-None-Match, Range and If-Range; stream the body."""
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

    start, end, status = 0, file.size - 1, 200
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header is not None and (if_range is None or if_range.strip() == etag):
        try:
            byte_range = parse_range(range_header, file.size)
        except RangeNotSatisfiable as exc:
            log.debug("416 for %s/%s: %s", file.run, file.relpath, exc)
            return JSONResponse({"detail": f"header 'Range' ({range_header}) not satisfiable: {exc}"},
                                status_code=416, headers={**headers, "Content-Range": f"bytes */{file.size}"})
        if byte_range is not None:
            start, end = byte_range
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{file.size}"
    length = max(0, end - start + 1)
    headers["Content-Length"] = str(length)
    kind = media_type(file.relpath)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=kind)
    body = _iter_file(file, start, length, chunk_size)
    try:
        first = next(body)  # takes the reader lock and opens the file before the status line is sent
    except StopIteration:
        first = b""
    except RunGone as exc:
        return JSONResponse({"detail": str(exc)}, status_code=404)
    return StreamingResponse(itertools.chain([first], body), status_code=status, headers=headers, media_type=kind)
