"""The platform's state: one database through SQLAlchemy 2, files under the data dir.

SQLite (the default, `<data dir>/tunelab.db`) or any SQLAlchemy URL (PostgreSQL for several
hosts). Paths are stored relative to the data dir, so a data dir can move.

Concurrency: the API process and every worker write here. A worker claims a job with one
conditional UPDATE (`... WHERE id = :id AND status = 'queued'`) and counts the rows it changed,
which is atomic on SQLite and PostgreSQL alike; it then renews a lease on the job while it runs.
A job whose lease expired belongs to a dead worker and is claimed again. On SQLite every
transaction starts with BEGIN IMMEDIATE: a deferred transaction that reads and then writes can
fail at once with "database is locked" when another process wrote in between, whatever the
busy timeout.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, Boolean, Float, Integer, String, Text, create_engine, event, func,
                        select, update)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from tunelab.errors import TunelabError

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


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Store:
    """The database and the data dir. Objects come back detached (read their fields freely)."""

    def __init__(self, data_dir: str | Path | None = None, url: str | None = None):
        self.root = data_home(data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = url or os.environ.get("TUNELAB_DATABASE_URL") or \
            f"sqlite:///{self.root / 'tunelab.db'}"
        self.engine = create_engine(self.url, **self._engine_args())
        if self.engine.dialect.name == "sqlite":
            self._sqlite_setup()
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _engine_args(self) -> dict[str, Any]:
        if self.url.startswith("sqlite"):
            return {"connect_args": {"timeout": 60, "check_same_thread": False}}
        return {"pool_pre_ping": True}

    def _sqlite_setup(self) -> None:
        @event.listens_for(self.engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None   # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")   # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
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

    def list_keys(self) -> list[Key]:
        with self.session() as s:
            return list(s.scalars(select(Key).order_by(Key.seq)))

    def revoke_key(self, name_or_id: str) -> Key:
        with self.session() as s:
            key = s.scalar(select(Key).where((Key.name == name_or_id) | (Key.id == name_or_id),
                                             Key.revoked_at.is_(None)))
            if key is None:
                raise TunelabError(f"no active key named '{name_or_id}'")
            key.revoked_at = now()
            return key

    def key_for_token(self, token: str) -> Key | None:
        digest = hash_key(token)
        with self.session() as s:
            key = s.scalar(select(Key).where(Key.hash == digest, Key.revoked_at.is_(None)))
        # the lookup is by hash; the comparison of what we hold is constant-time all the same
        if key is None or not hmac.compare_digest(key.hash, digest):
            return None
        return key

    def key_name(self, owner: str) -> str:
        if owner == LOCAL_OWNER:
            return LOCAL_OWNER
        with self.session() as s:
            key = s.scalar(select(Key).where(Key.id == owner))
        return key.name if key else owner

    # ---- generic ---------------------------------------------------------------------------
    def add(self, obj: Base) -> Any:
        with self.session() as s:
            s.add(obj)
        return obj

    def get(self, cls: type, id_: str, owner: str | None = None) -> Any:
        with self.session() as s:
            q = select(cls).where(cls.id == id_)
            if owner is not None:
                q = q.where(cls.owner == owner)
            return s.scalar(q)

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

    def update(self, cls: type, id_: str, *conditions, **values) -> bool:
        """UPDATE one row if the conditions hold; True if it changed."""
        with self.session() as s:
            res = s.execute(update(cls).where(cls.id == id_, *conditions).values(**values))
        return res.rowcount == 1

    def delete(self, obj: Base) -> None:
        with self.session() as s:
            s.delete(s.merge(obj))

    # ---- jobs ------------------------------------------------------------------------------
    def claim_job(self, worker: str, lease_s: float) -> Job | None:
        """Take the oldest queued job, or one whose worker's lease ran out."""
        t = time.time()
        claimable = (Job.status == "queued") | ((Job.status == "running") &
                                                (Job.lease_expires_at < t))
        with self.session() as s:
            ids = list(s.scalars(select(Job.id).where(claimable).order_by(Job.seq).limit(5)))
        for job_id in ids:
            # the same condition again inside the UPDATE: only one claimer can change the row
            if self.update(Job, job_id, claimable, status="running", lease_owner=worker,
                           lease_expires_at=time.time() + lease_s, attempts=Job.attempts + 1):
                return self.get(Job, job_id)
        return None

    def requeue_expired(self) -> list[str]:
        """Jobs whose worker stopped renewing its lease (killed, frozen) go back to the queue;
        the next worker resumes them from their last complete checkpoint."""
        t = time.time()
        expired = (Job.status == "running") & (Job.lease_expires_at < t)
        with self.session() as s:
            ids = list(s.scalars(select(Job.id).where(expired)))
        return [i for i in ids if self.update(Job, i, expired, status="queued", lease_owner=None,
                                              lease_expires_at=None)]

    def renew_lease(self, job_id: str, worker: str, lease_s: float) -> tuple[bool, bool]:
        """(still ours, cancel requested)."""
        with self.session() as s:
            res = s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == worker,
                                              Job.status == "running")
                            .values(lease_expires_at=time.time() + lease_s))
            cancel = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
        return res.rowcount == 1, bool(cancel)

    def finish_job(self, job_id: str, worker: str | None, status: str, **values) -> bool:
        cond = [Job.status.in_(ACTIVE)]
        if worker is not None:
            cond.append(Job.lease_owner == worker)
        return self.update(Job, job_id, *cond, status=status, finished_at=now(),
                           lease_owner=None, lease_expires_at=None, **values)

    def hand_back(self, job_id: str, worker: str) -> bool:
        """A worker shutting down returns its running job to the queue; the attempt does not
        count against the job (it was stopped, not lost)."""
        return self.update(Job, job_id, Job.lease_owner == worker, status="queued",
                           lease_owner=None, lease_expires_at=None, attempts=Job.attempts - 1)

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
                  data: dict[str, Any] | None = None) -> Event:
        return self.add(Event(id=new_id("ftevent-"), job_id=job_id, level=level, type=type,
                              message=message, data=data))

    def count(self, cls: type, *filters) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(cls).where(*filters)) or 0)

    def all(self, cls: type, *filters, order=None) -> list[Any]:
        with self.session() as s:
            return list(s.scalars(select(cls).where(*filters).order_by(order or cls.seq)))
