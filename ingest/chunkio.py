"""Whole-chunk writes straight into a local Zarr v3 array, byte-identical to Zarr's own.

The analysis store is chunked one time per chunk, and a slab write replaces whole chunks, so the
general machinery of ``zarr.Array.__setitem__`` (selection arithmetic, an async event loop in
another thread, a read-modify-write check per chunk) buys nothing and costs ≈ 1–2 ms per chunk,
which dominated ingest on coarse grids. This module encodes each chunk with the array's declared
codec chain — ``bytes`` (little endian) → optional ``zstd`` → optional ``crc32c``, the only
chains the store writer creates — and writes it under its chunk key by temp file + rename, as
Zarr's LocalStore does. Like Zarr with ``write_empty_chunks=False``, a chunk equal to the fill
value is not stored (an existing one is removed). Anything else (other codecs, sharding, partial
chunks, non-local stores) returns ``None`` from :func:`chunk_writer` and the caller uses Zarr.
``tests/ingest/test_chunkio.py`` checks the bytes against Zarr's for every supported chain.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import numcodecs
import numpy as np

# Encoding and file writes release the GIL for most of their time; a few threads keep the disk busy.
_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="chunkio")


def _encoder(codecs: list[dict]) -> Callable[[np.ndarray], list[memoryview | bytes]] | None:
    names = [c.get("name") for c in codecs]
    if not names or names[0] != "bytes" or codecs[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    rest = codecs[1:]
    zstd = None
    if rest and rest[0].get("name") == "zstd":
        conf = rest[0].get("configuration", {})
        if conf.get("checksum", False):
            return None
        zstd = numcodecs.Zstd(level=int(conf.get("level", 0)))
        rest = rest[1:]
    checksum = bool(rest) and rest[0].get("name") == "crc32c"
    if checksum:
        rest = rest[1:]
    if rest:
        return None

    def encode(chunk: np.ndarray) -> list[memoryview | bytes]:
        # Pieces, not one joined buffer: an uncompressed chunk goes to disk without a copy.
        data = memoryview(np.ascontiguousarray(chunk.astype(chunk.dtype.newbyteorder("<"), copy=False))).cast("B")
        if zstd is not None:
            data = memoryview(zstd.encode(data))
        pieces: list[memoryview | bytes] = [data]
        if checksum:
            pieces.append(crc32c.crc32c(data).to_bytes(4, "little"))
        return pieces

    return encode


class ChunkWriter:
    """Writes whole time-chunks of one array whose chunks hold exactly one time each."""

    def __init__(self, array_dir: Path, meta: dict, encode: Callable[[np.ndarray], list[memoryview | bytes]]) -> None:
        self.dir = array_dir
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"])
        fill = meta.get("fill_value")
        self.fill = np.array(np.nan if fill == "NaN" else fill, dtype=self.dtype)
        enc = meta["chunk_key_encoding"]
        self.sep = enc.get("configuration", {}).get("separator", "/")
        self.encode = encode

    def _key(self, t: int) -> Path:
        zeros = [0] * (len(self.shape) - 1)
        return self.dir / self.sep.join(["c", str(t), *map(str, zeros)])

    def _is_fill(self, chunk: np.ndarray) -> bool:
        # Data chunks are almost never all fill: one element decides without a pass over the chunk.
        first = chunk.flat[0] if chunk.size else self.fill
        if not (first == self.fill or (self.dtype.kind == "f" and np.isnan(first) and np.isnan(self.fill))):
            return False
        if self.dtype.kind == "f" and np.isnan(self.fill):
            return bool(np.isnan(chunk).all())
        return bool((chunk == self.fill).all())

    def _write_one(self, t: int, chunk: np.ndarray) -> None:
        path = self._key(t)
        if self._is_fill(chunk):
            path.unlink(missing_ok=True)
            return
        pieces = self.encode(chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")  # removed on resume if left
        try:
            with open(tmp, "wb") as f:
                for piece in pieces:
                    f.write(piece)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write(self, start: int, values: np.ndarray) -> None:
        """Store ``values`` (times × the array's other dims) as the chunks from time ``start``."""
        values = np.asarray(values)
        if values.shape[1:] != self.shape[1:] or start < 0 or start + values.shape[0] > self.shape[0]:
            raise ValueError(f"{self.dir}: cannot write {values.shape} at time {start} into {self.shape}")
        values = values.astype(self.dtype, copy=False)
        list(_POOL.map(lambda k: self._write_one(start + k, values[k]), range(values.shape[0])))


def chunk_writer(array_dir: Path) -> ChunkWriter | None:
    """A ChunkWriter for a local array with one time per chunk and a supported codec chain, else None."""
    meta_path = Path(array_dir) / "zarr.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
        return None
    grid = meta.get("chunk_grid", {})
    chunks = grid.get("configuration", {}).get("chunk_shape")
    shape = meta.get("shape")
    if grid.get("name") != "regular" or not chunks or chunks[0] != 1 or list(chunks[1:]) != list(shape[1:]):
        return None
    if meta.get("chunk_key_encoding", {}).get("name") != "default":
        return None
    encode = _encoder(meta.get("codecs", []))
    return ChunkWriter(Path(array_dir), meta, encode) if encode is not None else None
