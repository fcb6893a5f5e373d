"""tunelab's extensions under /v1/tunelab: server info, the prompt-template library, templating
and splitting an uploaded file, and evaluations (the base-vs-fine-tuned comparison as a job)."""
from __future__ import annotations

import time
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

import tunelab
from tunelab.config import TrainConfig
from tunelab.errors import TunelabError
from tunelab.jobs import evaluation, spec, uploads
from tunelab.jobs.store import File, Job, new_id
from tunelab.objectives import BY_API_TYPE
from tunelab.server import api_jobs, views
from tunelab.server.api_files import get_file
from tunelab.server.context import Context, Owner, context, owner
from tunelab.server.errors import APIError, not_found
from tunelab.server.openapi import errors
from tunelab.server.schemas import (HYPERPARAMETER_MODELS, EvaluationCreate, JobPlan,
                                    SplitRequest, TemplateApply, config_field)

router = APIRouter(prefix="/v1/tunelab", tags=["tunelab extensions"])


@router.get("/info", summary="Server facts (no key needed): auth, version, base models, "
                          "training speed")
def info(request: Request):
    """`training_speed`: per base model, training tokens/s over its recent succeeded jobs here
    (token-weighted, a job far slower or faster than the rest left out; `low` / `high`: the
    range of the jobs used; tunelab.jobs.speed); `stats_model`: the base model whose chat
    template counts an upload's tokens, so an upload's training-time estimate is its tokens
    over that model's speed; `training_price_per_hour`: USD per hour of the training machine,
    at which a succeeded job shows its cost; `statuses`: every status each kind of object can
    have here, each with its phase (waiting, running, succeeded, failed, cancelled)."""
    from tunelab.jobs.speed import training_speeds
    ctx = context(request)
    stats_model = next((name for name, s in ctx.base_models.items() if s == ctx.stats_model),
                       None)
    return {"auth": ctx.settings.auth, "version": tunelab.__version__,
            "models": list(ctx.base_models), "workers": ctx.settings.workers,
            "max_upload_bytes": ctx.settings.max_upload_bytes,
            "stats_model": stats_model,
            "training_speed": training_speeds(ctx.store),
            "training_price_per_hour": ctx.train_price_per_hour,
            "statuses": statuses(),
            "tunelab_options": spec.options_schema(),
            "objectives": objectives_info(),
            "data_formats": data_formats()}


@router.get("/engine", summary="The chat engine's memory and load (counts, no model paths)")
def engine_stats(request: Request, who: Owner = Depends(owner)):
    """What the generation engine holds now: `budget_bytes` and what uses it (`weights_bytes`
    of loaded models and resident adapters, `kv_bytes` allocated and `kv_reserved_bytes` that
    admitted requests may grow to), `resident_adapters` per base model against `max_adapters`,
    `adapter_loads` / `adapter_evictions` so far, `queued` and `running` requests. Before the
    first chat request the engine has not started: `started` is false."""
    ctx = context(request)
    if ctx._engine is None:
        return {"engine": ctx.settings.engine, "started": False}
    stats = dict(ctx._engine.stats())
    names = {spec: name for name, spec in ctx.base_models.items()}
    resident = stats.pop("resident_adapters", None)
    if resident is not None:   # counts only: specs are server paths of every key's models
        stats["resident_adapters"] = {names.get(spec, "other"): len(specs)
                                      for spec, specs in resident.items()}
    return {**stats, "started": True}


def statuses() -> dict[str, dict[str, str]]:
    """Object type -> {status: phase}: the statuses the server sends, and nothing else."""
    from tunelab.jobs.store import ACTIVE, FINAL
    from tunelab.jobs.uploads import FILE_STATUSES
    from tunelab.server.api_export import STATUSES as EXPORTS
    phase = {"validating_files": "waiting", "queued": "waiting", "uploaded": "waiting",
             "running": "running", "succeeded": "succeeded", "processed": "succeeded",
             "failed": "failed", "error": "failed", "cancelled": "cancelled"}
    jobs = (*ACTIVE, *FINAL)
    return {kind: {s: phase[s] for s in names} for kind, names in {
        "fine_tuning.job": jobs,
        "tunelab.evaluation": [s for s in jobs if s != "validating_files"],   # queued at once
        "file": FILE_STATUSES, "tunelab.export": EXPORTS}.items()}


def _member(schema: dict[str, Any]) -> dict[str, Any]:
    """An "auto" | value field's schema: the value member (its type and bounds)."""
    members = [m for m in schema.get("anyOf", [schema]) if m.get("const") != "auto"]
    return members[0] if members else {}


def objectives_info() -> list[dict[str, Any]]:
    """The objective registry as the API publishes it, for clients and the page (no copies of
    it elsewhere): each objective's method type, the files it trains on, its hyperparameters
    (bounds, the config key each sets, the value `auto` stands for when it needs no data), its
    auto learning rate per adaptation method, and the metrics its events carry as train_<m> /
    valid_<m>. Values of `auto` that depend on the data: POST /v1/tunelab/plan."""
    methods = get_args(TrainConfig.model_fields["method"].annotation)
    out = []
    for api_type, o in BY_API_TYPE.items():
        model = HYPERPARAMETER_MODELS[api_type]
        props = model.model_json_schema()["properties"]
        keys = spec.api_hyperparameters(o)
        hps = []
        for name, key in keys.items():
            field = config_field(key)
            member = _member(props[name])
            hps.append({"name": name, "config_key": key, "type": member.get("type"),
                        **{b: member[b] for b in ("minimum", "maximum", "exclusiveMinimum",
                                                  "exclusiveMaximum") if b in member},
                        "description": field.description,
                        "auto": field.default if field.default != "auto" else None})
        out.append({"name": o.name, "title": o.title, "api_type": api_type,
                    "data_kind": o.data_kind, "expected_format": o.expected_format,
                    "hyperparameters": hps,
                    "auto_learning_rate": {m: o.auto_learning_rate(m) for m in methods},
                    "metrics": list(o.metric_names), "metric_label": o.metric_label})
    return out


def data_formats() -> dict[str, list[str]]:
    """The row formats uploads recognise, by the kind of data they hold (a file object's
    validation.format is one of them)."""
    from tunelab.data.formats import REGISTRY
    out: dict[str, list[str]] = {}
    for name, fmt in REGISTRY.items():
        out.setdefault(fmt.kind, []).append(name)
    return out


@router.post("/plan", summary="Check a fine-tuning request and resolve its auto values")
def plan(body: JobPlan, request: Request, who: Owner = Depends(owner)):
    """The body of POST /v1/fine_tuning/jobs, validated the same way (400 naming the field),
    and nothing started: the training config the job would run, and what `auto` resolves to
    on its training file (epochs, batch size, learning rate, optimizer steps, tokens). A
    training file of the wrong kind for method.type is a warning here (the job would fail)."""
    from tunelab.train.auto import auto_learning_rate, make_plan
    ctx = context(request)
    model = body.model or next(iter(ctx.base_models), None)
    if model is None:
        raise APIError(400, "no base model on this server", param="model")
    base_spec = api_jobs.base_model_spec(ctx, who, model)
    cfg, objective, train_f, _ = api_jobs.job_config(ctx, who, body, "plan", base_spec=base_spec)
    config = cfg.model_dump(mode="json")
    report = (train_f.validation or {}) if train_f else {}
    examples = report.get("valid", report.get("examples")) if train_f else None
    tokens = dict(report.get("tokens") or {})
    dups = report.get("duplicates") or {}
    if examples and api_jobs.job_options(body)[1] and dups.get("count") and not dups["dropped"]:
        # the job drops them before training: fewer examples, and their tokens
        kept = examples - dups["count"]
        if tokens.get("epoch_tokens"):
            tokens["epoch_tokens"] = tokens["epoch_tokens"] * kept / examples
        examples = kept
    resolved: dict[str, Any] = {"learning_rate": cfg.learning_rate if cfg.learning_rate != "auto"
                                else auto_learning_rate(cfg.method, cfg.objective)}
    steps = None
    if examples:
        p = make_plan(cfg, examples, n_examples=examples, longest=tokens.get("max"))
        resolved.update(epochs=p.epochs, batch_size=p.batch_size, learning_rate=p.learning_rate)
        steps = p.total_steps
    warnings = []
    if train_f is not None and train_f.data_path:
        wrong = spec.wrong_kind(objective, spec.data_kind_of(ctx.store.path(train_f.data_path)))
        if wrong:
            warnings.append(f"{train_f.filename} {wrong}")
    epochs = resolved.get("epochs")
    return {"object": "tunelab.plan", "model": model,
            "method": spec.method_view(config, spec.shown_hyperparameters(config, resolved)),
            "examples": examples, "epochs": epochs, "batch_size": resolved.get("batch_size"),
            "learning_rate": resolved["learning_rate"],
            "auto_learning_rate": auto_learning_rate(cfg.method, cfg.objective),
            "steps": steps,
            "tokens": round(tokens["epoch_tokens"] * epochs)
            if epochs and tokens.get("epoch_tokens") else None,
            "warnings": warnings,
            "config": {k: v for k, v in config.items() if k not in spec.RESERVED}}


@router.get("/files/{file_id}/preview", summary="The first examples of a file, as tunelab "
            "reads them")
def preview(file_id: str, request: Request, who: Owner = Depends(owner),
            limit: Annotated[int, Query(ge=1, le=50)] = 5):
    """`kind`: "conversations" (`data`: {line, messages}) or "preferences" (`data`: {line,
    prompt: messages, chosen, rejected}, whatever format the file used); a row that cannot be
    read has `error` instead. A file that did not process previews its upload when that is
    JSONL (what it holds, beside why it failed); otherwise `kind` is null."""
    ctx = context(request)
    f = get_file(ctx, who, file_id)
    path = ctx.store.path(f.data_path) if f.data_path else ctx.store.path(f.raw_path)
    if not f.data_path and not _jsonl(path):
        return {"object": "tunelab.preview", "kind": None, "data": []}
    return {"object": "tunelab.preview", **_preview(path, limit)}


def _jsonl(path) -> bool:
    from tunelab.data.io import file_kind
    try:
        return file_kind(path) == "jsonl"
    except TunelabError:
        return False


def _preview(path, limit: int) -> dict[str, Any]:
    """The first `limit` rows of a JSONL file; its kind is its first good row's."""
    from tunelab.data.io import iter_jsonl_lenient
    from tunelab.data.preference import preference_format
    kind, rows = None, []
    try:
        for line, record in iter_jsonl_lenient(path):
            if isinstance(record, TunelabError):
                rows.append({"line": line, "error": record.reason})
            else:
                kind = kind or ("preferences" if preference_format(record) is not None
                                else "conversations")
                rows.append({"line": line, **_preview_row(record, kind)})
            if len(rows) >= limit:
                break
    except TunelabError as e:   # unreadable
        return {"kind": kind, "data": rows, "error": e.reason}
    return {"kind": kind, "data": rows}


def _preview_row(record: Any, kind: str) -> dict[str, Any]:
    from tunelab.data.preference import pair_problems
    if kind == "preferences":
        pair, problems = pair_problems(record)
        if pair is None:
            p = problems[0]
            return {"error": f"field '{p.field}': {p.message}" if p.field else p.message}
        return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return {"messages": record["messages"]}
    return {"error": "not a conversation ({'messages': [...]})"}


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
@router.get("/metrics", summary="Evaluation metrics and how each is shown (no key needed)")
def metrics():
    """Every metric key an evaluation result may hold: `label`, `unit` (fraction, count,
    tokens, number, logprob, grade), `direction` (higher, lower, neither), `signed`, and
    `column` (a column of the comparison table). The one table the report and the page read
    (tunelab.evaluate.metrics)."""
    from tunelab.evaluate.metrics import table
    return {"object": "list", "data": table()}


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
    kind = spec.data_kind_of(ctx.store.path(test.data_path))
    if body.task != "auto" and kind and (body.task == "preference") != (kind == "preferences"):
        raise APIError(400, f"task '{body.task}' does not score {test.filename}: it holds "
                       f"{'preference pairs' if kind == 'preferences' else 'conversations'}"
                       + (" (use task 'preference')" if kind == "preferences" else ""),
                       param="task", code="invalid_task")
    train = _processed(ctx, who, training_file, "training_file") if training_file and \
        (body.few_shot > 0 or body.retrieval > 0) else None
    request_ = {**body.model_dump(), "tuned_spec": tuned_spec, "base_spec": base_spec,
                "test_file": test.id, "training_file": train.id if train else None}
    job = Job(id=new_id("eval-"), kind="evaluation", owner=who.id, status="queued",
              model=body.model, base_spec=base_spec, training_file=request_["training_file"],
              request=request_)
    ctx.store.add(job)
    return evaluation.view(job)


@router.get("/evaluations", summary="List evaluations")
def list_evaluations(request: Request, who: Owner = Depends(owner),
                     after: Annotated[str | None, Query(max_length=200)] = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 20):
    ctx = context(request)
    rows, more = ctx.store.page(Job, Job.owner == who.id, Job.kind == "evaluation",
                                after=after, limit=limit)
    return views.page([evaluation.view(j) for j in rows], more)


@router.post("/evaluations/{evaluation_id}/cancel", summary="Cancel an evaluation",
             responses=errors(400))
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
                        "Cancellation requested: the evaluation stops after its current batch",
                        kind="cancelled" if outcome == "cancelled" else "cancel_requested")
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


@router.get("/workers", summary="The job workers alive, on every host, and what each runs")
def list_workers(request: Request, who: Owner = Depends(owner),
                 within_s: Annotated[float | None, Query(gt=0, le=86400, description=(
                     "live: a heartbeat at most this many seconds old (default: 3 leases)"))]
                 = None):
    """Every worker process whose heartbeat is recent (they beat every few seconds; one killed
    outright drops out after `within_s`): its host, pid, start, last heartbeat, resources (CPUs,
    memory, GPUs) and whether it runs a job. `job` names the job only when it is the caller's."""
    from tunelab.jobs.worker import LEASE_SECONDS
    ctx = context(request)
    within = within_s if within_s is not None else 3 * LEASE_SECONDS
    workers = ctx.store.live_workers(within)
    busy = [w.job_id for w in workers if w.job_id]
    mine = {j.id for j in ctx.store.all(Job, Job.id.in_(busy), Job.owner == who.id)} \
        if busy else set()
    t = time.time()
    return {"object": "list", "live_within_s": within, "data": [{
        "object": "tunelab.worker", "id": w.id, "host": w.host, "pid": w.pid,
        "started_at": int(w.started_at), "last_heartbeat_at": round(w.heartbeat_at, 3),
        "seconds_since_heartbeat": round(max(0.0, t - w.heartbeat_at), 3),
        "status": "busy" if w.job_id else "idle",
        "job": w.job_id if w.job_id in mine else None,
        "resources": w.resources or {}} for w in workers]}
