"""Graded answers (`--task judge`): a grader model behind an OpenAI-compatible endpoint scores
each free-form answer with a reason, and compares two answers in both orders. The grader is a
real `tunelab serve` (tests/test_server_harness.py) serving the builtin SmolLM2-135M, and the
tiny random model as a grader whose replies are garbage; nothing is mocked and nothing leaves
the machine."""
from __future__ import annotations

import json
import time
from html import escape

import pytest

from conftest import run_cli, sound_rows
from test_server_harness import Server, make_key, wait_for
from tunelab.errors import TunelabError
from tunelab.evaluate.judge import (Grader, JudgeConfig, combine, order_winner, parse_choice,
                                    parse_grade, swap_outcome, wilson_interval, win_rate)

SMOL = "smollm2-135m-instruct"


# ---------------------------------------------------------------- without a server
def test_grades_are_read_from_what_graders_really_reply():
    cases = {
        "Score: 4\nReason: right, but misses the unit.": (4.0, "right, but misses the unit."),
        '{"score": 2, "reason": "mostly wrong"}': (2.0, "mostly wrong"),
        '```json\n{"Score": 5}\n```': (5.0, None),
        "I would rate this a 3/5 overall.": (3.0, None),
        "Grade - 1. The answer names the wrong city.": (1.0, None),
        "5": (5.0, None),
    }
    for reply, (score, reason) in cases.items():
        g = parse_grade(reply)
        assert (g.score, g.problem) == (score, None), reply
        if reason:
            assert g.reason == reason
    assert parse_grade("Score: 4").normalized == 0.75
    # garbage: no grade, and why, and the reply kept as the reason for a reader
    for reply, problem in {"": "empty reply", None: "empty reply",
                           'The answer to the request is "woof"': "no score",
                           "Score: 9\nReason: great": "outside 1-5",
                           "Score: 0": "outside 1-5",
                           "ꙮ ꙮ <|im_start|> 17 18": "no score"}.items():
        g = parse_grade(reply)
        assert g.score is None and problem in g.problem, (reply, g)


def test_pairwise_choices_are_read_and_an_article_is_not_a_choice():
    cases = {"Winner: A\nReason: A names Paris.": "A", "Winner: tie": "tie",
             '{"winner": "Answer B"}': "B", "[[C]]": "tie", "[[A]]": "A",
             "Answer B is better because it is right.": "B", "B": "B",
             "The winner is answer A.": "A"}
    for reply, winner in cases.items():
        assert parse_choice(reply).winner == winner, reply
    for reply in ("A dog makes a woof.", "Winner: quack", "", "Both are fine I guess"):
        c = parse_choice(reply)
        assert c.winner is None and c.problem, reply


def test_a_choice_names_the_answer_shown_in_that_place():
    assert (order_winner("ab", "A"), order_winner("ab", "B")) == ("a", "b")
    assert (order_winner("ba", "A"), order_winner("ba", "B")) == ("b", "a")
    assert order_winner("ba", "tie") == "tie" and order_winner("ab", None) is None


def test_both_orders_must_agree_for_a_win():
    # winners as each order named them: a win needs both; a disagreement or a tie is a tie;
    # a reply without a winner leaves the pair ungraded
    assert combine(["a", "a"]) == "a" and combine(["b", "b"]) == "b"
    assert combine(["a", "b"]) == "tie" and combine(["a", "tie"]) == "tie"
    assert combine(["tie", "tie"]) == "tie"
    assert combine([None, "a"]) == "ungraded" and combine(["b", None]) == "ungraded"
    for pair in (["a", "a"], ["a", "b"], ["b", "tie"], [None, "a"]):
        swapped = [swap_outcome(w) if w else w for w in pair]
        assert combine(swapped) == swap_outcome(combine(pair))


def test_win_rate_interval_on_a_worked_example():
    # 7 wins of 10: p = 0.7, z = 1.96; Wilson: (p + z²/2n) / (1 + z²/n) = 0.64448 at the
    # centre, half-width z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n) = 0.24772
    low, high = wilson_interval(7, 10)
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)
    # 5 won, 2 lost, 1 tie (half a win), 1 ungraded: 5.5 of 8 graded = 0.6875
    w = win_rate(["a"] * 5 + ["b"] * 2 + ["tie", "ungraded"])
    assert (w["wins"], w["losses"], w["ties"], w["ungraded"], w["graded"]) == (5, 2, 1, 1, 8)
    assert w["win_rate"] == 0.6875
    assert (round(w["ci_low"], 4), round(w["ci_high"], 4)) == (0.3558, 0.8976)
    assert "Wilson" in w["ci"]
    # the interval narrows with more pairs at the same rate, and stays inside [0, 1]
    assert wilson_interval(70, 100)[1] - wilson_interval(70, 100)[0] < high - low
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    nobody = win_rate(["ungraded", "ungraded"])
    assert nobody["win_rate"] is None and nobody["graded"] == 0


def _row(name, primary, prompt_tokens):
    from tunelab.evaluate.runner import RunResult
    return RunResult(name=name, model=name, task={"task": "judge", "primary": "judge_score"},
                     metrics={"judge_score": primary}, examples=8, prompt_tokens=prompt_tokens,
                     completion_tokens=20.0, latency_s=0.1, requests_per_s=10.0, capped=0,
                     seconds=1.0)


def test_the_verdict_sentence_is_rendered_from_its_fields():
    from tunelab.evaluate.cost import Prices
    from tunelab.evaluate.verdict import render_verdict, verdict_fields
    rows = [_row("base zero-shot", 0.25, 40.0), _row("base 5-shot", 0.5, 600.0),
            _row("fine-tuned", 0.75, 40.0)]
    d = verdict_fields(rows, "judge score", prices=Prices(train_per_hour=2.0),
                       train_seconds={"fine-tuned": 1800.0})
    assert (d["kind"], d["winner"], d["metric"], d["best_baseline"]) == \
        ("tuned_wins", "fine-tuned", "judge_score", "base 5-shot")
    assert d["points"] == pytest.approx(25.0)
    assert d["prompt_tokens_ratio"] == pytest.approx(40 / 600)
    # tokens priced at 0.15/0.60 per M: (40*0.15 + 20*0.6) / (600*0.15 + 20*0.6); $1 of
    # training over a saving of 560 prompt tokens x $0.15/M per request: 11,905 requests
    assert d["cost_ratio"] == pytest.approx((40 * 0.15 + 20 * 0.6) / (600 * 0.15 + 20 * 0.6))
    d["pairwise"] = {"a": "fine-tuned", "b": "base 5-shot",
                     **win_rate(["a"] * 5 + ["b"] * 2 + ["tie", "ungraded"])}
    assert render_verdict(d) == (
        "fine-tuned: +25.0 points judge score over base 5-shot, with 93% fewer prompt tokens "
        "per request; pays back its training after ~12,000 requests against base 5-shot; the "
        "grader's win rate against base 5-shot: 69% of 8 pairs (5 won, 2 lost, 1 tied; 95% CI "
        "36%-90%)")
    # the sentence follows the fields, whatever they say
    d.update(kind="prompting_wins", points=-3.0, pairwise=None, pays_back=None)
    assert render_verdict(d).startswith("prompting wins: fine-tuned is 3.0 points judge score "
                                        "behind base 5-shot, with 93% fewer")


def test_judge_needs_a_grader_and_only_the_judge_task_takes_one(sound_task):
    from tunelab.evaluate.compare import compare
    from tunelab.evaluate.tasks import make_task
    with pytest.raises(TunelabError, match="--judge-model") as err:
        make_task("judge")
    assert err.value.field == "judge_model"
    with pytest.raises(TunelabError, match="--task judge only"):
        compare(base="x", tuned="x", data=sound_task["test"], out_dir=sound_task["dir"],
                task="exact_match", judge=JudgeConfig(url="http://127.0.0.1:9/v1"))
    with pytest.raises(TunelabError, match="rubric is empty"):
        JudgeConfig(rubric="  ")


# ---------------------------------------------------------------- a real grader
@pytest.fixture(scope="module")
def grader(tmp_path_factory, tiny_model_dir):
    """`tunelab serve` as the grader: the builtin SmolLM2-135M, and the tiny random model (a
    grader that replies garbage); one worker, so that it also runs evaluations for the API
    test."""
    data = tmp_path_factory.mktemp("grader")
    srv = Server(data, "--workers", "1", "--model", f"tiny={tiny_model_dir}")
    srv.key = make_key(data, "grader")
    yield srv
    srv.stop()


def test_grader_problems_are_said_before_anything_is_generated(grader, sound_task, tmp_path,
                                                               monkeypatch):
    from tunelab.evaluate.compare import compare

    def run(**judge):
        return compare(base="never-loaded", tuned="never-loaded", data=sound_task["test"],
                       out_dir=tmp_path, task="judge", general_check=False,
                       judge=JudgeConfig(**judge))

    monkeypatch.setenv("GRADER_KEY", "tl-wrong")
    with pytest.raises(TunelabError, match=r"refused the key.*\$GRADER_KEY") as err:
        run(url=grader.base_url, model=SMOL, key_env="GRADER_KEY")
    assert err.value.field == "judge_key_env"
    monkeypatch.setenv("GRADER_KEY", grader.key)
    with pytest.raises(TunelabError, match="has no model 'no-such-model'") as err:
        run(url=grader.base_url, model="no-such-model", key_env="GRADER_KEY")
    assert err.value.field == "judge_model"
    with pytest.raises(TunelabError, match="cannot reach the grader at http://127.0.0.1:9") \
            as err:
        run(url="http://127.0.0.1:9/v1", model=SMOL)
    assert err.value.field == "judge_url"
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(TunelabError, match=r"needs an API key: set \$NO_SUCH_KEY_VAR"):
        run(model=SMOL, key_env="NO_SUCH_KEY_VAR")
    assert not (tmp_path / "predictions").exists()          # nothing was generated


def test_pairwise_is_symmetric_against_the_real_grader(grader):
    """Swapping the two answers swaps every result: the same two questions are asked (A/B and
    B/A), so each order's reply is the other run's, and each winner names the same text.
    (SmolLM2-135M is no judge of quality: it replies "tie" or names no winner, measured; what
    is pinned here is the asking and the combining, with real replies.)"""
    items = [("What is the capital of Italy?", "Rome", "Rome", "Milan"),
             ("What sound does a cow make?", "moo", "quack quack", "moo"),
             ("What is 3 + 4?", "7", "7", "seven hundred")]
    g = Grader(JudgeConfig(url=grader.base_url, model=SMOL, api_key=grader.key, concurrency=1,
                           seed=3))
    started = time.perf_counter()
    first = g.pairwise(items)
    second = g.pairwise([(p, r, b, a) for p, r, a, b in items])
    seconds = time.perf_counter() - started
    print(f"\npairwise: {2 * 2 * len(items)} grader requests in {seconds:.1f} s; outcomes "
          f"{[x['outcome'] for x in first]}; replies {[a['reply'] for a in first[0]['asked']]}")
    assert [x["outcome"] for x in second] == [swap_outcome(x["outcome"]) for x in first]
    for one, two in zip(first, second):
        assert sorted(a["order"] for a in one["asked"]) == ["ab", "ba"]     # both orders
        by_order = {a["order"]: a for a in two["asked"]}
        for a in one["asked"]:
            mirror = by_order["ba" if a["order"] == "ab" else "ab"]      # the same question
            assert mirror["reply"] == a["reply"]
            assert mirror["winner"] == (swap_outcome(a["winner"]) if a["winner"] else None)
    # the seeded draw decides which order is asked first, differently across pairs
    assert len({x["asked"][0]["order"] for x in first}) == 2


@pytest.fixture(scope="module")
def judged(grader, sound_run, sound_task, tmp_path_factory):
    """`tunelab compare --task judge --judge-pairwise` graded by SmolLM2 through `tunelab
    serve`, with the key from an environment variable, as a user runs it."""
    import os
    out = tmp_path_factory.mktemp("judged")
    os.environ["GRADER_KEY"] = grader.key
    try:
        started = time.perf_counter()
        proc = run_cli("compare", "--tuned", sound_run.output_dir, "--data", sound_task["test"],
                       "--task", "judge", "--judge-url", grader.base_url, "--judge-model", SMOL,
                       "--judge-key-env", "GRADER_KEY", "--judge-pairwise", "--few-shot", "0",
                       "--limit", "4", "--no-general-check", "--out", out, "--json")
        seconds = time.perf_counter() - started
    finally:
        del os.environ["GRADER_KEY"]
    assert proc.returncode == 0, proc.stderr
    print(f"\ncompare --task judge --judge-pairwise, 2 rows x 4 answers: {seconds:.1f} s")
    return json.loads(proc.stdout), out


def test_judge_task_end_to_end(judged):
    result, out = judged
    assert result["task"] == "judge" and result["primary_metric"] == "judge_score"
    assert result["judge"]["model"] == SMOL and result["judge"]["rubric"] == "tunelab's default"
    assert "key" not in json.dumps(result["judge"]).lower()
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["base zero-shot", "fine-tuned"]
    for name, row in rows.items():
        slug = name.replace(" ", "-")
        scored = [json.loads(l) for l in (out / "predictions" / f"{slug}.jsonl").read_text()
                  .splitlines()]
        assert len(scored) == 4
        graded = [s for s in scored if not s["ungraded"]]
        # every answer carries the grader's reply; a graded one its grade, score and reason
        assert all(s["grader_reply"] for s in scored)
        for s in graded:
            assert 1 <= s["grade"] <= 5 and s["score"] == (s["grade"] - 1) / 4
            assert s["reason"]
        for s in scored:
            if s["ungraded"]:
                assert s["grade"] is None and s["score"] is None and s["grade_error"]
        m = row["metrics"]
        assert m["ungraded"] == 4 - len(graded)
        assert m["ungraded_rate"] == pytest.approx((4 - len(graded)) / 4)
        if graded:
            assert m["judge_score"] == pytest.approx(sum(s["score"] for s in graded) /
                                                     len(graded))
            assert m["judge_mean"] == pytest.approx(sum(s["grade"] for s in graded) /
                                                    len(graded))
    # SmolLM2, shown the reply format, grades in it (measured: every reply)
    assert sum(4 - r["metrics"]["ungraded"] for r in rows.values()) >= 4
    # pairwise: the fine-tuned answers against the best baseline's, each pair asked twice
    p = result["pairwise"]
    assert (p["a"], p["b"]) == ("fine-tuned", "base zero-shot")
    assert p["wins"] + p["losses"] + p["ties"] + p["ungraded"] == 4
    pairs = [json.loads(l) for l in (out / "predictions" / "pairwise.jsonl").read_text()
             .splitlines()]
    assert len(pairs) == 4
    for x in pairs:
        assert sorted(a["order"] for a in x["asked"]) == ["ab", "ba"]
        assert x["outcome"] == combine([a["winner"] for a in x["asked"]])
    assert [x["outcome"] for x in pairs].count("a") == p["wins"]
    if p["graded"]:
        low, high = wilson_interval(p["wins"] + p["ties"] / 2, p["graded"])
        assert (p["ci_low"], p["ci_high"]) == pytest.approx((low, high))
    # the verdict's fields carry the pairwise result; the sentence is rendered from them
    detail = result["verdict_detail"]
    assert detail["pairwise"] == p and detail["metric"] == "judge_score"
    assert "the grader" in result["verdict"]
    # the report: the grader, every row's grades, the pairs with both replies, the reasons
    html = (out / "report.html").read_text()
    assert "Graded answers" in html and f"Pairwise: fine-tuned vs base zero-shot" in html
    assert SMOL in html and "mean grade" in html.lower()
    reasons = [s["reason"] for s in scored if s.get("reason")]
    assert reasons and all(f"grader: {escape(r[:60])}" in html for r in reasons)
    md = (out / "report.md").read_text()
    assert "## Graded answers" in md and "graded by smollm2-135m-instruct" in md


def test_a_grader_replying_garbage_is_counted_and_shown(grader, sound_run, sound_task,
                                                        tmp_path):
    """The tiny random model as the grader: no reply holds a grade or a winner (it replies
    blank lines, measured). Nothing crashes: every answer is ungraded and counted, the judge score says so, the pairs are
    ungraded and the win rate has no value, and the report shows the replies."""
    from tunelab.evaluate.compare import compare
    from tunelab.evaluate.report import format_comparison
    result = compare(base=None, tuned=str(sound_run.output_dir), data=sound_task["test"],
                     out_dir=tmp_path, task="judge", few_shot=0, general_check=False, limit=3,
                     judge=JudgeConfig(url=grader.base_url, model="tiny", api_key=grader.key,
                                       pairwise=True, max_tokens=24))
    for row in result.rows:
        assert row.metrics["ungraded"] == 3 and row.metrics["ungraded_rate"] == 1.0
        assert row.metrics["judge_score"] == 0.0 and row.metrics["judge_mean"] is None
        assert any("no answer could be graded" in w for w in row.warnings)
        assert all(s["ungraded"] and s["grade_error"] for s in row.scored)
    assert any("no answer could be graded" in w for w in result.warnings)
    p = result.pairwise
    assert p["ungraded"] == 3 and p["graded"] == 0 and p["win_rate"] is None
    # a judge score of 0 over no graded answer is no evidence: the verdict claims nothing
    assert result.verdict_detail["kind"] == "ungraded" and result.verdict_detail["winner"] is None
    assert result.verdict_detail["ungraded"] == ["base zero-shot", "fine-tuned"]
    assert result.verdict.startswith("no verdict: the grader graded none of the answers of "
                                     "base zero-shot and fine-tuned")
    assert "on par" not in result.verdict and "points" not in result.verdict
    assert "the grader named no winner against base zero-shot in any of 3 pairs" in \
        result.verdict
    text = format_comparison(result)
    assert "6 of 6 answers ungraded" in text
    html = (tmp_path / "report.html").read_text()
    assert "ungraded" in html and "no pair could be graded" in html
    assert all(s["grade_error"] in html for row in result.rows for s in row.scored)


def test_an_evaluation_through_the_api_is_graded(grader, tmp_path):
    """POST /v1/tunelab/evaluations with task judge: the worker grades through the endpoint
    and key of the request (here the server itself); the key is never shown back."""
    rows = sound_rows()
    with grader.http(grader.key) as h:
        table = h.get("/v1/tunelab/metrics").json()["data"]
        judge_score = next(m for m in table if m["key"] == "judge_score")
        assert judge_score == {"key": "judge_score", "label": "judge score", "unit": "fraction",
                               "direction": "higher", "signed": False, "column": False}
        up = h.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (
            "test.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:10]).encode())})
        assert up.status_code == 200, up.text
        body = {"model": "tiny", "base_model": "tiny", "test_file": up.json()["id"],
                "task": "judge", "few_shot": 0, "general_check": False, "limit": 3}
        r = h.post("/v1/tunelab/evaluations", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "judge", r.text
        r = h.post("/v1/tunelab/evaluations", json={**body, "task": "rouge", "judge": {
            "url": grader.base_url, "model": SMOL}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "judge", r.text
        r = h.post("/v1/tunelab/evaluations", json={**body, "judge": {
            "url": grader.base_url, "model": SMOL, "api_key": grader.key, "pairwise": True}})
        assert r.status_code == 200, r.text
        ev = r.json()
        assert ev["judge"]["api_key"] == "(given)" and grader.key not in r.text

        def done():
            got = h.get(f"/v1/tunelab/evaluations/{ev['id']}").json()
            return got if got["status"] in ("succeeded", "failed", "cancelled") else None
        ev = wait_for(done, 400, 1.0, what="the evaluation")
        assert ev["status"] == "succeeded", ev["error"]
        assert grader.key not in json.dumps(ev)
        result = ev["result"]
        assert result["task"] == "judge" and result["judge"]["model"] == SMOL
        assert result["pairwise"]["wins"] + result["pairwise"]["losses"] + \
            result["pairwise"]["ties"] + result["pairwise"]["ungraded"] == 3
        assert result["verdict_detail"]["pairwise"] == result["pairwise"]
        report = h.get(f"/v1/tunelab/evaluations/{ev['id']}/report")
        assert "Graded answers" in report.text
