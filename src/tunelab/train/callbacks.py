"""Trainer callbacks: the metrics file a user can read and plot, and a human log."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback


class MetricsWriter(TrainerCallback):
    """Append one JSON line per logged step to metrics.jsonl (train and validation entries)."""

    def __init__(self, path: Path, log_path: Path | None = None):
        self.path = path
        self.log_path = log_path
        self.started = time.time()
        self.last_valid_loss: float | None = None
        self.last_train_loss: float | None = None
        self.last_valid_step: int | None = None

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
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                 "elapsed_s": round(time.time() - self.started, 2)}
        if "loss" in logs:
            self.last_train_loss = float(logs["loss"])
            entry.update(train_loss=self.last_train_loss,
                         learning_rate=float(logs.get("learning_rate", math.nan)))
            if "grad_norm" in logs:
                entry["grad_norm"] = float(logs["grad_norm"])
        elif "eval_loss" in logs:
            self.last_valid_loss = float(logs["eval_loss"])
            self.last_valid_step = state.global_step
            entry["valid_loss"] = self.last_valid_loss
        else:
            return  # the end-of-training summary: result.json has it
        if getattr(state, "num_input_tokens_seen", 0):
            entry["tokens_seen"] = int(state.num_input_tokens_seen)
        self._write(entry)
