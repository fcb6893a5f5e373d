"""`tunelab data convert|template|validate|split` as a user runs them: exit codes, one-line
errors without tracebacks, and no half-written output."""
from __future__ import annotations

import json

from conftest import assert_clean_error, run_cli as run


def test_convert_split_validate_pipeline(tmp_path, smol_tokenizer):
    rows = [{"instruction": f"Is {i} even?", "output": "yes" if i % 2 == 0 else "no",
             "label": "even" if i % 2 == 0 else "odd"} for i in range(100)]
    src = tmp_path / "alpaca.csv"
    import pandas as pd
    pd.DataFrame(rows).to_csv(src, index=False)
    proc = run("data", "convert", src, "--to", "chat", "-o", tmp_path / "chat.jsonl",
               "--system", "Answer yes or no.")
    assert proc.returncode == 0, proc.stderr
    assert "converted 100 examples (alpaca)" in proc.stderr
    first = json.loads((tmp_path / "chat.jsonl").read_text().splitlines()[0])
    assert first == {"messages": [{"role": "system", "content": "Answer yes or no."},
                                  {"role": "user", "content": "Is 0 even?"},
                                  {"role": "assistant", "content": "yes"}], "label": "even"}
    proc = run("data", "split", tmp_path / "chat.jsonl", "--val", "0.1", "--test", "0.2",
               "--seed", "1", "-o", tmp_path / "splits", "--stratify-by", "label")
    assert proc.returncode == 0 and "train 70  val 10  test 20" in proc.stderr, proc.stderr
    proc = run("data", "validate", tmp_path / "splits" / "train.jsonl", "--json",
               "--val", tmp_path / "splits" / "val.jsonl", "--max-length", "32")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["trainable"] and report["examples"] == 70 and not report["warnings"]
    assert report["tokens"]["max_length"] == 32 and report["tokens"]["trained_tokens"] == 140


def test_validate_exits_1_with_a_readable_report(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{oops\n')
    proc = run("data", "validate", tmp_path / "bad.jsonl", "--no-tokens")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "missing messages: 1" in proc.stdout and "not JSON: 1" in proc.stdout
    assert "too few examples" in proc.stdout and "NOT trainable (3 errors)" in proc.stdout


def test_template_and_bad_input_errors(tmp_path):
    src = tmp_path / "reviews.jsonl"
    src.write_text(json.dumps({"review": "Great kettle", "sentiment": "positive"}) + "\n" +
                   json.dumps({"review": "Broke"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert_clean_error(run("data", "template", src, "--template", "review-sentiment", "-o", out),
                       "reviews.jsonl:2: field 'sentiment': missing")
    assert not out.exists()
    proc = run("data", "template", src, "-t", "review-sentiment", "-o", out, "--skip-invalid")
    assert proc.returncode == 0 and "skipped" in proc.stderr and "reviews.jsonl:2" in proc.stderr
    assert len(out.read_text().splitlines()) == 1
    proc = run("data", "template", "--list")
    assert proc.returncode == 0 and "review-rating" in proc.stdout and "translate" in proc.stdout
    (tmp_path / "x.parquet").write_bytes(b"garbage")
    assert_clean_error(run("data", "convert", tmp_path / "x.parquet", "-o", tmp_path / "y.jsonl"),
                       "x.parquet", "not a valid Parquet file")
    assert_clean_error(run("data", "convert", src, "-o", tmp_path / "y.jsonl", "--from", "nope"),
                       "unknown format 'nope'")
    assert not (tmp_path / "y.jsonl").exists()


def test_duplicates_are_a_warning_and_convert_dedupe_drops_them(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Is {i} even?"},
                          {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}]}
            for i in range(12)]
    src = tmp_path / "dups.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows + [rows[2], rows[5]]))
    proc = run("data", "validate", src, "--no-tokens")
    assert proc.returncode == 0, proc.stdout                   # trainable: a warning only
    assert "2 exact duplicate examples (line 13 = line 3, line 14 = line 6)" in proc.stdout
    assert "result     trainable" in proc.stdout
    report = json.loads(run("data", "validate", src, "--no-tokens", "--json").stdout)
    assert report["duplicates"] == {"count": 2, "lines": [[13, 3], [14, 6]], "dropped": False}
    assert [w["kind"] for w in report["warning_details"]] == ["few_examples", "duplicates"]

    out = tmp_path / "clean.jsonl"
    proc = run("data", "convert", src, "-o", out, "--dedupe")
    assert proc.returncode == 0, proc.stderr
    assert "converted 12 examples" in proc.stderr
    assert "dropped 2 exact duplicate examples (row 13 = row 3, row 14 = row 6)" in proc.stderr
    assert [json.loads(l)["messages"] for l in out.read_text().splitlines()] == \
        [r["messages"] for r in rows]
    report = json.loads(run("data", "validate", out, "--no-tokens", "--json").stdout)
    assert report["duplicates"] is None and report["examples"] == 12
    # without --dedupe, convert keeps every row
    run("data", "convert", src, "-o", out)
    assert len(out.read_text().splitlines()) == 14
