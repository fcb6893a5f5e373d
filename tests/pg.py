"""A real PostgreSQL server for the tests: the machine's initdb / pg_ctl / postgres (on PATH),
run as an unprivileged user (PostgreSQL refuses root) in a temp dir, on a free port of
127.0.0.1. One per test session (conftest's `postgres` fixture); each test takes a fresh
database from it."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "tunelab-pg"


def available() -> str | None:
    """None if a server can be started here, else why not."""
    missing = [b for b in ("initdb", "pg_ctl", "postgres") if shutil.which(b) is None]
    if missing:
        return f"PostgreSQL binaries not on PATH: {', '.join(missing)}"
    if os.geteuid() != 0 and not os.access(tempfile.gettempdir(), os.W_OK):
        return "no writable temp dir"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:           # root: run everything as USER (created if missing)
            try:
                pwd.getpwnam(USER)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                                "/usr/sbin/nologin", USER], check=True, capture_output=True)
            shutil.chown(self.dir, USER, USER)
            self.as_user = ["runuser", "-u", USER, "--"]
        self._n = 0
        self.host = "127.0.0.1"         # tests/netns.py puts it on a host of its own
        self.trusted: str | None = None  # a subnet (CIDR) whose clients may connect too

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *cmd], check=check, capture_output=True,
                              text=True, timeout=120)

    def start(self) -> "Postgres":
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync")
            if self.trusted:
                with open(self.data / "pg_hba.conf", "a") as f:
                    f.write(f"host all all {self.trusted} trust\n")
        opts = (f"-p {self.port} -c listen_addresses={self.host} -k {self.dir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        proc = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts,
                         "-w", "-t", "60", "start", check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {proc.stderr}\n{self.log()[-2000:]}")
        return self

    def log(self) -> str:
        try:
            return (self.dir / "log").read_text()
        except OSError:
            return ""

    def restart(self) -> float:
        """pg_ctl restart (fast shutdown: every connection is cut); seconds it took."""
        t = time.monotonic()
        # the options of the first start are kept (postmaster.opts)
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-m", "fast",
                  "-w", "-t", "60", "restart")
        return time.monotonic() - t

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{db}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL (postgresql://, as a user writes it)."""
        import psycopg
        self._n += 1
        name = f"t{os.getpid()}_{self._n}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
