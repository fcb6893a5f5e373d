"""The step loop of the tunelab engine: admission, chunked prefill, decode, delivery.

One scheduler thread runs every loaded model's steps, round robin (torch releases the GIL, so
the event loop stays responsive). A step of one model:
1. rows whose client left are dropped;
2. waiting requests are admitted while the batch has room (`max_batch_size`) and the memory
   budget holds the KV cache they may grow to (see cache.py); the others keep waiting, in
   order;
3. short prompts admitted together are prefilled in one forward; a prompt longer than
   `prefill_chunk` is read one chunk per step into a cache of its own;
4. the batch decodes one token per row.
A prefilled row joins the batch with its first token. Rows leave when they finish.

Failures stay with the request that caused them where that can be told: a row whose sampling
fails fails alone, and a prefill forward that fails for a group is retried one prompt at a
time. A failed decode forward (the whole batch's) fails the batch, and the engine goes on
serving.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

from tunelab.server.engine import GenerationFailed
from tunelab.server.engine.cache import Prefill, reserved_positions
from tunelab.server.engine.sampling import choose

log = logging.getLogger("tunelab.server.engine")

# Short prompts admitted in one step are prefilled together up to this many (padded) tokens
# per chunk size: a larger group would hold up the running streams' next token for longer.
GROUP_CHUNKS = 4


class Scheduler:
    """The scheduling half of `local.Engine` (which sets the attributes used here)."""

    # ---- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._jobs and \
                        not any(m.busy for m in self._models.values()):
                    self._cv.wait()
                if self._closed:
                    return
                jobs, self._jobs = self._jobs, deque()
                busy = [m for m in self._models.values() if m.busy]
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
                        for s in m.in_flight():
                            self._fail(s, e)
                        m.batch.reset()
                        m.prefilling.clear()
                    finally:
                        self._flush()

    def _step(self, m) -> None:
        self._drop_cancelled(m)
        short = self._admit(m)
        if short:
            self._prefill_group(m, short)
        if m.prefilling:
            self._prefill_chunk(m)
        if m.batch.rows:
            self._decode(m)

    def _drop_cancelled(self, m) -> None:
        gone = [i for i, s in enumerate(m.batch.rows) if s.cancelled]
        for i in gone:
            self._release(m.batch.rows[i])
        if gone:
            m.batch.keep([i for i, s in enumerate(m.batch.rows) if not s.cancelled])
        for p in [p for p in m.prefilling if p.seqs[0].cancelled]:   # one prompt each
            self._release(p.seqs[0])
            m.prefilling.remove(p)

    # ---- admission --------------------------------------------------------------------------

    def _admit(self, m) -> list:
        """Move waiting requests into the step; returns the short ones to prefill now."""
        admitted, short_width = [], 0
        group_limit = self.prefill_chunk * GROUP_CHUNKS
        with self._cv:
            while m.waiting and len(m.in_flight()) + len(admitted) < self.max_batch_size:
                s = m.waiting[0]
                if s.cancelled:
                    self._release(m.waiting.popleft())
                    continue
                if not self._fits(m, admitted + [s]):
                    break
                if len(s.prompt) <= self.prefill_chunk:
                    width = max(short_width, len(s.prompt))
                    n_short = sum(len(x.prompt) <= self.prefill_chunk for x in admitted) + 1
                    if n_short * width > group_limit and n_short > 1:
                        break           # the next step takes it
                    short_width = width
                admitted.append(m.waiting.popleft())
            stuck = m.waiting and not admitted and not m.in_flight() and \
                not m.waiting[0].cancelled
        if stuck:
            self._unstick(m)
        short = [s for s in admitted if len(s.prompt) <= self.prefill_chunk]
        pad = self._pad_id(m)
        m.prefilling.extend(Prefill.of([s], pad) for s in admitted if s not in short)
        return short

    def _fits(self, m, extra: list) -> bool:
        """Whether the budget holds every loaded model's weights and adapters, the other
        models' batches as reserved, and m's batch with `extra` at its largest."""
        seqs = m.in_flight() + extra
        need = reserved_positions(seqs) * m.kv_per_token
        others = sum(o.reserved_bytes() for o in self._models.values() if o is not m)
        weights = sum(o.nbytes for o in self._models.values())
        return weights + others + need <= self.memory_budget_bytes

    def _unstick(self, m) -> None:
        """Nothing of m runs and its first waiting request does not fit: other models hold the
        memory. Idle ones go; if that is not enough and nothing runs anywhere, the request can
        never be served (adapters loaded since it was admitted): it fails with the reason."""
        s = m.waiting[0]
        need = reserved_positions([s]) * m.kv_per_token
        self._evict(keep=m, need=need)
        with self._cv:
            if self._fits(m, [s]) or any(o.busy and o is not m for o in self._models.values()):
                return
            m.waiting.popleft()
        self._fail(s, GenerationFailed(
            f"the request needs {need >> 20} MB of KV cache, more than the memory budget "
            f"leaves beside the loaded weights ({self.memory_budget_bytes >> 20} MB in all)"))

    # ---- forward steps ----------------------------------------------------------------------

    def _prefill_group(self, m, seqs: list) -> None:
        p = Prefill.of(seqs, self._pad_id(m))
        try:
            logits = self._forward(m, p.ids, p.mask, p.cache, p.seqs)
        except Exception as e:
            if len(seqs) == 1:
                log.warning("prefill failed for one request of %s: %s", m.name, e)
                self._fail(seqs[0], e)
                return
            # which prompt broke it cannot be told from here: read them one at a time, so
            # only the one that fails alone fails
            log.warning("prefill of %d requests failed for %s (%s); retrying one by one",
                        len(seqs), m.name, e)
            for s in seqs:
                self._prefill_group(m, [s])
            return
        self._start(m, p, logits)

    def _prefill_chunk(self, m) -> None:
        # The prompt closest to its first token goes first (shortest remaining first): a
        # 600-token prompt does not wait behind a 4,000-token one that is half read.
        p = min(m.prefilling, key=lambda p: p.width - p.done)
        end = min(p.done + self.prefill_chunk, p.width)
        try:
            logits = self._forward(m, p.ids[:, p.done:end], p.mask[:, :end], p.cache, p.seqs)
        except Exception as e:
            log.warning("prefill failed for one request of %s: %s", m.name, e)
            m.prefilling.remove(p)
            self._fail(p.seqs[0], e)
            return
        p.done = end
        if end == p.width:
            m.prefilling.remove(p)
            self._start(m, p, logits)

    def _start(self, m, p: Prefill, logits) -> None:
        """The prefilled rows' first tokens; those still going join the batch."""
        import torch
        tokens = choose(logits, p.seqs)
        keep = [i for i, (s, t) in enumerate(zip(p.seqs, tokens)) if not self._advance(s, t)]
        if keep:
            p.keep(keep)
            m.batch.merge(p, torch.tensor([tokens[i] for i in keep]))

    def _decode(self, m) -> None:
        import torch
        b = m.batch
        b.mask = torch.cat([b.mask, b.mask.new_ones(len(b.rows), 1)], dim=1)
        logits = self._forward(m, b.last[:, None], b.mask, b.cache, b.rows)
        tokens = choose(logits, b.rows)
        keep = [i for i, (s, t) in enumerate(zip(b.rows, tokens)) if not self._advance(s, t)]
        b.last = torch.tensor([t if isinstance(t, int) else 0 for t in tokens])
        if len(keep) < len(b.rows):
            b.keep(keep)

    def _forward(self, m, ids, mask, cache, seqs: list):
        import torch
        position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)[:, -ids.shape[1]:]
        kwargs: dict[str, Any] = dict(input_ids=ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      position_ids=position_ids.to(self.device),
                                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        rows = m.bank.rows([s.unit.adapter for s in seqs]) if m.bank is not None \
            else contextlib.nullcontext()
        with torch.inference_mode(), rows:
            out = m.model(**kwargs)
        self.forward_steps += 1
        return out.logits[:, -1, :].float().cpu()

    @staticmethod
    def _pad_id(m) -> int:
        return m.model.generation_config.pad_token_id or 0

    def _advance(self, s, token) -> bool:
        """Record a row's new token (or its own failure); True when it leaves the batch."""
        if isinstance(token, Exception):
            log.warning("sampling failed for one request: %s", token)
            self._fail(s, token)
            return True
        s.generated += 1
        finish = "stop" if token in s.unit.eos else \
            "length" if s.generated >= s.max_new_tokens else None
        self._post(s, ([token], finish))
        if finish is not None or s.cancelled:
            self._release(s)
            return True
        return False

    # ---- delivery ---------------------------------------------------------------------------

    def _post(self, s, item: Any) -> None:
        with self._cv:
            self._outbox.append((s, item))

    def _fail(self, s, error: BaseException) -> None:
        self._post(s, error)
        self._release(s)

    def _release(self, s) -> None:
        if not s.released:
            s.released = True
            self._release_unit(s.unit)

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


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
