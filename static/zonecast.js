// zonecast.js: the browser client of zonecast, an ES module with no dependencies.
//
// Subscribes to streams (`zone:N`, `alerts`, `user:ID`) over EventSource first and
// falls back to one WebSocket when EventSource is missing, when SSE fails to open
// repeatedly while WebSocket works, or when no heartbeat arrives for two intervals
// (a buffering proxy). It keeps the last event id of each stream (in memory and
// localStorage) and resumes from it, so every event is handled exactly once; it
// reconnects with exponential backoff and jitter, and reports its state to the page.
// Writes go through the WebSocket when it is open, else REST.

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
  constructor({ token = null, heartbeatMs = 15000, onState = () => {}, base = "" } = {}) {
    this.token = token;
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
    this.state = state;
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
    const resp = await fetch(this.base + path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
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
        if (v.type === "error") p.reject(Object.assign(new Error(v.message), { code: v.code }));
        else p.resolve(v);
      }
    };
    ws.onclose = () => {
      this.ws = null;
      this.wsOpen = false;
      for (const p of this.pending.values()) p.reject(new Error("connection closed"));
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
        if (this.pending.delete(request_id)) reject(new Error("no reply"));
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

  /** Changes a quantity: `{quantity}` or `{delta}`, optional `expected_version`, `reason`. */
  async updateQuantity(itemId, change) {
    const key = `q-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
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
    clearTimeout(this.timer);
    clearTimeout(this.reopen);
    clearTimeout(this.watchdog);
    this.es?.close();
    this.ws?.close();
    this.report("offline");
  }
}
