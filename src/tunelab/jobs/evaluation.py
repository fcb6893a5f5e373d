"""Run an evaluation job: tunelab.evaluate.compare (base zero-shot, with a system prompt,
few-shot, and the fine-tuned model on the same test file), its report kept under the job."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.jobs.store import File, Job, Store

# compare()'s argument -> the request field an error is about
_PARAMS = {"base": "base_model", "train": "training_file", "data": "test_file", "task": "task",
           "tuned": "model", "retrieval": "retrieval", "judge_url": "judge.url",
           "judge_model": "judge.model", "judge_key_env": "judge.api_key",
           "judge_rubric": "judge.rubric"}


def judge_config(request: dict[str, Any]):
    """The grader of a request's `judge` object (url, model, api_key, rubric, pairwise), or
    None. The key is the request's own: a server never sends a key of its environment to a URL
    that a request names."""
    j = request.get("judge")
    if not j:
        return None
    from tunelab.evaluate.judge import DEFAULT_MODEL, JudgeConfig
    return JudgeConfig(model=j.get("model") or DEFAULT_MODEL,
                       url=j.get("url") or "https://api.openai.com/v1",
                       api_key=j.get("api_key"), key_env=None,
                       rubric=j.get("rubric"), rubric_source="given in the request"
                       if j.get("rubric") else None, pairwise=bool(j.get("pairwise")),
                       seed=int(j.get("seed") or 0))


def judge_view(request: dict[str, Any]) -> dict[str, Any] | None:
    """The request's grader as the API shows it: never its key."""
    j = request.get("judge")
    if not j:
        return None
    return {**{k: v for k, v in j.items() if k != "api_key"},
            "api_key": "(given)" if j.get("api_key") else None}


def report_dir(store: Store, job_id: str) -> Path:
    return store.path("evaluations") / job_id


class Cancelled(Exception):
    """Raised from a progress update once the user cancels or the worker stops."""


def run(store: Store, job: Job, *, worker: str, should_cancel: Callable[[], bool],
        stopping: Callable[[], bool]) -> None:
    """One attempt at an evaluation. A cancel (or the worker stopping) is noticed after each
    batch of answers: cancelled, the job ends "cancelled"; stopped, it goes back to the queue
    and starts over on the next worker (an evaluation keeps no checkpoint)."""
    from tunelab.evaluate.compare import compare
    from tunelab.jobs.store import now
    r = job.request
    store.update(Job, job.id, started_at=job.started_at or now())
    labels = _labels(store, job)

    def progress(name: str, total: int) -> _Progress:
        if should_cancel():
            raise Cancelled
        return _Progress(store, job.id, name, total, should_cancel)

    try:
        comparison = compare(base=r.get("base_spec"), tuned=r["tuned_spec"],
                             data=_data(store, job.request["test_file"]),
                             train=_data(store, r["training_file"]) if r.get("training_file")
                             else None,
                             out_dir=report_dir(store, job.id), task=r.get("task", "auto"),
                             few_shot=r.get("few_shot", 5), system=r.get("system"),
                             retrieval=r.get("retrieval", 0),
                             general_check=r.get("general_check", True),
                             limit=r.get("limit"), judge=judge_config(r),
                             progress_factory=progress)
    except Cancelled:
        if stopping():
            if store.hand_back(job.id, worker):
                store.add_event(job.id, "The worker stopped; the evaluation starts again when "
                                "a worker is free")
        elif store.finish_job(job.id, worker, "cancelled"):
            store.add_event(job.id, "The evaluation was cancelled")
        return
    except TunelabError as e:
        param = _PARAMS.get(e.field or "", e.field)
        for path, (fld, _) in labels.items():
            if e.file and path in e.file:
                param = fld
        error = {"code": "evaluation_failed", "message": _redact(str(e), labels), "param": param}
        if store.finish_job(job.id, worker, "failed", error=error):
            store.add_event(job.id, f"The evaluation failed: {error['message']}", level="error")
        return
    result = json.loads(_redact(json.dumps(comparison.to_json()), labels))
    if store.finish_job(job.id, worker, "succeeded", result=result):
        store.add_event(job.id, f"The evaluation finished: {result.get('verdict', '')}")


class _Progress:
    """compare()'s progress bars -> the evaluation's `progress` (written at most every 0.5 s)."""

    def __init__(self, store: Store, job_id: str, name: str, total: int,
                 should_cancel: Callable[[], bool]):
        self.store, self.job_id, self.name, self.total = store, job_id, name, total
        self.should_cancel = should_cancel
        self.done, self.written = 0, 0.0
        self._write()

    def _write(self) -> None:
        self.written = time.time()
        self.store.update(Job, self.job_id, progress={"stage": self.name, "done": self.done,
                                                      "total": self.total})

    def update(self, n: int = 1) -> None:
        if self.should_cancel():
            raise Cancelled
        self.done += n
        if time.time() - self.written > 0.5 or self.done >= self.total:
            self._write()

    def close(self) -> None:
        self._write()


def _data(store: Store, file_id: str) -> Path:
    f = store.get(File, file_id)
    if f is None or f.data_path is None:
        raise TunelabError("the file was deleted or is not a processed chat file",
                           field="data")
    return store.path(f.data_path)


def _labels(store: Store, job: Job) -> dict[str, tuple[str, str]]:
    """Server paths -> (request field, what a user calls them)."""
    out: dict[str, tuple[str, str]] = {}
    for fld in ("test_file", "training_file"):
        f = store.get(File, job.request.get(fld) or "")
        if f is not None and f.data_path:
            out[str(store.path(f.data_path))] = (fld, f.filename)
    out[str(report_dir(store, job.id))] = ("", f"<evaluation {job.id}>")
    out[str(store.root)] = ("", "<data dir>")   # anything else under it (model folders)
    return out


def _redact(text: str, labels: dict[str, tuple[str, str]]) -> str:
    for path, (_, label) in labels.items():
        text = text.replace(path, label)
    return text


def view(job: Job) -> dict[str, Any]:
    """The evaluation object of the HTTP API."""
    r = job.request
    return {"id": job.id, "object": "tunelab.evaluation", "created_at": job.created_at,
            "status": job.status, "model": r.get("model"), "base_model": r.get("base_model"),
            "test_file": r.get("test_file"), "training_file": r.get("training_file"),
            "task": r.get("task", "auto"), "few_shot": r.get("few_shot", 5),
            "system": r.get("system"), "general_check": r.get("general_check", True),
            "retrieval": r.get("retrieval", 0), "judge": judge_view(r),
            "started_at": job.started_at, "finished_at": job.finished_at,
            "progress": job.progress, "result": job.result, "error": job.error}
