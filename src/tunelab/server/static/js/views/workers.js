// Workers: the job workers alive on every host (GET /v1/tunelab/workers), grouped by host, with
// their last heartbeat, what each runs and what the host offers (CPUs, memory, GPUs, the Ray
// cluster its jobs train on). Polled while the page is open.

import { h, fmtInt, fmtBytes, fmtAgo, errorBox, card, emptyState, statTile, spinner } from "../dom.js";
import { get } from "../api.js";

const POLL_MS = 3000;

export async function render(root, _params, ctx) {
  ctx.setHeader("Workers", { sub: "The processes that run jobs, on every host, as their heartbeats report them." });
  // a grid item that may shrink below its table's width (the table scrolls inside its card)
  const body = h("div", { class: "workers", style: { display: "grid", gap: "16px", minWidth: "0" } },
    h("div", { class: "loading" }, spinner(), "Loading workers…"));
  root.append(body);
  let timer = null, alive = true;
  const load = async () => {
    try {
      const got = await get("/v1/tunelab/workers");
      ctx.setOnline(true);
      body.replaceChildren(...view(got.data || [], got.live_within_s, ctx));
    } catch (e) {
      body.replaceChildren(errorBox(e, { title: "Could not list the workers:" }));
      if (e.network) ctx.setOnline(false);
    }
    if (alive) timer = setTimeout(load, POLL_MS);
  };
  await load();
  return () => { alive = false; clearTimeout(timer); };
}

function view(workers, within, ctx) {
  if (!workers.length) {
    const none = ctx.info && ctx.info.workers === 0
      ? "This server starts no workers (--workers 0): start `tunelab worker` on a host that shares its database and data dir."
      : `No worker has sent a heartbeat in the last ${Math.round(within || 0)} s.`;
    return [card(null, emptyState("No live workers", none))];
  }
  const hosts = new Map();
  for (const w of workers) {
    if (!hosts.has(w.host)) hosts.set(w.host, []);
    hosts.get(w.host).push(w);
  }
  const busy = workers.filter((w) => w.status === "busy").length;
  const gpus = [...hosts.values()].reduce((n, ws) => n + ((ws[0].resources || {}).gpus || []).length, 0);
  const rays = new Set(workers.map((w) => (w.resources || {}).ray).filter(Boolean));
  const tiles = h("div", { class: "tiles" },
    statTile("Hosts", fmtInt(hosts.size)),
    statTile("Workers", fmtInt(workers.length), { sub: `${busy} busy, ${workers.length - busy} idle` }),
    statTile("GPUs", fmtInt(gpus), { sub: gpus ? "on the workers' hosts" : "none: training on CPU" }),
    statTile("Ray", rays.size ? [...rays].join(", ") : "not used",
             { sub: rays.size ? "jobs placed by the Ray cluster" : "jobs train on the worker's host" }));
  return [tiles, ...[...hosts.entries()].map(([host, ws]) => hostCard(host, ws))];
}

function hostCard(host, workers) {
  const res = workers[0].resources || {};
  const gpus = res.gpus || [];
  const offer = [`${fmtInt(res.cpus)} CPU${res.cpus === 1 ? "" : "s"}`,
    res.memory_bytes ? `${fmtBytes(res.memory_bytes)} memory` : null,
    gpus.length ? gpus.map((g) => `${g.name}${g.memory_bytes ? ` (${fmtBytes(g.memory_bytes)})` : ""}`).join(", ")
      : "no GPU"].filter(Boolean).join(" · ");
  const table = h("div", { class: "table-wrap" }, h("table", { class: "table" },
    h("thead", {}, h("tr", {}, ["Worker", "Status", "Running", "Heartbeat", "Started"].map((c, i) =>
      h("th", { scope: "col", class: i === 4 && "hide-phone" }, c)))),
    h("tbody", {}, workers.map((w) => h("tr", { dataset: { worker: w.id } },
      h("td", {}, h("div", { class: "mono small" }, w.id), h("div", { class: "muted small" }, `pid ${w.pid}`),
        (w.resources || {}).ray ? h("span", { class: "tag" }, `Ray ${w.resources.ray}`) : null),
      h("td", {}, h("span", { class: ["pill", w.status === "busy" ? "run" : "muted"] }, w.status)),
      h("td", {}, w.job ? h("a", { class: "mono small", href: `#/jobs/${encodeURIComponent(w.job)}` }, w.job)
        : h("span", { class: "muted small" }, w.status === "busy" ? "another key's job" : "—")),
      h("td", { title: new Date(w.last_heartbeat_at * 1000).toLocaleString() }, heartbeat(w.seconds_since_heartbeat)),
      h("td", { class: "hide-phone" }, fmtAgo(w.started_at)))))));
  return card(host, table, { sub: offer });
}

function heartbeat(seconds) {
  const s = Math.max(0, seconds || 0);
  return s < 60 ? `${s < 10 ? s.toFixed(1) : Math.round(s)} s ago` : `${Math.round(s / 60)} min ago`;
}
