"""Downloads and maps: exact bytes, sha256 ETag, 304, byte ranges, content types."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.runs import read_manifest
from serve.downloads import RangeNotSatisfiable, parse_range, parse_ranges
from tests.serve.conftest import png_size

RUN = "20000101T00"


@pytest.mark.parametrize("relpath, kind", [
    ("forecast.nc", "application/x-netcdf"),
    ("forecast.zarr/zarr.json", "application/json"),
    ("forecast.zarr/geopotential/zarr.json", "application/json"),
    ("maps/geopotential_500/global/006.png", "image/png"),
])
def test_download_is_the_file_on_disk(client: TestClient, run_dir: Path, relpath: str, kind: str) -> None:
    response = client.get(f"/runs/{RUN}/files/{relpath}")
    assert response.status_code == 200
    body = response.content
    assert body == (run_dir / relpath).read_bytes()
    entry = read_manifest(run_dir)["files"][relpath]
    assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    assert response.headers["etag"] == f'"{entry["sha256"]}"'
    assert int(response.headers["content-length"]) == entry["size"] == len(body)
    assert response.headers["content-type"].startswith(kind)
    assert response.headers["accept-ranges"] == "bytes"


def test_zarr_chunks_are_served_as_octet_streams(client: TestClient, run_dir: Path) -> None:
    chunks = [k for k in read_manifest(run_dir)["files"] if k.startswith("forecast.zarr/geopotential/c/")]
    assert chunks
    response = client.get(f"/runs/{RUN}/files/{chunks[0]}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content == (run_dir / chunks[0]).read_bytes()


def test_netcdf_is_an_attachment(client: TestClient) -> None:
    response = client.get(f"/runs/{RUN}/files/forecast.nc")
    assert response.headers["content-disposition"] == f'attachment; filename="spherecast_{RUN}_forecast.nc"'


def test_manifest_file_download(client: TestClient, run_dir: Path) -> None:
    response = client.get(f"/runs/{RUN}/files/manifest.json")
    assert response.status_code == 200
    assert response.content == (run_dir / "manifest.json").read_bytes()
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'


def test_if_none_match_gives_304(client: TestClient) -> None:
    etag = client.get(f"/runs/{RUN}/files/forecast.nc").headers["etag"]
    response = client.get(f"/runs/{RUN}/files/forecast.nc", headers={"If-None-Match": etag})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag
    weak = client.get(f"/runs/{RUN}/files/forecast.nc", headers={"If-None-Match": f'"other", W/{etag}'})
    assert weak.status_code == 304
    stale = client.get(f"/runs/{RUN}/files/forecast.nc", headers={"If-None-Match": '"0000"'})
    assert stale.status_code == 200 and len(stale.content) > 0


def test_range_gives_206_with_content_range(client: TestClient, run_dir: Path) -> None:
    data = (run_dir / "forecast.nc").read_bytes()
    size = len(data)
    for header, first, last in [("bytes=0-99", 0, 99), ("bytes=100-", 100, size - 1),
                                ("bytes=-50", size - 50, size - 1), (f"bytes=10-{size + 1000}", 10, size - 1)]:
        response = client.get(f"/runs/{RUN}/files/forecast.nc", headers={"Range": header})
        assert response.status_code == 206, header
        assert response.content == data[first:last + 1], header
        assert response.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert int(response.headers["content-length"]) == last - first + 1


def test_unsatisfiable_range_gives_416(client: TestClient, run_dir: Path) -> None:
    size = (run_dir / "forecast.nc").stat().st_size
    for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
        response = client.get(f"/runs/{RUN}/files/forecast.nc", headers={"Range": header})
        assert response.status_code == 416, header
        assert response.headers["content-range"] == f"bytes */{size}"
        assert "Range" in response.json()["detail"]


def test_malformed_range_and_stale_if_range_send_everything(client: TestClient, run_dir: Path) -> None:
    data = (run_dir / "forecast.nc").read_bytes()
    for headers in ({"Range": "bytes=9-3"}, {"Range": "pages=1-2"}, {"Range": "bytes=0-1,x-6"},
                    {"Range": "bytes=0-9", "If-Range": '"not-the-etag"'}):
        response = client.get(f"/runs/{RUN}/files/forecast.nc", headers=headers)
        assert response.status_code == 200, headers
        assert response.content == data


def test_head_gives_headers_without_body(client: TestClient, run_dir: Path) -> None:
    response = client.head(f"/runs/{RUN}/files/forecast.nc")
    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["content-length"]) == (run_dir / "forecast.nc").stat().st_size


def test_parse_range() -> None:
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=-20", 10) == (0, 9)
    assert parse_range("bytes=", 10) is None
    assert parse_range("bytes=0-1,5-6", 10) is None  # several ranges: see parse_ranges
    assert parse_ranges("bytes=0-1, ,5-6,-3,20-", 10) == [(0, 1), (5, 6), (7, 9)]  # 20-: past the end, dropped
    assert parse_ranges("bytes=3-1", 10) is None
    with pytest.raises(RangeNotSatisfiable):
        parse_ranges("bytes=10-,-0", 10)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)


def test_map_png(client: TestClient, run_dir: Path) -> None:
    response = client.get(f"/runs/{RUN}/maps/wind500/12.png")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_size(response.content) == (320, 184)  # 8 × 4.6 inches at the fixture's 40 dpi
    assert response.content == (run_dir / "maps/wind500/global/012.png").read_bytes()
    assert client.get(f"/runs/{RUN}/maps/wind500/global/012.png").content == response.content
    etag = response.headers["etag"]
    again = client.get(f"/runs/{RUN}/maps/wind500/12.png", headers={"If-None-Match": etag})
    assert again.status_code == 304
