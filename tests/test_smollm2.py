"""The real embedded SmolLM2-135M-Instruct: load, render, a few training steps, generate."""
from __future__ import annotations

import json
import warnings

import pytest

import tunelab
from tunelab import models
from tunelab.inference import generate

pytestmark = pytest.mark.slow


def test_smollm2_end_to_end(tmp_path, sound_task, monkeypatch):
    model, tok = models.load("smollm2-135m-instruct")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.generation_config.eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>")
    reply = generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                     max_new_tokens=24)[0]
    assert "Paris" in reply
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")   # as a user runs it (PEFT reads it at each save)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = tunelab.train({"train_file": str(sound_task["train"]),
                                "valid_file": str(sound_task["test"]),
                                "output_dir": str(tmp_path / "run"), "max_steps": 8,
                                "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                                "eval_steps": 2, "save_steps": 2}, quiet=True)
    # the adapter records the builtin's name as its base: PEFT must not look that name up on
    # the Hub at each save (a network call; offline, a warning on the user's terminal)
    assert not [w for w in seen if "remote file" in str(w.message) or
                "save_embedding_layers" in str(w.message)], [str(w.message) for w in seen]
    entries = [json.loads(l) for l in open(result.metrics_file)]
    train_losses = [e["train_loss"] for e in entries if "train_loss" in e]
    assert len(train_losses) == 8 and train_losses[-1] < train_losses[0]
    # 8 steps, not 4: after 4 (valid loss ~2.5) the model has learned that answers are short
    # but not yet what they are, and whether its first token is <|im_end|> (an empty answer)
    # turned on bf16 rounding (autograd's attention backward or tunelab's own, same losses)
    tuned, tok2 = models.load(result.model_dir)
    out = generate(tuned, tok2, [[{"role": "user", "content": "What sound does a cow make?"}]],
                   max_new_tokens=8)[0]
    assert out and len(tok2(out)["input_ids"]) <= 8
