"""Deterministic train/validation/test splits that never put one example in two splits, nor,
for preference pairs, one prompt (a prompt usually comes with several pairs of answers: pairs
of one prompt in two splits would let validation score answers to a prompt training saw)."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tunelab.data.preference import DETECT_ROWS, detect_kind, prompt_of
from tunelab.data.validate import prompt_key
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
          stratify_by: Callable[[T], Any] | None = None,
          group_by: Callable[[T], str] | None = None) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with `seed` and cut. Exact duplicates are grouped so they land in one split;
    `group_by` (example -> key) groups by another identity (preference pairs: their prompt).

    With `stratify_by` (example -> label), each label is cut in the same proportions, so a
    rare class is in every split (when it has enough examples). A group takes the label of its
    first example.
    """
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise ValueError("val and test must be fractions in [0, 1) that sum to less than 1")
    key_of = group_by or example_key
    groups: dict[str, list[T]] = {}
    for ex in examples:
        groups.setdefault(key_of(ex), []).append(ex)
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


def prompt_group(fmt: str | None = None) -> Callable[[dict], str]:
    """Preference pairs -> the key of their prompt (tunelab.data.validate.prompt_key: up to
    case, punctuation and spacing), so all pairs of one prompt share a split; a row with no
    readable prompt is its own group."""
    def key(record: dict) -> str:
        prompt = prompt_of(record, fmt)
        return "prompt:" + prompt_key(prompt).hex() if prompt else example_key(record)
    return key


def split_file(path: str | Path, out_dir: str | Path, *, val: float = 0.1, test: float = 0.1,
               seed: int = 0, stratify_by: str | None = None) -> dict[str, int]:
    """Split a JSONL file into out_dir/{train,val,test}.jsonl (each written atomically).

    Records are kept as they are (any JSON objects); an empty split is still written. A file of
    preference pairs (its first rows say) is split by prompt: every pair of a prompt lands in
    one split.
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
    kind, fmt = detect_kind(records[:DETECT_ROWS])
    parts = split(records, val=val, test=test, seed=seed, stratify_by=key,
                  group_by=prompt_group(fmt) if kind == "preferences" else None)
    out = Path(out_dir)
    counts = {}
    for name, rows in zip(("train", "val", "test"), parts):
        counts[name] = write_jsonl(out / f"{name}.jsonl", rows)
    return counts
