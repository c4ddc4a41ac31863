// d2mae view: the grid of a run's images and the detail of one image, from data.js (window.D2MAE_VIEW).
// Plain JavaScript, no library, no network: the page opens from disk. Errors are also kept in
// document.body.dataset.errors, so that a test in a headless browser can read them.
"use strict";

const errors = [];
window.addEventListener("error", (e) => {
  errors.push(String(e.message));
  document.body.dataset.errors = errors.join(" | ");
});

const VIEW = window.D2MAE_VIEW;
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
const fmt = (v, digits = 3) => (v === null || v === undefined ? "—" : Number(v).toFixed(digits));
const first = (item) => item.runs[0];

// What a filter reads from an image: its first run's values (truth, prediction, t*), or the image's own (fold, group).
function value(item, key) {
  if (key === "fold" || key === "group") return item[key];
  const v = first(item)[key];
  return v === null || v === undefined ? "" : String(v);
}

// Two runs disagree on an image: another predicted class, or Dice apart by 0.1 or more.
function disagrees(item) {
  if (item.runs.length < 2) return false;
  const [a, b] = item.runs;
  if (a.dice !== undefined && b.dice !== undefined) return Math.abs((a.dice || 0) - (b.dice || 0)) >= 0.1;
  return a.pred !== b.pred;
}

function options(select, values) {
  const present = [...new Set(values)].filter((v) => v !== "").sort((a, b) => (isNaN(a) || isNaN(b)
    ? a.localeCompare(b) : Number(a) - Number(b)));
  select.innerHTML = '<option value="">all</option>' +
    present.map((v) => `<option value="${esc(v)}">${esc(v)}</option>`).join("");
  select.closest("label").hidden = present.length < 2 && select.id !== "f-t";
}

function setUp() {
  $("title").textContent = `d2mae view: ${VIEW.title}`;
  const runs = VIEW.runs.map((r) => `${r.name} (${r.kind})`).join(" vs ");
  $("summary").textContent = `${VIEW.items.length} images · ${runs}` +
    (VIEW.restored ? ` · blur search shown for ${VIEW.restored}` : "");
  for (const select of document.querySelectorAll("select[data-key]")) {
    options(select, VIEW.items.map((it) => value(it, select.dataset.key)));
  }
  const kind = VIEW.runs[0].kind;
  const sorts = [["order", "run order"], ["t", "t*"], ["name", "name"]];
  if (kind === "segment") sorts.push(["dice", "Dice (worst first)"]);
  if (kind === "classify" || kind === "predict") sorts.push(["conf", "confidence (least first)"]);
  $("sort").innerHTML = sorts.map(([k, label]) => `<option value="${k}">${label}</option>`).join("");
  $("f-correct").closest("label").hidden = first(VIEW.items[0] || {runs: [{}]}).correct === undefined;
  $("f-conf").closest("label").hidden = kind !== "classify" && kind !== "predict";
  $("f-dice").closest("label").hidden = kind !== "segment";
  $("f-agree").closest("label").hidden = VIEW.runs.length < 2;
  for (const el of document.querySelectorAll("#controls select, #controls input")) {
    el.addEventListener("change", render);
    el.addEventListener("input", render);
  }
  $("close").addEventListener("click", () => { $("detail").hidden = true; });
  $("detail").addEventListener("click", (e) => { if (e.target.id === "detail") $("detail").hidden = true; });
}

function shown() {
  const keyed = [...document.querySelectorAll("select[data-key]")].filter((s) => s.value !== "");
  const correct = $("f-correct").value, conf = Number($("f-conf").value), dice = Number($("f-dice").value);
  const agree = $("f-agree").value;
  return VIEW.items.filter((it) => keyed.every((s) => value(it, s.dataset.key) === s.value)
    && (correct === "" || (first(it).correct === (correct === "right")))
    && (first(it).conf === undefined || first(it).conf >= conf)
    && (first(it).dice === undefined || first(it).dice === null || first(it).dice <= dice)
    && (agree === "" || disagrees(it)));
}

function sorted(items) {
  const key = $("sort").value;
  const out = [...items];
  if (key === "name") out.sort((a, b) => a.name.localeCompare(b.name));
  if (key === "t") out.sort((a, b) => (first(a).t || 0) - (first(b).t || 0));
  if (key === "dice") out.sort((a, b) => (first(a).dice ?? 2) - (first(b).dice ?? 2));
  if (key === "conf") out.sort((a, b) => (first(a).conf ?? 2) - (first(b).conf ?? 2));
  return out;
}

function caption(it) {
  const r = first(it);
  const parts = [it.name];
  if (r.pred !== undefined) parts.push(r.truth !== undefined ? `${r.pred} (${r.truth})` : r.pred);
  if (r.dice !== undefined) parts.push(`Dice ${fmt(r.dice, 2)}`);
  if (r.t !== null && r.t !== undefined) parts.push(`t* ${r.t}`);
  return parts.join(" · ");
}

function render() {
  const items = sorted(shown());
  const grid = $("grid");
  const fragment = document.createDocumentFragment();
  for (const it of items) {
    const card = document.createElement("div");
    card.className = "card" + (first(it).correct === false ? " wrong" : "") + (disagrees(it) ? " disagree" : "");
    card.dataset.k = it.k;
    card.innerHTML = `<img loading="lazy" src="img/${it.k}.png" alt=""><div class="cap"></div>`;
    card.querySelector(".cap").textContent = caption(it);
    card.addEventListener("click", () => open(it));
    fragment.appendChild(card);
  }
  grid.replaceChildren(fragment);
  $("count").textContent = `${items.length} of ${VIEW.items.length} images`;
}

function bars(run, classes) {
  return classes.map((c, i) => `<div class="bar${run.truth === c ? " truth" : ""}"><span style="width:7em">${esc(c)}` +
    `${run.truth === c ? " (truth)" : ""}</span><div class="fill" style="width:${Math.round(200 * run.probs[i])}px">` +
    `</div><span>${fmt(run.probs[i])}</span></div>`).join("");
}

function runPanel(it, j) {
  const meta = VIEW.runs[j], r = it.runs[j];
  let html = `<div class="run"><h3>${esc(meta.name)}</h3>`;
  if (r.probs) html += bars(r, meta.classes) + `<p>predicted ${esc(r.pred)}${r.truth !== undefined
    ? (r.correct ? " — right" : " — wrong") : ""}</p>`;
  if (r.overlay) html += `<img class="overlay" src="${r.overlay}" alt="truth (green) and prediction (orange)">`;
  if (r.dice !== undefined) html += `<p>Dice ${fmt(r.dice)} · IoU ${fmt(r.iou)} · HD95 ${fmt(r.hd95, 1)} px ` +
    `· truth ${esc(r.truth)}</p>`;
  if (r.t !== null && r.t !== undefined) html += `<p>t* = ${r.t} (σ* = ${r.sigma})</p>`;
  return html + "</div>";
}

// The loss of each searched level, with t* marked where the OBS table puts it (the lowest loss: Eq. 5).
function curve(it) {
  const losses = it.losses, levels = VIEW.levels, w = 360, h = 160, pad = 36;
  const lo = Math.min(...losses), hi = Math.max(...losses), span = hi - lo || 1;
  const x = (i) => pad + (i * (w - 2 * pad)) / Math.max(1, levels.length - 1);
  const y = (v) => h - pad + 10 - ((v - lo) * (h - 2 * pad)) / span;
  const points = losses.map((v, i) => `${x(i)},${y(v)}`).join(" ");
  const t = first(it).t;
  const at = levels.indexOf(t);
  const marker = at < 0 ? "" : `<circle class="t-star" data-t="${t}" cx="${x(at)}" cy="${y(losses[at])}" r="5"` +
    ` fill="#c44e52"/><text x="${x(at) + 7}" y="${y(losses[at]) - 7}">t* = ${t}</text>`;
  const ticks = levels.map((lv, i) => `<text x="${x(i) - 4}" y="${h - 4}">${lv}</text>`).join("");
  return `<svg class="curve" width="${w}" height="${h}" role="img" aria-label="loss against t">` +
    `<polyline points="${points}" fill="none" stroke="#4c72b0" stroke-width="2"/>${marker}${ticks}` +
    `<text x="${w - pad}" y="${h - 18}">t</text><text x="2" y="14">L_deblur</text></svg>`;
}

function open(it) {
  $("d-name").textContent = it.path;
  $("d-runs").innerHTML = `<img class="original" src="img/${it.k}.png" alt="the image">` +
    it.runs.map((_, j) => runPanel(it, j)).join("");
  let search = "";
  if (it.losses) {
    search += "<h3>Blur search: the loss of each level (the OBS table's)</h3>" + curve(it);
  }
  if (it.search) {
    const labels = VIEW.levels.map((t, i) => `<span>t=${t}, σ=${VIEW.sigmas[i]}</span>`).join("");
    search += "<h3>Rows: the blurred input, the model's restoration (mask ratio 0), |restoration − image|</h3>" +
      `<div class="search"><div class="levels">${labels}</div><img class="strip" src="${it.search}" ` +
      'alt="blur search"></div>';
  }
  $("d-search").innerHTML = search;
  $("detail").hidden = false;
}

setUp();
render();
