"""Training reports through one channel: structured events that metrics.jsonl, train.log, the
terminal display and external observers (a job worker, through `train(..., on_event=...)`) all
read, so they cannot disagree.

Kinds, each with the optimizer step it is about and the run's total steps:
  started     {"method", "model", "train_examples", "valid_examples", "epochs", "batch_size",
               "learning_rate", "trainable_parameters", "total_parameters", ...plan details,
               "resumed_from": checkpoint folder or None}
  metrics     the train line written to metrics.jsonl (train_loss, train_mean_token_accuracy,
              learning_rate, grad_norm, tokens_seen, trained_tokens_seen, tokens_per_s, ...)
  evaluation  the validation line written to metrics.jsonl (valid_loss,
              valid_mean_token_accuracy, best: lowest validation loss so far)
  checkpoint  {"path": a complete checkpoint folder (a model spec), "step"}
  finished    TrainResult.to_json(), once the run is in its output folder
  failed      {"message"}
  cancelled   {"checkpoint": the checkpoint saved at the cancel step, or None}

Events are emitted on the main process only. Besides events, the channel passes a per-step tick
(`on_step(step, total_steps)`) to listeners that define it: a progress bar moves every step,
while events (and metrics.jsonl lines) follow `logging_steps`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab.train")

KINDS = ("started", "metrics", "evaluation", "checkpoint", "finished", "failed", "cancelled")


@dataclass
class TrainEvent:
    kind: str
    step: int
    total_steps: int
    data: dict[str, Any]
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class TrainingCancelled(TunelabError):
    """Raised by train() after a cancel request; the run's partial folder is kept for resume."""

    def __init__(self, step: int, checkpoint: Path | None):
        self.step = step
        self.checkpoint = checkpoint
        where = (f"; checkpoint {checkpoint} (continue with --resume)" if checkpoint
                 else "; no checkpoint was saved")
        super().__init__(f"training cancelled at step {step}{where}")


Listener = Callable[[TrainEvent], None]


class EventChannel:
    """Fans events out to listeners, in subscription order. A listener's error propagates
    (a metrics file that cannot be written fails the run), except while reporting a failure."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled          # False on the non-main processes of a distributed run
        self.total_steps = 0
        self.step = 0
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, data: dict[str, Any], *, step: int | None = None) -> TrainEvent:
        assert kind in KINDS, kind
        if step is not None:
            self.step = step
        event = TrainEvent(kind, self.step, self.total_steps, data)
        if not self.enabled:
            return event
        for listener in list(self._listeners):
            if kind == "failed":   # the error being reported matters more than a listener's
                try:
                    listener(event)
                except Exception:
                    log.exception("a training event listener failed")
            else:
                listener(event)
        return event

    def tick(self, step: int) -> None:
        self.step = step
        if self.enabled:
            for listener in self._listeners:
                on_step = getattr(listener, "on_step", None)
                if on_step is not None:
                    on_step(step, self.total_steps)


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


def truncate_metrics(path: Path, step: int) -> dict | None:
    """On resume: drop what a killed run logged after the checkpoint it resumes from; returns
    the last train entry kept (tokens and time so far continue from it)."""
    kept = [e for e in read_metrics(path) if e["step"] <= step]
    path.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
    train = [e for e in kept if "train_loss" in e]
    return train[-1] if train else None


class MetricsLog:
    """metrics.jsonl (one JSON line per metrics/evaluation event, exactly its data) and train.log
    (every event, human-readable), appended as events arrive."""

    def __init__(self, metrics_file: Path, log_file: Path):
        self.metrics_file, self.log_file = metrics_file, log_file

    def __call__(self, event: TrainEvent) -> None:
        if event.kind in ("metrics", "evaluation"):
            with self.metrics_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(event.data) + "\n")
        if event.kind == "finished" or not self.log_file.parent.is_dir():
            return   # the run folder has moved to output_dir (or was removed after a failure)
        with self.log_file.open("a", encoding="utf-8") as f:
            f.write(describe(event) + "\n")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def describe(event: TrainEvent) -> str:
    """One line of text for an event (train.log)."""
    d = event.data
    if event.kind == "started":
        resumed = f"; resumed from {d['resumed_from']}" if d.get("resumed_from") else ""
        return (f"started: {d['method']} fine-tuning {d['model']}, {d['train_examples']} train / "
                f"{d['valid_examples']} valid examples, {event.total_steps} steps{resumed}")
    if event.kind in ("metrics", "evaluation"):
        return "  ".join(f"{k}={_fmt(v)}" for k, v in d.items())
    if event.kind == "checkpoint":
        return f"step={event.step}  checkpoint saved: {d['path']}"
    if event.kind == "cancelled":
        return f"step={event.step}  cancelled; checkpoint: {d['checkpoint']}"
    return f"step={event.step}  {event.kind}: {d.get('message', '')}".rstrip(": ")
