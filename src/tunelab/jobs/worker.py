"""`tunelab worker`: a process that claims queued jobs and runs them, one at a time.

A claim is a lease in the database that a heartbeat thread renews every second (the same beat
reads the job's cancel flag, so a cancel stops training within about a second). A worker killed
outright stops renewing; once its lease expires, any worker claims the job again and training
resumes from the last complete checkpoint. A job that kills its worker again and again (out of
memory, say) fails after MAX_ATTEMPTS instead of looping. SIGTERM / SIGINT stop a worker
gracefully: training saves a checkpoint, the job goes back to the queue, the worker exits.

Each job runs in a child process forked for it (the worker itself never imports torch): when
the job ends, its memory goes back to the machine. A worker that ran the job in its own
process kept 1.9 GB resident while idle after a SmolLM2 job. The child renews the lease and
reads the cancel flag itself; the worker forwards SIGTERM / SIGINT to it and waits.

With `ray_address` (`tunelab worker --ray ADDRESS`) the job's process trains on that Ray
cluster instead of here (tunelab.jobs.ray_train), and the worker also claims jobs that train on
several workers; one without Ray leaves those to one that has it.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import traceback

from tunelab.jobs.store import FINAL, Job, Store, new_id

log = logging.getLogger("tunelab.worker")

LEASE_SECONDS = float(os.environ.get("TUNELAB_LEASE_SECONDS", "30"))
MAX_ATTEMPTS = 3


class _Heartbeat(threading.Thread):
    def __init__(self, store: Store, job_id: str, worker: str, lease_s: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.store, self.job_id, self.worker, self.lease_s = store, job_id, worker, lease_s
        self.cancel = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        beat = min(1.0, self.lease_s / 4)
        while not self.done.wait(beat):
            try:
                ours, cancel = self.store.renew_lease(self.job_id, self.worker, self.lease_s)
            except Exception:   # a busy database: try again at the next beat
                log.exception("heartbeat of %s", self.job_id)
                continue
            if cancel:
                self.cancel.set()
            if not ours and not self.done.is_set():
                if self._ended():
                    # this process finished the job (succeeded, failed, cancelled) and is
                    # recording it (the "cancelled" event came after finish_job: exiting here
                    # lost it, seen under load in CI): nobody else will claim it
                    return
                # Another worker holds the job now (we stalled past the lease). Writing on into
                # its run folder would corrupt it: stop at once, as a kill would.
                log.error("lost the lease on %s; exiting", self.job_id)
                os._exit(3)

    def _ended(self) -> bool:
        try:
            job = self.store.get(Job, self.job_id)
        except Exception:   # a busy database: treat the lease as lost, as before
            return False
        return job is not None and job.status in FINAL


class Worker:
    def __init__(self, store: Store, *, lease_s: float = LEASE_SECONDS, poll_s: float = 0.5,
                 threads: int | None = None, ray_address: str | None = None):
        self.store, self.lease_s, self.poll_s, self.threads = store, lease_s, poll_s, threads
        self.ray_address = ray_address
        self.id = f"{socket.gethostname()}:{os.getpid()}:{new_id('', 6)}"
        self.stop = threading.Event()
        self.db_quiet = threading.Lock()    # held by each presence beat and by the fork

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            log.info("worker %s: signal %d, stopping after saving a checkpoint", self.id, signum)
            self.stop.set()
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _watch_parent(self, pid: int) -> None:
        """Started by `tunelab serve`: stop (gracefully) when the server is gone."""
        while not self.stop.wait(1.0):
            if os.getppid() != pid:
                log.info("worker %s: the server (pid %d) is gone; stopping", self.id, pid)
                self.stop.set()

    def run_forever(self) -> None:
        log.info("worker %s started (data dir %s)", self.id, self.store.root)
        parent = os.environ.get("TUNELAB_PARENT_PID")
        if parent and parent.isdigit():
            threading.Thread(target=self._watch_parent, args=(int(parent),), daemon=True).start()
        from tunelab.jobs.presence import Presence   # the workers table (GET .../workers)
        self.presence = Presence(self.store, self.id, min(5.0, self.lease_s / 4),
                                 quiet=self.db_quiet, ray_address=self.ray_address)
        self.presence.start()
        try:
            while not self.stop.is_set():
                try:   # on PostgreSQL a lost connection is retried inside the store
                    job = self.store.claim_job(self.id, self.lease_s,
                                               ray=self.ray_address is not None)
                except Exception:
                    log.exception("claiming a job")
                    job = None
                if job is None:
                    self.stop.wait(self.poll_s)
                    continue
                self.presence.set_job(job.id)
                self.run_job(job)
                self.presence.set_job(None)
        finally:
            self.presence.stop()

    def run_job(self, job: Job) -> None:
        """Run the job in a child process; return when it has ended."""
        import multiprocessing
        child = multiprocessing.get_context("fork").Process(
            target=self._run_child, args=(job,), name=f"tunelab-job-{job.id}", daemon=False)
        # SQLite keeps per-process lock bookkeeping that a fork copies: a child forked while
        # the presence thread held a write lock saw the database locked for good (60 s, then
        # the job failed). No database call of this process is in flight during the fork.
        with self.db_quiet:
            child.start()
        forwarded = False
        while child.is_alive():
            if self.stop.is_set() and not forwarded:   # the child saves and hands the job back
                os.kill(child.pid, signal.SIGTERM)
                forwarded = True
            child.join(0.2)
        if child.exitcode != 0:   # killed (out of memory?): the lease lapses, a worker retries
            log.error("job %s: its process ended with code %s", job.id, child.exitcode)

    def _run_child(self, job: Job) -> None:
        """The job's process: it dies with the worker (a killed worker is a killed job, whose
        lease then lapses), a fresh database pool (never the parent's connections), its own
        signal handlers, then the job."""
        _die_with_parent()
        self.store.engine.dispose(close=False)
        self.stop = threading.Event()
        self.install_signal_handlers()
        self._run_job_here(job)

    def _run_job_here(self, job: Job) -> None:
        from tunelab.jobs import finetune
        beat = _Heartbeat(self.store, job.id, self.id, self.lease_s)
        beat.start()
        log.info("worker %s: running %s (attempt %d)", self.id, job.id, job.attempts)
        try:
            if job.cancel_requested:
                if self.store.finish_job(job.id, self.id, "cancelled"):
                    self.store.add_event(job.id, "The job was cancelled", kind="cancelled")
                return
            if job.attempts > MAX_ATTEMPTS:
                return finetune.fail(self.store, job, self.id, RuntimeError(
                    f"the worker running this job stopped {job.attempts - 1} times without "
                    "finishing it (killed, or out of memory?)"), code="worker_lost")
            if job.attempts > 1:
                self.store.add_event(job.id, "A worker picked the job up again after its "
                                     "previous worker stopped responding", level="warn",
                                     kind="resumed")
            key_name = self.store.key_name(job.owner)
            should_cancel = lambda: beat.cancel.is_set() or self.stop.is_set()  # noqa: E731
            if job.kind == "evaluation":
                from tunelab.jobs import evaluation
                evaluation.run(self.store, job, worker=self.id, should_cancel=should_cancel,
                               stopping=self.stop.is_set)
            else:
                finetune.run(self.store, job, worker=self.id, key_name=key_name,
                             threads=self.threads, should_cancel=should_cancel,
                             stopping=self.stop.is_set, ray_address=self.ray_address)
        except Exception as e:   # a bug or a library failure: the job fails, the worker lives
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            if _is_user_error(e):
                finetune.fail(self.store, job, self.id, e)
            else:
                finetune.fail(self.store, job, self.id, RuntimeError(f"{type(e).__name__}: {e}"),
                              code="server_error")
        finally:
            beat.done.set()
            beat.join(timeout=5)


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux's PR_SET_PDEATHSIG); elsewhere, a
    thread that notices the parent is gone."""
    parent = os.getppid()
    try:
        import ctypes
        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() == parent:     # not already orphaned before prctl took effect
                return
            os._exit(1)
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == parent:
            threading.Event().wait(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _is_user_error(e: BaseException) -> bool:
    from tunelab.errors import TunelabError
    return isinstance(e, TunelabError)


def main(data_dir: str | None = None, *, threads: int | None = None,
         lease_s: float = LEASE_SECONDS, database: str | None = None,
         ray_address: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tunelab.cli_data import quiet_libraries
    quiet_libraries()
    if ray_address:   # a missing Ray is said now, not at the first job (the worker itself
        import importlib.util   # never imports it: its job processes connect)
        if importlib.util.find_spec("ray") is None:
            from tunelab.errors import TunelabError
            raise TunelabError("--ray needs Ray Train: pip install 'ray[train]'", field="ray")
    w = Worker(Store(data_dir, database), lease_s=lease_s, threads=threads,
               ray_address=ray_address)
    w.install_signal_handlers()
    w.run_forever()
    log.info("worker %s stopped", w.id)
