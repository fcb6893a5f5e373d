"""Trainer callbacks: the event reporter (metrics, evaluations, checkpoints, cancel requests go
through tunelab.train.events) and evaluation at each epoch end."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from tunelab.train.events import EventChannel


class EventReporter(TrainerCallback):
    """Turns the Trainer's hooks into training events, and polls a cancel request every
    optimizer step.

    Metrics lines (the data of "metrics" events): step, epoch, train_loss, train_<m> for each of
    the objective's metrics (SFT: train_mean_token_accuracy; DPO: train_reward_accuracy, ...),
    learning_rate, grad_norm, tokens_seen (non-padding input tokens), trained_tokens_seen,
    tokens_per_s, elapsed_s. Validation lines ("evaluation"): step, epoch, valid_loss,
    valid_<m>, best, elapsed_s.

    On a cancel request the run saves a checkpoint at the current step and stops; `cancelled_at`
    and `cancel_checkpoint` tell train() to raise TrainingCancelled.
    """

    def __init__(self, channel: EventChannel, started: dict[str, Any], *,
                 metric_names: tuple[str, ...] = ("mean_token_accuracy",),
                 should_cancel: Callable[[], bool] | None = None):
        self.channel = channel
        self.metric_names = metric_names
        self.started_data = started
        self.should_cancel = should_cancel
        self.started = time.time()
        self.elapsed_before = 0.0
        self._last_tokens = 0
        self._last_time = self.started
        self.last_train_loss: float | None = None
        self.last_valid_loss: float | None = None
        self.cancelled_at: int | None = None
        self.cancel_checkpoint: Path | None = None
        self.checkpoints: list[Path] = []

    def continue_from(self, last_train_line: dict | None) -> None:
        """A resumed run continues the time and token counters of the metrics line it resumes
        after."""
        if last_train_line:
            self.elapsed_before = float(last_train_line.get("elapsed_s", 0.0))
            self._last_tokens = int(last_train_line.get("tokens_seen", 0))

    # -- run start ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.channel.total_steps = state.max_steps
        self.channel.emit("started", self.started_data, step=state.global_step)

    # -- every optimizer step: progress, cancel ----------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        self.channel.tick(state.global_step)
        if control.should_evaluate or control.should_training_stop:
            control.should_log = True   # a train loss at each validation and at the last step
        if control.should_training_stop:   # the last step: nothing left to cancel
            return
        if self.should_cancel is not None and self._cancel_requested(args):
            self.cancelled_at = state.global_step
            control.should_log = control.should_save = control.should_training_stop = True
            control.should_evaluate = False

    def _cancel_requested(self, args) -> bool:
        wanted = bool(self.should_cancel())
        if args.world_size > 1:   # every process must stop at the same step, or DDP hangs
            import torch
            import torch.distributed as dist
            flag = torch.tensor([int(wanted)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            wanted = bool(flag.item())
        return wanted

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.cancelled_at is not None:   # stop now: no end-of-epoch validation or save
            control.should_evaluate = control.should_save = False
        elif control.should_evaluate:
            control.should_log = True

    # -- logs -> metrics / evaluation events -------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        now = time.time()
        entry: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            kind = "metrics"
            self.last_train_loss = float(logs["loss"])
            entry["train_loss"] = self.last_train_loss
            entry.update({f"train_{m}": logs.get(m) for m in self.metric_names})
            entry["learning_rate"] = float(logs.get("learning_rate", math.nan))
            if "grad_norm" in logs:
                entry["grad_norm"] = float(logs["grad_norm"])
            tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            entry["tokens_seen"] = tokens
            entry["trained_tokens_seen"] = int(logs.get("trained_tokens_seen", 0))
            dt = now - self._last_time
            entry["tokens_per_s"] = round((tokens - self._last_tokens) / dt, 1) if dt > 0 else None
            self._last_time, self._last_tokens = now, tokens
        elif "eval_loss" in logs:
            kind = "evaluation"
            self.last_valid_loss = float(logs["eval_loss"])
            # the Trainer updates best_metric after this log: compare with the best before it
            best = state.best_metric is None or self.last_valid_loss < state.best_metric
            entry["valid_loss"] = self.last_valid_loss
            entry.update({f"valid_{m}": logs.get(f"eval_{m}") for m in self.metric_names})
            entry["best"] = bool(best)
        else:
            return  # the end-of-training summary: result.json has it
        entry["elapsed_s"] = round(self.elapsed_before + now - self.started, 2)
        self.channel.emit(kind, entry, step=state.global_step)

    # -- checkpoints -------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        # TunelabTrainer._save_checkpoint has committed it (COMPLETE written) before this hook
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.checkpoints.append(path)
        if self.cancelled_at == state.global_step:
            self.cancel_checkpoint = path
        self.channel.emit("checkpoint", {"path": str(path), "step": state.global_step},
                          step=state.global_step)


class EvaluateAtEpochEnd(TrainerCallback):
    """Validation at each epoch end too (the stock Trainer evaluates every eval_steps and at the
    last step), and a checkpoint with every validation, so the best model is always one that was
    saved (otherwise the best could fall on an evaluation that was not checkpointed).

    With the automatic cadence (`thin_cadence`), a validation every eval_steps that would fall
    less than half an interval from another (the one just done at an epoch end, or the next
    epoch end's or the last step's) is skipped, with its checkpoint: the demo's 166 steps in 2
    epochs validated at 34, 68, 83, 102, 136, 166; now 34, 83, 102, 136, 166 (one 7 s pass less).
    Steps decide it, so every process of a distributed run agrees.
    """

    def __init__(self, *, steps_per_epoch: int = 0, thin_cadence: bool = False,
                 saves_with_evaluations: bool = False):
        self.last_eval_step = -1
        self.steps_per_epoch = steps_per_epoch
        self.thin_cadence = thin_cadence and steps_per_epoch > 0
        self.saves_with_evaluations = saves_with_evaluations

    def on_evaluate(self, args, state, control, **kwargs):
        self.last_eval_step = state.global_step

    def _too_close(self, args, state) -> bool:
        step, spe, half = state.global_step, self.steps_per_epoch, args.eval_steps / 2
        next_forced = min(state.max_steps, -(-step // spe) * spe)   # this or the next epoch end
        return step != next_forced and (next_forced - step < half
                                        or step - self.last_eval_step < half)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate and self.thin_cadence and self._too_close(args, state):
            control.should_evaluate = False
            if self.saves_with_evaluations:
                control.should_save = False
        if control.should_evaluate:   # set just before by DefaultFlowCallback
            control.should_save = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.eval_strategy != "no" and state.global_step != self.last_eval_step:
            control.should_evaluate = True
            control.should_save = True


def checkpoint_bytes(model) -> int:
    """What a resumable checkpoint of this model holds: the trainable weights in their dtype,
    AdamW's two fp32 moments, an fp32 master for a lower-precision trainable weight, and the
    frozen weights too unless the model saves adapters only (PEFT)."""
    total = 0
    adapters_only = hasattr(model, "peft_config")
    for p in model.parameters():
        if p.requires_grad:
            total += p.numel() * (p.element_size() + 8 + (4 if p.element_size() < 4 else 0))
        elif not adapters_only:
            total += p.numel() * p.element_size()
    return total


class CheckpointBudget(TrainerCallback):
    """With the automatic save cadence (save_steps unset), skips a checkpoint that would make
    writing checkpoints more than 1/RATIO of the run's time so far since the last one.

    The auto cadence saves ~5 times a run; on a short run with large checkpoints (full fine-tuning
    keeps fp32 masters and two AdamW moments: 16 bytes a parameter) that could be a quarter of
    the run (SmolLM2, 5 steps: 22 of 89 s). A checkpoint is always written when it took under
    MIN_SECONDS last time, at the last step, and when its validation is a new best and the run
    loads the best at the end (the best model must have been saved). Single-process runs only:
    ranks timing alone could disagree, and every rank takes part in a save.
    """
    RATIO = 10
    MIN_SECONDS = 2.0
    # Before the first checkpoint its cost is estimated from its size at this write rate (what a
    # 2.1 GB checkpoint took on these machines: ~500 MB/s into the page cache; torch.save and
    # safetensors alike), so a short run does not spend its first steps' worth on a resume
    # point (SmolLM2 full fine-tuning, 5 steps: 3.1 s of 52 at step 1). Once one is written,
    # its measured time decides.
    WRITE_BYTES_PER_S = 500e6

    def __init__(self, *, keep_best: bool, checkpoint_bytes: int = 0):
        self.keep_best = keep_best
        # how long the last checkpoint took to write (before one: the estimate)
        self.save_seconds = checkpoint_bytes / self.WRITE_BYTES_PER_S
        self.since = time.perf_counter()   # end of the last checkpoint (or the start)
        self.started = self.since

    def on_train_begin(self, args, state, control, **kwargs):
        self.since = self.started = time.perf_counter()

    def _skip(self, state, control, *, new_best: bool) -> bool:
        now = time.perf_counter()
        self.started = now
        return (control.should_save and state.global_step < state.max_steps and not new_best
                and self.save_seconds >= self.MIN_SECONDS
                and now - self.since < self.RATIO * self.save_seconds)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            return              # decided once the validation loss is known (on_evaluate)
        if self._skip(state, control, new_best=False):
            control.should_save = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        new_best = self.keep_best and loss is not None and (
            state.best_metric is None or loss < state.best_metric)   # before the Trainer's update
        if self._skip(state, control, new_best=new_best):
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        self.since = time.perf_counter()
        self.save_seconds = self.since - self.started
