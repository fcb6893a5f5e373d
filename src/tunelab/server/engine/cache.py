"""The KV cache of a running batch, and what it costs.

A batch is a left-padded rectangle, as `model.generate` makes it: row i holds one request,
every prompt ends where generation starts, and the cache has one column per position of the
longest row. Rows join (their prefilled cache is merged in, the shorter side padded on the
left) and leave (their row is sliced out, and leading columns that are padding in every
remaining row go), so the width is the longest live row, never more.

That shape gives the memory bound admission control relies on: while the batch runs, its cache
never holds more than rows x max(prompt + max_new_tokens) positions of `kv_bytes_per_token`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def kv_bytes_per_token(model, dtype) -> int:
    """Keys and values of one position across all layers (full attention: sliding-window
    layers keep every position here too, see Prefill)."""
    import torch
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * size


def reserved_positions(seqs) -> int:
    """The most cache positions a batch of these requests can come to hold (see the module
    doc): rows x the longest prompt + max_new_tokens among them."""
    if not seqs:
        return 0
    return len(seqs) * max(len(s.prompt) + s.max_new_tokens for s in seqs)


def cache_bytes(cache) -> int:
    if cache is None:
        return 0
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if t is not None)


@dataclass(eq=False)
class Prefill:
    """Prompts being read into a cache of their own before they join the batch. A prompt
    longer than the engine's chunk is read a chunk per step, between the batch's decode
    steps, so the other streams keep getting tokens meanwhile; short prompts that arrive
    together are read in one forward."""
    seqs: list
    ids: Any                    # (rows, width) left-padded prompt ids
    mask: Any                   # (rows, width) 1 for prompt tokens
    cache: Any                  # DynamicCache of the columns read so far
    done: int = 0               # columns read so far

    @classmethod
    def of(cls, seqs: list, pad: int) -> Prefill:
        import torch
        from transformers import DynamicCache
        width = max(len(s.prompt) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s.prompt)) + s.prompt for s in seqs])
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt)
                             for s in seqs])
        # No config: plain full-attention layers that Batch can pad and slice. Sliding-window
        # layers then keep every position; their mask still limits the window, counted in
        # cache columns (left padding included), as model.generate does.
        return cls(list(seqs), ids, mask, DynamicCache())

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def keep(self, keep: list[int]) -> None:
        """Only these rows go on (after the first token, some may have finished)."""
        import torch
        if len(keep) == len(self.seqs):
            return
        idx = torch.tensor(keep)
        self.seqs = [self.seqs[i] for i in keep]
        self.mask = self.mask[idx]
        for layer in self.cache.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]


@dataclass(eq=False)
class Batch:
    """The running rows of one model and their cache."""
    rows: list = field(default_factory=list)    # _Seq in row order
    cache: Any = None           # DynamicCache, left-padded
    mask: Any = None            # (rows, cache length) attention mask over the cache
    last: Any = None            # (rows,) the token each row feeds next (not cached yet)

    def reset(self) -> None:
        self.rows, self.cache, self.mask, self.last = [], None, None, None

    def keep(self, keep: list[int]) -> None:
        """Drop the rows not in `keep`, and the leading cache columns no row needs."""
        import torch
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.reset()
            return
        idx = torch.tensor(keep)
        mask = self.mask[idx]
        start = int(mask.any(0).nonzero()[0])
        self.mask = mask[:, start:]
        self.last = self.last[idx]
        for layer in self.cache.layers:
            if layer.keys is not None:
                layer.keys = layer.keys[idx, :, start:]
                layer.values = layer.values[idx, :, start:]

    def merge(self, p: Prefill, last) -> None:
        """Append prefilled rows, left-padding the shorter cache."""
        import torch
        import torch.nn.functional as F
        if not self.rows:
            self.cache, self.mask, self.rows, self.last = p.cache, p.mask, list(p.seqs), last
            return
        old_len, new_len = self.mask.shape[1], p.mask.shape[1]
        width = max(old_len, new_len)
        for old, new in zip(self.cache.layers, p.cache.layers):
            if old.keys is None:
                continue
            old.keys = torch.cat([F.pad(old.keys, (0, 0, width - old_len, 0)),
                                  F.pad(new.keys, (0, 0, width - new_len, 0))])
            old.values = torch.cat([F.pad(old.values, (0, 0, width - old_len, 0)),
                                    F.pad(new.values, (0, 0, width - new_len, 0))])
        self.mask = torch.cat([F.pad(self.mask, (width - old_len, 0)),
                               F.pad(p.mask, (width - new_len, 0))])
        self.rows += p.seqs
        self.last = torch.cat([self.last, last])
