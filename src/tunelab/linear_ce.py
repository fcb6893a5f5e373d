"""The LM head and the cross-entropy in one chunked step, on trained positions only.

A causal LM's loss normally needs its logits: [positions x vocabulary] numbers, in fp32 for the
softmax, plus their gradient of the same size. With a 49k-word vocabulary and a few thousand
trained positions per micro-batch that is ~1 GB; with Llama 3's 128k words and a GPU's 32k
tokens it is 16 GB, more than the model. Liger's fused linear cross-entropy and TRL's chunked
loss compute it a chunk of positions at a time and keep only the gradients, never the logits;
this is the same idea in plain PyTorch (so it runs, and is tested, on every device; Liger's
Triton kernel is CUDA-only): the forward pass computes the loss, the argmax hits and both
gradients chunk by chunk, the backward pass only scales the saved gradients.

It applies to models whose logits are exactly `lm_head(final hidden state)` (no soft-capping
or scaling) with the head a plain Linear; `plain_lm_head` says which, and anything else takes
the ordinary path in tunelab.batching.
"""
from __future__ import annotations

import torch

# Architectures whose CausalLM computes logits = lm_head(norm(hidden)) and nothing else.
# (Gemma 2/3 soft-cap their logits, Cohere and Granite scale them: not here.)
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2",
                                    "smollm3"})
CHUNK_ELEMENTS = 1 << 25     # logits per chunk: 128 MB in fp32, whatever the vocabulary


def plain_lm_head(model) -> torch.nn.Linear | None:
    """The model's output Linear when its logits are just that Linear over the final hidden
    state, else None. Sees through DDP / accelerate (`.module`) and PEFT wrappers."""
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if get else None
    # exactly nn.Linear: a LoRA- or token-wrapped head computes something else
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # summed over chunks in fp32 (each chunk's product is in the weights' dtype)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.size(0), chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.t()).float()                        # [chunk, vocab]
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(len(t), device=t.device)
            loss += (lse - logits[rows, t]).sum()
            correct += (logits.argmax(dim=-1) == t).sum()
            if want_hidden or want_weight:
                # d loss / d logits = softmax - one_hot(target), in place over the logits
                g = logits.sub_(lse[:, None]).exp_()
                g[rows, t] -= 1
                g = g.to(hidden.dtype)
                if want_hidden:
                    grad_hidden[start:start + chunk] = g @ weight
                if want_weight:
                    grad_weight += (g.t() @ h).float()
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of argmax hits) of `hidden @ weight.T` against `targets`.

    hidden: [N, H] final hidden states of the trained positions; weight: [V, H] the LM head's;
    targets: [N] token ids (every one trained). Differentiable in hidden and weight.
    """
    chunk = max(16, CHUNK_ELEMENTS // weight.size(0))
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)
