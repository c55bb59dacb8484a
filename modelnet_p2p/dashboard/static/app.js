// The modelnet dashboard: draws the JSON of api/v1/mesh, live from api/v1/events (SSE).
// No framework and no build step: plain DOM and SVG.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let latest = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function short(id) { return "…" + id.slice(-8); }

function ago(seconds) {
  if (seconds < 1.5) return "now";
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function loadText(load) {
  if (!load || load.in_flight === undefined) return "–";
  let text = load.in_flight + (load.max_concurrency ? "/" + load.max_concurrency : "");
  if (load.queue) text += " +" + load.queue + " queued";
  if (load.latency_ms) text += " · " + load.latency_ms + " ms";
  return text;
}

function renderSelf(me) {
  const r = me.reachability;
  const how = r.mode === "private" ? (r.relayed ? "private, relayed" : "private, no relay slot yet") : "public (direct)";
  document.getElementById("self").textContent =
    `${me.peer_id} · network ${me.network} · ${how} · ${me.connections} connections · v${me.version}`;
}

function renderPeers(peers, now) {
  const body = document.querySelector("#peers tbody");
  body.replaceChildren();
  for (const p of peers) {
    const caps = el("td", { class: "caps" });
    for (const c of p.capabilities) {
      const title = (c.tasks.length ? c.tasks.join(", ") : "task unknown") + (c.available ? "" : " (not live)");
      caps.append(el("span", { class: "cap" + (c.available ? "" : " off"), "data-cap": c.name, title },
        c.name + (c.version ? " " + c.version : "")));
    }
    if (!p.capabilities.length) caps.append(el("span", { class: "muted" }, "–"));
    const reach = p.reachability + (p.relays.length ? " via " + p.relays.map(short).join(", ") : "") +
      (p.connected && !p.local ? " · connected" : "");
    const row = el("tr", { "data-peer": p.peer_id, "data-state": p.state,
                            class: (p.local ? "local " : "") + (p.state === "gone" ? "gone" : "") },
      el("td", { class: "id", title: p.addrs.join("\n") }, p.peer_id),
      el("td", { class: "state " + p.state }, p.state),
      el("td", {}, loadText(p.load)),
      caps,
      el("td", {}, reach),
      el("td", { title: new Date(p.last_seen * 1000).toISOString() }, p.local ? "–" : ago(Math.max(0, now - p.last_seen))));
    body.append(row);
  }
  document.getElementById("peer-count").textContent =
    `(${peers.filter(p => p.state !== "gone").length} present, ${peers.length} known)`;
}

function renderGraph(graph) {
  const box = document.getElementById("graph");
  box.replaceChildren();
  const W = 480, H = 360, cx = W / 2, cy = H / 2, R = Math.min(W, H) / 2 - 40;
  const local = graph.nodes.find(n => n.local);
  const others = graph.nodes.filter(n => !n.local);
  const pos = {};
  if (local) pos[local.id] = [cx, cy];
  others.forEach((n, i) => {
    const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, others.length);
    pos[n.id] = [cx + R * Math.cos(a), cy + R * Math.sin(a)];
  });
  for (const e of graph.edges) {
    if (!pos[e.a] || !pos[e.b]) continue;
    box.append(svg("line", { class: "edge " + e.kind, x1: pos[e.a][0], y1: pos[e.a][1], x2: pos[e.b][0], y2: pos[e.b][1] }));
  }
  for (const n of graph.nodes) {
    const [x, y] = pos[n.id];
    const g = svg("g", { "data-node": n.id });
    const circle = svg("circle", { class: "node " + n.state + (n.local ? " local" : ""), cx: x, cy: y, r: n.local ? 13 : 10 });
    const title = svg("title", {});
    title.textContent = n.id + " (" + n.state + ")";
    circle.append(title);
    const label = svg("text", { x: x, y: y + (n.local ? 27 : 23), "text-anchor": "middle" });
    label.textContent = n.local ? "this peer" : short(n.id);
    g.append(circle, label);
    box.append(g);
  }
}

function renderTasks(byTask, caps) {
  const box = document.getElementById("tasks");
  box.replaceChildren();
  const info = Object.fromEntries(caps.map(c => [c.name, c]));
  const tasks = Object.keys(byTask);
  if (!tasks.length) box.append(el("p", { class: "muted" }, "no capability seen yet"));
  for (const task of tasks) {
    const line = el("div", { class: "task", "data-task": task }, el("b", {}, task));
    for (const name of byTask[task]) {
      const c = info[name];
      line.append(el("span", { class: "cap" + (c && c.live ? "" : " off"), "data-cap": name },
        `${name} · ${c ? c.live : 0}/${c ? c.providers.length : 0} live`));
    }
    box.append(line);
  }
}

function traceNode(t) {
  const parts = [t.kind];
  if (t.capability) parts.push(t.capability);
  if (t.peer) parts.push("@" + short(t.peer));
  parts.push(Math.round(t.duration_ms) + " ms");
  if (t.chunks) parts.push(t.chunks + " chunks");
  if (t.attempts && t.attempts.length > 1) parts.push(t.attempts.length + " attempts");
  for (const k of ["label", "verdict", "round"]) if (t.detail && t.detail[k] !== undefined) parts.push(k + "=" + t.detail[k]);
  const li = el("li", {}, el("span", { class: t.status }, t.status), " " + parts.join(" "));
  if (t.error) li.append(el("span", { class: "error" }, " — " + t.error));
  if (t.children && t.children.length) {
    const ul = el("ul", { class: "trace" });
    for (const c of t.children) ul.append(traceNode(c));
    li.append(ul);
  }
  return li;
}

function renderTraces(traces) {
  const box = document.getElementById("traces");
  box.replaceChildren();
  if (!traces.length) { box.append(el("p", { class: "muted" }, "none run by this peer yet")); return; }
  for (const t of traces) {
    box.append(el("div", { class: "trace-head", "data-trace": t.id },
      `#${t.id} ${t.kind} · ${new Date(t.started_at * 1000).toLocaleTimeString()}`));
    box.append(el("ul", { class: "trace root" }, traceNode(t)));
  }
}

function render(mesh) {
  latest = mesh;
  renderSelf(mesh.self);
  renderPeers(mesh.peers, mesh.time);
  renderGraph(mesh.graph);
  renderTasks(mesh.by_task, mesh.capabilities);
  renderTraces(mesh.traces);
  document.body.dataset.version = mesh.version;
}

function live(on) {
  const badge = document.getElementById("live");
  badge.className = "live " + (on ? "on" : "off");
  badge.textContent = on ? "live" : "reconnecting…";
}

function connect() {
  const events = new EventSource("api/v1/events");
  events.addEventListener("mesh", ev => { live(true); render(JSON.parse(ev.data)); });
  events.onerror = () => live(false);  // EventSource reconnects by itself
}

connect();
