// framepipe dashboard. Plain JavaScript, no build step, no other origin.
//
// Data: REST under /api with "Authorization: Bearer <token>", live events over /ws with the
// token as a WebSocket subprotocol (never in a URL).
// The WebSocket sends a snapshot first, then every committed event; the page applies the events
// to what it holds (and fetches an execution's steps when it needs them). When the socket closes
// or says "lagged", the page reconnects with backoff and takes a fresh snapshot. Sources and
// processors are polled (they are not in the event feed); a 404 there means the service has no
// such API, shown as "none". Every text from the service goes in through textContent.
// Apps served here may add panels (GET /api/apps): each is read from its endpoint every
// `refresh` seconds and at once when one of its `events` arrives; images come from the app's
// object store through fetch (with the token) as blob: URLs.
// The segments view (segments.js) and the plots (plots.js) are modules of their own: they
// register with window.framepipeDashboard and are started, stopped, told of the sources and of
// every live event by this file.
"use strict";

(() => {
  const TOKEN_KEY = "framepipe.token";
  const MAX_EXECUTIONS = 20;
  const MAX_EVENTS = 50;
  const SOURCES_EVERY_MS = 2000;
  const PROCESSORS_EVERY_MS = 5000;
  const DETECTORS_EVERY_MS = 3000;
  const ACTIVE = new Set(["pending", "running"]);
  const RETRYABLE = new Set(["failed", "cancelled", "interrupted"]);

  const $ = (id) => document.getElementById(id);

  const state = {
    token: null,
    started: false,
    executions: new Map(), // id -> execution (steps: null until fetched)
    userOpen: new Map(), // id -> bool, what the user chose by opening or closing an execution
    events: [], // newest first
    lastEventId: 0,
    ws: null,
    wsAttempt: 0,
    wsTimer: null,
    detailTimers: new Map(),
    timers: [],
    sources: new Map(), // "app/pipeline" -> {data, el, img, url, busy}
    appPanels: new Map(), // "app/panel" -> {app, panel, el, body, busy, again, keys}
    appImages: new Map(), // "app\nkey" -> Promise of a blob: URL
  };

  class AuthError extends Error {}

  const modules = []; // {start(), stop(), sources(rows), event(ev)}, each optional
  function tell(hook, ...args) {
    for (const m of modules) {
      try {
        if (m[hook]) m[hook](...args);
      } catch (err) {
        console.warn(hook, err);
      }
    }
  }

  // -- small helpers --------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function setText(node, text) {
    const t = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== t) node.textContent = t;
  }

  function pct(value) {
    const n = Number(value);
    return Number.isFinite(n) ? Math.max(0, Math.min(100, n)) : 0;
  }

  function pctText(value) {
    const n = pct(value);
    return `${n < 10 && n % 1 ? n.toFixed(1) : Math.round(n)}%`;
  }

  function seconds(s) {
    if (!Number.isFinite(s) || s < 0) return "";
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 120) return `${Math.round(s)} s`;
    if (s < 7200) return `${Math.round(s / 60)} min`;
    if (s < 172800) return `${Math.round(s / 3600)} h`;
    return `${Math.round(s / 86400)} d`;
  }

  function ago(ts) {
    if (!Number.isFinite(ts)) return "";
    return `${seconds(Math.max(0, Date.now() / 1000 - ts))} ago`;
  }

  function clock(ts) {
    const d = new Date(ts * 1000);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit",
      hour12: false });
  }

  function shortId(id) {
    return String(id || "").slice(0, 8);
  }

  function oneLine(text, max = 160) {
    const s = String(text ?? "").split("\n")[0];
    return s.length > max ? `${s.slice(0, max - 1)}…` : s;
  }

  // -- token and API ----------------------------------------------------------------------------

  function readToken() {
    // The link `framepipe serve` prints carries the token in the fragment (#token=...), which
    // the browser never sends to a server; ?token=... of older links is taken the same way.
    const url = new URL(window.location.href);
    const fragment = new URLSearchParams(url.hash.replace(/^#/, ""));
    const given = fragment.get("token") ?? url.searchParams.get("token");
    if (given !== null) {
      // Take it once, keep it in this tab, and drop it from the address bar and history.
      sessionStorage.setItem(TOKEN_KEY, given);
      url.searchParams.delete("token");
      fragment.delete("token");
      const hash = fragment.toString();
      history.replaceState(null, "", url.pathname + url.search + (hash ? `#${hash}` : ""));
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function tokenProtocols() {
    // A browser cannot set headers on a WebSocket; the token travels as a subprotocol
    // (framepipe.token.<base64url>) instead of in the URL, where access logs would keep it.
    if (!state.token) return [];
    const bytes = new TextEncoder().encode(state.token);
    let binary = "";
    bytes.forEach((b) => { binary += String.fromCharCode(b); });
    const encoded = btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    return [`framepipe.token.${encoded}`];
  }

  function authHeaders() {
    return state.token ? { Authorization: `Bearer ${state.token}` } : {};
  }

  async function api(path, options = {}) {
    const res = await fetch(path, {
      ...options,
      cache: "no-store",
      headers: { Accept: "application/json", ...authHeaders(), ...(options.headers || {}) },
    });
    if (res.status === 401) {
      askToken(state.token ? "The service refused this token." : null);
      throw new AuthError("token refused");
    }
    return res;
  }

  async function apiJson(path, options) {
    const res = await api(path, options);
    if (!res.ok) {
      let detail = res.statusText;
      try {
        const body = await res.json();
        detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } catch (_) { /* not JSON */ }
      const err = new Error(`${res.status} ${detail}`);
      err.status = res.status;
      throw err;
    }
    return res.json();
  }

  function askToken(message) {
    stop();
    $("board").hidden = true;
    $("signout").hidden = true;
    $("login").hidden = false;
    const error = $("login-error");
    error.hidden = !message;
    setText(error, message || "");
    setConn("offline", "not connected");
    $("token").value = state.token || "";
    $("token").focus();
  }

  // -- connection status ---------------------------------------------------------------------

  function setConn(kind, text) {
    const node = $("conn");
    node.dataset.state = kind;
    setText(node, text);
  }

  function updateSummary() {
    const counts = {};
    for (const x of state.executions.values()) counts[x.status] = (counts[x.status] || 0) + 1;
    const parts = [];
    for (const s of ["running", "pending", "failed"]) if (counts[s]) parts.push(`${counts[s]} ${s}`);
    setText($("summary"), parts.join(" · "));
  }

  // -- executions -------------------------------------------------------------------------------

  function mergeExecution(data) {
    const known = state.executions.get(data.id);
    const x = known || { steps: null };
    for (const [k, v] of Object.entries(data)) {
      if (k === "steps") continue;
      x[k] = v;
    }
    if (Array.isArray(data.steps)) {
      const before = new Map((x.steps || []).map((s) => [s.key, s]));
      x.steps = data.steps.map((s) => {
        const mine = before.get(s.key);
        // An event may have arrived while this was read: keep the further progress.
        if (mine && mine.status === "running" && s.status === "running"
            && Number(mine.progress) > Number(s.progress)) {
          return { ...s, progress: mine.progress, message: mine.message };
        }
        return s;
      });
      countSteps(x);
    }
    state.executions.set(data.id, x);
    return x;
  }

  function countSteps(x) {
    if (!x.steps) return;
    x.steps_total = x.steps.length;
    x.steps_done = x.steps.filter((s) => s.status === "completed").length;
  }

  function ordered() {
    return [...state.executions.values()]
      .sort((a, b) => (b.created_at || 0) - (a.created_at || 0))
      .slice(0, MAX_EXECUTIONS);
  }

  function autoOpen(x, index) {
    return ACTIVE.has(x.status) || index === 0;
  }

  function isOpen(x, index) {
    return state.userOpen.has(x.id) ? state.userOpen.get(x.id) : autoOpen(x, index);
  }

  function scheduleDetail(id, delay = 250) {
    if (state.detailTimers.has(id)) return;
    state.detailTimers.set(id, setTimeout(async () => {
      state.detailTimers.delete(id);
      try {
        const data = await apiJson(`/api/executions/${encodeURIComponent(id)}`);
        mergeExecution(data);
        renderExecutions();
      } catch (err) {
        if (!(err instanceof AuthError)) console.warn("execution", id, err);
      }
    }, delay));
  }

  function wantDetails() {
    ordered().forEach((x, i) => {
      if (x.steps === null && isOpen(x, i)) scheduleDetail(x.id, 0);
    });
  }

  function execMeta(x) {
    const parts = [pctText(x.progress)];
    if (Number.isFinite(x.steps_total) && x.steps_total > 0) {
      parts.push(`${x.steps_done ?? 0}/${x.steps_total} steps`);
    }
    const now = Date.now() / 1000;
    if (x.finished_at && x.started_at) parts.push(`took ${seconds(x.finished_at - x.started_at)}`);
    else if (x.started_at && ACTIVE.has(x.status)) parts.push(`running ${seconds(now - x.started_at)}`);
    if (x.created_at) parts.push(`created ${ago(x.created_at)}`);
    return parts.join(" · ");
  }

  function buildExecution(x) {
    const node = el("details", { class: "exec", "data-execution": x.id });
    const summary = el("summary", {},
      el("span", { class: "exec-title" },
        el("span", { class: "pipeline" }), el("code", { class: "id" })),
      el("span", { class: "badge status" }),
      el("progress", { class: "exec-progress", max: 100, value: 0 }),
      el("span", { class: "exec-meta" }));
    const body = el("div", { class: "exec-body" },
      el("p", { class: "error exec-error", hidden: true }),
      el("ol", { class: "steps" }),
      el("div", { class: "actions" },
        el("button", { type: "button", "data-action": "cancel", text: "Cancel" }),
        el("button", { type: "button", "data-action": "retry", text: "Retry" })));
    node.append(summary, body);
    // The user's choice is taken at the click itself (mouse or keyboard), not in the "toggle"
    // event, which comes later: a re-render in between would undo the click.
    summary.addEventListener("click", () => {
      const id = node.dataset.execution;
      const open = !node.open;
      if (String(open) === node.dataset.auto) state.userOpen.delete(id);
      else state.userOpen.set(id, open);
    });
    node.addEventListener("toggle", () => {
      const known = state.executions.get(node.dataset.execution);
      if (node.open && known && known.steps === null) scheduleDetail(known.id, 0);
    });
    body.querySelector(".actions").addEventListener("click", (ev) => {
      const button = ev.target.closest("button[data-action]");
      if (button) act(node.dataset.execution, button.dataset.action, button);
    });
    return node;
  }

  async function act(id, action, button) {
    button.disabled = true;
    try {
      await apiJson(`/api/executions/${encodeURIComponent(id)}/${action}`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
      });
      scheduleDetail(id, 100);
    } catch (err) {
      if (!(err instanceof AuthError)) window.alert(`${action} failed: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  function renderStep(s, existing) {
    let node = existing;
    if (!node) {
      node = el("li", { class: "step", "data-step": s.key },
        el("span", { class: "step-name" }),
        el("span", { class: "badge" }),
        el("progress", { class: "step-progress", max: 100, value: 0 }),
        el("span", { class: "step-info" }),
        el("p", { class: "error", hidden: true }));
    }
    node.dataset.status = s.status;
    const name = node.querySelector(".step-name");
    const label = s.key !== s.name && s.key ? `${s.name} ${s.key.slice(s.name.length)}` : s.name;
    if (name.dataset.label !== label) {
      name.dataset.label = label;
      name.replaceChildren(s.name || s.key,
        s.key && s.key !== s.name ? el("span", { class: "key mono", text: s.key.slice(s.name.length) }) : "");
    }
    const badge = node.querySelector(".badge");
    badge.dataset.status = s.status;
    setText(badge, s.status);
    const bar = node.querySelector("progress");
    bar.value = pct(s.progress);
    const info = [pctText(s.progress)];
    if (s.message) info.push(oneLine(s.message, 120));
    if (s.attempt > 1) info.push(`attempt ${s.attempt}`);
    if (s.finished_at && s.started_at) info.push(seconds(s.finished_at - s.started_at));
    setText(node.querySelector(".step-info"), info.join(" · "));
    const error = node.querySelector(".error");
    error.hidden = !s.error;
    setText(error, s.error ? oneLine(s.error, 400) : "");
    return node;
  }

  function renderExecution(node, x, open, auto) {
    node.dataset.status = x.status;
    setText(node.querySelector(".pipeline"), x.pipeline || "…");
    const id = node.querySelector(".id");
    setText(id, shortId(x.id));
    id.title = x.id;
    const badge = node.querySelector(".badge.status");
    badge.dataset.status = x.status;
    setText(badge, x.status || "…");
    const bar = node.querySelector(".exec-progress");
    bar.value = pct(x.progress);
    bar.setAttribute("aria-label", `${x.pipeline} ${shortId(x.id)} progress`);
    setText(node.querySelector(".exec-meta"), execMeta(x));
    const error = node.querySelector(".exec-error");
    error.hidden = !x.error;
    setText(error, x.error || "");

    const list = node.querySelector(".steps");
    if (x.steps === null) {
      if (!list.querySelector(".none")) list.replaceChildren(el("li", { class: "none", text: "loading steps…" }));
    } else if (x.steps.length === 0) {
      list.replaceChildren(el("li", { class: "none", text: "no steps" }));
    } else {
      const have = new Map([...list.querySelectorAll(".step")].map((n) => [n.dataset.step, n]));
      const wanted = x.steps.map((s) => renderStep(s, have.get(s.key)));
      wanted.forEach((n, i) => { if (list.children[i] !== n) list.insertBefore(n, list.children[i] || null); });
      while (list.children.length > wanted.length) list.lastChild.remove();
    }
    node.querySelector('[data-action="cancel"]').hidden = !ACTIVE.has(x.status);
    node.querySelector('[data-action="retry"]').hidden = !RETRYABLE.has(x.status);
    node.dataset.auto = String(auto);
    if (node.open !== open) node.open = open;
  }

  let renderQueued = false;
  function renderExecutions() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      renderExecutionsNow();
    });
  }

  function renderExecutionsNow() {
    const box = $("executions");
    const list = ordered();
    const have = new Map([...box.querySelectorAll(".exec")].map((n) => [n.dataset.execution, n]));
    if (list.length === 0) {
      box.replaceChildren(el("p", { class: "none", text: "none" }));
    } else {
      box.querySelector(":scope > .none")?.remove();
      list.forEach((x, i) => {
        let node = have.get(x.id);
        if (!node) node = buildExecution(x);
        have.delete(x.id);
        renderExecution(node, x, isOpen(x, i), autoOpen(x, i));
        if (box.children[i] !== node) box.insertBefore(node, box.children[i] || null);
      });
      for (const stale of have.values()) stale.remove();
    }
    setText($("executions-count"), state.executions.size ? `${list.length} newest` : "");
    updateSummary();
  }

  // -- events -----------------------------------------------------------------------------------

  function applyEvent(ev) {
    if (ev.id && ev.id > state.lastEventId) state.lastEventId = ev.id;
    addEventRow(ev);
    appEvent(ev);
    tell("event", ev);
    const id = ev.execution_id;
    if (!id) return;
    let x = state.executions.get(id);
    const data = ev.data || {};
    if (!x) {
      x = mergeExecution({ id, pipeline: data.pipeline || "", status: "pending",
        progress: 0, created_at: ev.ts, error: null });
      scheduleDetail(id);
    }
    const [family, what] = ev.type.split(".");
    if (family === "execution") {
      if (what === "created") {
        x.pipeline = data.pipeline || x.pipeline;
        x.created_at = x.created_at || ev.ts;
      } else if (what === "started" || what === "retried") {
        x.status = "running";
        x.error = null;
        x.finished_at = null;
        if (what === "started" && !x.started_at) x.started_at = ev.ts;
        if (what === "retried") scheduleDetail(id);
      } else {
        x.status = what;
        x.finished_at = ev.ts;
        if ("error" in data) x.error = data.error;
        if (Number.isFinite(data.progress)) x.progress = data.progress;
        scheduleDetail(id);
      }
    } else if (family === "step") {
      if (Number.isFinite(data.execution_progress)) x.progress = data.execution_progress;
      const key = ev.step_key;
      let step = x.steps ? x.steps.find((s) => s.key === key) : null;
      if (x.steps && !step) {
        step = { key, name: data.name || key.split(":")[0], status: "pending", progress: 0,
          message: null, attempt: 0, error: null };
        x.steps.push(step);
        if (what !== "spawned") scheduleDetail(id);
      }
      if (step) {
        if (what === "started") {
          Object.assign(step, { status: "running", attempt: data.attempt ?? step.attempt,
            started_at: ev.ts, finished_at: null, error: null });
        } else if (what === "progress") {
          step.status = "running";
          if (Number.isFinite(data.progress)) step.progress = data.progress;
          step.message = data.message ?? step.message;
        } else if (what === "completed") {
          Object.assign(step, { status: "completed", progress: 100, finished_at: ev.ts });
        } else if (what === "failed" || what === "retrying") {
          Object.assign(step, { status: what, error: data.error ?? step.error, finished_at: ev.ts });
        } else if (what === "cancelled") {
          step.status = "cancelled";
        } else if (what === "interrupted") {
          step.status = "pending";
        } else if (what === "ready") {
          step.status = "ready";
        }
        countSteps(x);
      } else if (what === "spawned" && Number.isFinite(x.steps_total)) {
        x.steps_total += 1;
      } else if (what === "completed" && Number.isFinite(x.steps_done)) {
        x.steps_done += 1;
      }
    }
    renderExecutions();
  }

  function eventText(ev) {
    const d = ev.data || {};
    const [, what] = ev.type.split(".");
    if (ev.type === "step.progress") {
      return [pctText(d.progress), d.message ? oneLine(d.message, 100) : ""].filter(Boolean).join(" ");
    }
    if (d.error) return oneLine(d.error, 200);
    if (what === "completed" && Number.isFinite(d.duration)) return `in ${seconds(d.duration)}`;
    if (what === "retrying" && Number.isFinite(d.delay)) return `again in ${seconds(d.delay)}`;
    if (ev.type === "execution.created") return "";
    if (what === "started" && d.attempt > 1) return `attempt ${d.attempt}`;
    const rest = { ...d };
    delete rest.execution_progress;
    delete rest.traceback;
    delete rest.attempt;
    delete rest.run;
    return Object.keys(rest).length ? oneLine(JSON.stringify(rest), 140) : "";
  }

  function addEventRow(ev) {
    const list = state.events;
    if (ev.id && list.some((e) => e.id === ev.id)) return;
    let i = 0; // newest first: events of the history page and of the socket may interleave
    if (ev.id) while (i < list.length && list[i].id > ev.id) i += 1;
    // Progress reports of one step coalesce into one line: the list stays readable.
    const same = (e) => e && e.type === "step.progress" && ev.type === "step.progress"
      && e.execution_id === ev.execution_id && e.step_key === ev.step_key;
    if (same(list[i - 1])) return;
    if (same(list[i])) list[i] = ev;
    else list.splice(i, 0, ev);
    if (list.length > MAX_EVENTS) list.length = MAX_EVENTS;
    renderEvents();
  }

  let eventsQueued = false;
  function renderEvents() {
    if (eventsQueued) return;
    eventsQueued = true;
    requestAnimationFrame(() => {
      eventsQueued = false;
      const list = $("events");
      if (state.events.length === 0) {
        list.replaceChildren(el("li", { class: "none", text: "none" }));
        return;
      }
      list.replaceChildren(...state.events.map((ev) => {
        const x = ev.execution_id ? state.executions.get(ev.execution_id) : null;
        const where = [x && x.pipeline, ev.execution_id && shortId(ev.execution_id), ev.step_key]
          .filter(Boolean).join(" · ");
        const text = eventText(ev);
        return el("li", { class: "ev", "data-type": ev.type, "data-kind": ev.type.split(".")[1] },
          el("time", { datetime: new Date(ev.ts * 1000).toISOString(), text: clock(ev.ts) }),
          el("span", {},
            el("span", { class: "ev-type", text: ev.type }), " ",
            el("span", { class: "ev-where", text: where })),
          text ? el("span", { class: "ev-data", text }) : null);
      }));
    });
  }

  async function loadEvents(after, limit) {
    try {
      const page = await apiJson(`/api/events?limit=${limit}&after=${after}`);
      for (const ev of page.events) addEventRow(ev);
    } catch (err) {
      if (!(err instanceof AuthError)) console.warn("events", err);
    }
  }

  // -- live feed --------------------------------------------------------------------------------

  function connect() {
    clearTimeout(state.wsTimer);
    const proto = window.location.protocol === "https:" ? "wss" : "ws";
    setConn("connecting", state.wsAttempt ? "reconnecting…" : "connecting…");
    let ws;
    try {
      ws = new WebSocket(`${proto}://${window.location.host}/ws`, tokenProtocols());
    } catch (err) {
      console.warn("websocket", err);
      retryLater();
      return;
    }
    state.ws = ws;
    ws.onmessage = (message) => {
      let msg;
      try { msg = JSON.parse(message.data); } catch (_) { return; }
      if (msg.type === "snapshot") onSnapshot(msg);
      else if (msg.type === "event" && msg.event) applyEvent(msg.event);
      else if (msg.type === "lagged") {
        // We fell behind: a new connection brings the current state.
        state.wsAttempt = 0;
        ws.close();
      }
    };
    ws.onclose = (closed) => {
      if (state.ws !== ws) return;
      state.ws = null;
      if (closed.code === 1008 && state.token !== null) {
        askToken("The service refused this token.");
        return;
      }
      if (closed.code === 1008) {
        askToken(null);
        return;
      }
      retryLater();
    };
  }

  function retryLater() {
    if (!state.started) return;
    const attempt = state.wsAttempt++;
    // 1, 2, 4 ... 30 s, with jitter so that many tabs do not come back at once.
    const delay = Math.min(30, 2 ** attempt) * (0.5 + Math.random() * 0.5) * 1000;
    let left = Math.ceil(delay / 1000);
    setConn("reconnecting", `reconnecting in ${left} s`);
    const tick = () => {
      left -= 1;
      if (left > 0 && !state.ws) {
        setConn("reconnecting", `reconnecting in ${left} s`);
        state.wsTimer = setTimeout(tick, 1000);
      }
    };
    clearTimeout(state.wsTimer);
    state.wsTimer = setTimeout(tick, 1000);
    setTimeout(() => { if (state.started && !state.ws) connect(); }, delay);
    // While the socket is down, keep the list from going stale.
    refreshExecutions();
  }

  async function onSnapshot(msg) {
    state.wsAttempt = 0;
    setConn("live", "live");
    const previous = state.lastEventId;
    const seen = new Set();
    for (const data of msg.executions || (msg.execution ? [msg.execution] : [])) {
      mergeExecution(data);
      seen.add(data.id);
    }
    // Drop what the snapshot no longer lists (it holds the newest ones).
    if (msg.executions) {
      for (const id of [...state.executions.keys()]) if (!seen.has(id)) state.executions.delete(id);
    }
    // Steps of active executions may have changed while we were away.
    for (const x of state.executions.values()) {
      if (x.steps !== null && (ACTIVE.has(x.status) || previous)) scheduleDetail(x.id, 0);
    }
    renderExecutions();
    wantDetails();
    const after = Number(msg.after) || 0;
    if (previous === 0) {
      // The first connection: the latest events (ids grow one by one, so after - N is close).
      await loadEvents(Math.max(0, after - MAX_EVENTS * 4), MAX_EVENTS * 4);
    } else if (after > previous) {
      await loadEvents(previous, Math.min(after - previous, 1000));
    }
    if (after > state.lastEventId) state.lastEventId = after;
  }

  async function refreshExecutions() {
    try {
      const rows = await apiJson(`/api/executions?limit=${MAX_EXECUTIONS}`);
      for (const row of rows) mergeExecution(row);
      renderExecutions();
      wantDetails();
    } catch (err) {
      if (!(err instanceof AuthError)) console.warn("executions", err);
    }
  }

  // -- sources ---------------------------------------------------------------------------------

  function sourceNone(text) {
    for (const s of state.sources.values()) if (s.url) URL.revokeObjectURL(s.url);
    state.sources.clear();
    $("sources").replaceChildren(el("p", { class: "none", text }));
    setText($("sources-count"), "");
  }

  async function refreshSources() {
    let rows;
    try {
      const res = await api("/api/sources");
      if (res.status === 404) {
        sourceNone("none");
        return;
      }
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      rows = await res.json();
    } catch (err) {
      if (!(err instanceof AuthError)) sourceNone(`none (${err.message})`);
      return;
    }
    if (!Array.isArray(rows)) rows = [];
    tell("sources", rows);
    if (rows.length === 0) {
      sourceNone("none");
      return;
    }
    const box = $("sources");
    box.querySelector(":scope > .none")?.remove();
    const keep = new Set();
    rows.forEach((row, i) => {
      const key = `${row.app}/${row.pipeline}`;
      keep.add(key);
      let s = state.sources.get(key);
      if (!s) {
        const img = el("img", { alt: `latest frame of ${key}`, hidden: true });
        const frame = el("div", { class: "frame" }, img, el("span", { class: "noframe", text: "no frame yet" }));
        const node = el("article", { class: "source", "data-source": key }, frame,
          el("div", { class: "source-body" },
            el("div", { class: "source-head" },
              el("b", { text: row.pipeline }), el("span", { class: "muted", text: row.app }),
              el("span", { class: "badge" })),
            el("div", { class: "source-meta" }),
            el("div", { class: "source-desc mono" }),
            el("p", { class: "error", hidden: true })));
        s = { key, el: node, img, url: null, busy: false };
        state.sources.set(key, s);
      }
      s.data = row;
      const node = s.el;
      node.dataset.state = row.state || "";
      const badge = node.querySelector(".badge");
      badge.dataset.state = row.state || "";
      setText(badge, row.state || "unknown");
      const meta = [];
      if (Number.isFinite(row.fps)) meta.push(`${row.fps.toFixed(1)} fps`);
      if (Number.isFinite(row.frames)) meta.push(`${row.frames.toLocaleString()} frames`);
      if (Number.isFinite(row.restarts)) meta.push(`${row.restarts} restart${row.restarts === 1 ? "" : "s"}`);
      setText(node.querySelector(".source-meta"), meta.join(" · "));
      setText(node.querySelector(".source-desc"), row.source || "");
      const error = node.querySelector(".error");
      error.hidden = !row.last_error;
      setText(error, row.last_error ? oneLine(row.last_error, 300) : "");
      if (box.children[i] !== node) box.insertBefore(node, box.children[i] || null);
      if (row.frame_url) refreshFrame(s, row.frame_url);
    });
    for (const [key, s] of [...state.sources]) {
      if (!keep.has(key)) {
        if (s.url) URL.revokeObjectURL(s.url);
        s.el.remove();
        state.sources.delete(key);
      }
    }
    setText($("sources-count"), `${rows.length}`);
  }

  // The next frame is decoded off the page, then swapped in whole: the <img> on the page always
  // holds a decoded frame (no blank while the next one loads), and a frame that does not decode
  // leaves the last good one in place.
  async function refreshFrame(s, url) {
    if (s.busy) return;
    s.busy = true;
    let next = null;
    try {
      const res = await api(url, { headers: { Accept: "image/jpeg" } });
      if (!res.ok) return;
      next = URL.createObjectURL(await res.blob());
      const img = el("img", { alt: s.img.alt });
      img.src = next;
      await img.decode();
      if (state.sources.get(s.key) !== s) return; // the source left while its frame loaded
      const old = s.url;
      s.img.replaceWith(img);
      s.img = img;
      s.url = next;
      next = null;
      s.el.querySelector(".noframe").hidden = true;
      s.el.dataset.frame = "loaded";
      if (old) URL.revokeObjectURL(old);
    } catch (err) {
      if (!(err instanceof AuthError)) console.warn("frame", url, err);
    } finally {
      if (next) URL.revokeObjectURL(next);
      s.busy = false;
    }
  }

  // -- processors --------------------------------------------------------------------------------

  // A panel listing what GET `url` returns (404: none), with its count, one item per row.
  async function refreshList(url, id, empty, item) {
    const list = $(id);
    let rows;
    try {
      const res = await api(url);
      if (res.status === 404) rows = [];
      else if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      else rows = await res.json();
    } catch (err) {
      if (err instanceof AuthError) return;
      list.replaceChildren(el("li", { class: "none", text: `none (${err.message})` }));
      return;
    }
    if (!Array.isArray(rows)) rows = [];
    setText($(`${id}-count`), rows.length ? `${rows.length}` : "");
    if (rows.length === 0) list.replaceChildren(el("li", { class: "none", text: empty }));
    else list.replaceChildren(...rows.map(item));
  }

  function refreshProcessors() {
    return refreshList("/api/processors", "processors", "none", (p) => {
      const health = p.healthy ? "healthy" : "unhealthy";
      const capacity = Number(p.capacity) || 0;
      const busy = Number(p.in_flight) || 0;
      const info = [];
      if (p.state) info.push(p.state);
      if (p.circuit && p.circuit !== "closed") info.push(`circuit ${p.circuit}`);
      if (Number.isFinite(p.processed)) info.push(`${p.processed} done`);
      if (Number.isFinite(p.failed) && p.failed) info.push(`${p.failed} failed`);
      if (Number.isFinite(p.last_heartbeat)) info.push(`heartbeat ${ago(p.last_heartbeat)}`);
      if (p.host) info.push(p.host);
      return el("li", { class: "proc", "data-processor": p.processor_id, "data-healthy": String(!!p.healthy) },
        el("b", { class: "mono", text: p.processor_id }),
        el("span", { class: "badge", "data-health": health, text: health }),
        el("div", { class: "proc-caps" },
          ...(p.capabilities || []).map((c) => el("span", { class: "chip", text: c }))),
        el("div", { class: "proc-load" },
          el("span", { text: `${busy} / ${capacity} in flight` }),
          el("progress", { max: Math.max(capacity, 1), value: Math.min(busy, Math.max(capacity, 1)) })),
        info.length ? el("div", { class: "proc-info", text: info.join(" · ") }) : null);
    });
  }

  // -- detectors (host processes that copy from SD cards) ----------------------------------------

  function refreshDetectors() {
    return refreshList("/api/detectors", "detectors", "none connected", (d) => {
      const info = [];
      if (d.hostname) info.push(d.hostname);
      if (d.platform) info.push(d.platform);
      if (Number.isFinite(d.connected_at)) info.push(`connected ${ago(d.connected_at)}`);
      const cards = (d.sessions || []).map((c) => {
        const files = Number.isFinite(c.file_count) ? ` · ${c.file_count} files` : "";
        return el("span", { class: "chip", title: c.card_id || c.session_id,
                            text: `${c.label || c.card_id || c.session_id}${files}` });
      });
      return el("li", { class: "detector", "data-detector": d.detector_id },
        el("b", { class: "mono", text: d.detector_id }),
        el("div", { class: "detector-info", text: info.join(" · ") }),
        el("div", { class: "detector-cards" },
          ...(cards.length ? cards : [el("span", { class: "muted", text: "no card" })])));
    });
  }


  // -- panels of the apps served here --------------------------------------------------------------

  function objectUrl(app, key) {
    const path = String(key).split("/").map(encodeURIComponent).join("/");
    return `/api/apps/${encodeURIComponent(app)}/objects/${path}`;
  }

  // Images are fetched once per app and key, shared by the app's panels, and released when
  // no panel of the app shows them any more.
  function imageFor(entry, key, alt) {
    const img = el("img", { alt, "data-key": key });
    const id = `${entry.app}\n${key}`;
    let url = state.appImages.get(id);
    if (!url) {
      url = api(objectUrl(entry.app, key), { headers: { Accept: "image/*" } })
        .then((res) => {
          if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
          return res.blob();
        })
        .then((blob) => URL.createObjectURL(blob));
      url.catch(() => state.appImages.delete(id));
      state.appImages.set(id, url);
    }
    img.onload = () => { img.dataset.loaded = "true"; };
    url.then((u) => { img.src = u; }).catch((err) => {
      img.dataset.failed = "true";
      img.title = err instanceof AuthError ? "" : String(err.message || err);
    });
    return img;
  }

  function releaseImages(app) {
    const shown = new Set();
    for (const e of state.appPanels.values()) {
      if (e.app === app) for (const key of e.keys) shown.add(`${app}\n${key}`);
    }
    for (const [id, url] of [...state.appImages]) {
      if (!id.startsWith(`${app}\n`) || shown.has(id)) continue;
      state.appImages.delete(id);
      url.then((u) => URL.revokeObjectURL(u)).catch(() => {});
    }
  }

  function fieldText(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
    return oneLine(value, 400);
  }

  function renderAppPanel(entry, data) {
    const { panel, body } = entry;
    const keep = new Set();
    const count = entry.el.querySelector(".count");
    if (panel.kind === "status") {
      const badge = el("span", { class: "badge", "data-state": data.state || "", text: data.state || "unknown" });
      const fields = (data.fields || []).flatMap((f) => [
        el("dt", { text: f.label }), el("dd", { "data-field": f.label, text: fieldText(f.value) })]);
      body.replaceChildren(badge, el("dl", {}, ...fields));
      entry.el.dataset.state = data.state || "";
      return;
    }
    const rows = Array.isArray(data) ? data : [];
    setText(count, rows.length ? `${rows.length}` : "");
    if (rows.length === 0) {
      body.replaceChildren(el("li", { class: "none", text: "none" }));
    } else if (panel.kind === "events") {
      body.replaceChildren(...rows.map((r) => {
        if (r.image) keep.add(r.image);
        return el("li", { class: "app-ev", "data-type": r.type },
          el("time", { datetime: new Date(r.ts * 1000).toISOString(), text: clock(r.ts) }),
          el("span", { class: "ev-type", text: r.type }),
          r.image ? imageFor(entry, r.image, `snapshot of ${r.type}`) : null,
          r.text ? el("span", { class: "ev-text", text: oneLine(r.text, 200) }) : null);
      }));
    } else if (panel.kind === "images") {
      body.replaceChildren(...rows.map((r) => {
        keep.add(r.key);
        return el("li", { "data-key": r.key },
          el("figure", {}, imageFor(entry, r.key, r.caption || r.key),
            el("figcaption", { text: [r.ts ? clock(r.ts) : "", r.caption || ""].filter(Boolean).join(" · ") })));
      }));
    } else {
      body.replaceChildren(...rows.map((r) => el("li", { "data-name": r.name },
        el("b", { text: r.name }), r.text ? el("span", { class: "muted", text: oneLine(r.text, 200) }) : null)));
    }
    entry.keys = keep;
    releaseImages(entry.app);
  }

  async function refreshAppPanel(entry) {
    if (entry.busy) {
      entry.again = true;
      return;
    }
    entry.busy = true;
    try {
      renderAppPanel(entry, await apiJson(entry.panel.url));
      delete entry.el.dataset.error;
    } catch (err) {
      if (!(err instanceof AuthError)) {
        entry.el.dataset.error = err.message;
        entry.body.replaceChildren(el("li", { class: "none", text: `unavailable (${err.message})` }));
      }
    } finally {
      entry.busy = false;
      if (entry.again && state.started) {
        entry.again = false;
        refreshAppPanel(entry);
      }
    }
  }

  function appEvent(ev) {
    const app = ev.data && ev.data.app;
    if (!app) return;
    for (const entry of state.appPanels.values()) {
      if (entry.app === app && entry.panel.events.includes(ev.type)) refreshAppPanel(entry);
    }
  }

  function clearAppPanels() {
    state.appPanels.clear();
    for (const url of state.appImages.values()) url.then((u) => URL.revokeObjectURL(u)).catch(() => {});
    state.appImages.clear();
    $("app-panels").replaceChildren();
  }

  async function loadAppPanels() {
    let apps;
    try {
      const res = await api("/api/apps");
      if (!res.ok) return; // a service without the apps API
      apps = await res.json();
    } catch (err) {
      if (!(err instanceof AuthError)) console.warn("apps", err);
      return;
    }
    const box = $("app-panels");
    for (const a of Array.isArray(apps) ? apps : []) {
      for (const panel of a.panels || []) {
        const key = `${a.app}/${panel.id}`;
        if (state.appPanels.has(key)) continue;
        const body = panel.kind === "status"
          ? el("div", { class: "app-status" })
          : el("ul", { class: `app-list app-${panel.kind}` });
        const node = el("section", { class: "panel app-panel", "data-app": a.app,
          "data-panel": panel.id, "data-kind": panel.kind },
        el("h2", {}, el("span", { text: panel.title }), el("span", { class: "count" }),
          el("span", { class: "muted app-name", text: a.app })),
        body);
        box.append(node);
        const entry = { app: a.app, panel, el: node, body, busy: false, again: false, keys: new Set() };
        state.appPanels.set(key, entry);
        every(Math.max(1, Number(panel.refresh) || 10) * 1000, () => refreshAppPanel(entry));
      }
    }
  }

  // -- footer ------------------------------------------------------------------------------------

  async function refreshHealth() {
    try {
      const res = await fetch("/health", { cache: "no-store" });
      const h = await res.json();
      const parts = [`framepipe ${h.version || ""}`.trim(), `database ${h.database}`];
      if (h.jobs) parts.push(`jobs: ${h.jobs}`);
      if (Number.isFinite(h.uptime)) parts.push(`up ${seconds(h.uptime)}`);
      setText($("footer"), parts.join(" · "));
    } catch (_) {
      setText($("footer"), "the service does not answer");
    }
  }

  // -- start and stop ----------------------------------------------------------------------------

  function every(ms, fn) {
    fn();
    state.timers.push(setInterval(() => { if (!document.hidden) fn(); }, ms));
  }

  function stop() {
    if (state.started) tell("stop");
    state.started = false;
    for (const t of state.timers) clearInterval(t);
    state.timers = [];
    clearTimeout(state.wsTimer);
    for (const t of state.detailTimers.values()) clearTimeout(t);
    state.detailTimers.clear();
    if (state.ws) {
      const ws = state.ws;
      state.ws = null;
      ws.close();
    }
  }

  async function start() {
    // One call decides: the token works (or none is needed), or we ask for it.
    try {
      await apiJson("/api/executions?limit=1");
    } catch (err) {
      if (err instanceof AuthError) return;
      setConn("offline", "offline");
    }
    stop();
    state.started = true;
    state.wsAttempt = 0;
    state.lastEventId = 0;
    state.events = [];
    $("login").hidden = true;
    $("board").hidden = false;
    $("signout").hidden = !state.token;
    clearAppPanels();
    connect();
    loadAppPanels();
    every(SOURCES_EVERY_MS, refreshSources);
    every(PROCESSORS_EVERY_MS, refreshProcessors);
    every(DETECTORS_EVERY_MS, refreshDetectors);
    every(10000, refreshHealth);
    tell("start");
    // Elapsed times of running executions.
    state.timers.push(setInterval(() => {
      for (const node of document.querySelectorAll('.exec[data-status="running"]')) {
        const x = state.executions.get(node.dataset.execution);
        if (x) setText(node.querySelector(".exec-meta"), execMeta(x));
      }
    }, 1000));
  }

  function init() {
    state.token = readToken();
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token").value.trim();
      if (!value) return;
      state.token = value;
      sessionStorage.setItem(TOKEN_KEY, value);
      start();
    });
    $("signout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      state.token = null;
      state.executions.clear();
      askToken(null);
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && state.started && !state.ws) connect();
    });
    window.addEventListener("online", () => { if (state.started && !state.ws) connect(); });
    refreshHealth();
    start();
  }

  // What the modules share with this file.
  window.framepipeDashboard = Object.freeze({
    AuthError, el, setText, seconds, clock, ago, oneLine, api, apiJson,
    every(ms, fn) { every(ms, fn); },
    register(module) {
      modules.push(module);
      if (state.started && module.start) module.start();
    },
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
