"""The direct chunk writer must produce exactly the files Zarr itself would write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ingest.chunkio import chunk_writer

CHAINS = {
    "raw": [],
    "crc32c": [Crc32cCodec()],
    "zstd": [ZstdCodec(level=3)],
    "zstd+crc32c": [ZstdCodec(level=3), Crc32cCodec()],
}


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("separator", ["/", "."])
@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize(("dtype", "fill", "shape"), [("f4", np.nan, (6, 2, 5, 8)), ("u1", 0, (6,)), ("i1", 0, (6,))])
def test_bytes_equal_zarr_for_every_chain(tmp_path: Path, chain: str, separator: str, dtype: str, fill,
                                          shape: tuple) -> None:
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(shape) * 100).astype(dtype)
    values[2] = fill  # a chunk equal to the fill value: neither writer stores it
    trees = []
    for who in ("zarr", "ours"):
        arr = zarr.create_array(str(tmp_path / who), shape=shape, chunks=(1,) + shape[1:], dtype=dtype,
                                fill_value=fill, compressors=CHAINS[chain],
                                chunk_key_encoding={"name": "default", "separator": separator})
        arr[:] = np.full(shape, 7, dtype=dtype)  # something to overwrite, including the fill chunk
        if who == "zarr":
            arr[1:5] = values[1:5]
        else:
            writer = chunk_writer(tmp_path / who)
            assert writer is not None
            writer.write(1, values[1:5])
        trees.append(files(tmp_path / who))
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / who))[1:5], values[1:5])
    assert trees[0] == trees[1]
    assert not any(name.endswith(".partial") for name in trees[1])


def test_unsupported_layouts_fall_back_to_zarr(tmp_path: Path) -> None:
    blosc = zarr.create_array(str(tmp_path / "blosc"), shape=(4, 3), chunks=(1, 3), dtype="f4",
                              compressors=[BloscCodec()])
    multi_time = zarr.create_array(str(tmp_path / "multi"), shape=(4, 3), chunks=(2, 3), dtype="f4")
    split_shard = zarr.create_array(str(tmp_path / "split"), shape=(4, 6), chunks=(1, 3), shards=(2, 6), dtype="f4")
    partial = zarr.create_array(str(tmp_path / "partial"), shape=(4, 6), chunks=(1, 3), dtype="f4")
    v2 = zarr.create_array(str(tmp_path / "v2"), shape=(4, 3), chunks=(1, 3), dtype="f4", zarr_format=2)
    for arr in (blosc, multi_time, split_shard, partial, v2):
        assert chunk_writer(Path(arr.store.root)) is None
    assert chunk_writer(tmp_path / "does-not-exist") is None


def test_out_of_range_write_is_refused(tmp_path: Path) -> None:
    zarr.create_array(str(tmp_path / "a"), shape=(4, 3), chunks=(1, 3), dtype="f4", compressors=[])
    writer = chunk_writer(tmp_path / "a")
    with pytest.raises(ValueError, match="cannot write"):
        writer.write(3, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="cannot write"):
        writer.write(0, np.zeros((1, 4), np.float32))
    assert not any(p.name.startswith("c") for p in (tmp_path / "a").iterdir())


def _sharded(root: Path, shape: tuple, per_shard: int, dtype: str, fill, chain: str) -> zarr.Array:
    return zarr.create_array(str(root), shape=shape, chunks=(1,) + shape[1:], shards=(per_shard,) + shape[1:],
                             dtype=dtype, fill_value=fill, compressors=CHAINS[chain],
                             chunk_key_encoding={"name": "default", "separator": "."})


@pytest.mark.parametrize("chain", sorted(CHAINS))
@pytest.mark.parametrize(("start", "stop"), [(0, 8), (4, 8), (1, 3), (2, 10), (8, 10), (0, 10)])
@pytest.mark.parametrize(("dtype", "fill", "shape"), [("f4", np.nan, (10, 2, 5, 8)), ("u1", 0, (10,))])
def test_sharded_bytes_equal_zarr(tmp_path: Path, chain: str, start: int, stop: int, dtype: str, fill,
                                  shape: tuple) -> None:
    """Whole shards, parts of shards (the rest kept), the short last shard, and fill chunks, as Zarr writes them."""
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(shape) * 100).astype(dtype)
    values[5] = fill  # an empty inner chunk: left out of its shard by both writers
    trees = []
    for who in ("zarr", "ours"):
        arr = _sharded(tmp_path / who, shape, 4, dtype, fill, chain)
        before = np.full(shape, 7, dtype=dtype)
        before[9] = fill
        arr[:] = before  # existing chunks to keep or overwrite; time 9 absent from the last shard
        if who == "zarr":
            arr[start:stop] = values[start:stop]
        else:
            writer = chunk_writer(tmp_path / who)
            assert writer is not None and writer.sharded and writer.per_file == 4
            writer.write(start, values[start:stop])
        trees.append(files(tmp_path / who))
        expect = before.copy()
        expect[start:stop] = values[start:stop]
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / who))[:], expect)
    assert trees[0] == trees[1]


def test_a_shard_left_empty_is_removed_and_a_damaged_index_is_named(tmp_path: Path) -> None:
    arr = _sharded(tmp_path / "a", (8, 3), 4, "f4", np.nan, "zstd+crc32c")
    arr[:] = np.ones((8, 3), np.float32)
    writer = chunk_writer(tmp_path / "a")
    writer.write(4, np.full((4, 3), np.nan, np.float32))
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("c")) == ["c.0.0"]
    shard = tmp_path / "a" / "c.0.0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0x01  # inside the index
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard index fails its crc32c"):
        writer.write(1, np.zeros((1, 3), np.float32))  # a partial rewrite must read the index: refused
    assert shard.read_bytes() == bytes(raw)  # and the damaged file is left for `data check` to report
    shard.write_bytes(bytes(raw[:20]))
    with pytest.raises(ValueError, match="shorter than its"):
        writer.read_index(shard)


def test_codec_decode_checks_the_checksum(tmp_path: Path) -> None:
    arr = _sharded(tmp_path / "a", (4, 6), 4, "f4", np.nan, "zstd+crc32c")
    arr[:] = np.arange(24, dtype=np.float32).reshape(4, 6)
    writer = chunk_writer(tmp_path / "a")
    index, raw = writer.read_index(writer.key(0))
    off, length = (int(v) for v in index[2])
    np.testing.assert_array_equal(writer.codec.decode(raw[off:off + length]), np.arange(12, 18, dtype=np.float32))
    flipped = bytearray(raw[off:off + length])
    flipped[3] ^= 0x10
    with pytest.raises(ValueError, match="crc32c"):
        writer.codec.decode(bytes(flipped))
