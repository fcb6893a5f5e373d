// Train: base model, data, method, hyperparameters (auto defaults shown), start a job.

import { h, icon, fmtInt, fmtNum, fmtDuration, fmtAgo, pill, errorBox, field, select, button, card,
         clearFieldErrors, spinner } from "../dom.js";
import { get, post, listAll } from "../api.js";
import { fineTuneFiles, fileOptions, showParamError, tokensPerSecond } from "./common.js";

// The `auto` rules of src/tunelab/train/auto.py, mirrored only to SHOW what auto will pick
// before the job exists; the server resolves the real values (the job page shows them).
const auto = {
  epochs: (n) => (n * 3 < 100 ? Math.min(25, Math.ceil(100 / n)) : n * 3 > 25000 ? Math.max(1, Math.floor(25000 / n)) : 3),
  batch: (n) => (n < 2000 ? 8 : n < 10000 ? 16 : 32),
  lr: (method) => (method === "full" ? 2e-5 : 2e-4),
};

const METHODS = [
  ["lora", "LoRA", "Trains small adapter matrices beside the frozen model: fast, light on memory, the usual choice."],
  ["full", "Full", "Updates every weight: the most capacity, but needs more memory, data and care."],
];

export async function render(root, { query }, ctx) {
  ctx.setHeader("Train", { sub: "Choose a base model and your data; the auto settings suit most datasets." });
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

  // ---- controls
  const OTHER = "__other__";
  const modelSel = select([...models.map((m) => [m, m]), [OTHER, "Other: a folder or hub id…"]], { id: "f-model", value: query.get("model") || models[0] || OTHER });
  const modelOther = h("input", { type: "text", id: "f-model-other", placeholder: "/path/to/model or org/name", hidden: modelSel.value !== OTHER, "aria-label": "Model folder or hub id" });
  modelSel.addEventListener("change", () => { modelOther.hidden = modelSel.value !== OTHER; if (!modelOther.hidden) modelOther.focus(); });
  const trainSel = select(fileOptions(usable, { none: usable.length ? null : "— upload a file first —" }), { id: "f-train", value: query.get("training_file") || undefined });
  const validSel = select(fileOptions(usable, { none: "— none —" }), { id: "f-valid", value: query.get("validation_file") || "" });
  const methodGroup = h("div", { class: "choice", role: "radiogroup", "aria-label": "Method" },
    METHODS.map(([v, label, text], i) => h("label", { class: "choice-card" },
      h("input", { type: "radio", name: "method", value: v, checked: i === 0 }),
      h("span", { class: "choice-title" }, label), h("span", { class: "choice-text" }, text))));
  const num = (id, attrs = {}) => h("input", { type: "number", id, placeholder: "auto", inputmode: "decimal", ...attrs });
  const epochs = num("f-epochs", { min: 1, max: 50, step: 1 });   // the API's bound
  const batch = num("f-batch", { min: 1, max: 1024, step: 1 });
  const lrm = num("f-lr", { min: 0, step: "any" });
  const rank = num("f-rank", { min: 1, max: 512, step: 1, placeholder: "16" });
  const maxLen = num("f-maxlen", { min: 8, step: 1, placeholder: "1024" });
  const suffix = h("input", { type: "text", id: "f-suffix", maxlength: 40, placeholder: "e.g. sentiment", pattern: "[A-Za-z0-9_.-]*" });
  const seed = num("f-seed", { step: 1, placeholder: "42" });

  const hints = { epochs: h("span"), batch: h("span"), lr: h("span") };
  const plan = h("div", { class: "plan" });
  const submit = button("Start fine-tuning", { kind: "primary wide", type: "submit", icon: "spark", disabled: !usable.length });
  const formErr = h("div", { class: "form-error", id: "train-form-err", role: "alert" });

  const method = () => methodGroup.querySelector("input:checked").value;
  const fileById = (id) => files.find((f) => f.id === id);

  const form = h("form", { class: "train-form", novalidate: true },
    card("Model and data", h("div", { class: "grid-2" },
      h("div", {}, field("Base model", modelSel, { hint: "The open model to start from." }), modelOther),
      field("Training file", trainSel, { hint: "Conversations the model learns from." }),
      field("Validation file", validSel, { hint: "Optional: scored during training; the best checkpoint is kept." }))),
    card("Method", methodGroup),
    card("Hyperparameters", h("div", { class: "grid-3" },
      field("Epochs", epochs, { hint: hints.epochs }),
      field("Batch size", batch, { hint: hints.batch }),
      field("Learning rate multiplier", lrm, { hint: hints.lr }),
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

  const update = () => {
    const f = fileById(trainSel.value);
    const n = f && f.validation ? (f.validation.valid ?? f.validation.examples) : null;
    const m = method();
    form.querySelector(".lora-only").hidden = m !== "lora";
    const ep = +epochs.value || (n ? auto.epochs(n) : null);
    const bs = +batch.value || (n ? auto.batch(n) : null);
    const lr = auto.lr(m) * (+lrm.value || 1);
    hints.epochs.textContent = n ? `auto = ${auto.epochs(n)} for ${fmtInt(n)} examples (3; more for small data so ~100 examples' worth of updates happen).`
                                 : "auto: 3, more for small datasets, fewer for big ones.";
    hints.batch.textContent = n ? `auto = ${auto.batch(n)}: examples per optimizer step (8 below 2,000 examples, 16 below 10,000, else 32).`
                                : "auto: 8 below 2,000 examples, 16 below 10,000, else 32.";
    hints.lr.textContent = `auto = 1 × ${fmtNum(auto.lr(m))} (the ${m === "full" ? "full fine-tuning" : "LoRA"} rate); scales the learning rate.`;
    const t = f && f.validation && f.validation.tokens;
    const steps = n && bs ? Math.ceil(n / bs) * ep : null;
    const tokens = t && t.epoch_tokens ? t.epoch_tokens * ep : null;
    const tps = tokensPerSecond(ctx, modelSel.value === OTHER ? null : modelSel.value);
    plan.replaceChildren(h("dl", { class: "kv" },
      h("dt", {}, "Examples"), h("dd", {}, n ? fmtInt(n) : "—"),
      h("dt", {}, "Epochs"), h("dd", {}, ep ? fmtNum(ep) : "auto"),
      h("dt", {}, "Batch size"), h("dd", {}, bs ? fmtInt(bs) : "auto"),
      h("dt", {}, "Learning rate"), h("dd", {}, fmtNum(lr)),
      h("dt", {}, "Optimizer steps"), h("dd", {}, steps ? `≈ ${fmtInt(steps)}` : "—"),
      h("dt", {}, "Tokens"), h("dd", {}, tokens ? `≈ ${fmtInt(tokens)}` : "—"),
      h("dt", {}, "Time"), h("dd", {}, tokens && tps ? [`≈ ${fmtDuration(tokens / tps.value)} `, h("span", { class: "muted small" }, `at ${fmtInt(tps.value)} tok/s, ${tps.source}`)]
                                                     : h("span", { class: "muted" }, "unknown until a first job has run here"))));
  };
  form.addEventListener("input", update);
  form.addEventListener("change", update);
  update();

  const onSubmit = async (e) => {
    e.preventDefault();
    clearFieldErrors(form);
    formErr.replaceChildren();
    const model = modelSel.value === OTHER ? modelOther.value.trim() : modelSel.value;
    if (!model) { showParamError(form, { param: "model", message: "Choose a base model or type a folder / hub id." }, { model: "f-model" }); return; }
    if (!trainSel.value) { showParamError(form, { param: "training_file", message: "Upload a training file first (Data page)." }, { training_file: "f-train" }); return; }
    const hp = {
      n_epochs: epochs.value ? +epochs.value : "auto",
      batch_size: batch.value ? +batch.value : "auto",
      learning_rate_multiplier: lrm.value ? +lrm.value : "auto",
    };
    const extra = { method: method() };
    if (method() === "lora" && rank.value) extra.lora = { r: +rank.value };
    if (maxLen.value) extra.max_length = +maxLen.value;
    const body = {
      model, training_file: trainSel.value,
      method: { type: "supervised", supervised: { hyperparameters: hp } },
      tunelab: extra,
    };
    if (validSel.value) body.validation_file = validSel.value;
    if (suffix.value.trim()) body.suffix = suffix.value.trim();
    if (seed.value) body.seed = +seed.value;
    submit.disabled = true;
    try {
      const job = await post("/v1/fine_tuning/jobs", body);
      const test = localStorage.getItem(`tunelab.testFor.${trainSel.value}`);
      if (test) localStorage.setItem(`tunelab.testFor.${job.id}`, test);
      ctx.navigate(`jobs/${job.id}`);
    } catch (err) {
      const shown = showParamError(form, err, {
        training_file: "f-train", validation_file: "f-valid", model: "f-model", n_epochs: "f-epochs",
        batch_size: "f-batch", learning_rate: "f-lr", "lora.r": "f-rank", r: "f-rank", max_length: "f-maxlen",
        suffix: "f-suffix", seed: "f-seed",
      });
      formErr.replaceChildren(errorBox(err, { title: shown ? "Not started:" : "Could not start the job:" }));
    } finally { submit.disabled = false; }
  };
  form.addEventListener("submit", onSubmit);
}

async function baseModels(ctx) {
  const fromInfo = (ctx.info && ctx.info.models) || [];
  if (fromInfo.length) return fromInfo.map((m) => (typeof m === "string" ? m : m.id));
  try {
    const r = await get("/v1/models");
    return (r.data || []).filter((m) => !String(m.id).startsWith("ft:")).map((m) => m.id);
  } catch { return []; }
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

