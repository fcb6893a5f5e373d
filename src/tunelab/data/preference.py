"""The preference-data contract: a pair is a prompt (messages ending with a user turn) and two
assistant answers to it, the chosen (preferred) one and the rejected one.

Formats (name: what identifies a row), detected from the first rows like SFT data:
  openai_dpo          `input`: {"messages": [...]}, `preferred_output` and
                      `non_preferred_output`: [one assistant message] (OpenAI's DPO format, and
                      the form `tunelab data convert` writes)
  trl_conversational  `prompt`: messages, `chosen` / `rejected`: [assistant message] (TRL)
  trl_standard        `prompt`, `chosen`, `rejected`: strings (TRL)
  trl_implicit        `chosen`, `rejected`: whole conversations that share their opening turns
                      (the prompt) and differ in the last assistant turn, no `prompt` (TRL's
                      "implicit prompt", e.g. trl-lib/ultrafeedback_binarized)

The two explicit TRL forms are read alike (a prompt is a string or messages, an answer a string,
one assistant message, or a list of one), so rows of both may mix in one file. An answer list
that repeats the prompt before its answer (HuggingFaceH4/ultrafeedback_binarized) has the prompt
taken off, as TRL's `maybe_extract_prompt` does. Cells that hold JSON text (CSV can hold no
lists) are parsed. `pair_problems` lists every way a row breaks the contract, each with a
stable `kind` (the validator counts them) and the field at fault.
"""
from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.conversation import Problem, problems
from tunelab.data.io import iter_jsonl, read_records
from tunelab.data.render import IGNORE_INDEX
from tunelab.errors import TunelabError

DATA_KINDS = ("conversations", "preferences")
KIND_TITLES = {"conversations": "conversations", "preferences": "preference pairs"}
DETECT_ROWS = 50


@dataclass
class PreferencePair:
    prompt: list[dict[str, Any]]       # messages, the last a user turn
    chosen: str                        # the preferred assistant answer
    rejected: str                      # the other one
    source: str | None = None          # "file:line"
    extra: dict[str, Any] = field(default_factory=dict)   # other top-level fields

    def to_json(self) -> dict[str, Any]:
        """OpenAI's DPO format (an extra field of the same name as one of its own is dropped:
        a TRL row's stray `input` column must not replace the prompt)."""
        pair = {"input": {"messages": self.prompt},
                "preferred_output": [{"role": "assistant", "content": self.chosen}],
                "non_preferred_output": [{"role": "assistant", "content": self.rejected}]}
        return {**pair, **{k: v for k, v in self.extra.items() if k not in pair}}

    def conversations(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """prompt + chosen, prompt + rejected; earlier assistant turns of the prompt are context
        (weight 0): only the final answer is trained."""
        context = [dict(m, weight=0) if m["role"] == "assistant" else dict(m)
                   for m in self.prompt]
        return ([*context, {"role": "assistant", "content": self.chosen}],
                [*context, {"role": "assistant", "content": self.rejected}])


# ---- the formats: one record each ----------------------------------------------------------------
_JSON_LIST = re.compile(r"\s*\[\s*[{\]]")      # '[{"role": ...' or '[]': JSON, not text
_JSON_OBJECT = re.compile(r'\s*\{\s*"')


def _is_list(value: Any) -> bool:
    return isinstance(value, list) or (isinstance(value, str) and bool(_JSON_LIST.match(value)))


@dataclass(frozen=True)
class PreferenceFormat:
    name: str
    required: tuple[str, ...]          # identifying fields: all present, none null
    prompt: str | None                 # the prompt's field (None: the answers' shared opening)
    chosen: str
    rejected: str
    title: str                         # what its rows look like, for errors
    accepts: Callable[[dict], bool] = lambda record: True   # finer than the required fields

    @property
    def consumed(self) -> frozenset[str]:
        """Fields the pair is read from; the others are kept beside it (`extra`)."""
        return frozenset(filter(None, (self.prompt, self.chosen, self.rejected)))

    @property
    def prompt_field(self) -> str:
        """The field errors name for the prompt's messages."""
        return {"input": "input.messages", None: self.chosen}.get(self.prompt, self.prompt)


REGISTRY: dict[str, PreferenceFormat] = {f.name: f for f in (
    PreferenceFormat("openai_dpo", ("input", "preferred_output", "non_preferred_output"),
                     "input", "preferred_output", "non_preferred_output",
                     "{'input': {'messages': [...]}, 'preferred_output': [assistant message], "
                     "'non_preferred_output': [assistant message]} (OpenAI DPO)"),
    PreferenceFormat("trl_conversational", ("prompt", "chosen", "rejected"), "prompt", "chosen",
                     "rejected", "'prompt': messages, 'chosen'/'rejected': [assistant message] "
                     "(TRL)", accepts=lambda r: _is_list(r["prompt"])),
    PreferenceFormat("trl_standard", ("prompt", "chosen", "rejected"), "prompt", "chosen",
                     "rejected", "'prompt', 'chosen', 'rejected': strings (TRL)"),
    PreferenceFormat("trl_implicit", ("chosen", "rejected"), None, "chosen", "rejected",
                     "'chosen'/'rejected': whole conversations sharing the prompt (TRL, "
                     "implicit prompt)",
                     accepts=lambda r: "prompt" not in r and _is_list(r["chosen"])),
)}
PREFERENCE_FORMATS = tuple(REGISTRY)


def preference_format(record: Any) -> str | None:
    """The preference format a record's fields identify, or None."""
    if not isinstance(record, dict):
        return None
    return next((f.name for f in REGISTRY.values()
                 if all(record.get(k) is not None for k in f.required) and f.accepts(record)),
                None)


def record_kind(record: Any) -> str | None:
    """"preferences", "conversations" or None (neither). A row with both (a `messages` copy
    of the chosen conversation beside the pair) is a preference pair."""
    if preference_format(record) is not None:
        return "preferences"
    return "conversations" if isinstance(record, dict) and "messages" in record else None


def detect_kind(records: Iterable[Any]) -> tuple[str | None, str | None]:
    """(data kind, preference format) that most of these records have; (None, None) when no
    record is either. Rows that break the contract still count by their fields, so a
    validator can report them in the format of the file they are in."""
    kinds: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    for r in records:
        kind = record_kind(r)
        if kind is not None:
            kinds[kind] += 1
        if kind == "preferences":
            formats[preference_format(r)] += 1
    if not kinds:
        return None, None
    if kinds["preferences"] > kinds["conversations"]:
        return "preferences", formats.most_common(1)[0][0]
    return "conversations", None


def data_kind_of(path: str | Path) -> str:
    """"conversations" or "preferences": what a data file holds, from its first rows (any
    file `tunelab data convert` reads; a processed upload's data.jsonl). Raises a TunelabError
    naming the file when it holds neither (or cannot be read)."""
    head = [r for _, r in itertools.islice(read_records(path), DETECT_ROWS)]
    kind, _ = detect_kind(head)
    if kind is None:
        raise TunelabError("holds neither conversations ({'messages': [...]}) nor preference "
                           "pairs (" + expected_fields() + ")", file=path)
    return kind


def expected_fields() -> str:
    """What a preference row looks like, in each format (for errors)."""
    return "; ".join(f.title for f in REGISTRY.values())


# ---- reading one row -----------------------------------------------------------------------------
def _cell(value: Any, fld: str, found: list[Problem]) -> Any:
    """A value that may be JSON text (a CSV cell, a stringified Parquet column) parsed. Only
    text that opens like a JSON list of objects or an object is parsed, so a text prompt such
    as "[INST] ..." stays text."""
    if isinstance(value, str) and (_JSON_LIST.match(value) or _JSON_OBJECT.match(value)):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            found.append(Problem("bad_json", fld, f"looks like JSON but is not valid JSON "
                                 f"({e.msg})"))
            return None
    return value


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, dict) and isinstance(b, dict) and \
        (a.get("role"), a.get("content")) == (b.get("role"), b.get("content"))


def _answer(value: Any, fld: str, found: list[Problem],
            prompt: list[dict[str, Any]] | None = None) -> str | None:
    """One assistant answer: a string, one assistant message, or a list of exactly one (after
    the prompt's messages, when the list repeats them first)."""
    value = _cell(value, fld, found)
    if isinstance(value, list):
        n = len(prompt or ())
        if n and len(value) > n and all(_same(a, b) for a, b in zip(value, prompt)):
            value, offset = value[n:], n           # [*prompt, answer]: TRL extracts the prompt
        else:
            offset = 0
        if len(value) != 1:
            found.append(Problem("bad_answer", fld, "must hold exactly one assistant message"
                                 + (" after the prompt" if offset else "")
                                 + f", got {len(value)}"))
            return None
        value, fld = value[0], f"{fld}[{offset}]"
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            found.append(Problem("unknown_role", f"{fld}.role",
                                 f"must be 'assistant', got {value.get('role')!r}"))
            return None
        value, fld = value.get("content"), f"{fld}.content"
    if not isinstance(value, str):
        found.append(Problem("missing_content", fld, "missing or not a string" if value is None
                             else f"must be a string, got {type(value).__name__}"))
        return None
    if not value.strip():
        found.append(Problem("empty_content", fld, "is empty"))
        return None
    return value


def _explicit(record: dict, fmt: PreferenceFormat, found: list[Problem]):
    """(prompt messages or None, chosen, rejected) of a format with a prompt field."""
    before = len(found)
    prompt = _cell(record.get(fmt.prompt), fmt.prompt, found)
    if fmt.prompt == "input":
        prompt = prompt.get("messages") if isinstance(prompt, dict) else None
    elif isinstance(prompt, str):
        if not prompt.strip():
            found.append(Problem("empty_content", fmt.prompt, "is empty"))
        prompt = [{"role": "user", "content": prompt}]
    # (a prompt cell that is broken JSON is reported once, as that)
    prompt = _prompt(prompt, fmt.prompt_field, found) if len(found) == before else None
    chosen = _answer(record.get(fmt.chosen), fmt.chosen, found, prompt)
    rejected = _answer(record.get(fmt.rejected), fmt.rejected, found, prompt)
    return prompt, chosen, rejected


def _implicit(record: dict, fmt: PreferenceFormat, found: list[Problem]):
    """(prompt, chosen, rejected) of two whole conversations: the prompt is the turns they
    share, each answer the one assistant turn after it."""
    sides = []
    for fld in (fmt.chosen, fmt.rejected):
        conv = _cell(record.get(fld), fld, found)
        if not isinstance(conv, list) or len(conv) < 2:
            found.append(Problem("missing_messages", fld, "must be a conversation: the prompt's "
                                 "messages, then one assistant answer"))
            conv = None
        sides.append(conv)
    chosen, rejected = sides
    if chosen is None or rejected is None:
        return None, None, None
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and _same(chosen[shared], rejected[shared]):
        shared += 1
    if shared == 0:
        found.append(Problem("no_shared_prompt", fmt.rejected, "shares no opening turns with "
                             f"'{fmt.chosen}': there is no prompt the two answers reply to"))
        return None, None, None
    prompt = _prompt(chosen[:shared], fmt.chosen, found)
    answers = []
    for fld, conv in ((fmt.chosen, chosen), (fmt.rejected, rejected)):
        rest = conv[shared:]
        if len(rest) != 1:
            found.append(Problem("bad_answer", fld, f"must hold exactly one assistant message "
                                 f"after the {shared} shared prompt messages, got {len(rest)}"))
            answers.append(None)
        else:
            answers.append(_answer(rest[0], f"{fld}[{shared}]", found))
    return prompt, answers[0], answers[1]


def _prompt(prompt: Any, fld: str, found: list[Problem]) -> list[dict[str, Any]] | None:
    """The prompt's messages checked against the conversation contract (less its "needs an
    assistant turn" rule) and ending with a user turn; None when they break it."""
    if not isinstance(prompt, list) or not prompt:
        found.append(Problem("missing_messages", fld, "must be a non-empty list of messages"))
        return None
    before = len(found)
    for p in problems({"messages": prompt}):
        if p.kind != "no_assistant":
            found.append(p._replace(field=(p.field or "messages").replace("messages", fld, 1)))
    last = prompt[-1]
    if isinstance(last, dict) and last.get("role") in ("assistant", "system"):
        found.append(Problem("prompt_not_user", f"{fld}[{len(prompt) - 1}].role",
                             "the prompt must end with a user turn (the answers reply to "
                             f"it), got {last.get('role')!r}"))
    if len(found) > before:
        return None
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def pair_problems(record: Any, fmt: str | None = None) -> tuple[PreferencePair | None,
                                                                 list[Problem]]:
    """(the pair, []) for a good record; (None, every problem) otherwise. `fmt` reads the record
    in that format (a file's format: a row that lacks its fields is told which); by default the
    record's own fields pick it."""
    if not isinstance(record, dict):
        return None, [Problem("not_object", None, "expected a JSON object (a preference pair), "
                              f"got {type(record).__name__}")]
    fmt = fmt or preference_format(record)
    if fmt is None:
        return None, [Problem("not_preference", None, "expected a preference pair: "
                              + expected_fields())]
    if fmt not in REGISTRY:
        raise TunelabError(f"unknown preference format {fmt!r} (expected one of: "
                           f"{', '.join(REGISTRY)})", field="from")
    spec = REGISTRY[fmt]
    missing = [k for k in spec.required if record.get(k) is None]
    if missing:
        return None, [Problem("missing_field", k, f"missing (format {fmt} needs: "
                              f"{', '.join(spec.required)})") for k in missing]
    found: list[Problem] = []
    prompt, chosen, rejected = (_explicit if spec.prompt else _implicit)(record, spec, found)
    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
        found.append(Problem("identical_pair", spec.rejected,
                             "is the same text as the chosen answer: the pair teaches nothing"))
    if found:
        return None, found
    extra = {k: v for k, v in record.items() if k not in spec.consumed}
    return PreferencePair(prompt, chosen, rejected, extra=extra), []


def prompt_of(record: Any, fmt: str | None = None) -> list[dict[str, Any]] | None:
    """A row's prompt messages, read leniently (the row may break the contract elsewhere: an
    empty answer, identical answers); None when there is no readable prompt."""
    fmt = fmt or preference_format(record)
    if not isinstance(record, dict) or fmt not in REGISTRY:
        return None
    spec = REGISTRY[fmt]
    if any(record.get(k) is None for k in spec.required):
        return None
    prompt, _, _ = (_explicit if spec.prompt else _implicit)(record, spec, [])
    return prompt


def shared_prompt_length(chosen_row: dict[str, list[int]],
                         rejected_row: dict[str, list[int]]) -> int | None:
    """Tokens before the answer in a pair's two rendered rows ({input_ids, labels}, as
    tunelab.data.render makes them), or None when the two do not share them token for token
    (a template whose tokens merge across the prompt/answer boundary): DPO compares two
    answers to one prompt, so the prompt must be the same ids in both."""
    starts = [next((k for k, x in enumerate(row["labels"]) if x != IGNORE_INDEX),
                   len(row["labels"]))
              for row in (chosen_row, rejected_row)]
    if starts[0] != starts[1] or \
            chosen_row["input_ids"][:starts[0]] != rejected_row["input_ids"][:starts[1]]:
        return None
    return starts[0]


def detect_preference_format(records: list[Any], *, file: str | Path | None = None) -> str:
    """The preference format of a file's first rows; a clear error when they hold none (or
    several that cannot be read alike)."""
    fmts = {preference_format(r) for r in records if isinstance(r, dict)}
    if not fmts or None in fmts:
        kind, _ = detect_kind(records)
        what = ("holds conversations (SFT data), not preference pairs" if kind == "conversations"
                else "not preference data")
        raise TunelabError(f"{what}: expected rows like " + expected_fields(), file=file)
    if len(fmts) > 1:
        # conversational and standard TRL rows may mix: both are read alike
        if fmts == {"trl_standard", "trl_conversational"}:
            return "trl_conversational"
        raise TunelabError(f"rows in several preference formats: {', '.join(sorted(fmts))}",
                           file=file)
    return fmts.pop()


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Read a preference file (JSONL in any of PREFERENCE_FORMATS); the first bad line raises
    a TunelabError with file, line and field."""
    rows = iter_jsonl(path)
    head = list(itertools.islice(rows, DETECT_ROWS))
    if not head:
        raise TunelabError("no examples (the file is empty)", file=path)
    fmt = detect_preference_format([r for _, r in head], file=path)
    out = []
    for line, record in itertools.chain(head, rows):
        pair, found = pair_problems(record, fmt)
        if found:
            raise TunelabError(found[0].message, file=path, line=line, field=found[0].field)
        pair.source = f"{path}:{line}"
        out.append(pair)
    return out
