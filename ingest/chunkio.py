"""Whole-chunk and whole-shard writes straight into a local Zarr v3 array, byte-identical to Zarr's own.

The analysis store keeps one time per chunk and groups a slab of times into one shard file (Zarr
v3 ``sharding_indexed``): a reader still fetches a single time, while a slab write is one file per
variable — the filesystem's per-file cost was most of an ingest's write time with a file per time.
A slab write replaces whole chunks, so the general machinery of ``zarr.Array.__setitem__``
(selection arithmetic, an async event loop in another thread, a read-modify-write per chunk) buys
nothing and costs ≈ 1–2 ms per chunk. This module encodes chunks with the array's declared codec
chain — ``bytes`` (little endian) → optional ``zstd`` → optional ``crc32c``, the only chains the
store writer creates — packs them into shards as Zarr does (chunks in time order, empty ones left
out, an index of ``(offset, length)`` pairs with its own crc32c at the end), and writes each file by
temp file + rename, as Zarr's LocalStore does. A shard only partly covered by a write keeps the
other chunks' bytes as they are. Like Zarr with ``write_empty_chunks=False``, a chunk equal to the
fill value is not stored and an all-empty shard file is removed. Anything else (other codecs,
chunks split along other axes) returns ``None`` from :func:`chunk_writer` and the caller uses Zarr.
On an object store each file is one PUT (whole or absent, as the rename makes it locally). ``tests/ingest/test_chunkio.py`` checks the bytes against Zarr's.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import crc32c
import numcodecs
import numpy as np

from core.errors import DataContractError
from core.location import as_location, is_remote, stamp

# Encoding and file writes release the GIL for most of their time; a few threads keep the disk busy.
_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="chunkio")
EMPTY = np.uint64(2**64 - 1)  # the shard index's (offset, length) of a chunk that is not stored

Pieces = list[memoryview | bytes]


class ShardIndexError(DataContractError):
    """A shard file whose index is truncated or fails its checksum."""


def stored_chunk(index: np.ndarray, raw: bytes, k: int) -> memoryview | None:
    """The stored bytes of a shard's ``k``-th chunk (``index``/``raw`` from ``read_index``), None if absent."""
    if index[k, 0] == EMPTY:
        return None
    off = int(index[k, 0])
    return memoryview(raw)[off:off + int(index[k, 1])]


def _codec_chain(codecs: list[dict]) -> tuple[numcodecs.Zstd | None, bool] | None:
    """``(zstd or None, crc32c?)`` for a supported ``bytes → [zstd] → [crc32c]`` chain, else None."""
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
    return None if rest else (zstd, checksum)


class Codec:
    """Encode/decode one chunk with a supported chain."""

    def __init__(self, zstd: numcodecs.Zstd | None, checksum: bool, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.zstd, self.checksum, self.dtype, self.shape = zstd, checksum, dtype, shape

    def encode(self, chunk: np.ndarray) -> Pieces:
        """The stored bytes of ``chunk``, in pieces (an uncompressed chunk is not copied)."""
        data = memoryview(np.ascontiguousarray(chunk.astype(chunk.dtype.newbyteorder("<"), copy=False))).cast("B")
        if self.zstd is not None:
            data = memoryview(self.zstd.encode(data))
        pieces: Pieces = [data]
        if self.checksum:
            pieces.append(crc32c.crc32c(data).to_bytes(4, "little"))
        return pieces

    def decode(self, raw: bytes | memoryview) -> np.ndarray:
        """The chunk stored as ``raw``; ``ValueError`` if its checksum or codec fails."""
        raw = memoryview(raw)
        if self.checksum:
            if len(raw) < 4 or crc32c.crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise DataContractError("crc32c checksum mismatch")
            raw = raw[:-4]
        data = bytes(self.zstd.decode(raw)) if self.zstd is not None else raw
        expected = int(np.prod(self.shape)) * self.dtype.itemsize
        if len(data) != expected:
            raise DataContractError(f"decoded {len(data)} bytes, expected {expected}")
        return np.frombuffer(data, dtype=self.dtype.newbyteorder("<")).reshape(self.shape)


def _write_file(path: Path, pieces: Sequence[memoryview | bytes]) -> None:
    if is_remote(path):  # one PUT: an object is whole or absent, as a rename makes a file
        path.fs.pipe_file(path.path, b"".join(pieces))
        return
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


class ChunkWriter:
    """Writes whole time-chunks of one array whose chunks (or shards' inner chunks) hold one time each."""

    def __init__(self, array_dir: Path, meta: dict, codec: Codec, per_file: int, index_checksum: bool) -> None:
        self.dir = array_dir
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"])
        fill = meta.get("fill_value")
        self.fill = np.array(np.nan if fill == "NaN" else fill, dtype=self.dtype)
        self.sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self.codec = codec
        self.per_file = per_file  # times per file: 1 for plain chunks, the shard length when sharded
        self.sharded = per_file > 1 or meta["codecs"][0].get("name") == "sharding_indexed"
        self.index_checksum = index_checksum

    def key(self, t: int) -> Path:
        """The file holding time ``t``."""
        zeros = [0] * (len(self.shape) - 1)
        return self.dir / self.sep.join(["c", str(t // self.per_file), *map(str, zeros)])

    def _is_fill(self, chunk: np.ndarray) -> bool:
        # Data chunks are almost never all fill: one element decides without a pass over the chunk.
        first = chunk.flat[0] if chunk.size else self.fill
        if not (first == self.fill or (self.dtype.kind == "f" and np.isnan(first) and np.isnan(self.fill))):
            return False
        if self.dtype.kind == "f" and np.isnan(self.fill):
            return bool(np.isnan(chunk).all())
        return bool((chunk == self.fill).all())

    def read_index(self, path: Path, data: bool = True) -> tuple[np.ndarray, bytes] | None:
        """A shard file's ``(offset, length)`` per time and its bytes (only the index unless ``data``); None if absent."""
        size = self.per_file * 16 + (4 if self.index_checksum else 0)
        try:
            if is_remote(path):
                raw = path.read_bytes()  # one GET; a ranged read of the index would cost a second request
                total = len(raw)
            else:
                with open(path, "rb") as f:
                    total = os.fstat(f.fileno()).st_size
                    if not data and total >= size:
                        f.seek(total - size)
                    raw = f.read()
        except FileNotFoundError:
            return None
        if total < size:
            raise ShardIndexError(f"{path}: {total} bytes, shorter than its {size}-byte index")
        index_bytes = memoryview(raw)[len(raw) - size:]
        if self.index_checksum:
            if crc32c.crc32c(index_bytes[:-4]) != int.from_bytes(index_bytes[-4:], "little"):
                raise ShardIndexError(f"{path}: shard index fails its crc32c checksum")
            index_bytes = index_bytes[:-4]
        index = np.frombuffer(index_bytes, dtype="<u8").reshape(self.per_file, 2)
        stored = index[:, 0] != EMPTY
        if stored.any() and int((index[stored, 0] + index[stored, 1]).max()) > total - size:
            raise ShardIndexError(f"{path}: shard index points past the end of its data")
        return index, raw

    def _write_shard(self, first: int, values: dict[int, np.ndarray]) -> None:
        """Write the shard starting at time ``first``: ``values`` by time, other times kept as stored."""
        path = self.key(first)
        last = min(first + self.per_file, self.shape[0])
        kept: dict[int, memoryview] = {}
        if len(values) < last - first:  # not every time is rewritten: keep the others' bytes
            found = self.read_index(path)
            if found is not None:
                index, raw = found
                for k in range(self.per_file):
                    chunk = stored_chunk(index, raw, k) if first + k not in values else None
                    if chunk is not None:
                        kept[first + k] = chunk
        pieces: Pieces = []
        index = np.full((self.per_file, 2), EMPTY, dtype="<u8")
        offset = 0
        for k in range(self.per_file):
            t = first + k
            chunk = kept.get(t)
            parts = [chunk] if chunk is not None else None
            if t in values and not self._is_fill(values[t]):
                parts = self.codec.encode(values[t])
            if parts is None:
                continue
            length = sum(len(p) for p in parts)
            index[k] = (offset, length)
            offset += length
            pieces += parts
        if not pieces:
            path.unlink(missing_ok=True)
            return
        index_bytes = index.tobytes()
        pieces.append(index_bytes)
        if self.index_checksum:
            pieces.append(crc32c.crc32c(index_bytes).to_bytes(4, "little"))
        _write_file(path, pieces)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Times ``start:stop`` as stored (fill where a chunk is absent); ``ValueError`` on a damaged file."""
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        out[...] = self.fill
        for first in range(start // self.per_file * self.per_file, stop, self.per_file):
            found = self.read_index(self.key(first)) if self.sharded else None
            for t in range(max(first, start), min(first + self.per_file, stop)):
                if self.sharded:
                    raw: bytes | memoryview | None = stored_chunk(*found, t - first) if found else None
                    if raw is None:
                        continue
                else:
                    try:
                        raw = self.key(t).read_bytes()
                    except FileNotFoundError:
                        continue
                out[t - start] = self.codec.decode(raw)
        return out

    def _write_one(self, t: int, chunk: np.ndarray) -> None:
        path = self.key(t)
        if self._is_fill(chunk):
            path.unlink(missing_ok=True)
            return
        _write_file(path, self.codec.encode(chunk))

    def tasks(self, start: int, values: np.ndarray) -> list[Callable[[], None]]:
        """The file writes storing ``values`` (times × the array's other dims) from time ``start``, to run in any order."""
        values = np.asarray(values)
        if values.shape[1:] != self.shape[1:] or start < 0 or start + values.shape[0] > self.shape[0]:
            raise ValueError(f"{self.dir}: cannot write {values.shape} at time {start} into {self.shape}")
        values = values.astype(self.dtype, copy=False)
        n = values.shape[0]
        if not self.sharded:
            return [functools.partial(self._write_one, start + k, values[k]) for k in range(n)]
        firsts = range(start // self.per_file * self.per_file, start + n, self.per_file)
        return [functools.partial(self._write_shard, f, {t: values[t - start]
                                                         for t in range(max(f, start), min(f + self.per_file, start + n))})
                for f in firsts]

    def write(self, start: int, values: np.ndarray) -> None:
        """Store ``values`` (times × the array's other dims) as the chunks from time ``start``."""
        run_all(self.tasks(start, values))


def map_parallel(fn: Callable[[np.ndarray], float], items: Sequence[np.ndarray]) -> list[float]:
    """``fn`` over ``items`` on the writer threads, in order."""
    return list(_POOL.map(fn, items))


def run_all(tasks: Sequence[Callable[[], None]]) -> None:
    """Run file writes on the writer threads (one variable's shard beside another's); re-raise the first error."""
    if len(tasks) == 1:  # nothing to overlap (a slab's done flag): skip the pool's round trip
        tasks[0]()
        return
    futures = [_POOL.submit(task) for task in tasks]
    wait(futures)  # all of them, even after a failure: nothing may still be writing once this returns
    for future in futures:
        future.result()


def _stamp(array_dir: Path) -> tuple[object, ...] | None:
    meta_path = as_location(array_dir) / "zarr.json"
    # The inode too: a rewrite within one timestamp tick with an equal size must still be seen (an ETag remotely).
    found = stamp(meta_path)
    return None if found is None else (str(meta_path), *found)


def _parse_meta(path: str) -> dict | None:
    try:
        meta = json.loads(as_location(path).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
        return None
    if meta.get("chunk_key_encoding", {}).get("name") != "default" or meta.get("chunk_grid", {}).get("name") != "regular":
        return None
    return meta


def chunk_writer(array_dir: Path) -> ChunkWriter | None:
    """A ChunkWriter for an array with one time per (inner) chunk and a supported codec chain, else None."""
    found = _stamp(array_dir)
    return None if found is None else _writer_for(*found)


@functools.lru_cache(maxsize=256)
def _writer_for(meta_path: str, *version: object) -> ChunkWriter | None:
    # Built once per version of zarr.json (its mtime and size change when an append grows the
    # shape): a slab write asks for every array's writer, and rebuilding cost ~0.1 ms each.
    meta = _parse_meta(meta_path)
    if meta is None:
        return None
    shape = list(meta["shape"])
    outer = list(meta["chunk_grid"].get("configuration", {}).get("chunk_shape", []))
    codecs = meta.get("codecs", [])
    per_file, index_checksum = 1, False
    if codecs and codecs[0].get("name") == "sharding_indexed":
        conf = codecs[0].get("configuration", {})
        index_chain = _codec_chain(conf.get("index_codecs", []))
        if len(codecs) > 1 or conf.get("index_location", "end") != "end" or index_chain is None or index_chain[0]:
            return None
        inner, codecs, per_file, index_checksum = list(conf.get("chunk_shape", [])), conf.get("codecs", []), outer[0], index_chain[1]
    else:
        inner = outer
    if not inner or inner[0] != 1 or inner[1:] != shape[1:] or outer[1:] != shape[1:]:
        return None
    chain = _codec_chain(codecs)
    if chain is None:
        return None
    codec = Codec(chain[0], chain[1], np.dtype(meta["data_type"]), tuple(shape[1:]))
    return ChunkWriter(as_location(meta_path).parent, meta, codec, per_file, index_checksum)
