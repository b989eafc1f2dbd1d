"""A local S3-compatible server for tests: moto in server mode, real HTTP on 127.0.0.1.

The server runs on a thread of the test process; other processes (Dask workers) reach it through the
standard AWS environment variables in :attr:`MotoS3.env`, exactly as they would reach a real object
store, so nothing in the code under test needs to know it is talking to a test server.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import s3fs
from moto.server import ThreadedMotoServer

# Variables that would point botocore at another identity or config than the test server's.
FOREIGN_AWS_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@dataclass(frozen=True)
class MotoS3:
    """A running moto S3 server: its endpoint and the environment a client needs to use it."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """AWS_ENDPOINT_URL, credentials (moto accepts any) and region, as botocore reads them."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def fs(self) -> s3fs.S3FileSystem:
        """A fresh filesystem on the server: no instance cache, so no listing cached by another test."""
        return s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True, use_listings_cache=False,
                                 client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})

    def create_bucket(self, name: str) -> str:
        """Create the bucket ``name`` and return its name."""
        # Not fs.mkdir: it sends the region as a LocationConstraint, which us-east-1 must not have.
        self.fs().call_s3("create_bucket", Bucket=name)
        return name

    def buckets(self) -> list[str]:
        """The names of every bucket on the server."""
        fs = self.fs()
        fs.invalidate_cache()
        return sorted(p.rstrip("/") for p in fs.ls("", detail=False))

    def keys(self, bucket: str) -> list[str]:
        """Every object key in ``bucket``, sorted."""
        fs = self.fs()
        fs.invalidate_cache()
        return sorted(p.removeprefix(f"{bucket}/") for p in fs.find(bucket))

    def put(self, url: str, data: bytes) -> None:
        """Write one object."""
        self.fs().pipe_file(url, data)

    def get(self, url: str) -> bytes:
        """Read one object."""
        return self.fs().cat_file(url)

    def object_digest(self, url_prefix: str) -> dict[str, str]:
        """SHA-256 of every object under ``url_prefix`` (``s3://bucket/path``), by key relative to the prefix."""
        fs = self.fs()
        fs.invalidate_cache()
        prefix = url_prefix.removeprefix("s3://").rstrip("/")
        paths = sorted(fs.find(prefix))
        contents = fs.cat(paths) if paths else {}
        return {p.removeprefix(prefix + "/"): hashlib.sha256(contents[p]).hexdigest() for p in paths}


def _reset(endpoint: str) -> None:
    # moto keeps its buckets in process-wide state shared by every server of this process: start and end empty.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).close()


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """Start a moto S3 server on a free port of 127.0.0.1 for the block; its werkzeug request log silenced."""
    # werkzeug logs one line per request at INFO to stderr; WARNING keeps its errors.
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    # s3fs caches instances by their arguments: one made against an earlier server (or none) must not be reused.
    s3fs.S3FileSystem.clear_instance_cache()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        _reset(endpoint)
        yield MotoS3(endpoint=endpoint)
    finally:
        _reset(endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
        werkzeug.setLevel(level)
