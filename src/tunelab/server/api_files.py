"""/v1/files: upload (streamed, size-limited), list, retrieve, content, delete."""
from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from tunelab.jobs import uploads
from tunelab.jobs.store import File, new_id
from tunelab.server import views
from tunelab.server.context import Context, Owner, context, owner
from tunelab.server.errors import APIError, not_found
from tunelab.server.objects import Deleted, FileList, FileObject, ok
from tunelab.server.upload import receive

log = logging.getLogger("tunelab.server")
router = APIRouter(prefix="/v1", tags=["files"])
PURPOSES = ("fine-tune",)

# exactly what create_file accepts: one file part named "file", the `purpose`, `model` and
# `dedupe` text fields, nothing else (an unknown field is a 400), each text field at most 64 KiB
_UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "additionalProperties": False,
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "training data in any format `tunelab data convert` reads: "
                                "JSONL / JSON / CSV / TSV / Parquet (chat messages, ShareGPT, "
                                "Alpaca, prompt/completion, question/answer, GSM8K, preference "
                                "pairs)"},
        "purpose": {"type": "string", "enum": list(PURPOSES)},
        "model": {"type": "string", "minLength": 1, "maxLength": 200,
                  "description": "tunelab: the model whose tokenizer gives the token "
                                 "statistics (a base model or one of your fine-tuned models; "
                                 "default: the server's stats_model)"},
        "dedupe": {"type": "boolean", "default": False,
                   "description": "tunelab: drop exact duplicate examples (else they are a "
                                  "warning, with their lines, and trained again)"}}},
    "encoding": {"file": {"contentType": "application/octet-stream"}}}}}}


def get_file(ctx: Context, who: Owner, file_id: str, param: str = "file_id") -> File:
    f = ctx.store.get(File, file_id, who.id)
    if f is None:
        raise not_found("File", file_id, param)
    return f


@router.post("/files", openapi_extra=_UPLOAD_DOC, summary="Upload a file",
             responses=ok(FileObject))
async def create_file(request: Request, who: Owner = Depends(owner)):
    ctx = context(request)
    file_id = new_id("file-")
    holder: dict[str, str] = {}

    def open_file(filename: str):
        holder["name"] = uploads.safe_filename(filename)
        return uploads.upload_path(ctx.store, file_id, holder["name"])

    try:
        up = await receive(request, ctx.settings.max_upload_bytes, open_file)
        if up.path is None or up.field_name != "file":
            raise APIError(400, "Missing required parameter: 'file' (a file part named 'file')",
                           param="file")
        purpose = up.fields.get("purpose")
        if purpose not in PURPOSES:
            raise APIError(400, f"Invalid value for 'purpose': {purpose!r}; tunelab accepts "
                           f"{', '.join(PURPOSES)}", param="purpose")
        unknown = set(up.fields) - {"purpose", "model", "dedupe"}
        if unknown:
            raise APIError(400, f"Unrecognized request argument supplied: {sorted(unknown)[0]}",
                           param=sorted(unknown)[0])
        model = ctx.stats_model
        if "model" in up.fields:
            if not up.fields["model"].strip():
                raise APIError(400, "Invalid value for 'model': empty (leave the field out for "
                               "the server's default)", param="model", code="invalid_value")
            model = ctx.model_spec(who, up.fields["model"], "model")[0]
        dedupe = _flag(up.fields.get("dedupe", "false"), "dedupe")
    except BaseException:
        await run_in_threadpool(_remove_folder, ctx, file_id)
        raise
    f = File(id=file_id, owner=who.id, filename=holder["name"], purpose=purpose, bytes=up.size,
             status="uploaded", raw_path=ctx.store.rel(up.path))
    ctx.store.add(f)
    f = await run_in_threadpool(lambda: uploads.process(ctx.store, f, model=model,
                                                        dedupe=dedupe))
    return views.file(f)


def _flag(value: str, param: str) -> bool:
    """A multipart boolean: true/false (as clients encode JSON booleans), or 1/0."""
    v = value.strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise APIError(400, f"Invalid value for '{param}': {value!r} (expected true or false)",
                   param=param, code="invalid_value")


def _remove_folder(ctx: Context, file_id: str) -> None:
    import shutil
    shutil.rmtree(ctx.store.path("files") / file_id, ignore_errors=True)


@router.get("/files", summary="List files", responses=ok(FileList))
def list_files(request: Request, who: Owner = Depends(owner),
               after: Annotated[str | None, Query(max_length=200)] = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
               order: Literal["asc", "desc"] = "desc",
               purpose: Annotated[str | None, Query(max_length=40)] = None):
    ctx = context(request)
    filters = [File.owner == who.id] + ([File.purpose == purpose] if purpose else [])
    rows, more = ctx.store.page(File, *filters, after=after, limit=limit,
                                newest_first=order == "desc")
    return views.page([views.file(f) for f in rows], more)


@router.get("/files/{file_id}", summary="Retrieve a file", responses=ok(FileObject))
def retrieve_file(file_id: str, request: Request, who: Owner = Depends(owner)):
    return views.file(get_file(context(request), who, file_id))


@router.get("/files/{file_id}/content", summary="The file's bytes, as uploaded",
            response_class=FileResponse)
def file_content(file_id: str, request: Request, who: Owner = Depends(owner)):
    ctx = context(request)
    f = get_file(ctx, who, file_id)
    media = "text/csv" if f.filename.endswith(".csv") else "application/octet-stream"
    return FileResponse(ctx.store.path(f.raw_path), media_type=media, filename=f.filename)


@router.delete("/files/{file_id}", summary="Delete a file", responses=ok(Deleted))
def delete_file(file_id: str, request: Request, who: Owner = Depends(owner)):
    ctx = context(request)
    f = get_file(ctx, who, file_id)
    uploads.delete_file(ctx.store, f)
    return {"id": f.id, "object": "file", "deleted": True}


def reprocess_interrupted(ctx: Context) -> None:
    """At startup: uploads a stopped server received but had not finished checking."""
    for f in ctx.store.all(File, File.status == "uploaded", File.purpose == "fine-tune",
                           File.created_at <= ctx.started):   # not uploads arriving now
        try:
            uploads.process(ctx.store, f, model=ctx.stats_model)
        except Exception:
            log.exception("processing %s", f.id)
