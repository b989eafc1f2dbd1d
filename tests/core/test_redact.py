"""redact(): what a published manifest may show of a config — no passwords, tokens or URL credentials."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from core.redact import MASK, is_secret_key, redact, redact_text


def test_secret_keys_are_masked_at_any_depth_and_the_input_is_untouched() -> None:
    config = {
        "paths": {"root": "/data/spherecast", "forecasts": Path("/data/forecasts")},
        "ingest": {"cds": {"url": "https://cds.climate.copernicus.eu/api", "key": "abcd-1234"},
                   "mirrors": [{"url": "https://mirror.example/era5", "api_key": "k1", "timeout": 30},
                               {"url": "https://other.example", "AccessKeyId": "AKIA123", "SecretAccessKey": "s3"}]},
        "tracking": {"mlflow_tracking_token": "tok", "password": "hunter2", "db_passwd": "pw", "credentials": {"a": 1},
                     "Authorization": "Bearer xyz", "private": "x", "client_secret": "cs", "unset_password": None},
        "forecast": {"keep_runs": 28, "lead_hours": 120, "formats": ["netcdf", "grib2"]},
    }
    before = copy.deepcopy(config)
    out = redact(config)
    assert config == before  # a copy: the running config keeps its secrets
    assert out["ingest"]["cds"] == {"url": "https://cds.climate.copernicus.eu/api", "key": MASK}
    assert out["ingest"]["mirrors"][0] == {"url": "https://mirror.example/era5", "api_key": MASK, "timeout": 30}
    assert out["ingest"]["mirrors"][1]["AccessKeyId"] == MASK and out["ingest"]["mirrors"][1]["SecretAccessKey"] == MASK
    assert out["tracking"] == {"mlflow_tracking_token": MASK, "password": MASK, "db_passwd": MASK,
                               "credentials": MASK, "Authorization": MASK, "private": MASK, "client_secret": MASK,
                               "unset_password": None}
    assert out["forecast"] == config["forecast"]
    assert out["paths"] == config["paths"]
    assert "hunter2" not in json.dumps(out, default=str) and "AKIA123" not in json.dumps(out, default=str)


@pytest.mark.parametrize("key", ["password", "PASSWORD", "db-password", "passwd", "secret", "aws_secret_access_key",
                                 "token", "refresh_token", "accessToken", "api_key", "apiKey", "APIKey", "x-api-key",
                                 "key", "access_key", "private_key", "credential", "credentials", "auth", "sig",
                                 "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token"])
def test_secret_looking_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["keep_runs", "key_new", "keys_dir", "cache_key", "sort_key", "monkey", "keyboard",
                                 "tokenizer", "author", "authority_url", "passenger", "secretary", "signal",
                                 "lead_hours", "2m_temperature", "url", "user", "username", 3, None])
def test_harmless_keys_are_not_secrets(key: object) -> None:
    assert not is_secret_key(key)


@pytest.mark.parametrize(("text", "expected"), [
    ("https://user:pw@host/x", "https://***@host/x"),
    ("https://alice:p@ss:w0rd@mlflow.example:5000/api?x=1", "https://***@mlflow.example:5000/api?x=1"),
    ("s3://AKIA123:sEcReT@bucket/era5.zarr", "s3://***@bucket/era5.zarr"),
    ("postgresql+psycopg://spherecast:pg-pass@db:5432/scores", "postgresql+psycopg://***@db:5432/scores"),
    ("https://ghp_token123@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    ("mirror at https://u:p@a.example/x and https://v:q@b.example/y", "mirror at https://***@a.example/x and https://***@b.example/y"),
    ("https://host/data.grib2?token=abc123&date=20260101", "https://host/data.grib2?token=***&date=20260101"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=f00d",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***"),
    ("https://acct.blob.core.windows.net/c/f?sv=2021&sig=AbC%3D&se=2026", "https://acct.blob.core.windows.net/c/f?sv=2021&sig=***&se=2026"),
    ("https://maps.example/api?key=AIzaXYZ&keep_runs=3", "https://maps.example/api?key=***&keep_runs=3"),
    ("host=db user=sc password=secret1 dbname=scores", "host=db user=sc password=*** dbname=scores"),
    ("https://host/path?password=&page=2", "https://host/path?password=&page=2"),
    ("https://host/path#access_token=xyz", "https://host/path#access_token=***"),
    ("/data/runs/20260101T00/forecast.nc", "/data/runs/20260101T00/forecast.nc"),
    ("https://cds.climate.copernicus.eu/api", "https://cds.climate.copernicus.eu/api"),
    ("mailto-like user@example.org stays", "mailto-like user@example.org stays"),
])
def test_urls_lose_credentials_and_secret_query_values(text: str, expected: str) -> None:
    assert redact_text(text) == expected
    assert redact({"anywhere": [text]}) == {"anywhere": [expected]}


def test_types_and_shapes_are_kept() -> None:
    data = {"a": (1, "https://u:p@h/x"), "b": [None, 2.5, True], "c": {"n": {"token": 5}}}
    assert redact(data) == {"a": (1, "https://***@h/x"), "b": [None, 2.5, True], "c": {"n": {"token": MASK}}}
