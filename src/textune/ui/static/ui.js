// textune ui: the pages' behaviour, plain JavaScript over the JSON API (/docs). No framework, nothing fetched
// from another host. Each page runs its function, chosen by <body data-page>.
"use strict";
const DATA = JSON.parse(document.getElementById("page-data").textContent || "{}");
const COLORS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#57606a", "#bf3989", "#0a3069"];

async function api(path, options) {
  const init = options || {};
  if (init.body !== undefined) init.headers = {"Content-Type": "application/json"};
  const response = await fetch(path, init);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) { const e = new Error((body.error || {}).message || response.statusText); e.body = body; throw e; }
  return body;
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------- runs table: sort, filter, select to compare
function runsPage() {
  const table = document.getElementById("runs");
  if (!table) return;
  const tbody = table.tBodies[0];
  table.querySelectorAll("th[data-key]").forEach((th, i) => th.addEventListener("click", () => {
    const asc = !th.classList.contains("asc");
    table.querySelectorAll("th").forEach(h => h.classList.remove("asc", "desc"));
    th.classList.add(asc ? "asc" : "desc");
    const value = row => row.cells[i + 1].dataset.v;
    const rows = Array.from(tbody.rows).sort((a, b) => {
      const x = value(a), y = value(b), nx = parseFloat(x), ny = parseFloat(y);
      const c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(r => tbody.appendChild(r));
  }));
  document.getElementById("filter").addEventListener("input", e => {
    const words = e.target.value.toLowerCase().split(/\s+/).filter(Boolean);
    Array.from(tbody.rows).forEach(r => {
      const text = r.textContent.toLowerCase();
      r.hidden = !words.every(w => text.includes(w));
    });
  });
  const button = document.getElementById("compare");
  const selected = () => Array.from(table.querySelectorAll("input[name=run]:checked")).map(c => c.value);
  table.addEventListener("change", () => { button.disabled = selected().length < 2; });
  button.addEventListener("click", () => {
    location.href = "/compare?" + selected().map(n => "run=" + encodeURIComponent(n)).join("&");
  });
}

// ---------------------------------------------------------------- curves (uPlot)
function headlineKey(config, metrics) {
  const metric = (metrics && metrics.metric) || ((config || {}).train || {}).metric || "loss";
  return "eval_" + metric;
}

function series(records, type, key, x) {
  const xs = [], ys = [];
  records.filter(r => r.type === type && r[key] !== undefined && r[key] !== null)
    .forEach(r => { xs.push(r[x]); ys.push(r[key]); });
  return [xs, ys];
}

function drawChart(target, title, tables, labels, x) {
  const node = document.getElementById(target);
  node.innerHTML = "";
  const usable = tables.map((t, i) => [t, labels[i]]).filter(([t]) => t[0].length);
  if (!usable.length) { node.appendChild(el("p", {class: "hint"}, title + ": nothing logged yet")); return; }
  const data = uPlot.join(usable.map(([t]) => t));
  const opts = {title: title, width: Math.min(640, window.innerWidth - 60), height: 280,
    scales: {x: {time: false}}, axes: [{label: x}, {}],
    series: [{label: x}].concat(usable.map(([, label], i) => ({label: label, stroke: COLORS[i % COLORS.length],
      width: 1.5, spanGaps: true, points: {show: usable[i][0][0].length < 60}})))};
  new uPlot(opts, data, node);
}

function drawRuns(runs, x) {
  const loss = [], lossLabels = [], metric = [], metricLabels = [];
  runs.forEach(run => {
    const prefix = runs.length > 1 ? run.name + " " : "";
    loss.push(series(run.history, "train", "loss", x)); lossLabels.push(prefix + "train loss");
    loss.push(series(run.history, "eval", "eval_loss", x)); lossLabels.push(prefix + "validation loss");
    const key = headlineKey(run.config, run.metrics);
    if (key !== "eval_loss") { metric.push(series(run.history, "eval", key, x)); metricLabels.push(prefix + key.slice(5)); }
  });
  drawChart("loss-chart", "loss", loss, lossLabels, x);
  if (metric.length) drawChart("metric-chart", "headline metric", metric, metricLabels, x);
  else document.getElementById("metric-chart").innerHTML = "";
}

// ---------------------------------------------------------------- one run: live while it trains
function metricsTable(metrics) {
  const table = el("table");
  const validation = (metrics || {}).validation || {};
  Object.entries(validation).filter(([, v]) => typeof v === "number").forEach(([k, v]) => {
    const tr = table.insertRow();
    tr.insertCell().textContent = k; tr.insertCell().textContent = v.toFixed(4);
  });
  if (metrics && metrics.train) {
    const tr = table.insertRow();
    tr.insertCell().textContent = "samples/s"; tr.insertCell().textContent = metrics.train.samples_per_s;
  }
  return table;
}

function runPage() {
  const name = DATA.name, state = {history: [], next: 0, run: null, diagnosed: false};
  const x = () => document.getElementById("xaxis").value;
  async function poll() {
    let run;
    try { run = await api(`/api/runs/${encodeURIComponent(name)}?since=${state.next}`); }
    catch (e) { document.getElementById("reason").textContent = e.message; return; }
    state.history = state.history.concat(run.history); state.next = run.next; run.history = state.history;
    state.run = run;
    const status = document.getElementById("status");
    status.textContent = run.status; status.className = "status " + run.status;
    document.getElementById("reason").textContent = run.reason || "";
    document.getElementById("bar").style.width = (100 * run.progress.fraction) + "%";
    const eta = run.progress.eta_s !== null ? `, about ${Math.round(run.progress.eta_s)} s left` : "";
    document.getElementById("progress-text").textContent =
      `step ${run.progress.step}, epoch ${run.progress.epoch}${eta}`;
    document.getElementById("stop").disabled = run.status !== "running";
    document.getElementById("resume").disabled = run.status === "running" || !run.resumable;
    document.getElementById("config").textContent = JSON.stringify(run.config, null, 2);
    const metrics = document.getElementById("metrics");
    metrics.innerHTML = ""; metrics.appendChild(metricsTable(run.metrics));
    drawRuns([run], x());
    const acting = showActions(run);
    if (run.status !== "running" && !state.diagnosed && state.history.length) { diagnose(); worst(); }
    if (run.status === "running" || acting) setTimeout(poll, 2000);
  }
  function showActions(run) {
    let acting = false;
    document.querySelectorAll("table.actions tr").forEach(tr => {
      const action = tr.dataset.action, a = (run.actions || {})[action], button = tr.querySelector("button");
      const never = (DATA.not_applicable || {})[action];
      button.disabled = Boolean(never) || run.status === "running" || (a && a.status === "running");
      button.title = never || "";
      tr.querySelector(".action-status").textContent = a ? a.status : (never ? "does not apply" : "");
      tr.querySelector(".action-line").textContent = a ? (a.line || "") : "";
      acting = acting || Boolean(a && a.status === "running");
    });
    return acting;
  }
  async function worst() {
    const box = document.getElementById("worst");
    // the report's own section (its HTML, built by the task's code and escaped there)
    try { box.innerHTML = (await api(`/api/runs/${encodeURIComponent(name)}/worst`)).html || "none in the report"; }
    catch (e) { box.textContent = e.message; }
  }
  async function runAction(action) {
    const body = action === "push" ? {repo: document.getElementById("push-repo").value,
      token_env: document.getElementById("push-token-env").value,
      private: document.getElementById("push-private").checked}
      : {overwrite: document.getElementById("action-overwrite").checked};
    try { await api(`/api/runs/${encodeURIComponent(name)}/${action}`, {method: "POST", body: JSON.stringify(body)}); }
    catch (e) { document.getElementById("reason").textContent = e.message; return; }
    setTimeout(poll, 500);
  }
  document.querySelectorAll("button.action").forEach(b => b.addEventListener("click", () => runAction(b.dataset.action)));
  async function diagnose() {
    state.diagnosed = true;
    const box = document.getElementById("diagnosis");
    try {
      const d = await api(`/api/runs/${encodeURIComponent(name)}/diagnosis`);
      box.innerHTML = "";
      box.appendChild(el("p", {class: "status"}, d.verdict));
      const list = el("ul");
      d.evidence.concat(d.remedies.map(r => "try: " + r)).forEach(t => list.appendChild(el("li", {}, t)));
      box.appendChild(list);
    } catch (e) { box.textContent = e.message; }
  }
  async function act(action) {
    try { await api(`/api/runs/${encodeURIComponent(name)}/${action}`, {method: "POST"}); }
    catch (e) { document.getElementById("reason").textContent = e.message; return; }
    state.diagnosed = false; setTimeout(poll, 500);
  }
  document.getElementById("stop").addEventListener("click", () => act("stop"));
  document.getElementById("resume").addEventListener("click", () => {
    state.history = []; state.next = 0; act("resume");
  });
  document.getElementById("xaxis").addEventListener("change", () => state.run && drawRuns([state.run], x()));
  poll();
}

// ---------------------------------------------------------------- compare: curves overlaid, configs side by side
async function comparePage() {
  const runs = await Promise.all(DATA.runs.map(n => api(`/api/runs/${encodeURIComponent(n)}`)));
  const select = document.getElementById("xaxis");
  drawRuns(runs, select.value);
  select.addEventListener("change", () => drawRuns(runs, select.value));
  const only = document.getElementById("only-diff"), table = document.querySelector("table.diffs");
  const apply = () => table.classList.toggle("only-diff", only.checked);
  only.addEventListener("change", apply); apply();
}

// ---------------------------------------------------------------- new run: the form from the typed config
function asText(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function parseValue(text, kind) {
  const t = text.trim();
  if (t === "") return null;
  if (kind === "int" || kind === "float") { const n = Number(t); return isNaN(n) ? t : n; }
  if (kind === "bool" || kind === "choice") {
    if (t === "true") return true; if (t === "false") return false;
    const n = Number(t); return (kind === "choice" && !isNaN(n) && t !== "") ? n : t;
  }
  if (kind === "list" || kind === "mapping") {
    if (t.startsWith("[") || t.startsWith("{")) { try { return JSON.parse(t); } catch (e) { return t; } }
    return kind === "list" ? t.split(",").map(s => s.trim()).filter(Boolean) : t;
  }
  return t;
}

async function newPage() {
  const form = document.getElementById("config-form"), fields = {};
  const {sections} = await api("/api/config/fields");
  sections.forEach(section => {
    const box = el("fieldset"); box.appendChild(el("legend", {}, section.section + " - " + section.about));
    section.fields.forEach(f => {
      const row = el("div", {class: "field"}), id = "f-" + f.key;
      row.appendChild(el("label", {for: id}, f.key));
      let input;
      if (f.choices) {
        input = el("select", {id: id});
        const options = (f.optional ? [""] : []).concat(f.choices.filter(c => c !== "empty"));
        options.forEach(c => input.appendChild(el("option", {value: c}, c === "" ? "(empty)" : c)));
      } else input = el("input", {id: id, type: "text", placeholder: f.optional ? "(empty)" : ""});
      input.value = asText(f.default);
      input.dataset.key = f.key;
      row.appendChild(input);
      row.appendChild(el("span", {class: "help"}, f.help + "  (default: " + (asText(f.default) || "empty") + ")"));
      box.appendChild(row);
      fields[f.key] = {field: f, input: input, row: row};
    });
    form.appendChild(box);
  });
  const config = () => {
    const out = {};
    Object.values(fields).forEach(({field, input}) => {
      if (input.value === asText(field.default)) return;
      const parts = field.key.split("."); let node = out;
      parts.slice(0, -1).forEach(p => { node = node[p] = node[p] || {}; });
      node[parts[parts.length - 1]] = parseValue(input.value, field.kind);
    });
    return out;
  };
  const name = document.getElementById("name");
  let timer = null;
  async function check() {
    const result = await api("/api/config/check", {method: "POST", body: JSON.stringify({config: config(), name: name.value || null})});
    Object.values(fields).forEach(({field, input, row}) => {
      row.classList.toggle("changed", input.value !== asText(field.default));
      row.classList.remove("invalid"); const old = row.querySelector(".error"); if (old) old.remove();
    });
    const loose = [];
    result.problems.forEach(p => {
      const f = p.key && fields[p.key];
      if (f) { f.row.classList.add("invalid"); f.row.appendChild(el("div", {class: "error"}, p.message)); }
      else loose.push(p.message);
    });
    document.getElementById("problems").textContent = loose.join("\n");
    document.getElementById("yaml").textContent = result.yaml;
    document.getElementById("command").textContent = result.command;
    return result.ok;
  }
  form.addEventListener("input", () => {
    clearTimeout(timer); timer = setTimeout(check, 250);
    const button = document.getElementById("launch"); button.disabled = false; button.textContent = "Launch";
  });
  name.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 250); });
  const base = document.getElementById("base");
  async function loadBase() {
    Object.values(fields).forEach(({field, input}) => { input.value = asText(field.default); });
    if (base.value) {
      const copy = base.value.startsWith("run:") ? base.value.slice(4) : null;
      const shipped = copy ? await api(`/api/runs/${encodeURIComponent(copy)}?since=1000000000`)
        : await api("/api/configs/" + encodeURIComponent(base.value));
      const flat = {};
      const walk = (node, prefix) => Object.entries(node).forEach(([k, v]) => {
        if (v && typeof v === "object" && !Array.isArray(v) && fields[prefix + k] === undefined) walk(v, prefix + k + ".");
        else flat[prefix + k] = v;
      });
      walk(shipped.config, "");
      Object.entries(flat).forEach(([k, v]) => { if (fields[k]) fields[k].input.value = asText(v); });
      if (!name.value) name.value = copy ? copy + "-copy" : base.value.replace(/\.yaml$/, "");
    }
    await check();
  }
  base.addEventListener("change", loadBase);
  const launch = document.getElementById("launch");
  // The launch button says what the data check found; a launch of data that fails it is refused by the server.
  async function checkData() {
    const out = document.getElementById("data-report");
    out.textContent = "checking the data ...";
    try { const r = await api("/api/validate-data", {method: "POST", body: JSON.stringify({config: config()})});
      out.textContent = r.report + (r.ok ? "" : "\n\n" + r.message);
      launch.textContent = !r.ok ? "Launch (the data fails the check)"
        : r.findings ? `Launch (data: ${r.findings} warning${r.findings > 1 ? "s" : ""})` : "Launch (data: no problem found)";
      launch.disabled = !r.ok; }
    catch (e) { out.textContent = e.message; launch.textContent = "Launch"; launch.disabled = false; }
  }
  document.getElementById("validate-data").addEventListener("click", checkData);
  document.getElementById("upload").addEventListener("change", async (event) => {
    const file = event.target.files[0], key = document.getElementById("upload-key").value;
    if (!file || !fields[key]) return;
    const status = document.getElementById("upload-status");
    status.textContent = `uploading ${file.name} ...`;
    const response = await fetch("/api/uploads?filename=" + encodeURIComponent(file.name), {method: "POST", body: file});
    const body = await response.json().catch(() => ({}));
    if (!response.ok) { status.textContent = (body.error || {}).message || response.statusText; return; }
    status.textContent = `${file.name}: ${body.bytes.toLocaleString()} bytes, stored as ${body.path}`;
    fields[key].input.value = body.path;
    await check(); await checkData();
  });
  document.getElementById("launch").addEventListener("click", async () => {
    if (!(await check())) return;
    try {
      const r = await api("/api/runs", {method: "POST", body: JSON.stringify({config: config(), name: name.value || null})});
      location.href = "/runs/" + encodeURIComponent(r.name);
    } catch (e) { document.getElementById("problems").textContent = e.message; }
  });
  await loadBase();
}


// ---------------------------------------------------------------- playground: what the model's task describes
function marked(text, spans) {
  // The text with each span (start, end, tag) wrapped in <mark>, built from text nodes: nothing is parsed as HTML.
  const box = el("p"); let at = 0;
  spans.slice().sort((a, b) => a.start - b.start).forEach(s => {
    if (s.start < at) return;
    box.appendChild(document.createTextNode(text.slice(at, s.start)));
    const m = el("mark", {}, text.slice(s.start, s.end));
    if (s.tag) m.appendChild(el("small", {}, s.tag));
    box.appendChild(m); at = s.end;
  });
  box.appendChild(document.createTextNode(text.slice(at)));
  return box;
}

function renderRow(render, row, fields, inputs) {
  const out = el("div");
  if (render === "probabilities" && row.probabilities) {
    out.appendChild(el("p", {}, "label: " + (row.label || (row.labels || []).map(l => l.label || l).join(", "))));
    Object.entries(row.probabilities).sort((a, b) => b[1] - a[1]).forEach(([k, v]) => {
      const line = el("div", {class: "prob"});
      line.appendChild(el("span", {}, k + " " + v.toFixed(3)));
      const bar = el("span", {class: "bar"}); bar.style.width = (200 * v) + "px"; line.appendChild(bar);
      out.appendChild(line);
    });
  } else if (render === "spans" && row.entities) {
    out.appendChild(marked(fields[inputs[0].name], row.entities.map(e => ({start: e.start, end: e.end, tag: e.entity}))));
  } else if (render === "answer" && row.start !== undefined && row.start !== null) {
    out.appendChild(el("p", {}, "answer: " + row.answer + " (score " + Number(row.score).toFixed(3) + ")"));
    out.appendChild(marked(fields[inputs[inputs.length - 1].name], [{start: row.start, end: row.end}]));
  } else if (render === "text" && row.response !== undefined) {
    out.appendChild(el("pre", {}, row.response === null ? row.skipped : row.response));
  }
  out.appendChild(el("pre", {class: "row"}, JSON.stringify(row, null, 2)));
  return out;
}

// A multi-turn chat, the answer streamed in as the model writes it (POST /api/playground/chat).
function chatPanel(parent, target) {
  const old = document.getElementById("chat"); if (old) old.remove();
  const box = el("section", {id: "chat"}), log = el("div", {id: "chat-log"}), messages = [];
  box.appendChild(el("h2", {}, "Chat"));
  const system = el("textarea", {id: "chat-system", placeholder: "system prompt (optional)"});
  const input = el("textarea", {id: "chat-input", placeholder: "your message"});
  const send = el("button", {id: "chat-send"}, "Send");
  [system, log, input, send].forEach(n => box.appendChild(n));
  parent.appendChild(box);
  send.addEventListener("click", async () => {
    if (!input.value.trim()) return;
    messages.push({role: "user", content: input.value});
    log.appendChild(el("p", {class: "user"}, "you: " + input.value)); input.value = "";
    const answer = el("p", {class: "assistant"}, ""); log.appendChild(answer);
    send.disabled = true;
    try {
      const response = await fetch("/api/playground/chat", {method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify(Object.assign(target(), {system: system.value || null, messages: messages}))});
      if (!response.ok) { const b = await response.json(); throw new Error((b.error || {}).message || response.statusText); }
      const reader = response.body.getReader(), decoder = new TextDecoder();
      let text = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        text += decoder.decode(value, {stream: true}); answer.textContent = "model: " + text;
      }
      messages.push({role: "assistant", content: text});
      answer.dataset.done = "1";
    } catch (e) { answer.textContent = e.message; messages.pop(); }
    send.disabled = false;
  });
}

window.playgroundPage = function (data) {
  const run = document.getElementById("run"), model = document.getElementById("model");
  const inputs = document.getElementById("inputs"), output = document.getElementById("output");
  let spec = null;
  const target = () => run.value ? {run: run.value} : (model.value ? {model: model.value} : null);
  async function load() {
    const t = target(); inputs.innerHTML = ""; output.innerHTML = ""; spec = null;
    const chat = document.getElementById("chat"); if (chat) chat.remove();
    if (!t) return;
    try { spec = await api("/api/playground?" + new URLSearchParams(t)); }
    catch (e) { document.getElementById("about").textContent = e.message; return; }
    document.getElementById("about").textContent = spec.message || ("task: " + spec.task);
    spec.inputs.forEach(i => {
      inputs.appendChild(el("label", {for: "in-" + i.name}, i.label + (i.optional ? " (optional)" : "")));
      inputs.appendChild(el("textarea", {id: "in-" + i.name, name: i.name}));
    });
    if (spec.chat) chatPanel(output.parentNode, target);
  }
  document.getElementById("predict").addEventListener("click", async () => {
    if (!spec) return;
    const fields = {};
    spec.inputs.forEach(i => { fields[i.name] = document.getElementById("in-" + i.name).value; });
    output.textContent = "...";
    try {
      const r = await api("/api/playground", {method: "POST", body: JSON.stringify(Object.assign(target(), {fields}))});
      output.innerHTML = ""; output.appendChild(renderRow(r.render, r.row, fields, spec.inputs));
    } catch (e) { output.textContent = e.message; }
  });
  run.addEventListener("change", () => { if (run.value) model.value = ""; load(); });
  model.addEventListener("change", () => { if (model.value) run.value = ""; load(); });
  load();
};

const PAGES = {runs: runsPage, run: runPage, compare: comparePage, new: newPage,
  playground: () => window.playgroundPage(DATA)};
(PAGES[document.body.dataset.page] || (() => {}))();
