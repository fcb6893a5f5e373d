"""transformers.Trainer with what it lacks for us, and nothing else:

- the loss and metrics of the run's objective (tunelab.objectives: SFT, DPO, ...), which the
  Trainer never names: the objective returns a summed loss and summed statistics, the trainer
  normalises the loss by what the objective counts over the whole optimizer step (trained tokens
  for SFT, pairs for DPO, across processes) and sums the statistics over each logging window;
  the objective turns the sums into the logged metrics (SFT: mean token accuracy, as TRL reports
  it; DPO: reward accuracy, margin, chosen and rejected rewards). SFT's loss runs the LM head at
  trained positions only (tunelab.batching): in SFT most tokens are prompt, and the full
  [batch, length, vocab] fp32 logits are the largest tensor of the step;
- checkpoints that a kill cannot corrupt: a checkpoint counts only once its COMPLETE marker is
  written (atomically, last), and old checkpoints are rotated away only after that. The stock
  Trainer writes `checkpoint-N/` in place and rotates before the write is known to be whole, so
  a kill mid-save can leave a torn latest checkpoint that `resume_from_checkpoint=True` picks;
- length-grouped batches shuffled by a generator seeded per epoch (data_seed + epoch): the stock
  LengthGroupedSampler draws from the global RNG when the epoch starts, so a run resumed in the
  middle of epoch >= 2 would shuffle differently and skip the wrong batches;
- validation loss per trained item over the whole set (the stock eval loss is a mean of
  per-batch means, so short examples weigh more, and it would not match `tunelab eval`'s test
  loss), and no logits gathered during validation (nothing reads them);
- bf16 weights with fp32 master copies in the optimizer (tunelab.train.precision) instead of
  autocast over fp32 weights, with the gradient norm and clipping on the fp32 master gradients;
- adapters that keep their dtype when the Trainer loads a checkpoint or the best model (PEFT
  upcasts them to fp32 on load; a bf16 LoRA run would resume with another optimizer);
- a non-finite loss stops the run at the step it happens (the stock Trainer filters NaN out of
  its logs and keeps going, and would then save NaN weights);
- an optimizer step's forward passes made by tokens, not by a fixed count of rows, padded or
  flat (StepCollator): the Trainer sees one batch per step (no accumulation of its own) and
  training_step runs the step's forwards, accumulating gradients.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

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
        """transformers' grouping (megabatches of ~50 steps, each sorted by length), then the
        steps in a random order, the one with the longest example still first (an
        out-of-memory shows at once). Its own order sweeps every megabatch from long to short
        examples: where length goes with the answer, consecutive steps then see one kind of
        example, and at a low learning rate near the end that bias stays. Measured
        (bench/train_match.py, SmolLM2 full, 200 steps of 2 star-rated reviews): valid loss
        0.168 in transformers' order, 0.111 without grouping, TRL 0.087."""
        generator = torch.Generator().manual_seed(self.seed + int(self.epoch))
        self.generator = generator
        indices = list(super().__iter__())
        steps = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        # a short last step stays last: in the middle it would shift every later step's rows
        full = len(steps) - (len(steps[-1]) < self.batch_size if steps else 0)
        if full < 3:
            return iter(indices)
        order = [0, *torch.randperm(full - 1, generator=generator).add(1).tolist(),
                 *range(full, len(steps))]
        return iter([i for k in order for i in steps[k]])


class StepCollator:
    """A loader batch (this process's rows of one optimizer step, or a validation batch) ->
    {"forwards": [batch, ...]}, whichever of two ways computes fewer tokens' worth (a forward's
    fixed cost counted as `overhead` tokens):
    - padded: the rows split into forward passes of similar lengths within `forward_tokens`
      padded tokens (tunelab.batching.split_by_tokens), each padded by the objective's collate;
      a prefix every row of a forward shares (a system prompt, an instruction) then runs once,
      where the model allows it (`shared_prefix`: tunelab.batching.shares_prefixes);
    - flat (objectives that can, `objective.flattens`, where the attention takes sequences'
      bounds, `flat`: tunelab.train.run._flat_forwards_pay): the rows end to end in as few forwards
      of `forward_tokens` tokens as fit (tunelab.batching.flatten_rows), no padding at all; with
      `prefix_trees` (tunelab.attention's blocks), rows that share a prompt share one copy of it
      (tunelab.batching.prefix_trees).
    or both: the runs whose prefix runs once padded, the other rows flat. Mixed lengths go flat
    (the bench's 57-850-token rows: 3-4 padded forwards a step -> 1-2 flat); rows sharing a long
    prompt (the demo's reviews: 50 of ~86 tokens shared) go flat in prefix trees where the
    attention runs them, else padded, their prompt run once either way."""

    def __init__(self, objective, pad_token_id: int, *, forward_tokens: int, overhead: int,
                 shared_prefix: bool = False, flat: bool = True, prefix_trees: bool = False):
        self.objective, self.pad_token_id = objective, pad_token_id
        self.forward_tokens, self.overhead = forward_tokens, overhead
        self.shared_prefix = shared_prefix
        self.flat = flat and getattr(objective, "flattens", False)
        self.prefix_trees = self.flat and prefix_trees

    def __call__(self, rows: list[dict]) -> dict[str, list[dict[str, torch.Tensor]]]:
        from tunelab.batching import split_by_tokens
        lengths = [self.objective.row_length(r) for r in rows]
        runs = split_by_tokens(lengths, self.forward_tokens, self.overhead)
        if not self.flat or "position_ids" in rows[0]:   # packed rows: padded as they are
            return {"forwards": [self.objective.collate([rows[i] for i in run],
                                                        self.pad_token_id) for run in runs]}
        padded_cost = [self._padded_cost(rows, lengths, run) for run in runs]
        # (the padded runs kept, the flat rows): all padded; the runs that compute fewer tokens
        # padded (a prefix that runs once) padded and the other rows flat; all flat
        keep = [k for k, run in enumerate(runs)
                if padded_cost[k] - self.overhead <= sum(lengths[i] for i in run)]
        rest = [i for k, run in enumerate(runs) if k not in keep for i in run]
        layouts = []
        for kept, flat in [(list(range(len(runs))), []),
                           *([(keep, rest)] if keep and rest else []),
                           ([], list(range(len(rows))))]:
            parts, flat_cost = self._flat_parts(rows, lengths, flat)
            # tokens' worth computed, each forward's fixed cost included
            cost = sum(padded_cost[k] for k in kept) + flat_cost
            layouts.append((cost, kept, parts))
        _, kept, parts = min(layouts, key=lambda layout: layout[0])   # ties: the first, padded
        return {"forwards": [self.objective.collate([rows[i] for i in runs[k]], self.pad_token_id)
                             for k in kept] +
                [self.objective.collate_flat([rows[i] for i, _ in part],
                                             [shared for _, shared in part])
                 for part in parts]}

    def _flat_parts(self, rows, lengths, flat: list[int]):
        """The rows `flat` -> flat forwards (lists of (row, tokens it shares with its tree's
        first row)) within the token budget, and their cost in tokens' worth."""
        from tunelab.attention import TRAINING_ROWS
        from tunelab.batching import prefix_trees, split_flat
        if not flat:
            return [], 0
        if self.prefix_trees:
            units = [([flat[i] for i in members], shared) for members, shared in
                     prefix_trees([rows[i] for i in flat], self.forward_tokens, TRAINING_ROWS)]
        else:
            units = [([i], 0) for i in flat]
        sizes = [sum(lengths[i] for i in members) - shared * (len(members) - 1)
                 for members, shared in units]
        parts = [[(i, shared if k else 0) for u in part
                  for members, shared in [units[u]] for k, i in enumerate(members)]
                 for part in split_flat(sizes, self.forward_tokens)]
        return parts, sum(sizes) + self.overhead * len(parts)

    def _padded_cost(self, rows, lengths, run) -> int:
        from tunelab.batching import MIN_SHARED_PREFIX, common_prefix
        cost = len(run) * max(lengths[i] for i in run) + self.overhead
        if self.shared_prefix and len(run) > 1:
            shared = common_prefix([rows[i] for i in run])
            if shared >= MIN_SHARED_PREFIX:
                cost -= (len(run) - 1) * shared     # computed once, not once per row
        return cost


class TunelabTrainer(Trainer):
    # The loss below is normalised by the optimizer step's item count (num_items_in_batch), so
    # the Trainer must neither divide it by the accumulation steps again nor skip counting.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, objective, config, keep_checkpoints: int = 2,
                 eval_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective, self.config = objective, config
        self.eval_collator = eval_collator
        self.model_accepts_loss_kwargs = True   # count items whatever the model class
        self.keep_checkpoints = keep_checkpoints
        # the objective's statistics summed since the last log, per mode
        self._sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self.trained_tokens_seen = 0

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        lengths = [self.objective.row_length(row) for row in dataset]
        return EpochSeededLengthGroupedSampler(
            self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps,
            lengths, self.args.data_seed if self.args.data_seed is not None else self.args.seed)

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        return LengthGroupedSampler(self.args.eval_batch_size,
                                    lengths=[self.objective.row_length(r) for r in eval_dataset])

    def get_eval_dataloader(self, eval_dataset=None):
        """Validation batches split by their own token budget: without a backward to keep
        activations for, a forward can hold more rows (the Trainer has one collator for all)."""
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _get_num_items_in_batch(self, batch_samples, device):
        """What the objective normalises by (trained tokens, pairs), over the optimizer step's
        micro-batches and, with average_tokens_across_devices, over every process."""
        if not batch_samples:
            return None
        items = sum(torch.as_tensor(self.objective.items(f))
                    for b in batch_samples for f in b["forwards"])
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            items = self.accelerator.gather(items.to(device)).sum()
        return items.to(device)

    # -- bf16 weights, fp32 masters ------------------------------------------------------------
    def create_optimizer(self, model=None):
        model = self.model if model is None else model
        low_precision = any(p.requires_grad and p.dtype != torch.float32
                            for p in model.parameters())   # weights loaded in bf16
        if not low_precision or self.optimizer is not None:
            return super().create_optimizer(model)
        from tunelab.train.precision import MasterWeightAdamW
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay],
                   "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        self.optimizer = MasterWeightAdamW(
            [g for g in groups if g["params"]], lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
            seed=self.args.seed,
            # DDP's reducer averages the model's own .grad after backward: fold at the step
            fold_grads_on_backward=self.args.world_size == 1)
        return self.optimizer

    def _master_optimizer(self):
        from tunelab.train.precision import MasterWeightAdamW
        opt = getattr(self.optimizer, "optimizer", self.optimizer)   # accelerate's wrapper
        return opt if isinstance(opt, MasterWeightAdamW) else None

    def _clip_grad_norm(self, model):
        opt = self._master_optimizer()
        if opt is None:
            return super()._clip_grad_norm(model)
        from tunelab.train.precision import master_grad_norm
        return master_grad_norm(opt, self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        opt = self._master_optimizer()
        if opt is None or grad_norm is not None:
            return super()._get_grad_norm(model, grad_norm)
        from tunelab.train.precision import master_grad_norm
        return master_grad_norm(opt, float("inf"))

    # PEFT's load_adapter (the Trainer's resume and its best model at the end) upcasts the
    # adapters it loads to fp32 (autocast_adapter_dtype): a run that trains bf16 adapters (fp32
    # masters in the optimizer) would resume with fp32 ones and another optimizer, which cannot
    # take the checkpoint's state. The loaded values are the saved bf16 ones: cast back exactly.
    @contextlib.contextmanager
    def _trainable_dtypes_kept(self, model=None):
        model = self.model if model is None else model
        dtypes = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        yield
        for n, p in model.named_parameters():
            if n in dtypes and p.dtype != dtypes[n]:
                p.data = p.data.to(dtypes[n])

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with self._trainable_dtypes_kept(model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        with self._trainable_dtypes_kept():
            super()._load_best_model()

    # -- the objective's loss, and its metrics -----------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        part = self.objective.loss(model, inputs, self.config)
        if num_items_in_batch is None:
            num_items_in_batch = self.objective.items(inputs)
        loss = part.loss_sum / torch.as_tensor(num_items_in_batch).clamp(min=1)
        if model.training and self.args.average_tokens_across_devices and \
                self.args.world_size > 1:
            loss = loss * self.args.world_size   # DDP averages gradients over processes
        sums = self._sums["train" if model.training else "eval"]
        for name, value in part.stats.items():
            value = value.detach().double().cpu()
            sums[name] = sums[name] + value if name in sums else value
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Validation: the statistics compute_loss sums (log() makes the loss from them, per
        item over the whole set); no logits kept."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = sum(self.compute_loss(model, f) for f in inputs["forwards"])
        return loss.detach(), None, None

    def log(self, logs, start_time=None):
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode is not None:  # every rank logs these, so the reduce below cannot hang
            # every statistic the objective declares, 0 where this process saw no batch
            names = self.objective.stat_names
            stacked = torch.stack([self._sums[mode].get(n, torch.zeros((), dtype=torch.float64))
                                   for n in names])
            if self.args.world_size > 1:
                stacked = self.accelerator.reduce(stacked.to(self.args.device), "sum").cpu()
            sums = dict(zip(names, stacked))
            values = self.objective.metrics({n: float(v) for n, v in sums.items()})
            prefix = "eval_" if mode == "eval" else ""
            for name in self.objective.metric_names:
                if name in values:
                    logs[prefix + name] = values[name]
            if mode == "eval" and "loss" in values:   # per item, over the whole validation set
                logs["eval_loss"] = values["loss"]
            if mode == "train":
                self.trained_tokens_seen += int(sums.get("trained", 0))
                logs["trained_tokens_seen"] = self.trained_tokens_seen
            self._sums[mode] = {}
        super().log(logs, start_time)

    # -- a step's forward passes; a NaN stops the run where it happens -----------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        forwards = inputs["forwards"]
        total = None
        for i, batch in enumerate(forwards):
            # DDP reduces gradients in the step's last backward only (ranks may split their
            # shares into different numbers of forwards: each reduces once)
            sync = contextlib.nullcontext() if i == len(forwards) - 1 else \
                self.accelerator.no_sync(model)
            with sync:
                loss = super().training_step(model, batch, num_items_in_batch)
            if not math.isfinite(float(loss)):
                raise NonFiniteLoss(f"the loss became {float(loss)} at step "
                                    f"{self.state.global_step + 1} (try a lower learning_rate, "
                                    "or precision fp32)")
            total = loss if total is None else total + loss
        return total

    def floating_point_ops(self, inputs):
        return sum(super(TunelabTrainer, self).floating_point_ops(f) for f in inputs["forwards"])

    def _track_num_input_tokens(self, inputs):
        """Non-padding input tokens (run.py asks for that count), summed over the step's
        forwards, then gathered once: one collective per step on every rank."""
        if self.args.include_num_input_tokens_seen == "no":
            return
        from tunelab.batching import flat_tokens
        pad = self.processing_class.pad_token_id
        seen = sum(int(f["attention_mask"].sum()) if "attention_mask" in f
                   else flat_tokens(f) if "cu_seq_lens_q" in f or "tunelab_segments" in f
                   else int((f["input_ids"] != pad).sum()) for f in inputs["forwards"])
        seen = torch.as_tensor(seen, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(seen).sum().item()

    # -- atomic checkpoints ------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        # The last step's checkpoint is a model (served as a job's last checkpoint, loaded when
        # it is the best), never a resume point: a finished run is not resumed (a changed config
        # is refused). Its optimizer state, 16 bytes a parameter in full fine-tuning (fp32
        # masters, two moments), would be written and deleted unread: ~3 s of a 70 s run.
        only_model = self.args.save_only_model
        self.args.save_only_model = only_model or self.state.global_step >= self.state.max_steps
        try:
            super()._save_checkpoint(model, trial)   # save_total_limit None: it rotates nothing
        finally:
            self.args.save_only_model = only_model
        self.accelerator.wait_for_everyone()     # every rank's RNG state is in the folder
        if not self.args.should_save:
            return
        root = Path(self.args.output_dir)
        commit_checkpoint(root / f"checkpoint-{self.state.global_step}",
                          step=self.state.global_step,
                          trained_tokens_seen=self.trained_tokens_seen)
        rotate_checkpoints(root, self.keep_checkpoints, keep_also=self.state.best_model_checkpoint)
