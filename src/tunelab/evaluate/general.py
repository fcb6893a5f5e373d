"""The general check: prompts with code-checkable answers, scored on the base and the fine-tuned
model by `tunelab compare` to show what fine-tuning cost (forgetting) or gained.

The items ship in general.jsonl (one JSON object a line: id, category, messages, check, and an
optional example_answer used by the tests). A check is a small dict; its types are the keys of
_CHECKS below. Every check is validated when the file is loaded, so a typo fails at load time
with its line, never silently as a wrong score.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluate.tasks import final_number, normalize_answer

DEFAULT_MAX_NEW_TOKENS = 64
_ROLES = {"system", "user", "assistant"}


@dataclass
class GeneralItem:
    id: str
    category: str
    messages: list[dict]
    check: dict
    example_answer: str | None = None   # a correct answer; only the tests read it


# --- checks -------------------------------------------------------------------------------------

def _contains_any(c: dict, answer: str) -> bool:
    # Lookarounds instead of \b: values like "C#" or "H2O." still match as whole words.
    return any(re.search(rf"(?<!\w){re.escape(v)}(?!\w)", answer, re.I) for v in c["values"])


def _number(c: dict, answer: str) -> bool:
    # The same reading of "the answer's number" as the math task: the last one, "$1,250." = 1250.
    found = final_number(answer)
    return found is not None and abs(found - float(c["value"])) < 1e-9


def _equals(c: dict, answer: str) -> bool:
    return normalize_answer(answer) == normalize_answer(c["value"])


def _regex(c: dict, answer: str) -> bool:
    return re.search(c["pattern"], answer, re.S) is not None


def _uppercase(c: dict, answer: str) -> bool:
    return any(ch.isalpha() for ch in answer) and not any(ch.islower() for ch in answer)


def _word_count(c: dict, answer: str) -> bool:
    n = len(answer.split())
    return c.get("min", 0) <= n <= c.get("max", n)


def _json_object(answer: str) -> dict | None:
    """The answer as a JSON object, or the first {...} in it that parses as one (code fences and
    surrounding prose are common)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", answer):
        try:
            obj, _ = decoder.raw_decode(answer, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _json_keys(c: dict, answer: str) -> bool:
    obj = _json_object(answer)
    if obj is None:
        return False
    keys = set(c["keys"])
    return set(obj) == keys if c.get("exact", False) else keys <= set(obj)


def _startswith(c: dict, answer: str) -> bool:
    # Markdown emphasis and quotes around the first word do not count against it.
    return answer.strip().lstrip("*\"'“ ").lower().startswith(c["value"].lower())


def _all(c: dict, answer: str) -> bool:
    return all(check_answer(sub, answer) for sub in c["checks"])


def _strings(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(s, str) and s for s in v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _pattern(v: Any) -> bool:
    try:
        re.compile(v)
    except (re.error, TypeError):
        return False
    return isinstance(v, str)


# type -> (checker, {key: (validator, what it must be, required)})
_Spec = dict[str, tuple[Callable[[Any], bool], str, bool]]
_CHECKS: dict[str, tuple[Callable[[dict, str], bool], _Spec]] = {
    "contains_any": (_contains_any, {"values": (_strings, "a non-empty list of strings", True)}),
    "number": (_number, {"value": (lambda v: isinstance(v, (int, float))
                                   and not isinstance(v, bool), "a number", True)}),
    "equals": (_equals, {"value": (lambda v: isinstance(v, str), "a string", True)}),
    "regex": (_regex, {"pattern": (_pattern, "a valid regular expression", True)}),
    "uppercase": (_uppercase, {}),
    "word_count": (_word_count, {"min": (_count, "a non-negative integer", False),
                                 "max": (_count, "a non-negative integer", False)}),
    "json_keys": (_json_keys, {"keys": (_strings, "a non-empty list of strings", True),
                               "exact": (lambda v: isinstance(v, bool), "true or false", False)}),
    "startswith": (_startswith, {"value": (lambda v: isinstance(v, str) and bool(v.strip()),
                                           "a non-empty string", True)}),
    "all": (_all, {"checks": (lambda v: isinstance(v, list) and bool(v),
                              "a non-empty list of checks", True)}),
}


def validate_check(check: Any, where: str = "check") -> None:
    """Raise TunelabError(field=where...) unless `check` is a well-formed check spec."""
    if not isinstance(check, dict):
        raise TunelabError("must be an object with a 'type'", field=where)
    kind = check.get("type")
    if kind not in _CHECKS:
        raise TunelabError(f"unknown check type {kind!r} (one of: {', '.join(_CHECKS)})",
                           field=f"{where}.type")
    spec = _CHECKS[kind][1]
    for key in check:
        if key != "type" and key not in spec:
            raise TunelabError(f"unexpected key for a {kind!r} check", field=f"{where}.{key}")
    for key, (ok, what, required) in spec.items():
        if key not in check:
            if required:
                raise TunelabError(f"missing (a {kind!r} check needs it)", field=f"{where}.{key}")
        elif not ok(check[key]):
            raise TunelabError(f"must be {what}", field=f"{where}.{key}")
    if kind == "word_count":
        if "min" not in check and "max" not in check:
            raise TunelabError("a 'word_count' check needs 'min' or 'max'", field=where)
        if check.get("min", 0) > check.get("max", check.get("min", 0)):
            raise TunelabError("'min' is larger than 'max'", field=where)
    if kind == "all":
        for i, sub in enumerate(check["checks"]):
            validate_check(sub, f"{where}.checks[{i}]")


def check_answer(check: dict, answer: str) -> bool:
    """Whether `answer` passes `check`. An unknown check type is a TunelabError."""
    kind = check.get("type")
    if kind not in _CHECKS:
        raise TunelabError(f"unknown check type {kind!r} (one of: {', '.join(_CHECKS)})",
                           field="check.type")
    return _CHECKS[kind][0](check, answer)


# --- items --------------------------------------------------------------------------------------

def _item(obj: Any) -> GeneralItem:
    if not isinstance(obj, dict):
        raise TunelabError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "category"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise TunelabError("missing or not a non-empty string", field=key)
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise TunelabError("must be a non-empty list of messages", field="messages")
    for i, m in enumerate(msgs):
        if (not isinstance(m, dict) or m.get("role") not in _ROLES
                or not isinstance(m.get("content"), str)):
            raise TunelabError("each message needs a role (system, user, assistant) and a "
                               "string content", field=f"messages[{i}]")
    if msgs[-1]["role"] != "user":
        raise TunelabError("the last message must be the user's prompt", field="messages")
    if "check" not in obj:
        raise TunelabError("missing", field="check")
    validate_check(obj["check"])
    example = obj.get("example_answer")
    if example is not None and not isinstance(example, str):
        raise TunelabError("must be a string", field="example_answer")
    return GeneralItem(id=obj["id"], category=obj["category"],
                       messages=[{"role": m["role"], "content": m["content"]} for m in msgs],
                       check=obj["check"], example_answer=example)


def load_general_items(path: str | Path | None = None) -> list[GeneralItem]:
    """The general-check items: the file at `path`, or the set shipped with tunelab.

    A malformed line raises TunelabError naming the file, the line and the field.
    """
    if path is None:
        source = resources.files("tunelab.evaluate").joinpath("general.jsonl")
        name, text = "general.jsonl", source.read_text(encoding="utf-8")
    else:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise TunelabError(f"cannot read the general-check file: {e.strerror}", file=name)
    items: list[GeneralItem] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = _item(json.loads(line))
        except json.JSONDecodeError as e:
            raise TunelabError(f"not valid JSON ({e.msg})", file=name, line=lineno) from None
        except TunelabError as e:
            raise TunelabError(e.reason, file=name, line=lineno, field=e.field) from None
        if item.id in seen:
            raise TunelabError(f"duplicate id {item.id!r}", file=name, line=lineno, field="id")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise TunelabError("no items (the file is empty)", file=name)
    return items


def _tokens_needed(check: dict) -> int:
    if check["type"] == "all":
        return max(_tokens_needed(c) for c in check["checks"])
    if check["type"] == "word_count" and "min" in check:
        return 2 * check["min"] + 16   # ~1.3 tokens a word in English, plus slack for punctuation
    return DEFAULT_MAX_NEW_TOKENS


def max_new_tokens_for(items: Iterable[GeneralItem]) -> int:
    """A generation cap long enough for every item's check (short answers: 64 tokens), so the
    check costs little while a verbose model still reaches its answer."""
    return max((_tokens_needed(it.check) for it in items), default=DEFAULT_MAX_NEW_TOKENS)
