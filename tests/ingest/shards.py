"""Look inside a store's shard files: each time's stored chunk bytes, and damage to one chunk.

Stores keep one time per chunk and a slab of times per shard file, so "which times are on disk and
with which bytes" is read from each shard's index, not from file names.
"""

from __future__ import annotations

import json
from pathlib import Path

import crc32c

from ingest.chunkio import EMPTY, ChunkWriter, chunk_writer, stored_chunk


def time_arrays(store: Path) -> dict[str, ChunkWriter]:
    """Every array of the store indexed by time first (fields and flags), with its reader."""
    out = {}
    for meta in sorted(Path(store).glob("*/zarr.json")):
        dims = json.loads(meta.read_text()).get("dimension_names") or []
        writer = chunk_writer(meta.parent)
        if dims[:1] == ["time"] and writer is not None:
            out[meta.parent.name] = writer
    return out


def stored_chunks(store: Path, names: list[str] | tuple[str, ...] | None = None) -> dict[tuple[str, int], bytes]:
    """``(array, time) → stored bytes`` of every chunk on disk (a time absent from its shard is absent here)."""
    out: dict[tuple[str, int], bytes] = {}
    for name, w in time_arrays(store).items():
        if names is not None and name not in names:
            continue
        for key in sorted(w.dir.glob("c.*")):
            if key.name.endswith(".partial"):
                continue
            first = int(key.name.split(".")[1]) * w.per_file
            found = w.read_index(key)
            if not w.sharded:
                out[(name, first)] = key.read_bytes()
                continue
            for k in range(w.per_file):
                chunk = stored_chunk(*found, k)
                if chunk is not None:
                    out[(name, first + k)] = bytes(chunk)
    return out


def chunk_span(store: Path, name: str, t: int) -> tuple[Path, int, int]:
    """``(shard file, offset, length)`` of time ``t``'s chunk of array ``name``."""
    w = chunk_writer(Path(store) / name)
    key = w.key(t)
    index, _ = w.read_index(key)
    k = t % w.per_file
    assert index[k, 0] != EMPTY, f"{name} at time {t} is not stored"
    return key, int(index[k, 0]), int(index[k, 1])


def flip_bit(store: Path, name: str, t: int) -> Path:
    """Flip one bit in the middle of time ``t``'s stored chunk (its shard index stays valid)."""
    key, off, length = chunk_span(store, name, t)
    raw = bytearray(key.read_bytes())
    raw[off + length // 2] ^= 0x10
    key.write_bytes(bytes(raw))
    return key


def drop_chunk(store: Path, name: str, t: int) -> Path:
    """Remove time ``t``'s chunk from its shard's index (as if it had never been written); the file stays valid."""
    w = chunk_writer(Path(store) / name)
    key = w.key(t)
    index, raw = w.read_index(key)
    index = index.copy()
    index[t % w.per_file] = (EMPTY, EMPTY)
    size = w.per_file * 16 + (4 if w.index_checksum else 0)
    body = bytes(raw[: len(raw) - size]) + index.astype("<u8").tobytes()
    if w.index_checksum:
        body += crc32c.crc32c(index.astype("<u8").tobytes()).to_bytes(4, "little")
    key.write_bytes(body)
    return key
