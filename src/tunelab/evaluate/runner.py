"""Run a task on a loaded model: generate the answers (batched, greedy, stopped at the
end-of-turn token, capped by what the task needs), score each one, aggregate, and measure what
each request costs (prompt and generated tokens, latency, requests/s on this machine).

A log-probability task (preference pairs) is answered by the model's log-probabilities of the
given answers instead of by generation (`score_logprobs`): the same scoring, aggregation,
predictions file and RunResult, so `tunelab eval` and `tunelab compare` treat it like any task.

Scored examples are appended to the predictions file batch by batch, so a crash keeps what was
already scored; one answer that a task cannot score is recorded with its error, and the run
goes on.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.conversation import Conversation, read_conversations
from tunelab.errors import TunelabError
from tunelab.evaluate.tasks import (AnswerLogps, Example, PairExample, Task, examples_from,
                                    pair_examples)

CODE_INSTRUCTION = ("Complete the following Python function. Answer with the whole function in a "
                    "```python code block.\n\n```python\n{prompt}```")


@dataclass
class RunResult:
    name: str                      # what was measured: "fine-tuned", "base 5-shot", ...
    model: str
    task: dict[str, Any]           # Task.describe()
    metrics: dict[str, Any]
    examples: int
    prompt_tokens: float           # per request, mean
    completion_tokens: float       # per request, mean (up to the end-of-turn token)
    latency_s: float               # per request, mean: the wall time of its batch
    requests_per_s: float          # on this machine, batched
    capped: int                    # answers cut by max_new_tokens without an end-of-turn token
    seconds: float
    warnings: list[str] = field(default_factory=list)
    scored: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def primary(self) -> float:
        return float(self.metrics.get(self.task["primary"], math.nan))

    def to_json(self, with_scored: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_scored:
            out.pop("scored")
        out["primary"] = self.primary
        return out


def load_examples(task_name: str, data: str | Path | None, *,
                  limit: int | None = None) -> list[Example]:
    """Test examples: a conversations file (the final assistant turn is the reference), a file of
    preference pairs (the preference task, or auto on such a file), or for the code task
    HumanEval's problems (or a JSONL of problems in HumanEval's format)."""
    if task_name == "code":
        from tunelab.evaluate.sandbox import humaneval_problems
        problems = humaneval_problems() if data is None else _read_problems(Path(data))
        problems = problems[:limit] if limit else problems
        return [Example(p["task_id"], [{"role": "user",
                                        "content": CODE_INSTRUCTION.format(prompt=p["prompt"])}],
                        p.get("canonical_solution", ""), p) for p in problems]
    if data is None:
        raise TunelabError("--data is required (a JSONL of conversations or preference "
                           "pairs)", field="data")
    pairs_file = task_name == "preference" or holds_preferences(data)
    if pairs_file and task_name in ("preference", "auto", ""):
        from tunelab.data.preference import read_preferences
        pairs = read_preferences(data)
        return pair_examples(pairs[:limit] if limit else pairs)
    if pairs_file:
        raise TunelabError(f"holds preference pairs, not conversations: the {task_name} task "
                           "scores conversations (score pairs with --task preference)",
                           file=data, field="task")
    convs = read_conversations(data)
    return examples_from(convs[:limit] if limit else convs)


def holds_preferences(path: str | Path) -> bool:
    """Whether a JSONL file's first rows are preference pairs. A file that cannot be read says
    False: reading it for real then reports what is wrong, with its line."""
    from tunelab.data.io import iter_jsonl_lenient
    from tunelab.data.preference import DETECT_ROWS, detect_kind
    try:
        head = [v for _, v in itertools.islice(iter_jsonl_lenient(path), DETECT_ROWS)
                if not isinstance(v, TunelabError)]
    except TunelabError:
        return False
    return detect_kind(head)[0] == "preferences"


def _read_problems(path: Path) -> list[dict]:
    from tunelab.data.io import iter_jsonl
    out = []
    for line, obj in iter_jsonl(path):
        missing = [k for k in ("task_id", "prompt", "test", "entry_point")
                   if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise TunelabError("the code task reads HumanEval-style problems (task_id, prompt, "
                               "test, entry_point)", file=path, line=line, field=missing[0])
        out.append(obj)
    if not out:
        raise TunelabError("no examples (the file is empty)", file=path)
    return out


def run_task(model, tokenizer, task: Task, examples: Sequence[Example], *,
             name: str = "", model_name: str = "",
             prompts: Sequence[list[dict[str, Any]]] | None = None,
             predictions_file: str | Path | None = None, batch_size: int | None = None,
             max_new_tokens: int | None = None, max_length: int | None = None,
             progress: Callable[[int], None] | None = None) -> RunResult:
    """Answer and score: generate, or for a log-probability task score the given answers
    (`score_logprobs`, with `max_length` tokens per answer). `prompts` replaces each example's
    messages (few-shot, a system prompt); the reference and the scoring stay the example's.
    `batch_size` None: generation's from its cache budget, 16 pairs for log-probabilities."""
    from tunelab.inference import generate_completions
    if task.answers_by == "loss":
        raise TunelabError("the loss task generates nothing: use loss_metrics", field="task")
    if not examples:
        raise TunelabError("no examples to evaluate")
    if task.answers_by == "logprobs":
        return score_logprobs(model, tokenizer, task, examples, name=name,
                              model_name=model_name, prompts=prompts,
                              predictions_file=predictions_file, batch_size=batch_size or 16,
                              max_length=max_length, progress=progress)
    prompts = list(prompts) if prompts is not None else [e.messages for e in examples]
    cap = max_new_tokens or task.max_new_tokens(list(examples), tokenizer)
    scored: list[dict[str, Any] | None] = [None] * len(examples)
    sink = _PredictionsFile(predictions_file)
    errors = 0

    def on_batch(indices: list[int], completions) -> None:
        nonlocal errors
        rows = []
        scores = task.score_batch([c.text for c in completions], [examples[i] for i in indices])
        for i, c, s in zip(indices, completions, scores):
            ex = examples[i]
            if isinstance(s, Exception):   # one unscorable answer must not lose the others
                errors += 1
                s = {**task.unscorable(ex), "error": f"{type(s).__name__}: {s}"}
            row = {"index": i, "id": ex.id, "prompt": ex.messages[-1]["content"],
                   "reference": ex.reference, "prediction": c.text, **s,
                   "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                   "stopped": c.stopped}
            scored[i] = row
            rows.append(row)
        sink.append(rows)

    started = time.perf_counter()
    try:
        completions = generate_completions(model, tokenizer, prompts, max_new_tokens=cap,
                                           batch_size=batch_size, progress=progress,
                                           on_batch=on_batch)
    finally:
        sink.close()
    seconds = time.perf_counter() - started
    done = [s for s in scored if s is not None]
    n = len(done)
    capped = sum(not c.stopped for c in completions)
    warnings = []
    if capped:
        warnings.append(f"{capped} of {n} answers reached max_new_tokens={cap} without the "
                        "end-of-turn token (cut there and scored as they were)")
    if errors:
        warnings.append(f"{errors} answers could not be scored (recorded with their error)")
    warnings += task.notes(done)
    return RunResult(
        name=name, model=model_name, task=task.describe(), metrics=task.aggregate(done),
        examples=n,
        prompt_tokens=sum(c.prompt_tokens for c in completions) / n,
        completion_tokens=sum(c.completion_tokens for c in completions) / n,
        latency_s=sum(c.seconds for c in completions) / n,
        requests_per_s=n / seconds if seconds > 0 else math.inf,
        capped=capped, seconds=round(seconds, 2), warnings=warnings, scored=done)


def score_logprobs(model, tokenizer, task: Task, examples: Sequence[Example], *,
                   name: str = "", model_name: str = "",
                   prompts: Sequence[list[dict[str, Any]]] | None = None,
                   predictions_file: str | Path | None = None, batch_size: int = 16,
                   max_length: int | None = None,
                   progress: Callable[[int], None] | None = None) -> RunResult:
    """Score preference pairs by the model's log-probabilities: each pair's chosen and rejected
    answers are rendered exactly as DPO trains them (tunelab.objectives.dpo.render_pairs: the
    answer's tokens and its end-of-turn token), batched by length, and the summed
    log-probability of each answer's trained tokens is taken without gradients, in the
    precision the model was loaded in (tunelab.batching.sequence_logps). Answers longer than
    `max_length` (default DEFAULT_MAX_LENGTH) are cut there, counted and reported."""
    import torch

    from tunelab.batching import sequence_logps
    from tunelab.config import DEFAULT_MAX_LENGTH
    from tunelab.data.preference import PreferencePair
    from tunelab.objectives.dpo import pad_pairs, render_pairs
    max_length = max_length or DEFAULT_MAX_LENGTH
    prompts = list(prompts) if prompts is not None else [e.messages for e in examples]
    for e in examples:
        if not isinstance(e, PairExample):
            raise e.error(f"the {task.name} task scores preference pairs (prompt, chosen, "
                          "rejected), not conversations", "task")
    pairs = [PreferencePair(p, e.reference, e.rejected, source=e.id)
             for e, p in zip(examples, prompts)]
    rows = render_pairs(pairs, tokenizer, max_length=None)
    cut = [i for i, r in enumerate(rows) if max(len(r["chosen_input_ids"]),
                                                 len(r["rejected_input_ids"])) > max_length]
    for i in cut:   # render_pairs says which pair has nothing left to score once cut
        rows[i] = render_pairs([pairs[i]], tokenizer, max_length=max_length)[0]
    order = sorted(range(len(rows)), key=lambda i: max(len(rows[i]["chosen_input_ids"]),
                                                      len(rows[i]["rejected_input_ids"])))
    scored: list[dict[str, Any] | None] = [None] * len(examples)
    latency = [0.0] * len(examples)
    sink = _PredictionsFile(predictions_file)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        for b in range(0, len(order), batch_size):
            indices = order[b:b + batch_size]
            t0 = time.perf_counter()
            batch = pad_pairs([rows[i] for i in indices], tokenizer.pad_token_id)
            with torch.inference_mode():
                logps, counts = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
            logps, counts = logps.float().cpu().tolist(), counts.cpu().tolist()
            seconds = time.perf_counter() - t0
            n, out = len(indices), []
            for j, i in enumerate(indices):
                ex, row = examples[i], rows[i]
                s = task.score(AnswerLogps(logps[j], logps[n + j], counts[j], counts[n + j]), ex)
                prompt_tokens = len(row["chosen_input_ids"]) - counts[j]
                scored[i] = {"index": i, "id": ex.id, "prompt": prompts[i][-1]["content"],
                             "chosen": ex.reference, "rejected": ex.rejected, **s,
                             "prompt_tokens": prompt_tokens, "cut": i in cut}
                latency[i] = seconds
                out.append(scored[i])
            sink.append(sorted(out, key=lambda r: r["index"]))
            if progress:
                progress(n)
    finally:
        sink.close()
        model.train(was_training)
    seconds = time.perf_counter() - started
    done = [s for s in scored if s is not None]
    n = len(done)
    warnings = [f"{len(cut)} of {n} pairs have an answer cut at max_length={max_length} tokens "
                "(scored on what was left)"] if cut else []
    return RunResult(
        name=name, model=model_name, task=task.describe(), metrics=task.aggregate(done),
        examples=n, prompt_tokens=sum(s["prompt_tokens"] for s in done) / n,
        completion_tokens=0.0, latency_s=sum(latency) / n,
        requests_per_s=n / seconds if seconds > 0 else math.inf, capped=0,
        seconds=round(seconds, 2), warnings=warnings, scored=done)


class _PredictionsFile:
    """Scored examples appended as JSON lines, flushed batch by batch."""

    def __init__(self, path: str | Path | None):
        self.f = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, "w", encoding="utf-8")

    def append(self, rows: list[dict[str, Any]]) -> None:
        if self.f is not None:
            self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def loss_metrics(model, tokenizer, conversations: Sequence[Conversation], *,
                 max_length: int, batch_size: int = 8) -> dict[str, Any]:
    """Test loss per trained token, perplexity and token accuracy: the tokens training
    supervises, rendered and batched exactly as in training (tunelab.batching)."""
    from tunelab.batching import rows_loss
    from tunelab.data.render import render_examples
    rows = render_examples([c.messages for c in conversations], tokenizer,
                           max_length=max_length, sources=[c.source for c in conversations])
    total, count, correct = rows_loss(model, rows, tokenizer.pad_token_id, batch_size=batch_size)
    if count == 0:
        raise TunelabError(f"no trained tokens left after truncation to max_length={max_length}",
                           field="max_length")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "token_accuracy": correct / count, "trained_tokens": count,
            "max_length": max_length}


def examples_as_conversations(examples: Sequence[Example]) -> list[Conversation]:
    return [Conversation(e.messages + [{"role": "assistant", "content": e.reference}],
                         source=e.id) for e in examples]


def evaluate(model, tokenizer, data: str | Path | Sequence[Conversation] | Sequence[Example], *,
             task: str | Task = "auto", labels: list[str] | None = None,
             with_loss: bool = True, max_length: int | None = None, limit: int | None = None,
             batch_size: int | None = None, max_new_tokens: int | None = None,
             predictions_file: str | Path | None = None, progress=None, name: str = "",
             model_name: str = "") -> RunResult:
    """Evaluate a loaded model on test data with a task (`tunelab eval`'s library call).

    The loss (per trained token, with `max_length`, default DEFAULT_MAX_LENGTH) is added to the
    metrics of any task on conversation data unless `with_loss=False`; preference pairs are
    scored with the same `max_length` per answer.
    """
    from tunelab.config import DEFAULT_MAX_LENGTH
    from tunelab.evaluate.tasks import make_task
    task_name = task if isinstance(task, str) else task.name
    if isinstance(data, (str, Path)) or data is None:
        examples = load_examples(task_name, data, limit=limit)
    else:
        items = list(data)[:limit] if limit else list(data)
        examples = examples_from(items) if items and isinstance(items[0], Conversation) else items
    task_obj = make_task(task, examples, labels=labels) if isinstance(task, str) else task
    max_length = max_length or DEFAULT_MAX_LENGTH
    # scoring a whole conversation holds its activations, not a cache: half a generation batch
    loss_batch = max(1, batch_size // 2) if batch_size else 8
    if task_obj.answers_by == "loss":
        started = time.perf_counter()
        metrics = loss_metrics(model, tokenizer, examples_as_conversations(examples),
                               max_length=max_length, batch_size=loss_batch)
        return RunResult(name=name, model=model_name, task=task_obj.describe(), metrics=metrics,
                         examples=len(examples), prompt_tokens=0.0, completion_tokens=0.0,
                         latency_s=0.0, requests_per_s=0.0, capped=0,
                         seconds=round(time.perf_counter() - started, 2))
    result = run_task(model, tokenizer, task_obj, examples, name=name, model_name=model_name,
                      predictions_file=predictions_file, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, max_length=max_length, progress=progress)
    if with_loss and task_obj.generates and task_obj.name != "code":
        loss = loss_metrics(model, tokenizer, examples_as_conversations(examples),
                            max_length=max_length, batch_size=loss_batch)
        result.metrics.update(test_loss=loss["loss"], test_perplexity=loss["perplexity"])
    return result
