"""The job store on a real PostgreSQL (tests/pg.py): claimers in several processes never share a
job, a worker loop rides out a database restart, workers show in GET /v1/tunelab/workers, and the
commands take --database."""
from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
from sqlalchemy import update

from tunelab.jobs.store import Job, Store, Worker as WorkerRow, new_id
from tunelab.jobs.worker import Worker


def queued(store: Store, n: int) -> list[str]:
    return [store.add(Job(id=new_id("ftjob-"), kind="fine_tune", owner="local", status="queued",
                          model="m", base_spec="m")).id for _ in range(n)]


def _claimer(url, root, i, go, out) -> None:
    store = Store(root, url)               # its own process, engine and connections
    go.wait()
    while (job := store.claim_job(f"p{i}", 30)) is not None:
        out.put((i, job.id, job.attempts))
        time.sleep(0.02)                   # "work" on it: the others get turns
    out.put((i, None, None))


def test_claimers_in_several_processes_each_get_distinct_jobs(tmp_path, postgres):
    url = postgres.new_database()
    store = Store(tmp_path, url)
    assert store.is_postgres
    ids = queued(store, 20)
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(url, str(tmp_path), i, go, out))
             for i in range(4)]
    for p in procs:
        p.start()
    time.sleep(3)                          # spawned interpreters importing tunelab
    go.set()
    claims, done = [], 0
    while done < len(procs):
        i, job_id, attempts = out.get(timeout=120)
        if job_id is None:
            done += 1
        else:
            claims.append((i, job_id, attempts))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(j for _, j, _ in claims) == sorted(ids)      # each exactly once
    assert {a for _, _, a in claims} == {1}
    assert len({i for i, _, _ in claims}) > 1                  # the work was shared
    assert store.count(Job, Job.status == "running") == 20
    assert store.claim_job("late", 30) is None


class _QuickWorker(Worker):
    """The real worker loop (claim, fork a child per job, heartbeat, presence); the job itself
    renews its lease a few times and succeeds instead of training."""

    def _run_job_here(self, job: Job) -> None:
        for _ in range(3):
            ours, _ = self.store.renew_lease(job.id, self.id, self.lease_s)
            assert ours
            time.sleep(0.05)
        self.store.finish_job(job.id, self.id, "succeeded")


def test_a_worker_rides_out_a_database_restart(tmp_path, postgres):
    url = postgres.new_database()
    store = Store(tmp_path, url)
    ids = queued(store, 20)
    worker = _QuickWorker(Store(tmp_path, url), lease_s=30, poll_s=0.05)
    loop = threading.Thread(target=worker.run_forever, daemon=True)
    loop.start()
    try:
        deadline = time.time() + 120
        while store.count(Job, Job.status == "succeeded") < 5:
            assert time.time() < deadline, "the worker did not start"
            time.sleep(0.05)
        live = store.live_workers(60)
        assert [w.id for w in live] == [worker.id] and live[0].resources["cpus"] >= 1
        took = postgres.restart()          # every connection is cut
        back = time.monotonic()
        before = store.count(Job, Job.status == "succeeded")
        assert before < 20, "the restart came too late to test anything"
        while store.count(Job, Job.status == "succeeded") < 20:
            assert time.time() < deadline, "the worker did not come back"
            time.sleep(0.05)
        print(f"restart {took:.2f}s; 20 jobs done {time.monotonic() - back:.2f}s after it "
              f"({20 - before} after the restart)")
    finally:
        worker.stop.set()
        loop.join(30)
    assert not loop.is_alive()
    jobs = store.all(Job)
    assert {j.id for j in jobs} == set(ids)
    assert [(j.status, j.attempts) for j in jobs] == [("succeeded", 1)] * 20   # none run twice
    assert store.live_workers(60) == []            # a stopped worker leaves the table


def test_workers_endpoint_lists_the_live_ones(tmp_path, postgres):
    from fastapi.testclient import TestClient

    from tunelab.server.app import create_app
    from tunelab.server.context import Settings
    url = postgres.new_database()
    app = create_app(Settings(data_dir=tmp_path, database_url=url, auth=False))
    store = app.state.ctx.store
    (job_id,) = queued(store, 1)
    store.worker_beat("hostA:1:a", job_id=job_id, resources={"cpus": 2, "gpus": []})
    store.worker_beat("hostB:2:b")
    store.worker_beat("dead:3:c")
    with store.session() as s:      # a worker killed outright 10 minutes ago
        s.execute(update(WorkerRow).where(WorkerRow.id == "dead:3:c")
                  .values(heartbeat_at=time.time() - 600))
    with TestClient(app) as client:
        got = client.get("/v1/tunelab/workers")
        assert got.status_code == 200, got.text
        rows = {w["id"]: w for w in got.json()["data"]}
        assert set(rows) == {"hostA:1:a", "hostB:2:b"}
        a = rows["hostA:1:a"]
        assert (a["status"], a["job"], a["resources"]) == ("busy", job_id,
                                                           {"cpus": 2, "gpus": []})
        assert rows["hostB:2:b"]["status"] == "idle" and rows["hostB:2:b"]["job"] is None
        assert a["seconds_since_heartbeat"] < 60
        wide = client.get("/v1/tunelab/workers", params={"within_s": 3600}).json()["data"]
        assert len(wide) == 3
        bad = client.get("/v1/tunelab/workers", params={"within_s": -1})
        assert bad.status_code == 400
        err = bad.json()["error"]
        assert err["param"] == "within_s" and err["type"] == "invalid_request_error"
    # someone else's job is not named
    store.update(Job, job_id, owner="key_other")
    with TestClient(app) as client:
        rows = {w["id"]: w for w in client.get("/v1/tunelab/workers").json()["data"]}
    assert rows["hostA:1:a"]["status"] == "busy" and rows["hostA:1:a"]["job"] is None


def test_commands_take_database(tmp_path, postgres, monkeypatch):
    from conftest import assert_clean_error, run_cli
    url = postgres.new_database()
    made = run_cli("keys", "create", "dora", "--data-dir", tmp_path, "--database", url)
    assert made.returncode == 0, made.stderr
    assert Store(tmp_path, url).key_for_token(made.stdout.strip()).name == "dora"
    assert Store(tmp_path).list_keys() == []          # not in the data dir's SQLite
    monkeypatch.setenv("TUNELAB_DATABASE_URL", url)   # the variable, as a worker host sets it
    listed = run_cli("keys", "list", "--data-dir", tmp_path)
    assert "dora" in listed.stdout, listed.stderr
    monkeypatch.delenv("TUNELAB_DATABASE_URL")
    assert_clean_error(run_cli("worker", "--data-dir", tmp_path, "--database", "mysql://h/db"),
                       "database", "mysql")


def test_serve_on_postgres_fine_tunes_and_shows_its_worker(tmp_path, postgres, tiny_model_dir):
    """`tunelab serve --database postgresql://...` with one worker: a short fine-tune through the
    openai client succeeds, its rows are in PostgreSQL (not in the data dir's SQLite), and the
    worker it ran on is listed with its resources."""
    import json

    import httpx2 as httpx
    from conftest import sound_rows
    from test_server_harness import Server, poll_job, tiny_training, wait_for
    url = postgres.new_database()
    token = Store(tmp_path, url).create_key("alice")[1]
    server = Server(tmp_path, "--workers", "1", "--database", url,
                    "--model", f"tiny={tiny_model_dir}")
    try:
        client = server.client(token)
        body = "".join(json.dumps(r) + "\n" for r in sound_rows()[:24]).encode()
        train = client.files.create(file=("s.jsonl", body), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id,
                                             extra_body={"tunelab": tiny_training()})
        done = poll_job(client, job.id, timeout=180)
        assert done.status == "succeeded", done.error
        assert any(c.step_number == 6 for c in client.fine_tuning.jobs.checkpoints.list(job.id))
        headers = {"Authorization": f"Bearer {token}"}
        workers = wait_for(lambda: httpx.get(server.url + "/v1/tunelab/workers", headers=headers,
                                             timeout=10).json()["data"] or None, 30,
                           what="the worker to register")
        (w,) = workers
        assert w["status"] == "idle" and w["pid"] in server_worker_pids(server)
        assert w["resources"]["cpus"] >= 1 and w["resources"]["memory_bytes"] > 2**28
    finally:
        server.stop()
    assert Store(tmp_path, url).get(Job, job.id).status == "succeeded"
    assert not (tmp_path / "tunelab.db").exists()      # nothing went to SQLite


def server_worker_pids(server) -> set[int]:
    """The pids of `tunelab worker` processes the server started (its children)."""
    import subprocess
    out = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}
