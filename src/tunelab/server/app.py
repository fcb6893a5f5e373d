"""The FastAPI application: the OpenAI-compatible API, tunelab's extensions, the web page."""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

import tunelab
from tunelab.server import errors
from tunelab.server.context import Context, Settings

log = logging.getLogger("tunelab.server")
STATIC = Path(__file__).parent / "static"


def _warm_tokenizer(ctx: Context) -> None:
    """Load the tokenizer that counts upload tokens now, not in the first upload's request: for
    the builtin model that is its one-time GGUF conversion (~17 s on 2 cores)."""
    from tunelab.jobs.uploads import tokenizers
    try:
        tokenizers.get(ctx.stats_model)
    except Exception as e:   # the upload that needs it reports the problem in its own words
        log.warning("could not load the tokenizer of %s: %s", ctx.stats_model, e)


def _import_model_libraries() -> None:
    """transformers resolves its names lazily, and threads resolving them at the same moment
    can fail (`cannot import name 'AutoTokenizer' from 'transformers'`, seen when the first
    chat request raced the tokenizer warm-up): resolve the ones the server uses before any
    thread starts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def create_app(settings: Settings, supervisor=None) -> FastAPI:
    """`supervisor`: the worker processes to start and stop with the app (tunelab serve)."""
    ctx = Context(settings)

    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from tunelab.server.api_files import reprocess_interrupted
        from tunelab.server.api_jobs import revalidate_pending

        def resume_interrupted():   # what a stopped server left half-done, in a thread
            reprocess_interrupted(ctx)
            revalidate_pending(ctx.store)
        _import_model_libraries()
        threading.Thread(target=resume_interrupted, daemon=True).start()
        threading.Thread(target=_warm_tokenizer, args=(ctx,), daemon=True,
                         name="warm-tokenizer").start()
        threading.Thread(target=_reap, args=(ctx, stop), daemon=True, name="reaper").start()
        if supervisor is not None:
            supervisor.start()
        try:
            yield
        finally:   # uvicorn re-raises SIGTERM after this: the workers stop here, gracefully
            stop.set()
            if supervisor is not None:
                supervisor.stop()
            ctx.close()

    app = FastAPI(title="tunelab", version=tunelab.__version__, lifespan=lifespan,
                  description="OpenAI-compatible fine-tuning and inference API (files, "
                  "fine-tuning jobs, models, chat completions) plus tunelab's extensions under "
                  "/v1/tunelab. Every request needs `Authorization: Bearer KEY` unless the "
                  "server runs with --no-auth.")
    app.state.ctx = ctx
    errors.install(app)
    from tunelab.server.limits import BodyLimit
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    from tunelab.server import api_chat, api_export, api_files, api_jobs, api_tunelab
    for module in (api_files, api_jobs, api_chat, api_tunelab, api_export):
        app.include_router(module.router)
    from tunelab.server.openapi import document
    document(app)   # the error responses each route really answers; no 422
    if STATIC.is_dir():   # the web page (its own issue); API routes above take precedence
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="web")
    return app


def _reap(ctx: Context, stop: threading.Event) -> None:
    """Every few seconds: a running job whose worker's lease expired is put back in the queue,
    with an event saying so (a worker that claims it resumes from the last checkpoint)."""
    from tunelab.jobs.worker import LEASE_SECONDS
    while not stop.wait(max(1.0, LEASE_SECONDS / 3)):
        try:
            for job_id in ctx.store.requeue_expired():
                ctx.store.add_event(job_id, "The worker running this job stopped responding; "
                                    "the job is queued again and resumes from its last "
                                    "checkpoint when a worker is free", level="warn",
                                    kind="requeued")
        except Exception:
            log.exception("requeueing jobs of stopped workers")
