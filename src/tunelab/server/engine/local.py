"""The generation engine behind `POST /v1/chat/completions`.

One scheduler thread runs a step loop per loaded model (torch releases the GIL, so the event
loop stays responsive): continuous batching, where waiting requests join the running batch at
step boundaries (one prefill forward for the joiners, whose KV cache is then merged into the
batch's) and finished ones leave it (their cache rows are dropped). Every request streams its
tokens as they are made; text is decoded on the asyncio side, where `stop` strings are checked.

LoRA fine-tunes are served as PEFT adapters on ONE loaded copy of their base: a batch mixes
rows of different adapters and of the base itself (`adapter_names=`, "__base__" for base rows).
Full fine-tunes and plain folders are models of their own. Models load lazily and are evicted
least-recently-used under a budget of parameter bytes.

Why not transformers' own continuous batching (`generation.continuous_batching`, the engine of
`transformers serve --continuous-batching`): it packs every request's tokens into one row
(`input_ids` of shape (1, total_tokens)) over a paged cache, and PEFT's mixed-adapter forward
selects adapters by batch row, so one packed row cannot carry several adapters. Here each
request is a row of a left-padded batch over a plain DynamicCache, as `model.generate` does,
so greedy output matches `tunelab.inference.generate` token for token.
"""
from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.server.engine import (GenerationChunk, GenerationEngine, GenerationFailed,
                                   GenerationRequest)

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"       # PEFT's name for "no adapter" in a mixed batch


# ---- loaded models ------------------------------------------------------------------------


@dataclass(eq=False)
class _Model:
    """One loaded copy of weights with its running batch (a base with adapters, or a model)."""
    key: tuple
    name: str                           # the spec it is listed under in Engine.loaded()
    model: Any
    nbytes: int
    max_positions: int | None
    peft: bool = False                  # wrapped as a PeftModel (has adapters)
    refs: int = 0                       # requests admitted and not yet finished
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held for a step / a change
    waiting: deque = field(default_factory=deque)   # _Seq, guarded by Engine._cv
    rows: list = field(default_factory=list)        # _Seq in the batch, in row order
    joining: list = field(default_factory=list)     # _Seq being prefilled this step
    cache: Any = None                   # DynamicCache of the batch, left-padded
    mask: Any = None                    # (rows, cache length) attention mask over the cache
    last: Any = None                    # (rows,) the token each row feeds next (not cached)


@dataclass(eq=False)
class _Unit:
    """What one spec serves: a loaded model plus an adapter name (BASE_ADAPTER for none)."""
    model: _Model
    adapter: str
    tokenizer: Any
    eos: frozenset
    names: set[str]                     # spec strings that reach this unit (for unload)


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


def _prepack_linears(model, batch_hint: int) -> int:
    """Give every bf16 nn.Linear a copy of its weight in oneDNN's blocked layout, as torch
    inductor's CPU backend does: plain F.linear reorders the weight on every call, and decode
    steps of SmolLM2-135M (batch 8, 2 cores) went 25.6 -> 21.3 ms with the very same logits.
    Costs a second copy of those weights (counted in the memory budget); LoRA layers keep
    wrapping the same modules. Returns the bytes added (0 when this torch cannot do it)."""
    import torch
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear
               and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
    if not linears or not torch.backends.mkldnn.is_available():
        return 0
    try:    # private ops: check them on one layer before trusting them with all
        reorder, linear = torch.ops.mkldnn._reorder_linear_weight, \
            torch.ops.mkldnn._linear_pointwise
        probe = linears[0]
        x = torch.randn(2, 3, probe.in_features, dtype=torch.bfloat16)
        with torch.inference_mode():
            packed = reorder(probe.weight.detach(), batch_hint)
            if not torch.equal(linear(x, packed, probe.bias, "none", [], ""), probe(x)):
                return 0
    except (AttributeError, RuntimeError):
        return 0

    def packed_forward(weight, bias):
        return lambda x: linear(x, weight, bias, "none", [], "")

    added = 0
    with torch.inference_mode():
        for mod in linears:
            packed = reorder(mod.weight.detach(), batch_hint)
            mod.forward = packed_forward(packed, mod.bias)   # nn.Module calls self.forward
            added += packed.numel() * packed.element_size()
    return added


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _disk_bytes(path: str) -> int:
    """A size estimate before loading, so eviction can make room first."""
    folder = Path(path)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin", "*.gguf")
               for f in folder.glob(pat))


def _default_budget() -> int:
    import psutil
    # Parameters get half of what is free: activations, KV caches and the rest of the process
    # need the other half.
    return int(psutil.virtual_memory().available * 0.5)


def _spec_names(spec: str) -> set[str]:
    names = {spec}
    p = Path(spec).expanduser()
    if p.exists():
        names.add(str(p.resolve()))
    return names


def _check_request(r: GenerationRequest) -> None:
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


class _TextStream:
    """Incremental detokenization: decode the whole completion each time and emit the new
    suffix, so merged and multi-byte tokens come out right. An incomplete trailing character
    (U+FFFD) and a tail that may be the start of a stop string are held back."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """(new text, whether a stop string ended it)."""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(map(len, self.stop)) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = max(min(hits), self.sent)
                new, self.sent = text[self.sent:cut], cut
                return new, True
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            hold = max((k for s in self.stop for k in range(1, min(len(s), end - self.sent + 1))
                        if text.endswith(s[:k], 0, end)), default=0)
            end -= hold
        new, self.sent = text[self.sent:end], max(self.sent, end)
        return new, False


# ---- the engine -----------------------------------------------------------------------------


class Engine(GenerationEngine):
    """Serves GenerationRequests from a scheduler thread; safe to share across asyncio tasks."""

    def __init__(self, *, memory_budget_bytes: int | None = None, max_batch_size: int = 16,
                 precision: str = "auto", threads: int | None = None,
                 max_adapters: int | None = None):
        """memory_budget_bytes: bytes of model parameters kept loaded (None: half the available
        RAM). max_batch_size: most requests in one forward step per model. precision: "auto"
        (bf16 where the CPU/GPU runs it natively), "bf16" or "fp32"."""
        import torch

        from tunelab.runtime import resolve_precision, set_threads
        set_threads(threads)
        self.memory_budget_bytes = memory_budget_bytes or _default_budget()
        self.max_batch_size = max_batch_size
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16,
                      "fp32": torch.float32}[resolve_precision(precision)]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.forward_steps = 0          # model forward calls so far (prefills + decodes)
        self._models: dict[tuple, _Model] = {}
        self._units: dict[tuple, _Unit] = {}
        self._cv = threading.Condition(threading.RLock())   # registry + waiting queues
        self._load_lock = threading.Lock()                  # one model load at a time
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
        not fit); the last chunk has a finish_reason. GenerationFailed if the batch fails."""
        loop = asyncio.get_running_loop()
        prepared = self._prep.submit(self._prepare, request)
        try:
            seq = await asyncio.wrap_future(prepared)
        except asyncio.CancelledError:   # the client left while its model was loading
            prepared.add_done_callback(self._release_prepared)
            raise
        queue: asyncio.Queue = asyncio.Queue()
        seq.sink = (loop, queue)
        stream = _TextStream(seq.unit.tokenizer, list(request.stop))
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
        _check_request(request)
        unit = self._unit(request.model)      # holds a ref on its model from here
        try:
            try:
                prompt = render_prompt(request.messages, unit.tokenizer)
            except TunelabError:
                raise
            except Exception as e:  # a template that rejects these messages (roles, order)
                raise TunelabError(f"the chat template refused these messages: {e}",
                                   field="messages") from None
            limit = unit.model.max_positions
            if limit is not None and len(prompt) >= limit:
                raise TunelabError(f"the prompt is {len(prompt)} tokens; model "
                                   f"'{request.model}' takes at most {limit}", field="messages")
            if limit is not None and len(prompt) + request.max_new_tokens > limit:
                raise TunelabError(f"the prompt ({len(prompt)} tokens) plus "
                                   f"{request.max_new_tokens} new tokens exceed the model's "
                                   f"{limit} positions", field="max_tokens")
        except BaseException:
            self._release_ref(unit.model)
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

    def _unit(self, spec: str) -> _Unit:
        from tunelab.models import ModelSource, load_tokenizer, resolve
        src = resolve(spec)
        ukey = (_norm(src.path), src.gguf_file, src.adapter and _norm(src.adapter))
        if (unit := self._take(ukey, spec)) is not None:
            return unit
        with self._load_lock:
            if (unit := self._take(ukey, spec)) is not None:
                return unit
            tokenizer = load_tokenizer(spec, source=src)
            base_src = ModelSource(src.path, src.gguf_file)
            base_tok = tokenizer if src.adapter is None else load_tokenizer(source=base_src)
            if len(base_tok) != len(tokenizer) or src.below or \
                    (src.adapter is not None and not _mixable(src.adapter)):
                # An adapter whose tokenizer grew the vocabulary past its base's (other
                # embeddings), one PEFT cannot mix into a batch, or one trained on another
                # adapter (src.path is not its base): merged, a model of its own.
                m = self._load_model(ukey, spec, src, tokenizer)
                return self._register(ukey, spec, m, BASE_ADAPTER, tokenizer)
            base_key = ukey[:2]
            with self._cv:      # the base may be loaded already, for another spec
                m = self._models.get(base_key)
                if m is not None:
                    m.refs += 1
            if m is None:
                name = spec if src.adapter is None else _base_name(src.adapter)
                m = self._load_model(base_key, name, base_src, base_tok)
            if src.adapter is None:
                return self._register(ukey, spec, m, BASE_ADAPTER, tokenizer)
            try:
                adapter = self._add_adapter(m, src.adapter)
            except BaseException:
                self._release_ref(m)
                raise
            unit = self._register(ukey, spec, m, adapter, tokenizer)
            self._evict(keep=m)
            return unit

    def _take(self, ukey: tuple, spec: str) -> _Unit | None:
        with self._cv:
            unit = self._units.get(ukey)
            if unit is None or self._models.get(unit.model.key) is not unit.model:
                return None
            unit.model.refs += 1
            unit.model.last_used = time.monotonic()
            unit.names |= _spec_names(spec)
            return unit

    def _register(self, ukey: tuple, spec: str, m: _Model, adapter: str, tokenizer) -> _Unit:
        """Make `spec` servable by `m`; the caller already holds the request's ref on `m`."""
        from tunelab.models import stop_token_ids
        # an adapter may bring its own tokenizer: its stop ids join the base model's
        eos = stop_token_ids(tokenizer, also=m.model.generation_config.eos_token_id)
        unit = _Unit(m, adapter, tokenizer, frozenset(eos), _spec_names(spec))
        with self._cv:
            self._units[ukey] = unit
            m.last_used = time.monotonic()
        return unit

    def _load_model(self, key: tuple, name: str, src, tokenizer) -> _Model:
        """Load (under _load_lock), holding one ref for the caller."""
        self._evict(need=_disk_bytes(src.path))
        model, nbytes = self._on_torch_thread(self._load_weights, src, tokenizer)
        cfg = model.config.get_text_config(decoder=True)
        m = _Model(key, name, model, nbytes, getattr(cfg, "max_position_embeddings", None),
                   refs=1)
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
        nbytes = _param_bytes(model)
        if self.device.type == "cpu" and 2 * nbytes <= self.memory_budget_bytes:
            nbytes += _prepack_linears(model, self.max_batch_size)
        return model, nbytes

    def _add_adapter(self, m: _Model, adapter_dir: str) -> str:
        return self._on_torch_thread(self._inject_adapter, m, adapter_dir)

    def _inject_adapter(self, m: _Model, adapter_dir: str) -> str:
        from peft import PeftModel
        name = f"adapter{next(self._adapter_ids)}"  # PEFT names must be plain identifiers
        with m.lock:
            before = _param_bytes(m.model)
            if not m.peft:
                m.model = PeftModel.from_pretrained(m.model, adapter_dir, adapter_name=name)
                m.peft = True
            else:
                m.model.load_adapter(adapter_dir, adapter_name=name)
            m.model.to(self.device).eval()
            m.nbytes += _param_bytes(m.model) - before
        return name

    def _evict(self, *, keep: _Model | None = None, need: int = 0) -> None:
        """Drop least-recently-used idle models until the loaded ones (plus `need`) fit."""
        while True:
            with self._cv:
                used = sum(m.nbytes for m in self._models.values())
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
                doomed = list(m.waiting) + m.rows
                m.waiting.clear()
            for s in doomed:
                self._fail(s, error)
            self._reset_batch(m)
            m.model = None
        self._flush()
        gc.collect()

    def _drop_adapter(self, u: _Unit) -> None:
        m = u.model
        with m.lock:
            with self._cv:
                for k in [k for k, v in self._units.items() if v is u]:
                    del self._units[k]
                doomed = [s for s in m.waiting if s.unit is u]
                for s in doomed:
                    m.waiting.remove(s)
            gone = GenerationFailed("the model was unloaded")
            for s in doomed:
                self._fail(s, gone)
            keep = [i for i, s in enumerate(m.rows) if s.unit is not u]
            for s in m.rows:
                if s.unit is u:
                    self._fail(s, gone)
            if m.rows:
                self._keep_rows(m, keep)
            if m.model is not None:
                before = _param_bytes(m.model)
                m.model.delete_adapter(u.adapter)
                m.nbytes -= before - _param_bytes(m.model)
        self._flush()

    def _release_ref(self, m: _Model) -> None:
        with self._cv:
            m.refs -= 1
            m.last_used = time.monotonic()

    # ---- scheduler thread -------------------------------------------------------------------

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

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._jobs and \
                        not any(m.waiting or m.rows for m in self._models.values()):
                    self._cv.wait()
                if self._closed:
                    return
                jobs, self._jobs = self._jobs, deque()
                busy = [m for m in self._models.values() if m.waiting or m.rows]
            for fn, args, done in jobs:
                try:
                    done.set_result(fn(*args))
                except BaseException as e:
                    done.set_exception(e)
            for m in busy:      # one step per model, round robin
                with m.lock:
                    if m.model is None:
                        continue
                    try:
                        self._step(m)
                    except Exception as e:  # fail this batch, keep serving the others
                        log.exception("generation step failed for %s", m.name)
                        for s in m.rows + m.joining:
                            self._fail(s, e)
                        self._reset_batch(m)
                    finally:
                        self._flush()

    def _step(self, m: _Model) -> None:
        gone = [i for i, s in enumerate(m.rows) if s.cancelled]
        if gone:
            for i in gone:
                self._release(m.rows[i])
            self._keep_rows(m, [i for i, s in enumerate(m.rows) if not s.cancelled])
        with self._cv:
            joiners: list[_Seq] = []
            while m.waiting and len(m.rows) + len(joiners) < self.max_batch_size:
                s = m.waiting.popleft()
                if s.cancelled:
                    self._release(s)
                else:
                    joiners.append(s)
        m.joining = joiners
        if joiners:
            self._prefill(m, joiners)
        m.joining = []
        if m.rows:
            self._decode(m)

    def _prefill(self, m: _Model, seqs: list[_Seq]) -> None:
        import torch
        from transformers import DynamicCache
        pad = m.model.generation_config.pad_token_id or 0
        width = max(len(s.prompt) for s in seqs)
        # Left padding, as model.generate does: every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (width - len(s.prompt)) + s.prompt for s in seqs])
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in seqs])
        # No config: plain full-attention layers that _merge and _keep_rows can pad and slice.
        # Sliding-window layers then keep every position; their mask still limits the window,
        # counted in cache columns (left padding included), as model.generate does.
        cache = DynamicCache()
        logits = self._forward(m, ids, mask, cache, seqs)
        tokens = self._sample(logits, seqs)
        keep = [i for i, (s, t) in enumerate(zip(seqs, tokens)) if not self._advance(s, t)]
        if not keep:
            return
        if len(keep) < len(seqs):
            idx = torch.tensor(keep)
            for layer in cache.layers:
                if layer.keys is not None:
                    layer.keys, layer.values = layer.keys[idx], layer.values[idx]
            mask = mask[idx]
        last = torch.tensor([tokens[i] for i in keep])
        self._merge(m, cache, mask, [seqs[i] for i in keep], last)

    def _decode(self, m: _Model) -> None:
        import torch
        m.mask = torch.cat([m.mask, m.mask.new_ones(len(m.rows), 1)], dim=1)
        logits = self._forward(m, m.last[:, None], m.mask, m.cache, m.rows)
        tokens = self._sample(logits, m.rows)
        keep = [i for i, (s, t) in enumerate(zip(m.rows, tokens)) if not self._advance(s, t)]
        m.last = torch.tensor(tokens)
        if len(keep) < len(m.rows):
            self._keep_rows(m, keep)

    def _forward(self, m: _Model, ids, mask, cache, seqs: list[_Seq]):
        import torch
        position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)[:, -ids.shape[1]:]
        kwargs: dict[str, Any] = dict(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      position_ids=position_ids.to(self.device),
                                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        if m.peft:
            kwargs["adapter_names"] = [s.unit.adapter for s in seqs]
        with torch.inference_mode():
            out = m.model(**kwargs)
        self.forward_steps += 1
        return out.logits[:, -1, :].float().cpu()

    def _sample(self, logits, seqs: list[_Seq]) -> list[int]:
        import torch
        tokens = logits.argmax(-1).tolist()
        for i, s in enumerate(seqs):
            if s.temperature > 0:
                probs = torch.softmax(logits[i] / s.temperature, dim=-1)
                if s.top_p < 1:
                    # Nucleus: the most likely tokens whose mass reaches top_p (at least one).
                    p, order = probs.sort(descending=True)
                    p[(p.cumsum(0) - p) >= s.top_p] = 0
                    tokens[i] = int(order[torch.multinomial(p, 1, generator=s.generator)])
                else:
                    tokens[i] = int(torch.multinomial(probs, 1, generator=s.generator))
        return tokens

    def _advance(self, s: _Seq, token: int) -> bool:
        """Record a new token of `s`; True when the request leaves the batch."""
        s.generated += 1
        finish = "stop" if token in s.unit.eos else \
            "length" if s.generated >= s.max_new_tokens else None
        self._post(s, ([token], finish))
        if finish is not None or s.cancelled:
            self._release(s)
            return True
        return False

    def _keep_rows(self, m: _Model, keep: list[int]) -> None:
        """Drop the batch rows not in `keep`, and the leading cache columns no row needs."""
        import torch
        m.rows = [m.rows[i] for i in keep]
        if not keep:
            self._reset_batch(m)
            return
        idx = torch.tensor(keep)
        mask = m.mask[idx]
        # The batch is left-padded: columns that are padding in every remaining row go.
        start = int(mask.any(0).nonzero()[0])
        m.mask = mask[:, start:]
        m.last = m.last[idx]
        for layer in m.cache.layers:
            if layer.keys is not None:
                layer.keys = layer.keys[idx, :, start:]
                layer.values = layer.values[idx, :, start:]

    def _merge(self, m: _Model, cache, mask, seqs: list[_Seq], last) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter cache."""
        import torch
        import torch.nn.functional as F
        if not m.rows:
            m.cache, m.mask, m.rows, m.last = cache, mask, list(seqs), last
            return
        old_len, new_len = m.mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old, new in zip(m.cache.layers, cache.layers):
            if old.keys is None:
                continue
            old.keys = torch.cat([F.pad(old.keys, (0, 0, width - old_len, 0)),
                                  F.pad(new.keys, (0, 0, width - new_len, 0))])
            old.values = torch.cat([F.pad(old.values, (0, 0, width - old_len, 0)),
                                    F.pad(new.values, (0, 0, width - new_len, 0))])
        m.mask = torch.cat([F.pad(m.mask, (width - old_len, 0)),
                            F.pad(mask, (width - new_len, 0))])
        m.rows += seqs
        m.last = torch.cat([m.last, last])

    def _reset_batch(self, m: _Model) -> None:
        m.rows, m.joining, m.cache, m.mask, m.last = [], [], None, None, None

    # ---- delivery ---------------------------------------------------------------------------

    def _release_prepared(self, prepared) -> None:
        """A request prepared for a client that has gone: give back its hold on the model."""
        if not prepared.cancelled() and prepared.exception() is None:
            self._release(prepared.result())

    def _release(self, s: _Seq) -> None:
        if not s.released:
            s.released = True
            self._release_ref(s.unit.model)

    def _post(self, s: _Seq, item: Any) -> None:
        with self._cv:
            self._outbox.append((s, item))

    def _fail(self, s: _Seq, error: BaseException) -> None:
        self._post(s, error)
        self._release(s)

    def _flush(self) -> None:
        """Hand this step's tokens to their event loops: one wake-up per loop, not per token."""
        with self._cv:
            out, self._outbox = self._outbox, []
        by_loop: dict[Any, list] = {}
        for s, item in out:
            if s.sink is not None:
                by_loop.setdefault(s.sink[0], []).append((s.sink[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:    # that event loop is closed: nobody is listening
                for s, _ in out:
                    if s.sink is not None and s.sink[0] is loop:
                        s.cancelled = True


def _norm(path: str) -> str:
    """One key per folder, however the spec spelled it (hub ids stay as they are)."""
    p = Path(path)
    return str(p.resolve()) if p.exists() else path


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


_ADAPTER_OWN = ("lora_", "trainable_tokens_delta", "modules_to_save")


def _mixable(adapter_dir: str) -> bool:
    """Whether the adapter can share its base with other rows of a batch: PEFT batches
    `adapter_names=` for plain LoRA only (it refuses DoRA, for one), and an adapter saved with
    whole layers (PEFT saves the embeddings of a resized vocabulary, as tunelab's LoRA on a
    template-less base does) would overwrite the shared base's weights when loaded."""
    from safetensors import safe_open
    folder = Path(adapter_dir)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or not weights.exists():
        return False
    with safe_open(str(weights), "pt") as f:
        return all(any(own in k for own in _ADAPTER_OWN) for k in f.keys())


def _base_name(adapter_dir: str) -> str:
    """The base spec an adapter names (how Engine.loaded() lists the base it loaded)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return str(cfg.get("base_model_name_or_path"))
