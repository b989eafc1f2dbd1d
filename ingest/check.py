"""``spherecast data inspect|check``: what an analysis store holds, and whether it can be trusted.

:func:`inspect_store` is a short human summary. :func:`check_store` checks the store against the
contract and the disk: flags and chunk files agree (a done time whose chunk file is missing would
silently read as NaN), every chunk of every done time decodes (a flipped bit fails its crc32c),
done values are finite and physically plausible, the time axis is regular, the grid matches its
attribute, and the consolidated metadata readers use matches the arrays. Stores keep a slab of
times per shard file: each file is read once and each time's chunk decoded on its own, so memory
stays at one shard per variable however large the store is, and a damaged chunk is named by its
time and shard.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from core.errors import DataContractError
from core.grid import parse_grid_attr
from core.location import as_location, is_remote, zarr_url
from core.schema import EXPVER_PRELIMINARY, FLAG_VARIABLES, REQUIRED_FLAGS, validate_analysis
from core.variables import VARIABLES
from ingest.append import intent_path
from ingest.chunkio import ChunkWriter, chunk_writer, stored_chunk

log = logging.getLogger(__name__)

MAX_PER_KIND = 10  # messages of one kind for one variable before they are summarised


def format_time_ranges(times: pd.DatetimeIndex, step: pd.Timedelta | None, limit: int = 8) -> str:
    """Times compressed into runs, e.g. ``2000-01-01T00 .. 2000-01-02T18 (8 times), 2000-01-04T06``."""
    times = pd.DatetimeIndex(times).sort_values()
    if times.empty:
        return "none"
    runs: list[list] = [[times[0], times[0], 1]]  # [first, last, count]
    for t in times[1:]:
        if step is not None and t - runs[-1][1] == step:
            runs[-1][1], runs[-1][2] = t, runs[-1][2] + 1
        else:
            runs.append([t, t, 1])
    parts = [f"{a:%Y-%m-%dT%H}" if n == 1 else f"{a:%Y-%m-%dT%H} .. {b:%Y-%m-%dT%H} ({n} times)" for a, b, n in runs]
    more = f", … and {len(parts) - limit} more ranges" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _step(times: pd.DatetimeIndex) -> pd.Timedelta | None:
    return times[1] - times[0] if times.size > 1 else None


def _fmt_step(step: pd.Timedelta) -> str:
    hours = step / pd.Timedelta(hours=1)
    return f"{hours:g} h" if hours == int(hours) else str(step)


def _size_on_disk(path: Path) -> tuple[int, int]:
    if is_remote(path):  # one listing of the prefix carries every object's size
        sizes = [int(info.get("size") or 0) for info in path.fs.find(path.path, detail=True).values()
                 if info.get("type") == "file"]
        return sum(sizes), len(sizes)
    # scandir entries carry their stat on Linux: one pass, no Path object per chunk file.
    total = count = 0
    stack = [str(path)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                    count += 1
    return total, count


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _open_raw(path: Path, consolidated: bool | None) -> xr.Dataset:
    if not (path / "zarr.json").is_file():
        raise DataContractError(f"{path} is not an analysis store (no zarr.json)")
    return xr.open_zarr(zarr_url(path), consolidated=consolidated, zarr_format=3)


def describe_missing(path: Path) -> str:
    """One line on the times of a store that are not done, as ranges."""
    ds = _open_raw(as_location(path), None)
    times = pd.DatetimeIndex(ds["time"].values)
    missing = times[~ds["done"].values.astype(bool)]
    if missing.empty:
        return f"all {times.size} times done"
    return f"{missing.size} of {times.size} times missing: {format_time_ranges(missing, _step(times))}"


def inspect_store(path: Path) -> str:
    """A human summary: period, grid, variables, completeness, provenance, codecs, size on disk."""
    path = as_location(path)
    ds = _open_raw(path, None)
    times = pd.DatetimeIndex(ds["time"].values)
    step = _step(times)
    lines = [f"analysis store {path}"]
    if times.empty:
        lines.append("  period: empty")
    else:
        every = f" every {_fmt_step(step)}" if step is not None else ""
        lines.append(f"  period {times[0]:%Y-%m-%dT%H} .. {times[-1]:%Y-%m-%dT%H}, {times.size} times{every}")
    lines.append(f"  grid {ds.attrs.get('grid', '?')} ({ds.sizes.get('latitude', 0)} × {ds.sizes.get('longitude', 0)})")
    lines.append("  variables:")
    for name in sorted(v for v in ds.data_vars if v not in FLAG_VARIABLES):
        da = ds[name]
        where = (f"at {', '.join(str(int(lv)) for lv in ds['level'].values)} hPa" if "level" in da.dims
                 else "single level")
        lines.append(f"    {name} [{da.attrs.get('units', '?')}] {where}")
    flags = {f: ds[f].values for f in FLAG_VARIABLES if f in ds.data_vars}
    if "done" in flags:
        done = flags["done"].astype(bool)
        lines.append(f"  done {int(done.sum())} of {times.size} times")
        lines.append(f"  missing: {format_time_ranges(times[~done], step)}")
        if "expver" in flags:
            prelim = done & (flags["expver"] == EXPVER_PRELIMINARY)
            lines.append(f"  preliminary (ERA5T): {format_time_ranges(times[prelim], step)}")
        if "replaced" in flags:
            lines.append(f"  replaced by final ERA5: {int(flags['replaced'].astype(bool).sum())} times")
    for key in ("dataset_version", "source", "schema_version"):
        lines.append(f"  {key}: {ds.attrs.get(key, '(missing)')}")
    fields = [v for v in ds.data_vars if v not in FLAG_VARIABLES]
    if fields:
        arr = zarr.open_array(str(path / fields[0]), mode="r")
        codecs = [type(c).__name__.removesuffix("Codec").lower() for c in arr.compressors] or ["none"]
        shards = f", {arr.shards[0]} times per shard file" if arr.shards else ""
        lines.append(f"  chunks {tuple(arr.chunks)} ({fields[0]}){shards}, codecs: {' + '.join(codecs)}")
    nbytes, nfiles = _size_on_disk(path)
    lines.append(f"  size on disk {_human(nbytes)} ({nfiles} files)")
    if intent_path(path).is_file():
        lines.append(f"  an append was interrupted ({intent_path(path)}): the next ingest completes it")
    return "\n".join(lines)


@dataclass
class CheckReport:
    """The outcome of :func:`check_store`: ``ok`` when ``problems`` is empty; ``notes`` are facts."""

    path: Path
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chunks_read: int = 0
    damaged: dict[str, set[int]] = field(default_factory=dict)
    """Field → done time indices whose chunk is damaged: bad checksum, undecodable, NaN/Inf or out of range."""
    missing: dict[str, set[int]] = field(default_factory=dict)
    """Field → done time indices whose chunk (or whole shard file) is absent on disk."""
    damaged_files: set[Path] = field(default_factory=set)
    """Shard files that cannot be read at all (a truncated index or one failing its checksum)."""
    general: list[str] = field(default_factory=list)
    """Every problem not tied to a field's chunk at a time (metadata, contract, flags, time axis, …), uncapped."""

    def report(self) -> str:
        """The findings as text, problems first."""
        head = f"store {self.path}: " + ("OK" if self.ok else f"{len(self.problems)} problem(s)")
        lines = [head] + [f"  PROBLEM {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def bad_times(self) -> dict[str, list[int]]:
        """Field → sorted time indices whose chunk is damaged or missing (what re-fetching can fix)."""
        names = set(self.damaged) | set(self.missing)
        return {n: sorted(self.damaged.get(n, set()) | self.missing.get(n, set())) for n in sorted(names)}


# Kinds of findings about one field's chunk at one time; the others concern the store as a whole.
CHUNK_KINDS = {"decode": "damaged", "nan": "damaged", "range": "damaged", "missing": "missing"}


class _Findings:
    """Collects problems, capping each (kind, variable) at MAX_PER_KIND messages, and their structure uncapped."""

    def __init__(self, report: CheckReport) -> None:
        self.problems: list[str] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.report = report

    def add(self, kind: str, name: str, message: str, time: int | None = None) -> None:
        """Record one finding (its message kept only while under the cap for its kind and variable).

        ``time`` is the index of the done time whose chunk of field ``name`` the finding is about; a
        finding without one is about the store as a whole and goes to ``report.general``.
        """
        n = self.counts[(kind, name)] = self.counts.get((kind, name), 0) + 1
        if n <= MAX_PER_KIND:
            self.problems.append(message)
        if time is None or kind not in CHUNK_KINDS:
            self.report.general.append(message)
        else:
            self.mark(CHUNK_KINDS[kind], name, time)

    def mark(self, what: str, name: str, time: int) -> None:
        """Note time ``time`` of field ``name`` as ``damaged`` or ``missing`` without a message of its own."""
        getattr(self.report, what).setdefault(name, set()).add(int(time))

    def summaries(self) -> list[str]:
        """One line per capped (kind, variable) saying how many findings were left out."""
        return [f"{kind}: {name}: … and {n - MAX_PER_KIND} more like the above"
                for (kind, name), n in self.counts.items() if n > MAX_PER_KIND]


def _structure(ds: xr.Dataset, out: _Findings) -> None:
    """Flags, units, time axis and grid; then the whole contract if those passed."""
    before = len(out.problems)
    for flag in REQUIRED_FLAGS:
        if flag not in ds.data_vars or ds[flag].dims != ("time",):
            out.add("contract", flag, f"contract: missing per-time variable {flag!r}(time)")
    for name in (v for v in ds.data_vars if v not in FLAG_VARIABLES):
        units = ds[name].attrs.get("units")
        if name not in VARIABLES:
            out.add("units", name, f"variable {name!r} is not in the vocabulary")
        elif units != VARIABLES[name].units:
            out.add("units", name, f"units: {name!r} has {units!r}, the vocabulary says {VARIABLES[name].units!r}")
    t = ds["time"].values
    if t.size > 1 and (np.any(np.diff(t) <= np.timedelta64(0)) or np.any(np.diff(t) != np.diff(t)[0])):
        steps = sorted({pd.Timedelta(s) for s in np.diff(t)})
        out.add("time", "time", f"time axis is not regular and increasing (steps {', '.join(map(str, steps[:5]))})")
    try:
        grid = parse_grid_attr(str(ds.attrs["grid"]))
        for dim, want in (("latitude", grid.latitudes), ("longitude", grid.longitudes)):
            have = np.asarray(ds[dim].values, dtype=float)
            if have.shape != want.shape or not np.allclose(have, want, atol=1e-6):
                out.add("grid", dim, f"grid: {dim} coordinates do not match the grid attribute {ds.attrs['grid']!r}")
    except (KeyError, ValueError) as exc:
        out.add("grid", "grid", f"grid: cannot read the grid attribute ({exc})")
    if len(out.problems) == before:
        try:
            validate_analysis(ds, what="contract")
        except ValueError as exc:
            out.add("contract", "contract", str(exc))


def _consolidated_is_fresh(path: Path, out: _Findings) -> None:
    try:
        published = zarr.open_group(str(path), mode="r", use_consolidated=True)
    except ValueError:
        out.add("metadata", "consolidated", "consolidated metadata is missing: readers list every array")
        return
    actual = {n: a.metadata.to_dict() for n, a in zarr.open_group(str(path), mode="r", use_consolidated=False).arrays()}
    pub = {n: a.metadata.to_dict() for n, a in published.arrays()}
    for name in sorted(set(actual) | set(pub)):
        if pub.get(name) != actual.get(name):
            out.add("metadata", "consolidated", f"consolidated metadata of {name!r} is stale "
                                                f"(readers see shape {pub.get(name, {}).get('shape')}, "
                                                f"the array has {actual.get(name, {}).get('shape')}): "
                                                "consolidate the store")


def _chunk_coords(arr: zarr.Array, i: int) -> list[tuple[int, ...]]:
    """The chunk grid coordinates holding time index ``i`` of ``arr``."""
    rest = [range(-(-s // c)) for s, c in zip(arr.shape[1:], arr.chunks[1:], strict=True)]
    return [(i // arr.chunks[0],) + tuple(c) for c in itertools.product(*rest)]


class _Shards:
    """One variable's shard files, read once each (the scan goes through times in order)."""

    def __init__(self, writer: ChunkWriter, full: bool) -> None:
        self.w, self.full = writer, full
        self.key: Path | None = None
        self.found: tuple[np.ndarray, bytes] | None = None
        self.error: str | None = None

    def _load(self, key: Path) -> None:
        self.key, self.found, self.error = key, None, None
        try:
            # A quick check reads only each file's index, from its end.
            self.found = self.w.read_index(key, data=self.full)
        except ValueError as exc:
            self.error = str(exc)

    def chunk(self, name: str, i: int, when: str, out: _Findings) -> bytes | None:
        """Time ``i``'s stored bytes (b"" when only presence was read); None after recording why not."""
        key = self.w.key(i)
        label = f"{name}/{key.name}"
        if key != self.key:
            self._load(key)
            if self.error is not None:
                out.add("decode", name, f"{name}: shard {label} is damaged ({self.error}): its times cannot be read", i)
                out.report.damaged_files.add(key)
        if self.error is not None:
            out.mark("damaged", name, i)  # every done time of an unreadable shard, though named once
            return None
        if self.found is None:
            out.add("missing", name, f"{name} at {when}: shard {label} is missing on disk though the time is done "
                                      "(it would read as NaN)", i)
            return None
        k = i % self.w.per_file
        chunk = stored_chunk(*self.found, k)
        if chunk is None:
            out.add("missing", name, f"{name} at {when}: chunk {k} of shard {label} is missing though the time "
                                      "is done (it would read as NaN)", i)
            return None
        return bytes(chunk) if self.full else b""


def _scan_sharded(shards: _Shards, name: str, i: int, when: str, out: _Findings, report: CheckReport,
                  levels: np.ndarray | None) -> None:
    """Check one done time of one sharded field: chunk stored, decodable, finite, in range."""
    raw = shards.chunk(name, i, when, out)
    if raw is None or not shards.full:
        return
    try:
        values = shards.w.codec.decode(raw)
    except ValueError as exc:
        out.add("decode", name, f"{name} at {when}: chunk {i % shards.w.per_file} of shard {name}/"
                                 f"{shards.w.key(i).name} does not decode ({exc})", i)
        return
    report.chunks_read += 1
    _values(name, values, when, out, levels, i)


def _values(name: str, values: np.ndarray, when: str, out: _Findings, levels: np.ndarray | None, i: int) -> None:
    """NaN/Inf and physical-range findings for done time ``i`` of one field."""
    finite = np.isfinite(values)
    if not finite.all():
        out.add("nan", name, f"{name} at {when}: {int((~finite).sum())} NaN/Inf values in a done time", i)
    if finite.any():
        lo, hi = VARIABLES[name].valid_range if name in VARIABLES else (-np.inf, np.inf)
        vmin, vmax = float(values[finite].min()), float(values[finite].max())
        if vmin < lo or vmax > hi:
            at = ""
            if levels is not None:
                flat = np.where(finite, values, (lo + hi) / 2).reshape(len(levels), -1)
                bad = (flat.min(axis=1) < lo) | (flat.max(axis=1) > hi)
                at = f" (level {', '.join(str(int(lv)) for lv in np.asarray(levels)[bad])} hPa)"
            out.add("range", name, f"{name} at {when}{at}: values {vmin:g} .. {vmax:g} outside the "
                                    f"physical range [{lo:g}, {hi:g}] {VARIABLES[name].units}", i)


def _scan_time(path: Path, name: str, arr: zarr.Array, i: int, when: str, full: bool, out: _Findings,
               report: CheckReport, levels: np.ndarray | None) -> None:
    """Check one done time of one field stored a chunk per file: present, decodable, finite, in range."""
    missing = []
    for coords in _chunk_coords(arr, i):
        key = arr.metadata.encode_chunk_key(coords)
        if not (path / name / key).is_file():
            missing.append(key)
            out.add("missing", name, f"{name} at {when}: chunk {name}/{key} is missing on disk "
                                      f"though the time is done (it would read as NaN)", i)
    if not full or missing:
        return
    try:
        values = arr[i]
        report.chunks_read += len(_chunk_coords(arr, i))
    except Exception:  # any decode failure (checksum, codec) is a finding: pinpoint its chunk
        for coords in _chunk_coords(arr, i):
            try:
                arr.get_block_selection(coords)
            except Exception as exc:
                key = arr.metadata.encode_chunk_key(coords)
                out.add("decode", name, f"{name} at {when}: chunk {name}/{key} does not decode "
                                         f"({type(exc).__name__}: {exc})", i)
        return
    _values(name, values, when, out, levels, i)


def check_store(path: Path, full: bool = True, require_complete: bool = False) -> CheckReport:
    """Check a store against the contract and the disk; ``full`` also decodes every done chunk."""
    path = as_location(path)
    report = CheckReport(path)
    out = _Findings(report)
    if intent_path(path).is_file():
        out.add("append", "append", f"an append was interrupted ({intent_path(path)}): "
                                    "the next ingest (or extend_store) completes it")
    partial = list(path.rglob("*.partial")) if not is_remote(path) and path.is_dir() else []
    if partial:
        report.notes.append(f"{len(partial)} half-written *.partial files from a killed writer (removed by the next ingest)")
    try:
        ds = _open_raw(path, False)
    except Exception as exc:  # whatever stops xarray opening it is the one finding worth reporting
        out.add("open", "open", f"cannot open the store: {type(exc).__name__}: {exc}")
        ds = None
    if ds is not None:
        _consolidated_is_fresh(path, out)
        _structure(ds, out)
        _scan(path, ds, full, require_complete, out, report)
    report.problems = out.problems + out.summaries()
    report.ok = not report.problems
    log.info("checked %s: %d problems, %d chunks read", path, len(report.problems), report.chunks_read)
    return report


def _scan(path: Path, ds: xr.Dataset, full: bool, require_complete: bool, out: _Findings,
          report: CheckReport) -> None:
    """Per-time checks: flag values, completeness, and every done time's chunks."""
    if "done" not in ds.data_vars or ds["done"].dims != ("time",):
        return
    times = pd.DatetimeIndex(ds["time"].values)
    flags = {}
    for flag in (f for f in FLAG_VARIABLES if f in ds.data_vars):
        try:
            flags[flag] = ds[flag].values
        except Exception:  # a corrupt flag chunk: name it, and skip what depends on the flag
            arr = zarr.open_array(str(path / flag), mode="r")
            for i in range(arr.shape[0]):
                try:
                    arr[i]
                except Exception as exc:
                    out.add("decode", flag, f"flag {flag!r} at {times[i]:%Y-%m-%dT%H} does not decode "
                                            f"({type(exc).__name__}: {exc})")
    for flag, allowed in (("done", {0, 1}), ("expver", {0, 1, 5}), ("replaced", {0, 1})):
        bad = sorted(set(np.unique(flags[flag]).tolist()) - allowed) if flag in flags else []
        if bad:
            out.add("flags", flag, f"flag {flag!r} holds values {bad}, allowed {sorted(allowed)}")
    if "done" not in flags:
        return
    done = flags["done"].astype(bool)
    missing = times[~done]
    if missing.size:
        text = f"{missing.size} of {times.size} times not done: {format_time_ranges(missing, _step(times))}"
        if require_complete:
            out.add("complete", "done", text)
        else:
            report.notes.append(text)
    fields = [v for v in ds.data_vars if v not in FLAG_VARIABLES and ds[v].dims[:1] == ("time",)]
    arrays = {name: zarr.open_array(str(path / name), mode="r") for name in fields}
    writers = {name: chunk_writer(path / name) for name in fields}
    shards = {name: _Shards(w, full) for name, w in writers.items() if w is not None and w.sharded}
    for i in np.flatnonzero(done):
        when = f"{times[i]:%Y-%m-%dT%H}"
        for name, arr in arrays.items():
            levels = ds["level"].values if "level" in ds[name].dims else None
            if name in shards:
                _scan_sharded(shards[name], name, int(i), when, out, report, levels)
            else:
                _scan_time(path, name, arr, int(i), when, full, out, report, levels)
    report.notes.append(f"{int(done.sum())} done times × {len(fields)} variables checked"
                        + (f", {report.chunks_read} chunks decoded" if full else " (chunk files only)"))
