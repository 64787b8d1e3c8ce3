// zonecast.js: the browser client of zonecast, an ES module with no dependencies.
//
// Subscribes to streams (`zone:N`, `alerts`, `user:ID`) over EventSource first and
// falls back to one WebSocket when EventSource is missing, when SSE fails to open
// repeatedly while WebSocket works, or when no heartbeat arrives for two intervals
// (a buffering proxy). It keeps the last event id of each stream (in memory and
// localStorage) and resumes from it, so every event is handled exactly once; it
// reconnects with exponential backoff and jitter, and reports its state to the page.
//
// Quantity changes go through the WebSocket when it is open, else REST, each with an
// idempotency key made when the change is made. A change that cannot be sent (the
// browser is offline, or the connection drops before the answer) is queued with its
// key and its expected_version, kept in localStorage, shown as pending, and sent
// when the connection returns; since the key goes with it, a change the server
// already applied is answered with its original result, never applied twice.
// Refusals that need a person (version_conflict, insufficient_stock) stay in the
// queue as conflicts until the page resolves them. See docs/zonecast-js.md.

/**
 * Where this tab keeps its queue: in localStorage (it survives a reload and a crash),
 * under a key of the tab's own (kept in sessionStorage, which is per tab and survives
 * a reload), so that two open tabs never overwrite each other's queue.
 */
function queueKey() {
  let tab = globalThis.sessionStorage?.getItem("zonecast.tab");
  if (!tab) {
    tab = Math.random().toString(36).slice(2, 10);
    globalThis.sessionStorage?.setItem("zonecast.tab", tab);
  }
  return `zonecast.queue.${tab}`;
}

/** A refusal that no retry will change: a person has to decide. */
const CONFLICTS = new Set(["version_conflict", "insufficient_stock", "not_found", "invalid", "bad_request",
  "forbidden", "unauthorized", "idempotency_key_reused"]);

/** A failure of the network (or of a connection closing under a request), not a refusal. */
const isNetworkError = (e) => e instanceof TypeError || e?.network === true;

const EVENT_TYPES = [
  "item_created", "stock_updated", "item_updated", "item_deleted",
  "low_stock_alert", "announcement", "notification", "notification_read", "unread_count",
];

export class Zonecast {
  /**
   * @param {object} opts
   * @param {string} [opts.token] API key or JWT
   * @param {number} [opts.heartbeatMs] the server's SSE heartbeat interval
   * @param {(s: {state: string, transport: string|null, retryIn: number, lastEventId: object}) => void} [opts.onState]
   */
  constructor({ token = null, heartbeatMs = 15000, onState = () => {}, onQueue = () => {}, base = "" } = {}) {
    this.token = token;
    this.onQueue = onQueue;
    // Changes not yet applied: {key, itemId, change, state, error, at}, oldest first.
    this.queueKey = queueKey();
    this.queue = JSON.parse(localStorage.getItem(this.queueKey) || "[]");
    this.flushing = false;
    this.flushTimer = null;
    this.waiters = new Map(); // key -> {resolve, reject} of a queued change's promise
    this.onOnline = () => this.flush();
    globalThis.addEventListener?.("online", this.onOnline);
    this.base = base;
    this.heartbeatMs = heartbeatMs;
    this.onState = onState;
    this.streams = new Map(); // stream -> { handlers, lastId }
    this.es = null;
    this.watchdog = null;
    this.reopen = null;
    this.transport = typeof EventSource === "function" ? "sse" : "ws";
    this.sseFailures = 0;
    this.sseEverOpened = false;
    this.ws = null;
    this.wsOpen = false;
    this.attempt = 0;
    this.timer = null;
    this.pending = new Map(); // request_id -> {resolve, reject}
    this.closed = false;
    this.state = "connecting";
  }

  report(state, retryIn = 0) {
    const wasLive = this.state === "live";
    this.state = state;
    if (state === "live" && !wasLive) this.flush();
    const lastEventId = Object.fromEntries([...this.streams].map(([k, s]) => [k, s.lastId]));
    this.onState({ state, transport: state === "live" ? this.transport : null, retryIn, lastEventId });
  }

  withToken(url) {
    if (!this.token) return this.base + url;
    const sep = url.includes("?") ? "&" : "?";
    return `${this.base}${url}${sep}access_token=${encodeURIComponent(this.token)}`;
  }

  /** REST call with the token; resolves to the parsed JSON, rejects with the problem. */
  async request(method, path, body, headers = {}) {
    const h = { ...headers };
    if (this.token) h.Authorization = `Bearer ${this.token}`;
    if (body !== undefined) h["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(this.base + path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw Object.assign(new Error(`the server cannot be reached (${e.message})`), { network: true });
    }
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw Object.assign(new Error(data.detail || `HTTP ${resp.status}`), { status: resp.status, problem: data });
    return data;
  }

  /**
   * Subscribes to a stream. `from` is the id to resume after (e.g. a snapshot's
   * `last_event_id`), `null` for live from now; omitted, the stored id is used.
   */
  subscribe(stream, handlers, from) {
    // `from`: a number resumes after it; `null` is live from now; omitted, the
    // position stored by an earlier visit is used.
    const stored = Number(localStorage.getItem(`zonecast.last.${stream}`));
    const lastId = from !== undefined ? from : (Number.isFinite(stored) && stored > 0 ? stored : null);
    this.streams.set(stream, { handlers, lastId });
    if (this.transport === "sse") this.openSse();
    else if (this.wsOpen) this.ws.send(JSON.stringify(lastId === null ? { type: "subscribe", stream } : { type: "subscribe", stream, last_event_id: lastId }));
    else this.ensureWs();
  }

  /** Forgets a stream (and its stored position). */
  unsubscribe(stream) {
    if (!this.streams.delete(stream)) return;
    if (this.transport === "sse") this.openSse();
    else if (this.wsOpen) this.ws.send(JSON.stringify({ type: "unsubscribe", stream }));
  }

  /** Sets where a stream resumes (after a snapshot was refetched). */
  position(stream, id) {
    const e = this.streams.get(stream);
    if (e) e.lastId = id;
    localStorage.setItem(`zonecast.last.${stream}`, String(id));
  }

  deliver(stream, evt) {
    const e = this.streams.get(stream);
    if (!e) return;
    if (e.lastId !== null && evt.id <= e.lastId) return; // already handled: exactly once
    e.lastId = evt.id;
    localStorage.setItem(`zonecast.last.${stream}`, String(evt.id));
    e.handlers.onEvent?.(evt);
    if (this.state === "live") this.report("live");
  }

  reset(stream, r) {
    const e = this.streams.get(stream);
    if (!e) return;
    this.position(stream, r.last_event_id);
    e.handlers.onReset?.(r);
  }

  // --- SSE ---------------------------------------------------------------------
  // One EventSource carries every stream (`/sse/streams`): browsers allow only six
  // HTTP/1.1 connections per host across all tabs. Its ids are the positions of all
  // streams, so the browser's own reconnect resumes each of them.

  openSse() {
    clearTimeout(this.reopen);
    this.reopen = setTimeout(() => this.connectSse(), 0); // one reconnect per batch of changes
  }

  connectSse() {
    this.es?.close();
    clearTimeout(this.watchdog);
    if (this.closed || this.transport !== "sse" || this.streams.size === 0) return;
    const names = [...this.streams.keys()];
    const positions = names.filter((n) => this.streams.get(n).lastId !== null).map((n) => `${n}=${this.streams.get(n).lastId}`);
    let url = `/sse/streams?streams=${encodeURIComponent(names.join(","))}`;
    if (positions.length) url += `&last_event_id=${encodeURIComponent(positions.join(","))}`;
    const es = new EventSource(this.withToken(url));
    this.es = es;
    const alive = () => {
      clearTimeout(this.watchdog);
      // No frame, not even a heartbeat, for two intervals: something buffers the
      // stream. WebSocket gets through such proxies.
      this.watchdog = setTimeout(() => this.fallBackToWs("no heartbeat"), 2 * this.heartbeatMs);
    };
    es.onopen = () => {
      this.sseFailures = 0;
      this.sseEverOpened = true;
      this.attempt = 0;
      alive();
      this.report("live");
    };
    es.addEventListener("heartbeat", alive);
    for (const type of EVENT_TYPES) {
      es.addEventListener(type, (m) => { alive(); const evt = JSON.parse(m.data); this.deliver(evt.stream, evt); });
    }
    es.addEventListener("reset", (m) => { alive(); const r = JSON.parse(m.data); this.reset(r.stream, r); });
    es.onerror = () => {
      es.close();
      clearTimeout(this.watchdog);
      if (this.es !== es || this.transport !== "sse" || this.closed) return;
      this.sseFailures += 1;
      if (!this.sseEverOpened && this.sseFailures >= 3) {
        this.fallBackToWs("SSE does not open");
        return;
      }
      this.retry(() => this.connectSse());
    };
  }

  fallBackToWs(why) {
    if (this.transport === "ws" || this.closed) return;
    console.info(`zonecast: switching to WebSocket (${why})`);
    this.transport = "ws";
    this.es?.close();
    clearTimeout(this.watchdog);
    clearTimeout(this.reopen);
    this.ensureWs();
  }

  // --- WebSocket -----------------------------------------------------------------

  ensureWs() {
    if (this.ws || this.closed) return;
    this.report("connecting");
    const origin = new URL(this.base || location.href, location.href);
    origin.protocol = origin.protocol === "https:" ? "wss:" : "ws:";
    const path = this.withToken("/ws").slice(this.base.length);
    const ws = new WebSocket(`${origin.protocol}//${origin.host}${path}`);
    this.ws = ws;
    ws.onopen = () => {
      this.wsOpen = true;
      this.attempt = 0;
      for (const [stream, e] of this.streams) {
        const msg = { type: "subscribe", stream };
        if (e.lastId !== null) msg.last_event_id = e.lastId;
        ws.send(JSON.stringify(msg));
      }
      this.report("live");
    };
    ws.onmessage = (m) => {
      const v = JSON.parse(m.data);
      if (v.type === "reset") return this.reset(v.stream, v);
      if (v.stream && typeof v.id === "number") return this.deliver(v.stream, v);
      if (v.request_id !== undefined && this.pending.has(v.request_id)) {
        const p = this.pending.get(v.request_id);
        this.pending.delete(v.request_id);
        if (v.type === "error") p.reject(Object.assign(new Error(v.message), { code: v.code, retryAfterMs: v.retry_after_ms }));
        else p.resolve(v);
      }
    };
    ws.onclose = () => {
      this.ws = null;
      this.wsOpen = false;
      for (const p of this.pending.values()) p.reject(Object.assign(new Error("connection closed"), { network: true }));
      this.pending.clear();
      if (!this.closed) this.retry(() => this.ensureWs());
    };
  }

  wsRequest(msg) {
    const request_id = msg.request_id ?? `r-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
    return new Promise((resolve, reject) => {
      this.pending.set(request_id, { resolve, reject });
      this.ws.send(JSON.stringify({ ...msg, request_id }));
      setTimeout(() => {
        if (this.pending.delete(request_id)) reject(Object.assign(new Error("no reply"), { network: true }));
      }, 10000);
    });
  }

  // --- reconnecting ----------------------------------------------------------------

  retry(fn) {
    clearTimeout(this.timer);
    // Exponential backoff with jitter: 0.5 s, 1 s, 2 s … up to 30 s, ±50 %.
    const base = Math.min(30000, 500 * 2 ** this.attempt);
    const delay = Math.round(base * (0.5 + Math.random()));
    this.attempt += 1;
    this.report("reconnecting", Math.ceil(delay / 1000));
    this.timer = setTimeout(fn, delay);
  }

  // --- writes --------------------------------------------------------------------

  /**
   * Changes a quantity: `{quantity}` or `{delta}`, optional `expected_version`,
   * `reason`. Resolves with the item once the change is applied, now or, if it had to
   * be queued, when the connection returns; rejects with `.code` if the server
   * refuses it (a conflict stays in the queue until `resolve` is called).
   */
  updateQuantity(itemId, change) {
    const key = `q-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
    const entry = { key, itemId, change, state: "pending", error: null, at: new Date().toISOString() };
    this.queue.push(entry);
    this.saveQueue();
    const done = new Promise((resolve, reject) => this.waiters.set(key, { resolve, reject }));
    this.flush();
    return done;
  }

  /** The queued changes (pending, sending, conflict), oldest first. */
  pendingChanges() {
    return this.queue.map((e) => ({ ...e }));
  }

  /**
   * Resolves a conflict: `"discard"` drops the change; `"retry"` sends it again as a
   * new change (a new key), without its `expected_version` ("apply anyway").
   */
  resolve(key, action) {
    const i = this.queue.findIndex((e) => e.key === key);
    if (i < 0) return;
    const entry = this.queue[i];
    if (action === "discard") {
      this.queue.splice(i, 1);
      this.waiters.get(key)?.reject(Object.assign(new Error("discarded"), { code: "discarded" }));
      this.waiters.delete(key);
    } else {
      const { expected_version, ...change } = entry.change;
      const fresh = `q-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
      this.queue[i] = { ...entry, key: fresh, change, state: "pending", error: null };
      const w = this.waiters.get(key);
      this.waiters.delete(key);
      if (w) this.waiters.set(fresh, w);
    }
    this.saveQueue();
    this.flush();
  }

  saveQueue() {
    localStorage.setItem(this.queueKey, JSON.stringify(this.queue));
    this.onQueue(this.pendingChanges());
  }

  /** Sends queued changes, oldest first, one at a time, until one cannot be sent. */
  async flush() {
    if (this.flushing || this.closed) return;
    this.flushing = true;
    clearTimeout(this.flushTimer);
    try {
      for (;;) {
        const entry = this.queue.find((e) => e.state === "pending");
        if (!entry) break;
        if (globalThis.navigator?.onLine === false) {
          for (const e of this.queue) if (e.state === "pending") e.queued = true;
          this.saveQueue();
          break;
        }
        entry.state = "sending";
        this.saveQueue();
        let item;
        try {
          item = await this.send(entry);
        } catch (e) {
          const code = e.code ?? e.problem?.code;
          if (isNetworkError(e) || !CONFLICTS.has(code)) {
            // Not sent, sent and not answered, or refused for now (rate limited, the
            // server unavailable): the same key goes again later.
            entry.state = "pending";
            entry.queued = true;
            this.saveQueue();
            this.flushTimer = setTimeout(() => this.flush(), Math.max(2000, e.retryAfterMs ?? 0));
            break;
          }
          const error = Object.assign(new Error(e.message), { code: code ?? "error" });
          if (entry.queued) {
            // Made a while ago, refused now: the person who made it decides (resolve).
            entry.state = "conflict";
            entry.error = { code: error.code, message: e.message };
          } else {
            // Refused at once: the caller has the answer; nothing stays queued.
            this.queue = this.queue.filter((x) => x.key !== entry.key);
          }
          this.saveQueue();
          this.waiters.get(entry.key)?.reject(error);
          this.waiters.delete(entry.key);
          continue;
        }
        this.queue = this.queue.filter((e) => e.key !== entry.key);
        this.saveQueue();
        this.waiters.get(entry.key)?.resolve(item);
        this.waiters.delete(entry.key);
      }
    } finally {
      this.flushing = false;
    }
  }

  async send({ key, itemId, change }) {
    if (this.wsOpen) {
      const ack = await this.wsRequest({ type: "update_quantity", request_id: key, item_id: itemId, ...change });
      return ack.item;
    }
    const r = await this.request("PATCH", `/api/items/${itemId}`, change, { "Idempotency-Key": key });
    return r.item;
  }

  /** Marks a notification (or all, with `null`) read. */
  async markRead(id) {
    if (this.wsOpen) {
      return this.wsRequest(id === null ? { type: "mark_read", all: true } : { type: "mark_read", notification_id: id });
    }
    return this.request("POST", id === null ? "/api/notifications/read-all" : `/api/notifications/${id}/read`);
  }

  close() {
    this.closed = true;
    globalThis.removeEventListener?.("online", this.onOnline);
    clearTimeout(this.flushTimer);
    clearTimeout(this.timer);
    clearTimeout(this.reopen);
    clearTimeout(this.watchdog);
    this.es?.close();
    this.ws?.close();
    this.report("offline");
  }
}
