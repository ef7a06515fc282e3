// photoenhanced — helpers shared by the pages. Every name reaches the page through textContent
// (never innerHTML), already in the server's escaped display form.
"use strict";
const PE = {
  csrf() {
    const m = document.cookie.match(/(?:^|;\s*)pe_csrf=([0-9a-f]+)/);
    return m ? m[1] : "";
  },
  async get(path) {
    const r = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(`${path}: ${r.status}`);
    return r.json();
  },
  async post(path, json) {
    const headers = { "X-CSRF-Token": PE.csrf(), Accept: "application/json" };
    if (json !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method: "POST", credentials: "same-origin", headers,
                                  body: json === undefined ? undefined : JSON.stringify(json) });
    let body = {};
    try { body = await r.json(); } catch (e) { /* empty */ }
    if (!r.ok) {
      const err = new Error(body.error || `${path}: ${r.status}`);
      err.body = body;
      throw err;
    }
    return body;
  },
  // Seconds left for the photo in hand: from its tile rate (tiles per second, measured on the
  // daemon's clock) when the enhancer reports tiles, else from the mean time per photo; null when
  // neither is known. `now`: seconds since the epoch, `updated`: when the daemon wrote `cur`.
  photoEta(cur, rate, mean, now, updated) {
    if (!cur) return null;
    const elapsed = cur.started ? now - cur.started : null;
    if (cur.tiles_total && rate > 0) {
      const left = (cur.tiles_total - (cur.tiles_done || 0)) / rate - (updated ? Math.max(0, now - updated) : 0);
      return Math.max(0, left);
    }
    if (mean != null && elapsed != null) return Math.max(0, mean - elapsed);
    return null;
  },
  // Seconds until the queue is empty: the photo in hand, then `pending` photos at the mean time
  // per photo, shared among `workers` daemons (several hosts on a shared queue).
  queueEta(photoLeft, pending, mean, workers) {
    if (mean == null) return null;
    return (photoLeft || 0) + (pending * mean) / Math.max(1, workers || 1);
  },
  el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c != null) e.append(c);
    return e;
  },
  duration(s) {
    if (s == null || !isFinite(s)) return "–";
    s = Math.max(0, Math.round(s));
    if (s < 90) return `${s} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  },
  showError(msg) {
    const e = document.getElementById("error");
    if (!e) return;
    e.textContent = msg || "";
    e.hidden = !msg;
  },
};
