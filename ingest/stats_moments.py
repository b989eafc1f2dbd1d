"""Per-time moments of the analysis channels, read from the store in blocks of bounded bytes.

Each analysis time ``t`` contributes one unit of weight to the statistics: its area-weighted mean
``m_t = Σ w_ij x_tij`` and its area-weighted sum of squared deviations ``M2_t = Σ w_ij (x_tij − m_t)²``
(``w`` sums to 1 over the sphere). The tendency between consecutive times ``t−1, t`` contributes the
same two numbers for ``x_t − x_{t−1}``. Those per-time numbers (``(time, channel)`` float64) are all
the statistics need: :func:`combine` merges them with the parallel-variance formula of Chan, Golub
& LeVeque (1979), so the fields themselves are never held for more than one block of times.

:func:`read_moments` reads runs of store indices in blocks of at most ``budget_bytes`` of float32
fields (and the variables they are read from; at least one time), converts one channel of one time at a
time to float64 (never a float64 copy of a block), and counts every
time it reads in :data:`READS` (tests assert an incremental update reads only what changed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from core.errors import DataContractError
from core.variables import parse_channel

DEFAULT_BUDGET = 64 * 2**20  # bytes of float32 fields one block may hold (at 0.25°, 70 channels: one time)


@dataclass
class ReadCounter:
    """How many analysis times the statistics have read from stores (for tests and logs)."""

    times: int = 0
    calls: int = 0


READS = ReadCounter()


@dataclass
class Moments:
    """Per-time moments aligned to store indices: ``mean``/``m2`` of the fields and ``dmean``/``dm2`` of the
    tendency ending at each time (NaN where not computed)."""

    mean: np.ndarray  # (n, channel)
    m2: np.ndarray
    dmean: np.ndarray
    dm2: np.ndarray

    @classmethod
    def empty(cls, n: int, channels: int) -> Moments:
        """``n`` times with nothing computed yet."""
        return cls(*(np.full((n, channels), np.nan) for _ in range(4)))


def combine(mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``k`` parts of unit weight each (``(k, channel)``) into the mean and variance of their union.

    Chan et al.'s pairwise update ``M2 = M2_a + M2_b + δ² n_a n_b / (n_a + n_b)``, applied to all ``k`` parts
    at once, is ``M2 = Σ M2_i + Σ n_i (m_i − m)²`` with ``m = Σ n_i m_i / n``; here every ``n_i`` is 1.
    """
    if mean.shape[0] == 0:
        raise ValueError("no parts to combine")
    total = mean.mean(axis=0)
    m2_total = m2.sum(axis=0) + ((mean - total) ** 2).sum(axis=0)
    return total, m2_total / mean.shape[0]


def channel_sources(group: zarr.Group, channels: list[str], what: str) -> list[tuple[str, int | None]]:
    """For each channel, the store array it is read from and its level index (None for a surface field)."""
    levels = [int(v) for v in group["level"][:]] if "level" in group else []
    out = []
    for ch in channels:
        name, level = parse_channel(ch)
        if name not in group:
            raise DataContractError(f"{what} has no variable {name!r} (needed for channel {ch!r})")
        if level is not None and level not in levels:
            raise DataContractError(f"{what} has no level {level} for {name!r} (needed for channel {ch!r})")
        out.append((name, levels.index(level) if level is not None else None))
    return out


def contiguous(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted indices as half-open runs ``(start, stop)`` of consecutive values."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(int(i) for i in indices)):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class BlockReader:
    """Reads ``(times, channel, lat, lon)`` float32 blocks of a store's channels, one array read per variable."""

    def __init__(self, path: Path, channels: list[str], weights: np.ndarray, budget_bytes: int = DEFAULT_BUDGET):
        group = zarr.open_group(str(path), mode="r", use_consolidated=None)
        self.sources = channel_sources(group, channels, f"analysis store {path}")
        self.arrays = {name: group[name] for name, _ in self.sources}
        nlat, nlon = self.arrays[self.sources[0][0]].shape[-2:]
        self.nc = len(channels)
        # A time costs its channels' stack plus every variable it is read from, all levels: a chunk holds
        # one time of all levels, so reading a variable whole decodes each chunk once.
        per_time = 4 * (self.nc * nlat * nlon + sum(int(np.prod(a.shape[1:])) for a in self.arrays.values()))
        self.block = max(1, int(budget_bytes) // per_time)  # times per block
        self.w = np.asarray(weights, dtype=np.float64) / nlon  # per row; each time's weights sum to 1

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Store times ``lo:hi`` of every channel, float32 ``(hi−lo, channel, lat, lon)``."""
        first = self.arrays[self.sources[0][0]]
        out = np.empty((hi - lo, self.nc, *first.shape[-2:]), dtype=np.float32)
        by_var: dict[str, list[tuple[int, int | None]]] = {}
        for c, (name, level) in enumerate(self.sources):
            by_var.setdefault(name, []).append((c, level))
        for name, targets in by_var.items():
            # A plain slice, not an orthogonal selection of levels: Zarr builds an int64 index per selected
            # element for the latter (twice the block's bytes), which measured as the pass's peak memory.
            values = self.arrays[name][lo:hi]
            for c, level in targets:
                out[:, c] = values[:, level] if level is not None else values
            del values
        READS.times += hi - lo
        READS.calls += 1
        return out

    def moments_of(self, x: np.ndarray) -> tuple[float, float]:
        """Area-weighted mean and sum of squared deviations of one float64 ``(lat, lon)`` field."""
        m = float(np.einsum("ij,i->", x, self.w))
        d = x - m
        return m, float(np.einsum("ij,ij,i->", d, d, self.w))


def read_moments(reader: BlockReader, runs: list[tuple[int, int]], out: Moments, offset: int) -> None:
    """Fill ``out`` (row ``k`` = store index ``offset + k``) for every index in ``runs``, tendencies where the
    previous index is in the same run; one block of ``reader.block`` times in memory at a time."""
    for lo, hi in runs:
        prev: np.ndarray | None = None  # float32 (channel, lat, lon) of the previous time in this run
        for b in range(lo, hi, reader.block):
            block = reader.read(b, min(b + reader.block, hi))
            for k in range(block.shape[0]):
                row = b + k - offset
                # One channel at a time in float64: at 0.25° a time of 70 channels is 0.6 GB as float64.
                for c in range(reader.nc):
                    x = block[k, c].astype(np.float64)
                    out.mean[row, c], out.m2[row, c] = reader.moments_of(x)
                    if prev is not None:
                        out.dmean[row, c], out.dm2[row, c] = reader.moments_of(x - prev[c])
                prev = block[k]
            prev = prev.copy() if prev is not None else None  # the block is dropped, its last time kept
            del block
