"""tunelab's extensions under /v1/tunelab: server info, the prompt-template library, templating
and splitting an uploaded file, and evaluations (the base-vs-fine-tuned comparison as a job)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

import tunelab
from tunelab.errors import TunelabError
from tunelab.jobs import evaluation, finetune, spec, uploads
from tunelab.jobs.store import File, Job, new_id
from tunelab.server import views
from tunelab.server.api_files import get_file
from tunelab.server.context import Context, Owner, context, owner
from tunelab.server.errors import APIError, not_found
from tunelab.server.schemas import EvaluationCreate, SplitRequest, TemplateApply

router = APIRouter(prefix="/v1/tunelab", tags=["tunelab extensions"])


@router.get("/info", summary="Server facts (no key needed): auth, version, base models, "
                          "training speed")
def info(request: Request):
    """`training_speed`: median training tokens/s per base model over its recent succeeded jobs
    here; `stats_model`: the base model whose chat template counts an upload's tokens, so an
    upload's training-time estimate is its tokens over that model's speed."""
    ctx = context(request)
    stats_model = next((name for name, s in ctx.base_models.items() if s == ctx.stats_model),
                       None)
    return {"auth": ctx.settings.auth, "version": tunelab.__version__,
            "models": list(ctx.base_models), "workers": ctx.settings.workers,
            "max_upload_bytes": ctx.settings.max_upload_bytes,
            "stats_model": stats_model,
            "training_speed": finetune.training_speeds(ctx.store),
            "tunelab_options": spec.options_schema()}


@router.get("/templates", summary="The prompt-template library")
def templates(request: Request, who: Owner = Depends(owner)):
    from tunelab.data.prompts import load_templates
    data = [{"name": t.name, "description": t.description, "fields": t.fields,
             "optional": t.optional, "phrasings": len(t.phrasings)}
            for t in sorted(load_templates().values(), key=lambda t: t.name)]
    return {"object": "list", "data": data}


def _processed(ctx: Context, who: Owner, file_id: str, param: str) -> File:
    f = get_file(ctx, who, file_id, param)
    if f.status != "processed" or not f.data_path:
        raise APIError(400, f"{f.id} ({f.filename}) is not a valid chat file: "
                       f"{f.status_details or f.status}", param=param, code="invalid_file")
    return f


@router.post("/files/{file_id}/template", summary="Make conversations from raw records")
async def apply_template(file_id: str, body: TemplateApply, request: Request,
                         who: Owner = Depends(owner)):
    ctx = context(request)
    f = await run_in_threadpool(get_file, ctx, who, file_id)
    try:
        made, preview = await run_in_threadpool(
            lambda: uploads.apply_template(ctx.store, f, template=body.template, mix=body.mix,
                                           seed=body.seed, mapping=body.map, values=body.values,
                                           model=ctx.stats_model))
    except TunelabError as e:
        raise APIError(400, str(e), param=_template_param(e.field), code="template_failed") \
            from None
    return {"file": views.file(made), "preview": preview}


def _template_param(field: str | None) -> str | None:
    if field == "template":
        return "template"
    return f"map.{field}" if field else None


@router.post("/files/{file_id}/split", summary="Split a chat file into train / validation / test")
async def split_file(file_id: str, body: SplitRequest, request: Request,
                     who: Owner = Depends(owner)):
    ctx = context(request)
    f = await run_in_threadpool(_processed, ctx, who, file_id, "file_id")
    if body.val + body.test >= 1:
        raise APIError(400, "val + test must be less than 1", param="val")
    try:
        parts = await run_in_threadpool(
            lambda: uploads.split(ctx.store, f, val=body.val, test=body.test, seed=body.seed,
                                  stratify_by=body.stratify_by, model=ctx.stats_model))
    except TunelabError as e:
        raise APIError(400, str(e).replace(str(ctx.store.root), "<data dir>"),
                       param="stratify_by" if body.stratify_by and e.field else None,
                       code="split_failed") from None
    return {k: views.file(v) if v is not None else None for k, v in parts.items()}


# ---- evaluations -------------------------------------------------------------------------
def get_evaluation(ctx: Context, who: Owner, evaluation_id: str) -> Job:
    j = ctx.store.get(Job, evaluation_id, who.id)
    if j is None or j.kind != "evaluation":
        raise not_found("evaluation", evaluation_id, "evaluation_id")
    return j


@router.post("/evaluations", summary="Compare a fine-tuned model with its base (a job)")
def create_evaluation(body: EvaluationCreate, request: Request, who: Owner = Depends(owner)):
    ctx = context(request)
    tuned_spec, row = ctx.model_spec(who, body.model)
    base_spec = ctx.model_spec(who, body.base_model, "base_model")[0] if body.base_model \
        else None
    training_file = body.training_file
    if row is not None:
        job = ctx.store.get(Job, row.job_id)
        base_spec = base_spec or (job.base_spec if job else None)
        training_file = training_file or (job.training_file if job else None)
    if base_spec is None:
        raise APIError(400, "give base_model: the model is not a fine-tune of this server",
                       param="base_model")
    test = _processed(ctx, who, body.test_file, "test_file")
    train = _processed(ctx, who, training_file, "training_file") if training_file and \
        body.few_shot > 0 else None
    request_ = {**body.model_dump(), "tuned_spec": tuned_spec, "base_spec": base_spec,
                "test_file": test.id, "training_file": train.id if train else None}
    job = Job(id=new_id("eval-"), kind="evaluation", owner=who.id, status="queued",
              model=body.model, base_spec=base_spec, training_file=request_["training_file"],
              request=request_)
    ctx.store.add(job)
    return evaluation.view(job)


@router.get("/evaluations", summary="List evaluations")
def list_evaluations(request: Request, who: Owner = Depends(owner), after: str | None = None,
                     limit: int = 20):
    ctx = context(request)
    rows, more = ctx.store.page(Job, Job.owner == who.id, Job.kind == "evaluation",
                                after=after, limit=max(1, min(limit, 100)))
    return views.page([evaluation.view(j) for j in rows], more)


@router.post("/evaluations/{evaluation_id}/cancel", summary="Cancel an evaluation")
def cancel_evaluation(evaluation_id: str, request: Request, who: Owner = Depends(owner)):
    """A queued evaluation is cancelled at once; a running one stops after its current batch
    of answers and then reads `cancelled`."""
    ctx = context(request)
    job = get_evaluation(ctx, who, evaluation_id)
    outcome = ctx.store.cancel_job(job.id)
    if outcome is None:
        raise APIError(400, f"Evaluation {job.id} has already {job.status}; it cannot be "
                       "cancelled", param="evaluation_id", code="evaluation_not_cancellable")
    ctx.store.add_event(job.id, "The evaluation was cancelled" if outcome == "cancelled" else
                        "Cancellation requested: the evaluation stops after its current batch")
    return evaluation.view(get_evaluation(ctx, who, job.id))


@router.get("/evaluations/{evaluation_id}", summary="Retrieve an evaluation")
def retrieve_evaluation(evaluation_id: str, request: Request, who: Owner = Depends(owner)):
    return evaluation.view(get_evaluation(context(request), who, evaluation_id))


@router.get("/evaluations/{evaluation_id}/report", summary="The evaluation's HTML report",
            response_class=FileResponse)
def evaluation_report(evaluation_id: str, request: Request, who: Owner = Depends(owner)):
    ctx = context(request)
    job = get_evaluation(ctx, who, evaluation_id)
    report = evaluation.report_dir(ctx.store, job.id) / "report.html"
    if job.status != "succeeded" or not report.exists():
        raise APIError(404, f"The evaluation {job.id} has no report yet (status {job.status})",
                       param="evaluation_id", code="report_not_ready")
    return FileResponse(report, media_type="text/html")
