// framepipe dashboard: plots drawn in the page (canvas, no library).
//
// Per source (told by dashboard.js): frames per second and each stage's latency over the last
// minutes, from GET /api/sources/{app}/{pipeline}/history (the service samples every second or
// two), with the source's restarts (source.died, source.restarting, pipeline.recovered, ...)
// marked as red lines; and a histogram of its segments' latency. Per job pipeline: a bar per
// step of its mean duration in its newest completed executions
// (GET /api/pipelines/step-durations).
"use strict";

(() => {
  const fp = window.framepipeDashboard;
  const EVERY_MS = 2000;
  const STEPS_EVERY_MS = 10000;
  const SECONDS = 300; // the longest span drawn
  const MIN_SPAN = 60; // the shortest: a source that just started fills it from the right
  const HEIGHT = 120;
  const PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d"];

  const $ = (id) => document.getElementById(id);
  const state = { cards: new Map(), durationsBusy: false }; // "app/pipeline" -> card

  function css(name, fallback) {
    const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  // A canvas sized to its box on this screen; returns its 2D context and size in CSS pixels.
  function surface(canvas) {
    const width = Math.max(120, canvas.clientWidth || canvas.parentElement.clientWidth || 300);
    const ratio = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(HEIGHT * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(HEIGHT * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, HEIGHT);
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "top";
    return { ctx, width, height: HEIGHT };
  }

  function niceTop(max) {
    if (!(max > 0)) return 1;
    const step = 10 ** Math.floor(Math.log10(max));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= max) return m * step;
    return 10 * step;
  }

  function label(value, unit) {
    const text = value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
    return `${text.replace(/\.?0+$/, "") || "0"} ${unit}`;
  }

  // Lines of [t, v] points between t0 and t1, markers as vertical lines, the top value labelled.
  function drawSeries(canvas, series, t0, t1, markers, unit) {
    const { ctx, width, height } = surface(canvas);
    const pad = { l: 4, r: 4, t: 16, b: 14 };
    const w = width - pad.l - pad.r;
    const h = height - pad.t - pad.b;
    const muted = css("--muted", "#667085");
    const top = niceTop(Math.max(0, ...series.flatMap((s) => s.points.map((p) => p[1]))));
    const x = (t) => pad.l + ((t - t0) / Math.max(1e-9, t1 - t0)) * w;
    const y = (v) => pad.t + h - (v / top) * h;
    ctx.strokeStyle = css("--line", "#e3e6ea");
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (const v of [0, top / 2, top]) {
      ctx.moveTo(pad.l, Math.round(y(v)) + 0.5);
      ctx.lineTo(pad.l + w, Math.round(y(v)) + 0.5);
    }
    ctx.stroke();
    ctx.strokeStyle = css("--bad", "#c62828");
    ctx.lineWidth = 1.5;
    for (const m of markers) {
      if (m.ts < t0 || m.ts > t1) continue;
      ctx.beginPath();
      ctx.moveTo(x(m.ts), pad.t);
      ctx.lineTo(x(m.ts), pad.t + h);
      ctx.stroke();
    }
    let points = 0;
    let legend = pad.l;
    series.forEach((s) => {
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 1.8;
      ctx.beginPath();
      let drawing = false;
      for (const [t, v] of s.points) {
        if (v === null || !Number.isFinite(v)) { drawing = false; continue; }
        if (drawing) ctx.lineTo(x(t), y(v));
        else ctx.moveTo(x(t), y(v));
        drawing = true;
        points += 1;
      }
      ctx.stroke();
      ctx.fillStyle = s.color;
      ctx.fillText(s.name, legend, 1);
      legend += ctx.measureText(s.name).width + 10;
    });
    ctx.fillStyle = muted;
    ctx.textAlign = "right";
    ctx.fillText(label(top, unit), width - pad.r, 1);
    ctx.textBaseline = "bottom";
    ctx.fillText("now", width - pad.r, height);
    ctx.textAlign = "left";
    const span = t1 - t0;
    ctx.fillText(span >= 90 ? `−${Math.round(span / 60)} min` : `−${Math.round(span)} s`, pad.l, height);
    canvas.dataset.points = String(points);
    canvas.dataset.markers = String(markers.filter((m) => m.ts >= t0 && m.ts <= t1).length);
    canvas.dataset.last = String(t1);
  }

  function drawHistogram(canvas, hist) {
    const { ctx, width, height } = surface(canvas);
    const pad = { l: 4, r: 4, t: 16, b: 14 };
    const counts = hist.counts || [];
    const edges = hist.edges || [];
    const top = Math.max(1, ...counts);
    const w = (width - pad.l - pad.r) / Math.max(1, counts.length);
    const h = height - pad.t - pad.b;
    ctx.fillStyle = css("--accent", "#2563eb");
    counts.forEach((c, i) => {
      const bar = (c / top) * h;
      if (c > 0) ctx.fillRect(pad.l + i * w + 1, pad.t + h - bar, Math.max(1, w - 2), bar);
    });
    ctx.fillStyle = css("--muted", "#667085");
    ctx.fillText(`segment latency · ${hist.count} segment${hist.count === 1 ? "" : "s"}`, pad.l, 1);
    ctx.textAlign = "right";
    ctx.fillText(`${top} in the fullest bin`, width - pad.r, 1);
    ctx.textBaseline = "bottom";
    ctx.fillText(label(edges[edges.length - 1] || 0, "s"), width - pad.r, height);
    ctx.textAlign = "left";
    ctx.fillText("0 s", pad.l, height);
    canvas.dataset.count = String(hist.count || 0);
  }

  function card(app, pipeline) {
    const key = `${app}/${pipeline}`;
    let c = state.cards.get(key);
    if (c) return c;
    const box = $("plots");
    box.querySelector(":scope > .none")?.remove();
    const fps = fp.el("canvas", { class: "plot plot-fps", role: "img", "aria-label": `frames per second of ${key}` });
    const latency = fp.el("canvas", { class: "plot plot-latency", role: "img", "aria-label": `stage latency of ${key}` });
    const hist = fp.el("canvas", { class: "plot plot-hist", role: "img", "aria-label": `segment latency of ${key}` });
    const node = fp.el("article", { class: "plot-card", "data-source": key },
      fp.el("div", { class: "plot-head" }, fp.el("b", { text: pipeline }), fp.el("span", { class: "muted", text: app }),
        fp.el("span", { class: "plot-now muted" })),
      fps, latency, hist);
    box.append(node);
    c = { key, app, pipeline, el: node, fps, latency, hist, busy: false, data: null };
    state.cards.set(key, c);
    return c;
  }

  function draw(c) {
    const h = c.data;
    if (!h) return;
    const samples = h.samples || [];
    const t1 = samples.length ? samples[samples.length - 1].ts : Date.now() / 1000;
    const span = samples.length ? Math.min(SECONDS, Math.max(MIN_SPAN, t1 - samples[0].ts)) : MIN_SPAN;
    const t0 = t1 - span;
    const markers = h.markers || [];
    drawSeries(c.fps, [{ name: "frames/s", color: css("--accent", "#2563eb"),
      points: samples.map((s) => [s.ts, s.fps]) }], t0, t1, markers, "fps");
    const stages = [...new Set(samples.flatMap((s) => Object.keys(s.latency_ms || {})))];
    drawSeries(c.latency, stages.map((name, i) => ({ name, color: PALETTE[i % PALETTE.length],
      points: samples.map((s) => [s.ts, (s.latency_ms || {})[name] ?? null]) })), t0, t1, markers, "ms");
    if (!stages.length) c.latency.dataset.empty = "true";
    else delete c.latency.dataset.empty;
    drawHistogram(c.hist, h.segment_latency || { counts: [], edges: [], count: 0 });
    c.hist.hidden = !(h.segment_latency && h.segment_latency.count > 0);
    const last = samples[samples.length - 1];
    const now = [];
    if (last && Number.isFinite(last.fps)) now.push(`${last.fps.toFixed(1)} fps`);
    if (markers.length) now.push(`${markers.length} restart event${markers.length === 1 ? "" : "s"}`);
    fp.setText(c.el.querySelector(".plot-now"), now.join(" · "));
  }

  async function refresh(c) {
    if (c.busy) return;
    c.busy = true;
    try {
      const path = `/api/sources/${encodeURIComponent(c.app)}/${encodeURIComponent(c.pipeline)}/history?seconds=${SECONDS}`;
      c.data = await fp.apiJson(path);
      draw(c);
      delete c.el.dataset.error;
    } catch (err) {
      if (!(err instanceof fp.AuthError)) c.el.dataset.error = err.message;
    } finally {
      c.busy = false;
    }
  }

  function duration(s) {
    if (!Number.isFinite(s)) return "";
    return s < 1 ? `${Math.round(s * 1000)} ms` : fp.seconds(s);
  }

  function sources(rows) {
    const keep = new Set();
    for (const r of rows) {
      const fresh = !state.cards.has(`${r.app}/${r.pipeline}`);
      const c = card(r.app, r.pipeline);
      keep.add(c.key);
      if (fresh) refresh(c);
    }
    for (const [key, c] of [...state.cards]) {
      if (!keep.has(key)) {
        c.el.remove();
        state.cards.delete(key);
      }
    }
    if (!state.cards.size) $("plots").replaceChildren(fp.el("p", { class: "none", text: "no live sources" }));
  }

  async function refreshDurations() {
    if (state.durationsBusy) return;
    state.durationsBusy = true;
    const box = $("step-plots");
    try {
      const rows = await fp.apiJson("/api/pipelines/step-durations");
      if (!Array.isArray(rows) || rows.length === 0) {
        box.replaceChildren(fp.el("p", { class: "none", text: "no completed executions yet" }));
        return;
      }
      box.replaceChildren(...rows.map((p) => {
        const top = Math.max(1e-6, ...p.steps.map((s) => s.mean_s));
        return fp.el("div", { class: "durations", "data-pipeline": p.pipeline },
          fp.el("div", { class: "plot-head" }, fp.el("b", { text: p.pipeline }),
            fp.el("span", { class: "muted", text: `step durations · ${p.executions} execution${p.executions === 1 ? "" : "s"}` })),
          fp.el("dl", { class: "bars" }, ...p.steps.flatMap((s) => [
            fp.el("dt", { text: s.name }),
            fp.el("dd", { "data-step": s.name },
              fp.el("progress", { max: top, value: s.mean_s, "aria-label": `mean duration of ${s.name}` }),
              fp.el("span", { class: "muted", text: `${duration(s.mean_s)} (max ${duration(s.max_s)})` })),
          ])));
      }));
    } catch (err) {
      if (!(err instanceof fp.AuthError)) box.replaceChildren(fp.el("p", { class: "none", text: `unavailable (${err.message})` }));
    } finally {
      state.durationsBusy = false;
    }
  }

  let resized = null;
  function start() {
    fp.every(EVERY_MS, () => { for (const c of state.cards.values()) refresh(c); });
    fp.every(STEPS_EVERY_MS, refreshDurations);
    if (!resized) {
      resized = () => { for (const c of state.cards.values()) draw(c); };
      window.addEventListener("resize", resized);
    }
  }

  function stop() {
    state.cards.clear();
    $("plots").replaceChildren(fp.el("p", { class: "none", text: "none" }));
    $("step-plots").replaceChildren();
  }

  function event(ev) {
    if (ev.type === "execution.completed") refreshDurations();
  }

  fp.register({ start, stop, sources, event });
})();
