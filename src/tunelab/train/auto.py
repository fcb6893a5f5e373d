"""Resolve `auto` hyperparameters and the step plan, before any model is loaded.

The rules (documented in the README), in the spirit of the OpenAI fine-tuning API:
- epochs: 3; a small dataset is seen more often so that at least ~100 examples' worth of
  updates happen (at most 25 epochs); a large one fewer, about 25,000 examples in all (>= 1).
- batch_size (global, examples per optimizer step): 8 below 2,000 examples, 16 below 10,000,
  else 32. Small data wants more, noisier steps; big data, steadier ones.
- micro_batch_size (examples per forward pass at the longest example's length): the largest
  power of two that keeps a forward pass within a token budget (4,096 padded tokens on CPU,
  32,768 on GPU) for the longest example, at most the batch. Activation memory grows with the
  tokens of one forward pass, and a CPU gains nothing from more than a few thousand rows per
  matmul. micro_batch_size x the longest example is then every forward pass's budget of padded
  tokens (`forward_tokens`): each optimizer step's examples are split into forward passes of
  similar lengths within it (tunelab.batching.split_by_tokens), so a forward holds more short
  examples than long ones and pads little; the passes of a step accumulate gradients (the loss
  is normalised by the step's trained tokens, so the result is the same), and the global batch
  is split over the processes of a distributed run.
- learning_rate: the objective's rule (tunelab.objectives): for SFT 2e-4 for LoRA / DoRA /
  QLoRA (adapters start at zero and need large steps), 2e-5 for full fine-tuning (the usual
  SFT rate for small models); for DPO a tenth of those.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tunelab.config import TrainConfig
from tunelab.errors import TunelabError


@dataclass(frozen=True)
class Plan:
    epochs: float
    batch_size: int            # effective global batch: micro * accumulation * world
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    learning_rate: float
    steps_per_epoch: int
    total_steps: int
    eval_steps: int
    save_steps: int
    logging_steps: int
    forward_tokens: int        # padded tokens one forward pass may hold (micro x the longest)
    forward_overhead: int      # a forward's fixed cost, in tokens' worth (FORWARD_OVERHEAD_TOKENS)
    # validation: no activations are kept for a backward, so its batches fill the whole token
    # budget at the longest validation row (the demo's 91 reviews: 8 rows a batch 5.9-7.5 s, 21
    # rows 4.9-5.5 s)
    eval_batch_size: int = 1
    eval_forward_tokens: int = 0


def auto_epochs(n: int) -> float:
    if n * 3 < 100:
        return float(min(25, math.ceil(100 / n)))
    if n * 3 > 25_000:
        return float(max(1, 25_000 // n))
    return 3.0


def auto_batch_size(n: int) -> int:
    return 8 if n < 2_000 else 16 if n < 10_000 else 32


def auto_learning_rate(method: str, objective: str = "sft") -> float:
    from tunelab.objectives import get
    return get(objective).auto_learning_rate(method)


TOKENS_PER_FORWARD = {"cpu": 4096, "gpu": 32768}
# The fixed cost of one forward and backward pass, in tokens' worth of compute, which decides
# when splitting a step's examples into one more forward pays for the padding it saves. On CPU
# measured on SmolLM2-135M, 2 EPYC cores, full fine-tuning in bf16: 1 row of 8 tokens 0.39 s,
# 1 x 128 0.69 s, 4 x 512 6.8 s (~300 tokens/s), so ~100 tokens, more where small matmuls run
# below the peak (1 x 512 took 2.3 s); LoRA ~0.2 s at 8 tokens. On the bench's steps 192 beat
# 96 (steps 51 vs 56 s in one run each). On a GPU a forward's kernel launches cost milliseconds
# against ~10^5 tokens/s: ~1,000 tokens (an estimate, not yet measured).
FORWARD_OVERHEAD_TOKENS = {"cpu": 192, "gpu": 1024}
MAX_EVAL_BATCH = 64


# On a GPU the budget is also what its free memory holds: the activations a forward keeps for
# its backward grow with the model, and no checkpointing is on by default. Per token and layer,
# in bf16, a Llama-style layer keeps ~36 x hidden bytes (norm inputs and their fp32 upcasts,
# q/k/v, RoPE's outputs, the attention's output, o_proj's input) plus ~8 x intermediate (the
# MLP's gate, up, SiLU and product), a little more with LoRA's dropout: taken here as 40 and 10
# (an estimate from the saved tensors, not yet measured: bench/gpu.py prints the peak).
# SmolLM2-135M: ~1 MB a token, 32k tokens fit an 80 GB GPU; TinyLlama-1.1B ~3 MB; an 8B ~10 MB.
ACTIVATION_BYTES = {"hidden": 40, "intermediate": 10}
# Bytes a parameter holds in training besides activations: full fine-tuning's bf16 weight and
# gradient, fp32 master, its gradient and two AdamW moments; LoRA/DoRA the bf16 base; QLoRA the
# 4-bit base (0.5, with its quantization constants)
STATE_BYTES = {"full": 20.0, "lora": 2.0, "dora": 2.0, "qlora": 0.6}
GPU_MEMORY_USE = 0.7    # of the free memory: the allocator's fragmentation, CUDA's workspaces


def gpu_forward_budget(config, method: str, free_bytes: int, *,
                       checkpointing: bool = False) -> int:
    """Tokens per forward that this model's activations fit into `free_bytes` of GPU memory,
    beside its weights and optimizer state; TOKENS_PER_FORWARD["gpu"] at most."""
    h = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or 4 * h
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (h // heads)
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * inner) + \
        config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    per_layer = ACTIVATION_BYTES["hidden"] * h + ACTIVATION_BYTES["intermediate"] * inner
    # with checkpointing a layer keeps its input only, and one layer is recomputed at a time
    per_token = layers * 2 * h + per_layer if checkpointing else layers * per_layer
    room = GPU_MEMORY_USE * free_bytes - params * STATE_BYTES.get(method, STATE_BYTES["full"])
    return int(max(1, min(TOKENS_PER_FORWARD["gpu"], room // per_token)))


def auto_micro_batch_size(batch: int, longest: int, world_size: int, budget: int) -> int:
    cap = max(1, min(batch // world_size or 1, budget // max(1, longest)))
    return 1 << (cap.bit_length() - 1)   # a power of two: it divides the usual batch sizes


def make_plan(cfg: TrainConfig, n_train: int, *, n_examples: int | None = None,
              longest: int | None = None, longest_valid: int | None = None, world_size: int = 1,
              on_gpu: bool = False, gpu_budget: int | None = None) -> Plan:
    """`n_train`: training rows (packed rows when packing); `n_examples`: the examples in them,
    which the auto rules follow; `longest`: the longest row, in tokens (`longest_valid`: of the
    validation rows); `gpu_budget`: tokens per forward the GPU's memory holds
    (gpu_forward_budget), if known."""
    if n_train < 1:
        raise TunelabError("no training examples", field="train_file")
    n_examples = n_examples or n_train
    epochs = auto_epochs(n_examples) if cfg.epochs == "auto" else float(cfg.epochs)
    batch = auto_batch_size(n_examples) if cfg.batch_size == "auto" else int(cfg.batch_size)
    longest = longest or cfg.max_length
    budget = TOKENS_PER_FORWARD["gpu" if on_gpu else "cpu"]
    if on_gpu and gpu_budget:
        budget = min(budget, gpu_budget)
    micro = cfg.micro_batch_size or auto_micro_batch_size(batch, longest, world_size, budget)
    if micro * world_size > batch:
        micro = max(1, batch // world_size)
    accum = max(1, round(batch / (micro * world_size)))
    effective = micro * accum * world_size
    lr = auto_learning_rate(cfg.method, cfg.objective) if cfg.learning_rate == "auto" else float(cfg.learning_rate)
    steps_per_epoch = max(1, math.ceil(n_train / effective))
    total = cfg.max_steps or max(1, math.ceil(steps_per_epoch * epochs))
    # ~5 evaluations, the last one at the end: total // 5 would put one a step or two before the
    # end's (166 steps: 165 and 166, a 9 s validation pass wasted in the demo)
    eval_steps = cfg.eval_steps or max(1, math.ceil(total / 5))
    save_steps = cfg.save_steps or eval_steps
    logging_steps = min(cfg.logging_steps, max(1, total // 5))
    longest_valid = longest_valid or longest
    eval_batch = max(micro, min(MAX_EVAL_BATCH, budget // max(1, longest_valid)))
    return Plan(epochs=epochs, batch_size=effective, micro_batch_size=micro,
                gradient_accumulation_steps=accum, world_size=world_size, learning_rate=lr,
                steps_per_epoch=steps_per_epoch, total_steps=total, eval_steps=eval_steps,
                save_steps=save_steps, logging_steps=logging_steps,
                forward_tokens=micro * longest,
                forward_overhead=FORWARD_OVERHEAD_TOKENS["gpu" if on_gpu else "cpu"],
                eval_batch_size=eval_batch,
                eval_forward_tokens=max(micro * longest, budget))
