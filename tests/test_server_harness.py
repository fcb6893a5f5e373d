"""Helpers for the server tests: a real `tunelab serve` (uvicorn, its worker subprocesses) on a
free 127.0.0.1 port, keys made by the real `tunelab keys create`, and the official openai
client. (No tests here.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import openai

CLI = [sys.executable, "-m", "tunelab.cli"]
LEASE_S = "3"    # a killed worker's job is noticed within seconds


def env(**extra) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "TOKENIZERS_PARALLELISM": "false", "TUNELAB_LEASE_SECONDS": LEASE_S, **extra}


def make_key(data_dir: Path, name: str) -> str:
    proc = subprocess.run([*CLI, "keys", "create", name, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip()
    assert key.startswith("tl-") and "shown only now" in proc.stderr
    return key


def wait_for(fn, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Server:
    """`tunelab serve --port 0` in a subprocess; the URL comes from the line it prints."""

    def __init__(self, data_dir: Path, *args: str, **env_extra: str):
        self.data_dir = data_dir
        self.log = open(data_dir / f"serve-{time.time_ns()}.log", "wb")
        self.proc = subprocess.Popen([*CLI, "serve", "--port", "0", "--data-dir", str(data_dir),
                                      *args], stdout=subprocess.PIPE, stderr=self.log,
                                     env=env(**env_extra), text=True)
        self.url = self._read_url()
        self.base_url = self.url + "/v1"
        wait_for(self._ready, 60, what="the server to answer")

    def _read_url(self) -> str:
        found: list[str] = []

        def read():
            for line in self.proc.stdout:
                if "serving http://" in line and not found:
                    found.append(line.split("serving ", 1)[1].split()[0])
        threading.Thread(target=read, daemon=True).start()
        return wait_for(lambda: found[0] if found else self._died(), 90, what="the URL line")

    def _died(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"tunelab serve exited {self.proc.returncode}: {self.logs()}")
        return None

    def _ready(self) -> bool:
        self._died()
        try:
            return httpx.get(self.url + "/v1/tunelab/info", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def client(self, key: str | None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key or "none", max_retries=0,
                             timeout=60)

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def start_worker(data_dir: Path, **extra_env: str) -> subprocess.Popen:
    log = open(data_dir / f"worker-{time.time_ns()}.log", "wb")
    return subprocess.Popen([*CLI, "worker", "--data-dir", str(data_dir)], stdout=log,
                            stderr=subprocess.STDOUT, env=env(**extra_env))


def poll_job(client: openai.OpenAI, job_id: str, until=("succeeded", "failed", "cancelled"),
             timeout: float = 120):
    def done():
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in until else None
    return wait_for(done, timeout, 0.3, what=f"{job_id} to reach {until}")


def tiny_training(**over) -> dict:
    """tunelab options that make a job on the tiny model take seconds."""
    return {"method": "lora", "lora": {"r": 4, "alpha": 8}, "max_steps": 6, "max_length": 64,
            "logging_steps": 1, "eval_steps": 3, "precision": "fp32", **over}
