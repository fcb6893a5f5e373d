"""The job store's schema versions (Alembic), on SQLite and on a real PostgreSQL: a new database
is created at the head and matches the models; one made before Alembic is upgraded in place
with its rows; one newer than this tunelab is refused with both revisions named."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from tunelab.errors import TunelabError
from tunelab.jobs.store import (MIGRATIONS, SCHEMA_HEAD, Base, Job, Key, Store, database_url,
                                schema_revision)

PRE_ALEMBIC = Path(__file__).parent / "data" / "store_pre_alembic.sql"
OLD_JOB = ("INSERT INTO jobs (id, kind, owner, status, created_at, model, base_spec, seed, "
           "request, hyperparameters, result_files, cancel_requested, attempts) VALUES "
           "('ftjob-old', 'fine_tune', 'local', 'queued', 1700000000, 'm', 'spec', 7, "
           "'{\"a\": 1}', '{}', '[]', false, 0)")


def test_the_head_is_the_newest_revision_and_matches_the_models(tmp_path, db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_HEAD
    store = Store(tmp_path, db_url)
    with store.engine.connect() as conn:
        assert schema_revision(conn) == SCHEMA_HEAD
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff     # the migrations create exactly what the models declare


def test_a_sqlite_database_made_before_alembic_is_upgraded_with_its_rows(tmp_path):
    db = sqlite3.connect(tmp_path / "tunelab.db")
    db.executescript(PRE_ALEMBIC.read_text())
    db.execute(OLD_JOB)
    db.execute("INSERT INTO keys (id, name, hash, prefix, created_at) VALUES "
               "('key_1', 'ann', 'ab', 'tl-x', 1)")
    db.commit()
    db.close()
    store = Store(tmp_path)
    with store.engine.connect() as conn:
        assert schema_revision(conn) == SCHEMA_HEAD
        assert inspect(conn).has_table("workers")
    job = store.get(Job, "ftjob-old")
    assert (job.status, job.seed, job.request, job.created_at) == ("queued", 7, {"a": 1},
                                                                  1700000000)
    assert [k.name for k in store.list_keys()] == ["ann"]
    assert store.claim_job("w", 30).id == "ftjob-old"      # and it still runs
    store.worker_beat("w", job_id="ftjob-old")              # the new table works
    assert [w.job_id for w in store.live_workers(60)] == ["ftjob-old"]
    assert Store(tmp_path).get(Job, "ftjob-old").lease_owner == "w"   # a second start: no-op


def test_a_postgres_database_made_before_alembic_is_upgraded_with_its_rows(tmp_path, postgres):
    """Revision 0001 is today's schema: built to 0001 by Alembic, then alembic_version dropped,
    is a database as tunelab made it before."""
    from alembic import command
    from alembic.config import Config
    url = database_url(postgres.new_database(), tmp_path)
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text(OLD_JOB))
    engine.dispose()
    store = Store(tmp_path, url)
    with store.engine.connect() as conn:
        assert schema_revision(conn) == SCHEMA_HEAD
    job = store.get(Job, "ftjob-old")
    assert (job.status, job.seed, job.request) == ("queued", 7, {"a": 1})
    assert store.claim_job("w", 30).id == "ftjob-old"


def test_a_database_newer_than_this_tunelab_is_refused(tmp_path, db_url):
    store = Store(tmp_path, db_url)
    store.add(Key(id="key_1", name="ann", hash="ab", prefix="tl-x"))
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    store.close()
    with pytest.raises(TunelabError) as e:
        Store(tmp_path, db_url)
    assert e.value.field == "database"
    assert "'0099_from_the_future'" in str(e.value) and f"'{SCHEMA_HEAD}'" in str(e.value)
    assert "newer than this tunelab" in str(e.value)
    with store.engine.connect() as conn:          # refused, and left as it was
        assert schema_revision(conn) == "0099_from_the_future"
        assert conn.execute(text("SELECT name FROM keys")).scalar() == "ann"


@pytest.mark.parametrize("url, says", [
    ("mysql://u@h/db", "unsupported database 'mysql'"),
    ("postgresql+asyncpg://u@h/db", "driver is psycopg"),
    ("not a url", "not a database URL"),
])
def test_bad_database_urls_name_the_field(tmp_path, url, says):
    with pytest.raises(TunelabError, match=says) as e:
        Store(tmp_path, url)
    assert e.value.field == "database"


def test_plain_postgresql_urls_get_psycopg(tmp_path):
    assert database_url("postgresql://u:p@h:5/db", tmp_path) == "postgresql+psycopg://u:p@h:5/db"
    assert database_url("postgres://h/db", tmp_path) == "postgresql+psycopg://h/db"
    assert database_url(None, tmp_path) == f"sqlite:///{tmp_path / 'tunelab.db'}"


def test_stores_starting_together_on_a_new_database_create_it_once(tmp_path, db_url):
    """serve and its workers start at once: one migrates, the others wait and find the head."""
    import threading
    start, errors = threading.Barrier(4), []

    def open_store():
        start.wait()
        try:
            Store(tmp_path, db_url).close()
        except Exception as e:           # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = Store(tmp_path, db_url)
    with store.engine.connect() as conn:
        assert schema_revision(conn) == SCHEMA_HEAD
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_a_database_at_the_previous_revision_is_upgraded_with_its_jobs(tmp_path, db_url):
    """A database as the previous tunelab left it (revision 0002: jobs queued and running, an
    event, a live worker) is upgraded in place to the head on start: every row is kept, the
    new column reads NULL (one training process), and the jobs are claimed as before."""
    from alembic import command
    from alembic.config import Config
    from tunelab.jobs.store import Event, Worker
    url = database_url(db_url, tmp_path)
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
        conn.execute(text(OLD_JOB))
        conn.execute(text(OLD_JOB.replace("ftjob-old", "ftjob-running")
                          .replace("'queued'", "'running'")))
        conn.execute(text("UPDATE jobs SET lease_owner = 'w0', lease_expires_at = 1.0 "
                          "WHERE id = 'ftjob-running'"))
        conn.execute(text("INSERT INTO events (id, job_id, created_at, level, type, message) "
                          "VALUES ('ev-1', 'ftjob-old', 1700000001, 'info', 'message', 'hi')"))
        conn.execute(text("INSERT INTO workers (id, host, pid, started_at, heartbeat_at, job_id) "
                          "VALUES ('h:1:a', 'h', 1, 1.0, 2.0, 'ftjob-running')"))
        assert schema_revision(conn) == "0002"
    engine.dispose()
    store = Store(tmp_path, url)
    with store.engine.connect() as conn:
        assert schema_revision(conn) == SCHEMA_HEAD
        assert "train_workers" in {c["name"] for c in inspect(conn).get_columns("jobs")}
    old, running = store.get(Job, "ftjob-old"), store.get(Job, "ftjob-running")
    assert (old.status, old.seed, old.request, old.created_at, old.train_workers) == \
        ("queued", 7, {"a": 1}, 1700000000, None)
    assert (running.status, running.lease_owner) == ("running", "w0")
    assert [e.message for e in store.all(Event, Event.job_id == "ftjob-old")] == ["hi"]
    assert [w.id for w in store.all(Worker, order=Worker.id)] == ["h:1:a"]
    # a worker without Ray takes both: the queued one, then the one whose lease ran out
    assert [store.claim_job("w", 30).id, store.claim_job("w", 30).id] == \
        ["ftjob-old", "ftjob-running"]
