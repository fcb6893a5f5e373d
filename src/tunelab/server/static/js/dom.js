// Small DOM helpers. Every piece of text from the server goes in through textContent (never
// innerHTML), so a file name or a model answer can never inject markup into the page.

export function h(tag, props = {}, ...children) {
  const el = tag === "svg" || SVG_TAGS.has(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.setAttribute("class", Array.isArray(v) ? v.filter(Boolean).join(" ") : v);
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2).toLowerCase(), v);
    else if (k === "value" && "value" in el && !(el instanceof SVGElement)) el.value = v;
    else if (k === "checked" || k === "disabled" || k === "selected" || k === "hidden") el[k] = !!v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

const SVG_TAGS = new Set(["path", "g", "line", "rect", "circle", "text", "polyline", "title",
                          "defs", "linearGradient", "stop", "clipPath", "tspan"]);

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export const $ = (sel, root = document) => root.querySelector(sel);

// Line icons drawn for tunelab (24x24, stroke = currentColor).
const ICONS = {
  data: "M4 6c0-1.7 3.6-3 8-3s8 1.3 8 3-3.6 3-8 3-8-1.3-8-3zm0 0v12c0 1.7 3.6 3 8 3s8-1.3 8-3V6M4 12c0 1.7 3.6 3 8 3s8-1.3 8-3",
  train: "M4 20V14M4 10V4M12 20v-8M12 8V4M20 20v-4M20 12V4M2 14h4M10 8h4M18 16h4",
  jobs: "M3 12h4l3-8 4 16 3-8h4",
  compare: "M4 20V10M10 20V4M16 20v-7M22 20H2",
  chat: "M21 12a8 8 0 0 1-11.6 7.1L4 21l1.9-5.4A8 8 0 1 1 21 12z",
  upload: "M12 16V4m0 0-5 5m5-5 5 5M4 16v3a1 1 0 0 0 1 1h14a1 1 0 0 0 1-1v-3",
  check: "M5 12.5l4.5 4.5L19 7",
  x: "M6 6l12 12M18 6 6 18",
  alert: "M12 8v5m0 3.5v.5M10.3 3.9 2.4 18a2 2 0 0 0 1.7 3h15.8a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0z",
  key: "M15 7a4 4 0 1 1-3.2 6.4L4 21H2v-3l1-1h2v-2h2l2.6-2.6A4 4 0 0 1 15 7zm1.5 1.5h.01",
  logout: "M15 4h4a1 1 0 0 1 1 1v14a1 1 0 0 1-1 1h-4M10 17l5-5-5-5M15 12H3",
  send: "M4 12 20 4l-6 16-3-7-7-1z",
  stop: "M7 7h10v10H7z",
  trash: "M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3",
  download: "M12 4v12m0 0-5-5m5 5 5-5M4 20h16",
  arrow: "M5 12h14m-5-5 5 5-5 5",
  file: "M14 3H6a1 1 0 0 0-1 1v16a1 1 0 0 0 1 1h12a1 1 0 0 0 1-1V8zm0 0v5h5",
  refresh: "M20 11a8 8 0 0 0-14.9-3M4 4v4h4M4 13a8 8 0 0 0 14.9 3M20 20v-4h-4",
  spark: "M12 3v4M12 17v4M3 12h4M17 12h4M6 6l2.5 2.5M15.5 15.5 18 18M6 18l2.5-2.5M15.5 8.5 18 6",
  menu: "M4 6h16M4 12h16M4 18h16",
  workers: "M4 4h16v6H4zM4 14h16v6H4zM8 7h.01M8 17h.01",
};

export function icon(name, size = 18) {
  return h("svg", { class: "icon", width: size, height: size, viewBox: "0 0 24 24", "aria-hidden": "true",
                    fill: "none", stroke: "currentColor", "stroke-width": 1.8,
                    "stroke-linecap": "round", "stroke-linejoin": "round" },
           h("path", { d: ICONS[name] || "" }));
}

// ---------- formatting ----------
export const fmtInt = (n) => (n === null || n === undefined || Number.isNaN(n)) ? "—" : Math.round(n).toLocaleString("en-US");

export function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(+x)) return "—";
  x = +x;
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e6)) return x.toExponential(1);
  return +x.toPrecision(digits) + "";
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const u = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${u[i]}`;
}

export function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "—";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60), r = s % 60;
  if (m < 60) return r ? `${m}m ${r}s` : `${m}m`;
  const hh = Math.floor(m / 60);
  return `${hh}h ${m % 60}m`;
}

export function fmtTime(unix) {
  if (!unix) return "—";
  const d = new Date(unix * 1000);
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  const pad = (n) => String(n).padStart(2, "0");
  return sameDay ? `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
                 : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function fmtAgo(unix) {
  if (!unix) return "—";
  const s = Date.now() / 1000 - unix;
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return fmtTime(unix);
}

// ---------- small components ----------
// The statuses the server sends, each with its phase, as GET /v1/tunelab/info publishes them
// (`statuses`: object type -> {status: waiting | running | succeeded | failed | cancelled});
// the page keeps no list of its own. main.js hands them over once info is loaded.
const PHASE_CLASS = { waiting: "wait", running: "run", succeeded: "ok", failed: "bad", cancelled: "muted" };
let phases = {};

export function setStatuses(statuses) {
  phases = {};
  for (const byStatus of Object.values(statuses || {})) Object.assign(phases, byStatus);
}

export const phaseOf = (status) => phases[status] || null;
// a job, evaluation, file or export that is still going: worth polling
export const isActive = (status) => ["waiting", "running"].includes(phaseOf(status));

export function pill(status) {
  const s = String(status || "unknown");
  const phase = phaseOf(s);
  return h("span", { class: ["pill", PHASE_CLASS[phase] || "muted"], dataset: { phase: phase || "unknown" } },
           isActive(s) ? h("span", { class: "dot" }) : null,
           s.replace(/_/g, " "));
}

export function errorBox(err, { title } = {}) {
  const msg = err && err.message ? err.message : String(err);
  return h("div", { class: "alert bad", role: "alert" }, icon("alert"),
           h("div", {}, title ? h("strong", {}, title + " ") : null, h("span", { class: "msg" }, msg),
             err && err.status ? h("span", { class: "code" }, ` (HTTP ${err.status}${err.code ? ", " + err.code : ""})`) : null));
}

export function copyable(text) {
  const b = h("button", { class: "mono copy", type: "button", title: "Copy", "aria-label": `Copy ${text}` }, text);
  b.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(text); toast("Copied " + text); } catch { /* clipboard blocked */ }
  });
  return b;
}

let toastHost;
export function toast(text, kind = "") {
  toastHost ||= document.body.appendChild(h("div", { class: "toasts", role: "status", "aria-live": "polite" }));
  const t = h("div", { class: ["toast", kind] }, text);
  toastHost.append(t);
  setTimeout(() => t.classList.add("out"), 3200);
  setTimeout(() => t.remove(), 3600);
}

export function field(label, control, { hint, id, error } = {}) {
  id ||= control.id || ("f" + Math.random().toString(36).slice(2, 8));
  control.id = id;
  const err = h("div", { class: "field-error", id: id + "-err", role: "alert", hidden: !error }, error || "");
  control.setAttribute("aria-describedby", `${id}-hint ${id}-err`);
  return h("div", { class: "field", dataset: { field: id } },
           h("label", { for: id }, label), control,
           hint ? h("div", { class: "hint", id: id + "-hint" }, hint) : null, err);
}

export function setFieldError(root, id, message) {
  const box = root.querySelector(`#${CSS.escape(id)}-err`);
  if (!box) return false;
  box.textContent = message || "";
  box.hidden = !message;
  const ctl = root.querySelector(`#${CSS.escape(id)}`);
  if (ctl) ctl.setAttribute("aria-invalid", message ? "true" : "false");
  return true;
}

export function clearFieldErrors(root) {
  root.querySelectorAll(".field-error").forEach((e) => { e.hidden = true; e.textContent = ""; });
  root.querySelectorAll("[aria-invalid=true]").forEach((e) => e.setAttribute("aria-invalid", "false"));
}

export function select(options, { value, id, name } = {}) {
  const s = h("select", { id, name });
  for (const o of options) {
    const [v, label] = Array.isArray(o) ? o : [o, o];
    s.append(h("option", { value: v, selected: v === value }, label));
  }
  if (value !== undefined) s.value = value;
  return s;
}

export function spinner(label = "Loading") {
  return h("span", { class: "spinner", role: "progressbar", "aria-label": label });
}

export function emptyState(title, text, action) {
  return h("div", { class: "empty" }, h("div", { class: "empty-title" }, title),
           text ? h("p", {}, text) : null, action || null);
}

export function button(label, { kind = "", icon: ic, onClick, type = "button", disabled, title, id } = {}) {
  return h("button", { class: ["btn", kind], type, disabled, title, id, onclick: onClick },
           ic ? icon(ic, 16) : null, label ? h("span", {}, label) : null);
}

export function link(href, ...children) {
  return h("a", { href }, ...children);
}

export function card(title, body, { actions, cls, sub } = {}) {
  return h("section", { class: ["card", cls] },
           title ? h("header", { class: "card-head" }, h("div", {}, h("h2", {}, title), sub ? h("p", { class: "sub" }, sub) : null),
                     actions ? h("div", { class: "card-actions" }, actions) : null) : null,
           body);
}

export function statTile(label, value, { sub, kind } = {}) {
  return h("div", { class: ["stat", kind] }, h("div", { class: "stat-label" }, label),
           h("div", { class: "stat-value" }, value), sub ? h("div", { class: "stat-sub" }, sub) : null);
}

export function debounce(fn, ms) {
  let t;
  return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
}
