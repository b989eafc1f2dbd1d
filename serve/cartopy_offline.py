"""Natural Earth for cartopy without network: the shapefiles shipped in ``serve/naturalearth``.

cartopy looks for a layer first under ``config["pre_existing_data_dir"]``, then under
``config["data_dir"]``, and downloads it otherwise. Inside :func:`offline_natural_earth` the
first points at the shipped copy and the download step raises instead, so rendering can never
hang on (or leak to) the network.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cartopy
from cartopy.io.shapereader import NEShpDownloader

log = logging.getLogger(__name__)

NATURAL_EARTH_DIR = Path(__file__).resolve().parent / "naturalearth"
_KEY = ("shapefiles", "natural_earth")
_LAYOUT = ("shapefiles", "natural_earth", "{category}", "ne_{resolution}_{name}.shp")
# cartopy.config is process-global; the lock keeps concurrent renders from restoring each
# other's settings halfway through a draw.
_LOCK = threading.RLock()


class OfflineNaturalEarthError(FileNotFoundError):
    """A Natural Earth layer is missing locally and downloading is disabled."""


class _NoDownloadNEShpDownloader(NEShpDownloader):
    """cartopy's Natural Earth downloader with the download step replaced by a clear error."""

    def acquire_resource(self, target_path: Any, format_dict: dict[str, Any]) -> Path:
        """Refuse to download; name the layer and the directories searched."""
        layer = "ne_{resolution}_{name} ({category})".format(**format_dict)
        raise OfflineNaturalEarthError(
            f"Natural Earth layer {layer} is not in {cartopy.config['pre_existing_data_dir']} "
            f"or {cartopy.config['data_dir']}, and downloads are disabled (offline rendering)"
        )


def natural_earth_shapefile(natural_earth_dir: Path, category: str, resolution: str, name: str) -> Path:
    """Path of one layer's ``.shp`` inside a directory in cartopy's layout."""
    return natural_earth_dir.joinpath(*_LAYOUT[:2], category, f"ne_{resolution}_{name}.shp")


def check_natural_earth_dir(natural_earth_dir: Path) -> Path:
    """Return the directory if it holds the 110 m coastline in cartopy's layout, else raise."""
    shp = natural_earth_shapefile(natural_earth_dir, "physical", "110m", "coastline")
    if not shp.is_file():
        raise OfflineNaturalEarthError(
            f"natural_earth_dir {natural_earth_dir} has no {shp.relative_to(natural_earth_dir)} "
            "(expected cartopy's layout, see serve/naturalearth/README.md)"
        )
    return natural_earth_dir


@contextmanager
def offline_natural_earth(natural_earth_dir: Path | None = None) -> Iterator[Path]:
    """Within the block, cartopy reads Natural Earth from a local directory and never downloads."""
    directory = check_natural_earth_dir(Path(natural_earth_dir or NATURAL_EARTH_DIR).resolve())
    with _LOCK:
        saved_dir = cartopy.config["pre_existing_data_dir"]
        saved_downloader = cartopy.config["downloaders"].get(_KEY)
        cartopy.config["pre_existing_data_dir"] = directory
        cartopy.config["downloaders"][_KEY] = _NoDownloadNEShpDownloader(
            target_path_template=str(Path("{config[data_dir]}").joinpath(*_LAYOUT)),
            pre_downloaded_path_template=str(Path("{config[pre_existing_data_dir]}").joinpath(*_LAYOUT)),
        )
        log.debug("cartopy reads Natural Earth from %s (downloads disabled)", directory)
        try:
            yield directory
        finally:
            cartopy.config["pre_existing_data_dir"] = saved_dir
            if saved_downloader is None:
                cartopy.config["downloaders"].pop(_KEY, None)
            else:
                cartopy.config["downloaders"][_KEY] = saved_downloader
