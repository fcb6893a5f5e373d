"""/v1/fine_tuning/jobs: create (validated as `tunelab train` validates a config), list,
retrieve, cancel, events, checkpoints. The API process only records jobs: workers train them."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request

from tunelab.config import TrainConfig
from tunelab.errors import TunelabError
from tunelab.jobs import placement, spec, uploads
from tunelab.jobs.finetune import job_dir
from tunelab.jobs.store import ACTIVE, FINAL, Event, File, Job, Model, Store, new_id
from tunelab.objectives import BY_API_TYPE, OBJECTIVES, Objective
from tunelab.server import views
from tunelab.server.api_files import get_file
from tunelab.server.context import Context, Owner, context, owner
from tunelab.server.errors import APIError, not_found
from tunelab.server.objects import (FineTuningJob, FineTuningJobList, JobCheckpointList,
                                    JobEventList, ok)
from tunelab.server.openapi import errors
from tunelab.server.schemas import FineTuningJobCreate

log = logging.getLogger("tunelab.server")
router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(max_length=200)]


def get_job(ctx: Context, who: Owner, job_id: str) -> Job:
    j = ctx.store.get(Job, job_id, who.id)
    if j is None or j.kind != "fine_tune":
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return j


def _training_file(ctx: Context, who: Owner, file_id: str, param: str) -> File:
    f = get_file(ctx, who, file_id, param)
    if f.purpose != "fine-tune":
        raise APIError(400, f"{file_id} has purpose '{f.purpose}', not 'fine-tune'", param=param,
                       code=f"invalid_{param}")
    return f


def method_of(body: FineTuningJobCreate) -> tuple[Objective, dict, str]:
    """The objective `method.type` names, its hyperparameters as given, and where they came
    from (for errors): method.<type>.hyperparameters, or the deprecated top-level ones."""
    api_type = body.method.type if body.method else spec.DEFAULT_API_TYPE
    objective = spec.objective_of(api_type)
    section = getattr(body.method, api_type, None) if body.method else None
    for other in BY_API_TYPE:
        if other != api_type and getattr(body.method, other, None) is not None:
            raise APIError(400, f"method.{other} is given but method.type is '{api_type}'",
                           param=f"method.{other}")
    if section is not None and section.hyperparameters is not None:
        if body.hyperparameters is not None:
            raise APIError(400, f"give hyperparameters in method.{api_type}.hyperparameters or "
                           "the deprecated top-level hyperparameters, not both",
                           param="hyperparameters")
        return objective, section.hyperparameters.model_dump(), \
            spec.hyperparameters_param(objective)
    hp = body.hyperparameters.model_dump() if body.hyperparameters else {}
    return objective, hp, "hyperparameters"


def job_config(ctx: Context, who: Owner, body: FineTuningJobCreate, job_id: str, *,
               base_spec: str) -> tuple[TrainConfig, Objective, File | None, File | None]:
    """The request as the training config its job will run (400 naming the field at fault)."""
    objective, hp, hp_param = method_of(body)
    train_f = _training_file(ctx, who, body.training_file, "training_file") \
        if body.training_file else None
    valid_f = _training_file(ctx, who, body.validation_file, "validation_file") \
        if body.validation_file else None
    store = ctx.store

    def data(f: File):   # an unprocessed file fails the job at validation, by name
        return store.path(f.data_path or f.raw_path)

    options, dedupe = job_options(body)
    train_path = data(train_f) if train_f else Path("unknown.jsonl")
    if dedupe and train_f is not None and train_f.data_path:   # written by validate_job
        train_path = uploads.deduped_path(store, train_f)
    try:
        cfg = spec.train_config(base_spec=base_spec, train_path=train_path,
                                valid_path=data(valid_f) if valid_f else None,
                                output_dir=job_dir(store, job_id) / "run",
                                hyperparameters=hp, hyperparameters_param=hp_param,
                                seed=body.seed, options=options,
                                objective=objective.name)
    except TunelabError as e:
        raise APIError(400, e.reason, param=e.field, code="invalid_hyperparameters"
                       if e.field and "hyperparameters" in e.field else "invalid_config") from None
    check_method_available(ctx, cfg.method)
    return cfg, objective, train_f, valid_f


def job_options(body: FineTuningJobCreate) -> tuple[dict, bool]:
    """The `tunelab` field without the job's own options (spec.JOB_OPTIONS), and `dedupe`."""
    options = {k: v for k, v in (body.tunelab or {}).items() if k not in spec.JOB_OPTIONS}
    dedupe = (body.tunelab or {}).get("dedupe", False)
    if not isinstance(dedupe, bool):
        raise APIError(400, "Invalid value for 'tunelab.dedupe': expected true or false",
                       param="tunelab.dedupe", code="invalid_value")
    return options, dedupe


def check_method_available(ctx: Context, method: str) -> None:
    """QLoRA needs bitsandbytes (on a CUDA GPU, or on the CPU with its CPU backend): refused at
    once when it cannot run on this host and no live worker of this server reports a GPU,
    rather than queued to fail."""
    if method != "qlora" or ctx.settings.ray_address:   # a Ray cluster's nodes are its own
        return
    why = _qlora_unavailable_here()
    if why is None:
        return
    from tunelab.jobs.worker import LEASE_SECONDS
    workers = ctx.store.live_workers(3 * LEASE_SECONDS)
    if any((w.resources or {}).get("gpus") for w in workers):
        return
    raise APIError(400, f"method 'qlora' cannot run on this server: {why}",
                   param="tunelab.method", code="method_unavailable")


@functools.cache
def _qlora_unavailable_here() -> str | None:
    from tunelab.train.run import qlora_unavailable
    return qlora_unavailable()


def file_problem(store: Store, objective: Objective, f: File | None, file_id: str, *,
                 pending_ok: bool) -> str | None:
    """Why a job of `objective` cannot train on file `f` (None: it can). `pending_ok`: a file
    still being processed is no problem yet (the job's validation waits for it)."""
    if f is None:
        return f"{file_id} was deleted"
    if f.status == "uploaded" and pending_ok:
        return None
    if f.status != "processed" or not f.data_path:
        return f"{f.id} ({f.filename}) is not valid: {f.status_details or f.status}"
    wrong = spec.wrong_kind(objective, spec.data_kind_of(store.path(f.data_path)))
    return f"{f.id} ({f.filename}) {wrong}" if wrong else None


def job_placement(ctx: Context, body: FineTuningJobCreate) -> placement.Placement:
    """Where the job trains (`tunelab.workers`, `tunelab.gpus_per_worker`, ...): 400 naming
    the field when it is out of range, or asks for Ray on a server without it."""
    try:
        return placement.parse(body.tunelab or {}, ray=ctx.settings.ray_address is not None)
    except TunelabError as e:
        raise APIError(400, e.reason, param=e.field, code="invalid_placement") from None


def base_model_spec(ctx: Context, who: Owner, model: str) -> str:
    """What a job on `model` starts from (the spec tunelab.models loads): a base model's spec,
    or the weights of a fine-tuned model or checkpoint the caller owns (fine-tuning a
    fine-tuned model, as OpenAI allows: DPO after SFT, more data later)."""
    spec, row = ctx.model_spec(who, model)
    return spec if row is None else fine_tuned_start(ctx, row, spec)


def fine_tuned_start(ctx: Context, row: Model, spec: str) -> str:
    """A finished fine-tune that kept a merged model/ (a full fine-tune, or a LoRA job asked
    for `save_merged`) starts the next job from its run folder, which tunelab.models reads as
    that model: the new job trains on plain weights, and a LoRA adapter it makes names that
    folder as its base, so it loads (`tunelab chat`, the server) on the earlier fine-tune and
    never on the first base. A LoRA fine-tune without one, and a checkpoint, start from their
    own folder: an adapter (on its job's start), which tunelab.models merges at load."""
    folder = Path(spec)
    if row.kind == "fine_tuned" and (folder.parent / "config.yaml").is_file() and \
            (folder.parent / "model" / "config.json").is_file():
        return str(folder.parent)
    if not folder.is_dir():
        raise APIError(400, f"the files of `{row.id}` are missing on this server",
                       param="model", code="model_not_available")
    return str(folder)   # an adapter on adapters: tunelab.models merges the chain, innermost first


def root_model(ctx: Context, model: str) -> str:
    """The base model at the root of `model`'s lineage: OpenAI names a fine-tune of a
    fine-tuned model after the original base (ft:{base}:...), not after the ft: name."""
    if not model.startswith("ft:"):
        return model
    row = ctx.store.get(Model, model)
    parent = ctx.store.get(Job, row.job_id) if row is not None else None
    if parent is None:
        return model
    return (parent.request or {}).get("base_model") or parent.model


def dependents(ctx: Context, row: Model, folder: Path) -> list[str]:
    """What deleting `row` (and `folder`, the files it is served from) would break: the
    models, final or checkpoints, of jobs that started from it (their weights or adapters load
    it as their base), and the jobs not yet finished, fine-tunes and evaluations, that load it.
    A job is matched by the model it names and by the spec it loads, so a job on a checkpoint
    does not hold the fine-tuned model, nor the reverse."""
    store = ctx.store
    prefix = str(folder)
    near = store.all(Job, Job.owner == row.owner, Job.id != row.job_id,
                     (Job.model == row.id) | Job.base_spec.startswith(prefix, autoescape=True))
    found: list[str] = []
    for job in near:
        spec = Path(job.base_spec)
        if job.model != row.id and spec != folder and folder not in spec.parents:
            continue
        found += [m.id for m in store.all(Model, Model.job_id == job.id)]
        if job.status in ACTIVE:
            what = "evaluation" if job.kind == "evaluation" else "fine-tuning job"
            found.append(f"{what} {job.id} ({job.status})")
    return found


@router.post("/jobs", summary="Create a fine-tuning job", responses=ok(FineTuningJob))
def create_job(body: FineTuningJobCreate, background: BackgroundTasks, request: Request,
               who: Owner = Depends(owner)):
    ctx = context(request)
    store = ctx.store
    with ctx.lineage_lock:    # the fine-tune it starts from is not deleted in between
        base_spec = base_model_spec(ctx, who, body.model)
        job_id = new_id("ftjob-")
        cfg, objective, train_f, valid_f = job_config(ctx, who, body, job_id,
                                                      base_spec=base_spec)
        for param, f in (("training_file", train_f), ("validation_file", valid_f)):
            problem = f and file_problem(store, objective, f, f.id, pending_ok=True)
            if problem:   # known now: a 400, not a job that fails a moment later
                raise APIError(400, problem, param=param, code=f"invalid_{param}")
        where = job_placement(ctx, body)
        config = cfg.model_dump(mode="json")
        dedupe = job_options(body)[1]
        job = Job(id=job_id, kind="fine_tune", owner=who.id, status="validating_files",
                  model=body.model, base_spec=base_spec, training_file=train_f.id,
                  validation_file=valid_f.id if valid_f else None, suffix=body.suffix or None,
                  seed=cfg.seed, meta=body.metadata,
                  request={"config": config, "base_model": root_model(ctx, body.model),
                           **({} if where.is_default else {"placement": where.to_json()})},
                  train_workers=where.workers if where.workers > 1 else None,
                  hyperparameters=spec.shown_hyperparameters(config))
        if dedupe:   # its training file is read without exact duplicates (validate_job)
            job.request = {**job.request, "dedupe": True}
        store.add(job)
    store.add_event(job.id, f"Created fine-tuning job: {job.id}", kind="created")
    store.add_event(job.id, f"Validating training file: {train_f.id}" +
                    (f" and validation file: {valid_f.id}" if valid_f else ""),
                    kind="validating_files")
    background.add_task(validate_job, store, job.id)
    return views.job(job, who.name, price_per_hour=ctx.train_price_per_hour)


def validate_job(store: Store, job_id: str) -> None:
    """validating_files -> queued, or failed naming the file at fault: a file that did not
    process, or one that holds the wrong kind of data for the job's objective (conversations
    for DPO, preference pairs for supervised)."""
    job = store.get(Job, job_id)
    if job is None or job.status != "validating_files":
        return
    objective = OBJECTIVES[(job.request.get("config") or {}).get("objective", "sft")]
    for param, file_id in (("training_file", job.training_file),
                           ("validation_file", job.validation_file)):
        if not file_id:
            continue
        problem = file_problem(store, objective, store.get(File, file_id), file_id,
                               pending_ok=False)
        if problem:
            error = {"code": f"invalid_{param}", "message": problem, "param": param}
            if store.finish_job(job_id, None, "failed", error=error):
                store.add_event(job_id, f"The job failed: {problem}", level="error",
                                kind="failed", data={"code": error["code"], "param": param})
            return
    if job.request.get("dedupe"):
        f = store.get(File, job.training_file)
        dropped = uploads.write_deduped(store, f)
        shown = ", ".join(f"line {a} = line {b}" for a, b in dropped[:5]) + \
            (", ..." if len(dropped) > 5 else "")
        store.add_event(job_id, f"Dropped {len(dropped)} exact duplicate examples of "
                        f"{f.filename}" + (f" ({shown})" if dropped else ""),
                        data={"count": len(dropped), "lines": dropped[:100]},
                        kind="duplicates_dropped")
    if store.update(Job, job_id, Job.status == "validating_files", status="queued"):
        store.add_event(job_id, "Files validated, moving job to queued state", kind="queued")


def revalidate_pending(store: Store) -> None:
    """At startup: jobs left in validating_files by a stopped server."""
    for job in store.all(Job, Job.status == "validating_files"):
        try:
            validate_job(store, job.id)
        except Exception:
            log.exception("validating %s", job.id)


@router.get("/jobs", summary="List fine-tuning jobs", responses=ok(FineTuningJobList),
            description="`metadata[KEY]=VALUE` (repeatable) keeps the jobs whose metadata has "
                        "every given KEY equal to VALUE, as OpenAI's filter does.")
def list_jobs(request: Request, who: Owner = Depends(owner), after: After = None,
              limit: Limit = 20):
    ctx = context(request)
    wanted = {k[len("metadata["):-1]: v for k, v in request.query_params.multi_items()
              if k.startswith("metadata[") and k.endswith("]")}
    if any(not k for k in wanted):
        raise APIError(400, "metadata filters read metadata[KEY]=VALUE", param="metadata")
    by_meta = [Job.meta[k].as_string() == v for k, v in wanted.items()]
    rows, more = ctx.store.page(Job, Job.owner == who.id, Job.kind == "fine_tune", *by_meta,
                                after=after, limit=limit)
    return views.page([views.job(j, who.name, price_per_hour=ctx.train_price_per_hour)
                       for j in rows], more)


@router.get("/jobs/{fine_tuning_job_id}", summary="Retrieve a fine-tuning job",
            responses=ok(FineTuningJob))
def retrieve_job(fine_tuning_job_id: str, request: Request, who: Owner = Depends(owner)):
    ctx = context(request)
    return views.job(get_job(ctx, who, fine_tuning_job_id), who.name,
                     price_per_hour=ctx.train_price_per_hour)


@router.post("/jobs/{fine_tuning_job_id}/cancel", summary="Cancel a fine-tuning job",
             responses={**ok(FineTuningJob), **errors(400)})
def cancel_job(fine_tuning_job_id: str, request: Request, who: Owner = Depends(owner)):
    """A job not yet running is cancelled at once; a running one stops at its next step, keeps
    a checkpoint of what it trained, and then reads `cancelled`."""
    ctx = context(request)
    store = ctx.store
    job = get_job(ctx, who, fine_tuning_job_id)
    if job.status in FINAL:
        raise APIError(400, f"Job {job.id} has already {job.status}; it cannot be cancelled",
                       param="fine_tuning_job_id", code="job_not_cancellable")
    outcome = store.cancel_job(job.id)
    if outcome == "cancelled":
        store.add_event(job.id, "The job was cancelled", kind="cancelled")
    elif outcome == "requested":
        store.add_event(job.id, "Cancellation requested: training stops at its next step and "
                        "keeps a checkpoint", kind="cancel_requested")
    return views.job(get_job(ctx, who, job.id), who.name, price_per_hour=ctx.train_price_per_hour)


@router.get("/jobs/{fine_tuning_job_id}/events", summary="List a job's events, newest first",
            responses=ok(JobEventList))
def list_events(fine_tuning_job_id: str, request: Request, who: Owner = Depends(owner),
                after: After = None, limit: Limit = 20):
    ctx = context(request)
    job = get_job(ctx, who, fine_tuning_job_id)
    rows, more = ctx.store.page(Event, Event.job_id == job.id, after=after, limit=limit)
    return views.page([views.event(e) for e in rows], more)


@router.get("/jobs/{fine_tuning_job_id}/checkpoints", summary="List a job's checkpoints",
            responses=ok(JobCheckpointList))
def list_checkpoints(fine_tuning_job_id: str, request: Request, who: Owner = Depends(owner),
                     after: After = None, limit: Limit = 10):
    ctx = context(request)
    job = get_job(ctx, who, fine_tuning_job_id)
    rows, more = ctx.store.page(Model, Model.job_id == job.id, Model.kind == "checkpoint",
                                after=after, limit=limit, cursor=Model.checkpoint_id)
    return views.page([views.checkpoint(m) for m in rows], more)
