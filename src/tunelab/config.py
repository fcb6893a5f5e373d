"""One typed training config. Every default lives here; YAML <-> config; `--set key=value`.

Unknown keys and bad values are errors that name the file and the field (pydantic with
extra="forbid"): a typo never silently falls back to a default.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError,
                      create_model, model_validator)

from tunelab.errors import TunelabError
from tunelab.models import DEFAULT_MODEL
from tunelab.objectives import OBJECTIVES

# Tokens per example, for training and for every loss computed on a tuned model's data (a tuned
# model remembers the max_length it was trained with: tunelab.models.trained_with).
DEFAULT_MAX_LENGTH = 1024

# Upper bounds, so that an absurd value is refused when a config (or an API request) is read,
# not hours later or never: 131,072 tokens is the longest context of common open models (Llama
# 3.1, Qwen2.5 with YaRN); a million optimizer steps is weeks at the fastest step times; no
# useful learning rate is above 1.
MAX_MAX_LENGTH = 131_072
MAX_STEPS = 1_000_000
MAX_EPOCHS = 1000
MAX_BATCH = 65_536
MAX_LORA_RANK = 4096


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Strict):
    r: int = Field(16, ge=1, le=MAX_LORA_RANK, description="LoRA rank")
    alpha: int = Field(32, ge=1, le=16 * MAX_LORA_RANK,
                       description="LoRA alpha (scale = alpha / r)")
    # 0, as Unsloth's and Thinking Machines' LoRA recipes: on a CPU, sampling PEFT's dropout
    # masks (one per adapted Linear) was 17% of a SmolLM2 LoRA step, and each keeps a copy of
    # its input for the backward pass
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


Auto = Literal["auto"]


class _TrainConfig(_Strict):
    # Two axes, named apart: `objective` is WHAT is optimised (sft: cross-entropy on answers;
    # dpo: preferences between two answers), `method` is HOW the weights are adapted (lora,
    # dora, qlora, full). Each objective's own settings sit under its name (dpo: {beta, ...}).
    objective: Literal[tuple(OBJECTIVES)] = Field(  # type: ignore[valid-type]
        "sft", description="what is optimised: " + "; ".join(
            f"{o.name}: {o.title}" for o in OBJECTIVES.values()))
    model: str = Field(DEFAULT_MODEL, description="builtin alias, model folder, .gguf or hub id")
    train_file: Path = Field(..., description="JSONL: conversations for sft, preference "
                             "pairs for dpo")
    valid_file: Path | None = Field(None, description="JSONL for validation during training")
    replay_file: Path | None = Field(None, description="general conversations trained along "
                                     "with train_file against forgetting (`tunelab data "
                                     "replay` makes them from the base model's own answers)")
    output_dir: Path = Path("runs/latest")
    overwrite: bool = Field(False, description="replace an existing output_dir")

    # lora: low-rank adapters; dora: weight-decomposed LoRA; qlora: LoRA on a 4-bit base
    # (bitsandbytes: CUDA, or its CPU backend); full: every weight (optionally freezing the
    # lower layers).
    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    freeze_layers: int = Field(0, ge=0, le=10_000,
                               description="full: freeze embeddings + the first N layers")

    # "auto" follows the OpenAI fine-tuning API's idea (see tunelab.train.auto for the rules).
    epochs: Annotated[float, Field(gt=0, le=MAX_EPOCHS)] | Auto = Field(
        "auto", description="auto: 3, more for small datasets, fewer for big")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                  description="stop after this many optimizer steps")
    batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH)] | Auto = Field(
        "auto", description="global batch (examples per optimizer step)")
    micro_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH,
                                         description="examples per device per "
                                         "forward at the longest example's length (shorter "
                                         "ones are grouped up to the same padded tokens); "
                                         "default: fits a token budget (auto.py); the rest "
                                         "of the batch is gradient accumulation")
    learning_rate: Annotated[float, Field(gt=0, le=1)] | Auto = Field(
        "auto", description="auto: sft 2e-4 LoRA/DoRA, 2e-5 full; dpo a tenth of that")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup",
                          "cosine_with_min_lr", "inverse_sqrt", "polynomial",
                          "warmup_stable_decay"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=8, le=MAX_MAX_LENGTH,
                            description="tokens per example; longer ones are cut")
    packing: bool = Field(False, description="pack examples into rows of max_length "
                                             "(each attends only to itself)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware has it (CUDA or AVX-512 BF16 CPUs)")
    gradient_checkpointing: bool = False
    save_merged: bool = Field(False, description="LoRA: also write the adapter merged into its "
                              "base as model/ (the size of the base: 517 MB for SmolLM2 beside "
                              "a 13 MB adapter). Off, the run folder means base + adapter "
                              "(chat, eval, compare, the server load it so), and `tunelab "
                              "export` merges on demand")
    # Off for SFT, measured (bench/train_match.py, SmolLM2 full, 200 steps at TRL's schedule):
    # validation loss 0.0599/0.1451 grouped at seeds 42/1, 0.0389/0.0409 not, TRL 0.0369/0.0686
    # (length goes with the answer in the demo's task: grouped steps hold one kind of answer).
    # The demo (LoRA, replay rows): 96.1% accuracy, 259 s of training ungrouped with prefix
    # trees; 96.7%, 251 s grouped. On for DPO, whose pairs are padded: grouping saves padding.
    group_by_length: bool | None = Field(
        None, description="steps of similar lengths: less padding. Default: on for DPO (its "
        "pairs are padded), off for SFT (its rows go flat, with no padding to save)")

    shuffle: bool = Field(True, description="a new random order each epoch; false: the "
                          "train file's order every epoch (a curriculum, or two tools "
                          "compared on the same steps)")

    logging_steps: int = Field(10, ge=1, le=MAX_STEPS)
    eval_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                   description="default: ~5 evaluations per run; "
                                   "also at each epoch end")
    save_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                   description="default: at each evaluation (~5 a run), "
                                   "skipping one that would make checkpoint writes over a "
                                   "tenth of a single-process run's time (never the last "
                                   "step's, nor a new best validation's)")
    save_total_limit: int = Field(2, ge=1, le=1000, description="checkpoints kept (plus the best)")
    load_best_at_end: bool = Field(True, description="with a valid_file: the output model is "
                                   "the checkpoint with the lowest validation loss")
    early_stopping_patience: int | None = Field(None, ge=1, le=MAX_STEPS,
                                                description="stop after N "
                                                "evaluations without a better validation loss")
    seed: int = Field(42, ge=0, le=2**32 - 1)
    threads: int | None = Field(None, ge=1, le=4096,
                                description="torch CPU threads; default: cores we may use")
    tensorboard: bool | Auto = Field("auto", description="auto: when tensorboard is installed")

    @model_validator(mode="after")
    def _check(self) -> _TrainConfig:
        # "field: message", so build_config can name the field
        for o in OBJECTIVES.values():
            if o.settings is not None and o.name != self.objective and \
                    getattr(self, o.name) != o.settings():
                raise ValueError(f"{o.name}: settings given but objective is '{self.objective}'")
        if OBJECTIVES[self.objective].data_kind != "conversations":
            for name in ("packing", "replay_file"):
                if getattr(self, name):
                    raise ValueError(f"{name}: applies to conversations (objective 'sft'), not "
                                     f"to {OBJECTIVES[self.objective].data_kind}")
        if not self.shuffle:
            for name in ("group_by_length", "replay_file"):
                if getattr(self, name):
                    raise ValueError(f"{name}: reorders the rows (or mixes replay rows in), "
                                     "while shuffle: false keeps the train file's order")
        if self.method == "full" and self.lora != LoraSettings():
            raise ValueError("lora: settings given but method is 'full'")
        if self.freeze_layers and self.method != "full":
            raise ValueError("freeze_layers: applies to method 'full' only")
        if self.early_stopping_patience and self.valid_file is None:
            raise ValueError("early_stopping_patience: needs a valid_file")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# The config: the shared keys plus one section per objective that has settings, read from the
# objective registry (a new objective's settings need no edit here).
TrainConfig = create_model(
    "TrainConfig", __base__=_TrainConfig, __module__=__name__,
    **{o.name: (o.settings, Field(default_factory=o.settings,
                                  description=f"{o.title} settings (objective: {o.name})"))
       for o in OBJECTIVES.values() if o.settings is not None})


# Names users bring from TRL / transformers / other tools, to point them at ours.
_KNOWN_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "lr": "learning_rate", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "micro_batch_size", "max_seq_length": "max_length",
    "model_name_or_path": "model", "base_model": "model", "dataset": "train_file",
    "eval_file": "valid_file", "validation_file": "valid_file", "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_ratio", "bf16": "precision", "fp16": "precision",
    "gradient_accumulation_steps": "batch_size",
}


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise TunelabError(f"cannot set '{key}': '{p}' is not a section", field=key)
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TunelabError(f"--set expects key=value, got '{item}'")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _field_names(loc: tuple) -> list[str]:
    model: Any = TrainConfig
    for part in loc[:-1]:
        f = model.model_fields.get(part) if isinstance(part, str) else None
        model = f.annotation if f is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _config_path(loc: tuple) -> tuple:
    """The part of a pydantic error location that names config keys (drops union tags such as
    'float' or "literal['auto']" that pydantic appends)."""
    model: Any = TrainConfig
    out = []
    for part in loc:
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        if part not in fields:
            if not fields:  # below a leaf (list index, union tag): stop at the key
                break
            out.append(part)  # an unknown key: name it
            break
        out.append(part)
        model = fields[part].annotation
    return tuple(out)


def build_config(data: dict[str, Any], *, file: str | Path | None = None) -> TrainConfig:
    try:
        return TrainConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in _config_path(loc)) or None
        if err["type"] == "extra_forbidden":
            names = _field_names(loc)
            alias = _KNOWN_ALIASES.get(str(loc[-1]))
            close = [alias] if alias in names else \
                difflib.get_close_matches(str(loc[-1]), names, n=1)
            msg = "unknown key" + (f" (did you mean '{close[0]}'?)" if close else "")
        elif err["type"] == "missing":
            msg = "required"
        elif err["type"] == "value_error" and not loc:  # from TrainConfig._check
            field, _, msg = str(err["ctx"]["error"]).partition(": ")
        else:
            msg = err["msg"]
        raise TunelabError(msg, file=file, field=field) from None
    except TypeError as e:
        raise TunelabError(str(e), file=file) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TunelabError("config file not found", file=path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise TunelabError(f"not valid YAML: {getattr(e, 'problem', e)}", file=path,
                               line=mark.line + 1 if mark else None) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TunelabError("expected a mapping of config keys", file=path)
        data = loaded or {}
    data = _merge(data, parse_overrides(overrides or []))
    return build_config(data, file=path)
