"""What each option of a comparison costs, and after how many requests fine-tuning pays back.

A request is priced either by its measured tokens (a hosted model's price per million input
and output tokens) or by the serving machine's time (its price per hour over the measured
requests per second, batched as in the comparison). The fine-tuning run costs its measured
training time (result.json's `seconds`) times the training machine's price per hour.

Break-even: the tuned model saves (baseline - tuned) per request; its training cost is paid
back after training cost / saving requests. It never pays back when it saves nothing.

Defaults (override them: prices change, and your own are what matter):
- tokens: USD 0.15 per million input and 0.60 per million output tokens, OpenAI's list price
  for gpt-4o-mini (openai.com/api/pricing, 2024-07), a common cheap hosted model;
- training machine: USD 1.006 per hour, AWS g5.xlarge (one A10G GPU) on demand in us-east-1
  (aws.amazon.com/ec2/pricing/on-demand, 2024).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_INPUT_PER_MTOK = 0.15
DEFAULT_OUTPUT_PER_MTOK = 0.60
DEFAULT_TRAIN_PER_HOUR = 1.006


@dataclass(frozen=True)
class Prices:
    input_per_mtok: float = DEFAULT_INPUT_PER_MTOK
    output_per_mtok: float = DEFAULT_OUTPUT_PER_MTOK
    per_hour: float | None = None          # the serving machine: replaces token prices
    train_per_hour: float = DEFAULT_TRAIN_PER_HOUR

    def __post_init__(self):
        from tunelab.errors import TunelabError
        for name, v in asdict(self).items():
            if v is not None and (not math.isfinite(v) or v < 0):
                raise TunelabError(f"a price must be a number >= 0 (got {v})", field=name)

    @property
    def basis(self) -> str:
        if self.per_hour is not None:
            return f"serving machine at ${self.per_hour:g}/hour"
        return (f"${self.input_per_mtok:g} per M input tokens, "
                f"${self.output_per_mtok:g} per M output tokens")


def cost_per_1k(prompt_tokens: float, completion_tokens: float, requests_per_s: float,
                prices: Prices) -> float:
    """USD per 1,000 requests of one option."""
    if prices.per_hour is not None:
        if requests_per_s <= 0:
            return math.inf
        return 1000 * prices.per_hour / 3600 / requests_per_s
    return 1000 * (prompt_tokens * prices.input_per_mtok
                   + completion_tokens * prices.output_per_mtok) / 1e6


def training_seconds(run_dir: str | Path | None) -> float | None:
    """The measured training time of a run folder (result.json), or None when unknown."""
    if run_dir is None:
        return None
    f = Path(run_dir) / "result.json"
    try:
        seconds = json.loads(f.read_text(encoding="utf-8")).get("seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) else None


def training_cost(seconds: float | None, prices: Prices) -> float | None:
    return None if seconds is None else seconds / 3600 * prices.train_per_hour


def break_even(train_cost: float | None, tuned_per_1k: float, baseline_per_1k: float
               ) -> float | None:
    """Requests after which the training cost is paid back by the per-request saving against a
    baseline; math.inf when the tuned model saves nothing; None when training cost is unknown."""
    if train_cost is None:
        return None
    saving = (baseline_per_1k - tuned_per_1k) / 1000
    if saving <= 0:
        return 0.0 if train_cost == 0 and saving == 0 else math.inf
    return train_cost / saving


def about(n: float) -> str:
    """~3,100: two significant figures, with thousands separators."""
    if n < 100:
        return f"~{math.ceil(n):,}"
    digits = int(math.floor(math.log10(n))) - 1
    return f"~{int(round(n, -digits)):,}"


def payback_phrase(requests: float | None, against: str) -> str | None:
    if requests is None:
        return None
    if math.isinf(requests):
        return (f"never pays back its training against {against} (it costs as much or more "
                "per request)")
    return f"pays back its training after {about(requests)} requests against {against}"


def money(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"${x:.4f}" if x < 0.01 else f"${x:.3f}" if x < 1 else f"${x:,.2f}"


def row_costs(rows: list, prices: Prices) -> dict[str, float]:
    return {r.name: cost_per_1k(r.prompt_tokens, r.completion_tokens, r.requests_per_s, prices)
            for r in rows}


def cost_summary(rows: list, prices: Prices, train_seconds: float | None, best_tuned: str,
                 best_baseline: str | None, baselines: list[str] | None = None
                 ) -> dict[str, Any]:
    """Every row's cost per 1,000 requests; the training cost; the break-even against the best
    baseline and against each baseline."""
    per_1k = row_costs(rows, prices)
    train = training_cost(train_seconds, prices)
    tuned = per_1k[best_tuned]
    against = {r.name: break_even(train, tuned, per_1k[r.name]) for r in rows
               if r.name != best_tuned and (baselines is None or r.name in baselines)}
    best = against.get(best_baseline) if best_baseline else None
    finite = lambda x: None if x is None or math.isinf(x) else x     # JSON has no Infinity
    return {"basis": prices.basis, "prices": asdict(prices),
            "per_1k_requests": {k: finite(v) for k, v in per_1k.items()},
            "train_seconds": train_seconds, "train_cost": train,
            "against": best_baseline,
            "break_even_requests": finite(best),
            "pays_back": None if best is None else not math.isinf(best),
            "break_even_by_row": {k: finite(v) for k, v in against.items()}}
