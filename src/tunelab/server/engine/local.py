"""tunelab's own generation engine: continuous batching over loaded models, many LoRA
fine-tunes on one base, and a memory budget that holds.

- Continuous batching (scheduler.py): waiting requests join the running batch at step
  boundaries and finished ones leave it; every request streams its tokens as they are made
  (text is decoded on the asyncio side, where `stop` strings are checked). Long prompts are
  read in chunks between decode steps.
- LoRA fine-tunes are adapters on ONE loaded copy of their base (adapters.py, lora.py): a batch
  mixes rows of different adapters and of the base itself; at most `max_adapters` stay
  resident per base, least recently used first out. Full fine-tunes and plain folders are
  models of their own.
- One memory budget counts the loaded weights, the resident adapters and the KV cache each
  running batch may grow to (cache.py): a request that would not fit waits; one that could
  never fit is refused before it is queued. Idle models are evicted least recently used.

Why not transformers' own continuous batching (`generation.continuous_batching`, the engine of
`transformers serve --continuous-batching`): it packs every request's tokens into one row
(`input_ids` of shape (1, total_tokens)) over a paged cache, and the mixed-adapter forward
(lora.py) selects adapters by batch row, so one packed row cannot carry several adapters. Here each
request is a row of a left-padded batch over a plain DynamicCache, as `model.generate` does,
so greedy output matches `tunelab.inference.generate` token for token.
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.server.engine import (GenerationChunk, GenerationEngine, GenerationFailed,
                                   GenerationRequest, check_request)
from tunelab.server.engine import adapters
from tunelab.server.engine.adapters import BASE_ADAPTER
from tunelab.server.engine.lora import LoraBank
from tunelab.server.engine.cache import Batch, cache_bytes, kv_bytes_per_token, \
    reserved_positions
from tunelab.server.engine.sampling import TextStream
from tunelab.server.engine.scheduler import Scheduler
from tunelab.server.engine.weights import default_budget, disk_bytes, param_bytes, \
    prepack_linears

log = logging.getLogger("tunelab.server.engine")

_TextStream = TextStream        # the name tests and older callers use


@dataclass(eq=False)
class _Model:
    """One loaded copy of weights with its running batch (a base with adapters, or a model)."""
    key: tuple
    name: str                           # the spec it is listed under in Engine.loaded()
    model: Any
    nbytes: int                         # weights and resident adapters
    max_positions: int | None
    kv_per_token: int
    bank: Any = None                    # lora.LoraBank: its resident adapters, once it has one
    refs: int = 0                       # requests admitted and not yet finished
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held for a step / a change
    waiting: deque = field(default_factory=deque)   # _Seq, guarded by Engine._cv
    batch: Batch = field(default_factory=Batch)
    prefilling: deque = field(default_factory=deque)    # cache.Prefill, one long prompt each

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.batch.rows or self.prefilling)

    def in_flight(self) -> list:
        return self.batch.rows + [s for p in self.prefilling for s in p.seqs]

    def reserved_bytes(self) -> int:
        return reserved_positions(self.in_flight()) * self.kv_per_token


@dataclass(eq=False)
class _Unit:
    """What one spec serves: a loaded model plus an adapter name (BASE_ADAPTER for none)."""
    model: _Model
    adapter: str
    tokenizer: Any
    eos: frozenset
    names: set[str]                     # spec strings that reach this unit (for unload)
    refs: int = 0                       # requests admitted and not yet finished
    last_used: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Seq:
    """One request in flight."""
    unit: _Unit
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    generator: Any                      # torch.Generator, or None when greedy
    sink: tuple | None = None           # (event loop, asyncio.Queue)
    generated: int = 0
    cancelled: bool = False             # client gone, stop string seen, model unloaded
    released: bool = False


def _spec_names(spec: str) -> set[str]:
    names = {spec}
    p = Path(spec).expanduser()
    if p.exists():
        names.add(str(p.resolve()))
    return names


def _norm(path: str) -> str:
    """One key per folder, however the spec spelled it (hub ids stay as they are)."""
    p = Path(path)
    return str(p.resolve()) if p.exists() else path


class Engine(Scheduler, GenerationEngine):
    """Serves GenerationRequests from a scheduler thread; safe to share across asyncio tasks."""

    def __init__(self, *, memory_budget_bytes: int | None = None, max_batch_size: int = 16,
                 precision: str = "auto", threads: int | None = None,
                 max_adapters: int | None = None, prefill_chunk: int = 256):
        """memory_budget_bytes: weights, resident adapters and KV caches together (None: half
        the available RAM). max_batch_size: most requests in one forward step per model.
        precision: "auto" (bf16 where the CPU/GPU runs it natively), "bf16" or "fp32".
        max_adapters: LoRA adapters resident per base (None: 64). prefill_chunk: prompt tokens
        read per step for a long prompt."""
        import torch

        from tunelab.runtime import resolve_precision, set_threads
        set_threads(threads)
        self.memory_budget_bytes = memory_budget_bytes or default_budget()
        self.max_batch_size = max_batch_size
        self.max_adapters = max_adapters or 64
        self.prefill_chunk = prefill_chunk
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16,
                      "fp32": torch.float32}[resolve_precision(precision)]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.forward_steps = 0          # model forward calls so far (prefills + decodes)
        self.adapter_loads = 0
        self.adapter_evictions = 0
        self._models: dict[tuple, _Model] = {}
        self._units: dict[tuple, _Unit] = {}
        self._tokenizers: OrderedDict[str, Any] = OrderedDict()   # tokenizer_key -> tokenizer
        self._cv = threading.Condition(threading.RLock())   # registry + waiting queues
        self._load_lock = threading.Lock()                  # one model or adapter load at a time
        self._adapter_ids = itertools.count()
        self._closed = False
        self._outbox: list[tuple[_Seq, Any]] = []
        self._jobs: deque[tuple[Callable, tuple, Future]] = deque()   # torch work to run
        # Requests are admitted (spec resolved, prompt rendered, limits checked) off the event
        # loop; a request waiting for a model load must not hold up the others.
        self._prep = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tunelab-prep")
        # ALL torch work (loads, adapters, steps) runs on this one thread. Every thread that
        # runs parallel torch ops keeps an OpenMP pool of its own, and with more pool threads
        # than cores libgomp stops spinning: steps measured 1.6x slower when another thread of
        # the process had run torch work, which costs more than pausing the other models'
        # streams while a model loads. A host process should leave heavy torch work to the
        # engine (or to other processes, as tunelab's job workers do).
        self._thread = threading.Thread(target=self._run, name="tunelab-engine", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the answer. Raises TunelabError before the first chunk for a bad request
        (unknown model spec, prompt longer than the model's positions, max_new_tokens that do
        not fit the model or the memory budget); the last chunk has a finish_reason.
        GenerationFailed if generation fails on the server's side."""
        loop = asyncio.get_running_loop()
        prepared = self._prep.submit(self._prepare, request)
        try:
            seq = await asyncio.wrap_future(prepared)
        except asyncio.CancelledError:   # the client left while its model was loading
            prepared.add_done_callback(self._release_prepared)
            raise
        queue: asyncio.Queue = asyncio.Queue()
        seq.sink = (loop, queue)
        stream = TextStream(seq.unit.tokenizer, list(request.stop))
        n_prompt, n_out = len(seq.prompt), 0
        self._submit(seq)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise GenerationFailed(str(item) or type(item).__name__) from item
                ids, finish = item
                n_out += len(ids)
                text, stopped = stream.push(ids, final=finish is not None)
                if stopped:
                    yield GenerationChunk(text, "stop", n_prompt, n_out)
                    return
                if finish is not None:
                    yield GenerationChunk(text, finish, n_prompt, n_out)
                    return
                if text:
                    yield GenerationChunk(text, None, n_prompt, n_out)
        finally:
            seq.cancelled = True    # a no-op once finished; otherwise the row leaves the batch

    def loaded(self) -> list[str]:
        """Model specs currently in memory (models and the adapters loaded on them)."""
        with self._cv:
            names = [m.name for m in self._models.values()]
            names += [min(u.names, key=len) for u in self._units.values()
                      if u.adapter != BASE_ADAPTER]
        return names

    def stats(self) -> dict:
        with self._cv:
            models = list(self._models.values())
            resident = {m.name: sorted(min(u.names, key=len) for u in self._units.values()
                                       if u.model is m and u.adapter != BASE_ADAPTER)
                        for m in models}
            return {"engine": "tunelab", "budget_bytes": self.memory_budget_bytes,
                    "weights_bytes": sum(m.nbytes for m in models),
                    "kv_bytes": sum(cache_bytes(m.batch.cache)
                                    + sum(cache_bytes(p.cache) for p in m.prefilling)
                                    for m in models),
                    "kv_reserved_bytes": sum(m.reserved_bytes() for m in models),
                    "max_adapters": self.max_adapters, "resident_adapters": resident,
                    "adapter_loads": self.adapter_loads,
                    "adapter_evictions": self.adapter_evictions,
                    "queued": sum(len(m.waiting) for m in models),
                    "running": sum(len(m.in_flight()) for m in models),
                    "forward_steps": self.forward_steps}

    def unload(self, model: str) -> None:
        """Drop a model spec (e.g. a deleted fine-tune); its in-flight requests fail."""
        names = _spec_names(model)
        with self._cv:
            units = [u for u in self._units.values() if u.names & names]
            models = [m for m in self._models.values() if m.name in names]
        for u in units:
            if u.adapter == BASE_ADAPTER:
                models.append(u.model)
            else:
                self._drop_adapter(u)
        for m in dict.fromkeys(models):
            self._drop_model(m, GenerationFailed(f"model '{model}' was unloaded"))

    def close(self) -> None:
        """Stop the scheduler thread and free the models; pending requests fail."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        while self._jobs:
            self._jobs.popleft()[2].set_exception(GenerationFailed("the engine was closed"))
        self._prep.shutdown(wait=False, cancel_futures=True)
        for m in list(self._models.values()):
            self._drop_model(m, GenerationFailed("the engine was closed"))

    # ---- admission (prep threads) -----------------------------------------------------------

    def _prepare(self, request: GenerationRequest) -> _Seq:
        import torch

        from tunelab.data.render import render_prompt
        if self._closed:
            raise GenerationFailed("the engine was closed")
        check_request(request)
        unit = self._unit(request.model)      # holds a ref on it and its model from here
        try:
            try:
                prompt = render_prompt(request.messages, unit.tokenizer)
            except TunelabError:
                raise
            except Exception as e:  # a template that rejects these messages (roles, order)
                raise TunelabError(f"the chat template refused these messages: {e}",
                                   field="messages") from None
            self._check_fits(unit.model, len(prompt), request)
        except BaseException:
            self._release_unit(unit)
            raise
        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed)
        return _Seq(unit, prompt, request.max_new_tokens, float(request.temperature),
                    float(request.top_p), generator)

    def _check_fits(self, m: _Model, n_prompt: int, request: GenerationRequest) -> None:
        """Refuse at once what could never be served: beyond the model's positions, or a KV
        cache larger than the budget leaves beside the model's own weights."""
        limit, new = m.max_positions, request.max_new_tokens
        if limit is not None and n_prompt >= limit:
            raise TunelabError(f"the prompt is {n_prompt} tokens; model '{request.shown}' "
                               f"takes at most {limit}", field="messages")
        if limit is not None and n_prompt + new > limit:
            raise TunelabError(f"the prompt ({n_prompt} tokens) plus {new} new tokens exceed "
                               f"the {limit} positions of model '{request.shown}'",
                               field="max_tokens")
        need = (n_prompt + new) * m.kv_per_token
        room = self.memory_budget_bytes - m.nbytes
        if need > room:
            mb = 2**20
            raise TunelabError(
                f"the prompt ({n_prompt} tokens) plus {new} new tokens need "
                f"{need / mb:.0f} MB of KV cache, and this server's memory budget leaves "
                f"{max(room, 0) / mb:.0f} MB beside the weights of model '{request.shown}' "
                f"({self.memory_budget_bytes / mb:.0f} MB in all): lower max_tokens, send "
                f"a shorter prompt, or start the server with a larger --memory-budget-gb",
                field="max_tokens")

    def _unit(self, spec: str) -> _Unit:
        from tunelab.models import ModelSource, resolve
        src = resolve(spec)
        ukey = (_norm(src.path), src.gguf_file, src.adapter and _norm(src.adapter))
        if (unit := self._take(ukey, spec)) is not None:
            return unit
        with self._load_lock:
            if (unit := self._take(ukey, spec)) is not None:
                return unit
            tokenizer = self._tokenizer(src)
            base_src = ModelSource(src.path, src.gguf_file)
            base_tok = tokenizer if src.adapter is None else self._tokenizer(base_src)
            if len(base_tok) != len(tokenizer) or src.below or \
                    (src.adapter is not None and not adapters.mixable(src.adapter)):
                # An adapter whose tokenizer grew the vocabulary past its base's (other
                # embeddings), one that is not plain LoRA (adapters.mixable), or one trained on another
                # adapter (src.path is not its base): merged, a model of its own.
                m = self._load_model(ukey, spec, src, tokenizer)
                return self._register(ukey, spec, m, BASE_ADAPTER, tokenizer)
            base_key = ukey[:2]
            with self._cv:      # the base may be loaded already, for another spec
                m = self._models.get(base_key)
                if m is not None:
                    m.refs += 1
            if m is None:
                name = spec if src.adapter is None else adapters.base_name(src.adapter)
                m = self._load_model(base_key, name, base_src, base_tok)
            if src.adapter is None:
                return self._register(ukey, spec, m, BASE_ADAPTER, tokenizer)
            try:
                self._make_adapter_room(m)
                name = self._on_torch_thread(self._attach_adapter, m, src.adapter)
            except BaseException:
                self._release_ref(m)
                raise
            unit = self._register(ukey, spec, m, name, tokenizer)
            self._evict(keep=m)
            return unit

    def _tokenizer(self, src):
        """One tokenizer object per distinct set of tokenizer files (see adapters)."""
        from tunelab.models import load_tokenizer
        key = adapters.tokenizer_key(src)
        with self._cv:
            tok = self._tokenizers.get(key)
            if tok is not None:
                self._tokenizers.move_to_end(key)
                return tok
        tok = load_tokenizer(source=src)
        with self._cv:
            self._tokenizers[key] = tok
            while len(self._tokenizers) > 32:   # distinct tokenizers, not adapters
                self._tokenizers.popitem(last=False)
        return tok

    def _take(self, ukey: tuple, spec: str) -> _Unit | None:
        with self._cv:
            unit = self._units.get(ukey)
            if unit is None or self._models.get(unit.model.key) is not unit.model:
                return None
            unit.refs += 1
            unit.model.refs += 1
            unit.last_used = unit.model.last_used = time.monotonic()
            unit.names |= _spec_names(spec)
            return unit

    def _register(self, ukey: tuple, spec: str, m: _Model, adapter: str, tokenizer) -> _Unit:
        """Make `spec` servable by `m`; the caller already holds the request's ref on `m`."""
        from tunelab.models import stop_token_ids
        # an adapter may bring its own tokenizer: its stop ids join the base model's
        eos = stop_token_ids(tokenizer, also=m.model.generation_config.eos_token_id)
        unit = _Unit(m, adapter, tokenizer, frozenset(eos), _spec_names(spec), refs=1)
        with self._cv:
            self._units[ukey] = unit
            m.last_used = time.monotonic()
        return unit

    def _load_model(self, key: tuple, name: str, src, tokenizer) -> _Model:
        """Load (under _load_lock), holding one ref for the caller."""
        self._evict(need=disk_bytes(src.path))
        model, nbytes = self._on_torch_thread(self._load_weights, src, tokenizer)
        cfg = model.config.get_text_config(decoder=True)
        m = _Model(key, name, model, nbytes, getattr(cfg, "max_position_embeddings", None),
                   kv_bytes_per_token(model, self.dtype), refs=1)
        with self._cv:
            self._models[key] = m
        self._evict(keep=m)
        return m

    def _load_weights(self, src, tokenizer) -> tuple[Any, int]:
        from tunelab.models import load_model
        # an adapter trained on adapters (src.below) comes merged, innermost first
        model = load_model(source=src, tokenizer=tokenizer, dtype=self.dtype)
        model = model.to(self.device)
        model.eval()
        nbytes = param_bytes(model)
        if self.device.type == "cpu" and 2 * nbytes <= self.memory_budget_bytes:
            nbytes += prepack_linears(model, self.max_batch_size)
        return model, nbytes

    # ---- adapters ---------------------------------------------------------------------------

    def _attach_adapter(self, m: _Model, adapter_dir: str) -> str:
        name = f"adapter{next(self._adapter_ids)}"
        with m.lock:
            if m.bank is None:
                m.bank = LoraBank(m.model, self.device, self.dtype)
            before = m.bank.nbytes
            m.bank.add(name, adapter_dir)
            m.nbytes += m.bank.nbytes - before
        self.adapter_loads += 1
        return name

    def _make_adapter_room(self, m: _Model) -> None:
        """Under _load_lock: evict least-recently-used idle adapters of m until one more fits
        in max_adapters; while every resident adapter is in use, wait for one to finish."""
        while True:
            with self._cv:
                resident = [u for u in self._units.values()
                            if u.model is m and u.adapter != BASE_ADAPTER]
                if len(resident) < self.max_adapters or self._closed:
                    return
                idle = [u for u in resident if u.refs == 0]
                if not idle:
                    self._cv.wait(timeout=1.0)
                    continue
                victim = min(idle, key=lambda u: u.last_used)
            if self._drop_adapter(victim, only_if_idle=True):
                self.adapter_evictions += 1

    def _drop_adapter(self, u: _Unit, only_if_idle: bool = False) -> bool:
        """Delete an adapter from its base; its requests fail (unless only_if_idle, when an
        adapter that got a request meanwhile stays). True when it went."""
        m = u.model
        with m.lock:
            with self._cv:
                if only_if_idle and u.refs:
                    return False
                for k in [k for k, v in self._units.items() if v is u]:
                    del self._units[k]
                doomed = [s for s in m.waiting if s.unit is u]
                for s in doomed:
                    m.waiting.remove(s)
            gone = GenerationFailed("the model was unloaded")
            for s in doomed:
                self._fail(s, gone)
            for p in [p for p in m.prefilling if p.seqs[0].unit is u]:
                m.prefilling.remove(p)
                self._fail(p.seqs[0], gone)
            keep = [i for i, s in enumerate(m.batch.rows) if s.unit is not u]
            for s in m.batch.rows:
                if s.unit is u:
                    self._fail(s, gone)
            if m.batch.rows:
                m.batch.keep(keep)
            if m.bank is not None and u.adapter in m.bank.slots:
                m.bank.remove(u.adapter)     # its slot is zeroed and reused; bytes stay
        self._flush()
        return True

    # ---- models -----------------------------------------------------------------------------

    def _evict(self, *, keep: _Model | None = None, need: int = 0) -> None:
        """Drop least-recently-used idle models until the loaded ones (plus `need`) fit."""
        while True:
            with self._cv:
                used = sum(m.nbytes + m.reserved_bytes() for m in self._models.values())
                idle = [m for m in self._models.values() if m is not keep and m.refs == 0]
                if used + need <= self.memory_budget_bytes or not idle:
                    return   # models in use stay, even over budget: they go when idle
                victim = min(idle, key=lambda m: m.last_used)
            log.info("evicting %s (%d MB) to stay under the memory budget", victim.name,
                     victim.nbytes >> 20)
            self._drop_model(victim, GenerationFailed("model evicted"))

    def _drop_model(self, m: _Model, error: BaseException) -> None:
        with m.lock:
            with self._cv:
                if self._models.get(m.key) is m:
                    del self._models[m.key]
                for k in [k for k, u in self._units.items() if u.model is m]:
                    del self._units[k]
                doomed = list(m.waiting) + m.in_flight()
                m.waiting.clear()
            for s in doomed:
                self._fail(s, error)
            m.batch.reset()
            m.prefilling.clear()
            m.model = None
        self._flush()
        gc.collect()

    def _release_ref(self, m: _Model) -> None:
        with self._cv:
            m.refs -= 1
            m.last_used = time.monotonic()

    def _release_unit(self, u: _Unit) -> None:
        with self._cv:
            u.refs -= 1
            u.last_used = time.monotonic()
            self._release_ref(u.model)
            self._cv.notify_all()       # an adapter slot may have come free

    def _release_prepared(self, prepared) -> None:
        """A request prepared for a client that has gone: give back its hold on the model."""
        if not prepared.cancelled() and prepared.exception() is None:
            self._release(prepared.result())

    # ---- hand-over to the scheduler thread --------------------------------------------------

    def _submit(self, seq: _Seq) -> None:
        with self._cv:
            m = seq.unit.model
            if self._closed or self._models.get(m.key) is not m:
                self._fail(seq, GenerationFailed("the model was unloaded"))
                self._flush()
                return
            m.waiting.append(seq)
            self._cv.notify()

    def _on_torch_thread(self, fn: Callable, *args):
        """Run `fn(*args)` on the scheduler thread, between steps, and return its result."""
        done: Future = Future()
        with self._cv:
            if self._closed:
                raise GenerationFailed("the engine was closed")
            self._jobs.append((fn, args, done))
            self._cv.notify()
        return done.result()
