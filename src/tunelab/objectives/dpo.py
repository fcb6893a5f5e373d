"""Direct preference optimisation (Rafailov et al., 2023): from pairs of answers to one prompt,
raise the policy's log-probability of the chosen answer relative to a reference model, against
the rejected one:

    reward(answer) = beta * (log p_policy(answer | prompt) - log p_ref(answer | prompt))
    sigmoid loss   = -log sigmoid(reward(chosen) - reward(rejected))
    ipo loss       = ((chosen log-ratio / its tokens - rejected log-ratio / its tokens)
                      - 1 / (2 beta)) ** 2        (Azar et al., 2023; per-token, as TRL)

The reference is the model training starts from. With an adapter (LoRA, DoRA, QLoRA) it is the
same weights with the adapter switched off: no second copy in memory. With full fine-tuning its
log-probabilities are computed once, before the first step (`before_training`).

The loss is written here rather than taken from TRL: TRL 1.16 computes it inline in
DPOTrainer._compute_loss, after its own forward pass over its own batch layout, so there is no
function to call on tunelab's rendered rows. tests/test_dpo_trl.py pins it against DPOTrainer.

Chosen and rejected are rendered by tunelab.data.render, like SFT data: each trains exactly its
answer's tokens and the end-of-turn token, and the prompt tokens of the two are checked equal.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import TunelabError
from tunelab.objectives import LossPart, Objective

SIDES = ("chosen", "rejected")


class DPOSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    beta: float = Field(0.1, gt=0, le=10, description="strength of the pull towards the "
                        "reference model (higher: stay closer)")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: the DPO "
                                                 "paper's loss; ipo: IPO's squared loss")


def render_pairs(pairs, tokenizer, *, max_length: int | None) -> list[dict[str, list[int]]]:
    """Preference pairs -> rows {chosen_input_ids, chosen_labels, rejected_input_ids,
    rejected_labels}. Raises a TunelabError with the pair's source when the two renderings do
    not share their prompt tokens, or truncation leaves a side nothing to train on."""
    from tunelab.data.conversation import split_source
    from tunelab.data.preference import shared_prompt_length
    from tunelab.data.render import render_many
    convs, sources = [], []
    for p in pairs:
        chosen, rejected = p.conversations()
        convs += [chosen, rejected]
        sources += [p.source, p.source]
    rendered = render_many(convs, tokenizer, max_length=None, sources=sources)
    rows = []
    for i, pair in enumerate(pairs):
        c, r = rendered[2 * i], rendered[2 * i + 1]
        file, line = split_source(pair.source)
        start_c = shared_prompt_length(c, r)   # the one rule, shared with `data validate`
        if start_c is None:
            raise TunelabError("the chat template renders the prompt differently before the "
                               "chosen and the rejected answer (tokens merge across the "
                               "boundary): the pair cannot share one prompt", file=file,
                               line=line, field="prompt")
        if max_length is not None and start_c >= max_length:
            raise TunelabError(f"nothing left to train on after truncation to max_length="
                               f"{max_length} (the prompt alone is {start_c} tokens)",
                               file=file, line=line, field="prompt")
        row = {}
        for side, rr in zip(SIDES, (c, r)):
            ids, labels = rr["input_ids"], rr["labels"]
            if max_length is not None:
                ids, labels = ids[:max_length], labels[:max_length]
            row[f"{side}_input_ids"], row[f"{side}_labels"] = ids, labels
        rows.append(row)
    return rows


def pad_pairs(rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """One padded batch of 2B rows: the B chosen answers, then the B rejected ones."""
    import torch

    from tunelab.batching import pad_rows
    flat = [{"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"]}
            for side in SIDES for r in rows]
    batch = pad_rows(flat, pad_token_id)
    if "ref_chosen_logps" in rows[0]:
        batch["ref_logps"] = torch.tensor([r[f"ref_{side}_logps"] for side in SIDES
                                           for r in rows], dtype=torch.float32)
    return batch


def _peft_model(model):
    inner = getattr(model, "module", model)   # DDP wraps the model it trains
    return inner if hasattr(inner, "disable_adapter") else None


def reference_logps(model, batch: dict[str, Any]):
    """The reference model's answer log-probabilities for a batch: precomputed ones when the
    batch carries them, else the model itself with its adapter switched off."""
    import torch

    from tunelab.batching import sequence_logps
    if "ref_logps" in batch:
        return batch["ref_logps"].to(batch["input_ids"].device)
    peft = _peft_model(model)
    if peft is None:
        raise TunelabError("full fine-tuning with DPO needs the reference log-probabilities "
                           "precomputed (DPO.before_training)")
    with torch.no_grad(), peft.disable_adapter():
        logps, _ = sequence_logps(peft, batch)
    return logps


def pair_scores(logps, ref_logps, tokens, beta: float, loss_type: str):
    """Per pair: the loss, and the chosen and rejected rewards. `logps`, `ref_logps`, `tokens`:
    [2B], the chosen answers first."""
    import torch.nn.functional as F
    chosen, rejected = (logps - ref_logps).chunk(2)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen - rejected))
    elif loss_type == "ipo":
        n_chosen, n_rejected = tokens.clamp(min=1).chunk(2)
        losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    else:
        raise TunelabError(f"unknown loss_type {loss_type!r}", field="dpo.loss_type")
    return losses, beta * chosen.detach(), beta * rejected.detach()


class DPO(Objective):
    name = "dpo"
    title = "direct preference optimisation"
    api_type = "dpo"
    data_kind = "preferences"
    expected_format = ("preference pairs ({'input': {'messages': [...]}, 'preferred_output': "
                       "[...], 'non_preferred_output': [...]} as OpenAI's DPO, or TRL's "
                       "'prompt', 'chosen', 'rejected')")
    settings = DPOSettings
    stat_names = ("loss_sum", "pairs", "reward_correct", "reward_chosen", "reward_rejected",
                  "trained")
    metric_names = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")
    metric_label = "reward acc"
    api_hyperparameters = {"beta": "dpo.beta"}

    def auto_learning_rate(self, method: str) -> float:
        # A tenth of SFT's: DPO starts from a model that already answers well, and large steps
        # push both answers' probabilities down together (TRL's default is 1e-6 for full).
        return 2e-6 if method == "full" else 2e-5

    def read_rows(self, path: Path, tokenizer, max_length: int, cfg) -> list[dict[str, Any]]:
        from tunelab.data.preference import read_preferences
        return render_pairs(read_preferences(path), tokenizer, max_length=max_length)

    def row_length(self, row: dict[str, Any]) -> int:
        return max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))

    def collate(self, rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
        return pad_pairs(rows, pad_token_id)

    def items(self, batch: dict[str, Any]) -> int:
        import torch
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def loss(self, model, batch: dict[str, Any], cfg) -> LossPart:
        import torch

        from tunelab.batching import sequence_logps
        from tunelab.data.render import IGNORE_INDEX
        ref = reference_logps(model, batch)
        logps, tokens = sequence_logps(model, batch)
        losses, chosen, rejected = pair_scores(logps, ref, tokens, cfg.dpo.beta,
                                               cfg.dpo.loss_type)
        with torch.no_grad():
            stats = {"loss_sum": losses.detach().sum(), "pairs": torch.tensor(losses.numel()),
                     "reward_correct": (chosen > rejected).sum(),
                     "reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(),
                     "trained": batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()}
        return LossPart(losses.sum(), stats)

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = sums.get("pairs", 0)
        if not pairs:
            return {}
        chosen, rejected = sums["reward_chosen"] / pairs, sums["reward_rejected"] / pairs
        return {"loss": sums["loss_sum"] / pairs, "reward_accuracy": sums["reward_correct"] / pairs,
                "reward_margin": chosen - rejected, "reward_chosen": chosen,
                "reward_rejected": rejected}

    def before_training(self, model, rows_by_split: dict[str, list[dict]], cfg, *,
                        pad_token_id: int, batch_size: int, precision: str = "fp32") -> None:
        """Full fine-tuning: the reference log-probabilities of every pair, computed once by the
        starting weights (with an adapter the reference is the model with it switched off)."""
        if _peft_model(model) is not None:
            return
        import torch

        from tunelab.batching import sequence_logps
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16"
                                  else torch.float16, enabled=precision in ("bf16", "fp16"))
        try:
            for rows in rows_by_split.values():
                order = sorted(range(len(rows)), key=lambda i: self.row_length(rows[i]))
                for b in range(0, len(order), batch_size):
                    chunk = [rows[i] for i in order[b:b + batch_size]]
                    batch = pad_pairs(chunk, pad_token_id)
                    with torch.inference_mode(), autocast:
                        logps, _ = sequence_logps(model, {k: v.to(device)
                                                          for k, v in batch.items()})
                    chosen, rejected = logps.float().cpu().chunk(2)
                    for row, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                        row["ref_chosen_logps"], row["ref_rejected_logps"] = c, r
        finally:
            model.train(was_training)
