"""DPO through the OpenAI-shaped API (issue 12), against a real `tunelab serve` and its worker,
driven by the official openai client: `method: {"type": "dpo", ...}` maps onto the training
config through the objective registry, a file of the wrong kind fails the job naming it, events
and checkpoints carry the objective's own metrics, and the `ft:` model answers like any other.
Also the extensions the page reads instead of copies: the objectives in /v1/tunelab/info, the
plan (what `auto` resolves to), and a file's preview. One server for the module."""
from __future__ import annotations

import json
import math
from pathlib import Path

import openai
import pytest

from conftest import SOUNDS, sound_rows

from test_server_harness import Server, make_key, poll_job, tiny_training, wait_for


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def stop(client, job_id: str) -> None:
    """Cancel a job this test only needed created (it may have ended already), and wait."""
    try:
        client.fine_tuning.jobs.cancel(job_id)
    except openai.BadRequestError as e:
        assert e.code == "job_not_cancellable", e
    poll_job(client, job_id, timeout=60)


def pairs(fmt: str = "openai") -> list[dict]:
    """The sound task as preferences: the animal's own sound over another animal's."""
    animals = list(SOUNDS)
    out = []
    for i, row in enumerate(sound_rows()):
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        animal = next(a for a, s in SOUNDS.items() if s == answer)
        wrong = SOUNDS[animals[(animals.index(animal) + 1 + i % 3) % len(animals)]]
        if fmt == "openai":
            out.append({"input": {"messages": [{"role": "user", "content": question}]},
                        "preferred_output": [{"role": "assistant", "content": answer}],
                        "non_preferred_output": [{"role": "assistant", "content": wrong}]})
        else:   # TRL's standard form
            out.append({"prompt": question, "chosen": answer, "rejected": wrong})
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("serve-dpo")
    # fp32 like the local loads the answers are compared with: in bf16, where the CPU runs
    # it, a near tie in the tiny model's logits can go the other way
    server = Server(data, "--workers", "1", "--model", f"tiny={tiny_model_dir}",
                    "--precision", "fp32")
    server.key = make_key(data, "dana")
    yield server
    assert server.proc.poll() is None, "the server died during the tests"
    server.stop()


@pytest.fixture(scope="module")
def a(srv):
    return srv.client(srv.key)


@pytest.fixture(scope="module")
def files(a):
    chats, prefs, trl = sound_rows(), pairs(), pairs("trl")
    up = lambda name, rows: a.files.create(file=(name, jsonl(rows)), purpose="fine-tune")  # noqa
    return {"chats": up("sounds.jsonl", chats[:36]), "chats_valid": up("valid.jsonl", chats[36:]),
            "pairs": up("prefs.jsonl", prefs[:36]), "pairs_valid": up("prefs-valid.jsonl",
                                                                        trl[36:])}


def test_preference_files_upload(files):
    for name in ("pairs", "pairs_valid"):
        f = files[name]
        assert f.status == "processed", f.status_details
        assert f.model_extra["validation"]["examples"] == (36 if name == "pairs" else 12)


# ---- the request -> the job's config, and the job object -------------------------------------
def test_a_dpo_job_is_configured_from_its_method(a, files):
    job = a.fine_tuning.jobs.create(
        model="tiny", training_file=files["pairs"].id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}},
        extra_body={"tunelab": {"max_steps": 1, "dpo": {"loss_type": "ipo"}}})
    try:
        assert job.method.type == "dpo" and job.method.supervised is None
        hp = job.method.dpo.hyperparameters
        assert hp.beta == 0.2 and hp.n_epochs == 2 and hp.batch_size == "auto"
        assert hp.learning_rate_multiplier == "auto"
        cfg = job.model_extra["tunelab"]["config"]
        assert cfg["dpo"] == {"beta": 0.2, "loss_type": "ipo"} and cfg["epochs"] == 2
        assert "objective" not in cfg        # method.type says it; the request cannot set it
        again = a.fine_tuning.jobs.retrieve(job.id)
        assert again.method.type == "dpo" and again.method.dpo.hyperparameters.beta == 0.2
    finally:
        stop(a, job.id)


@pytest.mark.parametrize("method, lr", [("lora", 2e-5), ("full", 2e-6)])
def test_learning_rate_multiplier_scales_the_objectives_auto_rate(a, files, method, lr):
    """x2 of DPO's auto rate (a tenth of SFT's), not of SFT's."""
    job = a.fine_tuning.jobs.create(
        model="tiny", training_file=files["pairs"].id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"learning_rate_multiplier": 2}}},
        extra_body={"tunelab": {"method": method, "max_steps": 1}})
    stop(a, job.id)
    assert job.model_extra["tunelab"]["config"]["learning_rate"] == pytest.approx(2 * lr)
    assert job.method.dpo.hyperparameters.learning_rate_multiplier == 2


def test_supervised_still_works_as_before(a, files):
    job = a.fine_tuning.jobs.create(
        model="tiny", training_file=files["chats"].id,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "learning_rate_multiplier": 0.5}}}, extra_body={"tunelab": {"max_steps": 1}})
    stop(a, job.id)
    assert job.method.type == "supervised" and job.method.dpo is None
    assert "beta" not in job.method.supervised.hyperparameters.to_dict()
    assert job.model_extra["tunelab"]["config"]["learning_rate"] == pytest.approx(1e-4)
    plain = a.fine_tuning.jobs.create(model="tiny", training_file=files["chats"].id,
                                      hyperparameters={"n_epochs": 2})    # no method at all
    stop(a, plain.id)
    assert plain.method.type == "supervised"
    assert plain.method.supervised.hyperparameters.n_epochs == 2


@pytest.mark.parametrize("body, param", [
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
     "method.dpo.hyperparameters.beta"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 11}}}},
     "method.dpo.hyperparameters.beta"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "strong"}}}},
     "method.dpo.hyperparameters.beta"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}}},
     "method.dpo.hyperparameters.n_epochs"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"alpha": 1}}}},
     "method.dpo.hyperparameters.alpha"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}},
     "method.supervised.hyperparameters.beta"),      # supervised has no beta
    ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2}}},
      "hyperparameters": {"n_epochs": 3}}, "hyperparameters"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
      "tunelab": {"dpo": {"beta": 0.3}}}, "tunelab.dpo.beta"),          # given twice
    ({"method": {"type": "dpo"}, "tunelab": {"dpo": {"loss_type": "hinge"}}},
     "tunelab.dpo.loss_type"),
    ({"method": {"type": "dpo"}, "tunelab": {"packing": True}}, "tunelab.packing"),
    ({"method": {"type": "supervised"}, "tunelab": {"dpo": {"beta": 0.3}}}, "tunelab.dpo"),
    ({"tunelab": {"objective": "dpo"}}, "tunelab.objective"),
])
def test_bad_dpo_requests_name_their_field(a, srv, files, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        a.fine_tuning.jobs.create(model="tiny", training_file=files["pairs"].id,
                                  extra_body=body)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"]
    with srv.http(srv.key) as h:
        assert h.get("/v1/models").status_code == 200      # still up


def test_a_bad_beta_says_its_bound(srv):
    body = {"model": "tiny", "training_file": "x",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}
    with srv.http(srv.key) as h:
        err = h.post("/v1/fine_tuning/jobs", json=body).json()["error"]
    assert err["message"] == ("Invalid value for 'method.dpo.hyperparameters.beta': Input "
                              "should be greater than 0")


# ---- a file of the wrong kind for the method -------------------------------------------------
@pytest.mark.parametrize("method, train, valid, param, said", [
    ("dpo", "chats", None, "training_file", "preference pairs"),
    ("supervised", "pairs", None, "training_file", "conversations"),
    ("dpo", "pairs", "chats_valid", "validation_file", "preference pairs"),
    ("supervised", "chats", "pairs_valid", "validation_file", "conversations"),
])
def test_a_file_of_the_wrong_kind_is_refused_up_front(a, files, method, train, valid, param,
                                                      said):
    """The kind of a processed file is known when the job is asked for: a 400 naming the file
    and what the method trains on, not a job that fails once queued."""
    from tunelab.objectives import BY_API_TYPE
    with pytest.raises(openai.BadRequestError) as e:
        a.fine_tuning.jobs.create(model="tiny", training_file=files[train].id,
                                  validation_file=files[valid].id if valid else None,
                                  method={"type": method},
                                  extra_body={"tunelab": tiny_training()})
    err = e.value.body
    assert err["param"] == param and err["code"] == f"invalid_{param}", err
    wrong = files[valid or train]
    assert wrong.filename in err["message"] and said in err["message"]
    assert BY_API_TYPE[method].expected_format in err["message"]     # what it expected


# ---- what the page reads instead of copies ---------------------------------------------------
def test_info_publishes_the_objectives(srv):
    from tunelab.objectives import BY_API_TYPE
    with srv.http() as h:
        info = h.get("/v1/tunelab/info").json()
    objectives = {o["api_type"]: o for o in info["objectives"]}
    assert list(objectives) == list(BY_API_TYPE) and {"supervised", "dpo"} <= set(objectives)
    dpo = objectives["dpo"]
    assert dpo["name"] == "dpo" and dpo["data_kind"] == "preferences"
    assert dpo["expected_format"] == BY_API_TYPE["dpo"].expected_format
    hps = {hp["name"]: hp for hp in dpo["hyperparameters"]}
    assert list(hps) == ["n_epochs", "batch_size", "learning_rate_multiplier", "beta"]
    assert hps["beta"]["config_key"] == "dpo.beta" and hps["beta"]["auto"] == 0.1
    assert hps["beta"]["exclusiveMinimum"] == 0 and hps["beta"]["maximum"] == 10
    assert hps["n_epochs"]["maximum"] == 50 and hps["n_epochs"]["auto"] is None   # data decides
    assert dpo["auto_learning_rate"]["lora"] == pytest.approx(2e-5)
    assert objectives["supervised"]["auto_learning_rate"]["full"] == pytest.approx(2e-5)
    assert dpo["metrics"][:2] == ["reward_accuracy", "reward_margin"]
    assert objectives["supervised"]["metrics"] == ["mean_token_accuracy"]
    assert "beta" not in {hp["name"] for hp in objectives["supervised"]["hyperparameters"]}
    assert "openai_dpo" in info["data_formats"]["preferences"]
    assert "messages" in info["data_formats"]["conversations"]
    options = info["tunelab_options"]["properties"]
    assert "dpo" in options and "objective" not in options and "train_file" not in options


def test_the_plan_is_what_the_job_runs(a, srv, files):
    """POST /v1/tunelab/plan resolves `auto` with the same code as training: its steps are the
    steps the job then runs."""
    body = {"model": "tiny", "training_file": files["chats"].id,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 1, "learning_rate_multiplier": 2}}},
            "tunelab": {"max_length": 64, "precision": "fp32", "lora": {"r": 4, "alpha": 8}}}
    with srv.http(srv.key) as h:
        r = h.post("/v1/tunelab/plan", json=body)
        assert r.status_code == 200, r.text
        plan = r.json()
        assert plan["object"] == "tunelab.plan" and plan["examples"] == 36
        assert plan["batch_size"] == 8 and plan["epochs"] == 1 and plan["steps"] == 5
        assert plan["learning_rate"] == pytest.approx(4e-4) and not plan["warnings"]
        assert plan["method"] == {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 2}}}
        assert plan["tokens"] == files["chats"].model_extra["validation"]["tokens"]["epoch_tokens"]
        # auto epochs on a small file: more passes (so ~100 examples' worth of updates)
        auto = h.post("/v1/tunelab/plan", json={**body, "method": {"type": "supervised"}}).json()
        assert auto["epochs"] == 3 and auto["steps"] == 15
        assert auto["learning_rate"] == pytest.approx(2e-4)
        # DPO on pairs: its own auto rate and beta
        dpo = h.post("/v1/tunelab/plan", json={**body, "training_file": files["pairs"].id,
                                                "method": {"type": "dpo"}}).json()
        assert dpo["learning_rate"] == pytest.approx(2e-5) and not dpo["warnings"]
        assert dpo["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
        # the wrong kind of file is a warning, naming what DPO trains on
        wrong = h.post("/v1/tunelab/plan", json={**body, "method": {"type": "dpo"}}).json()
        assert "sounds.jsonl" in wrong["warnings"][0] and "preference" in wrong["warnings"][0]
        # no file yet: what needs no data
        bare = h.post("/v1/tunelab/plan", json={"method": {"type": "dpo"}}).json()
        assert bare["examples"] is None and bare["steps"] is None
        assert bare["learning_rate"] == pytest.approx(2e-5)
        bad = h.post("/v1/tunelab/plan", json={**body, "tunelab": {"lora": {"r": 0}}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tunelab.lora.r"
    job = a.fine_tuning.jobs.create(model="tiny", training_file=files["chats"].id,
                                    method=body["method"], extra_body={"tunelab": body["tunelab"]})
    job = poll_job(a, job.id, timeout=180)
    assert job.status == "succeeded", job.error
    assert job.model_extra["tunelab"]["progress"]["total_steps"] == plan["steps"]
    assert job.method.supervised.hyperparameters.batch_size == plan["batch_size"]


def test_preview_shows_pairs_side_by_side_and_conversations(srv, files):
    with srv.http(srv.key) as h:
        p = h.get(f"/v1/tunelab/files/{files['pairs'].id}/preview", params={"limit": 3}).json()
        assert p["kind"] == "preferences" and len(p["data"]) == 3
        first = pairs()[0]
        assert p["data"][0] == {"line": 1, "prompt": first["input"]["messages"],
                                "chosen": first["preferred_output"][0]["content"],
                                "rejected": first["non_preferred_output"][0]["content"]}
        trl = h.get(f"/v1/tunelab/files/{files['pairs_valid'].id}/preview").json()
        assert trl["kind"] == "preferences" and len(trl["data"]) == 5
        assert trl["data"][0]["prompt"] == [{"role": "user",
                                             "content": pairs("trl")[36]["prompt"]}]
        c = h.get(f"/v1/tunelab/files/{files['chats'].id}/preview").json()
        assert c["kind"] == "conversations"
        assert c["data"][0]["messages"] == sound_rows()[0]["messages"]
        assert h.get("/v1/tunelab/files/file-nope/preview").status_code == 404
        assert h.get(f"/v1/tunelab/files/{files['chats'].id}/preview",
                     params={"limit": 0}).status_code == 400


# ---- a DPO job, end to end -------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_job(a, files):
    job = a.fine_tuning.jobs.create(
        model="tiny", training_file=files["pairs"].id, validation_file=files["pairs_valid"].id,
        suffix="prefs", seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {
            "beta": 0.2, "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 10}}},
        extra_body={"tunelab": tiny_training()})
    return poll_job(a, job.id, timeout=300)


def test_dpo_job_succeeds_with_its_metrics(a, dpo_job):
    job = dpo_job
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:dana:prefs:{job.id}"
    hp = job.method.dpo.hyperparameters           # resolved once training started
    assert hp.beta == 0.2 and hp.n_epochs == 1 and hp.batch_size == 4
    assert hp.learning_rate_multiplier == pytest.approx(10)
    assert job.hyperparameters.batch_size == 4

    events = list(a.fine_tuning.jobs.list_events(job.id, limit=100))
    assert any("direct preference optimisation" in e.message for e in events)
    metrics = [e.data for e in events if e.type == "metrics"]
    train = [d for d in metrics if "train_loss" in d]
    assert sorted(d["step"] for d in train) == list(range(1, 7))
    for d in train:
        assert 0 <= d["train_reward_accuracy"] <= 1
        assert d["train_reward_margin"] == pytest.approx(
            d["train_reward_chosen"] - d["train_reward_rejected"], abs=1e-4)
        assert "train_mean_token_accuracy" not in d
    assert any(d["train_reward_margin"] != 0 for d in train)   # the policy moved
    valid = [d for d in metrics if "valid_loss" in d]
    assert {d["step"] for d in valid} == {3, 6}
    for d in valid:
        assert 0 <= d["valid_reward_accuracy"] <= 1 and math.isfinite(d["valid_reward_margin"])
        assert d["full_valid_reward_accuracy"] == d["valid_reward_accuracy"]

    ckpts = {c.step_number: c for c in a.fine_tuning.jobs.checkpoints.list(job.id)}
    assert sorted(ckpts) == [3, 6]
    m = ckpts[6].metrics
    assert m.valid_loss is not None and m.train_loss is not None
    assert 0 <= m.model_extra["valid_reward_accuracy"] <= 1
    assert "train_reward_margin" in m.model_extra


def test_the_dpo_model_is_served(a, dpo_job):
    messages = [{"role": "user", "content": "What sound does a cow make?"}]
    for model in (dpo_job.fine_tuned_model, f"{dpo_job.fine_tuned_model}:ckpt-step-3"):
        reply = a.chat.completions.create(model=model, messages=messages, max_tokens=4,
                                          temperature=0)
        assert reply.model == model and 1 <= reply.usage.completion_tokens <= 4
    assert dpo_job.fine_tuned_model in {m.id for m in a.models.list()}


def test_a_dpo_job_can_be_cancelled_mid_run(a, files):
    job = a.fine_tuning.jobs.create(
        model="tiny", training_file=files["pairs"].id, method={"type": "dpo", "dpo": {
            "hyperparameters": {"batch_size": 1}}},
        extra_body={"tunelab": tiny_training(max_steps=100_000, save_steps=100_000,
                                             eval_steps=None)})
    wait_for(lambda: (a.fine_tuning.jobs.retrieve(job.id).model_extra["tunelab"]["progress"]
                      or {}).get("step", 0) >= 2, 120, what="DPO training to run")
    a.fine_tuning.jobs.cancel(job.id)
    job = poll_job(a, job.id, timeout=60)
    assert job.status == "cancelled"
    (ckpt,) = list(a.fine_tuning.jobs.checkpoints.list(job.id))
    assert ckpt.step_number >= 2 and "train_reward_accuracy" in ckpt.metrics.model_extra


# ---- DPO after SFT: a job on a fine-tuned model ----------------------------------------------
# `model` = an ft: model (or one of its checkpoints) the caller owns, as the hosted API allows:
# the job starts from its weights, its model is named after the original base, it answers from
# the fine-tune it built on (never from the first base), and the fine-tune it built on cannot be
# deleted from under it.
QUESTIONS = [[{"role": "user", "content": f"What sound does a {animal} make?"}]
             for animal in SOUNDS]


def served(client, model: str) -> list[str]:
    return [client.chat.completions.create(model=model, messages=q, max_tokens=4, temperature=0)
            .choices[0].message.content.strip() for q in QUESTIONS]


def answers(model, tokenizer) -> list[str]:
    from tunelab.inference import generate
    return [t.strip() for t in generate(model, tokenizer, QUESTIONS, max_new_tokens=4)]


def chat_answers(folder) -> list[str]:
    """What `tunelab chat FOLDER` answers: tunelab.models.load, greedy."""
    from tunelab.models import load
    return answers(*load(str(folder)))


def merged_answers(base, *adapters) -> list[str]:
    """`base` with `adapters` merged in, in order (the weights each training started from)."""
    from peft import PeftModel
    from tunelab.models import load
    model, tokenizer = load(str(base))
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return answers(model, tokenizer)


def run_folder(srv, job) -> Path:
    return srv.data_dir / "jobs" / job.id / "run"


@pytest.fixture(scope="module")
def sft_job(a, files):
    """LoRA SFT that moves the tiny model's answers far from the base's (which are empty)."""
    job = a.fine_tuning.jobs.create(
        model="tiny", training_file=files["chats"].id, suffix="sft",
        extra_body={"tunelab": tiny_training(
            max_steps=20, save_steps=10, eval_steps=None, batch_size=8, learning_rate=1e-2,
            lora={"r": 8, "alpha": 16, "target_modules": "all-linear"})})
    job = poll_job(a, job.id, timeout=300)
    assert job.status == "succeeded", job.error
    return job


@pytest.fixture(scope="module")
def dpo_on_sft(a, files, sft_job):
    job = a.fine_tuning.jobs.create(
        model=sft_job.fine_tuned_model, training_file=files["pairs"].id, suffix="after-sft",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
        extra_body={"tunelab": tiny_training(max_steps=4, eval_steps=None, learning_rate=1e-3)})
    return poll_job(a, job.id, timeout=300)


@pytest.fixture(scope="module")
def sft_on_checkpoint(a, files, sft_job):
    """Supervised, on a LoRA checkpoint: its adapters' base is an adapter folder."""
    job = a.fine_tuning.jobs.create(
        model=f"{sft_job.fine_tuned_model}:ckpt-step-10", training_file=files["chats"].id,
        suffix="more", extra_body={"tunelab": tiny_training(max_steps=4, save_steps=2,
                                                             eval_steps=None, learning_rate=1e-3)})
    return poll_job(a, job.id, timeout=300)


def test_dpo_on_a_fine_tuned_model_is_named_after_the_base(a, srv, sft_job, dpo_on_sft):
    job = dpo_on_sft
    assert job.status == "succeeded", job.error
    assert job.model == sft_job.fine_tuned_model                  # as given
    assert job.fine_tuned_model == f"ft:tiny:dana:after-sft:{job.id}"   # OpenAI: the base
    assert job.method.type == "dpo"
    events = [e.message for e in a.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("Fine-tuning started") and sft_job.fine_tuned_model in m
               for m in events)
    # the new adapter's base is the SFT fine-tune (its adapter: a job writes no merged
    # model), not the tiny base
    cfg = json.loads((run_folder(srv, job) / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((run_folder(srv, sft_job) / "adapter").resolve())
    assert job.fine_tuned_model in {m.id for m in a.models.list()}


def test_the_model_answers_from_the_fine_tune_it_built_on(a, srv, tiny_model_dir, sft_job,
                                                          dpo_on_sft):
    run = run_folder(srv, dpo_on_sft)
    want = chat_answers(run / "adapter")
    assert served(a, dpo_on_sft.fine_tuned_model) == want
    # the weights it trained on: the tiny base with the SFT adapter merged, then its own
    assert merged_answers(tiny_model_dir, run_folder(srv, sft_job) / "adapter",
                          run / "adapter") == want
    # the test can tell: on the tiny base (the server's base model) the adapter answers
    # otherwise, and so does the SFT model's first base
    assert merged_answers(tiny_model_dir, run / "adapter") != want
    assert served(a, sft_job.fine_tuned_model) == chat_answers(
        run_folder(srv, sft_job) / "adapter")


def test_a_fine_tune_of_a_lora_checkpoint_is_served_with_it(a, srv, tiny_model_dir, files,
                                                            sft_job, sft_on_checkpoint):
    """Supervised too, on a checkpoint: the new adapters name the checkpoint's adapter folder
    as their base, a chain tunelab.models merges innermost first (for `tunelab chat`, training
    and the server alike)."""
    job = sft_on_checkpoint
    assert job.status == "succeeded", job.error
    assert job.model == f"{sft_job.fine_tuned_model}:ckpt-step-10"
    assert job.fine_tuned_model == f"ft:tiny:dana:more:{job.id}"
    start = srv.data_dir / "jobs" / sft_job.id / "checkpoints" / "step-10"
    run = run_folder(srv, job)
    want = merged_answers(tiny_model_dir, start, run / "adapter")   # what it trained on
    assert served(a, job.fine_tuned_model) == want
    assert merged_answers(tiny_model_dir, run / "adapter") != want   # without the checkpoint
    assert chat_answers(run / "adapter") == want            # the chain, as `tunelab chat` loads it
    step2 = srv.data_dir / "jobs" / job.id / "checkpoints" / "step-2"
    assert served(a, f"{job.fine_tuned_model}:ckpt-step-2") == \
        merged_answers(tiny_model_dir, start, step2)
    # and a chain of chains is a start like any other
    again = a.fine_tuning.jobs.create(model=f"{job.fine_tuned_model}:ckpt-step-2",
                                      training_file=files["chats"].id)
    assert again.model == f"{job.fine_tuned_model}:ckpt-step-2"
    a.fine_tuning.jobs.cancel(again.id)


def test_models_of_another_key_are_not_a_start(srv, files, sft_job):
    other = srv.client(make_key(srv.data_dir, "eve"))
    with pytest.raises(openai.NotFoundError) as e:
        other.fine_tuning.jobs.create(model=sft_job.fine_tuned_model, training_file="file-x")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"


def test_a_model_others_build_on_is_not_deleted(a, srv, files, sft_job, dpo_on_sft,
                                                sft_on_checkpoint):
    sft, ckpt = sft_job.fine_tuned_model, f"{sft_job.fine_tuned_model}:ckpt-step-10"
    pending = a.fine_tuning.jobs.create(
        model=sft, training_file=files["chats"].id,
        extra_body={"tunelab": tiny_training(max_steps=100_000, save_steps=100_000,
                                             eval_steps=None)})
    with pytest.raises(openai.ConflictError) as e:
        a.models.delete(sft)
    err = e.value.body
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "model_in_use" and err["param"] == "model"
    assert err["type"] == "invalid_request_error"
    assert dpo_on_sft.fine_tuned_model in err["message"] and pending.id in err["message"]
    # the job on the checkpoint holds the checkpoint, not the fine-tuned model
    assert sft_on_checkpoint.fine_tuned_model not in err["message"]
    with pytest.raises(openai.ConflictError) as e:
        a.models.delete(ckpt)
    assert sft_on_checkpoint.fine_tuned_model in e.value.body["message"]
    assert served(a, dpo_on_sft.fine_tuned_model)        # nothing was deleted

    # dependents first (what the cancelled job kept is one), then what they built on
    stop(a, pending.id)
    for job in (dpo_on_sft, sft_on_checkpoint, pending):
        kept = [c.fine_tuned_model_checkpoint for c in a.fine_tuning.jobs.checkpoints.list(job.id)]
        for model in kept + ([job.fine_tuned_model] if job.fine_tuned_model else []):
            assert a.models.delete(model).deleted
    assert a.models.delete(sft).deleted
    assert a.models.delete(ckpt).deleted
    assert not run_folder(srv, sft_job).exists()
    ids = {m.id for m in a.models.list()}
    assert not {sft, ckpt, dpo_on_sft.fine_tuned_model} & ids
    with pytest.raises(openai.NotFoundError):
        a.fine_tuning.jobs.create(model=sft, training_file=files["chats"].id)
