"""What the viewer needs to read a map: where each region's pixels are, and what each product's values mean.

- ``GET /maps/regions/{region}.json``: the region's axes box in its PNGs and a lon/lat lattice
  (:mod:`serve.georef`), for the built-in regions and the config's ``render.boxes``.
- ``GET /maps/products/{product}.json``: the product's channels as EDR parameters and the fields its
  readout shows, each with display units and the ``scale``/``offset`` from stored values (a pure
  function of the name, from :mod:`serve.products`); derived products (``error_``, ``spread_``,
  ``prob_``) say so and list no fields.

Both are pure functions of the request path and the code, cached per name, with their own
``Cache-Control`` and an ``ETag``; the lattice is sent gzip-compressed to clients that accept it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam

from core.config import MapBox
from core.variables import VARIABLES, parse_channel
from serve.catalog import NotFound
from serve.errors import error_responses
from serve.georef import georef
from serve.products import Product, product_channels, products_for
from serve.regions import REGIONS, box_region
from serve.settings import ServeSettings, get_settings

router = APIRouter(prefix="/maps", tags=["maps"])

SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
NAME_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
RegionParam = Annotated[str, PathParam(pattern=NAME_PATTERN, description="Map region: a built-in one or a "
                                       "`render.boxes` name", examples=["europe"])]
ProductParam = Annotated[str, PathParam(pattern=NAME_PATTERN, description="Map product, as in a run's `maps`",
                                        examples=["wind500"])]
CACHE_CONTROL = "public, max-age=3600"
"""An hour: the answers change only with a new server version or config."""
DERIVED_PREFIXES = {"error_": "error", "spread_": "spread", "prob_": "probability"}
"""Derived products (forecast − analysis, ensemble spread, probability): no forecast variable under the pointer."""
JSON_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {"schema": {"type": "object"}}}}, **error_responses(304, 404, 422)}


def _encoded(body: dict[str, Any]) -> tuple[bytes, bytes, str]:
    raw = json.dumps(body, separators=(",", ":")).encode()
    return raw, gzip.compress(raw, compresslevel=6, mtime=0), f'"{hashlib.sha256(raw).hexdigest()[:32]}"'


@lru_cache(maxsize=32)
def _region_answer(name: str, box_json: str | None) -> tuple[bytes, bytes, str]:
    """The encoded georef of a built-in region (``box_json`` None) or of a user box, computed once per process."""
    region = REGIONS[name] if box_json is None else box_region(MapBox.model_validate_json(box_json))
    return _encoded(georef(region))


def _answer(request: Request, encoded: tuple[bytes, bytes, str], head: bool) -> Response:
    raw, packed, etag = encoded
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": etag, "Vary": "Accept-Encoding"}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    body = raw
    if "gzip" in request.headers.get("accept-encoding", ""):
        body, headers["Content-Encoding"] = packed, "gzip"
    headers["Content-Length"] = str(len(body))
    return Response(b"" if head else body, media_type="application/json", headers=headers)


@router.head("/regions/{region}.json", include_in_schema=False)
@router.get("/regions/{region}.json", summary="Pixel → lon/lat of a map region's PNGs",
            response_class=Response, responses=JSON_RESPONSES)
def region_georef(region: RegionParam, request: Request, settings: SettingsDep) -> Response:
    """The region's axes box in its map PNGs (image fractions) and a lattice of lon/lat across that box."""
    boxes = {b.name: b for b in settings.map_boxes}
    if region in REGIONS:
        encoded = _region_answer(region, None)
    elif region in boxes:
        encoded = _region_answer(region, boxes[region].model_dump_json())
    else:
        raise NotFound(f"region {region!r} is not a map region; known: {', '.join([*REGIONS, *boxes])}")
    return _answer(request, encoded, request.method == "HEAD")


def _label(channel: str) -> str:
    name, level = parse_channel(channel)
    return VARIABLES[name].short_name.upper() + (str(level) if level is not None else "")


def _parameter(channel: str) -> dict[str, Any]:
    name, level = parse_channel(channel)
    return {"channel": channel, "name": name, "level": level, "level_type": VARIABLES[name].level_type,
            "units": VARIABLES[name].units}


def product_info(name: str) -> dict[str, Any]:
    """What a product's values are: its channels as EDR parameters and the fields shown, in display units.

    A ``ValueError`` names a product that is neither in the table, nor a channel, nor derived.
    """
    for prefix, kind in DERIVED_PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return {"product": name, "kind": kind, "parameters": [], "fields": []}
    channels = product_channels(name)
    product: Product = products_for(list(channels), [name])[0]
    fields: list[dict[str, Any]] = []
    c = product.convert
    if product.speed:
        u, v = product.shade
        fields.append({"label": "wind", "op": "wind", "channels": [u, v], "units": c.units, "scale": c.scale,
                       "offset": c.offset})
    else:
        ch = product.shade[0]
        fields.append({"label": _label(ch), "op": "value", "channels": [ch], "units": c.units, "scale": c.scale,
                       "offset": c.offset})
    if product.contour and product.contour not in product.shade:
        cc = product.contour_convert or product.convert
        fields.append({"label": _label(product.contour), "op": "value", "channels": [product.contour],
                       "units": cc.units, "scale": cc.scale, "offset": cc.offset})
    return {"product": name, "kind": "wind" if product.speed else "scalar",
            "parameters": [_parameter(ch) for ch in dict.fromkeys(ch for f in fields for ch in f["channels"])],
            "fields": fields}


@lru_cache(maxsize=256)
def _product_answer(name: str) -> tuple[bytes, bytes, str] | None:
    try:
        return _encoded(product_info(name))
    except (ValueError, KeyError):  # no product of the table, no channel of the vocabulary
        return None


@router.head("/products/{product}.json", include_in_schema=False)
@router.get("/products/{product}.json", summary="A map product's fields: EDR parameters, display units, scale",
            response_class=Response, responses=JSON_RESPONSES)
def product_fields(product: ProductParam, request: Request) -> Response:
    """The product's parameters and the fields its value readout shows, with display = stored × scale + offset."""
    encoded = _product_answer(product)
    if encoded is None:
        raise NotFound(f"product {product!r} is not a map product (neither a table product, a channel, "
                       "nor error_/spread_/prob_ of one)")
    return _answer(request, encoded, request.method == "HEAD")
