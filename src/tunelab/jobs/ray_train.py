"""Fine-tuning jobs on a Ray cluster (`tunelab worker --ray ADDRESS`, `serve --ray`).

The tunelab worker still claims the job and holds its lease; the job's process (forked by the
worker, as without Ray) becomes a Ray driver and runs the training under Ray Train's
`TorchTrainer`: Ray places `workers` training processes on nodes that have the CPUs, GPUs and
memory each asks for (tunelab.jobs.placement), sets up torch.distributed between them (gloo on
CPU, NCCL on GPU) and sets RANK / WORLD_SIZE / LOCAL_RANK, so each process runs tunelab's own
`train()` as one DDP rank would under torchrun. Nothing else about training differs: the same
plan (the global batch is split over the ranks), the same checkpoints, the same events.

Every Ray node mounts the data dir at the same path (as every tunelab worker host does): the
run folder, its checkpoints and Ray's own run state (RunConfig(storage_path) = <data>/jobs, one
Ray run per job, named by its id) live there. Rank 0 reports each complete tunelab checkpoint
to Ray in place (`ray.train.report(checkpoint=..., NO_UPLOAD)`: no copy); when a training
process or its node dies, Ray's FailureConfig restarts the group, and the restarted ranks find
that checkpoint (`ray.train.get_checkpoint()`) and resume from it.

Rank 0 writes the job's events, progress and servable checkpoints straight to the job store,
through the same JobRun a local job uses; the driver keeps the lease and writes the outcome.
A cancel (or a worker shutdown) reaches the ranks through a flag file in the job's folder,
which every rank reads each optimizer step (train()'s should_cancel, already agreed across
ranks): they save a checkpoint at the same step and stop.

What ends a Ray job, never leaving it `running`:
- success, cancel, worker shutdown (handed back to the queue, resumed later);
- a training error that Ray's restarts do not cure (after `max_failures`): failed, with the
  error the rank raised (a TunelabError keeps its field);
- a cluster that cannot place the job: at once when its nodes could never hold it, else after
  TUNELAB_RAY_CAPACITY_WAIT_S (120) seconds of waiting for lost nodes to return. A job that
  only waits for busy resources waits as long as it takes.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import TunelabError
from tunelab.jobs.placement import Placement
from tunelab.jobs.store import Job, Store

log = logging.getLogger("tunelab.jobs")

# restarts of the training group after a failure (a lost node, a crashed rank), each from the
# last checkpoint, before the job fails
MAX_FAILURES = int(os.environ.get("TUNELAB_RAY_MAX_FAILURES", "2"))
CAPACITY_WAIT_S = float(os.environ.get("TUNELAB_RAY_CAPACITY_WAIT_S", "120"))
CANCEL_WAIT_S = float(os.environ.get("TUNELAB_RAY_CANCEL_WAIT_S", "300"))
STOP_FLAG = "stop"          # <job dir>/ray/stop: "cancel" or "stop"
_ENV_PASSED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "TUNELAB_CACHE")


class RayUserError(Exception):
    """A TunelabError raised on a rank, in a form that survives pickling back to the driver."""

    def __init__(self, payload: dict[str, Any]):
        super().__init__(payload)
        self.payload = payload

    def __str__(self) -> str:
        return str(self.payload.get("message"))


def _import_ray():
    try:
        import ray
        import ray.train  # noqa: F401
        return ray
    except ImportError:
        raise TunelabError("--ray needs Ray Train on this host and on every Ray node: "
                           "pip install 'ray[train]' (make setup installs it)") from None


def connect(address: str) -> None:
    """This process becomes a driver of the Ray cluster at `address` (once)."""
    ray = _import_ray()
    if ray.is_initialized():
        return
    env = {"TOKENIZERS_PARALLELISM": "false",
           **{k: os.environ[k] for k in _ENV_PASSED if k in os.environ}}
    try:
        ray.init(address=address, namespace="tunelab", log_to_driver=False,
                 runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise TunelabError(f"cannot reach the Ray cluster at {address}: {_first_line(e)} (a "
                           "cluster with token authentication, Ray's default, needs "
                           "RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or "
                           "~/.ray/auth_token on this host)") from None


def nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes: address and total resources."""
    import ray
    return [{"address": n.get("NodeManagerAddress"), "resources": n.get("Resources") or {}}
            for n in ray.nodes() if n.get("Alive")]


def fits(placement: Placement, offered: list[dict[str, float]]) -> bool:
    """Whether `placement`'s workers fit into nodes offering these resources."""
    bundle = placement.bundle()
    room = 0
    for res in offered:
        room += min(math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())
    return room >= placement.workers


def describe(placement: Placement) -> str:
    parts = [f"{placement.cpus_per_worker} CPU"]
    if placement.gpus_per_worker:
        parts.append(f"{placement.gpus_per_worker} GPU")
    if placement.memory_per_worker_gb:
        parts.append(f"{placement.memory_per_worker_gb:g} GiB")
    return (f"{placement.workers} worker{'s' if placement.workers > 1 else ''} of "
            f"{' + '.join(parts)}")


def _offer(node: dict[str, Any]) -> str:
    r = node["resources"]
    gib = r.get("memory", 0) / 2**30
    gpu = f", {r['GPU']:g} GPU" if r.get("GPU") else ""
    return f"{node['address']} ({r.get('CPU', 0):g} CPU{gpu}, {gib:.1f} GiB)"


class _Driver:
    """One job's runs on the cluster, from the job's process."""

    def __init__(self, store: Store, job: Job, cfg, *, address: str, key_name: str,
                 should_cancel: Callable[[], bool], stopping: Callable[[], bool], event):
        self.store, self.job, self.cfg, self.address = store, job, cfg, address
        self.key_name, self.should_cancel, self.stopping = key_name, should_cancel, stopping
        self.event = event
        self.placement = Placement.from_json((job.request or {}).get("placement"))
        self.flag = Path(cfg.output_dir).parent / "ray" / STOP_FLAG

    # -- capacity ------------------------------------------------------------------------------
    def wait_for_capacity(self) -> None:
        """Return once the cluster's alive nodes could hold the job; raise after
        CAPACITY_WAIT_S without, or at once when asked to stop."""
        deadline, said = time.monotonic() + CAPACITY_WAIT_S, False
        while True:
            alive = nodes()
            if fits(self.placement, [n["resources"] for n in alive]):
                return
            self._interrupted(None)
            if time.monotonic() > deadline:
                offered = "; ".join(_offer(n) for n in alive) or "no alive node"
                raise TunelabError(
                    f"the Ray cluster at {self.address} cannot place this job "
                    f"({describe(self.placement)}): its alive nodes offer {offered}",
                    field="workers" if self.placement.workers > 1 else None)
            if not said:
                self.event("Waiting for the Ray cluster to have room for "
                           f"{describe(self.placement)}", level="warn", kind="waiting")
                said = True
            time.sleep(1.0)

    def busy(self) -> bool:
        """Whether the cluster's free resources are short of the job's (others use them)."""
        import ray
        return not fits(self.placement, [ray.available_resources()])

    def _interrupted(self, step: int | None) -> None:
        """Between runs on the cluster: a cancel or a shutdown ends the attempt now."""
        if self.should_cancel() or self.stopping():
            from tunelab.train.events import TrainingCancelled
            from tunelab.train.rundir import RunDir
            ckpts = RunDir(self.cfg.output_dir).checkpoints()
            raise TrainingCancelled(step or 0, ckpts[-1] if ckpts else None)

    # -- one run -------------------------------------------------------------------------------
    def trainer(self):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        p = self.placement
        config = {"data_dir": str(self.store.root), "database": self.store.url,
                  "job_id": self.job.id, "key_name": self.key_name,
                  "config": self.cfg.model_dump(mode="json"), "threads": p.cpus_per_worker,
                  "flag": str(self.flag)}
        return TorchTrainer(
            _train_loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=p.workers, use_gpu=p.gpus_per_worker > 0,
                                         resources_per_worker=p.bundle()),
            run_config=RunConfig(
                name=self.job.id, storage_path=str(self.store.path("jobs")),
                # worker-group failures are Ray's to retry, from the last checkpoint; a group
                # that cannot be placed comes back here (wait_for_capacity)
                failure_config=FailureConfig(max_failures=MAX_FAILURES,
                                             controller_failure_limit=0),
                checkpoint_config=CheckpointConfig(num_to_keep=None)))   # tunelab rotates

    def fit(self):
        """Run the trainer in a thread (fit() wants the main thread's SIGINT otherwise) while
        this one passes a cancel or a shutdown on to the ranks. Returns rank 0's value or
        raises fit()'s error."""
        trainer = self.trainer()
        box: dict[str, Any] = {}

        def target():
            try:
                box["result"] = trainer.fit()
            except BaseException as e:   # noqa: BLE001 - handed to the caller
                box["error"] = e
        thread = threading.Thread(target=target, daemon=True, name=f"ray-fit-{self.job.id}")
        thread.start()
        flagged_at = None
        while thread.is_alive():
            thread.join(0.5)
            if flagged_at is None and (self.stopping() or self.should_cancel()):
                self.flag.parent.mkdir(parents=True, exist_ok=True)
                self.flag.write_text("stop" if self.stopping() else "cancel")
                flagged_at = time.monotonic()
            elif flagged_at is not None and time.monotonic() - flagged_at > CANCEL_WAIT_S:
                # the ranks did not stop (still being placed, or stuck): leave the run; it
                # ends with this process, which owns it
                log.warning("job %s: the Ray run did not stop within %.0fs of the request",
                            self.job.id, CANCEL_WAIT_S)
                self._interrupted(None)
        if "error" in box:
            raise box["error"]
        return box["result"].return_value

    def run(self) -> dict[str, Any]:
        connect(self.address)
        from ray.train import ControllerError, WorkerGroupError
        from tunelab.train.events import TrainingCancelled
        tries = 0
        while True:
            self.wait_for_capacity()
            self._interrupted(None)
            self.flag.unlink(missing_ok=True)   # a previous attempt's shutdown is over
            self.event(f"Training on the Ray cluster at {self.address}: "
                       f"{describe(self.placement)}",
                       data={"ray": {"address": self.address, **self.placement.to_json()}},
                       kind="placed")
            try:
                out = self.fit()
            except ControllerError as e:
                # the group could not be (re)started: its placement timed out (the cluster is
                # busy, or lost the nodes it had: back to waiting for room, up to
                # CAPACITY_WAIT_S), or its processes failed to start (counted: a few tries)
                cause = getattr(e, "controller_failure", e)
                log.warning("job %s: %s", self.job.id, cause)
                if not (type(cause).__name__ == "WorkerGroupStartupTimeoutError"
                        and self.busy()):
                    tries += 1
                if tries > MAX_FAILURES:
                    raise TunelabError(f"the Ray cluster could not start this job's training "
                                       f"workers ({tries} tries): {_first_line(cause)}") \
                        from None
                self.event("The Ray cluster could not start the training workers "
                           f"({_first_line(cause)[:300]}); trying again", level="warn",
                           kind="retrying")
                continue
            except WorkerGroupError as e:
                raise _failure(e) from None
            if out is None:
                raise TunelabError("the Ray run ended without a result from rank 0")
            if "cancelled" in out:
                ckpt = out.get("checkpoint")
                raise TrainingCancelled(int(out["cancelled"]), Path(ckpt) if ckpt else None)
            return out["result"]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def _failure(e) -> TunelabError:
    """fit()'s WorkerGroupError (Ray's restarts ran out) -> the job's error."""
    failures = getattr(e, "worker_failures", {}) or {}
    for rank in sorted(failures):
        err = failures[rank]
        if isinstance(err, RayUserError):
            p = err.payload
            return TunelabError(p["reason"], file=p.get("file"), line=p.get("line"),
                                field=p.get("field"))
    what = "; ".join(f"rank {r}: {_first_line(failures[r])}" for r in sorted(failures)) \
        or _first_line(e)
    return TunelabError(f"training failed on the Ray cluster after {MAX_FAILURES} restart"
                        f"{'s' if MAX_FAILURES != 1 else ''} from the last checkpoint: {what}")


def train(store: Store, job: Job, cfg, *, address: str, key_name: str,
          should_cancel: Callable[[], bool], stopping: Callable[[], bool]) -> dict[str, Any]:
    """Train `job` on the cluster; returns train()'s result (as JSON), raises
    TrainingCancelled (cancel or shutdown) or TunelabError (the job fails with it)."""
    def event(message: str, **kw) -> None:
        store.add_event(job.id, message, **kw)
    return _Driver(store, job, cfg, address=address, key_name=key_name,
                   should_cancel=should_cancel, stopping=stopping, event=event).run()


# -- on each Ray training worker ------------------------------------------------------------------

def _report_callback():
    """A Trainer callback: each committed checkpoint is reported to Ray where it lies, by rank
    0 (every rank calls report, which is a barrier; the callback runs on every rank)."""
    from transformers import TrainerCallback

    class ReportCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import ray.train
            from ray.train import Checkpoint
            from ray.train.v2.api.report_config import CheckpointUploadMode
            step = state.global_step
            path = Path(args.output_dir) / f"checkpoint-{step}"
            mine = Checkpoint.from_directory(str(path)) \
                if ray.train.get_context().get_world_rank() == 0 and path.is_dir() else None
            ray.train.report({"step": step}, checkpoint=mine,
                             checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
    return ReportCheckpoints()


def _train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """One rank: tunelab's train() under the process group Ray set up."""
    import ray.train
    from tunelab.config import build_config
    from tunelab.jobs.finetune import JobRun
    from tunelab.train import train as tunelab_train
    from tunelab.train.events import TrainingCancelled
    from tunelab.train.rundir import RunDir, checkpoint_step

    rank = ray.train.get_context().get_world_rank()
    cfg = build_config(config["config"])
    if cfg.threads is None:    # the cores Ray reserved for this worker, not the node's
        cfg = cfg.model_copy(update={"threads": int(config["threads"])})
    flag = Path(config["flag"])
    rundir = RunDir(cfg.output_dir)
    ckpts = rundir.checkpoints()
    on_event = None
    if rank == 0:
        store = Store(config["data_dir"], config["database"])
        job = store.get(Job, config["job_id"])
        run_ = JobRun(store, job, config["key_name"], stopping=lambda: False)
        if ckpts:   # a restart by Ray (FailureConfig), or a new attempt at the job
            step = checkpoint_step(ckpts[-1])
            run_.forget_after(step)
            # Ray's latest: the last checkpoint its controller registered (it collects reports
            # every few seconds, so it may lag the run folder's, which is whole: resume there)
            known = ray.train.get_checkpoint()
            run_.event(f"Resuming from the last complete checkpoint (step {step})",
                       data={"step": step, "ray_checkpoint": known.path if known else None})
        on_event = run_.on_event
    try:
        result = tunelab_train(cfg, resume=bool(ckpts), quiet=True, on_event=on_event,
                               should_cancel=flag.exists, callbacks=[_report_callback()])
    except TrainingCancelled as e:
        return {"cancelled": e.step, "checkpoint": str(e.checkpoint) if e.checkpoint else None}
    except TunelabError as e:
        raise RayUserError({"reason": e.reason, "file": e.file, "line": e.line,
                            "field": e.field, "message": str(e)}) from None
    return {"result": result.to_json()} if rank == 0 else None
