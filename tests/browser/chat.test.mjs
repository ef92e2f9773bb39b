// End-to-end test of the browser app (gateway/web) in headless Chromium.
//
// Started by tests/tests/browser.rs, which runs the whole platform and
// passes the gateways' addresses: CHAT_GW0, CHAT_GW1 (http://host:port; the
// page is loaded from the gateway, so the origin is the gateway's own).
// Screenshots go to CHAT_ARTIFACTS (default target/browser-artifacts).
//
// What it shows, with users on different gateways:
//   1:1 chat: create, send, optimistic display reconciled by the ack,
//     unread badge, typing indicator, read marks, reply;
//   offline: the context goes offline (the app must notice), the other user
//     sends 20 messages, none shows while offline, all 20 show after, in
//     order, once; a message written while offline is kept and sent once;
//   a send the server refuses (too_large) is marked failed with its meaning;
//   a reload keeps the device and the chats;
//   a group of three (one on a phone-sized screen): messages, the same
//     offline catch-up, removing a member;
//   settings on a second device of the same user (phone-sized): both
//     devices listed, hiding presence, revoking the first device, which
//     goes back to sign-in saying it was revoked;
//   no page error and no console error anywhere.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";

const GW0 = process.env.CHAT_GW0;
const GW1 = process.env.CHAT_GW1 || GW0;
const ART = process.env.CHAT_ARTIFACTS || "target/browser-artifacts";
const CHROMIUM = process.env.CHAT_CHROMIUM || "/usr/bin/chromium";
const WAIT = 30_000;
if (!GW0) {
  console.error("set CHAT_GW0 (and CHAT_GW1) to gateway addresses");
  process.exit(2);
}
mkdirSync(ART, { recursive: true });

const problems = [];
/** Users whose gateway is down on purpose: the browser's own connection-refused errors are expected. */
const gatewayDown = new Set();
const rl = createInterface({ input: process.stdin });
const stdinLines = rl[Symbol.asyncIterator]();

/** Asks tests/tests/browser.rs to act on the platform (kill-gateway 1, restart-gateway 1). */
async function control(cmd) {
  console.log(`@@control ${cmd}`);
  const r = await stdinLines.next();
  if (r.done || r.value.trim() !== "done") throw new Error(`control ${cmd} not done: ${r.value}`);
  log("platform:", cmd);
}
let step = "start";
const t0 = Date.now();
function log(...a) {
  console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
}
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  log("ok:", what);
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});

/** A signed-in user in a browser context of its own. */
async function user(name, gw, viewport = { width: 1100, height: 760 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on("pageerror", (e) => problems.push(`${name} pageerror during ${step}: ${e.message}`));
  page.on("console", (m) => {
    const expected = gatewayDown.has(name) && /ERR_CONNECTION_REFUSED|WebSocket connection to .* failed/.test(m.text());
    if ((m.type() === "error" || m.type() === "warning") && !expected) {
      problems.push(`${name} console ${m.type()} during ${step}: ${m.text()}`);
    }
  });
  if (process.env.CHAT_BROWSER_DEBUG) {
    // Every WebSocket frame, for debugging: CHAT_BROWSER_DEBUG=1.
    page.on("websocket", (ws) => {
      ws.on("framesent", (f) => log(`${name} >`, String(f.payload).slice(0, 300)));
      ws.on("framereceived", (f) => log(`${name} <`, String(f.payload).slice(0, 300)));
      ws.on("close", () => log(`${name} websocket closed`));
    });
  }
  await page.goto(gw);
  await page.fill("#login-user", name);
  await page.keyboard.press("Enter");
  await online(page);
  const me = await page.textContent("#me");
  check(me.startsWith(`${name} · web-`), `${name} signed in with a browser device id (${me})`);
  return { name, context, page };
}

async function online(page) {
  await page.waitForSelector('#conn[data-state="online"]', { timeout: WAIT });
}

async function shot(u, label) {
  await u.page.screenshot({ path: join(ART, `${label}-${u.name}.png`), fullPage: false });
}

/** The texts of the open chat's message bubbles, in display order. */
function texts(u) {
  return u.page.$$eval("#messages .msg .text", (ps) => ps.map((p) => p.textContent));
}

/** Waits until the open chat shows every text of `want` (with a seq: sequenced). */
async function waitTexts(u, want, timeout = WAIT) {
  await u.page.waitForFunction(
    (want) => {
      const have = [...document.querySelectorAll('#messages .msg[data-seq] .text')].map((p) => p.textContent);
      return want.every((w) => have.includes(w));
    },
    want,
    { timeout },
  );
}

async function openChatNamed(u, name) {
  const b = u.page.locator("#chat-list button", { has: u.page.locator(".name", { hasText: name }) }).first();
  await b.waitFor({ timeout: WAIT });
  await b.click();
  await u.page.waitForSelector("#chat:not([hidden])");
}

async function sendText(u, text) {
  await u.page.fill("#text", text);
  await u.page.keyboard.press("Enter");
}

async function newChat(u, kind, members, title = "") {
  await u.page.click("#new-chat");
  await u.page.check(`input[name=kind][value=${kind}]`);
  await u.page.fill("#new-members", members.join(", "));
  await u.page.fill("#new-group-title", title);
  await u.page.click("#new-create");
  await u.page.waitForSelector("#new-dialog", { state: "hidden", timeout: WAIT });
  await u.page.waitForSelector("#chat:not([hidden])");
}

/**
 * Offline for real: the app must say so and stop receiving. (With this
 * Chromium, setOffline does not close an open WebSocket: its frames stall
 * and arrive after setOffline(false). The app closes its socket on the
 * `offline` event, and its heartbeat would catch a stalled one.)
 */
async function goOffline(u) {
  await u.context.setOffline(true);
  await u.page.waitForSelector('#conn[data-state="offline"]', { timeout: WAIT });
}

async function goOnline(u) {
  await u.context.setOffline(false);
  await online(u.page);
}

/** Asserts the open chat shows `want` in this order, each exactly once, among texts matching `re`. */
async function checkOrderOnce(u, re, want, what) {
  const have = (await texts(u)).filter((t) => re.test(t));
  check(JSON.stringify(have) === JSON.stringify(want), `${what} (got ${have.length}: ${have.slice(0, 3)}…)`);
}

let failed = null;
try {
  // ---- 1:1 ---------------------------------------------------------------
  step = "sign in";
  const ann = await user("ann", GW0);
  const bob = await user("bob", GW1);

  step = "create a 1:1 chat";
  await newChat(ann, "direct", ["bob"]);
  check((await ann.page.textContent("#chat-name")) === "bob", "ann's new chat is named after bob");

  step = "send with optimistic display";
  await sendText(ann, "hello bob");
  // Shown at once (before or after the ack), then reconciled to one sequenced bubble.
  await ann.page.waitForSelector('#messages .msg.mine:has-text("hello bob")', { timeout: 2000 });
  await waitTexts(ann, ["hello bob"]);
  check((await texts(ann)).filter((t) => t === "hello bob").length === 1, "the sent message shows once, with its seq");

  step = "unread badge";
  const badge = bob.page.locator("#chat-list button .badge");
  await badge.waitFor({ timeout: WAIT });
  check((await badge.textContent()) === "1", "bob's chat list shows 1 unread");
  check((await bob.page.textContent("#chat-list .preview")).includes("ann: hello bob"), "bob sees the last message in the list");
  await shot(bob, "01-unread");
  await openChatNamed(bob, "ann");
  await waitTexts(bob, ["hello bob"]);
  await bob.page.waitForSelector("#chat-list button .badge", { state: "detached", timeout: WAIT });
  check(true, "opening the chat clears the badge");

  step = "typing indicator";
  await bob.page.fill("#text", "");
  await bob.page.type("#text", "typing a reply", { delay: 30 });
  await ann.page.waitForFunction(() => document.querySelector("#typing").textContent.includes("bob is typing"), null, {
    timeout: WAIT,
  });
  check(true, "ann sees bob typing");
  await shot(ann, "02-typing");

  step = "read marks";
  await ann.page.waitForSelector('#messages .msg.mine[data-seq] .mark[data-mark="read"]', { timeout: WAIT });
  check(true, "ann's message is marked read after bob opened the chat");

  step = "reply";
  await bob.page.fill("#text", "hi ann");
  await bob.page.keyboard.press("Enter");
  await waitTexts(ann, ["hi ann"]);
  check(true, "ann gets bob's reply live");
  await shot(ann, "03-chat");

  // ---- offline catch-up -----------------------------------------------------
  step = "offline";
  await goOffline(ann);
  check(
    (await ann.page.textContent("#notice-text")).toLowerCase().includes("offline"),
    "ann's page says it is offline",
  );
  await sendText(ann, "written while offline");
  await ann.page.waitForSelector('#messages .msg[data-state="pending"]:has-text("written while offline")');
  check(true, "a message written offline is shown as waiting");
  const burst = Array.from({ length: 20 }, (_, i) => `burst ${i + 1}`);
  for (const t of burst) await sendText(bob, t);
  await waitTexts(bob, burst, 60_000);
  check(true, "bob's 20 messages are sequenced");
  await ann.page.waitForTimeout(1500);
  check((await texts(ann)).every((t) => !t.startsWith("burst")), "nothing reaches ann while offline");
  await shot(ann, "04-offline");

  step = "back online";
  await goOnline(ann);
  await waitTexts(ann, burst, 60_000);
  await checkOrderOnce(ann, /^burst /, burst, "ann shows all 20 in order, none twice");
  await waitTexts(ann, ["written while offline"]);
  await waitTexts(bob, ["written while offline"]);
  check(
    (await texts(bob)).filter((t) => t === "written while offline").length === 1,
    "the message written offline reached bob once",
  );
  check((await ann.page.$$('#messages .msg[data-state="pending"]')).length === 0, "ann's outbox is empty");
  await shot(ann, "05-caught-up");

  step = "gateway down";
  // bob's gateway dies: his page must say so, keep what he writes, and
  // catch up once it is back.
  gatewayDown.add("bob");
  await control("kill-gateway 1");
  await bob.page.waitForFunction(
    () => /cannot reach the gateway/i.test(document.querySelector("#notice-text").textContent),
    null,
    { timeout: WAIT },
  );
  check(
    ["reconnecting", "connecting"].includes(await bob.page.getAttribute("#conn", "data-state")),
    "bob's page says the gateway cannot be reached and that it is reconnecting",
  );
  await shot(bob, "05b-gateway-down");
  await sendText(ann, "while gw1 was down");
  await waitTexts(ann, ["while gw1 was down"]);
  await sendText(bob, "bob wrote during the outage");
  await bob.page.waitForSelector('#messages .msg[data-state="pending"]:has-text("bob wrote during the outage")');
  await control("restart-gateway 1");
  await online(bob.page);
  await waitTexts(bob, ["while gw1 was down", "bob wrote during the outage"], 60_000);
  await waitTexts(ann, ["bob wrote during the outage"], 60_000);
  check(
    (await texts(ann)).filter((t) => t === "bob wrote during the outage").length === 1,
    "after the gateway came back, bob caught up and his queued message arrived once",
  );
  await bob.page.waitForSelector("#notice", { state: "hidden", timeout: WAIT });
  check(true, "the connection warning is gone once connected");
  gatewayDown.delete("bob");

  step = "refused send";
  await sendText(ann, "x".repeat(5000));
  await ann.page.waitForSelector('#messages .msg[data-state="failed"][data-code="too_large"]', { timeout: WAIT });
  const failedMeta = await ann.page.textContent('#messages .msg[data-state="failed"] .meta');
  check(/too long/i.test(failedMeta), `a refused send says why (${failedMeta})`);
  await ann.page.click('#messages .msg[data-state="failed"] button:has-text("Delete")');
  await shot(ann, "06-refused");

  step = "reload";
  const deviceBefore = await ann.page.textContent("#me");
  await ann.page.reload();
  await online(ann.page);
  check((await ann.page.textContent("#me")) === deviceBefore, "a reload keeps the same device");
  await openChatNamed(ann, "bob");
  await waitTexts(ann, ["hi ann", "burst 20"]);
  await checkOrderOnce(ann, /^burst /, burst, "after the reload, history shows the 20 once, in order");

  // ---- a group of three -----------------------------------------------------
  step = "group";
  const cat = await user("cat", GW0, { width: 390, height: 780 });
  await newChat(ann, "group", ["bob", "cat"], "trio");
  await sendText(ann, "welcome to trio");
  await waitTexts(ann, ["welcome to trio"]);
  for (const u of [bob, cat]) {
    await openChatNamed(u, "trio");
    await waitTexts(u, ["welcome to trio"]);
  }
  check(true, "bob and cat (phone-sized screen) see the group message");
  await shot(cat, "07-group-phone");
  await sendText(cat, "hello from cat");
  await sendText(bob, "hello from bob");
  for (const u of [ann, bob, cat]) await waitTexts(u, ["hello from cat", "hello from bob"]);
  const orders = await Promise.all([ann, bob, cat].map((u) => texts(u)));
  check(
    orders.every((o) => JSON.stringify(o) === JSON.stringify(orders[0])),
    `all three show the group in one order (${orders[0].join(" | ")})`,
  );

  step = "group offline";
  await goOffline(cat);
  const gburst = Array.from({ length: 20 }, (_, i) => `group ${i + 1}`);
  for (const t of gburst) await sendText(bob, t);
  await waitTexts(bob, gburst, 60_000);
  await cat.page.waitForTimeout(1000);
  check((await texts(cat)).every((t) => !t.startsWith("group ")), "nothing reaches cat while offline");
  await goOnline(cat);
  await waitTexts(cat, gburst, 60_000);
  await checkOrderOnce(cat, /^group \d/, gburst, "cat shows the group's 20 in order, none twice");
  await waitTexts(ann, gburst, 60_000);
  await checkOrderOnce(ann, /^group \d/, gburst, "ann shows them in the same order");

  step = "remove a member";
  await ann.page.click("#members-btn");
  await ann.page.click('#member-list li[data-user="cat"] button');
  await cat.page.waitForSelector("#left-note:not([hidden])", { timeout: WAIT });
  check(true, "cat's page says cat is no longer a member");
  await bob.page.waitForSelector('#messages .system:has-text("ann removed cat")', { timeout: WAIT });
  check(true, "bob sees that ann removed cat");
  await shot(cat, "08-removed");
  await shot(ann, "08-members");

  step = "phone back to the list";
  await cat.page.click("#back");
  await cat.page.waitForSelector("#list-pane", { state: "visible" });
  check(await cat.page.isHidden("#chat-pane"), "on a phone, the list and the chat are shown one at a time");

  // ---- settings: two devices of one user --------------------------------------
  step = "settings: devices";
  // ann signs in again in a second browser (a second device, phone-sized).
  const ann2 = await user("ann", GW0, { width: 390, height: 780 });
  const annDevice = (await ann.page.textContent("#me")).split(" · ")[1];
  const ann2Device = (await ann2.page.textContent("#me")).split(" · ")[1];
  check(annDevice !== ann2Device, `the second browser is another device (${annDevice}, ${ann2Device})`);
  // Opened from the keyboard; the list is a projection: both show up within a moment.
  await ann2.page.focus("#settings-btn");
  await ann2.page.keyboard.press("Enter");
  await ann2.page.waitForSelector("#settings-dialog[open]");
  check(
    await ann2.page.evaluate(() => document.querySelector("#settings-dialog").contains(document.activeElement)),
    "the settings dialog opens from the keyboard and takes the focus",
  );
  const row = (d) => `#device-list li[data-device="${d}"]`;
  await ann2.page.waitForSelector(`${row(ann2Device)}[data-current="true"]`, { timeout: WAIT });
  await ann2.page.waitForSelector(`${row(annDevice)}[data-online="true"] button:has-text("Revoke")`, { timeout: WAIT });
  check(
    (await ann2.page.$$(`${row(ann2Device)} button`)).length === 0,
    "Settings lists both devices; only the other one can be revoked",
  );
  await ann2.page.check("#presence-hidden");
  await ann2.page.waitForFunction(() => /hidden/.test(document.querySelector("#presence-msg").textContent), null, {
    timeout: WAIT,
  });
  check(
    await ann2.page.evaluate(() => localStorage.getItem("chat.presence-hidden.ann") === "true"),
    "hiding presence is acknowledged and remembered",
  );
  await shot(ann2, "09-settings-phone");

  step = "settings: revoke";
  await ann2.page.click(`${row(annDevice)} button:has-text("Revoke")`);
  await ann2.page.waitForSelector(`${row(annDevice)}[data-revoked="true"]`, { timeout: WAIT });
  check((await ann2.page.$$(`${row(annDevice)} button`)).length === 0, "the revoked device is marked revoked");
  await ann.page.waitForSelector("#login:not([hidden])", { timeout: WAIT });
  const revokedMsg = await ann.page.textContent("#login-msg");
  check(/this device was revoked/i.test(revokedMsg), `the revoked page is back at sign-in and says why (${revokedMsg})`);
  check(await ann.page.isHidden("#shell"), "the revoked page shows no chats");
  await shot(ann, "10-revoked");
  check((await ann2.page.getAttribute("#conn", "data-state")) === "online", "the device that revoked stays online");
} catch (e) {
  failed = e;
  console.error(`FAILED during "${step}": ${e.stack || e}`);
  for (const ctx of browser.contexts()) {
    for (const [i, p] of ctx.pages().entries()) {
      await p.screenshot({ path: join(ART, `failure-${i}-${Date.now()}.png`) }).catch(() => {});
    }
  }
} finally {
  await browser.close();
}

if (problems.length > 0) {
  console.error(`page or console errors:\n  ${problems.join("\n  ")}`);
}
if (failed || problems.length > 0) {
  console.log("0 passed, 1 failed");
  process.exit(1);
}
log(`screenshots in ${ART}`);
console.log("1 passed, 0 failed");
rl.close();
process.exit(0);
