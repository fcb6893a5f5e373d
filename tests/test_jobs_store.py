"""The job store and the job spec, in-process: claims under contention, leases, keys, and the
OpenAI request -> TrainConfig mapping."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from tunelab.errors import TunelabError
from tunelab.jobs import spec
from sqlalchemy import select

from tunelab.jobs.store import Base, Event, Job, Store, new_id
from tunelab.jobs.uploads import safe_filename


def queued(store: Store, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        job = store.add(Job(id=new_id("ftjob-"), kind="fine_tune", owner="o", status="queued",
                            model="m", base_spec="m"))
        ids.append(job.id)
    return ids


def test_each_job_is_claimed_once_under_contention(tmp_path, db_url):
    ids = queued(Store(tmp_path, db_url), 30)
    claimed: list[tuple[int, str]] = []
    start = threading.Barrier(4)

    def worker(i: int) -> None:
        store = Store(tmp_path, db_url)    # its own engine and connections, like a process
        start.wait()                       # all four race from the same moment
        while (job := store.claim_job(f"w{i}", 30)) is not None:
            claimed.append((i, job.id))
            time.sleep(0.01)     # "work" on it, as a worker would: the others get turns
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for _, j in claimed) == sorted(ids)
    assert len({w for w, _ in claimed}) > 1


def test_an_expired_lease_is_claimed_again(tmp_path, db_url):
    store = Store(tmp_path, db_url)
    (job_id,) = queued(store, 1)
    job = store.claim_job("dead", lease_s=0.2)
    assert job.id == job_id and job.attempts == 1
    assert store.claim_job("other", 30) is None           # the lease holds
    assert store.renew_lease(job_id, "dead", 0.2) == (True, False)
    time.sleep(0.3)
    assert store.requeue_expired() == [job_id]
    job = store.claim_job("other", 30)
    assert job.id == job_id and job.attempts == 2 and job.lease_owner == "other"
    assert store.renew_lease(job_id, "dead", 30) == (False, False)   # the dead one lost it
    store.update(Job, job_id, cancel_requested=True)
    assert store.renew_lease(job_id, "other", 30) == (True, True)
    assert store.finish_job(job_id, "other", "cancelled")
    assert not store.finish_job(job_id, "other", "failed")             # final stays final


def test_keys_store_only_a_hash(tmp_path, db_url):
    store = Store(tmp_path, db_url)
    key, token = store.create_key("alice")
    assert store.key_for_token(token).id == key.id
    assert store.key_for_token(token + "x") is None
    with pytest.raises(TunelabError, match="active key named 'alice'"):
        store.create_key("alice")
    with pytest.raises(TunelabError):
        store.create_key("a:b")        # part of model names
    if db_url is None:
        dump = "\n".join(sqlite3.connect(tmp_path / "tunelab.db").iterdump())
    else:                        # every row of every table, as text
        with store.engine.connect() as conn:
            dump = "\n".join(str(tuple(r)) for t in reversed(Base.metadata.sorted_tables)
                             for r in conn.execute(select(t)))
    assert "alice" in dump       # the dump does hold the key's row
    assert token not in dump and token[8:20] not in dump
    store.revoke_key("alice")
    assert store.key_for_token(token) is None
    assert store.create_key("alice")[0].name == "alice"   # the name is free again


def test_pages_follow_the_cursor(tmp_path, db_url):
    store = Store(tmp_path, db_url)
    for i in range(7):
        store.add_event("j", f"e{i}")
    seen, after = [], None
    while True:
        rows, more = store.page(Event, Event.job_id == "j", after=after, limit=3)
        seen += [r.message for r in rows]
        if not more:
            break
        after = rows[-1].id
    assert seen == [f"e{i}" for i in reversed(range(7))]


def make(tmp_path, hp=None, options=None, seed=None, param="method.supervised.hyperparameters"):
    return spec.train_config(base_spec="smollm2-135m-instruct", train_path=tmp_path / "t.jsonl",
                             valid_path=None, output_dir=tmp_path / "run",
                             hyperparameters=hp or {}, hyperparameters_param=param, seed=seed,
                             options=options or {})


def test_openai_hyperparameters_map_onto_the_config(tmp_path):
    cfg = make(tmp_path, {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5},
               {"method": "full", "max_length": 256}, seed=9)
    assert cfg.epochs == 2 and cfg.batch_size == "auto" and cfg.seed == 9
    assert cfg.learning_rate == pytest.approx(0.5 * 2e-5)     # x the auto rate of `full`
    assert cfg.max_length == 256 and cfg.overwrite
    shown = spec.shown_hyperparameters(cfg.model_dump(mode="json"))
    assert shown == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}


@pytest.mark.parametrize("hp, options, param", [
    ({}, {"lora": {"r": 0}}, "tunelab.lora.r"),
    ({}, {"epoch": 3}, "tunelab.epoch"),
    ({}, {"train_file": "/etc/passwd"}, "tunelab.train_file"),
    ({}, {"method": "full", "lora": {"r": 8}}, "tunelab.lora"),
    ({"n_epochs": 2}, {"epochs": 3}, "tunelab.epochs"),
    ({"batch_size": 4}, {"micro_batch_size": 0}, "tunelab.micro_batch_size"),
])
def test_config_errors_name_the_request_field(tmp_path, hp, options, param):
    with pytest.raises(TunelabError) as e:
        make(tmp_path, hp, options)
    assert e.value.field == param


@pytest.mark.parametrize("name, safe", [
    ("../../etc/passwd", "passwd"), ("..\\..\\x.csv", "x.csv"), ("/abs/data.jsonl", "data.jsonl"),
    ("..", "upload"), ("", "upload"), (".hidden.jsonl", "hidden.jsonl"),
    ("a\x00b\n.jsonl", "ab.jsonl"), ("é" * 200 + ".jsonl", "é" * 124 + ".jsonl"),
])
def test_safe_filename(name, safe):
    got = safe_filename(name)
    assert "/" not in got and "\\" not in got and got not in (".", "..") and got
    assert len(got.encode()) <= 255
    if safe is not None:
        assert got == safe


def test_keys_commands(tmp_path):
    from conftest import assert_clean_error, run_cli
    made = run_cli("keys", "create", "carol", "--data-dir", tmp_path)
    assert made.returncode == 0 and made.stdout.strip().startswith("tl-")
    token = made.stdout.strip()
    listed = run_cli("keys", "list", "--data-dir", tmp_path)
    assert "carol" in listed.stdout and token not in listed.stdout and token[:8] in listed.stdout
    assert run_cli("keys", "revoke", "carol", "--data-dir", tmp_path).returncode == 0
    assert Store(tmp_path).key_for_token(token) is None
    assert_clean_error(run_cli("keys", "revoke", "carol", "--data-dir", tmp_path), "carol")


def test_the_heartbeat_exits_on_a_lost_lease_but_not_on_a_job_its_process_finished(
        tmp_path, db_url, monkeypatch):
    """A job process finishes its job (finish_job, then the "cancelled" event): a beat in
    between must not read that as a lost lease and kill the process before the event."""
    from tunelab.jobs import worker
    exits = []
    monkeypatch.setattr(worker.os, "_exit", lambda code: exits.append(code))
    store = Store(tmp_path, db_url)
    done_id, taken_id = queued(store, 2)

    assert store.claim_job("me", 30).id == done_id
    assert store.finish_job(done_id, "me", "cancelled")
    beat = worker._Heartbeat(store, done_id, "me", lease_s=0.2)   # a beat every 0.05 s
    beat.start()
    beat.join(timeout=5)
    assert not beat.is_alive() and exits == []

    assert store.claim_job("other", 30).id == taken_id        # someone else holds this one
    beat = worker._Heartbeat(store, taken_id, "me", lease_s=0.2)
    beat.start()
    time.sleep(0.5)
    beat.done.set()
    beat.join(timeout=5)
    assert exits and exits[0] == 3
