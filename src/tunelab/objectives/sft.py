"""Supervised fine-tuning: cross-entropy on the assistant turns of conversations (and their
end-of-turn tokens), exactly the tokens tunelab.data.render marks as trained."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.objectives import LossPart, Objective


class SFT(Objective):
    name = "sft"
    title = "supervised fine-tuning"
    api_type = "supervised"
    data_kind = "conversations"
    expected_format = "{'messages': [{'role', 'content'}, ...]} conversations"
    stat_names = ("loss_sum", "trained", "correct")
    metric_names = ("mean_token_accuracy",)
    metric_label = "valid acc"

    def auto_learning_rate(self, method: str) -> float:
        # LoRA / DoRA / QLoRA adapters start at zero and need large steps; 2e-5 is the usual
        # full-fine-tuning rate for small models.
        return 2e-5 if method == "full" else 2e-4

    def read_rows(self, path: Path, tokenizer, max_length: int, cfg) -> list[dict[str, Any]]:
        from tunelab.data.conversation import read_conversations, split_source
        from tunelab.data.render import IGNORE_INDEX, render_examples
        from tunelab.errors import TunelabError
        convs = read_conversations(path)
        sources = [c.source for c in convs]
        rows = render_examples([c.messages for c in convs], tokenizer, max_length=max_length,
                               sources=sources)
        if len(rows) == len(convs):  # one row per conversation: name the offending line
            for row, src in zip(rows, sources):
                if all(label == IGNORE_INDEX for label in row["labels"]):
                    file, line = split_source(src)
                    raise TunelabError(f"nothing left to train on after truncation to max_length="
                                       f"{max_length} (the prompt alone is longer)", file=file,
                                       line=line, field="messages")
        elif any(all(label == IGNORE_INDEX for label in r["labels"]) for r in rows):
            raise TunelabError(f"some turns have nothing left to train on after truncation to "
                               f"max_length={max_length}", file=path, field="max_length")
        return rows

    def row_length(self, row: dict[str, Any]) -> int:
        return len(row["input_ids"])

    def collate(self, rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
        from tunelab.batching import pad_rows
        return pad_rows(rows, pad_token_id)

    flattens = True

    def collate_flat(self, rows: Sequence[dict[str, Any]],
                     shared: Sequence[int] | None = None) -> dict[str, Any]:
        from tunelab.batching import flatten_rows
        return flatten_rows(rows, shared)

    def items(self, batch: dict[str, Any]) -> int:
        from tunelab.data.render import IGNORE_INDEX
        return batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()

    def loss(self, model, batch: dict[str, Any], cfg) -> LossPart:
        from tunelab.batching import trained_token_loss
        part = trained_token_loss(model, batch)   # the one loss, shared with evaluation
        return LossPart(part.loss_sum, {"loss_sum": part.loss_sum.detach(),
                                        "trained": part.trained, "correct": part.correct})

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        trained = sums.get("trained", 0)
        if not trained:
            return {}
        return {"loss": sums["loss_sum"] / trained,   # per trained token, over the window
                "mean_token_accuracy": sums["correct"] / trained}
