// spherecast viewer: what lies under the pointer. Pixel → lon/lat for every region from the server's georef
// (`maps/regions/<region>.json`: the axes box in the PNG as fractions and a lon/lat lattice across it), and
// the product's fields (`maps/products/<product>.json`: EDR parameters, display units, scale and offset),
// read with the EDR position query (docs/edr.md). Loaded before viewer.js, whose helpers (state, getJson,
// formatValue, prettyUnits, productLabel, isoZ, parseUtc, GLOBAL_MAP, GLOBAL_REGION) it calls at run time.
"use strict";

const readoutCache = { georef: new Map(), product: new Map() };

// One fetch per region or product, shared by every caller; a failed fetch is forgotten so it can be retried.
function cachedJson(cache, key, url) {
  if (!cache.has(key)) {
    cache.set(key, getJson(url).catch((err) => { cache.delete(key); throw err; }));
  }
  return cache.get(key);
}

const georefOf = (region) => cachedJson(readoutCache.georef, region, `maps/regions/${encodeURIComponent(region)}.json`);
const productInfoOf = (product) => cachedJson(readoutCache.product, product, `maps/products/${encodeURIComponent(product)}.json`);

// Settled values, for the synchronous pointer handler: null until loaded (or when the load failed).
const settled = { georef: new Map(), product: new Map() };

function prefetchReadout(region, product) {
  if (region && !settled.georef.has(region)) {
    georefOf(region).then((g) => settled.georef.set(region, g), () => settled.georef.set(region, null));
  }
  if (product && !settled.product.has(product)) {
    productInfoOf(product).then((p) => settled.product.set(product, p), () => settled.product.set(product, null));
  }
}

const RAD = Math.PI / 180;
const POLE_LAT = 89.999; // as serve/georef.py: a node this close to a pole is on it

// Bilinear interpolation between the four lattice nodes around (fx, fy), blended as 3-D unit vectors so
// that a cell across the dateline or around a pole interpolates along the globe, not across the map.
// Mirrors serve/georef.py lonlat_at. Null outside the axes box or where the nearest node is off the globe.
function lonLatFromGeoref(ref, fx, fy) {
  const [left, top, right, bottom] = ref.box;
  const u = (fx - left) / (right - left), v = (fy - top) / (bottom - top);
  if (!(u >= 0 && u <= 1 && v >= 0 && v <= 1)) return null;
  const cols = ref.columns, rows = ref.rows;
  const gi = u * (cols - 1), gj = v * (rows - 1);
  const i0 = Math.min(Math.floor(gi), cols - 2), j0 = Math.min(Math.floor(gj), rows - 2);
  const wi = gi - i0, wj = gj - j0;
  const nearest = (j0 + (wj >= 0.5 ? 1 : 0)) * cols + i0 + (wi >= 0.5 ? 1 : 0);
  if (ref.lon[nearest] === null) return null;
  const corners = [];
  for (const [dj, di, w] of [[0, 0, (1 - wi) * (1 - wj)], [0, 1, wi * (1 - wj)], [1, 0, (1 - wi) * wj], [1, 1, wi * wj]]) {
    const k = (j0 + dj) * cols + i0 + di;
    if (ref.lon[k] !== null && w > 0) corners.push({ lon: ref.lon[k], lat: ref.lat[k], w });
  }
  const weight = corners.reduce((s, c) => s + c.w, 0);
  if (corners.some((c) => Math.abs(c.lat) >= POLE_LAT)) {
    // A pole drawn as a line (Robinson, PlateCarree): its nodes' longitudes say where along the line.
    const base = (corners.find((c) => Math.abs(c.lat) < POLE_LAT) || corners[0]).lon;
    const lons = corners.map((c) => base + ((((c.lon - base + 180) % 360) + 360) % 360) - 180);
    if (Math.max(...lons) - Math.min(...lons) < 90) {
      const lon = lons.reduce((s, lo, i) => s + lo * corners[i].w, 0) / weight;
      const lat = corners.reduce((s, c) => s + c.lat * c.w, 0) / weight;
      return { lon: ((((lon + 180) % 360) + 360) % 360) - 180, lat };
    }
  }
  let x = 0, y = 0, z = 0;
  for (const c of corners) {
    const lo = c.lon * RAD, la = c.lat * RAD;
    x += c.w * Math.cos(la) * Math.cos(lo);
    y += c.w * Math.cos(la) * Math.sin(lo);
    z += c.w * Math.sin(la);
  }
  const norm = Math.hypot(x, y, z);
  return { lon: Math.atan2(y, x) / RAD, lat: Math.asin(Math.max(-1, Math.min(1, z / norm))) / RAD };
}

// The global map's linear layout, used only while (or if) its georef cannot be had.
function lonLatFromGlobalMap(fx, fy) {
  const g = GLOBAL_MAP;
  const u = (fx - g.box[0]) / (g.box[2] - g.box[0]), v = (fy - g.box[1]) / (g.box[3] - g.box[1]);
  if (u < 0 || u > 1 || v < 0 || v > 1) return null;
  const [west, east, south, north] = g.extent;
  return { lon: west + u * (east - west), lat: north - v * (north - south) };
}

// { point } under the pointer, { outside: true } off the map, or { pending: true } while the georef loads.
function pointerPlace(event) {
  const img = document.getElementById("map");
  if (!img.naturalWidth) return { pending: true };
  const rect = img.getBoundingClientRect(); // the image box inside its border
  const fx = (event.clientX - rect.left - img.clientLeft) / img.clientWidth;
  const fy = (event.clientY - rect.top - img.clientTop) / img.clientHeight;
  const region = state.region || GLOBAL_REGION;
  const ref = settled.georef.get(region);
  let point;
  if (ref) point = lonLatFromGeoref(ref, fx, fy);
  else {
    if (ref === undefined) prefetchReadout(region, null);
    if (region !== GLOBAL_REGION) return { pending: true };
    point = lonLatFromGlobalMap(fx, fy);
  }
  return point ? { point } : { outside: true };
}

// The EDR position queries of a product: one per kind of parameter (pressure-level ones share a `z` list).
function positionQueries(info, point, datetime) {
  const groups = new Map();
  for (const p of info.parameters) {
    const g = groups.get(p.level_type) || { names: [], levels: [] };
    if (!g.names.includes(p.name)) g.names.push(p.name);
    if (p.level !== null && !g.levels.includes(p.level)) g.levels.push(p.level);
    groups.set(p.level_type, g);
  }
  return [...groups.values()].map((g) => {
    const q = new URLSearchParams({ coords: `POINT(${point.lon.toFixed(3)} ${point.lat.toFixed(3)})`,
                                    "parameter-name": g.names.join(",") });
    if (g.levels.length) q.set("z", g.levels.join(","));
    if (datetime) q.set("datetime", datetime);
    return `collections/${state.entry.name}/position?${q}`;
  });
}

// A channel's series (one value per valid time, stored units) from a CoverageJSON point answer.
function channelSeries(cov, p) {
  const range = cov.ranges[p.name];
  if (!range) return null;
  const zi = range.axisNames.indexOf("z");
  const nz = zi >= 0 ? range.shape[zi] : 1;
  const k = zi >= 0 ? cov.domain.axes.z.values.indexOf(p.level) : 0;
  if (k < 0) return null;
  return cov.domain.axes.t.values.map((_, t) => range.values[t * nz + k]);
}

const display = (f, v) => (v === null || v === undefined ? null : v * f.scale + f.offset);

// The product's fields at a point: times, and per field its display values (wind: speed and direction).
async function fieldsAt(info, point, datetime) {
  const covs = await Promise.all(positionQueries(info, point, datetime).map((url) => getJson(url)));
  const raw = {};
  let times = [];
  for (const p of info.parameters) {
    for (const cov of covs) {
      const series = channelSeries(cov, p);
      if (series) { raw[p.channel] = series; times = cov.domain.axes.t.values; break; }
    }
  }
  const fields = info.fields.map((f) => {
    const [a, b] = f.channels.map((c) => raw[c] || []);
    if (f.op !== "wind") return { ...f, values: a.map((v) => display(f, v)) };
    const speed = a.map((u, i) => (u === null || b[i] === null ? null : display(f, Math.hypot(u, b[i]))));
    // Meteorological direction: where the wind comes FROM, clockwise from north.
    const from = a.map((u, i) => (u === null || b[i] === null ? null : (Math.atan2(-u, -b[i]) / RAD + 360) % 360));
    return { ...f, values: speed, direction: from };
  });
  return { times: times.map(parseUtc), raw, fields };
}

function describeField(f, i) {
  const value = f.values[i];
  const units = prettyUnits(f.units);
  if (f.op === "wind") {
    const dir = f.direction[i];
    return `wind ${formatValue(value)} ${units}` + (dir === null ? "" : ` from ${Math.round(dir) % 360}°`);
  }
  return `${f.label} = ${formatValue(value)} ${units}`;
}

const DERIVED_NOTE = "values under the pointer are for forecast products";

async function readoutAt(point, datetime) {
  const info = await productInfoOf(state.product);
  if (!info.fields.length) return { text: `${DERIVED_NOTE}; ${productLabel(state.product)} is a derived map`, data: {} };
  const got = await fieldsAt(info, point, datetime);
  const values = got.fields.map((f) => f.values[0]);
  const data = { value: String(values[0]), values: JSON.stringify(values), raw: JSON.stringify(got.raw) };
  if (got.fields[0].op === "wind") data.direction = String(got.fields[0].direction[0]);
  return { text: got.fields.map((f) => describeField(f, 0)).join(" · "), data };
}

async function meteogramAt(point) {
  const info = await productInfoOf(state.product);
  if (!info.fields.length) return null;
  return fieldsAt(info, point, null);
}
