// Data: upload -> check (validation report) -> template raw rows -> split -> train.

import { h, icon, fmtInt, fmtBytes, fmtAgo, pill, errorBox, toast, field, select, button, card, emptyState, clearFieldErrors, spinner } from "../dom.js";
import { get, post, del, upload, download, request } from "../api.js";
import { validationReport, conversation, errorCount, isRawRows, fineTuneFiles, showParamError, dataKind, kindWords,
         preferencePair, objectives } from "./common.js";

export async function render(root, { id }, ctx) {
  return id ? renderFile(root, id, ctx) : renderList(root, ctx);
}

// ---------------------------------------------------------------- list + upload
async function renderList(root, ctx) {
  ctx.setHeader("Data", { sub: "Upload examples, check them, turn raw rows into conversations and split them." });
  root.append(uploadCard(ctx));
  const listBody = h("div", {}, h("div", { class: "loading" }, spinner(), "Loading files…"));
  root.append(card("Files", listBody, { sub: "Uploaded to this server" }));
  try {
    const files = await fineTuneFiles();
    listBody.replaceChildren(files.length ? filesTable(files, ctx) :
      emptyState("No files yet", "Upload a JSONL, JSON, CSV, TSV or Parquet file above to get started."));
  } catch (e) {
    listBody.replaceChildren(errorBox(e, { title: "Could not list files:" }));
  }
}

function uploadCard(ctx) {
  const input = h("input", { type: "file", id: "file-input", class: "sr-only",
                             accept: ".jsonl,.json,.csv,.tsv,.parquet,.txt,.jsonl.gz" });
  const status = h("div", { class: "upload-status", "aria-live": "polite" });
  const zone = h("div", { class: "drop", id: "dropzone" },
    h("div", { class: "drop-icon" }, icon("upload", 28)),
    h("div", { class: "drop-title" }, "Drop a file here to upload"),
    h("div", { class: "drop-sub" }, "JSONL, JSON, CSV, TSV or Parquet: chat messages, ShareGPT, Alpaca, prompt/completion, question/answer — or raw rows to shape with a template."),
    h("label", { for: "file-input", class: "btn primary", tabindex: "0",
                 onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } } },
      icon("file", 16), h("span", {}, "Choose a file")),
    input);
  const go = async (file) => {
    if (!file) return;
    const bar = h("div", { class: "progress" }, h("div", { class: "progress-fill", style: { width: "0%" } }));
    status.replaceChildren(h("div", { class: "uploading" }, h("span", {}, `Uploading ${file.name} (${fmtBytes(file.size)})…`), bar));
    zone.classList.add("busy");
    try {
      const f = await upload(file, { onProgress: (p) => {
        bar.firstChild.style.width = `${Math.round(p * 100)}%`;
        if (p >= 1) status.querySelector("span").textContent = `Checking ${file.name}…`;
      } });
      toast(`Uploaded ${f.filename}`, "ok");
      ctx.navigate(`data/${f.id}`);
    } catch (e) {
      status.replaceChildren(errorBox(e, { title: `Upload of ${file.name} failed:` }));
    } finally {
      zone.classList.remove("busy");
      input.value = "";
    }
  };
  input.addEventListener("change", () => go(input.files[0]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    go(e.dataTransfer.files[0]);
  });
  return card(null, h("div", {}, zone, status), { cls: "upload-card" });
}

function filesTable(files, ctx) {
  return h("div", { class: "table-wrap" }, h("table", { class: "table files" },
    h("thead", {}, h("tr", {}, ["Name", "Examples", "Status", "Size", "Uploaded"].map((c, i) => h("th", { scope: "col", class: i > 2 && "hide-phone" }, c)))),
    h("tbody", {}, files.map((f) => h("tr", {},
      h("td", {}, h("a", { href: `#/data/${f.id}`, class: "strong" }, icon("file", 15), " ", f.filename),
        dataKind(f, ctx) === "preferences" ? h("span", { class: "tag" }, "pairs") : null,
        h("div", { class: "mono muted small" }, f.id)),
      h("td", { class: "num" }, f.validation ? fmtInt(f.validation.examples) : "—"),
      h("td", {}, pill(f.status || "processed"), f.validation && errorCount(f.validation) ? h("span", { class: "muted small" }, ` ${fmtInt(errorCount(f.validation))} errors`) : null),
      h("td", { class: "num hide-phone" }, fmtBytes(f.bytes)),
      h("td", { class: "hide-phone" }, fmtAgo(f.created_at)))))));
}

// ---------------------------------------------------------------- one file: the steps
function step(n, title, sub, body, state = "") {
  return h("section", { class: ["step", state], "aria-labelledby": `step-${n}` },
    h("div", { class: "step-rail" }, h("div", { class: "step-num", "aria-hidden": "true" }, state === "done" ? icon("check", 16) : String(n))),
    h("div", { class: "step-body card" },
      h("header", { class: "card-head" }, h("div", {}, h("h2", { id: `step-${n}` }, title), sub ? h("p", { class: "sub" }, sub) : null)),
      body));
}

async function renderFile(root, id, ctx) {
  let file;
  try { file = await get(`/v1/files/${encodeURIComponent(id)}`); } catch (e) {
    ctx.setHeader("File");
    root.append(errorBox(e, { title: `Cannot open file ${id}:` }), h("p", {}, h("a", { href: "#/data" }, "← All files")));
    return;
  }
  const ok = file.status !== "error" && (!file.validation || errorCount(file.validation) === 0);
  // what the file holds, as the server reads it: preference pairs or conversations
  let preview = null;
  try { preview = await get(`/v1/tunelab/files/${encodeURIComponent(id)}/preview?limit=3`); } catch { /* no preview: the report still shows */ }
  const kind = dataKind(file, ctx) || (preview && preview.kind) || null;
  const raw = isRawRows(file) && kind !== "preferences";
  const trainsWith = objectives(ctx).find((o) => o.data_kind === kind);
  ctx.setHeader(file.filename, {
    sub: `${file.id} · ${fmtBytes(file.bytes)} · uploaded ${fmtAgo(file.created_at)}${kind ? ` · ${kindWords(kind)}` : ""}`,
    actions: [
      button("Download", { icon: "download", kind: "ghost", onClick: () => download(`/v1/files/${file.id}/content`, file.filename).catch((e) => toast(e.message, "bad")) }),
      button("Delete", { icon: "trash", kind: "ghost danger", onClick: async () => {
        if (!confirm(`Delete ${file.filename}?`)) return;
        try { await del(`/v1/files/${file.id}`); toast("Deleted"); ctx.navigate("data"); } catch (e) { toast(e.message, "bad"); }
      } }),
      button("Train on it", { icon: "arrow", kind: "primary", disabled: !ok, title: ok ? "" : "Fix the errors first",
                              onClick: () => ctx.navigate(trainLink(file, trainsWith)) }),
    ],
  });
  root.append(h("p", { class: "crumbs" }, h("a", { href: "#/data" }, "← All files")));
  const steps = h("div", { class: "steps" });
  root.append(steps);

  steps.append(step(1, "Check", ok ? `Every example can be trained on${kind ? `: ${kindWords(kind)}` : ""}.` : raw
      ? "These rows are not conversations yet: shape them with a prompt template (step 2)."
      : "Fix these lines in your file and upload it again.",
    h("div", {}, validationReport(file, ctx), previewBlock(preview, kind, trainsWith)), ok ? "done" : "attention"));
  steps.append(step(2, "Prompt template", raw ? "Turn each raw row into an instruction conversation."
      : "Optional: for raw rows (e.g. reviews with a label) rather than conversations.",
    templateStep(file, ctx, raw), raw ? "attention" : ""));
  steps.append(step(3, "Split", "Hold out examples for validation during training and for the final comparison.",
    splitStep(file, ctx, ok)));
  steps.append(step(4, "Train", null, h("div", { class: "row gap" },
    h("p", { class: "muted" }, ok ? "Train on this whole file, or on the train split from step 3." : "Available once the file checks out."),
    button("Set up training", { kind: "primary", icon: "arrow", disabled: !ok, onClick: () => ctx.navigate(trainLink(file, trainsWith)) }))));
}

// the train view, with this file and the objective that trains on its kind of data
function trainLink(file, objective) {
  const q = new URLSearchParams({ training_file: file.id });
  if (objective) q.set("method", objective.api_type);
  return `train?${q}`;
}

// The first examples as tunelab reads them: preference pairs side by side (prompt, chosen,
// rejected), or conversations.
function previewBlock(preview, kind, objective) {
  const rows = (preview && preview.data) || [];
  if (!rows.length) return null;
  const shown = rows.map((r) => r.error ? h("div", { class: "alert bad small" }, `line ${r.line}: ${r.error}`)
    : kind === "preferences" ? preferencePair(r) : conversation(r, { compact: true }));
  return h("div", { class: ["file-preview", kind] },
    h("h3", {}, kind === "preferences" ? "Preference pairs " : "First examples ",
      h("span", { class: "muted small" }, kind === "preferences"
        ? `the first ${rows.length}: the prompt, the answer to prefer and the one to avoid${objective ? ` · for ${objective.title} (${objective.api_type})` : ""}`
        : `the first ${rows.length}${objective ? ` · for ${objective.title}` : ""}`)),
    h("div", { class: kind === "preferences" ? "pairs" : "previews" }, shown));
}

// ---------------------------------------------------------------- template step
let templatesCache = null;
async function templates() {
  if (!templatesCache) {
    const r = await get("/v1/tunelab/templates");
    templatesCache = (Array.isArray(r) ? r : r.data || r.templates || []).map((t) =>
      typeof t === "string" ? { name: t, fields: [] } : t);
  }
  return templatesCache;
}

// Column names of a raw file: from the server when it says (validation.columns), else read
// from the file's head.
async function columnsOf(file) {
  const c = file.validation && file.validation.columns;
  if (Array.isArray(c) && c.length) return c;
  if ((file.bytes || 0) > 5e6 || /\.parquet$/i.test(file.filename)) return null;
  try {
    const res = await request(`/v1/files/${file.id}/content`, { raw: true });
    const text = (await res.text()).slice(0, 200000);
    const first = text.split(/\r?\n/).find((l) => l.trim());
    if (!first) return null;
    if (/\.(csv|tsv)$/i.test(file.filename)) return first.split(/\.tsv$/i.test(file.filename) ? "\t" : ",").map((s) => s.trim().replace(/^"|"$/g, ""));
    let obj;
    try { obj = JSON.parse(first); } catch { const arr = JSON.parse(text); obj = Array.isArray(arr) ? arr[0] : arr; }
    return obj && typeof obj === "object" ? Object.keys(obj) : null;
  } catch { return null; }
}

function templateStep(file, ctx, open) {
  const body = h("div", { class: "tpl" });
  const load = async () => {
    body.replaceChildren(h("div", { class: "loading" }, spinner(), "Loading the template library…"));
    let list, cols;
    try { [list, cols] = await Promise.all([templates(), columnsOf(file)]); } catch (e) {
      body.replaceChildren(errorBox(e, { title: "Could not load templates:" }));
      return;
    }
    body.replaceChildren(templateForm(file, ctx, list, cols));
  };
  if (open) load();
  else body.append(button("Use a prompt template", { icon: "spark", onClick: load }));
  return body;
}

function templateForm(file, ctx, list, cols) {
  if (!list.length) return emptyState("No templates", "The server's template library is empty.");
  const byName = Object.fromEntries(list.map((t) => [t.name, t]));
  // The likeliest template: the most of its fields among the columns, then one named like the file.
  const stem = file.filename.toLowerCase();
  const score = (t) => (t.fields || []).filter((f) => cols && cols.includes(f)).length * 2 +
    (t.optional || []).filter((f) => cols && cols.includes(f)).length +
    (stem.includes(t.name.split("-")[0]) ? 1.5 : 0);
  const guess = list.reduce((best, t) => (score(t) > score(best) ? t : best), list[0]);
  const tplSel = select(list.map((t) => [t.name, t.description ? `${t.name} — ${t.description}` : t.name]), { id: "tpl-name", value: guess.name });
  const mapping = h("div", { class: "mapping" });
  const mix = h("input", { type: "checkbox", id: "tpl-mix", checked: true });
  const result = h("div", { class: "tpl-result", "aria-live": "polite" });
  const submit = button("Apply template", { kind: "primary", type: "submit", icon: "spark" });
  const form = h("form", { class: "form", novalidate: true },
    field("Template", tplSel, { hint: "From the library shipped with tunelab (and the server's own templates folder)." }),
    mapping,
    h("div", { class: "check" }, mix, h("label", { for: "tpl-mix" }, "Mix phrasings"),
      h("span", { class: "hint" }, " — each row gets one of the template's wordings, so the model learns the task rather than one phrasing.")),
    h("div", { class: "form-actions" }, submit, h("div", { class: "form-error", id: "tpl-form-err", role: "alert" })),
    result);

  const drawMapping = () => {
    const t = byName[tplSel.value] || {};
    const req = t.fields || [], opt = t.optional || [];
    const rows = [...req.map((f) => [f, true]), ...opt.map((f) => [f, false])].map(([f, required]) => {
      const id = `map-${f}`;
      let ctl;
      if (cols) {
        const options = [["", required ? "— choose a column —" : "— none —"], ...cols.map((c) => [`col:${c}`, `column "${c}"`]), ["fixed", "a fixed value…"]];
        ctl = select(options, { id, value: cols.includes(f) ? `col:${f}` : "" });
      } else {
        ctl = h("input", { id, type: "text", value: f, placeholder: "column name" });
      }
      const fixed = h("input", { type: "text", id: `${id}-value`, placeholder: `value of ${f} for every row`, hidden: true, "aria-label": `Fixed value for ${f}` });
      const sync = () => { fixed.hidden = ctl.value !== "fixed"; };
      ctl.addEventListener("change", sync);
      const fl = field(h("span", {}, h("code", {}, f), required ? "" : h("span", { class: "muted" }, " optional")), ctl,
                       { hint: cols ? null : "The column of your file that holds this field." });
      fl.append(fixed);
      fl.dataset.tplField = f;
      return fl;
    });
    mapping.replaceChildren(h("div", { class: "mapping-head" }, "Where each field comes from"),
      h("div", { class: "grid-2" }, rows));
  };
  tplSel.addEventListener("change", drawMapping);
  drawMapping();

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearFieldErrors(form);
    form.querySelector("#tpl-form-err").replaceChildren();
    const t = byName[tplSel.value];
    const map = {}, values = {};
    for (const f of [...(t.fields || []), ...(t.optional || [])]) {
      const ctl = form.querySelector(`#map-${CSS.escape(f)}`);
      const v = ctl.value;
      if (!v && (t.fields || []).includes(f)) {
        showParamError(form, { param: f, message: `Choose the column that holds '${f}' (or a fixed value).` }, { [f]: `map-${f}` });
        return;
      }
      if (v === "fixed") values[f] = form.querySelector(`#map-${CSS.escape(f)}-value`).value;
      else if (v.startsWith("col:")) { if (v.slice(4) !== f) map[f] = v.slice(4); }
      else if (!cols && v && v !== f) map[f] = v;
    }
    submit.disabled = true;
    result.replaceChildren(h("div", { class: "loading" }, spinner(), "Applying the template…"));
    try {
      const r = await post(`/v1/tunelab/files/${file.id}/template`, { template: t.name, mix: mix.checked, map, values });
      result.replaceChildren(templateResult(r, ctx));
    } catch (err) {
      result.replaceChildren();
      const fieldId = err.param && err.param.replace(/^(map|values)\./, "");
      if (!(fieldId && showParamError(form, err, { [fieldId]: `map-${fieldId}` })) &&
          !showParamError(form, err, { template: "tpl-name" })) {
        form.querySelector("#tpl-form-err").replaceChildren(errorBox(err));
      }
    } finally { submit.disabled = false; }
  });
  return form;
}

function templateResult(r, ctx) {
  const f = r.file || {};
  const preview = r.preview || [];
  const nErr = f.validation ? errorCount(f.validation) : 0;
  return h("div", { class: "tpl-done" },
    h("div", { class: "alert ok" }, icon("check"), h("div", {},
      h("strong", {}, `Created ${f.filename || "a new file"}`),
      f.validation ? ` · ${fmtInt(f.validation.examples)} conversations` : "",
      nErr ? h("span", { class: "bad-text" }, ` · ${fmtInt(nErr)} errors`) : "",
      " ", f.id ? h("a", { href: `#/data/${f.id}` }, "Open it →") : null)),
    preview.length ? h("div", {}, h("h3", {}, `Preview: the first ${Math.min(6, preview.length)} conversations`),
      h("div", { class: "previews" }, preview.slice(0, 6).map((c) => conversation(c, { compact: true })))) : null);
}

// ---------------------------------------------------------------- split step
function splitStep(file, ctx, enabled) {
  const val = h("input", { type: "number", id: "split-val", min: 0, max: 90, step: 1, value: 10, inputmode: "numeric" });
  const test = h("input", { type: "number", id: "split-test", min: 0, max: 90, step: 1, value: 10, inputmode: "numeric" });
  const seed = h("input", { type: "number", id: "split-seed", value: 0, step: 1 });
  const strat = h("input", { type: "text", id: "split-stratify", placeholder: "e.g. assistant or label" });
  const submit = button("Split", { kind: "primary", type: "submit", disabled: !enabled });
  const out = h("div", { class: "split-out", "aria-live": "polite" });
  const form = h("form", { class: "form", novalidate: true },
    h("div", { class: "grid-4" },
      field("Validation %", val, { hint: "Scored during training." }),
      field("Test %", test, { hint: "Kept for the comparison." }),
      field("Seed", seed, { hint: "Same seed, same split." }),
      field("Stratify by", strat, { hint: "Same class mix in every split." })),
    h("div", { class: "form-actions" }, submit, h("div", { class: "form-error", id: "split-form-err", role: "alert" }),
      enabled ? null : h("span", { class: "muted small" }, "Available once the file checks out.")),
    out);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearFieldErrors(form);
    const errBox = form.querySelector("#split-form-err");
    errBox.replaceChildren();
    const v = +val.value / 100, t = +test.value / 100;
    if (!(v >= 0 && t >= 0 && v + t < 1)) {
      showParamError(form, { param: "val", message: "Validation and test must be percentages that add up to less than 100." }, { val: "split-val" });
      return;
    }
    submit.disabled = true;
    try {
      const body = { val: v, test: t, seed: +seed.value || 0 };
      if (strat.value.trim()) body.stratify_by = strat.value.trim();
      const r = await post(`/v1/tunelab/files/${file.id}/split`, body);
      if (r.train && r.test) localStorage.setItem(`tunelab.testFor.${r.train.id}`, r.test.id);
      out.replaceChildren(splitResult(r, ctx));
    } catch (err) {
      if (!showParamError(form, err, { val: "split-val", test: "split-test", seed: "split-seed", stratify_by: "split-stratify" })) {
        errBox.replaceChildren(errorBox(err));
      }
    } finally { submit.disabled = !enabled; }
  });
  return form;
}

function splitResult(r, ctx) {
  const part = (label, f) => f ? h("a", { class: "split-part", href: `#/data/${f.id}` },
    h("div", { class: "split-label" }, label),
    h("div", { class: "split-count" }, f.validation ? fmtInt(f.validation.examples) : "—"),
    h("div", { class: "muted small mono" }, f.filename),
    f.status === "error" ? h("div", { class: "bad-text small" }, `Not usable: ${f.status_details || "see its check"}`) : null) : null;
  const q = new URLSearchParams();
  if (r.train) q.set("training_file", r.train.id);
  if (r.validation) q.set("validation_file", r.validation.id);
  return h("div", {},
    h("div", { class: "split-parts" }, part("train", r.train), part("validation", r.validation), part("test", r.test)),
    h("div", { class: "form-actions" }, button("Train on these", { kind: "primary", icon: "arrow",
      onClick: () => ctx.navigate(`train?${q}`) }),
      r.test ? h("span", { class: "muted small" }, "The test split is preselected when you compare models later.") : null));
}

