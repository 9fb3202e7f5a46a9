// The live page: strips from /live/stream (Server-Sent Events), the rest from the control plane's API.
// Plain DOM, textContent only: every value shown came from the network.
"use strict";

const SHOWN = 100;
const $ = (id) => document.getElementById(id);
const state = { write: false, model: null, models: [], strips: new Map(), scenarios: [], tag: "write-up", busy: false };

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  let data = null;
  try { data = await resp.json(); } catch (e) { /* an empty or non-JSON answer */ }
  if (!resp.ok) throw new Error((data && data.error) || `${method} ${path}: ${resp.status}`);
  return data;
}

// ---- model ------------------------------------------------------------------------
function renderModels() {
  const box = $("models");
  box.replaceChildren(...state.models.map((m) => {
    const b = el("button", "", m);
    b.type = "button";
    b.dataset.model = m;
    b.setAttribute("aria-pressed", String(m === state.model));
    b.disabled = !state.write || state.busy;
    b.addEventListener("click", () => setModel(m));
    return b;
  }));
  $("scenario-model").textContent = state.model ? `run under ${state.model}` : "";
}

async function setModel(model) {
  try {
    const data = await api("PUT", "/model", { model });
    state.model = data.model;
    showError("");
  } catch (e) {
    showError(`Model not changed: ${e.message}`);
  }
  renderModels();
}

// ---- strips -----------------------------------------------------------------------
function step(label, value, cls) {
  const s = el("span", "step" + (cls ? " " + cls : ""));
  s.append(el("b", "", label));
  if (value instanceof Node) s.append(value); else s.append(el("span", "v", value ?? "—"));
  return s;
}

function dnsStep(strip) {
  const d = strip.dns, t = strip.tunnel;
  if (!d && !t) return null;  // not asked, or asked without naming the request: nothing to join
  const v = el("span", "v");
  if (d) {
    v.append(d.answers.length ? d.answers.join(", ") : (d.rcode || "no answer"), " ");
    v.append(d.poisoned ? el("span", "tag poisoned", `POISONED ${d.override || ""}`.trim()) : el("span", "tag real", "real"));
  } else {
    v.append(t.address || "—");
  }
  return step("DNS", v);
}

function certStep(strip) {
  if (strip.tls_error) return step("TLS", `✗ ${strip.tls_error}`, "bad");
  if (!strip.cert) return step("cert", "—");
  const names = strip.cert.names;
  const wild = strip.name ? "*." + strip.name.split(".").slice(1).join(".") : null;
  const covering = names.find((n) => n === strip.name) || names.find((n) => n === wild);
  const s = step("cert", strip.cert_valid ? `✓ ${covering}` : `✗ ${names[0] || "none"}`, strip.cert_valid ? "good" : "bad");
  s.title = names.join(", ");
  return s;
}

function decisionStep(strip) {
  const d = strip.decision;
  if (!d) return step("edge", "no request");
  if (d.origin) return step("edge", d.rule);
  return step("edge", `refused ${d.status || ""} ${d.code || d.rule || ""}`.replace(/\s+/g, " ").trim(), "bad");
}

function originStep(strip) {
  if (strip.origin) return step("origin", strip.origin + (strip.origin_status ? ` (${strip.origin_status})` : ""));
  if (strip.origin_error) return step("origin", `error: ${strip.origin_error}`, "bad");
  return step("origin", "none");
}

function verdictBadge(strip) {
  if (strip.verdict) {
    const sign = { MISROUTED: "✗", SAFE: "✓", REFUSED: "⊘" }[strip.verdict] || "";
    return el("span", "badge " + strip.verdict.toLowerCase(), `${sign} ${strip.verdict}`);
  }
  const label = { dns: "DNS ONLY", connection: "NO REQUEST", direct: "DIRECT" }[strip.kind] || "…";
  return el("span", "badge", label);
}

function renderStrip(strip, fresh) {
  const li = el("li", "strip" + (strip.verdict ? " " + strip.verdict.toLowerCase() : "") + (fresh ? " fresh" : ""));
  li.dataset.key = strip.key;
  if (strip.verdict) li.dataset.verdict = strip.verdict;
  const head = el("div", "head");
  head.append(verdictBadge(strip), el("span", "name", strip.name || (strip.dns && strip.dns.name) || "?"));
  if (strip.request) head.append(el("span", "req", `${strip.request.method || ""} ${strip.request.path || ""}`.trim()));
  const when = strip.ts ? new Date(strip.ts * 1000).toLocaleTimeString([], { hour12: false }) : "";
  const meta = [strip.client && `from ${strip.client}`, strip.decision && strip.decision.model, when].filter(Boolean);
  head.append(el("span", "meta", meta.join(" · ")));
  li.append(head);

  const steps = el("div", "steps");
  const parts = [dnsStep(strip)];
  if (strip.kind !== "dns" && strip.kind !== "direct") {
    parts.push(step("listener", strip.listener), step("SNI", strip.sni || "(none)"), certStep(strip), decisionStep(strip));
  }
  if (strip.kind !== "dns" && strip.kind !== "connection") parts.push(originStep(strip));
  parts.filter(Boolean).forEach((p, i) => {
    if (i) steps.append(el("span", "arrow", "→"));
    steps.append(p);
  });
  li.append(steps);
  const reason = strip.decision ? strip.decision.reason : (strip.kind === "direct" ? "straight to the origin, not through the edge" : null);
  if (reason) li.append(el("div", "why", reason));
  if (strip.verdict === "MISROUTED" && strip.why) li.append(el("div", "why oracle", strip.why));
  return li;
}

function renderStrips(freshKey) {
  const list = [...state.strips.values()].sort((a, b) => b.at - a.at).slice(0, SHOWN);
  for (const key of state.strips.keys()) if (!list.some((s) => s.key === key)) state.strips.delete(key);
  $("strips").replaceChildren(...list.map((s) => renderStrip(s, freshKey.has(s.key))));
  $("empty").hidden = list.length > 0;
}

// ---- scenarios --------------------------------------------------------------------
const TAGS = ["write-up", "attack", "legit", "custom-hostname", "tricky", "all"];

function renderScenarios() {
  $("tags").replaceChildren(...TAGS.map((t) => {
    const b = el("button", "", t);
    b.type = "button";
    b.setAttribute("aria-pressed", String(t === state.tag));
    b.addEventListener("click", () => { state.tag = t; renderScenarios(); $("scenarios").scrollTop = 0; });
    return b;
  }));
  const shown = state.scenarios.filter((s) => state.tag === "all" || s.tags.includes(state.tag));
  $("scenarios").replaceChildren(...shown.map((s) => {
    const b = el("button", "", s.title);
    b.type = "button";
    b.dataset.scenario = s.name;
    b.append(el("span", "n", s.name));
    b.disabled = !state.write || state.busy;
    b.addEventListener("click", () => runScenario(s.name, b));
    return b;
  }));
}

async function runScenario(name, button) {
  state.busy = true;
  renderModels();
  renderScenarios();
  const running = document.querySelector(`.scenarios button[data-scenario="${CSS.escape(name)}"]`);
  if (running) running.classList.add("running");
  $("run-result").textContent = `running ${name} under ${state.model}…`;
  try {
    const data = await api("POST", `/live/scenarios/${encodeURIComponent(name)}/run`);
    const lines = data.cases.map((c) => `${c.scenario} [${c.model}]: ${c.verdict}` + (c.passed ? " — as expected" : ` — FAILED: ${c.failure}`));
    $("run-result").textContent = lines.join("; ");
    showError("");
  } catch (e) {
    $("run-result").textContent = "";
    showError(`${name} did not run: ${e.message}`);
  }
  state.busy = false;
  renderModels();
  renderScenarios();
}

// ---- loot and hostnames -----------------------------------------------------------
async function refreshLoot() {
  let loot;
  try {
    loot = await api("GET", "/live/loot");
  } catch (e) {
    $("loot-empty").textContent = e.message;
    $("loot-empty").hidden = false;
    return;
  }
  $("loot-empty").textContent = "Nothing stolen yet.";
  $("loot-empty").hidden = loot.length > 0;
  $("loot").replaceChildren(...loot.map((x) => {
    const li = el("li");
    li.append(el("div", "cookie mono", x.cookie || "(empty cookie)"));
    const when = x.time ? new Date(x.time * 1000).toLocaleTimeString([], { hour12: false }) : "";
    li.append(el("div", "from", `from ${x.page || x.source || "?"} at ${when}`));
    return li;
  }));
}

async function refreshHostnames() {
  let list;
  // One page (the API pages them): a room's lab has a handful; a big one shows its first.
  try { list = (await api("GET", "/hostnames?limit=100")).hostnames; } catch (e) { return; }
  $("hostnames").replaceChildren(...list.map((h) => {
    const li = el("li");
    li.append(el("span", "chip " + h.status, h.status), el("span", "h", h.name));
    if (h.reason) li.title = h.reason;
    return li;
  }));
}

// ---- workshop progress (lab.workshop.server) ---------------------------------------
async function refreshWorkshop() {
  let p;
  try { p = await api("GET", "/workshop/progress"); } catch (e) { return; }
  // One chip per exercise, so the panel stays a line or two; the names are on /workshop.
  $("workshop").replaceChildren(...p.exercises.map((r) => {
    const li = el("li", r.passed ? "passed" : (r.started ? "started" : ""), r.number);
    li.title = `${r.number}. ${r.title}: ${r.passed ? "done" : (r.started ? "started" : "not started")}`;
    return li;
  }));
  const done = p.exercises.filter((r) => r.passed).length;
  $("workshop-count").textContent = `${done} of ${p.exercises.length} done`;
}

// ---- the stream -------------------------------------------------------------------
function connect() {
  const source = new EventSource("/live/stream");
  source.addEventListener("open", () => { $("link").textContent = "live"; $("link").classList.remove("down"); });
  source.addEventListener("error", () => { $("link").textContent = "reconnecting…"; $("link").classList.add("down"); });
  source.addEventListener("snapshot", (ev) => {
    const data = JSON.parse(ev.data);
    state.strips = new Map(data.strips.map((s) => [s.key, s]));
    state.model = data.model;
    renderModels();
    renderStrips(new Set());
    refreshLoot();
    refreshHostnames();
  });
  source.addEventListener("strip", (ev) => {
    const s = JSON.parse(ev.data);
    const fresh = !state.strips.has(s.key);
    state.strips.set(s.key, s);
    renderStrips(fresh ? new Set([s.key]) : new Set());
  });
  source.addEventListener("drop", (ev) => {
    state.strips.delete(JSON.parse(ev.data).key);
    renderStrips(new Set());
  });
  source.addEventListener("model", (ev) => { state.model = JSON.parse(ev.data).model; renderModels(); });
  source.addEventListener("hostnames", refreshHostnames);
  source.addEventListener("loot", refreshLoot);
}

async function start() {
  try {
    const s = await api("GET", "/live/state");
    Object.assign(state, { write: s.write, model: s.model, models: s.models });
  } catch (e) {
    showError(`The control plane did not answer: ${e.message}`);
  }
  $("readonly").hidden = state.write;
  renderModels();
  try { state.scenarios = await api("GET", "/live/scenarios"); } catch (e) { showError(e.message); }
  renderScenarios();
  connect();
  refreshWorkshop();
  setInterval(refreshWorkshop, 3000);
}

start();
