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
    partial = zarr.create_array(str(tmp_path / "partial"), shape=(4, 6), chunks=(1, 3), dtype="f4")
    v2 = zarr.create_array(str(tmp_path / "v2"), shape=(4, 3), chunks=(1, 3), dtype="f4", zarr_format=2)
    for arr in (blosc, multi_time, partial, v2):
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
