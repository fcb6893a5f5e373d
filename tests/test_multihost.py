"""Several hosts on one machine (tests/netns.py): PostgreSQL on host `db`, `tunelab serve` on
host `api`, a `tunelab worker` on each of h1, h2 and h3, all sharing one data dir (as an NFS
mount would) and reaching each other only over the bridge the test made. Jobs spread over the
hosts and each runs once; a host that loses power mid-job (every process on it killed) has its
job finished by another host with the weights an uninterrupted job ends with; a database
restart mid-job loses nothing."""
from __future__ import annotations

import json
import sys
import time

import openai
import pytest
import torch
from safetensors.torch import load_file

from conftest import sound_rows
from tunelab.jobs.store import Job, Store

import netns
import pg
from test_server_harness import env, poll_job, tiny_training, wait_for

PORT = 8765
CLI = [sys.executable, "-m", "tunelab.cli"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    why = netns.available() or pg.available()
    if why:
        pytest.skip(f"several hosts need network namespaces and PostgreSQL: {why}")
    data = tmp_path_factory.mktemp("shared-data")
    with netns.Network(["db", "api", "h1", "h2", "h3"]) as net:
        db = pg.Postgres()
        db.host, db.trusted = net["db"].address, f"{net.subnet}.0/24"
        db.as_user = ["ip", "netns", "exec", net["db"].ns, *db.as_user]
        db.start()
        try:
            url = db.new_database()
            token = Store(data, url).create_key("alice")[1]
            logs = data / "logs"
            logs.mkdir(exist_ok=True)
            api = net["api"]
            api.popen([*CLI, "serve", "--host", api.address, "--port", str(PORT), "--data-dir",
                       str(data), "--database", url, "--workers", "0",
                       "--model", f"tiny={tiny_model_dir}"],
                      stdout=open(logs / "api.out", "wb"), stderr=open(logs / "api.err", "wb"),
                      env=env())
            base = f"http://{api.address}:{PORT}/v1"
            client = openai.OpenAI(base_url=base, api_key=token, max_retries=0, timeout=60)

            def up():
                try:
                    return client.models.list() is not None
                except openai.APIConnectionError:
                    return False
            wait_for(up, 90, what="the API host")
            workers = {}
            for name in ("h1", "h2", "h3"):
                workers[name] = net[name].popen(
                    [*CLI, "worker", "--data-dir", str(data), "--database", url],
                    stdout=open(logs / f"{name}.out", "wb"), stderr=open(logs / f"{name}.err", "wb"),
                    env=env())
            rows = "".join(json.dumps(r) + "\n" for r in sound_rows()[:36]).encode()
            train = client.files.create(file=("sounds.jsonl", rows), purpose="fine-tune")
            yield {"net": net, "db": db, "url": url, "client": client, "data": data,
                   "train": train, "logs": logs}
        finally:
            for name in ("h1", "h2", "h3", "api"):
                net[name].kill()
            db.stop()


def busy_hosts(net) -> set[str]:
    """Hosts running a job now: a worker forks a process per job."""
    return {h for h in ("h1", "h2", "h3") if len(net[h].pids()) > 1}


def job_of(c, model="tiny", **tunelab):
    return c.fine_tuning.jobs.create(model=model, training_file=c.train.id, seed=3,
                                     hyperparameters={"batch_size": 4},
                                     extra_body={"tunelab": tiny_training(**tunelab)})


def adapter(data, job_id):
    return load_file(data / "jobs" / job_id / "run" / "adapter" / "adapter_model.safetensors")


def test_twenty_jobs_over_three_hosts_each_run_once(cluster):
    c, net = cluster["client"], cluster["net"]
    c.train = cluster["train"]
    jobs = [job_of(c, max_steps=2, eval_steps=None) for _ in range(20)]
    seen: set[str] = set()

    def all_done():
        seen.update(busy_hosts(net))
        return all(c.fine_tuning.jobs.retrieve(j.id).status in ("succeeded", "failed")
                   for j in jobs)
    wait_for(all_done, 600, interval=0.3, what="20 jobs")
    assert [c.fine_tuning.jobs.retrieve(j.id).status for j in jobs] == ["succeeded"] * 20
    store = Store(cluster["data"], cluster["url"])
    assert [store.get(Job, j.id).attempts for j in jobs] == [1] * 20    # each claimed once
    assert len(seen) >= 2, seen                # the hosts shared the work
    workers = c._client.get(f"{c.base_url}tunelab/workers",
                            headers={"Authorization": f"Bearer {c.api_key}"}).json()
    assert len(workers["data"]) == 3


def test_a_host_lost_mid_job_is_finished_elsewhere_with_the_same_weights(cluster):
    c, net, data = cluster["client"], cluster["net"], cluster["data"]
    c.train = cluster["train"]
    reference = job_of(c, max_steps=16, save_steps=2, eval_steps=None)
    assert poll_job(c, reference.id, timeout=300).status == "succeeded"
    victim = job_of(c, max_steps=16, save_steps=2, eval_steps=None)
    wait_for(lambda: list(c.fine_tuning.jobs.checkpoints.list(victim.id)), 120, interval=0.05,
             what="the job's first checkpoint")
    (host,) = wait_for(lambda: busy_hosts(net) or None, 30, interval=0.05, what="its host")
    net[host].kill()                               # every process on that host, at once
    assert c.fine_tuning.jobs.retrieve(victim.id).status == "running"
    job = poll_job(c, victim.id, timeout=300)
    assert job.status == "succeeded", job.error
    events = [e.message for e in c.fine_tuning.jobs.list_events(victim.id, limit=100)]
    assert any(m.startswith("Resuming from the last complete checkpoint") for m in events)
    a, b = adapter(data, reference.id), adapter(data, victim.id)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_a_database_restart_mid_job_loses_nothing(cluster):
    c = cluster["client"]
    c.train = cluster["train"]
    job = job_of(c, max_steps=24, save_steps=4, eval_steps=None)
    wait_for(lambda: c.fine_tuning.jobs.retrieve(job.id).status == "running", 120,
             what="the job to start")
    took = cluster["db"].restart()
    assert took < 30
    done = poll_job(c, job.id, timeout=300)
    assert done.status == "succeeded", done.error
    steps = sorted(e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=100)
                   if e.type == "metrics")
    assert steps == list(range(1, 25))
    before = time.time()
    assert c.models.retrieve(done.fine_tuned_model).id == done.fine_tuned_model
    assert time.time() - before < 10
