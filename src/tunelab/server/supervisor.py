"""The job workers `tunelab serve --workers N` starts: subprocesses (training never runs in the
API process), restarted when one dies, stopped gracefully with the server (SIGTERM: training
saves a checkpoint and hands its job back), and taken down with it if the server is killed."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("tunelab.server")
STOP_GRACE_S = 60       # a worker saving a checkpoint before it exits


class Supervisor:
    def __init__(self, n: int, data_dir: Path, *, threads: int | None, logs: Path,
                 env: dict[str, str] | None = None, ray_address: str | None = None):
        self.n, self.data_dir, self.threads, self.logs = n, data_dir, threads, logs
        self.ray_address = ray_address     # the workers train jobs on this Ray cluster
        # a worker stops by itself (gracefully) when this process is gone
        self.env = {**os.environ, **(env or {}), "TUNELAB_PARENT_PID": str(os.getpid())}
        self.procs: list[subprocess.Popen | None] = [None] * n
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="supervisor")

    def _start(self, i: int) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tunelab.cli", "worker", "--data-dir", str(self.data_dir)]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.ray_address:
            cmd += ["--ray", self.ray_address]
        with (self.logs / f"worker-{i}.log").open("ab") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                 stdin=subprocess.DEVNULL,
                                 start_new_session=True)   # a terminal's Ctrl-C reaches us only
        log.info("worker %d started (pid %d, log %s)", i, p.pid, self.logs / f"worker-{i}.log")
        return p

    def start(self) -> None:
        for i in range(self.n):
            self.procs[i] = self._start(i)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for i, p in enumerate(self.procs):
                if p is not None and p.poll() is not None and not self._stop.is_set():
                    log.warning("worker %d (pid %d) exited with %s; starting another", i, p.pid,
                                p.returncode)
                    time.sleep(1.0)
                    self.procs[i] = self._start(i)

    def stop(self) -> None:
        self._stop.set()
        alive = [p for p in self.procs if p is not None and p.poll() is None]
        for p in alive:
            p.send_signal(signal.SIGTERM)
        deadline = time.time() + STOP_GRACE_S
        for p in alive:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.poll() is None]
