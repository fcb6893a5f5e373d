"""A prefix every row of a batch shares (system prompt, instruction), untrained, runs once and its
KV cache is copied to every row: the loss and every gradient must be the whole batch's."""
from __future__ import annotations

import copy

import pytest
import torch

from tunelab import attention
from tunelab.batching import (MIN_SHARED_PREFIX, pad_rows, shared_prefix_length,
                              trained_token_loss)
from tunelab.data.render import IGNORE_INDEX


def rows_with_prefix(prefix: int = 24, lengths=(40, 31, 37, 33), answer: int = 5, seed: int = 0):
    """Rows that share `prefix` tokens, then differ; each trains its last `answer` tokens."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(5, 400, (prefix,), generator=g).tolist()
    rows = []
    for n in lengths:
        ids = head + torch.randint(5, 400, (n - prefix,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n - answer) + ids[-answer:]})
    return rows


def load(tiny_model_dir, dtype=torch.float32, lora: bool = False):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    with torch.no_grad():   # livelier than the 0.02 init, so that differences would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    return model


def loss_and_grads(model, batch, share: bool):
    model.zero_grad()
    part = trained_token_loss(model, batch, share_prefix=share)
    part.loss_sum.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return part, grads


def rel(x, y) -> float:
    return ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("lora", [False, True])
def test_sharing_the_prefix_gives_the_whole_batchs_loss_and_gradients(tiny_model_dir, lora):
    model = load(tiny_model_dir, lora=lora)
    batch = pad_rows(rows_with_prefix(), pad_token_id=0)
    assert shared_prefix_length(model, batch, batch["labels"][:, 1:] != IGNORE_INDEX) == 24
    whole, g_whole = loss_and_grads(model, batch, share=False)
    shared, g_shared = loss_and_grads(model, batch, share=True)
    assert int(shared.trained) == int(whole.trained) == 20
    assert int(shared.correct) == int(whole.correct)
    assert abs(shared.loss_sum.item() - whole.loss_sum.item()) < 1e-4 * whole.loss_sum.item()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(g_shared) == sorted(g_whole) == sorted(trainable)
    for name in trainable:   # the prefix's layers get their gradient through the cache copies
        assert rel(g_shared[name], g_whole[name]) < 1e-4, name


@pytest.mark.parametrize("block", [attention.QUERY_BLOCK, 8])   # after the prefix: 1 or more
def test_in_bf16_the_shared_prefix_is_no_further_from_fp32_than_the_whole_batch(
        tiny_model_dir, block, monkeypatch):
    """bf16 with tunelab's attention, which takes the matmul path after a cached prefix, in
    query blocks that each see the prefix and the queries up to their own."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    exact = load(tiny_model_dir)
    fast = copy.deepcopy(exact).to(torch.bfloat16)
    attention.use_fast_attention(fast)
    batch = pad_rows(rows_with_prefix(), pad_token_id=0)
    ref, g_ref = loss_and_grads(exact, batch, share=False)
    whole, g_whole = loss_and_grads(fast, batch, share=False)
    shared, g_shared = loss_and_grads(fast, batch, share=True)
    off_whole = abs(whole.loss_sum.item() - ref.loss_sum.item()) / ref.loss_sum.item()
    off_shared = abs(shared.loss_sum.item() - ref.loss_sum.item()) / ref.loss_sum.item()
    assert off_shared < 2 * off_whole + 2e-3, (off_shared, off_whole)
    name = "model.layers.0.self_attn.q_proj.weight"     # below the prefix's cache
    assert rel(g_shared[name], g_ref[name]) < 2 * rel(g_whole[name], g_ref[name]) + 2e-2


def test_what_is_shared_stops_before_any_trained_position_and_short_prefixes_are_not(tiny_model_dir):
    model = load(tiny_model_dir)

    def shared(rows):
        b = pad_rows(rows, pad_token_id=0)
        return shared_prefix_length(model, b, b["labels"][:, 1:] != IGNORE_INDEX)

    rows = rows_with_prefix(prefix=30, lengths=(50, 45, 47, 40))
    assert shared(rows) == 30
    # a row trained from token 21 on: position 20's hidden state predicts it, so 20 are shared
    rows[2]["labels"] = [IGNORE_INDEX] * 21 + rows[2]["input_ids"][21:]
    assert shared(rows) == 20
    assert shared(rows_with_prefix(prefix=MIN_SHARED_PREFIX - 1)) == 0
    assert shared(rows_with_prefix()[:1]) == 0                       # one row: nothing to share
    # a row that is all prefix (and trains nothing): every row keeps a token after the shared
    whole = rows_with_prefix(prefix=24)
    whole.append({"input_ids": whole[0]["input_ids"][:24], "labels": [IGNORE_INDEX] * 24})
    assert shared(whole) == 23
    packed = pad_rows([dict(r, position_ids=list(range(len(r["input_ids"]))))
                       for r in rows_with_prefix()], pad_token_id=0)
    assert shared_prefix_length(model, packed, packed["labels"][:, 1:] != IGNORE_INDEX) == 0
    model.activation_checkpointing_enable()   # transformers turns the cache off in training
    model.train()
    assert shared(rows_with_prefix()) == 0
    model.eval()                            # not in evaluation
    assert shared(rows_with_prefix()) == 24
    model.config.sliding_window, model.config.use_sliding_window = 16, True
    assert shared(rows_with_prefix()) == 0


def test_training_runs_the_shared_prefix_once_per_batch(tiny_model_dir, tmp_path):
    """A tunelab run on rows with a common system prompt and instruction: on a CPU each step is
    one flat forward holding the prefix once and every row's rest after it (a prefix tree),
    never the whole rows."""
    import tunelab
    from tunelab.data.io import write_jsonl
    system = {"role": "system", "content": "You are a careful assistant. " * 4}
    rows = [{"messages": [system, {"role": "user", "content": f"Spell the number {i}."},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(16)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    seen = []
    import transformers
    real = transformers.LlamaModel.forward

    def spy(self, input_ids=None, *a, **kw):
        seen.append((tuple(input_ids.shape), kw.get("tunelab_segments")))
        return real(self, input_ids, *a, **kw)

    transformers.LlamaModel.forward = spy
    try:
        tunelab.train({"model": str(tiny_model_dir), "train_file": str(tmp_path / "train.jsonl"),
                       "output_dir": str(tmp_path / "run"), "method": "lora", "epochs": 1,
                       "batch_size": 8, "precision": "fp32"}, quiet=True)
    finally:
        transformers.LlamaModel.forward = real
    train = seen[:2]                                       # 16 rows, batch 8: two steps
    assert all(shape[0] == 1 and segments is not None for shape, segments in train)
    for shape, segments in train:
        starts, ends, p0, p1 = segments.T.tolist()
        assert len(starts) == 8 and ends[-1] == shape[1]
        shared = {b - a for a, b in zip(p0[1:], p1[1:])}
        assert len(shared) == 1 and min(shared) >= 30     # system prompt and user header
        assert all(b - a < 15 for a, b in zip(starts[1:], ends[1:]))   # the rest of a row
        assert set(p0[1:]) == {0}                          # seen in the first row's copy
