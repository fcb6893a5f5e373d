"""Trainer callbacks: the metrics file a user can read and plot, a human log, and evaluation at
each epoch end."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl entries; a last line torn by a kill is skipped."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            break   # only the last line can be torn: nothing is appended after it
    return entries


class MetricsWriter(TrainerCallback):
    """Append one JSON line per logged step to metrics.jsonl (train and validation entries).

    Train: step, epoch, train_loss, train_mean_token_accuracy, learning_rate, grad_norm,
    tokens_seen (non-padding input tokens), trained_tokens_seen, tokens_per_s, elapsed_s.
    Validation: step, epoch, valid_loss, valid_mean_token_accuracy.
    """

    def __init__(self, path: Path, log_path: Path | None = None, resumed_at: int | None = None):
        self.path = path
        self.log_path = log_path
        self.started = time.time()
        self.last_valid_loss: float | None = None
        self.last_train_loss: float | None = None
        self._last_time = self.started
        self._last_tokens = 0
        self.elapsed_before = 0.0
        if resumed_at is not None:  # drop what the killed run logged after its checkpoint
            kept = [e for e in read_metrics(path) if e["step"] <= resumed_at]
            path.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
            train_entries = [e for e in kept if "train_loss" in e]
            if train_entries:
                self._last_tokens = train_entries[-1].get("tokens_seen", 0)
                self.elapsed_before = train_entries[-1].get("elapsed_s", 0.0)
            if log_path is not None:
                with log_path.open("a", encoding="utf-8") as f:
                    f.write(f"resumed from the checkpoint at step {resumed_at}\n")

    def _write(self, entry: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.log_path is not None:
            text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in entry.items())
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(text + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            self.last_train_loss = float(logs["loss"])
            entry.update(train_loss=self.last_train_loss,
                         train_mean_token_accuracy=logs.get("mean_token_accuracy"),
                         learning_rate=float(logs.get("learning_rate", math.nan)))
            if "grad_norm" in logs:
                entry["grad_norm"] = float(logs["grad_norm"])
            tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            entry["tokens_seen"] = tokens
            entry["trained_tokens_seen"] = int(logs.get("trained_tokens_seen", 0))
            dt = now - self._last_time
            entry["tokens_per_s"] = round((tokens - self._last_tokens) / dt, 1) if dt > 0 else None
            self._last_time, self._last_tokens = now, tokens
        elif "eval_loss" in logs:
            self.last_valid_loss = float(logs["eval_loss"])
            entry.update(valid_loss=self.last_valid_loss,
                         valid_mean_token_accuracy=logs.get("eval_mean_token_accuracy"))
        else:
            return  # the end-of-training summary: result.json has it
        entry["elapsed_s"] = round(self.elapsed_before + now - self.started, 2)
        self._write(entry)


class EvaluateAtEpochEnd(TrainerCallback):
    """Validation at each epoch end too (the stock Trainer evaluates every eval_steps and at the
    last step), and a checkpoint with every validation, so the best model is always one that was
    saved (otherwise the best could fall on an evaluation that was not checkpointed)."""

    def __init__(self):
        self.last_eval_step = -1

    def on_evaluate(self, args, state, control, **kwargs):
        self.last_eval_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:   # set just before by DefaultFlowCallback
            control.should_save = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.eval_strategy != "no" and state.global_step != self.last_eval_step:
            control.should_evaluate = True
            control.should_save = True
