"""`tunelab data validate`: can this file be trained on, and what will training see?

One streaming pass: every line is checked against the conversation contract (collecting every
problem, not stopping at the first), exact and near duplicates are found by hashing, and the
valid conversations are rendered in batches with the model's own template (tunelab.data.render,
the same code training uses) for token statistics: lengths, what max_length cuts, trained vs
context tokens. Memory is a few hashes and two ints per example.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.conversation import problems
from tunelab.data.io import iter_jsonl_lenient
from tunelab.data.render import HistoryRewriteError, per_turn, render_many
from tunelab.errors import TunelabError

MIN_EXAMPLES = 10        # fewer is an error: nothing can be learned or measured
FEW_EXAMPLES = 50        # fewer is a warning
SAMPLES = 5              # lines shown per error kind
BATCH = 1024             # conversations per render/tokenize call

ERROR_LABELS = {
    "not_json": "not JSON",
    "bad_encoding": "not UTF-8",
    "line_too_long": "line too long",
    "not_object": "not an object",
    "missing_messages": "missing messages",
    "unknown_role": "unknown role",
    "missing_content": "missing content",
    "empty_content": "empty content",
    "bad_weight": "bad weight",
    "no_assistant": "no assistant turn",
    "assistant_not_last": "assistant not last",
    "consecutive_roles": "consecutive same roles (the template forbids them)",
    "template_refused": "refused by the chat template",
    "mask_ambiguous": "no unambiguous loss mask with this template",
    "duplicate": "duplicate examples",
    "too_few_examples": "too few examples",
}
# Near-duplicate = same words: case, punctuation and spacing ignored. Cheap enough for 100k
# examples in one pass (MinHash would also catch reworded copies, at many times the cost).
# str.translate + split is ~5x faster than a regex substitution over the same text.
_PUNCT = str.maketrans({c: " " for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"})


def _canonical(messages: list[dict[str, Any]]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=12).digest()


def _norm_parts(messages: Sequence[dict[str, Any]]) -> list[str]:
    return [f"{m.get('role')}:{' '.join(str(m.get('content', '')).lower().translate(_PUNCT).split())}"
            for m in messages]


def _normalized(messages: Sequence[dict[str, Any]]) -> str:
    return "\x1f".join(_norm_parts(messages))


def _prompt_key(messages: Sequence[dict[str, Any]], parts: list[str] | None = None) -> bytes | None:
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        return None
    parts = parts if parts is not None else _norm_parts(messages)
    return _digest("\x1f".join(parts[:-1]))


@dataclass
class ValidationReport:
    file: str
    examples: int = 0
    valid: int = 0
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tokens: dict[str, Any] | None = None

    @property
    def trainable(self) -> bool:
        return not self.errors

    def add_error(self, kind: str, message: str) -> None:
        e = self.errors.setdefault(kind, {"label": ERROR_LABELS.get(kind, kind), "count": 0,
                                          "first": []})
        e["count"] += 1
        if len(e["first"]) < SAMPLES:
            e["first"].append(message)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "trainable": self.trainable, "examples": self.examples,
                "valid": self.valid, "errors": self.errors, "warnings": self.warnings,
                "tokens": self.tokens}

    def format(self) -> str:
        out = [f"file       {self.file}",
               f"examples   {self.examples:,} ({self.valid:,} valid)"]
        if self.errors:
            out.append("errors")
            for e in self.errors.values():
                out.append(f"  {e['label']}: {e['count']:,}")
                out += [f"    {m}" for m in e["first"]]
        t = self.tokens
        if t:
            out.append(f"tokens     (template of {t['model']}, max length {t['max_length']:,})")
            if t["examples"]:
                out.append(f"  per example      min {t['min']:,}  median {t['median']:,}  "
                           f"p95 {t['p95']:,}  max {t['max']:,}")
                out.append(f"  over max length  {t['over_max_length']:,} examples would be cut, "
                           f"losing {t['trained_tokens_lost']:,} trained tokens")
                share = t["trained_tokens"] / max(1, t["total_tokens"])
                out.append(f"  trained          {t['trained_tokens']:,} of {t['total_tokens']:,} "
                           f"tokens ({share:.1%}); context {t['context_tokens']:,}")
                out.append(f"  training         ~{round(t['epoch_tokens'] * t['epochs']):,} tokens for "
                           f"{t['epochs']:g} epochs "
                           f"({round(t['epoch_trained_tokens'] * t['epochs']):,} trained)")
                if t["rows"] != t["examples"]:
                    out.append(f"  rows             {t['rows']:,} (conversations the template "
                               "rewrites are trained one turn per row)")
        if self.warnings:
            out.append("warnings")
            out += [f"  - {w}" for w in self.warnings]
        n_err = sum(e["count"] for e in self.errors.values())
        out.append("result     " + ("trainable" if self.trainable else
                                    f"NOT trainable ({n_err:,} errors)"))
        return "\n".join(out)


def _has_consecutive_roles(messages: Sequence[dict[str, Any]]) -> bool:
    roles = [m["role"] for m in messages]
    return any(a == b for a, b in zip(roles, roles[1:]))


class _TokenStats:
    def __init__(self, max_length: int):
        self.max_length = max_length
        self.lengths: list[int] = []
        self.trained = self.lost = self.over = self.kept = self.kept_trained = 0
        self.examples = 0

    def add(self, row: dict[str, list[int]]) -> None:
        labels = row["labels"]
        n = len(labels)
        trained = n - labels.count(-100)   # C-speed counts: no per-token Python loop
        self.lengths.append(n)
        self.trained += trained
        if n > self.max_length:
            tail = labels[self.max_length:]
            lost = len(tail) - tail.count(-100)
            self.over += 1
            self.lost += lost
            trained -= lost
        self.kept += min(n, self.max_length)
        self.kept_trained += trained

    def summary(self, model: str, epochs: float) -> dict[str, Any]:
        ls = sorted(self.lengths)
        total = sum(ls)
        pick = lambda q: ls[min(len(ls) - 1, math.ceil(q * len(ls)) - 1)] if ls else 0  # noqa: E731
        return {"model": model, "max_length": self.max_length, "examples": self.examples,
                "rows": len(ls), "min": ls[0] if ls else 0, "median": pick(0.5),
                "p95": pick(0.95), "max": ls[-1] if ls else 0, "total_tokens": total,
                "trained_tokens": self.trained, "context_tokens": total - self.trained,
                "over_max_length": self.over, "trained_tokens_lost": self.lost,
                "epochs": epochs, "epoch_tokens": self.kept,
                "epoch_trained_tokens": self.kept_trained, "histogram": _histogram(ls)}


def _histogram(lengths: list[int], bins: int = 20) -> dict[str, list]:
    """Tokens per example in equal-width bins: counts[i] examples in [edges[i], edges[i+1])."""
    import numpy as np
    if not lengths:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(lengths, bins=min(bins, max(1, lengths[-1] - lengths[0])))
    return {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}


def _keys_of(path: Path) -> tuple[set[bytes], set[bytes], set[bytes]]:
    """Exact, normalized and prompt keys of another split (bad lines are that file's business)."""
    exact, near, prompts = set(), set(), set()
    for _, obj in iter_jsonl_lenient(path):
        if isinstance(obj, dict) and isinstance(obj.get("messages"), list) and \
                all(isinstance(m, dict) for m in obj["messages"]):
            msgs = obj["messages"]
            exact.add(_digest(_canonical(msgs)))
            near.add(_digest(_normalized(msgs)))
            pk = _prompt_key(msgs)
            if pk:
                prompts.add(pk)
    return exact, near, prompts


def validate_file(path: str | Path, *, tokenizer=None, model: str = "", max_length: int = 1024,
                  epochs: float = 3, others: Sequence[str | Path] = (),
                  progress: Callable[[int], None] | None = None) -> ValidationReport:
    """Validate a chat JSONL file; `others` are validation/test files checked for leakage.

    With a tokenizer, valid conversations are rendered with its template for token statistics,
    and template refusals / ambiguous masks are errors too.
    """
    path = Path(path)
    report = ValidationReport(file=str(path))
    stats = _TokenStats(max_length) if tokenizer is not None else None
    exact: dict[bytes, int] = {}
    near: dict[bytes, int] = {}
    answers: dict[bytes, bytes] = {}
    conflicting: set[bytes] = set()
    near_dups: list[str] = []
    batch: list[tuple[int, list[dict[str, Any]]]] = []

    def where(line: int) -> str:
        return f"{path}:{line}"

    def flush() -> None:
        if not batch:
            return
        convs = [m for _, m in batch]
        rows = render_many(convs, tokenizer, sources=[where(n) for n, _ in batch], errors="return")
        for (line, msgs), row in zip(batch, rows):
            if isinstance(row, HistoryRewriteError):
                turns = per_turn(msgs)
                row = render_many(turns, tokenizer, sources=[where(line)] * len(turns),
                                  errors="return")
                bad = next((r for r in row if isinstance(r, TunelabError)), None)
                if bad is None:
                    stats.examples += 1
                    report.valid += 1
                    for r in row:
                        stats.add(r)
                    continue
                row = bad
            if isinstance(row, TunelabError):
                if "refused" in row.reason:
                    kind = "consecutive_roles" if _has_consecutive_roles(msgs) else "template_refused"
                else:
                    kind = "mask_ambiguous"
                report.add_error(kind, str(row))
                continue
            stats.examples += 1
            report.valid += 1
            stats.add(row)
        if progress:
            progress(len(batch))
        batch.clear()

    for line, obj in iter_jsonl_lenient(path):
        report.examples += 1
        if isinstance(obj, TunelabError):
            kind = ("bad_encoding" if "UTF-8" in obj.reason else
                    "line_too_long" if "longer than" in obj.reason else "not_json")
            report.add_error(kind, str(obj))
            continue
        found = problems(obj)
        if found:
            for kind in dict.fromkeys(p.kind for p in found):   # each kind once per record
                p = next(p for p in found if p.kind == kind)
                report.add_error(kind, str(TunelabError(p.message, file=path, line=line,
                                                        field=p.field)))
            continue
        msgs = [{k: v for k, v in m.items() if k in ("role", "content", "weight")}
                for m in obj["messages"]]
        key = _digest(_canonical(msgs))
        if key in exact:
            report.add_error("duplicate", f"{where(line)}: same conversation as line {exact[key]}")
            continue
        exact[key] = line
        parts = _norm_parts(msgs)   # once per example: full, prompt and answer keys share it
        nkey = _digest("\x1f".join(parts))
        if nkey in near:
            near_dups.append(f"line {line} ~ line {near[nkey]}")
        else:
            near[nkey] = line
        pk = _prompt_key(msgs, parts)
        if pk is not None:
            ans = _digest(parts[-1])
            if answers.setdefault(pk, ans) != ans:
                conflicting.add(pk)
        if msgs[-1]["role"] != "assistant":
            report.add_error("assistant_not_last", f"{where(line)}: field 'messages': the last "
                             f"message is {msgs[-1]['role']!r}; a trailing turn after the last "
                             "answer is never trained")
            continue
        if stats is None:
            report.valid += 1
            continue
        batch.append((line, msgs))
        if len(batch) >= BATCH:
            flush()
    if stats is not None:
        flush()
        report.tokens = stats.summary(model or getattr(tokenizer, "name_or_path", ""), epochs)

    if report.examples < MIN_EXAMPLES:
        report.add_error("too_few_examples", f"{path}: {report.examples} examples; at least "
                         f"{MIN_EXAMPLES} are needed (50+ for a useful fine-tune)")
    elif report.examples < FEW_EXAMPLES:
        report.warnings.append(f"only {report.examples} examples: fine-tuning usually needs at "
                               f"least {FEW_EXAMPLES}, often hundreds")
    if near_dups:
        report.warnings.append(f"{len(near_dups)} near-duplicates (same text up to case, "
                               f"punctuation and spacing): {', '.join(near_dups[:SAMPLES])}")
    if conflicting:
        report.warnings.append(f"{len(conflicting)} prompts appear with different answers "
                               "(contradictory labels?)")
    for other in others:
        o_exact, o_near, o_prompts = _keys_of(Path(other))
        n_exact = sum(1 for k in exact if k in o_exact)
        n_near = sum(1 for k in near if k in o_near) - n_exact
        n_prompt = sum(1 for k in answers if k in o_prompts)
        if n_exact or n_near or n_prompt:
            report.warnings.append(
                f"leakage into {other}: {n_exact} identical examples, {max(0, n_near)} "
                f"near-identical, {n_prompt} shared prompts")
    return report
