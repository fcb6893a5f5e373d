"""Generation used by eval, compare and chat. Prompts go through the same chat-template code as
training (tunelab.data.render), so training and serving cannot drift apart."""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.render import render_prompt


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int          # up to and including the end-of-turn token
    stopped: bool                   # False: cut by max_new_tokens before the end-of-turn token
    seconds: float                  # wall time of the batch that produced it


def stop_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def generate_completions(model, tokenizer, conversations: Sequence[Sequence[dict[str, Any]]], *,
                         max_new_tokens: int = 256, batch_size: int | None = None,
                         temperature: float = 0.0, progress=None,
                         on_batch=None) -> list[Completion]:
    """Answer each conversation's next assistant turn. Greedy unless temperature > 0.

    Batches are made of prompts of similar length (less left padding) and generation stops when
    every row of a batch has emitted its end-of-turn token; results come back in input order.
    `batch_size` None: as many rows as a key/value-cache budget holds (generation_batch_size).
    `progress` (optional) is called with the number of conversations each batch finished, and
    with 0 about every second while a batch decodes (a long batch stays cancellable: a progress
    that raises stops generate() there); `on_batch` (optional) with the batch's input indices
    and completions, as soon as it is done.
    """
    import torch

    from tunelab.batching import pad_prompts

    prompts = [render_prompt(c, tokenizer) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Completion | None] = [None] * len(prompts)
    stops = stop_ids(model)
    pad_id = tokenizer.pad_token_id
    model.eval()
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                      eos_token_id=sorted(stops))
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if progress is not None:
        from transformers import StoppingCriteriaList
        gen_kwargs["stopping_criteria"] = StoppingCriteriaList([_Tick(progress)])
    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = generation_batch_size(model, max(map(len, prompts), default=0) + max_new_tokens)
    started = time.perf_counter()      # the first batch's time includes the shared prefix's
    shared = _SharedPrefix.of(model, prompts, device)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        if b:
            started = time.perf_counter()
        if shared is not None:
            inputs = shared.inputs([prompts[i] for i in idx], pad_id)
        else:
            inputs = {k: v.to(device) for k, v in pad_prompts([prompts[i] for i in idx], pad_id).items()}
        width = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            gen = model.generate(**inputs, **gen_kwargs)
        seconds = time.perf_counter() - started
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stops), None)
            produced = new[:end + 1] if end is not None else new
            out[i] = Completion(
                text=tokenizer.decode(produced, skip_special_tokens=True).strip(),
                prompt_tokens=len(prompts[i]), completion_tokens=len(produced),
                stopped=end is not None, seconds=seconds)
        if on_batch is not None:
            on_batch(idx, [out[i] for i in idx])
        if progress is not None:
            progress(len(idx))
    return out  # type: ignore[return-value]


class _Tick:
    """Calls progress(0) at most every TICK_SECONDS between decoding steps; stops nothing."""
    TICK_SECONDS = 1.0

    def __init__(self, progress):
        self.progress, self.last = progress, time.monotonic()

    def __call__(self, input_ids, scores, **kwargs):
        import torch
        if time.monotonic() - self.last >= self.TICK_SECONDS:
            self.last = time.monotonic()
            self.progress(0)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# Decoding reads every weight once per step whatever the batch, so on CPU and GPU alike a step
# of 64 rows costs little more than a step of 16: the demo's general check (104 questions) took
# 29.2 s in batches of 16, 19.6 s of 64, 15.8 s of 104 on a 2-core EPYC. The batch is bounded by
# the key/value cache it must hold (per row: the longest prompt plus max_new_tokens) and by
# MAX_GENERATION_BATCH, past which rows that finished early waste more than a wider step saves.
# The progress ticks (_Tick) keep a long batch cancellable between decoding steps.
KV_CACHE_BUDGET_BYTES = 1 << 30
MAX_GENERATION_BATCH = 128


def generation_batch_size(model, tokens_per_row: int, budget_bytes: int | None = None) -> int:
    """Rows per generate() call whose key/value cache fits the budget: 1 GiB on CPU, a quarter
    of the free memory on a GPU."""
    import torch
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    param = next(model.parameters())
    per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * param.element_size()
    if budget_bytes is None:
        budget_bytes = KV_CACHE_BUDGET_BYTES
        if param.device.type == "cuda":
            budget_bytes = torch.cuda.mem_get_info(param.device)[0] // 4
    rows = budget_bytes // max(1, per_token * max(1, tokens_per_row))
    return int(max(1, min(MAX_GENERATION_BATCH, rows)))


# A prompt prefix shared by every request (the same few-shot examples, a long system prompt) is
# run through the model once and its key/value cache copied into each batch, instead of being
# recomputed for every row: the usual prefix caching of serving engines (vLLM's automatic prefix
# caching), for batch generation through transformers' generate. Below MIN_SHARED_PREFIX tokens
# the copy costs about what it saves.
MIN_SHARED_PREFIX = 32


class _SharedPrefix:
    def __init__(self, model, prefix: list[int], device):
        import torch
        from transformers import DynamicCache
        self.ids = torch.tensor([prefix], dtype=torch.long, device=device)
        self.cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=self.ids, past_key_values=self.cache, use_cache=True)

    @classmethod
    def of(cls, model, prompts: list[list[int]], device) -> "_SharedPrefix | None":
        if len(prompts) < 2 or getattr(model.config, "is_encoder_decoder", False):
            return None
        # os.path.commonprefix compares element-wise: it works on lists of token ids
        n = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
        if n < MIN_SHARED_PREFIX:
            return None
        return cls(model, prompts[0][:n], device)

    def inputs(self, prompts: list[list[int]], pad_id: int) -> dict:
        """generate()'s inputs for a batch: [prefix | left-padded rest], the attention mask
        (pads masked, so positions continue from the prefix) and a copy of the prefix's cache
        with one row per prompt; generate computes only the columns after the cache."""
        import copy

        import torch

        from tunelab.batching import pad_prompts
        n = self.ids.shape[1]
        rest = pad_prompts([p[n:] for p in prompts], pad_id)
        rows = len(prompts)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        device = self.ids.device
        return {"input_ids": torch.cat([self.ids.expand(rows, n),
                                        rest["input_ids"].to(device)], dim=1),
                "attention_mask": torch.cat([torch.ones(rows, n, dtype=torch.long, device=device),
                                             rest["attention_mask"].to(device)], dim=1),
                "past_key_values": cache}


def generate(model, tokenizer, conversations: Sequence[Sequence[dict[str, Any]]], *,
             max_new_tokens: int = 256, batch_size: int | None = None, temperature: float = 0.0,
             progress=None) -> list[str]:
    """The answers' text only (see generate_completions)."""
    return [c.text for c in generate_completions(
        model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size,
        temperature=temperature, progress=progress)]
