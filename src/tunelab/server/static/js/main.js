// Boot, shell and hash router. Views are modules with `render(page, params, ctx)` that may
// return a cleanup function (to stop polling when the user navigates away).

import { h, icon, clear, toast, setStatuses } from "./dom.js";
import { get, auth, ApiError } from "./api.js";

const NAV = [
  ["data", "Data", "data"],
  ["train", "Train", "train"],
  ["jobs", "Jobs", "jobs"],
  ["compare", "Compare", "compare"],
  ["chat", "Chat", "chat"],
  ["workers", "Workers", "workers"],
];

const VIEWS = {
  login: () => import("./views/login.js"),
  data: () => import("./views/data.js"),
  train: () => import("./views/train.js"),
  jobs: () => import("./views/jobs.js"),
  compare: () => import("./views/compare.js"),
  chat: () => import("./views/chat.js"),
  workers: () => import("./views/workers.js"),
};

let info = null;
const ctx = {
  // GET /v1/tunelab/info; the statuses it publishes are the ones pills and polling know
  get info() { return info; },
  set info(value) { info = value; setStatuses(value && value.statuses); },
  navigate(path) { location.hash = "#/" + path.replace(/^#?\/?/, ""); },
  setHeader(title, { sub, actions } = {}) {
    document.title = `${title} · tunelab`;
    clear(shell.title, title);
    clear(shell.sub, sub || "");
    shell.sub.hidden = !sub;
    clear(shell.actions, actions || []);
  },
  setOnline(ok) {
    shell.conn.className = ["conn", ok ? "ok" : "bad"].join(" ");
    clear(shell.conn, h("i"), ok ? "Connected" : "Reconnecting…");
  },
};

let shell;
let cleanup = null;
let renderToken = 0;
let firstRoute = true;

function buildShell() {
  const nav = h("nav", { class: "nav", "aria-label": "Main" },
    NAV.map(([route, label, ic]) => h("a", { href: `#/${route}`, dataset: { route } }, icon(ic, 18), h("span", {}, label))));
  const conn = h("div", { class: "conn ok" }, h("i"), "Connected");
  const who = h("div", { class: "who" });
  const side = h("aside", { class: "side" },
    h("a", { class: "brand", href: "#/data", "aria-label": "tunelab home" },
      h("span", { class: "logo", "aria-hidden": "true" }, icon("spark", 18)), h("span", {}, "tunelab")),
    nav, h("div", { class: "side-foot" }, conn, who));
  const title = h("h1", { tabindex: "-1" });
  const sub = h("p", { class: "page-sub", hidden: true });
  const actions = h("div", { class: "page-actions" });
  const page = h("div", { class: "page", id: "page" });
  const main = h("main", { id: "main" },
    h("header", { class: "page-head" }, h("div", { class: "page-titles" }, title, sub), actions), page);
  const root = h("div", { class: "app" },
    h("a", { class: "skip", href: "#main", onclick: (e) => { e.preventDefault(); title.focus(); } }, "Skip to content"),
    side, main);
  document.body.replaceChildren(root);
  shell = { root, nav, conn, who, title, sub, actions, page, side };
  renderWho();
}

function renderWho() {
  if (!shell) return;
  const info = ctx.info || {};
  const parts = [h("div", { class: "ver" }, `tunelab ${info.version || ""}`)];
  if (info.auth === false) parts.push(h("div", { class: "mode" }, "Local mode · no API key needed"));
  else if (auth.key) {
    parts.push(h("div", { class: "mode" }, icon("key", 14), ` Key …${auth.key.slice(-4)}`),
      h("button", { class: "btn ghost small", type: "button", onclick: signOut }, icon("logout", 14), h("span", {}, "Sign out")));
  }
  clear(shell.who, parts);
}

function signOut() {
  auth.clear();
  toast("Signed out");
  ctx.navigate("login");
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { view: parts[0] || "data", id: parts[1] || null, query: new URLSearchParams(query || "") };
}

async function route() {
  const token = ++renderToken;
  const { view, id, query } = parseHash();
  const needsKey = ctx.info && ctx.info.auth !== false && !auth.key;
  if (view !== "login" && needsKey) { ctx.navigate("login?next=" + encodeURIComponent(location.hash.slice(2))); return; }
  if (cleanup) { try { cleanup(); } catch { /* view already gone */ } cleanup = null; }
  const load = VIEWS[view] || VIEWS.data;
  document.body.classList.toggle("bare", view === "login");
  for (const a of shell.nav.querySelectorAll("a")) {
    if (a.dataset.route === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  renderWho();
  // the training-speed figures behind time estimates grow as jobs finish
  if ((view === "data" || view === "train") && ctx.info && !ctx.info.missing) {
    try { ctx.info = await get("/v1/tunelab/info", { quiet401: true }); } catch { /* keep the last */ }
    if (token !== renderToken) return;
  }
  const page = shell.page;
  page.replaceChildren(h("div", { class: "loading" }, h("span", { class: "spinner" }), "Loading…"));
  let mod;
  try { mod = await load(); } catch (e) {
    page.replaceChildren(h("div", { class: "alert bad" }, `This part of the page failed to load: ${e.message}`));
    return;
  }
  if (token !== renderToken) return;
  page.replaceChildren();
  const fresh = h("div", { class: "view" });
  page.append(fresh);
  try {
    cleanup = (await mod.render(fresh, { id, query }, ctx)) || null;
  } catch (e) {
    if (token !== renderToken) return;
    fresh.replaceChildren(h("div", { class: "alert bad", role: "alert" }, icon("alert"),
      h("div", {}, e instanceof ApiError ? e.message : `Something went wrong: ${e.message}`)));
    console.error(e);
  }
  // After an in-page navigation, focus moves to the new page's heading (screen readers
  // announce it); on first load it stays at the top so Tab reaches "Skip to content" first.
  if (token === renderToken && !firstRoute && document.activeElement === document.body) shell.title.focus({ preventScroll: true });
  firstRoute = false;
}

async function loadInfo() {
  for (let delay = 1000; ; delay = Math.min(delay * 2, 10000)) {
    try {
      ctx.info = await get("/v1/tunelab/info", { quiet401: true });
      return;
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) { ctx.info = { auth: true, models: [] }; return; }
      if (e instanceof ApiError && e.status === 404) { ctx.info = { auth: true, models: [], missing: true }; return; }
      document.body.replaceChildren(h("div", { class: "boot-error" }, h("h1", {}, "tunelab"),
        h("p", { role: "alert" }, e.message), h("p", { class: "muted" }, `Retrying in ${Math.round(delay / 1000)} s…`)));
      await new Promise((r) => setTimeout(r, delay));
    }
  }
}

window.addEventListener("tunelab:unauthorized", () => {
  if (ctx.info && ctx.info.auth === false) return;
  const hadKey = !!auth.key;
  auth.clear();
  if (parseHash().view !== "login") {
    sessionStorage.setItem("tunelab.loginReason", hadKey ? "The server refused this API key (401). Sign in again." : "");
    ctx.navigate("login?next=" + encodeURIComponent(location.hash.slice(2)));
  }
});
window.addEventListener("online", () => ctx.setOnline(true));
window.addEventListener("offline", () => ctx.setOnline(false));

(async function boot() {
  await loadInfo();
  buildShell();
  window.addEventListener("hashchange", route);
  await route();
})();

