// spherecast viewer: pick a run, a product, a region and a lead time; the map is the run's pre-rendered PNG.
// The state lives in the URL hash (#run=…&product=…&region=…&lead=…): links can be shared, and editing
// the hash or going back/forward moves the view. Maps are `maps/<product>/<region>/<lead>.png` when the
// catalog entry has `maps: {product: {region: [leads]}}`, else the older `maps/<channel>/<lead>.png`.
// Values under the pointer and meteograms: readout.js (server georef per region, EDR position query).
"use strict";

// Where the map sits in a global PNG, as fractions of the image (left, top, right, bottom), and the
// lon/lat it spans (west, east, south, north): only the fallback while the server's georef of the global
// region (maps/regions/global.json, used for every region) cannot be had. tests/serve/test_viewer.py
// checks these numbers against a rendered map.
const GLOBAL_MAP = { box: [0.08025, 0.07, 0.91975, 0.8], extent: [-180, 180, -90, 90] };
const GLOBAL_REGION = "global";
const HOVER_DELAY_MS = 150;

const $ = (id) => document.getElementById(id);
const state = { runs: [], entry: null, details: new Map(), product: "", region: "", leads: [], index: 0,
                timer: null, hoverTimer: null, hoverSeq: 0, meteoSeq: 0 };

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function productLabel(product) {
  const m = /^(.*)_(\d+)$/.exec(product);
  return m ? `${m[1].replace(/_/g, " ")} ${m[2]} hPa` : product.replace(/_/g, " ");
}

const SUPERSCRIPT = { "-": "⁻", 0: "⁰", 1: "¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸", 9: "⁹" };
function prettyUnits(units) {
  return (units || "").replace(/\*\*(-?\d+)/g, (_, p) => [...p].map((c) => SUPERSCRIPT[c]).join(""));
}

function formatValue(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "no value";
  const a = Math.abs(v);
  return a >= 1000 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 0.01 || a === 0 ? v.toFixed(3) : v.toExponential(2);
}

function parseUtc(iso) {
  return new Date(/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`); // the catalog's times are UTC
}

function isoZ(date) {
  return date.toISOString().slice(0, 19) + "Z";
}

function formatTime(date) {
  return date ? isoZ(date).replace("T", " ").slice(0, 16) + " UTC" : "–";
}

// --- The map layout of a catalog entry: products and regions, or the older channels.
const products = (e) => (e.maps ? Object.keys(e.maps) : e.channels || []);
const regions = (e, p) => (e.maps ? Object.keys(e.maps[p] || {}) : []);
const leadsOf = (e, p, r) => (e.maps ? ((e.maps[p] || {})[r] || []) : e.lead_hours || []);
function mapUrl(e, p, r, lead) {
  const parts = e.maps ? [p, r, lead] : [p, lead];
  return `runs/${e.name}/maps/${parts.map((x) => encodeURIComponent(x)).join("/")}.png`;
}

// --- URL <-> state.
function readUrl() {
  const fromHash = Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
  const wanted = Object.keys(fromHash).length ? fromHash : Object.fromEntries(new URLSearchParams(location.search));
  if (!wanted.product && wanted.channel) wanted.product = wanted.channel; // links written before products
  return wanted;
}

function writeUrl(mode) {
  const e = state.entry;
  if (!e || mode === "none") return;
  const q = new URLSearchParams({ run: e.name, product: state.product });
  if (state.region) q.set("region", state.region);
  if (state.leads.length) q.set("lead", state.leads[state.index]);
  const hash = `#${q.toString()}`;
  if (hash === location.hash) return;
  if (mode === "push") history.pushState(null, "", hash);
  else history.replaceState(null, "", hash);
}

function pick(values, ...wishes) {
  return wishes.find((w) => w !== undefined && w !== null && values.includes(w)) ?? values[0] ?? "";
}

// Move to what `wanted` asks for where the runs have it; keep the current choice otherwise.
function apply(wanted, mode) {
  const names = state.runs.map((r) => r.name);
  const runName = pick(names, wanted.run, state.entry && state.entry.name);
  const runChanged = !state.entry || state.entry.name !== runName;
  const before = `${state.product}|${state.region}`;
  const lead = wanted.lead !== undefined ? Number(wanted.lead) : state.leads[state.index];
  state.entry = state.runs.find((r) => r.name === runName) || null;
  const e = state.entry;
  if (!e) return;
  state.product = pick(products(e), wanted.product, state.product);
  const regs = regions(e, state.product);
  state.region = regs.length ? pick(regs, wanted.region, state.region, GLOBAL_REGION) : "";
  state.leads = leadsOf(e, state.product, state.region);
  const i = state.leads.indexOf(lead);
  state.index = i >= 0 ? i : Math.min(state.index, Math.max(0, state.leads.length - 1));
  if (runChanged || before !== `${state.product}|${state.region}`) hideMeteogram();
  if (runChanged) {
    showDownloads(e);
    loadDetail(e.name);
  }
  render(mode);
}

function fillSelect(select, values, label, value) {
  const same = select.options.length === values.length && values.every((v, i) => select.options[i].value === v);
  if (!same) select.replaceChildren(...values.map((v) => new Option(label(v), v)));
  select.value = value;
}

function render(mode) {
  const e = state.entry;
  fillSelect($("run"), state.runs.map((r) => r.name), (n) => formatTime(parseUtc(state.runs.find((r) => r.name === n).init_time)), e.name);
  fillSelect($("product"), products(e), productLabel, state.product);
  const regs = regions(e, state.product);
  fillSelect($("region"), regs, (r) => r.replace(/_/g, " "), state.region);
  $("region").hidden = $("region-label").hidden = regs.length === 0;
  $("lead").max = Math.max(0, state.leads.length - 1);
  $("lead").value = state.index;
  const init = parseUtc(e.init_time);
  $("init-time").textContent = formatTime(init);
  if (!state.leads.length || !state.product) {
    $("map").removeAttribute("src");
    $("lead-label").textContent = "–";
    setStatus("This run has no maps.", true);
  } else {
    const lead = state.leads[state.index];
    $("lead-label").textContent = `+${lead} h`;
    $("valid-time").textContent = formatTime(new Date(init.getTime() + lead * 3600e3));
    const src = mapUrl(e, state.product, state.region, lead);
    if ($("map").getAttribute("src") !== src) $("map").src = src;
    $("map").alt = `${productLabel(state.product)}${state.region ? ` (${state.region})` : ""} at +${lead} h from ${formatTime(init)}`;
  }
  showAnimations();
  prefetchReadout(state.region || GLOBAL_REGION, state.product);
  writeUrl(mode);
}

// The product's animations over the region, where the run publishes them (maps/<product>/<region>/animation.*).
function showAnimations() {
  const e = state.entry, detail = state.details.get(e.name);
  const stem = `maps/${state.product}/${state.region}/animation.`;
  const listed = ((e.animations || {})[state.product] || {})[state.region];
  const formats = !state.region ? [] : listed ? listed
    : ["gif", "mp4"].filter((f) => detail && detail.files && detail.files[stem + f]);
  $("animation-links").replaceChildren(...formats.flatMap((f, i) => {
    const a = document.createElement("a");
    a.href = `runs/${e.name}/files/${stem}${f}`;
    a.textContent = f.toUpperCase();
    return i ? [" ", a] : [a];
  }));
  $("animations").hidden = formats.length === 0;
}

function step(delta, mode) {
  if (!state.leads.length) return;
  state.index = (state.index + delta + state.leads.length) % state.leads.length;
  render(mode);
}

// --- Run detail: attribution, scorecard, variables (units, levels) for point queries.
async function getJson(url) {
  const response = await fetch(url);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status} for ${url}`);
  return body;
}

async function loadDetail(run) {
  try {
    if (!state.details.has(run)) state.details.set(run, await getJson(`runs/${run}`));
  } catch (err) {
    setStatus(`Could not load run ${run}: ${err.message}`, true);
    return;
  }
  if (state.entry && state.entry.name === run) {
    showDetail(state.details.get(run));
    showAnimations();
  }
}

function showDetail(detail) {
  const prov = detail.provenance || {};
  const source = prov.init_source || (detail.lineage && detail.lineage.forecast && detail.lineage.forecast.init_source) || "";
  const version = prov.init_dataset_version || prov.dataset_version || "";
  const text = `${source} ${version}`;
  const p = $("attribution");
  p.replaceChildren();
  const strong = document.createElement("strong");
  if (/synthetic|shallow|^swe-|\sswe-/i.test(text)) {
    strong.textContent = "Synthetic shallow-water planet";
    p.append(strong, " — a simulated planet, not Earth's atmosphere: these maps are not a weather forecast for Earth.");
  } else if (/opendata|open.data|ifs/i.test(text)) {
    strong.textContent = "ECMWF IFS open data";
    p.append("Initial state: ", strong, " (© ECMWF, CC BY 4.0).");
  } else if (/era5|cds|copernicus/i.test(text)) {
    strong.textContent = "ERA5 reanalysis";
    p.append("Initial state: ", strong, " (Copernicus Climate Change Service, ECMWF).");
  } else {
    p.append(source ? `Initial state: ${source}.` : "Source of the initial state: not recorded for this run.");
  }
  const bits = [version && `dataset ${version}`, prov.checkpoint_sha256 && `model ${prov.checkpoint_sha256.slice(0, 12)}…`,
                prov.code_version && `code ${prov.code_version}`].filter(Boolean);
  if (bits.length) p.append(` ${bits.join(" · ")}.`);
  showScorecard(detail.scores);
}

function showScorecard(scores) {
  const section = $("scorecard-section");
  const channels = scores && scores.channels ? Object.keys(scores.channels) : [];
  section.hidden = channels.length === 0;
  if (section.hidden) return;
  const hours = [...new Set(channels.flatMap((c) => scores.channels[c].lead_hours))].sort((a, b) => a - b);
  const head = document.createElement("tr");
  head.append(cell("th", "RMSE"), ...hours.map((h) => cell("th", `+${h} h`)));
  const rows = channels.map((c) => {
    const s = scores.channels[c];
    const tr = document.createElement("tr");
    tr.append(cell("th", productLabel(c)));
    for (const h of hours) {
      const k = s.lead_hours.indexOf(h);
      const rmse = k >= 0 ? s.rmse[k] : null;
      const ref = k >= 0 ? s.persistence_rmse[k] : null;
      const td = cell("td", rmse === null || rmse === undefined ? "–" : formatValue(rmse));
      if (rmse !== null && ref) {
        td.className = rmse < ref ? "better" : rmse > ref ? "worse" : "";
        td.title = `persistence RMSE ${formatValue(ref)}${s.acc[k] !== null ? `, ACC ${s.acc[k].toFixed(3)}` : ""}`;
      }
      tr.append(td);
    }
    return tr;
  });
  $("scorecard").replaceChildren(head, ...rows);
  const pending = (scores.pending_leads || []).length;
  $("scorecard-note").textContent = `Model RMSE per lead (green: better than persistence, red: worse). ` +
    `Scored ${scores.scored_at ? formatTime(parseUtc(scores.scored_at)) : ""}` + (pending ? `; ${pending} lead(s) not yet verifiable.` : ".");
}

function cell(tag, text) {
  const el = document.createElement(tag);
  el.textContent = text;
  return el;
}

function showDownloads(entry) {
  const items = entry.files
    .filter((f) => !f.includes(".zarr/") || f.endsWith(".zarr/zarr.json"))
    .map((f) => {
      const a = document.createElement("a");
      a.href = `runs/${entry.name}/files/${f}`;
      a.textContent = f;
      if (!f.endsWith(".json")) a.download = `spherecast_${entry.name}_${f.split("/").pop()}`;
      const li = document.createElement("li");
      li.append(a);
      if (f.endsWith(".zarr/zarr.json")) li.append(" (Zarr root; every member is listed in manifest.json)");
      return li;
    });
  $("downloads").replaceChildren(...items);
}

// --- Point values: pixel → lon/lat and the product's fields come from readout.js (server georef, EDR).
const where = (p) => `${Math.abs(p.lat).toFixed(1)}°${p.lat >= 0 ? "N" : "S"} ${Math.abs(p.lon).toFixed(1)}°${p.lon >= 0 ? "E" : "W"}`;

function onHover(event) {
  clearTimeout(state.hoverTimer);
  const place = pointerPlace(event);
  const seq = ++state.hoverSeq;
  if (!place.point) {
    $("readout").textContent = place.outside ? "Outside the map." : "…";
    // The region's georef is still on its way: read this pointer position again once it is here.
    if (place.pending) georefOf(state.region || GLOBAL_REGION).then(() => seq === state.hoverSeq && onHover(event), () => {});
    return;
  }
  const point = place.point;
  $("readout").textContent = `${where(point)} · …`;
  const valid = isoZ(new Date(parseUtc(state.entry.init_time).getTime() + state.leads[state.index] * 3600e3));
  state.hoverTimer = setTimeout(async () => {
    try {
      const got = await readoutAt(point, valid);
      if (seq !== state.hoverSeq) return; // the pointer has moved on
      // The exact point and values asked, for scripts and tests; the text is rounded for reading.
      const el = $("readout");
      for (const k of ["value", "values", "raw", "direction"]) delete el.dataset[k];
      Object.assign(el.dataset, { lon: point.lon.toFixed(3), lat: point.lat.toFixed(3), ...got.data });
      el.textContent = `${where(point)} · ${got.text}`;
    } catch (err) {
      if (seq === state.hoverSeq) $("readout").textContent = `${where(point)} · ${err.message}`;
    }
  }, HOVER_DELAY_MS);
}

function hideMeteogram() {
  state.meteoSeq++;
  $("meteogram-section").hidden = true;
  $("meteogram").replaceChildren();
}

async function onClick(event) {
  const place = pointerPlace(event);
  if (!place.point) return;
  const seq = ++state.meteoSeq;
  try {
    const got = await meteogramAt(place.point);
    if (!got || seq !== state.meteoSeq) return;
    drawMeteogram(got.times, got.fields, place.point);
  } catch (err) {
    setStatus(`Meteogram: ${err.message}`, true);
  }
}

// --- Playback and keys.
function stopPlay() {
  clearTimeout(state.timer);
  state.timer = null;
  $("play").textContent = "Play";
  $("play").setAttribute("aria-pressed", "false");
}

// One frame per tick, and never before the shown frame has loaded: no frame is skipped or cut short.
function startPlay() {
  clearTimeout(state.timer);
  const tick = () => {
    if ($("map").complete) step(1, "replace");
    state.timer = setTimeout(tick, $("map").complete ? Number($("speed").value) : 50);
  };
  state.timer = setTimeout(tick, Number($("speed").value));
  $("play").textContent = "Pause";
  $("play").setAttribute("aria-pressed", "true");
}

const togglePlay = () => (state.timer ? stopPlay() : startPlay());

function onKey(event) {
  const tag = event.target.tagName;
  if (event.altKey || event.ctrlKey || event.metaKey || ["INPUT", "SELECT", "TEXTAREA", "BUTTON"].includes(tag)) return;
  if (event.key === "ArrowLeft" || event.key === "ArrowRight") step(event.key === "ArrowLeft" ? -1 : 1, "push");
  else if (event.key === " ") togglePlay();
  else return;
  event.preventDefault();
}

async function init() {
  try {
    state.runs = await getJson("runs"); // newest first
  } catch (err) {
    setStatus(`Could not load runs: ${err.message}`, true);
    return;
  }
  if (state.runs.length === 0) {
    setStatus("No published runs yet.", false);
    return;
  }
  setStatus(`${state.runs.length} run(s)`, false);
  apply(readUrl(), "replace");
  $("run").addEventListener("change", () => apply({ run: $("run").value }, "push"));
  $("product").addEventListener("change", () => apply({ product: $("product").value }, "push"));
  $("region").addEventListener("change", () => apply({ region: $("region").value }, "push"));
  // Dragging shows each lead; the history gets one entry when the slider is let go.
  $("lead").addEventListener("input", () => { state.index = Number($("lead").value); render("none"); });
  $("lead").addEventListener("change", () => writeUrl("push"));
  $("play").addEventListener("click", togglePlay);
  $("speed").addEventListener("change", () => state.timer && startPlay());
  $("map").addEventListener("mousemove", onHover);
  $("map").addEventListener("mouseleave", () => { clearTimeout(state.hoverTimer); state.hoverSeq++; });
  $("map").addEventListener("click", onClick);
  $("map").addEventListener("error", () => $("map").getAttribute("src") && setStatus("Map image is missing for this selection.", true));
  $("map").addEventListener("load", () => setStatus(`${state.runs.length} run(s)`, false));
  document.addEventListener("keydown", onKey);
  const follow = () => apply(readUrl(), "replace");
  window.addEventListener("hashchange", follow);
  window.addEventListener("popstate", follow);
}

init();
