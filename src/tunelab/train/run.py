"""train(config) -> TrainResult: fine-tune a model (full, LoRA, DoRA, QLoRA) with an objective
(SFT on conversations, DPO on preference pairs: tunelab.objectives).

Built on transformers.Trainer (+ PEFT for adapters). We hand it datasets whose labels were
already made by tunelab.data.render, and the objective's pad-only collator: supervision is
decided in one place. Nothing here asks which objective runs: reading and rendering the data,
the batch, the loss and the metrics are the objective's. A run goes through four stages, each a
function:

  prepare        check everything a user can get wrong (config, data, model spec, method,
                 output folder), render the data and plan the steps; no weights are read
  build          load the model, apply the method, assemble the Trainer and its callbacks
  run_training   open the run folder (tunelab.train.rundir) and train; a failure keeps the
                 last checkpoint, a cancel request saves one and raises TrainingCancelled
  write_outputs  the model, adapter and reports; the run moves into place

Everything the run reports (metrics.jsonl, train.log, the terminal display, `on_event`) reads
the same events (tunelab.train.events).
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab.config import TrainConfig
from tunelab.data.io import write_json
from tunelab.data.render import IGNORE_INDEX
from tunelab.errors import TunelabError
from tunelab.objectives import Objective, get as get_objective
from tunelab.train.auto import Plan, make_plan
from tunelab.train.events import EventChannel, TrainEvent, TrainingCancelled
from tunelab.train.rundir import RunDir, checkpoint_state, checkpoint_step

log = logging.getLogger("tunelab.train")


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path                  # the merged model (or, without one, the adapter)
    adapter_dir: Path | None         # LoRA / DoRA / QLoRA only
    metrics_file: Path
    train_loss: float | None
    valid_loss: float | None         # of the output model
    best_step: int | None            # the step the output model comes from (with validation)
    steps: int
    train_examples: int
    trained_tokens: int              # per epoch
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def partial_dir(cfg: TrainConfig) -> Path:
    return RunDir(cfg.output_dir).partial


def qlora_unavailable() -> str | None:
    """Why QLoRA cannot run on this host (None: it can). bitsandbytes runs its 4-bit NF4 layers
    on a CUDA GPU, and since its multi-backend releases on the CPU too (pure PyTorch ops: on
    this project's AVX-512 machines a 4-bit Linear's forward within 15% of bf16's)."""
    import importlib.util

    import torch
    # On AVX-512 BF16 CPUs bitsandbytes first tries a faster 4-bit matmul fetched from the
    # Hub by the `kernels` package, and warns at import when it cannot (offline, or no
    # `kernels`); its own dequantize-then-matmul is what runs then, and is what was measured
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if importlib.util.find_spec("bitsandbytes") is None:
        return ("QLoRA quantizes the base model to 4 bits with bitsandbytes, which is not "
                "installed: pip install 'tunelab[qlora]' (or use method: lora)")
    if not torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes.backends.cpu") \
            is None:
        return ("QLoRA on a CPU needs bitsandbytes >= 0.48 (its CPU backend); this one runs on "
                "CUDA GPUs only: pip install -U 'tunelab[qlora]' (or use method: lora)")
    return None


def _check_method(cfg: TrainConfig) -> None:
    if cfg.method == "qlora" and (why := qlora_unavailable()):
        raise TunelabError(why, field="method")


def _check_target_modules(cfg: TrainConfig, source) -> None:
    """Unknown LoRA target modules are caught on an empty (meta-device) copy of the
    architecture, so the error comes before any weights are read."""
    if cfg.method == "full" or cfg.lora.target_modules == "all-linear":
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules()}
    missing = [t for t in cfg.lora.target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules()
                         if type(m).__name__ == "Linear"})
        raise TunelabError(f"no module named {', '.join(missing)} in this model (its linear "
                           f"layers: {', '.join(linear)})", field="lora.target_modules")


def _gpu_budget(cfg: TrainConfig, source) -> int | None:
    """The tokens per forward this GPU's free memory holds for this model (auto.py); None
    where micro_batch_size is set or the architecture's sizes are not in its config."""
    import torch
    from transformers import AutoConfig

    from tunelab.train.auto import gpu_forward_budget
    if cfg.micro_batch_size:
        return None
    config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    config = getattr(config, "text_config", config)
    if not all(hasattr(config, k) for k in ("hidden_size", "num_hidden_layers",
                                            "num_attention_heads", "vocab_size")):
        return None
    free, _ = torch.cuda.mem_get_info()
    return gpu_forward_budget(config, cfg.method, free,
                              checkpointing=cfg.gradient_checkpointing)


def _want_tensorboard(cfg: TrainConfig) -> bool:
    import importlib.util
    installed = importlib.util.find_spec("tensorboard") is not None
    if cfg.tensorboard is True and not installed:
        raise TunelabError("tensorboard is not installed (pip install tensorboard)",
                           field="tensorboard")
    return installed if cfg.tensorboard == "auto" else bool(cfg.tensorboard)


def _training_arguments(cfg: TrainConfig, plan: Plan, work: Path, has_valid: bool,
                        precision: str, tensorboard: bool):
    import torch
    from transformers import TrainingArguments

    from tunelab.train.precision import uses_master_weights

    if tensorboard:  # transformers 5 takes the folder from the environment only
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(work / "tensorboard")
    with_valid = "steps" if has_valid else "no"
    return TrainingArguments(
        output_dir=str(work / "checkpoints"),
        # one loader batch is this process's share of an optimizer step; StepCollator splits it
        # into forward passes by padded tokens, and TunelabTrainer.training_step accumulates them
        per_device_train_batch_size=plan.micro_batch_size * plan.gradient_accumulation_steps,
        per_device_eval_batch_size=plan.eval_batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=plan.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=plan.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        # autocast only where the weights are not already in the compute dtype
        bf16=precision == "bf16" and not uses_master_weights(precision, cfg.method),
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_steps=plan.logging_steps,
        logging_first_step=True,
        eval_strategy=with_valid,
        eval_steps=plan.eval_steps,
        save_strategy="steps",
        save_steps=plan.save_steps,
        save_total_limit=None,           # TunelabTrainer rotates, after a save is whole
        load_best_model_at_end=has_valid and cfg.load_best_at_end,
        metric_for_best_model="eval_loss" if has_valid else None,
        greater_is_better=False,
        report_to=["tensorboard"] if tensorboard else "none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy=_sampling_strategy(cfg),
        remove_unused_columns=False,
        label_names=["labels"],   # PEFT wraps forward(); without this eval loss is dropped
        include_num_input_tokens_seen="non_padding",
        average_tokens_across_devices=True,   # loss normalised by trained tokens, globally
        ddp_find_unused_parameters=False,
        disable_tqdm=True,   # tunelab.train.progress shows the run, from its events
        log_level_replica="error",   # the Trainer would turn other processes' warnings back on
        dataloader_num_workers=0,
    )


def _sampling_strategy(cfg: TrainConfig) -> str:
    """The order of the training rows: the file's (shuffle: false), else random, in steps of
    similar lengths by default only for objectives whose rows are padded (DPO's pairs). Rows
    that go flat (SFT) have no padding to save, and grouping costs quality where length goes
    with the answer (see config.py's group_by_length)."""
    if not cfg.shuffle:
        return "sequential"
    grouped = cfg.group_by_length
    if grouped is None:
        grouped = not get_objective(cfg.objective).flattens
    return "group_by_length" if grouped and not cfg.packing else "random"


def _apply_method(model, cfg: TrainConfig):
    if cfg.method == "full":
        if cfg.freeze_layers:
            _freeze_lower_layers(model, cfg.freeze_layers)
        return model
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.models import peft_quietly
    # Tokens the tokenizer gained (ChatML on a base model) have fresh embedding rows: a frozen
    # base would keep them random, and the model could never learn to emit <|im_end|>.
    added = getattr(model.config, "tunelab_added_token_ids", None)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
                      use_dora=cfg.method == "dora", trainable_token_indices=added or None)
    if cfg.method == "qlora":
        # What PEFT's prepare_model_for_kbit_training does (freeze the base; with gradient
        # checkpointing, gradients through the inputs) but its cast of every weight it did not
        # quantize (embeddings, norms, LM head) to fp32: the residual stream followed them into
        # fp32, and SmolLM2's QLoRA peaked at x1.64 LoRA's memory on a CPU. They stay in the
        # run's precision, frozen, as LoRA's base does, and the adapters train as LoRA's.
        model.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    # PEFT upcasts adapters on a bf16 base to fp32 (autocast_adapter_dtype). On a CPU that
    # makes every LoRA layer cast its input to fp32, run its rank-r matmuls in fp32 (K or N =
    # r: oneDNN's slowest shapes) and add an fp32 copy of the output: measured in the demo's
    # steps, the adapters' matmuls 154 of 563 ms of matmul a step. A bf16 base keeps bf16
    # adapters instead, and the optimizer their fp32 masters (tunelab.train.precision), as it
    # does for full fine-tuning's weights.
    bf16_adapters = cfg.method in ("lora", "qlora") and model.dtype == torch.bfloat16
    try:
        with peft_quietly():
            peft_model = get_peft_model(model, lora, autocast_adapter_dtype=not bf16_adapters)
    except ValueError as e:  # unknown target modules
        raise TunelabError(str(e).splitlines()[0], field="lora.target_modules") from None
    if cfg.method == "lora":
        from tunelab.lora_linear import use_fused_lora
        use_fused_lora(peft_model)
    # PEFT records the folder it loaded the base from (for the builtin model, a cache path on
    # this machine; for a .gguf, a folder with no config.json). Every adapter it saves (each
    # checkpoint, the output) records the user's model spec instead, so the folder is itself a
    # spec that loads anywhere tunelab runs.
    peft_model.peft_config["default"].base_model_name_or_path = portable_spec(cfg.model)
    # PEFT's save_embedding_layers="auto" works out at every save whether the vocabulary was
    # resized by reading the base's config.json, from the Hub when the recorded base is not a
    # local folder (the builtin's portable name): a network lookup and a warning at each
    # checkpoint. tunelab knows the answer: it resized the vocabulary iff it added tokens (and
    # then the whole layers must travel with the adapter, as "auto" would decide).
    targets = cfg.lora.target_modules
    embeddings_targeted = isinstance(targets, list) and \
        bool({"embed_tokens", "lm_head"} & set(targets))
    peft_model.save_pretrained = functools.partial(
        peft_model.save_pretrained, save_embedding_layers=bool(added) or embeddings_targeted)
    return peft_model


def portable_spec(spec: str) -> str:
    """A model spec that means the same from any working directory."""
    from tunelab.models import BUILTINS
    return spec if spec in BUILTINS or not Path(spec).exists() else str(Path(spec).resolve())


def _freeze_lower_layers(model, n: int) -> None:
    layers = model.get_decoder().layers
    if n > len(layers):
        raise TunelabError(f"the model has {len(layers)} layers; cannot freeze {n}",
                           field="freeze_layers")
    model.get_input_embeddings().requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) weights. A 4-bit parameter (bitsandbytes' Params4bit: QLoRA's base)
    packs two weights in each byte of its storage, so its numel() counts a fraction of them."""
    def weights(p) -> int:
        return p.numel() * 2 * p.element_size() if type(p).__name__ == "Params4bit" \
            else p.numel()
    trainable = sum(weights(p) for p in model.parameters() if p.requires_grad)
    total = sum(weights(p) for p in model.parameters())
    return trainable, total


def _load_model(cfg: TrainConfig, tokenizer, source, precision: str):
    from tunelab import models
    from tunelab.attention import use_fast_attention
    from tunelab.train.precision import weight_dtype
    kwargs = {"dtype": weight_dtype(precision, cfg.method)}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        from tunelab.runtime import torch_dtype
        # the 4-bit weights are dequantized to the run's precision for each matmul: bf16 where
        # the hardware has it, fp16 on older GPUs, fp32 on a CPU without AVX-512 BF16 or AMX
        # (emulated bf16 there is ~50x slower)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(precision))
    model = models.load_model(cfg.model, tokenizer=tokenizer, source=source, **kwargs)
    model.config.use_cache = False   # also required for packed rows to be isolated
    use_fast_attention(model)
    return model


# -- the stages ---------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A run that passed every check, with its data rendered and its steps planned; no model
    weights have been read."""
    cfg: TrainConfig
    run_dir: RunDir
    resume_from: Path | None         # the checkpoint to continue from
    source: Any                      # tunelab.models.ModelSource
    tokenizer: Any
    train_rows: list[dict]
    valid_rows: list[dict]
    train_batches: list[dict]        # the rows the Trainer sees (packed rows when packing)
    plan: Plan
    objective: Objective
    precision: str
    tensorboard: bool
    replay_examples: int = 0         # of train_rows, the last ones, from replay_file


@dataclass
class Built:
    """The model with its method applied and the Trainer that will train it."""
    prep: Prepared
    model: Any
    trainer: Any                     # TunelabTrainer
    reporter: Any                    # callbacks.EventReporter
    channel: EventChannel
    is_main: bool
    trainable: int
    total: int


def prepare(cfg: TrainConfig, *, resume: bool = False) -> Prepared:
    """Check the config, data, model spec, method and output folder; render and plan."""
    from tunelab import models
    from tunelab.runtime import resolve_precision, set_threads

    run_dir = RunDir(cfg.output_dir)
    if resume:
        resume_from = run_dir.resume_point(cfg.model_dump(mode="json"))
    else:
        run_dir.check_fresh(cfg.overwrite)
        resume_from = None
    objective = get_objective(cfg.objective)
    for name in ("train_file", "valid_file", "replay_file"):
        p = getattr(cfg, name)
        if p is not None and not Path(p).is_file():
            raise TunelabError("file not found", file=p, field=name)
        if p is not None:
            objective.check_kind(Path(p), name)
    _check_method(cfg)
    tensorboard = _want_tensorboard(cfg)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # per-checkpoint "Writing model shards" bars are noise
    precision = resolve_precision(cfg.precision)
    set_threads(cfg.threads)

    import torch
    source = models.resolve(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model, source=source)

    def rows_of(path):
        return objective.read_rows(Path(path), tokenizer, cfg.max_length, cfg)
    train_rows = rows_of(cfg.train_file)
    replay_rows = rows_of(cfg.replay_file) if cfg.replay_file else []
    train_rows += replay_rows      # shuffled in with the task's rows by the Trainer's sampler
    valid_rows = rows_of(cfg.valid_file) if cfg.valid_file else []
    _check_target_modules(cfg, source)
    if cfg.packing:
        from tunelab.train.packing import pack
        train_batches = pack(train_rows, cfg.max_length)
    else:
        train_batches = train_rows
    plan = make_plan(cfg, len(train_batches), n_examples=len(train_rows),
                     longest=max(map(objective.row_length, train_batches)),
                     longest_valid=max(map(objective.row_length, valid_rows), default=None),
                     world_size=int(os.environ.get("WORLD_SIZE", "1")),
                     on_gpu=torch.cuda.is_available(),
                     gpu_budget=_gpu_budget(cfg, source) if torch.cuda.is_available() else None)
    return Prepared(cfg, run_dir, resume_from, source, tokenizer, train_rows, valid_rows,
                    train_batches, plan, objective, precision, tensorboard, len(replay_rows))


def _flat_forwards_pay(model, device) -> bool:
    """Whether flat forwards (tunelab.batching.flatten_rows) run each sequence on its own: on a
    CPU tunelab.attention's blocks take the sequences' bounds; on a GPU PyTorch's varlen kernel
    (through tunelab.attention) or flash-attention's do. Any other attention gets transformers'
    block-diagonal mask over the whole row: right, but the row's length squared (32k tokens: a
    1 GB mask), so padded forwards there."""
    from tunelab.attention import NAME, varlen_runs
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or ""
    return ((impl == NAME and (device.type == "cpu"
                               or varlen_runs(config, getattr(model, "dtype", None), device)))
            or impl.startswith("flash_attention"))


def build(prep: Prepared, channel: EventChannel, *, callbacks: list | None = None,
          should_cancel: Callable[[], bool] | None = None) -> Built:
    """Load the model, apply the method, and assemble the Trainer with its callbacks."""
    import datasets
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tunelab.train.callbacks import (CheckpointBudget, EvaluateAtEpochEnd, EventReporter,
                                         checkpoint_bytes)
    from tunelab.train.trainer import StepCollator, TunelabTrainer

    cfg, plan = prep.cfg, prep.plan
    # Seeded before the model is built: LoRA's (and resized embeddings') random initialisation
    # happens here, before the Trainer seeds anything, so the same seed gives the same weights.
    from transformers import set_seed
    set_seed(cfg.seed)
    model = _apply_method(_load_model(cfg, prep.tokenizer, prep.source, prep.precision), cfg)
    trainable, total = count_parameters(model)
    # the objective's look at the starting model (DPO, full: the reference log-probabilities)
    prep.objective.before_training(
        model, {"train": prep.train_batches, "valid": prep.valid_rows}, cfg,
        pad_token_id=prep.tokenizer.pad_token_id, batch_size=plan.micro_batch_size,
        precision=prep.precision)
    args = _training_arguments(cfg, plan, prep.run_dir.partial, bool(prep.valid_rows),
                               prep.precision, prep.tensorboard)
    if args.n_gpu > 1:  # torch DataParallel: one process driving several GPUs
        raise TunelabError(f"{args.n_gpu} GPUs are visible to one process: launch one process per "
                           f"GPU (torchrun --nproc_per_node {args.n_gpu} -m tunelab.cli train ...) "
                           "or pick one with CUDA_VISIBLE_DEVICES")
    is_main = args.process_index == 0
    channel.enabled = channel.enabled and is_main   # one process reports for all
    reporter = EventReporter(channel, _started_data(prep, trainable, total),
                             metric_names=prep.objective.metric_names,
                             should_cancel=should_cancel)
    # splits a step into forward passes, padded or flat (plain rows, and packed rows for
    # training), with the objective's collate, shared with eval; it decides nothing about
    # supervision
    from tunelab.batching import shares_prefixes
    flat = _flat_forwards_pay(model, args.device)
    layout = {"shared_prefix": shares_prefixes(model) and args.world_size == 1,  # DDP: 1 forward
              "flat": flat,
              # one forward either way (DDP too); a prefix seen whole needs full attention
              # (shares_prefixes) and tunelab.attention's blocks (flash-attention cannot)
              "prefix_trees": flat and args.device.type == "cpu" and shares_prefixes(model)}
    collator = StepCollator(prep.objective, prep.tokenizer.pad_token_id,
                            forward_tokens=plan.forward_tokens, overhead=plan.forward_overhead,
                            **layout)
    eval_collator = StepCollator(prep.objective, prep.tokenizer.pad_token_id,
                                 forward_tokens=plan.eval_forward_tokens,
                                 overhead=plan.forward_overhead, **layout)
    # the reporter comes last: it sees (and may veto) what the others decided for a step
    trainer_callbacks = [EvaluateAtEpochEnd(steps_per_epoch=plan.steps_per_epoch,
                                            thin_cadence=cfg.eval_steps is None,
                                            saves_with_evaluations=cfg.save_steps is None),
                         *(callbacks or [])]
    if cfg.save_steps is None and args.world_size == 1:
        trainer_callbacks.insert(1, CheckpointBudget(keep_best=args.load_best_model_at_end,
                                                     checkpoint_bytes=checkpoint_bytes(model)))
    if cfg.early_stopping_patience:
        from transformers import EarlyStoppingCallback
        trainer_callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience))
    trainer = TunelabTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(prep.train_batches),
        eval_dataset=datasets.Dataset.from_list(prep.valid_rows) if prep.valid_rows else None,
        data_collator=collator, eval_collator=eval_collator, processing_class=prep.tokenizer,
        callbacks=[*trainer_callbacks, reporter], keep_checkpoints=cfg.save_total_limit,
        objective=prep.objective, config=cfg)
    for printer in (PrinterCallback, ProgressCallback):   # raw log dicts and a second bar
        trainer.remove_callback(printer)
    if prep.resume_from is not None:
        trainer.trained_tokens_seen = int(checkpoint_state(prep.resume_from)
                                          .get("trained_tokens_seen", 0))
    return Built(prep, model, trainer, reporter, channel, is_main, trainable, total)


def _started_data(prep: Prepared, trainable: int, total: int) -> dict[str, Any]:
    cfg, plan = prep.cfg, prep.plan
    return {"objective": cfg.objective, "method": cfg.method, "model": cfg.model,
            "train_examples": len(prep.train_rows),
            "replay_examples": prep.replay_examples,
            "valid_examples": len(prep.valid_rows), "epochs": plan.epochs,
            "batch_size": plan.batch_size, "learning_rate": plan.learning_rate,
            "trainable_parameters": trainable, "total_parameters": total,
            "micro_batch_size": plan.micro_batch_size,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "forward_tokens": plan.forward_tokens,
            "world_size": plan.world_size, "steps_per_epoch": plan.steps_per_epoch,
            "precision": prep.precision,
            "packed_rows": len(prep.train_batches) if cfg.packing else None,
            "resumed_from": str(prep.resume_from) if prep.resume_from else None}


def run_training(built: Built):
    """Open the run folder and train. Returns the Trainer's TrainOutput; raises
    TrainingCancelled after a cancel request, a TunelabError for what a user can fix."""
    from tunelab.train.events import MetricsLog, truncate_metrics
    prep, trainer = built.prep, built.trainer
    run_dir = prep.run_dir
    with trainer.args.main_process_first(desc="prepare the output folder"):
        if built.is_main:
            if prep.resume_from is None:
                run_dir.create(prep.cfg.to_yaml())
            else:
                last = truncate_metrics(run_dir.metrics_file, checkpoint_step(prep.resume_from))
                built.reporter.continue_from(last)
            built.channel.subscribe(MetricsLog(run_dir.metrics_file, run_dir.log_file))
    resume_from = str(prep.resume_from) if prep.resume_from else None
    from tunelab.runtime import training_allocator
    try:
        with training_allocator():
            output = trainer.train(resume_from_checkpoint=resume_from)
    except BaseException as e:
        if built.is_main:
            run_dir.after_failure()
        friendly = _as_user_error(e, run_dir)
        if friendly is e:
            raise
        raise friendly from None
    if built.reporter.cancelled_at is not None:
        step, ckpt = built.reporter.cancelled_at, built.reporter.cancel_checkpoint
        built.channel.emit("cancelled", {"checkpoint": str(ckpt) if ckpt else None}, step=step)
        raise TrainingCancelled(step, ckpt)
    return output


def write_outputs(built: Built, output, *, started: float) -> TrainResult:
    """The model, adapter, reports and result.json; then the run moves to output_dir."""
    prep, trainer, reporter = built.prep, built.trainer, built.reporter
    cfg, plan = prep.cfg, prep.plan
    state, args = trainer.state, trainer.args
    best_step = checkpoint_step(state.best_model_checkpoint) \
        if args.load_best_model_at_end and state.best_model_checkpoint else None
    valid_loss = float(state.best_metric) if best_step else reporter.last_valid_loss
    result = TrainResult(
        output_dir=cfg.output_dir,
        # what loads the fine-tune: the merged model, or the adapter where none was written
        model_dir=cfg.output_dir / ("model" if cfg.method == "full" or cfg.save_merged
                                    else "adapter"),
        adapter_dir=cfg.output_dir / "adapter" if cfg.method != "full" else None,
        metrics_file=cfg.output_dir / "metrics.jsonl",
        train_loss=reporter.last_train_loss if reporter.last_train_loss is not None
        else float(output.training_loss),
        valid_loss=valid_loss, best_step=best_step, steps=int(output.global_step),
        train_examples=len(prep.train_rows),
        trained_tokens=sum(sum(1 for x in labels if x != IGNORE_INDEX)   # every side's labels
                           for r in prep.train_rows for k, labels in r.items()
                           if k.endswith("labels")),
        seconds=round(time.time() - started, 2),
        extra={"trainable_parameters": built.trainable, "total_parameters": built.total,
               "precision": prep.precision, "objective": cfg.objective,
               "method": cfg.method, "epochs": plan.epochs,
               "batch_size": plan.batch_size, "micro_batch_size": plan.micro_batch_size,
               "gradient_accumulation_steps": plan.gradient_accumulation_steps,
               "forward_tokens": plan.forward_tokens,
               "world_size": plan.world_size, "learning_rate": plan.learning_rate,
               "packed_rows": len(prep.train_batches) if cfg.packing else None,
               "tokens_seen": int(state.num_input_tokens_seen or 0)})
    if built.is_main:
        _write_outputs(built.model, prep.tokenizer, cfg, prep.run_dir.partial, result)
        prep.run_dir.finalize()
        built.channel.emit("finished", result.to_json(), step=result.steps)
    args.distributed_state.wait_for_everyone()   # no rank returns before the output is in place
    return result


def train(cfg: TrainConfig | dict | str | Path, *, resume: bool = False, quiet: bool = False,
          callbacks: list | None = None, on_event: Callable[[TrainEvent], None] | None = None,
          should_cancel: Callable[[], bool] | None = None) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.train_file`; returns where everything was written.

    `cfg`: a TrainConfig, a dict of config keys, or a YAML path.
    `resume`: continue the killed, failed or cancelled run in `<output_dir>.partial` from its
    last checkpoint.
    `quiet`: print nothing (else: the plan, a progress bar, a row per evaluation; main process).
    `callbacks`: extra transformers TrainerCallbacks (they see the live model).
    `on_event`: called with every TrainEvent (tunelab.train.events), on the main process.
    `should_cancel`: polled every optimizer step; when it returns True the run saves a complete
    checkpoint at that step, emits "cancelled" and raises TrainingCancelled (resume continues).
    """
    from tunelab.config import build_config, load_config
    started = time.time()
    channel = EventChannel(enabled=int(os.environ.get("RANK", "0")) == 0)
    if on_event is not None:
        channel.subscribe(on_event)
    if not quiet:
        from tunelab.train.progress import ProgressDisplay
        channel.subscribe(ProgressDisplay())
    try:
        if isinstance(cfg, (str, Path)):
            cfg = load_config(cfg)
        elif isinstance(cfg, dict):
            cfg = build_config(cfg)
        built = build(prepare(cfg, resume=resume), channel, callbacks=callbacks,
                      should_cancel=should_cancel)
        return write_outputs(built, run_training(built), started=started)
    except TrainingCancelled:
        raise
    except BaseException as e:
        channel.emit("failed", {"message": str(e) or type(e).__name__})
        raise


def _write_outputs(model, tokenizer, cfg: TrainConfig, partial: Path,
                   result: TrainResult) -> None:
    from tunelab.train.report import plot_losses, write_results_csv
    if cfg.method != "full":
        adapter = partial / "adapter"
        model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        if not cfg.save_merged:
            merged = None
        elif cfg.method == "qlora":
            # merging into the 4-bit base would requantize it: merge into a bf16 copy instead
            import torch

            from tunelab import models
            merged = models.load_model(adapter, tokenizer=tokenizer, dtype=torch.bfloat16)
        else:
            merged = model.merge_and_unload()
    else:
        merged = model
    if merged is not None:
        merged.config.use_cache = True
        if hasattr(merged.config, "tunelab_added_token_ids"):   # trained now: no longer new
            del merged.config.tunelab_added_token_ids
        merged.save_pretrained(partial / "model")
        tokenizer.save_pretrained(partial / "model")
    objective = get_objective(cfg.objective)
    write_results_csv(partial / "metrics.jsonl", partial / "results.csv", objective.metric_names)
    headline = objective.metric_names[0] if objective.name != "sft" else None
    plot_losses(partial / "metrics.jsonl", partial / "loss.png", best_step=result.best_step,
                metric=headline, metric_label=objective.metric_label)
    write_json(partial / "result.json", result.to_json())


def _as_user_error(e: BaseException, run_dir: RunDir) -> BaseException:
    import torch
    kept = run_dir.checkpoints()
    where = (f"; the last good checkpoint is {kept[-1]} (continue with --resume)" if kept
             else "; no checkpoint was saved")
    if isinstance(e, TunelabError):
        return TunelabError(e.reason + where, file=e.file, line=e.line, field=e.field)
    text = str(e).lower()
    oom = isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or \
        "can't allocate memory" in text   # the CPU allocator's wording
    if oom:
        return TunelabError("out of memory: lower micro_batch_size or max_length, or set "
                            "gradient_checkpointing: true" + where)
    return e
