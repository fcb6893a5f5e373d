"""train(config) -> TrainResult: fine-tune a model (full or LoRA) on chat conversations.

Built on transformers.Trainer (+ PEFT for LoRA). We hand it datasets whose labels were already
made by tunelab.data.render, and a pad-only collator: supervision is decided in one place.
Everything a user can get wrong (config, data, model spec) is checked before the output folder
is created; the run writes into `<output_dir>.partial` and is renamed into place only when it
finished, so a failed run never leaves a half-written output folder.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import TrainConfig
from tunelab.data.conversation import read_conversations
from tunelab.data.io import write_json
from tunelab.data.render import IGNORE_INDEX, render
from tunelab.errors import TunelabError

log = logging.getLogger("tunelab.train")


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path                  # merged model: loads with from_pretrained
    adapter_dir: Path | None         # LoRA only
    metrics_file: Path
    train_loss: float | None
    valid_loss: float | None
    steps: int
    train_examples: int
    trained_tokens: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _render_file(path: Path, tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    rows = []
    for conv in read_conversations(path):
        row = render(conv.messages, tokenizer, max_length=max_length, source=conv.source)
        if all(label == IGNORE_INDEX for label in row["labels"]):
            raise TunelabError(f"nothing to train on after truncation to max_length={max_length}",
                               file=conv.source.rsplit(":", 1)[0],
                               line=int(conv.source.rsplit(":", 1)[1]), field="messages")
        rows.append(row)
    return rows


def _check_output_dir(cfg: TrainConfig) -> None:
    out = cfg.output_dir
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise TunelabError("output folder exists and is not empty (set overwrite: true or "
                           "choose another output_dir)", field="output_dir")


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


def _training_arguments(cfg: TrainConfig, work: Path, n_train: int, has_valid: bool,
                        precision: str, quiet: bool):
    import torch
    from transformers import TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = max(1, math.ceil(n_train / (cfg.batch_size * world))
                          // cfg.gradient_accumulation_steps)
    total = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    eval_steps = cfg.eval_steps or max(1, total // 5)
    return TrainingArguments(
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_steps=min(cfg.logging_steps, max(1, total // 5)),
        logging_first_step=True,
        eval_strategy="steps" if has_valid else "no",
        eval_steps=eval_steps,
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        remove_unused_columns=False,
        label_names=["labels"],   # PEFT wraps forward(); without this eval loss is dropped
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        disable_tqdm=quiet,
        dataloader_num_workers=0,
    )


def _wrap_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # unknown target modules
        raise TunelabError(str(e).splitlines()[0], field="lora.target_modules") from None


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def train(cfg: TrainConfig | dict | str | Path, *, quiet: bool = False,
          callbacks: list | None = None) -> TrainResult:
    """Fine-tune `cfg.model` on `cfg.train_file`; returns where everything was written.

    `cfg`: a TrainConfig, a dict of config keys, or a YAML path.
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
    _check_output_dir(cfg)
    for name in ("train_file", "valid_file"):
        p = getattr(cfg, name)
        if p is not None and not Path(p).is_file():
            raise TunelabError("file not found", file=p, field=name)
    precision = resolve_precision(cfg.precision)
    set_threads(cfg.threads)

    source = models.resolve(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model, source=source)
    train_rows = _render_file(cfg.train_file, tokenizer, cfg.max_length)
    valid_rows = _render_file(cfg.valid_file, tokenizer, cfg.max_length) if cfg.valid_file else []
    model = models.load_model(cfg.model, tokenizer=tokenizer, source=source)
    model.config.use_cache = False
    if cfg.method == "lora":
        model = _wrap_lora(model, cfg)
    trainable, total = count_parameters(model)
    say = (lambda *a: None) if quiet else print
    say(f"tunelab: {cfg.method} fine-tuning {cfg.model}: {trainable:,} trainable of {total:,} "
        f"parameters ({100 * trainable / total:.2f}%), {len(train_rows)} train / "
        f"{len(valid_rows)} valid examples, precision {precision}")

    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer

    partial = cfg.output_dir.with_name(cfg.output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        (partial / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        from tunelab.train.callbacks import MetricsWriter
        metrics = MetricsWriter(partial / "metrics.jsonl", partial / "train.log")
        to_ds = lambda rows: datasets.Dataset.from_dict(  # noqa: E731
            {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
        trainer = Trainer(
            model=model,
            args=_training_arguments(cfg, partial, len(train_rows), bool(valid_rows), precision,
                                     quiet),
            train_dataset=to_ds(train_rows),
            eval_dataset=to_ds(valid_rows) if valid_rows else None,
            # pads input_ids with the pad token and labels with -100; decides nothing else
            data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX,
                                                 padding=True),
            processing_class=tokenizer,
            callbacks=[metrics, *(callbacks or [])],
        )
        if quiet:  # with tqdm off, transformers prints every log dict instead
            from transformers.trainer_callback import PrinterCallback
            trainer.remove_callback(PrinterCallback)
        output = trainer.train()
        valid_loss = metrics.last_valid_loss
        if valid_rows and metrics.last_valid_step != output.global_step:
            valid_loss = float(trainer.evaluate()["eval_loss"])

        model_dir = partial / "model"
        adapter_dir = None
        if cfg.method == "lora":
            adapter_dir = partial / "adapter"
            model.save_pretrained(adapter_dir)
            tokenizer.save_pretrained(adapter_dir)
            merged = model.merge_and_unload()
        else:
            merged = model
        merged.config.use_cache = True
        merged.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        shutil.rmtree(partial / "checkpoints", ignore_errors=True)

        trained_tokens = sum(sum(1 for x in r["labels"] if x != IGNORE_INDEX) for r in train_rows)
        result = TrainResult(
            output_dir=cfg.output_dir,
            model_dir=cfg.output_dir / "model",
            adapter_dir=cfg.output_dir / "adapter" if adapter_dir else None,
            metrics_file=cfg.output_dir / "metrics.jsonl",
            train_loss=metrics.last_train_loss if metrics.last_train_loss is not None
            else float(output.training_loss),
            valid_loss=valid_loss,
            steps=int(output.global_step),
            train_examples=len(train_rows),
            trained_tokens=trained_tokens,
            seconds=round(time.time() - started, 2),
            extra={"trainable_parameters": trainable, "total_parameters": total,
                   "precision": precision, "method": cfg.method},
        )
        write_json(partial / "result.json", result.to_json())
        _finalize(partial, cfg.output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result
