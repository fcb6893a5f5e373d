"""Training reports through one channel: the events a run emits, the files and the terminal that
read them, cancelling at a step (with a checkpoint that is a model spec) and resuming after it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import diverge_after

import tunelab
from tunelab import models
from tunelab.config import TrainConfig
from tunelab.errors import TunelabError
from tunelab.train.events import TrainingCancelled
from tunelab.train.rundir import COMPLETE, RunDir, complete_checkpoints

STARTED_KEYS = {"method", "model", "train_examples", "valid_examples", "epochs", "batch_size",
                "learning_rate", "trainable_parameters", "total_parameters"}


def cfg_for(tiny_model_dir, sound_task, out, **kw) -> TrainConfig:
    return TrainConfig(**{"model": str(tiny_model_dir), "train_file": sound_task["train"],
                          "output_dir": out, "method": "full", "precision": "fp32",
                          "learning_rate": 3e-3, "batch_size": 8, **kw})


class Recorder:
    """An on_event observer; notes whether each checkpoint was whole when announced."""

    def __init__(self):
        self.events = []
        self.whole_when_announced = []

    def __call__(self, event):
        self.events.append(event)
        if event.kind == "checkpoint":
            self.whole_when_announced.append((Path(event.data["path"]) / COMPLETE).exists())

    def kinds(self):
        return [e.kind for e in self.events]

    def of(self, kind):
        return [e for e in self.events if e.kind == kind]


def logits(spec):
    model, _ = models.load(str(spec))
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4, 5]])).logits


def test_events_of_a_run_with_validation_feed_metrics_jsonl(tmp_path, tiny_model_dir, sound_task,
                                                             capsys):
    rec = Recorder()
    cfg = cfg_for(tiny_model_dir, sound_task, tmp_path / "run", valid_file=sound_task["test"],
                  max_steps=10, eval_steps=5, logging_steps=2)
    result = tunelab.train(cfg, quiet=True, on_event=rec)
    assert capsys.readouterr() == ("", "")                      # quiet: nothing printed

    kinds = rec.kinds()
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert set(kinds) == {"started", "metrics", "evaluation", "checkpoint", "finished"}
    started = rec.events[0]
    assert STARTED_KEYS <= started.data.keys() and started.step == 0
    assert started.data["method"] == "full" and started.data["train_examples"] == 40
    assert all(e.total_steps == 10 for e in rec.events)
    assert [e.step for e in rec.events] == sorted(e.step for e in rec.events)
    assert [e.step for e in rec.of("metrics")] == [1, 2, 4, 5, 6, 8, 10]   # + at validations
    assert [e.step for e in rec.of("evaluation")] == [5, 10]
    assert [e.step for e in rec.of("checkpoint")] == [5, 10]
    # a checkpoint is announced after its validation, once it is whole
    assert kinds.index("checkpoint") > kinds.index("evaluation") and all(rec.whole_when_announced)
    assert rec.events[-1].data == result.to_json() and rec.events[-1].step == 10

    # metrics.jsonl is exactly the data of the metrics and evaluation events, in order
    lines = [json.loads(line) for line in open(result.metrics_file)]
    assert lines == [e.data for e in rec.events if e.kind in ("metrics", "evaluation")]
    first_eval = rec.of("evaluation")[0].data
    assert {"valid_loss", "valid_mean_token_accuracy", "epoch"} <= first_eval.keys()
    assert first_eval["best"] is True
    log = (result.output_dir / "train.log").read_text()
    assert log.startswith("started: full fine-tuning") and "checkpoint saved" in log

    # every checkpoint is a model spec (full fine-tuning: config.json + weights + tokenizer);
    # the output model is the best one
    best = Path(rec.of("checkpoint")[[5, 10].index(result.best_step)].data["path"])
    kept = result.output_dir / "checkpoints" / best.name
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in kept.iterdir()}
    assert torch.allclose(logits(kept), logits(result.model_dir), atol=1e-5)


def test_cancel_saves_a_checkpoint_that_loads_and_resume_finishes(tmp_path, tiny_model_dir,
                                                                  sound_task):
    polls = []

    def cancel_at_third_step():
        polls.append(1)
        return len(polls) >= 3

    rec = Recorder()
    cfg = cfg_for(tiny_model_dir, sound_task, tmp_path / "run", method="lora", max_steps=8,
                  batch_size=4, logging_steps=1, save_steps=5)
    with pytest.raises(TrainingCancelled) as info:
        tunelab.train(cfg, quiet=True, on_event=rec, should_cancel=cancel_at_third_step)
    assert isinstance(info.value, TunelabError) and len(polls) == 3    # polled every step
    ckpt = info.value.checkpoint
    run_dir = RunDir(cfg.output_dir)
    assert ckpt == run_dir.checkpoints_dir / "checkpoint-3" and run_dir.checkpoints() == [ckpt]
    assert rec.kinds()[-2:] == ["checkpoint", "cancelled"]
    assert rec.events[-1].step == 3 and rec.events[-1].data == {"checkpoint": str(ckpt)}
    assert not cfg.output_dir.exists() and run_dir.partial.is_dir()   # kept for resume

    # the checkpoint is an adapter on the user's model spec, with the tokenizer: a model spec
    adapter_cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert (ckpt / "tokenizer.json").exists()
    assert not torch.allclose(logits(ckpt), logits(tiny_model_dir))   # 3 steps of training

    resumed = Recorder()
    result = tunelab.train(cfg, resume=True, quiet=True, on_event=resumed)
    assert result.steps == 8 and not run_dir.partial.exists()
    assert resumed.events[0].kind == "started" and resumed.events[0].step == 3
    assert resumed.events[0].data["resumed_from"] == str(ckpt)
    steps = [json.loads(line)["step"] for line in open(result.metrics_file)]
    assert steps == list(range(1, 9))                                   # each step logged once
    last = complete_checkpoints(result.output_dir / "checkpoints")[-1]
    assert last.name == "checkpoint-8"
    assert torch.allclose(logits(last), logits(result.model_dir), atol=1e-5)


def test_a_failed_run_emits_failed(tmp_path, tiny_model_dir, sound_task):
    rec = Recorder()
    cfg = cfg_for(tiny_model_dir, sound_task, tmp_path / "nan", max_steps=20, batch_size=4,
                  save_steps=2)
    with pytest.raises(TunelabError, match="loss became") as info:
        tunelab.train(cfg, quiet=True, on_event=rec, callbacks=[diverge_after(3)])
    assert rec.kinds()[0] == "started" and rec.kinds()[-1] == "failed"
    assert rec.events[-1].data == {"message": str(info.value)} and rec.events[-1].step >= 2
    assert "finished" not in rec.kinds()

    early = Recorder()   # a check that fails before training: no "started", still "failed"
    with pytest.raises(TunelabError, match="file not found"):
        tunelab.train(cfg.model_copy(update={"train_file": tmp_path / "missing.jsonl",
                                             "output_dir": tmp_path / "o"}),
                      quiet=True, on_event=early)
    assert early.kinds() == ["failed"] and "file not found" in early.events[0].data["message"]


def tunelab_cli(*args, **popen):
    """`tunelab ARGS` as a user runs it, with warnings shown (conftest.run_cli hides them)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.Popen([sys.executable, "-m", "tunelab.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_cli_shows_the_run_not_raw_logs_or_warnings(tmp_path, tiny_model_dir, sound_task):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(cfg_for(tiny_model_dir, sound_task, tmp_path / "run", method="lora",
                                valid_file=sound_task["test"], max_steps=4, eval_steps=2,
                                logging_steps=1).to_yaml())
    proc = tunelab_cli("train", cfg_file)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    text = out + err
    assert "{'loss'" not in text and "'eval_loss'" not in text and "{'train_runtime'" not in text
    assert "Warning" not in text, err
    lines = out.splitlines()
    assert lines[0].startswith("tunelab: lora fine-tuning")
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "epoch"])
    rows = [line.split() for line in lines[header + 1:] if line.split()[0].isdigit()]
    # not a terminal: a row per logged step, validations in the same table
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert [r[0] for r in rows if len(r) >= 5] == ["2", "4"] and rows[1][-1] == "best"
    assert any(line.startswith("tunelab: done in") for line in lines)
    assert f"adapter:  {tmp_path / 'run' / 'adapter'}" in out


def test_ctrl_c_in_the_cli_stops_with_a_checkpoint(tmp_path, tiny_model_dir, sound_task):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(cfg_for(tiny_model_dir, sound_task, tmp_path / "run", max_steps=500,
                                batch_size=4, logging_steps=1).to_yaml())
    proc = tunelab_cli("train", cfg_file, "--quiet")
    metrics = RunDir(tmp_path / "run").metrics_file
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not metrics.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert out == "" and "Traceback" not in err and "training cancelled at step" in err
    kept = RunDir(tmp_path / "run").checkpoints()
    assert len(kept) == 1 and f"checkpoint {kept[0]}" in err


def test_the_auto_cadence_skips_checkpoints_that_would_cost_over_a_tenth_of_the_run(
        tmp_path, tiny_model_dir, sound_task, monkeypatch):
    from tunelab.train.callbacks import CheckpointBudget
    # as if every checkpoint cost far more than a tenth of the steps around it (a tiny model
    # saves in milliseconds; full fine-tuning of a real one writes 16 bytes a parameter)
    monkeypatch.setattr(CheckpointBudget, "MIN_SECONDS", 0.0)
    monkeypatch.setattr(CheckpointBudget, "RATIO", 10**6)

    def checkpoint_steps(out, **kw):
        rec = Recorder()
        result = tunelab.train(cfg_for(tiny_model_dir, sound_task, tmp_path / out, max_steps=10,
                                       batch_size=4, eval_steps=2, save_total_limit=10, **kw),
                               quiet=True, on_event=rec)
        return [e.step for e in rec.of("checkpoint")], rec, result

    # before the first checkpoint its cost is estimated from its size: here far over budget,
    # so only the last (always written) is; the tiny model's first checkpoint really is cheap
    steps, _, _ = checkpoint_steps("estimated")
    assert steps == [10]
    # estimated as free, the first is written and then the measured cost decides
    monkeypatch.setattr(CheckpointBudget, "WRITE_BYTES_PER_S", float("inf"))
    steps, _, result = checkpoint_steps("auto")
    assert steps == [2, 10]
    assert [c.name for c in complete_checkpoints(result.output_dir / "checkpoints")] == \
        ["checkpoint-2", "checkpoint-10"]
    # a resume point keeps the optimizer's state; the last step's checkpoint is only a model
    first, last = complete_checkpoints(result.output_dir / "checkpoints")
    assert (first / "optimizer.pt").exists() and (first / "rng_state.pth").exists()
    assert not (last / "optimizer.pt").exists() and (last / "model.safetensors").exists()
    assert (last / "trainer_state.json").exists()
    # save_steps set by the user: every one of them
    steps, _, _ = checkpoint_steps("every2", save_steps=2)
    assert steps == [2, 4, 6, 8, 10]
    # with validation and load_best_at_end: every new best is saved, whatever it costs
    steps, rec, result = checkpoint_steps("valid", valid_file=sound_task["test"],
                                          learning_rate=3e-2)
    evals = {e.step: e.data["best"] for e in rec.of("evaluation")}
    assert set(steps) == {2, 10} | {s for s, best in evals.items() if best}, (steps, evals)
    best = min(rec.of("evaluation"), key=lambda e: e.data["valid_loss"]).step
    assert result.best_step == best and best in steps


def validated_steps(callback, *, total: int, steps_per_epoch: int, eval_steps: int) -> list[int]:
    """The steps a run validates at: the stock Trainer's cadence (every eval_steps and the last
    step, save_steps = eval_steps) with EvaluateAtEpochEnd deciding after it, step by step."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState
    args = SimpleNamespace(eval_steps=eval_steps, save_steps=eval_steps, eval_strategy="steps")
    state, done = TrainerState(max_steps=total), []
    for step in range(1, total + 1):
        state.global_step, control = step, TrainerControl()
        control.should_evaluate = control.should_save = step % eval_steps == 0 or step == total
        callback.on_step_end(args, state, control)
        if step % steps_per_epoch == 0 and step != total:     # the epoch ends after the step
            if control.should_evaluate:
                callback.on_evaluate(args, state, control)
            control = TrainerControl()
            callback.on_epoch_end(args, state, control)
        if control.should_evaluate:
            assert control.should_save        # every validation is checkpointed
            callback.on_evaluate(args, state, control)
            done.append(step)
        else:
            assert not control.should_save
    return done


def test_the_automatic_cadence_skips_a_validation_just_before_an_epoch_end():
    from tunelab.train.callbacks import EvaluateAtEpochEnd

    def thin():
        return EvaluateAtEpochEnd(steps_per_epoch=83, thin_cadence=True,
                                  saves_with_evaluations=True)
    # the demo's run: 2 epochs of 83 steps, ~5 validations (every 34)
    assert validated_steps(EvaluateAtEpochEnd(steps_per_epoch=83), total=166,
                           steps_per_epoch=83, eval_steps=34) == [34, 68, 83, 102, 136, 166]
    assert validated_steps(thin(), total=166, steps_per_epoch=83,
                           eval_steps=34) == [34, 83, 102, 136, 166]
    # 3 epochs of 10 steps, every 6: 18 is 2 steps before the end of epoch 2, 24 4 after it
    assert validated_steps(EvaluateAtEpochEnd(steps_per_epoch=10, thin_cadence=True,
                                              saves_with_evaluations=True),
                           total=30, steps_per_epoch=10, eval_steps=6) == [6, 10, 20, 24, 30]
    # one epoch: the cadence stands (the last step's validation is the epoch end's)
    assert validated_steps(EvaluateAtEpochEnd(steps_per_epoch=60, thin_cadence=True,
                                              saves_with_evaluations=True),
                           total=60, steps_per_epoch=60, eval_steps=12) == [12, 24, 36, 48, 60]
