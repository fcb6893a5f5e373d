"""What every route needs: the settings, the store, the generation engine, and who is asking."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tunelab.jobs.store import LOCAL_OWNER, Model, Store
from tunelab.server.errors import APIError

MAX_UPLOAD_BYTES = 512 * 2**20


@dataclass
class Settings:
    data_dir: Path | None = None
    database_url: str | None = None
    ray_address: str | None = None       # jobs train on this Ray cluster (placement, workers>1)
    auth: bool = True
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_body_bytes: int = 8 * 2**20      # any other request body (server.limits)
    # a chat request's text, counted before it is tokenised (1M characters is ~250k tokens:
    # more than any served model's context, and tokenised in about a second)
    max_prompt_chars: int = 1_000_000
    models: dict[str, str] = field(default_factory=dict)   # base model id -> model spec
    stats_model: str | None = None       # tokenizer for upload token statistics
    memory_budget_bytes: int | None = None
    # a decode step of SmolLM2 costs 33 ms at batch 16 and 42 ms at 32 (bench/serve.py): a
    # larger batch halves the queueing of many clients for a little per-token latency
    max_batch_size: int = 32
    workers: int = 0
    engine: str = "tunelab"              # "tunelab" | "vllm" (server.engine.ENGINES)
    max_adapters: int = 64               # LoRA adapters resident at once per base (LRU)
    prefill_chunk: int = 256             # prompt tokens read per step (0: a prompt at once)
    precision: str = "auto"              # the tunelab engine's weights: auto | bf16 | fp32
    vllm_url: str | None = None          # an external vLLM server (--engine vllm); None: start one
    vllm_python: str | None = None       # the python of vLLM's virtualenv (None: .venv-vllm, $PATH)
    # USD per hour of the training machine, for a finished job's cost (None: the default of
    # tunelab.evaluate.cost, which tunelab compare uses too)
    train_price_per_hour: float | None = None


@dataclass
class Owner:
    id: str
    name: str


class Context:
    def __init__(self, settings: Settings):
        from tunelab.models import BUILTINS, DEFAULT_MODEL
        self.settings = settings
        self.store = Store(settings.data_dir, settings.database_url)
        self.started = int(time.time())
        self.base_models: dict[str, str] = {name: name for name in BUILTINS}
        self.base_models.update(settings.models)
        self.stats_model = settings.stats_model or next(iter(settings.models.values()), None) \
            or DEFAULT_MODEL
        self._engine = None
        self._engine_lock = threading.Lock()
        # a job's start and a model's deletion, one at a time (in this API process): a model is
        # not deleted between the check for jobs that build on it and its removal
        self.lineage_lock = threading.Lock()

    def engine(self):
        """The generation engine, started on the first chat request."""
        with self._engine_lock:
            if self._engine is None:
                try:
                    from tunelab.server.engine import create_engine
                    self._engine = create_engine(self.settings)
                except NotImplementedError:
                    raise APIError(503, "chat completions are not available on this server "
                                   "(no generation engine)", code="engine_unavailable") from None
            return self._engine

    def unload(self, spec: str) -> None:
        if self._engine is not None:
            self._engine.unload(spec)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self.store.close()

    @property
    def train_price_per_hour(self) -> float:
        """USD per hour of the training machine (--train-price-per-hour, else compare's)."""
        from tunelab.evaluate.cost import DEFAULT_TRAIN_PER_HOUR
        price = self.settings.train_price_per_hour
        return DEFAULT_TRAIN_PER_HOUR if price is None else price

    def model_spec(self, owner: Owner, model_id: str, param: str = "model") -> tuple[str, Model | None]:
        """A model id -> (the spec tunelab.models loads, its fine-tuned Model row if any).
        Another key's fine-tuned models do not exist for this key."""
        if model_id.startswith("ft:"):
            m = self.store.get(Model, model_id, owner.id)
            if m is not None:
                return str(self._served(m)), m
        elif model_id in self.base_models:
            return self.base_models[model_id], None
        raise APIError(404, f"The model `{model_id}` does not exist or you do not have access "
                       "to it.", param=param, code="model_not_found")

    def _served(self, m: Model) -> Path:
        """The folder a fine-tuned model loads from: its adapter (or model) folder."""
        return self.store.path(m.path)


def context(request: Request) -> Context:
    return request.app.state.ctx


_bearer = HTTPBearer(auto_error=False, description="an API key from `tunelab keys create NAME`")


def owner(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)
          ) -> Owner:
    ctx = context(request)
    if not ctx.settings.auth:
        return Owner(LOCAL_OWNER, LOCAL_OWNER)
    if creds is None or not creds.credentials.strip():
        raise APIError(401, "You didn't provide an API key. You need to provide your API key "
                       "in an Authorization header using Bearer auth (i.e. Authorization: "
                       "Bearer YOUR_KEY); create one with `tunelab keys create NAME`.",
                       code="missing_api_key")
    key = ctx.store.key_for_token(creds.credentials.strip())
    if key is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return Owner(key.id, key.name)
