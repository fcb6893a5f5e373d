"""`tunelab compare --retrieval K` (BM25-retrieved shots, or passages from --corpus) and the cost
of each option: cost per 1,000 requests, the training cost, the break-even."""
from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli
from tunelab.data.conversation import read_conversations
from tunelab.data.io import write_jsonl
from tunelab.errors import TunelabError
from tunelab.evaluate.cost import Prices, about, break_even, cost_per_1k
from tunelab.evaluate.retrieval import (prompt_key, rag_system, read_corpus, retrieve_passages,
                                        retrieve_shots)
from tunelab.evaluate.tasks import Example, examples_from


def _ex(i, text, answer):
    return Example(f"e{i}", [{"role": "user", "content": text}], answer, {})


def test_retrieval_finds_similar_examples_and_never_a_test_example(sound_task):
    train = examples_from(read_conversations(sound_task["train"]))
    test = examples_from(read_conversations(sound_task["test"]))
    # the training file also holds a copy of every test example: BM25 would rank each copy
    # first (it is the same text); none may be retrieved
    leaky = train + [Example(f"copy-{e.id}", e.messages, e.reference, {}) for e in test]
    found = retrieve_shots(leaky, test, 4)
    test_keys = {prompt_key(e.messages) for e in test}
    assert len(found) == len(test) and all(len(s) == 4 for s in found)
    assert not any(prompt_key(s.messages) in test_keys for shots in found for s in shots)
    assert not any(s.id.startswith("copy-") for shots in found for s in shots)
    # and what is retrieved is similar: the nearest shot (last, next to the question) asks
    # about the same animal or in the same words, which a random pick does only 1 time in 4
    from conftest import SOUNDS

    def animal_and_phrasing(text):
        a = next(a for a in SOUNDS if f" {a}" in f" {text.lower()}")
        return a, text.replace(a, "{a}", 1)
    for e, shots in zip(test, found):
        a, phrasing = animal_and_phrasing(e.messages[-1]["content"])
        b, other = animal_and_phrasing(shots[-1].messages[-1]["content"])
        assert a == b or phrasing.lower() == other.lower(), (e.messages, shots[-1].messages)


def test_corpus_passages_and_errors_name_file_and_line(tmp_path):
    docs = tmp_path / "docs.jsonl"
    write_jsonl(docs, [{"title": "Cows", "text": "A cow says moo. Cows live on farms."},
                       {"text": "Cats purr and say meow. " * 100},       # cut into passages
                       {"title": "Ducks", "text": "A duck says quack by the pond."}])
    passages = read_corpus(docs)
    assert len(passages) > 3 and {p.line for p in passages} == {1, 2, 3}
    test = [_ex(0, "What does the duck say at the pond?", "quack")]
    [top] = retrieve_passages(passages, test, 2)
    assert top[0].title == "Ducks"
    system = rag_system(top, "Be brief.")
    assert system.startswith("Be brief.") and "[1] Ducks: A duck says quack" in system
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(TunelabError) as err:
        read_corpus(bad)
    assert "bad.jsonl" in str(err.value) and "2" in str(err.value) and "text" in str(err.value)


def test_break_even_worked_example():
    prices = Prices(input_per_mtok=0.15, output_per_mtok=0.60, train_per_hour=2.0)
    # 5-shot: 600 prompt + 2 generated tokens; fine-tuned: 40 + 2
    shots = cost_per_1k(600, 2, 10.0, prices)
    tuned = cost_per_1k(40, 2, 10.0, prices)
    assert shots == pytest.approx(1000 * (600 * 0.15 + 2 * 0.60) / 1e6)   # $0.0912
    assert tuned == pytest.approx(0.0072)
    # 30 minutes of training at $2/hour = $1.00; it saves $0.084 per 1,000 requests
    n = break_even(1800 / 3600 * 2.0, tuned, shots)
    assert n == pytest.approx(1.0 / 0.000084)                             # 11,904.8 requests
    assert about(n) == "~12,000" and about(3127) == "~3,100"
    assert break_even(1.0, shots, tuned) == math.inf                       # it never pays back
    # priced by the serving machine's time: $3.60/hour at 2 requests/s = $0.50 per 1,000
    assert cost_per_1k(600, 2, 2.0, Prices(per_hour=3.6)) == pytest.approx(0.5)
    with pytest.raises(TunelabError):
        Prices(input_per_mtok=-1)


def _row(name, primary, prompt_tokens, rps=10.0):
    from tunelab.evaluate.runner import RunResult
    return RunResult(name=name, model=name, task={"task": "classification",
                                                  "primary": "accuracy"},
                     metrics={"accuracy": primary}, examples=10, prompt_tokens=prompt_tokens,
                     completion_tokens=2.0, latency_s=0.1, requests_per_s=rps, capped=0,
                     seconds=1.0)


def test_verdict_says_when_training_pays_back():
    from tunelab.evaluate.compare import verdict
    prices = Prices(input_per_mtok=0.15, output_per_mtok=0.60, train_per_hour=2.0)
    rows = [_row("base zero-shot", 0.2, 40.0), _row("base 5-shot", 0.6, 600.0),
            _row("fine-tuned", 0.9, 40.0)]
    text, detail = verdict(rows, "accuracy", prices=prices,
                           train_seconds={"fine-tuned": 1800.0})
    assert text == ("fine-tuned: +30.0 points accuracy over base 5-shot, with 93% fewer prompt "
                    "tokens per request; pays back its training after ~12,000 requests against "
                    "base 5-shot")
    assert detail["break_even_requests"] == pytest.approx(1.0 / 0.000084)
    assert detail["cost"]["per_1k_requests"]["base 5-shot"] == pytest.approx(0.0912)
    assert detail["cost"]["train_cost"] == pytest.approx(1.0)
    # a tuned model that costs more per request than the baseline never pays back, and says so
    rows = [_row("base zero-shot", 0.2, 40.0), _row("fine-tuned", 0.9, 60.0)]
    text, detail = verdict(rows, "accuracy", prices=prices, train_seconds={"fine-tuned": 60.0})
    assert text.endswith("never pays back its training against base zero-shot (it costs as "
                         "much or more per request)")
    assert detail["cost"]["pays_back"] is False and detail["break_even_requests"] is None
    # behind: no double negative
    rows = [_row("base 5-shot", 0.6, 600.0), _row("fine-tuned", 0.533, 40.0)]
    text, _ = verdict(rows, "accuracy")
    assert text.startswith("prompting wins: fine-tuned is 6.7 points accuracy behind base 5-shot")


@pytest.fixture(scope="module")
def star_data(tmp_path_factory):
    from tunelab.demo import build_dataset
    return build_dataset(tmp_path_factory.mktemp("stars"), n=100)


def test_retrieval_row_on_the_demo_star_ratings(star_data, sound_run, tiny_model_dir,
                                                 smol_tokenizer, tmp_path):
    """The demo's star-rating reviews: the retrieval row is measured beside zero- and 3-shot,
    every request's prompt holds its own retrieved reviews, and the prompt tokens the row
    reports are those of exactly those prompts in the chat template."""
    out = tmp_path / "out"
    proc = run_cli("compare", "--tuned", sound_run.output_dir, "--base", tiny_model_dir,
                   "--data", star_data["test"], "--train", star_data["train"],
                   "--task", "classification", "--few-shot", "3", "--retrieval", "3",
                   "--limit", "6", "--no-general-check", "--train-price-per-hour", "2",
                   "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["base zero-shot", "base 3-shot", "base + 3 retrieved examples",
                          "fine-tuned"]
    row = rows["base + 3 retrieved examples"]
    assert row["examples"] == 6 and row["latency_s"] > 0
    # the prompt tokens, counted independently from the retrieved ids
    train = {e.id: e for e in examples_from(read_conversations(star_data["train"]))}
    test = examples_from(read_conversations(star_data["test"]))[:6]
    ids = result["retrieval"]["ids"]
    assert len(ids) == 6 and all(len(i) == 3 for i in ids)
    test_keys = {prompt_key(e.messages) for e in test}
    assert not any(prompt_key(train[i].messages) in test_keys for row_ids in ids for i in row_ids)
    counts = []
    for e, row_ids in zip(test, ids):
        msgs = [m for m in e.messages if m["role"] == "system"]
        for i in row_ids:
            msgs += [m for m in train[i].messages if m["role"] != "system"]
            msgs.append({"role": "assistant", "content": train[i].reference})
        msgs += [m for m in e.messages if m["role"] != "system"]
        enc = smol_tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                 tokenize=True)
        counts.append(len(enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys")
                          else enc))
    assert row["prompt_tokens"] == pytest.approx(sum(counts) / 6)
    # retrieved shots differ between requests (few-shot's are the same for all)
    assert len({tuple(i) for i in ids}) > 1
    assert row["prompt_tokens"] > 2 * rows["base zero-shot"]["prompt_tokens"]
    # each row's cost, the training cost from the run's measured time, the table's column
    cost = result["cost"]
    run_seconds = json.loads((sound_run.output_dir / "result.json").read_text())["seconds"]
    assert cost["train_seconds"] == pytest.approx(run_seconds)
    assert cost["train_cost"] == pytest.approx(run_seconds / 3600 * 2)
    for name, r in rows.items():
        assert cost["per_1k_requests"][name] == pytest.approx(
            1000 * (r["prompt_tokens"] * 0.15 + r["completion_tokens"] * 0.60) / 1e6)
    assert "pays back its training" in result["verdict"]
    assert (out / "charts" / "cost.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "base + 3 retrieved examples" in html and "Cost and break-even" in html
    assert "$/1k req" in (out / "report.md").read_text()
    # not a terminal: a line per stage, no carriage-return bars
    assert "\r" not in proc.stderr


def test_corpus_row_puts_passages_in_the_system_prompt(sound_run, sound_task, tmp_path,
                                                       smol_tokenizer):
    from tunelab.evaluate.compare import compare
    docs = tmp_path / "docs.jsonl"
    write_jsonl(docs, [{"title": a, "text": f"The {a} makes the sound {s}."}
                       for a, s in {"dog": "woof", "cat": "meow", "cow": "moo"}.items()])
    result = compare(base=None, tuned=str(sound_run.output_dir), data=sound_task["test"],
                     out_dir=tmp_path / "out", task="classification", few_shot=0,
                     general_check=False, retrieval=1, corpus=docs, limit=4)
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["base zero-shot", "base + 1 retrieved passages", "fine-tuned"]
    rag = rows["base + 1 retrieved passages"]
    # its prompts: the passage found for each request as the system prompt, counted apart
    test = examples_from(read_conversations(sound_task["test"]))[:4]
    found = retrieve_passages(read_corpus(docs), test, 1)
    counts = []
    for e, p in zip(test, found):
        asked = [a for a in ("dog", "cat", "cow") if a in e.messages[-1]["content"]]
        assert not asked or p[0].title == asked[0]          # the document about that animal
        msgs = [{"role": "system", "content": rag_system(p)}, *e.messages]
        enc = smol_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        counts.append(len(enc["input_ids"] if hasattr(enc, "keys") else enc))
    assert rag.prompt_tokens == pytest.approx(sum(counts) / 4)
    assert result.retrieval["kind"] == "passages" and result.retrieval["passages"] == 3
    with pytest.raises(TunelabError, match="--retrieval"):
        compare(base=None, tuned=str(sound_run.output_dir), data=sound_task["test"],
                out_dir=tmp_path / "out2", corpus=docs, general_check=False)
