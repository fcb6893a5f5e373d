"""Preference pairs in the data layer: every format detected and converted to OpenAI's DPO format
(JSONL, CSV with JSON cells, Parquet), bad rows named by file, line and field with nothing
half-written; `data validate` with the same machinery as conversations (error kinds, token
statistics per side, pinned against the DPO objective's own rendering); splits that never put
one prompt in two splits; uploads converted and validated, their kind readable by job code."""
from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_clean_error, run_cli as run
from tunelab.data.formats import candidates, convert_file, convert_record, detect_format
from tunelab.data.io import write_jsonl
from tunelab.data.preference import (PREFERENCE_FORMATS, data_kind_of, pair_problems,
                                     preference_format, read_preferences)
from tunelab.data.split import split_file
from tunelab.data.validate import validate_file
from tunelab.errors import TunelabError

SYSTEM = {"role": "system", "content": "Answer with a number."}
USER = {"role": "user", "content": "How many legs has a cat?"}
EXPECTED = {"input": {"messages": [SYSTEM, USER]},
            "preferred_output": [{"role": "assistant", "content": "4"}],
            "non_preferred_output": [{"role": "assistant", "content": "Cats have four legs."}]}
ROWS = {
    "openai_dpo": EXPECTED,
    "trl_conversational": {"prompt": [SYSTEM, USER],
                           "chosen": [{"role": "assistant", "content": "4"}],
                           "rejected": [{"role": "assistant", "content": "Cats have four legs."}]},
    "trl_standard": {"prompt": USER["content"], "chosen": "4",
                     "rejected": "Cats have four legs."},
    "trl_implicit": {"chosen": [SYSTEM, USER, {"role": "assistant", "content": "4"}],
                     "rejected": [SYSTEM, USER, {"role": "assistant",
                                                 "content": "Cats have four legs."}]},
}


def pair(q: str, chosen: str, rejected: str, **extra) -> dict:
    return {"input": {"messages": [{"role": "user", "content": q}]},
            "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}], **extra}


def trl(q: str, chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": q, "chosen": chosen, "rejected": rejected, **extra}


GOOD = [trl(f"What is {i} plus {i}?", str(2 * i), f"It is probably {2 * i + 1}, I think.",
            label="even" if i % 2 == 0 else "odd") for i in range(60)]


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the formats --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", PREFERENCE_FORMATS)
def test_each_preference_format_is_detected_and_converted_to_openai_dpo(fmt):
    row = dict(ROWS[fmt], id=7)
    assert preference_format(row) == fmt and detect_format([row] * 3) == fmt
    out = convert_record(row, fmt)
    assert out == dict(EXPECTED if fmt != "trl_standard" else
                       {**EXPECTED, "input": {"messages": [USER]}}, id=7)
    pair_, found = pair_problems(out)   # what convert writes is what DPO training reads
    assert not found and pair_.extra == {"id": 7}
    assert pair_problems(row)[0].to_json() == out


def test_system_message_is_added_once_and_answers_repeating_the_prompt_are_cut():
    out = convert_record(ROWS["trl_standard"], "trl_standard", system="Be terse.")
    assert out["input"]["messages"][0] == {"role": "system", "content": "Be terse."}
    kept = convert_record(ROWS["openai_dpo"], "openai_dpo", system="Other")   # has its own
    assert kept["input"]["messages"][0] == SYSTEM and len(kept["input"]["messages"]) == 2
    # HuggingFaceH4/ultrafeedback_binarized: the answers repeat the prompt turn (TRL cuts it),
    # and a `messages` copy of the chosen conversation rides along: still a pair
    h4 = {"prompt": USER["content"], "chosen": [USER, {"role": "assistant", "content": "4"}],
          "rejected": [USER, {"role": "assistant", "content": "Cats have four legs."}],
          "messages": [USER, {"role": "assistant", "content": "4"}], "score_chosen": 9.0}
    assert candidates(h4)[0] == "trl_standard" and "messages" in candidates(h4)
    assert detect_format([h4]) == "trl_standard"
    assert convert_record(h4, "trl_standard") == {**EXPECTED, "input": {"messages": [USER]},
                                                  "score_chosen": 9.0}


def test_every_input_kind_converts_to_the_same_dpo_file(tmp_path):
    import pandas as pd
    rows = [{"prompt": json.dumps([USER]), "chosen": json.dumps([{"role": "assistant",
                                                                  "content": str(i)}]),
             "rejected": f"[INST] not {i} [/INST]", "label": "odd" if i % 2 else "even"}
            for i in range(6)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)     # JSON text in cells
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    outputs = []
    for src in ("p.jsonl", "p.csv", "p.parquet"):
        report = convert_file(tmp_path / src, tmp_path / f"{src}.out")
        assert (report.format, report.kind, report.examples) == ("trl_conversational",
                                                                 "preferences", 6)
        outputs.append((tmp_path / f"{src}.out").read_text())
    assert len(set(outputs)) == 1
    first = json.loads(outputs[0].splitlines()[1])
    # "[INST] ..." opens like a list but is text: it stays the answer, not a JSON error
    assert first == {"input": {"messages": [USER]},
                     "preferred_output": [{"role": "assistant", "content": "1"}],
                     "non_preferred_output": [{"role": "assistant",
                                               "content": "[INST] not 1 [/INST]"}],
                     "label": "odd"}
    assert [p.chosen for p in read_preferences(tmp_path / "p.jsonl.out")] == list("012345")


def test_bad_rows_are_all_named_and_nothing_is_written(tmp_path):
    import pandas as pd
    rows = [trl(f"q{i}", f"a{i}", f"b{i}") for i in range(6)]
    rows[1]["rejected"] = "a1 "                                  # identical (up to spacing)
    rows[3]["chosen"] = '[{"role": "assistant", "content": '     # broken JSON cell
    rows[4]["prompt"] = ""
    pd.DataFrame(rows).to_csv(tmp_path / "bad.csv", index=False)
    out = tmp_path / "out.jsonl"
    with pytest.raises(TunelabError) as info:
        convert_file(tmp_path / "bad.csv", out)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'bad.csv'}:3: field 'rejected': is the same text as "
                          "the chosen answer")
    assert "(and 2 more bad rows: lines 5, 6)" in msg and "\n" not in msg
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]
    # a forced format names the field each row lacks
    write_jsonl(tmp_path / "t.jsonl", [trl("q", "a", "b")])
    with pytest.raises(TunelabError, match=r"t.jsonl:1: field 'input': missing \(format "
                                           r"openai_dpo needs"):
        convert_file(tmp_path / "t.jsonl", out, fmt="openai_dpo")
    with pytest.raises(TunelabError, match="holds preference pairs .*, not conversations"):
        convert_file(tmp_path / "t.jsonl", out, kind="conversations")
    assert not out.exists()


@pytest.mark.parametrize("record, kind, field", [
    (trl("q", "same", " same"), "identical_pair", "rejected"),
    (trl("q", "", "b"), "empty_content", "chosen"),
    (trl("  ", "a", "b"), "empty_content", "prompt"),
    ({"prompt": [USER, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     "prompt_not_user", "prompt[1].role"),
    (pair("q", "a", "b") | {"input": {"messages": [SYSTEM]}}, "prompt_not_user",
     "input.messages[0].role"),
    (pair("q", "a", "b") | {"input": {"messages": [{"role": "robot", "content": "x"}]}},
     "unknown_role", "input.messages[0].role"),
    (pair("q", "a", "b") | {"input": {"messages": []}}, "missing_messages", "input.messages"),
    (pair("q", "a", "b") | {"input": "hello"}, "missing_messages", "input.messages"),
    (pair("q", "a", "b") | {"preferred_output": []}, "bad_answer", "preferred_output"),
    (pair("q", "a", "b") | {"preferred_output": [{"role": "assistant", "content": "a"}] * 2},
     "bad_answer", "preferred_output"),
    (pair("q", "a", "b") | {"non_preferred_output": [{"role": "user", "content": "b"}]},
     "unknown_role", "non_preferred_output[0].role"),
    (pair("q", "a", "b") | {"non_preferred_output": [{"role": "assistant", "content": 3}]},
     "missing_content", "non_preferred_output[0].content"),
    ({"chosen": [USER, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "no_shared_prompt", "rejected"),
    ({"chosen": [USER, {"role": "assistant", "content": "a"}],
      "rejected": [USER, {"role": "assistant", "content": "b"}, USER]}, "bad_answer",
     "rejected"),
    (["not", "an", "object"], "not_object", None),
    ({"prompt": "q", "chosen": "a"}, "not_preference", None),
])
def test_pair_problems_have_stable_kinds_and_fields(record, kind, field):
    got, found = pair_problems(record)
    assert got is None and (found[0].kind, found[0].field) == (kind, field), found


def test_a_row_in_the_files_format_lacking_fields_is_told_which():
    got, found = pair_problems({"prompt": "q", "chosen": "a"}, "trl_standard")
    assert [(p.kind, p.field) for p in found] == [("missing_field", "rejected")]
    assert "format trl_standard needs: prompt, chosen, rejected" in found[0].message


text = st.text(alphabet=string.ascii_letters + " .,?![]{}\"\u00e9", min_size=1, max_size=20)
values = st.recursive(st.none() | st.integers() | text,
                      lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.sampled_from(["role", "content", "messages"]), inner,
                                      max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(row=st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "input",
                                            "preferred_output", "non_preferred_output",
                                            "messages", "label"]), values, max_size=5))
def test_reading_any_record_gives_a_pair_or_problems_never_a_crash(row):
    got, found = pair_problems(row)
    assert (got is None) == bool(found)
    if got is not None:    # a pair survives its own round trip through OpenAI's format
        again, more = pair_problems(got.to_json())
        assert not more and (again.prompt, again.chosen, again.rejected) == \
            (got.prompt, got.chosen, got.rejected)
    for fmt in candidates(row):
        try:
            convert_record(row, fmt)
        except TunelabError:
            pass           # a clear error is fine; any other exception type is a bug


# ---- validate -----------------------------------------------------------------------------------
def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_validate_counts_every_error_kind_with_its_line_and_field(tmp_path, smol_tokenizer):
    bad = [trl("q", "same", "same"),
           trl("", "a", "b"),
           {"prompt": [USER, {"role": "assistant", "content": "x"}], "chosen": "a",
            "rejected": "b"},
           {"prompt": "q2", "chosen": [{"role": "assistant", "content": "a"}] * 2,
            "rejected": "c"},
           {"prompt": "q3", "chosen": "a"},
           GOOD[0],
           "{oops"]
    path = write_lines(tmp_path / "p.jsonl", GOOD + bad)
    r = validate_file(path, tokenizer=smol_tokenizer, model="smol")
    assert (r.kind, r.preference_format) == ("preferences", "trl_standard")
    # an exact duplicate is a warning with its lines (trained again unless deduped), not an error
    assert not r.trainable and r.examples == 67 and r.valid == 61
    assert {k: e["count"] for k, e in r.errors.items()} == {
        "identical_pair": 1, "empty_content": 1, "prompt_not_user": 1, "bad_answer": 1,
        "missing_field": 1, "not_json": 1}
    assert r.duplicates == {"count": 1, "lines": [[66, 1]], "dropped": False}
    assert any("line 66 = line 1" in w for w in r.warnings)
    assert r.errors["missing_field"]["first"] == [
        f"{path}:65: field 'rejected': missing (format trl_standard needs: prompt, chosen, "
        "rejected)"]
    assert r.errors["prompt_not_user"]["first"][0].startswith(f"{path}:63: field "
                                                              "'prompt[1].role'")
    report = r.to_json()
    assert report["kind"] == "preferences" and report["format"] == "trl_standard"
    text = r.format()
    assert "preference pairs (trl_standard)" in text and "pairs      67 (61 valid)" in text
    assert "chosen and rejected identical: 1" in text and "NOT trainable (6 errors)" in text


def test_validate_token_statistics_per_side_match_the_dpo_rendering(tmp_path, smol_tokenizer):
    from tunelab.objectives.dpo import render_pairs
    rows = [pair(f"Question {i}?", f"Answer {i}", "No. " * (i % 3 + 1)) for i in range(12)]
    rows.append(pair("Tell me a story.", "Once.", "word " * 200))    # cut by max_length
    path = write_lines(tmp_path / "p.jsonl", rows)
    r = validate_file(path, tokenizer=smol_tokenizer, max_length=64, epochs=2)
    assert r.trainable, r.errors
    t = r.tokens
    full = render_pairs(read_preferences(path), smol_tokenizer, max_length=None)
    cut = render_pairs(read_preferences(path), smol_tokenizer, max_length=64)
    trained = lambda labels: sum(1 for x in labels if x != -100)   # noqa: E731
    prompt = [next(k for k, x in enumerate(row["chosen_labels"]) if x != -100) for row in full]
    chosen = [trained(row["chosen_labels"]) for row in full]
    rejected = [trained(row["rejected_labels"]) for row in full]
    both = [len(row["chosen_input_ids"]) + len(row["rejected_input_ids"]) for row in full]
    assert t["sides"]["prompt"]["total"] == sum(prompt)
    assert (t["sides"]["chosen"]["total"], t["sides"]["rejected"]["total"]) == \
        (sum(chosen), sum(rejected))
    assert t["sides"]["rejected"]["max"] == max(rejected) > 200
    assert t["total_tokens"] == sum(both) and t["trained_tokens"] == sum(chosen + rejected)
    assert t["max"] == max(max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
                           for row in full)
    assert t["over_max_length"] == 1
    kept_trained = sum(trained(row["chosen_labels"]) + trained(row["rejected_labels"])
                       for row in cut)
    assert t["trained_tokens_lost"] == sum(chosen + rejected) - kept_trained > 150
    assert t["epoch_tokens"] == sum(len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])
                                    for row in cut)
    assert sum(t["histogram"]["counts"]) == 13 and t["examples"] == t["rows"] == 13
    assert "rejected answer  min" in r.format()


def test_validate_pairs_warnings_contradictions_leakage_and_long_prompts(tmp_path,
                                                                        smol_tokenizer):
    train = GOOD[:55] + [trl("What is 1 plus 1?", "It is probably 3, I think.", "2"),  # flipped
                         trl("Capital of France?", "Paris.", "paris"),
                         trl("Long " * 80, "a", "b")]
    write_lines(tmp_path / "train.jsonl", train)
    val = [pair("what is 3 plus 3", "6", "7"), GOOD[4], pair("fresh", "x", "y")]
    write_lines(tmp_path / "val.jsonl", val)
    sft = [{"messages": [{"role": "user", "content": "What is 5 plus 5?"},
                         {"role": "assistant", "content": "10"}]}]
    write_lines(tmp_path / "sft.jsonl", sft)
    r = validate_file(tmp_path / "train.jsonl", tokenizer=smol_tokenizer, max_length=64,
                      others=[tmp_path / "val.jsonl", tmp_path / "sft.jsonl"])
    assert r.trainable, r.errors
    w = " | ".join(r.warnings)
    assert "1 pairs contradict another pair" in w
    assert "1 pairs whose answers differ only in case, punctuation or spacing" in w
    assert "lines 57" in w
    assert "1 pairs have a prompt of max length (64 tokens) or more" in w and "lines 58" in w
    assert f"leakage into {tmp_path / 'val.jsonl'}: 1 identical pairs, 0 near-identical, " \
           "2 shared prompts" in w     # GOOD[4] itself; "what is 3 plus 3" up to case and "?"
    # a conversation file shares prompts with a pair file by the same key
    assert f"leakage into {tmp_path / 'sft.jsonl'}: 0 identical pairs, 0 near-identical, " \
           "1 shared prompts" in w


def test_validate_refuses_a_pair_whose_prompt_tokens_differ(tmp_path, fresh_tokenizer):
    # no separator between the prompt and the answer: "hel" + "lo" merge into one token
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>{{ m.content }}"
        "{% else %}{{ m.content }}<|im_end|>{% endif %}{% endfor %}")
    rows = [pair(f"Question {i}.", f" yes {i}", f" no {i}") for i in range(10)]
    rows.append(pair("Say hel", "lo", " world"))
    path = write_lines(tmp_path / "p.jsonl", rows)
    r = validate_file(path, tokenizer=fresh_tokenizer)
    assert list(r.errors) == ["prompt_mismatch"] and r.valid == 10
    assert r.errors["prompt_mismatch"]["first"][0].startswith(
        f"{path}:11: field 'input.messages': the chat template renders the prompt differently")


def test_validate_json_says_the_kind_of_data(tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": f"a{i}"}]} for i in range(12)]
    assert validate_file(write_lines(tmp_path / "c.jsonl", chats)).to_json()["kind"] == \
        "conversations"
    r = validate_file(write_lines(tmp_path / "p.jsonl", [pair(f"q{i}", "a", "b")
                                                          for i in range(12)]))
    assert r.to_json()["kind"] == "preferences" and r.trainable and r.tokens is None


# ---- split --------------------------------------------------------------------------------------
def test_split_keeps_every_pair_of_a_prompt_in_one_split_and_stratifies(tmp_path):
    rows = []
    for i in range(40):
        topic = "math" if i % 4 == 0 else "chat"
        for j in range(3):   # three pairs per prompt, one spelled differently
            q = f"Question number {i}?" if j < 2 else f"question NUMBER {i}"
            rows.append(trl(q, f"good {i}.{j}", f"bad {i}.{j}", topic=topic))
    write_lines(tmp_path / "all.jsonl", rows)
    counts = split_file(tmp_path / "all.jsonl", tmp_path / "a", val=0.25, test=0.25, seed=3,
                        stratify_by="topic")
    split_file(tmp_path / "all.jsonl", tmp_path / "b", val=0.25, test=0.25, seed=3,
               stratify_by="topic")
    assert counts == {"train": 60, "val": 30, "test": 30}
    prompts, topics = {}, {}
    for name in ("train", "val", "test"):
        text = (tmp_path / "a" / f"{name}.jsonl").read_text()
        assert text == (tmp_path / "b" / f"{name}.jsonl").read_text()   # deterministic
        part = [json.loads(l) for l in text.splitlines()]
        prompts[name] = {r["prompt"].lower().strip("?") for r in part}
        topics[name] = Counter(r["topic"] for r in part)
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"]
                or prompts["val"] & prompts["test"])
    assert topics["test"] == {"chat": 24, "math": 6} and topics["val"] == {"chat": 24, "math": 6}
    with pytest.raises(TunelabError, match=r"all.jsonl:1: field 'nope': missing"):
        split_file(tmp_path / "all.jsonl", tmp_path / "c", stratify_by="nope")


# ---- the CLI ------------------------------------------------------------------------------------
def test_cli_convert_validate_split_preferences(tmp_path):
    import pandas as pd
    pd.DataFrame(GOOD).to_parquet(tmp_path / "p.parquet")
    out = tmp_path / "dpo.jsonl"
    proc = run("data", "convert", tmp_path / "p.parquet", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert f"converted 60 preference pairs (trl_standard -> OpenAI DPO format) -> {out}" \
        in proc.stderr
    assert lines_of(out)[0] == pair("What is 0 plus 0?", "0", "It is probably 1, I think.",
                                    label="even")
    proc = run("data", "split", out, "--val", "0.2", "--test", "0.2", "-o", tmp_path / "s",
               "--stratify-by", "label")
    assert proc.returncode == 0 and "train 36  val 12  test 12" in proc.stderr, proc.stderr
    proc = run("data", "validate", tmp_path / "s" / "train.jsonl", "--json", "--max-length",
               "64", "--val", tmp_path / "s" / "val.jsonl")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kind"] == "preferences" and report["format"] == "openai_dpo"
    assert report["examples"] == 36 and report["trainable"]
    assert report["warnings"] == ["only 36 pairs: fine-tuning usually needs at least 50, often "
                                  "hundreds"]     # no leakage into val, no prompt too long
    assert set(report["tokens"]["sides"]) == {"prompt", "chosen", "rejected"}
    assert report["tokens"]["max_length"] == 64
    # errors: one line each, no traceback, nothing written
    assert_clean_error(run("data", "convert", tmp_path / "p.parquet", "-o", tmp_path / "x",
                           "--to", "chat"), "p.parquet", "holds preference pairs")
    assert_clean_error(run("data", "convert", tmp_path / "p.parquet", "-o", tmp_path / "x",
                           "--to", "kto"), "field 'to'", "chat, dpo")
    write_lines(tmp_path / "bad.jsonl", GOOD[:3] + [trl("q", "a", "a")])
    assert_clean_error(run("data", "convert", tmp_path / "bad.jsonl", "-o", tmp_path / "x"),
                       "bad.jsonl:4: field 'rejected': is the same text")
    assert not (tmp_path / "x").exists()
    proc = run("data", "validate", tmp_path / "bad.jsonl", "--no-tokens")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "chosen and rejected identical: 1" in proc.stdout
    assert "bad.jsonl:4: field 'rejected'" in proc.stdout


# ---- uploads and the kind of a file -------------------------------------------------------------
def upload(store, tmp_path, name: str, data: bytes, model: str | None = None):
    from tunelab.jobs import uploads
    src = tmp_path / f"src-{name}"
    src.write_bytes(data)
    f = uploads.new_file(store, "me", name, "fine-tune", source=src)
    return uploads.process(store, f, model=model)


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_uploads_convert_preferences_to_openai_dpo_and_record_their_kind(tmp_path, monkeypatch,
                                                                         smol_tokenizer):
    import pandas as pd

    from tunelab.jobs import uploads
    from tunelab.jobs.store import Store
    store = Store(tmp_path / "data")
    # the session's tokenizer as the server's statistics model (loading it again takes seconds)
    monkeypatch.setitem(uploads.tokenizers._cache, "smol", smol_tokenizer)
    f = upload(store, tmp_path, "prefs.jsonl", jsonl(GOOD), model="smol")
    assert f.status == "processed", f.status_details
    v = f.validation
    assert (v["kind"], v["format"], v["examples"], v["trainable"]) == \
        ("preferences", "trl_standard", 60, True)
    assert set(v["tokens"]["sides"]) == {"prompt", "chosen", "rejected"}
    data = store.path(f.data_path)
    assert lines_of(data)[1] == pair("What is 1 plus 1?", "2", "It is probably 3, I think.",
                                     label="odd")
    assert data_kind_of(data) == "preferences"
    pd.DataFrame(GOOD).to_csv(tmp_path / "p.csv", index=False)
    g = upload(store, tmp_path, "prefs.csv", (tmp_path / "p.csv").read_bytes())
    assert g.status == "processed" and g.validation["kind"] == "preferences"
    assert store.path(g.data_path).read_text() == data.read_text()
    # conversations: as before
    chats = [{"messages": [{"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": f"a{i}"}]} for i in range(12)]
    c = upload(store, tmp_path, "chats.jsonl", jsonl(chats))
    assert c.status == "processed" and (c.format, c.validation["kind"]) == \
        ("messages", "conversations")
    assert data_kind_of(store.path(c.data_path)) == "conversations"
    # split keeps the kind; its parts are processed preference files
    parts = uploads.split(store, f, val=0.2, test=0.2, seed=0, stratify_by="label", model=None)
    assert {k: (p.status, p.validation["kind"], p.validation["examples"])
            for k, p in parts.items()} == {"train": ("processed", "preferences", 36),
                                           "validation": ("processed", "preferences", 12),
                                           "test": ("processed", "preferences", 12)}


def test_a_bad_preference_upload_names_the_users_file_and_lines(tmp_path):
    from tunelab.jobs.store import Store
    store = Store(tmp_path / "data")
    rows = GOOD[:20] + [trl("q", "same", "same"), {"prompt": "q2", "chosen": "a"}]
    f = upload(store, tmp_path, "mine.jsonl", jsonl(rows) + b"{oops\n")
    assert f.status == "error" and f.data_path is None
    assert f.status_details.startswith("mine.jsonl:21: field 'rejected': is the same text")
    assert "mine.jsonl:22: field 'rejected': missing" in f.status_details
    errors = f.validation["errors"]
    assert {k: e["count"] for k, e in errors.items()} == {"identical_pair": 1,
                                                          "missing_field": 1, "not_json": 1}
    assert f.validation["kind"] == "preferences"
    assert str(store.root) not in json.dumps(f.validation)
    assert not list((store.path("files") / f.id).glob("data.jsonl"))
    # a CSV that fails conversion: every bad row, by the user's name, nothing kept
    csv = "prompt,chosen,rejected\n" + "".join(f"q{i},a{i},b{i}\n" for i in range(12)) + \
        "q,same,same\n"
    g = upload(store, tmp_path, "mine.csv", csv.encode())
    assert g.status == "error" and g.validation["kind"] == "preferences"
    assert g.validation["examples"] == 13 and g.validation["errors"]["conversion"]["count"] == 1
    assert g.status_details == "mine.csv:14: field 'rejected': is the same text as the chosen " \
                               "answer: the pair teaches nothing"


def test_data_kind_of_reads_the_first_rows_and_names_a_file_of_neither(tmp_path):
    assert data_kind_of(write_lines(tmp_path / "p.jsonl", [ROWS["trl_implicit"]])) == \
        "preferences"
    import pandas as pd
    pd.DataFrame([ROWS["trl_standard"]] * 3).to_parquet(tmp_path / "p.parquet")
    assert data_kind_of(tmp_path / "p.parquet") == "preferences"
    with pytest.raises(TunelabError) as info:
        data_kind_of(write_lines(tmp_path / "n.jsonl", [{"text": "hello"}]))
    assert info.value.file == str(tmp_path / "n.jsonl") and "neither" in str(info.value)
    with pytest.raises(TunelabError, match="file not found"):
        data_kind_of(tmp_path / "missing.jsonl")


def test_reading_conversations_as_preferences_says_what_the_file_holds(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"messages": [USER, {"role": "assistant",
                                                                   "content": "4"}]}])
    with pytest.raises(TunelabError) as info:
        read_preferences(path)
    assert info.value.file == str(path)
    assert "holds conversations (SFT data), not preference pairs" in str(info.value)
    mixed = write_lines(tmp_path / "m.jsonl", [ROWS["trl_standard"], ROWS["trl_conversational"]])
    assert [p.prompt for p in read_preferences(mixed)] == [[USER], [SYSTEM, USER]]
