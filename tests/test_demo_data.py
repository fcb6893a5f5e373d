from __future__ import annotations

from collections import Counter

from tunelab.data.generators.reviews import generate_reviews
from tunelab.data.split import example_key, split
from tunelab.demo import build_dataset
from tunelab.data.conversation import read_conversations


def test_reviews_are_varied_balanced_and_deterministic():
    reviews = generate_reviews(1000, seed=3)
    assert len({r.text for r in reviews}) == 1000
    assert generate_reviews(50, seed=3) == reviews[:50]
    counts = Counter(r.sentiment for r in reviews)
    assert 400 < counts["positive"] < 600
    assert len({r.product for r in reviews}) >= 20
    # not a handful of sentences: most word 4-grams are shared by few reviews
    assert len({" ".join(r.text.split()[:6]) for r in reviews}) > 150
    assert all(r.stars in (4, 5) if r.sentiment == "positive" else r.stars in (1, 2)
               for r in reviews)


def test_split_is_deterministic_disjoint_and_keeps_duplicates_together():
    rows = [{"messages": [{"role": "user", "content": str(i % 90)},
                          {"role": "assistant", "content": "x"}]} for i in range(100)]
    a = split(rows, val=0.1, test=0.2, seed=1)
    assert a == split(rows, val=0.1, test=0.2, seed=1)
    assert a != split(rows, val=0.1, test=0.2, seed=2)
    keys = [{example_key(r) for r in part} for part in a]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert sum(map(len, a)) == 100


def test_demo_dataset_files(tmp_path):
    paths = build_dataset(tmp_path, n=200)
    parts = {k: read_conversations(p) for k, p in paths.items()}
    assert [len(parts[k]) for k in ("train", "val", "test")] == [140, 20, 40]
    answers = {c.messages[-1]["content"] for p in parts.values() for c in p}
    assert answers == {"positive", "negative"}
