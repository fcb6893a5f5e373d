"""The prompt-template library: shipped templates, user templates, missing fields by line."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tunelab.data.conversation import read_conversations
from tunelab.data.prompts import get_template, load_templates, template_file
from tunelab.errors import TunelabError

REVIEWS = [{"review": f"Review number {i}: the kettle {'works' if i % 2 else 'broke'}.",
            "sentiment": "positive" if i % 2 else "negative", "rating": 1 + i % 5,
            "title": f"Kettle {i}", "product": "a kettle" if i % 3 else ""} for i in range(40)]


def test_shipped_library_covers_the_tasks_and_every_phrasing_renders():
    templates = load_templates()
    for name in ("review-sentiment", "review-rating", "review-title", "question-answer",
                 "summarize", "translate"):
        t = templates[name]
        assert len(t.phrasings) >= 3, name
        record = {f: f"<{f}>" for f in t.fields + t.optional}
        for k in range(len(t.phrasings)):
            out = t.apply(record, phrasing=k)
            user = out["messages"][0]["content"]
            assert all(f"<{f}>" in user for f in t.fields if f not in t.answer_fields), (name, k)
            assert out["messages"][-1]["role"] == "assistant"


def test_optional_fields_are_used_when_present_and_left_out_when_not():
    t = get_template("question-answer")
    with_ctx = t.apply({"question": "Q?", "answer": "A", "context": "Passage."}, phrasing=1)
    without = t.apply({"question": "Q?", "answer": "A"}, phrasing=1)
    assert "Passage: Passage." in with_ctx["messages"][0]["content"]
    assert without["messages"][0]["content"] == "Question: Q?"


def test_mix_uses_every_phrasing_deterministically(tmp_path):
    src = tmp_path / "reviews.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in REVIEWS))
    template_file(src, tmp_path / "a.jsonl", "review-sentiment", mix=True, seed=3)
    template_file(src, tmp_path / "b.jsonl", "review-sentiment", mix=True, seed=3)
    template_file(src, tmp_path / "c.jsonl", "review-sentiment")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    mixed = read_conversations(tmp_path / "a.jsonl")
    plain = read_conversations(tmp_path / "c.jsonl")
    first_lines = Counter(c.messages[0]["content"].split("\n")[0][:25] for c in mixed)
    assert len(first_lines) >= 4          # the 4 phrasings (one has 2 first lines: product or not)
    assert len({c.messages[0]["content"][:20] for c in plain}) == 1
    assert [c.messages[1]["content"] for c in mixed] == [r["sentiment"] for r in REVIEWS]
    assert mixed[0].extra == {"sentiment": "negative"}   # the answer field is kept as a label


def test_missing_field_is_reported_with_its_line_not_dropped(tmp_path):
    rows = [REVIEWS[0], {"review": "no label"}, REVIEWS[1], {"review": "", "sentiment": "x"}]
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    with pytest.raises(TunelabError) as info:
        template_file(src, out, "review-sentiment")
    msg = str(info.value)
    assert "r.jsonl:2: field 'sentiment': missing (template 'review-sentiment' needs: review, sentiment)" in msg
    assert "lines 4" in msg and not out.exists()
    n, skipped = template_file(src, out, "review-sentiment", skip_invalid=True)
    assert n == 2 and [e.line for e in skipped] == [2, 4]


def test_user_templates_mapping_and_constant_values(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "templates:\n"
        "  shout:\n"
        "    fields: [text, target_language]\n"
        "    phrasings:\n"
        "      - user: 'Say {{ text }} in {{ target_language }}'\n"
        "        assistant: '{{ text | upper }}'\n")
    src = tmp_path / "d.csv"
    src.write_text("body\nhello\n")
    n, _ = template_file(src, tmp_path / "o.jsonl", "shout", user_dir=tmp_path,
                         mapping={"text": "body"}, values={"target_language": "French"})
    row = json.loads((tmp_path / "o.jsonl").read_text())
    assert n == 1 and row["messages"] == [{"role": "user", "content": "Say hello in French"},
                                          {"role": "assistant", "content": "HELLO"}]


@pytest.mark.parametrize("yaml_text,needle", [
    ("templates:\n  t:\n    fields: [a]\n    phrasings:\n      - user: '{{ a }} {{ b }}'\n"
     "        assistant: '{{ a }}'\n", "uses ['b'], which are not declared"),
    ("templates:\n  t:\n    fields: [a]\n    phrasings:\n      - user: '{{ a '\n"
     "        assistant: '{{ a }}'\n", "Jinja syntax error"),
    ("templates: [1, 2]\n", "expected a mapping"),
    ("templates:\n  t: {fields: [a], phrasings: [{user: x}]}\n", "needs 'user' and 'assistant'"),
])
def test_broken_user_templates_fail_at_load_with_file_and_field(tmp_path, yaml_text, needle):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    with pytest.raises(TunelabError, match="bad.yaml") as info:
        load_templates(tmp_path)
    assert needle in str(info.value)


def test_unknown_template_suggests_the_closest():
    with pytest.raises(TunelabError, match="did you mean 'review-sentiment'"):
        get_template("review-sentimnt")
