// The peers page's "pair with a code": invite (shows the code, waits for the other
// device) and accept a code. Uses app.js's helpers (api, act, $, refreshPage); the
// endpoints are /api/invite and /api/accept (docs/api.md). Text from the node or a
// peer only enters the page as textContent.
"use strict";

const INVITE_POLL_MS = 700;
const pairing = { invite: null, timer: null };

function pairedText(res) {
  const as = res.alias ? ` as "${res.alias}"` : "";
  return `paired: now trusting ${res.peer_id.slice(0, 7)}${as} (calls itself ` +
    `"${res.name || "-"}"); verification words: ${res.verification}`;
}

function showInvite(row) {
  const status = $("#invite-status");
  const result = $("#invite-result");
  const running = row && (row.state === "waiting" || row.state === "connected");
  status.hidden = !running;
  $("#invite-cancel").hidden = !running;
  $("#invite-button").disabled = !!running;
  if (!row) { result.hidden = true; return; }
  $("#invite-code").textContent = row.code;
  $("#invite-code-again").textContent = row.code;
  $("#invite-state").textContent = row.state === "connected"
    ? "the other device is pairing…" : "waiting for the other device…";
  result.dataset.state = row.state;
  if (row.state === "paired") result.textContent = pairedText(row.result);
  else if (row.state === "failed") result.textContent = `invitation failed: ${row.error}`;
  else if (row.state === "cancelled") result.textContent = "invitation cancelled; the code is dead";
  result.hidden = running;
}

async function pollInvite() {
  clearTimeout(pairing.timer);
  if (!pairing.invite) return;
  const row = await act(() => api("GET", `/api/invite/${encodeURIComponent(pairing.invite)}`));
  if (!row) return;
  showInvite(row);
  if (row.state === "waiting" || row.state === "connected") {
    pairing.timer = setTimeout(pollInvite, INVITE_POLL_MS);
  } else {
    pairing.invite = null;
    refreshPage();
  }
}

$("#invite-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const row = await act(() => api("POST", "/api/invite", { name: $("#invite-name").value.trim() }));
  if (!row) return;
  pairing.invite = row.id;
  showInvite(row);
  pairing.timer = setTimeout(pollInvite, INVITE_POLL_MS);
});

$("#invite-cancel").addEventListener("click", async () => {
  if (!pairing.invite) return;
  const row = await act(() => api("DELETE", `/api/invite/${encodeURIComponent(pairing.invite)}`));
  if (row) showInvite(row);
  pairing.invite = null;
});

$("#accept-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("#accept-result");
  out.hidden = false;
  out.dataset.state = "running";
  out.textContent = "pairing…";
  const res = await act(() => api("POST", "/api/accept",
    { code: $("#accept-code").value.trim(), name: $("#accept-name").value.trim() }));
  out.dataset.state = res ? "paired" : "failed";
  out.textContent = res ? pairedText(res) : "not paired (see the error above)";
  if (res) { $("#accept-code").value = ""; refreshPage(); }
});
