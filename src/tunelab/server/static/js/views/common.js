// Pieces shared by several views: the validation report, conversation previews, file pickers,
// and the training-speed estimate.

import { h, icon, fmtInt, fmtDuration, fmtNum, statTile, errorBox } from "../dom.js";
import { histogram, toBins } from "../chart.js";
import { listAll } from "../api.js";

// "path/to/file.jsonl:12: field 'messages[1].role': unknown role" -> parts (the path is the
// server's, so only its last component is shown).
export function parseLocated(msg) {
  const m = /^(.*?):(\d+)(?::(\d+))?: (?:field '([^']*)': )?([\s\S]*)$/.exec(msg);
  if (m) return { file: m[1].split(/[\\/]/).pop(), line: +m[2], field: m[4] || null, text: m[5] };
  const f = /^(?:(.*?): )?field '([^']*)': ([\s\S]*)$/.exec(msg);
  if (f) return { file: f[1] ? f[1].split(/[\\/]/).pop() : null, line: null, field: f[2], text: f[3] };
  return { file: null, line: null, field: null, text: msg };
}

export function locatedMessage(msg) {
  const p = parseLocated(msg);
  return h("li", { class: "loc" },
    p.line !== null ? h("span", { class: "badge line" }, `line ${p.line}`) : null,
    p.field ? h("code", { class: "badge fieldname" }, p.field) : null,
    h("span", { class: "loc-text" }, p.text));
}

export function errorCount(v) {
  return Object.values((v && v.errors) || {}).reduce((a, e) => a + (e.count || 0), 0);
}

// Rows that are records, not conversations (a prompt template makes them conversations): the
// report's error kinds say so, never the words of its messages.
export function isRawRows(file) {
  const v = file.validation;
  const e = (v && v.errors) || {};
  if (e.missing_messages && v.examples && e.missing_messages.count >= v.examples * 0.5) return true;
  return file.status === "error" && !!e.unknown_format;
}

// Training throughput for time estimates: the server's, over the jobs it finished on `model`
// (default: the model uploads are counted with; token-weighted, a job far off left out, with
// the range of the jobs used: tunelab.jobs.speed), else what this browser saw in a job.
export function tokensPerSecond(ctx, model) {
  const info = ctx.info || {};
  const s = (info.training_speed || {})[model || info.stats_model];
  if (s) {
    const jobs = (n) => `${n} finished job${n === 1 ? "" : "s"}`;
    const source = s.jobs === 1 ? `from ${jobs(1)} on this server`
      : `token-weighted over ${s.used < s.jobs ? `${s.used} of ` : ""}${jobs(s.jobs)} on this server` +
        (s.left_out ? ` (${s.left_out} far off left out)` : "");
    return { value: s.tokens_per_second, low: s.low ?? s.tokens_per_second, high: s.high ?? s.tokens_per_second, source };
  }
  const local = +localStorage.getItem("tunelab.tps");
  if (local) return { value: local, low: local, high: local, source: "seen in a job watched from this browser" };
  return null;
}

// "≈ 4m 10s", or with the range of the jobs' speeds when they differ: "≈ 4m 10s (3m–6m)"
export function fmtEstimate(tokens, tps) {
  const mid = `≈ ${fmtDuration(tokens / tps.value)}`;
  if (!(tps.low > 0) || tps.high / tps.low < 1.25) return mid;
  return `${mid} (${fmtDuration(tokens / tps.high)}–${fmtDuration(tokens / tps.low)})`;
}

export function rememberTps(tps) {
  if (tps > 0) localStorage.setItem("tunelab.tps", String(tps));
}

export function validationReport(file, ctx) {
  const v = file.validation;
  const out = h("div", { class: "report" });
  if (!v) {
    if (file.status === "error") out.append(errorBox({ message: file.status_details || "The server could not read this file." }, { title: "Not usable:" }));
    else out.append(h("p", { class: "muted" }, "The server sent no validation report for this file."));
    return out;
  }
  const nErr = errorCount(v);
  const trainable = v.trainable ?? nErr === 0;
  out.append(h("div", { class: "tiles" },
    statTile("Examples", fmtInt(v.examples)),
    statTile("Valid", fmtInt(v.valid), { sub: v.examples ? `${Math.round((100 * v.valid) / v.examples)}% of lines` : null }),
    statTile("Errors", fmtInt(nErr), { kind: nErr ? "bad" : "" }),
    statTile("Result", trainable ? "Trainable" : "Not trainable", { kind: trainable ? "good" : "bad" })));

  if (nErr) {
    out.append(h("h3", {}, "Errors"));
    out.append(h("div", { class: "errors", role: "list" }, Object.entries(v.errors).map(([kind, e]) =>
      h("details", { class: "err-kind", open: true, role: "listitem", dataset: { kind } },
        h("summary", {}, icon("alert", 16), h("strong", {}, e.label || kind), h("span", { class: "count" }, fmtInt(e.count))),
        h("ul", { class: "locs" }, (e.first || []).map(locatedMessage),
          e.count > (e.first || []).length ? h("li", { class: "more" }, `… and ${fmtInt(e.count - e.first.length)} more like this`) : null)))));
  } else if (file.status === "error" && file.status_details) {
    out.append(errorBox({ message: file.status_details }, { title: "Not usable:" }));
  }
  // each warning with its kind (a server before kinds sends the messages only); duplicates
  // list their lines: they are trained again unless dropped (dedupe, on the Train page)
  const warnings = v.warning_details || (v.warnings || []).map((message) => ({ kind: null, message }));
  if (warnings.length) {
    out.append(h("h3", {}, "Warnings"), h("ul", { class: "warnings" }, warnings.map((w) =>
      h("li", { dataset: { kind: w.kind || "" } }, icon("alert", 14), " ", w.message,
        w.kind === "duplicates" ? duplicateLines(w) : null))));
  }
  const t = v.tokens;
  if (t && t.examples) {
    // the server names a local model by its folder: its last part is what a user recognises
    const model = String(t.model || "the model").replace(/[\\/]+$/, "").split(/[\\/]/).pop();
    out.append(h("h3", {}, "Tokens ", h("span", { class: "muted small", title: t.model || "" }, `counted with the chat template of ${model}, max length ${fmtInt(t.max_length)}`)));
    const tps = tokensPerSecond(ctx);
    const trainTokens = t.epoch_tokens * t.epochs;
    const secs = tps ? trainTokens / tps.value : null;
    out.append(h("div", { class: "tiles" },
      statTile("Per example", `${fmtInt(t.median)}`, { sub: `median · p95 ${fmtInt(t.p95)} · max ${fmtInt(t.max)}` }),
      statTile("Cut by max length", fmtInt(t.over_max_length), { kind: t.over_max_length ? "warn" : "",
        sub: t.over_max_length ? `examples, losing ${fmtInt(t.trained_tokens_lost)} trained tokens` : "no example is truncated" }),
      statTile("Trained tokens", `${Math.round((100 * t.trained_tokens) / Math.max(1, t.total_tokens))}%`,
               { sub: `${fmtInt(t.trained_tokens)} answer tokens of ${fmtInt(t.total_tokens)}` }),
      statTile("Training estimate", secs !== null ? fmtEstimate(trainTokens, tps) : (trainTokens < 1000 ? `${fmtInt(trainTokens)} tok` : `${fmtNum(trainTokens / 1000, 3)}k tok`),
               { sub: `${fmtInt(trainTokens)} tokens over ${fmtNum(t.epochs)} epochs` + (secs !== null ? ` at ${fmtInt(tps.value)} tok/s (${tps.source})` : " · time unknown until a first job has run here") })));
    const bins = toBins(t.histogram);
    if (bins) out.append(h("div", { class: "hist-wrap" }, histogram(bins, { limit: t.max_length })));
    else out.append(rangeBar(t));
  }
  return out;
}

// "line 37 = line 4" for each exact duplicate the report lists (the count is exact; the
// lines are the first ones)
function duplicateLines(w) {
  const pairs = w.lines || [];
  return h("div", { class: "dup-lines" },
    h("ul", { class: "locs" }, pairs.map(([line, first]) => h("li", { class: "loc" },
      h("span", { class: "badge line" }, `line ${line}`), h("span", { class: "loc-text" }, `same as line ${first}`)))),
    w.count > pairs.length ? h("div", { class: "more muted small" }, `… and ${fmtInt(w.count - pairs.length)} more`) : null,
    h("div", { class: "muted small" }, w.dropped ? "Dropped from this file." : "Each is trained again; tick “Drop exact duplicates” on the Train page to leave them out."));
}

// Without a histogram from the server: min / median / p95 / max on one axis.
function rangeBar(t) {
  const top = Math.max(t.max, t.max_length || 0) || 1;
  const pos = (x) => `${(100 * x) / top}%`;
  return h("div", { class: "range", "aria-label": `tokens per example: min ${t.min}, median ${t.median}, p95 ${t.p95}, max ${t.max}` },
    h("div", { class: "range-track" },
      h("div", { class: "range-span", style: { left: pos(t.min), width: `calc(${pos(t.max)} - ${pos(t.min)})` } }),
      h("div", { class: "range-mid", style: { left: pos(t.median) }, title: `median ${t.median}` }),
      t.max_length && t.max_length < top ? h("div", { class: "range-limit", style: { left: pos(t.max_length) }, title: `max length ${t.max_length}` }) : null),
    h("div", { class: "range-labels" }, h("span", {}, `min ${fmtInt(t.min)}`), h("span", {}, `median ${fmtInt(t.median)}`),
      h("span", {}, `p95 ${fmtInt(t.p95)}`), h("span", {}, `max ${fmtInt(t.max)}`)));
}

export function conversation(conv, { compact = false } = {}) {
  const msgs = (conv && (conv.messages || conv)) || [];
  return h("div", { class: ["conv", compact && "compact"] }, (Array.isArray(msgs) ? msgs : []).map((m) =>
    h("div", { class: ["msg", m.role] }, h("div", { class: "role" }, m.role), h("div", { class: "content" }, String(m.content ?? "")))));
}

export async function fineTuneFiles() {
  const files = await listAll("/v1/files", { max: 1000 });
  return files.filter((f) => !f.purpose || f.purpose === "fine-tune").sort((a, b) => (b.created_at || 0) - (a.created_at || 0));
}

export function fileOptions(files, { none, onlyOk = true } = {}) {
  const opts = none ? [["", none]] : [];
  for (const f of files) {
    if (onlyOk && f.status === "error") continue;
    const n = f.validation ? ` · ${fmtInt(f.validation.valid ?? f.validation.examples)} examples` : "";
    opts.push([f.id, `${f.filename}${n}`]);
  }
  return opts;
}

// Map an API error's `param` onto a form field id and show it there; false if none matched.
// A key matches when its dotted parts appear in the param's parts ("lora.r" matches
// "tunelab.lora.r", "n_epochs" matches "method.supervised.hyperparameters.n_epochs").
export function showParamError(form, err, map) {
  const parts = err && err.param ? String(err.param).split(/[.\[\]]+/).filter(Boolean) : [];
  if (!parts.length) return false;
  const has = (key) => {
    const k = key.split(".");
    for (let i = 0; i + k.length <= parts.length; i++) if (k.every((x, j) => parts[i + j] === x)) return true;
    return false;
  };
  for (const [key, id] of Object.entries(map)) {
    if (!has(key)) continue;
    const box = form.querySelector(`#${CSS.escape(id)}-err`);
    if (!box) continue;
    box.textContent = err.message.replace(/^field '[^']*': /, "");   // it is shown at that field
    box.hidden = false;
    const c = form.querySelector(`#${CSS.escape(id)}`);
    if (c) { c.setAttribute("aria-invalid", "true"); c.focus(); }
    return true;
  }
  return false;
}

// ---- training objectives and kinds of data, as the server publishes them (/v1/tunelab/info):
// the page keeps no copy of the objective registry, its hyperparameters or its metrics.

const KIND_WORDS = { conversations: "conversations", preferences: "preference pairs" };
export const kindWords = (kind) => KIND_WORDS[kind] || kind || "unknown data";

export function objectives(ctx) {
  const list = (ctx.info && ctx.info.objectives) || [];
  // a server from before objectives were published trains supervised fine-tunes only
  return list.length ? list : [{ name: "sft", api_type: "supervised", title: "supervised fine-tuning", data_kind: "conversations",
                                 hyperparameters: [], metrics: ["mean_token_accuracy"], auto_learning_rate: {} }];
}

export function objectiveFor(ctx, apiType) {
  const list = objectives(ctx);
  return list.find((o) => o.api_type === apiType) || list[0];
}

// What a file holds ("conversations" | "preferences"), from its validation report: the kind it
// names, else the kind whose published formats include the report's format; null if unknown.
export function dataKind(file, ctx) {
  const v = file && file.validation;
  if (!v) return null;
  if (v.kind || v.data_kind) return v.kind || v.data_kind;
  for (const [kind, names] of Object.entries((ctx.info && ctx.info.data_formats) || {})) {
    if (names.includes(v.format)) return kind;
  }
  return null;
}

// "reward_accuracy" -> "reward accuracy"; accuracies read as shares (0..1, shown in %).
export const metricLabel = (name) => String(name).replace(/_/g, " ");
export const isShare = (name) => /accuracy$/.test(name);
export const fmtMetric = (name, v, digits = 4) => (v === null || v === undefined ? "—" : isShare(name) ? `${fmtNum(100 * v, 3)}%` : fmtNum(v, digits));

// A preference pair side by side: the prompt (its messages), the chosen and the rejected answer.
export function preferencePair(pair) {
  const col = (cls, label, ...body) => h("div", { class: ["pair-col", cls] }, h("div", { class: "pair-head" }, label), ...body);
  const text = (t) => h("div", { class: "content" }, String(t ?? ""));
  return h("div", { class: "pair", dataset: { line: pair.line } },
    col("prompt", "prompt", ...(pair.prompt || []).map((m) => h("div", { class: ["msg", m.role] },
      h("div", { class: "role" }, m.role), text(m.content)))),
    col("chosen", "chosen", text(pair.chosen)),
    col("rejected", "rejected", text(pair.rejected)));
}
