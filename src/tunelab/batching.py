"""Padding and the loss on trained tokens: one place for both, shared by training, validation,
test-set evaluation and generation.

- `pad_rows`: rendered rows (input_ids, labels) -> right-padded tensors with an attention mask
  and labels padded with IGNORE_INDEX. The objectives' collators (SFT rows, DPO's two sides of
  each pair), validation and `tunelab eval`'s test loss all batch through it.
- `split_by_tokens`: an optimizer step's rows -> forward passes of similar lengths within a
  padded-token budget (the trainer's micro-batches).
- `pad_prompts`: prompts for generation, LEFT-padded so that every prompt ends where generation
  starts (what batched `generate` needs).
- `sequence_logps`: each row's summed log-probability of its trained tokens (DPO's loss and the
  `preference` evaluation), with the LM head at trained positions only.
- `trained_token_loss`: the summed cross-entropy over trained positions, the number of trained
  tokens and how many of them the model predicted right. The LM head runs only at trained
  positions: in SFT most tokens are prompt, and the full [batch, length, vocab] fp32 logits are
  the largest tensor of a step. For plain-headed models (Llama, Qwen, Mistral, ...) the head and
  the loss run chunked and no logits tensor exists at all (tunelab.linear_ce); for others the
  model computes logits at the positions some row trains (`logits_to_keep`). Callers divide:
  the trainer by the optimizer step's trained tokens, evaluation by the whole set's. A prefix
  every row of a batch shares (a system prompt, an instruction), untrained, runs once.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.render import IGNORE_INDEX
from tunelab.linear_ce import linear_cross_entropy, plain_lm_head


def pad_rows(rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows of input_ids (+ labels, when present) to the longest in the batch.

    Packed rows (tunelab.train.packing) carry position_ids restarting at 0 for each example and
    get no attention mask: transformers then builds a block-diagonal mask from the positions.
    Their padding is one more segment (positions from 0, labels -100), isolated like the rest.
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    packed = "position_ids" in rows[0]
    with_labels = "labels" in rows[0]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long) if with_labels else None
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.arange(width).repeat(len(rows), 1) if packed else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        mask[i, :n] = 1
        if labels is not None:
            labels[i, :n] = torch.as_tensor(r["labels"])
        if positions is not None:
            positions[i, :n] = torch.as_tensor(r["position_ids"])
            positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids}
    if positions is not None:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    if labels is not None:
        batch["labels"] = labels
    return batch


def flatten_rows(rows: Sequence[dict[str, Any]],
                 shared: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Rows (input_ids + labels) -> one row holding them all, no padding ("padding-free"):
    position_ids restart at 0 for each, each's first token is never predicted from the one
    before it (label -100), and cu_seq_lens_q / _k (the cumulative lengths varlen attention
    kernels take: flash-attention's, and tunelab.attention's blocks, which transformers passes
    them to) keep every sequence to itself. Without those, transformers' own block-diagonal mask
    from the positions does the same at the cost of the whole row's length squared.

    `shared[i] > 0`: row i starts with the first shared[i] tokens of the last row before it
    with shared 0 (its tree's first row; prefix_trees finds them), which are not repeated: row i
    keeps only the rest, at positions from shared[i] on, and sees the first row's copy of the
    prefix (`tunelab_segments`: start, end, prefix start, prefix end per sequence, which only
    tunelab.attention's blocks read; no cu_seq_lens then, so that no other kernel mistakes the
    sequences for independent ones). A system prompt or an instruction then runs once a forward.

    Against padded forwards of similar lengths: no token is padding, and a step's rows go in
    fewer forwards, each with its fixed cost (full fine-tuning writes every weight's gradient
    once per backward). TRL's padding_free and transformers' DataCollatorWithFlattening flatten
    the same way; they are written for a GPU's flash-attention and decide nothing about the
    number of forwards, hence this (and the choice in StepCollator)."""
    shared = shared or [0] * len(rows)
    ids, labels, positions, segments = [], [], [], []
    head, head_start = None, 0          # the tree's first row, where its tokens start
    for r, n_shared in zip(rows, shared):
        start = len(ids)
        if n_shared:
            if (head is None or r["input_ids"][:n_shared] != head["input_ids"][:n_shared]
                    or r["labels"][n_shared] != IGNORE_INDEX):
                raise ValueError("a row's shared prefix is not its tree's first row's, or its "
                                 "first token after it is trained")
            prefix = (head_start, head_start + n_shared)
        else:
            head, head_start, prefix = r, start, (start, start)
        ids += r["input_ids"][n_shared:]
        labels += [IGNORE_INDEX, *r["labels"][n_shared + 1:]]
        positions += range(n_shared, len(r["input_ids"]))
        segments.append((start, len(ids), *prefix))
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
             "position_ids": torch.tensor([positions])}
    if any(shared):
        batch["tunelab_segments"] = torch.tensor(segments)
        return batch
    cu = torch.tensor([0, *(b for _, b, _, _ in segments)], dtype=torch.int32)
    longest = max(b - a for a, b, _, _ in segments)
    return {**batch, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
            "max_length_k": longest}


def flat_tokens(forward: dict[str, torch.Tensor]) -> int:
    """The tokens of the rows in a flat forward (a shared prefix counted once per row)."""
    n = forward["input_ids"].numel()
    if "tunelab_segments" in forward:
        seg = forward["tunelab_segments"]
        n += int((seg[:, 3] - seg[:, 2]).sum())
    return n


def prefix_trees(rows: Sequence[dict[str, Any]], budget: int,
                 longest: int) -> list[tuple[list[int], int]]:
    """Rows -> (row indices, shared tokens) units for flatten_rows: rows that share a prefix
    of at least MIN_SHARED_PREFIX untrained tokens (common_prefix's rules) in one unit, the
    prefix counted once; every other row a unit of its own (shared 0). A unit holds at most
    `budget` tokens (a longer row alone), and only rows of at most `longest` tokens share (the
    attention's blocks see a prefix only for rows they take: tunelab.attention.TRAINING_ROWS).

    Rows sorted by their tokens put those with a common prefix side by side; a row joins the
    unit before it while the tokens saved do not shrink (a shorter common prefix over more
    rows can save less)."""
    order = sorted(range(len(rows)), key=lambda i: rows[i]["input_ids"])
    units: list[tuple[list[int], int]] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        if units and n <= longest:
            members, shared = units[-1]
            if all(len(rows[j]["input_ids"]) <= longest for j in members):
                now = common_prefix([rows[j] for j in members] + [rows[i]])
                size = now + sum(len(rows[j]["input_ids"]) - now for j in [*members, i])
                if (now >= MIN_SHARED_PREFIX and size <= budget
                        and now * len(members) >= shared * (len(members) - 1)):
                    units[-1] = ([*members, i], now)
                    continue
        units.append(([i], 0))
    return [(members, shared if len(members) > 1 else 0) for members, shared in units]


def split_flat(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Rows (their lengths) -> flat forwards of at most `budget` tokens each (a longer row goes
    alone): first-fit decreasing, so as few forwards as the budget allows."""
    forwards: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = next((f for f, free in enumerate(room) if free >= lengths[i]), None)
        if at is None:
            forwards.append([])
            room.append(budget)
            at = len(forwards) - 1
        forwards[at].append(i)
        room[at] -= lengths[i]
    return forwards


def common_prefix(rows: Sequence[dict[str, Any]]) -> int:
    """How many leading tokens all rows share before the first one any row trains on (what
    shared_prefix_length will find in their padded forward, by the same rules)."""
    first = rows[0]["input_ids"]
    n = min(len(r["input_ids"]) for r in rows) - 1      # every row keeps a token after it
    for r in rows:
        ids, labels = r["input_ids"], r["labels"]
        k = 0
        while k < n and ids[k] == first[k] and labels[k + 1] == IGNORE_INDEX:
            k += 1
        n = k
    return n


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad generation prompts: every row's last prompt token is at the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.as_tensor(list(p))
            mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def split_by_tokens(lengths: Sequence[int], budget: int, overhead: int) -> list[list[int]]:
    """The rows of one optimizer step (their lengths) -> forward passes (lists of row indices),
    each padding its rows to its longest and holding at most `budget` padded tokens (a row
    longer than the budget goes alone).

    The cheapest split by padded tokens plus `overhead` token-equivalents per forward (the fixed
    cost of a forward and backward: full fine-tuning writes every weight's gradient once per
    backward, whatever the rows): rows sorted by length, cut into runs by dynamic programming.
    A fixed count of rows per forward pads a short row to the longest one drawn with it: on the
    bench's mixed lengths (57 to 850 tokens, steps of 8 random rows in 2 forwards of 4) a third of
    the tokens computed were padding. The gradient is the step's either way (the loss is
    normalised by the step's trained tokens), so only the cost changes.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ls = [lengths[i] for i in order]
    best = [0] + [None] * len(ls)      # best[j]: the cheapest split of the j longest rows
    cut = [0] * (len(ls) + 1)
    for j in range(1, len(ls) + 1):
        for i in range(j - 1, -1, -1):     # the run i..j-1 pads to ls[i], its longest
            padded = (j - i) * ls[i]
            if padded > budget and j - i > 1:
                break                      # longer runs starting earlier only pad more
            cost = best[i] + padded + overhead
            if best[j] is None or cost <= best[j]:   # ties: the longer last run
                best[j], cut[j] = cost, i
    runs, j = [], len(ls)
    while j:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


@dataclass
class TokenLoss:
    loss_sum: torch.Tensor     # summed cross-entropy over trained tokens (differentiable)
    trained: torch.Tensor      # number of trained tokens
    correct: torch.Tensor      # trained tokens whose argmax prediction is right
    outputs: Any               # the model's outputs (logits at the kept positions only)


def trained_token_loss(model, batch: dict[str, torch.Tensor], *,
                       share_prefix: bool = True) -> TokenLoss:
    """Cross-entropy on the trained positions of a padded batch (labels -100 elsewhere).

    Where the model's logits are a plain Linear over its final hidden state, the head and the
    loss run chunked on exactly the trained positions (tunelab.linear_ce: no logits tensor);
    otherwise the model computes logits at the positions some row trains. A prefix that every
    row shares, untrained, runs once for the batch (`shared_prefix_length`)."""
    labels = batch["labels"]
    model_inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = labels[:, 1:]                      # position t predicts token t + 1
    trained_mask = targets != IGNORE_INDEX
    shared = shared_prefix_length(model, batch, trained_mask) if share_prefix else 0
    if shared:
        model_inputs = _after_prefix(model, model_inputs, shared)
        targets, trained_mask = targets[:, shared:], trained_mask[:, shared:]
    use_cache = bool(shared)   # the prefix's cache is read, never kept
    head = plain_lm_head(model)
    if head is not None:
        # the forward still goes through the model (and any DDP / PEFT wrapper around it),
        # asked for no logits; its final hidden state (after the last norm) is hidden_states[-1]
        outputs = model(**model_inputs, logits_to_keep=torch.zeros(0, dtype=torch.long,
                                                                   device=labels.device),
                        output_hidden_states=True, use_cache=use_cache)
        hidden = outputs.hidden_states[-1][:, :-1][trained_mask]
        loss_sum, correct = linear_cross_entropy(hidden, head.weight, targets[trained_mask])
        return TokenLoss(loss_sum, trained_mask.sum(), correct, outputs)
    keep = trained_mask.any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:                        # nothing trained in this batch
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    outputs = model(**model_inputs, logits_to_keep=keep, use_cache=use_cache)
    logits = outputs.logits.float()              # [batch, kept, vocab]
    kept_targets = targets[:, keep]
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), kept_targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    kept_mask = kept_targets != IGNORE_INDEX
    with torch.no_grad():
        correct = ((logits.argmax(dim=-1) == kept_targets) & kept_mask).sum()
    return TokenLoss(loss_sum, trained_mask.sum(), correct, outputs)


# Below this many shared tokens a batch is run whole: the saving would not pay for the second
# forward call and the cache's copies.
MIN_SHARED_PREFIX = 16


def shares_prefixes(model) -> bool:
    """Whether a batch's shared prefix can run once, its KV cache copied to every row: a
    decoder whose every layer attends to the whole past (a sliding window or a recurrent state
    would not be a plain key/value cache), one process (DDP expects one forward per backward),
    and no activation checkpointing while training (transformers turns the cache off then)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if model.training and getattr(model, "is_activation_checkpointing", False):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return all(t == "full_attention" for t in getattr(config, "layer_types", None) or ())


def shared_prefix_length(model, batch: dict[str, torch.Tensor], trained_mask: torch.Tensor) -> int:
    """How many leading tokens every row of a right-padded batch shares (a system prompt, a
    task's instruction), where no hidden state the loss reads lies: 0 when not worth sharing.

    The prefix then runs once, not once per row, and its keys and values are copied to every
    row: the same function of the same weights, so the loss and the gradients are those of the
    whole batch (the gradient of a shared computation is the sum of its uses). In the demo's
    reviews 50 of ~86 tokens are the system prompt and the instruction.
    """
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if mask is None or "position_ids" in batch or ids.shape[0] < 2 or not shares_prefixes(model):
        return 0
    same = (ids == ids[:1]).all(dim=0).cumprod(dim=0)
    n = int(same.sum())
    trained_at = trained_mask.any(dim=0).nonzero()
    if trained_at.numel():           # position t's hidden state predicts token t + 1
        n = min(n, int(trained_at[0, 0]))
    n = min(n, int(mask.sum(dim=1).min()) - 1)     # every row keeps a token after it
    if n < MIN_SHARED_PREFIX or not bool(mask[:, :n].all()):
        return 0
    return n


def _after_prefix(model, inputs: dict[str, torch.Tensor], n: int) -> dict[str, Any]:
    """Run the first n tokens of row 0 (shared by every row) and return the inputs of the rest:
    the tokens after them, the whole attention mask, and the prefix's cache, one copy per row
    (gradients flow back through the copies into the one prefix computation)."""
    from transformers import DynamicCache
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:1, :n], attention_mask=mask[:1, :n], past_key_values=cache,
          use_cache=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=ids.device))
    cache.batch_repeat_interleave(ids.shape[0])
    return {**inputs, "input_ids": ids[:, n:], "past_key_values": cache}


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its trained tokens, and how many there are.

    What preference training and the `preference` evaluation score an answer by. Like
    trained_token_loss, the LM head runs only at positions some row trains.
    """
    labels = batch["labels"]
    model_inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                             "position_ids")}
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits.float()
    kept_targets = targets[:, keep]
    # cross_entropy is -log p(target); ignored positions come back as 0
    token_logps = -torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), kept_targets, ignore_index=IGNORE_INDEX, reduction="none")
    return token_logps.sum(dim=-1), (kept_targets != IGNORE_INDEX).sum(dim=-1)


def rows_loss(model, rows: Sequence[dict[str, Any]], pad_token_id: int, *,
              batch_size: int = 8) -> tuple[float, int, int]:
    """(summed loss, trained tokens, correct tokens) of rendered rows, without gradients.
    Rows are batched by length (less padding); the result does not depend on the order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    total, count, correct = 0.0, 0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b in range(0, len(order), batch_size):
            batch = pad_rows([rows[i] for i in order[b:b + batch_size]], pad_token_id)
            with torch.inference_mode():
                part = trained_token_loss(model, {k: v.to(device) for k, v in batch.items()})
            total += float(part.loss_sum)
            count += int(part.trained)
            correct += int(part.correct)
    finally:
        model.train(was_training)
    return total, count, correct
