"""Training objectives: what is optimised (sft, dpo, ...), one object each, registered once.

An objective owns everything that differs between ways of training:
  - its data contract: which row shapes it reads (`data_kind`: "conversations" or
    "preferences") and how a file becomes rendered rows (`read_rows`: through the one chat-
    template code in tunelab.data.render, so training and serving never drift apart);
  - its batch: `collate` pads rendered rows into tensors, `items` counts what the loss is
    normalised by (trained tokens for SFT, pairs for DPO);
  - its loss and metrics: `loss` returns a summed loss and summed statistics; `metrics` turns the
    statistics summed over a logging window (and over processes) into the numbers logged as
    train_<name> / valid_<name> in metrics.jsonl, the terminal and job events;
  - its settings section in the training config (`settings`, under the key `name`), and its
    `auto` learning-rate rule;
  - its OpenAI `method.type` (`api_type`) and the hyperparameters that method takes.

Everything else (the run folder, checkpoints, resume, events, LoRA/full, distributed launch,
jobs, the API, the page) is shared and never asks which objective it runs. A new objective is
one module here plus its registration below.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from tunelab.errors import TunelabError


@dataclass
class LossPart:
    """One micro-batch's loss, summed (the caller divides by the optimizer step's `items`), and
    its statistics, summed: each a scalar tensor (e.g. trained tokens, correct tokens)."""
    loss_sum: Any                      # differentiable scalar
    stats: dict[str, Any]              # name -> scalar tensor, summed over the micro-batch


class Objective:
    name: ClassVar[str]                # config value of `objective`, and its settings' key
    title: ClassVar[str]               # for people: "supervised fine-tuning"
    api_type: ClassVar[str]            # OpenAI method.type: "supervised", "dpo"
    data_kind: ClassVar[str]           # "conversations" | "preferences"
    expected_format: ClassVar[str]     # one line for errors: what a row of its data looks like
    settings: ClassVar[type[BaseModel] | None] = None   # its config section, under `name`
    # the statistics `loss` sums (every one, every call: processes reduce them by position);
    # "trained" (trained tokens) feeds trained_tokens_seen
    stat_names: ClassVar[tuple[str, ...]]
    # metrics logged besides the loss, as train_<m> and valid_<m>; the first is the headline
    # the terminal shows beside the validation loss, under `metric_label`
    metric_names: ClassVar[tuple[str, ...]] = ()
    metric_label: ClassVar[str] = ""
    # OpenAI hyperparameter -> config key, beyond the shared n_epochs / batch_size /
    # learning_rate_multiplier (DPO: beta -> dpo.beta)
    api_hyperparameters: ClassVar[dict[str, str]] = {}

    def auto_learning_rate(self, method: str) -> float:
        raise NotImplementedError

    def check_kind(self, path: Path, field: str) -> None:
        """A file of the other kind (pairs given to SFT, conversations to DPO) is named as
        such, before any row is read; files of neither kind are left to `read_rows`, whose
        errors name the bad line."""
        from tunelab.data.preference import data_kind_of
        try:
            kind = data_kind_of(path)
        except TunelabError:
            return
        if kind != self.data_kind:
            fits = [o.name for o in OBJECTIVES.values() if o.data_kind == kind]
            hint = f" (to train on {kind}, use objective: {fits[0]})" if fits else ""
            raise TunelabError(f"holds {kind}, but objective '{self.name}' trains on "
                               f"{self.expected_format}{hint}", file=path, field=field)

    def read_rows(self, path: Path, tokenizer, max_length: int, cfg) -> list[dict[str, Any]]:
        """The file's examples rendered into rows of token-id lists; the first bad line raises a
        TunelabError naming file, line and field."""
        raise NotImplementedError

    def row_length(self, row: dict[str, Any]) -> int:
        """Tokens in one row (length grouping and the micro-batch budget)."""
        raise NotImplementedError

    def collate(self, rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
        raise NotImplementedError

    # whether its rows can also go end to end in one row, no padding (collate_flat)
    flattens: ClassVar[bool] = False

    def collate_flat(self, rows: Sequence[dict[str, Any]],
                     shared: Sequence[int] | None = None) -> dict[str, Any]:
        """Rows end to end in one (tunelab.batching.flatten_rows); shared[i]: tokens row i
        shares with its prefix tree's first row."""
        raise NotImplementedError

    def items(self, batch: dict[str, Any]) -> int:
        """What the loss of a batch is normalised by."""
        raise NotImplementedError

    def loss(self, model, batch: dict[str, Any], cfg) -> LossPart:
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Logged metrics (names from metric_names) from statistics summed over a window."""
        raise NotImplementedError

    def before_training(self, model, rows_by_split: dict[str, list[dict]], cfg, *,
                        pad_token_id: int, batch_size: int, precision: str = "fp32") -> None:
        """A hook that sees the loaded model (with its method applied) before the first step:
        DPO with full fine-tuning computes the reference log-probabilities here."""


def _registry() -> dict[str, Objective]:
    from tunelab.objectives.dpo import DPO
    from tunelab.objectives.sft import SFT
    return {o.name: o for o in (SFT(), DPO())}


OBJECTIVES: dict[str, Objective] = _registry()
BY_API_TYPE: dict[str, Objective] = {o.api_type: o for o in OBJECTIVES.values()}


def get(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise TunelabError(f"unknown objective {name!r} (expected one of: "
                           f"{', '.join(OBJECTIVES)})", field="objective") from None
