"""The chat-format data contract: a conversation is a list of OpenAI-style messages.

Every input format is converted to this shape before anything else touches it, and this is the
one place that decides whether a conversation is well-formed: `problems` lists every way a
record breaks the contract (the validator reports them all); `parse_conversation` raises the
first (training stops at the first bad line).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tunelab.data.io import iter_jsonl
from tunelab.errors import TunelabError

ROLES = ("system", "user", "assistant")


class Problem(NamedTuple):
    kind: str            # a stable key: not_object, missing_messages, unknown_role, ...
    field: str | None    # messages[1].content
    message: str


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    source: str | None = None   # "file:line", for error messages further down the path
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level fields (labels, ids, ...)

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, **self.extra}


def problems(obj: Any) -> list[Problem]:
    """Every way `obj` breaks the contract, in order (empty when it is a good conversation)."""
    if not isinstance(obj, dict):
        return [Problem("not_object", None,
                        f"expected a JSON object with 'messages', got {type(obj).__name__}")]
    if "messages" not in obj:
        return [Problem("missing_messages", "messages",
                        "missing (expected a list of {role, content} messages)")]
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return [Problem("missing_messages", "messages", "must be a non-empty list of messages")]
    found = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            found.append(Problem("not_object", where, "expected an object with 'role' and 'content'"))
            continue
        role = m.get("role")
        if role not in ROLES:
            found.append(Problem("unknown_role", f"{where}.role",
                                 f"unknown role {role!r} (expected one of: {', '.join(ROLES)})"))
        content = m.get("content")
        if not isinstance(content, str):
            found.append(Problem("missing_content", f"{where}.content",
                                 "missing or not a string" if content is None else
                                 f"must be a string, got {type(content).__name__}"))
        elif not content.strip():
            found.append(Problem("empty_content", f"{where}.content", "is empty"))
        if "weight" in m:  # OpenAI format: weight 0 marks an assistant turn not to train on
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                found.append(Problem("bad_weight", f"{where}.weight", "must be 0 or 1"))
            elif role != "assistant":
                found.append(Problem("bad_weight", f"{where}.weight",
                                     "only assistant messages can have a weight"))
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        found.append(Problem("no_assistant", "messages",
                             "no assistant turn: there is nothing to train on"))
    return found


def split_source(source: str | None) -> tuple[str | None, int | None]:
    """A Conversation.source ("file:line") back into (file, line); (source, None) when it has no
    line number, (None, None) when there is none."""
    if not source:
        return None, None
    file, _, line = source.rpartition(":")
    return (file, int(line)) if file and line.isdigit() else (source, None)


def parse_conversation(obj: Any, *, file: str | Path | None = None,
                       line: int | None = None) -> Conversation:
    """Check one record against the contract and return it as a Conversation.

    Raises TunelabError naming the file, line and field of the first problem.
    """
    found = problems(obj)
    if found:
        raise TunelabError(found[0].message, file=file, line=line, field=found[0].field)
    out = []
    for m in obj["messages"]:
        msg = {"role": m["role"], "content": m["content"]}
        if "weight" in m:
            msg["weight"] = int(m["weight"])
        out.append(msg)
    extra = {k: v for k, v in obj.items() if k != "messages"}
    source = f"{file}:{line}" if file is not None else None
    return Conversation(out, source=source, extra=extra)


def read_conversations(path: str | Path) -> list[Conversation]:
    """Read a JSONL file of {"messages": [...]} records; the first bad line raises."""
    convs = [parse_conversation(obj, file=path, line=n) for n, obj in iter_jsonl(path)]
    if not convs:
        raise TunelabError("no examples (the file is empty)", file=path)
    return convs
