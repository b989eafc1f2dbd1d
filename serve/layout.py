"""Names of the files of a forecast run that serve writes and reads: the maps' paths.

Writer (:mod:`serve.maps`) and reader (:mod:`serve.catalog`) share this one definition, so
a map the renderer writes is exactly the map the catalog can find::

    maps/<product>/<region>/<lead_h:03d>.png
    maps/<product>/<region>/animation.gif
    maps/<product>/<region>/animation.mp4
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from core.errors import ConfigError

MAPS_DIR = "maps"
ERROR_MAPS_INDEX = "maps/index.json"
"""Under ``<verification>/<run>/``: every error map's size and sha256 (:mod:`serve.maps_error`)."""
NAME_RE = re.compile(r"[A-Za-z0-9_]{1,80}\Z")
"""A product or region name: what a path segment of a map may be."""
ANIMATION_FORMATS = ("gif", "mp4")
_MAP_KEY_RE = re.compile(rf"^{MAPS_DIR}/(?P<product>[A-Za-z0-9_]+)/(?P<region>[A-Za-z0-9_]+)/(?P<lead>\d{{3,}})\.png$")
_ANIMATION_RE = re.compile(rf"^{MAPS_DIR}/(?P<product>[A-Za-z0-9_]+)/(?P<region>[A-Za-z0-9_]+)/animation\.(?P<ext>gif|mp4)$")


def map_relpath(product: str, region: str, lead_hours: int) -> str:
    """Run-relative path of one map: ``maps/<product>/<region>/<lead_h:03d>.png``."""
    return f"{MAPS_DIR}/{product}/{region}/{lead_hours:03d}.png"


def animation_relpath(product: str, region: str, fmt: str) -> str:
    """Run-relative path of a product's animation over a region: ``maps/<product>/<region>/animation.<fmt>``."""
    if fmt not in ANIMATION_FORMATS:
        raise ConfigError(f"animation format {fmt!r} is not one of {', '.join(ANIMATION_FORMATS)}")
    return f"{MAPS_DIR}/{product}/{region}/animation.{fmt}"


def map_index(relpaths: Iterable[str]) -> dict[str, dict[str, list[int]]]:
    """Product → region → sorted lead hours of the maps among run-relative file paths."""
    index: dict[str, dict[str, set[int]]] = {}
    for key in relpaths:
        match = _MAP_KEY_RE.match(key)
        if match is not None:
            index.setdefault(match["product"], {}).setdefault(match["region"], set()).add(int(match["lead"]))
    return {p: {r: sorted(leads) for r, leads in sorted(regions.items())} for p, regions in sorted(index.items())}


def animation_index(relpaths: Iterable[str]) -> dict[str, dict[str, list[str]]]:
    """Product → region → animation formats present among run-relative file paths."""
    index: dict[str, dict[str, list[str]]] = {}
    for key in relpaths:
        match = _ANIMATION_RE.match(key)
        if match is not None:
            index.setdefault(match["product"], {}).setdefault(match["region"], []).append(match["ext"])
    return {p: {r: sorted(f) for r, f in regions.items()} for p, regions in index.items()}
