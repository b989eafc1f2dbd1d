"""The fields of derived maps, computed lead by lead into ``.npy`` files the renderer maps read-only.

Error (forecast − analysis), ensemble spread and probability of exceedance are computed here in
display units (:mod:`serve.products_derived`), one lead at a time, so memory holds one lead of one
product's inputs (all members of it for an ensemble) and never a whole run: at 0.25° a 41-lead
stack is 170 MB per field, a 50-member lead 200 MB per channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from core.errors import DataContractError
from core.variables import parse_channel
from serve.products import Product
from serve.products_derived import Threshold, contour_key, shade_key


def channel_field(ds: xr.Dataset, channel: str, **index: int) -> np.ndarray:
    """float32 values of one channel of ``ds.isel(**index)``, latitude and longitude last."""
    name, level = parse_channel(channel)
    if name not in ds.data_vars:
        raise DataContractError(f"dataset has no variable {name!r} (needed for channel {channel!r})")
    da = ds[name].isel({k: v for k, v in index.items() if k in ds[name].dims})
    if level is not None:
        da = da.sel(level=level)
    rest = [d for d in da.dims if d not in ("latitude", "longitude")]
    return np.asarray(da.transpose(*rest, "latitude", "longitude").values, dtype=np.float32)


def shade_values(product: Product, fields: Mapping[str, np.ndarray]) -> np.ndarray:
    """A product's shaded quantity in display units (the speed of a (u, v) pair); works on any leading dims."""
    if product.speed:
        return product.convert(np.hypot(fields[product.shade[0]], fields[product.shade[1]]))
    return product.convert(np.asarray(fields[product.shade[0]], dtype=np.float32))


def contour_values(product: Product, fields: Mapping[str, np.ndarray]) -> np.ndarray:
    """A product's contoured quantity in display units."""
    if product.contour is None:
        raise ValueError(f"map product {product.name!r} has no contoured field")
    convert = product.contour_convert or product.convert
    return convert(np.asarray(fields[product.contour], dtype=np.float32))


def threshold_values(row: Threshold, fields: Mapping[str, np.ndarray]) -> np.ndarray:
    """The thresholded quantity of a probability row in its display units."""
    if len(row.field) == 2:
        return row.convert(np.hypot(fields[row.field[0]], fields[row.field[1]]))
    return row.convert(np.asarray(fields[row.field[0]], dtype=np.float32))


class LeadArrays:
    """``(lead, latitude, longitude)`` float32 ``.npy`` files in a directory, filled one lead at a time."""

    def __init__(self, directory: Path, keys: Sequence[str], shape: tuple[int, int, int]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = {k: directory / f"{k}.npy" for k in keys}
        self._maps = {k: np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=shape)
                      for k, p in self.paths.items()}

    def __setitem__(self, where: tuple[str, int], values: np.ndarray) -> None:
        key, lead = where
        self._maps[key][lead] = values

    def close(self) -> dict[str, str]:
        """Flush every file; array name → path, as jobs take them."""
        for array in self._maps.values():
            array.flush()
        self._maps.clear()
        return {k: str(p) for k, p in self.paths.items()}


def fill_errors(out: LeadArrays, i: int, bases: Sequence[Product], forecast: Mapping[str, np.ndarray],
                truth: Mapping[str, np.ndarray]) -> None:
    """Lead ``i`` of every base's error fields: forecast − analysis in display units."""
    for base in bases:
        out[shade_key("error", base), i] = shade_values(base, forecast) - shade_values(base, truth)
        if base.contour and (base.contour,) != base.shade:
            out[contour_key("error", base), i] = contour_values(base, forecast) - contour_values(base, truth)


def fill_ensemble(out: LeadArrays, i: int, bases: Sequence[Product], rows: Sequence[Threshold],
                  members: Mapping[str, np.ndarray]) -> None:
    """Lead ``i`` of spread (std over members, ddof 0) and probability (% of members) fields.

    ``members`` maps each channel to its ``(member, latitude, longitude)`` values at that lead.
    """
    for base in bases:
        out[shade_key("spread", base), i] = shade_values(base, members).std(axis=0, dtype=np.float64)
    for row in rows:
        values = threshold_values(row, members)
        beyond = values > row.value if row.op == ">" else values < row.value
        out[f"prob__{row.name}__shade", i] = 100.0 * beyond.mean(axis=0)
