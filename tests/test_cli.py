"""The CLI as a user runs it: real subprocesses, real exit codes, no tracebacks."""
from __future__ import annotations

import json

import pytest

from conftest import assert_clean_error, run_cli as run


def test_data_render_json_matches_library(sound_task, smol_tokenizer):
    from tunelab.data.conversation import read_conversations
    from tunelab.data.render import render
    proc = run("data", "render", sound_task["train"], "--tokenizer", "smollm2-135m-instruct",
               "--json", "--limit", "3")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in proc.stdout.splitlines()]
    convs = read_conversations(sound_task["train"])[:3]
    assert [r["line"] for r in rows] == [1, 2, 3]
    for r, c in zip(rows, convs):
        assert {k: r[k] for k in ("input_ids", "labels")} == render(c.messages, smol_tokenizer)


def test_data_render_human_view_brackets_the_answer(sound_task):
    proc = run("data", "render", sound_task["train"], "--limit", "1")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(sound_task["train"].read_text().splitlines()[0])["messages"][1]["content"]
    assert f"[[{answer}<|im_end|>]]" in proc.stdout
    assert "trained" in proc.stdout.splitlines()[0]


def test_train_eval_chat_end_to_end(tmp_path, tiny_model_dir, sound_task):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ntrain_file: {sound_task['train']}\n"
                   f"valid_file: {sound_task['test']}\nmethod: full\nprecision: fp32\n")
    out = tmp_path / "run"
    proc = run("train", cfg, "--set", f"output_dir={out}", "--set", "epochs=20",
               "--set", "learning_rate=3e-3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parameters trainable" in proc.stdout and str(out / "model") in proc.stdout
    ev = run("eval", "--model", out / "model", "--data", sound_task["test"], "--json")
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    # a few short answers repeated: --task auto scores it as classification
    assert report["examples"] == 8 and report["task"]["task"] == "classification"
    assert report["metrics"]["accuracy"] >= 0.9 and report["metrics"]["test_loss"] < 1.0
    chat = run("chat", out / "model", "--prompt", "What sound does a cow make?")
    assert chat.returncode == 0 and chat.stdout.strip() == "moo", chat.stdout + chat.stderr
    interactive = run("chat", out / "model", input="What does the duck say?\n/exit\n")
    assert interactive.returncode == 0 and "model> quack" in interactive.stdout


@pytest.mark.parametrize("args,needles", [
    (["eval", "--model", "no such model", "--data", "{train}"], ["unknown model spec"]),
    (["eval", "--model", "{model}", "--data", "{dir}/missing.jsonl"], ["missing.jsonl", "not found"]),
    (["data", "render", "{dir}/bad.jsonl"], ["bad.jsonl:2", "messages[0].role", "unknown role"]),
    (["train", "{dir}/typo.yaml"], ["typo.yaml", "learning_rat", "did you mean 'learning_rate'"]),
    (["train", "{dir}/badfile.yaml"], ["bad.jsonl:2", "unknown role"]),
])
def test_bad_input_is_one_clean_line(tmp_path, tiny_model_dir, sound_task, args, needles):
    d = sound_task["dir"]
    (d / "bad.jsonl").write_text(sound_task["train"].read_text().splitlines()[0] + "\n"
                                 '{"messages": [{"role": "bot", "content": "x"}]}\n')
    (d / "typo.yaml").write_text(f"train_file: {sound_task['train']}\nlearning_rat: 0.1\n")
    (d / "badfile.yaml").write_text(f"model: {tiny_model_dir}\ntrain_file: {d / 'bad.jsonl'}\n"
                                    f"output_dir: {tmp_path / 'never'}\n")
    fmt = {"train": sound_task["train"], "dir": d, "model": tiny_model_dir}
    proc = run(*[a.format(**fmt) for a in args])
    assert_clean_error(proc, *needles)
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()


def test_usage_error_exits_2():
    proc = run("train")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
