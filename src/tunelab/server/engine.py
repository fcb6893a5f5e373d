"""The generation engine behind `POST /v1/chat/completions` (interface stub; filled in next).

Requests for any model spec are batched together per loaded base model (continuous batching:
new requests join at step boundaries, finished ones leave), LoRA fine-tunes run as adapters on
one loaded copy of their base, and models are evicted least-recently-used under a memory budget.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class GenerationRequest:
    model: str                  # a model spec for tunelab.models (builtin alias, folder,
                                # adapter folder, checkpoint folder)
    messages: list[dict]        # OpenAI chat messages (role, content)
    max_new_tokens: int = 256
    temperature: float = 1.0    # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationChunk:
    text: str                   # new text since the last chunk ("" in the final chunk is fine)
    finish_reason: str | None   # None while generating; "stop" | "length" at the end
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """Serves GenerationRequests from a scheduler thread; safe to share across asyncio tasks."""

    def __init__(self, *, memory_budget_bytes: int | None = None, max_batch_size: int = 16):
        """memory_budget_bytes: bytes of model parameters kept loaded (None: from available
        RAM). max_batch_size: most requests in one forward step per base model."""
        raise NotImplementedError

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the answer. Raises TunelabError before the first chunk for a bad request
        (unknown model spec, prompt longer than the model's positions); the last chunk has a
        finish_reason. An error while generating raises from the iterator."""
        raise NotImplementedError
        yield  # pragma: no cover

    def loaded(self) -> list[str]:
        """Model specs currently in memory (bases and the adapters loaded on them)."""
        raise NotImplementedError

    def unload(self, model: str) -> None:
        """Drop a model spec (e.g. a deleted fine-tune); its in-flight requests fail."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the scheduler thread and free the models; pending requests fail."""
        raise NotImplementedError
