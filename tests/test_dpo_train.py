"""DPO training (objective: dpo): it learns a preference the model did not have, the reference
model stays what training started from (LoRA: the adapter switched off; full: log-probabilities
computed once), and the run folder, metrics, resume after SIGKILL, cancel and early stopping
work as for SFT."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import tunelab
from tunelab import models
from tunelab.batching import sequence_logps
from tunelab.config import TrainConfig
from tunelab.data.io import write_jsonl
from tunelab.data.preference import read_preferences
from tunelab.errors import TunelabError
from tunelab.objectives.dpo import pad_pairs, render_pairs
from tunelab.train.events import TrainingCancelled

from conftest import PHRASINGS, SOUNDS, sigkill_training

CLI = [sys.executable, "-m", "tunelab.cli"]
VALID_METRICS = {"valid_loss", "valid_reward_accuracy", "valid_reward_margin",
                 "valid_reward_chosen", "valid_reward_rejected"}


def sound_pairs():
    """Animal -> sound as preferences: the right sound chosen, another animal's rejected."""
    rng = random.Random(0)
    rows = []
    for p in PHRASINGS:
        for animal, sound in SOUNDS.items():
            wrong = rng.choice([s for s in SOUNDS.values() if s != sound])
            rows.append({"input": {"messages": [{"role": "user", "content": p.format(a=animal)}]},
                         "preferred_output": [{"role": "assistant", "content": sound}],
                         "non_preferred_output": [{"role": "assistant", "content": wrong}]})
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rows = sound_pairs()
    write_jsonl(folder / "train.jsonl", rows[:36])
    write_jsonl(folder / "valid.jsonl", rows[36:])
    return {"train": folder / "train.jsonl", "valid": folder / "valid.jsonl"}


# at 1e-2 the tiny model's DPO runs went one way or the other with the seed and the order of
# the steps; 3e-3 learned in every one of 4 seeds tried
SEED_ROBUST_LR = 3e-3


def dpo_cfg(model, pairs, out, **kw):
    return TrainConfig(**{"model": str(model), "train_file": str(pairs["train"]),
                          "valid_file": str(pairs["valid"]), "output_dir": str(out),
                          "objective": "dpo", "method": "full", "precision": "fp32",
                          "learning_rate": 1e-2, "batch_size": 8, "logging_steps": 5,
                          "dpo": {"beta": 0.5}, **kw})


def answer_logps(model_spec, pairs_file, tokenizer, *, disable_adapter=False):
    """[chosen logp, rejected logp] of every pair of a file, by a model spec or a live model."""
    model = models.load_model(model_spec) if isinstance(model_spec, (str, os.PathLike)) \
        else model_spec
    model.eval()
    rows = render_pairs(read_preferences(pairs_file), tokenizer, max_length=512)
    batch = pad_pairs(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        if disable_adapter:
            with model.disable_adapter():
                logps, _ = sequence_logps(model, batch)
        else:
            logps, _ = sequence_logps(model, batch)
    return torch.stack(logps.chunk(2), dim=1)


def preferred(logps) -> float:
    return float((logps[:, 0] > logps[:, 1]).float().mean())


def reward_accuracy(policy, reference) -> float:
    """DPO's implicit reward (policy/reference log-ratio) ranks chosen above rejected; a tie
    (no preference, as when policy == reference) counts half."""
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    return float(((margin > 1e-6).float() + 0.5 * (margin.abs() <= 1e-6).float()).mean())


def metrics(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def full_dpo(tmp_path_factory, tiny_model_dir, pairs):
    out = tmp_path_factory.mktemp("dpo-full") / "run"
    # 30 epochs at SEED_ROBUST_LR (at 1e-2 for 10, 2 of 4 seeds failed in either step order)
    return tunelab.train(dpo_cfg(tiny_model_dir, pairs, out, epochs=30,
                                 learning_rate=SEED_ROBUST_LR, eval_steps=10), quiet=True)


def test_full_dpo_learns_a_preference_the_model_did_not_have(full_dpo, tiny_model_dir, pairs,
                                                             smol_tokenizer):
    before = answer_logps(tiny_model_dir, pairs["valid"], smol_tokenizer)
    after = answer_logps(full_dpo.model_dir, pairs["valid"], smol_tokenizer)
    assert reward_accuracy(before, before) == 0.5     # the start: no preference at all
    assert reward_accuracy(after, before) >= 0.9      # held-out pairs: unseen phrasing + animal
    lines = metrics(full_dpo.metrics_file)
    valid = [e for e in lines if "valid_loss" in e]
    assert VALID_METRICS <= set(valid[-1])
    assert valid[0]["valid_reward_accuracy"] <= 0.75 and \
        max(e["valid_reward_accuracy"] for e in valid) >= 0.9
    best = min(valid, key=lambda e: e["valid_loss"])
    assert full_dpo.best_step == best["step"]
    # the reward is beta * (policy - reference) log-ratio: the margin shown is the model's
    first_train = next(e for e in lines if "train_loss" in e)
    assert first_train["step"] == 1 and first_train["train_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert abs(first_train["train_reward_margin"]) < 1e-4   # policy == reference at step 1


def test_full_dpo_run_folder(full_dpo):
    out = full_dpo.output_dir
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "train_loss", "valid_loss"]
    assert "valid_reward_accuracy" in header and "train_reward_margin" in header
    assert (out / "loss.png").stat().st_size > 10_000
    assert json.loads((out / "result.json").read_text())["extra"]["objective"] == "dpo"
    assert "objective: dpo" in (out / "config.yaml").read_text()


def test_full_dpo_reference_is_the_starting_model(tmp_path, tiny_model_dir, pairs,
                                                  smol_tokenizer):
    """The precomputed reference log-probabilities are the starting model's, and training
    does not change them (they are data, not a second model)."""
    from tunelab.objectives import get
    start = answer_logps(tiny_model_dir, pairs["valid"], smol_tokenizer)
    seen = {}

    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_train_end(self, args, state, control, **kw):
            trainer_rows = kw["eval_dataloader"].dataset if kw.get("eval_dataloader") else None
            seen["rows"] = trainer_rows

    # the last model, not the best (step 1, at warm-up's zero learning rate, is the start)
    cfg = dpo_cfg(tiny_model_dir, pairs, tmp_path / "run", max_steps=5, load_best_at_end=False)
    result = tunelab.train(cfg, quiet=True, callbacks=[Capture()])
    rows = seen["rows"]
    ref = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in rows])
    # the eval set's order: rows as the file has them
    assert torch.allclose(ref, start, atol=1e-4)
    assert not torch.allclose(answer_logps(result.model_dir, pairs["valid"], smol_tokenizer),
                              start, atol=1e-3)   # while the policy moved
    assert get("dpo").items(pad_pairs(render_pairs(read_preferences(pairs["valid"]),
                                                   smol_tokenizer, max_length=64),
                                      smol_tokenizer.pad_token_id)) == 12


def test_lora_dpo_reference_is_the_adapter_switched_off(tmp_path, tiny_model_dir, pairs,
                                                        smol_tokenizer):
    """No second copy: the reference is the live model with its adapter disabled, which must
    stay exactly the starting model while the adapter learns."""
    from transformers import TrainerCallback
    start = answer_logps(tiny_model_dir, pairs["valid"], smol_tokenizer)
    seen = {}

    class Capture(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):
            seen["reference"] = answer_logps(model, pairs["valid"], smol_tokenizer,
                                             disable_adapter=True)
            seen["policy"] = answer_logps(model, pairs["train"], smol_tokenizer)
            seen["models"] = sum(1 for m in model.modules() if type(m).__name__ ==
                                 "LlamaForCausalLM")

    cfg = dpo_cfg(tiny_model_dir, pairs, tmp_path / "run", method="lora", epochs=20,
                  learning_rate=1e-2, load_best_at_end=False, lora={"r": 16, "alpha": 32, "dropout": 0.0,
                                            "target_modules": "all-linear"})
    result = tunelab.train(cfg, quiet=True, callbacks=[Capture()])
    assert seen["models"] == 1                                # one model in memory
    assert torch.allclose(seen["reference"], start, atol=1e-4)
    # the adapter learned the training pairs (a rank-16 adapter on a random 64-wide model
    # generalises less than full fine-tuning: the held-out test is the full run's)
    trained_start = answer_logps(tiny_model_dir, pairs["train"], smol_tokenizer)
    assert reward_accuracy(seen["policy"], trained_start) >= 0.75
    assert (result.adapter_dir / "adapter_config.json").exists()


def test_dpo_from_an_sft_run_starts_from_its_weights(tmp_path, sound_run, pairs,
                                                      smol_tokenizer):
    """model: an SFT run folder: its merged weights are both the start and the reference."""
    rec = []
    cfg = dpo_cfg(sound_run.output_dir, pairs, tmp_path / "run", method="lora", max_steps=2,
                  logging_steps=1, learning_rate=1e-3)
    tunelab.train(cfg, quiet=True, on_event=rec.append)
    first = next(e for e in rec if e.kind == "metrics")
    assert abs(first.data["train_reward_margin"]) < 1e-4
    sft = answer_logps(sound_run.model_dir, pairs["train"], smol_tokenizer)
    # the SFT model already prefers the right sounds: its step-1 loss shows it (< log 2 would
    # need a margin; at step 1 the policy is the reference, so the loss is exactly log 2)
    assert first.data["train_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert preferred(sft) >= 0.8


def test_ipo_loss_trains(tmp_path, tiny_model_dir, pairs):
    cfg = dpo_cfg(tiny_model_dir, pairs, tmp_path / "run", max_steps=30, logging_steps=1,
                  dpo={"beta": 0.5, "loss_type": "ipo"})
    result = tunelab.train(cfg, quiet=True)
    losses = [e["train_loss"] for e in metrics(result.metrics_file) if "train_loss" in e]
    assert losses[0] == pytest.approx(1.0, abs=1e-3)   # (0 - 1 / (2 * 0.5)) ** 2 at step 1
    assert sum(losses[-5:]) / 5 < losses[0]    # one step's loss is one batch's: noisy


def test_sigkill_then_resume_gives_the_same_dpo_curve(tmp_path, tiny_model_dir, pairs):
    kw = dict(max_steps=30, batch_size=4, save_steps=3, save_total_limit=2, logging_steps=1,
              valid_file=None, early_stopping_patience=None)
    ref = tunelab.train(dpo_cfg(tiny_model_dir, pairs, tmp_path / "ref", **kw), quiet=True)
    expected = [(e["step"], e["train_loss"]) for e in metrics(ref.metrics_file)]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(dpo_cfg(tiny_model_dir, pairs, tmp_path / "run", **kw).to_yaml())
    sigkill_training(cfg_file, tmp_path / "run.partial" / "checkpoints", after_step=12)
    resumed = subprocess.run([*CLI, "train", str(cfg_file), "--resume", "--quiet"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = [(e["step"], e["train_loss"]) for e in metrics(tmp_path / "run" / "metrics.jsonl")]
    assert [s for s, _ in got] == list(range(1, 31))
    for (s, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, abs=1e-5), f"step {s}: {a} != {b}"


def test_cancel_and_early_stopping(tmp_path, tiny_model_dir, pairs):
    polls = []
    cfg = dpo_cfg(tiny_model_dir, pairs, tmp_path / "run", method="lora", max_steps=8,
                  logging_steps=1, learning_rate=1e-3)
    with pytest.raises(TrainingCancelled) as info:
        tunelab.train(cfg, quiet=True, should_cancel=lambda: polls.append(1) or len(polls) >= 2)
    assert info.value.step == 2 and info.value.checkpoint.name == "checkpoint-2"
    assert tunelab.train(cfg, resume=True, quiet=True).steps == 8
    # a learning rate so high that validation gets worse after the first evaluations
    stop = dpo_cfg(tiny_model_dir, pairs, tmp_path / "stop", epochs=30, eval_steps=5,
                   early_stopping_patience=2, learning_rate=0.3)
    result = tunelab.train(stop, quiet=True)
    assert result.steps < 150     # stopped early (30 epochs of 5 steps were planned)
    assert result.best_step is not None


def test_wrong_data_for_the_objective_is_named(tmp_path, tiny_model_dir, pairs, sound_task):
    with pytest.raises(TunelabError) as info:
        tunelab.train(dpo_cfg(tiny_model_dir, {"train": sound_task["train"],
                                               "valid": pairs["valid"]}, tmp_path / "a"),
                      quiet=True)
    assert info.value.file == str(sound_task["train"]) and "preference" in str(info.value)
    with pytest.raises(TunelabError) as info:
        tunelab.train({"model": str(tiny_model_dir), "train_file": str(pairs["train"]),
                       "output_dir": str(tmp_path / "b")}, quiet=True)
    assert info.value.file == str(pairs["train"]) and "conversations" in str(info.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(TunelabError, match="packing"):
        tunelab.train({"model": str(tiny_model_dir), "train_file": str(pairs["train"]),
                       "output_dir": str(tmp_path / "c"), "objective": "dpo", "packing": True},
                      quiet=True)
    with pytest.raises(TunelabError, match="field 'dpo': settings given but objective is 'sft'"):
        tunelab.train({"model": str(tiny_model_dir), "train_file": str(pairs["train"]),
                       "dpo": {"beta": 0.2}}, quiet=True)


def test_cli_objective_flag_and_terminal_columns(tmp_path, tiny_model_dir, pairs):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(dpo_cfg(tiny_model_dir, pairs, tmp_path / "run", max_steps=5)
                        .model_copy(update={"objective": "sft"}).to_yaml()
                        .replace("dpo:\n  beta: 0.5", "dpo:\n  beta: 0.1"))
    proc = subprocess.run([*CLI, "train", str(cfg_file), "--objective", "dpo", "--set",
                           "dpo.beta=0.5"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "direct preference optimisation" in proc.stdout
    assert "reward acc" in proc.stdout.splitlines()[2]
    assert "Traceback" not in proc.stderr
