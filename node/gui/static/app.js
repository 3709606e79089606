// The p2pfs dashboard: vanilla JS, no framework, nothing loaded from elsewhere.
// Everything shown comes from the node's JSON API (docs/api.md); peer-supplied text
// (names, paths) only ever enters the page as textContent, never as HTML.
"use strict";

const REFRESH_MS = { peers: 2000, folders: 3000, transfers: 500 };
const MAX_EVENTS_SHOWN = 500;
const state = { csrf: null, page: "peers", timer: null, unseen: 0 };

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  if (method !== "GET") opts.headers["X-CSRF-Token"] = state.csrf || "";
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) throw new Error((data && data.error && data.error.message) || `${r.status} ${r.statusText}`);
  return data;
}

function showError(err) {
  const box = $("#error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
}

function size(n) {
  n = Number(n) || 0;
  for (const unit of ["B", "KB", "MB", "GB"]) {
    if (n < 1000) return unit === "B" ? `${Math.round(n)} B` : `${n.toFixed(1)} ${unit}`;
    n /= 1000;
  }
  return `${n.toFixed(1)} TB`;
}

function ago(ts) {
  if (!ts) return "never";
  const d = Math.max(0, Date.now() / 1000 - ts);
  if (d < 90) return `${Math.round(d)}s ago`;
  if (d < 5400) return `${Math.round(d / 60)}m ago`;
  return `${(d / 3600).toFixed(1)}h ago`;
}

function yesNo(v) { return el("span", { class: v ? "yes" : "no" }, v ? "yes" : "no"); }

// a table is rebuilt only when its data changed: a button under the pointer stays put
const shown = {};

function fill(table, data, render, emptyId) {
  const key = JSON.stringify(data);
  if (shown[table] === key) return;
  shown[table] = key;
  $(`${table} tbody`).replaceChildren(...data.map(render));
  $(emptyId).hidden = data.length > 0;
}

// -- pages -------------------------------------------------------------------------

async function refreshPeers() {
  const peers = await api("GET", "/api/peers");
  const now = Math.floor(Date.now() / 10000);  // "last seen" text moves on every 10 s
  fill("#peers-table", peers.map((p) => ({ ...p, now })), (p) => el("tr", { dataset: { peerId: p.peer_id } },
    el("td", {}, p.alias || p.name || "-"),
    el("td", { class: "id", title: p.peer_id }, p.short_id),
    el("td", { class: "trusted" }, yesNo(p.trusted)),
    el("td", { class: "online" }, yesNo(p.online)),
    el("td", { class: "path" }, (p.paths && p.paths.length) ? p.paths.join(", ") : "-"),
    el("td", {}, ago(p.last_seen)),
    el("td", { class: "muted" }, p.source || ""),
    el("td", {}, p.trusted
      ? el("button", { class: "secondary untrust", onclick: () => untrust(p.peer_id) }, "Untrust")
      : el("button", { class: "trust", onclick: () => trust(p.peer_id, p.name || "") }, "Trust")),
  ), "#peers-empty");
}

async function trust(peer, name) {
  await act(() => api("POST", "/api/trust", { peer, name }));
  refreshPage();
}

async function untrust(peer) {
  await act(() => api("DELETE", `/api/trust/${encodeURIComponent(peer)}`));
  refreshPage();
}

async function refreshFolders() {
  const [synced, folders] = await Promise.all([
    api("GET", "/api/sync-folders"), api("GET", "/api/folders")]);
  refreshSyncFolders(synced);
  fill("#folders-table", folders, (f) => el("tr", { dataset: { label: f.label } },
    el("td", {}, f.label), el("td", { class: "id" }, f.path), el("td", {}, f.mode),
    el("td", {}, f.state), el("td", {}, f.files), el("td", {}, size(f.bytes)),
  ), "#folders-empty");
}

// -- synced folders (node folder ...): /api/sync-folders -------------------------------

function refreshSyncFolders(rows) {
  // "source": "config" means no engine measured anything: show "?" rather than zeros
  $("#sync-folders-note").hidden = !rows.some((f) => f.status.source === "config");
  fill("#sync-folders-table", rows, (f) => {
    const st = f.status;
    const measured = st.source !== "config";
    const paused = f.paused;
    return el("tr", { dataset: { folderId: f.id, state: st.state } },
      el("td", { class: "id" }, f.id), el("td", {}, f.label || "-"),
      el("td", { class: "id path" }, f.path), el("td", {}, f.mode),
      el("td", { class: "state", title: st.last_error || "" }, st.state),
      el("td", { class: "pct" }, measured ? `${Math.floor(st.completion_pct)}%` : "?"),
      el("td", { class: "conflicts" }, measured ? st.conflicts : "?"),
      el("td", {}, (f.peer_labels || []).join(", ") || "-"),
      el("td", {},
        el("button", { class: `secondary ${paused ? "resume" : "pause"}`,
          onclick: () => folderAction(f.id, paused ? "resume" : "pause") },
          paused ? "Resume" : "Pause"), " ",
        el("button", { class: "secondary rescan", onclick: () => folderAction(f.id, "rescan"),
          ...(paused || !measured ? { disabled: "", title: paused ? "paused"
            : "needs the folder engine" } : {}) }, "Rescan"), " ",
        modeButton(f, measured)));
  }, "#sync-folders-empty");
}

// send-only: push ours over remote changes; receive-only: undo local edits
const MODE_ACTIONS = {
  "send-only": ["override", "Override", "push this node's versions over remote changes"],
  "receive-only": ["revert", "Revert", "restore the global version of local edits"],
};

function modeButton(f, measured) {
  const spec = MODE_ACTIONS[f.mode];
  if (!spec) return "";
  const [action, text, what] = spec;
  return el("button", { class: `secondary ${action}`, title: measured ? what : "needs the folder engine",
    onclick: () => folderAction(f.id, action), ...(measured ? {} : { disabled: "" }) }, text);
}

async function folderAction(id, action) {
  // on a refusal the error stays shown: a refresh would clear it
  const res = await act(() => api("POST", `/api/sync-folders/${encodeURIComponent(id)}/${action}`));
  if (res) refreshPage();
}

async function addFolder(ev) {
  ev.preventDefault();
  const peers = $("#folder-add-peers").value.split(",").map((p) => p.trim()).filter(Boolean);
  const res = await act(() => api("POST", "/api/sync-folders", {
    path: $("#folder-add-path").value.trim(), id: $("#folder-add-id").value.trim(), peers,
    mode: $("#folder-add-mode").value, label: $("#folder-add-label").value.trim() }));
  $("#folder-add-result").textContent = res
    ? `added folder ${res.id} at ${res.path}` + (res.live ? "" : " (applies once the folder engine runs)")
    : "";
  if (res) refreshPage();
}

// an offer from a peer (folder_offered) prefills the form: the user still picks the path
function offerToForm(ev) {
  const d = ev.data || {};
  $("#folder-add-id").value = d.folder_id || "";
  $("#folder-add-peers").value = offeredBy(ev);
  $("#folder-add-label").value = d.label || "";
  location.hash = "#folders";
}

function offeredBy(ev) {
  const d = ev.data || {};
  const id = String(d.peer_id || "");
  return (ev.labels && ev.labels[id]) || id.slice(0, 7);
}

async function refreshTransfers() {
  const rows = await api("GET", "/api/transfers");
  fill("#transfers-table", rows, (t) => {
    const pct = t.bytes_total > 0 ? Math.floor((100 * t.bytes_done) / t.bytes_total)
      : (t.state === "done" ? 100 : 0);
    return el("tr", { dataset: { transferId: t.id, state: t.state } },
      el("td", { class: "id" }, t.id), el("td", {}, t.direction), el("td", {}, t.peer),
      el("td", {}, t.transport), el("td", { class: "state", title: t.error || "" }, t.state),
      el("td", {}, el("progress", { max: "100", value: String(pct) }), " ",
        el("span", { class: "pct" }, `${pct}%`), " ",
        el("span", { class: "muted" }, `${size(t.bytes_done)} / ${size(t.bytes_total)}`)),
      el("td", {}, `${t.files_done}/${t.files_total}`),
      el("td", {}, `${size(t.rate_bps)}/s`),
      el("td", {}, t.state === "running"
        ? el("button", { class: "secondary cancel", onclick: () => cancel(t.id) }, "Cancel") : ""));
  }, "#transfers-empty");
}

async function cancel(id) {
  await act(() => api("POST", `/api/transfers/${encodeURIComponent(id)}/cancel`));
  refreshPage();
}

async function searchLog(ev) {
  if (ev) ev.preventDefault();
  const q = new URLSearchParams();
  for (const key of ["peer", "path", "since"]) {
    const v = $(`#log-${key}`).value.trim();
    if (v) q.set(key, v);
  }
  q.set("limit", "500");
  const page = await act(() => api("GET", `/api/log?${q}`));
  if (!page) return;
  // the `log` control reply is a page: {events, total, more, limit, limit_max}
  const rows = Array.isArray(page) ? page : page.events;
  fill("#log-table", rows, (r) => el("tr", {},
    el("td", {}, new Date(r.wall_ms).toLocaleString()), el("td", {}, r.origin_label),
    el("td", {}, r.seq), el("td", {}, r.kind), el("td", {}, r.folder),
    el("td", {}, r.old_path ? `${r.old_path} -> ${r.path}` : r.path),
    el("td", {}, r.kind === "deleted" ? "" : size(r.size)),
  ), "#log-empty");
}

// -- events: server-sent, rendered generically from whatever JSON a kind carries ----------

function describe(ev) {
  const d = (ev && typeof ev.data === "object" && ev.data) ? ev.data : ev;
  let who = String(d.peer || d.origin_label || d.origin || d.peer_id || "");
  if (who.length > 20) who = who.slice(0, 7);  // a full peer id: its short form
  if (d.name && who) who = `${d.name} (${who})`;
  const path = d.path || (Array.isArray(d.paths) ? d.paths.join(",") : "");
  const parts = [];
  if (path) parts.push(path);
  if (who) parts.push(d.local ? "by me" : `peer ${who}`);
  if (d.size !== undefined) parts.push(size(d.size));
  if (d.error) parts.push(`error: ${d.error}`);
  if (!parts.length) {
    for (const [k, v] of Object.entries(d)) if (typeof v !== "object") parts.push(`${k}=${v}`);
  }
  return parts.join("  ");
}

function describeOffer(ev) {
  const d = ev.data || {};
  const label = d.label ? ` (${d.label})` : "";
  return `${offeredBy(ev)} offers folder ${d.folder_id || "?"}${label}; add it to sync `;
}

function addEvent(ev) {
  const list = $("#events-list");
  const when = ev.at_ms ? new Date(ev.at_ms).toLocaleTimeString() : "";
  const offer = ev.kind === "folder_offered";
  list.prepend(el("li", { dataset: { eventId: ev.id, kind: ev.kind || "" } },
    el("span", { class: "muted" }, `${ev.id} ${when} `),
    el("span", { class: "kind" }, ev.kind || "event"), " ",
    offer ? describeOffer(ev) : describe(ev),
    offer ? el("button", { class: "secondary offer", onclick: () => offerToForm(ev) }, "Add…") : ""));
  while (list.children.length > MAX_EVENTS_SHOWN) list.lastChild.remove();
  $("#events-empty").hidden = true;
  if (state.page !== "events") {
    state.unseen += 1;
    $("#events-badge").textContent = String(state.unseen);
  }
}

function connectEvents() {
  const source = new EventSource("/api/events");
  source.onopen = () => { $("#live").className = "on"; $("#live").textContent = "● live"; };
  source.onerror = () => { $("#live").className = "muted"; $("#live").textContent = "○ reconnecting"; };
  source.onmessage = (msg) => {
    try { addEvent(JSON.parse(msg.data)); } catch (e) { /* a malformed line is skipped */ }
  };
}

// -- navigation and refresh ------------------------------------------------------------

const REFRESH = { peers: refreshPeers, folders: refreshFolders, transfers: refreshTransfers };

// the error a user's action got stays up until their next action: the page's own
// refresh (every few seconds) clears only an error a refresh showed
let errorFromRefresh = false;

async function act(fn, { refresh = false } = {}) {
  try {
    const result = await fn();
    if (!refresh || errorFromRefresh) {
      showError(null);
      errorFromRefresh = false;
    }
    return result;
  } catch (err) {
    showError(err);
    errorFromRefresh = refresh;
    return null;
  }
}

async function refreshPage() {
  const fn = REFRESH[state.page];
  if (fn) await act(fn, { refresh: true });
}

function schedule() {
  clearTimeout(state.timer);
  const every = REFRESH_MS[state.page];
  if (!every) return;
  state.timer = setTimeout(async () => { await refreshPage(); schedule(); }, every);
}

function show(page) {
  if (!document.getElementById(`page-${page}`)) page = "peers";
  state.page = page;
  for (const s of document.querySelectorAll(".page")) s.hidden = s.id !== `page-${page}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  if (page === "events") { state.unseen = 0; $("#events-badge").textContent = ""; }
  if (page === "log") searchLog();
  refreshPage().then(schedule);
}

async function main() {
  const session = await act(() => api("GET", "/api/session"));
  if (!session) return;
  state.csrf = session.csrf_token;
  const n = session.node || {};
  $("#node-name").textContent = `${n.name || "unnamed"} · ${(n.peer_id || "").slice(0, 7)}`;
  document.title = `p2pfs · ${n.name || "dashboard"}`;

  $("#trust-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    await trust($("#trust-peer").value.trim(), $("#trust-name").value.trim());
  });
  $("#share-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const to = $("#share-to").value.trim();
    const res = await act(() => api("POST", "/api/share",
      { paths: [$("#share-path").value.trim()], to: to ? [to] : [] }));
    $("#share-result").textContent = res
      ? `started ${res.transfers.length} transfer(s): see Transfers` : "";
  });
  $("#log-form").addEventListener("submit", searchLog);
  $("#folder-add-form").addEventListener("submit", addFolder);
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  connectEvents();
  show(location.hash.slice(1) || "peers");
}

main();
