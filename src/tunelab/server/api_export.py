"""Exports over the API: `POST /v1/tunelab/exports` {model, format, quant} starts one (it takes
seconds to minutes, so it runs in the background, one at a time per server), `GET
/v1/tunelab/exports/{id}` says how it goes, `GET .../download` returns the file (a .gguf, or a
.zip of the folder for `ollama` and `hf`). State lives beside the output under the data dir,
written atomically; an export a stopped server left running reads `failed`."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from tunelab.errors import TunelabError
from tunelab.jobs.store import new_id
from tunelab.server.context import Context, Owner, context, owner
from tunelab.server.errors import APIError, not_found

router = APIRouter(prefix="/v1/tunelab", tags=["tunelab extensions"])
STATUSES = ("queued", "running", "succeeded", "failed")    # an export's, in order
_one_at_a_time = threading.Lock()
_running: set[str] = set()


class ExportCreate(BaseModel):
    model: str
    format: Literal["gguf", "ollama", "gguf-adapter", "hf"] = "gguf"
    quant: Literal["f16", "bf16", "q8_0", "q4_0"] = "f16"


def _root(ctx: Context) -> Path:
    return ctx.store.path("exports")


def _state_file(ctx: Context, export_id: str) -> Path:
    return _root(ctx) / f"{export_id}.json"


def _save(ctx: Context, state: dict) -> None:
    f = _state_file(ctx, state["id"])
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, f)


def _load(ctx: Context, who: Owner, export_id: str) -> dict:
    f = _state_file(ctx, export_id) if export_id.replace("-", "").isalnum() else None
    if f is None or not f.is_file():
        raise not_found("export", export_id, "export_id")
    state = json.loads(f.read_text())
    if state.get("owner") != who.id:
        raise not_found("export", export_id, "export_id")
    if state["status"] in ("queued", "running") and state["id"] not in _running:
        state.update(status="failed", error={"code": "server_stopped", "message":
                                             "the server stopped during the export"})
        _save(ctx, state)
    return state


def view(state: dict) -> dict:
    return {k: state.get(k) for k in ("id", "object", "created_at", "finished_at", "model",
                                      "format", "quant", "status", "error", "bytes",
                                      "filename")}


def _run(ctx: Context, state: dict, spec: str) -> None:
    from tunelab.export import export
    with _one_at_a_time:
        state.update(status="running")
        _save(ctx, state)
        folder = _root(ctx) / state["id"]
        try:
            res = export(spec, folder, fmt=state["format"], quant=state["quant"],
                         name=state["name"], overwrite=True)
            files = res["files"]
            if len(files) == 1:
                download = folder / files[0]
            else:   # a folder: one zip (stored: GGUF and safetensors do not compress)
                download = _root(ctx) / f"{state['id']}.zip"
                tmp = download.with_suffix(".zip.tmp")
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
                    for name in files:
                        z.write(folder / name, f"{state['name']}/{name}")
                os.replace(tmp, download)
            state.update(status="succeeded", download=str(download), filename=download.name,
                         bytes=download.stat().st_size)
        except TunelabError as e:
            shutil.rmtree(folder, ignore_errors=True)
            state.update(status="failed", error={"code": "export_failed", "message":
                                                 e.reason, "param": e.field})
        except Exception as e:   # a bug or a library failure: say so, keep serving
            shutil.rmtree(folder, ignore_errors=True)
            state.update(status="failed", error={"code": "server_error",
                                                 "message": f"{type(e).__name__}: {e}"})
        finally:
            state["finished_at"] = int(time.time())
            _save(ctx, state)
            _running.discard(state["id"])


@router.post("/exports", summary="Export a model to GGUF, Ollama or a Hugging Face folder")
def create_export(body: ExportCreate, request: Request, who: Owner = Depends(owner)):
    """`model`: a base model or one of your fine-tuned models (`ft:...`); a LoRA is merged
    into its base (`gguf-adapter`: the LoRA alone). Returns the export object; poll it."""
    ctx = context(request)
    spec, _row = ctx.model_spec(who, body.model)
    export_id = new_id("export-")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in body.model.split(":")[-1])
    state = {"id": export_id, "object": "tunelab.export", "created_at": int(time.time()),
             "finished_at": None, "owner": who.id, "model": body.model, "format": body.format,
             "quant": body.quant, "name": safe or "model", "status": "queued", "error": None,
             "bytes": None, "filename": None}
    _save(ctx, state)
    _running.add(export_id)
    threading.Thread(target=_run, args=(ctx, state, spec), daemon=True,
                     name=f"export-{export_id}").start()
    return view(state)


@router.get("/exports/{export_id}", summary="Retrieve an export")
def retrieve_export(export_id: str, request: Request, who: Owner = Depends(owner)):
    return view(_load(context(request), who, export_id))


@router.get("/exports/{export_id}/download", summary="The exported file",
            response_class=FileResponse)
def download_export(export_id: str, request: Request, who: Owner = Depends(owner)):
    state = _load(context(request), who, export_id)
    if state["status"] != "succeeded":
        raise APIError(404, f"The export {export_id} has no file yet (status "
                       f"{state['status']})", param="export_id", code="export_not_ready")
    return FileResponse(state["download"], filename=state["filename"],
                        media_type="application/octet-stream")
