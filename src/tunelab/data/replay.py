"""Replay data against forgetting: the base model's own answers to general prompts.

Fine-tuning on one narrow task teaches a small model to answer everything that way (the
comparison's general check shows it: SmolLM2 answering "What is the capital of France?" with
"France"). Mixing some general conversations back into training is the usual remedy, and the
best general data for a model is the one it already produces: self-distillation (Yang et al.,
2024, "Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning") answers each
prompt with the base model itself, so replay keeps its behaviour rather than teaching a new one.

The packaged prompts (replay_prompts.jsonl) are written for tunelab and share no question,
fact or text with the general check they are measured by (tunelab/evaluate/general.jsonl).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

DEFAULT_MAX_NEW_TOKENS = 160


@dataclass
class ReplayStats:
    asked: int          # prompts the base model answered
    kept: int           # conversations written
    cut: int            # answers dropped: max_new_tokens came before the end of the turn
    empty: int          # answers dropped: nothing but the end-of-turn token


def replay_prompts(path: str | Path | None = None) -> list[str]:
    """The prompt pool: the packaged one, or a JSONL file whose lines have "prompt" (or
    "messages", whose first user turn is taken)."""
    if path is None:
        text = resources.files("tunelab.data").joinpath("replay_prompts.jsonl").read_text("utf-8")
        source: str | Path = "replay_prompts.jsonl (packaged)"
    else:
        source = Path(path)
        if not source.is_file():
            raise TunelabError("file not found", file=source, field="prompts")
        text = source.read_text(encoding="utf-8")
    prompts = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TunelabError(f"not JSON: {e.msg}", file=source, line=line_no) from None
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if prompt is None and isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            prompt = next((m.get("content") for m in obj["messages"]
                           if isinstance(m, dict) and m.get("role") == "user"), None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise TunelabError("needs a non-empty 'prompt' (or a user turn in 'messages')",
                               file=source, line=line_no, field="prompt")
        prompts.append(prompt)
    if not prompts:
        raise TunelabError("no prompts", file=source)
    return prompts


def make_replay(model: str, n: int, *, prompts: str | Path | None = None, seed: int = 0,
                max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, precision: str = "auto",
                batch_size: int | None = None,
                progress=None) -> tuple[list[dict[str, Any]], ReplayStats]:
    """Up to `n` conversations: sampled prompts (deterministic for a seed) answered greedily by
    `model`. Answers cut by max_new_tokens are dropped, not kept: trained with an end-of-turn
    token after them, they would teach the model to stop mid-sentence. `batch_size` None: as many
    as the key/value-cache budget holds (64 SmolLM2 answers took 20.5 s on 2 cores in batches of
    32, 30.8 s in batches of 16)."""
    from tunelab import models
    from tunelab.inference import generate_completions
    from tunelab.runtime import torch_dtype

    pool = replay_prompts(prompts)
    if n < 1:
        raise TunelabError("must be at least 1", field="n")
    if n > len(pool):
        raise TunelabError(f"the prompt pool has {len(pool)} prompts; cannot draw {n}",
                           field="n")
    chosen = random.Random(seed).sample(pool, n)
    base, tokenizer = models.load(model, dtype=torch_dtype(precision))
    convs = [[{"role": "user", "content": p}] for p in chosen]
    answers = generate_completions(base, tokenizer, convs, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, progress=progress)
    rows, cut, empty = [], 0, 0
    for prompt, a in zip(chosen, answers):
        if not a.stopped:
            cut += 1
        elif not a.text.strip():
            empty += 1
        else:
            rows.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": a.text.strip()}]})
    return rows, ReplayStats(asked=n, kept=len(rows), cut=cut, empty=empty)
