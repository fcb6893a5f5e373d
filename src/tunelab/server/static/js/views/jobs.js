// Jobs: the list, and one job watched live (status, progress + ETA, loss curves, events,
// checkpoints, cancel). Watching polls the API; a lost connection backs off and recovers.

import { h, icon, fmtInt, fmtNum, fmtDuration, fmtTime, fmtAgo, pill, errorBox, copyable, toast, button, card,
         emptyState, statTile, spinner, clear, isActive } from "../dom.js";
import { get, post, listAll, download, ApiError } from "../api.js";
import { lineChart } from "../chart.js";
import { rememberTps, objectiveFor, metricLabel, isShare, fmtMetric } from "./common.js";

const cap = (s) => s.charAt(0).toUpperCase() + s.slice(1);
// dollars with the digits a small amount needs, as tunelab compare prints them: $0.0004, $0.123, $12.30
const fmtUsd = (x) => (x > 0 && x < 0.0001 ? "< $0.0001" : x < 0.01 ? `$${x.toFixed(4)}` : x < 1 ? `$${x.toFixed(3)}`
  : `$${x.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`);
// the statuses that are still going come from the server (dom.js isActive)
const ACTIVE = { has: isActive };
const RUNNING_POLL_MS = 1500;

export async function render(root, { id }, ctx) {
  return id ? renderJob(root, id, ctx) : renderList(root, ctx);
}

// ---------------------------------------------------------------- list
async function renderList(root, ctx) {
  ctx.setHeader("Jobs", { sub: "Fine-tuning jobs on this server.",
    actions: [button("New job", { kind: "primary", icon: "spark", onClick: () => ctx.navigate("train") })] });
  const body = h("div", {}, h("div", { class: "loading" }, spinner(), "Loading jobs…"));
  root.append(card(null, body));
  let timer = null, alive = true;
  const load = async () => {
    try {
      const jobs = await listAll("/v1/fine_tuning/jobs", { max: 200 });
      ctx.setOnline(true);
      body.replaceChildren(jobs.length ? jobsTable(jobs, ctx) :
        emptyState("No jobs yet", "Start one from the Train page.", button("Set up training", { kind: "primary", onClick: () => ctx.navigate("train") })));
      if (alive && jobs.some((j) => ACTIVE.has(j.status))) timer = setTimeout(load, 4000);
    } catch (e) {
      body.replaceChildren(errorBox(e, { title: "Could not list jobs:" }));
      if (e.network) { ctx.setOnline(false); if (alive) timer = setTimeout(load, 5000); }
    }
  };
  await load();
  return () => { alive = false; clearTimeout(timer); };
}

function progressOf(job) {
  const p = (job.tunelab && job.tunelab.progress) || {};
  return { step: p.step ?? null, total: p.total_steps ?? null, eta: p.eta_seconds ?? null };
}

function jobsTable(jobs, ctx) {
  const usual = objectiveFor(ctx).api_type;   // jobs of another objective carry its name
  return h("div", { class: "table-wrap" }, h("table", { class: "table" },
    h("thead", {}, h("tr", {}, ["Model", "Base", "Status", "Progress", "Created"].map((c, i) => h("th", { scope: "col", class: (i === 1 || i === 4) && "hide-phone" }, c)))),
    h("tbody", {}, jobs.map((j) => {
      const p = progressOf(j);
      const pct = p.total ? Math.min(100, (100 * (p.step || 0)) / p.total) : j.status === "succeeded" ? 100 : 0;
      return h("tr", {},
        h("td", {}, h("a", { class: "strong", href: `#/jobs/${j.id}` }, j.fine_tuned_model || j.user_provided_suffix || j.id),
          j.method && j.method.type !== usual ? h("span", { class: "tag" }, j.method.type) : null,
          h("div", { class: "mono muted small" }, j.id)),
        h("td", { class: "mono small hide-phone" }, j.model),
        h("td", {}, pill(j.status)),
        h("td", {}, h("div", { class: "progress thin", title: `${Math.round(pct)}%` }, h("div", { class: ["progress-fill", j.status], style: { width: `${pct}%` } })),
          p.total ? h("div", { class: "muted small" }, `step ${fmtInt(p.step)} / ${fmtInt(p.total)}`) : null),
        h("td", { class: "hide-phone" }, fmtAgo(j.created_at)));
    }))));
}

// ---------------------------------------------------------------- one job, live
async function renderJob(root, id, ctx) {
  let job;
  try { job = await get(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`); } catch (e) {
    ctx.setHeader("Job");
    root.append(errorBox(e, { title: `Cannot open job ${id}:` }), h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")));
    return;
  }
  const events = new Map();
  let nextRank = 0;
  let checkpoints = [];
  let alive = true, timer = null, delay = RUNNING_POLL_MS, failures = 0, finalFetched = false;

  // ---- static structure, filled by draw()
  const banner = h("div", { class: "banner", hidden: true, role: "status", "aria-live": "polite" });
  const statusPill = h("span", { class: "status-slot" });
  const bar = h("div", { class: "progress big", role: "progressbar", "aria-label": "Training progress", "aria-valuemin": 0, "aria-valuemax": 100 },
    h("div", { class: "progress-fill" }));
  const tiles = h("div", { class: "tiles" });
  const errorSlot = h("div");
  // the objective's metrics (GET /v1/tunelab/info): loss, then its first two, each plotted
  // train (per logged step) against validation (at each evaluation); its table shows them all
  const objective = objectiveFor(ctx, job.method && job.method.type);
  const metrics = objective.metrics || [];
  const lossChart = lineChart({ yLabel: "loss", empty: "Waiting for the first training steps…" });
  const metricCharts = metrics.slice(0, 2).map((name) => ({ name, chart: lineChart({
    yLabel: metricLabel(name), yDomain: isShare(name) ? [0, 1] : undefined, empty: "Waiting for the first training steps…" }) }));
  const log = h("ol", { class: "log", "aria-live": "off" });
  const ckpts = h("div");
  const details = h("div");
  const crumbs = h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "← All jobs"));

  root.append(crumbs, banner,
    h("section", { class: "card job-status" },
      h("div", { class: "job-status-top" }, statusPill, h("div", { class: "progress-wrap" }, bar)), tiles, errorSlot),
    h("div", { class: ["charts", `n${1 + metricCharts.length}`] },
      card("Loss", lossChart.el, { sub: "Training loss per logged step and validation loss at each evaluation", cls: "chart-card" }),
      metricCharts.map(({ name, chart }) => h("div", { class: "chart-card-wrap", dataset: { metric: name } },
        card(cap(metricLabel(name)), chart.el, { sub: "Training per logged step and validation at each evaluation", cls: "chart-card" })))),
    h("div", { class: "grid-main flip" },
      card("Events", h("div", { class: "log-wrap" }, log)),
      card("Checkpoints", ckpts, { sub: "Each one can be chatted with or compared" })),
    card("Details", details));

  const header = () => {
    const active = ACTIVE.has(job.status);
    const actions = [];
    if (active) actions.push(button("Cancel", { kind: "danger", icon: "stop", id: "cancel-job", onClick: cancel }));
    if (job.fine_tuned_model) {
      actions.push(button("Compare with base", { icon: "compare", onClick: () => ctx.navigate(`compare?model=${encodeURIComponent(job.fine_tuned_model)}&job=${job.id}`) }),
                   button("Chat", { kind: "primary", icon: "chat", onClick: () => ctx.navigate(`chat?right=${encodeURIComponent(job.fine_tuned_model)}&left=${encodeURIComponent(job.model)}`) }),
                   button("Export GGUF", { icon: "download", id: "export-job", onClick: exportGguf }));
    }
    ctx.setHeader(job.fine_tuned_model || `Fine-tuning ${job.model}`, {
      sub: `${job.id} · base ${job.model} · created ${fmtTime(job.created_at)}`, actions });
  };

  // POST /v1/tunelab/exports (q8_0 GGUF, the LoRA merged), poll it, then download the file
  async function exportGguf() {
    try {
      toast("Exporting to GGUF (q8_0)…");
      let e = await post("/v1/tunelab/exports", { model: job.fine_tuned_model, format: "gguf", quant: "q8_0" });
      while (e.status === "queued" || e.status === "running") {
        await new Promise((r) => setTimeout(r, 1000));
        e = await get(`/v1/tunelab/exports/${e.id}`);
      }
      if (e.status !== "succeeded") throw new ApiError((e.error && e.error.message) || `export ${e.status}`);
      await download(`/v1/tunelab/exports/${e.id}/download`, e.filename);
    } catch (err) {
      toast(`Export failed: ${err.message}`, "bad");
    }
  }

  async function cancel() {
    if (!confirm("Cancel this job? What was trained so far is kept as a checkpoint.")) return;
    try {
      job = await post(`/v1/fine_tuning/jobs/${job.id}/cancel`, {});
      toast("Cancel requested");
      draw();
    } catch (e) { toast(`Cancel failed: ${e.message}`, "bad"); }
  }

  function sortedEvents() {
    // the server's order (event ids are random and many events share a second)
    return [...events.values()].sort((a, b) => a.rank - b.rank);
  }

  function series() {
    // loss and every metric of the objective: train_<m> per logged step, valid_<m> (or
    // OpenAI's full_valid_<m>) at each evaluation
    const names = ["loss", ...metrics];
    const train = Object.fromEntries(names.map((n) => [n, new Map()]));
    const valid = Object.fromEntries(names.map((n) => [n, new Map()]));
    let tps = [];
    for (const ev of sortedEvents()) {
      const d = ev.data;
      if (!d || typeof d !== "object" || d.step === undefined) continue;
      for (const n of names) {
        const t = d[`train_${n}`], v = d[`valid_${n}`] ?? d[`full_valid_${n}`];
        if (t !== undefined && t !== null) train[n].set(d.step, t);
        if (v !== undefined && v !== null) valid[n].set(d.step, v);
      }
      if (d.tokens_per_s) tps.push(d.tokens_per_s);
    }
    const pts = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
    if (tps.length) rememberTps(tps.slice(-5).sort((a, b) => a - b)[Math.floor(Math.min(5, tps.length) / 2)]);
    const out = { train: {}, valid: {} };
    for (const n of names) { out.train[n] = pts(train[n]); out.valid[n] = pts(valid[n]); }
    out.tl = out.train.loss;
    out.vl = out.valid.loss;
    return out;
  }

  function draw() {
    header();
    clear(statusPill, pill(job.status));
    const s = series();
    const p = progressOf(job);
    const lastStep = s.tl.length ? s.tl[s.tl.length - 1][0] : null;
    const step = p.step ?? lastStep;
    const total = p.total ?? lastTotal();
    const pct = job.status === "succeeded" ? 100 : total ? Math.min(100, (100 * (step || 0)) / total) : 0;
    bar.firstChild.style.width = `${pct}%`;
    bar.firstChild.className = `progress-fill ${job.status}`;
    bar.setAttribute("aria-valuenow", Math.round(pct));
    const started = firstEventTime() || job.created_at;
    const end = job.finished_at || (ACTIVE.has(job.status) ? Date.now() / 1000 : null);
    const bestValid = s.vl.length ? Math.min(...s.vl.map((x) => x[1])) : null;
    clear(tiles,
      statTile("Step", total ? `${fmtInt(step || 0)} / ${fmtInt(total)}` : step !== null ? fmtInt(step) : "—", { sub: `${Math.round(pct)}%` }),
      statTile(ACTIVE.has(job.status) ? "ETA" : "Took", ACTIVE.has(job.status) ? (p.eta !== null ? fmtDuration(p.eta) : job.status === "running" ? "estimating…" : "waiting") : fmtDuration(end && started ? end - started : null),
               { sub: end && started && ACTIVE.has(job.status) ? `elapsed ${fmtDuration(end - started)}` : job.trained_tokens ? `${fmtInt(job.trained_tokens)} trained tokens` : null }),
      statTile("Train loss", s.tl.length ? fmtNum(s.tl[s.tl.length - 1][1], 4) : "—", { sub: s.tl.length ? `from ${fmtNum(s.tl[0][1], 4)}` : null }),
      statTile("Best valid loss", bestValid !== null ? fmtNum(bestValid, 4) : "—", { sub: job.validation_file ? `${s.vl.length} evaluations` : "no validation file" }),
      headline(s), costTile());
    if (job.error && (job.error.message || job.error.code)) {
      clear(errorSlot, errorBox({ message: job.error.message || job.error.code, code: job.error.code },
        { title: job.error.param ? `Failed (${job.error.param}):` : "Failed:" }));
    } else if (job.status === "cancelled") {
      clear(errorSlot, h("div", { class: "alert muted" }, icon("stop"), h("div", {}, "Cancelled. What was trained so far is kept as a checkpoint below.")));
    } else clear(errorSlot);
    lossChart.update([{ name: "train", cls: "s1", points: s.tl }, { name: "validation", cls: "s2", points: s.vl, dots: true }], { xMax: total || undefined });
    for (const { name, chart } of metricCharts) {
      chart.update([{ name: "train", cls: "s1", points: s.train[name] }, { name: "validation", cls: "s2", points: s.valid[name], dots: true }], { xMax: total || undefined });
    }
    drawLog();
    drawCheckpoints();
    drawDetails();
  }

  // a finished job's training cost: its measured training time at the server's price per hour
  // of the training machine (GET /v1/tunelab/info training_price_per_hour; tunelab compare
  // counts a fine-tune's cost the same way)
  function costTile() {
    const c = job.tunelab && job.tunelab.training_cost;
    if (!c) return null;
    return statTile("Training cost", fmtUsd(c.usd), { sub: `${fmtDuration(c.seconds)} of training at $${fmtNum(c.price_per_hour, 4)}/h` });
  }

  // the objective's first metric: its latest validation value, else its latest training value
  function headline(s) {
    const name = metrics[0];
    if (!name) return null;
    const v = s.valid[name], t = s.train[name];
    const last = v.length ? v[v.length - 1] : t.length ? t[t.length - 1] : null;
    return statTile(cap(metricLabel(name)), last ? fmtMetric(name, last[1]) : "—",
                    { sub: last ? `${v.length ? "validation" : "training"}, step ${fmtInt(last[0])}` : null });
  }

  function lastTotal() {
    const evs = sortedEvents();
    for (let i = evs.length - 1; i >= 0; i--) {
      const d = evs[i].data;
      if (d && d.total_steps) return d.total_steps;
    }
    return null;
  }

  // when training started: the job says so; else its first "started" event (by kind, not words)
  function firstEventTime() {
    if (job.tunelab && job.tunelab.started_at) return job.tunelab.started_at;
    const started = sortedEvents().find((e) => e.kind === "started");
    return started ? started.created_at : null;
  }

  function drawLog() {
    const evs = sortedEvents().reverse();
    const atTop = log.parentElement.scrollTop < 10;
    clear(log, evs.length ? evs.slice(0, 400).map((ev) => h("li", { class: ["ev", ev.level || "info", ev.type], dataset: { kind: ev.kind || "" } },
      h("time", {}, fmtTime(ev.created_at)),
      h("span", { class: "ev-msg" }, ev.message || ev.type || ""))) : h("li", { class: "muted" }, "No events yet."));
    if (atTop) log.parentElement.scrollTop = 0;
  }

  function drawCheckpoints() {
    if (!checkpoints.length) {
      clear(ckpts, h("p", { class: "muted" }, ACTIVE.has(job.status) ? "Checkpoints appear at each evaluation." : "No checkpoints."));
      return;
    }
    const cols = metrics.map((n) => [n, cap(metricLabel(n))]);
    clear(ckpts, h("div", { class: "table-wrap" }, h("table", { class: "table compact" },
      h("thead", {}, h("tr", {}, ["Step", "Train loss", "Valid loss", ...cols.map(([, label]) => label), ""].map((c, i) =>
        h("th", { scope: "col", class: i > 3 && i < 3 + cols.length && "hide-phone" }, c)))),
      h("tbody", {}, [...checkpoints].sort((a, b) => b.step_number - a.step_number).map((c) => {
        const m = c.metrics || {};
        const model = c.fine_tuned_model_checkpoint;
        return h("tr", {}, h("td", { class: "num" }, fmtInt(c.step_number)),
          h("td", { class: "num" }, fmtNum(m.train_loss, 4)), h("td", { class: "num" }, fmtNum(m.valid_loss ?? m.full_valid_loss, 4)),
          cols.map(([n], i) => h("td", { class: ["num", i > 0 && "hide-phone"], title: m[`valid_${n}`] !== undefined ? "validation" : "training" },
            fmtMetric(n, m[`valid_${n}`] ?? m[`full_valid_${n}`] ?? m[`train_${n}`], 3))),
          h("td", { class: "align-right" }, model ? h("a", { class: "btn small ghost", "aria-label": `Chat with the checkpoint at step ${c.step_number}`,
            href: `#/chat?right=${encodeURIComponent(model)}&left=${encodeURIComponent(job.model)}` }, icon("chat", 14), h("span", { class: "hide-phone" }, "Chat")) : null));
      })))));
  }

  function drawDetails() {
    const type = (job.method && job.method.type) || objective.api_type;
    const hp = (job.method && job.method[type] && job.method[type].hyperparameters) || job.hyperparameters || {};
    const cfg = (job.tunelab && job.tunelab.config) || {};
    const row = (k, v) => [h("dt", {}, k), h("dd", {}, v ?? "—")];
    const fileLink = (fid) => fid ? h("a", { href: `#/data/${fid}`, class: "mono" }, fid) : "—";
    const kvs = [
      row("Job", copyable(job.id)), row("Base model", h("span", { class: "mono" }, job.model)),
      row("Fine-tuned model", job.fine_tuned_model ? copyable(job.fine_tuned_model) : "— (when it succeeds)"),
      row("Training file", fileLink(job.training_file)), row("Validation file", fileLink(job.validation_file)),
      row("Objective", `${type} (${objective.title})`),
      // every hyperparameter of the method type, as the job object names them
      ...Object.entries(hp).map(([k, v]) => row(k === "n_epochs" ? "Epochs" : cap(k.replace(/_/g, " ")), String(v ?? "auto"))),
      row("Seed", job.seed ?? "—"),
    ];
    const cfgKeys = ["method", "learning_rate", "epochs", "batch_size", "max_length", "lora", objective.name, "max_steps", "packing", "precision"];
    for (const k of cfgKeys) if (cfg[k] !== undefined && cfg[k] !== null) kvs.push(row(`config.${k}`, h("span", { class: "mono" }, typeof cfg[k] === "object" ? JSON.stringify(cfg[k]) : String(cfg[k]))));
    const results = (job.result_files || []).map((fid) => button("metrics CSV", { kind: "ghost small", icon: "download", title: fid,
      onClick: () => download(`/v1/files/${fid}/content`, `${job.id}-results.csv`).catch((e) => toast(e.message, "bad")) }));
    if (results.length) kvs.push(row("Results", h("div", { class: "row gap" }, results)));
    clear(details, h("dl", { class: "kv wide" }, kvs));
  }

  async function pollEvents() {
    // OpenAI lists events newest first and pages backwards with after=<id>: read pages until
    // one holds an event already seen. Everything new is newer than everything seen.
    let after = null;
    const fresh = [];
    for (let i = 0; i < 100; i++) {
      const page = await get(`/v1/fine_tuning/jobs/${job.id}/events?limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
      const data = page.data || [];
      let known = false;
      for (const ev of data) {
        if (events.has(ev.id)) { known = true; break; }
        fresh.push(ev);
      }
      if (known || !page.has_more || !data.length) break;
      after = data[data.length - 1].id;
    }
    for (const ev of fresh.reverse()) events.set(ev.id, { ...ev, rank: nextRank++ });
  }

  async function pollCheckpoints() {
    try {
      const r = await get(`/v1/fine_tuning/jobs/${job.id}/checkpoints?limit=100`);
      checkpoints = r.data || [];
    } catch (e) { if (e.network) throw e; /* older servers: no checkpoints endpoint */ }
  }

  let lastCkptCount = -1;
  async function tick() {
    if (!alive) return;
    try {
      job = await get(`/v1/fine_tuning/jobs/${job.id}`);
      await pollEvents();
      const ckptEvents = sortedEvents().filter((e) => e.kind === "checkpoint").length;
      if (ckptEvents !== lastCkptCount || !ACTIVE.has(job.status)) { await pollCheckpoints(); lastCkptCount = ckptEvents; }
      if (!ACTIVE.has(job.status)) finalFetched = true;
      if (failures) toast("Connection restored", "ok");
      failures = 0;
      delay = job.status === "running" ? RUNNING_POLL_MS : 3000;
      banner.hidden = true;
      ctx.setOnline(true);
      draw();
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      failures++;
      delay = Math.min(15000, RUNNING_POLL_MS * 2 ** failures);
      if (e.network || e.status >= 500) {
        ctx.setOnline(!e.network);
        clear(banner, icon("refresh", 16), ` Connection lost (${e.network ? "server unreachable" : `HTTP ${e.status}`}). Retrying in ${Math.round(delay / 1000)} s — the curves continue where they stopped.`);
        banner.hidden = false;
      } else {
        clear(banner, icon("alert", 16), ` ${e.message}`);
        banner.hidden = false;
      }
    }
    if (alive && !finalFetched) timer = setTimeout(tick, delay);
  }

  draw();
  await tick();
  const onVisible = () => { if (document.visibilityState === "visible" && alive && !finalFetched) { clearTimeout(timer); tick(); } };
  document.addEventListener("visibilitychange", onVisible);
  window.addEventListener("online", onVisible);
  return () => {
    alive = false;
    clearTimeout(timer);
    document.removeEventListener("visibilitychange", onVisible);
    window.removeEventListener("online", onVisible);
  };
}
