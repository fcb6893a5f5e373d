"""The generation engine behind `POST /v1/chat/completions`: one interface, two implementations.

- `tunelab` (the default, `local.py`): tunelab's own continuous-batching engine in the server
  process. One copy of a base model serves the base and any number of its LoRA fine-tunes in
  the same batch; adapters load on first use into a bounded set of slots; the memory budget
  counts weights, resident adapters and the running batch's KV cache. Its parts:
  `scheduler.py` (admission, the step loop), `cache.py` (the batch's KV cache and its size),
  `sampling.py` (token choice, text streaming), `adapters.py` (resident adapter slots).
- `vllm` (`vllm.py`): vLLM's OpenAI-compatible server, started and managed by tunelab or at a
  URL the user gives; LoRA fine-tunes are loaded into it at run time.

The API in front (keys, `ft:` names, isolation, usage) is the same for both: it resolves a
model id to a spec (a builtin alias, a folder, an adapter or checkpoint folder) and hands a
GenerationRequest to `generate`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

ENGINES = ("tunelab", "vllm")


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
    name: str | None = None     # the model as the client called it, for messages (the spec is
                                # a server path the client must not see); default: the spec

    @property
    def shown(self) -> str:
        return self.name or self.model


@dataclass
class GenerationChunk:
    text: str                   # new text since the last chunk ("" in the final chunk is fine)
    finish_reason: str | None   # None while generating; "stop" | "length" at the end
    prompt_tokens: int
    completion_tokens: int


class GenerationFailed(RuntimeError):
    """Raised from `generate`'s iterator when generation failed on the server's side (not a
    bad request), or when the request's model was unloaded or the engine closed."""


def check_request(r: GenerationRequest) -> None:
    """What every engine refuses before any work, naming the request field."""
    from tunelab.errors import TunelabError
    if not isinstance(r.messages, list) or not r.messages:
        raise TunelabError("messages must be a non-empty list", field="messages")
    for i, m in enumerate(r.messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise TunelabError("each message needs a string 'role' and 'content'",
                               field=f"messages[{i}]")
    if not isinstance(r.max_new_tokens, int) or r.max_new_tokens < 1:
        raise TunelabError("must be a positive integer", field="max_tokens")
    if not r.temperature >= 0:
        raise TunelabError("must be >= 0", field="temperature")
    if not 0 < r.top_p <= 1:
        raise TunelabError("must be in (0, 1]", field="top_p")
    if any(not isinstance(s, str) for s in r.stop):
        raise TunelabError("must be a list of strings", field="stop")


class GenerationEngine(ABC):
    """What the chat API needs from an engine. `generate` raises `TunelabError` (with `.field`
    naming the request field) before its first chunk for a request that can never be served
    (unknown model files, a prompt longer than the model or the memory budget allows), and
    `GenerationFailed` for a server-side failure; the last chunk has a finish_reason."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    @abstractmethod
    def loaded(self) -> list[str]:
        """Model specs in memory now (models, and adapters resident on them)."""

    @abstractmethod
    def unload(self, model: str) -> None:
        """Forget a model spec (a deleted fine-tune); its in-flight requests fail."""

    @abstractmethod
    def close(self) -> None: ...

    def stats(self) -> dict:
        """What the engine holds now, for GET /v1/tunelab/engine, the tests and the benchmarks.
        Keys every engine gives: "engine" (its name); the tunelab engine adds "budget_bytes",
        "weights_bytes" (models and resident adapters), "kv_bytes" (the running batches' KV
        caches, allocated), "kv_reserved_bytes" (what admitted requests may grow to),
        "max_adapters", "resident_adapters" (per base spec: the adapter specs in memory),
        "adapter_loads" / "adapter_evictions" (counts so far), "queued", "running",
        "forward_steps"."""
        return {"engine": type(self).__name__}


def create_engine(settings) -> GenerationEngine:
    """The engine `settings.engine` names (server.context.Settings)."""
    if settings.engine == "vllm":
        from tunelab.server.engine.vllm import VLLMEngine
        return VLLMEngine.from_settings(settings)
    from tunelab.server.engine.local import Engine
    return Engine(memory_budget_bytes=settings.memory_budget_bytes,
                  max_batch_size=settings.max_batch_size, max_adapters=settings.max_adapters,
                  prefill_chunk=settings.prefill_chunk or 1 << 30,
                  precision=settings.precision)
