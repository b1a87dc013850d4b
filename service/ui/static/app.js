// bnserve dashboard: plain JavaScript over the same HTTP API as curl, no dependencies.
// Server data is only ever put in the page with textContent (names and notes are user input).
"use strict";

const TOKEN_KEY = "bnserve-token";
const POLL_MS = 2000;
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  models: [],
  jobs: [],
  datasets: [],
  model: null, // the selected model's full JSON
  jobId: null,
  job: null,
};

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

// The bearer header every call of the page sends once a token is given.
function withToken(headers) {
  if (state.token) headers.Authorization = "Bearer " + state.token;
  return headers;
}

async function api(method, path, body) {
  const headers = withToken({ Accept: "application/json" });
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = { detail: text };
  }
  if (!response.ok) {
    const detail = (data && (data.detail || data.error)) || response.statusText;
    throw new ApiError(response.status, (data && data.code) || String(response.status), String(detail));
  }
  return data;
}

function showError(error) {
  const box = $("#error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.hidden = false;
  box.textContent = error instanceof ApiError ? `${error.status} ${error.code}: ${error.message}` : String(error);
}

async function act(action) {
  try {
    await action();
    showError(null);
    await refresh();
  } catch (error) {
    showError(error);
  }
}

// Formatting

const bytes = (n) => (n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + " MiB" : (n / 1024).toFixed(1) + " KiB");
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const num = (x, digits = 4) => (typeof x === "number" ? x.toFixed(digits) : "–");

function eta(progress) {
  const seconds = progress.eta_s ?? progress.eta_seconds ?? progress.eta;
  if (typeof seconds !== "number") return "";
  if (seconds < 90) return Math.round(seconds) + " s";
  return Math.round(seconds / 60) + " min";
}

function bnSummary(report) {
  const layers = (report && report.bn_layers) || [];
  if (!layers.length) return "no BN layers";
  const untrained = layers.filter((layer) => !layer.stats_trained).length;
  return untrained ? `${layers.length} layers, ${untrained} with untrained statistics` : `${layers.length} layers, statistics trained`;
}

function lineageCell(lineage) {
  if (!lineage) return el("span", { class: "muted" }, "uploaded");
  const parts = [];
  if (lineage.job_id) parts.push(el("div", {}, "job ", el("code", {}, String(lineage.job_id).slice(0, 8)), ` (${lineage.kind || "train"})`));
  if (lineage.parent_version !== undefined && lineage.parent_version !== null) parts.push(el("div", {}, `from version ${lineage.parent_version}`));
  if (lineage.dataset_id) parts.push(el("div", {}, "dataset ", el("code", {}, String(lineage.dataset_id).slice(0, 12))));
  const hp = lineage.hyperparameters || {};
  const shown = ["epochs", "lr", "batch_size", "optimizer"].filter((k) => hp[k] !== undefined && hp[k] !== null);
  if (shown.length) parts.push(el("div", { class: "muted" }, shown.map((k) => `${k}=${hp[k]}`).join(" ")));
  const metrics = lineage.metrics || {};
  if (metrics.val_loss !== undefined) {
    let text = `val loss ${num(metrics.val_loss)}`;
    if (typeof metrics.val_accuracy === "number") text += `, val accuracy ${num(metrics.val_accuracy, 3)}`;
    parts.push(el("div", {}, text));
  }
  return el("div", {}, ...parts);
}

// Rendering: a table is rebuilt only when what it shows changed, so a poll does not replace the
// rows under the pointer (or a test's element references) for nothing.

const rendered = {};
function changed(key, ...parts) {
  const text = JSON.stringify(parts);
  if (rendered[key] === text) return false;
  rendered[key] = text;
  return true;
}

function renderMode() {
  const mode = $("#mode");
  mode.textContent = state.token ? "token set" : "read-only";
  mode.className = state.token ? "badge write" : "badge";
  $("#job-form button[type=submit]").disabled = !state.token;
}

function renderModels() {
  if (!changed("models", state.models, state.model && state.model.name)) return;
  const body = $("#models tbody");
  body.replaceChildren(
    ...state.models.map((model) =>
      el(
        "tr",
        {
          class: "clickable" + (state.model && state.model.name === model.name ? " selected" : ""),
          "data-model": model.name,
          onclick: () => selectModel(model.name),
        },
        el("td", {}, el("strong", {}, model.name)),
        el("td", {}, model.architecture),
        el("td", {}, model.task),
        el("td", {}, JSON.stringify(model.input_shape)),
        el("td", {}, model.serving_version ?? "–"),
        el("td", {}, model.versions.length),
      ),
    ),
  );
  $("#models-empty").hidden = state.models.length > 0;
  const select = $("#job-form select[name=model]");
  syncOptions(select, state.models.map((m) => [m.name, m.name]));
}

function syncOptions(select, pairs) {
  const wanted = JSON.stringify(pairs);
  if (select.dataset.options === wanted) return;
  const current = select.value;
  select.replaceChildren(...pairs.map(([value, label]) => el("option", { value }, label)));
  if (pairs.some(([value]) => value === current)) select.value = current;
  select.dataset.options = wanted;
}

function renderVersions() {
  const model = state.model;
  if (!changed("versions", model, state.token)) return;
  $("#versions-section").hidden = !model;
  if (!model) return;
  $("#versions-model").textContent = model.name;
  const rows = [...model.versions].sort((a, b) => a.version - b.version);
  $("#versions tbody").replaceChildren(
    ...rows.map((v) => {
      const marks = [];
      if (v.serving) marks.push(el("span", { class: "badge serving" }, "serving"));
      if (v.optimizations) marks.push(el("span", { class: "badge loaded" }, "loaded"));
      const promote = el(
        "button",
        {
          type: "button",
          disabled: !state.token || v.serving,
          title: state.token ? "serve this version" : "enter the API token to act",
          onclick: () => act(() => api("POST", `/v1/models/${encodeURIComponent(model.name)}/versions/${v.version}/promote`)),
        },
        "Promote",
      );
      return el(
        "tr",
        { "data-version": v.version, class: v.serving ? "serving" : "" },
        el("td", {}, el("strong", {}, v.version)),
        el("td", {}, ...marks),
        el("td", {}, bytes(v.size_bytes)),
        el("td", {}, el("code", { title: v.sha256 }, v.sha256.slice(0, 12))),
        el("td", {}, v.source),
        el("td", {}, v.note || ""),
        el("td", {}, when(v.created_at)),
        el("td", {}, bnSummary(v.report)),
        el("td", {}, lineageCell(v.lineage)),
        el("td", {}, promote),
      );
    }),
  );
  const vector = model.input_shape.length === 1;
  $("#predict-form").hidden = !vector || model.serving_version === null;
  $("#predict-shape").textContent = vector ? String(model.input_shape[0]) : "";
}

function renderJobs() {
  if (!changed("jobs", state.jobs, state.jobId, state.token)) return;
  const jobs = [...state.jobs].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  $("#jobs tbody").replaceChildren(
    ...jobs.map((job) => {
      const p = job.progress || {};
      const active = job.status === "queued" || job.status === "running";
      const result =
        job.result_version !== null && job.result_version !== undefined
          ? el(
              "a",
              { href: "#", onclick: (event) => { event.preventDefault(); selectModel(job.model); } },
              `version ${job.result_version}${job.promoted ? " (promoted)" : ""}`,
            )
          : "";
      const cancel = active
        ? el(
            "button",
            {
              type: "button",
              disabled: !state.token,
              onclick: (event) => {
                event.stopPropagation();
                act(() => api("POST", `/v1/jobs/${encodeURIComponent(job.id)}/cancel`));
              },
            },
            "Cancel",
          )
        : "";
      return el(
        "tr",
        {
          class: "clickable" + (job.id === state.jobId ? " selected" : ""),
          "data-job": job.id,
          "data-status": job.status,
          onclick: () => selectJob(job.id),
        },
        el("td", {}, el("code", { title: job.id }, job.id.slice(0, 8))),
        el("td", {}, job.kind),
        el("td", {}, job.model),
        el("td", {}, el("span", { class: "badge " + job.status }, job.status)),
        el("td", {}, p.epochs ? `epoch ${p.epoch}/${p.epochs}` + (p.steps ? `, step ${p.step}/${p.steps}` : "") : ""),
        el("td", {}, active ? eta(p) : ""),
        el("td", {}, result),
        el("td", {}, cancel),
      );
    }),
  );
  $("#jobs-empty").hidden = jobs.length > 0;
}

function renderJob() {
  const job = state.job;
  if (!changed("job", job)) return;
  $("#job-detail").hidden = !job;
  if (!job) return;
  $("#job-id").textContent = job.id.slice(0, 8);
  const status = $("#job-status");
  status.textContent = job.status;
  status.className = "badge " + job.status;
  const bits = [`${job.kind} of ${job.model} on dataset ${String(job.dataset).slice(0, 12)}`];
  if (job.kept_epoch) bits.push(`kept epoch ${job.kept_epoch}`);
  if (job.stop_reason) bits.push(`stopped: ${job.stop_reason}`);
  if (job.error) bits.push(`error: ${job.error}`);
  $("#job-summary").textContent = bits.join(" · ");
  const metrics = job.metrics || [];
  drawChart($("#chart-loss"), metrics, [["train_loss", "train"], ["val_loss", "val"]], job.kept_epoch);
  drawChart($("#chart-accuracy"), metrics, [["val_accuracy", "val"]], job.kept_epoch, [0, 1]);
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

// One line per series, one circle per finished epoch (the browser tests count them).
function drawChart(target, metrics, series, keptEpoch, range) {
  const W = 420, H = 220, left = 46, right = 10, top = 10, bottom = 28;
  target.replaceChildren();
  const points = series.map(([key]) => metrics.filter((m) => typeof m[key] === "number").map((m) => [m.epoch, m[key], m.lr]));
  const all = points.flat();
  if (!all.length) {
    const text = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "tick" });
    text.textContent = "no finished epoch yet";
    target.append(text);
    return;
  }
  const epochs = all.map((p) => p[0]);
  const values = all.map((p) => p[1]);
  const x0 = Math.min(...epochs), x1 = Math.max(...epochs, x0 + 1);
  let [y0, y1] = range || [Math.min(...values), Math.max(...values)];
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (W - left - right);
  const sy = (y) => H - bottom - ((y - y0) / (y1 - y0)) * (H - top - bottom);
  target.append(svg("line", { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, class: "axis" }));
  target.append(svg("line", { x1: left, y1: top, x2: left, y2: H - bottom, class: "axis" }));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    const label = svg("text", { x: left - 4, y: sy(y) + 3, "text-anchor": "end", class: "tick" });
    label.textContent = y.toPrecision(3);
    target.append(label);
  }
  for (const [x, anchor] of [[x0, "start"], [x1, "end"]]) {
    const label = svg("text", { x: sx(x), y: H - bottom + 14, "text-anchor": anchor, class: "tick" });
    label.textContent = "epoch " + x;
    target.append(label);
  }
  if (keptEpoch) target.append(svg("line", { x1: sx(keptEpoch), y1: top, x2: sx(keptEpoch), y2: H - bottom, class: "kept" }));
  series.forEach(([key, cls], i) => {
    const pts = points[i];
    if (!pts.length) return;
    target.append(svg("polyline", { points: pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), class: cls, "data-series": key }));
    for (const [x, y, lr] of pts) {
      const dot = svg("circle", { cx: sx(x), cy: sy(y), r: 3, class: "point " + cls, "data-series": key, "data-epoch": x });
      const tip = svg("title", {});
      tip.textContent = `epoch ${x}: ${key} ${y.toFixed(4)}` + (typeof lr === "number" ? ` (lr ${lr})` : "");
      dot.append(tip);
      target.append(dot);
    }
  });
}

// Loading

async function selectModel(name) {
  try {
    state.model = await api("GET", `/v1/models/${encodeURIComponent(name)}`);
    renderModels();
    renderVersions();
    showError(null);
  } catch (error) {
    showError(error);
  }
}

async function selectJob(id) {
  state.jobId = id;
  try {
    state.job = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`);
    renderJobs();
    renderJob();
    followJob();
  } catch (error) {
    showError(error);
  }
}

// Live curves: the selected job, while it is queued or running, follows its event stream
// (GET /v1/jobs/{id}/events), so each progress update and each finished epoch is drawn as the
// server sends it instead of at the next poll. fetch, not EventSource, which cannot send the
// bearer token a server with protected reads asks for. The poll goes on for the lists, and
// restarts a stream that broke while its job still runs.
const stream = { jobId: null, abort: null };

function followJob() {
  const job = state.job;
  const active = job && job.id === state.jobId && (job.status === "queued" || job.status === "running");
  if (stream.jobId === (active ? job.id : null)) return;
  if (stream.abort) stream.abort.abort();
  stream.jobId = null;
  stream.abort = null;
  if (!active) return;
  const controller = new AbortController();
  stream.jobId = job.id;
  stream.abort = controller;
  readEvents(job.id, controller.signal)
    .catch(() => {})
    .finally(() => {
      if (stream.abort === controller) {
        stream.jobId = null;
        stream.abort = null;
      }
    });
}

async function readEvents(id, signal) {
  const headers = withToken({ Accept: "text/event-stream" });
  const response = await fetch(`/v1/jobs/${encodeURIComponent(id)}/events`, { headers, signal });
  if (!response.ok || !response.body) return;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) await onJobEvent(id, name, JSON.parse(data));
    }
  }
}

async function onJobEvent(id, name, data) {
  if (state.jobId !== id || !state.job || state.job.id !== id) return;
  if (name === "progress") {
    const metrics = [...(state.job.metrics || [])];
    const last = data.metrics;
    const newest = metrics.length ? metrics[metrics.length - 1].epoch : 0;
    if (last && last.epoch === newest + 1) metrics.push(last);
    state.job = { ...state.job, status: data.status, progress: data.progress, metrics };
    if (last && last.epoch > newest + 1) {
      state.job = await api("GET", `/v1/jobs/${encodeURIComponent(id)}`); // epochs in between
    }
  } else if (data.job) {
    state.job = data.job; // the outcome: the whole job
  } else {
    return; // "error": the job is gone; the next poll says so
  }
  const job = state.job;
  state.jobs = state.jobs.map((j) => (j.id === id ? { ...j, status: job.status, progress: job.progress } : j));
  document.body.dataset.jobEvents = String(Number(document.body.dataset.jobEvents || 0) + 1);
  renderJobs();
  renderJob();
}

async function refresh() {
  try {
    const [models, jobs, datasets] = await Promise.all([
      api("GET", "/v1/models"),
      api("GET", "/v1/jobs"),
      api("GET", "/v1/datasets"),
    ]);
    state.models = models;
    state.jobs = jobs;
    state.datasets = datasets;
    if (state.model) state.model = models.find((m) => m.name === state.model.name) || null;
    if (state.jobId) state.job = await api("GET", `/v1/jobs/${encodeURIComponent(state.jobId)}`);
    $("#server-status").textContent = `${models.length} models, ${jobs.filter((j) => j.status === "running").length} jobs running`;
    syncOptions($("#job-form select[name=dataset]"), datasets.map((d) => [d.id, `${d.name} (${d.num_samples})`]));
    renderModels();
    renderVersions();
    renderJobs();
    renderJob();
    followJob();
    document.body.dataset.loaded = "true";
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      $("#server-status").textContent = "this server protects reads: enter the API token";
    }
    showError(error);
  }
}

function setUp() {
  $("#token").value = state.token;
  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.token = $("#token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    renderMode();
    act(async () => {});
  });
  $("#token-clear").addEventListener("click", () => {
    state.token = "";
    $("#token").value = "";
    sessionStorage.removeItem(TOKEN_KEY);
    renderMode();
    act(async () => {});
  });
  $("#job-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const body = {
      kind: form.get("kind"),
      model: form.get("model"),
      dataset: form.get("dataset"),
      batch_size: Number(form.get("batch_size")),
      promote: form.get("promote"),
    };
    const base = String(form.get("base_version") || "").trim();
    if (base) body.base_version = base === "serving" ? "serving" : Number(base);
    if (form.get("epochs")) body.epochs = Number(form.get("epochs"));
    if (form.get("lr")) body.lr = Number(form.get("lr"));
    act(async () => {
      const job = await api("POST", "/v1/jobs", body);
      state.jobId = job.id;
    });
  });
  $("#predict-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const model = state.model;
    const sample = $("#predict-input").value.split(/[\s,]+/).filter(Boolean).map(Number);
    act(async () => {
      const answer = await api("POST", `/v1/models/${encodeURIComponent(model.name)}/predict`, { inputs: [sample] });
      const lines = [`version ${answer.version}`, `outputs ${JSON.stringify(answer.outputs[0])}`];
      if (answer.probabilities) lines.push(`probabilities ${JSON.stringify(answer.probabilities[0].map((p) => Number(p.toFixed(4))))}`);
      if (answer.predictions) lines.push(`prediction ${answer.predictions[0]}${answer.labels ? " (" + answer.labels[0] + ")" : ""}`);
      $("#predict-output").textContent = lines.join("\n");
    });
  });
  renderMode();
  refresh();
  setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", setUp);
