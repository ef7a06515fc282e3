// The dashboard: polls /api/status and /api/jobs every 2 s and redraws without reloading.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const authed = PE.csrf() !== "";
  $("auth").hidden = authed;

  function meanSeconds(metrics) {
    const t = metrics && metrics.stages && metrics.stages.total;
    return t && t.count ? t.sum_ms / t.count / 1000 : null;
  }

  // Tile reports of the photo in hand ([daemon time, tiles done]) → tiles per second.
  const tiles = { key: null, samples: [] };
  function tileRate(cur, updated) {
    if (!cur || !cur.tiles_total || updated == null) { tiles.key = null; tiles.samples = []; return null; }
    const key = `${cur.job}|${cur.page || 1}|${cur.tiles_total}`;
    if (key !== tiles.key) { tiles.key = key; tiles.samples = []; }
    const done = cur.tiles_done || 0;
    const last = tiles.samples[tiles.samples.length - 1];
    if (!last || (last[1] !== done && updated > last[0])) tiles.samples.push([updated, done]);
    if (tiles.samples.length > 30) tiles.samples.shift();
    const [t0, d0] = tiles.samples[0];
    const [t1, d1] = tiles.samples[tiles.samples.length - 1];
    if (t1 > t0 && d1 > d0) return (d1 - d0) / (t1 - t0);
    // one report so far: its tiles over the time since the photo was claimed (includes decoding)
    return done && cur.started && updated > cur.started ? done / (updated - cur.started) : null;
  }

  function drawStatus(s) {
    const d = s.daemon;
    const state = d.paused && d.state !== "working" && d.running ? "paused" : d.state || "stopped";
    $("state").textContent = state;
    $("state").className = `badge ${state}`;
    $("reason").textContent = d.reason || (d.running ? "" : "the daemon is not running");
    for (const k of ["pending", "running", "done", "failed"]) $(`n-${k}`).textContent = s.counts[k];
    $("n-hour").textContent = s.throughput ? s.throughput.done_last_hour : "–";
    $("pause").disabled = !authed || d.paused;
    $("enqueue").disabled = !authed;
    $("resume").disabled = !authed || !d.paused;
    const cur = s.current;
    const box = $("current");
    box.replaceChildren();
    const mean = meanSeconds(s.metrics);
    const now = Date.now() / 1000;
    const rate = tileRate(cur, d.updated);
    const left = PE.photoEta(cur, rate, mean, now, d.updated);
    if (cur) {
      const elapsed = cur.started ? now - cur.started : null;
      const total = cur.tiles_total, done = cur.tiles_done || 0;
      const pct = total ? (100 * done) / total : mean && elapsed != null ? Math.min(99, (100 * elapsed) / mean) : 0;
      const bar = PE.el("div", { class: "bar", id: "bar" }, PE.el("div"));
      bar.firstChild.style.width = `${pct.toFixed(0)}%`;
      box.append(
        PE.el("a", { class: "name", href: `/jobs/${cur.job}`, text: cur.path || "" }),
        PE.el("div", { text: `stage: ${cur.stage || "?"}` + (cur.page ? ` · page ${cur.page}` : "") +
                             (cur.faces != null ? ` · ${cur.faces} faces` : "") }),
        total ? PE.el("div", { id: "tiles", text: `tiles ${done}/${total}` }) : null,
        bar,
        PE.el("div", { id: "eta", class: "note", text: `running ${PE.duration(elapsed)} · ETA ${PE.duration(left)}` +
                       (rate && total ? ` (${rate >= 1 ? rate.toFixed(1) : rate.toPrecision(2)} tiles/s)`
                        : mean ? ` (mean ${PE.duration(mean)} per photo)` : "") }));
    } else {
      box.textContent = "nothing in hand";
    }
    if (mean && s.counts.pending) {
      const alive = (s.hosts || []).filter((h) => h.health === "alive").length;
      const all = PE.queueEta(left, s.counts.pending, mean, alive);
      box.append(PE.el("div", { id: "queue-eta", class: "note",
        text: `queue: ${s.counts.pending} pending · done in ≈ ${PE.duration(all)}` +
              ` (mean ${PE.duration(mean)} per photo${alive > 1 ? `, ${alive} hosts` : ""})` }));
    }
  }

  function enqueueResult(r) {
    if (r.outcome === "queued") return `job ${r.job}: queued ${r.path}`;
    if (r.outcome === "active" || r.outcome === "busy") return `${r.path}: already queued` + (r.job ? ` (job ${r.job})` : "");
    return `${r.path}: ${r.outcome}` + (r.reason ? ` — ${r.reason}` : "");
  }

  $("enqueue-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const path = $("enqueue-path").value.trim();
    if (!path) return;
    const out = $("enqueue-result");
    $("enqueue").disabled = true;
    try {
      const body = await PE.post("/api/enqueue", { paths: [path] });
      out.textContent = body.results.map(enqueueResult).join("; ");
      out.className = "note ok";
      $("enqueue-path").value = "";
    } catch (e) {
      const rs = e.body && e.body.results;
      out.textContent = rs ? rs.map(enqueueResult).join("; ") : `enqueue: ${e.message}`;
      out.className = "note error";
    }
    $("enqueue").disabled = !authed;
    refresh();
  });

  function drawRecent(jobs) {
    const box = $("recent");
    const have = [...box.children].map((c) => c.dataset.job).join(",");
    if (have === jobs.map((j) => String(j.id)).join(",")) return;   // keep loaded thumbnails
    box.replaceChildren(...jobs.map((j) => {
      const a = PE.el("a", { class: "thumb", href: `/jobs/${j.id}`, title: j.path },
        PE.el("img", { src: `/api/jobs/${j.id}/image?which=after&size=thumb`, alt: j.path, loading: "lazy" }),
        PE.el("span", { text: j.path }));
      a.dataset.job = String(j.id);
      return a;
    }));
    if (!jobs.length) box.append(PE.el("span", { class: "note", text: "no results yet" }));
  }

  function drawFailed(jobs) {
    const body = $("failed").tBodies[0];
    body.replaceChildren(...jobs.map((j) => PE.el("tr", { "data-job": j.id },
      PE.el("td", {}, PE.el("a", { href: `/jobs/${j.id}`, text: `#${j.id}` })),
      PE.el("td", { class: "name", text: j.path }),
      PE.el("td", { text: j.error_kind || "" }),
      PE.el("td", { class: "msg", text: j.last_error || "" }),
      PE.el("td", {}, PE.el("button", { class: "retry", type: "button", text: "Retry",
        ...(authed ? {} : { disabled: "" }),
        onclick: async (ev) => {
          ev.target.disabled = true;
          try { await PE.post(`/api/jobs/${j.id}/retry`); PE.showError(""); }
          catch (e) { PE.showError(`retry #${j.id}: ${e.message}`); }
          refresh();
        } })))));
    if (!jobs.length) body.append(PE.el("tr", {}, PE.el("td", { colspan: "5", class: "note", text: "none" })));
  }

  let timer = null;
  async function refresh() {
    clearTimeout(timer);
    try {
      const [s, recent, failed] = await Promise.all([
        PE.get("/api/status"),
        PE.get("/api/jobs?state=done&order=desc&limit=12"),
        PE.get("/api/jobs?state=failed&order=desc&limit=50")]);
      drawStatus(s);
      drawRecent(recent);
      drawFailed(failed);
      $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      if (!document.body.dataset.loaded) document.body.dataset.loadedMs = String(Math.round(performance.now()));
      document.body.dataset.loaded = "1";
      if ($("error").dataset.poll) { PE.showError(""); delete $("error").dataset.poll; }
    } catch (e) {
      PE.showError(`cannot reach the web process: ${e.message}`);
      $("error").dataset.poll = "1";
    }
    timer = setTimeout(refresh, 2000);
  }

  for (const [id, path] of [["pause", "/api/pause"], ["resume", "/api/resume"]]) {
    $(id).addEventListener("click", async () => {
      try { await PE.post(path); PE.showError(""); } catch (e) { PE.showError(`${id}: ${e.message}`); }
      refresh();
    });
  }
  refresh();
})();
