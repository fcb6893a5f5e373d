"""Run a task on a loaded model: generate the answers (batched, greedy, stopped at the
end-of-turn token, capped by what the task needs), score each one, aggregate, and measure what
each request costs (prompt and generated tokens, latency, requests/s on this machine).

Scored examples are appended to the predictions file batch by batch, so a crash keeps what was
already scored; one answer that a task cannot score is recorded with its error, and the run
goes on.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.conversation import Conversation, read_conversations
from tunelab.errors import TunelabError
from tunelab.evaluate.tasks import Example, Task, examples_from

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
    """Test examples: a conversations file (the final assistant turn is the reference), or for
    the code task HumanEval's problems (or a JSONL of problems in HumanEval's format)."""
    if task_name == "code":
        from tunelab.evaluate.sandbox import humaneval_problems
        problems = humaneval_problems() if data is None else _read_problems(Path(data))
        problems = problems[:limit] if limit else problems
        return [Example(p["task_id"], [{"role": "user",
                                        "content": CODE_INSTRUCTION.format(prompt=p["prompt"])}],
                        p.get("canonical_solution", ""), p) for p in problems]
    if data is None:
        raise TunelabError("--data is required (a JSONL of conversations)", field="data")
    convs = read_conversations(data)
    return examples_from(convs[:limit] if limit else convs)


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
             predictions_file: str | Path | None = None, batch_size: int = 16,
             max_new_tokens: int | None = None, progress: Callable[[int], None] | None = None,
             ) -> RunResult:
    """Generate and score. `prompts` replaces each example's messages (few-shot, a system
    prompt); the reference and the scoring stay the example's."""
    from tunelab.inference import generate_completions
    if not task.generates:
        raise TunelabError("the loss task generates nothing: use loss_metrics", field="task")
    if not examples:
        raise TunelabError("no examples to evaluate")
    prompts = list(prompts) if prompts is not None else [e.messages for e in examples]
    cap = max_new_tokens or task.max_new_tokens(list(examples), tokenizer)
    scored: list[dict[str, Any] | None] = [None] * len(examples)
    sink = _PredictionsFile(predictions_file)
    errors = 0

    def on_batch(indices: list[int], completions) -> None:
        nonlocal errors
        rows = []
        for i, c in zip(indices, completions):
            ex = examples[i]
            try:
                s = task.score(c.text, ex)
            except Exception as e:   # one unscorable answer must not lose the others
                errors += 1
                s = {**task.unscorable(ex), "error": f"{type(e).__name__}: {e}"}
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
    return RunResult(
        name=name, model=model_name, task=task.describe(), metrics=task.aggregate(done),
        examples=n,
        prompt_tokens=sum(c.prompt_tokens for c in completions) / n,
        completion_tokens=sum(c.completion_tokens for c in completions) / n,
        latency_s=sum(c.seconds for c in completions) / n,
        requests_per_s=n / seconds if seconds > 0 else math.inf,
        capped=capped, seconds=round(seconds, 2), warnings=warnings, scored=done)


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
             batch_size: int = 16, max_new_tokens: int | None = None,
             predictions_file: str | Path | None = None, progress=None, name: str = "",
             model_name: str = "") -> RunResult:
    """Evaluate a loaded model on test data with a task (`tunelab eval`'s library call).

    The loss (per trained token, with `max_length`, default DEFAULT_MAX_LENGTH) is added to the
    metrics of any task on conversation data unless `with_loss=False`.
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
    if not task_obj.generates:
        started = time.perf_counter()
        metrics = loss_metrics(model, tokenizer, examples_as_conversations(examples),
                               max_length=max_length, batch_size=max(1, batch_size // 2))
        return RunResult(name=name, model=model_name, task=task_obj.describe(), metrics=metrics,
                         examples=len(examples), prompt_tokens=0.0, completion_tokens=0.0,
                         latency_s=0.0, requests_per_s=0.0, capped=0,
                         seconds=round(time.perf_counter() - started, 2))
    result = run_task(model, tokenizer, task_obj, examples, name=name, model_name=model_name,
                      predictions_file=predictions_file, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, progress=progress)
    if with_loss and task_obj.name != "code":
        loss = loss_metrics(model, tokenizer, examples_as_conversations(examples),
                            max_length=max_length, batch_size=max(1, batch_size // 2))
        result.metrics.update(test_loss=loss["loss"], test_perplexity=loss["perplexity"])
    return result
