"""Database rows -> the JSON objects of the OpenAI REST API (plus tunelab's extensions)."""
from __future__ import annotations

import time
from typing import Any

from tunelab.jobs.spec import RESERVED, method_view
from tunelab.jobs.store import Event, File, Job, Model


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def file(f: File) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
            "filename": f.filename, "purpose": f.purpose, "status": f.status,
            "status_details": f.status_details, "expires_at": None,
            "validation": f.validation}


def _progress(job: Job) -> dict[str, Any] | None:
    p = job.progress or {}
    if "step" not in p:
        return None
    step, total = int(p["step"]), int(p.get("total_steps") or 0)
    eta = None
    done = step - int(p.get("started_step", 0))
    if job.status == "running" and done > 0 and p.get("started_at") and total:
        rate = (p.get("updated_at", time.time()) - p["started_at"]) / done
        eta = max(0, round(rate * (total - step)))
    return {"step": step, "total_steps": total, "eta_seconds": eta,
            "tokens_per_second": p.get("tokens_per_s")}


def training_cost(j: Job, price_per_hour: float) -> dict[str, Any] | None:
    """A succeeded job's measured training time (its run's result.json) at `price_per_hour`:
    {seconds, price_per_hour, usd}, as tunelab compare counts a fine-tune's cost."""
    from tunelab.evaluate.cost import Prices, training_cost as cost, training_seconds
    out = (j.request.get("config") or {}).get("output_dir")
    seconds = training_seconds(out) if j.status == "succeeded" and out else None
    if seconds is None:
        return None
    usd = cost(seconds, Prices(train_per_hour=price_per_hour))
    return {"seconds": round(seconds, 1), "price_per_hour": price_per_hour,
            "usd": round(usd, 6)}


def job(j: Job, key_name: str, *, price_per_hour: float | None = None) -> dict[str, Any]:
    """The job object; `price_per_hour` (the training machine's, USD): a succeeded job shows
    what its training cost (tunelab.training_cost)."""
    cfg = {k: v for k, v in (j.request.get("config") or {}).items() if k not in RESERVED}
    progress = _progress(j)
    hp = j.hyperparameters
    return {
        "id": j.id, "object": "fine_tuning.job", "created_at": j.created_at,
        "error": j.error, "fine_tuned_model": j.fine_tuned_model, "finished_at": j.finished_at,
        "hyperparameters": hp, "model": j.model, "organization_id": f"org-{key_name}",
        "result_files": list(j.result_files or []), "seed": j.seed, "status": j.status,
        "trained_tokens": j.trained_tokens, "training_file": j.training_file,
        "validation_file": j.validation_file,
        "estimated_finish": int(time.time()) + progress["eta_seconds"]
        if progress and progress["eta_seconds"] is not None else None,
        "integrations": [], "metadata": j.meta, "user_provided_suffix": j.suffix,
        # OpenAI's shape for the job's objective: {"type": T, T: {"hyperparameters"}}
        "method": method_view(j.request.get("config") or {}, hp),
        "tunelab": {"config": cfg, "progress": progress, "started_at": j.started_at,
                    "cancel_requested": bool(j.cancel_requested), "attempts": j.attempts,
                    "training_cost": training_cost(j, price_per_hour)
                    if price_per_hour is not None else None},
    }


def event(e: Event) -> dict[str, Any]:
    """OpenAI's event, plus `kind`: what happened (created, started, checkpoint, succeeded,
    failed, cancelled, ...; a metrics event's kind is "metrics"), for clients to switch on
    instead of reading the message."""
    kind = e.type if e.type != "message" else (e.data or {}).get("kind")
    return {"id": e.id, "object": "fine_tuning.job.event", "created_at": e.created_at,
            "level": e.level, "message": e.message, "data": e.data, "type": e.type,
            "kind": kind}


def checkpoint(m: Model) -> dict[str, Any]:
    return {"id": m.checkpoint_id, "object": "fine_tuning.job.checkpoint",
            "created_at": m.created_at, "fine_tuned_model_checkpoint": m.id,
            "fine_tuning_job_id": m.job_id, "metrics": m.metrics or {"step": m.step},
            "step_number": m.step}


def model(id_: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": id_, "object": "model", "created": created, "owned_by": owned_by}
