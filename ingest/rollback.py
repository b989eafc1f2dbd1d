"""Undo an append's extension of the time axis when the append fails before writing any new time.

Extending a store rewrites only metadata: every array's ``zarr.json`` (its shape), the ``time``
array's chunks and the consolidated metadata; the new times' chunks appear only when a slab is
written. Before extending, :func:`snapshot_extension` keeps the bytes of those files and the size
and mtime of every other file. If the append then fails with no new time done and no other file
touched (a re-check that replaced a preliminary time rewrote a shard: progress to keep), the
snapshot is put back and every file the attempt added is removed, so the store is byte-identical
to what it was. Otherwise the extension stays: its times are "not done" and a rerun writes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from core.location import as_location, is_remote, object_version, write_bytes
from ingest.regions import done_flags

log = logging.getLogger(__name__)


def _is_metadata(rel: str) -> bool:
    """The files an extension rewrites: any ``zarr.json`` and the ``time`` array's chunks."""
    return rel.endswith("zarr.json") or rel.startswith("time/")


@dataclass(frozen=True)
class ExtensionSnapshot:
    """What a store held before its time axis was extended."""

    path: Path
    size: int  # times before the extension
    saved: dict[str, bytes]  # relative path → bytes, of the files an extension rewrites
    stamps: dict[str, tuple[int, object]]  # relative path → (size, mtime_ns or ETag), of every other file

    def untouched(self) -> bool:
        """True when no new time is done and every file outside ``saved`` is as it was (or absent, if new)."""
        if done_flags(self.path)[self.size:].any():
            return False
        now = _listing(self.path)
        return all(now.get(rel) == stamp for rel, stamp in self.stamps.items())

    def restore(self) -> int:
        """Put the saved files back and remove every file added since; the number of files added."""
        added = [rel for rel in _listing(self.path) if rel not in self.saved and rel not in self.stamps]
        for rel in added:
            (self.path / rel).unlink()
        for rel, data in self.saved.items():
            write_bytes(self.path / rel, data)  # never a half-restored zarr.json under its own name
        return len(added)


def _listing(path: Path) -> dict[str, tuple[int, object]]:
    """Every file under the store: relative path → (size, a stamp that changes when it is rewritten)."""
    if is_remote(path):
        root = path.path.rstrip("/") + "/"
        found = path.fs.find(path.path, detail=True)
        # An object has no mtime_ns; its ETag (S3, GCS) or creation time (memory://) changes on every PUT.
        return {name[len(root):]: (int(info.get("size") or 0), object_version(info))
                for name, info in found.items() if name.startswith(root) and info.get("type") == "file"}
    out: dict[str, tuple[int, object]] = {}
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(path).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def snapshot_extension(path: Path) -> ExtensionSnapshot:
    """Record the store at ``path`` before :func:`ingest.append.extend_store` grows its time axis."""
    path = as_location(path)
    saved: dict[str, bytes] = {}
    stamps: dict[str, tuple[int, object]] = {}
    for rel, stamp in _listing(path).items():
        if _is_metadata(rel):
            saved[rel] = (path / rel).read_bytes()
        else:
            stamps[rel] = stamp
    return ExtensionSnapshot(path, int(done_flags(path).size), saved, stamps)


def roll_back_extension(snapshot: ExtensionSnapshot) -> bool:
    """Undo the extension if the failed append changed nothing else; True if the store is as it was."""
    try:
        if not snapshot.untouched():
            log.warning("append to %s failed after writing: its extended times stay (not done) for a rerun",
                        snapshot.path)
            return False
        added = snapshot.restore()
    except OSError as exc:  # a full disk may refuse the restore too: the extension then stays, harmless
        log.warning("could not undo the extension of %s (%s): its new times stay not done for a rerun",
                    snapshot.path, exc)
        return False
    log.warning("append to %s failed before writing any new time: the time axis is back to %d times "
                "(%d files the attempt added removed)", snapshot.path, snapshot.size, added)
    return True
