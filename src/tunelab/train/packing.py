"""Packing: several rendered examples per row of at most max_length tokens.

Each example keeps its own position_ids (restarting at 0) and the collator
(tunelab.batching.pad_rows) passes no attention mask for such rows, so transformers builds
a block-diagonal causal mask from the position_ids (masking_utils' packed-sequence detection;
it needs use_cache=False): an example attends only to itself.

Written by hand because the libraries' packing does something else: TRL's "bfd" packing and
transformers' DataCollatorWithFlattening flatten a whole batch into ONE row, whose attention
costs quadratically in the batch's total length (1.6 s/step vs 0.11 padded in a CPU probe);
here rows are capped at max_length, so the cost per row stays that of one max_length sequence.
"""
from __future__ import annotations

import bisect

from tunelab.data.render import IGNORE_INDEX


def pack(rows: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Best-fit decreasing bin packing of rendered rows (each <= max_length) into rows.

    Longest first, each into the fullest row that still has room (bisect over the rows' free
    space, so n log n rather than a scan of every row per example).
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]), reverse=True)
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []   # (free tokens, bin index), sorted
    for i in order:
        n = len(rows[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (room - n, b))
    packed = []
    for members in bins:
        ids, labels, pos = [], [], []
        for i in sorted(members):  # keep file order inside a row: deterministic
            r = rows[i]
            ids += r["input_ids"]
            # the first token of an example is never predicted from the previous example
            labels += [IGNORE_INDEX] + r["labels"][1:]
            pos += list(range(len(r["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return packed
