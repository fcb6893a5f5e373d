"""Reading every input kind and converting every format to chat, with bad input reported by
file and line and nothing half-written."""
from __future__ import annotations

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.data.conversation import parse_conversation
from tunelab.data.formats import FORMATS, candidates, convert_file, convert_record, detect_format
from tunelab.data.io import read_records
from tunelab.errors import TunelabError

ROWS = {
    "messages": {"messages": [{"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "4", "weight": 1}]},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be terse."},
                                   {"from": "human", "value": "2+2?"},
                                   {"from": "gpt", "value": "4"}]},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
    "prompt_completion": {"prompt": "2+2?", "completion": "4"},
    "gsm8k": {"question": "Tom has 2 apples and buys 2. How many?",
              "answer": "He has 2+2=<<2+2=4>>4 apples.\n#### 4"},
    "qa": {"question": "Capital of France?", "answer": "Paris"},
}
EXPECTED = {
    "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "weight": 1}],
    "sharegpt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                 {"role": "assistant", "content": "4"}],
    "alpaca": [{"role": "user", "content": "Add the numbers.\n\n2 and 2"},
               {"role": "assistant", "content": "4"}],
    "prompt_completion": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    "gsm8k": [{"role": "user", "content": "Tom has 2 apples and buys 2. How many?"},
              {"role": "assistant", "content": "He has 2+2=4 apples.\n#### 4"}],
    "qa": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_detected_and_converted(fmt):
    assert detect_format([ROWS[fmt]] * 3) == fmt
    out = convert_record(ROWS[fmt], fmt)
    assert out["messages"] == EXPECTED[fmt]
    parse_conversation(out)   # what convert writes is what training accepts


def test_gsm8k_keeps_final_answer_and_system_prompt_is_added_once():
    out = convert_record(ROWS["gsm8k"], "gsm8k", system="Solve it.")
    assert out["final_answer"] == "4" and out["messages"][0] == {"role": "system", "content": "Solve it."}
    sg = convert_record(ROWS["sharegpt"], "sharegpt", system="Other")   # has its own: kept
    assert [m["role"] for m in sg["messages"]] == ["system", "user", "assistant"]
    assert sg["messages"][0]["content"] == "Be terse."
    with pytest.raises(TunelabError, match="####"):
        convert_record({"question": "q", "answer": "no marker"}, "gsm8k")


def test_trl_conversational_prompt_completion_and_json_text_columns():
    row = {"prompt": json.dumps([{"role": "user", "content": "Hi"}]),   # CSV holds lists as JSON
           "completion": [{"role": "assistant", "content": "Hello"}], "label": "greet"}
    out = convert_record(row, "prompt_completion")
    assert out == {"messages": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}], "label": "greet"}


def test_unknown_sharegpt_speaker_names_the_field():
    row = {"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]}
    with pytest.raises(TunelabError) as info:
        convert_record(row, "sharegpt")
    assert info.value.field == "conversations[1].from" and "robot" in str(info.value)


def test_detection_refuses_unknown_and_mixed_fields():
    with pytest.raises(TunelabError, match=r"cannot detect the format from the fields \['text'\]"):
        detect_format([{"text": "x"}])
    with pytest.raises(TunelabError, match="cannot detect"):
        detect_format([ROWS["alpaca"], ROWS["qa"]])
    assert detect_format([ROWS["gsm8k"], ROWS["qa"]]) == "qa"   # not every answer has ####


def write_inputs(tmp_path, rows):
    import datasets
    import pandas as pd
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    return [tmp_path / n for n in ("d.jsonl", "d.json", "d.csv", "d.parquet", "ds")]


def test_every_input_kind_converts_to_the_same_chat_file(tmp_path):
    rows = [dict(ROWS["alpaca"], output=str(i), input="" if i % 2 else "x") for i in range(5)]
    outputs = []
    for src in write_inputs(tmp_path, rows):
        report = convert_file(src, tmp_path / f"out-{src.name}.jsonl", system="S")
        assert report.format == "alpaca" and report.examples == 5
        outputs.append((tmp_path / f"out-{src.name}.jsonl").read_text())
    assert len(set(outputs)) == 1
    first = json.loads(outputs[0].splitlines()[1])
    assert first["messages"] == [{"role": "system", "content": "S"},
                                 {"role": "user", "content": "Add the numbers."},
                                 {"role": "assistant", "content": "1"}]


def test_json_array_errors_and_records_carry_their_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c", "completion": ""}\n]')
    assert [n for n, _ in read_records(p)] == [2, 4]
    with pytest.raises(TunelabError, match=r"a.json:4: field 'completion': is empty"):
        convert_file(p, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("name,content,needle", [
    ("bad.jsonl", b'{"prompt": "a", "completion": "b"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
    ("latin.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9"}\n', "latin.jsonl:2: not valid UTF-8"),
    ("empty.jsonl", b"\n\n", "empty.jsonl: no examples"),
    ("ragged.csv", b"prompt,completion\na,b\nc\n", "ragged.csv:3: row has 1 fields, the header has 2"),
    ("nocol.csv", b"prompt,answer\na,b\n", "cannot detect the format"),
    ("latin.csv", b"prompt,completion\na,caf\xe9\n", "latin.csv:2: not valid UTF-8"),
    ("fake.parquet", b"this is not parquet", "fake.parquet: not a valid Parquet file"),
])
def test_bad_inputs_fail_with_file_and_line_and_write_nothing(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out.jsonl"
    with pytest.raises(TunelabError) as info:
        convert_file(tmp_path / name, out)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [name]


def test_csv_missing_required_column_with_forced_format(tmp_path):
    (tmp_path / "x.csv").write_text("instruction,input\ndo it,now\n")
    with pytest.raises(TunelabError, match=r"x.csv:2: field 'output': missing"):
        convert_file(tmp_path / "x.csv", tmp_path / "o.jsonl", fmt="alpaca")


def test_parquet_with_the_wrong_schema(tmp_path):
    import pandas as pd
    pd.DataFrame({"messages": [5, 6]}).to_parquet(tmp_path / "w.parquet")
    with pytest.raises(TunelabError, match=r"w.parquet:1: field 'messages': must be a non-empty list"):
        convert_file(tmp_path / "w.parquet", tmp_path / "o.jsonl")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "v.parquet")
    with pytest.raises(TunelabError, match=r"v.parquet: cannot detect the format from the fields \['a'\]"):
        convert_file(tmp_path / "v.parquet", tmp_path / "o.jsonl")


def test_50mb_single_line_is_refused_not_loaded(tmp_path):
    p = tmp_path / "huge.jsonl"
    with p.open("wb") as f:
        f.write(b'{"prompt": "a", "completion": "b"}\n{"prompt": "')
        f.write(b"x" * (50 * 2**20))
        f.write(b'", "completion": "b"}\n')
    with pytest.raises(TunelabError, match=r"huge.jsonl:2: line is longer than 16 MiB"):
        convert_file(p, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_all_bad_rows_are_named_at_once(tmp_path):
    rows = [ROWS["qa"], {"question": "q"}, ROWS["qa"], {"question": "", "answer": "a"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TunelabError) as info:
        convert_file(tmp_path / "q.jsonl", tmp_path / "o.jsonl", fmt="qa")
    assert "q.jsonl:2: field 'answer': missing" in str(info.value)
    assert "1 more bad rows: lines 4" in str(info.value)


def test_dataset_dict_folder_asks_for_a_split(tmp_path):
    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_list([ROWS["qa"]])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(TunelabError, match="DatasetDict with splits train"):
        list(read_records(tmp_path / "dd"))
    assert [r for _, r in read_records(tmp_path / "dd" / "train")] == [ROWS["qa"]]


# --- properties -------------------------------------------------------------------------------
text = st.text(alphabet=string.ascii_letters + string.digits + " .,?!\n\u00e9\u4e2d", min_size=1,
               max_size=40).filter(lambda s: s.strip())
turns = st.lists(st.tuples(st.sampled_from(["human", "gpt"]), text), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(turns=turns, system=st.none() | text)
def test_sharegpt_round_trip_property(turns, system):
    turns = turns + [("gpt", "final answer")]
    row = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    assert detect_format([row]) == "sharegpt"
    out = convert_record(row, "sharegpt", system=system)
    msgs = out["messages"][1:] if system else out["messages"]
    assert [(m["role"], m["content"]) for m in msgs] == [
        ({"human": "user", "gpt": "assistant"}[f], v) for f, v in turns]
    parse_conversation(out)


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(["alpaca", "prompt_completion", "qa"]), a=text, b=text, c=text,
       extra=st.dictionaries(st.sampled_from(["id", "label", "source"]), st.integers() | text, max_size=2))
def test_flat_formats_detect_convert_and_keep_extra_fields(fmt, a, b, c, extra):
    keys = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
            "qa": ("question", "answer")}[fmt]
    row = {keys[0]: a, keys[1]: b, **extra}
    if fmt == "alpaca":
        row["input"] = c
    assert detect_format([row]) == fmt and fmt in candidates(row)
    out = convert_record(row, fmt)
    assert out["messages"][-1] == {"role": "assistant", "content": b}
    assert a.strip() in out["messages"][0]["content"] or out["messages"][0]["content"] == a
    assert all(out[k] == v for k, v in extra.items())


@settings(max_examples=40, deadline=None)
@given(row=st.dictionaries(st.text(min_size=1, max_size=8), st.integers() | text, max_size=4))
def test_detection_never_crashes_on_arbitrary_records(row):
    try:
        fmt = detect_format([row])
    except TunelabError as e:
        assert "cannot detect" in str(e)
        return
    try:
        convert_record(row, fmt)
    except TunelabError:
        pass   # a clear error is fine; any other exception type is a bug
