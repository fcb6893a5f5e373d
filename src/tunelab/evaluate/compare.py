"""Is fine-tuning worth it? The fine-tuned model against the cheaper alternative on the same
test split: the same base model prompted zero-shot, with a system prompt, and with K examples
from the training file in the prompt; quality (the task's metric) and cost per request (prompt
and generated tokens, latency, requests/s), then a general check of what the fine-tune forgot.

Several fine-tuned models (base -> SFT -> SFT+DPO) are measured side by side: each gets its row,
its forgetting check and, with held-out preference pairs, its preference accuracy and margin
(the `preference` task) beside the base model's; the verdict names the best of them against the
best prompting setup.

Few-shot examples come from the training file only, never from the test file: a training
example whose prompt also appears in the test file is skipped, and a test guards this.
"""
from __future__ import annotations

import gc
import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.io import atomic_write
from tunelab.errors import TunelabError
from tunelab.evaluate.cost import Prices, training_seconds
from tunelab.evaluate.judge import JudgeConfig
from tunelab.evaluate.report import write_report
from tunelab.evaluate.retrieval import (prompt_key, rag_system, read_corpus, retrieve_passages,
                                        retrieve_shots, retrieved_examples_name,
                                        retrieved_passages_name)
from tunelab.evaluate.runner import RunResult, load_examples, run_task
from tunelab.evaluate.tasks import (Classification, Example, PairExample, Task, examples_from,
                                    label_order_key, make_task, normalize_answer)
from tunelab.evaluate.verdict import TUNED, render_verdict, verdict, verdict_fields

__all__ = ["compare", "Comparison", "TunedModel", "verdict", "choose_shots", "with_shots",
           "with_system", "few_shot_name", "ZERO_SHOT", "SYSTEM", "TUNED", "BASE"]

ZERO_SHOT, SYSTEM = "base zero-shot", "base + system prompt"
BASE = "base"       # the base model itself: its preference row and its forgetting check


def few_shot_name(k: int) -> str:
    return f"base {k}-shot"


@dataclass(frozen=True)
class TunedModel:
    """One fine-tuned model of a comparison and what tunelab knows of how it was trained."""
    name: str                      # its rows' name: "fine-tuned" when it is the only one
    model: str                     # the spec it was loaded from
    base: str | None               # the base model its training started from, followed back
                                   # through tunelab runs (SFT+DPO -> SFT -> base)
    run_dir: str | None            # its training run (loss curves)
    train_file: str | None         # what its own run trained on
    max_length: int | None         # tokens per example it was trained with


@dataclass
class Comparison:
    task: dict[str, Any]
    base: str
    tuned: str                           # the best fine-tuned model (what the verdict is about)
    test_file: str
    train_file: str | None
    rows: list[RunResult]
    verdict: str
    few_shot: list[Example] = field(default_factory=list)
    forgetting: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    run_dir: str | None = None           # the best tuned model's training run (loss curves)
    report_html: str | None = None
    report_md: str | None = None
    tuned_models: list[TunedModel] = field(default_factory=list)   # in row order
    verdict_detail: dict[str, Any] = field(default_factory=dict)    # the verdict, as fields
    preference: list[RunResult] = field(default_factory=list)       # base, then each tuned
    preference_file: str | None = None
    retrieval: dict[str, Any] | None = None    # k, source (train file or corpus), what
    cost: dict[str, Any] | None = None         # cost.cost_summary
    judge: dict[str, Any] | None = None        # the grader (JudgeConfig.describe), judge task
    pairwise: dict[str, Any] | None = None     # the grader's best tuned vs best baseline
    pairwise_pairs: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def row(self, name: str) -> RunResult | None:
        return next((r for r in self.rows if r.name == name), None)

    @property
    def tuned_names(self) -> list[str]:
        return [t.name for t in self.tuned_models] or [TUNED]

    def preference_of(self, row_name: str) -> RunResult | None:
        """The preference result of the model a row is answered by: the base model's for its
        zero-shot row (pairs are scored as they are, without a system prompt or shots), each
        fine-tuned model's for its row, none for the prompted baselines."""
        who = BASE if row_name == ZERO_SHOT else row_name
        return next((r for r in self.preference if r.name == who), None)

    def to_json(self) -> dict[str, Any]:
        preference = None
        if self.preference:
            preference = {"file": self.preference_file, "pairs": self.preference[0].examples,
                          "task": self.preference[0].task,
                          "rows": [r.to_json() for r in self.preference]}
        return {"task": self.task["task"], "primary_metric": self.task["primary"],
                "task_details": self.task, "base": self.base, "tuned": self.tuned,
                "test_file": self.test_file, "train_file": self.train_file,
                "verdict": self.verdict, "rows": [r.to_json() for r in self.rows],
                "few_shot_ids": [e.id for e in self.few_shot], "forgetting": self.forgetting,
                "warnings": self.warnings, "run_dir": self.run_dir,
                "report_html": self.report_html, "report_md": self.report_md,
                "tuned_models": [asdict(t) for t in self.tuned_models],
                "verdict_detail": self.verdict_detail, "preference": preference,
                "retrieval": self.retrieval, "cost": self.cost, "judge": self.judge,
                "pairwise": self.pairwise}


# -- prompts ----------------------------------------------------------------------------------

_prompt_key = prompt_key


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


def _file_check(run, model, tok, examples: list[Example], who: str,
                max_length: int) -> dict[str, Any]:
    """--general FILE: loss and exact match of any conversation file."""
    from tunelab.evaluate.runner import examples_as_conversations, loss_metrics
    from tunelab.evaluate.tasks import ExactMatch
    loss = loss_metrics(model, tok, examples_as_conversations(examples), max_length=max_length)
    em = run(model, tok, f"general file {who}", who, on=examples, t=ExactMatch())
    return {"loss": loss["loss"], **em.metrics}


# -- the comparison ---------------------------------------------------------------------------

def parse_tuned(specs: str | Sequence[str]) -> list[tuple[str | None, str]]:
    """`--tuned` values -> (name or None, spec). `NAME=SPEC` names a model's rows (`sft=runs/sft`);
    a value that is an existing path, or whose part before '=' holds a '/', is a plain spec."""
    out = []
    for value in [specs] if isinstance(specs, str) else list(specs):
        name, sep, spec = str(value).partition("=")
        if sep and name.strip() and spec and "/" not in name and not Path(value).exists():
            out.append((name.strip(), spec))
        else:
            out.append((None, str(value)))
    if not out:
        raise TunelabError("no fine-tuned model to compare (give --tuned)", field="tuned")
    return out


def _lineage(spec: str) -> list:
    """How a model came to be, newest first: its run's provenance, then that of the model the
    run started from, ... up to a model tunelab did not fine-tune (SFT+DPO -> SFT -> base)."""
    from tunelab import models
    out, seen = [], {str(spec)}
    known = models.trained_with(spec)
    while known.base is not None or known.run_dir is not None:
        out.append(known)
        if known.base is None or known.base in seen:
            break
        seen.add(known.base)
        known = models.trained_with(known.base)
    return out


def _derived_name(spec: str, run_dir: Path | None) -> str:
    path = Path(spec)
    if path.name.startswith("checkpoint-") and run_dir is not None:
        return f"{run_dir.name} {path.name}"
    if run_dir is not None:
        return run_dir.name
    if path.name in ("model", "adapter") and path.parent.name:
        return path.parent.name
    return path.name or spec


def _reserved(name: str) -> bool:
    return name in (BASE, ZERO_SHOT, SYSTEM) or bool(
        re.fullmatch(r"base \d+-shot|base \+ \d+ retrieved (examples|passages)", name))


def tuned_models(specs: str | Sequence[str]) -> tuple[list[TunedModel], list[list]]:
    """The fine-tuned models of a comparison, named for their rows, with their lineages. One
    unnamed model is "fine-tuned" (as it always was); several are named by `NAME=` or by their
    run folders."""
    parsed = parse_tuned(specs)
    lineages = [_lineage(spec) for _, spec in parsed]
    names = []
    for (given, spec), lineage in zip(parsed, lineages):
        if given is not None:
            if _reserved(given) or given in names:
                raise TunelabError(f"the name '{given}' is taken (by the base model's rows or "
                                   "another --tuned): name each fine-tuned model differently",
                                   field="tuned")
            names.append(given)
            continue
        if len(parsed) == 1:
            names.append(TUNED)
            continue
        name = _derived_name(spec, lineage[0].run_dir if lineage else None)
        name = f"fine-tuned {name}" if _reserved(name) else name
        k, unique = 2, name
        while unique in names or unique in [g for g, _ in parsed if g]:
            unique, k = f"{name} ({k})", k + 1
        names.append(unique)
    tuned = [TunedModel(name=name, model=spec,
                        base=lineage[-1].base if lineage else None,
                        run_dir=str(lineage[0].run_dir) if lineage and lineage[0].run_dir
                        else None,
                        train_file=lineage[0].train_file if lineage else None,
                        max_length=lineage[0].max_length if lineage else None)
             for name, (_, spec), lineage in zip(names, parsed, lineages)]
    return tuned, lineages


def _base_of(tuned: list[TunedModel]) -> str:
    for t in tuned:
        if not t.base:
            raise TunelabError(f"cannot tell which base model '{t.model}' was fine-tuned from (it "
                               "is not a tunelab run, model or adapter folder): give --base",
                               field="base")
    bases = {t.base for t in tuned}
    if len(bases) > 1:
        each = ", ".join(f"{t.name} from {t.base}" for t in tuned)
        raise TunelabError(f"the fine-tuned models start from different base models ({each}): "
                           "give --base", field="base")
    return bases.pop()


def _shots_file(lineages: list[list]) -> str | None:
    """The training conversations few-shot examples come from: the first training file of the
    fine-tuned models and the runs they started from that holds conversations (a DPO run
    trained on preference pairs; the SFT run it started from on conversations)."""
    from tunelab.evaluate.runner import holds_preferences
    for lineage in lineages:
        for known in lineage:
            if known.train_file is None:
                continue
            if not Path(known.train_file).is_file() or not holds_preferences(known.train_file):
                return known.train_file
    return None


def compare(*, base: str | None, tuned: str | Sequence[str], data: str | Path,
            out_dir: str | Path, task: str = "auto", train: str | Path | None = None,
            few_shot: int = 5, system: str | None = None, general: str | Path | None = None,
            general_check: bool = True, labels: list[str] | None = None,
            preference: str | Path | None = None, limit: int | None = None,
            batch_size: int | None = None, precision: str = "auto",
            retrieval: int = 0, corpus: str | Path | None = None,
            prices: Prices | None = None, judge: JudgeConfig | None = None,
            progress_factory=None) -> Comparison:
    """Run every row on the same test split, check forgetting, write the report.
    `tuned`: one model spec, or several (`NAME=SPEC` names one's rows), measured in order.
    `preference`: held-out preference pairs, scored for the base and each tuned model.
    `progress_factory(name, total)` returns a bar (update, close) for each setup, or None.
    `precision`: the weights' dtype for every model ('auto': bf16 where the hardware has it).
    `retrieval`: K > 0 adds the base model with, per request, the K nearest training examples
    as shots (BM25 over the user turn), or with `corpus` the K nearest passages of those
    documents in its system prompt.
    `prices`: what requests and training cost (default: cost.Prices()'s documented defaults).
    `judge`: the grader of the `judge` task (its URL is asked once before anything runs); with
    `judge.pairwise`, it also compares the best fine-tuned model's answers with the best
    baseline's, both orders of each pair (predictions/pairwise.jsonl)."""
    from tunelab import models
    from tunelab.config import DEFAULT_MAX_LENGTH
    from tunelab.data.conversation import read_conversations
    from tunelab.runtime import set_threads, torch_dtype

    tuned_list, lineages = tuned_models(tuned)
    base = base or _base_of(tuned_list)
    train = train if train is not None else _shots_file(lineages)
    if train is not None and not Path(train).is_file():
        raise TunelabError("file not found", file=train, field="train")
    if task == "preference":
        raise TunelabError("compare scores generated answers to the test conversations: give "
                           "held-out preference pairs as --preference", field="task")
    examples = load_examples(task, data, limit=limit)
    if any(isinstance(e, PairExample) for e in examples):
        raise TunelabError("holds preference pairs: compare answers test conversations; give "
                           "held-out pairs as --preference", file=data, field="data")
    task_obj = make_task(task, examples, labels=labels, judge=judge)
    if not task_obj.generates:
        raise TunelabError(f"compare scores generated answers: choose a task other than "
                           f"{task_obj.name}", field="task")
    pref_examples = load_examples("preference", preference, limit=limit) if preference else []
    pref_task = make_task("preference", pref_examples) if pref_examples else None
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
    if retrieval < 0:
        raise TunelabError("--retrieval is a number of examples >= 0", field="retrieval")
    if corpus is not None and retrieval <= 0:
        raise TunelabError("--corpus needs --retrieval K (passages per request)",
                           field="retrieval")
    retrieved_prompts = None
    retrieval_info = None
    if retrieval > 0 and corpus is not None:
        passages = read_corpus(corpus)
        found = retrieve_passages(passages, examples, retrieval)
        retrieved_prompts = [with_system(e, rag_system(p, system))
                             for e, p in zip(examples, found)]
        retrieval_info = {"k": retrieval, "kind": "passages", "source": str(corpus),
                          "name": retrieved_passages_name(retrieval),
                          "passages": len(passages)}
    elif retrieval > 0:
        if train is None:
            raise TunelabError("--retrieval retrieves training examples: give --train (or "
                               "--corpus)", field="train")
        found = retrieve_shots(examples_from(read_conversations(train)), examples, retrieval)
        retrieved_prompts = [with_shots(e, s, system) for e, s in zip(examples, found)]
        got = min(len(s) for s in found) if found else 0
        if got < retrieval:
            warnings.append(f"only {got} training examples could be retrieved per request "
                            f"(asked for {retrieval})")
        retrieval_info = {"k": retrieval, "kind": "examples", "source": str(train),
                          "name": retrieved_examples_name(retrieval),
                          "ids": [[x.id for x in s] for s in found]}
    general_set = general_examples() if general_check else None
    general_file = examples_from(read_conversations(general)) if general else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_threads()
    # one max_length for every model, so that each scores the same tokens
    max_length = max((t.max_length for t in tuned_list if t.max_length),
                     default=DEFAULT_MAX_LENGTH)

    def run(model, tok, name, model_name, prompts=None, on=examples, t=task_obj, what=None):
        """One setup: `name` is its row's name; `what` (default: the name) its progress bar's
        and its predictions file's."""
        what = what or name
        slug = re.sub(r"[^a-z0-9]+", "-", what.lower()).strip("-")[:60]
        bar = progress_factory(what, len(on)) if progress_factory else None
        try:
            return run_task(model, tok, t, on, name=name, model_name=model_name,
                            prompts=prompts, batch_size=batch_size, max_length=max_length,
                            predictions_file=out / "predictions" / f"{slug}.jsonl",
                            progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()

    rows: list[RunResult] = []
    general_runs: dict[str, RunResult] = {}
    file_losses: dict[str, dict] = {}
    pref_rows: list[RunResult] = []

    def checks(model, tok, who: str, spec: str) -> None:
        """What every model answers besides the test split: forgetting and preference pairs."""
        if general_set:
            general_runs[who] = run(model, tok, f"general {who}", spec, on=general_set[0],
                                    t=general_set[1])
        if general_file:
            file_losses[who] = _file_check(run, model, tok, general_file, who, max_length)
        if pref_task:
            pref_rows.append(run(model, tok, who, spec, on=pref_examples, t=pref_task,
                                 what=f"preference {who}"))

    dtype = torch_dtype(precision)
    model, tok = models.load(base, dtype=dtype)
    rows.append(run(model, tok, ZERO_SHOT, base))
    if system:
        rows.append(run(model, tok, SYSTEM, base, [with_system(e, system) for e in examples]))
    if shots:
        rows.append(run(model, tok, few_shot_name(len(shots)), base,
                        [with_shots(e, shots, system) for e in examples]))
    if retrieved_prompts is not None:
        rows.append(run(model, tok, retrieval_info["name"], base, retrieved_prompts))
    checks(model, tok, BASE, base)
    del model
    gc.collect()

    for t in tuned_list:
        model, tok = models.load(t.model, dtype=dtype)
        rows.append(run(model, tok, t.name, t.model))
        checks(model, tok, t.name, t.model)
        del model
        gc.collect()

    for r in rows:
        warnings += [f"{r.name}: {w}" for w in r.warnings]
    for r in pref_rows:
        warnings += [f"preference {r.name}: {w}" for w in r.warnings]
    prices = prices or Prices()
    detail = verdict_fields(rows, task_obj.label, [t.name for t in tuned_list], prices=prices,
                            train_seconds={t.name: training_seconds(t.run_dir)
                                           for t in tuned_list})
    pairs: list[dict[str, Any]] = []
    if judge is not None and judge.pairwise and detail["best_baseline"]:
        detail["pairwise"], pairs = pairwise_rows(
            task_obj.grader, examples, next(r for r in rows if r.name == detail["best_tuned"]),
            next(r for r in rows if r.name == detail["best_baseline"]),
            out / "predictions" / "pairwise.jsonl", progress_factory)
    sentence = render_verdict(detail)
    best = next(t for t in tuned_list if t.name == detail["best_tuned"])
    forgetting = None
    if general_runs or file_losses:
        forgetting = {}
        if general_runs:
            forgetting["general"] = forgetting_summary(general_runs[BASE], general_runs[best.name])
        if file_losses:
            forgetting["file"] = {"name": str(general), "base": file_losses[BASE],
                                  "tuned": file_losses[best.name]}
        forgetting["models"] = [
            {"name": t.name, "model": t.model,
             "general": forgetting_summary(general_runs[BASE], general_runs[t.name])
             if general_runs else None, "file": file_losses.get(t.name)} for t in tuned_list]
    result = Comparison(task=task_obj.describe(), base=base, tuned=best.model,
                        test_file=str(data), train_file=str(train) if train else None,
                        rows=rows, verdict=sentence, few_shot=shots, forgetting=forgetting,
                        warnings=warnings, run_dir=best.run_dir, tuned_models=tuned_list,
                        verdict_detail=detail, preference=pref_rows,
                        preference_file=str(preference) if preference else None,
                        retrieval=retrieval_info, cost=detail.get("cost"),
                        judge=judge.describe() if judge is not None else None,
                        pairwise=detail["pairwise"], pairwise_pairs=pairs)
    write_report(result, out)
    return result


def pairwise_rows(grader, examples: list[Example], tuned: RunResult, baseline: RunResult,
                  predictions_file: Path, progress_factory=None
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The grader's pairwise comparison of two rows' answers to the same examples (a: the tuned
    row, b: the baseline): the win rate of a with its interval, and each pair (its outcome and
    both orders' replies), also written to `predictions_file`."""
    from tunelab.evaluate.judge import conversation_text, win_rate
    a = {s["index"]: s for s in tuned.scored}
    b = {s["index"]: s for s in baseline.scored}
    shared = [i for i in range(len(examples)) if i in a and i in b]
    items = [(conversation_text(examples[i].messages), examples[i].reference,
              a[i]["prediction"], b[i]["prediction"]) for i in shared]
    bar = progress_factory(f"pairwise {tuned.name} vs {baseline.name}", 2 * len(items)) \
        if progress_factory else None
    try:
        judged = grader.pairwise(items, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    names = {"a": tuned.name, "b": baseline.name, "tie": "tie", "ungraded": None}
    pairs = [{"index": i, "id": examples[i].id, "prompt": examples[i].messages[-1]["content"],
              "reference": examples[i].reference, "a": tuned.name, "b": baseline.name,
              "answer_a": a[i]["prediction"], "answer_b": b[i]["prediction"],
              "outcome": j["outcome"], "winner": names[j["outcome"]], "asked": j["asked"]}
             for i, j in zip(shared, judged)]
    predictions_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(predictions_file) as f:
        f.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    summary = {"a": tuned.name, "b": baseline.name,
               **win_rate([p["outcome"] for p in pairs]),
               "file": f"predictions/{predictions_file.name}"}
    return summary, pairs
