"""Fine-tuning jobs on a real Ray cluster (`tunelab serve --ray ADDRESS`): a head on this
machine's end of a bridge (tests/netns.py) and a worker node in a network namespace of its own,
one CPU each, so a job with 2 training workers has one rank on each node and they meet over
the bridge (gloo). A 2-worker job ends with the weights of the same job in one process; a
worker node lost mid-job ends in a resumed job with the uninterrupted weights when the node
comes back, and in a clear failure when it does not (never a job left `running`).

Without Ray (first tests, fast): the placement keys are validated with a 400 naming the field,
and several workers are refused on a server without Ray."""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import sound_rows
from tunelab.jobs.store import Job, Store

import netns
from test_server_harness import Server, env, poll_job, tiny_training, wait_for

RAY = Path(sys.executable).with_name("ray")


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# -- the placement keys, without a cluster ---------------------------------------------------------

@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    """The app in-process, as a server without Ray and as one with (no cluster is contacted
    at job creation), sharing one data dir and a processed training file."""
    from fastapi.testclient import TestClient

    from tunelab.server.app import create_app
    from tunelab.server.context import Settings
    data = tmp_path_factory.mktemp("placement")
    clients = {}
    for name, ray in (("plain", None), ("ray", "10.0.0.1:6379")):
        app = create_app(Settings(data_dir=data, auth=False, models={"tiny": str(tiny_model_dir)},
                                  ray_address=ray))
        clients[name] = TestClient(app).__enter__()
    up = clients["plain"].post("/v1/files", data={"purpose": "fine-tune"},
                               files={"file": ("s.jsonl", jsonl(sound_rows()[:12]))})
    assert up.status_code == 200, up.text
    clients["file"] = up.json()["id"]
    clients["store"] = Store(data)
    yield clients
    for name in ("plain", "ray"):
        clients[name].__exit__(None, None, None)


def create(api, server: str, **tunelab):
    return api[server].post("/v1/fine_tuning/jobs", json={
        "model": "tiny", "training_file": api["file"], "tunelab": tiny_training(**tunelab)})


@pytest.mark.parametrize("server, key, value, says", [
    ("plain", "workers", 2, "without a Ray cluster"),
    ("plain", "gpus_per_worker", 1, "without a Ray cluster"),
    ("plain", "cpus_per_worker", 4, "without a Ray cluster"),
    ("ray", "workers", 0, "between 1 and 256"),
    ("ray", "workers", 1.5, "whole number"),
    ("ray", "workers", "two", "whole number"),
    ("ray", "gpus_per_worker", -1, "between 0 and 16"),
    ("ray", "memory_per_worker_gb", 0, "between 0.1 and 4096"),
])
def test_placement_is_validated_with_a_400_naming_the_field(api, server, key, value, says):
    got = create(api, server, **{key: value})
    assert got.status_code == 400, got.text
    err = got.json()["error"]
    assert err["param"] == f"tunelab.{key}" and says in err["message"], err
    assert err["code"] == "invalid_placement"


def test_placement_is_recorded_apart_from_the_training_config(api):
    plain = create(api, "plain", workers=1)          # the default is fine anywhere
    assert plain.status_code == 200, plain.text
    two = create(api, "ray", workers=2, gpus_per_worker=0, cpus_per_worker=1)
    assert two.status_code == 200, two.text
    store = api["store"]
    job = store.get(Job, two.json()["id"])
    assert job.request["placement"] == {"workers": 2, "gpus_per_worker": 0,
                                        "cpus_per_worker": 1, "memory_per_worker_gb": None}
    assert "workers" not in job.request["config"] and job.train_workers == 2
    one = store.get(Job, plain.json()["id"])
    assert "placement" not in one.request and one.train_workers is None
    # a worker without Ray leaves the 2-worker job to one with Ray (both are queued)
    for j in (one, job):
        store.update(Job, j.id, status="queued")
    assert store.claim_job("plain-worker", 30).id == one.id
    assert store.claim_job("plain-worker", 30) is None
    assert store.claim_job("ray-worker", 30, ray=True).id == job.id
    schema = api["plain"].get("/v1/tunelab/info").json()["tunelab_options"]["properties"]
    assert schema["workers"]["minimum"] == 1 and schema["gpus_per_worker"]["type"] == "integer"


# -- a two-node Ray cluster ------------------------------------------------------------------------

def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _interface(host: netns.Host) -> str:
    """The host's interface on the bridge (the one holding its address)."""
    out = subprocess.run(["ip", "-n", host.ns, "-o", "-4", "addr", "show"], capture_output=True,
                         text=True, check=True).stdout
    for line in out.splitlines():
        if f" {host.address}/" in line:
            return line.split()[1].split("@")[0]
    raise AssertionError(f"no interface with {host.address} in {host.ns}: {out}")


class RayCluster:
    """`ray start --head` on this machine's bridge address, a worker node in namespace `node`."""

    def __init__(self, net: netns.Network, tmp: Path):
        self.net, self.tmp = net, tmp
        self.head_ip = net.gateway
        self.port = _free_port(self.head_ip)
        self.address = f"{self.head_ip}:{self.port}"
        # token authentication (Ray's default for `ray start`), with a token of this test's
        self.env = env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                       RAY_USAGE_STATS_ENABLED="0",
                       # a lost node is noticed in ~2 s, not ~30
                       RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="1000",
                       RAY_health_check_failure_threshold="3",
                       # a training group that cannot be placed gives up after 15 s (Ray Train)
                       RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="15",
                       TUNELAB_RAY_CAPACITY_WAIT_S="10")
        self.head: subprocess.Popen | None = None
        self.nodes = 0

    def _start_args(self) -> list[str]:
        return ["--num-cpus", "1", "--object-store-memory", str(80 * 2**20),
                "--disable-usage-stats", "--block"]

    def start_head(self) -> None:
        log = open(self.tmp / "ray-head.log", "wb")
        # gloo advertises the address its host name resolves to (loopback here): name the
        # interface on the bridge instead, on each node
        self.head = subprocess.Popen(
            [str(RAY), "start", "--head", "--node-ip-address", self.head_ip, "--port",
             str(self.port), "--include-dashboard=false", *self._start_args()],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**self.env, "GLOO_SOCKET_IFNAME": self.net.bridge})
        wait_for(lambda: self.alive_nodes() >= 1, 60, 0.5, what="the Ray head")

    def start_node(self) -> subprocess.Popen:
        self.nodes += 1
        log = open(self.tmp / f"ray-node-{self.nodes}.log", "wb")
        node = self.net["node"]
        proc = node.popen([str(RAY), "start", "--address", self.address, "--node-ip-address",
                           node.address, *self._start_args()],
                          stdout=log, stderr=subprocess.STDOUT,
                          env={**self.env, "GLOO_SOCKET_IFNAME": _interface(node)})
        return proc

    def alive_nodes(self) -> int:
        """Alive nodes, as the head's GCS sees them (a short-lived driver would cost seconds:
        `ray list nodes` needs the dashboard, so ask the GCS client directly)."""
        probe = ("import ray._raylet as r, sys; c = r.GcsClient(address=sys.argv[1]); "
                 "print(sum(1 for n in c.get_all_node_info(timeout=5).values() "
                 "if n.state == 0))")
        try:
            out = subprocess.run([sys.executable, "-c", probe, self.address], env=self.env,
                                 capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return 0
        return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else 0

    def stop(self) -> None:
        self.net["node"].kill()
        if self.head is not None and self.head.poll() is None:
            os.killpg(self.head.pid, signal.SIGTERM)      # `ray start --block` stops its own
            try:
                self.head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.head.pid, signal.SIGKILL)
                self.head.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    why = netns.available()
    if why:
        pytest.skip(f"the Ray worker node needs a network namespace: {why}")
    if not RAY.exists():
        pytest.skip("Ray is not installed (make setup installs ray[train])")
    data = tmp_path_factory.mktemp("ray-shared")
    started = time.monotonic()
    with netns.Network(["node"]) as net:
        ray = RayCluster(net, data)
        server = None
        try:
            ray.start_head()
            ray.start_node()
            wait_for(lambda: ray.alive_nodes() == 2, 90, 0.5, what="the Ray worker node")
            print(f"\nRay cluster (head + node) up in {time.monotonic() - started:.1f}s")
            server = Server(data, "--workers", "1", "--model", f"tiny={tiny_model_dir}",
                            "--ray", ray.address, **{k: v for k, v in ray.env.items()
                                                     if k.startswith(("RAY_", "TUNELAB_RAY"))})
            client = server.client(Store(data).create_key("alice")[1])
            train = client.files.create(file=("sounds.jsonl", jsonl(sound_rows()[:32])),
                                        purpose="fine-tune")
            yield {"ray": ray, "server": server, "client": client, "train": train,
                   "data": data, "net": net}
        finally:
            if server is not None:
                server.stop()
            ray.stop()


def ray_job(cl, workers: int, **over):
    """The same job each time but for its number of training workers: 32 rows, 4 full global
    batches of 8 an epoch (a last, partial batch would be padded by repeated rows on the
    second rank, as accelerate does under DDP, and differ from one process)."""
    c = cl["client"]
    # no LoRA dropout: each rank draws its own masks, so only a deterministic job can match
    opts = tiny_training(**{"max_steps": 12, "save_steps": 2, "eval_steps": None,
                            "group_by_length": False, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                            "workers": workers, **over})
    return c.fine_tuning.jobs.create(model="tiny", training_file=cl["train"].id, seed=5,
                                     hyperparameters={"batch_size": 8},
                                     extra_body={"tunelab": opts})


def adapter(data: Path, job_id: str) -> dict[str, torch.Tensor]:
    return load_file(data / "jobs" / job_id / "run" / "adapter" / "adapter_model.safetensors")


def result(data: Path, job_id: str) -> dict:
    return json.loads((data / "jobs" / job_id / "run" / "result.json").read_text())


def events(c, job_id: str) -> list[str]:
    return [e.message for e in reversed(c.fine_tuning.jobs.list_events(job_id, limit=100).data)]


def train_workers_on(host: netns.Host) -> int:
    """Ray Train worker processes running on a host (their process title names them)."""
    n = 0
    for pid in host.pids():
        try:
            n += b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            pass
    return n


@pytest.fixture(scope="module")
def reference(cluster):
    """The job in one process (one Ray Train worker)."""
    c = cluster["client"]
    t = time.monotonic()
    job = poll_job(c, ray_job(cluster, 1).id, timeout=240)
    print(f"\n1-worker job on Ray: {time.monotonic() - t:.1f}s")
    assert job.status == "succeeded", (job.error, events(c, job.id))
    return job


@pytest.mark.slow
def test_two_workers_on_two_nodes_train_the_weights_of_one_process(cluster, reference):
    c, data = cluster["client"], cluster["data"]
    t = time.monotonic()
    job = ray_job(cluster, 2)
    seen = wait_for(lambda: train_workers_on(cluster["net"]["node"]) or
                    (c.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed")
                     and -1), 240, 0.2, what="a training worker on the node")
    assert seen > 0, "no Ray Train worker ran on the worker node"
    job = poll_job(c, job.id, timeout=240)
    print(f"\n2-worker job on Ray: {time.monotonic() - t:.1f}s")
    assert job.status == "succeeded", (job.error, events(c, job.id))
    got, ref = result(data, job.id), result(data, reference.id)
    assert (got["extra"]["world_size"], ref["extra"]["world_size"]) == (2, 1)
    assert got["extra"]["batch_size"] == ref["extra"]["batch_size"] == 8
    assert got["extra"]["tokens_seen"] == ref["extra"]["tokens_seen"]    # both shards were used
    a, b = adapter(data, reference.id), adapter(data, job.id)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"largest weight difference, 2 workers vs 1: {worst:.2e}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    assert any(float(v.abs().max()) > 1e-4 for k, v in a.items() if "lora_B" in k)  # it trained
    says = events(c, job.id)
    placed = [e for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data
              if (e.data or {}).get("kind") == "placed"]
    assert len(placed) == 1 and "2 workers of 1 CPU" in placed[0].message, says
    assert placed[0].data["ray"]["workers"] == 2
    assert sum(m.startswith("Step ") for m in says) == 12       # rank 0 alone reports
    assert len(c.fine_tuning.jobs.checkpoints.list(job.id).data) == 3   # the last 3 kept


@pytest.mark.slow
def test_a_cancel_stops_every_rank_at_one_step_and_keeps_a_checkpoint(cluster):
    """Cancel reaches the ranks on both nodes (a flag they agree on each step): they save a
    checkpoint at the same step and stop; the job reads `cancelled`, as without Ray."""
    c, node = cluster["client"], cluster["net"]["node"]
    job = ray_job(cluster, 2, max_steps=400)
    wait_for(lambda: list(c.fine_tuning.jobs.checkpoints.list(job.id)), 240, 0.1,
             what="the job's first checkpoint")
    t = time.monotonic()
    assert c.fine_tuning.jobs.cancel(job.id).status in ("running", "cancelled")
    done = poll_job(c, job.id, timeout=120)
    print(f"\ncancel on Ray: cancelled {time.monotonic() - t:.1f}s after the request")
    assert done.status == "cancelled", (done.error, events(c, job.id))
    says = events(c, job.id)
    kept = [m for m in says if m.startswith("The job was cancelled; the checkpoint at step")]
    assert kept, says
    step = int(kept[0].split("step ")[1].split()[0])
    assert 2 < step < 400
    names = [m.id for m in c.fine_tuning.jobs.checkpoints.list(job.id).data]
    assert any(n.endswith(f"ckpt-step-{step}") for n in
               [x.fine_tuned_model_checkpoint for x in
                c.fine_tuning.jobs.checkpoints.list(job.id).data]), names
    wait_for(lambda: train_workers_on(node) == 0, 30, 0.5, what="the node's rank to end")


def _start_and_kill_node(cluster, job_id: str) -> None:
    """Wait for the job's first checkpoint with a rank on the node, then pull the node's plug."""
    c, node = cluster["client"], cluster["net"]["node"]
    wait_for(lambda: list(c.fine_tuning.jobs.checkpoints.list(job_id)), 240, 0.05,
             what="the job's first checkpoint")
    assert train_workers_on(node) > 0
    node.kill()
    assert c.fine_tuning.jobs.retrieve(job_id).status == "running"


@pytest.mark.slow
def test_a_node_lost_for_good_fails_the_job_clearly(cluster):
    c, ray = cluster["client"], cluster["ray"]
    job = ray_job(cluster, 2, max_steps=400)
    _start_and_kill_node(cluster, job.id)
    t = time.monotonic()
    done = poll_job(c, job.id, timeout=180)
    print(f"\nnode lost for good: the job failed {time.monotonic() - t:.1f}s after the kill")
    assert done.status == "failed", events(c, job.id)
    assert "cannot place this job (2 workers of 1 CPU)" in done.error.message, done.error
    assert done.error.param == "tunelab.workers"
    assert Store(cluster["data"]).get(Job, job.id).lease_owner is None
    ray.start_node()                                       # back for the next test
    wait_for(lambda: ray.alive_nodes() == 2, 90, 0.5, what="the node to come back")


@pytest.mark.slow
def test_a_node_lost_mid_job_and_back_resumes_with_the_same_weights(cluster, reference):
    """The uninterrupted 1-worker reference and this 2-worker job end with the same weights,
    though the node with rank 1 was killed after the first checkpoint and started again."""
    c, ray, data = cluster["client"], cluster["ray"], cluster["data"]
    job = ray_job(cluster, 2)
    _start_and_kill_node(cluster, job.id)
    t = time.monotonic()
    ray.start_node()
    done = poll_job(c, job.id, timeout=240)
    print(f"\nnode lost and back: the job finished {time.monotonic() - t:.1f}s after the kill")
    says = events(c, job.id)
    assert done.status == "succeeded", (done.error, says)
    assert any(m.startswith("Resuming from the last complete checkpoint") for m in says), says
    # Ray restarted the training group itself (FailureConfig), within the same attempt at the
    # job: tunelab neither started a second run on the cluster nor lost its lease
    assert sum(m.startswith("Training on the Ray cluster") for m in says) == 1, says
    assert Store(data).get(Job, job.id).attempts == 1
    steps = sorted(e.data["step"] for e in c.fine_tuning.jobs.list_events(job.id, limit=100)
                   if e.type == "metrics")
    assert steps == list(range(1, 13))       # the steps redone after the checkpoint, once each
    a, b = adapter(data, reference.id), adapter(data, job.id)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
