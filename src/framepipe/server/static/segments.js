// framepipe dashboard: the segments view (orders, visits) of each live app.
//
// For every app with sources (told by dashboard.js), GET /api/segments/{app} is read every few
// seconds and at once when one of the app's segment.completed events arrives over the live
// feed. Each segment shows its id, source, frames, duration, latency, why it closed, the fields
// the app shows, and a strip of its stored frames: thumbnails made on the server
// (GET /api/segments/{app}/{pipeline}/frames/{key}?width=...), fetched with the token only
// once they scroll into view, the selected (best) frames marked. A click on a frame opens the
// viewer, which steps through the segment's frames (buttons, arrow keys; Escape closes).
"use strict";

(() => {
  const fp = window.framepipeDashboard;
  const EVERY_MS = 5000;
  const LIMIT = 12;
  const STRIP = 24; // thumbnails per strip at most (evenly spread; the viewer has them all)
  const THUMB = 160;
  const VIEW = 960;

  const $ = (id) => document.getElementById(id);
  const state = {
    apps: new Map(), // app -> {el, list, busy, again, signature, segments}
    images: new Map(), // url -> Promise of a blob: URL
    observer: null,
    viewer: null, // {app, segment, keys, index}
  };

  function frameUrl(app, pipeline, key, width) {
    const path = String(key).split("/").map(encodeURIComponent).join("/");
    return `/api/segments/${encodeURIComponent(app)}/${encodeURIComponent(pipeline)}/frames/${path}?width=${width}`;
  }

  // The service makes a few thumbnails at a time and answers 503 with Retry-After to a
  // request that got no turn: it is asked again after that many seconds (1-10), a few times.
  const BUSY_TRIES = 5;

  function fetchImage(url, tries) {
    return fp.api(url, { headers: { Accept: "image/jpeg" } }).then((res) => {
      if (res.status === 503 && tries > 1) {
        const after = Math.min(10, Math.max(1, Number(res.headers.get("Retry-After")) || 2));
        const jitter = 0.75 + Math.random() / 2; // the images answered busy together spread out
        return new Promise((done) => setTimeout(done, after * 1000 * jitter))
          .then(() => fetchImage(url, tries - 1));
      }
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      return res.blob();
    });
  }

  function blobFor(url) {
    let found = state.images.get(url);
    if (!found) {
      found = fetchImage(url, BUSY_TRIES).then((blob) => URL.createObjectURL(blob));
      found.catch(() => state.images.delete(url));
      state.images.set(url, found);
    }
    return found;
  }

  function show(img) {
    const url = img.dataset.url;
    if (!url || img.dataset.requested) return;
    img.dataset.requested = "true";
    img.onload = () => { img.dataset.loaded = "true"; };
    blobFor(url).then((u) => { img.src = u; }).catch((err) => {
      img.dataset.failed = "true";
      img.title = err instanceof fp.AuthError ? "" : String(err.message || err);
    });
  }

  // A thumbnail fetched once it comes near the screen (an <img> cannot send the token itself).
  function lazyImage(url, alt, cls) {
    const img = fp.el("img", { alt, class: cls, loading: "lazy", decoding: "async", "data-url": url,
      width: THUMB, height: Math.round(THUMB * 9 / 16) });
    if (state.observer) state.observer.observe(img);
    else show(img);
    return img;
  }

  function release(keep) {
    for (const [url, blob] of [...state.images]) {
      if (keep.has(url)) continue;
      state.images.delete(url);
      blob.then((u) => URL.revokeObjectURL(u)).catch(() => {});
    }
  }

  function isBest(segment, key) {
    return (segment.selected || []).some((s) => s === key || s.endsWith(`/${key}`));
  }

  // At most STRIP of the stored frames, evenly spread, with every selected one.
  function stripIndexes(segment) {
    const n = segment.stored.length;
    const picked = new Set();
    const step = Math.max(1, n / STRIP);
    for (let i = 0; i < n && picked.size < STRIP; i += step) picked.add(Math.floor(i));
    segment.stored.forEach((key, i) => { if (isBest(segment, key)) picked.add(i); });
    return [...picked].sort((a, b) => a - b);
  }

  function fieldNode(app, segment, f, keep) {
    if (f.image) {
      const url = frameUrl(app, segment.pipeline, f.image, THUMB);
      keep.add(url);
      return fp.el("span", { class: "seg-field seg-field-image", "data-field": f.label },
        fp.el("span", { class: "muted", text: f.label }), lazyImage(url, `${f.label} of ${segment.segment_id}`, "seg-snapshot"));
    }
    let value = f.value;
    if (value === null || value === undefined) value = "–";
    else if (typeof value === "number" && !Number.isInteger(value)) value = value.toFixed(3);
    return fp.el("span", { class: "seg-field chip", "data-field": f.label },
      fp.el("span", { class: "muted", text: `${f.label} ` }), fp.el("b", { text: fp.oneLine(String(value), 120) }));
  }

  function segmentNode(app, segment, keep) {
    const facts = [
      `${segment.frames} frame${segment.frames === 1 ? "" : "s"}`,
      Number.isFinite(segment.duration_s) ? `${segment.duration_s.toFixed(1)} s long` : null,
      Number.isFinite(segment.latency_s) ? `latency ${segment.latency_s.toFixed(2)} s` : null,
    ].filter(Boolean);
    const strip = fp.el("div", { class: "strip", role: "list", "aria-label": `frames of ${segment.segment_id}` });
    for (const i of stripIndexes(segment)) {
      const key = segment.stored[i];
      const url = frameUrl(app, segment.pipeline, key, THUMB);
      keep.add(url);
      const best = isBest(segment, key);
      const button = fp.el("button", { type: "button", class: best ? "thumb best" : "thumb", role: "listitem",
        "data-index": i, "data-key": key, "data-best": best ? "true" : null,
        title: best ? `frame ${i + 1} (selected)` : `frame ${i + 1}` },
      lazyImage(url, `frame ${i + 1} of ${segment.segment_id}`, "thumb-img"));
      button.addEventListener("click", () => openViewer(app, segment, i));
      strip.append(button);
    }
    if (segment.stored.length === 0) strip.append(fp.el("span", { class: "muted", text: "no stored frames" }));
    const fields = (segment.fields || []).map((f) => fieldNode(app, segment, f, keep));
    return fp.el("li", { class: "segment", "data-segment": segment.segment_id, "data-pipeline": segment.pipeline },
      fp.el("div", { class: "seg-head" },
        fp.el("b", { class: "mono seg-id", text: segment.segment_id }),
        fp.el("span", { class: "muted", text: segment.source_id || segment.pipeline }),
        segment.reason ? fp.el("span", { class: "badge seg-reason", "data-reason": segment.reason, text: segment.reason }) : null,
        fp.el("time", { class: "muted seg-time", datetime: new Date(segment.completed_at * 1000).toISOString(),
          text: fp.clock(segment.completed_at) })),
      fp.el("div", { class: "seg-facts muted", text: facts.join(" · ") }),
      fields.length ? fp.el("div", { class: "seg-fields" }, ...fields) : null,
      strip);
  }

  function render(app, entry, page) {
    const segments = Array.isArray(page.segments) ? page.segments : [];
    const signature = segments.map((s) => `${s.pipeline}/${s.segment_id}/${s.completed_at}`).join("|");
    fp.setText(entry.el.querySelector(".count"), segments.length ? `${segments.length}` : "");
    if (signature === entry.signature) return;
    entry.signature = signature;
    entry.segments = segments;
    if (segments.length === 0) {
      entry.list.replaceChildren(fp.el("li", { class: "none", text: "no completed segments yet" }));
    } else {
      entry.keep = new Set();
      entry.list.replaceChildren(...segments.map((s) => segmentNode(app, s, entry.keep)));
    }
    const keep = new Set();
    for (const e of state.apps.values()) for (const url of e.keep || []) keep.add(url);
    if (state.viewer) for (const url of state.viewer.urls) keep.add(url);
    release(keep);
  }

  async function refresh(app) {
    const entry = state.apps.get(app);
    if (!entry) return;
    if (entry.busy) {
      entry.again = true;
      return;
    }
    entry.busy = true;
    try {
      render(app, entry, await fp.apiJson(`/api/segments/${encodeURIComponent(app)}?limit=${LIMIT}`));
      delete entry.el.dataset.error;
    } catch (err) {
      if (!(err instanceof fp.AuthError)) {
        entry.el.dataset.error = err.message;
        entry.signature = null;
        entry.list.replaceChildren(fp.el("li", { class: "none", text: `unavailable (${err.message})` }));
      }
    } finally {
      entry.busy = false;
      if (entry.again) {
        entry.again = false;
        refresh(app);
      }
    }
  }

  function sources(rows) {
    const box = $("segments");
    const apps = [...new Set(rows.map((r) => r.app))];
    for (const app of apps) {
      if (state.apps.has(app)) continue;
      box.querySelector(":scope > .none")?.remove();
      const list = fp.el("ol", { class: "seg-list" });
      const node = fp.el("section", { class: "seg-app", "data-app": app },
        fp.el("h3", {}, fp.el("span", { text: app }), fp.el("span", { class: "count" })), list);
      box.append(node);
      state.apps.set(app, { el: node, list, busy: false, again: false, signature: null, keep: new Set() });
      refresh(app);
    }
    fp.setText($("segments-count"), state.apps.size ? `${state.apps.size} app${state.apps.size === 1 ? "" : "s"}` : "");
  }

  // -- the viewer ----------------------------------------------------------------------------------

  function openViewer(app, segment, index) {
    const keys = segment.stored;
    if (!keys.length) return;
    state.viewer = { app, segment, keys, index, urls: new Set(), opener: document.activeElement };
    const v = $("viewer");
    v.hidden = false;
    fp.setText(v.querySelector(".viewer-title"), `${segment.segment_id} · ${segment.source_id || segment.pipeline}`);
    step(0);
    v.querySelector('[data-action="next"]').focus();
  }

  function closeViewer() {
    const v = $("viewer");
    v.hidden = true;
    const opener = state.viewer && state.viewer.opener;
    state.viewer = null;
    if (opener && opener.focus) opener.focus();
  }

  function step(delta) {
    const view = state.viewer;
    if (!view) return;
    const n = view.keys.length;
    view.index = Math.max(0, Math.min(n - 1, view.index + delta));
    const key = view.keys[view.index];
    const v = $("viewer");
    const img = v.querySelector(".viewer-img");
    const url = frameUrl(view.app, view.segment.pipeline, key, VIEW);
    view.urls.add(url);
    v.dataset.index = String(view.index);
    v.dataset.key = key;
    const best = isBest(view.segment, key);
    v.dataset.best = best ? "true" : "false";
    fp.setText(v.querySelector(".viewer-pos"), `frame ${view.index + 1} of ${n}${best ? " · selected" : ""}`);
    v.querySelector('[data-action="prev"]').disabled = view.index === 0;
    v.querySelector('[data-action="next"]').disabled = view.index === n - 1;
    img.alt = `frame ${view.index + 1} of ${view.segment.segment_id}`;
    delete img.dataset.loaded;
    img.onload = () => { if (img.dataset.url === url) img.dataset.loaded = "true"; };
    img.dataset.url = url;
    blobFor(url).then((u) => { if (img.dataset.url === url) img.src = u; }).catch(() => {});
    // The next frame is on its way before it is asked for.
    if (view.index + 1 < n) blobFor(frameUrl(view.app, view.segment.pipeline, view.keys[view.index + 1], VIEW)).catch(() => {});
  }

  function buildViewer() {
    const close = fp.el("button", { type: "button", class: "link", "data-action": "close", text: "Close" });
    const prev = fp.el("button", { type: "button", "data-action": "prev", "aria-label": "previous frame", text: "‹ Prev" });
    const next = fp.el("button", { type: "button", "data-action": "next", "aria-label": "next frame", text: "Next ›" });
    const v = fp.el("div", { id: "viewer", class: "viewer", role: "dialog", "aria-modal": "true",
      "aria-label": "frames of a segment", hidden: true },
    fp.el("div", { class: "viewer-box" },
      fp.el("div", { class: "viewer-head" }, fp.el("b", { class: "viewer-title mono" }), close),
      fp.el("img", { class: "viewer-img", alt: "" }),
      fp.el("div", { class: "viewer-nav" }, prev, fp.el("span", { class: "viewer-pos muted" }), next)));
    close.addEventListener("click", closeViewer);
    prev.addEventListener("click", () => step(-1));
    next.addEventListener("click", () => step(1));
    v.addEventListener("click", (ev) => { if (ev.target === v) closeViewer(); });
    document.addEventListener("keydown", (ev) => {
      if (!state.viewer) return;
      if (ev.key === "ArrowRight") { step(1); ev.preventDefault(); }
      else if (ev.key === "ArrowLeft") { step(-1); ev.preventDefault(); }
      else if (ev.key === "Escape") { closeViewer(); ev.preventDefault(); }
    });
    document.body.append(v);
  }

  // -- lifecycle ---------------------------------------------------------------------------------

  function start() {
    if (!$("viewer")) buildViewer();
    if (!state.observer && "IntersectionObserver" in window) {
      state.observer = new IntersectionObserver((entries) => {
        for (const e of entries) {
          if (e.isIntersecting) {
            state.observer.unobserve(e.target);
            show(e.target);
          }
        }
      }, { rootMargin: "300px" });
    }
    fp.every(EVERY_MS, () => { for (const app of state.apps.keys()) refresh(app); });
  }

  function stop() {
    if (state.viewer) closeViewer();
    for (const blob of state.images.values()) blob.then((u) => URL.revokeObjectURL(u)).catch(() => {});
    state.images.clear();
    state.apps.clear();
    $("segments").replaceChildren(fp.el("p", { class: "none", text: "none" }));
    fp.setText($("segments-count"), "");
  }

  function event(ev) {
    const app = ev.data && ev.data.app;
    if (ev.type === "segment.completed" && app && state.apps.has(app)) refresh(app);
  }

  fp.register({ start, stop, sources, event });
})();
