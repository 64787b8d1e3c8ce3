// End-to-end tests of zonecast's pages in a real headless Chromium (Debian's
// /usr/bin/chromium, driven by playwright-core), against the real server binary.
// Run by .ci/run after `cargo build`; `node e2e.mjs` runs them by hand.
//
// Every wait is bounded; a failed check throws and the process exits non-zero.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");
const BIN = process.env.ZONECAST_BIN ?? join(root, "target", "debug", "zonecast");
const SHOTS = join(root, "docs", "screenshots");
const dir = mkdtempSync(join(tmpdir(), "zonecast-e2e-"));
const DB = `sqlite://${join(dir, "e2e.db")}?mode=rwc`;

function assert(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

const started = []; // every server process, killed at the end whatever happens

/** Starts the server; resolves with {proc, base, key} once its banner is printed. */
function startServer(args = []) {
  return new Promise((resolve, reject) => {
    const proc = spawn(BIN, ["--database-url", DB, "--heartbeat", "1s", "--write-rate", "0", "--connect-rate", "0", ...args], {
      stdio: ["ignore", "pipe", "inherit"],
      env: { ...process.env, RUST_LOG: "warn" },
    });
    started.push(proc);
    let key = null;
    const timer = setTimeout(() => reject(new Error("server did not start")), 20000);
    createInterface({ input: proc.stdout }).on("line", (line) => {
      // stdout is a pipe, so the first admin key is in a file, never on stdout.
      if (/zk_[0-9a-f]{64}/.test(line)) reject(new Error(`a key was printed to a pipe: ${line}`));
      const f = line.match(/first admin key written to (\S+) \(mode 0600/);
      if (f && !key) key = readFileSync(f[1], "utf8").trim();
      const m = line.match(/API docs:\s+(https?:\/\/\S+)\/docs/);
      if (m) { clearTimeout(timer); resolve({ proc, base: m[1], key }); }
    });
    proc.on("exit", (code) => reject(new Error(`server exited with ${code}`)));
  });
}

function stopServer(server) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("server did not stop")), 15000);
    server.proc.removeAllListeners("exit");
    server.proc.on("exit", (code) => { clearTimeout(timer); code === 0 ? resolve() : reject(new Error(`exit ${code}`)); });
    server.proc.kill("SIGTERM");
  });
}

async function api(base, key, method, path, body) {
  const r = await fetch(base + path, {
    method,
    headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(data)}`);
  return data;
}

const errors = [];
let allowNetworkErrors = false;
let allowRefusals = false;
function watch(page, name) {
  page.on("pageerror", (e) => errors.push(`${name}: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // While the server is down on purpose, the browser reports refused connections.
    if (allowNetworkErrors && /ERR_CONNECTION_REFUSED|Failed to load resource|WebSocket connection/.test(m.text())) return;
    // A change the server refuses on purpose is reported by the browser as a failed load.
    if (allowRefusals && /status of (409|422)/.test(m.text())) return;
    errors.push(`${name}: ${m.text()}`);
  });
  return page;
}

const qty = (page, item) => page.locator(`#items tr[data-item="${item}"] td.qty`).innerText().then((t) => parseInt(t, 10));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let server = await startServer(["--bind", "127.0.0.1:0"]);
const port = new URL(server.base).port;
try {
  const { base } = server;
  const admin = server.key;
  assert(admin, "the first start writes an admin key file");
  const alice = (await api(base, admin, "POST", "/api/keys", { name: "alice", role: "writer", user: "alice" })).key;

  // --- the dashboard shows the snapshot, then live changes -----------------------------
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = watch(await ctx.newPage(), "tab 1");
  await page.goto(`${base}/?access_token=${alice}&zone=1&heartbeat_ms=1000`);
  await page.waitForSelector("#items tr >> nth=5", { timeout: 10000 });
  assert((await page.locator("#items tr").count()) === 6, "the dashboard shows the zone's six items");
  assert(!page.url().includes("access_token"), "the token is removed from the address bar");
  await page.waitForSelector('#status[data-state="live"][data-transport="sse"]', { timeout: 10000 });
  assert(true, "the status says live over SSE");

  const before = await qty(page, 1);
  const t0 = Date.now();
  await api(base, admin, "PATCH", "/api/items/1", { delta: -5 });
  await page.waitForFunction((q) => document.querySelector('#items tr[data-item="1"] td.qty')?.textContent.startsWith(String(q)), before - 5, { timeout: 1000 });
  assert(Date.now() - t0 < 1000, `a change over REST appears within a second (${Date.now() - t0} ms)`);

  // --- a low-stock crossing shows a toast --------------------------------------------------
  await api(base, admin, "PATCH", "/api/items/4", { delta: -5 }); // 12 -> 7, threshold 10
  await page.waitForSelector('.toast:has-text("Low stock")', { timeout: 3000 });
  assert(await page.locator('#items tr[data-item="4"].low').count() === 1, "a low-stock toast appears and the row is marked low");

  // --- inline change from the page, and a refused one --------------------------------------
  await page.click('#items tr[data-item="2"] button:text("−")');
  await page.waitForFunction(() => document.querySelector('#items tr[data-item="2"] td.qty')?.textContent.startsWith("199"), null, { timeout: 3000 });
  assert(true, "the − button changes the quantity");
  allowRefusals = true;
  await page.fill('#items tr[data-item="3"] input', "-4");
  await page.click('#items tr[data-item="3"] button:text("Set")');
  await page.waitForSelector('#items tr[data-item="3"] .error:not(:empty)', { timeout: 3000 });
  assert(true, "a refused change shows its error");
  allowRefusals = false;

  // --- notifications: the bell, and reading in one tab lowers it in another ----------------
  await page.waitForSelector("#bell:not([hidden])", { timeout: 5000 });
  const page2 = watch(await ctx.newPage(), "tab 2");
  await page2.goto(`${base}/?zone=1&heartbeat_ms=1000`);
  await page2.waitForSelector("#bell:not([hidden])", { timeout: 10000 });
  await page2.waitForSelector('#status[data-state="live"]', { timeout: 10000 });
  await api(base, admin, "POST", "/api/notifications", { user_id: "alice", subject: "Pick list ready", message: "Wave 7 is ready", priority: "high" });
  for (const p of [page, page2]) await p.waitForFunction(() => document.getElementById("unread").textContent === "1", null, { timeout: 3000 });
  assert(true, "a notification raises the bell count in both tabs");
  await page.click("#bell");
  await page.click("#notes li.unread button.mark-read");
  await page2.waitForFunction(() => document.getElementById("unread").textContent === "0", null, { timeout: 3000 });
  assert(true, "marking it read in one tab lowers the count in the other");
  await page.click("#bell");

  // --- activity: the zone's changes, live and paged back through history ------------------
  for (let i = 0; i < 25; i++) await api(base, admin, "PATCH", "/api/items/6", { delta: -1, reason: `count ${i}` });
  const act = watch(await ctx.newPage(), "activity");
  await act.goto(`${base}/?zone=1&heartbeat_ms=1000`);
  await act.waitForSelector('#status[data-state="live"]', { timeout: 10000 });
  const lastId = (await api(base, admin, "GET", "/api/zones/1/items")).last_event_id;
  await act.waitForSelector(`#activity-list li[data-id="${lastId}"]`, { timeout: 5000 });
  const topEntry = await act.locator("#activity-list li").first().innerText();
  assert(topEntry.includes("key:admin") && topEntry.includes("→") && topEntry.includes("count 24") && topEntry.includes("LBL-A6"),
    `the activity feed says who, what, from → to and why (${topEntry.replace(/\n/g, " ")})`);
  assert(await act.locator("#activity-list li").count() === 20, "it opens with the last 20 changes");
  const picked = await api(base, admin, "PATCH", "/api/items/1", { delta: -1, reason: "picked for order 7" });
  await act.waitForSelector(`#activity-list li[data-id="${picked.event_id}"]`, { timeout: 3000 });
  assert((await act.locator("#activity-list li").first().getAttribute("data-id")) === String(picked.event_id), "a live change appears at the top");
  for (let i = 0; i < 10 && await act.locator("#older").isVisible(); i++) {
    const n = await act.locator("#activity-list li").count();
    await act.click("#older");
    await act.waitForFunction((m) => document.querySelectorAll("#activity-list li").length > m, n, { timeout: 3000 });
  }
  assert(await act.locator('#activity-list li[data-id="1"][data-type="item_created"]').count() === 1, "paging back reaches the zone's first change");

  // --- trend: one item's quantity over time ------------------------------------------------
  await act.click('#items tr[data-item="6"] button.trend-link');
  await act.waitForSelector("#trend svg[data-points]", { timeout: 5000 });
  const points = Number(await act.getAttribute("#trend svg", "data-points"));
  assert(points >= 26, `the trend chart plots the item's changes from the log (${points} points)`);
  assert(await act.locator("#trend svg path.line").count() === 1 && await act.locator("#trend svg line.threshold").count() === 1, "with its line and its low-stock threshold");
  await api(base, admin, "PATCH", "/api/items/6", { delta: -1 });
  await act.waitForFunction((n) => Number(document.querySelector("#trend svg")?.dataset.points) === n + 1, points, { timeout: 3000 });
  assert(true, "a live change adds a point to the chart");

  // --- find: filter and sort -----------------------------------------------------------------
  const visible = (p) => p.evaluate(() => [...document.querySelectorAll("#items tr[data-item]")].filter((tr) => !tr.hidden).map((tr) => tr.dataset.sku));
  await act.fill("#find", "m6");
  assert(JSON.stringify((await visible(act)).sort()) === JSON.stringify(["BOLT-M6", "NUT-M6", "WSH-M6"]), "the filter matches SKU or name");
  await act.fill("#find", "gloves");
  assert(JSON.stringify(await visible(act)) === JSON.stringify(["GLV-L"]), "and by name");
  await act.fill("#find", "");
  await act.selectOption("#sort", "qty-asc");
  const quantities = await act.evaluate(() => [...document.querySelectorAll("#items tr[data-item] td.qty")].map((td) => parseInt(td.textContent, 10)));
  assert(quantities.every((q, i) => i === 0 || quantities[i - 1] <= q), `sorted by quantity (${quantities})`);
  await act.selectOption("#sort", "low");
  assert(await act.locator("#items tr[data-item]").first().evaluate((tr) => tr.classList.contains("low")), "low stock first puts a low row on top");
  await act.selectOption("#sort", "listed");

  // --- manage: create, rename, set the threshold, delete; refusals say why -------------------
  await act.click("#add-item summary");
  await act.fill("#new-item [name=sku]", "HOOK-S");
  await act.fill("#new-item [name=name]", "S hooks");
  await act.fill("#new-item [name=quantity]", "30");
  await act.fill("#new-item [name=low_stock_threshold]", "5");
  await act.click("#new-item button[type=submit]");
  await act.waitForSelector('#items tr[data-sku="HOOK-S"]', { timeout: 3000 });
  assert(true, "an item created from the page appears in the table");
  allowRefusals = true;
  await act.fill("#new-item [name=sku]", "HOOK-S");
  await act.fill("#new-item [name=name]", "again");
  await act.click("#new-item button[type=submit]");
  await act.waitForSelector("#new-item-error:not(:empty)", { timeout: 3000 });
  const dup = await act.innerText("#new-item-error");
  assert(dup.includes("already exists"), `a duplicate SKU is refused with the API's message (${dup})`);
  const hook = await act.getAttribute('#items tr[data-sku="HOOK-S"]', "data-item");
  await act.click(`#items tr[data-item="${hook}"] button.edit`);
  const editor = `#items tr[data-editor="${hook}"]`;
  await act.fill(`${editor} [name=name]`, "   ");
  await act.click(`${editor} button[type=submit]`);
  await act.waitForSelector(`${editor} .error:not(:empty)`, { timeout: 3000 });
  const blank = await act.innerText(`${editor} .error`);
  assert(blank.includes("name must not be empty"), `a blank name is refused with the API's message (${blank})`);
  allowRefusals = false;
  await act.fill(`${editor} [name=name]`, "Hooks, S");
  await act.fill(`${editor} [name=low_stock_threshold]`, "8");
  await act.click(`${editor} button[type=submit]`);
  await act.waitForFunction((id) => document.querySelector(`#items tr[data-item="${id}"] td.name`)?.textContent === "Hooks, S"
    && document.querySelector(`#items tr[data-item="${id}"] td:nth-child(4)`)?.textContent === "8", hook, { timeout: 3000 });
  assert(true, "renaming and a new threshold show in the table");
  await act.click(`#items tr[data-item="${hook}"] button.edit`);
  await act.click(`${editor} button.delete`);
  await act.click(`${editor} button.delete`);
  await act.waitForSelector(`#items tr[data-item="${hook}"]`, { state: "detached", timeout: 3000 });
  assert(true, "deleting takes the item off the table");
  assert(await act.locator("#new-zone-button").isHidden(), "a writer is not offered zone creation");
  const adminPage = watch(await (await browser.newContext()).newPage(), "admin");
  await adminPage.goto(`${base}/?access_token=${admin}&zone=1&heartbeat_ms=1000`);
  await adminPage.waitForSelector("#new-zone-button:not([hidden])", { timeout: 10000 });
  await adminPage.click("#new-zone-button");
  await adminPage.fill("#new-zone-name", "Overflow");
  await adminPage.click("#new-zone button[type=submit]");
  await adminPage.waitForFunction(() => document.querySelector("#zone").selectedOptions[0]?.textContent === "Overflow"
    && new URLSearchParams(location.search).get("zone") === document.querySelector("#zone").value
    && document.querySelectorAll("#items tr").length === 0, null, { timeout: 3000 });
  assert(true, "an admin creates a zone from the page and it opens, empty");
  await adminPage.context().close();

  // --- a scanner on flaky Wi-Fi: changes made offline are queued, then applied once ---------
  const stock = async () => Object.fromEntries((await api(base, admin, "GET", "/api/zones/1/items")).items.map((i) => [i.id, i]));
  const before2 = await stock();
  const logBefore = (await api(base, admin, "GET", "/api/zones/1/items")).last_event_id;
  allowNetworkErrors = true;
  await ctx.setOffline(true);
  await act.waitForFunction(() => navigator.onLine === false);
  await act.click('#items tr[data-item="2"] button:text("−")');
  await act.click('#items tr[data-item="2"] button:text("−")');
  await act.click('#items tr[data-item="3"] button:text("+")');
  // A count made offline, on a version someone else moves meanwhile.
  await act.fill('#items tr[data-item="4"] input', "3");
  await act.click('#items tr[data-item="4"] button:text("Set")');
  await act.waitForSelector("#queue-list li >> nth=3", { timeout: 3000 });
  assert(await act.locator('#queue-list li[data-state="pending"]').count() === 4, "changes made offline are shown as pending");
  assert((await act.innerText('#items tr[data-item="2"] .badge.pending')).includes("2 pending"), "and marked on their rows");
  assert((await api(base, admin, "GET", "/api/zones/1/items")).last_event_id === logBefore, "none of them reached the server while offline");
  await api(base, admin, "PATCH", "/api/items/4", { delta: 1, reason: "found one" });
  await ctx.setOffline(false);
  await act.waitForSelector('#queue-list li[data-state="conflict"]', { timeout: 15000 });
  await act.waitForFunction(() => document.querySelectorAll("#queue-list li").length === 1, null, { timeout: 15000 });
  const after2 = await stock();
  assert(after2[2].quantity === before2[2].quantity - 2 && after2[3].quantity === before2[3].quantity + 1,
    "back online, each queued change is applied exactly once");
  assert((await api(base, admin, "GET", "/api/zones/1/items")).last_event_id === logBefore + 4, "one event each, and the other writer's");
  const conflict = await act.innerText('#queue-list li[data-state="conflict"]');
  assert(conflict.includes("Set GLV-L to 3") && conflict.includes("someone else"), `the stale count is shown as a conflict (${conflict.replace(/\n/g, " ")})`);
  await act.click('#queue-list li[data-state="conflict"] button.apply');
  await act.waitForSelector("#queue", { state: "hidden", timeout: 5000 });
  assert((await stock())[4].quantity === 3, "applying it anyway sets the count");
  allowNetworkErrors = false;
  await act.close();

  // --- screenshots (desktop, phone) ---------------------------------------------------------
  mkdirSync(SHOTS, { recursive: true });
  await page.click('#items tr[data-item="6"] button.trend-link');
  await page.waitForSelector("#trend svg[data-points]", { timeout: 5000 });
  await page.screenshot({ path: join(SHOTS, "dashboard-desktop.png"), fullPage: true, animations: "disabled" });
  const phone = watch(await (await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true })).newPage(), "phone");
  await phone.goto(`${base}/?access_token=${alice}&zone=1`);
  await phone.waitForSelector('#status[data-state="live"]', { timeout: 10000 });
  await phone.waitForSelector("#items tr >> nth=5", { timeout: 10000 });
  assert(await phone.locator('#items tr[data-item="1"] td.sku').isVisible(), "the phone layout keeps the SKU visible");
  const cut = await phone.evaluate(() => [...document.querySelectorAll("#items input, #items button, #find, #sort")]
    .filter((e) => e.offsetParent !== null)
    .filter((e) => { const r = e.getBoundingClientRect(); return r.left < 0 || r.right > window.innerWidth; })
    .map((e) => e.outerHTML.slice(0, 60)));
  assert(cut.length === 0, `no input is cut off at phone width (${cut.join(" | ")})`);
  await phone.screenshot({ path: join(SHOTS, "dashboard-phone.png"), fullPage: true, animations: "disabled" });
  assert(true, "screenshots written to docs/screenshots");
  await phone.close();
  await page2.close();

  // --- the server goes away under the open dashboard; changes happen meanwhile --------------
  allowNetworkErrors = true;
  const seenBefore = await page.evaluate(() => window.zonecastSeen.length);
  await stopServer(server);
  await page.waitForSelector('#status[data-state="reconnecting"]', { timeout: 10000 });
  assert(true, "the status says reconnecting when the server is gone");
  // The changes are made on the same database by a server on another port, which
  // the dashboard cannot reach: it must catch up from the change log afterwards.
  const elsewhere = await startServer(["--bind", "127.0.0.1:0"]);
  const expected = {};
  for (let i = 0; i < 5; i++) {
    const r = await api(elsewhere.base, admin, "PATCH", "/api/items/5", { delta: -1 });
    expected.TAPE = r.item.quantity;
  }
  await stopServer(elsewhere);
  assert(await page.locator('#status[data-state="reconnecting"]').count() === 1, "the dashboard is still disconnected while the changes are made");
  server = await startServer(["--bind", `127.0.0.1:${port}`]);
  await page.waitForSelector('#status[data-state="live"]', { timeout: 40000 });
  await page.waitForFunction((q) => document.querySelector('#items tr[data-item="5"] td.qty')?.textContent.startsWith(String(q)), expected.TAPE, { timeout: 5000 });
  const seen = await page.evaluate(() => window.zonecastSeen.filter((s) => s.startsWith("zone:1#")).map((s) => Number(s.split("#")[1])));
  const unique = new Set(seen);
  assert(unique.size === seen.length, "after the restart no zone event was handled twice");
  const ids = [...unique].sort((a, b) => a - b);
  assert(ids.every((id, i) => i === 0 || id === ids[i - 1] + 1), "and none is missing (ids consecutive)");
  assert(seen.length - seenBefore >= 5, "the changes made while it was down arrived, without a reload");
  assert(await page.locator('#items tr[data-item="5"]').count() === 1, "the table holds each item once");
  await ctx.close(); // its tabs would keep reconnecting through the restarts below

  // --- SSE refused: the client falls back to WebSocket --------------------------------------
  allowNetworkErrors = true;
  await stopServer(server);
  server = await startServer(["--bind", `127.0.0.1:${port}`, "--refuse-sse"]);
  const ws = watch(await (await browser.newContext()).newPage(), "ws fallback");
  ws.on("console", () => {});
  await ws.goto(`${server.base}/?access_token=${alice}&zone=1&heartbeat_ms=1000`);
  await ws.waitForSelector('#status[data-state="live"][data-transport="ws"]', { timeout: 30000 });
  assert((await ws.locator("#status-text").innerText()).includes("WebSocket"), "with SSE refused the status says WebSocket");
  const r = await api(server.base, admin, "PATCH", "/api/items/6", { delta: -10 });
  await ws.waitForFunction((q) => document.querySelector('#items tr[data-item="6"] td.qty')?.textContent.startsWith(String(q)), r.item.quantity, { timeout: 3000 });
  assert(true, "updates still appear over WebSocket");
  await ws.click('#items tr[data-item="6"] button:text("+")');
  await ws.waitForFunction((q) => document.querySelector('#items tr[data-item="6"] td.qty')?.textContent.startsWith(String(q)), r.item.quantity + 1, { timeout: 3000 });
  assert(true, "writes go through the WebSocket");
  await ws.context().close();
  await stopServer(server);
  server = await startServer(["--bind", `127.0.0.1:${port}`]);
  allowNetworkErrors = false;

  // --- the raw pages ------------------------------------------------------------------------
  const raw = watch(await (await browser.newContext()).newPage(), "sse page");
  await raw.goto(`${server.base}/sse-client.html`);
  await raw.fill("#token", alice);
  await raw.fill("#last", "0");
  await raw.click("#connect");
  await raw.waitForSelector('#log .frame[data-type="item_created"][data-id="1"]', { timeout: 5000 });
  assert(true, "the SSE page connects and logs frames with their ids");
  const wsPage = watch(await (await browser.newContext()).newPage(), "ws page");
  await wsPage.goto(`${server.base}/ws-client.html`);
  await wsPage.fill("#token", alice);
  await wsPage.click("#connect");
  await wsPage.waitForSelector('#log .frame[data-type="welcome"]', { timeout: 5000 });
  await wsPage.fill("#message", JSON.stringify({ type: "update_quantity", request_id: "from-page", item_id: 1, delta: -1 }));
  await wsPage.click("#send");
  await wsPage.waitForSelector('#log .frame.in[data-type="ack"]', { timeout: 5000 });
  assert(true, "the WS page sends update_quantity and logs the ack");
  await raw.waitForSelector('#log .frame[data-type="stock_updated"]', { timeout: 5000 });
  assert(true, "and the SSE page logs the resulting event");

  // --- HTTPS with HTTP/2: ten EventSources in one page share one connection -----------------
  const cert = join(dir, "cert.pem");
  const certKey = join(dir, "key.pem");
  execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-keyout", certKey, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], { stdio: "ignore" });
  const tls = await startServer(["--bind", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", certKey]);
  assert(tls.base.startsWith("https://"), `the server says it serves HTTPS (${tls.base})`);
  const tlsCtx = await browser.newContext({ ignoreHTTPSErrors: true });
  const tp = watch(await tlsCtx.newPage(), "https");
  await tp.goto(`${tls.base}/sse-client.html`);
  const proto = await tp.evaluate(() => performance.getEntriesByType("navigation")[0]?.nextHopProtocol);
  assert(proto === "h2", `the page talks HTTP/2 over TLS (${proto})`);
  await tp.evaluate((key) => {
    window.opened = 0;
    window.got = new Set();
    for (let i = 0; i < 10; i++) {
      const es = new EventSource(`/sse/zones/1/stock?access_token=${key}`);
      es.onopen = () => { window.opened += 1; };
      es.addEventListener("stock_updated", () => window.got.add(i));
    }
  }, admin);
  await tp.waitForFunction(() => window.opened === 10, null, { timeout: 10000 });
  assert(true, "ten EventSources open at once (HTTP/1.1 allows six per host)");
  await tp.evaluate(async (key) => {
    const r = await fetch("/api/items/1", { method: "PATCH", headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" }, body: JSON.stringify({ delta: -1 }) });
    if (!r.ok) throw new Error(`PATCH ${r.status}`);
  }, admin);
  await tp.waitForFunction(() => window.got.size === 10, null, { timeout: 5000 });
  assert(true, "and every one of them receives the change");
  await tlsCtx.close();
  await stopServer(tls);

  assert(errors.length === 0, `no console errors (${errors.join(" | ")})`);
  console.log("all browser checks passed");
} finally {
  await browser.close();
  for (const p of started) if (p.exitCode === null) p.kill("SIGTERM");
}
