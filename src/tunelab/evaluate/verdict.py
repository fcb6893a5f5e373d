"""The verdict of a comparison: the best fine-tuned model against the best prompting setup, as
fields, and the one sentence rendered from them (render_verdict, the only place that writes
it). The report and the page read the fields; nothing parses the sentence.

Fields (every one always present; None where it does not apply):
    kind                tuned_wins, on_par (within 1 point), prompting_wins, tuned_only, or
                        ungraded (a grader graded none of the answers a side rests on: nothing
                        is claimed)
    ungraded            the rows whose answers a grader graded none of (the judge task)
    winner              the row that wins (None: on par, or nothing to beat)
    metric, metric_label   the headline metric's key and its words
    best_tuned, tuned_primary, tuned_count      the best fine-tuned row, its score, how many
    best_baseline, baseline_primary             the best prompting row and its score
    points              tuned minus baseline, in points (100 x the metric)
    prompt_tokens_ratio tuned prompt tokens per request / the baseline's
    cost_ratio          tuned cost per 1,000 requests / the baseline's (priced comparisons)
    cost                cost.cost_summary: every row's cost, the training cost, break-evens
    break_even_requests requests after which training is paid back against the baseline
    pays_back           True, False (never: it costs as much per request) or None (unknown)
    pairwise            the grader's pairwise comparison of the two (judge task), or None
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tunelab.evaluate.cost import Prices, cost_summary, payback_phrase

TUNED = "fine-tuned"       # the row of the one fine-tuned model of a comparison


def best_row(rows: list):
    """The best row by the headline metric; among equals the cheapest, then the first."""
    return max(rows, key=lambda r: (r.primary, -r.prompt_tokens))


def _graded(row) -> bool:
    """False for a row of the judge task whose answers the grader graded none of."""
    return not (row.metrics.get("ungraded_rate") == 1.0)


def verdict_fields(rows: list, label: str, tuned_names: Sequence[str] = (TUNED,), *,
                   prices: Prices | None = None,
                   train_seconds: dict[str, float | None] | None = None) -> dict[str, Any]:
    """The verdict's fields from the comparison's rows (RunResult). With `prices`, each row's
    cost per 1,000 requests and the break-even against the best baseline (`train_seconds`:
    each tuned model's measured training time, None when unknown)."""
    tuned_rows = [r for r in rows if r.name in tuned_names]
    baselines = [r for r in rows if r.name not in tuned_names]
    tuned = best_row(tuned_rows)
    d: dict[str, Any] = {
        "kind": "tuned_only", "winner": None, "metric": tuned.task["primary"],
        "metric_label": label, "best_tuned": tuned.name, "tuned_primary": tuned.primary,
        "tuned_count": len(tuned_rows), "best_baseline": None, "baseline_primary": None,
        "points": None, "prompt_tokens_ratio": None, "cost_ratio": None, "cost": None,
        "break_even_requests": None, "pays_back": None, "pairwise": None,
        "ungraded": [r.name for r in rows if not _graded(r)]}
    if not baselines:
        return d
    best = best_row(baselines)
    if not _graded(tuned) or not _graded(best):
        # a judge score of 0 over no graded answer is no evidence: say so, claim nothing
        d.update(kind="ungraded", best_baseline=best.name, baseline_primary=best.primary)
        return d
    points = 100 * (tuned.primary - best.primary)
    kind = "on_par" if abs(points) < 1.0 else "tuned_wins" if points > 0 else "prompting_wins"
    d.update(kind=kind, winner={"tuned_wins": tuned.name, "prompting_wins": best.name}.get(kind),
             best_baseline=best.name, baseline_primary=best.primary, points=points,
             prompt_tokens_ratio=tuned.prompt_tokens / best.prompt_tokens
             if best.prompt_tokens else 1.0)
    if prices is not None:
        summary = cost_summary(rows, prices, (train_seconds or {}).get(tuned.name), tuned.name,
                               best.name, [r.name for r in baselines])
        per_1k = summary["per_1k_requests"]
        mine, theirs = per_1k.get(tuned.name), per_1k.get(best.name)
        d.update(cost=summary, break_even_requests=summary["break_even_requests"],
                 pays_back=summary["pays_back"],
                 cost_ratio=mine / theirs if mine is not None and theirs else None)
    return d


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def pairwise_phrase(p: dict[str, Any] | None) -> str | None:
    """`the grader's win rate against base 5-shot: 69% of 8 pairs (5 won, 2 lost, 1 tied;
    95% CI 36-90%)`"""
    if not p:
        return None
    if not p["graded"]:
        return (f"the grader named no winner against {p['b']} in any of "
                f"{p['ungraded']} pairs")
    return (f"the grader's win rate against {p['b']}: {_pct(p['win_rate'])} of {p['graded']} "
            f"pairs ({p['wins']} won, {p['losses']} lost, {p['ties']} tied; 95% CI "
            f"{_pct(p['ci_low'])}-{_pct(p['ci_high'])})")


def render_verdict(d: dict[str, Any]) -> str:
    """THE sentence, from the fields alone."""
    name, label = d["best_tuned"], d["metric_label"]
    who = "fine-tuned" if name == TUNED else f"fine-tuned ({name})"
    if d["kind"] == "tuned_only":
        return f"{who}: {100 * d['tuned_primary']:.1f}% {label}"
    if d["kind"] == "ungraded":
        text = (f"no verdict: the grader graded none of the answers of "
                f"{' and '.join(d['ungraded'])} (see the warnings and the grader's replies)")
        pairwise = pairwise_phrase(d.get("pairwise"))
        return text + (f"; {pairwise}" if pairwise else "")
    best, points, ratio = d["best_baseline"], d["points"], d["prompt_tokens_ratio"]
    tokens = (f"{100 * (1 - ratio):.0f}% fewer" if ratio < 0.995 else
              f"{100 * (ratio - 1):.0f}% more" if ratio > 1.005 else "the same number of")
    tail = f"with {tokens} prompt tokens per request"
    if d["pays_back"] is not None:
        tail += "; " + payback_phrase(d["break_even_requests"] if d["pays_back"] else math.inf,
                                      best)
    pairwise = pairwise_phrase(d.get("pairwise"))
    if pairwise:
        tail += "; " + pairwise
    if d["kind"] == "on_par":
        return f"{who}: on par with {best} ({points:+.1f} points {label}), {tail}"
    if d["kind"] == "tuned_wins":
        return f"{who}: {points:+.1f} points {label} over {best}, {tail}"
    loser = "fine-tuned" if name == TUNED else \
        f"the best fine-tuned model ({name})" if d["tuned_count"] > 1 else who
    return f"prompting wins: {loser} is {abs(points):.1f} points {label} behind {best}, {tail}"


def verdict(rows: list, label: str, tuned_names: Sequence[str] = (TUNED,), *,
            prices: Prices | None = None,
            train_seconds: dict[str, float | None] | None = None) -> tuple[str, dict[str, Any]]:
    """The sentence and its fields."""
    d = verdict_fields(rows, label, tuned_names, prices=prices, train_seconds=train_seconds)
    return render_verdict(d), d
