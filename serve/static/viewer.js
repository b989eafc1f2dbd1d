// spherecast viewer: pick a run, a channel and a lead time; the map is the run's pre-rendered PNG.
// Selections live in the URL hash (#run=…&channel=…&lead=…) so a view can be shared.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { runs: [], entry: null, timer: null };

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function channelLabel(channel) {
  const m = /^(.*)_(\d+)$/.exec(channel);
  return m ? `${m[1].replace(/_/g, " ")} ${m[2]} hPa` : channel.replace(/_/g, " ");
}

function formatTime(iso) {
  return iso ? iso.replace("T", " ").slice(0, 16) + " UTC" : "–";
}

function readHash() {
  return Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
}

function writeHash() {
  const e = state.entry;
  if (!e) return;
  const lead = e.lead_hours[Number($("lead").value)];
  history.replaceState(null, "", `#run=${e.name}&channel=${$("channel").value}&lead=${lead}`);
}

function fillSelect(select, values, label, wanted) {
  select.replaceChildren(...values.map((v) => new Option(label(v), v)));
  if (values.includes(wanted)) select.value = wanted;
}

function showDownloads(entry) {
  const items = entry.files
    .filter((f) => !f.includes(".zarr/") || f.endsWith(".zarr/zarr.json"))
    .map((f) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `runs/${entry.name}/files/${f}`;
      a.textContent = f;
      if (!f.endsWith(".json")) a.download = `spherecast_${entry.name}_${f.split("/").pop()}`;
      li.append(a);
      if (f.endsWith(".zarr/zarr.json")) li.append(" (Zarr root; every member is listed in manifest.json)");
      return li;
    });
  $("downloads").replaceChildren(...items);
}

function showMap() {
  const e = state.entry;
  if (!e || e.lead_hours.length === 0 || !$("channel").value) {
    $("map").removeAttribute("src");
    return;
  }
  const i = Number($("lead").value);
  const lead = e.lead_hours[i];
  $("lead-label").textContent = `+${lead} h`;
  $("init-time").textContent = formatTime(e.init_time);
  $("valid-time").textContent = formatTime(e.valid_times[i]);
  $("map").src = `runs/${e.name}/maps/${$("channel").value}/${lead}.png`;
  $("map").alt = `${channelLabel($("channel").value)} at +${lead} h from ${formatTime(e.init_time)}`;
  writeHash();
}

function selectRun(name, wanted) {
  state.entry = state.runs.find((r) => r.name === name) || null;
  const e = state.entry;
  if (!e) return;
  fillSelect($("channel"), e.channels, channelLabel, wanted.channel || $("channel").value);
  $("lead").max = Math.max(0, e.lead_hours.length - 1);
  const leadIndex = e.lead_hours.indexOf(Number(wanted.lead));
  $("lead").value = leadIndex >= 0 ? leadIndex : 0;
  showDownloads(e);
  showMap();
}

function togglePlay() {
  if (state.timer) {
    clearInterval(state.timer);
    state.timer = null;
    $("play").textContent = "Play";
    return;
  }
  $("play").textContent = "Pause";
  state.timer = setInterval(() => {
    const max = Number($("lead").max);
    $("lead").value = Number($("lead").value) >= max ? 0 : Number($("lead").value) + 1;
    showMap();
  }, 700);
}

async function init() {
  try {
    const response = await fetch("runs");
    if (!response.ok) throw new Error(`GET runs: HTTP ${response.status}`);
    state.runs = await response.json();
  } catch (err) {
    setStatus(`Could not load runs: ${err.message}`, true);
    return;
  }
  if (state.runs.length === 0) {
    setStatus("No published runs yet.", false);
    return;
  }
  const wanted = readHash();
  const names = state.runs.map((r) => r.name); // the listing is newest first
  fillSelect($("run"), names, (n) => formatTime(state.runs.find((r) => r.name === n).init_time), wanted.run);
  setStatus(`${state.runs.length} run(s)`, false);
  selectRun($("run").value, wanted);
  $("run").addEventListener("change", () => {
    // Keep the channel and lead when switching runs, where the new run has them.
    const e = state.entry;
    selectRun($("run").value, { channel: $("channel").value, lead: e && e.lead_hours[Number($("lead").value)] });
  });
  $("channel").addEventListener("change", showMap);
  $("lead").addEventListener("input", showMap);
  $("play").addEventListener("click", togglePlay);
  $("map").addEventListener("error", () => setStatus("Map image is missing for this selection.", true));
  $("map").addEventListener("load", () => setStatus(`${state.runs.length} run(s)`, false));
}

init();
