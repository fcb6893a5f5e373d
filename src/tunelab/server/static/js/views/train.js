// Train: objective, base model, data, method, hyperparameters, start a job.
//
// Nothing about training is copied here: the objectives (what each trains on, its own
// hyperparameters and their bounds) come from GET /v1/tunelab/info, and what `auto` resolves
// to on the chosen file from POST /v1/tunelab/plan, the server's own planning code, which also
// checks the request as a job would.

import { h, fmtInt, fmtNum, fmtAgo, pill, errorBox, field, select, button, card,
         clearFieldErrors, setFieldError, spinner, debounce } from "../dom.js";
import { get, post, listAll } from "../api.js";
import { fineTuneFiles, fileOptions, showParamError, tokensPerSecond, fmtEstimate, objectives, dataKind, kindWords } from "./common.js";

// OpenAI's hyperparameters that every method type takes have their own boxes; an objective's
// own ones (DPO's beta) get boxes made from what the server publishes about them.
const SHARED = { n_epochs: "f-epochs", batch_size: "f-batch", learning_rate_multiplier: "f-lr" };

const METHODS = [
  ["lora", "LoRA", "Trains small adapter matrices beside the frozen model: fast, light on memory, the usual choice."],
  ["qlora", "QLoRA", "LoRA over a 4-bit copy of the model: a quarter of the memory for its weights, a little slower. For a model too big for LoRA."],
  ["full", "Full", "Updates every weight: the most capacity, but needs more memory, data and care."],
];

// What each kind of data teaches, in words (the registry says which kind an objective reads).
const LEARNS = {
  conversations: "Learns to answer as your conversations do.",
  preferences: "Learns to prefer the chosen answer over the rejected one, from preference pairs, staying close to the model it starts from.",
};

const cap = (s) => s.charAt(0).toUpperCase() + s.slice(1);

export async function render(root, { query }, ctx) {
  ctx.setHeader("Train", { sub: "Choose what to optimise, a base model and your data; the auto settings suit most datasets." });
  root.append(h("div", { class: "loading" }, spinner(), "Loading models and files…"));
  let files, models;
  try {
    [files, models] = await Promise.all([fineTuneFiles(), baseModels(ctx)]);
  } catch (e) {
    root.replaceChildren(errorBox(e, { title: "Could not load models and files:" }));
    return;
  }
  root.replaceChildren();
  const usable = files.filter((f) => f.status !== "error");
  const objs = objectives(ctx);
  const fileById = (id) => files.find((f) => f.id === id);

  // the objective: asked for, else the one that trains on the preselected file, else the first
  const pre = fileById(query.get("training_file") || "");
  const preKind = pre ? dataKind(pre, ctx) : null;
  const start = objs.find((o) => o.api_type === query.get("method")) ||
                objs.find((o) => preKind && o.data_kind === preKind) || objs[0];

  // ---- controls
  const OTHER = "__other__";
  const modelSel = select([...models.map((m) => [m, m]), [OTHER, "Other: a folder or hub id…"]], { id: "f-model", value: query.get("model") || models[0] || OTHER });
  const modelOther = h("input", { type: "text", id: "f-model-other", placeholder: "/path/to/model or org/name", hidden: modelSel.value !== OTHER, "aria-label": "Model folder or hub id" });
  modelSel.addEventListener("change", () => { modelOther.hidden = modelSel.value !== OTHER; if (!modelOther.hidden) modelOther.focus(); });
  const trainSel = h("select", { id: "f-train" });
  const validSel = h("select", { id: "f-valid" });
  const trainHint = h("span");
  const validHint = h("span");
  // exact duplicates in the training file are trained again unless the job drops them
  // (tunelab.dedupe); offered when the file's check found some
  const dedupe = h("input", { type: "checkbox", id: "f-dedupe", "aria-describedby": "f-dedupe-hint" });
  const dedupeHint = h("span", { class: "muted small", id: "f-dedupe-hint" });
  const dedupeWrap = h("div", { class: "field dedupe", hidden: true },
    h("div", { class: "check" }, dedupe, h("label", { for: "f-dedupe" }, "Drop exact duplicates"), dedupeHint));
  const objectiveGroup = h("div", { class: "choice", role: "radiogroup", "aria-label": "Objective" },
    objs.map((o) => h("label", { class: "choice-card" },
      h("input", { type: "radio", name: "objective", value: o.api_type, checked: o === start }),
      h("span", { class: "choice-title" }, cap(o.title), h("span", { class: "muted small" }, ` · ${o.api_type}`)),
      h("span", { class: "choice-text" }, LEARNS[o.data_kind] || `Trains on ${kindWords(o.data_kind)}.`,
        h("span", { class: "choice-needs" }, ` Needs ${kindWords(o.data_kind)}.`)))));
  const methodGroup = h("div", { class: "choice", role: "radiogroup", "aria-label": "Method" },
    METHODS.map(([v, label, text], i) => h("label", { class: "choice-card" },
      h("input", { type: "radio", name: "method", value: v, checked: i === 0 }),
      h("span", { class: "choice-title" }, label), h("span", { class: "choice-text" }, text))));
  const num = (id, attrs = {}) => h("input", { type: "number", id, placeholder: "auto", inputmode: "decimal", ...attrs });
  const boxes = { n_epochs: num("f-epochs", { step: 1 }), batch_size: num("f-batch", { step: 1 }), learning_rate_multiplier: num("f-lr", { step: "any" }) };
  const rank = num("f-rank", { min: 1, max: 512, step: 1, placeholder: "16" });
  const maxLen = num("f-maxlen", { min: 8, step: 1, placeholder: "1024" });
  const suffix = h("input", { type: "text", id: "f-suffix", maxlength: 40, placeholder: "e.g. sentiment", pattern: "[A-Za-z0-9_.-]*" });
  const seed = num("f-seed", { step: 1, placeholder: "42" });

  // each objective's own hyperparameters, shown while it is chosen
  const own = [];   // {objective, hp, input, hint, wrap}
  for (const o of objs) {
    for (const hp of o.hyperparameters || []) {
      if (hp.name in SHARED) continue;
      const input = num(`f-hp-${hp.name}`, { step: "any", placeholder: hp.auto !== null && hp.auto !== undefined ? `auto (${hp.auto})` : "auto",
                                             min: hp.minimum ?? hp.exclusiveMinimum, max: hp.maximum ?? hp.exclusiveMaximum });
      const hint = h("span", {}, hp.description || "");
      own.push({ o, hp, input, wrap: h("div", { class: "own-hp", dataset: { objective: o.api_type } }, field(cap(hp.name.replace(/_/g, " ")), input, { hint })) });
    }
  }

  const hints = { n_epochs: h("span"), batch_size: h("span"), learning_rate_multiplier: h("span") };
  const plan = h("div", { class: "plan", "aria-busy": "true", "aria-live": "polite" });
  const submit = button("Start fine-tuning", { kind: "primary wide", type: "submit", icon: "spark", disabled: !usable.length });
  const formErr = h("div", { class: "form-error", id: "train-form-err", role: "alert" });

  const objective = () => objs.find((o) => o.api_type === objectiveGroup.querySelector("input:checked").value) || objs[0];
  const method = () => methodGroup.querySelector("input:checked").value;
  const hasAdapters = () => ["lora", "qlora"].includes(method());

  const form = h("form", { class: "train-form", novalidate: true },
    card("Objective", objectiveGroup, { sub: "What is optimised." }),
    card("Model and data", h("div", { class: "grid-2" },
      h("div", {}, field("Start from", modelSel, { hint: "A base model, or one of your fine-tunes (DPO after SFT)." }), modelOther),
      h("div", {}, field("Training file", trainSel, { hint: trainHint }), dedupeWrap),
      field("Validation file", validSel, { hint: validHint }))),
    card("Method", methodGroup, { sub: "How the weights are adapted." }),
    card("Hyperparameters", h("div", { class: "grid-3" },
      field("Epochs", boxes.n_epochs, { hint: hints.n_epochs }),
      field("Batch size", boxes.batch_size, { hint: hints.batch_size }),
      field("Learning rate multiplier", boxes.learning_rate_multiplier, { hint: hints.learning_rate_multiplier }),
      own.map((x) => x.wrap),
      h("div", { class: "lora-only" }, field("LoRA rank", rank, { hint: "Adapter size: higher can learn more, costs more. 8–64 is typical." })),
      field("Max length", maxLen, { hint: "Tokens per example; longer ones are cut (see the file's check)." }),
      field("Seed", seed, { hint: "Same seed and data: the same loss curve." })),
      { sub: "Leave a box empty for auto." }),
    card("Name", field("Suffix", suffix, { hint: "Becomes part of the model name: ft:base:key:suffix:job." })));

  const side = h("aside", { class: "train-side" },
    card("Plan", h("div", {}, plan, h("div", { class: "form-actions column" }, submit, formErr))),
    recentJobs());
  submit.setAttribute("form", "train-form");
  form.id = "train-form";
  root.append(h("div", { class: "train-layout" }, form, side));

  // ---- files of the objective's kind (files whose kind is unknown are offered too)
  const fillFiles = (keepTrain, keepValid) => {
    const o = objective();
    const fits = (f) => { const k = dataKind(f, ctx); return !k || k === o.data_kind; };
    const shown = usable.filter(fits);
    const hidden = usable.length - shown.length;
    trainSel.replaceChildren(...fileOptions(shown, { none: shown.length ? null : `— upload ${kindWords(o.data_kind)} first —` })
      .map(([v, label]) => h("option", { value: v }, label)));
    validSel.replaceChildren(...fileOptions(shown, { none: "— none —" }).map(([v, label]) => h("option", { value: v }, label)));
    if (keepTrain && shown.some((f) => f.id === keepTrain)) trainSel.value = keepTrain;
    // a validation file that cannot be used (a split's part that is "Not usable") is not
    // offered: "— none —" is chosen, and the hint says why
    const validOk = !!keepValid && shown.some((f) => f.id === keepValid);
    validSel.value = validOk ? keepValid : "";
    if (validSel.selectedIndex < 0) validSel.selectedIndex = 0;
    const others = hidden ? ` ${fmtInt(hidden)} file${hidden === 1 ? "" : "s"} of other data hidden: ${kindWords(o.data_kind)} only.` : "";
    trainHint.textContent = `${cap(kindWords(o.data_kind))} the model learns from.${others}`;
    const unusable = keepValid && !validOk ? files.find((f) => f.id === keepValid) : null;
    validHint.textContent = unusable ? `${unusable.filename} is not usable${unusable.status === "error" ? ` (${unusable.status_details || "see its check"})` : ""}: training runs without validation, or choose another file.`
      : "Optional: scored during training; the best checkpoint is kept.";
    validHint.classList.toggle("warn-text", !!unusable);
    showDedupe();
    submit.disabled = !shown.length;
  };
  function showDedupe() {
    const f = fileById(trainSel.value);
    const d = f && f.validation && f.validation.duplicates;
    dedupeWrap.hidden = !(d && d.count && !d.dropped);
    if (dedupeWrap.hidden) { dedupe.checked = false; return; }
    const first = (d.lines || []).slice(0, 3).map(([line, of]) => `line ${line} = line ${of}`).join(", ");
    dedupeHint.textContent = `${fmtInt(d.count)} exact duplicate${d.count === 1 ? "" : "s"} in this file (${first}${d.count > 3 ? ", …" : ""}): trained again unless dropped.`;
  }
  trainSel.addEventListener("change", showDedupe);
  fillFiles(query.get("training_file"), query.get("validation_file"));

  // ---- the request, as the job and the plan take it
  const requestBody = () => {
    const o = objective();
    const hp = {};
    for (const name of Object.keys(SHARED)) hp[name] = boxes[name].value ? +boxes[name].value : "auto";
    for (const x of own) if (x.o === o) hp[x.hp.name] = x.input.value ? +x.input.value : "auto";
    const extra = { method: method() };
    if (!dedupeWrap.hidden && dedupe.checked) extra.dedupe = true;
    if (hasAdapters() && rank.value) extra.lora = { r: +rank.value };
    if (maxLen.value) extra.max_length = +maxLen.value;
    const body = { model: modelSel.value === OTHER ? modelOther.value.trim() : modelSel.value,
                   method: { type: o.api_type, [o.api_type]: { hyperparameters: hp } }, tunelab: extra };
    if (trainSel.value) body.training_file = trainSel.value;
    if (validSel.value) body.validation_file = validSel.value;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    if (seed.value) body.seed = +seed.value;
    return body;
  };

  // ---- the plan: what auto resolves to, from the server
  let planCall = null;
  const refreshPlan = debounce(async () => {
    planCall?.abort();
    const call = planCall = new AbortController();
    const body = requestBody();
    if (!body.model) body.model = undefined;
    try {
      const p = await post("/v1/tunelab/plan", body, { signal: call.signal });
      if (call === planCall) drawPlan(p, null);
    } catch (e) {
      if (e.name !== "AbortError" && call === planCall) drawPlan(null, e);
    }
  }, 200);

  const drawPlan = (p, err) => {
    plan.setAttribute("aria-busy", "false");
    const o = objective();
    const m = method();
    const rate = (o.auto_learning_rate || {})[m];
    const describe = (name) => ((o.hyperparameters || []).find((x) => x.name === name) || {}).description || "";
    if (err) {
      for (const k of Object.keys(hints)) hints[k].textContent = describe(k);
      plan.replaceChildren(h("div", { class: "alert bad small" }, h("div", {}, h("strong", {}, "Cannot plan this job: "), err.message)));
      return;
    }
    const n = p.examples;
    const hp = p.method[p.method.type].hyperparameters;
    hints.n_epochs.textContent = n ? `auto = ${fmtNum(p.epochs)} for ${fmtInt(n)} examples · ${describe("n_epochs")}.` : describe("n_epochs");
    hints.batch_size.textContent = n ? `auto = ${fmtInt(p.batch_size)} · ${describe("batch_size")}.` : describe("batch_size");
    hints.learning_rate_multiplier.textContent = `auto = 1 × ${fmtNum(p.auto_learning_rate)} (the ${o.name} ${m === "full" ? "full fine-tuning" : METHODS.find(([v]) => v === m)[1]} rate); scales the learning rate.`;
    const tps = tokensPerSecond(ctx, modelSel.value === OTHER ? null : modelSel.value);
    const ownRows = own.filter((x) => x.o === o).flatMap((x) => [h("dt", {}, cap(x.hp.name.replace(/_/g, " "))), h("dd", {}, String(hp[x.hp.name] ?? "—"))]);
    plan.replaceChildren(
      p.warnings && p.warnings.length ? h("div", { class: "alert warn small plan-warning", role: "alert" }, p.warnings.join(" ")) : "",
      h("dl", { class: "kv" },
        h("dt", {}, "Objective"), h("dd", {}, o.api_type),
        h("dt", {}, "Examples"), h("dd", {}, n ? fmtInt(n) : "—"),
        h("dt", {}, "Epochs"), h("dd", {}, p.epochs ? fmtNum(p.epochs) : "—"),
        h("dt", {}, "Batch size"), h("dd", {}, p.batch_size ? fmtInt(p.batch_size) : "—"),
        h("dt", {}, "Learning rate"), h("dd", {}, fmtNum(p.learning_rate ?? rate)),
        ...ownRows,
        h("dt", {}, "Optimizer steps"), h("dd", {}, p.steps ? `≈ ${fmtInt(p.steps)}` : "—"),
        h("dt", {}, "Tokens"), h("dd", {}, p.tokens ? `≈ ${fmtInt(p.tokens)}` : "—"),
        h("dt", {}, "Time"), h("dd", {}, p.tokens && tps ? [`${fmtEstimate(p.tokens, tps)} `, h("span", { class: "muted small" }, `at ${fmtInt(tps.value)} tok/s, ${tps.source}`)]
                                                       : h("span", { class: "muted" }, p.tokens ? "unknown until a first job has run here" : "—"))));
  };

  const update = () => {
    const o = objective();
    form.querySelector(".lora-only").hidden = !hasAdapters();
    for (const x of own) x.wrap.hidden = x.o !== o;
    for (const hp of o.hyperparameters || []) {     // the bounds the API takes
      const box = boxes[hp.name];
      if (!box) continue;
      box.min = hp.minimum ?? hp.exclusiveMinimum ?? "";
      box.max = hp.maximum ?? "";
    }
    plan.setAttribute("aria-busy", "true");
    refreshPlan();
  };
  objectiveGroup.addEventListener("change", (e) => { e.stopPropagation(); fillFiles(trainSel.value, validSel.value); update(); });
  form.addEventListener("input", (e) => {   // an edited box's old error no longer applies
    if (e.target.id && e.target.getAttribute("aria-invalid") === "true") setFieldError(form, e.target.id, "");
    update();
  });
  form.addEventListener("change", update);
  update();

  const onSubmit = async (e) => {
    e.preventDefault();
    clearFieldErrors(form);
    formErr.replaceChildren();
    const body = requestBody();
    if (!body.model) { showParamError(form, { param: "model", message: "Choose a base model or type a folder / hub id." }, { model: "f-model" }); return; }
    if (!body.training_file) { showParamError(form, { param: "training_file", message: `Upload ${kindWords(objective().data_kind)} first (Data page).` }, { training_file: "f-train" }); return; }
    submit.disabled = true;
    try {
      const job = await post("/v1/fine_tuning/jobs", body);
      const test = localStorage.getItem(`tunelab.testFor.${body.training_file}`);
      if (test) localStorage.setItem(`tunelab.testFor.${job.id}`, test);
      ctx.navigate(`jobs/${job.id}`);
    } catch (err) {
      const shown = showParamError(form, err, {
        training_file: "f-train", validation_file: "f-valid", model: "f-model", n_epochs: "f-epochs",
        batch_size: "f-batch", learning_rate: "f-lr", "lora.r": "f-rank", r: "f-rank", max_length: "f-maxlen",
        suffix: "f-suffix", seed: "f-seed",
        ...Object.fromEntries(own.map((x) => [x.hp.name, x.input.id])),
        ...Object.fromEntries(own.map((x) => [x.hp.config_key, x.input.id])),
      });
      formErr.replaceChildren(errorBox(err, { title: shown ? "Not started:" : "Could not start the job:" }));
    } finally { submit.disabled = false; }
  };
  form.addEventListener("submit", onSubmit);
}

// Base models first, then your finished fine-tunes (DPO after SFT starts from one; the API
// accepts any ft: model or checkpoint you own, the list offers the finished ones).
async function baseModels(ctx) {
  const bases = ((ctx.info && ctx.info.models) || []).map((m) => (typeof m === "string" ? m : m.id));
  let ids = [];
  try { ids = ((await get("/v1/models")).data || []).map((m) => String(m.id)); } catch { /* bases only */ }
  if (!bases.length) bases.push(...ids.filter((id) => !id.startsWith("ft:")));
  return [...bases, ...ids.filter((id) => id.startsWith("ft:") && !id.includes(":ckpt-step-"))];
}

function recentJobs() {
  const body = h("div", {}, h("div", { class: "loading" }, spinner(), "Loading…"));
  listAll("/v1/fine_tuning/jobs", { max: 5, limit: 5 }).then((jobs) => {
    body.replaceChildren(jobs.length ? h("ul", { class: "mini-list" }, jobs.slice(0, 5).map((j) =>
      h("li", {}, h("a", { href: `#/jobs/${j.id}` }, h("span", { class: "mono" }, j.fine_tuned_model || j.id)), pill(j.status),
        h("span", { class: "muted small" }, fmtAgo(j.created_at))))) : h("p", { class: "muted" }, "No jobs yet."));
  }).catch((e) => body.replaceChildren(errorBox(e)));
  return card("Recent jobs", body, { actions: h("a", { href: "#/jobs", class: "small" }, "All jobs →") });
}
