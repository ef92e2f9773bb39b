// The protocol client and the app's model (PROTOCOL.md, v1).
//
// Owns: the WebSocket to the gateway (connect, heartbeat, reconnect with
// backoff, offline detection, diagnosing why a connection failed), `sync`
// on every (re)connect with the checkpoint and per-chat last seq, the
// model of chats and events (deduplicated by (chat, seq)), the outbox
// (optimistic sends retried with the same client_msg_id until acked), and
// the issue-5 frames (watch/presence, typing, read/delivered receipts,
// unread counts, devices, revoking a device, hiding presence). A feature the gateway does not know (`unknown_type`) is
// switched off for the connection's life, so older gateways still work.
//
// Does not own: the DOM (app.js) or storage details (store.js). The UI
// listens to the events this class dispatches: "state", "chats", "chat"
// (detail: chat id), "presence", "notice" (detail: {level, text}), "auth".

import { loadOutbox, loadState, randomHex, saveOutbox, saveState } from "./store.js";

/** What each error code means to a person (PROTOCOL.md, Error codes). */
export function explain(code, limits, message) {
  switch (code) {
    case "rate_limited":
      return "Sending too fast: the server asked to slow down. Retrying in a moment.";
    case "not_member":
      return "You are not a member of this chat (any more).";
    case "too_large":
      return `Too long: a message has at most ${limits?.max_text_bytes ?? 4096} bytes.`;
    case "unknown_chat":
      return "This chat does not exist.";
    case "forbidden":
      return "Not allowed: only a group's admins may do that.";
    case "group_full":
      return "The group is full.";
    case "unavailable":
      return "The server is busy or a part of it is down. Retrying.";
    case "invalid":
      return `Refused as invalid${message ? `: ${message}` : "."}`;
    case "seq_out_of_range":
      return "That message does not exist in this chat.";
    case "internal":
      return "The server failed (a bug). Try again later.";
    case "timeout":
      return "No answer from the server in time. Retrying.";
    case "disconnected":
      return "The connection dropped before the server answered. Retrying after reconnect.";
    default:
      return message || code;
  }
}

/** Codes after which resending the same message can succeed. */
const TRANSIENT = new Set(["rate_limited", "unavailable", "timeout", "disconnected", "internal"]);
/** Frames an older gateway may not know (issue 5). */
const OPTIONAL = [
  "watch",
  "typing",
  "read",
  "delivered",
  "receipts",
  "mute",
  "devices",
  "revoke_device",
  "presence_settings",
];
/** What a device that was revoked is told (close 4003, or 401 device_revoked). */
export const REVOKED_TEXT = "This device was revoked from another of your devices. Sign in again to use it here.";

const PING_EVERY_MS = 10_000;
const PONG_WITHIN_MS = 8_000;
const TYPING_EVERY_MS = 3_000; // hello.limits.typing_interval_ms when given
const TYPING_SHOWN_MS = 6_000;

class RequestError extends Error {
  constructor(code, message, frame) {
    super(message || code);
    this.code = code;
    this.frame = frame;
  }
}

/** The decoded claims of a JWT (no verification: only to read `exp`). */
export function jwtClaims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "===".slice((part.length + 3) % 4)));
  } catch {
    return {};
  }
}

function newChat(id) {
  return {
    id,
    kind: null,
    title: null,
    role: null,
    left: false,
    muted: false,
    lastSeq: 0,
    readSeq: 0,
    unread: 0,
    preview: null,
    lastTs: 0,
    members: new Map(), // user -> role
    events: new Map(), // seq -> event
    historyLoaded: false,
    hasMore: true,
    loadingOlder: false,
    receipts: new Map(), // user -> {read, delivered}
    typing: new Map(), // user -> expires (local ms)
    deliveredSent: 0,
    readSent: 0,
  };
}

export class ChatClient extends EventTarget {
  constructor({ user, device, token, base }) {
    super();
    this.user = user;
    this.device = device;
    this.token = token;
    this.base = base; // e.g. "http://127.0.0.1:8080"
    this.state = "connecting"; // connecting | syncing | online | offline | reconnecting | expired | stopped
    this.stateDetail = "";
    this.limits = {};
    this.features = Object.fromEntries(OPTIONAL.map((f) => [f, true]));
    this.chats = new Map();
    this.presence = new Map(); // user -> {status, last_seen}
    this.openChat = null;
    this.ws = null;
    this.nextId = 1;
    this.pending = new Map(); // id -> {resolve, reject, timer}
    this.attempt = 0;
    this.timers = {};
    this.stopped = false;
    this.lastTyping = 0;
    const saved = loadState(user, device);
    this.checkpoint = saved.checkpoint ?? null;
    for (const [id, s] of Object.entries(saved.chats || {})) {
      const c = newChat(id);
      Object.assign(c, {
        kind: s.kind ?? null,
        title: s.title ?? null,
        role: s.role ?? null,
        left: !!s.left,
        lastSeq: s.lastSeq || 0,
        readSeq: s.readSeq || 0,
        unread: s.unread || 0,
        preview: s.preview || null,
        lastTs: s.lastTs || 0,
        members: new Map(s.members || []),
        muted: !!s.muted,
      });
      this.chats.set(id, c);
    }
    this.outbox = loadOutbox(user, device).map((e) => ({ ...e, inflight: false }));
    this.onOnline = () => this.connectSoon(0);
    this.onOffline = () => this.dropForOffline();
    this.onVisible = () => {
      if (document.visibilityState === "visible" && this.openChat) this.markRead(this.openChat);
    };
    addEventListener("online", this.onOnline);
    addEventListener("offline", this.onOffline);
    document.addEventListener("visibilitychange", this.onVisible);
  }

  // ---- events to the UI -------------------------------------------------

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  notice(level, text) {
    this.emit("notice", { level, text });
  }

  setState(state, detail = "") {
    if (this.state === state && this.stateDetail === detail) return;
    this.state = state;
    this.stateDetail = detail;
    this.emit("state", { state, detail });
  }

  // ---- persistence ------------------------------------------------------

  persistSoon() {
    clearTimeout(this.timers.persist);
    this.timers.persist = setTimeout(() => this.persist(), 300);
  }

  persist() {
    const chats = {};
    for (const c of this.chats.values()) {
      chats[c.id] = {
        kind: c.kind,
        title: c.title,
        role: c.role,
        left: c.left,
        lastSeq: c.lastSeq,
        readSeq: c.readSeq,
        unread: c.unread,
        preview: c.preview,
        lastTs: c.lastTs,
        members: [...c.members],
        muted: c.muted,
      };
    }
    saveState(this.user, this.device, { checkpoint: this.checkpoint, chats });
    this.persistOutbox();
  }

  persistOutbox() {
    const keep = this.outbox
      .filter((e) => e.state === "pending" || e.state === "failed")
      .map(({ chat, client_msg_id, text, created, state, error, code }) => ({
        chat,
        client_msg_id,
        text,
        created,
        state,
        error,
        code,
      }));
    saveOutbox(this.user, this.device, keep);
  }

  // ---- connection -------------------------------------------------------

  start() {
    if (!navigator.onLine) {
      this.setState("offline", "This device is offline. Waiting for the network.");
      return;
    }
    this.connect();
  }

  stop() {
    this.stopped = true;
    this.persist();
    removeEventListener("online", this.onOnline);
    removeEventListener("offline", this.onOffline);
    document.removeEventListener("visibilitychange", this.onVisible);
    for (const t of Object.values(this.timers)) {
      clearTimeout(t);
      clearInterval(t);
    }
    this.closeSocket(1000, "bye");
    this.setState("stopped");
  }

  wsUrl() {
    const u = new URL("/ws", this.base);
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    u.searchParams.set("token", this.token);
    u.searchParams.set("device", this.device);
    return u.toString();
  }

  tokenExpired() {
    const exp = jwtClaims(this.token).exp;
    return typeof exp === "number" && exp * 1000 <= Date.now();
  }

  connect() {
    if (this.stopped || this.ws) return;
    clearTimeout(this.timers.reconnect);
    if (this.tokenExpired()) {
      this.expire("Your session expired. Sign in again.");
      return;
    }
    if (this.state !== "connecting" && this.state !== "reconnecting") {
      this.setState(this.everOnline ? "reconnecting" : "connecting", "Connecting…");
    }
    let ws;
    try {
      ws = new WebSocket(this.wsUrl());
    } catch (e) {
      this.scheduleReconnect(`Cannot open a connection: ${e.message}`);
      return;
    }
    this.ws = ws;
    this.gotHello = false;
    ws.onmessage = (m) => this.onMessage(m.data);
    ws.onclose = (ev) => this.onClose(ws, ev);
    ws.onerror = () => {
      // onclose follows with the details.
    };
  }

  closeSocket(code, reason) {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.onmessage = null;
    ws.onclose = null;
    ws.onerror = null;
    try {
      ws.close(code, reason);
    } catch {
      // already closing
    }
    this.afterDisconnect();
  }

  /** Common cleanup after the socket is gone, however it went. */
  afterDisconnect() {
    clearInterval(this.timers.ping);
    clearTimeout(this.timers.pong);
    this.synced = false;
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new RequestError("disconnected", "connection lost"));
    }
    this.pending.clear();
    for (const e of this.outbox) e.inflight = false;
    for (const c of this.chats.values()) c.typing.clear();
    this.emit("chats");
    if (this.openChat) this.emit("chat", this.openChat);
  }

  dropForOffline() {
    this.closeSocket(1000, "offline");
    clearTimeout(this.timers.reconnect);
    this.setState("offline", "This device is offline. Messages you write are kept and sent when it is back.");
  }

  expire(text) {
    this.closeSocket(1000, "expired");
    this.setState("expired", text);
    this.emit("auth", { text });
  }

  async onClose(ws, ev) {
    if (ws !== this.ws) return;
    this.ws = null;
    const hadHello = this.gotHello;
    this.afterDisconnect();
    if (this.stopped) return;
    if (!navigator.onLine) {
      this.dropForOffline();
      return;
    }
    switch (ev.code) {
      case 4001:
        this.expire("Your session expired while connected. Sign in again.");
        return;
      case 4003:
        this.expire(REVOKED_TEXT);
        return;
      case 1001:
        this.attempt = 0;
        this.connectSoon(100, "The server is restarting. Reconnecting…");
        return;
      case 4008:
        this.connectSoon(200, "The connection fell behind. Reconnecting; nothing is lost…");
        return;
      case 4009:
      case 1002:
      case 1007:
        this.notice("error", `The server closed the connection (${ev.code}): ${ev.reason || "protocol error"}.`);
        break;
      default:
        break;
    }
    if (!hadHello) {
      // The upgrade was refused or the gateway is down: find out which.
      const why = await this.diagnose();
      if (this.stopped || this.ws) return;
      if (why.auth) {
        this.expire(why.text);
        return;
      }
      if (why.fatal) {
        this.setState("offline", why.text);
        return;
      }
      this.scheduleReconnect(why.text);
      return;
    }
    this.scheduleReconnect(
      ev.code === 1013
        ? "The server cannot reach its log right now."
        : `Connection dropped${ev.code && ev.code !== 1006 ? ` (${ev.code})` : ""}.`,
    );
  }

  /** Why a connection could not be opened: asks the gateway over plain HTTP. */
  async diagnose() {
    if (this.tokenExpired()) return { auth: true, text: "Your session expired. Sign in again." };
    let resp;
    try {
      // Without the upgrade headers the gateway checks everything else and
      // answers 426 when the token and device are fine.
      const u = new URL(this.wsUrl());
      u.protocol = u.protocol === "wss:" ? "https:" : "http:";
      resp = await fetch(u, { cache: "no-store" });
    } catch {
      return { text: "Cannot reach the gateway: it is down or the network is." };
    }
    let body = {};
    try {
      body = await resp.json();
    } catch {
      // not JSON
    }
    switch (body.error) {
      case "token_expired":
        return { auth: true, text: "Your session expired. Sign in again." };
      case "device_revoked":
        return { auth: true, text: REVOKED_TEXT };
      case "invalid_token":
      case "missing_token":
        return { auth: true, text: `The server refused the sign-in (${body.message || body.error}). Sign in again.` };
      case "origin_not_allowed":
        return {
          fatal: true,
          text: `This page's origin (${location.origin}) is not in the gateway's allowed_origins.`,
        };
      case "invalid_device":
        return { auth: true, text: `The device id was refused: ${body.message}` };
      case "draining":
        return { text: "The gateway is restarting." };
      case "capacity":
        return { text: "The gateway is full." };
      default:
        return { text: `The gateway answered ${resp.status}.` };
    }
  }

  scheduleReconnect(text) {
    if (this.stopped) return;
    this.attempt += 1;
    const base = Math.min(10_000, 500 * 2 ** Math.min(this.attempt - 1, 5));
    const delay = Math.round(base * (0.75 + Math.random() * 0.5));
    this.connectSoon(delay, `${text} Retrying in ${Math.ceil(delay / 1000)} s…`);
  }

  connectSoon(delay, text = "Reconnecting…") {
    if (this.stopped || this.ws) return;
    clearTimeout(this.timers.reconnect);
    if (!navigator.onLine) {
      this.dropForOffline();
      return;
    }
    this.setState(this.everOnline ? "reconnecting" : "connecting", text);
    this.timers.reconnect = setTimeout(() => this.connect(), delay);
  }

  /** Closes a socket that stopped answering, then reconnects. */
  heartbeatFailed() {
    const ws = this.ws;
    if (!ws) return;
    this.closeSocket(4000, "no pong");
    this.scheduleReconnect("The server stopped answering.");
  }

  startHeartbeat() {
    clearInterval(this.timers.ping);
    this.timers.ping = setInterval(() => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      this.raw({ type: "ping", id: `p${this.nextId++}` });
      clearTimeout(this.timers.pong);
      this.timers.pong = setTimeout(() => this.heartbeatFailed(), PONG_WITHIN_MS);
    }, Math.min(this.limits.heartbeat_interval_ms || PING_EVERY_MS, PING_EVERY_MS));
  }

  raw(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Sends a frame with a fresh id; resolves with the answer, rejects with a RequestError. */
  request(frame, timeoutMs) {
    return new Promise((resolve, reject) => {
      const id = `c${this.nextId++}`;
      if (!this.raw({ ...frame, id })) {
        reject(new RequestError("disconnected", "not connected"));
        return;
      }
      const wait = timeoutMs ?? (this.limits.ack_timeout_ms || 10_000) + 5_000;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new RequestError("timeout", "no answer"));
      }, wait);
      this.pending.set(id, {
        resolve: (f) => {
          clearTimeout(timer);
          if (f.type === "error") reject(new RequestError(f.code, f.message, f));
          else resolve(f);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
        timer,
      });
    });
  }

  /**
   * Sends an optional frame that has no answer on success (typing): an
   * `error` echoing its id switches the feature off when the gateway does
   * not know the frame, and is otherwise ignored.
   */
  fire(feature, frame) {
    if (!this.features[feature]) return;
    this.raw({ ...frame, id: `f.${feature}.${this.nextId++}` });
  }

  /** A request for an optional (issue-5) frame: null when the gateway does not know it. */
  async optional(feature, frame) {
    if (!this.features[feature]) return null;
    try {
      return await this.request(frame);
    } catch (e) {
      if (e.code === "unknown_type") {
        this.features[feature] = false;
        return null;
      }
      throw e;
    }
  }

  // ---- incoming frames --------------------------------------------------

  onMessage(data) {
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    clearTimeout(this.timers.pong);
    if (f.id != null && this.pending.has(f.id) && f.type !== "event") {
      const p = this.pending.get(f.id);
      this.pending.delete(f.id);
      // `presence` answers `watch` and is also an update: apply it too.
      if (f.type === "presence") this.onPresence(f);
      p.resolve(f);
      return;
    }
    switch (f.type) {
      case "hello":
        this.onHello(f);
        break;
      case "event":
        this.applyEvent(f, true);
        break;
      case "synced":
        this.onSynced(f);
        break;
      case "presence":
        this.onPresence(f);
        break;
      case "typing":
        this.onTyping(f);
        break;
      case "receipt":
        this.onReceipt(f);
        break;
      case "chats":
        this.onChats(f);
        break;
      case "muted": {
        const c = this.chats.get(f.chat);
        if (c) {
          c.muted = !!f.muted;
          this.emit("chats");
          this.emit("chat", c.id);
          this.persistSoon();
        }
        break;
      }
      case "reconnect":
        this.closeSocket(1000, "reconnect");
        this.attempt = 0;
        this.connectSoon(100, "The server is restarting. Reconnecting…");
        break;
      case "error":
        if (typeof f.id === "string" && f.id.startsWith("f.")) {
          // An answer to fire(): only "unknown frame" matters.
          if (f.code === "unknown_type") this.features[f.id.split(".")[1]] = false;
          break;
        }
        if (f.id === this.syncId && f.code === "unavailable") {
          // Nothing was skipped; the platform asks for the sync again.
          const ws = this.ws;
          setTimeout(() => { if (this.ws === ws && !this.synced) this.sendSync(); }, 500);
          break;
        }
        if (f.code !== "stale_receipt") this.notice("error", explain(f.code, this.limits, f.message));
        break;
      default:
        // New frame types are ignored (PROTOCOL.md: unknown is fine).
        break;
    }
  }

  onHello(f) {
    this.gotHello = true;
    this.limits = f.limits || {};
    this.features = Object.fromEntries(OPTIONAL.map((k) => [k, true]));
    if (this.limits.max_watched_chats === undefined) this.features.watch = false;
    this.setState("syncing", "Catching up…");
    this.startHeartbeat();
    this.sendSync();
  }

  /** Sends `sync` (in several frames when the chats do not fit in one). */
  sendSync() {
    const known = [...this.chats.values()].filter((c) => c.lastSeq > 0);
    // A frame holds at most limits.sync_chats_per_frame entries; the rest
    // follow in further sync frames marked `more` (PROTOCOL.md, Sync).
    const per = this.limits.sync_chats_per_frame || 1000;
    this.syncId = `s${this.nextId++}`;
    for (let i = 0; i === 0 || i < known.length; i += per) {
      const chats = Object.fromEntries(known.slice(i, i + per).map((c) => [c.id, c.lastSeq]));
      const more = i + per < known.length;
      this.raw(more
        ? { type: "sync", since: this.checkpoint, chats, more: true }
        : { type: "sync", id: this.syncId, since: this.checkpoint, chats });
    }
  }

  async onSynced(f) {
    if (f.id !== this.syncId) return;
    this.checkpoint = f.checkpoint;
    for (const id of f.truncated || []) {
      // Older events were skipped: page them back in when the chat is opened.
      const c = this.chats.get(id);
      if (c) {
        const newest = Math.max(...c.events.keys());
        for (const s of [...c.events.keys()]) if (s < newest - 200) c.events.delete(s);
        c.historyLoaded = false;
        c.hasMore = true;
      }
    }
    this.synced = true;
    this.attempt = 0;
    this.everOnline = true;
    this.setState("online");
    this.persistSoon();
    this.flushOutbox();
    try {
      const list = await this.request({ type: "chats" });
      this.onChats(list);
    } catch {
      // The next reconnect asks again.
    }
    this.resolvePeers();
    this.watch();
    if (this.openChat) this.openChatNow(this.openChat);
    this.sendDeliveredSoon();
  }

  onChats(f) {
    for (const e of f.chats || []) {
      const c = this.chat(e.chat);
      c.kind = e.kind ?? c.kind;
      c.title = e.title ?? c.title;
      c.role = e.role ?? c.role;
      c.left = e.left_seq != null;
      c.muted = !!e.muted;
      c.lastSeq = Math.max(c.lastSeq, e.last_seq || 0);
      c.readSeq = Math.max(c.readSeq, e.last_read_seq || 0);
      c.unread = typeof e.unread === "number" ? e.unread : this.countUnread(c);
      if (this.isReading(c.id)) c.unread = 0;
    }
    this.emit("chats");
    this.persistSoon();
  }

  /** Unread messages of others known locally (used when the server does not count). */
  countUnread(c) {
    let n = 0;
    for (const [seq, ev] of c.events) {
      if (seq > c.readSeq && ev.kind === "MessageSent" && ev.sender !== this.user) n += 1;
    }
    return n;
  }

  chat(id) {
    let c = this.chats.get(id);
    if (!c) {
      c = newChat(id);
      this.chats.set(id, c);
    }
    return c;
  }

  isReading(id) {
    return this.openChat === id && document.visibilityState === "visible";
  }

  /** Applies one event (live, from sync or from history). Returns false for a repeat. */
  applyEvent(ev, live) {
    const c = this.chat(ev.chat);
    if (c.events.has(ev.seq)) return false;
    const newest = ev.seq > c.lastSeq;
    // Seqs are gap-free: a live event beyond last + 1 means we miss some.
    // The gateway never skips one, but a client checks what it is told.
    const gapAfter = live && c.lastSeq > 0 && ev.seq > c.lastSeq + 1 ? c.lastSeq : null;
    // A repeat of what we already had before a reload (seq at or below the
    // persisted last seq, not loaded): still worth keeping for display.
    c.events.set(ev.seq, ev);
    const b = ev.body || {};
    switch (ev.kind) {
      case "ChatCreated":
        c.kind = b.kind ?? c.kind;
        c.title = b.title ?? c.title;
        for (const m of b.members || []) c.members.set(m.user_id, m.role);
        if (ev.sender) c.members.set(ev.sender, c.members.get(ev.sender) || "admin");
        if (c.members.has(this.user)) c.role = c.members.get(this.user);
        break;
      case "MemberAdded":
        c.members.set(b.user_id, b.role);
        if (b.user_id === this.user && newest) c.left = false;
        break;
      case "MemberRemoved":
        c.members.delete(b.user_id);
        if (b.user_id === this.user && newest) c.left = true;
        break;
      case "MemberRoleChanged":
        c.members.set(b.user_id, b.role);
        if (b.user_id === this.user) c.role = b.role;
        break;
      default:
        break;
    }
    if (newest) {
      c.lastSeq = ev.seq;
      if (ev.ts) c.lastTs = Math.max(c.lastTs, ev.ts);
    }
    if (gapAfter !== null) this.fillGap(c.id, gapAfter, ev.seq);
    if (ev.kind === "MessageSent" && (!c.preview || ev.seq >= c.preview.seq)) {
      c.preview = { seq: ev.seq, sender: ev.sender, text: b.text || "[media]", ts: ev.ts };
    }
    if (ev.sender === this.user && ev.seq > c.readSeq && ev.kind === "MessageSent") {
      // Own sends count as read.
      c.readSeq = ev.seq;
    }
    // Reconcile the outbox: this is one of ours.
    if (ev.sender === this.user && ev.client_msg_id) {
      const i = this.outbox.findIndex((e) => e.client_msg_id === ev.client_msg_id && e.chat === ev.chat);
      if (i >= 0) {
        this.outbox.splice(i, 1);
        this.persistOutbox();
      }
    }
    if (ev.kind === "MessageSent") c.typing.delete(ev.sender);
    if (live && ev.kind === "MessageSent" && ev.sender !== this.user && ev.seq > c.readSeq) {
      if (this.isReading(c.id)) this.markReadSoon(c.id);
      else if (this.synced || newest) c.unread += 1;
      this.sendDeliveredSoon();
    }
    if (live && newest && (ev.kind === "MemberAdded" || ev.kind === "MemberRemoved")) {
      // Presence follows the members at the time of the watch: watch again.
      this.watched = null;
      clearTimeout(this.timers.rewatch);
      this.timers.rewatch = setTimeout(() => this.watch(), 300);
    }
    if (live) {
      this.persistSoon();
      this.emit("chats");
      this.emit("chat", c.id);
    }
    return true;
  }

  onPresence(f) {
    for (const u of f.users || []) {
      this.presence.set(u.user, { status: u.status, last_seen: u.last_seen ?? null });
    }
    this.emit("presence");
  }

  onTyping(f) {
    if (f.user === this.user) return;
    const c = this.chats.get(f.chat);
    if (!c) return;
    if (f.active) {
      // expires_at is server time; bound it by a local maximum against clock skew.
      const left = f.expires_at ? Math.min(f.expires_at - Date.now(), TYPING_SHOWN_MS) : TYPING_SHOWN_MS;
      c.typing.set(f.user, Date.now() + Math.max(1000, left));
      setTimeout(() => this.emit("chat", c.id), Math.max(1000, left) + 50);
    } else {
      c.typing.delete(f.user);
    }
    this.emit("chat", c.id);
  }

  onReceipt(f) {
    const c = this.chats.get(f.chat);
    if (!c) return;
    const r = c.receipts.get(f.user) || { read: 0, delivered: 0 };
    if (f.kind === "read") {
      r.read = Math.max(r.read, f.up_to_seq);
      r.delivered = Math.max(r.delivered, f.up_to_seq);
    } else {
      r.delivered = Math.max(r.delivered, f.up_to_seq);
    }
    c.receipts.set(f.user, r);
    if (f.user === this.user && f.kind === "read" && f.up_to_seq > c.readSeq) {
      // Read on another device of mine.
      c.readSeq = f.up_to_seq;
      c.unread = c.readSeq >= c.lastSeq ? 0 : Math.min(c.unread, this.countUnread(c));
      this.emit("chats");
      this.persistSoon();
    }
    this.emit("chat", c.id);
  }

  // ---- opening chats, history -------------------------------------------

  async openChatNow(id) {
    this.openChat = id;
    const c = this.chats.get(id);
    if (!c) return;
    this.markRead(id);
    this.emit("chat", id);
    this.watch();
    if (!this.synced) return;
    if (!c.historyLoaded && c.events.has(1) && c.events.size >= c.lastSeq) {
      // Everything from the first event is here (e.g. a chat just created).
      c.historyLoaded = true;
      c.hasMore = false;
    }
    if (!c.historyLoaded) await this.loadNewest(c);
    this.loadReceipts(id);
  }

  /** The newest page of a chat. A chat created a moment ago may not be readable yet: retried. */
  async loadNewest(c, attempt = 0) {
    try {
      const h = await this.request({ type: "history", chat: c.id, limit: 50 });
      for (const ev of h.events || []) this.applyEvent({ ...ev, chat: c.id }, false);
      c.historyLoaded = true;
      c.hasMore = !!h.has_more;
      this.persistSoon();
      this.emit("chats");
      this.emit("chat", c.id);
      this.markRead(c.id);
    } catch (e) {
      if (e.code === "unknown_chat" && attempt < 10 && this.synced) {
        await new Promise((r) => setTimeout(r, 500 + attempt * 250));
        if (!c.historyLoaded) return this.loadNewest(c, attempt + 1);
        return undefined;
      }
      if (e.code !== "disconnected") {
        this.notice("error", `Could not load the chat: ${explain(e.code, this.limits, e.message)}`);
      }
    }
    return undefined;
  }

  /** Asks history for the events strictly between `after` and `before`. */
  async fillGap(id, after, before) {
    const limit = this.limits.max_history_limit || 100;
    try {
      while (after + 1 < before) {
        const h = await this.request({ type: "history", chat: id, after, before, limit });
        const events = h.events || [];
        for (const ev of events) this.applyEvent({ ...ev, chat: id }, false);
        if (events.length === 0) break;
        after = events[events.length - 1].seq;
      }
      this.persistSoon();
      this.emit("chat", id);
    } catch (e) {
      if (e.code !== "disconnected") {
        this.notice("error", `Could not load missing messages: ${explain(e.code, this.limits, e.message)}`);
      }
    }
  }

  async loadReceipts(id) {
    try {
      const r = await this.optional("receipts", { type: "receipts", chat: id });
      if (!r) return;
      const c = this.chat(id);
      for (const m of r.members || []) {
        c.receipts.set(m.user, { read: m.read_seq || 0, delivered: Math.max(m.delivered_seq || 0, m.read_seq || 0) });
      }
      this.emit("chat", id);
      this.emit("chats");
    } catch {
      // marks stay as they are
    }
  }

  /** Pages back through a chat's history. Returns false when there is no more. */
  async loadOlder(id) {
    const c = this.chats.get(id);
    if (!c || !c.hasMore || c.loadingOlder || !this.synced) return false;
    const seqs = [...c.events.keys()];
    if (seqs.length === 0) return false;
    const before = Math.min(...seqs);
    if (before <= 1) {
      c.hasMore = false;
      return false;
    }
    c.loadingOlder = true;
    this.emit("chat", id);
    try {
      const h = await this.request({ type: "history", chat: id, before, limit: 50 });
      for (const ev of h.events || []) this.applyEvent({ ...ev, chat: id }, false);
      c.hasMore = !!h.has_more;
      return true;
    } catch (e) {
      this.notice("error", `Could not load older messages: ${explain(e.code, this.limits, e.message)}`);
      return false;
    } finally {
      c.loadingOlder = false;
      this.emit("chat", id);
    }
  }

  /** Finds the members of chats we know nothing about (e.g. after a reload). */
  async resolvePeers() {
    for (const c of [...this.chats.values()]) {
      if (c.members.size > 0 || c.left || !this.synced) continue;
      try {
        const h = await this.request({ type: "history", chat: c.id, after: 0, limit: 1 });
        for (const ev of h.events || []) this.applyEvent({ ...ev, chat: c.id }, false);
        this.emit("chats");
      } catch {
        // shown without a name until next time
      }
    }
    this.persistSoon();
  }

  // ---- presence, typing, receipts out -----------------------------------

  async watch() {
    if (!this.synced || !this.features.watch) return;
    const max = this.limits.max_watched_chats || 50;
    const ids = [...this.chats.values()]
      .filter((c) => !c.left)
      .sort((a, b) => (b.id === this.openChat) - (a.id === this.openChat) || b.lastTs - a.lastTs)
      .slice(0, max)
      .map((c) => c.id);
    const key = ids.join(",");
    if (key === this.watched) return;
    this.watched = key;
    clearTimeout(this.timers.watch);
    try {
      await this.optional("watch", { type: "watch", chats: ids });
      this.watchAttempt = 0;
    } catch {
      // E.g. a chat created a moment ago is not known everywhere yet: try again.
      this.watched = null;
      this.watchAttempt = (this.watchAttempt || 0) + 1;
      if (this.synced) this.timers.watch = setTimeout(() => this.watch(), Math.min(10_000, 500 * this.watchAttempt));
    }
  }

  typing(id, active) {
    if (!this.synced || !this.features.typing) return;
    const now = Date.now();
    const every = Math.max(this.limits.typing_interval_ms || 0, TYPING_EVERY_MS);
    if (active && now - this.lastTyping < every) return;
    // Stopping is not worth a refusal: a sent message clears the indicator anyway.
    if (!active && (this.lastTyping === 0 || now - this.lastTyping < (this.limits.typing_interval_ms || 1000))) {
      if (!active) this.lastTyping = 0;
      return;
    }
    this.lastTyping = active ? now : 0;
    this.fire("typing", { type: "typing", chat: id, active });
  }

  markReadSoon(id) {
    clearTimeout(this.timers.read);
    this.timers.read = setTimeout(() => this.markRead(id), 150);
  }

  markRead(id) {
    const c = this.chats.get(id);
    if (!c || !this.isReading(id)) return;
    if (c.unread !== 0 || c.readSeq < c.lastSeq) {
      c.unread = 0;
      c.readSeq = Math.max(c.readSeq, c.lastSeq);
      this.emit("chats");
      this.persistSoon();
    }
    const upTo = c.lastSeq;
    if (!this.synced || upTo <= c.readSent || c.left) return;
    c.readSent = upTo;
    this.optional("read", { type: "read", chat: id, up_to_seq: upTo }).catch((e) => {
      if (e.code !== "stale_receipt") c.readSent = Math.min(c.readSent, upTo - 1);
    });
  }

  sendDeliveredSoon() {
    clearTimeout(this.timers.delivered);
    this.timers.delivered = setTimeout(() => this.sendDelivered(), 300);
  }

  sendDelivered() {
    if (!this.synced || !this.features.delivered) return;
    for (const c of this.chats.values()) {
      if (c.left || c.lastSeq <= c.deliveredSent) continue;
      const upTo = c.lastSeq;
      c.deliveredSent = upTo;
      this.optional("delivered", { type: "delivered", chat: c.id, up_to_seq: upTo }).catch(() => {});
    }
  }

  // ---- commands ---------------------------------------------------------

  /** Queues a message; shown at once, sent now or after the next sync. */
  send(id, text) {
    const entry = {
      chat: id,
      client_msg_id: `w-${this.device}-${Date.now().toString(36)}-${randomHex(4)}`,
      text,
      created: Date.now(),
      state: "pending",
      inflight: false,
    };
    this.outbox.push(entry);
    this.persistOutbox();
    this.typing(id, false);
    this.emit("chat", id);
    this.flushOutbox();
    return entry;
  }

  retry(clientMsgId) {
    const e = this.outbox.find((x) => x.client_msg_id === clientMsgId);
    if (!e) return;
    e.state = "pending";
    e.error = null;
    e.code = null;
    this.persistOutbox();
    this.emit("chat", e.chat);
    this.flushOutbox();
  }

  discard(clientMsgId) {
    const i = this.outbox.findIndex((x) => x.client_msg_id === clientMsgId);
    if (i < 0) return;
    const [e] = this.outbox.splice(i, 1);
    this.persistOutbox();
    this.emit("chat", e.chat);
  }

  /** Sends pending messages one at a time per chat, so their order is kept. */
  flushOutbox() {
    if (!this.synced) return;
    const busy = new Set(this.outbox.filter((e) => e.inflight).map((e) => e.chat));
    for (const e of this.outbox) {
      if (e.state !== "pending" || e.inflight || busy.has(e.chat) || e.retryAt > Date.now()) continue;
      busy.add(e.chat);
      this.transmit(e);
    }
  }

  async transmit(e) {
    e.inflight = true;
    try {
      const ack = await this.request({ type: "send", chat: e.chat, client_msg_id: e.client_msg_id, text: e.text });
      e.state = "sent";
      e.seq = ack.seq;
      e.attempts = 0;
      const c = this.chat(e.chat);
      if (c.events.has(ack.seq)) {
        const i = this.outbox.indexOf(e);
        if (i >= 0) this.outbox.splice(i, 1);
      }
    } catch (err) {
      if (TRANSIENT.has(err.code)) {
        e.attempts = (e.attempts || 0) + 1;
        e.code = err.code;
        e.error = explain(err.code, this.limits, err.message);
        if (err.code !== "disconnected") {
          const delay = Math.min(5000, 400 * 2 ** Math.min(e.attempts, 4));
          e.retryAt = Date.now() + delay;
          setTimeout(() => this.flushOutbox(), delay + 10);
        }
      } else {
        e.state = "failed";
        e.code = err.code;
        e.error = explain(err.code, this.limits, err.message);
      }
    } finally {
      e.inflight = false;
      this.persistOutbox();
      this.emit("chat", e.chat);
      this.flushOutbox();
    }
  }

  /** A command answered by `ack`; throws a RequestError with a readable message. */
  async command(frame) {
    try {
      return await this.request({ ...frame, client_msg_id: `w-${randomHex(8)}` });
    } catch (e) {
      e.message = explain(e.code, this.limits, e.frame?.message ?? e.message);
      throw e;
    }
  }

  async createChat(kind, members, title) {
    const frame = { type: "create_chat", kind, members };
    if (kind === "group" && title) frame.title = title;
    const ack = await this.command(frame);
    const c = this.chat(ack.chat);
    c.kind = kind;
    if (title) c.title = title;
    c.members.set(this.user, kind === "group" ? "admin" : "member");
    for (const m of members) if (!c.members.has(m)) c.members.set(m, "member");
    c.lastTs = Math.max(c.lastTs, Date.now());
    this.emit("chats");
    this.watched = null;
    this.watch();
    return ack.chat;
  }

  addMember(id, user) {
    return this.command({ type: "add_member", chat: id, user });
  }

  removeMember(id, user) {
    return this.command({ type: "remove_member", chat: id, user });
  }

  /** Mutes or unmutes a chat (issue 5); null when the gateway has no `mute`. */
  async mute(id, muted) {
    if (!this.features.mute) return null;
    try {
      const ack = await this.request({ type: "mute", chat: id, muted, client_msg_id: `w-${randomHex(8)}` });
      this.chat(id).muted = muted;
      this.emit("chats");
      this.emit("chat", id);
      this.persistSoon();
      return ack;
    } catch (e) {
      if (e.code === "unknown_type") {
        this.features.mute = false;
        return null;
      }
      e.message = explain(e.code, this.limits, e.frame?.message ?? e.message);
      throw e;
    }
  }

  leave(id) {
    return this.command({ type: "leave", chat: id });
  }

  /** A settings request (devices, revoke_device, presence_settings): null when the gateway does not know it. */
  async setting(feature, frame) {
    try {
      return await this.optional(feature, frame);
    } catch (e) {
      e.message = explain(e.code, this.limits, e.frame?.message ?? e.message);
      throw e;
    }
  }

  /** The user's devices (`devices` frame), or null when the gateway has no such frame. */
  async devices() {
    const f = await this.setting("devices", { type: "devices" });
    return f ? f.devices || [] : null;
  }

  /** Revokes another device of this user: its connections close with 4003. */
  revokeDevice(device) {
    return this.setting("revoke_device", { type: "revoke_device", device });
  }

  /** Hides (or shows again) this user's presence to everyone. */
  setPresenceHidden(hidden) {
    return this.setting("presence_settings", { type: "presence_settings", hidden: !!hidden });
  }

  // ---- views for the UI -------------------------------------------------

  /** The items of a chat's message list: events by seq, then unsent messages. */
  items(id) {
    const c = this.chats.get(id);
    if (!c) return { events: [], outbox: [] };
    const evs = [...c.events.values()].sort((a, b) => a.seq - b.seq);
    const own = this.outbox.filter((e) => e.chat === id && !(e.seq && c.events.has(e.seq)));
    return { events: evs, outbox: own };
  }

  /** Who else is in a chat. */
  others(c) {
    return [...c.members.keys()].filter((u) => u !== this.user);
  }

  name(c) {
    if (c.kind === "group") return c.title || this.others(c).join(", ") || "group";
    return this.others(c)[0] || "direct chat";
  }

  /** "read" | "delivered" | "sent" for one of my messages. */
  mark(c, seq) {
    const others = this.others(c);
    if (others.length === 0 || c.receipts.size === 0) return "sent";
    let read = 0;
    let delivered = 0;
    for (const u of others) {
      const r = c.receipts.get(u);
      if (r && r.read >= seq) read += 1;
      if (r && r.delivered >= seq) delivered += 1;
    }
    if (read === others.length) return "read";
    if (delivered === others.length) return "delivered";
    return "sent";
  }

  typists(c) {
    const now = Date.now();
    return [...c.typing].filter(([, until]) => until > now).map(([u]) => u);
  }
}
