"""Batch generation (tunelab.inference): a prompt prefix shared by every request is computed
once and its cache copied into each batch; the answers must be the ones computed without it."""
from __future__ import annotations

import pytest

from tunelab import inference

SHOTS = [m for i in range(4) for m in (
    {"role": "user", "content": f"Example {i}: the parcel arrived {'late ' * (i + 1)}and dented."},
    {"role": "assistant", "content": f"{i + 1}"})]
QUERIES = [f"Question {i}: was it {'really ' * i}worth the price?" for i in range(7)]


@pytest.fixture(scope="module")
def lively(tmp_path_factory, tiny_model_dir):
    """The tiny model with larger random weights (its greedy answers vary with the prompt), and
    a LoRA adapter on it with non-zero weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    tuned = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
        r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])).eval()
    return {"base": base, "lora": tuned}, tok


@pytest.mark.parametrize("which", ["base", "lora"])
def test_a_shared_prefix_is_computed_once_and_changes_no_answer(lively, which, monkeypatch):
    models, tok = lively
    model = models[which]
    convs = [[{"role": "system", "content": "Rate each parcel from 1 to 5."}, *SHOTS,
              {"role": "user", "content": q}] for q in QUERIES]
    prefixes = []
    init = inference._SharedPrefix.__init__

    def spy(self, model, prefix, device):
        prefixes.append(len(prefix))
        init(self, model, prefix, device)

    monkeypatch.setattr(inference._SharedPrefix, "__init__", spy)
    # batch_size 3: three batches, the last one ragged, each with its own copy of the cache
    shared = inference.generate_completions(model, tok, convs, max_new_tokens=8, batch_size=3)
    lengths = [len(inference.render_prompt(c, tok)) for c in convs]
    assert len(prefixes) == 1 and prefixes[0] >= inference.MIN_SHARED_PREFIX
    assert prefixes[0] < min(lengths)          # every row keeps at least one token to compute

    monkeypatch.setattr(inference, "MIN_SHARED_PREFIX", 10**6)
    plain = inference.generate_completions(model, tok, convs, max_new_tokens=8, batch_size=3)
    assert len(prefixes) == 1                  # the second run shared nothing
    assert [c.text for c in shared] == [c.text for c in plain]
    assert [c.completion_tokens for c in shared] == [c.completion_tokens for c in plain]
    assert [c.prompt_tokens for c in shared] == lengths   # the cost per request stays whole
    assert len({c.text for c in shared}) > 1   # the answers depend on the query


def test_prompts_without_a_long_common_prefix_are_not_shared(lively, monkeypatch):
    models, tok = lively
    calls = []
    monkeypatch.setattr(inference._SharedPrefix, "__init__",
                        lambda self, *a: calls.append(a))
    convs = [[{"role": "user", "content": q}] for q in QUERIES]
    out = inference.generate_completions(models["base"], tok, convs, max_new_tokens=4)
    assert calls == [] and len(out) == len(QUERIES)


def test_the_default_batch_is_what_the_key_value_cache_budget_holds(lively, monkeypatch):
    models, tok = lively
    model = models["base"]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4   # fp32
    assert inference.generation_batch_size(model, 100, budget_bytes=per_token * 100 * 5) == 5
    assert inference.generation_batch_size(model, 100, budget_bytes=per_token * 100 * 5 - 1) == 4
    assert inference.generation_batch_size(model, 100, budget_bytes=1) == 1
    assert inference.generation_batch_size(model, 100) == inference.MAX_GENERATION_BATCH
    assert inference.generation_batch_size(models["lora"], 100, budget_bytes=per_token * 300) == 3

    convs = [[{"role": "user", "content": q}] for q in QUERIES]
    longest = max(len(inference.render_prompt(c, tok)) for c in convs)
    rows = []
    generate = type(model).generate
    monkeypatch.setattr(type(model), "generate", lambda self, **kw: (
        rows.append(kw["input_ids"].shape[0]), generate(self, **kw))[1])
    # a budget for 3 rows of (longest prompt + 4 new tokens): 7 queries in batches of 3, 3, 1
    monkeypatch.setattr(inference, "KV_CACHE_BUDGET_BYTES", per_token * (longest + 4) * 3)
    out = inference.generate_completions(model, tok, convs, max_new_tokens=4)
    assert rows == [3, 3, 1] and len(out) == len(QUERIES)


def test_a_progress_that_raises_stops_a_batch_while_it_decodes(lively, monkeypatch):
    """A cancel is noticed between decoding steps, not only once a (possibly 128-row) batch is
    done: generate_completions ticks progress(0) while it decodes."""
    models, tok = lively
    monkeypatch.setattr(inference._Tick, "TICK_SECONDS", 0.0)      # tick on every step
    calls = []

    class Stop(Exception):
        pass

    def progress(n):
        calls.append(n)
        if len(calls) == 3:
            raise Stop
    steps = []
    forward = type(models["base"]).forward
    monkeypatch.setattr(type(models["base"]), "forward",
                        lambda self, *a, **kw: (steps.append(1), forward(self, *a, **kw))[1])
    convs = [[{"role": "user", "content": q}] for q in QUERIES]
    with pytest.raises(Stop):
        inference.generate_completions(models["base"], tok, convs, max_new_tokens=64,
                                       batch_size=len(convs), progress=progress)
    assert calls == [0, 0, 0] and len(steps) <= 4      # stopped after 3 steps, not 64

    calls.clear()
    out = inference.generate_completions(models["base"], tok, convs[:2], max_new_tokens=4,
                                         batch_size=1, progress=lambda n: calls.append(n))
    assert len(out) == 2 and sum(calls) == 2 and calls.count(1) == 2   # ticks add nothing
