"""Attention for training on a CPU: PyTorch's SDPA, except short bf16 rows, which run as plain
matmuls and a softmax (what transformers' "eager" attention computes).

Why by hand: on a CPU, SDPA's flash kernel is the fastest for long rows but carries a fixed cost
per call that dominates short ones; its bf16 backward most of all. Measured on a 2-core AVX-512
BF16 EPYC, 8 rows x 9 heads x 100 tokens, forward + backward: flash 15.1 ms, matmuls 4.5 ms; at
256 tokens they are even (17.1 vs 16.3 ms), and past that flash wins (at 850: 2x). In the demo's
LoRA steps (8 reviews of ~85 tokens) SDPA was 20% of the step. transformers lets a model pick
an attention function by name (AttentionInterface); this one is registered as "tunelab_sdpa",
with SDPA's masks, so everything else about the model stays SDPA's.
"""
from __future__ import annotations

import torch

NAME = "tunelab_sdpa"
# rows up to this many tokens (keys, a cached prefix's included) take the matmul path, in
# bf16/fp16 only: in fp32 the flash kernel is as fast or faster at every length measured
SHORT_ROWS = 192


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
               is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    q_len, k_len = query.shape[-2], key.shape[-2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (query.device.type != "cpu" or query.dtype == torch.float32 or k_len > SHORT_ROWS
            or q_len == 1                                   # decoding: SDPA's
            or (q_len != k_len and attention_mask is None)  # a cache with no mask: SDPA's
            or (dropout and module.training)
            or (attention_mask is None and not causal)      # bidirectional: SDPA's business
            or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is None:     # SDPA's mask function leaves plain causal rows to the kernel
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool,
                                    device=query.device).tril()
    if attention_mask.dtype == torch.bool:
        # the dtype's lowest value, not -inf: a row with nothing to attend to (a left pad)
        # then gets a uniform softmax instead of NaN, as with transformers' eager masks
        scores = scores.masked_fill(~attention_mask[..., :k_len], torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :k_len]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_fast_attention(model) -> None:
    """Switch a transformers model that runs SDPA to "tunelab_sdpa" (same masks, same results
    up to rounding); any other attention implementation is left alone."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
