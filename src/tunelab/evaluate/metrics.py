"""Test-set metrics: teacher-forced loss on the trained tokens, and generation-based exact match
of the final assistant turn."""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.conversation import Conversation, read_conversations
from tunelab.data.render import IGNORE_INDEX, render_examples
from tunelab.errors import TunelabError

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: 'Positive.' == 'positive'."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Strict match after trimming surrounding whitespace."""
    return prediction.strip() == reference.strip()


@dataclass
class EvalResult:
    examples: int
    loss: float | None
    exact_match: float          # strict (whitespace-trimmed) match of the final answer
    normalized_match: float     # case/punctuation-insensitive match
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"examples": self.examples, "loss": self.loss, "exact_match": self.exact_match,
                "normalized_match": self.normalized_match}


def split_final_answer(conv: Conversation) -> tuple[list[dict], str]:
    msgs = conv.messages
    if msgs[-1]["role"] != "assistant":
        raise TunelabError("the last message must be the assistant's answer to compare against",
                           file=(conv.source or "").rsplit(":", 1)[0] or None,
                           field="messages")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"]


def test_loss(model, tokenizer, conversations: list[Conversation], *, batch_size: int = 8,
              max_length: int = 2048) -> float:
    """Mean cross-entropy per trained token (the same tokens training supervises)."""
    import torch
    rows = render_examples([c.messages for c in conversations], tokenizer, max_length=max_length,
                           sources=[c.source for c in conversations])
    rows.sort(key=lambda r: len(r["input_ids"]))
    total, count = 0.0, 0
    model.eval()
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"]))
                               for r in batch])
        lengths = torch.tensor([len(r["input_ids"]) for r in batch])
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate(model, tokenizer, data: str | Path | list[Conversation], *,
             max_new_tokens: int | None = None, batch_size: int = 16, with_loss: bool = True,
             limit: int | None = None, progress=None) -> EvalResult:
    """Evaluate a loaded model on a conversations file (or list)."""
    from tunelab.inference import generate
    convs = read_conversations(data) if isinstance(data, (str, Path)) else list(data)
    if limit is not None:
        convs = convs[:limit]
    pairs = [split_final_answer(c) for c in convs]
    if max_new_tokens is None:  # room for the longest reference answer, plus slack
        longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for _, ref in pairs)
        max_new_tokens = min(1024, 2 * longest + 16)
    preds = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                     batch_size=batch_size, progress=progress)
    strict = [exact_match(p, ref) for p, (_, ref) in zip(preds, pairs)]
    loose = [normalize_answer(p) == normalize_answer(ref) for p, (_, ref) in zip(preds, pairs)]
    loss = test_loss(model, tokenizer, convs, batch_size=max(1, batch_size // 2)) if with_loss else None
    n = len(convs)
    return EvalResult(
        examples=n, loss=loss, exact_match=sum(strict) / n, normalized_match=sum(loose) / n,
        predictions=[{"prompt": p[-1]["content"], "reference": ref, "prediction": pred,
                      "exact_match": s}
                     for (p, ref), pred, s in zip(pairs, preds, strict)])
