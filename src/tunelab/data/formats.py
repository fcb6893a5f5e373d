"""Detect a dataset's format from its first rows and convert every row to OpenAI `messages`
(conversations) or to OpenAI's DPO format (preference pairs).

Formats (name: the fields that identify it):
  messages           `messages`: [{role, content, weight?}] (OpenAI / ChatML; content may also be
                     a list of {"type": "text", "text": ...} parts, joined)
  sharegpt           `conversations`: [{from, value}] with from in human/user, gpt/assistant/model,
                     system (an optional top-level `system` field becomes the system message)
  alpaca             `instruction`, `output`, optional `input` (appended to the instruction)
  prompt_completion  `prompt`, `completion`: strings, or TRL's conversational lists of messages
  gsm8k              `question`, `answer` whose last line is `#### N`: the calculator
                     annotations <<48/2=24>> are removed and N is kept as `final_answer`
  qa                 `question`, `answer` (any other question/answer pair)
and preference pairs (tunelab.data.preference), written in OpenAI's DPO format:
  openai_dpo, trl_conversational, trl_standard, trl_implicit

Each format is one record in REGISTRY (its identifying fields, the fields it reads, its
converter); detection, conversion and the error messages all read that one table. Other
top-level fields (a label, an id) are kept beside `messages`, so `data split
--stratify-by label` and evaluation can still use them. Columns that hold JSON text (CSV can
hold no lists) are parsed. Every converted record is checked against the conversation contract,
and conversion collects every bad row before failing, so one run names all of them.
"""
from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data import preference
from tunelab.data.conversation import problems
from tunelab.data.io import read_records, write_jsonl
from tunelab.errors import TunelabError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant", "system": "system"}
DETECT_ROWS = 50
_GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _has(record: dict, key: str) -> bool:
    return key in record and record[key] is not None


def candidates(record: Any) -> list[str]:
    """The formats whose identifying fields this record has, most specific first."""
    if not isinstance(record, dict):
        return []
    return [f.name for f in REGISTRY.values()
            if all(_has(record, k) for k in f.required) and f.accepts(record)]


def _expected() -> str:
    """The identifying fields of every format, formats that share them named together."""
    by_fields: dict[tuple[str, ...], list[str]] = {}
    for f in REGISTRY.values():
        by_fields.setdefault(f.required, []).append(f.name)
    return "; ".join(f"{'/'.join(names)}: {', '.join(fields)}"
                     for fields, names in by_fields.items())


def detect_format(records: Iterable[Any], *, file: str | Path | None = None) -> str:
    """The one format every record (of the first few) fits; a clear error when none or mixed."""
    records = [r for r in records if isinstance(r, dict)]
    if not records:
        raise TunelabError("cannot detect the format: no JSON objects among the first rows",
                           file=file, kind="unknown_format")
    common = None
    for r in records:
        c = candidates(r)
        common = c if common is None else [f for f in common if f in c]
    if common:
        return common[0]
    keys = sorted(set().union(*(r.keys() for r in records)))
    raise TunelabError(f"cannot detect the format from the fields {keys} (expected one of "
                       f"{_expected()}); pass --from NAME if the rows differ", file=file,
                       kind="unknown_format")


def _text(value: Any, fld: str) -> str:
    """A required non-empty text field; lists of OpenAI text parts are joined."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       for p in value):
        value = "".join(str(p.get("text", "")) for p in value)
    if value is None:
        raise TunelabError("missing", field=fld)
    if not isinstance(value, str):
        raise TunelabError(f"must be text, got {type(value).__name__}", field=fld)
    if not value.strip():
        raise TunelabError("is empty", field=fld)
    return value


def _json_list(value: Any, fld: str) -> Any:
    # CSV cells and some Parquet columns hold lists as JSON text.
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise TunelabError(f"looks like a JSON list but is not valid JSON ({e.msg})",
                               field=fld) from None
    return value


def _messages(value: Any, fld: str) -> list[dict[str, Any]]:
    value = _json_list(value, fld)
    if not isinstance(value, list) or not value:
        raise TunelabError("must be a non-empty list of messages", field=fld)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise TunelabError("expected an object with 'role' and 'content'", field=f"{fld}[{i}]")
        msg = dict(m)
        if "content" in msg:
            try:
                msg["content"] = _text(msg["content"], f"{fld}[{i}].content")
            except TunelabError:
                pass   # the contract check below names the problem with its field
        out.append({k: v for k, v in msg.items() if k in ("role", "content", "weight")})
    return out


def _sharegpt(record: dict) -> list[dict[str, Any]]:
    turns = _json_list(record["conversations"], "conversations")
    if not isinstance(turns, list) or not turns:
        raise TunelabError("must be a non-empty list of turns", field="conversations")
    out = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        out.append({"role": "system", "content": record["system"]})
    for i, t in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise TunelabError("expected an object with 'from' and 'value'", field=where)
        speaker = t.get("from", t.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise TunelabError(f"unknown speaker {speaker!r} (expected one of: "
                               f"{', '.join(SHAREGPT_ROLES)})", field=f"{where}.from")
        msg = {"role": role, "content": _text(t.get("value", t.get("content")), f"{where}.value")}
        if "weight" in t:
            msg["weight"] = t["weight"]
        out.append(msg)
    return out


def _alpaca(record: dict) -> list[dict[str, Any]]:
    instruction = _text(record["instruction"], "instruction")
    extra_input = record.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        raise TunelabError(f"must be text, got {type(extra_input).__name__}", field="input")
    user = instruction.strip() + (f"\n\n{extra_input.strip()}" if extra_input and extra_input.strip() else "")
    out = [{"role": "user", "content": user},
           {"role": "assistant", "content": _text(record["output"], "output")}]
    if isinstance(record.get("system"), str) and record["system"].strip():
        out.insert(0, {"role": "system", "content": record["system"]})
    return out


def _prompt_completion(record: dict) -> list[dict[str, Any]]:
    prompt = _json_list(record["prompt"], "prompt")
    completion = _json_list(record["completion"], "completion")
    msgs = (_messages(prompt, "prompt") if isinstance(prompt, list)
            else [{"role": "user", "content": _text(prompt, "prompt")}])
    msgs += (_messages(completion, "completion") if isinstance(completion, list)
             else [{"role": "assistant", "content": _text(completion, "completion")}])
    return msgs


def _gsm8k(record: dict) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    question = _text(record["question"], "question")
    answer = _text(record["answer"], "answer")
    final = _GSM8K_FINAL.search(answer)
    if not final:
        raise TunelabError("has no final '#### N' line (GSM8K format)", field="answer")
    # <<48/2=24>> are the dataset's calculator-tool annotations, not text a model should write.
    answer = _CALCULATOR.sub("", answer).strip()
    return ([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            {"final_answer": final.group(1)})


def _qa(record: dict) -> list[dict[str, Any]]:
    return [{"role": "user", "content": _text(record["question"], "question")},
            {"role": "assistant", "content": _text(record["answer"], "answer")}]


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _kept(record: dict, consumed: frozenset[str]) -> dict[str, Any]:
    """The fields a conversion does not read (a label, an id), when they are plain values."""
    return {k: v for k, v in record.items() if k not in consumed and _scalar(v)}


ChatConverter = Callable[[dict], Any]   # record -> messages, or (messages, fields it derives)


def _chat(fn: ChatConverter, consumed: frozenset[str]):
    """A conversation format's converter: its messages (and fields it derives), the system
    message, the kept fields, checked against the conversation contract."""
    def convert(record: dict, system: str | None) -> dict[str, Any]:
        got = fn(record)
        msgs, derived = got if isinstance(got, tuple) else (got, {})
        if system and not (msgs and msgs[0].get("role") == "system"):
            msgs = [{"role": "system", "content": system}, *msgs]
        out = {"messages": msgs, **_kept(record, consumed), **derived}
        found = problems(out)   # the contract, so what convert writes is what train accepts
        if found:
            raise TunelabError(found[0].message, field=found[0].field)
        return out
    return convert


def _pair(name: str):
    """A preference format's converter: the pair (checked by the preference contract) in
    OpenAI's DPO format, with the system message and the kept fields."""
    consumed = preference.REGISTRY[name].consumed

    def convert(record: dict, system: str | None) -> dict[str, Any]:
        pair, found = preference.pair_problems(record, name)
        if found:
            raise TunelabError(found[0].message, field=found[0].field)
        if system and pair.prompt[0]["role"] != "system":
            pair.prompt.insert(0, {"role": "system", "content": system})
        pair.extra = _kept(record, consumed)
        return pair.to_json()
    return convert


@dataclass(frozen=True)
class Format:
    """One input format: how its rows are recognised and what they become."""
    name: str
    kind: str                          # what it converts to: "conversations" | "preferences"
    required: tuple[str, ...]          # identifying fields: all present, none null
    convert: Callable[[dict, str | None], dict[str, Any]]   # (record, system) -> output row
    accepts: Callable[[dict], bool] = lambda record: True   # a finer test than the fields


def _chat_format(name: str, required: tuple[str, ...], fn: ChatConverter, *,
                 also_reads: tuple[str, ...] = (), accepts=None) -> Format:
    consumed = frozenset(required + also_reads)
    return Format(name, "conversations", required, _chat(fn, consumed),
                  accepts or (lambda record: True))


def _is_gsm8k(record: dict) -> bool:
    return isinstance(record["answer"], str) and bool(_GSM8K_FINAL.search(record["answer"]))


# Detection order: most specific first. Preference pairs come first: a row with chosen and
# rejected answers is a pair even when it also carries a `messages` copy of one of them.
REGISTRY: dict[str, Format] = {f.name: f for f in (
    *(Format(p.name, "preferences", p.required, _pair(p.name), p.accepts)
      for p in preference.REGISTRY.values()),
    _chat_format("messages", ("messages",), lambda r: _messages(r["messages"], "messages")),
    _chat_format("sharegpt", ("conversations",), _sharegpt, also_reads=("system",)),
    _chat_format("alpaca", ("instruction", "output"), _alpaca, also_reads=("input", "system")),
    _chat_format("prompt_completion", ("prompt", "completion"), _prompt_completion),
    _chat_format("gsm8k", ("question", "answer"), _gsm8k, accepts=_is_gsm8k),
    _chat_format("qa", ("question", "answer"), _qa),
)}
FORMATS = tuple(n for n, f in REGISTRY.items() if f.kind == "conversations")
PREFERENCE_FORMATS = preference.PREFERENCE_FORMATS


def _format(fmt: str) -> Format:
    if fmt not in REGISTRY:
        raise TunelabError(f"unknown format {fmt!r} (expected one of: {', '.join(REGISTRY)})",
                           field="from")
    return REGISTRY[fmt]


def convert_record(record: Any, fmt: str, *, system: str | None = None) -> dict[str, Any]:
    """One record in `fmt` -> {"messages": [...], **kept fields} for a conversation format, a
    pair in OpenAI's DPO format for a preference format. Raises TunelabError (field set)."""
    f = _format(fmt)
    if not isinstance(record, dict):
        raise TunelabError(f"expected an object, got {type(record).__name__}")
    for k in f.required:
        if not _has(record, k):
            raise TunelabError(f"missing (format {fmt} needs: {', '.join(f.required)})", field=k)
    return f.convert(record, system)


@dataclass
class ConvertReport:
    format: str
    kind: str = ""                     # "conversations" | "preferences"
    examples: int = 0
    errors: list[TunelabError] = field(default_factory=list)
    output: str | None = None


def convert_records(records: Iterable[tuple[int, Any]], *, fmt: str | None = None,
                    system: str | None = None, file: str | Path | None = None,
                    report: ConvertReport | None = None, kind: str | None = None,
                    progress: Callable[[int], Any] | None = None) -> Iterator[dict[str, Any]]:
    """Stream converted records; bad ones are collected on `report.errors` (file and line set).

    The format is detected from the first rows unless `fmt` is given; `kind` ("conversations"
    or "preferences") refuses data of the other kind.
    """
    it = iter(records)
    head = list(itertools.islice(it, DETECT_ROWS))
    fmt = fmt or detect_format([r for _, r in head], file=file)
    f = _format(fmt)
    if kind is not None and f.kind != kind:
        what = preference.KIND_TITLES
        raise TunelabError(f"holds {what[f.kind]} (format {fmt}), not {what[kind]}", file=file)
    if report is not None:
        report.format, report.kind = fmt, f.kind
    for where, record in itertools.chain(head, it):
        if progress is not None:
            progress(1)
        try:
            yield convert_record(record, fmt, system=system)
        except TunelabError as e:
            err = TunelabError(e.reason, file=file, line=where, field=e.field)
            if report is None:
                raise err from None
            report.errors.append(err)


def summarize_errors(errors: list[TunelabError], *, what: str = "bad rows") -> str:
    first = str(errors[0])
    if len(errors) == 1:
        return first
    more = ", ".join(str(e.line) for e in errors[1:11] if e.line is not None)
    tail = ", ..." if len(errors) > 11 else ""
    return f"{first} (and {len(errors) - 1} more {what}: lines {more}{tail})"


class _BadRows(Exception):
    pass


def convert_file(src: str | Path, dst: str | Path, *, fmt: str | None = None,
                 system: str | None = None, kind: str | None = None,
                 progress: Callable[[int], Any] | None = None) -> ConvertReport:
    """Convert any supported input to JSONL, atomically: conversations to chat (`messages`),
    preference pairs to OpenAI's DPO format. `kind` refuses data of the other kind.

    Every bad row is collected; if there are any, nothing is written and one TunelabError names
    the first with its line and lists the others' lines.
    """
    report = ConvertReport(format=fmt or "")
    rows = convert_records(read_records(src), fmt=fmt, system=system, file=src, report=report,
                           kind=kind, progress=progress)

    def checked():
        yield from rows
        if report.errors:   # raised inside the writer: its temp file is removed, dst untouched
            raise _BadRows
    try:
        report.examples = write_jsonl(dst, checked())
    except _BadRows:
        raise TunelabError(summarize_errors(report.errors)) from None
    report.output = str(dst)
    return report
