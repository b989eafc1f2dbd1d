"""Names of the files of a forecast run that serve writes and reads: the maps' paths.

Writer (:mod:`serve.maps`) and reader (:mod:`serve.catalog`) share this one definition, so
a map the renderer writes is exactly the map the catalog can find.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from core.variables import parse_channel

log = logging.getLogger(__name__)

MAPS_DIR = "maps"
_MAP_KEY_RE = re.compile(rf"^{MAPS_DIR}/(?P<channel>[A-Za-z0-9_]+)/(?P<lead>\d{{3,}})\.png$")


def map_relpath(channel: str, lead_hours: int) -> str:
    """Run-relative path of one map: ``maps/<channel>/<lead_h:03d>.png``."""
    return f"{MAPS_DIR}/{channel}/{lead_hours:03d}.png"


def map_index(relpaths: Iterable[str]) -> dict[str, list[int]]:
    """Channel → sorted lead hours of the maps among run-relative file paths."""
    index: dict[str, set[int]] = {}
    for key in relpaths:
        match = _MAP_KEY_RE.match(key)
        if match is None:
            continue
        try:
            parse_channel(match["channel"])
        except ValueError:
            log.debug("ignoring map of unknown channel %s", key)
            continue
        index.setdefault(match["channel"], set()).add(int(match["lead"]))
    return {ch: sorted(leads) for ch, leads in sorted(index.items())}
