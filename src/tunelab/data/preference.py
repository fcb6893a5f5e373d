"""The preference-data contract: a pair is a prompt (messages ending with a user turn) and two
assistant answers to it, the chosen (preferred) one and the rejected one.

Formats (name: what identifies a row), detected from the first rows like SFT data:
  openai_dpo          `input`: {"messages": [...]}, `preferred_output` and
                      `non_preferred_output`: [one assistant message] (OpenAI's DPO format, and
                      the form `tunelab data convert` writes)
  trl_conversational  `prompt`: messages, `chosen` / `rejected`: [assistant message] (TRL)
  trl_standard        `prompt`, `chosen`, `rejected`: strings (TRL)
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.conversation import Problem, problems
from tunelab.data.io import iter_jsonl
from tunelab.errors import TunelabError

PREFERENCE_FORMATS = ("openai_dpo", "trl_conversational", "trl_standard")
CONSUMED = {"openai_dpo": {"input", "preferred_output", "non_preferred_output"},
            "trl_conversational": {"prompt", "chosen", "rejected"},
            "trl_standard": {"prompt", "chosen", "rejected"}}
DETECT_ROWS = 50


@dataclass
class PreferencePair:
    prompt: list[dict[str, Any]]       # messages, the last a user turn
    chosen: str                        # the preferred assistant answer
    rejected: str                      # the other one
    source: str | None = None          # "file:line"
    extra: dict[str, Any] = field(default_factory=dict)   # other top-level fields

    def to_json(self) -> dict[str, Any]:
        """OpenAI's DPO format."""
        return {"input": {"messages": self.prompt},
                "preferred_output": [{"role": "assistant", "content": self.chosen}],
                "non_preferred_output": [{"role": "assistant", "content": self.rejected}],
                **self.extra}

    def conversations(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """prompt + chosen, prompt + rejected; earlier assistant turns of the prompt are context
        (weight 0): only the final answer is trained."""
        context = [dict(m, weight=0) if m["role"] == "assistant" else dict(m)
                   for m in self.prompt]
        return ([*context, {"role": "assistant", "content": self.chosen}],
                [*context, {"role": "assistant", "content": self.rejected}])


def preference_format(record: Any) -> str | None:
    """The preference format a record's fields identify, or None."""
    if not isinstance(record, dict):
        return None
    if all(k in record for k in CONSUMED["openai_dpo"]):
        return "openai_dpo"
    if all(k in record for k in ("prompt", "chosen", "rejected")):
        return "trl_standard" if isinstance(record["prompt"], str) else "trl_conversational"
    return None


def _answer(value: Any, fld: str, found: list[Problem]) -> str | None:
    """One assistant answer: a string, one assistant message, or a list of exactly one."""
    if isinstance(value, list):
        if len(value) != 1:
            found.append(Problem("bad_answer", fld, "must hold exactly one assistant message, "
                                 f"got {len(value)}"))
            return None
        value, fld = value[0], f"{fld}[0]"
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


def pair_problems(record: Any, fmt: str | None = None) -> tuple[PreferencePair | None,
                                                                 list[Problem]]:
    """(the pair, []) for a good record; (None, every problem) otherwise."""
    fmt = fmt or preference_format(record)
    if fmt is None:
        return None, [Problem("not_preference", None, "expected a preference pair: "
                              + expected_fields())]
    found: list[Problem] = []
    if fmt == "openai_dpo":
        inp = record.get("input")
        prompt_field = "input.messages"
        prompt = inp.get("messages") if isinstance(inp, dict) else None
        chosen_field, rejected_field = "preferred_output", "non_preferred_output"
    else:
        prompt_field, chosen_field, rejected_field = "prompt", "chosen", "rejected"
        prompt = record.get("prompt")
        if fmt == "trl_standard":
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(prompt, list) or not prompt:
        found.append(Problem("missing_messages", prompt_field,
                             "must be a non-empty list of messages"))
        prompt = None
    else:
        # the conversation contract, less its "needs an assistant turn" rule
        for p in problems({"messages": prompt}):
            if p.kind != "no_assistant":
                found.append(p._replace(field=(p.field or "messages")
                                        .replace("messages", prompt_field, 1)))
        last = prompt[-1]
        if isinstance(last, dict) and last.get("role") in ("assistant", "system"):
            found.append(Problem("prompt_not_user", f"{prompt_field}[{len(prompt) - 1}].role",
                                 "the prompt must end with a user turn (the answers reply to "
                                 f"it), got {last.get('role')!r}"))
    chosen = _answer(record.get(chosen_field), chosen_field, found)
    rejected = _answer(record.get(rejected_field), rejected_field, found)
    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
        found.append(Problem("identical_pair", rejected_field,
                             "is the same text as the chosen answer: the pair teaches nothing"))
    if found:
        return None, found
    msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]
    extra = {k: v for k, v in record.items() if k not in CONSUMED[fmt]}
    return PreferencePair(msgs, chosen, rejected, extra=extra), []


def expected_fields() -> str:
    return ("{'input': {'messages': [...]}, 'preferred_output': [assistant message], "
            "'non_preferred_output': [assistant message]} (OpenAI DPO), or 'prompt', "
            "'chosen', 'rejected' (TRL)")


def detect_preference_format(records: list[Any], *, file: str | Path | None = None) -> str:
    fmts = {preference_format(r) for r in records if isinstance(r, dict)}
    if not fmts or None in fmts:
        raise TunelabError("not preference data: expected rows like " + expected_fields(),
                           file=file)
    if len(fmts) > 1:
        # conversational and standard TRL rows may mix: each row is read by its own shape
        if fmts == {"trl_standard", "trl_conversational"}:
            return "trl_conversational"
        raise TunelabError(f"rows in several preference formats: {', '.join(sorted(fmts))}",
                           file=file)
    return fmts.pop()


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Read a preference file (any of PREFERENCE_FORMATS); the first bad line raises a
    TunelabError with file, line and field."""
    rows = iter_jsonl(path)
    head = list(itertools.islice(rows, DETECT_ROWS))
    if not head:
        raise TunelabError("no examples (the file is empty)", file=path)
    detect_preference_format([r for _, r in head], file=path)
    out = []
    for line, record in itertools.chain(head, rows):
        pair, found = pair_problems(record)
        if found:
            raise TunelabError(found[0].message, file=path, line=line, field=found[0].field)
        pair.source = f"{path}:{line}"
        out.append(pair)
    return out
