"""The platform's state: one database through SQLAlchemy 2, files under the data dir.

SQLite (the default, `<data dir>/tunelab.db`) or PostgreSQL (`--database postgresql://...`,
or $TUNELAB_DATABASE_URL; the driver is psycopg 3) for workers on several hosts that mount the
same data dir. Paths are stored relative to the data dir, so a data dir can move.

The schema is versioned with Alembic (jobs/migrations): a Store upgrades its database to the
head on start, stamps a database made before Alembic in place, and refuses one newer than
itself (a TunelabError naming both revisions).

Concurrency: the API process and every worker write here. On PostgreSQL a worker claims the
oldest claimable job with `SELECT ... FOR UPDATE SKIP LOCKED` (claimers never wait on each
other, never get the same row). On SQLite it claims with one conditional UPDATE (`... WHERE
id = :id AND status = 'queued'`) and counts the rows it changed. Either way it then renews a
lease on the job while it runs; a job whose lease expired belongs to a dead worker and is
claimed again. On SQLite every transaction starts with BEGIN IMMEDIATE: a deferred transaction
that reads and then writes can fail at once with "database is locked" when another process
wrote in between, whatever the busy timeout. On PostgreSQL a lost connection (the server
restarted) is retried for up to `retry_s` seconds: pooled connections are pinged before use.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import secrets
import socket
import sqlite3
import string
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, Boolean, Float, Integer, String, Text, create_engine, delete, event,
                        func, inspect, select, text, update)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab.store")
START_RETRY_S = 10.0          # a Store waits this long for its database to answer at start
SCHEMA_HEAD = "0003"          # the newest revision under jobs/migrations/versions
MIGRATIONS = Path(__file__).parent / "migrations"

LOCAL_OWNER = "local"          # the owner of everything under --no-auth
ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def now() -> int:
    return int(time.time())


def data_home(data_dir: str | Path | None = None) -> Path:
    """--data-dir, else $TUNELAB_HOME, else ~/.tunelab."""
    root = data_dir or os.environ.get("TUNELAB_HOME") or Path.home() / ".tunelab"
    return Path(root).expanduser().resolve()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Key(Base):
    __tablename__ = "keys"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)   # sha256 of the key, hex
    prefix: Mapped[str] = mapped_column(String(16))               # shown by `keys list`
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    revoked_at: Mapped[int | None] = mapped_column(Integer, nullable=True)


class File(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    owner: Mapped[str] = mapped_column(String(40), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    status: Mapped[str] = mapped_column(String(16), default="uploaded")
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    raw_path: Mapped[str] = mapped_column(String(500))                      # as uploaded
    data_path: Mapped[str | None] = mapped_column(String(500), nullable=True)  # chat JSONL


class Job(Base):
    """A fine-tuning job (kind "fine_tune") or an evaluation (kind "evaluation")."""
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    owner: Mapped[str] = mapped_column(String(40), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    started_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model: Mapped[str] = mapped_column(String(500))          # as requested (a model id)
    base_spec: Mapped[str] = mapped_column(String(1000))     # what tunelab.models loads
    training_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(Integer, default=42)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # what the job needs
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # training processes asked for (placement "workers"; NULL: one): only a worker with Ray
    # claims a job that needs several
    train_workers: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Event(Base):
    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Model(Base):
    """A servable fine-tuned model: a job's output (kind "fine_tuned") or one of its
    checkpoints (kind "checkpoint", with checkpoint_id, step and metrics)."""
    __tablename__ = "models"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(1100), unique=True)   # the model name (ft:...)
    kind: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(40), index=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    checkpoint_id: Mapped[str | None] = mapped_column(String(40), nullable=True, unique=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    path: Mapped[str] = mapped_column(String(500))      # relative to the data dir
    created_at: Mapped[int] = mapped_column(Integer, default=now)


class Worker(Base):
    """A worker process, refreshed with its heartbeat (GET /v1/tunelab/workers)."""
    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float, index=True)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    resources: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


def _claimable(t: float, ray: bool):
    """Jobs a worker may take: queued, or running on a lease that ran out; without Ray, only
    jobs that train in one process."""
    cond = (Job.status == "queued") | ((Job.status == "running") & (Job.lease_expires_at < t))
    if not ray:
        cond = cond & (Job.train_workers.is_(None) | (Job.train_workers <= 1))
    return cond


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def schema_revision(conn: Connection) -> str | None:
    """The Alembic revision a database is at (None: no alembic_version table)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine) -> None:
    """Bring the database to SCHEMA_HEAD, in one transaction that one process at a time runs
    (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock): a new database is created, one
    made before Alembic (the tables without alembic_version) is stamped at 0001 and upgraded
    with its rows, and one newer than this tunelab is refused."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7323140014)"))
        current = schema_revision(conn)
        if current == SCHEMA_HEAD:
            return
        from alembic import command
        from alembic.config import Config
        from alembic.script import ScriptDirectory
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        known = {r.revision for r in ScriptDirectory.from_config(cfg).walk_revisions()}
        if current is not None and current not in known:
            raise TunelabError(
                f"the database {shown_url(str(engine.url))} is at schema revision {current!r}, "
                f"newer than this tunelab knows (its newest is {SCHEMA_HEAD!r}): it was "
                "upgraded by a newer tunelab; run that version, or upgrade this one",
                field="database")
        if current is None and inspect(conn).has_table("jobs"):
            log.info("stamping a database made before schema versions at revision 0001")
            command.stamp(cfg, "0001")
        log.info("upgrading the database schema from %s to %s", current or "nothing",
                 SCHEMA_HEAD)
        command.upgrade(cfg, "head")


def database_url(url: str | None, root: Path) -> str:
    """The SQLAlchemy URL for --database / $TUNELAB_DATABASE_URL (default: SQLite in the data
    dir). `postgresql://` and `postgres://` get the psycopg 3 driver."""
    url = url or os.environ.get("TUNELAB_DATABASE_URL") or f"sqlite:///{root / 'tunelab.db'}"
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            url = "postgresql+psycopg://" + url[len(plain):]
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise TunelabError(f"not a database URL: {shown_url(url)!r} (expected "
                           "postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///PATH)",
                           field="database") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise TunelabError(f"unsupported database {parsed.get_backend_name()!r}: tunelab "
                           "runs on sqlite:/// or postgresql://", field="database")
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "psycopg":
        raise TunelabError(f"the PostgreSQL driver is psycopg (postgresql+psycopg://), got "
                           f"{parsed.get_driver_name()!r}", field="database")
    return url


def shown_url(url: str) -> str:
    """A URL fit for logs: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("@")[-1]


def transient(e: BaseException) -> bool:
    """A lost or refused connection (the database restarting), worth retrying."""
    return isinstance(e, OperationalError) or (isinstance(e, DBAPIError) and
                                               bool(e.connection_invalidated))


def _retried(method: Callable) -> Callable:
    """Store methods on PostgreSQL: a lost connection is retried (with a fresh one) for up to
    store.retry_s seconds, so a database restart costs a pause, not a job. SQLite's errors are
    never retried here (its busy timeout already waits for locks)."""
    @functools.wraps(method)
    def wrapper(self: "Store", *args, **kwargs):
        local = self._retrying          # per thread: an outer call already retries
        if self.engine.dialect.name == "sqlite" or getattr(local, "on", False):
            return method(self, *args, **kwargs)
        start = time.monotonic()
        deadline, pause = start + getattr(local, "budget", self.retry_s), 0.1
        failed = False
        while True:
            try:
                local.on = True
                out = method(self, *args, **kwargs)
                if failed:
                    log.warning("database reachable again after %.1fs (%s)",
                                time.monotonic() - start, method.__name__)
                return out
            except DBAPIError as e:
                if not transient(e) or time.monotonic() + pause > deadline:
                    raise
                if not failed:
                    log.warning("database unreachable (%s); retrying for up to %.0fs",
                                str(e.orig).splitlines()[0] if e.orig else e,
                                deadline - start)
                failed = True
                time.sleep(pause)
                pause = min(1.0, pause * 2)
            finally:
                local.on = False
    return wrapper


class Store:
    """The database and the data dir. Objects come back detached (read their fields freely)."""

    def __init__(self, data_dir: str | Path | None = None, url: str | None = None, *,
                 retry_s: float | None = None):
        self.root = data_home(data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = database_url(url, self.root)
        self.retry_s = float(os.environ.get("TUNELAB_DATABASE_RETRY_S", "60")) \
            if retry_s is None else retry_s
        self._retrying = threading.local()
        self.engine = create_engine(self.url, **self._engine_args())
        if self.engine.dialect.name == "sqlite":
            self._sqlite_setup()
        self._retrying.budget = min(self.retry_s, START_RETRY_S)   # at start: a typo'd host
        try:                                                       # is said in seconds
            self._retried_call(migrate, self.engine)
        except DBAPIError as e:
            if not transient(e):
                raise
            raise TunelabError(f"cannot reach the database {shown_url(self.url)}: "
                               f"{str(e.orig or e).splitlines()[0]}", field="database") from None
        finally:
            del self._retrying.budget
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @_retried
    def _retried_call(self, fn: Callable, *args) -> Any:
        return fn(*args)

    def _engine_args(self) -> dict[str, Any]:
        if self.url.startswith("sqlite"):
            return {"connect_args": {"timeout": 60, "check_same_thread": False}}
        # connect_timeout: a host that is gone fails in seconds (and is retried), not minutes
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def _sqlite_setup(self) -> None:
        @event.listens_for(self.engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None   # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=60000")
            # readers never block the writer. Switching a new database to WAL takes an exclusive
            # lock and fails at once, busy timeout or not, while another connection (serve and
            # its workers starting together) holds one: waited for here, up to the same 60 s
            deadline = time.monotonic() + 60
            while True:
                try:
                    cur.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(self.engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def path(self, rel: str | Path) -> Path:
        return self.root / rel

    def rel(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root))

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # ---- keys ----------------------------------------------------------------------------
    @_retried
    def create_key(self, name: str) -> tuple[Key, str]:
        """A new key; the plaintext is returned once and only its hash is stored."""
        if not name or len(name) > 40 or any(c not in _ALPHABET + "-_" for c in name):
            raise TunelabError("a key name is 1-40 letters, digits, '-' or '_' (it becomes part "
                               "of model names)", field="name")
        token = "tl-" + secrets.token_urlsafe(32)
        with self.session() as s:
            taken = s.scalar(select(Key).where(Key.name == name, Key.revoked_at.is_(None)))
            if taken is not None:
                raise TunelabError(f"an active key named '{name}' exists (revoke it first)",
                                   field="name")
            key = Key(id=new_id("key_", 16), name=name, hash=hash_key(token), prefix=token[:8])
            s.add(key)
        return key, token

    @_retried
    def list_keys(self) -> list[Key]:
        with self.session() as s:
            return list(s.scalars(select(Key).order_by(Key.seq)))

    @_retried
    def revoke_key(self, name_or_id: str) -> Key:
        with self.session() as s:
            key = s.scalar(select(Key).where((Key.name == name_or_id) | (Key.id == name_or_id),
                                             Key.revoked_at.is_(None)))
            if key is None:
                raise TunelabError(f"no active key named '{name_or_id}'")
            key.revoked_at = now()
            return key

    @_retried
    def key_for_token(self, token: str) -> Key | None:
        digest = hash_key(token)
        with self.session() as s:
            key = s.scalar(select(Key).where(Key.hash == digest, Key.revoked_at.is_(None)))
        # the lookup is by hash; the comparison of what we hold is constant-time all the same
        if key is None or not hmac.compare_digest(key.hash, digest):
            return None
        return key

    @_retried
    def key_name(self, owner: str) -> str:
        if owner == LOCAL_OWNER:
            return LOCAL_OWNER
        with self.session() as s:
            key = s.scalar(select(Key).where(Key.id == owner))
        return key.name if key else owner

    # ---- generic ---------------------------------------------------------------------------
    @_retried
    def add(self, obj: Base) -> Any:
        with self.session() as s:
            s.add(obj)
        return obj

    @_retried
    def get(self, cls: type, id_: str, owner: str | None = None) -> Any:
        with self.session() as s:
            q = select(cls).where(cls.id == id_)
            if owner is not None:
                q = q.where(cls.owner == owner)
            return s.scalar(q)

    @_retried
    def page(self, cls: type, *filters, after: str | None = None, limit: int = 20,
             newest_first: bool = True, cursor=None) -> tuple[list[Any], bool]:
        """One page of rows and whether more follow; `after` is the last id of the previous
        page (a cursor that stays right while rows are added); `cursor`: the id column."""
        order = cls.seq.desc() if newest_first else cls.seq.asc()
        with self.session() as s:
            q = select(cls).where(*filters)
            if after:
                cursor = s.scalar(select(cls.seq).where((cursor or cls.id) == after, *filters))
                if cursor is not None:
                    q = q.where(cls.seq < cursor if newest_first else cls.seq > cursor)
            rows = list(s.scalars(q.order_by(order).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    @_retried
    def update(self, cls: type, id_: str, *conditions, **values) -> bool:
        """UPDATE one row if the conditions hold; True if it changed."""
        with self.session() as s:
            res = s.execute(update(cls).where(cls.id == id_, *conditions).values(**values))
        return res.rowcount == 1

    @_retried
    def delete(self, obj: Base) -> None:
        with self.session() as s:
            s.delete(s.merge(obj))

    # ---- jobs ------------------------------------------------------------------------------
    @_retried
    def claim_job(self, worker: str, lease_s: float, *, ray: bool = False) -> Job | None:
        """Take the oldest queued job, or one whose worker's lease ran out. `ray`: this worker
        runs jobs on a Ray cluster (without it, jobs that train on several workers are left
        to a worker that has one)."""
        if self.is_postgres:
            return self._claim_locked(worker, lease_s, ray)
        claimable = _claimable(time.time(), ray)
        with self.session() as s:
            ids = list(s.scalars(select(Job.id).where(claimable).order_by(Job.seq).limit(5)))
        for job_id in ids:
            # the same condition again inside the UPDATE: only one claimer can change the row
            if self.update(Job, job_id, claimable, status="running", lease_owner=worker,
                           lease_expires_at=time.time() + lease_s, attempts=Job.attempts + 1):
                return self.get(Job, job_id)
        return None

    @_retried
    def _claim_locked(self, worker: str, lease_s: float, ray: bool) -> Job | None:
        """PostgreSQL: lock the oldest claimable row, skipping rows other claimers hold locked,
        and take it in the same transaction."""
        claimable = _claimable(time.time(), ray)
        with self.session() as s:
            job = s.scalar(select(Job).where(claimable).order_by(Job.seq).limit(1)
                           .with_for_update(skip_locked=True))
            if job is None:
                return None
            job.status, job.lease_owner = "running", worker
            job.lease_expires_at, job.attempts = time.time() + lease_s, job.attempts + 1
        return job

    @_retried
    def requeue_expired(self) -> list[str]:
        """Jobs whose worker stopped renewing its lease (killed, frozen) go back to the queue;
        the next worker resumes them from their last complete checkpoint."""
        t = time.time()
        expired = (Job.status == "running") & (Job.lease_expires_at < t)
        with self.session() as s:
            ids = list(s.scalars(select(Job.id).where(expired)))
        return [i for i in ids if self.update(Job, i, expired, status="queued", lease_owner=None,
                                              lease_expires_at=None)]

    @_retried
    def renew_lease(self, job_id: str, worker: str, lease_s: float) -> tuple[bool, bool]:
        """(still ours, cancel requested)."""
        with self.session() as s:
            res = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == worker,
                                              Job.status == "running")
                            .values(lease_expires_at=time.time() + lease_s))
            cancel = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
        return res.rowcount == 1, bool(cancel)

    @_retried
    def finish_job(self, job_id: str, worker: str | None, status: str, **values) -> bool:
        cond = [Job.status.in_(ACTIVE)]
        if worker is not None:
            cond.append(Job.lease_owner == worker)
        return self.update(Job, job_id, *cond, status=status, finished_at=now(),
                           lease_owner=None, lease_expires_at=None, **values)

    @_retried
    def hand_back(self, job_id: str, worker: str) -> bool:
        """A worker shutting down returns its running job to the queue; the attempt does not
        count against the job (it was stopped, not lost)."""
        return self.update(Job, job_id, Job.lease_owner == worker, status="queued",
                           lease_owner=None, lease_expires_at=None, attempts=Job.attempts - 1)

    @_retried
    def cancel_job(self, job_id: str) -> str | None:
        """A job not yet running is cancelled at once ("cancelled"); a running one is asked to
        stop, which its worker's heartbeat reads ("requested"); None if it had already ended."""
        if self.update(Job, job_id, Job.status.in_(("validating_files", "queued")),
                       status="cancelled", finished_at=now(), cancel_requested=True):
            return "cancelled"
        if self.update(Job, job_id, Job.status.in_(ACTIVE), cancel_requested=True):
            return "requested"
        return None

    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None, kind: str | None = None) -> Event:
        """`kind`: what happened, for clients to switch on (kept in the event's data)."""
        if kind is not None:
            data = {**(data or {}), "kind": kind}
        return self.add(Event(id=new_id("ftevent-"), job_id=job_id, level=level, type=type,
                              message=message, data=data))

    @_retried
    def count(self, cls: type, *filters) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(cls).where(*filters)) or 0)

    @_retried
    def all(self, cls: type, *filters, order=None) -> list[Any]:
        with self.session() as s:
            return list(s.scalars(select(cls).where(*filters).order_by(order or cls.seq)))

    # ---- workers ---------------------------------------------------------------------------
    @_retried
    def worker_beat(self, worker: str, *, job_id: str | None = None,
                    resources: dict[str, Any] | None = None) -> None:
        """Register this process as a worker, or refresh its heartbeat and current job."""
        t = time.time()
        with self.session() as s:
            row = s.get(Worker, worker)
            if row is None:
                s.add(Worker(id=worker, host=socket.gethostname(), pid=os.getpid(),
                             started_at=t, heartbeat_at=t, job_id=job_id,
                             resources=resources))
            else:
                row.heartbeat_at, row.job_id = t, job_id
                if resources is not None:
                    row.resources = resources

    @_retried
    def worker_gone(self, worker: str) -> None:
        """A worker that stops cleanly leaves the table at once."""
        with self.session() as s:
            s.execute(delete(Worker).where(Worker.id == worker))

    @_retried
    def live_workers(self, within_s: float) -> list[Worker]:
        """Workers whose last heartbeat is at most within_s seconds old; older rows (a worker
        killed outright) are deleted once they are ten times as old."""
        t = time.time()
        with self.session() as s:
            s.execute(delete(Worker).where(Worker.heartbeat_at < t - max(600.0, 10 * within_s)))
            return list(s.scalars(select(Worker).where(Worker.heartbeat_at >= t - within_s)
                                  .order_by(Worker.host, Worker.started_at)))
