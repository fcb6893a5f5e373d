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
    counts = Counter(r.stars for r in reviews)
    assert set(counts) == {1, 2, 3, 4, 5} and all(150 < c < 250 for c in counts.values())
    assert len({r.product for r in reviews}) >= 20
    # not a handful of sentences: most word 4-grams are shared by few reviews
    assert len({" ".join(r.text.split()[:6]) for r in reviews}) > 150
    assert all(r.sentiment == ("positive" if r.stars >= 4 else "negative" if r.stars <= 2
                               else "neutral") for r in reviews)


def test_the_text_carries_the_rating():
    """Strong words only at the extremes, and 3 stars always mixes praise with a complaint: a
    model can learn the rating from the text (what the demo relies on)."""
    from tunelab.data.generators.reviews import MILD_NEG, MILD_POS, STRONG_NEG, STRONG_POS
    has = lambda text, words: any(f" {w}" in text for w in words)  # noqa: E731
    for r in generate_reviews(500, seed=1):
        if r.stars == 5:
            assert has(r.text, STRONG_POS) and not has(r.text, MILD_NEG + STRONG_NEG), r.text
        if r.stars == 1:
            assert has(r.text, STRONG_NEG) and not has(r.text, MILD_POS + STRONG_POS), r.text
        if r.stars == 3:
            assert has(r.text, MILD_POS) and has(r.text, MILD_NEG), r.text


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
    assert sum(len(p) for p in parts.values()) == 200
    assert all(abs(len(parts[k]) - n) <= 2 for k, n in (("train", 140), ("val", 20), ("test", 40)))
    answers = {c.messages[-1]["content"] for p in parts.values() for c in p}
    assert answers == {"1", "2", "3", "4", "5"}
    test_stars = Counter(c.messages[-1]["content"] for c in parts["test"])
    assert all(7 <= n <= 9 for n in test_stars.values())   # stratified: 8 of each
