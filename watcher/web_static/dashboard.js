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

  function drawStatus(s) {
    const d = s.daemon;
    const state = d.paused && d.state !== "working" && d.running ? "paused" : d.state || "stopped";
    $("state").textContent = state;
    $("state").className = `badge ${state}`;
    $("reason").textContent = d.reason || (d.running ? "" : "the daemon is not running");
    for (const k of ["pending", "running", "done", "failed"]) $(`n-${k}`).textContent = s.counts[k];
    $("n-hour").textContent = s.throughput ? s.throughput.done_last_hour : "–";
    $("pause").disabled = !authed || d.paused;
    $("resume").disabled = !authed || !d.paused;
    const cur = s.current;
    const box = $("current");
    box.replaceChildren();
    const mean = meanSeconds(s.metrics);
    if (cur) {
      const elapsed = cur.started ? Date.now() / 1000 - cur.started : null;
      const eta = mean != null && elapsed != null ? mean - elapsed : null;
      const pct = mean && elapsed != null ? Math.min(99, (100 * elapsed) / mean) : 0;
      const bar = PE.el("div", { class: "bar" }, PE.el("div"));
      bar.firstChild.style.width = `${pct.toFixed(0)}%`;
      box.append(
        PE.el("a", { class: "name", href: `/jobs/${cur.job}`, text: cur.path || "" }),
        PE.el("div", { text: `stage: ${cur.stage || "?"}` + (cur.page ? ` · page ${cur.page}` : "") +
                             (cur.faces != null ? ` · ${cur.faces} faces` : "") }),
        bar,
        PE.el("div", { class: "note", text: `running ${PE.duration(elapsed)} · ETA ${PE.duration(eta)}` +
                       (mean ? ` (mean ${PE.duration(mean)} per photo)` : "") }));
    } else {
      box.textContent = "nothing in hand";
    }
    if (mean && s.counts.pending) {
      box.append(PE.el("div", { class: "note",
        text: `queue: ${s.counts.pending} pending ≈ ${PE.duration(mean * s.counts.pending)}` }));
    }
  }

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
