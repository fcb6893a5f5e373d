"""Attention for training on a CPU: PyTorch's SDPA, except bf16 rows up to TRAINING_ROWS tokens
(SHORT_ROWS without gradients), which run as plain matmuls and a softmax (what transformers'
"eager" attention computes), in causal blocks of queries.

Why by hand: on a CPU, SDPA's flash kernel is the fastest for long rows but carries a fixed cost
per call that dominates short ones; its bf16 backward most of all. Measured on a 2-core AVX-512
BF16 EPYC, 8 rows x 9 heads x 100 tokens, forward + backward: flash 15.1 ms, matmuls 4.5 ms; at
256 tokens they are even (17.1 vs 16.3 ms), and past that whole-row matmuls lose (at 850: 2x)
unless the queries go in causal blocks (QUERY_BLOCK). Since training runs under a kept heap
(runtime.training_allocator: the blocks' big temporaries are no longer fresh pages) and with
the blocks' own backward (_BlockAttention), they win at every length measured while gradients
are computed (one SmolLM2 layer, forward + backward, flash vs blocks: 3 x 742 with padding
masks 121 vs 60 ms, 1 x 850 without a mask 36 vs 32, 1 x 2048 214 vs 113); what bounds them is
memory (TRAINING_ROWS). In the demo's LoRA steps (8 reviews of ~85 tokens) SDPA was 20% of the
step; in a full fine-tuning step of the bench's rows (1 x 850, 1 x 522, 2 x 305, 4 x 121
tokens) blocks up to 768 instead of whole rows up to 192 took the step from 9.52 to 8.95 s
(medians of 5, interleaved). transformers lets a model pick an attention function by name
(AttentionInterface); this one is registered as "tunelab_sdpa", with SDPA's masks, so
everything else about the model stays SDPA's.

On a GPU the same name runs packed sequences (flat forwards, packed rows) through PyTorch's
varlen FlashAttention kernel, with no mask at all (see VARLEN_DEVICES); everything else there is
SDPA's.
"""
from __future__ import annotations

import functools
import inspect
import weakref

import torch

NAME = "tunelab_sdpa"
# Rows up to this many tokens (keys, a cached prefix's included) take the matmul path, in
# bf16/fp16 only (in fp32 the flash kernel is as fast or faster at every length measured):
# TRAINING_ROWS where gradients are computed, SHORT_ROWS without (generation, validation). The
# flash kernel's forward alone is fast: without gradients the blocks lose past ~192 tokens
# (16 rows x 405 tokens: flash 61.6 ms, blocks 91.9; 128 x 90 queries on 405 keys: 163 vs 347).
SHORT_ROWS = 192
# With gradients the blocks keep their probabilities for the backward, 2 bytes a score: per
# row ~L^2/2 x heads x layers (SmolLM2, 1,024 tokens in blocks of 256: 0.35 GB), where the
# flash kernel keeps O(L). Up to tunelab's default max_length that is about half of what the
# rest of the model keeps for the row's backward; longer rows go to the flash kernel.
TRAINING_ROWS = 1024
# The matmul path runs queries in blocks of this many, each against the keys up to its last
# query only (causal: the rest are masked), so a long row skips the masked half of the scores
# as the flash kernel does, while each block stays one plain batched matmul. Measured on a
# 2-core AVX-512 BF16 EPYC, one row x 9 heads, forward + backward of one layer: 305 tokens
# flash 11.1 ms, whole-row matmuls 7.3, blocks of 256 6.3; 522: 17.8 / 17.9 / 12.7 (blocks of
# 128: no faster at any length measured, 3 x 742: 70 vs 60 ms).
QUERY_BLOCK = 256


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
               is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    q_len, k_len = query.shape[-2], key.shape[-2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if query.device.type in VARLEN_DEVICES:
        bounds = _varlen_bounds(module, query, key, attention_mask, causal, dropout, kwargs)
        if bounds is not None:
            return _varlen_attention(query, key, value, *bounds, scaling or
                                     query.shape[-1] ** -0.5), None
    segments = _segments(kwargs, q_len, k_len)
    # a flat forward (tunelab.batching.flatten_rows): several sequences in one row, each
    # attending to itself only (and a sequence after a shared prefix to that prefix too).
    # transformers' block-diagonal mask over the whole row (from the position_ids) is right for
    # plain sequences but costs the row's length squared; each sequence on its own in the
    # blocks costs its own length squared, in any dtype, with gradients or without
    longest = TRAINING_ROWS if torch.is_grad_enabled() or segments is not None else SHORT_ROWS
    too_long = (max(b - a + p1 - p0 for a, b, p0, p1 in segments) if segments
                else k_len) > longest
    if (query.device.type != "cpu" or too_long
            or (query.dtype == torch.float32 and segments is None)
            or q_len == 1                                   # decoding: SDPA's
            or (q_len != k_len and attention_mask is None)  # a cache with no mask: SDPA's
            or (dropout and module.training)
            or (not causal and (attention_mask is None or segments is not None))  # bidirectional:
            # SDPA's business
            or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks"))):
        if segments is not None and any(p1 > p0 for _, _, p0, p1 in segments):
            # no mask transformers can build says "this sequence also sees that prefix"
            raise RuntimeError("a flat forward with shared prefixes reached an attention that "
                               "cannot run it (tunelab.batching.prefix_trees must not build "
                               "it for this model or these lengths)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling or query.shape[-1] ** -0.5
    if segments is not None:
        attention_mask = None        # each sequence is plainly causal within itself
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        out = _BlockAttention.apply(query, key, value, attention_mask, scale, causal, segments)
    else:
        out, _ = _forward_blocks(query, key, value, attention_mask, scale, causal, segments)
    return out.transpose(1, 2).contiguous(), None


# -- on a GPU: PyTorch's varlen FlashAttention for packed sequences ------------------------------
# A flat forward (or packed rows) on a GPU runs each sequence on its own through
# torch.nn.attention.varlen (PyTorch's own FlashAttention varlen kernel, torch >= 2.10), so the
# padding-free path needs no flash-attn package, which has no wheels for most torch/CUDA pairs
# and takes hours to build. Without it transformers would build the packed rows' block-diagonal
# mask, [tokens x tokens] (a 32k-token forward: 1 GB), and SDPA would compute every masked score.
VARLEN_DEVICES = ("cuda",)
# Architectures whose attention is plain causal softmax attention over every position (no
# soft-capping, sinks or alibi); a sliding window is checked on the config.
VARLEN_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2",
                                "smollm3"})


@functools.cache
def _varlen_kernel():
    """(varlen_attn, the names of its parameters), or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_runs(config, dtype, device) -> bool:
    """Whether packed sequences of this model, in this dtype on this device, run through the
    varlen kernel (and so need no mask): the one decision the mask function, the attention and
    the choice of flat forwards (tunelab.train.run) share."""
    device = torch.device(device)
    if device.type not in VARLEN_DEVICES or _varlen_kernel() is None:
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return False                                  # FlashAttention: Ampere and newer
    head_dim = getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None)
    return (dtype in (torch.bfloat16, torch.float16)
            and getattr(config, "model_type", None) in VARLEN_MODEL_TYPES
            and head_dim % 8 == 0 and head_dim <= 256          # FlashAttention's head sizes
            and not getattr(config, "attention_dropout", 0.0)
            and (window is None or getattr(config, "use_sliding_window", True) is False))


def _mask(**kwargs):
    """transformers' SDPA mask, except none at all for causal rows without padding where the
    varlen kernel runs: packed sequences then go to it (the attention finds their bounds),
    one sequence a row to SDPA's causal kernel, and the [tokens x tokens] mask is never built."""
    from transformers.masking_utils import sdpa_mask
    config = kwargs.get("config")
    if (config is not None and kwargs.get("attention_mask") is None
            and kwargs.get("q_length") == kwargs.get("kv_length")
            and not kwargs.get("q_offset") and not kwargs.get("kv_offset")
            and kwargs.get("local_size") is None and not kwargs.get("use_vmap")  # no other rules
            and "allow_is_bidirectional_skip" not in kwargs                    # causal only
            and varlen_runs(config, kwargs.get("dtype"), kwargs.get("device", "cpu"))):
        return None
    return sdpa_mask(**kwargs)


def _varlen_bounds(module, query, key, attention_mask, causal, dropout, kwargs):
    """(cumulative lengths as int32, longest) of the sequences packed in these rows, for the
    varlen kernel; None for rows with a mask or one sequence each (SDPA's business)."""
    if (attention_mask is not None or "tunelab_segments" in kwargs
            or query.shape[-2] != key.shape[-2]):
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and query.shape[0] == 1:
        # a flat forward's bounds (flatten_rows, DataCollatorWithFlattening) cover the whole
        # row; read as given: checking on a GPU would be a device sync in every layer
        longest = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
        bounds = cu.to(device=query.device, dtype=torch.int32), int(longest)
    elif kwargs.get("position_ids") is not None:
        bounds = _bounds_from_positions(kwargs["position_ids"], query.shape[0],
                                        query.shape[-2])
        if bounds is None:
            return None
    else:
        return None
    if not (causal and not (dropout and module.training)
            and varlen_runs(module.config, query.dtype, query.device)):
        # _mask left the mask out only where varlen_runs: never reached unless they disagree
        raise RuntimeError("packed sequences without a mask reached an attention that cannot "
                           "keep them apart (tunelab.attention.varlen_runs)")
    return bounds


_POSITIONS_SEEN: list = [None, None]    # (weak reference to position_ids, its bounds)


def _bounds_from_positions(position_ids, rows: int, length: int):
    """The sequences of `rows` rows from their position ids: a new one wherever a position is
    not the one before it plus one, and at each row's start. None if each row holds one.
    Every layer asks with the same tensor: found once a forward (it costs a device sync)."""
    ref, bounds = _POSITIONS_SEEN
    if ref is not None and ref() is position_ids:
        return bounds
    pos = position_ids.expand(rows, -1).reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    starts[::length] = True
    at = starts.nonzero().flatten()
    if at.numel() == rows:
        bounds = None
    else:
        cu = torch.cat([at, at.new_tensor([pos.numel()])]).to(torch.int32)
        bounds = cu, int((cu[1:] - cu[:-1]).max())
    _POSITIONS_SEEN[:] = [weakref.ref(position_ids), bounds]
    return bounds


def _varlen_attention(query, key, value, cu, longest: int, scale: float):
    """[rows, heads, tokens, dim] -> [rows, tokens, heads, dim] through the varlen kernel, every
    sequence causal within itself (the rows flattened into one stream of tokens). Written for
    both of torch's signatures: 2.10's (is_causal, no scale or GQA) and later ones'."""
    from transformers.integrations.sdpa_attention import repeat_kv
    kernel, params = _varlen_kernel()
    rows, heads, length, dim = query.shape
    kw = {}
    if key.shape[1] != heads:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            key = repeat_kv(key, heads // key.shape[1])
            value = repeat_kv(value, heads // value.shape[1])
    if "scale" in params:
        kw["scale"] = scale
    elif abs(scale - dim ** -0.5) > 1e-12 * scale:
        query = query * (scale * dim ** 0.5)
    kw.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})

    def tokens(x):
        return x.transpose(1, 2).reshape(rows * length, x.shape[1], dim)
    out = kernel(tokens(query), tokens(key), tokens(value), cu, cu, longest, longest, **kw)
    return out.reshape(rows, length, heads, dim)


Segment = tuple[int, int, int, int]


def _segments(kwargs, q_len: int, k_len: int) -> tuple[Segment, ...] | None:
    """The sequences of a flat forward, as (start, end, prefix start, prefix end) along the row:
    a sequence after a shared prefix (`tunelab_segments`, from flatten_rows) also sees that
    prefix's keys; plain ones (the cumulative lengths transformers passes varlen kernels,
    `cu_seq_lens_q`) have an empty prefix. None for ordinary rows."""
    if q_len != k_len:
        return None
    tree = kwargs.get("tunelab_segments")
    if tree is not None:
        return tuple(tuple(s) for s in tree.tolist())
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        return None
    bounds = cu_seq_lens.tolist()
    if bounds[-1] != q_len:
        return None
    return tuple((a, b, a, a) for a, b in zip(bounds, bounds[1:]) if b > a)


def _forward_blocks(query, key, value, attention_mask, scale, causal, segments=None, *,
                    keep=False):
    """The output, and each block's probabilities if `keep` (for a backward)."""
    probs, outs = [], []
    for q0, q1, keys in _blocks(query.shape[-2], key.shape[-2], causal, segments):
        p = _block_probs(query, key, attention_mask, scale, q0, q1, keys)
        if keep:
            probs.append(p)
        outs.append(torch.matmul(p, _take(value, keys)))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)), probs


def _blocks(q_len: int, k_len: int, causal: bool, segments=None):
    """(first query, end query, key ranges) per block of QUERY_BLOCK queries: the keys the
    block's queries may see (later keys are masked for the whole block, so skipped). The last
    range is causal for the block's queries; a shared prefix before it is seen whole."""
    if segments is not None:     # a flat forward: each sequence sees only itself (+ its prefix)
        for a, b, p0, p1 in segments:
            for start in range(a, b, QUERY_BLOCK):
                end = min(b, start + QUERY_BLOCK)
                yield start, end, ((p0, p1), (a, end)) if p1 > p0 else ((a, end),)
        return
    past = k_len - q_len                 # a cached prefix: query i sees keys up to past + i
    for start in range(0, q_len, QUERY_BLOCK):
        end = min(q_len, start + QUERY_BLOCK)
        yield start, end, ((0, past + end if causal else k_len),)


def _take(x, ranges):
    """x's positions in the key ranges, along dim 2 (a view for one range)."""
    if len(ranges) == 1:
        (a, b), = ranges
        return x[:, :, a:b]
    return torch.cat([x[:, :, a:b] for a, b in ranges], dim=2)


def _give(grad, block_grad, ranges):
    """grad[ranges] += block_grad (the inverse of _take)."""
    at = 0
    for a, b in ranges:
        grad[:, :, a:b] += block_grad[:, :, at:at + b - a]
        at += b - a


def _block_probs(query, key, attention_mask, scale, q0, q1, keys):
    """The block's attention probabilities, in the query's dtype (softmax taken in fp32)."""
    scores = torch.matmul(query[:, :, q0:q1], _take(key, keys).transpose(2, 3)) * scale
    if attention_mask is None:   # plain causal rows, no cache (see above; SDPA's mask function
        # leaves them to the kernel), or a flat forward's sequence: query i sees keys up to i
        # (and its shared prefix, the first range, whole)
        past = key.shape[-2] - query.shape[-2]
        k0, k1 = keys[-1]
        mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool,
                          device=query.device).tril(diagonal=q0 + past - k0)
        if len(keys) > 1:
            mask = torch.cat([mask.new_ones(q1 - q0, scores.shape[-1] - (k1 - k0)), mask], 1)
    else:
        (k0, k1), = keys
        mask = attention_mask[..., q0:q1, k0:k1] if attention_mask.shape[-2] > 1 \
            else attention_mask[..., k0:k1]
    if mask.dtype == torch.bool:
        # the dtype's lowest value, not -inf: a row with nothing to attend to (a left pad) then
        # gets a uniform softmax instead of NaN, as with transformers' eager masks
        scores = scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores.add_(mask)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)


class _BlockAttention(torch.autograd.Function):
    """The blocks with a backward written out, keeping only each block's probabilities in the
    query's dtype (2 bytes a score) for it: autograd through the ops above would also keep the
    fp32 softmax output (4 more) and run the softmax's backward on it. Measured on a 2-core
    EPYC, one layer of SmolLM2 (9 heads), forward + backward, medians of 5 interleaved,
    autograd's vs this: 3 x 742 with padding masks 66.1 vs 64.7 ms and 74 vs 30 MB kept; 1 x
    2048 133.5 vs 114.2 ms, 153 vs 52 MB; 4 x 194 8.4 vs 9.0 ms. The backward is the standard
    one (as in FlashAttention): dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
    dQ = dS K * scale, dK = dS^T Q * scale, with dK and dV summed over the blocks in fp32.
    A masked score has P = 0, so it passes no gradient; a query row with nothing to attend to
    (a left pad) gets a uniform P, and no gradient either, since no loss reads its output."""

    @staticmethod
    def forward(ctx, query, key, value, attention_mask, scale, causal, segments):
        out, probs = _forward_blocks(query, key, value, attention_mask, scale, causal, segments,
                                     keep=True)
        ctx.save_for_backward(query, key, value, out, *probs)
        ctx.scale, ctx.causal, ctx.segments = scale, causal, segments
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, *probs = ctx.saved_tensors
        grad_out = grad_out.to(query.dtype)
        # rowsum(dP * P) = rowsum(dO * O): per query, over the head dim instead of the keys
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        dq = torch.empty_like(query)
        dk = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
        dv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        for p, (q0, q1, keys) in zip(probs, _blocks(query.shape[-2], key.shape[-2],
                                                    ctx.causal, ctx.segments)):
            d_o = grad_out[:, :, q0:q1]
            _give(dv, torch.matmul(p.transpose(2, 3), d_o), keys)
            dp = torch.matmul(d_o, _take(value, keys).transpose(2, 3))
            ds = (p * (dp.float() - delta[:, :, q0:q1])).to(query.dtype)
            dq[:, :, q0:q1] = torch.matmul(ds, _take(key, keys)) * ctx.scale
            _give(dk, torch.matmul(ds.transpose(2, 3), query[:, :, q0:q1]), keys)
        dk *= ctx.scale
        return dq, dk.to(key.dtype), dv.to(value.dtype), None, None, None, None


def use_fast_attention(model) -> None:
    """Switch a transformers model that runs SDPA to "tunelab_sdpa" (same results up to
    rounding; the same masks, but none for packed sequences where the varlen kernel runs them);
    any other attention implementation is left alone."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask)
    model.set_attn_implementation(NAME)
