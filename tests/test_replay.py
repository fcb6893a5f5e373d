"""Replay against forgetting: the packaged prompt pool, `tunelab data replay` (the base model's
own answers) and training with `replay_file`."""
from __future__ import annotations

import json
import re

import pytest

import tunelab
from tunelab.data.io import write_jsonl
from tunelab.data.replay import make_replay, replay_prompts
from tunelab.errors import TunelabError
from tunelab.evaluate.general import load_general_items
from tunelab.train.events import TrainEvent

from conftest import assert_clean_error, run_cli


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_the_packaged_pool_shares_no_prompt_with_the_general_check():
    pool = replay_prompts()
    assert len(pool) == 240 and len({_norm(p) for p in pool}) == 240
    checked = {_norm(m["content"]) for item in load_general_items() for m in item.messages
               if m["role"] == "user"}
    assert checked and not checked & {_norm(p) for p in pool}


def test_a_bad_prompt_file_is_named_by_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "Say hi."}\n{"prompt": ""}\n')
    with pytest.raises(TunelabError) as e:
        replay_prompts(bad)
    assert e.value.line == 2 and e.value.field == "prompt"
    with pytest.raises(TunelabError, match="240 prompts; cannot draw 241") as e:
        make_replay("unused", 241)
    assert e.value.field == "n"


def test_training_mixes_the_replay_file_in(tmp_path, tiny_model_dir, sound_task):
    replay = [{"messages": [{"role": "user", "content": f"Name a colour, please ({i})."},
                            {"role": "assistant", "content": "Blue."}]} for i in range(6)]
    write_jsonl(tmp_path / "replay.jsonl", replay)
    events: list[TrainEvent] = []
    result = tunelab.train({"model": str(tiny_model_dir), "train_file": str(sound_task["train"]),
                            "replay_file": str(tmp_path / "replay.jsonl"),
                            "output_dir": str(tmp_path / "run"), "max_steps": 2,
                            "batch_size": 4, "precision": "fp32"}, quiet=True,
                           on_event=events.append)
    started = [e for e in events if e.kind == "started"]
    assert result.train_examples == 40 + 6
    assert started[0].data["replay_examples"] == 6
    with pytest.raises(TunelabError) as e:
        tunelab.train({"model": str(tiny_model_dir), "train_file": str(sound_task["train"]),
                       "replay_file": str(tmp_path / "nope.jsonl"),
                       "output_dir": str(tmp_path / "run2")}, quiet=True)
    assert e.value.field == "replay_file"


@pytest.mark.slow
def test_replay_answers_are_the_base_models_own(tmp_path):
    from tunelab import models
    from tunelab.inference import generate
    out = tmp_path / "replay.jsonl"
    proc = run_cli("data", "replay", "-m", "smollm2-135m-instruct", "-n", "6",
                   "--max-new-tokens", "48", "--precision", "fp32", "-o", out)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kept = int(re.search(r"(\d+) of 6 answers by smollm2-135m-instruct", proc.stderr).group(1))
    assert len(rows) == kept >= 1, proc.stderr
    model, tok = models.load("smollm2-135m-instruct")
    for row in rows:
        user, answer = row["messages"]
        assert user["content"] in replay_prompts() and answer["role"] == "assistant"
        assert generate(model, tok, [[user]], max_new_tokens=48)[0].strip() == answer["content"]
    assert_clean_error(run_cli("data", "replay", "-m", "smollm2-135m-instruct", "-n", "0",
                               "-o", tmp_path / "none.jsonl"), "at least 1")
    assert not (tmp_path / "none.jsonl").exists()
