"""The metric names of every task, and how each is shown: THE one table. The terminal tables
and the report (evaluate/report.py) read it here; the page (static/js/views/compare.js) reads it
from the API (GET /v1/tunelab/metrics). A metric a task adds is added here once.

    label      how a person reads the key ("macro-F1" for macro_f1)
    unit       fraction (a share in [0, 1], shown as a percentage), count, tokens, number (a
               loss, a perplexity), logprob (summed log-probability), grade (1 to 5)
    direction  higher or lower is better, or neither (a size, not a quality)
    signed     shown with its sign (+1.30): a difference
    column     a column of the comparison table beside the headline metric, when present
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str = "fraction"
    direction: str = "higher"
    signed: bool = False
    column: bool = False


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("accuracy", "accuracy"),
    Metric("macro_f1", "macro-F1", column=True),
    Metric("invalid_rate", "invalid answers", direction="lower", column=True),
    Metric("normalized_match", "match"),
    Metric("exact_match", "exact match"),
    Metric("rougeL", "ROUGE-L"),
    Metric("pass@1", "pass@1"),
    Metric("timeouts", "timeouts", unit="count", direction="lower"),
    Metric("no_number_rate", "no number", direction="lower", column=True),
    Metric("pass_rate", "pass rate"),
    Metric("test_loss", "test loss", unit="number", direction="lower"),
    Metric("test_perplexity", "perplexity", unit="number", direction="lower"),
    Metric("loss", "loss", unit="number", direction="lower"),
    Metric("perplexity", "perplexity", unit="number", direction="lower"),
    Metric("token_accuracy", "token accuracy"),
    Metric("trained_tokens", "trained tokens", unit="count", direction="neither"),
    Metric("max_length", "max length", unit="tokens", direction="neither"),
    Metric("normalized_accuracy", "per-token accuracy"),
    Metric("margin", "mean margin", unit="logprob", signed=True),
    Metric("chosen_logp", "chosen log-prob", unit="logprob", direction="neither"),
    Metric("rejected_logp", "rejected log-prob", unit="logprob", direction="neither"),
    Metric("ties", "ties", unit="count", direction="neither"),
    Metric("judge_score", "judge score"),
    Metric("judge_mean", "mean grade", unit="grade", column=True),
    Metric("ungraded_rate", "ungraded", direction="lower", column=True),
    Metric("ungraded", "ungraded answers", unit="count", direction="lower"),
    Metric("win_rate", "win rate"),
)}


def metric(key: str) -> Metric:
    """A key's entry; a key the table does not know reads as its words, a number."""
    return METRICS.get(key) or Metric(key, key.replace("_", " "), unit="number",
                                      direction="neither")


def metric_name(key: str) -> str:
    return metric(key).label


def is_fraction(key: str) -> bool:
    return metric(key).unit == "fraction"


def format_value(key: str, value: Any) -> str:
    """A value as the tables show it: 62.5%, +1.3000, 3.50, 12."""
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-" if value is None else str(value)
    m = metric(key)
    if m.unit == "fraction":
        return f"{100 * value:.1f}%"
    if m.unit in ("count", "tokens"):
        return f"{value:,.0f}"
    if m.unit == "grade":
        return f"{value:.2f}"
    return f"{value:+.4f}" if m.signed else f"{value:.4f}"


def table() -> list[dict[str, Any]]:
    """The table as the API serves it."""
    return [asdict(m) for m in METRICS.values()]
