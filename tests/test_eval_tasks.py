"""Task scoring on hand-written cases, the HumanEval sandbox, and bad test data."""
from __future__ import annotations

import time

import pytest

from tunelab.errors import TunelabError
from tunelab.evaluate.sandbox import humaneval_problems, humaneval_program, run_python
from tunelab.evaluate.tasks import (Classification, Example, ExactMatch, GSM8K, Rouge,
                                    auto_task_name, final_number, make_task)


def ex(reference, prompt="q", i=1):
    return Example(f"test.jsonl:{i}", [{"role": "user", "content": prompt}], reference)


@pytest.mark.parametrize("text,number", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72),
    ("The answer is $1,250.", 1250),
    ("#### 1,000,000", 1_000_000),
    ("first 3 then 4.5", 4.5),
    ("-7 degrees", -7),
    ("She had <<3+4=7>>7 apples", 7),
    ("no number at all", None),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_gsm8k_scores_the_final_number_and_refuses_non_numeric_references():
    task = GSM8K()
    refs = [ex("He pays 3*4 = <<3*4=12>>12 dollars.\n#### 12", i=1), ex("#### 1,250", i=2)]
    task.prepare(refs)
    assert task.score("So the total is 12.", refs[0])["score"] == 1.0
    assert task.score("The answer is $1,250.", refs[1])["score"] == 1.0
    assert task.score("It is 13", refs[0])["score"] == 0.0
    no_number = task.score("I cannot tell", refs[0])
    assert no_number["score"] == 0.0 and no_number["invalid"]
    with pytest.raises(TunelabError, match=r"test.jsonl:3: field 'messages\[-1\].content'.*no number"):
        task.prepare([ex("twelve", i=3)])


def test_classification_labels_case_punctuation_invalid_and_confusion():
    examples = [ex("Positive", i=1), ex("negative", i=2), ex("positive", i=3), ex("neutral", i=4)]
    task = Classification()
    task.prepare(examples)
    assert task.labels == ["negative", "neutral", "positive"]
    answers = ["POSITIVE.", "The review is negative!", "I think it is good", "positive"]
    scored = [task.score(a, e) for a, e in zip(answers, examples)]
    assert [s["label"] for s in scored] == ["positive", "negative", None, "positive"]
    assert task.match("Negative! The battery died.") == "negative"
    assert task.match("It is either positive or negative") == "positive"
    assert task.match("I'd call it mixed") is None
    assert [s["score"] for s in scored] == [1.0, 1.0, 0.0, 0.0]
    m = task.aggregate(scored)
    assert m["accuracy"] == 0.5 and m["invalid_rate"] == 0.25
    conf = m["confusion"]
    assert conf["columns"] == ["negative", "neutral", "positive", "(invalid)"]
    assert conf["matrix"] == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    # F1: negative 1.0, neutral 0.0 (never right), positive 2*1/(2+2) = 0.5
    assert m["macro_f1"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)


def test_classification_with_given_labels_refuses_an_unknown_reference():
    with pytest.raises(TunelabError, match=r"test.jsonl:2: .*'maybe' is not one of the labels"):
        Classification(["yes", "no"]).prepare([ex("yes", i=1), ex("maybe", i=2)])


def test_numeric_labels_sort_numerically_and_longest_prefix_wins():
    task = Classification()
    task.prepare([ex(s) for s in ["1", "2", "10", "3"]])
    assert task.labels == ["1", "2", "3", "10"]
    assert task.match("10 stars") == "10" and task.match("3.") == "3" and task.match("ten") is None
    assert task.match("The author gave it 3 stars out of 10.") == "3"   # the first label named
    assert task.match("Between two and three") is None


def test_exact_match_and_rouge():
    e = ex("The cat sat on the mat.")
    em = ExactMatch()
    assert em.score("The cat sat on the mat.", e) == {"score": 1.0, "exact_match": True}
    assert em.score("the cat sat on the mat", e) == {"score": 1.0, "exact_match": False}
    r = Rouge()
    assert r.score("The cat sat on the mat.", e)["score"] == pytest.approx(1.0)
    partial = r.score("A cat sat there", e)["score"]
    assert 0.2 < partial < 0.8
    assert r.score("Completely unrelated words", e)["score"] == 0.0


def test_auto_task():
    assert auto_task_name([ex("#### 4"), ex("#### 5")]) == "gsm8k"
    assert auto_task_name([ex(l) for l in ["pos", "neg", "pos", "neg", "pos"]]) == "classification"
    long = "a summary with many more than eight words in it, really"
    assert auto_task_name([ex(long + str(i)) for i in range(4)]) == "rouge"
    assert auto_task_name([ex("Paris"), ex("Rome"), ex("Lima")]) == "exact_match"
    with pytest.raises(TunelabError, match="unknown task 'acc'"):
        make_task("acc", [ex("x")])


# -- preference pairs (scored by log-probabilities) --------------------------------------------

def pair_ex(i=1, prompt="q"):
    from tunelab.evaluate.tasks import PairExample
    return PairExample(f"pairs.jsonl:{i}", [{"role": "user", "content": prompt}], "good", {},
                       rejected="bad")


def test_preference_scores_summed_and_per_token_log_probabilities():
    from tunelab.evaluate.tasks import AnswerLogps, Preference
    task = Preference()
    task.prepare([pair_ex(1), pair_ex(2)])
    # chosen more likely in sum (-4 > -6) but less per token (-4/2 = -2 < -6/4 = -1.5)
    short = task.score(AnswerLogps(-4.0, -6.0, 2, 4), pair_ex())
    assert short["score"] == 1.0 and short["normalized_score"] == 0.0
    assert short["margin"] == pytest.approx(2.0)
    wrong = task.score(AnswerLogps(-9.0, -3.0, 3, 3), pair_ex())
    assert wrong["score"] == 0.0 and wrong["normalized_score"] == 0.0 and wrong["margin"] == -6.0
    tie = task.score(AnswerLogps(-5.0, -5.0, 2, 2), pair_ex())     # a tie is no preference
    assert tie["score"] == 0.0 and tie["normalized_score"] == 0.0
    m = task.aggregate([short, wrong, tie])
    assert m["accuracy"] == pytest.approx(1 / 3) and m["normalized_accuracy"] == 0.0
    assert m["margin"] == pytest.approx((2.0 - 6.0 + 0.0) / 3)
    assert m["chosen_logp"] == pytest.approx(-6.0) and m["rejected_logp"] == pytest.approx(-14 / 3)
    assert m["ties"] == 1


def test_preference_is_auto_for_pairs_and_refuses_conversations():
    from tunelab.evaluate.tasks import Preference
    assert auto_task_name([pair_ex(1), pair_ex(2)]) == "preference"
    assert isinstance(make_task("auto", [pair_ex(1)]), Preference)
    assert not Preference().generates and Preference.answers_by == "logprobs"
    with pytest.raises(TunelabError, match=r"test.jsonl:4: field 'task'.*preference pairs"):
        make_task("preference", [ex("yes", i=4)])
    with pytest.raises(TunelabError, match="--labels applies to the classification task only"):
        make_task("preference", [pair_ex()], labels=["a"])


def test_preference_pairs_load_from_any_preference_format(tmp_path):
    from tunelab.data.io import write_jsonl
    from tunelab.evaluate import load_examples
    from tunelab.evaluate.tasks import PairExample
    write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"},
                                         {"prompt": "3+3?", "chosen": "6", "rejected": "7"}])
    for task in ("auto", "preference"):
        got = load_examples(task, tmp_path / "trl.jsonl", limit=1)
        assert len(got) == 1 and isinstance(got[0], PairExample)
        assert (got[0].messages, got[0].reference, got[0].rejected) == \
            ([{"role": "user", "content": "2+2?"}], "4", "5")
        assert got[0].id.endswith("trl.jsonl:1")
    with pytest.raises(TunelabError, match="holds preference pairs.*--task preference"):
        load_examples("exact_match", tmp_path / "trl.jsonl")


# -- HumanEval --------------------------------------------------------------------------------

PROBLEM = next(p for p in humaneval_problems() if p["task_id"] == "HumanEval/0")


def test_humaneval_ships_164_problems():
    assert len(humaneval_problems()) == 164


def test_a_correct_completion_passes_whole_function_or_body():
    whole = ("Here is the function:\n```python\nfrom typing import List\n\n"
             "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
             "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)\n"
             "               for j, b in enumerate(numbers) if i != j)\n```\nDone.")
    assert run_python(humaneval_program(PROBLEM, whole)).passed
    assert run_python(humaneval_program(PROBLEM, PROBLEM["canonical_solution"])).passed


def test_a_wrong_completion_fails():
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    result = run_python(humaneval_program(PROBLEM, wrong))
    assert result.status == "failed" and "AssertionError" in result.output


def test_an_endless_loop_is_killed_by_the_timeout():
    loop = "```python\ndef has_close_elements(numbers, threshold):\n    while True:\n        pass\n```"
    started = time.monotonic()
    result = run_python(humaneval_program(PROBLEM, loop), timeout=2)
    assert result.status == "timeout" and time.monotonic() - started < 10


def test_the_sandbox_has_no_network_and_bounded_memory():
    from tunelab.evaluate.sandbox import network_isolation
    grab = "x = bytearray(4 << 30)\n"
    assert run_python(grab).status == "failed"     # 4 GiB over the 1 GiB address-space limit
    if network_isolation():
        net = ("import socket\ns = socket.socket()\ns.settimeout(2)\n"
               "s.connect(('127.0.0.1', 9))\n")
        out = run_python(net)
        assert out.status == "failed" and ("unreachable" in out.output or "refused" in out.output)
