"""The objects the API answers with, as the published schema documents them (server.views
builds them; these only describe them, so /openapi.json says what a 200 holds and schemathesis
checks every answer against it). Fields are OpenAI's, plus tunelab's extensions."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from tunelab.jobs.store import ACTIVE, FINAL
from tunelab.jobs.uploads import FILE_STATUSES


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal[FILE_STATUSES]  # type: ignore[valid-type]
    status_details: str | None
    expires_at: int | None
    validation: dict[str, Any] | None = Field(description="tunelab: the `tunelab data "
                                              "validate` report (errors by kind, warnings "
                                              "with their kind, duplicates, token statistics)")


class JobError(BaseModel):
    code: str | None
    message: str
    param: str | None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal[(*ACTIVE, *FINAL)]  # type: ignore[valid-type]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list[Any]
    metadata: dict[str, str] | None
    user_provided_suffix: str | None
    method: dict[str, Any]
    tunelab: dict[str, Any] = Field(description="config, progress, started_at, attempts, "
                                    "cancel_requested, training_cost")


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None
    type: Literal["message", "metrics"]
    kind: str | None = Field(description="tunelab: what happened (created, started, "
                             "checkpoint, succeeded, failed, ...; metrics for a metrics event)")


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class Deleted(BaseModel):
    id: str
    object: str
    deleted: Literal[True]


def _page(item: type[BaseModel]) -> type[BaseModel]:
    from pydantic import create_model
    return create_model(f"{item.__name__}List", __module__=__name__, object=(Literal["list"], ...),
                        data=(list[item], ...), has_more=(bool, ...),
                        first_id=(str | None, ...), last_id=(str | None, ...))


FileList = _page(FileObject)
FineTuningJobList = _page(FineTuningJob)
JobEventList = _page(JobEvent)
JobCheckpointList = _page(JobCheckpoint)


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


def ok(model: type[BaseModel], description: str = "Successful Response"
       ) -> dict[int | str, dict[str, Any]]:
    """`responses=` documenting a 200 as `model` (documented only: the route's answer is not
    filtered through it)."""
    return {200: {"model": model, "description": description}}
