"""An OpenAI fine-tuning request -> the TrainConfig that `tunelab train` would use.

OpenAI's hyperparameters (`method.supervised.hyperparameters` or the older top-level
`hyperparameters`) map onto TrainConfig keys; tunelab's own options come in one extra field,
`tunelab` (any TrainConfig key: method, lora.r, max_length, max_steps, ...), and are validated by
the same build_config as a YAML config, so an error names the field as `tunelab.<key>`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import TrainConfig, build_config
from tunelab.errors import TunelabError
from tunelab.train.auto import auto_learning_rate

# set by the job itself, never by the request's `tunelab` field (each a path on this server,
# which a request must not name): key -> the hint in the error
RESERVED = {"model": "use the top-level 'model'", "train_file": "use the top-level "
            "'training_file'", "valid_file": "use the top-level 'validation_file'",
            "output_dir": "the server chooses it", "overwrite": "the server chooses it",
            "replay_file": "a server path; append replay conversations to the training file"}
# OpenAI hyperparameter -> TrainConfig key
HYPERPARAMETERS = {"n_epochs": "epochs", "batch_size": "batch_size",
                   "learning_rate_multiplier": "learning_rate"}


def train_config(*, base_spec: str, train_path: Path, valid_path: Path | None, output_dir: Path,
                 hyperparameters: dict[str, Any], hyperparameters_param: str, seed: int | None,
                 options: dict[str, Any]) -> TrainConfig:
    """`hyperparameters_param`: where the hyperparameters came from, for error messages
    ("method.supervised.hyperparameters" or "hyperparameters")."""
    for key in options:
        if key in RESERVED:
            raise TunelabError(f"set by the job ({RESERVED[key]})", field=f"tunelab.{key}")
    data: dict[str, Any] = {}
    method = options.get("method", "lora")
    for name, key in HYPERPARAMETERS.items():
        value = hyperparameters.get(name, "auto")
        if value in (None, "auto"):
            continue
        if key in options:
            raise TunelabError(f"given twice: as {hyperparameters_param}.{name} and as "
                               f"tunelab.{key}", field=f"tunelab.{key}")
        if name == "learning_rate_multiplier":
            value = float(value) * auto_learning_rate(str(method))
        data[key] = value
    if seed is not None:
        if "seed" in options:
            raise TunelabError("given twice: as seed and as tunelab.seed", field="tunelab.seed")
        data["seed"] = seed
    data.update(options)
    data.update(model=base_spec, train_file=str(train_path),
                valid_file=str(valid_path) if valid_path else None, output_dir=str(output_dir),
                overwrite=True)
    try:
        return build_config(data)
    except TunelabError as e:
        raise TunelabError(e.reason, field=_param(e.field, hyperparameters_param)) from None


def _param(field: str | None, hp_param: str) -> str | None:
    if field is None:
        return None
    root = field.split(".")[0]
    for name, key in HYPERPARAMETERS.items():
        if root == key:
            return f"{hp_param}.{name}"
    if root == "seed":
        return "seed"
    return f"tunelab.{field}"


def shown_hyperparameters(cfg: dict[str, Any], resolved: dict[str, Any] | None = None
                          ) -> dict[str, Any]:
    """The job's `hyperparameters`: "auto" until training resolved them (the started event)."""
    method = cfg.get("method", "lora")
    lr = cfg.get("learning_rate", "auto")
    out = {"n_epochs": cfg.get("epochs", "auto"), "batch_size": cfg.get("batch_size", "auto"),
           "learning_rate_multiplier": lr if lr == "auto" else
           round(float(lr) / auto_learning_rate(method), 6)}
    if resolved:
        out = {"n_epochs": resolved.get("epochs", out["n_epochs"]),
               "batch_size": resolved.get("batch_size", out["batch_size"]),
               "learning_rate_multiplier": round(float(resolved["learning_rate"]) /
                                                 auto_learning_rate(method), 6)
               if resolved.get("learning_rate") else out["learning_rate_multiplier"]}
    if isinstance(out["n_epochs"], float) and out["n_epochs"].is_integer():
        out["n_epochs"] = int(out["n_epochs"])
    return out


def options_schema() -> dict[str, Any]:
    """The JSON schema of the `tunelab` field (for the OpenAPI document and the web page)."""
    schema = TrainConfig.model_json_schema()
    for key in RESERVED:
        schema.get("properties", {}).pop(key, None)
    if "required" in schema:
        schema["required"] = [r for r in schema["required"] if r not in RESERVED]
    return schema
