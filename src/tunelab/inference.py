"""Generation used by eval, compare and chat. Prompts go through the same chat-template code as
training (tunelab.data.render), so training and serving cannot drift apart."""
from __future__ import annotations

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
                         max_new_tokens: int = 256, batch_size: int = 16,
                         temperature: float = 0.0, progress=None,
                         on_batch=None) -> list[Completion]:
    """Answer each conversation's next assistant turn. Greedy unless temperature > 0.

    Batches are made of prompts of similar length (less left padding) and generation stops when
    every row of a batch has emitted its end-of-turn token; results come back in input order.
    `progress` (optional) is called with the number of conversations each batch finished, and
    `on_batch` (optional) with the batch's input indices and completions, as soon as it is done.
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
    device = next(model.parameters()).device
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch = pad_prompts([prompts[i] for i in idx], pad_id)
        width = batch["input_ids"].shape[1]
        started = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(**{k: v.to(device) for k, v in batch.items()}, **gen_kwargs)
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


def generate(model, tokenizer, conversations: Sequence[Sequence[dict[str, Any]]], *,
             max_new_tokens: int = 256, batch_size: int = 16, temperature: float = 0.0,
             progress=None) -> list[str]:
    """The answers' text only (see generate_completions)."""
    return [c.text for c in generate_completions(
        model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size,
        temperature=temperature, progress=progress)]
