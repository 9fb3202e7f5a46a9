// The workshop page: this lab's progress and, when it hosts a room, the room's scoreboard.
// Plain DOM, textContent only: names on the scoreboard were typed by attendees.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

async function get(path) {
  const resp = await fetch(path, { headers: { Accept: "application/json" } });
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error || `${path}: ${resp.status}`);
  return data;
}

function renderMine(p) {
  const rows = p.exercises;
  $("mine-count").textContent = `${rows.filter((r) => r.passed).length} of ${rows.length} done`;
  $("exercises").replaceChildren(...rows.map((r) => {
    const li = el("li", r.passed ? "passed" : (r.started ? "started" : ""));
    li.dataset.exercise = r.id;
    li.append(el("span", "n", r.number), el("span", "t", r.title),
              el("span", "s", r.passed ? "DONE" : (r.started ? "STARTED" : "")));
    if (r.hints) li.append(el("span", "h", `${r.hints} hint${r.hints > 1 ? "s" : ""}`));
    return li;
  }));
  const j = $("joined");
  j.className = "joined" + (p.joined && p.joined.error ? " bad" : "");
  j.textContent = p.joined ? `in the room at ${p.joined.url} as ${p.joined.name}` + (p.joined.error ? ` (${p.joined.error})` : "") : "";
}

function renderRoom(r) {
  $("room").hidden = !r.open;
  document.body.classList.toggle("hosting", r.open);
  if (!r.open) return;
  const people = r.attendees;
  $("room-count").textContent = `${people.length} attendee${people.length === 1 ? "" : "s"}`;
  const head = [el("th", "name", "name")];
  for (const e of r.exercises) {
    const th = el("th", "", e.number);
    th.title = e.title;
    th.append(el("span", "count", `${r.solved_by[e.id] || 0}/${people.length}`));
    head.push(th);
  }
  head.push(el("th", "", "done"));
  $("board-head").replaceChildren(...head);
  $("board-body").replaceChildren(...people.map((a) => {
    const tr = el("tr");
    tr.dataset.attendee = a.name;
    tr.append(el("td", "name", a.name));
    for (const e of r.exercises) {
      const td = el("td");
      td.dataset.exercise = e.id;
      const res = a.results[e.id];
      if (res) {
        td.append(el("span", "cell " + (res.passed ? "passed" : "tried"), res.passed ? "✓" : "…"));
        td.dataset.passed = String(res.passed);
      }
      tr.append(td);
    }
    tr.append(el("td", "solved", a.solved));
    return tr;
  }));
  $("board-empty").hidden = people.length > 0;
}

async function tick() {
  try {
    const [p, r] = await Promise.all([get("/workshop/progress"), get("/workshop/room")]);
    renderMine(p);
    renderRoom(r);
    $("error").hidden = true;
  } catch (e) {
    $("error").textContent = `Not updated: ${e.message}`;
    $("error").hidden = false;
  }
  setTimeout(tick, POLL_MS);
}

tick();
