"""Several byte ranges as multipart/byteranges (RFC 9110 §14.6), bodies read in blocks smaller than the file, and a
client that hangs up mid-body lets go of the run's reader lock; checked over HTTP against the file's own bytes."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from core.runs import exclusive, publish, staging_dir, write_manifest
from serve.app import create_app
from serve.downloads import MAX_RANGES
from serve.settings import ServeSettings
from tests.serve.conftest import PROVENANCE, uvicorn_thread

RUN = "20000101T00"
URL = f"/runs/{RUN}/files/forecast.nc"
KIND = "application/x-netcdf"


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """(headers, data) of each part of a multipart body, parsed by hand from the RFC 2046 grammar."""
    kind, _, param = content_type.partition(";")
    assert kind.strip() == "multipart/byteranges"
    name, _, boundary = param.strip().partition("=")
    assert name == "boundary" and boundary
    delimiter = b"--" + boundary.encode()
    assert body.startswith(delimiter + b"\r\n") and body.endswith(b"\r\n" + delimiter + b"--\r\n")
    inner = body[len(delimiter) + 2:-(len(delimiter) + 6)]
    parts = []
    for raw in inner.split(b"\r\n" + delimiter + b"\r\n"):
        head, sep, data = raw.partition(b"\r\n\r\n")
        assert sep, raw[:200]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        parts.append((headers, data))
    return parts


@pytest.fixture(scope="module")
def small_blocks(forecasts_dir: Path) -> TestClient:
    """The app reading files 4 KiB at a time, so a test file spans many blocks."""
    return TestClient(create_app(ServeSettings(forecasts_dir=forecasts_dir, chunk_size=4096)))


@pytest.mark.parametrize("app", ["client", "small_blocks"])
def test_several_ranges_are_multipart_byteranges_in_the_order_asked(app: str, request: pytest.FixtureRequest,
                                                                    run_dir: Path) -> None:
    client: TestClient = request.getfixturevalue(app)
    data = (run_dir / "forecast.nc").read_bytes()
    size = len(data)
    assert size > 3 * 4096
    header = f"bytes=4000-12300, 0-9, {size + 5}-, -20, 100-199, 150-160"  # one past the end: dropped
    response = client.get(URL, headers={"Range": header})
    assert response.status_code == 206
    body = response.content
    assert int(response.headers["content-length"]) == len(body)
    assert "content-range" not in response.headers
    parts = parse_multipart(body, response.headers["content-type"])
    want = [(4000, 12300), (0, 9), (size - 20, size - 1), (100, 199), (150, 160)]
    assert len(parts) == len(want)
    for (headers, got), (first, last) in zip(parts, want, strict=True):
        assert headers == {"content-type": KIND, "content-range": f"bytes {first}-{last}/{size}"}
        assert got == data[first:last + 1]


def test_one_satisfiable_range_of_several_is_a_plain_206(client: TestClient, run_dir: Path) -> None:
    data = (run_dir / "forecast.nc").read_bytes()
    size = len(data)
    response = client.get(URL, headers={"Range": f"bytes={size}-{size + 9},10-19"})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes 10-19/{size}"
    assert response.headers["content-type"] == KIND
    assert response.content == data[10:20]


def test_head_of_several_ranges_has_the_multipart_length_and_no_body(client: TestClient) -> None:
    got = client.get(URL, headers={"Range": "bytes=0-9,20-29"})
    head = client.head(URL, headers={"Range": "bytes=0-9,20-29"})
    assert head.status_code == 206 and head.content == b""
    assert head.headers["content-type"].startswith("multipart/byteranges; boundary=")
    # The boundary is random per response, and the same length every time: so is the body.
    assert int(head.headers["content-length"]) == len(got.content) == int(got.headers["content-length"])


def test_too_many_or_too_much_is_the_whole_file(client: TestClient, run_dir: Path) -> None:
    data = (run_dir / "forecast.nc").read_bytes()
    size = len(data)
    many = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_RANGES + 1))
    half = size // 2
    for header in (f"bytes={many}", f"bytes=0-{half},1-{half + 2}", f"bytes=0-,0-{size // 3}"):
        response = client.get(URL, headers={"Range": header})
        assert response.status_code == 200, header
        assert response.content == data
        assert "content-range" not in response.headers
    # Exactly MAX_RANGES ranges, overlapping but not adding up to the file, are still served part by part.
    exact = ",".join(f"{i * 10}-{i * 10 + 14}" for i in range(MAX_RANGES))
    response = client.get(URL, headers={"Range": f"bytes={exact}"})
    assert response.status_code == 206
    parts = parse_multipart(response.content, response.headers["content-type"])
    assert [p[1] for p in parts] == [data[i * 10:i * 10 + 15] for i in range(MAX_RANGES)]


def test_all_ranges_unsatisfiable_is_416(client: TestClient, run_dir: Path) -> None:
    size = (run_dir / "forecast.nc").stat().st_size
    response = client.get(URL, headers={"Range": f"bytes={size}-,{size + 10}-{size + 20},-0"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{size}"
    assert "Range" in response.json()["detail"]


def test_if_range_guards_several_ranges(client: TestClient, run_dir: Path) -> None:
    data = (run_dir / "forecast.nc").read_bytes()
    etag = client.head(URL).headers["etag"]
    fresh = client.get(URL, headers={"Range": "bytes=0-0,-1", "If-Range": etag})
    assert fresh.status_code == 206
    assert [p[1] for p in parse_multipart(fresh.content, fresh.headers["content-type"])] == [data[:1], data[-1:]]
    stale = client.get(URL, headers={"Range": "bytes=0-0,-1", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == data


def test_blocks_smaller_than_the_file_give_the_same_bytes(small_blocks: TestClient, run_dir: Path) -> None:
    data = (run_dir / "forecast.nc").read_bytes()
    assert small_blocks.get(URL).content == data
    response = small_blocks.get(URL, headers={"Range": "bytes=4095-8193"})  # straddles two block boundaries
    assert response.status_code == 206 and response.content == data[4095:8194]


@pytest.fixture
def big_run(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A run with a 24 MiB file served by uvicorn on 127.0.0.1 in 1 MiB blocks; yields (port, run dir)."""
    forecasts = tmp_path / "forecasts"
    staging = staging_dir(forecasts, RUN)
    (staging / "big.bin").write_bytes(os.urandom(24 << 20))
    write_manifest(staging, pd.Timestamp("2000-01-01"), provenance=PROVENANCE)
    run = publish(staging, forecasts / RUN)
    with uvicorn_thread(create_app(ServeSettings(forecasts_dir=forecasts, chunk_size=1 << 20))) as port:
        yield port, run


def bytes_read() -> int:
    """Bytes this process (the server runs in it) has read with read/pread so far (``rchar``, proc(5))."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def lock_is_free(run: Path) -> bool:
    with exclusive(run) as free:
        return free


def test_a_client_hanging_up_mid_body_releases_the_run(big_run: tuple[int, Path]) -> None:
    port, run = big_run
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # keep the client's window small
    conn.sendall(f"GET /runs/{RUN}/files/big.bin HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = b""
    while len(got) < 1 << 20:
        got += conn.recv(1 << 16)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == (run / "big.bin").read_bytes()[:len(body)]
    assert not lock_is_free(run)  # mid-body: the reader lock is held, retention would leave the run alone
    read_before = bytes_read()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # hang up with a reset
    conn.close()
    deadline = time.monotonic() + 10
    while not lock_is_free(run) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock_is_free(run)
    # The server stopped reading the file when the client left, rather than reading the rest into the void.
    assert bytes_read() - read_before < 8 << 20
    # The server is fine afterwards: a whole download still completes (and lets go of the run too).
    with socket.create_connection(("127.0.0.1", port), timeout=10) as again:
        again.sendall(f"GET /runs/{RUN}/files/big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while block := again.recv(1 << 20):
            chunks.append(block)
    assert b"".join(chunks).partition(b"\r\n\r\n")[2] == (run / "big.bin").read_bytes()
    assert lock_is_free(run)
