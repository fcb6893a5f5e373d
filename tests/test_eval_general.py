"""The general check (forgetting after fine-tuning): the shipped items and the answer checks."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate.general import (GeneralItem, check_answer, load_general_items,
                                      max_new_tokens_for)

ITEMS = load_general_items()
WRONG = ["I don't know", "", "   ", "Sorry, I cannot help with that."]


def test_shipped_items():
    assert len(ITEMS) >= 90
    assert len({it.id for it in ITEMS}) == len(ITEMS)
    counts = Counter(it.category for it in ITEMS)
    assert set(counts) == {"facts", "arithmetic", "format", "rewrite"}
    assert min(counts.values()) >= 20
    assert all(it.messages[-1]["role"] == "user" and it.example_answer for it in ITEMS)
    assert max_new_tokens_for(ITEMS) >= 64


@pytest.mark.parametrize("item", ITEMS, ids=[it.id for it in ITEMS])
def test_every_item_is_checkable(item: GeneralItem):
    assert check_answer(item.check, item.example_answer), item.example_answer
    for wrong in WRONG:
        assert not check_answer(item.check, wrong), wrong


@pytest.mark.parametrize("check, good, bad", [
    ({"type": "contains_any", "values": ["Paris"]}, "The capital of France is Paris.", "Parisian"),
    ({"type": "contains_any", "values": ["H2O", "water"]}, "It is h2o.", "H2O2"),
    ({"type": "number", "value": 1250}, "The total is $1,250.", "1,251"),
    ({"type": "number", "value": 12}, "7 + 5 = 12", "12 + 1 = 13"),
    ({"type": "number", "value": -3}, "It is -3.", "It is 3."),
    ({"type": "number", "value": 0.5}, "half: 0.5", "no number"),
    ({"type": "equals", "value": "ok"}, "  OK. ", "OK, sure"),
    ({"type": "regex", "pattern": r"^a.b$"}, "a\nb", "ab"),
    ({"type": "uppercase"}, "BERLIN!", "Berlin"),
    ({"type": "uppercase"}, "OK 42", "42"),
    ({"type": "word_count", "max": 1}, "Blue.", "Light blue"),
    ({"type": "word_count", "min": 2, "max": 3}, "one two", "one"),
    ({"type": "json_keys", "keys": ["name", "age"]}, '{"name": "A", "age": 3}', '{"name": "A"}'),
    ({"type": "json_keys", "keys": ["name", "age"]},
     'Sure!\n```json\n{"name": "A", "age": 3, "x": {}}\n```', '["name", "age"]'),
    ({"type": "json_keys", "keys": ["x"], "exact": True}, 'Here: {"x": 1} ok', '{"x": 1, "y": 2}'),
    ({"type": "json_keys", "keys": ["x"]}, '{bad} then {"x": 1}', '{"x": 1'),
    ({"type": "startswith", "value": "Yes"}, "  **yes**, it is.", "Well, yes."),
    ({"type": "all", "checks": [{"type": "uppercase"}, {"type": "contains_any", "values": ["rome"]}]},
     "ROME", "Rome"),
])
def test_check_types(check, good, bad):
    assert check_answer(check, good)
    assert not check_answer(check, bad)


def test_unknown_check_type():
    with pytest.raises(TunelabError, match="'nope'"):
        check_answer({"type": "nope"}, "x")


def _item(check, **over):
    obj = {"id": "x-1", "category": "facts", "messages": [{"role": "user", "content": "Q?"}],
           "check": check} | over
    return json.dumps(obj)


@pytest.mark.parametrize("line, field, reason", [
    ("{not json", None, "not valid JSON"),
    (_item({"type": "nope"}), "check.type", "unknown check type 'nope'"),
    (_item({"type": "number"}), "check.value", "missing"),
    (_item({"type": "regex", "pattern": "("}), "check.pattern", "valid regular expression"),
    (_item({"type": "word_count"}), "check", "needs 'min' or 'max'"),
    (_item({"type": "uppercase", "value": 1}), "check.value", "unexpected key"),
    (_item({"type": "all", "checks": [{"type": "contains_any", "values": []}]}),
     "check.checks[0].values", "non-empty list"),
    (_item({"type": "uppercase"}, messages=[{"role": "user"}]), "messages[0]", "content"),
    (_item({"type": "uppercase"}, id=""), "id", "non-empty string"),
    (_item({"type": "uppercase"}, id="x-0"), "id", "duplicate id 'x-0'"),
])
def test_bad_file_names_the_line(tmp_path, line, field, reason):
    path = tmp_path / "general.jsonl"
    good = _item({"type": "uppercase"}, id="x-0")
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(TunelabError) as e:
        load_general_items(path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), 3, field)
    assert reason in e.value.reason


def test_custom_file_and_missing_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(_item({"type": "contains_any", "values": ["Paris"]}) + "\n")
    [item] = load_general_items(path)
    assert item.id == "x-1" and item.example_answer is None
    with pytest.raises(TunelabError, match="cannot read"):
        load_general_items(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TunelabError, match="no items"):
        load_general_items(tmp_path / "empty.jsonl")


def test_max_new_tokens_leaves_room_for_long_answers():
    long = GeneralItem("a", "format", [], {"type": "all", "checks": [
        {"type": "word_count", "min": 40}]})
    assert max_new_tokens_for([long]) > 80
    assert max_new_tokens_for([]) == 64
