"""The engine at scale and under limits, on tiny random models: many adapters of different ranks
in bounded resident slots, the KV cache in the memory budget (admission control and refusal),
chunked prefill, and failures that stay with the request that caused them. Greedy answers must
equal tunelab.inference.generate of each model alone."""
from __future__ import annotations

import asyncio
import time

import pytest

from tunelab.errors import TunelabError
from tunelab.server.engine import GenerationFailed, GenerationRequest
from tunelab.server.engine.local import Engine

from test_engine import PROMPTS, answer, answer_all, lively_dir, reference  # noqa: F401


def make_adapters(root, base, ranks, seed=10):
    """Real PEFT folders with random (non-zero) LoRA weights of the given ranks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    folders = []
    for i, r in enumerate(ranks):
        torch.manual_seed(seed + i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                          target_modules=["q_proj", "v_proj", "down_proj"]))
        folders.append(root / f"adapter{i}-r{r}")
        model.save_pretrained(folders[-1])
    return folders


@pytest.fixture(scope="module")
def six_adapters(tmp_path_factory, lively_dir):   # noqa: F811
    return make_adapters(tmp_path_factory.mktemp("many"), lively_dir, [2, 4, 8, 2, 4, 8])


def resident_counter(eng):
    """Record, at every forward step, how many adapters are resident and which rows ran."""
    seen, forward = [], eng._forward

    def spy(m, ids, mask, cache, seqs):
        seen.append((len(eng.stats()["resident_adapters"].get(m.name, [])),
                     {s.unit.adapter for s in seqs}))
        return forward(m, ids, mask, cache, seqs)

    eng._forward = spy
    return seen


def test_adapters_of_several_ranks_share_batches_in_bounded_slots(lively_dir,  # noqa: F811
                                                                  six_adapters):
    eng = Engine(precision="fp32", memory_budget_bytes=1 << 30, max_adapters=3)
    seen = resident_counter(eng)
    try:
        jobs = [(six_adapters[i % 6], PROMPTS[i % 8]) for i in range(12)]
        jobs += [(lively_dir, PROMPTS[0]), (lively_dir, PROMPTS[1])]
        got = asyncio.run(answer_all(eng, jobs, max_new_tokens=6, temperature=0))
        stats = eng.stats()
    finally:
        eng.close()
    for (spec, prompt), (text, _) in zip(jobs, got):
        assert text.strip() == reference(spec, [prompt], 6)[0], spec
    assert max(n for n, _ in seen) <= 3                  # never more than the slots
    assert stats["adapter_loads"] >= 6 and stats["adapter_evictions"] >= 3
    # rows of adapters of different ranks, and of the base, shared forward steps
    assert any(len(names - {"__base__"}) >= 2 for _, names in seen), seen
    assert len(stats["resident_adapters"][str(lively_dir)]) <= 3


def test_an_adapter_in_use_is_never_evicted(lively_dir, six_adapters):  # noqa: F811
    """One slot: the second adapter waits for the first one's request to finish."""
    eng = Engine(precision="fp32", memory_budget_bytes=1 << 30, max_adapters=1)
    events = []

    async def timed(spec, prompt, n):
        async for c in eng.generate(GenerationRequest(str(spec), prompt, max_new_tokens=n,
                                                      temperature=0)):
            events.append((spec, c.finish_reason))

    async def main():
        first = asyncio.ensure_future(timed(six_adapters[0], PROMPTS[0], 30))
        while not events:
            await asyncio.sleep(0.005)
        await asyncio.gather(first, timed(six_adapters[1], PROMPTS[1], 4))

    try:
        asyncio.run(main())
        assert eng.stats()["adapter_evictions"] == 1
    finally:
        eng.close()
    done_first = events.index((six_adapters[0], "length"))
    assert all(spec == six_adapters[0] for spec, _ in events[:done_first + 1])
    assert events[-1] == (six_adapters[1], "length")


def test_a_row_whose_sampling_fails_fails_alone(monkeypatch, lively_dir):  # noqa: F811
    from tunelab.server.engine import sampling
    real, calls = sampling.sample_row, []

    def sample_row(logits, temperature, top_p, generator):
        if temperature == 0.777:        # its third token fails, in a decode step
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("made to fail")
        return real(logits, temperature, top_p, generator)

    monkeypatch.setattr(sampling, "sample_row", sample_row)
    eng = Engine(precision="fp32", memory_budget_bytes=1 << 30)
    steps = []
    forward = eng._forward
    eng._forward = lambda m, ids, mask, cache, seqs: (
        steps.append([s.temperature for s in seqs]), forward(m, ids, mask, cache, seqs))[1]

    async def main():
        await answer(eng, lively_dir, PROMPTS[0], max_new_tokens=1)   # loaded before the burst
        steps.clear()
        good = [answer(eng, lively_dir, p, max_new_tokens=8, temperature=0)
                for p in PROMPTS[:4]]
        bad = answer(eng, lively_dir, PROMPTS[4], max_new_tokens=8, temperature=0.777)
        return await asyncio.gather(*good, bad, return_exceptions=True)

    try:
        *good, bad = asyncio.run(main())
    finally:
        eng.close()
    assert isinstance(bad, GenerationFailed) and "made to fail" in str(bad)
    assert [t.strip() for t, _ in good] == reference(lively_dir, PROMPTS[:4], 8)
    assert len(calls) == 3
    # the step where it failed was a decode step shared with other requests
    with_bad = [temps for temps in steps if 0.777 in temps]
    assert len(with_bad[2]) > 1, steps


def test_a_prompt_that_breaks_the_prefill_fails_alone(lively_dir):  # noqa: F811
    eng = Engine(precision="fp32", memory_budget_bytes=1 << 30)
    forward = eng._forward

    def spy(m, ids, mask, cache, seqs):
        if ids.shape[1] > 1 and any(s.max_new_tokens == 7 for s in seqs):
            raise RuntimeError("this prompt breaks the model")
        return forward(m, ids, mask, cache, seqs)

    async def main():
        await answer(eng, lively_dir, PROMPTS[0], max_new_tokens=1)   # loaded before the burst
        eng._forward = spy
        jobs = [answer(eng, lively_dir, p, max_new_tokens=8, temperature=0) for p in PROMPTS[:4]]
        jobs.insert(2, answer(eng, lively_dir, PROMPTS[5], max_new_tokens=7, temperature=0))
        return await asyncio.gather(*jobs, return_exceptions=True)

    try:
        got = asyncio.run(main())
    finally:
        eng.close()
    bad = got.pop(2)
    assert isinstance(bad, GenerationFailed) and "breaks the model" in str(bad)
    assert [t.strip() for t, _ in got] == reference(lively_dir, PROMPTS[:4], 8)


def test_a_top_p_or_temperature_that_rounds_to_zero_is_greedy(lively_dir):  # noqa: F811
    eng = Engine(precision="fp32", memory_budget_bytes=1 << 30)
    try:
        text, chunks = asyncio.run(answer(eng, lively_dir, PROMPTS[2], max_new_tokens=8,
                                          temperature=1.0, top_p=1e-300))
        tiny_t, _ = asyncio.run(answer(eng, lively_dir, PROMPTS[2], max_new_tokens=8,
                                       temperature=1e-300))
    finally:
        eng.close()
    want = reference(lively_dir, PROMPTS[2:3], 8)[0]
    assert text.strip() == want and tiny_t.strip() == want
    assert chunks[-1].finish_reason == "length"


def test_the_kv_cache_is_in_the_budget(lively_dir):  # noqa: F811
    """Room for the weights and about three requests' KV cache: ten requests all finish, at
    most three at a time; one that could never fit is refused at once, saying why."""
    probe = Engine(precision="fp32", memory_budget_bytes=1 << 30)
    try:
        asyncio.run(answer(probe, lively_dir, PROMPTS[0], max_new_tokens=1))
        m = next(iter(probe._models.values()))
        weights, per_token = m.nbytes, m.kv_per_token
    finally:
        probe.close()
    from tunelab.data.render import render_prompt
    from tunelab.models import load_tokenizer
    tok = load_tokenizer(lively_dir)
    longest = max(len(render_prompt(p, tok)) for p in PROMPTS)
    new = 24
    per_request = (longest + new) * per_token
    budget = weights + 3 * per_request + per_request // 2
    eng = Engine(precision="fp32", memory_budget_bytes=budget)
    running = []
    forward = eng._forward

    def spy(m, ids, mask, cache, seqs):
        running.append((len(m.in_flight()), eng.stats()["kv_reserved_bytes"]))
        return forward(m, ids, mask, cache, seqs)

    eng._forward = spy
    try:
        jobs = [(lively_dir, PROMPTS[7]) for _ in range(10)]    # the longest prompt
        got = asyncio.run(answer_all(eng, jobs, max_new_tokens=new, temperature=0))
        start = time.perf_counter()
        with pytest.raises(TunelabError, match="KV cache.*--memory-budget-gb") as err:
            asyncio.run(answer(eng, lively_dir, PROMPTS[0], max_new_tokens=400,
                               name="my-model"))
        assert time.perf_counter() - start < 2
        assert err.value.field == "max_tokens" and "'my-model'" in str(err.value)
        assert eng.stats()["kv_bytes"] == 0 and eng.stats()["running"] == 0
    finally:
        eng.close()
    want = reference(lively_dir, [PROMPTS[7]], new)
    assert {t.strip() for t, _ in got} == set(want)
    assert max(n for n, _ in running) == 3
    assert max(r for _, r in running) <= budget - weights


def test_a_long_prompt_is_read_in_chunks_while_others_stream(lively_dir):  # noqa: F811
    eng = Engine(precision="fp32", memory_budget_bytes=1 << 30, prefill_chunk=48)
    long = [{"role": "user", "content": " ".join(f"word{i % 50}" for i in range(170))}]
    events = []
    forward = eng._forward

    def slow(*args):        # steps as slow as a real model's, so the requests overlap
        time.sleep(0.02)
        return forward(*args)

    eng._forward = slow

    async def run(name, messages, n):
        async for c in eng.generate(GenerationRequest(str(lively_dir), messages,
                                                      max_new_tokens=n, temperature=0)):
            events.append((name, c.finish_reason))

    async def main():
        await run("warm", PROMPTS[0], 1)
        events.clear()
        task = asyncio.ensure_future(run("long", long, 6))
        await asyncio.sleep(0.01)
        await asyncio.gather(task, *(run(f"short{i}", PROMPTS[i], 4) for i in range(3)))
        return await answer(eng, lively_dir, long, max_new_tokens=6, temperature=0)

    try:
        text, _ = asyncio.run(main())
    finally:
        eng.close()
    first_long = next(i for i, (name, _) in enumerate(events) if name == "long")
    shorts_done = [i for i, e in enumerate(events) if e[0].startswith("short") and e[1]]
    assert len(shorts_done) == 3 and max(shorts_done) < first_long, events
    # read in chunks, the long prompt's answer is still the model's own
    assert text.strip() == reference(lively_dir, [long], 6)[0]
