"""Is fine-tuning worth it? The fine-tuned model against the cheaper alternative on the same
test split: the same base model prompted zero-shot, with a system prompt, and with K examples
from the training file in the prompt; quality (the task's metric) and cost per request (prompt
and generated tokens, latency, requests/s), then a general check of what the fine-tune forgot.

Few-shot examples come from the training file only, never from the test file: a training
example whose prompt also appears in the test file is skipped, and a test guards this.
"""
from __future__ import annotations

import gc
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluate.runner import RunResult, load_examples, run_task
from tunelab.evaluate.tasks import (Classification, Example, Task, examples_from,
                                    label_order_key, make_task, normalize_answer)

ZERO_SHOT, SYSTEM, TUNED = "base zero-shot", "base + system prompt", "fine-tuned"


def few_shot_name(k: int) -> str:
    return f"base {k}-shot"


@dataclass
class Comparison:
    task: dict[str, Any]
    base: str
    tuned: str
    test_file: str
    train_file: str | None
    rows: list[RunResult]
    verdict: str
    few_shot: list[Example] = field(default_factory=list)
    forgetting: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    run_dir: str | None = None           # the tuned model's training run (loss curves)
    report_html: str | None = None
    report_md: str | None = None

    def row(self, name: str) -> RunResult | None:
        return next((r for r in self.rows if r.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task["task"], "primary_metric": self.task["primary"],
                "task_details": self.task, "base": self.base, "tuned": self.tuned,
                "test_file": self.test_file, "train_file": self.train_file,
                "verdict": self.verdict, "rows": [r.to_json() for r in self.rows],
                "few_shot_ids": [e.id for e in self.few_shot], "forgetting": self.forgetting,
                "warnings": self.warnings, "run_dir": self.run_dir,
                "report_html": self.report_html, "report_md": self.report_md}


# -- prompts ----------------------------------------------------------------------------------

def _prompt_key(messages: list[dict[str, Any]]) -> str:
    return normalize_answer(" ".join(m["content"] for m in messages if m["role"] != "system"))


def choose_shots(train: list[Example], test: list[Example], k: int, task: Task, *,
                 seed: int = 0) -> list[Example]:
    """K training examples, deterministic for a seed; for classification, balanced across the
    labels (round-robin over them). Examples whose prompt is also in the test set are skipped."""
    test_keys = {_prompt_key(e.messages) for e in test}
    pool = [e for e in train if _prompt_key(e.messages) not in test_keys]
    rng = random.Random(seed)
    rng.shuffle(pool)
    if not isinstance(task, Classification):
        return pool[:k]
    by_label: dict[str, list[Example]] = defaultdict(list)
    for e in pool:
        by_label[normalize_answer(e.reference)].append(e)
    order = [l for l in task.labels if by_label[l]] + \
        sorted(l for l in by_label if l not in task.labels)
    shots: list[Example] = []
    while len(shots) < k and any(by_label[l] for l in order):
        for label in order:
            if by_label[label] and len(shots) < k:
                shots.append(by_label[label].pop())
    # Not grouped by label (the last shot's label would bias the answer), and not in label
    # order: a 135M model shown 1, 2, 3, 4, 5 answered "6" to every review (measured).
    for _ in range(20):
        rng.shuffle(shots)
        keys = [label_order_key(normalize_answer(s.reference)) for s in shots]
        if len(set(keys)) < 3 or (keys != sorted(keys) and keys != sorted(keys, reverse=True)):
            break
    return shots


def with_shots(example: Example, shots: list[Example], system: str | None = None
               ) -> list[dict[str, Any]]:
    """The chat prompt: [system], then each shot as a user turn and its answer, then the test
    example's own messages. That is how a chat model is prompted few-shot, in its template."""
    own_system = [m for m in example.messages if m["role"] == "system"]
    rest = [m for m in example.messages if m["role"] != "system"]
    head = [{"role": "system", "content": system}] if system else own_system
    turns: list[dict[str, Any]] = []
    for s in shots:
        turns += [m for m in s.messages if m["role"] != "system"]
        turns.append({"role": "assistant", "content": s.reference})
    return head + turns + rest


def with_system(example: Example, system: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}] + \
        [m for m in example.messages if m["role"] != "system"]


# -- the verdict -------------------------------------------------------------------------------

def verdict(rows: list[RunResult], task: dict[str, Any], label: str) -> str:
    tuned = next(r for r in rows if r.name == TUNED)
    baselines = [r for r in rows if r.name != TUNED]
    if not baselines:
        return f"fine-tuned: {100 * tuned.primary:.1f}% {label}"
    best = max(baselines, key=lambda r: (r.primary, -r.prompt_tokens))
    points = 100 * (tuned.primary - best.primary)
    ratio = tuned.prompt_tokens / best.prompt_tokens if best.prompt_tokens else 1.0
    tokens = (f"{100 * (1 - ratio):.0f}% fewer" if ratio < 0.995 else
              f"{100 * (ratio - 1):.0f}% more" if ratio > 1.005 else "the same number of")
    cost = f"with {tokens} prompt tokens per request"
    if abs(points) < 1.0:
        return (f"fine-tuned: on par with {best.name} ({points:+.1f} points {label}), {cost}")
    if points > 0:
        return f"fine-tuned: {points:+.1f} points {label} over {best.name}, {cost}"
    return (f"prompting wins: fine-tuned is {points:+.1f} points {label} behind {best.name}, "
            f"{cost}")


# -- the general check (forgetting) -----------------------------------------------------------

class GeneralCheck(Task):
    """General prompts with checkable answers (tunelab.evaluate.general): facts, arithmetic,
    formatting instructions, short rewriting."""
    name, primary, label = "general", "pass_rate", "pass rate"

    def __init__(self, cap: int):
        self.cap = cap

    def max_new_tokens(self, examples, tokenizer):
        return self.cap

    def score(self, prediction, example):
        from tunelab.evaluate.general import check_answer
        return {"score": float(check_answer(example.meta["check"], prediction)),
                "category": example.meta["category"]}

    def unscorable(self, example):
        return {"score": 0.0, "category": example.meta["category"]}

    def aggregate(self, scored):
        by: dict[str, list[float]] = defaultdict(list)
        for s in scored:
            by[s["category"]].append(s["score"])
        return {"pass_rate": sum(s["score"] for s in scored) / max(1, len(scored)),
                "by_category": {c: sum(v) / len(v) for c, v in sorted(by.items())}}


def general_examples() -> tuple[list[Example], GeneralCheck]:
    from tunelab.evaluate.general import load_general_items, max_new_tokens_for
    items = load_general_items()
    examples = [Example(it.id, it.messages, "", {"check": it.check, "category": it.category})
                for it in items]
    return examples, GeneralCheck(max_new_tokens_for(items))


def forgetting_summary(base: RunResult, tuned: RunResult, *, examples: int = 4) -> dict[str, Any]:
    b = {s["id"]: s for s in base.scored}
    lost, gained = [], []
    for t in tuned.scored:
        s = b.get(t["id"])
        if s is None or s["score"] == t["score"]:
            continue
        entry = {"id": t["id"], "category": t.get("category"), "prompt": t["prompt"],
                 "base": s["prediction"], "tuned": t["prediction"]}
        (lost if s["score"] > t["score"] else gained).append(entry)
    delta = 100 * (tuned.primary - base.primary)
    return {"items": tuned.examples, "base": base.primary, "tuned": tuned.primary,
            "delta_points": delta,
            "by_category": {c: {"base": base.metrics["by_category"].get(c),
                                "tuned": v} for c, v in tuned.metrics["by_category"].items()},
            "lost": len(lost), "gained": len(gained),
            "lost_examples": lost[:examples], "gained_examples": gained[:examples]}


def forgetting_line(f: dict[str, Any]) -> str:
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


def _file_check(run, model, tok, examples: list[Example], who: str,
                max_length: int) -> dict[str, Any]:
    """--general FILE: loss and exact match of any conversation file."""
    from tunelab.evaluate.runner import examples_as_conversations, loss_metrics
    from tunelab.evaluate.tasks import ExactMatch
    loss = loss_metrics(model, tok, examples_as_conversations(examples), max_length=max_length)
    em = run(model, tok, f"general file {who}", who, on=examples, t=ExactMatch())
    return {"loss": loss["loss"], **em.metrics}


# -- the comparison ---------------------------------------------------------------------------

def compare(*, base: str | None, tuned: str, data: str | Path, out_dir: str | Path,
            task: str = "auto", train: str | Path | None = None, few_shot: int = 5,
            system: str | None = None, general: str | Path | None = None,
            general_check: bool = True, labels: list[str] | None = None,
            limit: int | None = None, batch_size: int = 16, precision: str = "auto",
            progress_factory=None) -> Comparison:
    """Run every row on the same test split, check forgetting, write the report.
    `progress_factory(name, total)` returns a bar (update, close) for each setup, or None.
    `precision`: the weights' dtype for every model ('auto': bf16 where the hardware has it)."""
    from tunelab import models
    from tunelab.config import DEFAULT_MAX_LENGTH
    from tunelab.data.conversation import read_conversations
    from tunelab.evaluate.report import write_report
    from tunelab.runtime import set_threads, torch_dtype

    provenance = models.trained_with(tuned)
    base = base or provenance.base
    if not base:
        raise TunelabError(f"cannot tell which base model '{tuned}' was fine-tuned from (it is "
                           "not a tunelab run, model or adapter folder): give --base",
                           field="base")
    train = train if train is not None else provenance.train_file
    if train is not None and not Path(train).is_file():
        raise TunelabError("file not found", file=train, field="train")
    examples = load_examples(task if task == "code" else "", data, limit=limit)
    task_obj = make_task(task, examples, labels=labels)
    if not task_obj.generates:
        raise TunelabError("compare scores generated answers: choose a task other than loss",
                           field="task")
    warnings: list[str] = []
    shots: list[Example] = []
    if train is not None and few_shot > 0:
        train_examples = examples_from(read_conversations(train))
        shots = choose_shots(train_examples, examples, few_shot, task_obj)
        if len(shots) < few_shot:
            warnings.append(f"only {len(shots)} training examples could be used as shots "
                            f"(asked for {few_shot})")
        if isinstance(task_obj, Classification):
            seen = {normalize_answer(e.reference) for e in train_examples}
            unseen = [l for l in task_obj.labels if l not in seen]
            if unseen:
                n = sum(normalize_answer(e.reference) in unseen for e in examples)
                warnings.append(f"{n} test examples have labels the training file never shows: "
                                f"{', '.join(unseen)}")
    general_set = general_examples() if general_check else None
    general_file = examples_from(read_conversations(general)) if general else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_threads()

    def run(model, tok, name, model_name, prompts=None, on=examples, t=task_obj):
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]
        bar = progress_factory(name, len(on)) if progress_factory else None
        try:
            return run_task(model, tok, t, on, name=name, model_name=model_name,
                            prompts=prompts, batch_size=batch_size,
                            predictions_file=out / "predictions" / f"{slug}.jsonl",
                            progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()

    rows: list[RunResult] = []
    general_runs: dict[str, RunResult] = {}
    file_losses: dict[str, dict] = {}
    max_length = provenance.max_length or DEFAULT_MAX_LENGTH

    dtype = torch_dtype(precision)
    model, tok = models.load(base, dtype=dtype)
    rows.append(run(model, tok, ZERO_SHOT, base))
    if system:
        rows.append(run(model, tok, SYSTEM, base, [with_system(e, system) for e in examples]))
    if shots:
        rows.append(run(model, tok, few_shot_name(len(shots)), base,
                        [with_shots(e, shots, system) for e in examples]))
    if general_set:
        general_runs["base"] = run(model, tok, "general base", base, on=general_set[0],
                                   t=general_set[1])
    if general_file:
        file_losses["base"] = _file_check(run, model, tok, general_file, "base", max_length)
    del model
    gc.collect()

    model, tok = models.load(tuned, dtype=dtype)
    rows.append(run(model, tok, TUNED, tuned))
    if general_set:
        general_runs["tuned"] = run(model, tok, "general fine-tuned", tuned, on=general_set[0],
                                    t=general_set[1])
    if general_file:
        file_losses["tuned"] = _file_check(run, model, tok, general_file, "fine-tuned",
                                           max_length)
    del model
    gc.collect()

    for r in rows:
        warnings += [f"{r.name}: {w}" for w in r.warnings]
    forgetting = None
    if general_runs or file_losses:
        forgetting = {}
        if general_runs:
            forgetting["general"] = forgetting_summary(general_runs["base"], general_runs["tuned"])
        if file_losses:
            forgetting["file"] = {"name": str(general), **file_losses}
    result = Comparison(task=task_obj.describe(), base=base, tuned=str(tuned), test_file=str(data),
                        train_file=str(train) if train else None, rows=rows,
                        verdict=verdict(rows, task_obj.describe(), task_obj.label),
                        few_shot=shots, forgetting=forgetting, warnings=warnings,
                        run_dir=str(provenance.run_dir) if provenance.run_dir else None)
    write_report(result, out)
    return result
