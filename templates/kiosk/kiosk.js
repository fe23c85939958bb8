// The USB export kiosk's page: shows the snapshot from /api/state and every update pushed on
// /api/events (Server-Sent Events). Values are set with textContent only, never as markup.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const selected = new Set();
  let snap = null;
  let chosenStick = null;
  let pendingConfirm = null;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function post(path, body) {
    return fetch(path, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-Kiosk": "1"},
      body: JSON.stringify(body || {}),
    }).then((r) => r.json().catch(() => ({})).then((data) => {
      if (!r.ok) showProblem(data.error || "That did not work. Please try again.");
      return data;
    }));
  }

  function showProblem(text) { $("action-hint").textContent = text; }

  function minutes(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (seconds < 60) return "less than a minute left";
    const m = Math.round(seconds / 60);
    return m === 1 ? "about 1 minute left" : "about " + m + " minutes left";
  }

  function renderStudies() {
    const list = $("studies");
    list.replaceChildren();
    const studies = snap.studies || [];
    for (const id of Array.from(selected)) {
      if (!studies.some((s) => s.id === id)) selected.delete(id);
    }
    $("studies-empty").hidden = studies.length > 0 || snap.scanning;
    if (snap.scanning && !studies.length) $("studies-empty").hidden = false;
    $("studies-empty").textContent = snap.scanning && !studies.length
      ? "Looking for studies …" : "No studies are waiting for export.";
    for (const s of studies) {
      const li = el("li", "study" + (selected.has(s.id) ? " selected" : ""));
      li.dataset.id = s.id;
      li.setAttribute("role", "checkbox");
      li.setAttribute("aria-checked", selected.has(s.id) ? "true" : "false");
      li.append(el("div", "name", s.patient_name || "(no name)"));
      const born = s.birth_date ? " · born " + s.birth_date : "";
      li.append(el("div", "muted", "ID " + s.patient_id + born));
      const mods = s.modalities.length ? s.modalities.join(", ") + " · " : "";
      li.append(el("div", "", [s.date, s.description].filter(Boolean).join(" · ")));
      li.append(el("div", "muted", mods + s.images + " images · " + s.size_text));
      li.addEventListener("click", () => {
        if (selected.has(s.id)) selected.delete(s.id); else selected.add(s.id);
        render();
      });
      list.append(li);
    }
  }

  function verdict(st) {
    if (st.state === "eligible") return "Ready";
    if (st.state === "needs-format") return "Needs formatting";
    return "Cannot be used";
  }

  function renderSticks() {
    const list = $("sticks");
    list.replaceChildren();
    const sticks = snap.sticks || [];
    $("no-stick").hidden = sticks.length > 0;
    const usable = sticks.filter((s) => s.state !== "refused");
    if (!usable.some((s) => s.identity === chosenStick)) {
      chosenStick = usable.length ? usable[0].identity : null;
    }
    for (const st of sticks) {
      const li = el("li", "stick " + st.state);
      li.dataset.identity = st.identity;
      li.dataset.state = st.state;
      li.append(el("div", "title", st.title));
      li.append(el("div", "verdict", verdict(st)));
      if (st.reason) li.append(el("div", "reason", st.reason));
      if (st.state === "eligible") {
        const label = st.label ? "“" + st.label + "” · " : "";
        const free = st.free_text ? st.free_text + " free" : (st.reading ? "reading …" : "");
        li.append(el("div", "muted", label + st.filesystem + (free ? " · " + free : "")));
        if (st.holds_fileset) {
          const who = (st.holds_patients || []).join(", ");
          li.append(el("div", "holds", "Already holds images" + (who ? " of " + who : "") +
            " (" + st.holds_studies + " studies)."));
        }
        if (st.read_error) li.append(el("div", "muted", st.read_error));
      }
      if (sticks.length > 1 && st.state !== "refused") {
        li.addEventListener("click", () => { chosenStick = st.identity; render(); });
      }
      list.append(li);
    }
  }

  function currentStick() {
    return (snap.sticks || []).find((s) => s.identity === chosenStick) || null;
  }

  function renderActions() {
    const st = currentStick();
    const none = selected.size === 0;
    for (const id of ["copy", "append", "replace", "format"]) $(id).hidden = true;
    let hint = "";
    if (!st) hint = (snap.sticks || []).length ? "" : "";
    else if (st.state === "needs-format") { $("format").hidden = false; }
    else if (st.state === "eligible") {
      if (st.reading) hint = "Reading the stick …";
      else if (st.holds_fileset) { $("append").hidden = false; $("replace").hidden = false; }
      else $("copy").hidden = false;
      if (none) hint = "Choose one or more studies on the left.";
    }
    for (const id of ["copy", "append", "replace"]) $(id).disabled = none || !!(st && st.reading);
    $("action-hint").textContent = hint;
  }

  function renderJob() {
    const job = snap.job;
    const box = $("job");
    box.hidden = !job;
    if (!job) return;
    box.className = "overlay " + job.state;
    box.dataset.state = job.state;
    box.dataset.phase = job.phase;
    $("job-phase").textContent = job.state === "running" ? job.phase_text
      : job.state === "done" ? (job.kind === "format" ? "Formatted" : "Copied and checked")
      : "The copy did not finish";
    const count = job.studies === 1 ? "1 study" : job.studies + " studies";
    $("job-stick").textContent = job.title + (job.studies ? " · " + count : "");
    $("job-bar").style.width = job.percent + "%";
    box.querySelector(".bar").setAttribute("aria-valuenow", String(job.percent));
    $("job-percent").textContent = job.state === "failed" ? "" : job.percent + " %";
    $("job-eta").textContent = job.state === "running" ? minutes(job.eta_seconds) : "";
    $("job-message").textContent = job.message;
    $("cancel").hidden = job.state !== "running" || job.kind !== "export";
    $("done").hidden = job.state === "running";
    $("done").textContent = job.state === "failed" ? "OK" : "Done";
  }

  function render() {
    if (!snap) return;
    renderStudies();
    renderSticks();
    renderActions();
    renderJob();
  }

  function ask(title, text, yes, then) {
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-yes").textContent = yes;
    pendingConfirm = then;
    $("confirm").hidden = false;
  }

  function startExport(mode) {
    const st = currentStick();
    if (!st) return;
    post("/api/export", {stick: st.identity, studies: Array.from(selected), mode: mode});
  }

  function wire() {
    $("copy").addEventListener("click", () => startExport(""));
    $("append").addEventListener("click", () => startExport("append"));
    $("replace").addEventListener("click", () => {
      const st = currentStick();
      ask("Replace the images on the stick?", "The images already on " + st.title +
          " are deleted and the chosen studies are copied instead.", "Yes, replace them",
          () => startExport("replace"));
    });
    $("format").addEventListener("click", () => {
      const st = currentStick();
      ask("Format this stick?", st.format_text + ".", "Yes, erase and format",
          () => post("/api/format", {stick: st.identity}));
    });
    $("confirm-no").addEventListener("click", () => { $("confirm").hidden = true; });
    $("confirm-yes").addEventListener("click", () => {
      $("confirm").hidden = true;
      const then = pendingConfirm;
      pendingConfirm = null;
      if (then) then();
    });
    $("cancel").addEventListener("click", () => post("/api/cancel"));
    $("done").addEventListener("click", () => {
      if (snap && snap.job && snap.job.state === "done" && snap.job.kind === "export") {
        selected.clear();
      }
      post("/api/dismiss");
    });
    $("refresh").addEventListener("click", () => post("/api/refresh"));
  }

  function connect() {
    const source = new EventSource("/api/events");
    source.onopen = () => { $("connection").textContent = ""; };
    source.onmessage = (ev) => { snap = JSON.parse(ev.data); render(); };
    source.onerror = () => { $("connection").textContent = "Reconnecting …"; };
  }

  document.addEventListener("DOMContentLoaded", () => {
    wire();
    fetch("/api/state", {credentials: "same-origin"}).then((r) => r.json())
      .then((data) => { snap = data; render(); }).catch(() => {});
    connect();
  });
}());
