// comfy-bridge demo page: every action below is one documented API call (see the README).
// Plain JavaScript, no framework and no build step; loaded as a module, so it runs in strict mode.

import { parseExact } from "./exactjson.js";

const KEY_STORE = "comfy-bridge.api-key";
const POLL_MS = 250;
const STATUS_MS = 3000;
const MAX_SAFE = Number.MAX_SAFE_INTEGER;

const $ = (id) => document.getElementById(id);
const el = {
  form: $("job-form"), workflow: $("workflow"), inputs: $("inputs"), polling: $("use-polling"),
  generate: $("generate"), cancel: $("cancel"), message: $("message"), progress: $("progress"),
  progressText: $("progress-text"), details: $("run-details"), gallery: $("gallery"),
  galleryEmpty: $("gallery-empty"), keyDialog: $("key-dialog"), keyInput: $("api-key"),
  keyReason: $("key-reason"), keyButton: $("key-button"), description: $("workflow-description"),
  run: $("run"), demoNote: $("demo-note"),
};

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  keyPrompt: null,   // the one open API-key dialog, shared by every request that met a 401
  keyRefused: false, // the dialog was cancelled: do not ask again until the page is reloaded
  alias: "",         // the chosen workflow
  specs: {},         // its /workflow-info
  fields: {},        // input key -> the form control holding its value
  uploads: 0,        // uploads still in flight
  loading: 0,        // bumped on every workflow change, so a late answer for an old choice is dropped
  run: null,         // the run in progress, if any
};

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const jsonOf = async (resp) => parseExact(await resp.text());
const apiUrl = (path) => new URL(path, document.baseURI).href;

// ---------------------------------------------------------------------------------------------
// HTTP: one helper adds the API key, asks for it on a 401 and turns error bodies into ApiError.

async function api(path, options = {}) {
  for (;;) {
    const sentKey = state.key;
    const headers = new Headers(options.headers || {});
    if (sentKey) headers.set("Authorization", `Bearer ${sentKey}`);
    let resp;
    try {
      resp = await fetch(apiUrl(path), { ...options, headers, cache: "no-store" });
    } catch {
      throw new ApiError(0, "the bridge cannot be reached");
    }
    if (resp.status !== 401) {
      if (!resp.ok) throw new ApiError(resp.status, await detailOf(resp));
      return resp;
    }
    if (state.keyRefused) {
      el.keyButton.hidden = false;  // the user can still enter a key later, without reloading the page
      throw new ApiError(401, "this bridge needs an API key");
    }
    // another request may already have obtained a new key while this one was on its way
    if (state.key === sentKey) await askForKey(Boolean(sentKey));
  }
}

async function detailOf(resp) {
  try {
    const body = await resp.json();
    if (body && typeof body.detail === "string") return body.detail;
  } catch {
    // not JSON: fall through to the status text
  }
  return resp.statusText || `HTTP ${resp.status}`;
}

function askForKey(wrong) {
  if (state.keyPrompt) return state.keyPrompt;
  state.keyPrompt = new Promise((resolve, reject) => {
    el.keyReason.textContent = wrong
      ? "That API key was not accepted. Please check it and try again."
      : "This bridge needs an API key. It is kept in this browser tab only (sessionStorage).";
    el.keyInput.value = "";
    el.keyDialog.addEventListener("close", () => {
      state.keyPrompt = null;
      const key = el.keyInput.value.trim();
      el.keyInput.value = "";
      if (el.keyDialog.returnValue === "ok" && key) {
        state.key = key;
        sessionStorage.setItem(KEY_STORE, key);
        resolve();
      } else {
        state.keyRefused = true;
        reject(new ApiError(401, "this bridge needs an API key"));
      }
    }, { once: true });
    el.keyDialog.returnValue = "";
    el.keyDialog.showModal();
    el.keyInput.focus();
  });
  return state.keyPrompt;
}

function plainError(err) {
  if (!(err instanceof ApiError)) return `Something went wrong: ${err.message || err}`;
  switch (err.status) {
    case 0: return "Cannot reach the bridge. Is it running?";
    case 400: return `The bridge refused the request: ${err.detail}`;
    case 401: return "This bridge needs an API key; press “Enter API key” at the top to give it.";
    case 413: return `That is too large: ${err.detail}`;
    case 415: return `That file type is not accepted: ${err.detail}`;
    case 429: return "The queue is full right now. Please try again in a few seconds.";
    case 503: return "No ComfyUI server is reachable right now. Please try again shortly.";
    default: return `The bridge answered ${err.status}: ${err.detail}`;
  }
}

// ---------------------------------------------------------------------------------------------
// Status strip: GET /backends and GET /generation-count, refreshed every few seconds.

async function showDemoNote() {
  // GET /health says whether the backends are simulated, and whether they compute real pictures
  try {
    const health = await jsonOf(await api("health"));
    if (health.demo) {
      el.demoNote.textContent = health.demo.note;
      el.demoNote.classList.toggle("warn", !health.demo.realistic_images);
      el.demoNote.hidden = false;
    }
  } catch {
    // the page works without the note
  }
}

async function refreshStatus() {
  let delay = STATUS_MS;
  try {
    const [backends, count] = await Promise.all([
      api("backends").then((r) => r.json()),
      api("generation-count").then((r) => r.json()),
    ]);
    $("backends-up").textContent = backends.up;
    $("backends-total").textContent = backends.total;
    $("queue-length").textContent = backends.queue_length;
    $("generation-count").textContent = count;
    const chip = $("chip-backends");
    chip.classList.toggle("warn", backends.up < backends.total);
    chip.title = backends.backends
      .map((b) => `${b.name}: ${b.state}, ${b.running} running, ${b.jobs_done} done`).join("\n");
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    $("backends-up").textContent = "?";
    delay = STATUS_MS * 3;  // the bridge is away or locked: ask less often
  }
  setTimeout(refreshStatus, delay);
}

// ---------------------------------------------------------------------------------------------
// The workflow picker and the form generated from /workflow-info.

async function loadWorkflows() {
  const list = await (await api("workflow-list")).json();
  el.workflow.replaceChildren(...list.map((alias) => new Option(alias, alias)));
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (list.includes(wanted)) el.workflow.value = wanted;
  el.workflow.disabled = false;
  await loadInputs();
}

async function loadInputs() {
  const alias = el.workflow.value;
  const token = ++state.loading;
  state.alias = "";
  updateButtons();
  const full = await jsonOf(await api(`workflow-info?workflow=${encodeURIComponent(alias)}&view=full`));
  if (token !== state.loading) return;
  const specs = full.inputs;
  el.description.textContent = full.description || "";
  el.description.hidden = !full.description;
  history.replaceState(null, "", `#${encodeURIComponent(alias)}`);
  state.alias = alias;
  state.specs = specs;
  state.fields = {};
  const legend = document.createElement("legend");
  legend.textContent = `Inputs of ${alias}`;
  const rows = Object.entries(specs).map(([key, spec]) => buildField(key, spec));
  if (!rows.length) {
    const p = document.createElement("p");
    p.className = "hint";
    p.textContent = "This workflow has no settable inputs; it runs with its defaults.";
    rows.push(p);
  }
  el.inputs.replaceChildren(legend, ...rows);
  updateButtons();
}

function make(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "className" || name === "textContent" || name === "hidden" || name === "value") {
      node[name] = value;
    } else {
      node.setAttribute(name, value);
    }
  }
  node.append(...children);
  return node;
}

function labelText(key, spec) {
  // a node's title names the node, not the input: when several inputs share it, add the input's name
  const name = key.split("/").slice(1).join("/").replace(/_/g, " ");
  const title = spec.title || name;
  const shared = Object.values(state.specs).filter((s) => (s.title || "") === title).length > 1;
  return shared && !title.toLowerCase().includes(name.toLowerCase()) ? `${title}: ${name}` : title;
}

function hintText(key, spec) {
  const bits = [key, spec.type];
  if (spec.min !== undefined && spec.max !== undefined) bits.push(`${spec.min} to ${spec.max}`);
  else if (spec.min !== undefined) bits.push(`at least ${spec.min}`);
  else if (spec.max !== undefined) bits.push(`at most ${spec.max}`);
  if (spec.description) bits.push(spec.description);
  return bits.join(" · ");
}

function buildField(key, spec) {
  const id = `in-${key.replace(/[^A-Za-z0-9_-]/g, "-")}`;
  const hintId = `${id}-hint`;
  const label = make("label", { for: id, textContent: labelText(key, spec) });
  const hint = make("p", { className: "hint", id: hintId, textContent: hintText(key, spec) });
  const row = make("div", { className: "field" }, label);
  const isNumber = spec.type === "int" || spec.type === "float";
  let control;
  if (Array.isArray(spec.choices) && spec.choices.length) {
    control = make("select", { id, name: key, "aria-describedby": hintId });
    control.append(...spec.choices.map((c) => new Option(String(c), String(c))));
    if (spec.default !== undefined) control.value = String(spec.default);
    row.append(control, hint);
  } else if (spec.upload) {
    control = make("input", { id, name: key, type: "text", value: String(spec.default ?? ""),
      required: "", autocomplete: "off", spellcheck: "false", "aria-describedby": hintId });
    row.append(control, hint, buildDropZone(id, control));
  } else if (isNumber) {
    // integers past 2^53 (seeds) would be rounded by a number field: they get a text field of digits
    const huge = spec.type === "int" && [spec.min, spec.max, spec.default].some((v) => typeof v === "string");
    control = huge
      ? make("input", { id, name: key, type: "text", required: "", inputmode: "numeric", pattern: "-?[0-9]+",
        autocomplete: "off", spellcheck: "false", "aria-describedby": hintId })
      : make("input", { id, name: key, type: "number", required: "",
        inputmode: spec.type === "int" ? "numeric" : "decimal", "aria-describedby": hintId,
        min: spec.min, max: spec.max, step: spec.step ?? (spec.type === "int" ? 1 : "any") });
    control.value = spec.default === undefined ? "" : String(spec.default);
    if (control.validity.stepMismatch) control.step = "any";  // never refuse the workflow's own default
    if (/seed/i.test(key) || /seed/i.test(spec.title || "")) {
      const dice = make("button", { type: "button", className: "small",
        "aria-label": `Random ${labelText(key, spec)}`, textContent: "Random seed" });
      dice.addEventListener("click", () => {
        control.value = randomInt(spec.min ?? 0, spec.max ?? MAX_SAFE).toString();
        control.dispatchEvent(new Event("input", { bubbles: true }));
      });
      row.append(make("div", { className: "with-button" }, control, dice), hint);
    } else if (spec.type === "int" && (spec.display === "color" || /colou?r/i.test(key))) {
      row.append(make("div", { className: "with-button" }, control, colourPicker(id, control, spec)), hint);
    } else {
      row.append(control, hint);
    }
  } else {
    const text = String(spec.default ?? "");
    const long = spec.multiline || text.length > 60 || text.includes("\n");
    control = long
      ? make("textarea", { id, name: key, rows: spec.multiline ? 4 : 3, "aria-describedby": hintId })
      : make("input", { id, name: key, type: "text", "aria-describedby": hintId });
    control.value = text;
    row.append(control, hint);
  }
  state.fields[key] = control;
  return row;
}

function colourPicker(id, control, spec) {
  // ComfyUI colours are integers 0xRRGGBB; the picker and the number field stay in step both ways
  const picker = make("input", { id: `${id}-picker`, type: "color", className: "swatch",
    "aria-label": `Pick ${labelText(control.name, spec)}` });
  const toHex = () => {
    const n = Number(control.value);
    if (Number.isInteger(n) && n >= 0 && n <= 0xffffff) picker.value = `#${n.toString(16).padStart(6, "0")}`;
  };
  toHex();
  control.addEventListener("input", toHex);
  picker.addEventListener("input", () => {
    control.value = String(parseInt(picker.value.slice(1), 16));
  });
  return picker;
}

function randomInt(lo, hi) {
  // integers beyond 2^53 do not survive a JavaScript number, so the range is capped there
  // BigInt throughout: a seed's range goes to 2^64-1, which a JavaScript number cannot hold
  const big = (v) => BigInt(typeof v === "string" ? v : Math.trunc(v));
  const low = big(lo);
  const high = big(hi);
  if (high < low) return low;
  const [a, b, c] = crypto.getRandomValues(new Uint32Array(3));
  const r = (BigInt(a) << 64n) | (BigInt(b) << 32n) | BigInt(c);  // 96 random bits: a negligible bias
  return low + (r % (high - low + 1n));
}

// ---------------------------------------------------------------------------------------------
// Image inputs: a file picker and a drop zone; the file goes to POST /upload at once and the
// saved name the bridge answers is put into the form.

function buildDropZone(id, target) {
  const fileId = `${id}-file`;
  const picker = make("input", { id: fileId, type: "file", className: "visually-hidden",
    accept: "image/png,image/jpeg,image/webp,image/gif" });
  const zone = make("label", { for: fileId, className: "drop" },
    make("span", { textContent: "Choose an image or drop one here" }), picker);
  const preview = make("img", { className: "preview", alt: "Preview of the chosen image", hidden: true });
  const status = make("p", { className: "hint upload-status", role: "status", "aria-live": "polite",
    textContent: `Leave as is to use “${target.value}”, or upload your own image.` });
  picker.addEventListener("change", () => {
    if (picker.files.length) uploadFile(picker.files[0], target, preview, status, zone);
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) uploadFile(file, target, preview, status, zone);
  });
  return make("div", { className: "upload" }, zone, preview, status);
}

async function uploadFile(file, target, preview, status, zone) {
  if (preview.src) URL.revokeObjectURL(preview.src);
  zone.classList.remove("failed");
  if (!/^image\//.test(file.type)) {
    zone.classList.add("failed");
    status.textContent = `“${file.name}” is not an image; choose a PNG, JPEG, WebP or GIF file.`;
    return;
  }
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  status.textContent = `Uploading ${file.name}…`;
  state.uploads += 1;
  updateButtons();
  try {
    const body = new FormData();
    body.append("file", file, file.name);
    const saved = await (await api("upload", { method: "POST", body })).json();
    target.value = saved.file;
    status.textContent = `Uploaded ${file.name}; saved as ${saved.file}.`;
  } catch (err) {
    zone.classList.add("failed");
    status.textContent = `Upload failed. ${plainError(err)}`;
  } finally {
    state.uploads -= 1;
    updateButtons();
  }
}

// ---------------------------------------------------------------------------------------------
// A run: WebSocket first (or polling), submit, follow, then take the results into the gallery.

function jobBody() {
  // built by hand so integers keep every digit (seeds may exceed what a JavaScript number holds)
  const parts = [`"workflow":${JSON.stringify(state.alias)}`];
  for (const [key, spec] of Object.entries(state.specs)) {
    const control = state.fields[key];
    const raw = control.value;
    let json;
    if (spec.type === "int") {
      if (raw.trim() === "") continue;
      if (!/^\s*-?\d+\s*$/.test(raw)) throw new Error(`${labelText(key, spec)} must be a whole number.`);
      json = BigInt(raw.trim()).toString();
    } else if (spec.type === "float") {
      if (raw.trim() === "") continue;
      const value = Number(raw);
      if (!Number.isFinite(value)) throw new Error(`${labelText(key, spec)} must be a number.`);
      json = JSON.stringify(value);
    } else {
      json = JSON.stringify(raw);
    }
    parts.push(`${JSON.stringify(key)}:${json}`);
  }
  return `{${parts.join(",")}}`;
}

function newClientId() {
  // crypto.randomUUID needs a secure context; a page opened by LAN address is not one
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function say(text, kind = "") {
  el.message.textContent = text;
  el.message.className = `message ${kind}`.trim();
}

function setProgress(text) {
  const value = Math.max(0, Math.min(100, parseFloat(text) || 0));
  el.progress.value = value;
  el.progressText.textContent = /%$/.test(text) ? text : `${value.toFixed(2)}%`;
}

function updateButtons() {
  el.generate.disabled = !state.alias || Boolean(state.run) || state.uploads > 0;
  el.cancel.disabled = !state.run || state.run.cancelled;
}

function showStatus(run, msg) {
  // one message of the shared vocabulary, from the WebSocket or from /execution-info
  if (run.cancelled) return;
  if (msg.status === "connected") {
    if (msg.queue_position !== undefined && msg.queue_position !== null) {
      say(`Queued: position ${msg.queue_position} in the bridge's queue.`);
    } else if (run.jobId || msg.job_id) {
      say("Starting on a backend…");
    }
  } else if (msg.status === "progress") {
    run.running = true;
    say("Running…");
    setProgress(msg.details ?? msg.detail);
  }
}

function openSocket(run) {
  const url = new URL(`ws?clientId=${encodeURIComponent(run.clientId)}`, document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (state.key) url.searchParams.set("token", state.key);
  const socket = new WebSocket(url);
  run.socket = socket;
  let greeted;
  const opened = new Promise((resolve, reject) => { greeted = { resolve, reject }; });
  run.finished = new Promise((resolve) => {
    let settled = false;
    socket.addEventListener("message", (event) => {
      const msg = JSON.parse(event.data);
      greeted.resolve();
      if (settled) return;
      if (msg.status === "closed" || msg.status === "error") {
        settled = true;
        resolve({ status: msg.status, details: msg.details });
      } else {
        showStatus(run, msg);
      }
    });
    socket.addEventListener("close", () => {
      greeted.reject(new ApiError(0, "the WebSocket could not be opened"));
      if (!settled) {
        settled = true;
        resolve({ status: run.cancelled ? "cancelling" : "lost" });
      }
    });
  });
  return opened;
}

async function pollUntilDone(run) {
  // GET /execution-info until the job is over; while a socket cancel takes effect, stay quiet
  for (;;) {
    const info = await (await api(`execution-info?clientId=${encodeURIComponent(run.clientId)}`)).json();
    if (info.status === "closed" || info.status === "error") return info;
    showStatus(run, info);
    await sleep(POLL_MS);
  }
}

async function generate(event) {
  event.preventDefault();
  if (state.run || !state.alias) return;
  if (!el.form.checkValidity()) {
    el.form.reportValidity();
    return;
  }
  let body;
  try {
    body = jobBody();
  } catch (err) {
    say(err.message, "error");
    return;
  }
  const run = { alias: state.alias, clientId: newClientId(), polling: el.polling.checked, socket: null,
    finished: null, jobId: null, cancelled: false, running: false, started: performance.now() };
  state.run = run;
  updateButtons();
  setProgress("0");
  el.progress.classList.remove("stopped");
  el.run.classList.add("active");
  el.run.scrollIntoView({ block: "nearest" });
  el.details.textContent = `clientId ${run.clientId} · following by ${run.polling ? "polling" : "WebSocket"}`;
  try {
    if (!run.polling) {
      say("Opening the WebSocket…");
      await openSocket(run);
    }
    say("Submitting…");
    const query = `generate-based-workflow?clientId=${encodeURIComponent(run.clientId)}`;
    const answer = await (await api(query, { method: "POST", body,
      headers: { "Content-Type": "application/json" } })).json();
    run.jobId = answer.job_id;
    el.details.textContent += ` · job ${run.jobId}`;
    if (!run.running) showStatus(run, { status: "connected", queue_position: answer.queue_position });
    if (run.cancelled) await interrupt(run);  // Cancel was pressed while the job was being submitted
    let outcome = run.polling ? await pollUntilDone(run) : await run.finished;
    if (outcome.status === "lost") {
      say("The live connection was lost; following the job by polling instead…");
      outcome = await pollUntilDone(run);
    } else if (outcome.status === "cancelling") {
      outcome = await pollUntilDone(run);
    }
    await conclude(run, outcome);
  } catch (err) {
    if (run.cancelled && !run.jobId) say("Cancelled before the job was submitted.", "warn");
    else say(plainError(err), "error");
    el.progress.classList.add("stopped");
  } finally {
    if (run.socket && run.socket.readyState <= WebSocket.OPEN) run.socket.close(1000, "done");
    state.run = null;
    updateButtons();
    refreshStatusSoon();
  }
}

async function conclude(run, outcome) {
  const details = outcome.details ?? outcome.detail ?? "";
  if (outcome.status === "error") {
    el.progress.classList.add("stopped");
    if (run.cancelled) say(`Cancelled. The job stopped (${details}).`, "warn");
    else say(`The job failed: ${details}`, "error");
    return;
  }
  setProgress("100.00%");
  say("Done. Fetching the results…");
  const count = await takeResults(run);
  const seconds = ((performance.now() - run.started) / 1000).toFixed(1);
  const early = run.cancelled ? " It finished before the cancel took effect." : "";
  say(`Done in ${seconds} s: ${count} result${count === 1 ? "" : "s"}.${early}`, "ok");
}

async function interrupt(run) {
  if (!run.jobId) return;  // not submitted yet: generate() calls this again once it is
  try {
    await api(`interrupt?clientId=${encodeURIComponent(run.clientId)}`, { method: "POST" });
  } catch (err) {
    say(plainError(err), "error");
  }
}

async function cancel() {
  const run = state.run;
  if (!run || run.cancelled) return;
  run.cancelled = true;
  updateButtons();
  if (!run.polling && run.socket && run.socket.readyState <= WebSocket.OPEN) {
    say("Cancelling: the WebSocket is closed, and the bridge stops the job shortly…", "warn");
    run.socket.close(1000, "cancelled by the user");
    // a socket closed before the job was accepted cancels nothing; generate() interrupts then
  } else {
    say("Cancelling: asked the bridge to interrupt the job (POST /interrupt)…", "warn");
    await interrupt(run);
  }
}

let statusTimer = null;
function refreshStatusSoon() {
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => {
    api("generation-count").then((r) => r.json()).then((n) => { $("generation-count").textContent = n; },
      () => {});
  }, 200);
}

// ---------------------------------------------------------------------------------------------
// Results: GET /history?clientId answers multipart/form-data, which Response.formData() parses.

async function takeResults(run) {
  const path = `history?clientId=${encodeURIComponent(run.clientId)}`;
  for (let attempt = 0; attempt < 5; attempt += 1) {
    const resp = await api(path);
    if (resp.status === 200) {
      const form = await resp.formData();
      return addCard(run, [...form.entries()]);
    }
    await sleep(300);  // 204: the results are not there (yet); X-Detail says why
  }
  return addCard(run, []);
}

async function addCard(run, entries) {
  const time = new Date().toLocaleTimeString();
  const card = make("article", { className: "card", "aria-label": `${run.alias} at ${time}` },
    make("h3", {}, run.alias, " ", make("span", { className: "sub", textContent: `${time} · ${run.jobId}` })));
  const list = make("div", { className: "outputs" });
  for (const [name, value] of entries) {
    const node = name.split("/").pop();
    if (typeof value === "string") {
      list.append(make("figure", { className: "text" }, make("pre", { textContent: value }),
        make("figcaption", { textContent: `node ${node}` })));
      continue;
    }
    const href = URL.createObjectURL(value);
    const link = make("a", { href, download: value.name, textContent: "Download",
      "aria-label": `Download ${value.name}` });
    const caption = make("figcaption", {}, make("span", { textContent: value.name }), " ", link);
    let body;
    if (value.type.startsWith("image/")) {
      body = make("img", { src: href, alt: `${run.alias} result ${value.name} (node ${node})` });
    } else if (value.type.startsWith("video/")) {
      body = make("video", { src: href, controls: "", preload: "metadata", "aria-label": value.name });
    } else if (value.type.startsWith("audio/")) {
      body = make("audio", { src: href, controls: "", preload: "metadata", "aria-label": value.name });
    } else if (value.type.startsWith("text/") || value.type === "application/json") {
      body = make("pre", { textContent: await value.text() });
    } else {  // a 3D model or any other file: the caption's link downloads it
      body = make("p", { className: "hint", textContent: `${value.type || "file"}, ${value.size} bytes` });
    }
    list.append(make("figure", { className: body.tagName === "PRE" ? "text" : "" }, body, caption));
  }
  if (!entries.length) list.append(make("p", { className: "hint", textContent: "This run had no outputs." }));
  card.append(list);
  el.gallery.prepend(card);
  el.galleryEmpty.hidden = true;
  return entries.length;
}

// ---------------------------------------------------------------------------------------------

function main() {
  el.form.addEventListener("submit", generate);
  el.cancel.addEventListener("click", cancel);
  el.workflow.addEventListener("change", () => {
    loadInputs().catch((err) => say(plainError(err), "error"));
  });
  // a file dropped beside a drop zone must not make the browser navigate away from the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  el.keyButton.addEventListener("click", () => {
    state.keyRefused = false;
    el.keyButton.hidden = true;
    loadWorkflows().catch((err) => say(plainError(err), "error"));
  });
  loadWorkflows().catch((err) => say(plainError(err), "error"));
  refreshStatus();
  showDemoNote();
}

main();
