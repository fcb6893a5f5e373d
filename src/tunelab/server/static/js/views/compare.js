// Compare: run the base-vs-fine-tuned comparison (POST /v1/tunelab/evaluations) and read its
// table, charts, example answers and full report.

import { h, icon, fmtInt, fmtNum, fmtDuration, fmtAgo, pill, errorBox, field, select, button, card, clearFieldErrors, spinner, emptyState, clear } from "../dom.js";
import { get, post, request, listAll } from "../api.js";
import { bars } from "../chart.js";
import { fineTuneFiles, fileOptions, showParamError } from "./common.js";

// Tasks that score generated answers (compare refuses the loss and preference tasks); judge
// only where the server takes a grader (its schema has `judge`).
const TASKS = [["auto", "auto — picked from the answers"], ["classification", "classification (labels)"],
               ["exact_match", "exact match"], ["rouge", "ROUGE (free text)"], ["gsm8k", "GSM8K (final number)"]];
const JUDGE_TASK = ["judge", "graded by a model (free text)"];
const HISTORY = "tunelab.evaluations";

export async function render(root, { id, query }, ctx) {
  return id ? renderEvaluation(root, id, ctx) : renderForm(root, query, ctx);
}

let schemaCache = null;
async function requestFields(name) {
  try {
    schemaCache ||= await get("/openapi.json");
    return new Set(Object.keys(((schemaCache.components || {}).schemas || {})[name]?.properties || {}));
  } catch { return new Set(); }
}

function remember(id) {
  const ids = JSON.parse(localStorage.getItem(HISTORY) || "[]").filter((x) => x !== id);
  localStorage.setItem(HISTORY, JSON.stringify([id, ...ids].slice(0, 20)));
}

async function renderForm(root, query, ctx) {
  ctx.setHeader("Compare", { sub: "Is fine-tuning worth it? The fine-tuned model against its base, prompted zero-shot, with a system prompt and with examples." });
  root.append(h("div", { class: "loading" }, spinner(), "Loading models and files…"));
  let models, files, job = null;
  try {
    [models, files] = await Promise.all([get("/v1/models").then((r) => r.data || []), fineTuneFiles()]);
    if (query.get("job")) job = await get(`/v1/fine_tuning/jobs/${encodeURIComponent(query.get("job"))}`).catch(() => null);
  } catch (e) {
    root.replaceChildren(errorBox(e, { title: "Could not load models and files:" }));
    return;
  }
  root.replaceChildren();
  // Final fine-tuned models first (newest first), then their checkpoints.
  const isCkpt = (m) => /:ckpt-/.test(m.id);
  const tuned = models.filter((m) => String(m.id).startsWith("ft:"))
    .sort((a, b) => (isCkpt(a) - isCkpt(b)) || ((b.created || 0) - (a.created || 0)));
  const base = models.filter((m) => !String(m.id).startsWith("ft:"));
  if (!tuned.length) {
    root.append(card(null, emptyState("No fine-tuned model yet", "Train one first; then compare it with its base model here.",
      button("Set up training", { kind: "primary", onClick: () => ctx.navigate("train") }))));
    root.append(historyCard());
    return;
  }
  const usable = files.filter((f) => f.status !== "error");
  const modelSel = select(tuned.map((m) => [m.id, isCkpt(m) ? `${m.id} (checkpoint)` : m.id]), { id: "c-model", value: query.get("model") || tuned[0].id });
  const baseSel = select([["", "— the fine-tune's own base —"], ...base.map((m) => [m.id, m.id])], { id: "c-base", value: "" });
  // The test split made on the Data page for this model's training data, when there was one.
  const jobOf = (model) => (/(ftjob-[A-Za-z0-9]+)/.exec(model || "") || [])[1];
  const testFor = (model) => localStorage.getItem(`tunelab.testFor.${(job && job.id) || jobOf(model)}`) || "";
  const testGuess = testFor(query.get("model") || tuned[0].id);
  const testSel = select(fileOptions(usable, { none: "— choose the held-out test file —" }), { id: "c-test", value: testGuess });
  const trainSel = select(fileOptions(usable, { none: "— the fine-tuning job's training file —" }), { id: "c-train", value: "" });
  const shots = h("input", { type: "number", id: "c-shots", min: 0, max: 32, value: 5, inputmode: "numeric" });
  // Offered only when the server's schema has the field (older servers refuse unknown fields).
  const fields = await requestFields("EvaluationCreate");
  const task = select(fields.has("judge") ? [...TASKS, JUDGE_TASK] : TASKS, { id: "c-task", value: "auto" });
  const system = h("textarea", { id: "c-system", rows: 2, placeholder: "e.g. Answer with one word: positive or negative." });
  const limit = h("input", { type: "number", id: "c-limit", min: 1, step: 1, placeholder: "all", inputmode: "numeric" });
  const general = fields.has("general_check") ? h("input", { type: "checkbox", id: "c-general", checked: true }) : null;
  const retrieval = fields.has("retrieval") ? h("input", { type: "number", id: "c-retrieval", min: 0, max: 32, value: 0, inputmode: "numeric" }) : null;
  if (general) general.setAttribute("aria-describedby", "c-general-hint");
  const judge = judgeFields();
  const showJudge = () => { judge.box.hidden = task.value !== "judge"; };
  task.addEventListener("change", showJudge);
  showJudge();
  const submit = button("Run comparison", { kind: "primary", type: "submit", icon: "compare" });
  const formErr = h("div", { class: "form-error", id: "c-form-err", role: "alert" });
  const form = h("form", { class: "form", novalidate: true },
    h("div", { class: "grid-2" },
      field("Fine-tuned model", modelSel, { hint: "A fine-tuned model or one of its checkpoints." }),
      field("Base model", baseSel, { hint: "Found from the fine-tuned model unless you pick one." }),
      field("Test file", testSel, { hint: "Held-out conversations: the last answer of each is the reference." }),
      field("Training file (for few-shot)", trainSel, { hint: "The few-shot row takes its examples from here, never from the test file." }),
      field("Few-shot examples", shots, { hint: "How many examples go in the few-shot prompt; 0 skips that row." }),
      field("Task", task, { hint: "Decides the metric: accuracy, exact match, ROUGE, a grader model’s grades…" }),
      field("Test examples", limit, { hint: "The first N of the test file; empty for all of them." }),
      retrieval ? field("Retrieved examples", retrieval, { hint: "Per request, the K most similar training examples (BM25) as shots; 0 skips that row." }) : null,
      general ? h("div", { class: "check-field" }, h("div", { class: "check" }, general, h("label", { for: "c-general" }, "Check what the fine-tune forgot")),
        h("div", { class: "hint", id: "c-general-hint" }, "General prompts answered by both models (slower).")) : null),
    judge.box,
    field("System prompt for the prompted baseline", system, { hint: "Optional: what you would otherwise tell the base model." }),
    h("div", { class: "form-actions" }, submit, formErr));
  modelSel.addEventListener("change", () => { const t = testFor(modelSel.value); if (t && !testSel.value) testSel.value = t; });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearFieldErrors(form);
    formErr.replaceChildren();
    if (!testSel.value) { showParamError(form, { param: "test_file", message: "Choose the held-out test file (the test split from the Data page)." }, { test_file: "c-test" }); return; }
    const body = { model: modelSel.value, test_file: testSel.value, task: task.value, few_shot: +shots.value || 0 };
    if (baseSel.value) body.base_model = baseSel.value;
    if (trainSel.value) body.training_file = trainSel.value;
    if (system.value.trim()) body.system = system.value.trim();
    if (limit.value) body.limit = +limit.value;
    if (general && !general.checked) body.general_check = false;
    if (retrieval && +retrieval.value > 0) body.retrieval = +retrieval.value;
    if (task.value === "judge") body.judge = judge.value();
    submit.disabled = true;
    try {
      const ev = await post("/v1/tunelab/evaluations", body);
      remember(ev.id);
      ctx.navigate(`compare/${ev.id}`);
    } catch (err) {
      const shown = showParamError(form, err, { model: "c-model", base_model: "c-base", test_file: "c-test", training_file: "c-train",
                                                few_shot: "c-shots", task: "c-task", system: "c-system", limit: "c-limit",
                                                retrieval: "c-retrieval", judge: "c-judge-model", "judge.url": "c-judge-url",
                                                "judge.model": "c-judge-model", "judge.api_key": "c-judge-key", "judge.rubric": "c-judge-rubric" });
      formErr.replaceChildren(errorBox(err, { title: shown ? "Not started:" : "Could not start the comparison:" }));
    } finally { submit.disabled = false; }
  });
  root.append(card("New comparison", form), historyCard());
}

// The grader of the judge task: any OpenAI-compatible endpoint. The key goes with this one
// request (the server keeps it with the job and never shows it back).
function judgeFields() {
  const url = h("input", { type: "text", id: "c-judge-url", placeholder: "https://api.openai.com/v1", autocomplete: "off", spellcheck: "false" });
  const model = h("input", { type: "text", id: "c-judge-model", placeholder: "gpt-4o-mini", autocomplete: "off", spellcheck: "false" });
  const key = h("input", { type: "password", id: "c-judge-key", autocomplete: "off" });
  const rubric = h("textarea", { id: "c-judge-rubric", rows: 3, placeholder: "Optional: your grading instructions for grades 1 to 5 (default: tunelab's rubric)." });
  const pairwise = h("input", { type: "checkbox", id: "c-judge-pairwise" });
  const box = h("fieldset", { class: "judge-box", id: "c-judge" },
    h("legend", {}, "Grader"),
    h("div", { class: "grid-2" },
      field("Grader endpoint", url, { hint: "Any OpenAI-compatible API (a base URL ending in /v1); empty for OpenAI's." }),
      field("Grader model", model, { hint: "The model that grades each answer from 1 to 5, with its reason." }),
      field("Grader API key", key, { hint: "Sent to that endpoint only; never shown back." }),
      h("div", { class: "check-field" }, h("div", { class: "check" }, pairwise, h("label", { for: "c-judge-pairwise" }, "Also compare answers in pairs")),
        h("div", { class: "hint", id: "c-judge-pairwise-hint" }, "Fine-tuned vs the best prompted setup, each pair asked in both orders: a win rate with its 95% interval."))),
    field("Rubric", rubric, { hint: "The grader's instructions; the reply format is added by tunelab." }));
  pairwise.setAttribute("aria-describedby", "c-judge-pairwise-hint");
  const value = () => {
    const j = { model: model.value.trim() || "gpt-4o-mini", pairwise: pairwise.checked };
    if (url.value.trim()) j.url = url.value.trim();
    if (key.value) j.api_key = key.value;
    if (rubric.value.trim()) j.rubric = rubric.value.trim();
    return j;
  };
  return { box, value };
}

function historyCard() {
  const body = h("div", {}, h("div", { class: "loading" }, spinner(), "Loading…"));
  (async () => {
    let evs;
    try { evs = await listAll("/v1/tunelab/evaluations", { max: 20, limit: 20 }); } catch {
      // No list endpoint: the evaluations started from this browser.
      const ids = JSON.parse(localStorage.getItem(HISTORY) || "[]");
      evs = (await Promise.all(ids.map((i) => get(`/v1/tunelab/evaluations/${i}`).catch(() => null)))).filter(Boolean);
    }
    body.replaceChildren(evs.length ? h("ul", { class: "mini-list" }, evs.map((ev) => h("li", {},
      h("a", { href: `#/compare/${ev.id}` }, h("span", { class: "mono" }, ev.model || ev.id)), pill(ev.status),
      ev.result && ev.result.verdict ? h("span", { class: "muted small clip" }, ev.result.verdict) : h("span", { class: "muted small" }, fmtAgo(ev.created_at))))) :
      h("p", { class: "muted" }, "No comparisons yet."));
  })();
  return card("Past comparisons", body);
}

async function renderEvaluation(root, id, ctx) {
  let alive = true, timer = null, failures = 0;
  const started = Date.now();
  const status = h("div");
  const result = h("div");
  root.append(h("p", { class: "crumbs" }, h("a", { href: "#/compare" }, "← Compare")), status, result);
  let drawnResult = false;

  const cancel = async () => {
    try {
      await post(`/v1/tunelab/evaluations/${encodeURIComponent(id)}/cancel`, {});
      clearTimeout(timer);
      tick();
    } catch (e) { clear(status, errorBox(e, { title: "Cancel failed:" })); }
  };

  const draw = (ev) => {
    const active = !["succeeded", "failed", "cancelled"].includes(ev.status);
    ctx.setHeader("Comparison", { sub: `${ev.id}${ev.model ? " · " + ev.model : ""}`,
      actions: [pill(ev.status), active ? button("Cancel", { kind: "danger", icon: "stop", id: "cancel-eval", onClick: cancel }) : null] });
    if (ev.status === "cancelled") {
      clear(status, h("div", { class: "alert muted" }, icon("stop"), h("div", {}, "Cancelled. A comparison keeps nothing partial: ",
        h("a", { href: `#/compare?model=${encodeURIComponent(ev.model || "")}` }, "run it again"), " to measure.")));
      return false;
    }
    clear(status, active || ev.error ? h("section", { class: "card eval-status" },
      active ? h("div", { class: "row gap muted" }, spinner(), `Measuring the base model (zero-shot, with a system prompt, few-shot) and the fine-tuned model on the test file… ${fmtDuration((Date.now() - started) / 1000)}`) : null,
      active && ev.progress && ev.progress.total ? h("div", { class: "eval-progress" },
        h("div", { class: "small" }, `${ev.progress.stage}: ${fmtInt(ev.progress.done)} of ${fmtInt(ev.progress.total)}`),
        h("div", { class: "progress" }, h("div", { class: "progress-fill", style: { width: `${(100 * ev.progress.done) / ev.progress.total}%` } }))) : null,
      ev.error ? errorBox({ message: ev.error.message || String(ev.error), code: ev.error.code }, { title: ev.error.param ? `Failed (${ev.error.param}):` : "Failed:" }) : null) : null);
    if (ev.status === "succeeded" && ev.result && !drawnResult) {
      drawnResult = true;
      clear(result, resultView(ev, metrics));
    }
    return active;
  };

  const tick = async () => {
    if (!alive) return;
    let active = true;
    try {
      const ev = await get(`/v1/tunelab/evaluations/${encodeURIComponent(id)}`);
      failures = 0;
      ctx.setOnline(true);
      active = draw(ev);
    } catch (e) {
      failures++;
      if (e.status === 404 || e.status === 401) { clear(status, errorBox(e, { title: `Cannot open comparison ${id}:` })); return; }
      if (e.network) ctx.setOnline(false);
      clear(status, h("div", { class: "banner" }, icon("refresh", 16), ` ${e.message} Retrying…`));
    }
    if (alive && active) timer = setTimeout(tick, Math.min(15000, 2000 * 2 ** failures));
  };
  ctx.setHeader("Comparison");
  const metrics = await loadMetrics();
  await tick();
  return () => { alive = false; clearTimeout(timer); };
}

// The metric table (GET /v1/tunelab/metrics: tunelab/evaluate/metrics.py, which the report
// reads too): each key's label, unit, direction and whether it is a column of the table. A key
// the table does not know reads as its words, a number.
let metricTable = null;
async function loadMetrics() {
  metricTable ||= get("/v1/tunelab/metrics")
    .then((r) => Object.fromEntries((r.data || []).map((m) => [m.key, m])))
    .catch(() => { metricTable = null; return {}; });
  return metricTable;
}
const metricOf = (table, k) => table[k] || { key: k, label: String(k).replace(/_/g, " "), unit: "number", direction: "neither" };

function fmtMetric(m, v) {
  if (typeof v !== "number" || !Number.isFinite(v)) return "—";
  if (m.unit === "fraction") return `${(100 * v).toFixed(1)}%`;
  if (m.unit === "count" || m.unit === "tokens") return fmtInt(v);
  if (m.unit === "grade") return v.toFixed(2);
  return m.signed ? signed(v) : fmtNum(v, 4);
}
// ~3,100: two significant figures, as the verdict's sentence says it (tunelab/evaluate/cost.py about)
function about(n) {
  if (n < 100) return `~${fmtInt(Math.ceil(n))}`;
  const step = 10 ** (Math.floor(Math.log10(n)) - 1);
  return `~${fmtInt(Math.round(n / step) * step)}`;
}
// a heading wraps between words, not at a label's hyphen ("macro-F1")
const heading = (label) => String(label).replace(/-/g, "\u2011");
const better = (m) => (m.direction === "lower" ? " (lower is better)" : m.direction === "higher" ? " (higher is better)" : "");

// The verdict's fields (verdict_detail, rendered into the sentence by tunelab/evaluate/verdict.py)
// as short facts under the sentence.
function verdictFacts(d) {
  if (!d || !d.kind || d.kind === "tuned_only" || d.kind === "ungraded") return [];
  const facts = [];
  const num = (x) => typeof x === "number" && Number.isFinite(x);
  if (num(d.points)) facts.push(["points", `${d.points >= 0 ? "+" : ""}${d.points.toFixed(1)} points vs ${d.best_baseline}`]);
  if (num(d.prompt_tokens_ratio)) facts.push(["tokens", `prompt tokens ×${d.prompt_tokens_ratio.toFixed(2)}`]);
  if (num(d.cost_ratio)) facts.push(["cost", `cost per request ×${d.cost_ratio.toFixed(2)}`]);
  if (d.pays_back === true && num(d.break_even_requests)) facts.push(["break-even", `pays back after ${about(d.break_even_requests)} requests`]);
  else if (d.pays_back === false) facts.push(["break-even", "never pays back"]);
  const p = d.pairwise;
  if (p && num(p.win_rate)) facts.push(["pairwise", `pairwise win rate ${(100 * p.win_rate).toFixed(0)}% [${(100 * p.ci_low).toFixed(0)}–${(100 * p.ci_high).toFixed(0)}%]`]);
  return facts;
}

function resultView(ev, table = {}) {
  const r = ev.result;
  const rows = r.rows || [];
  const perK = r.cost && r.cost.per_1k_requests;
  const primary = r.primary_metric || "score";
  const pm = metricOf(table, primary);
  const pct = (x) => (x === null || x === undefined || Number.isNaN(+x) ? "—" : `${(100 * x).toFixed(1)}%`);
  const isFrac = pm.unit === "fraction";
  const fmtP = (x) => fmtMetric(pm, x);
  const best = Math.max(...rows.map((x) => (Number.isFinite(+x.primary) ? +x.primary : -Infinity)));
  const columns = Object.values(table).filter((m) => m.column && m.key !== primary && rows.some((x) => x.metrics && m.key in x.metrics));
  // One fine-tuned model ("fine-tuned") or several, each named (comparison.json's tuned_models).
  const tunedModels = r.tuned_models && r.tuned_models.length ? r.tuned_models : [{ name: "fine-tuned", model: r.tuned }];
  const several = tunedModels.length > 1;
  const isTuned = (x) => tunedModels.some((t) => t.name === x.name);
  // Rows name server paths for local models: show the ids the user knows.
  // ft:{base}:{key}:{suffix}:{job}: the base id is the fine-tune's second part.
  const baseId = ev.base_model || (String(ev.model).startsWith("ft:") ? String(ev.model).split(":")[1] : null);
  const lastPart = (m) => (/^[/<]/.test(m || "") ? String(m).split("/").filter(Boolean).slice(-1)[0] : m);
  const shown = (x) => (isTuned(x) ? (several ? lastPart(x.model) : ev.model) : baseId) || lastPart(x.model);
  // The verdict as fields: the sentence is shown as the server rendered it, never read.
  const detail = r.verdict_detail || {};
  const kind = detail.kind || "";
  // Held-out preference pairs: the base model's result goes on its zero-shot row, each
  // fine-tuned model's on its own row; prompted rows have none (pairs are scored as they are).
  const prefRows = (r.preference && r.preference.rows) || [];
  const prefOf = (x) => prefRows.find((p) => p.name === (x.name === "base zero-shot" ? "base" : x.name)) || null;
  const out = h("div", { class: "eval-result" });
  const facts = verdictFacts(detail);
  out.append(h("div", { class: ["verdict", kind === "tuned_wins" ? "good" : kind === "prompting_wins" ? "bad" : ""], dataset: { kind } },
    h("div", { class: "verdict-label" }, `Task: ${r.task || "—"} · metric: ${detail.metric_label || pm.label}`), h("div", { class: "verdict-text" }, r.verdict || ""),
    facts.length ? h("div", { class: "verdict-facts" }, facts.map(([k, text]) => h("span", { class: "fact", dataset: { fact: k } }, text))) : null));
  out.append(card("Results", h("div", { class: "table-wrap", id: "comparison-wrap" }, h("table", { class: "table cmp", id: "comparison-table" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Setup"), h("th", { scope: "col", class: "num" }, heading(pm.label)),
      columns.map((m) => h("th", { scope: "col", class: "num" }, heading(m.label))),
      prefRows.length ? ["Preferred", "Pref. margin"].map((c) => h("th", { scope: "col", class: "num", title: "Held-out preference pairs: how often the chosen answer is the more likely one; mean log-probability margin" }, c)) : null,
      ["Prompt tokens", "Answer tokens", "Latency", "Req/s"].map((c) => h("th", { scope: "col", class: "num" }, c)),
      perK ? h("th", { scope: "col", class: "num", title: r.cost.basis }, "$ / 1k req") : null)),
    h("tbody", {}, rows.map((x) => h("tr", { class: [isTuned(x) && "tuned", +x.primary === best && "best"] },
      h("th", { scope: "row" }, x.name, h("div", { class: "mono muted small model-id", title: x.model }, shown(x))),
      h("td", { class: "num strong" }, fmtP(x.primary)),
      columns.map((m) => h("td", { class: "num" }, fmtMetric(m, x.metrics[m.key]))),
      prefRows.length ? [h("td", { class: "num" }, prefOf(x) ? pct(prefOf(x).primary) : "—"),
        h("td", { class: "num" }, prefOf(x) ? signed(prefOf(x).metrics.margin) : "—")] : null,
      h("td", { class: "num" }, fmtInt(x.prompt_tokens)), h("td", { class: "num" }, fmtNum(x.completion_tokens, 3)),
      h("td", { class: "num" }, x.latency_s !== undefined ? `${fmtNum(x.latency_s, 2)} s` : "—"),
      h("td", { class: "num" }, fmtNum(x.requests_per_s, 3)),
      perK ? h("td", { class: "num" }, fmtUsd(perK[x.name])) : null)))))));
  out.append(h("div", { class: "grid-3 charts" },
    card(null, bars(rows.map((x) => ({ label: x.name, value: x.primary, cls: isTuned(x) ? "tuned" : "" })),
      { title: `${pm.label}${better(pm)}`, format: fmtP, max: isFrac ? 1 : undefined })),
    card(null, bars(rows.map((x) => ({ label: x.name, value: x.prompt_tokens, cls: isTuned(x) ? "tuned" : "" })),
      { title: "Prompt tokens per request (lower is cheaper)", format: fmtInt })),
    card(null, bars(rows.map((x) => ({ label: x.name, value: x.latency_s, cls: isTuned(x) ? "tuned" : "" })),
      { title: "Latency per request, seconds (lower is faster)", format: (v) => fmtNum(v, 2) }))));
  if (perK) out.append(costCard(r.cost, rows, isTuned));
  if (r.judge) out.append(judgeCard(r, rows, isTuned, table));
  if (prefRows.length) out.append(preferenceCard(r.preference, isTuned));
  if (Array.isArray(r.examples) && r.examples.length) out.append(card("Example answers", examplesTable(r.examples, rows)));
  const f = r.forgetting && r.forgetting.general;
  if (f) {
    // One line per fine-tuned model (forgetting.models); a single model's is forgetting.general.
    const checks = (r.forgetting.models || []).filter((m) => m.general).length > 1
      ? r.forgetting.models.filter((m) => m.general).map((m) => ({ name: m.name, g: m.general }))
      : [{ name: "fine-tuned", g: f }];
    const lost = checks.flatMap(({ name, g }) => (g.lost_examples || []).map((x) => ({ name, ...x })));
    out.append(card(several ? "What the fine-tunes forgot" : "What the fine-tune forgot", h("div", {},
      checks.map(({ name, g }) => h("p", {}, `General check (${fmtInt(g.items)} prompts): base ${pct(g.base)} → ${name} ${pct(g.tuned)} · ${g.lost} answers lost, ${g.gained} gained.`)),
      lost.length ? h("div", { class: "table-wrap" }, h("table", { class: "table compact" },
        h("thead", {}, h("tr", {}, ["Prompt", "Base", ...(several ? ["Model"] : []), "Fine-tuned"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, lost.map((x) => h("tr", {}, h("td", {}, textOf(x.prompt)), h("td", {}, x.base), several ? h("td", {}, x.name) : null, h("td", {}, x.tuned)))))) : null)));
  }
  if (r.warnings && r.warnings.length) out.append(h("ul", { class: "warnings" }, r.warnings.map((w) => h("li", {}, icon("alert", 14), " ", w))));
  out.append(reportFrame(ev));
  return out;
}

// Graded answers (the judge task): who graded, each row's grades, the pairwise comparison.
function judgeCard(r, rows, isTuned, table) {
  const j = r.judge, p = r.pairwise;
  const keys = ["judge_score", "judge_mean"].map((k) => metricOf(table, k));
  const pctOf = (x) => (typeof x === "number" ? `${(100 * x).toFixed(0)}%` : "—");
  return card("Graded answers", h("div", { id: "judge-card" },
    h("p", { class: "small" }, `Graded by ${j.model} at ${j.url} with ${j.rubric} rubric, grades ${j.scale[0]} to ${j.scale[1]}.`),
    h("div", { class: "table-wrap" }, h("table", { class: "table cmp", id: "judge-table" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Setup"), keys.map((m) => h("th", { scope: "col", class: "num" }, m.label)),
        h("th", { scope: "col", class: "num" }, "Ungraded"))),
      h("tbody", {}, rows.map((x) => h("tr", { class: [isTuned(x) && "tuned"] }, h("th", { scope: "row" }, x.name),
        keys.map((m) => h("td", { class: "num" }, fmtMetric(m, x.metrics[m.key]))),
        h("td", { class: "num" }, `${fmtInt(x.metrics.ungraded ?? 0)} of ${fmtInt(x.examples)}`)))))),
    p ? h("p", { id: "pairwise" }, `Pairwise, ${p.a} vs ${p.b}: ${p.wins} won, ${p.losses} lost, ${p.ties} tied, ${p.ungraded} ungraded — `,
      typeof p.win_rate === "number"
        ? h("strong", {}, `win rate ${pctOf(p.win_rate)} (95% CI ${pctOf(p.ci_low)} to ${pctOf(p.ci_high)}, Wilson; a tie counts half)`)
        : h("strong", {}, "no pair could be graded")) : null,
    h("p", { class: "muted small" }, "An answer whose grade could not be read is ungraded: counted, left out of the score; the grader's replies and reasons are in the full report below. In pairs, each is asked in both orders and wins only when both name it.")));
}

const signed = (v) => (typeof v === "number" && Number.isFinite(v) ? `${v >= 0 ? "+" : ""}${fmtNum(v, 3)}` : "—");

// Held-out preference pairs, every metric, for the base model and each fine-tuned model.
function preferenceCard(pref, isTuned) {
  const pct = (x) => (typeof x === "number" ? `${(100 * x).toFixed(1)}%` : "—");
  const num = (x) => (typeof x === "number" ? fmtNum(x, 3) : "—");
  return card("Preference pairs", h("div", {},
    h("div", { class: "table-wrap" }, h("table", { class: "table cmp", id: "preference-table" },
      h("thead", {}, h("tr", {}, ["Model", "Preferred", "Per-token", "Mean margin", "Chosen log-prob", "Rejected log-prob"]
        .map((c, i) => h("th", { scope: "col", class: i ? "num" : "" }, c)))),
      h("tbody", {}, pref.rows.map((p) => h("tr", { class: [isTuned(p) && "tuned"] },
        h("th", { scope: "row" }, p.name),
        h("td", { class: "num strong" }, pct(p.metrics.accuracy)), h("td", { class: "num" }, pct(p.metrics.normalized_accuracy)),
        h("td", { class: "num" }, signed(p.metrics.margin)), h("td", { class: "num" }, num(p.metrics.chosen_logp)),
        h("td", { class: "num" }, num(p.metrics.rejected_logp))))))),
    h("p", { class: "muted small" }, "A pair counts as preferred when the model gives its chosen answer a higher log-probability than the rejected one (per-token: divided by each answer's length); the margin is chosen minus rejected.")),
    { sub: `${fmtInt(pref.pairs)} held-out pairs${pref.file ? " · " + pref.file : ""}` });
}

function textOf(p) {
  if (Array.isArray(p)) return p.map((m) => m.content).join("\n");
  return String(p ?? "");
}

// Cost per 1,000 requests of each option (comparison.cost, computed by tunelab/evaluate/cost.py)
// and the fine-tuning run's cost and break-even against the best prompting setup.
const fmtUsd = (v) => (typeof v !== "number" ? "—" : v < 0.01 ? `$${v.toFixed(4)}` : v < 1 ? `$${v.toFixed(3)}` : `$${v.toFixed(2)}`);

function costCard(cost, rows, isTuned) {
  const per = cost.per_1k_requests || {};
  const facts = [`Priced at ${cost.basis}.`];
  if (typeof cost.train_cost === "number")
    facts.push(`Training: ${fmtDuration(cost.train_seconds)} at $${cost.prices.train_per_hour}/hour = ${fmtUsd(cost.train_cost)}.`);
  else facts.push("Training time unknown.");
  if (cost.pays_back === true) facts.push(`Pays back its training after ${about(cost.break_even_requests)} requests against ${cost.against}.`);
  else if (cost.pays_back === false) facts.push(`Never pays back its training against ${cost.against}: it costs as much or more per request.`);
  return card("Cost", h("div", { id: "cost-card" }, h("p", { class: "small" }, facts.join(" ")),
    bars(rows.filter((x) => typeof per[x.name] === "number").map((x) => ({ label: x.name, value: per[x.name], cls: isTuned(x) ? "tuned" : "" })),
      { title: "USD per 1,000 requests (lower is cheaper)", format: fmtUsd })));
}

function examplesTable(examples, rows) {
  const names = rows.map((r) => r.name);
  return h("div", { class: "table-wrap" }, h("table", { class: "table compact examples" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Prompt"), h("th", { scope: "col" }, "Expected"), names.map((n) => h("th", { scope: "col" }, n)))),
    h("tbody", {}, examples.slice(0, 12).map((x) => h("tr", {}, h("td", { class: "prompt" }, textOf(x.prompt || x.messages)), h("td", {}, x.reference ?? x.expected ?? ""),
      names.map((n) => {
        const a = (x.answers || {})[n];
        const text = a && typeof a === "object" ? a.prediction : a;
        const ok = a && typeof a === "object" && a.score !== undefined ? a.score >= 1 : null;
        return h("td", { class: ok === null ? "" : ok ? "good-text" : "bad-text" }, text ?? "—");
      }))))));
}

// The report holds every example answer. It needs the key, so it is fetched and shown in a
// sandboxed frame (no scripts, no same-origin access) rather than linked.
function reportFrame(ev) {
  const holder = h("div", { class: "report-frame" });
  const load = async () => {
    clear(holder, h("div", { class: "loading" }, spinner(), "Loading the report…"));
    try {
      const res = await request(`/v1/tunelab/evaluations/${ev.id}/report`, { raw: true });
      const html = await res.text();
      const frame = h("iframe", { title: "Comparison report", sandbox: "", srcdoc: html });
      const open = button("Open in a new tab", { kind: "ghost small", icon: "arrow", onClick: () => {
        const url = URL.createObjectURL(new Blob([html], { type: "text/html" }));
        window.open(url, "_blank", "noopener");
        setTimeout(() => URL.revokeObjectURL(url), 60000);
      } });
      clear(holder, frame, h("div", { class: "form-actions" }, open));
    } catch (e) { clear(holder, errorBox(e, { title: "Report unavailable:" })); }
  };
  load();
  return card("Full report", holder, { sub: "Every example answer, per setup, with the charts of the comparison" });
}

