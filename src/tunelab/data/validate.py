"""`tunelab data validate`: can this file be trained on, and what will training see?

One streaming pass over a file of conversations (SFT) or of preference pairs (DPO; the kind is
read from the first rows): every line is checked against its contract (collecting every
problem, not stopping at the first), exact and near duplicates are found by hashing, and the
valid examples are rendered in batches with the model's own template (tunelab.data.render, the
same code training uses) for token statistics: lengths, what max_length cuts, trained vs
context tokens; for pairs also the prompt, chosen and rejected tokens. Memory is a few hashes
and a few ints per example.

What differs between the two kinds (the contract, the identity of an example, rendering) is
one small class each, `_Conversations` and `_Pairs`; the pass, the report and its statistics
are shared.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tunelab.data.conversation import Problem, problems
from tunelab.data.io import iter_jsonl_lenient
from tunelab.data.preference import (DETECT_ROWS, KIND_TITLES, REGISTRY as PREFERENCE_REGISTRY,
                                     PreferencePair, detect_kind, pair_problems, record_kind,
                                     shared_prompt_length)
from tunelab.data.render import HistoryRewriteError, per_turn, render_many, start_render
from tunelab.errors import TunelabError

MIN_EXAMPLES = 10        # fewer is an error: nothing can be learned or measured
FEW_EXAMPLES = 50        # fewer is a warning
SAMPLES = 5              # lines shown per error kind
DUPLICATE_LINES = 100    # (line, first line) pairs a report lists; the count is exact
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
    "too_few_examples": "too few examples",
    # a file that could not be read as rows of any format
    "unknown_format": "no known format (raw rows: apply a prompt template)",
    "unreadable": "unreadable",
    "conversion": "rows that do not convert",
    # preference pairs
    "not_preference": "not a preference pair",
    "missing_field": "missing field",
    "bad_json": "JSON text that does not parse",
    "bad_answer": "answer is not one assistant message",
    "prompt_not_user": "prompt does not end with a user turn",
    "no_shared_prompt": "answers share no prompt",
    "identical_pair": "chosen and rejected identical",
    "prompt_mismatch": "prompt tokens differ between the two answers",
}
# Near-duplicate = same words: case, punctuation and spacing ignored. Cheap enough for 100k
# examples in one pass (MinHash would also catch reworded copies, at many times the cost).
# str.translate + split is ~5x faster than a regex substitution over the same text.
_PUNCT = str.maketrans({c: " " for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"})
_NOUNS = {"conversations": "examples", "preferences": "pairs"}   # in counts: "60 pairs"


def _canonical(messages: Any) -> str:
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


def prompt_key(prompt: Sequence[dict[str, Any]]) -> bytes:
    """The identity of a prompt (its messages up to case, punctuation and spacing): the same
    for a preference pair's prompt and a conversation's turns before its last answer, so leakage
    checks and splits see one prompt whichever kind of file it is in."""
    return _digest(_normalized(prompt))


@dataclass
class ValidationReport:
    file: str
    examples: int = 0
    valid: int = 0
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # each warning as {"kind", "message", ...its data}: what a consumer switches on
    warning_details: list[dict[str, Any]] = field(default_factory=list)
    # exact duplicates: {"count", "lines": [[line, line of its first copy], ...], "dropped"}
    duplicates: dict[str, Any] | None = None
    tokens: dict[str, Any] | None = None
    kind: str = "conversations"        # or "preferences"
    preference_format: str | None = None   # for pairs: the file's format (openai_dpo, ...)

    @property
    def trainable(self) -> bool:
        return not self.errors

    def add_error(self, kind: str, message: str) -> None:
        e = self.errors.setdefault(kind, {"label": ERROR_LABELS.get(kind, kind), "count": 0,
                                          "first": []})
        e["count"] += 1
        if len(e["first"]) < SAMPLES:
            e["first"].append(message)

    def add_warning(self, kind: str, message: str, **data: Any) -> None:
        self.warnings.append(message)
        self.warning_details.append({"kind": kind, "message": message, **data})

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "trainable": self.trainable,
                "examples": self.examples, "valid": self.valid, "errors": self.errors,
                "warnings": self.warnings, "warning_details": self.warning_details,
                "duplicates": self.duplicates, "tokens": self.tokens,
                **({"format": self.preference_format} if self.preference_format else {})}

    def format(self) -> str:
        noun = _NOUNS[self.kind]
        out = [f"file       {self.file}",
               f"data       {KIND_TITLES[self.kind]}" + (f" ({self.preference_format})"
                                       if self.preference_format else ""),
               f"{noun:<10} {self.examples:,} ({self.valid:,} valid)"]
        if self.errors:
            out.append("errors")
            for e in self.errors.values():
                out.append(f"  {e['label']}: {e['count']:,}")
                out += [f"    {m}" for m in e["first"]]
        t = self.tokens
        if t:
            out.append(f"tokens     (template of {t['model']}, max length {t['max_length']:,})")
            if t["examples"]:
                out += _token_lines(t, noun)
        if self.warnings:
            out.append("warnings")
            out += [f"  - {w}" for w in self.warnings]
        n_err = sum(e["count"] for e in self.errors.values())
        out.append("result     " + ("trainable" if self.trainable else
                                    f"NOT trainable ({n_err:,} errors)"))
        return "\n".join(out)


def _spread(d: dict[str, Any]) -> str:
    return f"min {d['min']:,}  median {d['median']:,}  p95 {d['p95']:,}  max {d['max']:,}"


def _token_lines(t: dict[str, Any], noun: str) -> list[str]:
    per = noun[:-1]
    out = [f"  {'per ' + per:<16} {_spread(t)}"]
    if "sides" in t:
        out[0] += "  (the longer side)"
        names = {"prompt": "prompt", "chosen": "chosen answer", "rejected": "rejected answer"}
        out += [f"  {names.get(side, side):<16} {_spread(d)}  ({d['total']:,} in all)"
                for side, d in t["sides"].items()]
    out.append(f"  over max length  {t['over_max_length']:,} {noun} would be cut, "
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
    return out


def _has_consecutive_roles(messages: Sequence[dict[str, Any]]) -> bool:
    roles = [m["role"] for m in messages]
    return any(a == b for a, b in zip(roles, roles[1:]))


def _render_error_kind(e: TunelabError, messages: Sequence[dict[str, Any]]) -> str:
    """The report's kind of a rendering error, from the error's own kind (never its words): a
    refusal of a conversation whose roles repeat is about the roles; any other error that
    render raises is about the loss mask."""
    if e.kind == "template_refused":
        return "consecutive_roles" if _has_consecutive_roles(messages) else "template_refused"
    return "mask_ambiguous"


def _pick(ls: list[int], q: float) -> int:
    return ls[min(len(ls) - 1, math.ceil(q * len(ls)) - 1)] if ls else 0


def _spread_of(values: list[int]) -> dict[str, int]:
    ls = sorted(values)
    return {"min": ls[0] if ls else 0, "median": _pick(ls, 0.5), "p95": _pick(ls, 0.95),
            "max": ls[-1] if ls else 0, "total": sum(ls)}


class _TokenStats:
    """Token counts over rendered rows: one row per conversation (or per trained turn), or a
    chosen and a rejected row per pair. A pair's length is its longer side (what max_length
    cuts, and what a batch pads to); its tokens are both sides'."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.lengths: list[int] = []
        self.total = self.trained = self.lost = self.over = self.kept = self.kept_trained = 0
        self.examples = 0
        self.sides: dict[str, list[int]] | None = None

    def _side(self, row: dict[str, list[int]]) -> tuple[int, int, int, int]:
        """(tokens, trained, trained beyond max_length, kept tokens) of one row."""
        labels = row["labels"]
        n = len(labels)
        trained = n - labels.count(-100)   # C-speed counts: no per-token Python loop
        tail = labels[self.max_length:]
        lost = len(tail) - tail.count(-100)
        return n, trained, lost, min(n, self.max_length)

    def add(self, row: dict[str, list[int]]) -> None:
        self._count(self._side(row))

    def add_pair(self, chosen: dict[str, list[int]], rejected: dict[str, list[int]],
                 prompt_tokens: int) -> None:
        c, r = self._side(chosen), self._side(rejected)
        self._count(c, r)
        if self.sides is None:
            self.sides = {"prompt": [], "chosen": [], "rejected": []}
        self.sides["prompt"].append(prompt_tokens)
        self.sides["chosen"].append(c[1])
        self.sides["rejected"].append(r[1])

    def _count(self, *sides: tuple[int, int, int, int]) -> None:
        self.lengths.append(max(s[0] for s in sides))
        self.total += sum(s[0] for s in sides)
        self.trained += sum(s[1] for s in sides)
        lost = sum(s[2] for s in sides)
        if any(s[0] > self.max_length for s in sides):
            self.over += 1
            self.lost += lost
        self.kept += sum(s[3] for s in sides)
        self.kept_trained += sum(s[1] for s in sides) - lost

    def summary(self, model: str, epochs: float) -> dict[str, Any]:
        ls = sorted(self.lengths)
        out = {"model": model, "max_length": self.max_length, "examples": self.examples,
               "rows": len(ls), "min": ls[0] if ls else 0, "median": _pick(ls, 0.5),
               "p95": _pick(ls, 0.95), "max": ls[-1] if ls else 0, "total_tokens": self.total,
               "trained_tokens": self.trained, "context_tokens": self.total - self.trained,
               "over_max_length": self.over, "trained_tokens_lost": self.lost,
               "epochs": epochs, "epoch_tokens": self.kept,
               "epoch_trained_tokens": self.kept_trained, "histogram": _histogram(ls)}
        if self.sides is not None:
            # prompt: tokens before the answer; chosen / rejected: each answer's trained tokens
            # (its content and the end-of-turn token)
            out["sides"] = {side: _spread_of(v) for side, v in self.sides.items()}
        return out


def _histogram(lengths: list[int], bins: int = 20) -> dict[str, list]:
    """Tokens per example in equal-width bins: counts[i] examples in [edges[i], edges[i+1])."""
    import numpy as np
    if not lengths:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(lengths, bins=min(bins, max(1, lengths[-1] - lengths[0])))
    return {"edges": [round(float(e), 1) for e in edges], "counts": counts.tolist()}


class _Keys(NamedTuple):
    exact: bytes                        # the same example
    near: bytes                         # the same words
    prompt: bytes | None                # the same prompt
    claim: tuple[bytes, bytes] | None   # (what it is about, what it says): contradictions


def _conversation_keys(msgs: list[dict[str, Any]]) -> _Keys:
    parts = _norm_parts(msgs)   # once per example: full, prompt and answer keys share it
    pk = _prompt_key(msgs, parts)
    return _Keys(_digest(_canonical(msgs)), _digest("\x1f".join(parts)), pk,
                 (pk, _digest(parts[-1])) if pk is not None else None)


def _pair_keys(pair: PreferencePair) -> _Keys:
    parts = _norm_parts(pair.prompt)
    chosen, rejected = _norm_parts([{"role": "assistant", "content": a}
                                    for a in (pair.chosen, pair.rejected)])
    exact = _digest(_canonical({"prompt": pair.prompt, "chosen": pair.chosen,
                                "rejected": pair.rejected}))
    near = _digest("\x1f".join(["pair", *parts, chosen, rejected]))
    # the same two answers to the same prompt, preferred one way or the other
    claim = None if chosen == rejected else \
        (_digest("\x1f".join([*parts, *sorted((chosen, rejected))])),
         b"<" if chosen < rejected else b">")
    return _Keys(exact, near, _digest("\x1f".join(parts)), claim)


def _keys_of(path: Path) -> tuple[set[bytes], set[bytes], set[bytes]]:
    """Exact, normalized and prompt keys of another split, conversations or pairs (bad lines
    are that file's business)."""
    exact, near, prompts = set(), set(), set()
    for _, obj in iter_jsonl_lenient(path):
        keys = _record_keys(obj)
        if keys is not None:
            exact.add(keys.exact)
            near.add(keys.near)
            if keys.prompt:
                prompts.add(keys.prompt)
    return exact, near, prompts


class _Conversations:
    """SFT data: `{"messages": [...]}` per line."""
    kind, one = "conversations", "conversation"
    contradiction = "prompts appear with different answers (contradictory labels?)"

    def __init__(self, path: Path, report: ValidationReport):
        self.path, self.report = path, report

    def check(self, obj: Any, line: int) -> list[dict[str, Any]] | None:
        found = problems(obj)
        if found:
            _add_problems(self.report, found, self.path, line)
            return None
        return [{k: v for k, v in m.items() if k in ("role", "content", "weight")}
                for m in obj["messages"]]

    keys = staticmethod(_conversation_keys)

    def late_check(self, msgs: list[dict[str, Any]], line: int) -> bool:
        if msgs[-1]["role"] != "assistant":
            self.report.add_error(
                "assistant_not_last", f"{self.path}:{line}: field 'messages': the last message "
                f"is {msgs[-1]['role']!r}; a trailing turn after the last answer is never trained")
            return False
        return True

    def render(self, batch: list[tuple[int, Any]], tokenizer, stats: _TokenStats,
               executor: Executor | None = None) -> Callable[[], None]:
        """Start the batch's rendering; the callable returned counts it once tokenized."""
        where = [f"{self.path}:{n}" for n, _ in batch]
        pending = start_render([m for _, m in batch], tokenizer, sources=where, errors="return",
                               executor=executor)
        return lambda: self._count(batch, where, pending.result(), tokenizer, stats)

    def _count(self, batch, where, rows, tokenizer, stats: _TokenStats) -> None:
        report = self.report
        for (line, msgs), src, row in zip(batch, where, rows):
            if isinstance(row, HistoryRewriteError):
                turns = per_turn(msgs)
                row = render_many(turns, tokenizer, sources=[src] * len(turns), errors="return")
                bad = next((r for r in row if isinstance(r, TunelabError)), None)
                if bad is None:
                    stats.examples += 1
                    report.valid += 1
                    for r in row:
                        stats.add(r)
                    continue
                row = bad
            if isinstance(row, TunelabError):
                report.add_error(_render_error_kind(row, msgs), str(row))
                continue
            stats.examples += 1
            report.valid += 1
            stats.add(row)

    def finish(self, stats: _TokenStats | None) -> None:
        pass


_MESSAGE_INDEX = re.compile(r"messages\[(\d+)\](.*)")


class _Pairs:
    """DPO data: preference pairs in any of tunelab.data.preference's formats, every line read
    in the format of the file's first rows (so a line that lacks its fields is told which)."""
    kind, one = "preferences", "pair"
    contradiction = ("pairs contradict another pair (the same two answers to the same prompt, "
                     "preferred the other way round)")

    def __init__(self, path: Path, report: ValidationReport, fmt: str):
        self.path, self.report, self.fmt = path, report, fmt
        self.spec = PREFERENCE_REGISTRY[fmt]
        self.too_long: list[int] = []
        self.alike: list[int] = []

    def check(self, obj: Any, line: int) -> PreferencePair | None:
        pair, found = pair_problems(obj, self.fmt)
        if found:
            _add_problems(self.report, found, self.path, line)
            return None
        pair.source = f"{self.path}:{line}"
        return pair

    def keys(self, pair: PreferencePair) -> _Keys:
        return _pair_keys(pair)

    def late_check(self, pair: PreferencePair, line: int) -> bool:
        if _normalized([{"content": pair.chosen}]) == _normalized([{"content": pair.rejected}]):
            self.alike.append(line)
        return True

    def _field(self, fld: str | None, n_prompt: int, side: str) -> str | None:
        """A rendered conversation's field (messages[i]...) as the pair's own field."""
        m = _MESSAGE_INDEX.fullmatch(fld or "")
        if m is None:
            return fld
        i = int(m.group(1))
        return (f"{self.spec.prompt_field}[{i}]" if i < n_prompt else side) + m.group(2)

    def render(self, batch: list[tuple[int, PreferencePair]], tokenizer, stats: _TokenStats,
               executor: Executor | None = None) -> Callable[[], None]:
        """Start the batch's rendering; the callable returned counts it once tokenized."""
        convs, sources = [], []
        for _, pair in batch:
            convs += pair.conversations()
            sources += [pair.source] * 2
        pending = start_render(convs, tokenizer, sources=sources, errors="return",
                               executor=executor)
        return lambda: self._count(batch, convs, pending.result(), stats)

    def _count(self, batch, convs, rows, stats: _TokenStats) -> None:
        for i, (line, pair) in enumerate(batch):
            sides = rows[2 * i], rows[2 * i + 1]
            bad = next((k for k in (0, 1) if isinstance(sides[k], TunelabError)), None)
            if bad is not None:
                e = sides[bad]
                side = (self.spec.chosen, self.spec.rejected)[bad]
                e = e.located(file=e.file, line=e.line,
                              field=self._field(e.field, len(pair.prompt), side))
                self.report.add_error(_render_error_kind(e, convs[2 * i + bad]), str(e))
                continue
            prompt_tokens = shared_prompt_length(*sides)
            if prompt_tokens is None:
                self.report.add_error("prompt_mismatch", str(TunelabError(
                    "the chat template renders the prompt differently before the chosen and "
                    "the rejected answer (tokens merge across the boundary): the pair cannot "
                    "share one prompt", file=self.path, line=line,
                    field=self.spec.prompt_field)))
                continue
            if prompt_tokens >= stats.max_length:
                self.too_long.append(line)
            stats.examples += 1
            self.report.valid += 1
            stats.add_pair(*sides, prompt_tokens)

    def finish(self, stats: _TokenStats | None) -> None:
        if self.alike:
            self.report.add_warning(
                "alike_answers", f"{len(self.alike)} pairs whose answers differ only in case, "
                f"punctuation or spacing (little to learn): lines {_lines(self.alike)}",
                lines=self.alike[:DUPLICATE_LINES])
        if self.too_long:
            self.report.add_warning(
                "prompt_too_long", f"{len(self.too_long)} pairs have a prompt of max length "
                f"({stats.max_length:,} tokens) or more: nothing of their answers is left to "
                f"train, and training refuses them (raise max_length): lines "
                f"{_lines(self.too_long)}", lines=self.too_long[:DUPLICATE_LINES])


def _lines(lines: list[int]) -> str:
    return ", ".join(map(str, lines[:SAMPLES])) + (", ..." if len(lines) > SAMPLES else "")


def _add_problems(report: ValidationReport, found: list[Problem], path: Path,
                  line: int) -> None:
    for kind in dict.fromkeys(p.kind for p in found):   # each kind once per record
        p = next(p for p in found if p.kind == kind)
        report.add_error(kind, str(TunelabError(p.message, file=path, line=line, field=p.field)))


def validate_file(path: str | Path, *, tokenizer=None, model: str = "", max_length: int = 1024,
                  epochs: float = 3, others: Sequence[str | Path] = (),
                  progress: Callable[[int], None] | None = None,
                  dedupe: bool = False) -> ValidationReport:
    """Validate a JSONL file of conversations or of preference pairs (which, its first rows
    say); `others` are validation/test files checked for leakage.

    With a tokenizer, valid examples are rendered with its template for token statistics,
    and template refusals / ambiguous masks are errors too.

    An exact duplicate of an earlier example is a warning, never an error (the hosted API
    trains on it too): it counts as a valid example, trained again, unless `dedupe` says it
    will be dropped (drop_duplicates), when it is left out of the counts and statistics.
    """
    path = Path(path)
    kind, fmt = detect_kind(obj for _, obj in itertools.islice(iter_jsonl_lenient(path),
                                                                DETECT_ROWS))
    report = ValidationReport(file=str(path), kind=kind or "conversations",
                              preference_format=fmt)
    data = _Pairs(path, report, fmt) if kind == "preferences" else _Conversations(path, report)
    noun = _NOUNS[data.kind]
    stats = _TokenStats(max_length) if tokenizer is not None else None
    exact: dict[bytes, int] = {}
    near: dict[bytes, int] = {}
    prompts: set[bytes] = set()
    claims: dict[bytes, bytes] = {}
    contradicting: set[bytes] = set()
    near_dups: list[str] = []
    batch: list[tuple[int, Any]] = []
    # One batch tokenizes in this thread (the Rust tokenizer releases the GIL) while the next
    # is read, checked and templated: 100k conversations took 33 s in sequence.
    executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunelab-tokenize")
                if stats is not None else None)
    in_flight: list[tuple[Callable[[], None], int]] = []

    def count_in_flight() -> None:
        while in_flight:
            count, n = in_flight.pop(0)
            count()
            if progress:
                progress(n)

    def flush() -> None:
        nonlocal batch
        if batch:
            started = data.render(batch, tokenizer, stats, executor)
            count_in_flight()   # the previous batch, in order, while this one tokenizes
            in_flight.append((started, len(batch)))
            batch = []

    duplicates: list[list[int]] = []
    n_duplicates = 0

    try:
        for line, obj in iter_jsonl_lenient(path):
            report.examples += 1
            if isinstance(obj, TunelabError):   # io says which: not JSON, not UTF-8, too long
                report.add_error(obj.kind or "not_json", str(obj))
                continue
            item = data.check(obj, line)
            if item is None:
                continue
            keys = data.keys(item)
            if keys.exact in exact:   # a warning; trained again, or dropped with dedupe
                n_duplicates += 1
                if len(duplicates) < DUPLICATE_LINES:
                    duplicates.append([line, exact[keys.exact]])
                if dedupe:
                    continue
            else:   # what an exact copy would only repeat: near copies, prompts, claims
                exact[keys.exact] = line
                if keys.near in near:
                    near_dups.append(f"line {line} ~ line {near[keys.near]}")
                else:
                    near[keys.near] = line
                if keys.prompt is not None:
                    prompts.add(keys.prompt)
                if keys.claim is not None:
                    about, says = keys.claim
                    if claims.setdefault(about, says) != says:
                        contradicting.add(about)
            if not data.late_check(item, line):
                continue
            if stats is None:
                report.valid += 1
                continue
            batch.append((line, item))
            if len(batch) >= BATCH:
                flush()
        if stats is not None:
            flush()
            count_in_flight()
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
    if stats is not None:
        report.tokens = stats.summary(model or getattr(tokenizer, "name_or_path", ""), epochs)
    data.finish(stats)

    kept = report.examples - (n_duplicates if dedupe else 0)
    if kept < MIN_EXAMPLES:
        report.add_error("too_few_examples", f"{path}: {kept} {noun}" +
                         (" once duplicates are dropped" if kept != report.examples else "") +
                         f"; at least {MIN_EXAMPLES} are needed (50+ for a useful fine-tune)")
    elif kept < FEW_EXAMPLES:
        report.add_warning("few_examples", f"only {kept} {noun}: fine-tuning usually needs at "
                           f"least {FEW_EXAMPLES}, often hundreds", examples=kept)
    if n_duplicates:
        report.duplicates = {"count": n_duplicates, "lines": duplicates, "dropped": dedupe}
        shown = ", ".join(f"line {a} = line {b}" for a, b in duplicates[:SAMPLES]) + \
            (", ..." if n_duplicates > SAMPLES else "")
        report.add_warning(
            "duplicates", f"{n_duplicates} exact duplicate {noun} ({shown}): " +
            ("dropped" if dedupe else "each is trained again; drop them with dedupe "
             "(`tunelab data convert --dedupe`, or `dedupe` on an upload or a job)"),
            count=n_duplicates, lines=duplicates, dropped=dedupe)
    if near_dups:
        report.add_warning("near_duplicates", f"{len(near_dups)} near-duplicates (same text up "
                           f"to case, punctuation and spacing): {', '.join(near_dups[:SAMPLES])}",
                           count=len(near_dups))
    if contradicting:
        report.add_warning("contradictions", f"{len(contradicting)} {data.contradiction}",
                           count=len(contradicting))
    for other in others:
        o_exact, o_near, o_prompts = _keys_of(Path(other))
        n_exact = sum(1 for k in exact if k in o_exact)
        n_near = sum(1 for k in near if k in o_near) - n_exact
        n_prompt = sum(1 for k in prompts if k in o_prompts)
        if n_exact or n_near or n_prompt:
            report.add_warning(
                "leakage", f"leakage into {other}: {n_exact} identical {noun}, "
                f"{max(0, n_near)} near-identical, {n_prompt} shared prompts", other=str(other),
                identical=n_exact, near_identical=max(0, n_near), shared_prompts=n_prompt)
    return report


def _record_keys(obj: Any) -> _Keys | None:
    """The identity keys of one JSONL record, conversation or pair (None: not a valid one)."""
    if record_kind(obj) == "preferences":
        pair, _ = pair_problems(obj)
        return _pair_keys(pair) if pair is not None else None
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list) and \
            obj["messages"] and all(isinstance(m, dict) for m in obj["messages"]):
        # the fields a conversation is checked on, as _Conversations.check keeps them
        return _conversation_keys([{k: v for k, v in m.items() if k in ("role", "content",
                                                                         "weight")}
                                   for m in obj["messages"]])
    return None


def drop_duplicates(src: str | Path, dst: str | Path, *, keep_lines: bool = True
                    ) -> list[list[int]]:
    """Write `src` to `dst` without the exact duplicates of earlier examples (the identity
    validate_file uses). `keep_lines`: each is replaced by an empty line, which readers skip,
    so every other line keeps its number and an error still names the user's line; else its
    line is left out. Returns [line, first line] (in `src`) per duplicate dropped. Atomic:
    `dst` (which may be `src`) is whole or as it was."""
    import os
    src, dst = Path(src), Path(dst)
    seen: dict[bytes, int] = {}
    dropped: list[list[int]] = []
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as f, open(tmp, "wb") as out:
            for n, raw in enumerate(f, 1):
                keys = None
                try:
                    keys = _record_keys(json.loads(raw.removeprefix(b"\xef\xbb\xbf")
                                                   if n == 1 else raw))
                except ValueError:
                    pass   # not JSON (or not UTF-8): the line is the validator's business
                if keys is not None and keys.exact in seen:
                    dropped.append([n, seen[keys.exact]])
                    if keep_lines:
                        out.write(b"\n")
                    continue
                if keys is not None:
                    seen[keys.exact] = n
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dropped
