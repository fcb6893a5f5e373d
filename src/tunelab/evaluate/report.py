"""What a person reads: the terminal tables of `tunelab eval` and `tunelab compare`, and the
comparison report as report.html (one self-contained file: styles inline, charts as inline PNG,
opens offline) and report.md (charts beside it in charts/)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from tunelab.data.io import atomic_write, write_json
from tunelab.evaluate.cost import about, money
from tunelab.evaluate.metrics import METRICS, format_value, metric_name
from tunelab.evaluate.runner import RunResult

PALETTE = {"base zero-shot": "#9aa5b1", "base + system prompt": "#7b8794", "fine-tuned": "#2563eb"}
FEW_SHOT_COLOR = "#f59e0b"
RETRIEVAL_COLOR = "#0d9488"
TUNED_COLORS = ("#2563eb", "#7c3aed", "#059669", "#db2777", "#0891b2", "#65a30d")


def _color(name: str, tuned: list[str] | tuple[str, ...] = ()) -> str:
    """Base rows grey, few-shot amber, each fine-tuned model its own colour (the first blue)."""
    if name in tuned:
        return TUNED_COLORS[list(tuned).index(name) % len(TUNED_COLORS)]
    if "retrieved" in name:
        return RETRIEVAL_COLOR
    return PALETTE.get(name, FEW_SHOT_COLOR)


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


# -- terminal ----------------------------------------------------------------------------------

def format_metrics(res: RunResult) -> str:
    """`tunelab eval`'s table."""
    from tunelab.evaluate.tasks import TASKS
    m = res.metrics
    pairs = getattr(TASKS.get(res.task["task"]), "answers_by", "") == "logprobs"
    w = max([17, *(len(metric_name(k)) for k in m)])
    lines = [f"{'task':<{w}} {res.task['task']}",
             f"{'pairs' if pairs else 'examples':<{w}} {res.examples}"]
    for key, value in m.items():
        if isinstance(value, (dict, list)):      # the confusion matrix, per-category rates
            continue
        lines.append(f"{metric_name(key):<{w}} {format_value(key, value)}")
    if "confusion" in m:
        lines.append("")
        lines += confusion_text(m["confusion"])
    if pairs:
        lines += ["", f"{'per pair':<{w}} {res.prompt_tokens:.0f} prompt tokens, both answers "
                  f"scored in one pass, {res.requests_per_s:.1f} pairs/s (batched)"]
    elif res.prompt_tokens:
        lines.append("")
        lines.append(f"{'per request':<{w}} {res.prompt_tokens:.0f} prompt + "
                     f"{res.completion_tokens:.1f} "
                     f"generated tokens, {res.latency_s:.2f} s latency (batched), "
                     f"{res.requests_per_s:.1f} requests/s")
    return "\n".join(lines)


def confusion_text(conf: dict[str, Any]) -> list[str]:
    cols = conf["columns"]
    w = max(8, *(len(c) for c in cols), *(len(l) for l in conf["labels"])) + 1
    out = ["confusion (rows: reference, columns: answer)",
           " " * w + "".join(f"{c:>{w}}" for c in cols)]
    for label, row in zip(conf["labels"], conf["matrix"]):
        out.append(f"{label:<{w}}" + "".join(f"{v:>{w}}" for v in row))
    return out


def comparison_table(rows: list[RunResult], preference_of=None,
                     cost: dict[str, Any] | None = None) -> list[list[str]]:
    """The comparison's table. `preference_of(row name)` -> the preference result of the model
    that row is answered by (or None): its accuracy and mean margin become two columns.
    `cost` (cost.cost_summary): each row's cost per 1,000 requests, a column."""
    primary = rows[0].task["primary"]
    extra = [k for k, m in METRICS.items() if m.column and k in rows[0].metrics and k != primary]
    prefs = [preference_of(r.name) for r in rows] if preference_of else [None] * len(rows)
    pref_cols = ["preferred", "pref. margin"] if any(prefs) else []
    head = ["", metric_name(primary), *map(metric_name, extra), *pref_cols, "prompt tok/req",
            "gen tok/req", "latency s", "req/s"] + (["$/1k req"] if cost else [])
    per_1k = (cost or {}).get("per_1k_requests", {})
    body = []
    for r, p in zip(rows, prefs):
        cells = [r.name, format_value(primary, r.primary)] + \
            [format_value(k, r.metrics.get(k)) for k in extra]
        if pref_cols:
            cells += [_pct(p.primary), f"{p.metrics['margin']:+.2f}"] if p else ["-", "-"]
        cells += [f"{r.prompt_tokens:.0f}", f"{r.completion_tokens:.1f}", f"{r.latency_s:.2f}",
                  f"{r.requests_per_s:.1f}"]
        if cost:
            cells.append(money(per_1k.get(r.name)))
        body.append(cells)
    return [head] + body


def preference_table(c) -> list[list[str]]:
    """Every preference metric, for the base model and each fine-tuned model."""
    head = ["model", "accuracy", "per-token accuracy", "mean margin", "chosen log-prob",
            "rejected log-prob"]
    return [head] + [[r.name, _pct(r.metrics["accuracy"]), _pct(r.metrics["normalized_accuracy"]),
                      f"{r.metrics['margin']:+.3f}", f"{r.metrics['chosen_logp']:.3f}",
                      f"{r.metrics['rejected_logp']:.3f}"] for r in c.preference]


PREFERENCE_NOTE = ("A pair counts as preferred when the model gives its chosen answer a higher "
                   "log-probability than the rejected one, given the prompt (summed over the "
                   "answer's tokens and end-of-turn token; per-token: divided by each answer's "
                   "length). The margin is chosen minus rejected summed log-probability.")


def format_comparison(c) -> str:
    table = comparison_table(c.rows, c.preference_of, c.cost)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = [*lines, "", c.verdict]
    if c.judge:
        out.append(judge_line(c))
    if c.cost:
        out.append(cost_line(c.cost))
    if c.preference:
        out.append(preference_line(c))
    if c.forgetting:
        out.append(forgetting_line(c.forgetting))
    out += [f"warning: {w}" for w in c.warnings]
    return "\n".join(out)


def judge_line(c) -> str:
    """Who graded, and what came of the grades: `graded by gpt-4o-mini (tunelab's default
    rubric, 1-5): mean grade base zero-shot 2.10, fine-tuned 3.40; 2 of 16 ungraded`"""
    j = c.judge
    means = ", ".join(f"{r.name} {format_value('judge_mean', r.metrics.get('judge_mean'))}"
                      for r in c.rows)
    ungraded = sum(r.metrics.get("ungraded", 0) for r in c.rows)
    total = sum(r.examples for r in c.rows)
    line = (f"graded by {j['model']} at {j['url']} ({j['rubric']} rubric, "
            f"{j['scale'][0]}-{j['scale'][1]}): mean grade {means}; {ungraded} of {total} "
            "answers ungraded")
    if c.pairwise:
        p = c.pairwise
        line += (f"; pairwise {p['a']} vs {p['b']}: {p['wins']} won, {p['losses']} lost, "
                 f"{p['ties']} tied, {p['ungraded']} ungraded")
        if p["win_rate"] is not None:
            line += (f", win rate {_pct(p['win_rate'])} (95% CI {_pct(p['ci_low'])} to "
                     f"{_pct(p['ci_high'])}, Wilson; a tie counts half)")
    return line


def verdict_facts(d: dict[str, Any]) -> list[tuple[str, str]]:
    """The verdict's fields as short facts (label, value), for the line under the sentence."""
    if not d or d.get("kind") in (None, "tuned_only", "ungraded"):
        return []
    facts = [("metric", d.get("metric_label") or metric_name(d.get("metric", ""))),
             ("difference", f"{d['points']:+.1f} points"),
             ("prompt tokens", f"x{d['prompt_tokens_ratio']:.2f}")]
    if d.get("cost_ratio") is not None:
        facts.append(("cost per request", f"x{d['cost_ratio']:.2f}"))
    if d.get("pays_back") is True:
        facts.append(("break-even", f"{about(d['break_even_requests'])} requests"))
    elif d.get("pays_back") is False:
        facts.append(("break-even", "never"))
    p = d.get("pairwise")
    if p and p.get("win_rate") is not None:
        facts.append(("pairwise win rate", f"{_pct(p['win_rate'])} "
                                           f"[{_pct(p['ci_low'])}, {_pct(p['ci_high'])}]"))
    return facts


def cost_line(cost: dict[str, Any]) -> str:
    """Where the costs come from, and what the training cost."""
    train = ("training time unknown (no result.json in the run folder)"
             if cost.get("train_cost") is None else
             f"training: {cost['train_seconds'] / 60:.1f} min at "
             f"${cost['prices']['train_per_hour']:g}/hour = {money(cost['train_cost'])}")
    return f"cost: {cost['basis']}; {train}"


def forgetting_line(f: dict[str, Any]) -> str:
    if len(f.get("models", [])) > 1:
        return _forgetting_line_several(f)
    parts = []
    if f.get("general"):
        g = f["general"]
        what = ("no change" if abs(g["delta_points"]) < 0.5 else
                f"{g['delta_points']:+.1f} points")
        parts.append(f"general check ({g['items']} prompts): base {100 * g['base']:.0f}% -> "
                     f"fine-tuned {100 * g['tuned']:.0f}% ({what}; {g['lost']} answers lost, "
                     f"{g['gained']} gained)")
    if f.get("file"):
        x = f["file"]
        parts.append(f"{x['name']}: loss {x['base']['loss']:.3f} -> {x['tuned']['loss']:.3f}, "
                     f"match {100 * x['base']['normalized_match']:.0f}% -> "
                     f"{100 * x['tuned']['normalized_match']:.0f}%")
    return "; ".join(parts)


def _forgetting_line_several(f: dict[str, Any]) -> str:
    """The base model, then each fine-tuned model: pass rate, change, answers lost/gained."""
    models = f["models"]
    parts = []
    if f.get("general"):
        g = f["general"]
        each = []
        for m in models:
            x = m["general"]
            each.append(f"{m['name']} {100 * x['tuned']:.0f}% ({x['delta_points']:+.1f} points; "
                        f"{x['lost']} lost, {x['gained']} gained)")
        parts.append(f"general check ({g['items']} prompts): base {100 * g['base']:.0f}% -> "
                     + ", ".join(each))
    if f.get("file"):
        x = f["file"]
        loss = ", ".join(f"{m['name']} {m['file']['loss']:.3f}" for m in models)
        match = ", ".join(f"{m['name']} {100 * m['file']['normalized_match']:.0f}%"
                          for m in models)
        parts.append(f"{x['name']}: loss {x['base']['loss']:.3f} -> {loss}; match "
                     f"{100 * x['base']['normalized_match']:.0f}% -> {match}")
    return "; ".join(parts)


def preference_line(c) -> str:
    """`preference pairs (40): base 50.0% (margin -0.12), sft 62.5% (+1.30), dpo 95.0% (+8.40)`"""
    if not c.preference:
        return ""
    each = [f"{r.name} {100 * r.primary:.1f}% ({'margin ' if i == 0 else ''}"
            f"{r.metrics['margin']:+.2f})" for i, r in enumerate(c.preference)]
    return (f"preference pairs ({c.preference[0].examples}): chosen answer more likely for "
            + ", ".join(each))


# -- charts ------------------------------------------------------------------------------------

def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.titleweight": "bold", "axes.titlesize": 11})
    return plt


def _height(rows: list) -> float:
    return 3.0 + 0.35 * max(0, len(rows) - 4)


def chart_metric(rows: list[RunResult], label: str, tuned: list[str] = ()) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, _height(rows)))
    names = [r.name for r in rows]
    values = [100 * r.primary for r in rows]
    bars = ax.barh(names, values, color=[_color(n, tuned) for n in names])
    ax.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=3)
    ax.set_xlim(0, 110)
    ax.invert_yaxis()
    ax.set_xlabel(f"{label} (%)")
    ax.set_title(f"{label} on the test split")
    return _figure_png(fig)


def chart_tokens(rows: list[RunResult], tuned: list[str] = ()) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, _height(rows)))
    names = [r.name for r in rows]
    prompt = [r.prompt_tokens for r in rows]
    gen = [r.completion_tokens for r in rows]
    ax.barh(names, prompt, color=[_color(n, tuned) for n in names], label="prompt")
    bars = ax.barh(names, gen, left=prompt, color="#111827", alpha=0.55, label="generated")
    ax.bar_label(bars, labels=[f"{p + g:.0f}" for p, g in zip(prompt, gen)], padding=3)
    ax.set_xlim(0, max(p + g for p, g in zip(prompt, gen)) * 1.18)
    ax.invert_yaxis()
    ax.set_xlabel("tokens per request")
    ax.set_title("cost per request")
    ax.legend(loc="lower right", frameon=False)
    return _figure_png(fig)


def chart_cost(rows: list[RunResult], cost: dict[str, Any], label: str,
               tuned: list[str] = ()) -> bytes:
    """Cost per 1,000 requests against quality, one point per option; with a known training
    cost, the tuned model's cost over the first N requests (training included) as the x-axis of
    a second panel against each baseline's, which crosses at the break-even."""
    plt = _plt()
    per_1k = cost["per_1k_requests"]
    pts = [(r, per_1k.get(r.name)) for r in rows if per_1k.get(r.name) is not None]
    panels = 2 if cost.get("train_cost") is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    placed: dict[tuple[float, float], int] = {}
    for r, c in pts:
        ax.scatter([c], [100 * r.primary], s=60, color=_color(r.name, tuned), zorder=3)
        # options at the same point (same cost and quality) get their labels stacked
        at = (round(c, 12), round(r.primary, 6))
        placed[at] = placed.get(at, -1) + 1
        ax.annotate(r.name, (c, 100 * r.primary), textcoords="offset points",
                    xytext=(6, 4 - 11 * placed[at]), fontsize=8)
    ax.set_xlabel("USD per 1,000 requests")
    ax.set_ylabel(f"{label} (%)")
    ax.set_ylim(-5, 110)
    ax.set_xlim(0, max([c for _, c in pts] + [1e-9]) * 1.35)
    ax.set_title("cost vs quality")
    ax.grid(alpha=0.3)
    if panels == 2:
        ax = axes[0][1]
        best = next((r for r in rows if r.name in tuned and r.name in per_1k), None)
        n_max = cost.get("break_even_requests") or 0
        n_max = max(1000.0, 2 * n_max)
        xs = [0, n_max]
        for r, c in pts:
            if r.name in tuned and r is not best:
                continue
            start = cost["train_cost"] if r is best else 0.0
            ax.plot(xs, [start, start + c * n_max / 1000], color=_color(r.name, tuned),
                    label=r.name)
        if cost.get("break_even_requests"):
            ax.axvline(cost["break_even_requests"], color="#111827", ls=":", lw=1)
        ax.set_xlabel("requests served")
        ax.set_ylabel("USD, training included")
        ax.set_title("total cost and break-even")
        ax.legend(fontsize=7, frameon=False)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def chart_confusions(rows: list[RunResult]) -> bytes:
    plt = _plt()
    shown = [r for r in rows if "confusion" in r.metrics]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.3 * len(shown), 3.2), squeeze=False)
    for ax, r in zip(axes[0], shown):
        conf = r.metrics["confusion"]
        matrix = conf["matrix"]
        ax.imshow(matrix, cmap="Blues", aspect="auto")
        ax.set_xticks(range(len(conf["columns"])),
                      [c if c != "(invalid)" else "invalid" for c in conf["columns"]],
                      rotation=45 if len(conf["columns"]) > 4 else 0, ha="right"
                      if len(conf["columns"]) > 4 else "center")
        ax.set_yticks(range(len(conf["labels"])), conf["labels"])
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                            color="white" if v > top / 2 else "#111827")
        ax.set_title(r.name)
        ax.set_xlabel("answer")
    axes[0][0].set_ylabel("reference")
    fig.tight_layout()
    return _figure_png(fig)


def chart_training(run_dir: Path | list[tuple[str, Path]]) -> bytes | None:
    """The loss curves of a run; of several runs (name, folder), one panel each: an SFT loss
    per token and a DPO loss per pair do not share a scale."""
    from tunelab.train.events import read_metrics
    runs = [("", Path(run_dir))] if isinstance(run_dir, (str, Path)) else \
        [(n, Path(d)) for n, d in run_dir]
    curves = []
    for name, folder in runs:
        entries = read_metrics(folder / "metrics.jsonl")
        train = [(e["step"], e["train_loss"]) for e in entries if "train_loss" in e]
        valid = [(e["step"], e["valid_loss"]) for e in entries if "valid_loss" in e]
        if train:
            curves.append((name, train, valid))
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.6 if len(curves) == 1 else
                                                      3.6 * len(curves), 3.0), squeeze=False)
    for ax, (name, train, valid) in zip(axes[0], curves):
        ax.plot(*zip(*train), label="train", color="#2563eb")
        if valid:
            ax.plot(*zip(*valid), "o-", label="validation", color="#f59e0b")
        ax.set_xlabel("step")
        ax.set_title(f"training: {name}" if name else "training")
        ax.grid(alpha=0.25)
        ax.legend(frameon=False)
    axes[0][0].set_ylabel("loss per trained token" if len(curves) == 1 else "training loss")
    fig.tight_layout()
    return _figure_png(fig)


def chart_forgetting(general: dict[str, Any], models: list[dict[str, Any]] | None = None
                     ) -> bytes:
    """Pass rate per category: the base model, then each fine-tuned model (`models`: the
    forgetting check's per-model entries; none: the one in `general`)."""
    plt = _plt()
    cats = list(general["by_category"])
    series = [("base", [100 * (general["by_category"][c]["base"] or 0) for c in cats],
               PALETTE["base zero-shot"])]
    if models and len(models) > 1:
        names = [m["name"] for m in models]
        series += [(m["name"], [100 * m["general"]["by_category"][c]["tuned"] for c in cats],
                    _color(m["name"], names)) for m in models]
    else:
        series.append(("fine-tuned", [100 * general["by_category"][c]["tuned"] for c in cats],
                       PALETTE["fine-tuned"]))
    fig, ax = plt.subplots(figsize=(5.6, 3.0 if len(series) <= 2 else 3.0 + 0.5 * len(cats)))
    y = range(len(cats))
    width = 0.8 / len(series)
    for k, (label, values, color) in enumerate(series):
        ax.barh([i - 0.4 + width * (k + 0.5) for i in y], values, height=width, color=color,
                label=label)
    ax.set_yticks(list(y), cats)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("general prompts passed (%)")
    ax.set_title("general check: what fine-tuning kept")
    ax.legend(frameon=False, loc="lower right")
    return _figure_png(fig)


# -- examples side by side ---------------------------------------------------------------------

def side_by_side(c, n: int = 10) -> tuple[str, list[dict[str, Any]]]:
    """Ten test examples answered by the best prompting baseline (few-shot if it ran) and the
    fine-tuned models: disagreements of the baseline and the best fine-tuned model first
    (either way), then shared mistakes, then agreement. Each item's `answers` holds every
    fine-tuned model's (name, answer, score); `tuned` is the best one's answer."""
    names = c.tuned_names
    best = c.verdict_detail.get("best_tuned", names[0])
    tuned = c.row(best)
    baselines = [r for r in c.rows if r.name not in names]
    if tuned is None or not baselines:
        return "", []
    other = next((r for r in baselines if "shot" in r.name and "zero" not in r.name),
                 baselines[0])
    by_index = {s["index"]: s for s in other.scored}
    each = [{s["index"]: s for s in r.scored} for r in (c.row(x) for x in names) if r]
    rows = []
    for t in sorted(tuned.scored, key=lambda s: s["index"]):
        b = by_index.get(t["index"])
        if b is None:
            continue
        rank = 0 if t["score"] != b["score"] else 1 if not t["score"] else 2
        answers = [(name, m[t["index"]]["prediction"], m[t["index"]]["score"])
                   for name, m in zip(names, each) if t["index"] in m]
        rows.append((rank, t["index"], {"prompt": t["prompt"], "reference": t["reference"],
                                        "base": b["prediction"], "base_score": b["score"],
                                        "tuned": t["prediction"], "tuned_score": t["score"],
                                        "answers": answers, "base_row": b,
                                        "rows": [m[t["index"]] for m in each
                                                 if t["index"] in m]}))
    rows.sort(key=lambda x: (x[0], x[1]))
    picked = [r for rank in (0, 1, 2) for r in rows if r[0] == rank]
    # at most 6 of one kind, so the ten show both wins and mistakes
    out, per_rank = [], {0: 0, 1: 0, 2: 0}
    for rank, _, item in picked:
        if per_rank[rank] < 6 and len(out) < n:
            out.append(item)
            per_rank[rank] += 1
    for rank, _, item in picked:
        if len(out) >= n:
            break
        if item not in out:
            out.append(item)
    return other.name, out


PAIRS_SHOWN = 12
JUDGE_NOTE = ("Each answer was graded from 1 to 5 by the grader model, which read the request, "
              "the reference answer and the answer. The judge score is the mean grade scaled "
              "to 0-100% ((grade - 1) / 4) over the graded answers; an answer whose grade could "
              "not be read is ungraded: counted, left out of the mean, and its reply kept in the "
              "predictions file. Pairwise: the grader was asked which of two answers is better "
              "in both orders (A/B, then B/A); an answer wins a pair only when both orders name "
              "it, and any disagreement is a tie.")


def _html_judge(c) -> str:
    """The graded answers card: the grader, each row's grades, the pairwise comparison."""
    e = html.escape
    j = c.judge
    head = ["", "judge score", "mean grade", "ungraded"]
    body = [[r.name, format_value("judge_score", r.metrics.get("judge_score")),
             format_value("judge_mean", r.metrics.get("judge_mean")),
             f"{r.metrics.get('ungraded', 0)} of {r.examples}"] for r in c.rows]
    tuned = set(c.tuned_names)
    out = [f"<div class='card' id='graded'><h2>Graded answers</h2>"
           f"<p class='small'>Grader <code>{e(j['model'])}</code> at <code>{e(j['url'])}</code>, "
           f"{e(j['rubric'])} rubric, grades {j['scale'][0]}-{j['scale'][1]}.</p>",
           _html_table([head] + body, lambda row: row[0] in tuned)]
    if c.pairwise:
        p = c.pairwise
        rate = (f"win rate <b>{_pct(p['win_rate'])}</b> (95% CI {_pct(p['ci_low'])} to "
                f"{_pct(p['ci_high'])}, Wilson score interval; a tie counts half)"
                if p["win_rate"] is not None else "no pair could be graded")
        out.append(f"<h2 style='margin-top:18px'>Pairwise: {e(p['a'])} vs {e(p['b'])}</h2>"
                   f"<p>{p['wins']} won, {p['losses']} lost, {p['ties']} tied, "
                   f"{p['ungraded']} ungraded: {rate}.</p>")
        if c.pairwise_pairs:
            rows = "".join(
                f"<tr><td>{e(x['prompt'])}</td><td>{e(x['answer_a'])}</td>"
                f"<td>{e(x['answer_b'])}</td><td>{e(x['winner'] or 'ungraded')}</td><td>"
                + "<br>".join(f"<i>A = {e(x[a['order'][0]])}:</i> "
                              f"{e((a.get('reply') or a.get('error') or '')[:200])}"
                              for a in x["asked"]) + "</td></tr>"
                for x in c.pairwise_pairs[:PAIRS_SHOWN])
            out.append("<div class='ex'><table><thead><tr><th>prompt</th>"
                       f"<th>{e(p['a'])}</th><th>{e(p['b'])}</th><th>winner</th>"
                       "<th>grader's replies (each order)</th></tr></thead>"
                       f"<tbody>{rows}</tbody></table></div>")
    out.append(f"<p class='small'>{e(JUDGE_NOTE)}</p></div>")
    return "".join(out)


def answer_mark(row: dict[str, Any]) -> str:
    """How an answer's score reads beside it: its grade (4/5, or "ungraded") when a grader
    scored it, else ✓ or ✗."""
    if "grade" in row:
        return "ungraded" if row.get("grade") is None else f"{row['grade']:g}/5"
    return "✓" if (row.get("score") or 0) >= 1 else "✗"


def _html_mark(row: dict[str, Any]) -> str:
    text = answer_mark(row)
    if "grade" in row:
        good = row.get("grade") is not None and row["grade"] >= 4
        return f"<span class='{'ok' if good else 'no'} grade'>{html.escape(text)}</span>"
    return f"<span class='{'ok' if text == '✓' else 'no'}'>{text}</span>"


def _html_reason(row: dict[str, Any]) -> str:
    """The grader's reason under a graded answer (or why there is no grade)."""
    if "grade" not in row:
        return ""
    why = row.get("reason") if row.get("grade") is not None else \
        (row.get("grade_error") or "") + (f": {row['grader_reply']}" if row.get("grader_reply")
                                          else "")
    return f"<div class='small reason'>grader: {html.escape((why or '')[:300])}</div>" \
        if why else ""


# -- writing -----------------------------------------------------------------------------------

def _training_runs(c) -> Path | list[tuple[str, Path]] | None:
    runs = [(t.name, Path(t.run_dir)) for t in c.tuned_models if t.run_dir]
    if len(c.tuned_models) > 1:
        return runs or None
    return Path(c.run_dir) if c.run_dir else None


def write_report(c, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    tuned = c.tuned_names
    charts: dict[str, bytes] = {"metric": chart_metric(c.rows,
                                                       metric_name(c.rows[0].task["primary"]),
                                                       tuned),
                                "tokens": chart_tokens(c.rows, tuned)}
    if c.cost:
        charts["cost"] = chart_cost(c.rows, c.cost, metric_name(c.rows[0].task["primary"]),
                                    tuned)
    if any("confusion" in r.metrics for r in c.rows):
        charts["confusion"] = chart_confusions(c.rows)
    runs = _training_runs(c)
    if runs:
        png = chart_training(runs)
        if png:
            charts["training"] = png
    if c.forgetting and c.forgetting.get("general"):
        charts["forgetting"] = chart_forgetting(c.forgetting["general"],
                                                c.forgetting.get("models"))
    (out_dir / "charts").mkdir(parents=True, exist_ok=True)
    for name, png in charts.items():
        (out_dir / "charts" / f"{name}.png").write_bytes(png)
    c.report_html = str(out_dir / "report.html")
    c.report_md = str(out_dir / "report.md")
    with atomic_write(out_dir / "report.md") as f:
        f.write(_markdown(c, charts))
    with atomic_write(out_dir / "report.html") as f:
        f.write(_html(c, charts))
    write_json(out_dir / "comparison.json", c.to_json())


def _tuned_facts(c) -> list[tuple[str, str]]:
    if len(c.tuned_models) > 1:
        return [(f"fine-tuned: {t.name}", t.model) for t in c.tuned_models]
    return [("fine-tuned model", c.tuned)]


def _answer_names(c) -> list[str]:
    """The fine-tuned columns of the example answers: "fine-tuned", or each model's name."""
    return c.tuned_names if len(c.tuned_models) > 1 else ["fine-tuned"]


def _markdown(c, charts: dict[str, bytes]) -> str:
    table = comparison_table(c.rows, c.preference_of, c.cost)
    md = [f"# Fine-tuned vs prompted: {c.task['task']}", "", f"**{c.verdict}**", "",
          f"- base model: `{c.base}`", *(f"- {k}: `{v}`" for k, v in _tuned_facts(c)),
          f"- test data: `{c.test_file}` ({c.rows[0].examples} examples)"]
    if c.train_file:
        md.append(f"- few-shot examples from: `{c.train_file}` ({len(c.few_shot)} shots)")
    if c.retrieval:
        md.append(f"- retrieved per request (BM25): {c.retrieval['k']} {c.retrieval['kind']} "
                  f"from `{c.retrieval['source']}`")
    if c.preference:
        md.append(f"- preference pairs: `{c.preference_file}` ({c.preference[0].examples} pairs)")
    md += ["", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    md += ["| " + " | ".join(row) + " |" for row in table[1:]]
    md += ["", "Tokens are per request, means over the test split; latency is the wall time of "
           "the batch a request was answered in, on this machine.", ""]
    if c.cost:
        md += [cost_line(c.cost), ""]
    for name in ("metric", "tokens", "cost", "confusion", "training", "forgetting"):
        if name in charts:
            md.append(f"![{name}](charts/{name}.png)")
    if c.judge:
        md += ["", "## Graded answers", "", judge_line(c)]
        if c.pairwise_pairs:
            md += ["", f"| prompt | {c.pairwise['a']} | {c.pairwise['b']} | winner | "
                   "grader (both orders) |", "|---|---|---|---|---|"]
            cell = lambda s: str(s or "").replace("|", "\\|").replace("\n", " ")[:160]
            for p in c.pairwise_pairs[:PAIRS_SHOWN]:
                asked = "; ".join(f"A = {p[x['order'][0]]}: "
                                  f"{cell(x.get('reply') or x.get('error'))}"
                                  for x in p["asked"])
                md.append(f"| {cell(p['prompt'])} | {cell(p['answer_a'])} | "
                          f"{cell(p['answer_b'])} | {p['winner'] or 'ungraded'} | {asked} |")
    if c.preference:
        ptable = preference_table(c)
        md += ["", "## Preference pairs", "", PREFERENCE_NOTE, "",
               "| " + " | ".join(ptable[0]) + " |", "|" + "---|" * len(ptable[0])]
        md += ["| " + " | ".join(row) + " |" for row in ptable[1:]]
    if c.forgetting:
        md += ["", "## Forgetting", "", forgetting_line(c.forgetting)]
    who, items = side_by_side(c)
    if items:
        names = _answer_names(c)
        md += ["", f"## Example answers: {who} vs {', '.join(names)}", "",
               f"| prompt | reference | {who} | {' | '.join(names)} |",
               "|---|---|---|" + "---|" * len(names)]
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:160]
        for it in items:
            md.append(f"| {cell(it['prompt'])} | {cell(it['reference'])} | "
                      f"{answer_mark(it['base_row'])} {cell(it['base'])} | "
                      + " | ".join(f"{answer_mark(row)} {cell(row['prediction'])}"
                                   for row in it["rows"]) + " |")
    if c.warnings:
        md += ["", "## Warnings", ""] + [f"- {w}" for w in c.warnings]
    return "\n".join(md) + "\n"


CSS = """
:root{--fg:#111827;--muted:#4b5563;--line:#e5e7eb;--bg:#f8fafc;--card:#fff;--blue:#2563eb;
--good:#047857;--bad:#b91c1c}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,
"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 24px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:0 0 12px}
.sub{color:var(--muted);margin:0 0 20px}
.verdict{background:var(--card);border:1px solid var(--line);border-left:5px solid var(--blue);
border-radius:10px;padding:14px 18px;font-size:18px;font-weight:600;margin-bottom:20px}
.verdict.lose{border-left-color:var(--bad)}
.verdict .facts{font-size:13px;font-weight:400;color:var(--muted);margin-top:6px}
.reason{margin-top:3px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px;
margin-bottom:20px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:20px}
.grid .card{margin:0}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:7px 10px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}
th{font-size:12px;text-transform:uppercase;letter-spacing:.03em;color:var(--muted)}
tr.tuned td{font-weight:600;background:#eff6ff}
img{max-width:100%;height:auto;display:block}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0}
dt{color:var(--muted)}dd{margin:0;word-break:break-all}
.ex td{text-align:left;font-size:13px}.ex td:first-child{width:34%}
.ok{color:var(--good);font-weight:700}.no{color:var(--bad);font-weight:700}
.warn{background:#fffbeb;border-color:#fcd34d}
.small{font-size:13px;color:var(--muted)}
code{background:#f1f5f9;padding:1px 5px;border-radius:4px;font-size:13px}
"""


def _img(charts: dict[str, bytes], name: str, alt: str) -> str:
    if name not in charts:
        return ""
    data = base64.b64encode(charts[name]).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _html_table(table: list[list[str]], highlight=lambda row: False) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in table[0])
    body = "".join(
        f'<tr class="{"tuned" if highlight(row) else ""}">'
        + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in table[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(c, charts: dict[str, bytes]) -> str:
    e = html.escape
    tuned = set(c.tuned_names)
    table = _html_table(comparison_table(c.rows, c.preference_of, c.cost), lambda row: row[0] in tuned)
    lose = c.verdict_detail.get("kind") == "prompting_wins"
    facts = " · ".join(f"{e(k)} <b>{e(v)}</b>" for k, v in verdict_facts(c.verdict_detail))
    facts = [("base model", c.base), *_tuned_facts(c),
             ("test data", f"{c.test_file} ({c.rows[0].examples} examples)"),
             ("task", f"{c.task['task']} (headline: {c.task['primary']})")]
    if c.task.get("labels"):
        facts.append(("labels", ", ".join(c.task["labels"])))
    if c.train_file:
        facts.append(("few-shot examples", f"{len(c.few_shot)} from {c.train_file}"))
    if c.retrieval:
        facts.append(("retrieved per request", f"{c.retrieval['k']} {c.retrieval['kind']} from "
                                               f"{c.retrieval['source']} (BM25)"))
    if c.preference:
        facts.append(("preference pairs", f"{c.preference[0].examples} from "
                                          f"{c.preference_file}"))
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>tunelab: fine-tuned vs prompted ({e(c.task['task'])})</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>Fine-tuned vs prompted</h1><p class='sub'>{e(c.task['task'])} on "
        f"{c.rows[0].examples} held-out examples</p>",
        f"<div class='verdict{' lose' if lose else ''}'>{e(c.verdict)}"
        + (f"<div class='facts'>{facts}</div>" if facts else "") + "</div>",
        f"<div class='card'><h2>Quality and cost per request</h2>{table}"
        "<p class='small'>Tokens are per request, means "
        "over the test split; latency is the wall time of the batch a request was answered in, "
        "on this machine; requests/s is batched throughput.</p></div>",
        "<div class='grid'>",
        f"<div class='card'>{_img(charts, 'metric', 'metric per setup')}</div>",
        f"<div class='card'>{_img(charts, 'tokens', 'tokens per request')}</div>",
        "</div><div style='height:20px'></div>",
    ]
    if "cost" in charts:
        parts.append(f"<div class='card'><h2>Cost and break-even</h2>"
                     f"<p class='small'>{e(cost_line(c.cost))}</p>"
                     f"{_img(charts, 'cost', 'cost per 1,000 requests vs quality')}</div>"
                     "<div style='height:20px'></div>")
    if c.judge:
        parts.append(_html_judge(c))
    if c.preference:
        parts.append("<div class='card'><h2>Preference pairs</h2>"
                     f"{_html_table(preference_table(c), lambda row: row[0] in tuned)}"
                     f"<p class='small'>{e(PREFERENCE_NOTE)}</p></div>")
    if "confusion" in charts:
        parts.append(f"<div class='card'><h2>Confusion matrices</h2>"
                     f"{_img(charts, 'confusion', 'confusion matrices')}</div>")
    if "training" in charts or "forgetting" in charts:
        parts.append("<div class='grid'>")
        if "training" in charts:
            parts.append(f"<div class='card'><h2>Training</h2>"
                         f"{_img(charts, 'training', 'training loss curves')}</div>")
        if "forgetting" in charts:
            parts.append(f"<div class='card'><h2>Forgetting</h2>"
                         f"<p>{e(forgetting_line(c.forgetting))}</p>"
                         f"{_img(charts, 'forgetting', 'general check by category')}</div>")
        parts.append("</div><div style='height:20px'></div>")
    if c.forgetting and "forgetting" not in charts:
        parts.append(f"<div class='card'><h2>Forgetting</h2>"
                     f"<p>{e(forgetting_line(c.forgetting))}</p></div>")
    if c.forgetting and c.forgetting.get("general"):
        several = len(c.forgetting.get("models", [])) > 1
        checks = [(m["name"], m["general"]) for m in c.forgetting["models"]] if several else \
            [("fine-tuned", c.forgetting["general"])]
        changed = [(name, kind, x) for name, g in checks
                   for kind, key in (("lost", "lost_examples"), ("gained", "gained_examples"))
                   for x in g[key]]
        if changed:
            rows = "".join(
                f"<tr><td>{e(x['prompt'])}</td><td>{e(x['base'])}</td>"
                + (f"<td>{e(name)}</td>" if several else "") + f"<td>{e(x['tuned'])}</td>"
                f"<td class='{'no' if kind == 'lost' else 'ok'}'>{kind}</td></tr>"
                for name, kind, x in changed)
            who_col = "<th>model</th><th>its answer</th>" if several else "<th>fine-tuned</th>"
            parts.append("<div class='card ex'><h2>General answers that changed</h2><table>"
                         f"<thead><tr><th>prompt</th><th>base</th>{who_col}<th></th>"
                         f"</tr></thead><tbody>{rows}</tbody></table></div>")
    who, items = side_by_side(c)
    if items:
        names = _answer_names(c)
        said = lambda t: e(t) if t.strip() else "<span class='small'>(no answer)</span>"
        rows = "".join(
            f"<tr><td>{e(it['prompt'])}</td><td>{e(it['reference'])}</td>"
            f"<td>{_html_mark(it['base_row'])} {said(it['base'])}{_html_reason(it['base_row'])}"
            "</td>"
            + "".join(f"<td>{_html_mark(row)} {said(row['prediction'])}{_html_reason(row)}</td>"
                      for row in it["rows"])
            + "</tr>" for it in items)
        parts.append(f"<div class='card ex'><h2>Example answers: {e(who)} vs "
                     f"{e(', '.join(names))}</h2>"
                     "<table><thead><tr><th>prompt</th><th>reference</th>"
                     f"<th>{e(who)}</th>" + "".join(f"<th>{e(n)}</th>" for n in names)
                     + f"</tr></thead><tbody>{rows}</tbody></table></div>")
    if c.warnings:
        parts.append("<div class='card warn'><h2>Warnings</h2><ul>"
                     + "".join(f"<li>{e(w)}</li>" for w in c.warnings) + "</ul></div>")
    parts.append("<div class='card'><h2>Setup</h2><dl>"
                 + "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in facts)
                 + "</dl></div>")
    parts.append("<p class='small'>Made by tunelab compare. Scored answers per setup are in "
                 "predictions/ beside this file; every figure is in comparison.json.</p>")
    parts.append("</main></body></html>")
    return "\n".join(parts)

