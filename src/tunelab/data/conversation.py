"""The chat-format data contract: a conversation is a list of OpenAI-style messages.

Every input format is converted to this shape before anything else touches it, and this is the
one place that decides whether a conversation is well-formed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.io import iter_jsonl
from tunelab.errors import TunelabError

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    source: str | None = None   # "file:line", for error messages further down the path
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level fields (labels, ids, ...)

    def to_json(self) -> dict[str, Any]:
        return {"messages": self.messages, **self.extra}


def parse_conversation(obj: Any, *, file: str | Path | None = None,
                       line: int | None = None) -> Conversation:
    """Check one record against the contract and return it as a Conversation.

    Raises TunelabError naming the file, line and field of the first problem.
    """
    def fail(msg: str, fld: str | None = None) -> TunelabError:
        return TunelabError(msg, file=file, line=line, field=fld)

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object with 'messages', got {type(obj).__name__}")
    if "messages" not in obj:
        raise fail("missing (expected a list of {role, content} messages)", "messages")
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise fail("must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise fail("expected an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ROLES:
            raise fail(f"unknown role {role!r} (expected one of: {', '.join(ROLES)})", f"{where}.role")
        content = m.get("content")
        if not isinstance(content, str):
            raise fail("missing or not a string" if content is None else
                       f"must be a string, got {type(content).__name__}", f"{where}.content")
        if not content.strip():
            raise fail("is empty", f"{where}.content")
        msg = {"role": role, "content": content}
        if "weight" in m:  # OpenAI format: weight 0 marks an assistant turn not to train on
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise fail("must be 0 or 1", f"{where}.weight")
            if role != "assistant":
                raise fail("only assistant messages can have a weight", f"{where}.weight")
            msg["weight"] = int(m["weight"])
        out.append(msg)
    if not any(m["role"] == "assistant" for m in out):
        raise fail("no assistant turn: there is nothing to train on", "messages")
    extra = {k: v for k, v in obj.items() if k != "messages"}
    source = f"{file}:{line}" if file is not None else None
    return Conversation(out, source=source, extra=extra)


def read_conversations(path: str | Path) -> list[Conversation]:
    """Read a JSONL file of {"messages": [...]} records; the first bad line raises."""
    convs = [parse_conversation(obj, file=path, line=n) for n, obj in iter_jsonl(path)]
    if not convs:
        raise TunelabError("no examples (the file is empty)", file=path)
    return convs
