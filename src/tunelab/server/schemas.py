"""Request bodies, as OpenAI defines them, with unknown fields refused (extra="forbid")."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, create_model,
                      field_validator)
from pydantic.fields import FieldInfo

from tunelab.config import TrainConfig
from tunelab.evaluate.tasks import TASKS
from tunelab.objectives import BY_API_TYPE, Objective

MAX_COMPLETION_TOKENS = 4096     # per request; a bigger ask is a 400, not a long wait
Id = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    """What every method type takes (and the deprecated top-level `hyperparameters`)."""
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=10)] = "auto"


def config_field(key: str) -> FieldInfo:
    """The TrainConfig field a dotted key names ("dpo.beta")."""
    model: Any = TrainConfig
    *parents, leaf = key.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[leaf]


def _hyperparameters_model(objective: Objective) -> type[BaseModel]:
    """Hyperparameters: the shared ones, plus the objective's own, each "auto" (the config's
    default) or a value within the config field's own bounds."""
    if not objective.api_hyperparameters:
        return Hyperparameters
    own = {}
    for name, key in objective.api_hyperparameters.items():
        f = config_field(key)
        own[name] = (Literal["auto"] | Annotated[(f.annotation, *f.metadata)],
                     Field("auto", description=f"{f.description or key} (auto: "
                           f"{f.default}, the training config's {key})"))
    return create_model(f"{_camel(objective.api_type)}Hyperparameters", __base__=Hyperparameters,
                        __module__=__name__, **own)


def _camel(api_type: str) -> str:
    return "".join(p.title() for p in api_type.split("_"))


# method.<type>: {"hyperparameters": ...}, one model per objective of the registry
HYPERPARAMETER_MODELS: dict[str, type[BaseModel]] = {
    t: _hyperparameters_model(o) for t, o in BY_API_TYPE.items()}
METHOD_SECTIONS: dict[str, type[BaseModel]] = {
    t: create_model(_camel(t), __base__=_Strict, __module__=__name__,
                    hyperparameters=(HYPERPARAMETER_MODELS[t] | None, None))
    for t in BY_API_TYPE}

Method = create_model(
    "Method", __base__=_Strict, __module__=__name__,
    type=(Literal[tuple(BY_API_TYPE)],  # type: ignore[valid-type]
          Field(description="the training objective: " + "; ".join(
              f"{t}: {o.title} on {o.data_kind}" for t, o in BY_API_TYPE.items()))),
    **{t: (section | None, None) for t, section in METHOD_SECTIONS.items()})


class FineTuningJobCreate(_Strict):
    model: Id = Field(description="a base model id from GET /v1/models")
    training_file: Id
    validation_file: Id | None = None
    suffix: Annotated[str, StringConstraints(max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: dict[Annotated[str, StringConstraints(max_length=64)],
                   Annotated[str, StringConstraints(max_length=512)]] | None = \
        Field(None, max_length=16)
    hyperparameters: Hyperparameters | None = Field(None, description="deprecated by OpenAI in "
                                                    "favour of method.<type>.hyperparameters")
    method: Method | None = Field(  # type: ignore[valid-type]
        None, description="{type, <type>: {hyperparameters}}; default: supervised")
    integrations: list[dict[str, Any]] | None = Field(None, max_length=0,
                                                      description="not supported: leave empty")
    tunelab: dict[str, Any] | None = Field(
        None, description="tunelab's training options: any key of the training config (method "
        "lora|dora|full, lora: {r, alpha, dropout, target_modules}, max_length, max_steps, "
        "packing, precision, dpo: {loss_type}, ...), as in a `tunelab train` YAML config. "
        "Validated like one; an error names the field as tunelab.<key>. GET /v1/tunelab/info "
        "lists them.")


class JobPlan(FineTuningJobCreate):
    """A fine-tuning request checked and planned, not started: what `auto` resolves to."""
    training_file: Id | None = Field(None, description="without it: only what needs no data")
    model: Id | None = Field(None, description="default: the first base model")


class TextPart(_Strict):
    type: Literal["text"]
    text: Annotated[str, StringConstraints(max_length=1_000_000)]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=1_000_000)] | \
        Annotated[list[TextPart], Field(max_length=100)] | None = None
    name: Annotated[str, StringConstraints(max_length=64)] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatCompletionCreate(_Strict):
    model: Id
    messages: Annotated[list[Message], Field(min_length=1, max_length=1000)]
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_COMPLETION_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_COMPLETION_TOKENS)] | None = None
    stop: Annotated[str, StringConstraints(max_length=200)] | \
        Annotated[list[Annotated[str, StringConstraints(max_length=200)]],
                  Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-2**63, le=2**63 - 1)] | None = None
    n: Literal[1] | None = Field(None, description="one choice per request")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Annotated[str, StringConstraints(max_length=256)] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    logprobs: Literal[False] | None = Field(None, description="not supported")


class JudgeRequest(_Strict):
    """The grader of the judge task: any OpenAI-compatible endpoint (tunelab.evaluate.judge)."""
    url: Annotated[str, StringConstraints(max_length=2000, pattern=r"^https?://\S+$")] | None = \
        Field(None, description="the grader's base URL (…/v1); default: OpenAI's API")
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(
        "gpt-4o-mini", description="the grader model")
    api_key: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        None, description="sent to `url` only; kept with the job and never shown back")
    rubric: Annotated[str, StringConstraints(min_length=1, max_length=20_000)] | None = Field(
        None, description="grading instructions for grades 1-5 (default: tunelab's)")
    pairwise: bool = Field(False, description="also compare the best fine-tuned model's answers "
                           "with the best baseline's, both orders of each pair")
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0


class EvaluationCreate(_Strict):
    model: Id = Field(description="the fine-tuned model (ft:...) or a base model")
    base_model: Id | None = Field(None, description="default: the fine-tuned model's base")
    test_file: Id
    training_file: Id | None = Field(None, description="few-shot examples come from it "
                                     "(default: the fine-tuning job's training file)")
    task: Literal[("auto", *TASKS)] = Field(  # type: ignore[valid-type]
        "auto", description="how answers are scored (tunelab.evaluate.tasks); auto: chosen from "
        "the test file")
    few_shot: Annotated[int, Field(ge=0, le=32)] = 5
    retrieval: Annotated[int, Field(ge=0, le=32)] = Field(0, description="also the base model "
                                                          "with the K training examples most "
                                                          "similar to each request (BM25)")
    system: Annotated[str, StringConstraints(max_length=20_000)] | None = None
    limit: Annotated[int, Field(ge=1)] | None = Field(None, description="the first N test examples")
    general_check: bool = Field(True, description="also compare both models on general prompts "
                                "(forgetting)")
    judge: JudgeRequest | None = Field(None, validate_default=True, description="the grader, "
                                       "for task 'judge' (and only for it)")

    @field_validator("judge")
    @classmethod
    def _judge_is_the_judge_tasks(cls, v, info):
        task = info.data.get("task")
        if task == "judge" and v is None:
            raise ValueError("task 'judge' grades answers with a model: give judge {url, model, "
                             "api_key}")
        if v is not None and task is not None and task != "judge":
            raise ValueError(f"a grader grades answers for task 'judge' only (task is '{task}')")
        return v


class TemplateApply(_Strict):
    template: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    mix: bool = False
    seed: int = 0
    map: dict[str, str] | None = Field(None, description="template field -> the column to read")
    values: dict[str, str] | None = Field(None, description="template field -> a fixed value")


class SplitRequest(_Strict):
    val: Annotated[float, Field(ge=0, lt=1)] = 0.1
    test: Annotated[float, Field(ge=0, lt=1)] = 0.1
    seed: int = 0
    stratify_by: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
