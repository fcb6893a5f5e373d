"""/v1/models and /v1/chat/completions (streamed as server-sent events, or whole)."""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tunelab.errors import TunelabError
from tunelab.jobs.store import Model, new_id
from tunelab.server import views
from tunelab.server.context import Context, Owner, context, owner
from tunelab.server.errors import APIError, body as error_body
from tunelab.server.objects import Deleted, ModelList, ModelObject, ok
from tunelab.server.openapi import errors
from tunelab.server.schemas import ChatCompletionCreate

router = APIRouter(prefix="/v1", tags=["models", "chat"])
DEFAULT_MAX_TOKENS = 256


@router.get("/models", summary="Base models, and this key's fine-tuned models and checkpoints",
            responses=ok(ModelList))
def list_models(request: Request, who: Owner = Depends(owner)):
    ctx = context(request)
    data = [views.model(name, ctx.started, "tunelab") for name in ctx.base_models]
    data += [views.model(m.id, m.created_at, who.name)
             for m in ctx.store.all(Model, Model.owner == who.id)]
    return {"object": "list", "data": data}


@router.get("/models/{model:path}", summary="Retrieve a model", responses=ok(ModelObject))
def retrieve_model(model: str, request: Request, who: Owner = Depends(owner)):
    ctx = context(request)
    _, row = ctx.model_spec(who, model)
    if row is None:
        return views.model(model, ctx.started, "tunelab")
    return views.model(row.id, row.created_at, who.name)


@router.delete("/models/{model:path}", summary="Delete a fine-tuned model or checkpoint",
               responses={**ok(Deleted), **errors(403, 409)},
               description="A model that other fine-tuned models were trained from, or that a "
                           "job not yet finished loads, is kept: 409 `model_in_use` names them. "
                           "Delete those first.")
def delete_model(model: str, request: Request, who: Owner = Depends(owner)):
    from tunelab.server.api_jobs import dependents
    ctx = context(request)
    with ctx.lineage_lock:     # no job starts from it between the check and the delete
        spec, row = ctx.model_spec(who, model)
        if row is None:
            raise APIError(403, f"The model `{model}` is a base model; only fine-tuned models can "
                           "be deleted", param="model", code="model_not_deletable")
        # a fine-tune's whole run folder (adapter and merged model); a checkpoint's own copy
        folder = Path(spec).parent if row.kind == "fine_tuned" else Path(spec)
        users = dependents(ctx, row, folder)
        if users:
            raise APIError(409, f"The model `{model}` cannot be deleted: other models or jobs "
                           f"build on it ({', '.join(users)}). Delete those models, and cancel "
                           "or wait for those jobs, first.", param="model", code="model_in_use")
        ctx.store.delete(row)
    ctx.unload(spec)
    if row.kind == "fine_tuned":   # loaded as the base of later fine-tunes: the run's model
        ctx.unload(str(folder))
        ctx.unload(str(folder / "model"))
    shutil.rmtree(folder, ignore_errors=True)
    return {"id": row.id, "object": "model", "deleted": True}


def _messages(body: ChatCompletionCreate) -> list[dict[str, str]]:
    # "developer" is OpenAI's newer name for the system role
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages]


@router.post("/chat/completions", summary="Create a chat completion", responses=errors(503))
async def chat_completions(body: ChatCompletionCreate, request: Request,
                           who: Owner = Depends(owner)):
    from tunelab.server.engine import GenerationRequest
    ctx: Context = context(request)
    chars = sum(len(m.text()) for m in body.messages)
    if chars > ctx.settings.max_prompt_chars:   # before any tokenising
        raise APIError(400, f"The messages hold {chars:,} characters; this server takes at "
                       f"most {ctx.settings.max_prompt_chars:,} per request", param="messages",
                       code="context_length_exceeded")
    spec, _ = await run_in_threadpool(ctx.model_spec, who, body.model)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    req = GenerationRequest(
        model=spec, messages=_messages(body),
        max_new_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, stop=stop, seed=body.seed,
        name=body.model)
    engine = await run_in_threadpool(ctx.engine)
    chunks = engine.generate(req)
    try:   # a bad request (unknown model files, prompt too long) fails before the first chunk
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = None
    except TunelabError as e:
        # the engine names the request field (model, messages[i], max_tokens, ...) in e.field
        raise APIError(400, _shown(str(e), spec, body.model, ctx), param=e.field or "model",
                       code="invalid_request") from None
    completion_id = new_id("chatcmpl-")
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        shown = lambda msg: _shown(msg, spec, body.model, ctx)   # noqa: E731
        return StreamingResponse(
            _sse(completion_id, created, body.model, first, chunks, include_usage, shown),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, finish, usage = [], "stop", (0, 0)
    async for c in _chain(first, chunks):
        text.append(c.text)
        usage = (c.prompt_tokens, c.completion_tokens)
        finish = c.finish_reason or finish
    return {"id": completion_id, "object": "chat.completion", "created": created,
            "model": body.model, "system_fingerprint": None, "service_tier": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text),
                                                 "refusal": None},
                         "finish_reason": finish, "logprobs": None}],
            "usage": _usage(*usage)}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _chain(first, rest) -> AsyncIterator:
    if first is not None:
        yield first
        async for c in rest:
            yield c


def _shown(message: str, spec: str, model: str, ctx: Context) -> str:
    """A message as the client may see it: the model as it called it, never the server path
    of a fine-tune (or anything else under the data dir)."""
    for path in sorted({spec, str(Path(spec).resolve())}, key=len, reverse=True):
        message = message.replace(path, model)
    return message.replace(str(ctx.store.root), "<data dir>")


async def _sse(completion_id: str, created: int, model: str, first, chunks,
               include_usage: bool, shown) -> AsyncIterator[str]:
    def event(choices: list, usage=None) -> str:
        obj = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
               "model": model, "system_fingerprint": None, "choices": choices}
        if include_usage:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                  "finish_reason": None, "logprobs": None}])
    usage = (0, 0)
    try:
        async for c in _chain(first, chunks):
            usage = (c.prompt_tokens, c.completion_tokens)
            if c.text or c.finish_reason:
                yield event([{"index": 0, "delta": {"content": c.text} if c.text else {},
                              "finish_reason": c.finish_reason, "logprobs": None}])
    except Exception as e:   # headers are sent: report the error in the stream, as OpenAI does
        yield f"data: {json.dumps(error_body(shown(str(e)), 'server_error'))}\n\n"
        return
    if include_usage:
        yield event([], _usage(*usage))
    yield "data: [DONE]\n\n"
