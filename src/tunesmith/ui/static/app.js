// The page: draws what the server's /api returns and sends the form back. No training logic here.
"use strict";
let settings = null;
let lang = localStorage.getItem("tunesmith.lang") || "en";
let selectedRun = localStorage.getItem("tunesmith.run") || null;
let timer = null;
// The per-launch token `tunesmith ui` prints in the page's address: kept for this tab, taken out of the address bar.
const token = new URLSearchParams(location.search).get("token") || sessionStorage.getItem("tunesmith.token") || "";
sessionStorage.setItem("tunesmith.token", token);
if (location.search) history.replaceState(null, "", location.pathname);
const authHeaders = { "X-Tunesmith-Token": token };
const withToken = (url) => `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;

const $ = (sel) => document.querySelector(sel);
const t = (key) => (settings && settings.strings[lang][key]) || key;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(method, url, body) {
  const options = { method, headers: { "Content-Type": "application/json", ...authHeaders } };
  if (body !== undefined) options.body = JSON.stringify(body);
  const response = await fetch(url, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || data.detail || response.statusText);
  return data;
}

function showError(target, error) {
  target.replaceChildren(el("div", { class: "error", text: `${t("error")}: ${error.message}` }));
}

// ------------------------------------------------------------------ language and pages

function applyLang() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  $("#lang").value = lang;
  document.querySelectorAll("[data-i18n]").forEach((node) => { node.textContent = t(node.dataset.i18n); });
  document.querySelectorAll("[data-status]").forEach((node) => { node.textContent = t(`status.${node.dataset.status}`); });
  document.querySelectorAll("[data-help-en]").forEach((node) => { node.textContent = lang === "zh" ? node.dataset.helpZh : node.dataset.helpEn; });
}

function showPage(name) {
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("active", p.id === `page-${name}`));
  document.querySelectorAll(".tab").forEach((b) => b.classList.toggle("active", b.dataset.page === name));
  localStorage.setItem("tunesmith.page", name);
  clearInterval(timer);
  if (name === "runs") { refreshRuns(); timer = setInterval(refreshRuns, 1500); }
  if (["chat", "eval", "export"].includes(name)) prefillModel();
}

// ------------------------------------------------------------------ Train: a form generated from config.py

function fieldInput(field, value) {
  const attrs = { name: field.key, id: `field-${field.key}` };
  if (field.choices || field.kind === "bool") {
    const options = field.choices || ["true", "false"];
    const select = el("select", attrs);
    if (field.nullable) select.append(el("option", { value: "", text: "" }));
    for (const choice of options) select.append(el("option", { value: choice, text: choice }));
    select.value = value;
    return select;
  }
  if (field.kind === "lines") return el("textarea", { ...attrs, rows: 2, cols: 28, text: value });  // an item a line
  return el("input", { ...attrs, value, size: 28 });
}

function buildForm() {
  const form = $("#train-form");
  form.replaceChildren();
  for (const section of settings.sections) {
    const fieldset = el("fieldset", {}, el("legend", { "data-i18n": `section.${section.name}` }));
    for (const field of section.fields) {
      const value = settings.suggested[field.key] ?? field.default;
      const shownDefault = field.default === "" ? el("span", { "data-i18n": "auto" }) : field.default;
      const help = el("span", { class: "help" }, el("span", { "data-help-en": field.help, "data-help-zh": field.help_zh }),
        " (", el("span", { "data-i18n": "default" }), ": ", shownDefault, ")");
      fieldset.append(el("div", { class: "field" }, el("label", { for: `field-${field.key}`, text: field.key }),
        fieldInput(field, value), help));
    }
    form.append(fieldset);
  }
  form.addEventListener("input", updateCommand);
  form.addEventListener("submit", (e) => e.preventDefault());
}

function formValues() {
  const values = {};
  for (const node of $("#train-form").elements) if (node.name) values[node.name] = node.value;
  return values;
}

let commandAsked = 0;  // each keystroke asks for the command; only the newest answer is shown

async function updateCommand() {
  const asked = ++commandAsked;
  try {
    const command = (await api("POST", "/api/train/command", formValues())).command;
    if (asked !== commandAsked) return;  // an older answer arriving after a newer one
    $("#train-command").textContent = command;
    $("#train-message").replaceChildren();
  } catch (error) { if (asked === commandAsked) showError($("#train-message"), error); }
}

async function planRun() {
  $("#plan-output").textContent = t("train.planning");
  try {
    const result = await api("POST", "/api/train/plan", formValues());
    $("#plan-output").textContent = result.lines.join("\n");
    $("#train-command").textContent = result.command;
    $("#train-message").replaceChildren();
  } catch (error) { $("#plan-output").textContent = ""; showError($("#train-message"), error); }
}

async function startRun() {
  try {
    const result = await api("POST", "/api/train/start", formValues());
    $("#train-message").textContent = `${t("train.started")} ${result.run_dir}`;
    selectRun(result.run_dir);
    showPage("runs");
  } catch (error) { showError($("#train-message"), error); }
}

// ------------------------------------------------------------------ Runs

const fmt = (v) => (v === null || v === undefined ? "" : Number(v).toFixed(4));

async function refreshRuns() {
  let data;
  try { data = await api("GET", "/api/runs"); } catch (error) { return; }
  const body = $("#runs-table tbody");
  body.replaceChildren();
  for (const run of data.runs) {
    const open = el("button", { class: "open-run", text: t("runs.open"), "data-i18n": "runs.open" });
    open.addEventListener("click", () => selectRun(run.path));
    body.append(el("tr", { "data-path": run.path }, el("td", { text: run.name }),
      el("td", { class: `status-${run.status}`, "data-status": run.status, text: t(`status.${run.status}`) }),
      el("td", { text: run.method || "" }), el("td", { text: run.data.join(", ") }),
      el("td", { text: `${run.steps}/${run.total_steps ?? "?"}` }), el("td", { text: fmt(run.train_loss) }),
      el("td", { text: fmt(run.eval_loss) }), el("td", {}, open)));
  }
  $("#runs-empty").hidden = data.runs.length > 0;
  if (!selectedRun) {  // after a reload: show the run that is training, if any
    const running = data.runs.find((r) => r.status === "running");
    if (running) selectedRun = running.path;
  }
  if (selectedRun) await refreshDetail();
}

function selectRun(path) {
  selectedRun = path;
  localStorage.setItem("tunesmith.run", path);
  refreshDetail();
}

async function refreshDetail() {
  let run;
  try { run = await api("GET", `/api/run?path=${encodeURIComponent(selectedRun)}`); } catch (error) { return; }
  $("#run-detail").hidden = false;
  $("#run-name").replaceChildren(`${run.name} — `,
    el("span", { class: `status-${run.status}`, "data-status": run.status, text: t(`status.${run.status}`) }));
  $("#run-progress").max = run.total_steps || 1;
  $("#run-progress").value = run.steps;
  $("#run-steps").textContent = `${run.steps}/${run.total_steps ?? "?"}`;
  $("#run-stop").hidden = !run.stoppable;
  $("#run-resume").hidden = !run.resumable;
  drawCharts(run.metrics);
  $("#run-files").replaceChildren(...run.files.map((name) => el("li", {}, el("a", {
    href: withToken(`/api/run/file?path=${encodeURIComponent(run.path)}&name=${encodeURIComponent(name)}`), text: name }))));
  $("#run-log").textContent = run.log;
}

const SERIES_COLOURS = ["#36c", "#c60", "#393", "#939", "#999"];

function drawCharts(rows) {
  const loss = rows.filter((r) => r.loss !== undefined).map((r) => [r.step, r.loss]);
  const evals = rows.filter((r) => (r.eval_loss ?? r.initial_eval_loss) !== undefined)
    .map((r) => [r.step, r.eval_loss ?? r.initial_eval_loss]);
  drawChart($("#loss-chart"), t("chart.loss"), [["train-line", loss, t("chart.train")], ["eval-line", evals, t("chart.eval")]]);
  // GRPO: the sampled completions' summed reward, and each reward function's mean when there are several
  const rewarded = rows.filter((r) => r.reward !== undefined);
  $("#reward-section").hidden = !rewarded.length;
  if (!rewarded.length) return;
  const functions = Object.keys(rewarded[0]).filter((k) => k.startsWith("reward/") && !k.endsWith("/std"));
  const series = [["reward-line", rewarded.map((r) => [r.step, r.reward]), t("chart.reward")]];
  if (functions.length > 1) {
    functions.forEach((key, i) => series.push([`reward-line-${i + 1}`, rewarded.map((r) => [r.step, r[key]]), key.slice(7)]));
  }
  drawChart($("#reward-chart"), t("chart.reward"), series);
}

function drawChart(svg, axisName, series) {
  const all = series.flatMap(([, points]) => points);
  svg.replaceChildren();
  if (!all.length) return;
  const maxStep = Math.max(1, ...all.map((p) => p[0]));
  const lo = Math.min(...all.map((p) => p[1])), hi = Math.max(...all.map((p) => p[1]));
  const x = (s) => 30 + (600 * s) / maxStep;
  const y = (v) => 220 - (200 * (v - lo)) / (hi - lo || 1);
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attributes, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  // axes: the value up the left (its range), steps along the bottom (0 to the last logged step)
  add("polyline", { class: "chart-axes", fill: "none", stroke: "#888", points: "30,20 30,220 630,220" });
  add("text", { x: 34, y: 30, "font-size": 11 }, hi.toFixed(3));
  add("text", { x: 34, y: 216, "font-size": 11 }, lo.toFixed(3));
  add("text", { x: 2, y: 124, "font-size": 11 }, axisName);
  add("text", { x: 30, y: 234, "font-size": 11 }, "0");
  add("text", { x: 630, y: 234, "font-size": 11, "text-anchor": "end" }, `${t("chart.step")} ${maxStep}`);
  series.forEach(([id, points, name], i) => {
    const colour = SERIES_COLOURS[i % SERIES_COLOURS.length];
    add("polyline", { id, "data-points": points.length, fill: "none", stroke: colour,
      points: points.map(([s, v]) => `${x(s)},${y(v)}`).join(" ") });
    const legend = 630 - (series.length - i) * 110;  // the legend, top right: a short line of the colour, then its name
    add("line", { x1: legend, y1: 12, x2: legend + 16, y2: 12, stroke: colour, "stroke-width": 2 });
    add("text", { x: legend + 20, y: 16, "font-size": 11, class: "chart-legend" }, name);
  });
}

async function resumeRun() {
  try { await api("POST", "/api/train/resume", { path: selectedRun }); refreshDetail(); } catch (error) { showError($("#run-log"), error); }
}

async function stopRun() {
  try { await api("POST", "/api/train/stop", { path: selectedRun }); } catch (error) { showError($("#run-log"), error); }
}

// ------------------------------------------------------------------ Data

async function checkData() {
  const target = $("#data-report");
  target.textContent = t("data.checking");
  const files = splitList($("#data-files").value);
  try {
    const report = await api("POST", "/api/data/check", { files, eval_files: splitList($("#data-eval-files").value),
      model: $("#data-model").value, max_length: $("#data-max-length").value });
    drawReport(report);
  } catch (error) { showError(target, error); }
}

const splitList = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);

async function uploadData() {
  const file = $("#data-upload").files[0];
  if (!file) return;
  const send = (overwrite) => fetch(`/api/data/upload?name=${encodeURIComponent(file.name)}${overwrite ? "&overwrite=true" : ""}`,
    { method: "POST", headers: authHeaders, body: file });
  try {
    let response = await send(false);
    if (response.status === 409 && confirm(`${t("data.replace")} ${file.name}?`)) response = await send(true);
    const result = await response.json();
    if (!response.ok) throw new Error(result.error || response.statusText);
    $("#data-files").value = result.path;
  } catch (error) { showError($("#data-report"), error); }
}

async function convertData() {
  try {
    const result = await api("POST", "/api/data/convert", { file: splitList($("#data-files").value)[0] || "",
      to: $("#convert-to").value, out: $("#convert-out").value });
    $("#convert-command").textContent = result.command;
    $("#convert-output").textContent = result.output;
  } catch (error) { showError($("#convert-output"), error); }
}

function rowLocation(file, line) {  // as the command line names a row: data.jsonl:12 (a line), data.json[11] (an index)
  if (line < 0) return file;
  return /\.(jsonl|csv)$/.test(file) ? `${file}:${line}` : `${file}[${line}]`;
}

function issueList(title, issues) {
  const items = issues.map((i) => el("li", { class: "issue", text: `${rowLocation(i.file, i.line)} ${i.field}: ${i.message}` }));
  return [el("h3", { "data-i18n": title, text: t(title) }), el("ul", {}, ...items)];
}

function drawReport(report) {
  const target = $("#data-report");
  const tokens = report.token_lengths;
  const facts = [["data.examples", report.num_examples], ["data.valid", report.num_valid],
    ["data.duplicates", report.duplicates.length],
    ["data.tokens", tokens ? `${tokens.p50} / ${tokens.p90} / ${tokens.max}` : ""],
    ["data.supervised", report.supervised_token_share ?? ""]];
  const parts = [el("ul", { id: "data-facts" }, ...facts.map(([k, v]) =>
    el("li", {}, el("span", { "data-i18n": k, text: t(k) }), `: ${v}`)))];
  if (report.ok) parts.push(el("p", { class: "ok", "data-i18n": "data.ok", text: t("data.ok") }));
  if (report.errors.length) parts.push(...issueList("data.errors", report.errors));
  if (report.warnings.length) parts.push(...issueList("data.warnings", report.warnings));
  if (report.preview) {
    const spans = report.preview.segments.map((s) => el("span", { class: s.supervised ? "supervised" : "", text: s.text }));
    parts.push(el("h3", { "data-i18n": "data.preview", text: t("data.preview") }),
      el("pre", { id: "mask-preview" }, ...spans));
  }
  target.replaceChildren(...parts);
}

// ------------------------------------------------------------------ Chat: streamed answers, base beside the run

let chatTurns = { tuned: [], base: [] };

async function prefillModel() {  // the newest finished run, where the page has no model yet
  const data = await api("GET", "/api/runs").catch(() => ({ runs: [] }));
  const finished = data.runs.find((r) => r.status === "finished");
  for (const id of ["#chat-model", "#eval-model", "#export-model"]) {
    if (finished && !$(id).value) $(id).value = finished.path;
  }
  if (finished && !$("#export-out").value) $("#export-out").value = `${settings.runs_dir}/exports/${finished.name}-merged`;
}

function bubble(column, role, text) {
  const node = el("div", { class: `msg ${role}`, text });
  $(`#chat-${column} .transcript`).append(node);
  return node;
}

async function streamAnswer(column, text) {
  chatTurns[column].push({ role: "user", content: text });
  bubble(column, "user", text);
  const answer = bubble(column, "assistant", "");
  const response = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json", ...authHeaders },
    body: JSON.stringify({ model: $("#chat-model").value, base: column === "base", messages: chatTurns[column],
      system: $("#chat-system").value, temperature: $("#chat-temperature").value,
      max_new_tokens: $("#chat-max-new-tokens").value }) });
  if (!response.ok) {
    chatTurns[column].pop();
    throw new Error((await response.json()).error || response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    answer.textContent += decoder.decode(value, { stream: true });
  }
  answer.classList.add("done");
  chatTurns[column].push({ role: "assistant", content: answer.textContent.trim() });
}

async function sendChat() {
  const text = $("#chat-input").value.trim();
  if (!text) return;
  $("#chat-input").value = "";
  $("#chat-message").replaceChildren();
  const columns = $("#chat-compare").checked ? ["tuned", "base"] : ["tuned"];
  try { await Promise.all(columns.map((c) => streamAnswer(c, text))); } catch (error) { showError($("#chat-message"), error); }
}

function resetChat() {
  chatTurns = { tuned: [], base: [] };
  document.querySelectorAll(".transcript").forEach((node) => node.replaceChildren());
}

// ------------------------------------------------------------------ Evaluate and Export: child processes

async function startJob(kind, body) {
  try {
    const result = await api("POST", `/api/${kind}/start`, body);
    $(`#${kind}-command`).textContent = result.command;
    localStorage.setItem(`tunesmith.${kind}`, result.folder);
    watchJob(kind, result.folder);
  } catch (error) { showError($(`#${kind}-status`), error); }
}

async function watchJob(kind, folder) {
  const command = kind === "eval" ? "eval" : "export";
  let job;
  try { job = await api("GET", `/api/job?folder=${encodeURIComponent(folder)}&command=${command}`); } catch (error) { return; }
  $(`#${kind}-log`).textContent = job.log;
  const state = job.running ? "job.running" : job.returncode === 0 ? "job.done" : job.returncode === null ? "" : "job.failed";
  $(`#${kind}-status`).replaceChildren(el("span", { "data-i18n": state, class: `job-${state.split(".")[1] || "unknown"}`,
    text: state ? t(state) : "" }), job.returncode ? ` ${job.returncode}` : "");
  if (kind === "eval" && job.report) {
    const images = job.images.map((name) => el("img", {
      src: withToken(`/api/run/file?path=${encodeURIComponent(folder)}&name=${encodeURIComponent(name)}`), alt: name }));
    $("#eval-report").replaceChildren(el("pre", { id: "eval-report-md", text: job.report }), ...images);
  }
  if (job.running) setTimeout(() => watchJob(kind, folder), 1500);
}

function startEval() {
  startJob("eval", { model: $("#eval-model").value, data: $("#eval-data").value, compare: $("#eval-compare").value,
    metrics: $("#eval-metrics").value, limit: $("#eval-limit").value });
}

function startExport() {
  startJob("export", { model: $("#export-model").value, format: $("#export-format").value,
    dtype: $("#export-dtype").value, out: $("#export-out").value });
}

// ------------------------------------------------------------------ start

async function main() {
  try { settings = await api("GET", "/api/settings"); } catch (error) {  // no token, or an old one: say what to open
    document.querySelector("main").replaceChildren(el("div", { class: "error", id: "no-access", text: error.message }));
    return;
  }
  if (!localStorage.getItem("tunesmith.lang")) lang = settings.lang;
  buildForm();
  applyLang();
  updateCommand();
  document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => showPage(b.dataset.page)));
  $("#lang").addEventListener("change", () => { lang = $("#lang").value; localStorage.setItem("tunesmith.lang", lang); applyLang(); });
  $("#plan-button").addEventListener("click", planRun);
  $("#start-button").addEventListener("click", startRun);
  $("#copy-button").addEventListener("click", async () => {
    await navigator.clipboard.writeText($("#train-command").textContent);
    $("#copy-button").textContent = t("train.copied");
  });
  $("#runs-refresh").addEventListener("click", refreshRuns);
  $("#run-stop").addEventListener("click", stopRun);
  $("#run-resume").addEventListener("click", resumeRun);
  $("#data-check").addEventListener("click", checkData);
  $("#data-upload").addEventListener("change", uploadData);
  $("#convert-button").addEventListener("click", convertData);
  $("#convert-to").replaceChildren(...settings.convert_targets.map((name) => el("option", { value: name, text: name })));
  $("#chat-send").addEventListener("click", sendChat);
  $("#chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter") sendChat(); });
  $("#chat-reset").addEventListener("click", resetChat);
  $("#chat-compare").addEventListener("change", () => { $("#chat-base").hidden = !$("#chat-compare").checked; });
  $("#eval-start").addEventListener("click", startEval);
  $("#export-start").addEventListener("click", startExport);
  const showDtype = () => { $("#export-dtype-label").hidden = $("#export-format").value !== "gguf"; };  // merge has none
  $("#export-format").addEventListener("change", showDtype);
  showDtype();
  for (const kind of ["eval", "export"]) {  // after a reload: show the last job again
    const folder = localStorage.getItem(`tunesmith.${kind}`);
    if (folder) watchJob(kind, folder);
  }
  showPage(localStorage.getItem("tunesmith.page") || "train");
}

main();
