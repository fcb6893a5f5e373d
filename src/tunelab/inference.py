"""Generation used by eval, chat and the server. Prompts go through the same chat-template
code as training (tunelab.data.render), so training and serving cannot drift apart."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.data.render import render_prompt


def generate(model, tokenizer, conversations: Sequence[Sequence[dict[str, Any]]], *,
             max_new_tokens: int = 256, batch_size: int = 16, temperature: float = 0.0,
             progress=None) -> list[str]:
    """Answer each conversation's next assistant turn. Greedy unless temperature > 0.

    Batches are made of prompts of similar length (less left padding); results come back in
    input order. `progress` (optional) is called with the number of finished conversations.
    """
    import torch

    prompts = [render_prompt(c, tokenizer) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id
    model.eval()
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                      eos_token_id=model.generation_config.eos_token_id)
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[pad_id] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return out
