"""The validation report (every problem, token statistics with the model's template, leakage)
and deterministic, duplicate-safe, stratified splits."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tunelab.data.io import write_jsonl
from tunelab.data.render import render
from tunelab.data.split import split_file
from tunelab.data.validate import validate_file
from tunelab.errors import TunelabError


def conv(q, a, **extra):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


GOOD = [conv(f"What is {i} plus {i}?", str(2 * i)) for i in range(60)]


def write_lines(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


def test_every_error_kind_is_counted_with_its_first_lines(tmp_path, smol_tokenizer):
    bad = [
        "{not json",
        '["a list"]',
        '{"text": "no messages"}',
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                 {"role": "user", "content": "dangling"}]}),
        json.dumps(GOOD[0]),
        b'{"messages": "caf\xe9"}',
    ]
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(g) for g in GOOD] + bad)
    r = validate_file(path, tokenizer=smol_tokenizer, model="smol")
    assert not r.trainable and r.examples == 70 and r.valid == 61   # the duplicate is valid
    counts = {k: e["count"] for k, e in r.errors.items()}
    assert counts == {"not_json": 1, "not_object": 1, "missing_messages": 1, "unknown_role": 1,
                      "missing_content": 1, "empty_content": 1, "no_assistant": 1,
                      "assistant_not_last": 1, "bad_encoding": 1}
    assert r.duplicates == {"count": 1, "lines": [[69, 1]], "dropped": False}
    assert r.errors["unknown_role"]["first"][0].startswith(f"{path}:64: field 'messages[0].role'")
    text = r.format()
    assert "NOT trainable (9 errors)" in text and "unknown role: 1" in text


def test_token_statistics_match_render_and_max_length_losses(tmp_path, smol_tokenizer):
    rows = GOOD[:20] + [conv("Tell me a long story.", "word " * 300)]
    path = tmp_path / "t.jsonl"
    write_jsonl(path, rows)
    r = validate_file(path, tokenizer=smol_tokenizer, max_length=64, epochs=2)
    rendered = [render(x["messages"], smol_tokenizer) for x in rows]
    lengths = sorted(len(x["input_ids"]) for x in rendered)
    trained = sum(sum(1 for l in x["labels"] if l != -100) for x in rendered)
    lost = sum(sum(1 for l in x["labels"][64:] if l != -100) for x in rendered)
    t = r.tokens
    assert (t["min"], t["max"], t["total_tokens"]) == (lengths[0], lengths[-1], sum(lengths))
    assert t["trained_tokens"] == trained and t["context_tokens"] == sum(lengths) - trained
    assert t["over_max_length"] == 1 and t["trained_tokens_lost"] == lost > 250
    assert t["epoch_tokens"] == sum(min(n, 64) for n in lengths)
    assert t["epoch_trained_tokens"] == trained - lost and t["epochs"] == 2
    assert r.trainable and any("only 21 examples" in w for w in r.warnings)


def test_template_refusals_are_errors_consecutive_roles_named(tmp_path, fresh_tokenizer,
                                                             smol_tokenizer):
    from test_render import GEMMA2, with_template
    tok = with_template(fresh_tokenizer, GEMMA2, bos="<bos>", specials=["<start_of_turn>", "<end_of_turn>"])
    double_user = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                {"role": "assistant", "content": "c"}]}
    system = {"messages": [{"role": "system", "content": "s"}, *GOOD[0]["messages"]]}
    path = tmp_path / "g.jsonl"
    write_jsonl(path, GOOD[1:20] + [double_user, system])
    r = validate_file(path, tokenizer=tok)
    assert r.errors["consecutive_roles"]["count"] == 1 and "alternate" in r.errors["consecutive_roles"]["first"][0]
    assert r.errors["template_refused"]["count"] == 1 and "System role" in r.errors["template_refused"]["first"][0]
    # the same file is fine for ChatML, which allows both
    assert validate_file(path, tokenizer=smol_tokenizer).trainable


def test_too_few_near_duplicates_conflicts_and_leakage(tmp_path):
    few = tmp_path / "few.jsonl"
    write_jsonl(few, GOOD[:5])
    assert validate_file(few).errors["too_few_examples"]["count"] == 1
    train = GOOD[:55] + [conv("WHAT is 1 plus 1", "2"), conv("What is 2 plus 2?", "5")]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "val.jsonl", [GOOD[3], conv("what is 4 plus 4", "8"), conv("new", "x")])
    r = validate_file(tmp_path / "train.jsonl", others=[tmp_path / "val.jsonl"])
    assert r.trainable, r.errors
    w = " | ".join(r.warnings)
    assert "1 near-duplicates (same text up to case, punctuation and spacing): line 56 ~ line 2" in w
    assert "1 prompts appear with different answers" in w   # line 57: 2 plus 2 is 5
    assert f"leakage into {tmp_path / 'val.jsonl'}: 1 identical examples, 1 near-identical" in w


def test_qwen3_multi_turn_counts_one_row_per_turn(tmp_path, fresh_tokenizer):
    from test_render import TWO_TURNS, family
    tok = family(fresh_tokenizer, "qwen3")
    write_jsonl(tmp_path / "q.jsonl", [{"messages": TWO_TURNS}] + GOOD[:10])
    r = validate_file(tmp_path / "q.jsonl", tokenizer=tok)
    assert r.trainable and r.tokens["rows"] == 12 and r.tokens["examples"] == 11


def test_split_is_deterministic_duplicate_safe_and_stratified(tmp_path):
    rows = [conv(f"review {i}", "positive" if i % 5 else "negative", label="pos" if i % 5 else "neg")
            for i in range(200)]
    rows += [rows[7]] * 3   # exact duplicates
    write_jsonl(tmp_path / "all.jsonl", rows)
    a = split_file(tmp_path / "all.jsonl", tmp_path / "a", val=0.1, test=0.2, seed=4, stratify_by="label")
    split_file(tmp_path / "all.jsonl", tmp_path / "b", val=0.1, test=0.2, seed=4, stratify_by="label")
    assert sum(a.values()) == 203
    parts = {}
    for name in ("train", "val", "test"):
        text = (tmp_path / "a" / f"{name}.jsonl").read_text()
        assert text == (tmp_path / "b" / f"{name}.jsonl").read_text()
        parts[name] = [json.loads(l) for l in text.splitlines()]
    keys = {n: {json.dumps(r["messages"]) for r in p} for n, p in parts.items()}
    assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])
    labels = {n: Counter(r["label"] for r in p) for n, p in parts.items()}
    assert labels["test"] == {"pos": 32, "neg": 8} and labels["val"] == {"pos": 16, "neg": 4}
    by_answer = split_file(tmp_path / "all.jsonl", tmp_path / "c", test=0.2, stratify_by="assistant")
    assert by_answer["test"] == 40
    with pytest.raises(TunelabError, match=r"all.jsonl:1: field 'nope': missing"):
        split_file(tmp_path / "all.jsonl", tmp_path / "d", stratify_by="nope")


def test_a_duplicate_is_a_warning_with_its_lines_and_dedupe_drops_it(tmp_path, smol_tokenizer):
    """An exact duplicate never makes a file untrainable (the hosted API trains on it): it is a
    warning naming both lines, counted and trained again; with dedupe it is dropped, and
    drop_duplicates writes the file without it, every other line at its number."""
    from tunelab.data.io import iter_jsonl
    from tunelab.data.validate import drop_duplicates
    rows = GOOD[:20] + [GOOD[3], GOOD[3], GOOD[7]]   # lines 21, 22 = line 4; 23 = line 8
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    r = validate_file(path, tokenizer=smol_tokenizer)
    assert r.trainable and not r.errors and r.valid == 23 and r.tokens["examples"] == 23
    assert r.duplicates == {"count": 3, "lines": [[21, 4], [22, 4], [23, 8]], "dropped": False}
    (dup,) = [w for w in r.warning_details if w["kind"] == "duplicates"]
    assert dup["lines"] == [[21, 4], [22, 4], [23, 8]] and dup["count"] == 3
    assert "line 21 = line 4" in dup["message"] and dup["message"] in r.warnings
    # an exact copy is not also reported as a near-duplicate
    assert not [w for w in r.warning_details if w["kind"] == "near_duplicates"]
    kept = validate_file(path, tokenizer=smol_tokenizer, dedupe=True)
    assert kept.valid == 20 and kept.tokens["examples"] == 20 and kept.duplicates["dropped"]
    assert kept.tokens["total_tokens"] < r.tokens["total_tokens"]

    out = tmp_path / "clean.jsonl"
    assert drop_duplicates(path, out) == [[21, 4], [22, 4], [23, 8]]
    assert [(n, row) for n, row in iter_jsonl(out)] == [(n, row) for n, row in
                                                        enumerate(GOOD[:20], 1)]
    assert validate_file(out).duplicates is None and validate_file(out).examples == 20


def test_error_kinds_come_from_the_error_not_its_words(tmp_path, fresh_tokenizer):
    """validate reads an error's kind, not words in its message: a mask error whose message
    quotes an answer saying 'refused' is a mask error (the words once made it a refusal), a
    refusal that says 'UTF-8' is a refusal, and an unreadable line keeps the kind io gave it."""
    tok = fresh_tokenizer
    # after the user turn 'odd' the generation prompt adds 'X' that the rendering lacks: no
    # loss mask matches inference, and the message quotes the answer ('refused ...')
    tok.chat_template = ("{% for m in messages %}{% if m['content'] == 'boom' %}"
                         "{{ raise_exception('not valid UTF-8 here') }}{% endif %}"
                         "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% if messages[-1]['content'] == 'odd' %}X{% endif %}{% endif %}")
    path = write_lines(tmp_path / "k.jsonl", [json.dumps(g) for g in GOOD[:12]] +
                       [json.dumps(conv("boom", "x")), json.dumps(conv("odd", "refused it")),
                        b"\xff\xfe not utf-8", "{ not json"])
    r = validate_file(path, tokenizer=tok)
    assert {k: e["count"] for k, e in r.errors.items()} == {
        "template_refused": 1, "mask_ambiguous": 1, "bad_encoding": 1, "not_json": 1}, r.errors
    assert "refused it" in r.errors["mask_ambiguous"]["first"][0]


def test_batches_tokenized_while_the_next_is_read_give_the_one_batch_report(tmp_path, monkeypatch,
                                                                            fresh_tokenizer):
    """validate_file tokenizes batch k in a thread while it reads batch k+1: with batches of 7
    the report (counts, first errors in line order, token statistics) is the one-batch report,
    and progress sees every templated example once."""
    import tunelab.data.validate as validate
    from test_render import GEMMA2, with_template
    tok = with_template(fresh_tokenizer, GEMMA2, bos="<bos>", specials=["<start_of_turn>", "<end_of_turn>"])
    system = {"messages": [{"role": "system", "content": "s"}, *GOOD[0]["messages"]]}
    rows = [system if i % 9 == 4 else GOOD[i % 60] | {"n": i} for i in range(100)]
    rows[50] = conv("Tell me a long story.", "word " * 300)
    path = tmp_path / "p.jsonl"
    write_jsonl(path, rows)

    def report(batch: int) -> tuple[dict, int]:
        monkeypatch.setattr(validate, "BATCH", batch)
        seen = []
        r = validate_file(path, tokenizer=tok, max_length=64, progress=seen.append)
        return r.to_json(), sum(seen)

    one, counted_one = report(10_000)
    small, counted_small = report(7)
    assert small == one
    refused = one["errors"]["template_refused"]
    assert refused["count"] == 11
    assert [m.split(":")[1] for m in refused["first"]] == ["5", "14", "23", "32", "41"]
    assert one["tokens"]["over_max_length"] == 1 and one["valid"] == 89
    assert counted_small == counted_one == 100   # every example that reached the template
