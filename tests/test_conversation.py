"""The data contract's errors name the file, line and field."""
from __future__ import annotations

import json

import pytest

from tunelab.data.conversation import parse_conversation, read_conversations
from tunelab.data.io import write_jsonl
from tunelab.errors import TunelabError

GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def write_lines(path, lines):
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


@pytest.mark.parametrize("line,field,needle", [
    ("{not json", None, "not valid JSON"),
    ('["a list"]', None, "expected a JSON object"),
    ('{"text": "hi"}', "messages", "missing"),
    ('{"messages": []}', "messages", "non-empty"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "messages[0].role", "unknown role 'robot'"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}',
     "messages[0].content", "missing"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}',
     "messages[1].content", "empty"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "messages", "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}',
     "messages[1].weight", "0 or 1"),
])
def test_bad_line_names_file_line_and_field(tmp_path, line, field, needle):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), "", line])
    with pytest.raises(TunelabError) as info:
        read_conversations(path)
    err = info.value
    assert err.file == str(path) and err.line == 3 and err.field == field
    assert needle in str(err)
    assert f"{path}:3" in str(err) and "\n" not in str(err)


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path):
    path = write_lines(tmp_path / "latin1.jsonl",
                       [json.dumps(GOOD).encode(), '{"messages": "caf\xe9"}'.encode("latin-1")])
    with pytest.raises(TunelabError, match=r"latin1.jsonl:2: not valid UTF-8"):
        read_conversations(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TunelabError, match="file not found"):
        read_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TunelabError, match="no examples"):
        read_conversations(tmp_path / "empty.jsonl")


def test_good_file_round_trips_with_extra_fields_and_weight(tmp_path):
    rows = [GOOD, {"messages": [{"role": "system", "content": "s"},
                                {"role": "user", "content": "u"},
                                {"role": "assistant", "content": "a", "weight": 0},
                                {"role": "user", "content": "u2"},
                                {"role": "assistant", "content": "b"}], "label": "x"}]
    write_jsonl(tmp_path / "ok.jsonl", rows)
    convs = read_conversations(tmp_path / "ok.jsonl")
    assert [c.to_json() for c in convs] == rows
    assert convs[1].source == f"{tmp_path / 'ok.jsonl'}:2"


def test_parse_conversation_rejects_bool_weight():
    msg = {"messages": [{"role": "user", "content": "x"},
                        {"role": "assistant", "content": "y", "weight": True}]}
    with pytest.raises(TunelabError, match="0 or 1"):
        parse_conversation(msg)


def test_write_jsonl_is_atomic(tmp_path):
    target = tmp_path / "out.jsonl"
    write_jsonl(target, [GOOD])

    def rows():
        yield GOOD
        raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError):
        write_jsonl(target, rows())
    assert target.read_text() == json.dumps(GOOD) + "\n"   # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]   # no temp file left
