"""A static-style STAC catalog of the published runs, built with pystac: one Catalog, one Collection, one Item per run.

Layout (every link absolute, built from the request's base URL so a proxy's ``root_path`` is kept)::

    stac/catalog.json                  Catalog "spherecast"  ── child ──▶ the Collection
    stac/collections/forecasts.json    Collection "spherecast-forecasts" (extent = union of the runs) ── item ──▶
    stac/items/<run>.json              Item <run>: init time, valid-time range, forecast extension, assets

An Item's assets are the run's downloads (``/runs/<run>/files/...``) with the STAC file extension's
``file:size`` and ``file:checksum`` (a multihash: ``1220`` + the sha256 hex the manifest records). The Zarr
asset points at the store root, as Zarr readers expect; its metadata is ``<href>/zarr.json``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pystac
from pystac.extensions.file import FileExtension

from core.runs import MANIFEST
from serve.catalog import Catalog, CatalogError, NotFound
from serve.downloads import media_type
from serve.layout import map_relpath

log = logging.getLogger(__name__)

CATALOG_ID = "spherecast"
COLLECTION_ID = "spherecast-forecasts"
FORECAST_EXTENSION = "https://stac-extensions.github.io/forecast/v0.2.0/schema.json"
GLOBAL_BBOX = [-180.0, -90.0, 180.0, 90.0]
GLOBAL_POLYGON = {"type": "Polygon", "coordinates": [[[-180.0, -90.0], [180.0, -90.0], [180.0, 90.0],
                                                      [-180.0, 90.0], [-180.0, -90.0]]]}
ZARR_MEDIA_TYPE = "application/vnd.zarr; version=3"
# Downloadable files of a run, as (asset key, title, roles); a file the run lacks is left out.
FILE_ASSETS = [("forecast.nc", "Forecast, NetCDF (CF)", ["data"]),
               ("forecast.grib2", "Forecast, GRIB2", ["data"])]


class Links:
    """Absolute URLs of the STAC documents and run files under one base URL (``http://host/root_path/``)."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/") + "/"

    def catalog(self) -> str:
        """URL of the root catalog."""
        return f"{self.base}stac/catalog.json"

    def collection(self) -> str:
        """URL of the forecasts collection."""
        return f"{self.base}stac/collections/forecasts.json"

    def item(self, run: str) -> str:
        """URL of a run's Item."""
        return f"{self.base}stac/items/{run}.json"

    def file(self, run: str, relpath: str) -> str:
        """Download URL of a run file."""
        return f"{self.base}runs/{run}/files/{relpath}"


def _utc(text: str) -> datetime:
    stamp = pd.Timestamp(text)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.to_pydatetime()


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def horizon(lead_hours: int) -> str:
    """An ISO 8601 duration for a lead time in hours (``PT120H``)."""
    return f"PT{int(lead_hours)}H"


def _file_asset(href: str, title: str, roles: list[str], kind: str, size: int, sha256: str) -> pystac.Asset:
    asset = pystac.Asset(href=href, title=title, media_type=kind, roles=roles)
    ext = FileExtension.ext(asset)
    ext.size = int(size)
    ext.checksum = "1220" + sha256
    return asset


def run_item(catalog: Catalog, run: str, links: Links) -> pystac.Item:
    """The STAC Item of one published run (``NotFound``/``BadParameter`` as the catalog raises them)."""
    entry = catalog.entry(run)
    files = catalog.manifest(run)["files"]
    init = _utc(entry["init_time"])
    valid = [_utc(v) for v in entry["valid_times"]] or [init]
    lead = max(entry["lead_hours"], default=0)
    item = pystac.Item(id=run, geometry=GLOBAL_POLYGON, bbox=list(GLOBAL_BBOX), datetime=init,
                       start_datetime=valid[0], end_datetime=valid[-1], collection=COLLECTION_ID,
                       properties={"title": f"spherecast forecast from {_iso(init)}",
                                   "forecast:reference_datetime": _iso(init), "forecast:horizon": horizon(lead)},
                       stac_extensions=[FORECAST_EXTENSION])
    if entry["created"]:
        item.properties["created"] = entry["created"]
    FileExtension.add_to(item)
    for key, title, roles in FILE_ASSETS:
        if key in files:
            item.add_asset(key, _file_asset(links.file(run, key), title, roles, media_type(key),
                                            files[key]["size"], files[key]["sha256"]))
    if "forecast.zarr/zarr.json" in files:
        item.add_asset("forecast.zarr", pystac.Asset(
            href=links.file(run, "forecast.zarr"), title="Forecast, Zarr v3 store (open the store root)",
            media_type=ZARR_MEDIA_TYPE, roles=["data"]))
    own = catalog.file(run, MANIFEST)
    item.add_asset("manifest", _file_asset(links.file(run, MANIFEST), "Manifest: files, sizes, sha256, provenance",
                                           ["metadata"], "application/json", own.size, own.sha256))
    global_maps = [(p, regions["global"]) for p, regions in entry["maps"].items() if regions.get("global")]
    if global_maps:
        product, leads = global_maps[0]
        first = min(leads)
        rel = map_relpath(product, "global", first)
        if rel in files:
            item.add_asset("thumbnail", _file_asset(f"{links.base}runs/{run}/{rel}",
                                                    f"{product} over the globe at +{first} h", ["thumbnail"],
                                                    "image/png", files[rel]["size"], files[rel]["sha256"]))
    item.add_link(pystac.Link(pystac.RelType.SELF, links.item(run), pystac.MediaType.GEOJSON))
    item.add_link(pystac.Link(pystac.RelType.ROOT, links.catalog(), pystac.MediaType.JSON))
    item.add_link(pystac.Link(pystac.RelType.PARENT, links.collection(), pystac.MediaType.JSON))
    item.add_link(pystac.Link(pystac.RelType.COLLECTION, links.collection(), pystac.MediaType.JSON))
    return item


def _published_items(catalog: Catalog, links: Links) -> list[pystac.Item]:
    items = []
    for run in reversed(catalog.run_names()):
        try:
            items.append(run_item(catalog, run, links))
        except (NotFound, CatalogError) as exc:
            # One broken or vanishing run must not take the collection down (as in the listing).
            log.warning("skipping run %s in the STAC collection: %s", run, exc)
    return items


def forecasts_collection(catalog: Catalog, links: Links) -> pystac.Collection:
    """The Collection of every published run, newest first; its temporal extent spans first init to last valid time."""
    items = _published_items(catalog, links)
    if items:
        start = min(i.datetime for i in items if i.datetime is not None)
        end = max(_utc(i.properties["end_datetime"]) for i in items)
        interval: list[datetime | None] = [start, end]
    else:
        interval = [datetime.now(UTC).replace(microsecond=0), None]  # nothing published yet: open from now
    collection = pystac.Collection(
        id=COLLECTION_ID, title="spherecast forecast runs",
        description="Published spherecast forecast runs: one item per initial time, with NetCDF, GRIB2 and Zarr "
                    "assets and their sizes and sha256 checksums.",
        extent=pystac.Extent(pystac.SpatialExtent([list(GLOBAL_BBOX)]), pystac.TemporalExtent([interval])),
        license="other")
    collection.remove_links(pystac.RelType.ROOT)  # pystac roots a new Collection at itself; ours is the Catalog
    collection.add_link(pystac.Link(pystac.RelType.SELF, links.collection(), pystac.MediaType.JSON))
    collection.add_link(pystac.Link(pystac.RelType.ROOT, links.catalog(), pystac.MediaType.JSON))
    collection.add_link(pystac.Link(pystac.RelType.PARENT, links.catalog(), pystac.MediaType.JSON))
    for item in items:
        collection.add_link(pystac.Link(pystac.RelType.ITEM, links.item(item.id), pystac.MediaType.GEOJSON,
                                        title=item.id))
    return collection


def root_catalog(links: Links) -> pystac.Catalog:
    """The root Catalog: links to the forecasts Collection and to the service's OpenAPI description."""
    root = pystac.Catalog(id=CATALOG_ID, title="spherecast",
                          description="Forecasts of the spherecast pipeline as a STAC catalog.")
    root.remove_links(pystac.RelType.ROOT)  # replaced by the absolute URL below
    root.add_link(pystac.Link(pystac.RelType.SELF, links.catalog(), pystac.MediaType.JSON))
    root.add_link(pystac.Link(pystac.RelType.ROOT, links.catalog(), pystac.MediaType.JSON))
    root.add_link(pystac.Link(pystac.RelType.CHILD, links.collection(), pystac.MediaType.JSON,
                              title="spherecast forecast runs"))
    root.add_link(pystac.Link("service-desc", f"{links.base}openapi.json",
                              "application/vnd.oai.openapi+json;version=3.1"))
    return root


def as_json(obj: pystac.STACObject) -> dict[str, Any]:
    """The STAC object as served: its links exactly as built (absolute), no href rewriting."""
    return obj.to_dict(include_self_link=True, transform_hrefs=False)
