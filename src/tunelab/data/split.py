"""Deterministic train/validation/test splits that never put one example in two splits."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def example_key(example: Any) -> str:
    """A stable identity for duplicate detection: the hash of its canonical JSON."""
    payload = example.to_json() if hasattr(example, "to_json") else example
    if isinstance(payload, dict) and "messages" in payload:
        payload = payload["messages"]
    return hashlib.sha1(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def split(examples: Sequence[T], *, val: float = 0.1, test: float = 0.1,
          seed: int = 0) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with `seed` and cut. Exact duplicates are grouped so they land in one split."""
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise ValueError("val and test must be fractions in [0, 1) that sum to less than 1")
    groups: dict[str, list[T]] = {}
    for ex in examples:
        groups.setdefault(example_key(ex), []).append(ex)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n = len(keys)
    n_test, n_val = round(n * test), round(n * val)
    test_keys, val_keys, train_keys = keys[:n_test], keys[n_test:n_test + n_val], keys[n_test + n_val:]
    flat = lambda ks: [ex for k in ks for ex in groups[k]]  # noqa: E731
    return flat(train_keys), flat(val_keys), flat(test_keys)
