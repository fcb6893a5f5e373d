"""Run one fine-tuning job: train() with its events recorded as the job's events, checkpoints
kept as servable models, and the outcome (model, results file, error) written to the job.

The worker owns the lease; this module only turns training events into job state.
"""
from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.jobs.store import Event, Job, Model, Store, new_id, now
from tunelab.objectives import OBJECTIVES

log = logging.getLogger("tunelab.jobs")

# what a servable checkpoint copy leaves out: the state only resuming needs
_NOT_SERVED = ("optimizer.pt", "scheduler.pt", "rng_state*.pth", "scaler.pt", "COMPLETE",
               ".*.tmp")


def job_dir(store: Store, job_id: str) -> Path:
    return store.path("jobs") / job_id


def model_name(job: Job, key_name: str) -> str:
    """ft:{base}:{key-name}:{suffix}:{job-id}, as OpenAI names fine-tuned models. A job on a
    fine-tuned model (DPO after SFT) is named after the base model its lineage started from, as
    OpenAI does, not after the ft: name it was given (`model` keeps that): the API records that
    base in the job's request."""
    base = (job.request or {}).get("base_model") or job.model
    return f"ft:{base}:{key_name}:{job.suffix or ''}:{job.id}"


def keep_checkpoints() -> int:
    """Servable checkpoints a job keeps: its last 3, as the hosted API does
    (TUNELAB_KEEP_CHECKPOINTS sets another number, read by the worker)."""
    value = os.environ.get("TUNELAB_KEEP_CHECKPOINTS", "3")
    return int(value) if value.isdigit() and int(value) >= 1 else 3


def checkpoint_name(model: str, step: int) -> str:
    return f"{model}:ckpt-step-{step}"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)   # free while the run keeps its own copy; survives its rotation
    except OSError:
        shutil.copy2(src, dst)


class JobRun:
    """The event sink and bookkeeping for one attempt at a job."""

    def __init__(self, store: Store, job: Job, key_name: str, *,
                 stopping: Callable[[], bool]):
        self.store, self.job, self.key_name = store, job, key_name
        self.stopping = stopping          # a worker shutdown, not the user's cancel
        self.name = model_name(job, key_name)
        self.last: dict[str, Any] = {}    # the latest train / valid metrics, for checkpoints
        self.progress: dict[str, Any] = dict(job.progress or {})
        self.speeds: list[float] = []     # training tokens/s of this attempt's logged steps

    def event(self, message: str, **kw) -> None:
        self.store.add_event(self.job.id, message, **kw)

    # ---- training events -> job events ----------------------------------------------------
    def on_event(self, ev) -> None:
        try:
            handler = getattr(self, f"_on_{ev.kind}", None)
            if handler is not None:
                handler(ev)
        except Exception:   # a bookkeeping failure must not kill the training run
            log.exception("recording a %s event of %s", ev.kind, self.job.id)

    def _set_progress(self, step: int, total: int) -> None:
        self.progress.update(step=step, total_steps=total, updated_at=time.time())
        self.store.update(Job, self.job.id, progress=dict(self.progress))

    def _on_started(self, ev) -> None:
        from tunelab.jobs import spec
        # the model by the id the user asked for, not its path on this server
        d = {**ev.data, "model": self.job.model}
        if d.get("resumed_from"):
            d["resumed_from"] = f"checkpoint at step {ev.step}"
        self.progress.update(started_step=ev.step, started_at=time.time())
        self._set_progress(ev.step, ev.total_steps)
        self.store.update(Job, self.job.id, hyperparameters=spec.shown_hyperparameters(
            self.job.request.get("config", {}), d))
        if d.get("resumed_from"):
            self.event(f"Fine-tuning resumed from the checkpoint at step {ev.step} of "
                       f"{ev.total_steps}", data=d, kind="started")
            return
        objective = OBJECTIVES[d.get("objective") or "sft"]
        self.event(f"Fine-tuning started: {d.get('method', '')} {objective.title} on "
                   f"{self.job.model}, {d.get('train_examples', '?')} training examples, "
                   f"{ev.total_steps} steps", data=d, kind="started")

    def _on_metrics(self, ev) -> None:
        d = ev.data
        if d.get("tokens_per_s"):
            # the run's median speed: what training-time estimates on this server start from
            self.speeds.append(float(d["tokens_per_s"]))
            self.progress["tokens_per_s"] = round(statistics.median(self.speeds), 1)
        # train_loss and train_<m> for each of the objective's metrics (SFT: token accuracy,
        # DPO: reward accuracy, margin, ...): whatever the objective logs, by its prefix
        self.last.update({k: v for k, v in d.items() if k.startswith("train_")})
        data = {"step": ev.step, "total_steps": ev.total_steps, **d}
        loss = d.get("train_loss")
        self.event(f"Step {ev.step}/{ev.total_steps}: training loss={loss:.4f}"
                   if isinstance(loss, (int, float)) else f"Step {ev.step}/{ev.total_steps}",
                   type="metrics", data=data)
        self._set_progress(ev.step, ev.total_steps)

    def _on_evaluation(self, ev) -> None:
        d = ev.data
        valid = {k: v for k, v in d.items() if k.startswith("valid_")}
        self.last.update(valid)
        # OpenAI's full_valid_*: the whole validation file, which is what tunelab scores
        data = {"step": ev.step, "total_steps": ev.total_steps, **d,
                **{f"full_{k}": v for k, v in valid.items()}}
        loss = d.get("valid_loss")
        self.event(f"Step {ev.step}/{ev.total_steps}: validation loss={loss:.4f}"
                   if isinstance(loss, (int, float)) else f"Step {ev.step}/{ev.total_steps}",
                   type="metrics", data=data)

    def _on_checkpoint(self, ev) -> None:
        self.keep_checkpoint(Path(ev.data["path"]), int(ev.data.get("step", ev.step)))
        self.event(f"Checkpoint created at step {ev.step}",
                   data={"step": ev.step, "model": checkpoint_name(self.name, ev.step)},
                   kind="checkpoint")

    # ---- outputs ---------------------------------------------------------------------------
    def keep_checkpoint(self, folder: Path, step: int) -> None:
        """A servable copy of a complete checkpoint (hard links: no extra space), registered
        as the model ft:...:ckpt-step-N."""
        name = checkpoint_name(self.name, step)
        if self.store.get(Model, name) is not None or not folder.is_dir():
            return
        dest = job_dir(self.store, self.job.id) / "checkpoints" / f"step-{step}"
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(*_NOT_SERVED))
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)
        metrics = {"step": float(step), **{k: v for k, v in self.last.items() if v is not None}}
        metrics.update({f"full_{k}": v for k, v in self.last.items() if k.startswith("valid_")})
        self.store.add(Model(id=name, kind="checkpoint", owner=self.job.owner, job_id=self.job.id,
                             checkpoint_id=new_id("ftckpt-"), step=step, metrics=metrics,
                             path=self.store.rel(dest)))
        self.prune_checkpoints()

    def prune_checkpoints(self) -> None:
        """Keep the last keep_checkpoints() servable checkpoints, as the hosted API does: a
        30-step job kept 12 before, each a model in the list and a copy of its adapter on disk.
        A checkpoint another job fine-tunes from stays."""
        rows = sorted(self.store.all(Model, Model.job_id == self.job.id,
                                     Model.kind == "checkpoint"), key=lambda m: m.step or 0)
        for m in rows[:-keep_checkpoints()]:
            if self.store.count(Job, Job.model == m.id):
                continue
            self.store.delete(m)
            shutil.rmtree(self.store.path(m.path), ignore_errors=True)

    def forget_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop what the dead attempt
        recorded for them, as metrics.jsonl does."""
        from sqlalchemy import select
        with self.store.session() as s:
            for e in s.scalars(select(Event).where(Event.job_id == self.job.id,
                                                   Event.type == "metrics")):
                if (e.data or {}).get("step", 0) > step:
                    s.delete(e)


def run(store: Store, job: Job, *, worker: str, key_name: str, threads: int | None,
        should_cancel: Callable[[], bool], stopping: Callable[[], bool],
        ray_address: str | None = None) -> None:
    """One attempt at a fine-tuning job: trains (resuming a dead attempt's last complete
    checkpoint) and writes the outcome. Returns when the job is final or handed back.
    `ray_address`: train on that Ray cluster (tunelab.jobs.ray_train) instead of here."""
    from tunelab.config import build_config
    from tunelab.train.events import TrainingCancelled
    from tunelab.train.rundir import RunDir, checkpoint_step

    run_ = JobRun(store, job, key_name, stopping=stopping)
    cfg = build_config(job.request["config"])
    if threads and cfg.threads is None and not ray_address:
        cfg = cfg.model_copy(update={"threads": threads})
    rundir = RunDir(cfg.output_dir)
    done = cfg.output_dir / "result.json"
    if done.exists():   # a worker died after training finished, before recording it
        return _succeed(store, job, run_, worker, cfg, _result_from(done))
    store.update(Job, job.id, started_at=job.started_at or now())
    try:
        if ray_address:   # rank 0 on the cluster records the events, resuming included
            from tunelab.jobs import ray_train
            result = ray_train.train(store, job, cfg, address=ray_address, key_name=key_name,
                                     should_cancel=should_cancel, stopping=stopping)
        else:
            result = _train_here(run_, cfg, rundir, should_cancel)
    except TrainingCancelled as e:
        if e.checkpoint is not None:
            step = checkpoint_step(e.checkpoint)
            run_.keep_checkpoint(Path(e.checkpoint), step)
        if stopping():   # the worker is shutting down: hand the job back, lose nothing
            at = f" at step {step}" if e.checkpoint is not None else ""
            if store.hand_back(job.id, worker):
                run_.event(f"The worker stopped; the job continues from its checkpoint{at} "
                           "when a worker is free", kind="requeued")
            return
        shutil.rmtree(rundir.partial, ignore_errors=True)   # the kept copy is the checkpoint
        if store.finish_job(job.id, worker, "cancelled"):
            kept = f"; the checkpoint at step {step} is kept" if e.checkpoint is not None else ""
            run_.event(f"The job was cancelled{kept}", kind="cancelled")
        return
    except TunelabError as e:
        return fail(store, job, worker, e)
    return _succeed(store, job, run_, worker, cfg, result)


def _train_here(run_: JobRun, cfg, rundir, should_cancel: Callable[[], bool]) -> dict[str, Any]:
    """train() in this process, resuming the last complete checkpoint of a dead attempt."""
    from tunelab.train import train
    from tunelab.train.rundir import checkpoint_step
    ckpts = rundir.checkpoints()
    if ckpts:
        step = checkpoint_step(ckpts[-1])
        run_.forget_after(step)
        run_.event(f"Resuming from the last complete checkpoint (step {step})")
    return train(cfg, resume=bool(ckpts), quiet=True, on_event=run_.on_event,
                 should_cancel=should_cancel).to_json()


def _result_from(path: Path) -> dict[str, Any]:
    import json
    return json.loads(path.read_text(encoding="utf-8"))


def _succeed(store: Store, job: Job, run_: JobRun, worker: str, cfg, result: dict[str, Any]
             ) -> None:
    from tunelab.jobs.uploads import new_file
    out = Path(result["output_dir"])
    served = Path(result["adapter_dir"]) if result.get("adapter_dir") else Path(result["model_dir"])
    files = list(job.result_files or [])
    if not files and (out / "results.csv").exists():
        f = new_file(store, job.owner, f"{job.id}_results.csv", "fine-tune-results",
                     source=out / "results.csv")
        files.append(f.id)
    if store.get(Model, run_.name) is None:
        store.add(Model(id=run_.name, kind="fine_tuned", owner=job.owner, job_id=job.id,
                        path=store.rel(served), metrics=None))
    extra = result.get("extra") or {}
    tokens = extra.get("tokens_seen") or result.get("trained_tokens")
    if store.finish_job(job.id, worker, "succeeded", fine_tuned_model=run_.name,
                        result_files=files, trained_tokens=tokens):
        run_.event(f"New fine-tuned model created: {run_.name}", kind="model_created",
                   data={"model": run_.name})
        run_.event("The job has successfully completed", kind="succeeded")
        # the trainer's checkpoints (optimizer state, for resuming) have no use left; the
        # servable checkpoints are hard links of their weights and stay
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def fail(store: Store, job: Job, worker: str | None, e: BaseException, *,
         code: str | None = None) -> None:
    """Final failure with OpenAI's error object; `param` names the request field at fault."""
    param, message = None, str(e)
    if isinstance(e, TunelabError):
        param, message = _param_of(store, job, e)
    error = {"code": code or ("invalid_" + param.split(".")[0] if param in
                              ("training_file", "validation_file") else "training_failed"),
             "message": message, "param": param}
    if store.finish_job(job.id, worker, "failed", error=error):
        store.add_event(job.id, f"The job failed: {message}", level="error", kind="failed",
                        data={"code": error["code"], "param": param})


def _param_of(store: Store, job: Job, e: TunelabError) -> tuple[str | None, str]:
    """Which request field a training error is about, and its message with server paths
    replaced by the user's file names."""
    from tunelab.jobs.store import File
    message = str(e)
    param = None
    for fld, file_id in (("training_file", job.training_file),
                         ("validation_file", job.validation_file)):
        f = store.get(File, file_id) if file_id else None
        if f is None:
            continue
        # a job with `dedupe` reads the file's copy without duplicates (same line numbers)
        from tunelab.jobs.uploads import deduped_path
        copy = store.rel(deduped_path(store, f)) if f.data_path else None
        for p in filter(None, (copy, f.data_path, f.raw_path)):
            path = str(store.path(p))
            if e.file == path or path in message:
                param = fld
                message = message.replace(path, f.filename)
    if param is None and e.field:
        from tunelab.jobs import spec
        objective = OBJECTIVES[(job.request.get("config") or {}).get("objective", "sft")]
        param = {"train_file": "training_file", "valid_file": "validation_file",
                 "model": "model"}.get(e.field) or \
            spec.request_param(e.field, spec.hyperparameters_param(objective), objective)
    message = message.replace(str(job_dir(store, job.id)), f"<job {job.id}>")
    return param, message
