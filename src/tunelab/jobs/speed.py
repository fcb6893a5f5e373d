"""How fast this server trains, for time estimates: from the jobs it finished.

Each succeeded job records its own speed (the median tokens/s of its logged steps) and the
tokens it trained. One job run while the machine was busy (8 tok/s against 190 quiet, seen
here) once made the median of three jobs, and every estimate, 20x too long. So:

- a job counts in proportion to the tokens it trained (a long run measures its speed better
  than a 6-step one);
- a job more than OUTLIER times slower or faster than the token-weighted median is left out,
  but only when the jobs that agree hold most of the tokens (with two jobs that disagree, there
  is no telling which one is off: both stay, and the range says so);
- the estimate is the token-weighted geometric mean of the jobs kept, with their lowest and
  highest speed as its range.
"""
from __future__ import annotations

import math
from typing import Any

from tunelab.jobs.store import Job, Store

OUTLIER = 3.0    # x slower or faster than the typical job: a machine that was busy (or idle)


def _weighted_median(values: list[float], weights: list[float]) -> float:
    order = sorted(range(len(values)), key=values.__getitem__)
    half, seen = sum(weights) / 2, 0.0
    for i in order:
        seen += weights[i]
        if seen >= half:
            return values[i]
    return values[order[-1]]


def estimate(speeds: list[float], tokens: list[float]) -> dict[str, Any]:
    """{tokens_per_second, low, high, jobs, used, left_out} from each job's speed and the
    tokens it trained (a job without a count weighs as the median job)."""
    known = [t for t in tokens if t and t > 0]
    fill = sorted(known)[len(known) // 2] if known else 1.0
    weights = [t if t and t > 0 else fill for t in tokens]
    logs = [math.log(s) for s in speeds]
    typical = _weighted_median(logs, weights)
    near = [i for i, x in enumerate(logs) if abs(x - typical) <= math.log(OUTLIER)]
    if sum(weights[i] for i in near) <= sum(weights) / 2:
        near = list(range(len(speeds)))    # no majority agrees: keep all, show the spread
    w = [weights[i] for i in near]
    value = math.exp(sum(weights[i] * logs[i] for i in near) / sum(w))
    kept = [speeds[i] for i in near]
    return {"tokens_per_second": round(value, 1), "low": round(min(kept), 1),
            "high": round(max(kept), 1), "jobs": len(speeds), "used": len(near),
            "left_out": len(speeds) - len(near)}


def training_speeds(store: Store, recent: int = 20) -> dict[str, dict[str, Any]]:
    """Training tokens/s on this server by base model, from its `recent` latest succeeded
    jobs (estimate()). Machine facts, not anyone's data."""
    jobs, _ = store.page(Job, Job.kind == "fine_tune", Job.status == "succeeded",
                         limit=recent * 5)
    seen: dict[str, tuple[list[float], list[float]]] = {}
    for job in jobs:
        tps = (job.progress or {}).get("tokens_per_s")
        base = (job.request or {}).get("base_model") or job.model   # a fine-tune's root base
        speeds, tokens = seen.setdefault(base, ([], []))
        if tps and tps > 0 and len(speeds) < recent:
            speeds.append(float(tps))
            tokens.append(float(job.trained_tokens or 0))
    return {model: estimate(s, t) for model, (s, t) in seen.items() if s}
