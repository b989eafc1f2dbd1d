// spherecast viewer: the meteogram, inline SVG line charts of one point's values over the run's valid
// times (no charting library), one chart per field of the product (z500_t850: T850 and Z500; wind: speed),
// in the map's display units. Loaded before viewer.js, whose helpers (state, $, formatValue, formatTime,
// prettyUnits, productLabel, where, parseUtc) it calls at draw time.
const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function drawMeteogram(times, fields, point) {
  const charts = fields.map((f) => meteogramChart(times, f.values, f, point));
  const names = fields.map((f) => (f.op === "wind" ? "wind speed" : f.label)).join(", ");
  $("meteogram-title").textContent = `Meteogram · ${productLabel(state.product)} (${names}) at ${where(point)}`;
  $("meteogram").replaceChildren(...charts);
  $("meteogram-section").hidden = false;
}

function meteogramChart(times, values, field, point) {
  const W = 640, H = 250, L = 70, R = 16, T = 14, B = 46;
  const init = parseUtc(state.entry.init_time).getTime();
  const hours = times.map((t) => (t.getTime() - init) / 3600e3);
  const ok = values.filter((v) => v !== null);
  let lo = ok.length ? Math.min(...ok) : 0, hi = ok.length ? Math.max(...ok) : 1;
  if (!(hi > lo)) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  const h0 = hours[0], h1 = hours.length > 1 ? hours[hours.length - 1] : hours[0] + 1;
  const x = (h) => L + ((h - h0) / (h1 - h0)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "meteogram",
                             "aria-label": `${field.label} at ${where(point)} by lead time`, "data-field": field.label });
  chart.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
               svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (let k = 0; k <= 4; k++) {
    const v = lo + ((hi - lo) * k) / 4;
    chart.append(svg("line", { x1: L - 4, y1: y(v), x2: W - R, y2: y(v), class: "grid" }),
                 svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, formatValue(v)));
  }
  const every = Math.ceil(hours.length / 10);
  hours.forEach((h, k) => {
    if (k % every === 0) chart.append(svg("text", { x: x(h), y: H - B + 16, "text-anchor": "middle" }, `+${h}`));
  });
  chart.append(svg("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "label" },
                   `lead time (h) from ${formatTime(new Date(init))}`),
               svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "label",
                             transform: `rotate(-90 14 ${(T + H - B) / 2})` }, prettyUnits(field.units) || "value"));
  const line = hours.map((h, k) => (values[k] === null ? null : `${x(h)},${y(values[k])}`)).filter(Boolean);
  chart.append(svg("polyline", { points: line.join(" "), class: "series" }));
  hours.forEach((h, k) => {
    if (values[k] === null) return;
    const dot = svg("circle", { cx: x(h), cy: y(values[k]), r: 3.5, class: "point", "data-lead": h });
    dot.append(svg("title", {}, `+${h} h (${formatTime(times[k])}): ${formatValue(values[k])} ${prettyUnits(field.units)}`));
    chart.append(dot);
  });
  return chart;
}
