"""What a person sees while training runs, fed by the training events: the run's plan, one
progress bar (train loss, step/total, ETA) with a table row per evaluation above it, then where
the outputs are.

On a terminal the bar redraws in place (stderr). Elsewhere (a log file, a pipe) there is no bar:
the table gets a row per metrics event too, so a log still shows the run's progress.
"""
from __future__ import annotations

import signal
import sys
from typing import TextIO

from tunelab.train.events import TrainEvent


def _columns(label: str) -> str:
    return f"{'step':>7}  {'epoch':>6}  {'train loss':>10}  {'valid loss':>10}  {label:>10}"


class ProgressDisplay:
    def __init__(self, out: TextIO | None = None, bar_out: TextIO | None = None):
        self.out = out or sys.stdout
        self.bar_out = bar_out or sys.stderr
        self.live = self.bar_out.isatty()
        self.bar = None
        self.train_loss: float | None = None
        self.pending: TrainEvent | None = None   # without a bar: a train row that may get a
        self.header_shown = False                # validation at the same step
        self.metric, self.label = "mean_token_accuracy", "valid acc"   # the objective's headline

    # -- the channel's per-step tick ---------------------------------------------------------
    def on_step(self, step: int, total: int) -> None:
        if self.bar is not None and step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def __call__(self, event: TrainEvent) -> None:
        if self.pending is not None and not (event.kind == "evaluation"
                                             and event.step == self.pending.step):
            self._row(self.pending)
        self.pending = None
        getattr(self, f"_{event.kind}")(event)

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)   # above the bar, which redraws below
        else:
            print(text, file=self.out, flush=True)

    def _row(self, e: TrainEvent) -> None:
        """A table row: a train row (metrics event) or a validation row."""
        if not self.header_shown:
            self._print(_columns(self.label))
            self.header_shown = True
        d = e.data
        train = f"{self.train_loss:.4f}" if self.train_loss is not None else "-"
        valid = acc = best = ""
        if e.kind == "evaluation":
            valid = f"{d['valid_loss']:.4f}"
            a = d.get(f"valid_{self.metric}")
            acc = f"{100 * a:.1f}%" if a is not None else "-"
            best = "  best" if d.get("best") else ""
        self._print(f"{e.step:>7}  {d['epoch']:>6.2f}  {train:>10}  {valid:>10}  {acc:>10}"
                    f"{best}".rstrip())

    # -- events ------------------------------------------------------------------------------
    def _started(self, e: TrainEvent) -> None:
        from tunelab.objectives import get
        d = e.data
        objective = get(d.get("objective", "sft"))
        self.metric, self.label = objective.metric_names[0], objective.metric_label
        pct = 100 * d["trainable_parameters"] / max(1, d["total_parameters"])
        what = "" if objective.name == "sft" else f" ({objective.title})"
        self._print(f"tunelab: {d['method']} fine-tuning{what} {d['model']}: "
                    f"{d['trainable_parameters']:,} of {d['total_parameters']:,} parameters "
                    f"trainable ({pct:.2f}%)")
        packed = f" (packed into {d['packed_rows']} rows)" if d.get("packed_rows") else ""
        procs = d.get("world_size", 1)
        split = (f" over {procs} processes" if procs > 1 else "") + \
            (f", forward passes of up to {d['forward_tokens']:,} tokens"
             if d.get("forward_tokens") else "")
        # max_steps may end the run before the planned epochs do
        epochs = min(d["epochs"], e.total_steps / d.get("steps_per_epoch", e.total_steps))
        replay = f" (with {d['replay_examples']} replay)" if d.get("replay_examples") else ""
        self._print(f"tunelab: {d['train_examples']} train{replay} / {d['valid_examples']} valid "
                    f"examples{packed}; {e.total_steps} steps ({epochs:.3g} epochs) of batch "
                    f"{d['batch_size']}{split}; lr {d['learning_rate']:g}, {d['precision']}")
        if d.get("resumed_from"):
            self._print(f"tunelab: resuming at step {e.step} from {d['resumed_from']}")
        if self.live:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=e.total_steps, initial=e.step, desc="training", unit="step",
                            file=self.bar_out, dynamic_ncols=True, leave=False,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")

    def _metrics(self, e: TrainEvent) -> None:
        self.train_loss = e.data.get("train_loss")
        if self.bar is not None:
            self.on_step(e.step, e.total_steps)
            self.bar.set_postfix_str(f"loss {self.train_loss:.4f}", refresh=True)
        elif not self.live:
            self.pending = e

    def _evaluation(self, e: TrainEvent) -> None:
        self._row(e)

    def _checkpoint(self, e: TrainEvent) -> None:
        pass   # saved at every validation: its table row says enough

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _finished(self, e: TrainEvent) -> None:
        self._close_bar()
        r = e.data
        losses = f"train loss {r['train_loss']:.4f}" if r.get("train_loss") is not None else ""
        if r.get("valid_loss") is not None:
            best = f" (best, step {r['best_step']})" if r.get("best_step") else ""
            losses += f", valid loss {r['valid_loss']:.4f}{best}"
        self._print(f"tunelab: done in {r['seconds']:.0f} s: {r['steps']} steps, {losses}")
        self._print(f"  model:    {r['model_dir']}")
        if r.get("adapter_dir"):
            self._print(f"  adapter:  {r['adapter_dir']}")
        out = r["output_dir"]
        self._print(f"  metrics:  {r['metrics_file']}, {out}/results.csv, {out}/loss.png")

    def _failed(self, e: TrainEvent) -> None:
        self._close_bar()   # the caller reports the error

    def _cancelled(self, e: TrainEvent) -> None:
        self._close_bar()   # TrainingCancelled says where the checkpoint is


class CtrlCCancels:
    """Ctrl-C in a terminal: the first one, once training runs, asks it to stop after the
    current step with a checkpoint (pass this object as `train(should_cancel=...)`); a second
    one, or one before training started, interrupts at once as usual."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.training = False
        self.requested = False

    def __call__(self) -> bool:
        self.training = True   # polled every optimizer step, on every process
        return self.requested

    def _handler(self, signum, frame) -> None:
        if not self.training or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\ntunelab: stopping after this step with a checkpoint (Ctrl-C again to stop "
                  "at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> CtrlCCancels:
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)
