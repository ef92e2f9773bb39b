// What the browser keeps between page loads (localStorage / sessionStorage).
//
// Owns: the device id of each user on this browser (so a reload is the same
// device), whether each user chose to hide their presence (the server
// stores it but has no query for it), the signed-in session of this tab,
// and per user+device the sync
// state (checkpoint, per-chat last seq, chat summaries) and the outbox of
// unsent messages. Events themselves are not stored: a reload pages them
// back in with `history`.

const DEVICE = (user) => `chat.device.${user}`;
const SESSION = "chat.session";
const LAST_USER = "chat.last-user";
const STATE = (user, device) => `chat.state.${user}.${device}`;
const OUTBOX = (user, device) => `chat.outbox.${user}.${device}`;
const PRESENCE_HIDDEN = (user) => `chat.presence-hidden.${user}`;

/** Random hex of `bytes` bytes (works outside secure contexts too). */
export function randomHex(bytes) {
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a);
  return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

function read(storage, key, fallback) {
  try {
    const raw = storage.getItem(key);
    return raw == null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function write(storage, key, value) {
  try {
    storage.setItem(key, JSON.stringify(value));
  } catch {
    // Full or disabled storage: the app still works for this page's life.
  }
}

/** The device id of `user` on this browser, made once. */
export function deviceFor(user) {
  let d = read(localStorage, DEVICE(user), null);
  if (typeof d !== "string" || !/^[A-Za-z0-9._-]{1,64}$/.test(d)) {
    d = `web-${randomHex(4)}`;
    write(localStorage, DEVICE(user), d);
  }
  return d;
}

/** This tab's session: {user, device, token, expires_at, gateway} or null. */
export function loadSession() {
  return read(sessionStorage, SESSION, null);
}

export function saveSession(s) {
  write(sessionStorage, SESSION, s);
  write(localStorage, LAST_USER, s.user);
}

export function clearSession() {
  try {
    sessionStorage.removeItem(SESSION);
  } catch {
    // nothing to clear
  }
}

export function lastUser() {
  return read(localStorage, LAST_USER, "");
}

/** {checkpoint, chats: {id: summary}} of a user's device. */
export function loadState(user, device) {
  const s = read(localStorage, STATE(user, device), null);
  return s && typeof s === "object" ? s : { checkpoint: null, chats: {} };
}

export function saveState(user, device, state) {
  write(localStorage, STATE(user, device), state);
}

/** Unsent messages: [{chat, client_msg_id, text, created, state, error}]. */
export function loadOutbox(user, device) {
  const o = read(localStorage, OUTBOX(user, device), []);
  return Array.isArray(o) ? o : [];
}

export function saveOutbox(user, device, entries) {
  write(localStorage, OUTBOX(user, device), entries);
}

/** Whether `user` last chose "Hide my presence" in this browser. */
export function loadPresenceHidden(user) {
  return read(localStorage, PRESENCE_HIDDEN(user), false) === true;
}

export function savePresenceHidden(user, hidden) {
  write(localStorage, PRESENCE_HIDDEN(user), !!hidden);
}
