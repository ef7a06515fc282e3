// The before/after page: both pictures at the same size, a slider between them, and a click that
// shows that region at 100 % of the result (previews and crops are re-encoded by the server).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const id = Number(location.pathname.split("/").pop());
  const img = (which, size, x, y) =>
    `/api/jobs/${id}/image?which=${which}&size=${size}` + (x != null ? `&x=${x.toFixed(3)}&y=${y.toFixed(3)}` : "");

  function setSlider(v) {
    $("after").style.clipPath = `inset(0 0 0 ${v}%)`;
    $("handle").style.left = `${v}%`;
  }
  $("slider").addEventListener("input", (e) => setSlider(e.target.value));
  setSlider($("slider").value);

  // zoomed: the box takes the crop's own pixel width, so the result shows at 100 %
  $("after").addEventListener("load", () => {
    $("compare").style.width = zoomed ? `${$("after").naturalWidth}px` : "";
  });
  let zoomed = false;
  let have = { before: false, after: false };
  function show(which, url) {
    if (have[which]) $(which).src = url; else $(which).removeAttribute("src");
  }
  function fit() {
    zoomed = false;
    $("compare").classList.remove("zoomed");
    show("before", img("before", "preview"));
    show("after", img("after", "preview"));
    $("fit").hidden = true;
    $("zoominfo").textContent = "click the picture to see that region at 100 %";
  }
  $("fit").addEventListener("click", fit);
  function zoomAt(x, y, what) {
    zoomed = true;
    $("compare").classList.add("zoomed");
    show("before", img("before", "crop", x, y));
    show("after", img("after", "crop", x, y));
    $("fit").hidden = false;
    $("zoominfo").textContent = `100 % of the result around ${what}`;
  }
  $("compare").addEventListener("click", (e) => {
    if (zoomed) { fit(); return; }
    if (!have.before || !have.after) return;
    const r = $("compare").getBoundingClientRect();
    const x = Math.min(1, Math.max(0, (e.clientX - r.left) / r.width));
    const y = Math.min(1, Math.max(0, (e.clientY - r.top) / r.height));
    zoomAt(x, y, "the point you clicked");
  });

  // the faces the detector found (sidecar face_boxes, relative to the picture): one click each
  function faceBoxes(sc) {
    for (const old of document.querySelectorAll("#compare .facebox")) old.remove();
    const boxes = (sc.face_boxes || []).filter((f) => f.page === 1 && Array.isArray(f.box));
    boxes.forEach((f, i) => {
      const [x0, y0, x1, y1] = f.box.map(Number);
      const b = PE.el("button", { text: String(i + 1) });
      b.type = "button";
      b.className = "facebox";
      b.title = `face ${i + 1}: see it at 100 %`;
      Object.assign(b.style, { left: `${x0 * 100}%`, top: `${y0 * 100}%`,
                               width: `${(x1 - x0) * 100}%`, height: `${(y1 - y0) * 100}%` });
      b.addEventListener("click", (e) => {
        e.stopPropagation();
        if (!have.before || !have.after) return;
        zoomAt((x0 + x1) / 2, (y0 + y1) / 2, `face ${i + 1}`);
      });
      $("compare").append(b);
    });
    if (boxes.length) $("zoominfo").textContent = `click a face (${boxes.length}) or anywhere to see it at 100 %`;
  }

  function fact(dl, k, v) {
    if (v == null || v === "") return;
    dl.append(PE.el("dt", { text: k }), PE.el("dd", { text: String(v) }));
  }

  async function load() {
    let j;
    try { j = await PE.get(`/api/jobs/${id}`); }
    catch (e) { PE.showError(`job ${id}: ${e.message}`); return; }
    document.title = `photoenhanced · ${j.path}`;
    $("title").textContent = `#${j.id} ${j.path}`;
    $("state").textContent = j.state;
    $("state").className = `badge ${j.state}`;
    const dl = $("facts");
    dl.replaceChildren();
    const sc = j.sidecar || {};
    fact(dl, "photo", j.path);
    fact(dl, "state", j.state);
    fact(dl, "profile", j.profile || sc.profile);
    fact(dl, "faces", sc.faces);
    fact(dl, "device", sc.device);
    if (sc.input) fact(dl, "input", `${sc.input.width}×${sc.input.height} ${sc.input.format || ""}`);
    if (sc.outputs && sc.outputs[0]) fact(dl, "result", `${sc.outputs[0].width}×${sc.outputs[0].height}`);
    if (sc.timings_ms) fact(dl, "time", `${Math.round(sc.timings_ms.total || 0)} ms`);
    fact(dl, "attempts", j.attempts);
    fact(dl, "error", j.error_kind ? `${j.error_kind}: ${j.last_error || ""}` : null);
    for (const o of j.outputs || []) fact(dl, j.state === "failed" ? "original (failed/)" : "result file", o.path);
    if (j.outputs && j.outputs[0]) fact(dl, "sidecar file", `${j.outputs[0].path}.json`);
    $("sidecar").textContent = j.sidecar ? JSON.stringify(j.sidecar, null, 2) : "no sidecar yet";
    // downloads by job id only (the server finds and checks the file; no path in the URL)
    const labels = { result: "result", sidecar: "sidecar (JSON)",
                     original: j.state === "failed" ? "original (failed/)" : "original (archive/)" };
    const links = Object.keys(labels).filter((k) => j.files && j.files[k]).map((k) =>
      PE.el("a", { href: `/jobs/${id}/files/${k}`, download: "", class: "file", "data-kind": k,
                   text: `download ${labels[k]}` }));
    $("files").replaceChildren(...links.flatMap((a, i) => (i ? [" · ", a] : [a])));
    $("files").hidden = !links.length;
    const missing = ["before", "after"].filter((w) => !j.images[w]);
    $("noimg").hidden = !missing.length;
    $("noimg").textContent = missing.length ? `no ${missing.join(" or ")} image (` +
      (j.state === "done" ? "the original was deleted or moved" : `the job is ${j.state}`) + ")" : "";
    have = j.images;
    if (have.before || have.after) fit();
    faceBoxes(sc);
    const retry = $("retry");
    retry.hidden = j.state !== "failed";
    retry.disabled = PE.csrf() === "";
    document.body.dataset.loaded = "1";
  }
  $("retry").addEventListener("click", async () => {
    try { await PE.post(`/api/jobs/${id}/retry`); PE.showError(""); } catch (e) { PE.showError(e.message); }
    load();
  });
  load();
})();
