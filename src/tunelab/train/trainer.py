"""transformers.Trainer with what it lacks for us, and nothing else:

- the loss computed from logits at the trained positions only (tunelab.batching.
  trained_token_loss, the same function evaluation uses): in SFT most tokens are prompt, and the
  full [batch, length, vocab] fp32 logits are the largest tensor of the step (1.7 GB for 8 x 1024
  tokens x 49k vocab) and the LM head a fifth of a small model's FLOPs. Normalised by the trained
  tokens of the whole optimizer step, like the stock loss;
- mean token accuracy on the trained tokens, for training and validation (as TRL reports it);
- checkpoints that a kill cannot corrupt: a checkpoint counts only once its COMPLETE marker is
  written (atomically, last), and old checkpoints are rotated away only after that. The stock
  Trainer writes `checkpoint-N/` in place and rotates before the write is known to be whole, so
  a kill mid-save can leave a torn latest checkpoint that `resume_from_checkpoint=True` picks;
- length-grouped batches shuffled by a generator seeded per epoch (data_seed + epoch): the stock
  LengthGroupedSampler draws from the global RNG when the epoch starts, so a run resumed in the
  middle of epoch >= 2 would shuffle differently and skip the wrong batches;
- validation loss per trained token (the stock eval loss is a mean of per-batch means, so short
  examples weigh more, and it would not match `tunelab eval`'s test loss);
- a non-finite loss stops the run at the step it happens (the stock Trainer filters NaN out of
  its logs and keeps going, and would then save NaN weights).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from tunelab.batching import trained_token_loss
from tunelab.errors import TunelabError
from tunelab.train.rundir import commit_checkpoint, rotate_checkpoints


class NonFiniteLoss(TunelabError):
    pass


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + int(self.epoch))
        return super().__iter__()


class TunelabTrainer(Trainer):
    # The loss below is normalised by the optimizer step's trained-token count (num_items_in_batch),
    # so the Trainer must neither divide it by the accumulation steps again nor skip counting.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, keep_checkpoints: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True   # count trained tokens whatever the model class
        self.keep_checkpoints = keep_checkpoints
        # [correct predictions, trained tokens] since the last log, per mode
        self._token_counts = {"train": torch.zeros(2, dtype=torch.long),
                              "eval": torch.zeros(2, dtype=torch.long)}
        self._eval_loss_sum = torch.zeros((), dtype=torch.float64)
        self.trained_tokens_seen = 0

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        lengths = [len(ids) for ids in dataset["input_ids"]]
        return EpochSeededLengthGroupedSampler(
            self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps,
            lengths, self.args.data_seed if self.args.data_seed is not None else self.args.seed)

    # -- loss on trained positions only, and metrics ----------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        part = trained_token_loss(model, inputs)   # the one loss, shared with evaluation
        if num_items_in_batch is not None:
            loss = part.loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.args.world_size   # DDP averages gradients over processes
        else:
            loss = part.loss_sum / part.trained.clamp(min=1)
        with torch.no_grad():
            self._token_counts["train" if model.training else "eval"] += \
                torch.stack([part.correct, part.trained]).cpu()
            if not model.training:
                self._eval_loss_sum += part.loss_sum.detach().double().cpu()
        return (loss, part.outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode is not None:  # every rank logs these, so the reduce below cannot hang
            counts = self._token_counts[mode].double()
            if mode == "eval":
                counts = torch.cat([counts, self._eval_loss_sum.view(1)])
            if self.args.world_size > 1:
                counts = self.accelerator.reduce(counts.to(self.args.device), "sum").cpu()
            correct, total = int(counts[0]), int(counts[1])
            if total:
                logs["eval_mean_token_accuracy" if mode == "eval" else "mean_token_accuracy"] = \
                    correct / total
                if mode == "eval":   # per trained token, over the whole validation set
                    logs["eval_loss"] = float(counts[2]) / total
                    self._eval_loss_sum.zero_()
            if mode == "train":
                self.trained_tokens_seen += total
                logs["trained_tokens_seen"] = self.trained_tokens_seen
            self._token_counts[mode].zero_()
        super().log(logs, start_time)

    # -- a NaN stops the run where it happens ------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"the loss became {float(loss)} at step {self.state.global_step + 1}"
                                " (try a lower learning_rate, or precision fp32)")
        return loss

    # -- atomic checkpoints ------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)   # save_total_limit is None: it rotates nothing
        self.accelerator.wait_for_everyone()     # every rank's RNG state is in the folder
        if not self.args.should_save:
            return
        root = Path(self.args.output_dir)
        commit_checkpoint(root / f"checkpoint-{self.state.global_step}",
                          step=self.state.global_step,
                          trained_tokens_seen=self.trained_tokens_seen)
        rotate_checkpoints(root, self.keep_checkpoints, keep_also=self.state.best_model_checkpoint)
