// The chat app's DOM: sign-in, the chat list, one open chat, the dialogs
// (new chat; settings: devices and presence).
//
// Owns: rendering the model of client.js and turning clicks and keys into
// its calls. Everything the user sees about the connection (its state, why
// it failed, refused sends) is shown here in words, never a blank page.

import { ChatClient, jwtClaims } from "./client.js";
import {
  clearSession,
  deviceFor,
  lastUser,
  loadPresenceHidden,
  loadSession,
  savePresenceHidden,
  saveSession,
} from "./store.js";

const $ = (id) => document.getElementById(id);
let client = null;
let noticeTimer = null;
/** The notice shows a connection problem (cleared when connected again). */
let connNotice = false;

const STATE_TEXT = {
  connecting: "connecting…",
  syncing: "syncing…",
  online: "online",
  offline: "offline",
  reconnecting: "reconnecting…",
  expired: "signed out",
  stopped: "",
};

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "type" || k === "title") e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function time(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  return today
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleDateString([], { month: "short", day: "numeric" });
}

function showNotice(text, level = "error", sticky = false) {
  connNotice = false;
  $("notice-text").textContent = text;
  $("notice").dataset.level = level;
  $("notice").hidden = false;
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => ($("notice").hidden = true), 8000);
}

// ---- sign in ---------------------------------------------------------------

function showLogin(message = "") {
  closeDialogs();
  $("shell").hidden = true;
  $("signout").hidden = true;
  $("settings-btn").hidden = true;
  $("login").hidden = false;
  $("me").textContent = "";
  $("login-msg").textContent = message;
  const u = $("login-user");
  if (!u.value) u.value = lastUser() || "";
  u.focus();
}

async function login(user) {
  const device = deviceFor(user);
  let resp;
  try {
    resp = await fetch("/dev/login", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ user, device }),
    });
  } catch {
    throw new Error("Cannot reach the gateway. Is it running? (make run)");
  }
  if (resp.status === 404) throw new Error("This gateway has no development login (dev_login = false).");
  let body = {};
  try {
    body = await resp.json();
  } catch {
    // not JSON
  }
  if (!resp.ok) throw new Error(body.message || `Sign-in failed (${resp.status}).`);
  return { user, device, token: body.token, expires_at: body.expires_at };
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const user = $("login-user").value.trim();
  if (!user) return;
  $("login-msg").textContent = "Signing in…";
  try {
    const s = await login(user);
    saveSession(s);
    start(s);
  } catch (e) {
    $("login-msg").textContent = e.message;
  }
});

$("signout").addEventListener("click", () => {
  if (client) client.stop();
  client = null;
  clearSession();
  document.body.classList.remove("show-chat");
  renderState();
  showLogin();
});

$("notice-close").addEventListener("click", () => ($("notice").hidden = true));

// ---- the client --------------------------------------------------------------

function start(session) {
  if (client) client.stop();
  $("login").hidden = true;
  $("login-msg").textContent = "";
  $("shell").hidden = false;
  $("signout").hidden = false;
  $("settings-btn").hidden = false;
  revokedHere.clear();
  $("me").textContent = `${session.user} · ${session.device}`;
  const c = new ChatClient({ ...session, base: location.origin });
  client = c;
  // A stopped client can still finish work in flight (a history page, a
  // timer): only the current one may touch the page.
  const on = (type, fn) => c.addEventListener(type, (e) => client === c && fn(e));
  on("state", renderState);
  on("chats", renderListSoon);
  on("presence", () => {
    renderListSoon();
    renderHeader();
  });
  on("chat", (e) => {
    if (e.detail === client.openChat) renderChatSoon();
  });
  on("notice", (e) => showNotice(e.detail.text, e.detail.level));
  on("auth", (e) => {
    const user = session.user;
    client.stop();
    client = null;
    clearSession();
    $("login-user").value = user;
    renderState();
    showLogin(e.detail.text);
  });
  renderState();
  renderList();
  renderChat();
  client.start();
}

function renderState() {
  const s = client ? client.state : "stopped";
  const conn = $("conn");
  conn.dataset.state = client ? s : "none";
  conn.textContent = STATE_TEXT[s] ?? s;
  conn.title = client?.stateDetail || "";
  if (!client) return;
  if (s === "offline" || s === "reconnecting" || (s === "connecting" && client.attempt > 0)) {
    showNotice(client.stateDetail || STATE_TEXT[s], "error", true);
    connNotice = true;
  } else if (connNotice && (s === "online" || s === "syncing")) {
    // The connection is back: its warning goes.
    $("notice").hidden = true;
    connNotice = false;
  }
}

// ---- chat list -----------------------------------------------------------------

let listQueued = false;
function renderListSoon() {
  if (listQueued) return;
  listQueued = true;
  requestAnimationFrame(() => {
    listQueued = false;
    renderList();
  });
}

function presenceOf(user) {
  return client?.presence.get(user);
}

function renderList() {
  const ul = $("chat-list");
  ul.replaceChildren();
  if (!client) return;
  const chats = [...client.chats.values()].sort((a, b) => b.lastTs - a.lastTs || b.lastSeq - a.lastSeq);
  let total = 0;
  for (const c of chats) {
    total += c.unread;
    const name = client.name(c);
    const peer = c.kind === "direct" ? client.others(c)[0] : null;
    const online = peer && presenceOf(peer)?.status === "online";
    const preview = c.left
      ? "You left this chat"
      : c.preview
        ? `${c.preview.sender === client.user ? "You" : c.preview.sender}: ${c.preview.text}`
        : "";
    const b = el(
      "button",
      {
        type: "button",
        "data-chat": c.id,
        "aria-current": c.id === client.openChat ? "true" : null,
        "aria-label": `${name}${c.unread ? `, ${c.unread} unread` : ""}`,
        onclick: () => openChat(c.id),
      },
      el("span", { class: "name" }, peer ? el("span", { class: `dot${online ? " online" : ""}` }) : null, name),
      el("span", { class: "when", text: time(c.preview?.ts || c.lastTs) }),
      el("span", { class: `preview${c.left ? " left" : ""}`, text: preview }),
      c.unread > 0
        ? el("span", { class: `badge${c.muted ? " muted" : ""}`, "data-unread": c.unread, text: String(c.unread) })
        : el("span"),
    );
    ul.append(el("li", {}, b));
  }
  $("no-chats").hidden = chats.length > 0;
  const t = $("unread-total");
  t.hidden = total === 0;
  t.textContent = String(total);
  document.title = total > 0 ? `(${total}) Chat` : "Chat";
}

// ---- one chat ---------------------------------------------------------------------

function openChat(id) {
  if (!client) return;
  document.body.classList.add("show-chat");
  $("members").hidden = true;
  $("members-btn").setAttribute("aria-expanded", "false");
  lastRendered = { chat: null, first: null };
  client.openChatNow(id);
  renderList();
  renderChat();
  $("text").focus();
}

$("back").addEventListener("click", () => {
  document.body.classList.remove("show-chat");
  if (client) client.openChat = null;
  renderList();
  renderChat();
  $("chat-list").querySelector("button")?.focus();
});

let chatQueued = false;
function renderChatSoon() {
  if (chatQueued) return;
  chatQueued = true;
  requestAnimationFrame(() => {
    chatQueued = false;
    renderChat();
  });
}

function renderHeader() {
  const c = client && client.openChat ? client.chats.get(client.openChat) : null;
  if (!c) return;
  $("chat-name").textContent = client.name(c);
  const others = client.others(c);
  let status = "";
  if (c.kind === "direct" && others[0]) {
    const p = presenceOf(others[0]);
    if (p?.status === "online") status = "online";
    else if (p?.last_seen) status = `last seen ${time(p.last_seen)}`;
  } else if (c.kind === "group") {
    const online = others.filter((u) => presenceOf(u)?.status === "online").length;
    status = `${others.length + 1} members${online ? `, ${online} online` : ""}`;
  }
  $("chat-status").textContent = status;
  const typists = client.typists(c);
  $("typing").textContent =
    typists.length === 0 ? "" : `${typists.join(", ")} ${typists.length === 1 ? "is" : "are"} typing…`;
}

function systemText(ev) {
  const b = ev.body || {};
  switch (ev.kind) {
    case "ChatCreated":
      return b.kind === "group"
        ? `${ev.sender} created the group${b.title ? ` “${b.title}”` : ""}`
        : `${ev.sender} started the chat`;
    case "MemberAdded":
      return `${ev.sender} added ${b.user_id}`;
    case "MemberRemoved":
      return b.reason === "left" ? `${b.user_id} left` : `${ev.sender} removed ${b.user_id}`;
    case "MemberRoleChanged":
      return `${b.user_id} is now ${b.role}`;
    default:
      return null;
  }
}

const MARK_TEXT = { sent: "✓", delivered: "✓✓", read: "✓✓ read" };

function messageItem(c, ev, edits) {
  const mine = ev.sender === client.user;
  const b = ev.body || {};
  const edit = edits.get(ev.seq);
  const text = edit?.deleted ? "This message was deleted." : (edit?.text ?? b.text ?? "[media]");
  const mark = mine ? client.mark(c, ev.seq) : null;
  return el(
    "li",
    { class: `msg${mine ? " mine" : ""}`, "data-seq": ev.seq, "data-state": "sequenced" },
    !mine && c.kind === "group" ? el("div", { class: "who", text: ev.sender }) : null,
    el("p", { class: "text", text }),
    el(
      "div",
      { class: "meta" },
      `${time(ev.ts)}${edit?.text ? " · edited" : ""} `,
      mine ? el("span", { class: "mark", "data-mark": mark, title: mark, text: MARK_TEXT[mark] }) : null,
    ),
  );
}

function outboxItem(e) {
  const state = e.state === "failed" ? "failed" : e.state === "sent" ? "acked" : "pending";
  const meta =
    state === "failed"
      ? `Not sent: ${e.error}`
      : state === "acked"
        ? "✓"
        : e.code
          ? `waiting… (${e.error})`
          : client.state === "online"
            ? "sending…"
            : "waiting for the connection…";
  return el(
    "li",
    { class: "msg mine", "data-state": state, "data-client-msg-id": e.client_msg_id, "data-code": e.code || null },
    el("p", { class: "text", text: e.text }),
    el("div", { class: "meta", text: meta }),
    state === "failed"
      ? el(
          "div",
          { class: "actions" },
          el("button", { type: "button", text: "Retry", onclick: () => client.retry(e.client_msg_id) }),
          el("button", { type: "button", text: "Delete", onclick: () => client.discard(e.client_msg_id) }),
        )
      : null,
  );
}

let lastRendered = { chat: null, first: null };

function renderChat() {
  const open = client?.openChat ? client.chats.get(client.openChat) : null;
  $("no-chat").hidden = !!open;
  $("chat").hidden = !open;
  if (!open) return;
  renderHeader();
  const c = open;
  const { events, outbox } = client.items(c.id);
  // Edits and deletions apply to their target message.
  const edits = new Map();
  for (const ev of events) {
    if (ev.kind === "MessageEdited") edits.set(ev.body.target_seq, { text: ev.body.text });
    if (ev.kind === "MessageDeleted") edits.set(ev.body.target_seq, { deleted: true });
  }
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const fromBottom = list.scrollHeight - list.scrollTop;
  const items = [];
  for (const ev of events) {
    if (ev.kind === "MessageSent") items.push(messageItem(c, ev, edits));
    else {
      const t = systemText(ev);
      if (t) items.push(el("li", { class: "system", "data-seq": ev.seq, text: t }));
    }
  }
  for (const e of outbox) items.push(outboxItem(e));
  list.replaceChildren(...items);
  const first = events[0]?.seq ?? null;
  if (lastRendered.chat !== c.id) {
    list.scrollTop = list.scrollHeight;
  } else if (first !== null && lastRendered.first !== null && first < lastRendered.first) {
    // Older messages were added on top: keep what the reader was looking at.
    list.scrollTop = list.scrollHeight - fromBottom;
  } else if (atBottom) {
    list.scrollTop = list.scrollHeight;
  }
  lastRendered = { chat: c.id, first };
  $("older").hidden = !c.loadingOlder && c.hasMore;
  $("older").textContent = c.loadingOlder ? "Loading older messages…" : "This is the start of the chat.";
  if (!c.loadingOlder && !c.hasMore && events.length === 0) $("older").hidden = true;
  $("left-note").hidden = !c.left;
  $("composer").hidden = c.left;
  $("members-btn").hidden = c.left;
  renderMembers(c);
  // A short chat cannot scroll: fetch older pages until it can or none are left.
  if (c.hasMore && c.historyLoaded && !c.loadingOlder && list.scrollHeight <= list.clientHeight) {
    client.loadOlder(c.id);
  }
}

function renderMembers(c) {
  const ul = $("member-list");
  ul.replaceChildren();
  const admin = c.role === "admin";
  for (const [u, role] of [...c.members].sort()) {
    const p = presenceOf(u);
    ul.append(
      el(
        "li",
        { "data-user": u },
        el(
          "span",
          {},
          el("span", { class: `dot${p?.status === "online" ? " online" : ""}` }),
          `${u}${u === client.user ? " (you)" : ""}${role === "admin" ? " · admin" : ""}`,
        ),
        admin && u !== client.user && c.kind === "group"
          ? el("button", {
              type: "button",
              text: "Remove",
              "aria-label": `Remove ${u}`,
              onclick: () => act(() => client.removeMember(c.id, u), `${u} removed.`),
            })
          : null,
      ),
    );
  }
  $("add-form").hidden = c.kind !== "group";
  $("mute").hidden = !client.features.mute;
  $("mute").textContent = c.muted ? "Unmute" : "Mute";
  $("mute").setAttribute("aria-pressed", String(!!c.muted));
}

async function act(fn, ok) {
  try {
    await fn();
    if (ok) showNotice(ok, "info");
  } catch (e) {
    showNotice(e.message || String(e));
  }
}

$("messages").addEventListener("scroll", () => {
  const list = $("messages");
  if (client?.openChat && list.scrollTop < 80) client.loadOlder(client.openChat);
});

$("members-btn").addEventListener("click", () => {
  const m = $("members");
  m.hidden = !m.hidden;
  $("members-btn").setAttribute("aria-expanded", String(!m.hidden));
  if (!m.hidden) (m.querySelector("button, input") || m).focus();
});

$("add-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const user = $("add-user").value.trim();
  if (!user || !client?.openChat) return;
  act(async () => {
    await client.addMember(client.openChat, user);
    $("add-user").value = "";
  }, `${user} added.`);
});

$("mute").addEventListener("click", () => {
  if (!client?.openChat) return;
  const c = client.chats.get(client.openChat);
  act(() => client.mute(c.id, !c.muted), null);
});

$("leave").addEventListener("click", () => {
  if (!client?.openChat) return;
  const id = client.openChat;
  act(() => client.leave(id), "You left the chat.");
});

// ---- composer ------------------------------------------------------------------------

function sendNow() {
  const t = $("text");
  const text = t.value.trim();
  if (!text || !client?.openChat) return;
  client.send(client.openChat, text);
  t.value = "";
  t.focus();
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sendNow();
});

$("text").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    sendNow();
  }
});

let typingIdle = null;
$("text").addEventListener("input", () => {
  if (!client?.openChat) return;
  const id = client.openChat;
  if ($("text").value.trim() === "") {
    client.typing(id, false);
    return;
  }
  client.typing(id, true);
  clearTimeout(typingIdle);
  typingIdle = setTimeout(() => client?.typing(id, false), 4000);
});

// ---- new chat dialog -------------------------------------------------------------------

$("new-chat").addEventListener("click", () => {
  $("new-msg").textContent = "";
  $("new-dialog").showModal();
  $("new-members").focus();
});
$("new-cancel").addEventListener("click", () => $("new-dialog").close());

$("new-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!client) return;
  const kind = new FormData(ev.target).get("kind") || $("new-form").querySelector("input[name=kind]:checked").value;
  const members = $("new-members")
    .value.split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  const title = $("new-group-title").value.trim();
  if (kind === "direct" && members.length !== 1) {
    $("new-msg").textContent = "A one-to-one chat is with exactly one other user.";
    return;
  }
  $("new-msg").textContent = "Creating…";
  try {
    const id = await client.createChat(kind, members, title || null);
    $("new-dialog").close();
    $("new-members").value = "";
    $("new-group-title").value = "";
    openChat(id);
  } catch (e) {
    // A direct chat that exists already: open it.
    const existing = e.frame?.chat && client.chats.get(e.frame.chat);
    if (existing) {
      $("new-dialog").close();
      openChat(existing.id);
      return;
    }
    $("new-msg").textContent = e.message;
  }
});

// ---- settings dialog: devices, presence ------------------------------------------------

/** How often the device list is asked again while the dialog is open (it is a projection: new devices and revocations show up a moment later). */
const DEVICES_EVERY_MS = 2_000;
let devicesTimer = null;
/** The list as last rendered, to re-render (and move focus) only on a change. */
let devicesShown = "";
/** Whether #devices-msg says something the next good load ends ("Loading…", a load error). */
let devicesMsgTransient = false;
/** Devices revoked from this page: shown as revoked until the list says so. */
const revokedHere = new Set();

function closeDialogs() {
  for (const d of document.querySelectorAll("dialog")) if (d.open) d.close();
}

function deviceItem(d) {
  const revoked = d.revoked_at != null || revokedHere.has(d.device);
  const status = [];
  if (revoked) status.push(d.revoked_at ? `revoked ${time(d.revoked_at)}` : "revoked");
  else status.push(d.online ? "online" : "offline");
  if (d.last_seen) status.push(`last seen ${time(d.last_seen)}`);
  return el(
    "li",
    {
      "data-device": d.device,
      "data-online": String(!!d.online && !revoked),
      "data-current": String(!!d.current),
      "data-revoked": String(revoked),
    },
    el("span", { class: `dot${d.online && !revoked ? " online" : ""}` }),
    el(
      "div",
      { class: "dev" },
      el(
        "div",
        {},
        el("span", { class: "dev-name", text: d.device }),
        d.current ? el("span", { class: "tag", text: "this device" }) : null,
        revoked ? el("span", { class: "tag revoked", text: "revoked" }) : null,
      ),
      el("div", { class: "sub", text: status.join(" · ") }),
    ),
    !d.current && !revoked
      ? el("button", {
          type: "button",
          class: "danger",
          text: "Revoke",
          "aria-label": `Revoke ${d.device}`,
          onclick: (ev) => revoke(d.device, ev.currentTarget),
        })
      : null,
  );
}

function renderDevices(list) {
  const order = (d) => (d.current ? 0 : d.revoked_at != null || revokedHere.has(d.device) ? 2 : 1);
  const sorted = [...list].sort((a, b) => order(a) - order(b) || (b.last_seen || 0) - (a.last_seen || 0));
  const key = JSON.stringify([sorted, [...revokedHere]]);
  if (key === devicesShown) return;
  devicesShown = key;
  const ul = $("device-list");
  // Keep the keyboard where it was: on the same device's button, else on Refresh.
  const focused = ul.contains(document.activeElement) ? document.activeElement.closest("li")?.dataset.device : null;
  ul.replaceChildren(...sorted.map(deviceItem));
  if (focused != null) {
    const same = [...ul.querySelectorAll("li")].find((li) => li.dataset.device === focused);
    (same?.querySelector("button") || $("devices-refresh")).focus();
  }
  if (list.length === 0) setDevicesMsg("No devices listed yet.", true);
}

function setDevicesMsg(text, transient = false) {
  $("devices-msg").textContent = text;
  devicesMsgTransient = transient;
}

async function loadDevices() {
  clearTimeout(devicesTimer);
  const c = client;
  if (!c || !$("settings-dialog").open) return;
  try {
    const list = await c.devices();
    if (c !== client) return;
    if (list === null) {
      setDevicesMsg("This gateway cannot list devices.", true);
      return;
    }
    if (devicesMsgTransient) setDevicesMsg("");
    renderDevices(list);
  } catch (e) {
    if (c === client) setDevicesMsg(`Could not load your devices: ${e.message}`, true);
  } finally {
    clearTimeout(devicesTimer);
    if (c === client && $("settings-dialog").open) devicesTimer = setTimeout(loadDevices, DEVICES_EVERY_MS);
  }
}

async function revoke(device, button) {
  const c = client;
  if (!c) return;
  button.disabled = true;
  setDevicesMsg(`Revoking ${device}…`);
  try {
    const ok = await c.revokeDevice(device);
    if (c !== client) return;
    if (ok === null) {
      setDevicesMsg("This gateway cannot revoke devices.", true);
      button.disabled = false;
      return;
    }
    revokedHere.add(device);
    setDevicesMsg(`${device} was revoked: it is signed out and must sign in again.`);
    await loadDevices();
  } catch (e) {
    if (c !== client) return;
    setDevicesMsg(`Could not revoke ${device}: ${e.message}`, true);
    button.disabled = false;
  }
}

$("settings-btn").addEventListener("click", () => {
  if (!client) return;
  devicesShown = "";
  $("device-list").replaceChildren();
  setDevicesMsg("Loading your devices…", true);
  $("presence-hidden").checked = loadPresenceHidden(client.user);
  $("presence-hidden").disabled = false;
  $("presence-msg").textContent = "";
  $("settings-dialog").showModal();
  $("devices-refresh").focus();
  loadDevices();
});
$("settings-close").addEventListener("click", () => $("settings-dialog").close());
$("devices-refresh").addEventListener("click", () => loadDevices());
$("settings-dialog").addEventListener("close", () => {
  clearTimeout(devicesTimer);
  if (!$("settings-btn").hidden) $("settings-btn").focus();
});

$("presence-hidden").addEventListener("change", async () => {
  const c = client;
  const box = $("presence-hidden");
  if (!c) return;
  const hidden = box.checked;
  box.disabled = true;
  $("presence-msg").textContent = "Saving…";
  try {
    const ok = await c.setPresenceHidden(hidden);
    if (c !== client) return;
    if (ok === null) {
      box.checked = !hidden;
      $("presence-msg").textContent = "This gateway cannot hide presence.";
      return;
    }
    savePresenceHidden(c.user, hidden);
    $("presence-msg").textContent = hidden
      ? "Your presence is hidden: everyone sees you as offline."
      : "Your presence is shown to the people you chat with.";
  } catch (e) {
    if (c !== client) return;
    box.checked = !hidden;
    $("presence-msg").textContent = `Not saved: ${e.message}`;
  } finally {
    box.disabled = false;
    if ($("settings-dialog").open) box.focus();
  }
});

// ---- boot ---------------------------------------------------------------------------------

const saved = loadSession();
const exp = saved ? jwtClaims(saved.token).exp : null;
if (saved && saved.user && typeof exp === "number" && exp * 1000 > Date.now()) {
  start(saved);
} else if (saved) {
  clearSession();
  $("login-user").value = saved.user || "";
  showLogin("Your session expired. Sign in again.");
} else {
  showLogin();
}
