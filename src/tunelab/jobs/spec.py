"""An OpenAI fine-tuning request -> the TrainConfig that `tunelab train` would use.

`method.type` names the objective (tunelab.objectives: "supervised" -> sft, "dpo" -> dpo). Its
hyperparameters (`method.<type>.hyperparameters`, or the older top-level `hyperparameters`) map
onto TrainConfig keys: the shared n_epochs / batch_size / learning_rate_multiplier and the
objective's own (`Objective.api_hyperparameters`, DPO: beta -> dpo.beta). tunelab's own options
come in one extra field, `tunelab` (any TrainConfig key: method, lora.r, max_length, dpo.loss_type,
...), and are validated by the same build_config as a YAML config, so an error names the field
as `tunelab.<key>` or as the hyperparameter it came from.

Nothing here names an objective: a new one brings its method type and hyperparameters with it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import TrainConfig, build_config
from tunelab.errors import TunelabError
from tunelab.objectives import BY_API_TYPE, OBJECTIVES, Objective
from tunelab.train.auto import auto_learning_rate

# set by the job itself, never by the request's `tunelab` field (each a path on this server,
# which a request must not name, or a choice another request field makes): key -> the hint
RESERVED = {"model": "use the top-level 'model'", "train_file": "use the top-level "
            "'training_file'", "valid_file": "use the top-level 'validation_file'",
            "output_dir": "the server chooses it", "overwrite": "the server chooses it",
            "replay_file": "a server path; append replay conversations to the training file",
            "objective": "use 'method.type': " + ", ".join(repr(t) for t in BY_API_TYPE)}
# options of the `tunelab` field that are the job's, not training-config keys: what the job
# does with its files before training (JSON schema of each, published with the config's)
JOB_OPTIONS = {"dedupe": {"type": "boolean", "default": False, "title": "Dedupe",
                          "description": "drop exact duplicate examples of the training file "
                                         "before training (else each is trained again)"}}
# OpenAI hyperparameters every objective takes -> TrainConfig key
HYPERPARAMETERS = {"n_epochs": "epochs", "batch_size": "batch_size",
                   "learning_rate_multiplier": "learning_rate"}
DEFAULT_API_TYPE = "supervised"     # a request without `method`, as OpenAI


def objective_of(api_type: str | None) -> Objective:
    return BY_API_TYPE[api_type or DEFAULT_API_TYPE]


def api_hyperparameters(objective: Objective) -> dict[str, str]:
    """The OpenAI hyperparameters of a method type -> the TrainConfig key each sets."""
    return {**HYPERPARAMETERS, **objective.api_hyperparameters}


def hyperparameters_param(objective: Objective) -> str:
    return f"method.{objective.api_type}.hyperparameters"


def _get(data: dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    data[leaf] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_config(*, base_spec: str, train_path: Path, valid_path: Path | None, output_dir: Path,
                 hyperparameters: dict[str, Any], hyperparameters_param: str, seed: int | None,
                 options: dict[str, Any], objective: str = "sft") -> TrainConfig:
    """`hyperparameters_param`: where the hyperparameters came from, for error messages
    ("method.dpo.hyperparameters" or "hyperparameters"); `objective`: the config name of the
    objective `method.type` chose."""
    obj = OBJECTIVES[objective]
    from tunelab.jobs.placement import split
    options, _ = split(options)    # where it trains (workers, GPUs) is not a training key
    for key in options:
        if key in RESERVED:
            raise TunelabError(f"set by the job ({RESERVED[key]})", field=f"tunelab.{key}")
    # a job's LoRA fine-tune is served as its adapter: the merged copy (517 MB for SmolLM2
    # beside a 13 MB adapter) only if the request asks for it
    data: dict[str, Any] = {"objective": obj.name, "save_merged": False}
    method = options.get("method", "lora")
    for name, key in api_hyperparameters(obj).items():
        value = hyperparameters.get(name, "auto")
        if value in (None, "auto"):
            continue
        if _get(options, key) is not None:
            raise TunelabError(f"given twice: as {hyperparameters_param}.{name} and as "
                               f"tunelab.{key}", field=f"tunelab.{key}")
        if name == "learning_rate_multiplier":
            value = float(value) * auto_learning_rate(str(method), obj.name)
        _set(data, key, value)
    if seed is not None:
        if "seed" in options:
            raise TunelabError("given twice: as seed and as tunelab.seed", field="tunelab.seed")
        data["seed"] = seed
    data = _merge(data, options)
    data.update(model=base_spec, train_file=str(train_path),
                valid_file=str(valid_path) if valid_path else None, output_dir=str(output_dir),
                overwrite=True)
    try:
        return build_config(data)
    except TunelabError as e:
        # a key the `tunelab` field set is named there, even where a hyperparameter maps to it
        given = e.field is not None and _get(options, e.field) is not None
        raise TunelabError(e.reason, field=f"tunelab.{e.field}" if given else
                           request_param(e.field, hyperparameters_param, obj)) from None


def request_param(field: str | None, hp_param: str, objective: Objective | None = None
                  ) -> str | None:
    """The request field a config field came from."""
    if field is None:
        return None
    for name, key in api_hyperparameters(objective or OBJECTIVES["sft"]).items():
        if field == key or field.startswith(key + "."):
            return f"{hp_param}.{name}"
    if field == "seed":
        return "seed"
    if field == "objective":
        return "method.type"
    return f"tunelab.{field}"


def shown_hyperparameters(cfg: dict[str, Any], resolved: dict[str, Any] | None = None
                          ) -> dict[str, Any]:
    """The job's hyperparameters, named as its method type names them: "auto" until training
    resolved them (the started event's data: epochs, batch_size, learning_rate), an objective's
    own ones (DPO's beta) as the config holds them."""
    obj = OBJECTIVES[cfg.get("objective", "sft")]
    method = cfg.get("method", "lora")
    rate = auto_learning_rate(method, obj.name)
    merged = dict(cfg)
    for key in ("epochs", "batch_size", "learning_rate"):
        if resolved and resolved.get(key) is not None:
            merged[key] = resolved[key]
    out: dict[str, Any] = {}
    for name, key in api_hyperparameters(obj).items():
        value = _get(merged, key, "auto")
        if name == "learning_rate_multiplier" and value != "auto":
            value = round(float(value) / rate, 6)
        if name == "n_epochs" and isinstance(value, float) and value.is_integer():
            value = int(value)
        out[name] = value
    return out


def method_view(cfg: dict[str, Any], hyperparameters: dict[str, Any] | None) -> dict[str, Any]:
    """The job object's `method`, as OpenAI shows it: {"type": T, T: {"hyperparameters"}}."""
    api_type = OBJECTIVES[cfg.get("objective", "sft")].api_type
    return {"type": api_type, api_type: {"hyperparameters": hyperparameters or
                                         shown_hyperparameters(cfg)}}


def options_schema() -> dict[str, Any]:
    """The JSON schema of the `tunelab` field (for the OpenAPI document and the web page)."""
    from tunelab.jobs import placement
    schema = TrainConfig.model_json_schema()
    for key in RESERVED:
        schema.get("properties", {}).pop(key, None)
    schema.setdefault("properties", {}).update(JOB_OPTIONS)
    schema.setdefault("properties", {}).update(placement.schema())
    if "required" in schema:
        schema["required"] = [r for r in schema["required"] if r not in RESERVED]
    return schema


def data_kind_of(path: Path) -> str | None:
    """"conversations" | "preferences": what a processed file holds (None: neither, or
    unreadable; its processing already said why)."""
    from tunelab.data.preference import data_kind_of as kind_of
    try:
        return kind_of(path)
    except TunelabError:
        return None


def wrong_kind(objective: Objective, kind: str | None) -> str | None:
    """Why a file of `kind` cannot train `objective`, or None when it can."""
    if kind is None or kind == objective.data_kind:
        return None
    holds = {"conversations": "conversations", "preferences": "preference pairs"}.get(kind, kind)
    return (f"holds {holds}, but method.type '{objective.api_type}' ({objective.title}) trains "
            f"on {objective.expected_format}")
