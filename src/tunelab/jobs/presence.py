"""A worker's row in the `workers` table: registered when it starts, refreshed every few seconds
with what it runs (GET /v1/tunelab/workers lists the live ones), deleted when it stops cleanly.

A thread of the worker process (never of a job's child): it beats whether the worker is idle or
waiting on a job. A database that is down only delays the beats (the store retries them).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from typing import Any

from tunelab.jobs.store import Store

log = logging.getLogger("tunelab.worker")


def resources() -> dict[str, Any]:
    """What this host offers a job: cores this process may use, physical memory, GPUs
    (from nvidia-smi, without importing torch)."""
    from tunelab.runtime import available_cores
    out: dict[str, Any] = {"cpus": available_cores()}
    try:
        out["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        out["memory_bytes"] = None
    gpus: list[dict[str, Any]] = []
    if shutil.which("nvidia-smi"):
        try:
            res = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10)
            for line in res.stdout.strip().splitlines():
                name, _, mib = line.rpartition(",")
                gpus.append({"name": name.strip(),
                             "memory_bytes": int(float(mib)) * 2**20 if mib.strip() else None})
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    out["gpus"] = gpus
    return out


class Presence(threading.Thread):
    def __init__(self, store: Store, worker: str, interval_s: float,
                 quiet: threading.Lock | None = None, ray_address: str | None = None):
        super().__init__(daemon=True, name="worker-presence")
        self.store, self.worker, self.interval_s = store, worker, interval_s
        self.ray_address = ray_address     # its jobs train on that Ray cluster
        self.quiet = quiet or threading.Lock()   # the worker forks a job only outside a beat
        self.job_id: str | None = None
        self.done = threading.Event()
        self._changed = threading.Event()

    def set_job(self, job_id: str | None) -> None:
        self.job_id = job_id
        self._changed.set()          # shown at once, not at the next beat

    def run(self) -> None:
        res = resources()
        if self.ray_address:
            res["ray"] = self.ray_address
        first = True
        while not self.done.is_set():
            try:
                with self.quiet:
                    self.store.worker_beat(self.worker, job_id=self.job_id,
                                           resources=res if first else None)
                first = False
            except Exception:         # down past the store's retries: the next beat tries again
                log.exception("worker heartbeat")
            self._changed.wait(self.interval_s)
            self._changed.clear()

    def stop(self) -> None:
        self.done.set()
        self._changed.set()
        self.join(timeout=10)
        try:
            self.store.worker_gone(self.worker)
        except Exception:
            log.exception("removing worker %s", self.worker)
