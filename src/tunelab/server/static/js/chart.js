// Hand-written SVG charts. The page needs three small plots (loss curves, a token histogram,
// comparison bars); ~250 lines here weigh less than any charting library, need no vendoring
// or build step, and follow the page's CSS theme (light/dark) through currentColor and classes.

import { h, fmtNum } from "./dom.js";

function niceTicks(lo, hi, n = 5) {
  if (!isFinite(lo) || !isFinite(hi)) return [0, 1];
  if (lo === hi) { lo -= lo ? Math.abs(lo) * 0.1 : 1; hi += hi ? Math.abs(hi) * 0.1 : 1; }
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.floor(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  if (ticks[ticks.length - 1] < hi) ticks.push(+(ticks[ticks.length - 1] + step).toPrecision(12));
  ticks.step = step;
  return ticks;
}

// Tick labels with as many decimals as the tick step needs (10.65 / 10.70, not 10.7 / 10.7).
function tickFormat(step) {
  let decimals = 0;
  while (decimals < 6 && Math.abs(Math.round(step * 10 ** decimals) - step * 10 ** decimals) > 1e-6) decimals++;
  return (t) => (Math.abs(t) >= 1e5 ? fmtNum(t, 3) : t.toFixed(decimals));
}

function observeWidth(el, draw) {
  let last = 0;
  const ro = new ResizeObserver(() => {
    const w = Math.round(el.clientWidth);
    if (w && w !== last) { last = w; draw(); }
  });
  ro.observe(el);
  return ro;
}

// Live line chart: chart.update(series) redraws; series = [{name, cls, points: [[x, y], ...]}].
export function lineChart({ height = 260, xLabel = "step", yLabel = "", empty = "No points yet", xMax, yDomain } = {}) {
  const root = h("div", { class: "chart" });
  const legend = h("div", { class: "legend" });
  const plot = h("div", { class: "plot" });
  const tip = h("div", { class: "tip", hidden: true });
  root.append(legend, plot, tip);
  let series = [];
  let hoverX = null;

  function draw() {
    const W = Math.max(260, plot.clientWidth || 600), H = height;
    const m = { l: 48, r: 14, t: 10, b: 30 };
    const pts = series.flatMap((s) => s.points);
    legend.replaceChildren(...series.map((s) => h("span", { class: ["key", s.cls] }, h("i"), s.name,
      s.points.length ? h("b", {}, " " + fmtNum(s.points[s.points.length - 1][1], 4)) : null)));
    const svg = h("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                            "aria-label": `${yLabel} by ${xLabel}: ` + series.map((s) => `${s.name} ${s.points.length} points`).join(", "),
                            dataset: { points: series.map((s) => s.points.length).join(",") } });
    if (!pts.length) {
      svg.append(h("text", { x: W / 2, y: H / 2, class: "empty-text", "text-anchor": "middle" }, empty));
      plot.replaceChildren(svg);
      return;
    }
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const xHi = Math.max(xMax || 0, ...xs) || 1, xLo = Math.min(0, ...xs);
    const yt = yDomain ? niceTicks(yDomain[0], yDomain[1], 4) : niceTicks(Math.min(...ys), Math.max(...ys), 4);
    const xt = niceTicks(xLo, xHi, Math.max(2, Math.min(8, Math.floor(W / 90)))).filter((t) => t <= xHi);
    const y0 = yt[0], y1 = yt[yt.length - 1], x0 = xLo, x1 = xHi;
    const yFmt = tickFormat(yt.step || 1), xFmt = tickFormat(Math.max(1, xt.step || 1));
    const X = (x) => m.l + ((x - x0) / (x1 - x0 || 1)) * (W - m.l - m.r);
    const Y = (y) => H - m.b - ((y - y0) / (y1 - y0 || 1)) * (H - m.t - m.b);
    const g = h("g", { class: "axes" });
    for (const t of yt) {
      g.append(h("line", { x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t), class: "grid" }),
               h("text", { x: m.l - 8, y: Y(t) + 4, "text-anchor": "end" }, yFmt(t)));
    }
    for (const t of xt) {
      if (t < x0) continue;
      g.append(h("text", { x: X(t), y: H - m.b + 18, "text-anchor": "middle" }, xFmt(t)));
    }
    g.append(h("text", { x: W - m.r, y: H - 2, "text-anchor": "end", class: "axis-label" }, xLabel));
    svg.append(g);
    for (const s of series) {
      if (!s.points.length) continue;
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
      svg.append(h("path", { d, class: ["line", s.cls] }));
      const dots = s.points.length <= 40 || s.dots ? s.points : [s.points[s.points.length - 1]];
      for (const p of dots) svg.append(h("circle", { cx: X(p[0]), cy: Y(p[1]), r: s.dots ? 3.5 : 2.5, class: ["pt", s.cls] }));
    }
    if (hoverX !== null) {
      const near = (s) => s.points.reduce((b, p) => (!b || Math.abs(p[0] - hoverX) < Math.abs(b[0] - hoverX) ? p : b), null);
      const hits = series.map((s) => [s, near(s)]).filter(([, p]) => p);
      const hx = hits.length ? hits[0][1][0] : hoverX;
      svg.append(h("line", { x1: X(hx), x2: X(hx), y1: m.t, y2: H - m.b, class: "cross" }));
      tip.replaceChildren(h("div", { class: "tip-x" }, `${xLabel} ${fmtNum(hx, 6)}`),
        ...hits.map(([s, p]) => h("div", { class: ["key", s.cls] }, h("i"), `${s.name} ${fmtNum(p[1], 4)}`,
                                   p[0] !== hx ? h("small", {}, ` @${p[0]}`) : null)));
      tip.hidden = false;
      const left = X(hx) + 12;
      tip.style.left = `${Math.min(left, W - 150)}px`;
    } else tip.hidden = true;
    svg.addEventListener("pointermove", (e) => {
      const r = svg.getBoundingClientRect();
      const px = ((e.clientX - r.left) / r.width) * W;
      hoverX = x0 + ((px - m.l) / (W - m.l - m.r)) * (x1 - x0);
      draw();
    });
    svg.addEventListener("pointerleave", () => { hoverX = null; draw(); });
    plot.replaceChildren(svg);
  }
  observeWidth(plot, draw);
  return {
    el: root,
    update(next, opts = {}) { series = next; if (opts.xMax !== undefined) xMax = opts.xMax; draw(); },
  };
}

// Histogram of tokens per example, bins = [{lo, hi, count}]; bins past `limit` are marked (cut).
export function histogram(bins, { limit, height = 180, label = "tokens per example" } = {}) {
  const root = h("div", { class: "chart hist" });
  const plot = h("div", { class: "plot" });
  root.append(plot);
  function draw() {
    const W = Math.max(260, plot.clientWidth || 500), H = height;
    const m = { l: 40, r: 10, t: 8, b: 30 };
    const maxC = Math.max(1, ...bins.map((b) => b.count));
    const lo = bins[0].lo, hi = bins[bins.length - 1].hi;
    const X = (x) => m.l + ((x - lo) / (hi - lo || 1)) * (W - m.l - m.r);
    const Y = (c) => H - m.b - (c / maxC) * (H - m.t - m.b);
    const svg = h("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                            "aria-label": `Histogram of ${label}` });
    // counts and token lengths are whole numbers: no fractional ticks (34.2, 34.4…)
    for (const t of niceTicks(0, maxC, 3)) {
      if (t > maxC) break;
      if (!Number.isInteger(t)) continue;
      svg.append(h("line", { x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t), class: "grid" }),
                 h("text", { x: m.l - 6, y: Y(t) + 4, "text-anchor": "end", class: "tick" }, fmtNum(t, 3)));
    }
    for (const b of bins) {
      const cut = limit && b.lo >= limit;
      const x = X(b.lo), w = Math.max(1, X(b.hi) - X(b.lo) - 1);
      svg.append(h("rect", { x, y: Y(b.count), width: w, height: H - m.b - Y(b.count), class: ["bar", cut && "cut"] },
                   h("title", {}, `${Math.round(b.lo)}–${Math.round(b.hi)} tokens: ${b.count} examples${cut ? " (cut by max length)" : ""}`)));
    }
    for (const t of niceTicks(lo, hi, Math.max(2, Math.floor(W / 100)))) {
      if (t < lo || t > hi || !Number.isInteger(t)) continue;
      svg.append(h("text", { x: X(t), y: H - m.b + 16, "text-anchor": "middle", class: "tick" }, fmtNum(t, 4)));
    }
    if (limit && limit > lo && limit < hi) {
      svg.append(h("line", { x1: X(limit), x2: X(limit), y1: m.t, y2: H - m.b, class: "limit" }),
                 h("text", { x: X(limit) - 4, y: m.t + 10, "text-anchor": "end", class: "limit-text" }, `max length ${limit}`));
    }
    svg.append(h("text", { x: W - m.r, y: H - 2, "text-anchor": "end", class: "axis-label" }, label));
    plot.replaceChildren(svg);
  }
  observeWidth(plot, draw);
  return root;
}

// Horizontal bars: items = [{label, value, cls, note}], better = "higher" | "lower".
export function bars(items, { format = (v) => fmtNum(v, 3), max, title } = {}) {
  const top = max ?? Math.max(...items.map((i) => +i.value || 0), 1e-9);
  return h("div", { class: "bars", role: "img", "aria-label": title || "bar chart" },
    title ? h("div", { class: "bars-title" }, title) : null,
    items.map((it) => h("div", { class: ["bar-row", it.cls] },
      h("div", { class: "bar-label", title: it.label }, it.label),
      h("div", { class: "bar-track" }, h("div", { class: "bar-fill", style: { width: `${Math.max(0.5, (100 * (+it.value || 0)) / top)}%` } })),
      h("div", { class: "bar-value" }, it.value === null || it.value === undefined ? "—" : format(it.value), it.note ? h("small", {}, " " + it.note) : null))));
}

// Normalise the histogram shapes a server may send into [{lo, hi, count}].
export function toBins(hist) {
  if (!hist) return null;
  if (Array.isArray(hist)) {
    if (!hist.length) return null;
    if (Array.isArray(hist[0])) return hist.map(([lo, hi, count]) => ({ lo, hi, count }));
    return hist.map((b) => ({ lo: b.lo ?? b.start ?? b.min, hi: b.hi ?? b.end ?? b.max, count: b.count ?? b.n }));
  }
  const edges = hist.edges || hist.bin_edges || hist.bins;
  const counts = hist.counts || hist.count;
  if (Array.isArray(edges) && Array.isArray(counts) && edges.length === counts.length + 1) {
    return counts.map((c, i) => ({ lo: edges[i], hi: edges[i + 1], count: c }));
  }
  return null;
}
