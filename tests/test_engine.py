"""The serving engine: continuous batching, LoRA adapters mixed in one batch, stops, eviction and
failure isolation, on tiny random models. Greedy answers must equal tunelab.inference.generate
(the plain `model.generate` path), which proves that batching and adapter mixing are exact."""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from tunelab.errors import TunelabError
from tunelab.server.engine import GenerationFailed, GenerationRequest
from tunelab.server.engine.local import Engine, _TextStream

PROMPTS = [[{"role": "user", "content": f"Question {i}: what is {'very ' * i}interesting?"}]
           for i in range(8)]


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with larger random weights: its greedy answers vary with the prompt and
    its top logits are far apart (the default init answers every prompt with newlines)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lively") / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, lively_dir):
    """A LoRA adapter on lively_dir with random non-zero B weights, so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(lively_dir)
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    peft.save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(lively_dir)
    return folder


@pytest.fixture(scope="module")
def engine():
    eng = Engine(precision="fp32", memory_budget_bytes=1 << 30, max_batch_size=16)
    yield eng
    eng.close()


def reference(spec, prompts, max_new_tokens):
    from tunelab.inference import generate
    from tunelab.models import load
    model, tokenizer = load(spec)
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)


async def answer(engine, spec, messages, **kw):
    """(full text, chunks) of one streamed request."""
    chunks = [c async for c in engine.generate(GenerationRequest(str(spec), messages, **kw))]
    return "".join(c.text for c in chunks), chunks


async def answer_all(engine, jobs, **kw):
    return await asyncio.gather(*(answer(engine, spec, p, **kw) for spec, p in jobs))


def test_greedy_matches_generate_with_base_and_adapter_rows_in_one_batch(engine, lively_dir,
                                                                         adapter_dir):
    seen = []
    forward = engine._forward

    def spy(m, ids, mask, cache, seqs):
        seen.append({s.unit.adapter for s in seqs})
        return forward(m, ids, mask, cache, seqs)

    engine._forward = spy
    try:
        jobs = [(lively_dir if i % 2 else adapter_dir, p) for i, p in enumerate(PROMPTS)]
        got = asyncio.run(answer_all(engine, jobs, max_new_tokens=12, temperature=0))
    finally:
        del engine._forward
    want_base = reference(lively_dir, PROMPTS[1::2], 12)
    want_tuned = reference(adapter_dir, PROMPTS[0::2], 12)
    assert [t.strip() for t, _ in got[1::2]] == want_base
    assert [t.strip() for t, _ in got[0::2]] == want_tuned
    # the adapter changes answers, and its rows shared forward steps with base rows
    assert reference(lively_dir, PROMPTS[0::2], 12) != want_tuned
    assert any(len(names) == 2 and "__base__" in names for names in seen), seen
    # one copy of the base serves both specs
    assert len({id(u.model) for u in engine._units.values()}) == 1
    assert set(engine.loaded()) >= {str(lively_dir), str(adapter_dir)}
    for _, chunks in got:
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 12
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert chunks[-1].prompt_tokens > 5


@pytest.mark.parametrize("kind", ["dora", "with_embeddings"])
def test_unmixable_adapters_are_served_merged_beside_their_base(tmp_path, engine, lively_dir,
                                                                 kind):
    """PEFT cannot mix DoRA adapters into a batch, and an adapter saved with whole embedding
    layers would overwrite the shared base's: such a fine-tune is a model of its own."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(lively_dir)
    if kind == "with_embeddings":   # as if trained on a resized vocabulary
        torch.nn.init.normal_(base.get_input_embeddings().weight, std=0.3)
    tuned = get_peft_model(base, LoraConfig(r=4, use_dora=kind == "dora",
                                            init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))
    tuned.save_pretrained(tmp_path / kind, save_embedding_layers=kind == "with_embeddings")
    jobs = [(tmp_path / kind, PROMPTS[0]), (lively_dir, PROMPTS[1])]
    got = asyncio.run(answer_all(engine, jobs, max_new_tokens=8, temperature=0))
    assert got[0][0].strip() == reference(tmp_path / kind, PROMPTS[:1], 8)[0]
    assert got[1][0].strip() == reference(lively_dir, PROMPTS[1:2], 8)[0]
    engine.unload(str(tmp_path / kind))
    assert str(tmp_path / kind) not in engine.loaded()


def test_concurrent_requests_share_forward_steps(engine, lively_dir):
    jobs = [(lively_dir, p) for p in PROMPTS]
    start = engine.forward_steps
    batched = asyncio.run(answer_all(engine, jobs, max_new_tokens=10, temperature=0))
    batched_steps = engine.forward_steps - start
    start = engine.forward_steps
    one_by_one = [asyncio.run(answer(engine, lively_dir, p, max_new_tokens=10, temperature=0))
                  for p in PROMPTS]
    sequential_steps = engine.forward_steps - start
    assert [t for t, _ in batched] == [t for t, _ in one_by_one]
    assert sequential_steps == 8 * 10          # one prefill + 9 decode steps per request
    assert batched_steps <= 10 + 8 - 1         # worst case: each request joins a step later


def test_stop_string_trims_the_answer(engine, lively_dir):
    full, _ = asyncio.run(answer(engine, lively_dir, PROMPTS[3], max_new_tokens=16,
                                 temperature=0))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    text, chunks = asyncio.run(answer(engine, lively_dir, PROMPTS[3], max_new_tokens=16,
                                      temperature=0, stop=["never appears", stop]))
    assert text == full[:full.index(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens < 16


def test_sampling_is_reproducible_with_a_seed(engine, lively_dir):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    a = asyncio.run(answer(engine, lively_dir, PROMPTS[2], seed=7, **kw))[0]
    b = asyncio.run(answer(engine, lively_dir, PROMPTS[2], seed=7, **kw))[0]
    greedy = asyncio.run(answer(engine, lively_dir, PROMPTS[2], max_new_tokens=12,
                                temperature=0))[0]
    assert a == b and a != greedy


def test_bad_requests_fail_before_generating(engine, lively_dir):
    long = [{"role": "user", "content": "word " * 600}]     # the model has 512 positions
    cases = [(GenerationRequest("no-such-model", PROMPTS[0]), "unknown model spec"),
             (GenerationRequest(str(lively_dir), long), "takes at most 512"),
             (GenerationRequest(str(lively_dir), PROMPTS[0], max_new_tokens=600), "exceed"),
             (GenerationRequest(str(lively_dir), PROMPTS[0], top_p=0), "top_p"),
             (GenerationRequest(str(lively_dir), [{"role": "user"}]), "content")]
    for request, needle in cases:
        with pytest.raises(TunelabError, match=needle):
            asyncio.run(anext(aiter(engine.generate(request))))
    assert all(m.refs == 0 for m in engine._models.values())


def test_a_failing_batch_fails_its_requests_and_the_engine_keeps_serving(engine, lively_dir):
    forward = engine._forward

    def broken(*args):
        del engine._forward
        raise RuntimeError("boom")

    engine._forward = broken
    with pytest.raises(GenerationFailed, match="boom"):
        asyncio.run(answer(engine, lively_dir, PROMPTS[0], max_new_tokens=4))
    assert engine._forward == forward
    text, chunks = asyncio.run(answer(engine, lively_dir, PROMPTS[0], max_new_tokens=4,
                                      temperature=0))
    assert chunks[-1].finish_reason == "length"
    assert engine._thread.is_alive()


def test_a_client_that_goes_away_leaves_the_batch(engine, lively_dir):
    async def first_chunk_only():
        gen = engine.generate(GenerationRequest(str(lively_dir), PROMPTS[1],
                                                max_new_tokens=400, temperature=0))
        await anext(gen)
        await gen.aclose()
        for _ in range(200):
            if all(m.refs == 0 and not m.batch.rows for m in engine._models.values()):
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(first_chunk_only())


def test_a_client_that_goes_away_while_its_model_loads_holds_nothing(tiny_model_dir):
    eng = Engine(precision="fp32", memory_budget_bytes=1 << 30)

    async def leave_early():
        task = asyncio.ensure_future(answer(eng, tiny_model_dir, PROMPTS[0], max_new_tokens=4))
        await asyncio.sleep(0.05)       # loading takes longer than this
        task.cancel()
        for _ in range(500):
            if eng._models and all(m.refs == 0 for m in eng._models.values()):
                return True
            await asyncio.sleep(0.01)
        return False

    try:
        assert asyncio.run(leave_early())
    finally:
        eng.close()


def test_unload_and_lru_eviction(tmp_path, lively_dir, tiny_model_dir, adapter_dir):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    probe = Engine(precision="fp32", memory_budget_bytes=1 << 30)
    try:
        asyncio.run(answer(probe, lively_dir, PROMPTS[0], max_new_tokens=2))
        one_model = next(iter(probe._models.values())).nbytes
    finally:
        probe.close()
    # room for one model (and an adapter) but not two
    eng = Engine(precision="fp32", memory_budget_bytes=int(one_model * 1.5))
    try:
        asyncio.run(answer(eng, adapter_dir, PROMPTS[0], max_new_tokens=2))
        assert sorted(eng.loaded()) == sorted([str(lively_dir), str(adapter_dir)])
        eng.unload(str(adapter_dir))
        assert eng.loaded() == [str(lively_dir)]
        asyncio.run(answer(eng, other, PROMPTS[0], max_new_tokens=2))
        assert eng.loaded() == [str(other)]             # the least recently used went
        text, _ = asyncio.run(answer(eng, lively_dir, PROMPTS[0], max_new_tokens=6,
                                     temperature=0))
        assert eng.loaded() == [str(lively_dir)]
        assert text.strip() == reference(lively_dir, PROMPTS[:1], 6)[0]
        eng.unload(str(lively_dir))
        assert eng.loaded() == []
    finally:
        eng.close()


def test_prepacked_bf16_linears_give_the_same_logits(lively_dir):
    import torch

    from tunelab.models import load
    from tunelab.server.engine.weights import prepack_linears as _prepack_linears
    model, tokenizer = load(lively_dir, dtype=torch.bfloat16)
    ids = torch.tensor([tokenizer("a few words to look at")["input_ids"]] * 3)
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        added = _prepack_linears(model, 16)
        if added == 0:
            pytest.skip("this CPU/torch has no oneDNN bf16 prepacked linear")
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert added >= sum(m.weight.numel() * 2 for m in model.modules()
                        if type(m) is torch.nn.Linear)


def test_streamed_text_is_whole_characters(smol_tokenizer):
    text = "Grüße, 世界! 🙂🎉 naïve café — ok"
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = _TextStream(smol_tokenizer, [])
    pieces = [stream.push([i], final=False)[0] for i in ids]
    pieces.append(stream.push([], final=True)[0])
    assert "".join(pieces) == smol_tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(text.split())      # some characters really span several tokens


def test_stop_text_split_across_tokens_is_held_back(smol_tokenizer):
    ids = smol_tokenizer("alpha beta END gamma", add_special_tokens=False)["input_ids"]
    stream = _TextStream(smol_tokenizer, [" END"])
    out, stopped = "", False
    for i in ids:
        piece, stopped = stream.push([i], final=False)
        out += piece
        assert "E" not in out
        if stopped:
            break
    assert stopped and out == "alpha beta"
