"""`tunelab serve --engine vllm`, driven by the official openai client like test_server.py: a
base model, an `ft:` LoRA fine-tune trained by a job, its checkpoint, streaming, key isolation
and refusals, with generation handed to a real vLLM server (the CPU build from `make vllm`)
that tunelab starts and stops. Greedy answers must equal tunelab's own generation on the same
weights (fp32 both sides): the adapter really is applied, and the prompt is the same."""
from __future__ import annotations

import json

import openai
import psutil
import pytest

from conftest import sound_rows
from tunelab.jobs.store import Model, Store

from test_server_harness import Server, poll_job, tiny_training

QUESTIONS = ["What sound does a cow make?", "hi there", "Tell me about salt."]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def vllm_python():
    from tunelab.errors import TunelabError
    from tunelab.server.engine.vllm import find_python
    try:
        return find_python()
    except TunelabError as e:
        pytest.fail(f"{e} (`make test` builds it)")


@pytest.fixture(scope="module")
def base64(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama whose heads are 64 wide: vLLM's CPU attention kernels take head
    sizes from 32 up, and the suite's usual tiny model has 16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = smol_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      initializer_range=0.3, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base64") / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def random_adapter(folder, base):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
    model.save_pretrained(folder)
    return folder


def full_fine_tune(folder, base):
    """A model folder of its own (what a full fine-tuning job writes): other weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def srv(tmp_path_factory, base64, vllm_python):
    data = tmp_path_factory.mktemp("serve-vllm")
    store = Store(data)
    (alice, alice_token), (_, bob_token) = store.create_key("alice"), store.create_key("bob")
    keys = {"alice": alice_token, "bob": bob_token}
    folder = random_adapter(data / "runs" / "random" / "adapter", base64)
    store.add(Model(id="ft:base64:alice:random:ftjob-random", kind="fine_tuned", owner=alice.id,
                    job_id="ftjob-random", path=str(folder.relative_to(data))))
    full = full_fine_tune(data / "runs" / "full" / "model", base64)
    store.add(Model(id="ft:base64:alice:full:ftjob-full", kind="fine_tuned", owner=alice.id,
                    job_id="ftjob-full", path=str(full.relative_to(data))))
    store.close()
    server = Server(data, "--workers", "1", "--model", f"base64={base64}", "--engine", "vllm",
                    "--vllm-python", vllm_python, "--precision", "fp32")
    server.keys = keys
    server.random_adapter, server.full = folder, full
    yield server
    pids = server.vllm_pids if hasattr(server, "vllm_pids") else []
    assert server.proc.poll() is None, "the server died during the tests"
    server.stop()
    # tunelab stopped the vLLM processes it started, their engine cores included
    assert not [p for p in pids if psutil.pid_exists(p) and
                psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def a(srv):
    client = srv.client(srv.keys["alice"])
    client.timeout = 600      # the first chat waits for vLLM to start
    return client


@pytest.fixture(scope="module")
def done_job(a):
    rows = sound_rows()
    train = a.files.create(file=("sounds.jsonl", jsonl(rows[:36])), purpose="fine-tune")
    valid = a.files.create(file=("valid.jsonl", jsonl(rows[36:])), purpose="fine-tune")
    job = a.fine_tuning.jobs.create(
        model="base64", training_file=train.id, validation_file=valid.id, suffix="sounds",
        seed=7, method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 5}}},
        extra_body={"tunelab": tiny_training()})
    job = poll_job(a, job.id, timeout=300)
    assert job.status == "succeeded", job.error
    return job


def reference(spec, questions=QUESTIONS, max_new_tokens=6) -> list[str]:
    """tunelab's own greedy answers on the same weights, in fp32."""
    import torch

    from tunelab.inference import generate_completions
    from tunelab.models import load_model, load_tokenizer
    tok = load_tokenizer(spec)
    model = load_model(spec, tokenizer=tok, dtype=torch.float32)
    return [c.text for c in generate_completions(
        model, tok, [[{"role": "user", "content": q}] for q in questions],
        max_new_tokens=max_new_tokens)]


def ask(client, model, question, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=6,
        temperature=0, **kw)


def test_base_model_whole_and_streamed(a, srv, base64):
    answers = [ask(a, "base64", q) for q in QUESTIONS]
    assert [r.choices[0].message.content.strip() for r in answers] == reference(base64)
    whole = answers[0]
    assert whole.model == "base64" and whole.object == "chat.completion"
    assert whole.usage.prompt_tokens > 5 and whole.usage.completion_tokens == 6
    assert whole.choices[0].finish_reason == "length"
    chunks = list(ask(a, "base64", QUESTIONS[0], stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6
    with srv.http(srv.keys["alice"]) as h:
        stats = h.get("/v1/tunelab/engine").json()
    assert stats["engine"] == "vllm" and stats["managed"] and stats["started"]
    assert [s["state"] for s in stats["servers"]] == ["ready"]
    assert str(base64) not in json.dumps(stats)          # no server paths
    srv.vllm_pids = [stats["servers"][0]["pid"]] + \
        [c.pid for c in psutil.Process(stats["servers"][0]["pid"]).children(recursive=True)]


def test_a_lora_fine_tune_is_applied(a, srv, base64):
    model = "ft:base64:alice:random:ftjob-random"
    got = [ask(a, model, q).choices[0].message.content.strip() for q in QUESTIONS]
    assert got == reference(srv.random_adapter)
    assert got != reference(base64)                     # the adapter changed the answers
    with srv.http(srv.keys["alice"]) as h:
        stats = h.get("/v1/tunelab/engine").json()
    assert stats["resident_adapters"] == {"base64": 1}
    assert len(stats["servers"]) == 1                   # on the base's process, not its own


def test_a_full_fine_tune_runs_as_its_own_vllm_model(a, srv):
    got = [ask(a, "ft:base64:alice:full:ftjob-full", q).choices[0].message.content.strip()
           for q in QUESTIONS]
    assert got == reference(srv.full)
    with srv.http(srv.keys["alice"]) as h:
        servers = h.get("/v1/tunelab/engine").json()["servers"]
    assert len(servers) == 2 and all(s["state"] == "ready" for s in servers)
    srv.vllm_pids += [p for s in servers for p in
                      [s["pid"], *(c.pid for c in psutil.Process(s["pid"]).children(True))]]


@pytest.mark.parametrize("which", ["final", "checkpoint"])
def test_chat_with_a_job_s_fine_tune_and_checkpoint(a, srv, done_job, which):
    model = done_job.fine_tuned_model if which == "final" else \
        f"{done_job.fine_tuned_model}:ckpt-step-3"
    assert model in {m.id for m in a.models.list()}
    whole = ask(a, model, QUESTIONS[0])
    assert whole.model == model and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(ask(a, model, QUESTIONS[0], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content
    # the same answer as tunelab's own generation from the files the job wrote
    store = Store(srv.data_dir)
    row = store.get(Model, model)
    assert whole.choices[0].message.content.strip() == \
        reference(str(store.path(row.path)), QUESTIONS[:1])[0]


def test_isolation_and_refusals(a, srv, done_job):
    bob = srv.client(srv.keys["bob"])
    with pytest.raises(openai.NotFoundError):
        ask(bob, done_job.fine_tuned_model, "hi")
    with pytest.raises(openai.NotFoundError):
        ask(bob, "ft:base64:alice:random:ftjob-random", "hi")
    with pytest.raises(openai.BadRequestError) as e:      # past the model's 512 positions
        a.chat.completions.create(model=done_job.fine_tuned_model, max_tokens=4,
                                  messages=[{"role": "user", "content": "word " * 700}])
    assert f"model '{done_job.fine_tuned_model}' takes at most 512" in e.value.message
    assert str(srv.data_dir) not in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        ask(a, "base64", "hi", top_p=0)
    assert e.value.body["param"] == "top_p"
    assert ask(a, "base64", "still there?").choices[0].finish_reason == "length"


def test_a_deleted_fine_tune_is_gone(a, srv):
    model = "ft:base64:alice:random:ftjob-random"
    with srv.http(srv.keys["alice"]) as h:
        before = h.get("/v1/tunelab/engine").json()["resident_adapters"]["base64"]
        assert a.models.delete(model).deleted
        with pytest.raises(openai.NotFoundError):
            ask(a, model, "hi")
        after = h.get("/v1/tunelab/engine").json()["resident_adapters"].get("base64", 0)
    assert after == before - 1          # unloaded from vLLM too
