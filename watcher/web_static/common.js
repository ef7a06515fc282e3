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
  async post(path) {
    const r = await fetch(path, { method: "POST", credentials: "same-origin",
                                  headers: { "X-CSRF-Token": PE.csrf(), Accept: "application/json" } });
    let body = {};
    try { body = await r.json(); } catch (e) { /* empty */ }
    if (!r.ok) throw new Error(body.error || `${path}: ${r.status}`);
    return body;
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
