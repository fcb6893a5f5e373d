"""train(config) -> TrainResult: fine-tune a model (full, LoRA, DoRA, QLoRA) on conversations.

Built on transformers.Trainer (+ PEFT for adapters). We hand it datasets whose labels were
already made by tunelab.data.render, and a pad-only collator: supervision is decided in one
place. Everything a user can get wrong (config, data, model spec, method) is checked before the
output folder is created. The run writes into `<output_dir>.partial`, and is renamed into place
only when it finished; checkpoints in `<output_dir>.partial/checkpoints` survive a crash or a
kill, and `resume=True` (`tunelab train CONFIG --resume`) continues from the last whole one.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import TrainConfig
from tunelab.data.conversation import read_conversations
from tunelab.data.io import write_json
from tunelab.data.render import IGNORE_INDEX, render_examples
from tunelab.errors import TunelabError
from tunelab.train.auto import Plan, make_plan

log = logging.getLogger("tunelab.train")

RESUME_SAFE_KEYS = {"overwrite", "threads", "tensorboard"}   # may differ on --resume


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path                  # merged model: loads with from_pretrained
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
    return cfg.output_dir.with_name(cfg.output_dir.name + ".partial")


def _render_file(path: Path, tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Training rows (labels decided by tunelab.data.render); batched tokenization."""
    convs = read_conversations(path)
    sources = [c.source for c in convs]
    rows = render_examples([c.messages for c in convs], tokenizer, max_length=max_length,
                           sources=sources)
    if len(rows) == len(convs):  # one row per conversation: name the offending line
        for row, src in zip(rows, sources):
            if all(label == IGNORE_INDEX for label in row["labels"]):
                file, _, line = src.rpartition(":")
                raise TunelabError(f"nothing left to train on after truncation to max_length="
                                   f"{max_length} (the prompt alone is longer)", file=file,
                                   line=int(line), field="messages")
    elif any(all(label == IGNORE_INDEX for label in r["labels"]) for r in rows):
        raise TunelabError(f"some turns have nothing left to train on after truncation to "
                           f"max_length={max_length}", file=path, field="max_length")
    return rows


def _check_method(cfg: TrainConfig) -> None:
    import torch
    if cfg.method == "qlora":
        import importlib.util
        if not torch.cuda.is_available():
            raise TunelabError("QLoRA quantizes the base model to 4 bits with bitsandbytes, which "
                               "needs a CUDA GPU; none is available (use method: lora)",
                               field="method")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TunelabError("QLoRA needs bitsandbytes: pip install bitsandbytes",
                               field="method")


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


def _check_output(cfg: TrainConfig, resume: bool) -> Path | None:
    """Validate the output location; on resume, return the checkpoint to continue from."""
    from tunelab.train.trainer import complete_checkpoints
    partial = partial_dir(cfg)
    if resume:
        ckpts = complete_checkpoints(partial / "checkpoints")
        if not ckpts:
            what = "the run already finished" if cfg.output_dir.exists() else "no checkpoint"
            raise TunelabError(f"nothing to resume: {what} ({partial} has no whole checkpoint)",
                               field="output_dir")
        saved = partial / "config.yaml"
        if saved.exists():
            import yaml
            before = yaml.safe_load(saved.read_text(encoding="utf-8"))
            now = cfg.model_dump(mode="json")
            changed = [k for k in now if k not in RESUME_SAFE_KEYS and before.get(k) != now[k]]
            if changed:
                raise TunelabError(f"the config changed since the run started ({', '.join(changed)}"
                                   "); resume with the same config", field=changed[0])
        return ckpts[-1]
    if complete_checkpoints(partial / "checkpoints") and not cfg.overwrite:
        raise TunelabError(f"an unfinished run with checkpoints is in {partial}: continue it with "
                           "--resume, or set overwrite: true to start again", field="output_dir")
    out = cfg.output_dir
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise TunelabError("output folder exists and is not empty (set overwrite: true or "
                           "choose another output_dir)", field="output_dir")
    return None


def _finalize(partial: Path, out: Path) -> None:
    """Move the finished run into place; an old run is removed only after the new one is whole."""
    trash = None
    if out.exists():
        trash = out.with_name(out.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(out, trash)
    os.rename(partial, out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _want_tensorboard(cfg: TrainConfig) -> bool:
    import importlib.util
    installed = importlib.util.find_spec("tensorboard") is not None
    if cfg.tensorboard is True and not installed:
        raise TunelabError("tensorboard is not installed (pip install tensorboard)",
                           field="tensorboard")
    return installed if cfg.tensorboard == "auto" else bool(cfg.tensorboard)


def _training_arguments(cfg: TrainConfig, plan: Plan, work: Path, has_valid: bool,
                        precision: str, quiet: bool, tensorboard: bool):
    import torch
    from transformers import TrainingArguments

    if tensorboard:  # transformers 5 takes the folder from the environment only
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(work / "tensorboard")
    with_valid = "steps" if has_valid else "no"
    return TrainingArguments(
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=plan.micro_batch_size,
        per_device_eval_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        num_train_epochs=plan.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=plan.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision == "bf16",
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
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing
        else "random",
        remove_unused_columns=False,
        label_names=["labels"],   # PEFT wraps forward(); without this eval loss is dropped
        include_num_input_tokens_seen="non_padding",
        average_tokens_across_devices=True,   # loss normalised by trained tokens, globally
        ddp_find_unused_parameters=False,
        disable_tqdm=quiet,
        dataloader_num_workers=0,
    )


def _apply_method(model, cfg: TrainConfig):
    if cfg.method == "full":
        if cfg.freeze_layers:
            _freeze_lower_layers(model, cfg.freeze_layers)
        return model
    from peft import LoraConfig, get_peft_model
    # Tokens the tokenizer gained (ChatML on a base model) have fresh embedding rows: a frozen
    # base would keep them random, and the model could never learn to emit <|im_end|>.
    added = getattr(model.config, "tunelab_added_token_ids", None)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
                      use_dora=cfg.method == "dora", trainable_token_indices=added or None)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=
                                                cfg.gradient_checkpointing)
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # unknown target modules
        raise TunelabError(str(e).splitlines()[0], field="lora.target_modules") from None


def _freeze_lower_layers(model, n: int) -> None:
    layers = model.get_decoder().layers
    if n > len(layers):
        raise TunelabError(f"the model has {len(layers)} layers; cannot freeze {n}",
                           field="freeze_layers")
    model.get_input_embeddings().requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(False)


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _load_model(cfg: TrainConfig, tokenizer, source):
    from tunelab import models
    kwargs = {}
    if cfg.method == "qlora":
        import torch
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = models.load_model(cfg.model, tokenizer=tokenizer, source=source, **kwargs)
    model.config.use_cache = False   # also required for packed rows to be isolated
    return model


def train(cfg: TrainConfig | dict | str | Path, *, resume: bool = False, quiet: bool = False,
          callbacks: list | None = None) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.train_file`; returns where everything was written.

    `cfg`: a TrainConfig, a dict of config keys, or a YAML path.
    `resume`: continue the killed or failed run in `<output_dir>.partial` from its last checkpoint.
    `callbacks`: extra transformers TrainerCallbacks (they see the live model).
    """
    from tunelab import models
    from tunelab.config import build_config, load_config
    from tunelab.runtime import resolve_precision, set_threads

    if isinstance(cfg, (str, Path)):
        cfg = load_config(cfg)
    elif isinstance(cfg, dict):
        cfg = build_config(cfg)
    started = time.time()
    resume_from = _check_output(cfg, resume)
    for name in ("train_file", "valid_file"):
        p = getattr(cfg, name)
        if p is not None and not Path(p).is_file():
            raise TunelabError("file not found", file=p, field=name)
    _check_method(cfg)
    tensorboard = _want_tensorboard(cfg)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # per-checkpoint "Writing model shards" bars are noise
    precision = resolve_precision(cfg.precision)
    set_threads(cfg.threads)

    import torch
    source = models.resolve(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model, source=source)
    train_rows = _render_file(cfg.train_file, tokenizer, cfg.max_length)
    valid_rows = _render_file(cfg.valid_file, tokenizer, cfg.max_length) if cfg.valid_file else []
    _check_target_modules(cfg, source)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.packing:
        from tunelab.train.packing import pack
        train_batches = pack(train_rows, cfg.max_length)
    else:
        train_batches = train_rows
    plan = make_plan(cfg, len(train_batches), n_examples=len(train_rows),
                     longest=max(len(r["input_ids"]) for r in train_batches), world_size=world,
                     on_gpu=torch.cuda.is_available())
    model = _load_model(cfg, tokenizer, source)
    model = _apply_method(model, cfg)
    trainable, total = count_parameters(model)

    import datasets
    from transformers import DataCollatorForSeq2Seq

    from tunelab.train.callbacks import EvaluateAtEpochEnd, MetricsWriter
    from tunelab.train.trainer import TunelabTrainer

    partial = partial_dir(cfg)
    args = _training_arguments(cfg, plan, partial, bool(valid_rows), precision, quiet, tensorboard)
    if args.n_gpu > 1:  # torch DataParallel: one process driving several GPUs
        raise TunelabError(f"{args.n_gpu} GPUs are visible to one process: launch one process per "
                           f"GPU (torchrun --nproc_per_node {args.n_gpu} -m tunelab.cli train ...) "
                           "or pick one with CUDA_VISIBLE_DEVICES")
    is_main = args.process_index == 0
    say = print if is_main and not quiet else (lambda *a, **k: None)
    say(f"tunelab: {cfg.method} fine-tuning {cfg.model}: {trainable:,} trainable of {total:,} "
        f"parameters ({100 * trainable / total:.2f}%)")
    say(f"tunelab: {len(train_rows)} train / {len(valid_rows)} valid examples"
        + (f" packed into {len(train_batches)} rows" if cfg.packing else "")
        + f"; {plan.epochs:g} epochs, batch {plan.batch_size} (= {plan.micro_batch_size} x "
        f"{plan.gradient_accumulation_steps} accumulation x {plan.world_size} processes), "
        f"lr {plan.learning_rate:g}, {plan.total_steps} steps, precision {precision}")
    with args.main_process_first(desc="prepare the output folder"):
        if is_main:
            if resume_from is None:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
                (partial / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
            else:
                say(f"tunelab: resuming from {resume_from}")
    resumed_step = int(resume_from.name.split("-")[1]) if resume_from else None
    metrics = MetricsWriter(partial / "metrics.jsonl", partial / "train.log",
                            resumed_at=resumed_step if is_main else None)
    # pads input_ids with the pad token and labels with -100; decides nothing else
    padded = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    if cfg.packing:  # validation is never packed: its loss must be comparable across configs
        from tunelab.train.packing import PackedCollator
        collator = _EvalAwareCollator(PackedCollator(tokenizer.pad_token_id), padded)
    else:
        collator = padded
    extra_callbacks = [metrics, EvaluateAtEpochEnd(), *(callbacks or [])]
    if cfg.early_stopping_patience:
        from transformers import EarlyStoppingCallback
        extra_callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience))
    trainer = TunelabTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(train_batches),
        eval_dataset=datasets.Dataset.from_list(valid_rows) if valid_rows else None,
        data_collator=collator, processing_class=tokenizer, callbacks=extra_callbacks,
        keep_checkpoints=cfg.save_total_limit)
    if resume_from is not None:
        from tunelab.train.trainer import checkpoint_state
        trainer.trained_tokens_seen = int(checkpoint_state(resume_from).get("trained_tokens_seen", 0))
    if quiet:  # with tqdm off, transformers prints every log dict instead
        from transformers.trainer_callback import PrinterCallback
        trainer.remove_callback(PrinterCallback)
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except BaseException as e:
        _after_failure(partial, is_main)
        friendly = _as_user_error(e, partial)
        if friendly is e:
            raise
        raise friendly from None

    state = trainer.state
    best_step = int(Path(state.best_model_checkpoint).name.split("-")[1]) \
        if args.load_best_model_at_end and state.best_model_checkpoint else None
    valid_loss = float(state.best_metric) if best_step else metrics.last_valid_loss
    result = TrainResult(
        output_dir=cfg.output_dir,
        model_dir=cfg.output_dir / "model",
        adapter_dir=cfg.output_dir / "adapter" if cfg.method != "full" else None,
        metrics_file=cfg.output_dir / "metrics.jsonl",
        train_loss=metrics.last_train_loss if metrics.last_train_loss is not None
        else float(output.training_loss),
        valid_loss=valid_loss, best_step=best_step, steps=int(output.global_step),
        train_examples=len(train_rows),
        trained_tokens=sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in train_rows),
        seconds=round(time.time() - started, 2),
        extra={"trainable_parameters": trainable, "total_parameters": total,
               "precision": precision, "method": cfg.method, "epochs": plan.epochs,
               "batch_size": plan.batch_size, "micro_batch_size": plan.micro_batch_size,
               "gradient_accumulation_steps": plan.gradient_accumulation_steps,
               "world_size": plan.world_size, "learning_rate": plan.learning_rate,
               "packed_rows": len(train_batches) if cfg.packing else None,
               "tokens_seen": int(state.num_input_tokens_seen or 0)})
    if is_main:
        _write_outputs(trainer, model, tokenizer, cfg, partial, result)
        _finalize(partial, cfg.output_dir)
        say(f"tunelab: done in {result.seconds:.0f} s"
            + (f"; best validation loss {valid_loss:.4f} at step {best_step}" if best_step else ""))
    args.distributed_state.wait_for_everyone()   # no rank returns before the output is in place
    return result


class _EvalAwareCollator:
    """Packed rows for training, padded single examples for evaluation."""

    def __init__(self, packed, padded):
        self.packed, self.padded = packed, padded

    def __call__(self, features):
        return self.packed(features) if "position_ids" in features[0] else self.padded(features)


def _write_outputs(trainer, model, tokenizer, cfg: TrainConfig, partial: Path,
                   result: TrainResult) -> None:
    from tunelab.train.report import plot_losses, write_results_csv
    if cfg.method != "full":
        adapter = partial / "adapter"
        model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        _point_adapter_at_spec(adapter / "adapter_config.json", cfg.model)
        if cfg.method == "qlora":
            # merging into the 4-bit base would requantize it: merge into a bf16 copy instead
            import torch

            from tunelab import models
            merged = models.load_model(adapter, tokenizer=tokenizer, dtype=torch.bfloat16)
        else:
            merged = model.merge_and_unload()
    else:
        merged = model
    merged.config.use_cache = True
    if hasattr(merged.config, "tunelab_added_token_ids"):   # trained now: no longer new
        del merged.config.tunelab_added_token_ids
    merged.save_pretrained(partial / "model")
    tokenizer.save_pretrained(partial / "model")
    write_results_csv(partial / "metrics.jsonl", partial / "results.csv")
    plot_losses(partial / "metrics.jsonl", partial / "loss.png", best_step=result.best_step)
    write_json(partial / "result.json", result.to_json())


def _point_adapter_at_spec(adapter_config: Path, spec: str) -> None:
    """PEFT records the folder it loaded the base from (for the builtin model, a cache path on
    this machine; for a .gguf, a folder with no config.json). Record the user's model spec
    instead, so the adapter folder is itself a spec that loads anywhere tunelab runs."""
    import json
    from tunelab.models import BUILTINS
    portable = spec if spec in BUILTINS or not Path(spec).exists() else str(Path(spec).resolve())
    data = json.loads(adapter_config.read_text())
    data["base_model_name_or_path"] = portable
    adapter_config.write_text(json.dumps(data, indent=2))


def _after_failure(partial: Path, is_main: bool) -> None:
    """Keep a failed run's checkpoints for --resume; remove a run that never saved one."""
    from tunelab.train.trainer import complete_checkpoints
    if is_main and not complete_checkpoints(partial / "checkpoints"):
        shutil.rmtree(partial, ignore_errors=True)


def _as_user_error(e: BaseException, partial: Path) -> BaseException:
    import torch

    from tunelab.train.trainer import complete_checkpoints
    kept = complete_checkpoints(partial / "checkpoints")
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
