"""`tunelab serve` driven by the official openai client: upload, fine-tune a tiny model, follow
its events and checkpoints, chat with the fine-tuned model and a checkpoint; cancel; a bad
training file; key isolation; hostile input; the extensions; schemathesis against the published
OpenAPI schema. One server (with one worker) for the module."""
from __future__ import annotations

import json
import socket
import time

import httpx2 as httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (content_type_conformance, not_a_server_error,
                                 response_headers_conformance, response_schema_conformance,
                                 status_code_conformance)

from conftest import sound_rows
from tunelab.jobs.store import Store

from test_server_harness import Server, make_key, poll_job, tiny_training, wait_for

LIMIT_MB = 1


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("serve")
    keys = {"a": make_key(data, "alice"),           # as a user does; the others in-process
            "b": Store(data).create_key("bob")[1], "fuzz": Store(data).create_key("fuzz")[1]}
    server = Server(data, "--workers", "1", "--model", f"tiny={tiny_model_dir}",
                    "--max-upload-mb", str(LIMIT_MB))
    server.keys = keys
    yield server
    assert server.proc.poll() is None, "the server died during the tests"
    server.stop()


@pytest.fixture(scope="module")
def a(srv):
    return srv.client(srv.keys["a"])


@pytest.fixture(scope="module")
def b(srv):
    return srv.client(srv.keys["b"])


@pytest.fixture(scope="module")
def files(a):
    rows = sound_rows()
    train = a.files.create(file=("sounds.jsonl", jsonl(rows[:36])), purpose="fine-tune")
    valid = a.files.create(file=("valid.jsonl", jsonl(rows[36:])), purpose="fine-tune")
    return train, valid


@pytest.fixture(scope="module")
def done_job(a, files):
    train, valid = files
    job = a.fine_tuning.jobs.create(
        model="tiny", training_file=train.id, validation_file=valid.id, suffix="sounds", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 5}}},
        extra_body={"tunelab": tiny_training()})
    assert job.status == "validating_files" and job.model == "tiny"
    return poll_job(a, job.id)


def test_upload_reports_validation(a, files):
    train, _ = files
    assert train.status == "processed" and train.filename == "sounds.jsonl"
    got = a.files.retrieve(train.id)
    report = got.model_extra["validation"]
    assert report["examples"] == 36 and report["valid"] == 36 and report["trainable"]
    hist = report["tokens"]["histogram"]
    assert sum(hist["counts"]) == 36 and len(hist["edges"]) == len(hist["counts"]) + 1
    assert a.files.content(train.id).content == jsonl(sound_rows()[:36])
    assert train.id in [f.id for f in a.files.list()]


def test_fine_tune_end_to_end(a, srv, done_job):
    job = done_job
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:alice:sounds:{job.id}"
    assert job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 4
    assert job.trained_tokens and job.finished_at
    assert job.model_extra["tunelab"]["config"]["lora"]["r"] == 4

    events = list(a.fine_tuning.jobs.list_events(job.id, limit=5))   # pages through all
    assert events[0].message == "The job has successfully completed"
    metrics = [e.data for e in events if e.type == "metrics"]
    train_steps = sorted(d["step"] for d in metrics if "train_loss" in d)
    assert train_steps == list(range(1, 7))
    assert all("train_mean_token_accuracy" in d for d in metrics if "train_loss" in d)
    valid = [d for d in metrics if "valid_loss" in d]
    assert {d["step"] for d in valid} == {3, 6}
    assert all(d["valid_mean_token_accuracy"] is not None for d in valid)

    ckpts = list(a.fine_tuning.jobs.checkpoints.list(job.id))
    assert sorted(c.step_number for c in ckpts) == [3, 6]
    c3 = next(c for c in ckpts if c.step_number == 3)
    assert c3.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-3"
    assert c3.metrics.valid_loss is not None and c3.metrics.train_loss is not None

    (results_id,) = job.result_files
    results = a.files.retrieve(results_id)
    assert results.purpose == "fine-tune-results"
    csv = a.files.content(results_id).text.splitlines()
    assert csv[0].startswith("step,train_loss") and len(csv) == 7

    models = {m.id for m in a.models.list()}
    assert {"tiny", job.fine_tuned_model, c3.fine_tuned_model_checkpoint} <= models
    # a LoRA job keeps its adapter, not a merged copy of the base beside it
    run = srv.data_dir / "jobs" / job.id / "run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "model").exists()
    assert not (run / "checkpoints").exists()    # the trainer's, with optimizer state: done

    # the job's speed becomes this server's training-time estimate for its base model
    tps = job.model_extra["tunelab"]["progress"]["tokens_per_second"]
    assert tps > 0
    with srv.http(None) as h:
        info = h.get("/v1/tunelab/info").json()
    assert info["stats_model"] == "tiny"
    assert info["training_speed"]["tiny"]["jobs"] >= 1
    assert info["training_speed"]["tiny"]["tokens_per_second"] > 0


@pytest.mark.parametrize("which", ["final", "checkpoint"])
def test_chat_with_fine_tuned_model(a, done_job, which):
    model = done_job.fine_tuned_model if which == "final" else \
        f"{done_job.fine_tuned_model}:ckpt-step-3"
    messages = [{"role": "user", "content": "What sound does a cow make?"}]
    whole = a.chat.completions.create(model=model, messages=messages, max_tokens=5,
                                      temperature=0)
    assert whole.object == "chat.completion" and whole.model == model
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 5 and 1 <= whole.usage.completion_tokens <= 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = a.chat.completions.create(model=model, messages=messages, max_tokens=5,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content        # greedy: the same answer, streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_bad_training_file_is_refused_when_the_job_is_created(a):
    """A file whose check failed is known bad when the job is asked for: a 400 naming the
    training file and its bad lines, not a job that is queued and then fails."""
    rows = sound_rows()[:12]
    bad = jsonl(rows[:5]) + b"{not json\n" + jsonl(rows[5:]) + \
        jsonl([{"messages": [{"role": "user", "content": "only a question"}]}])
    f = a.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert f.status == "error"
    assert "bad.jsonl:6" in f.status_details and "bad.jsonl:14" in f.status_details
    errors = f.model_extra["validation"]["errors"]
    assert errors["not_json"]["count"] == 1 and errors["no_assistant"]["count"] == 1
    before = {j.id for j in a.fine_tuning.jobs.list()}
    with pytest.raises(openai.BadRequestError) as e:
        a.fine_tuning.jobs.create(model="tiny", training_file=f.id)
    err = e.value.body
    assert err["param"] == "training_file" and err["code"] == "invalid_training_file"
    assert "bad.jsonl:6" in err["message"]
    assert {j.id for j in a.fine_tuning.jobs.list()} == before    # no job was made


def test_training_errors_name_the_file_and_line(a, files, srv):
    """A file that validated but cannot be trained with the job's options (every answer cut
    by max_length): the job fails naming the training file, by its name, with a line."""
    job = a.fine_tuning.jobs.create(model="tiny", training_file=files[0].id,
                                    extra_body={"tunelab": tiny_training(max_length=8)})
    job = poll_job(a, job.id, timeout=90)
    assert job.status == "failed" and job.error.param == "training_file", job.error
    assert "sounds.jsonl:1: field 'messages'" in job.error.message, job.error.message
    assert str(srv.data_dir) not in job.error.message


def test_other_formats_are_converted(a):
    csv = "question,answer\n" + "".join(f"What is {i} plus one?,{i + 1}\n" for i in range(12))
    f = a.files.create(file=("qa.csv", csv.encode()), purpose="fine-tune")
    assert f.status == "processed", f.status_details
    assert f.model_extra["validation"]["format"] == "qa"


@pytest.mark.parametrize("extra, param", [
    ({"tunelab": {"lora": {"r": 0}}}, "tunelab.lora.r"),
    ({"tunelab": {"max_lenght": 64}}, "tunelab.max_lenght"),
    ({"tunelab": {"method": "dpo"}}, "tunelab.method"),
    ({"tunelab": {"output_dir": "/etc"}}, "tunelab.output_dir"),
    ({"tunelab": {"replay_file": "/etc/passwd"}}, "tunelab.replay_file"),   # no server paths
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}}},
     "method.supervised.hyperparameters.batch_size"),
    ({"method": {"type": "reinforcement"}}, "method.type"),   # not an objective here
    ({"bogus": 1}, "bogus"),
])
def test_job_options_are_validated(a, files, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        a.fine_tuning.jobs.create(model="tiny", training_file=files[0].id, extra_body=extra)
    assert e.value.status_code == 400
    err = e.value.body
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]


def test_unknown_key_names_a_close_match(a, files):
    with pytest.raises(openai.BadRequestError) as e:
        a.fine_tuning.jobs.create(model="tiny", training_file=files[0].id,
                                  extra_body={"tunelab": {"max_lenght": 64}})
    assert "did you mean 'max_length'" in e.value.body["message"]


def test_cancel_a_running_job(a, files, done_job):
    job = a.fine_tuning.jobs.create(
        model="tiny", training_file=files[0].id, hyperparameters={"batch_size": 4},
        extra_body={"tunelab": tiny_training(max_steps=100_000, save_steps=100_000,
                                             eval_steps=None)})
    wait_for(lambda: (a.fine_tuning.jobs.retrieve(job.id).model_extra["tunelab"]["progress"]
                      or {}).get("step", 0) >= 3, 90, what="training to run")
    asked = time.time()
    a.fine_tuning.jobs.cancel(job.id)
    job = poll_job(a, job.id, timeout=30)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert time.time() - asked < 15
    (ckpt,) = list(a.fine_tuning.jobs.checkpoints.list(job.id))
    assert ckpt.step_number >= 3
    answer = a.chat.completions.create(model=ckpt.fine_tuned_model_checkpoint, max_tokens=3,
                                       messages=[{"role": "user", "content": "hi"}])
    assert answer.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError):
        a.fine_tuning.jobs.cancel(job.id)   # already final


def test_key_isolation(a, b, srv, files, done_job):
    train, _ = files
    job = done_job
    ckpt = f"{job.fine_tuned_model}:ckpt-step-3"
    nf = openai.NotFoundError
    for call in (lambda: b.files.retrieve(train.id), lambda: b.files.content(train.id),
                 lambda: b.files.delete(train.id),
                 lambda: b.fine_tuning.jobs.retrieve(job.id),
                 lambda: b.fine_tuning.jobs.cancel(job.id),
                 lambda: list(b.fine_tuning.jobs.list_events(job.id)),
                 lambda: list(b.fine_tuning.jobs.checkpoints.list(job.id)),
                 lambda: b.models.delete(job.fine_tuned_model),
                 lambda: b.models.retrieve(ckpt),
                 lambda: b.chat.completions.create(model=job.fine_tuned_model, max_tokens=2,
                                                   messages=[{"role": "user", "content": "hi"}]),
                 lambda: b.fine_tuning.jobs.create(model="tiny", training_file=train.id)):
        with pytest.raises(nf):
            call()
    assert not list(b.files.list()) and not list(b.fine_tuning.jobs.list())
    assert {m.id for m in b.models.list()} == {"tiny", "smollm2-135m-instruct"}
    with srv.http(srv.keys["b"]) as h:
        r = h.post("/v1/tunelab/evaluations", json={"model": job.fine_tuned_model,
                                                    "test_file": train.id})
        assert r.status_code == 404
        assert h.post(f"/v1/tunelab/files/{train.id}/split", json={}).status_code == 404
    # ...and A still has everything
    assert a.files.retrieve(train.id).id == train.id
    assert a.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model


def test_keys_are_required(srv):
    with srv.http() as h:
        r = h.get("/v1/files")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with srv.http("tl-wrong") as h:
        r = h.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        srv.client("tl-wrong").models.list()
    with srv.http() as h:   # the web page asks before it has a key
        assert h.get("/v1/tunelab/info").json()["auth"] is True


def test_delete_model_and_file(a, files, done_job):
    ckpt = f"{done_job.fine_tuned_model}:ckpt-step-3"
    assert a.models.delete(ckpt).deleted
    with pytest.raises(openai.NotFoundError):
        a.chat.completions.create(model=ckpt, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.PermissionDeniedError):
        a.models.delete("tiny")
    f = a.files.create(file=("x.jsonl", jsonl(sound_rows()[:12])), purpose="fine-tune")
    assert a.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        a.files.retrieve(f.id)


# ---- hostile input ---------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_hostile_file_names_stay_in_the_data_dir(a, srv):
    rows = jsonl(sound_rows()[:12])
    for name in ("../../../../tmp/evil.jsonl", "..\\..\\evil.jsonl", "/etc/passwd",
                 "a\x00b\n.jsonl", ".."):
        f = a.files.create(file=(name, rows), purpose="fine-tune")
        assert "/" not in f.filename and "\\" not in f.filename and f.filename not in ("..", ".")
        stored = list((srv.data_dir / "files" / f.id).iterdir())
        assert stored and all(p.parent == srv.data_dir / "files" / f.id for p in stored)
    assert not (srv.data_dir.parent / "evil.jsonl").exists()


def test_oversize_upload_is_refused_by_its_length(srv):
    big = b"x" * (LIMIT_MB * 2**20 + 200_000)
    with srv.http(srv.keys["a"]) as h:
        r = h.post("/v1/files", data={"purpose": "fine-tune"},
                   files={"file": ("big.jsonl", big)})
    assert _error(r, 413)["code"] == "file_too_large"


def test_oversize_upload_is_refused_while_streaming(srv):
    """No Content-Length (chunked): the server answers 413 once the limit is passed, while the
    client still holds most of the body; nothing is left on disk."""
    host, port = srv.url.removeprefix("http://").split(":")
    before = set((srv.data_dir / "files").iterdir())
    boundary = "tunelabboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.jsonl\"\r\n\r\n").encode()
    chunk = b"y" * 65536
    total_chunks = 20 * LIMIT_MB * 16           # 20x the limit, if the server never answered
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall((f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                   f"{srv.keys['a']}\r\nContent-Type: multipart/form-data; boundary={boundary}"
                   "\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        sent = 0
        s.settimeout(0.05)
        answer = b""
        for sent in range(1, total_chunks + 1):
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break
            try:
                answer += s.recv(65536)
            except socket.timeout:
                continue
            if answer:
                break
        s.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer:
                more = s.recv(65536)
                if not more:
                    break
                answer += more
        except OSError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent * len(chunk) < 3 * LIMIT_MB * 2**20     # refused early, not after it all
    assert set((srv.data_dir / "files").iterdir()) == before


@pytest.mark.parametrize("body, ctype", [
    (b"--abc\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nhi",
     "multipart/form-data; boundary=abc"),                       # never closed
    (b"garbage", "multipart/form-data; boundary=abc"),
    (b"--abc--\r\n", "multipart/form-data"),                      # no boundary
    (b"{}", "application/json"),
    (b"--abc\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--abc--\r\n",
     "multipart/form-data; boundary=abc"),                       # no file part
])
def test_malformed_multipart(srv, body, ctype):
    with srv.http(srv.keys["a"]) as h:
        r = h.post("/v1/files", content=body, headers={"content-type": ctype})
    assert r.status_code in (400, 415)
    _error(r, r.status_code)


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "frobnicate": True}, 400, "frobnicate"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "n": 3}, 400, "n"),
    ("/v1/chat/completions", {"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]},
     404, "model"),
    ("/v1/chat/completions", {"model": "ft:tiny:alice::ftjob-nope",
                              "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard",
                                                             "content": "x"}]},
     400, "messages[0].role"),
    ("/v1/fine_tuning/jobs", {"model": "gpt-17", "training_file": "file-x"}, 404, "model"),
    ("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": "file-nope"}, 404,
     "training_file"),
    ("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": 12}, 400, "training_file"),
    ("/v1/fine_tuning/jobs", {"model": ["tiny"], "training_file": "x"}, 400, "model"),
    ("/v1/fine_tuning/jobs", {"model": "tiny", "training_file": "x", "seed": -1}, 400, "seed"),
    ("/v1/tunelab/evaluations", {"model": "tiny", "test_file": "file-nope"}, 400, "base_model"),
])
def test_bad_json_requests(srv, path, body, status, param):
    with srv.http(srv.keys["a"]) as h:
        err = _error(h.post(path, json=body), status)
    assert err["param"] == param, err


@pytest.mark.parametrize("value, said", [
    (100, "Invalid value for 'method.supervised.hyperparameters.n_epochs': Input should be less "
          "than or equal to 50"),
    ("lots", "Invalid value for 'method.supervised.hyperparameters.n_epochs': Input should be "
             "'auto' or a valid integer, unable to parse string as an integer"),
])
def test_a_bad_value_of_an_auto_field_says_what_it_takes(srv, value, said):
    body = {"model": "tiny", "training_file": "x", "method": {
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": value}}}}
    with srv.http(srv.keys["a"]) as h:
        err = _error(h.post("/v1/fine_tuning/jobs", json=body), 400)
    assert err["message"] == said and err["param"] == "method.supervised.hyperparameters.n_epochs"


def test_unparseable_json_and_unknown_routes(srv):
    with srv.http(srv.keys["a"]) as h:
        _error(h.post("/v1/chat/completions", content=b"{nope",
                      headers={"content-type": "application/json"}), 400)
        _error(h.post("/v1/fine_tuning/jobs", content=b"\xff\xfe",
                      headers={"content-type": "application/json"}), 400)
        _error(h.get("/v1/nothing-here"), 404)
        _error(h.delete("/v1/fine_tuning/jobs"), 405)
        _error(h.get("/v1/fine_tuning/jobs", params={"limit": "lots"}), 400)
        _error(h.get("/v1/fine_tuning/jobs/ftjob-nope/events"), 404)
        assert h.get("/v1/tunelab/info").status_code == 200   # still up


def test_api_answers_while_a_job_trains(a, files, srv):
    """Training runs in the worker process: the API keeps answering quickly meanwhile."""
    job = a.fine_tuning.jobs.create(
        model="tiny", training_file=files[0].id, hyperparameters={"batch_size": 4},
        extra_body={"tunelab": tiny_training(max_steps=100_000, save_steps=100_000,
                                             eval_steps=None)})
    try:
        wait_for(lambda: a.fine_tuning.jobs.retrieve(job.id).status == "running", 60,
                 what="the job to start")
        slowest = 0.0
        for _ in range(10):
            t = time.time()
            a.files.list()
            a.fine_tuning.jobs.retrieve(job.id)
            slowest = max(slowest, time.time() - t)
        assert slowest < 5.0
    finally:
        a.fine_tuning.jobs.cancel(job.id)
        poll_job(a, job.id, timeout=30)


def test_evaluation_compares_base_and_fine_tuned(a, srv, files, done_job):
    _, valid = files
    with srv.http(srv.keys["a"]) as h:
        r = h.post("/v1/tunelab/evaluations", json={
            "model": done_job.fine_tuned_model, "test_file": valid.id, "few_shot": 2,
            "general_check": False, "limit": 6})
        assert r.status_code == 200, r.text
        ev = r.json()
        assert ev["object"] == "tunelab.evaluation" and ev["status"] == "queued"
        ev = wait_for(lambda: (lambda e: e if e["status"] in ("succeeded", "failed") else None)(
            h.get(f"/v1/tunelab/evaluations/{ev['id']}").json()), 180, 0.5,
            what="the evaluation")
        assert ev["status"] == "succeeded", ev["error"]
        names = [row["name"] for row in ev["result"]["rows"]]
        assert names[-1] == "fine-tuned" and "base zero-shot" in names and len(names) == 3
        assert all(row["primary"] is not None for row in ev["result"]["rows"])
        assert str(srv.data_dir) not in json.dumps(ev)        # no server paths
        report = h.get(f"/v1/tunelab/evaluations/{ev['id']}/report")
        assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
        assert [e["id"] for e in h.get("/v1/tunelab/evaluations").json()["data"]] == [ev["id"]]


def test_jobs_are_listed_by_metadata(a, files):
    made = {team: a.fine_tuning.jobs.create(model="tiny", training_file=files[0].id,
                                            metadata={"team": team, "run": "m"},
                                            extra_body={"tunelab": tiny_training()})
            for team in ("search", "ads")}
    for job in made.values():
        a.fine_tuning.jobs.cancel(job.id)
    ids = lambda **q: [j.id for j in a.fine_tuning.jobs.list(**q)]   # noqa: E731
    assert ids(metadata={"team": "ads"}) == [made["ads"].id]
    assert ids(metadata={"team": "search", "run": "m"}) == [made["search"].id]
    assert ids(metadata={"team": "search", "run": "other"}) == []
    assert {made["ads"].id, made["search"].id} <= set(ids())
    for job in made.values():
        poll_job(a, job.id, timeout=60)


def test_a_running_evaluation_is_cancelled(a, srv, files, done_job):
    train, valid = files
    with srv.http(srv.keys["a"]) as h:
        ev = h.post("/v1/tunelab/evaluations", json={     # with the 104-prompt general check
            "model": done_job.fine_tuned_model, "test_file": valid.id,
            "training_file": train.id, "few_shot": 2}).json()
        wait_for(lambda: (h.get(f"/v1/tunelab/evaluations/{ev['id']}").json()["progress"]
                          or {}).get("done"), 120, 0.2, what="the evaluation to answer")
        asked = time.time()
        r = h.post(f"/v1/tunelab/evaluations/{ev['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "running", r.text
        ev = wait_for(lambda: (lambda e: e if e["status"] != "running" else None)(
            h.get(f"/v1/tunelab/evaluations/{ev['id']}").json()), 60, 0.2,
            what="the evaluation to stop")
        assert ev["status"] == "cancelled" and ev["result"] is None
        assert time.time() - asked < 30
        err = _error(h.post(f"/v1/tunelab/evaluations/{ev['id']}/cancel"), 400)
        assert err["code"] == "evaluation_not_cancellable"
        assert h.get(f"/v1/tunelab/evaluations/{ev['id']}/report").status_code == 404


def test_template_and_split_raw_records(a, srv):
    reviews = [(f"Review {i}: {'great' if i % 2 else 'awful'} product from batch {i}",
                "positive" if i % 2 else "negative") for i in range(40)]
    csv = "text,label\n" + "".join(f"{t},{l}\n" for t, l in reviews)
    raw = a.files.create(file=("reviews.csv", csv.encode()), purpose="fine-tune")
    assert raw.status == "error" and "cannot detect the format" in raw.status_details
    with srv.http(srv.keys["a"]) as h:
        names = {t["name"]: t for t in h.get("/v1/tunelab/templates").json()["data"]}
        assert names["review-sentiment"]["fields"] == ["review", "sentiment"]
        bad = h.post(f"/v1/tunelab/files/{raw.id}/template",
                     json={"template": "review-sentiment"})
        err = _error(bad, 400)
        assert "reviews.csv:2" in err["message"] and err["param"] == "map.review"
        _error(h.post(f"/v1/tunelab/files/{raw.id}/template", json={"template": "nope"}), 400)
        r = h.post(f"/v1/tunelab/files/{raw.id}/template", json={
            "template": "review-sentiment", "map": {"review": "text", "sentiment": "label"}})
        assert r.status_code == 200, r.text
        made = r.json()
        assert made["file"]["status"] == "processed" and made["file"]["purpose"] == "fine-tune"
        assert len(made["preview"]) == 5
        assert made["preview"][0]["messages"][-1] == {"role": "assistant", "content": "negative"}
        parts = h.post(f"/v1/tunelab/files/{made['file']['id']}/split",
                       json={"val": 0.25, "test": 0.25, "seed": 1, "stratify_by": "assistant"})
        assert parts.status_code == 200, parts.text
        parts = parts.json()
        counts = {k: v["validation"]["examples"] for k, v in parts.items()}
        assert counts == {"train": 20, "validation": 10, "test": 10}
        assert all(v["status"] == "processed" for v in parts.values())
        _error(h.post(f"/v1/tunelab/files/{raw.id}/split", json={}), 400)   # not a chat file
        _error(h.post(f"/v1/tunelab/files/{made['file']['id']}/split",
                      json={"val": 0.6, "test": 0.5}), 400)


# ---- schemathesis: generated requests for every operation of /openapi.json -----------------------
EXAMPLES = 8      # per operation and generation mode


def openai_error_shape(ctx, response, case):
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
    return True


# what the published schema promises: every status answered is documented (no "undocumented
# status code"), in the documented content type, and its body (the error shape included) fits
# the documented schema
CONFORMANCE = [not_a_server_error, openai_error_shape, status_code_conformance,
               content_type_conformance, response_schema_conformance,
               response_headers_conformance]


def test_schemathesis_finds_no_server_errors(srv):
    # (schemathesis' pytest integration does not load under this pytest; its strategies do)
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 20
    headers = {"Authorization": "Bearer " + srv.keys["fuzz"]}
    tested = 0
    seen: dict = {}
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                r = case.call_and_validate(base_url=srv.url, headers=headers,
                                           checks=CONFORMANCE)
                seen[(op.label, r.status_code)] = seen.get((op.label, r.status_code), 0) + 1
            try:
                check()
            except Unsatisfiable:   # nothing invalid to send (an operation without inputs)
                assert mode == schemathesis.GenerationMode.NEGATIVE, op.label
            tested += 1
    assert tested >= 40
    assert sum(n for (_, status), n in seen.items() if status < 300) > 50   # not only 4xx
    with srv.http(srv.keys["fuzz"]) as h:
        assert h.get("/v1/tunelab/info").status_code == 200


# ---- what is known when a request arrives is answered then (400 naming the field) -------------
@pytest.mark.parametrize("path, body, status, param, code", [
    # an absurd number of steps or tokens: refused by the config's bounds (tunelab.config)
    ("/v1/fine_tuning/jobs", {"tunelab": {"max_steps": 10**12}}, 400, "tunelab.max_steps",
     "invalid_config"),
    ("/v1/fine_tuning/jobs", {"tunelab": {"max_length": 10**9}}, 400, "tunelab.max_length",
     "invalid_config"),
    ("/v1/fine_tuning/jobs", {"tunelab": {"learning_rate": 1e9}}, 400, "tunelab.learning_rate",
     "invalid_config"),
    ("/v1/fine_tuning/jobs", {"tunelab": {"lora": {"r": 10**9}}}, 400, "tunelab.lora.r",
     "invalid_config"),
    ("/v1/fine_tuning/jobs", {"tunelab": {"epochs": 10**7}}, 400, "tunelab.epochs",
     "invalid_config"),
    ("/v1/fine_tuning/jobs", {"tunelab": {"lora": {"r": "big"}}}, 400, "tunelab.lora.r",
     "invalid_config"),
    ("/v1/fine_tuning/jobs", {"tunelab": {"seed": -3}}, 400, "tunelab.seed", "invalid_config"),
    ("/v1/fine_tuning/jobs", {"model": "no-such-base"}, 404, "model", "model_not_found"),
    ("/v1/tunelab/plan", {"tunelab": {"max_steps": 10**12}}, 400, "tunelab.max_steps",
     "invalid_config"),
    ("/v1/tunelab/evaluations", {"task": "nonsense"}, 400, "task", "invalid_value"),
    ("/v1/tunelab/evaluations", {"task": "preference"}, 400, "task", "invalid_task"),
    ("/v1/tunelab/evaluations", {"few_shot": 10**6}, 400, "few_shot", "invalid_value"),
])
def test_problems_known_on_arrival_are_refused_naming_the_field(a, srv, files, path, body,
                                                                status, param, code):
    train, valid = files
    full = {"/v1/fine_tuning/jobs": {"model": "tiny", "training_file": train.id},
            "/v1/tunelab/plan": {"model": "tiny", "training_file": train.id},
            "/v1/tunelab/evaluations": {"model": "tiny", "base_model": "tiny",
                                        "test_file": valid.id}}[path]
    full = {**full, **body}
    def ids(h, path):
        return [x["id"] for x in h.get(path, params={"limit": 100}).json()["data"]]
    with srv.http(srv.keys["a"]) as h:
        before = ids(h, "/v1/fine_tuning/jobs"), ids(h, "/v1/tunelab/evaluations")
        err = _error(h.post(path, json=full), status)
        assert (err["param"], err["code"]) == (param, code), err
        # nothing was queued to fail later
        assert (ids(h, "/v1/fine_tuning/jobs"), ids(h, "/v1/tunelab/evaluations")) == before


def test_qlora_plans_where_bitsandbytes_runs(a, srv, files):
    """bitsandbytes (installed with tunelab[qlora]) runs QLoRA's 4-bit base on this host's CPU,
    so a QLoRA job is accepted here, GPU or not."""
    body = {"model": "tiny", "training_file": files[0].id, "tunelab": {"method": "qlora"}}
    with srv.http(srv.keys["a"]) as h:
        r = h.post("/v1/tunelab/plan", json=body)
        assert r.status_code == 200, r.text


def test_qlora_is_refused_up_front_where_it_cannot_run(monkeypatch):
    """Where bitsandbytes cannot run here and no live worker reports a GPU, a QLoRA job could
    only fail once a worker loads the model: a 400 at once instead, with the reason."""
    from types import SimpleNamespace

    from tunelab.server import api_jobs
    from tunelab.server.errors import APIError
    why = "QLoRA ... is not installed: pip install 'tunelab[qlora]' (or use method: lora)"
    monkeypatch.setattr(api_jobs, "_qlora_unavailable_here", lambda: why)
    workers = []
    ctx = SimpleNamespace(settings=SimpleNamespace(ray_address=None),
                          store=SimpleNamespace(live_workers=lambda within: workers))
    with pytest.raises(APIError) as info:
        api_jobs.check_method_available(ctx, "qlora")
    assert (info.value.status, info.value.param, info.value.code) == \
        (400, "tunelab.method", "method_unavailable")
    assert why in info.value.message
    api_jobs.check_method_available(ctx, "lora")                 # other methods: no question
    workers.append(SimpleNamespace(resources={"gpus": [{"name": "H100"}]}))
    api_jobs.check_method_available(ctx, "qlora")                # a GPU worker takes it
    monkeypatch.setattr(api_jobs, "_qlora_unavailable_here", lambda: None)
    workers.clear()
    api_jobs.check_method_available(ctx, "qlora")                # runs here


@pytest.mark.parametrize("content, ctype, status, code, said", [
    (b"", "application/json", 400, "missing_body", "expected a JSON object with 'model', "
                                                   "'training_file'"),
    (b"[]", "application/json", 400, "invalid_body", "must be a JSON object, not an array"),
    (b"null", "application/json", 400, "invalid_body", "not null"),
    (b'{"model": "tiny"}', "text/plain", 415, "invalid_content_type", "text/plain"),
    (b'{"model": "tiny", "training_file": "x", "frob": 1}', "application/json", 400,
     "unknown_parameter", "frob"),
])
def test_a_body_that_is_not_a_json_object_says_so(srv, content, ctype, status, code, said):
    """An empty body once answered "Missing required parameter: 'None'."."""
    with srv.http(srv.keys["a"]) as h:
        err = _error(h.post("/v1/fine_tuning/jobs", content=content,
                            headers={"content-type": ctype}), status)
    assert err["code"] == code and said in err["message"], err
    assert "None" not in err["message"]


def test_the_published_schema_documents_what_the_api_answers(srv):
    """/openapi.json: no 422 (the API never answers it), the error statuses each operation can
    answer in OpenAI's error shape, and an upload schema that allows only what is accepted."""
    with srv.http(None) as h:
        schema = h.get("/openapi.json").json()
    ops = {(m.upper(), path): op for path, item in schema["paths"].items()
           for m, op in item.items()}
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for (method, path), op in ops.items():
        responses = op["responses"]
        assert "422" not in responses, (method, path)
        for status, r in responses.items():
            if status.startswith(("4", "5")):
                assert r["content"]["application/json"]["schema"] == error, (method, path)
        if "401" not in responses:    # published as open: it answers without a key
            assert method == "GET" and "{" not in path, (method, path)
            with srv.http(None) as h:
                assert h.get(path).status_code == 200, (method, path)
        if "{" in path:
            assert "404" in responses, (method, path)
        if "requestBody" in op:
            assert {"400", "413", "415"} <= set(responses), (method, path)
    assert {"403", "404", "409"} <= set(ops["DELETE", "/v1/models/{model}"]["responses"])
    assert "400" in ops["POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"]["responses"]
    err = schema["components"]["schemas"]["ErrorResponse"]
    assert err["required"] == ["error"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    upload = ops["POST", "/v1/files"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["additionalProperties"] is False
    assert set(upload["properties"]) == {"file", "purpose", "model", "dedupe"}
    assert upload["properties"]["purpose"]["enum"] == ["fine-tune"]
    from tunelab.evaluate.tasks import TASKS
    task = schema["components"]["schemas"]["EvaluationCreate"]["properties"]["task"]
    assert set(task["enum"]) == {"auto", *TASKS}
    # and the server does refuse what the upload schema leaves out
    with srv.http(srv.keys["a"]) as h:
        r = h.post("/v1/files", files={"file": ("x.jsonl", b"{}\n")},
                   data={"purpose": "fine-tune", "colour": "blue"})
        assert _error(r, 400)["param"] == "colour"
        r = h.post("/v1/files", files={"file": ("x.jsonl", b"{}\n")},
                   data={"purpose": "fine-tune", "model": ""})
        assert _error(r, 400)["param"] == "model"


def test_duplicates_are_a_warning_and_dropped_only_when_asked(a, srv):
    """One exact duplicate once made a whole file untrainable. Now: a processed file whose
    report lists the duplicates' lines; a job on it trains (each duplicate again); `dedupe` on
    the upload or on the job drops them, and the plan counts without them."""
    rows = sound_rows()[:36]
    dup = rows + [rows[3], rows[3], rows[10]]          # lines 37, 38 = line 4; 39 = line 11
    f = a.files.create(file=("dups.jsonl", jsonl(dup)), purpose="fine-tune")
    assert f.status == "processed", f.status_details
    v = f.model_extra["validation"]
    assert v["trainable"] and v["valid"] == 39 and not v["errors"]
    assert v["duplicates"] == {"count": 3, "lines": [[37, 4], [38, 4], [39, 11]],
                               "dropped": False}
    (w,) = [w for w in v["warning_details"] if w["kind"] == "duplicates"]
    assert w["lines"] == [[37, 4], [38, 4], [39, 11]] and w["message"] in v["warnings"]

    with srv.http(srv.keys["a"]) as h:
        r = h.post("/v1/files", files={"file": ("dups.jsonl", jsonl(dup))},
                   data={"purpose": "fine-tune", "dedupe": "true"})
        assert r.status_code == 200, r.text
        kept = r.json()["validation"]
        assert kept["valid"] == 36 and kept["duplicates"]["dropped"] is True
        assert kept["tokens"]["examples"] == 36
        assert _error(h.post("/v1/files", files={"file": ("d.jsonl", jsonl(dup))},
                             data={"purpose": "fine-tune", "dedupe": "maybe"}),
                      400)["param"] == "dedupe"
        # the plan of a job with dedupe counts the examples it will train on
        body = {"model": "tiny", "training_file": f.id, "tunelab": {"dedupe": True}}
        plan = h.post("/v1/tunelab/plan", json=body)
        assert plan.status_code == 200, plan.text
        assert plan.json()["examples"] == 36
        assert h.post("/v1/tunelab/plan", json={**body, "tunelab": {}}).json()["examples"] == 39
        err = _error(h.post("/v1/tunelab/plan", json={**body, "tunelab": {"dedupe": "yes"}}), 400)
        assert err["param"] == "tunelab.dedupe"

    plain = a.fine_tuning.jobs.create(model="tiny", training_file=f.id,
                                      extra_body={"tunelab": tiny_training(max_steps=2)})
    deduped = a.fine_tuning.jobs.create(
        model="tiny", training_file=f.id,
        extra_body={"tunelab": tiny_training(max_steps=2, dedupe=True)})
    for job in (plain, deduped):
        job = poll_job(a, job.id, timeout=120)
        assert job.status == "succeeded", job.error     # never failed for duplicates
    events = [e for e in a.fine_tuning.jobs.list_events(deduped.id, limit=100)
              if (e.data or {}).get("kind") == "duplicates_dropped"]
    assert len(events) == 1 and events[0].data["count"] == 3
    assert events[0].data["lines"] == [[37, 4], [38, 4], [39, 11]]
    assert "dups.jsonl" in events[0].message
    assert not [e for e in a.fine_tuning.jobs.list_events(plain.id, limit=100)
                if (e.data or {}).get("kind") == "duplicates_dropped"]
    assert "dedupe" not in deduped.model_extra["tunelab"]["config"]


def test_real_objects_match_their_published_schemas(a, srv, files, done_job):
    """What a 200 holds is published too (server.objects): a finished job, its events and
    checkpoints, files and models as the API really answers them fit their schemas."""
    import jsonschema
    with srv.http(None) as h:
        schema = h.get("/openapi.json").json()

    def check(method: str, template: str, path: str, body=None):
        op = schema["paths"][template][method]
        doc = {**op["responses"]["200"]["content"]["application/json"]["schema"],
               "components": schema["components"]}
        with srv.http(srv.keys["a"]) as h:
            r = h.request(method.upper(), path, json=body)
        assert r.status_code == 200, r.text
        jsonschema.validate(r.json(), doc)
        return r.json()

    job = done_job.id
    train = files[0].id
    got = check("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}", f"/v1/fine_tuning/jobs/{job}")
    assert got["tunelab"]["training_cost"]["usd"] > 0     # a succeeded job's cost
    check("get", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs?limit=100")
    events = check("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
                   f"/v1/fine_tuning/jobs/{job}/events?limit=100")
    kinds = [e["kind"] for e in events["data"]]
    assert {"created", "validating_files", "queued", "started", "metrics", "checkpoint",
            "model_created", "succeeded"} <= set(kinds), kinds
    check("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
          f"/v1/fine_tuning/jobs/{job}/checkpoints")
    check("get", "/v1/files", "/v1/files")
    check("get", "/v1/files/{file_id}", f"/v1/files/{train}")
    check("get", "/v1/models", "/v1/models")
    check("get", "/v1/models/{model}", f"/v1/models/{done_job.fine_tuned_model}")
    # and a schema that does not fit is caught: the check is not vacuous
    broken = {**got, "status": "pending"}
    op = schema["paths"]["/v1/fine_tuning/jobs/{fine_tuning_job_id}"]["get"]
    doc = {**op["responses"]["200"]["content"]["application/json"]["schema"],
           "components": schema["components"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, doc)
