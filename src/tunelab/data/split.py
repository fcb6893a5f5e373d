"""Deterministic train/validation/test splits that never put one example in two splits."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tunelab.errors import TunelabError

T = TypeVar("T")


def example_key(example: Any) -> str:
    """A stable identity for duplicate detection: the hash of its canonical JSON."""
    payload = example.to_json() if hasattr(example, "to_json") else example
    if isinstance(payload, dict) and "messages" in payload:
        payload = payload["messages"]
    return hashlib.sha1(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _cut(keys: list[str], val: float, test: float) -> tuple[list[str], list[str], list[str]]:
    n = len(keys)
    n_test, n_val = round(n * test), round(n * val)
    return keys[n_test + n_val:], keys[n_test:n_test + n_val], keys[:n_test]


def split(examples: Sequence[T], *, val: float = 0.1, test: float = 0.1, seed: int = 0,
          stratify_by: Callable[[T], Any] | None = None) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with `seed` and cut. Exact duplicates are grouped so they land in one split.

    With `stratify_by` (example -> label), each label is cut in the same proportions, so a
    rare class is in every split (when it has enough examples). A duplicate group takes the
    label of its first example.
    """
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise ValueError("val and test must be fractions in [0, 1) that sum to less than 1")
    groups: dict[str, list[T]] = {}
    for ex in examples:
        groups.setdefault(example_key(ex), []).append(ex)
    keys = sorted(groups)
    rng = random.Random(seed)
    if stratify_by is None:
        rng.shuffle(keys)
        train_keys, val_keys, test_keys = _cut(keys, val, test)
    else:
        by_label: dict[str, list[str]] = {}
        for k in keys:
            by_label.setdefault(json.dumps(stratify_by(groups[k][0]), sort_keys=True,
                                           default=str), []).append(k)
        train_keys, val_keys, test_keys = [], [], []
        for label in sorted(by_label):
            ks = by_label[label]
            rng.shuffle(ks)
            tr, va, te = _cut(ks, val, test)
            train_keys += tr
            val_keys += va
            test_keys += te
        for part in (train_keys, val_keys, test_keys):   # labels interleaved, not in blocks
            rng.shuffle(part)
    flat = lambda ks: [ex for k in ks for ex in groups[k]]  # noqa: E731
    return flat(train_keys), flat(val_keys), flat(test_keys)


def label_of(record: Any, field: str) -> Any:
    """A record's stratification label: a top-level field, or `assistant` for the final
    assistant answer (the label of a classification task written as chat)."""
    if field == "assistant" and isinstance(record, dict) and "assistant" not in record:
        answers = [m.get("content") for m in record.get("messages") or []
                   if isinstance(m, dict) and m.get("role") == "assistant"]
        if answers:
            return answers[-1]
    if not isinstance(record, dict) or field not in record:
        raise TunelabError("missing (needed by --stratify-by)", field=field)
    return record[field]


def split_file(path: str | Path, out_dir: str | Path, *, val: float = 0.1, test: float = 0.1,
               seed: int = 0, stratify_by: str | None = None) -> dict[str, int]:
    """Split a JSONL file into out_dir/{train,val,test}.jsonl (each written atomically).

    Records are kept as they are (any JSON objects); an empty split is still written.
    """
    from tunelab.data.io import iter_jsonl, write_jsonl
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise TunelabError("--val and --test must be fractions in [0, 1) that sum to less than 1")
    records = []
    for line, rec in iter_jsonl(path):
        if not isinstance(rec, dict):
            raise TunelabError(f"expected a JSON object, got {type(rec).__name__}", file=path,
                               line=line)
        if stratify_by:
            try:
                label_of(rec, stratify_by)
            except TunelabError as e:
                raise TunelabError(e.reason, file=path, line=line, field=e.field) from None
        records.append(rec)
    if not records:
        raise TunelabError("no examples (the file is empty)", file=path)
    key = (lambda r: label_of(r, stratify_by)) if stratify_by else None
    parts = split(records, val=val, test=test, seed=seed, stratify_by=key)
    out = Path(out_dir)
    counts = {}
    for name, rows in zip(("train", "val", "test"), parts):
        counts[name] = write_jsonl(out / f"{name}.jsonl", rows)
    return counts
