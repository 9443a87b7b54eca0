// The node's page: live status and chat over server-sent events (/events), actions as
// POST /api/COMMAND (the daemon's local API, errors as the CLI's one-line messages).
// Every name and text comes from peers: it goes into the page as text only, never as HTML.
"use strict";

const csrf = document.querySelector('meta[name="csrf"]').content;
let status = null;
const chats = new Map();   // network -> [chat events]
const CHAT_KEEP = 500;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}

// Re-draw a part of the page only when its data changed, and give the focus back to the control
// that had it (same data-key), so a keyboard user is not thrown out by a live update.
const drawn = new Map();
function redraw(box, data, build) {
  const text = JSON.stringify(data);
  if (drawn.get(box.id) === text) return;
  drawn.set(box.id, text);
  const focused = box.contains(document.activeElement) ? document.activeElement.dataset.key : null;
  box.replaceChildren(...build());
  if (focused) {
    const again = box.querySelector('[data-key="' + CSS.escape(focused) + '"]');
    if (again) again.focus();
  }
}

async function call(cmd, args) {
  let r;
  try {
    const res = await fetch("/api/" + cmd, {
      method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify(args || {}), credentials: "same-origin"});
    r = res.headers.get("Content-Type") === "application/json" ? await res.json()
      : {ok: false, error: (await res.text()).trim() || res.statusText};
  } catch (e) {
    r = {ok: false, error: "the node does not answer (is it running?)"};
  }
  if (!r.ok) say(r.error, true);
  else if (r.warning) say("warning: " + r.warning);
  return r;
}

let msgTimer = 0;
document.getElementById("msg").addEventListener("click", e => { e.currentTarget.hidden = true; });
document.addEventListener("keydown", e => { if (e.key === "Escape") document.getElementById("msg").hidden = true; });
function say(text, error) {
  const m = document.getElementById("msg");
  m.textContent = (error ? "error: " : "") + text;
  m.className = error ? "error" : "";
  m.hidden = false;
  clearTimeout(msgTimer);
  msgTimer = setTimeout(() => { m.hidden = true; }, error ? 8000 : 4000);
}

function copyButton(text) {
  return el("button", {class: "small", type: "button", "aria-label": "copy " + text, title: "copy", "data-key": "copy:" + text,
    onclick: () => navigator.clipboard.writeText(text).then(() => say("copied " + text))}, "copy");
}

// ----------------------------------------------------------------------- this node
function renderNode(st) {
  const n = st.node, s = st.server, u = st.udp || {};
  const nat = u.nat || {};
  const pm = u.port_mapping;
  const natText = nat.udp === false ? "no UDP to the server" : nat.behind_nat === false ? "none (public address)"
    : nat.mapping ? nat.mapping + (nat.allocation ? ", " + nat.allocation + " ports" : "") : "unknown yet";
  const facts = [
    ["Name", n.name], ["Virtual IP", n.virtual_ip || "none yet"],
    ["Server", s.address ? s.address + " (" + (s.connected ? "connected" : s.state) + ")" + (s.error ? ": " + s.error : "") : "none"],
    ["Public address", u.public || "unknown"], ["NAT", natText],
    ["Port mapping", pm ? (pm.mapped ? pm.protocol + " " + pm.mapped : pm.note || "none") : "not tried"],
    ["Proxies", (st.proxies || []).map(p => p.kind + " " + p.address).join(", ") || "none"],
  ];
  redraw(document.getElementById("node-facts"), facts, () => facts.flatMap(([k, v]) => [el("dt", {}, k),
    el("dd", {}, v, k === "Virtual IP" && n.virtual_ip ? copyButton(n.virtual_ip) : null)]));
}

// ----------------------------------------------------------------------- traffic
// Per peer: the tunnel's byte counters sampled every SAMPLE ms from the last status (no new status:
// nothing moved), as rates for a small chart of the last CHART_POINTS samples.
const SAMPLE = 1500, CHART_POINTS = 60, SVG = "http://www.w3.org/2000/svg";
const traffic = new Map();   // key -> {rx, tx, down: [B/s], up: [B/s]}

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function sample() {
  if (!status) return;
  for (const p of status.peers || []) {
    const t = traffic.get(p.key) || {rx: p.rx_bytes, tx: p.tx_bytes, down: [], up: []};
    t.down.push(Math.max(0, p.rx_bytes - t.rx) * 1000 / SAMPLE);
    t.up.push(Math.max(0, p.tx_bytes - t.tx) * 1000 / SAMPLE);
    if (t.down.length > CHART_POINTS) { t.down.shift(); t.up.shift(); }
    t.rx = p.rx_bytes; t.tx = p.tx_bytes;
    traffic.set(p.key, t);
  }
  for (const svg of document.querySelectorAll("svg[data-chart]")) drawChart(svg);
}

function chart(key) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("data-chart", key);
  svg.setAttribute("viewBox", "0 0 " + CHART_POINTS + " 20");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "chart");
  for (const cls of ["down", "up"]) {
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("class", cls);
    svg.append(line);
  }
  drawChart(svg);
  return svg;
}

function drawChart(svg) {
  const t = traffic.get(svg.dataset.chart);
  if (!t) return;
  const top = Math.max(1024, ...t.down, ...t.up);
  const points = series => series.map((v, i) => (CHART_POINTS - series.length + i) + "," + (19.5 - 19 * v / top).toFixed(1)).join(" ");
  svg.querySelector(".down").setAttribute("points", points(t.down));
  svg.querySelector(".up").setAttribute("points", points(t.up));
  const now = t.down.length ? "now ↓ " + bytes(Math.round(t.down[t.down.length - 1])) + "/s ↑ " + bytes(Math.round(t.up[t.up.length - 1])) + "/s" : "";
  svg.setAttribute("aria-label", now);
  let title = svg.querySelector("title");
  if (!title) { title = document.createElementNS(SVG, "title"); svg.prepend(title); }
  title.textContent = now;
}
setInterval(sample, SAMPLE);

// ----------------------------------------------------------------------- networks
function light(member, peer) {
  // green: direct, yellow: relayed, blinking: connecting, grey: offline, red: no path from here
  if (!member.online) return ["offline", "offline"];
  if (!peer) return ["nopath", "no path from this node"];
  if (!peer.path) return ["connecting", "connecting"];
  if (peer.path === "relay") return ["relayed", "relayed by the server"];
  if (peer.path.startsWith("turn ")) return ["relayed", "relayed by the TURN server " + peer.path.slice(5)];
  return ["direct", peer.path];
}

function renderNets(st) {
  const peers = new Map((st.peers || []).map(p => [p.key, p]));
  const box = document.getElementById("net-list");
  redraw(box, [st.networks, st.peers, [...routes], [...offered]], () => st.networks.length ? st.networks.map(net => {
    const owner = net.role === "owner";
    const tags = [net.type, "you: " + (net.role || "member"), net.encrypted ? "encrypted" : "NOT encrypted",
      net.locked ? "locked" : null, net.approval ? "owner approves joins" : null, net.away ? "you are offline here" : null]
      .filter(Boolean).join(" · ");
    const rows = net.members.map(m => {
      const p = peers.get(m.key);
      const [cls, what] = m.self ? ["direct", "this node"] : light(m, p);
      return el("tr", {"data-member": m.name, "data-light": m.self ? "self" : cls},
        el("td", {}, el("span", {class: "light " + cls, role: "img", "aria-label": what, title: what}), m.name,
          m.self ? " (you)" : "", m.role === "owner" ? " ★" : "",
          el("span", {class: "tags", title: "interface"}, " " + (m.iface || "userspace"))),
        el("td", {}, m.ip || "", m.ip ? copyButton(m.ip) : null),
        el("td", {class: "path"}, m.self ? "" : what),
        el("td", {}, p && p.rtt_ms != null ? p.rtt_ms.toFixed(1) + " ms" : ""),
        el("td", {class: "traffic"}, p ? el("span", {}, "↓ " + bytes(p.rx_bytes) + " ↑ " + bytes(p.tx_bytes)) : "",
          p ? chart(p.key) : null),
        el("td", {class: "actions"}, m.self || !m.online || !p ? "" :
          el("button", {class: "small", type: "button", "data-key": "ping:" + m.name + "." + net.name,
            onclick: () => ping(m.name + "." + net.name)}, "ping"),
          owner && !m.self ? button("kick:" + m.name + "." + net.name, "kick",
            () => confirm("Remove " + m.name + " from " + net.name + "? (it may join again)") && admin(net.name, "kick", m.name)) : null,
          owner && !m.self ? button("ban:" + m.name + "." + net.name, "ban",
            () => confirm("Ban " + m.name + " from " + net.name + "?") && admin(net.name, "ban", m.name)) : null));
    });
    const pending = owner && net.pending.length ? el("div", {},
      el("h3", {}, "Waiting for approval"),
      el("ul", {}, ...net.pending.map(r => el("li", {}, r.name, " ",
        el("button", {class: "small", type: "button", "data-key": "approve:" + r.name + "." + net.name,
          onclick: () => admin(net.name, "approve", r.name)}, "approve"), " ",
        el("button", {class: "small", type: "button", "data-key": "reject:" + r.name + "." + net.name,
          onclick: () => admin(net.name, "reject", r.name)}, "reject"))))) : null;
    const ownerBar = owner ? el("div", {class: "row owner"},
      button("lock:" + net.name, net.locked ? "unlock" : "lock", () => admin(net.name, net.locked ? "unlock" : "lock")),
      button("approval:" + net.name, net.approval ? "approval off" : "approval on",
        () => admin(net.name, net.approval ? "approval-off" : "approval-on")),
      el("label", {}, "type ", el("select", {"data-key": "type:" + net.name, "aria-label": "network type",
        onchange: e => admin(net.name, "type", e.target.value)},
        ...["mesh", "hub-and-spoke", "gateway"].map(t => {
          const o = el("option", {value: t}, t);
          if (t === net.type) o.selected = true;
          return o;
        }))),
      button("routes:" + net.name, routes.has(net.name) ? "hide routes" : "routes",
        () => routes.has(net.name) ? (routes.delete(net.name), renderNets(status)) : loadRoutes(net.name)),
      button("password:" + net.name, "set password", () => {
        const pw = prompt("New password for " + net.name + " (members stay)");
        if (pw) admin(net.name, "password", undefined, {password: pw, value: 0});
      })) : null;
    const routeList = owner && routes.has(net.name) ? el("div", {class: "routes"},
      el("h3", {}, "Routes members offer (LAN subnets)"),
      el("ul", {}, ...(routes.get(net.name).length ? routes.get(net.name).flatMap(g => {
        const approved = new Set(g.approved);
        return [...new Set([...g.advertised, ...g.approved])].sort().map(prefix => el("li", {},
          prefix + " through " + g.name + (g.online ? "" : " (offline)") + ": " + (approved.has(prefix) ? "approved" : "not approved") + " ",
          button("route:" + g.name + ":" + prefix + "." + net.name, approved.has(prefix) ? "remove" : "approve",
            () => routeAction(net.name, approved.has(prefix) ? "route-remove" : "route-approve", g.name, prefix))));
      }) : [el("li", {class: "tags"}, "no member offers routes (overlay up --advertise-routes SUBNET)")]))) : null;
    const waiting = owner ? (offered.get(net.name) || []).flatMap(g =>
      g.advertised.filter(p => !g.approved.includes(p)).map(prefix => [g.name, prefix])) : [];
    const routesWaiting = waiting.length ? el("div", {class: "waiting-routes"},
      el("h3", {}, waiting.length + (waiting.length === 1 ? " route" : " routes") + " waiting for approval"),
      el("ul", {}, ...waiting.map(([name, prefix]) => el("li", {}, prefix + " through " + name + " ",
        button("approve-route:" + name + ":" + prefix + "." + net.name, "approve",
          () => routeAction(net.name, "route-approve", name, prefix)))))) : null;
    return el("div", {class: "net", "data-network": net.name},
      el("h3", {}, net.name, " ",
        el("button", {class: "small", type: "button", "data-key": "leave:" + net.name, onclick: () => leave(net.name)}, "leave"), " ",
        button("presence:" + net.name, net.away ? "go online here" : "go offline here",
          () => call("presence", {network: net.name, online: net.away}))),
      el("div", {class: "tags"}, tags), ownerBar, routeList, routesWaiting, pending,
      el("div", {class: "wrap"}, el("table", {},
        el("thead", {}, el("tr", {}, ...["Member", "Virtual IP", "Path", "RTT", "Traffic", ""].map(h => el("th", {scope: "col"}, h)))),
        el("tbody", {}, ...rows))));
  }) : [el("p", {class: "tags"}, "No network yet: join or create one.")]);
}

async function ping(peer) {
  say("pinging " + peer + "…");
  const r = await call("ping_peer", {peer, wait: 2.0});
  if (r.ok) say(peer + ": " + (r.rtt_ms != null ? r.rtt_ms.toFixed(1) + " ms" : "no answer") + (r.path ? " via " + r.path : ""));
}

const routes = new Map();   // network -> its routes (owner's `admin routes`), while shown
const offered = new Map();  // network -> its routes, fetched on their own for the "waiting" line

async function loadRoutes(network, quiet) {
  const r = await call("admin", {network, action: "routes"});
  if (!r.ok) return;
  offered.set(network, r.routes);
  if (!quiet || routes.has(network)) routes.set(network, r.routes);
  renderNets(status);
}

// Owned networks' routes without a click: fetched again when a network's members (who is in,
// who is online) change, at most once per ROUTES_EVERY ms per network.
const ROUTES_EVERY = 3000;
const routeWatch = new Map();   // network -> {seen, last, timer}
function watchRoutes(st) {
  for (const net of st.networks) {
    if (net.role !== "owner") { routeWatch.delete(net.name); offered.delete(net.name); continue; }
    const w = routeWatch.get(net.name) || {seen: null, last: -Infinity, timer: 0};
    routeWatch.set(net.name, w);
    const seen = JSON.stringify(net.members.map(m => [m.name, m.online]));
    if (seen === w.seen) continue;
    w.seen = seen;
    if (w.timer) continue;   // the fetch already planned sees this change too
    w.timer = setTimeout(() => { w.timer = 0; w.last = performance.now(); loadRoutes(net.name, true); },
      Math.max(0, w.last + ROUTES_EVERY - performance.now()));
  }
}

async function routeAction(network, action, target, prefix) {
  const r = await call("admin", {network, action, target, prefix});
  if (r.ok) { say(prefix + " through " + target + ": " + (action === "route-approve" ? "approved" : "removed")); loadRoutes(network, true); }
}

function button(key, text, onclick) {
  return el("button", {class: "small", type: "button", "data-key": key, onclick}, text);
}

async function admin(network, action, target, extra) {
  const r = await call("admin", {network, action, target, ...(extra || {})});
  if (r.ok) say(network + ": " + action + (target ? " " + target : "") + " done");
}

async function leave(network) {
  if (!confirm("Leave the network " + network + "?")) return;
  if ((await call("leave", {network})).ok) say("left " + network);
}

// ----------------------------------------------------------------------- shares
function renderShares(st) {
  const shares = st.shares || [];
  redraw(document.getElementById("share-list"), shares, () => shares.length ? shares.map(s => {
    const text = s.port + (s.proto === "udp" ? "/udp" : "");
    return el("li", {}, text, " ", el("button", {class: "small", type: "button", "data-key": "unshare:" + text,
      onclick: () => call("unshare", {port: s.port, udp: s.proto === "udp"})}, "remove"));
  }) : [el("li", {class: "tags"}, "none")]);
}

function renderForwards(st) {
  const fwds = st.forwards || [];
  redraw(document.getElementById("forward-list"), fwds, () => fwds.length ? fwds.map(f => {
    const port = Number(f.listen.split(":").pop()), udp = f.proto === "udp";
    return el("li", {}, f.listen + (udp ? "/udp" : "") + " → " + f.peer + ":" + f.peer_port, " ",
      button("unforward:" + port + (udp ? "/udp" : ""), "remove", () => call("unforward", {listen: port, udp})));
  }) : [el("li", {class: "tags"}, "none")]);
}

// ----------------------------------------------------------------------- chat
function renderChatNets(st) {
  const sel = document.getElementById("chat-net");
  const names = st.networks.map(n => n.name);
  const cur = sel.value;
  if ([...sel.options].map(o => o.value).join() !== names.join()) {
    sel.replaceChildren(...names.map(n => el("option", {value: n}, n)));
    if (names.includes(cur)) sel.value = cur;
  }
  for (const n of names) if (!chats.has(n)) { chats.set(n, []); loadHistory(n); }
  renderChat();
}

async function loadHistory(network) {
  const r = await call("history", {network});
  if (r.ok) for (const m of r.messages) addChat(m);
}

function addChat(ev) {
  const list = chats.get(ev.network) || [];
  if (ev.id != null && list.some(m => m.id === ev.id)) return;
  list.push(ev);
  list.sort((a, b) => (a.ts || 0) - (b.ts || 0));
  if (list.length > CHAT_KEEP) list.splice(0, list.length - CHAT_KEEP);
  chats.set(ev.network, list);
  renderChat();
}

function renderChat() {
  const net = document.getElementById("chat-net").value;
  const log = document.getElementById("chat-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.replaceChildren(...(chats.get(net) || []).map(m => el("li", {},
    m.ts ? el("time", {}, new Date(m.ts * 1000).toLocaleTimeString()) : null,
    el("span", {class: "from"}, m.from || "?"), m.text)));
  if (atEnd) log.scrollTop = log.scrollHeight;
}

// ----------------------------------------------------------------------- forms
document.getElementById("chat-net").addEventListener("change", renderChat);
document.getElementById("chat-form").addEventListener("submit", async e => {
  e.preventDefault();
  const input = e.target.elements.text, network = document.getElementById("chat-net").value;
  if (!network) { say("join a network first", true); return; }
  if ((await call("chat", {network, text: input.value})).ok) input.value = "";
});
document.getElementById("net-form").addEventListener("submit", async e => {
  e.preventDefault();
  const f = e.target.elements, cmd = e.submitter && e.submitter.value === "create" ? "create" : "join";
  const r = await call(cmd, {network: f.network.value, password: f.password.value});
  if (r.ok) { say((cmd === "create" ? "created " : "joined ") + f.network.value); f.password.value = ""; }
});
document.getElementById("forward-form").addEventListener("submit", async e => {
  e.preventDefault();
  const f = e.target.elements, [port, proto] = f.listen.value.trim().split("/");
  const args = {listen: Number(port), peer: f.peer.value.trim(), peer_port: Number(f.peer_port.value || port), udp: proto === "udp"};
  if ((await call("forward", args)).ok) e.target.reset();
});
document.getElementById("share-form").addEventListener("submit", async e => {
  e.preventDefault();
  const [port, proto] = e.target.elements.port.value.trim().split("/");
  if ((await call("share", {port: Number(port), udp: proto === "udp"})).ok) e.target.reset();
});

// ----------------------------------------------------------------------- live
function render(st) {
  if (!status) performance.mark("first-status");   // benchmarks/bench_ui.py: time to first render
  status = st;
  renderNode(st); renderNets(st); watchRoutes(st); renderShares(st); renderForwards(st); renderChatNets(st);
}

function connect() {
  const conn = document.getElementById("conn");
  const es = new EventSource("/events");
  es.addEventListener("open", () => { conn.textContent = "live"; conn.className = "conn live"; });
  es.addEventListener("status", e => render(JSON.parse(e.data)));
  es.addEventListener("chat", e => addChat(JSON.parse(e.data)));
  es.addEventListener("error", () => { conn.textContent = "reconnecting…"; conn.className = "conn lost"; });
}
connect();
