// tracin-index explorer: plain JavaScript and SVG, no dependencies (works offline).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const params = new URLSearchParams(location.search);
const token = params.get("token");
let last = null; // the last query's JSON

function $(id) { return document.getElementById(id); }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function label(item) { return `${item.head} ${item.relation} ${item.tail}`; }
function fmt(x) { return Number(x).toPrecision(3); }

// -- the diverging bar chart -------------------------------------------------------------------
function drawChart(result) {
  const svg = $("chart");
  svg.replaceChildren();
  const rows = [...result.proponents.map(p => ["pro", p]), ...result.opponents.map(o => ["opp", o])];
  const rowH = 18, half = 150;
  // each side holds either a bar and its value, or a fact's label: room for the longer
  const labels = 12 + 6.6 * Math.max(10, ...rows.map(([, r]) => label(r).length));
  const room = Math.max(half + 60, Math.min(460, labels));
  const mid = room, width = 2 * room;
  svg.setAttribute("width", width);
  svg.setAttribute("height", Math.max(40, rows.length * rowH + 10));
  const largest = Math.max(1e-30, ...rows.map(([, r]) => Math.abs(r.influence)));
  rows.forEach(([kind, item], i) => {
    const y = 5 + i * rowH, w = (Math.abs(item.influence) / largest) * half;
    const g = el("g", { class: "bar " + kind, "data-train-index": item.train_index, "data-label": label(item),
                        "data-influence": item.influence });
    g.appendChild(el("rect", { class: kind, x: kind === "pro" ? mid : mid - w, y, width: Math.max(1, w), height: rowH - 4 }));
    const text = kind === "pro" ? el("text", { x: mid - 6, y: y + rowH - 7, "text-anchor": "end" }, label(item))
                                : el("text", { x: mid + 6, y: y + rowH - 7 }, label(item));
    g.appendChild(text);
    g.appendChild(el("text", { x: kind === "pro" ? mid + w + 4 : mid - w - 4, y: y + rowH - 7,
                               "text-anchor": kind === "pro" ? "start" : "end" }, fmt(item.influence)));
    const title = el("title", {}, `train row ${item.train_index}: ${label(item)}  influence ${item.influence}`);
    g.appendChild(title);
    svg.appendChild(g);
  });
  svg.appendChild(el("line", { class: "axis", x1: mid, x2: mid, y1: 0, y2: rows.length * rowH + 8 }));
}

// -- the graph around the prediction -----------------------------------------------------------
function drawGraph(result, top = 5) {
  const svg = $("graph");
  svg.replaceChildren();
  const width = 560, height = 420, cx = width / 2, cy = height / 2;
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const t = result.test_triple;
  const facts = [...result.proponents.slice(0, top).map(p => ["pro", p]), ...result.opponents.slice(0, top).map(o => ["opp", o])];
  const names = [t.head, t.tail];
  for (const [, f] of facts) for (const e of [f.head, f.tail]) if (!names.includes(e)) names.push(e);
  const position = {};
  position[t.head] = [cx - 90, cy];
  position[t.tail] = [cx + 90, cy];
  const others = names.slice(2);
  others.forEach((name, i) => {
    const angle = (2 * Math.PI * i) / Math.max(1, others.length) - Math.PI / 2;
    position[name] = [cx + 220 * Math.cos(angle), cy + 170 * Math.sin(angle)];
  });
  const edges = [["test", { head: t.head, relation: t.relation, tail: t.tail }], ...facts];
  const seen = {};
  for (const [kind, f] of edges) {
    const [x1, y1] = position[f.head], [x2, y2] = position[f.tail];
    const key = [f.head, f.tail].sort().join("\u0000");
    const bend = (seen[key] = (seen[key] || 0) + 1) - 1;
    const mx = (x1 + x2) / 2 + bend * 14, my = (y1 + y2) / 2 - bend * 14;
    svg.appendChild(el("path", { class: "edge " + kind, d: `M${x1},${y1} Q${mx},${my} ${x2},${y2}`, fill: "none" }));
    svg.appendChild(el("text", { class: "edge-label", x: mx, y: my - 3, "text-anchor": "middle" }, f.relation));
  }
  for (const name of names) {
    const [x, y] = position[name];
    const shared = name === t.head || name === t.tail;
    const g = el("g", { class: "node" + (shared ? " shared" : ""), "data-entity": name, tabindex: 0 });
    g.appendChild(el("circle", { cx: x, cy: y, r: 9 }));
    g.appendChild(el("text", { x, y: y - 13, "text-anchor": "middle" }, name));
    g.addEventListener("click", () => showFacts(name));
    svg.appendChild(g);
  }
}

async function showFacts(entity) {
  try {
    const body = await api(`/api/facts?entity=${encodeURIComponent(entity)}&limit=50`);
    $("facts-title").textContent = `Training facts of ${entity} (${body.count}${body.count > body.facts.length ? ", first " + body.facts.length : ""})`;
    const rows = body.facts.map(f => `<tr><td>${f.train_index}</td><td>${esc(f.head)}</td><td>${esc(f.relation)}</td><td>${esc(f.tail)}</td></tr>`);
    $("facts-table").tBodies[0].innerHTML = rows.join("");
    $("facts").hidden = false;
  } catch (e) { $("status").textContent = e.message; }
}

function esc(s) { return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

// -- querying ---------------------------------------------------------------------------------
async function explain(event) {
  if (event) event.preventDefault();
  const q = new URLSearchParams({ head: $("head").value, relation: $("relation").value, tail: $("tail").value,
                                  top_k: $("top-k").value, direction: $("direction").value });
  $("status").textContent = "";
  $("explain-button").disabled = true;
  try {
    last = await api("/api/query?" + q.toString());
    const result = last.results[0];
    const t = result.test_triple;
    $("result-title").textContent = `(${t.head}, ${t.relation}, ${t.tail})`;
    $("result-counts").textContent = `${result.num_proponents} training facts with a positive influence, ` +
      `${result.num_opponents} negative${result.counts_exact ? "" : " (about)"}; the influences shown are exact TracIn.`;
    drawChart(result);
    drawGraph(result);
    $("facts").hidden = true;
    $("result").hidden = false;
  } catch (e) {
    $("status").textContent = e.message;
  } finally {
    $("explain-button").disabled = false;
  }
}

function download(name, text, type) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type }));
  link.download = name;
  link.click();
}

function tsv(json) {
  const lines = [["test_head", "test_relation", "test_tail", "kind", "rank", "train_index", "head", "relation", "tail", "influence"].join("\t")];
  for (const r of json.results) {
    const t = r.test_triple;
    for (const [kind, items] of [["proponent", r.proponents], ["opponent", r.opponents]]) {
      items.forEach((i, k) => lines.push([t.head, t.relation, t.tail, kind, k + 1, i.train_index, i.head, i.relation, i.tail, i.influence].join("\t")));
    }
  }
  return lines.join("\n") + "\n";
}

// -- completion, test triples, tabs, self-influence --------------------------------------------
let pending = null;
function complete(event) {
  clearTimeout(pending);
  pending = setTimeout(async () => {
    try {
      const found = await api(`/api/entities?prefix=${encodeURIComponent(event.target.value)}&limit=20`);
      $("entity-list").innerHTML = found.map(e => `<option value="${esc(e)}">`).join("");
    } catch (e) { /* completion is a convenience */ }
  }, 150);
}

async function selfInfluence() {
  try {
    const rows = await api("/api/self-influence?top_k=20");
    $("self-table").tBodies[0].innerHTML = rows.map((r, i) =>
      `<tr><td>${i + 1}</td><td>${r.train_index}</td><td>${esc(r.head)}</td><td>${esc(r.relation)}</td><td>${esc(r.tail)}</td><td>${fmt(r.self_influence)}</td></tr>`).join("");
  } catch (e) { $("status").textContent = e.message; }
}

function tab(which) {
  $("explain").hidden = which !== "explain";
  $("self").hidden = which !== "self";
  $("tab-explain").classList.toggle("active", which === "explain");
  $("tab-self").classList.toggle("active", which === "self");
  if (which === "self") selfInfluence();
}

async function start() {
  $("query-form").addEventListener("submit", explain);
  $("head").addEventListener("input", complete);
  $("tail").addEventListener("input", complete);
  $("tab-explain").addEventListener("click", () => tab("explain"));
  $("tab-self").addEventListener("click", () => tab("self"));
  $("download-json").addEventListener("click", () => last && download("tracin.json", JSON.stringify(last, null, 2), "application/json"));
  $("download-tsv").addEventListener("click", () => last && download("tracin.tsv", tsv(last), "text/tab-separated-values"));
  try {
    const h = await api("/api/health");
    $("health").textContent = `${h.model || "model"} · ${h.training_triples.toLocaleString()} training facts · ${h.checkpoints} checkpoints · loss ${h.loss} · exact scores`;
    const relations = await api("/api/relations");
    $("relation-list").innerHTML = relations.map(r => `<option value="${esc(r)}">`).join("");
    const tests = await api("/api/test-triples?limit=50");
    $("test-triples").innerHTML = `<option value="">-</option>` + tests.map((t, i) =>
      `<option value="${i}">${esc(t.head)} · ${esc(t.relation)} · ${esc(t.tail)}</option>`).join("");
    $("test-triples").addEventListener("change", e => {
      const t = tests[Number(e.target.value)];
      if (!t) return;
      $("head").value = t.head; $("relation").value = t.relation; $("tail").value = t.tail;
      explain();
    });
  } catch (e) { $("health").textContent = e.message; }
}

start();
