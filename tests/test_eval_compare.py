"""`tunelab eval` and `tunelab compare` end to end on a tiny fine-tuned model: metrics, the
prompting baselines, the few-shot prompt, forgetting, the report (parsed and opened in a real
browser), and bad input."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import assert_clean_error, run_cli
from tunelab.data.io import write_jsonl
from tunelab.evaluate.compare import choose_shots, with_shots
from tunelab.evaluate.tasks import Classification, Example, examples_from
from tunelab.data.conversation import read_conversations


@pytest.fixture(scope="module")
def comparison(sound_run, sound_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    proc = run_cli("compare", "--tuned", sound_run.output_dir, "--data", sound_task["test"],
                   "--task", "classification", "--few-shot", "3", "--system",
                   "Answer with the sound the animal makes, in one word.", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out


def test_compare_rows_tokens_and_verdict(comparison, tiny_model_dir):
    result, out = comparison
    names = [r["name"] for r in result["rows"]]
    assert names == ["base zero-shot", "base + system prompt", "base 3-shot", "fine-tuned"]
    assert result["base"] == str(tiny_model_dir)           # found from the run by itself
    rows = {r["name"]: r for r in result["rows"]}
    tuned, zero, shots = rows["fine-tuned"], rows["base zero-shot"], rows["base 3-shot"]
    assert tuned["primary"] >= 0.75 > zero["primary"]
    assert all(r["examples"] == 8 for r in result["rows"])
    # few-shot pays for its examples in every request; the fine-tuned model's prompt is the
    # zero-shot one
    assert shots["prompt_tokens"] > 2 * zero["prompt_tokens"]
    assert tuned["prompt_tokens"] == zero["prompt_tokens"]
    # (SmolLM2's template puts its own default system prompt in when there is none)
    assert rows["base + system prompt"]["prompt_tokens"] != zero["prompt_tokens"]
    assert all(r["latency_s"] > 0 and r["requests_per_s"] > 0 for r in result["rows"])
    assert set(tuned["metrics"]) >= {"accuracy", "macro_f1", "invalid_rate", "confusion"}
    best = max((r for r in result["rows"] if r["name"] != "fine-tuned"),   # ties: cheapest
               key=lambda r: (r["primary"], -r["prompt_tokens"]))
    assert result["verdict"].startswith("fine-tuned: +")
    assert f"over {best['name']}" in result["verdict"] and "prompt tokens per request" in \
        result["verdict"]
    # a random base never says its end-of-turn token: capped, counted, reported
    assert any("base zero-shot: " in w and "max_new_tokens" in w for w in result["warnings"])
    for name in ("base-zero-shot", "base-3-shot", "fine-tuned"):
        lines = (out / "predictions" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 8
    # the verdict as fields, from which the sentence is rendered; one tuned model, no pairs
    detail = result["verdict_detail"]
    assert detail["kind"] == "tuned_wins" and detail["best_tuned"] == "fine-tuned"
    assert detail["best_baseline"] == best["name"]
    assert result["verdict"].startswith(f"fine-tuned: {detail['points']:+.1f} points")
    assert [t["name"] for t in result["tuned_models"]] == ["fine-tuned"]
    assert result["preference"] is None


def test_forgetting_check(comparison):
    result, _ = comparison
    g = result["forgetting"]["general"]
    assert g["items"] >= 90
    assert set(g["by_category"]) == {"facts", "arithmetic", "format", "rewrite"}
    assert g["delta_points"] == pytest.approx(100 * (g["tuned"] - g["base"]))
    assert [(m["name"], m["general"]) for m in result["forgetting"]["models"]] == \
        [("fine-tuned", g)]


def _row(name, primary, prompt_tokens=30.0):
    from tunelab.evaluate.runner import RunResult
    return RunResult(name=name, model=name, task={"task": "classification",
                                                  "primary": "accuracy"},
                     metrics={"accuracy": primary}, examples=10, prompt_tokens=prompt_tokens,
                     completion_tokens=2.0, latency_s=0.1, requests_per_s=10.0, capped=0,
                     seconds=1.0)


def test_verdict_names_the_best_tuned_model_against_the_best_baseline():
    from tunelab.evaluate.compare import verdict
    base = [_row("base zero-shot", 0.2), _row("base 5-shot", 0.6, 200.0)]
    # one tuned model: the sentence every existing reader knows
    text, detail = verdict([*base, _row("fine-tuned", 0.9)], "accuracy")
    assert text == ("fine-tuned: +30.0 points accuracy over base 5-shot, with 85% fewer prompt "
                    "tokens per request")
    assert detail["kind"] == "tuned_wins" and detail["points"] == pytest.approx(30.0)
    text, detail = verdict([*base, _row("fine-tuned", 0.5)], "accuracy")
    assert text.startswith("prompting wins: fine-tuned is 10.0 points accuracy behind "
                           "base 5-shot") and detail["kind"] == "prompting_wins"
    # several: the best of them (ties: the cheaper, then the first) is the one named
    rows = [*base, _row("sft", 0.7), _row("dpo", 0.8), _row("dpo-long", 0.8, 40.0)]
    text, detail = verdict(rows, "accuracy", ["sft", "dpo", "dpo-long"])
    assert text.startswith("fine-tuned (dpo): +20.0 points accuracy over base 5-shot")
    assert (detail["best_tuned"], detail["best_baseline"]) == ("dpo", "base 5-shot")
    text, detail = verdict([*base, _row("sft", 0.3), _row("dpo", 0.55)], "accuracy",
                           ["sft", "dpo"])
    assert text.startswith("prompting wins: the best fine-tuned model (dpo) is 5.0 points")
    text, detail = verdict([*base, _row("sft", 0.3), _row("dpo", 0.605)], "accuracy",
                           ["sft", "dpo"])
    assert detail["kind"] == "on_par" and text.startswith("fine-tuned (dpo): on par with")


def test_tuned_names_are_parsed_derived_and_must_differ(tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.evaluate.compare import TunedModel, _base_of, parse_tuned
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_tuned(["sft=runs/sft", "runs/dpo", "org/name=x", str(odd)]) == \
        [("sft", "runs/sft"), (None, "runs/dpo"), (None, "org/name=x"), (None, str(odd))]
    assert parse_tuned("runs/x") == [(None, "runs/x")]
    for bad in (["base=runs/a"], ["base 5-shot=runs/a"], ["x=runs/a", "x=runs/b"]):
        with pytest.raises(TunelabError, match="is taken"):
            from tunelab.evaluate.compare import tuned_models
            tuned_models(bad)
    two = [TunedModel("a", "runs/a", "model-one", None, None, None),
           TunedModel("b", "runs/b", "model-two", None, None, None)]
    with pytest.raises(TunelabError, match="different base models.*a from model-one.*give --base"):
        _base_of(two)


def test_one_named_tuned_model_with_held_out_pairs(sound_run, sound_task, tmp_path):
    from tunelab.evaluate.compare import compare
    from tunelab.evaluate.report import format_comparison
    pairs = [{"prompt": c.messages[0]["content"], "chosen": c.messages[-1]["content"],
              "rejected": "quack" if c.messages[-1]["content"] != "quack" else "moo"}
             for c in read_conversations(sound_task["test"])]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    result = compare(base=None, tuned=[f"sounds={sound_run.output_dir}"],
                     data=sound_task["test"], out_dir=tmp_path / "out", task="classification",
                     few_shot=0, general_check=False, preference=tmp_path / "pairs.jsonl",
                     limit=4)
    assert [r.name for r in result.rows] == ["base zero-shot", "sounds"]
    assert [r.name for r in result.preference] == ["base", "sounds"]
    assert all(r.examples == 4 for r in result.preference)       # --limit applies to pairs too
    tuned_pref = result.preference_of("sounds")
    assert tuned_pref.primary == 1.0 and tuned_pref.metrics["margin"] > 0
    assert result.preference_of("base zero-shot") is result.preference[0]
    text = format_comparison(result)
    assert "preferred" in text.splitlines()[0]
    assert "preference pairs (4): chosen answer more likely for base" in text
    assert result.verdict.startswith("fine-tuned (sounds): ")


def test_few_shot_prompt_comes_from_training_data_only(sound_task, tmp_path):
    test = examples_from(read_conversations(sound_task["test"]))
    train = examples_from(read_conversations(sound_task["train"]))
    # the training file also holds copies of every test example: none may become a shot
    leaky = train + [Example(f"train.jsonl:{900 + i}", e.messages, e.reference)
                     for i, e in enumerate(test)]
    task = Classification()
    task.prepare(test + train)
    shots = choose_shots(leaky, test, 6, task)
    test_prompts = {e.messages[-1]["content"] for e in test}
    assert len(shots) == 6 and not {s.messages[-1]["content"] for s in shots} & test_prompts
    assert len({s.reference for s in shots}) == 6               # balanced: one per label
    assert choose_shots(leaky, test, 6, task) == shots          # deterministic
    prompt = with_shots(test[0], shots, system="Be brief.")
    assert prompt[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in prompt[1:]] == ["user", "assistant"] * 6 + ["user"]
    assert prompt[-1] == test[0].messages[-1]


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_report_is_self_contained_html_with_table_and_charts(comparison):
    result, out = comparison
    text = Path(result["report_html"]).read_text()
    parser = _Refs()
    parser.feed(text)
    assert "table" in parser.tags and "script" not in parser.tags
    assert parser.refs and all(r.startswith("data:image/png;base64,") for r in parser.refs)
    assert len(parser.refs) >= 4     # metric, tokens, confusion, training, forgetting
    assert result["verdict"] in text.replace("&#x27;", "'")
    for name in ("base zero-shot", "base 3-shot", "fine-tuned"):
        assert name in text
    md = Path(result["report_md"]).read_text()
    assert "| fine-tuned |" in md and "![metric](charts/metric.png)" in md
    assert (out / "charts" / "metric.png").read_bytes()[:4] == b"\x89PNG"


def test_report_reads_well_in_a_real_browser(comparison, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    result, _ = comparison
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1366, "height": 800})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(Path(result["report_html"]).as_uri())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        # no horizontal scrolling on a laptop screen, every chart decoded, nothing fetched
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        sizes = page.evaluate("[...document.images].map(i => [i.naturalWidth, i.clientWidth])")
        assert len(sizes) >= 4 and all(n > 0 and 0 < c <= 1366 for n, c in sizes)
        assert all(u.startswith(("file:", "data:")) for u in requests)
        assert page.locator("text=fine-tuned").first.is_visible()
        browser.close()


def test_eval_cli_task_metrics_and_predictions(sound_run, sound_task, tmp_path):
    preds = tmp_path / "preds.jsonl"
    proc = run_cli("eval", "--model", sound_run.output_dir, "--data", sound_task["test"],
                   "--task", "classification", "--predictions", preds, "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["task"]["task"] == "classification" and res["metrics"]["accuracy"] >= 0.75
    assert res["metrics"]["test_loss"] < 1.0 and res["metrics"]["test_perplexity"] > 1.0
    scored = [json.loads(l) for l in preds.read_text().splitlines()]
    assert len(scored) == 8 and {"prediction", "reference", "score", "label"} <= set(scored[0])
    text = run_cli("eval", "--model", sound_run.output_dir, "--data", sound_task["test"],
                   "--task", "loss")
    assert text.returncode == 0 and "perplexity" in text.stdout, text.stderr


def test_bad_test_data_fails_before_generation(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_clean_error(run_cli("eval", "--model", tiny_model_dir, "--data", empty), "empty.jsonl",
                       "no examples")
    words = tmp_path / "words.jsonl"
    write_jsonl(words, [{"messages": [{"role": "user", "content": "2+2?"},
                                      {"role": "assistant", "content": "four"}]}])
    assert_clean_error(run_cli("eval", "--model", "does/not-exist", "--data", words, "--task",
                               "gsm8k"), "words.jsonl:1", "no number")
    no_answer = tmp_path / "no_answer.jsonl"
    write_jsonl(no_answer, [{"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "yo"},
                                          {"role": "user", "content": "and?"}]}])
    assert_clean_error(run_cli("eval", "--model", tiny_model_dir, "--data", no_answer),
                       "no_answer.jsonl:1", "last message must be the assistant")


def test_a_crash_keeps_the_scored_examples(sound_run, sound_task, tmp_path):
    from tunelab import models
    from tunelab.evaluate import load_examples, run_task
    from tunelab.evaluate.tasks import ExactMatch
    model, tok = models.load(sound_run.model_dir)
    examples = load_examples("exact_match", sound_task["test"])

    class Flaky(ExactMatch):
        def score(self, prediction, example):
            if example.id.endswith(":1"):
                raise ValueError("cannot score this one")
            return super().score(prediction, example)

    res = run_task(model, tok, Flaky(), examples, batch_size=4)
    assert res.examples == 8 and any("could not be scored" in w for w in res.warnings)
    assert sum("error" in s for s in res.scored) == 1

    def crash_after_first_batch(n):
        raise RuntimeError("killed")

    preds = tmp_path / "p.jsonl"
    with pytest.raises(RuntimeError):
        run_task(model, tok, ExactMatch(), examples, batch_size=4, predictions_file=preds,
                 progress=crash_after_first_batch)
    assert len(preds.read_text().splitlines()) == 4


def test_labels_the_training_file_never_shows_are_a_counted_warning(sound_run, sound_task,
                                                                      tmp_path):
    from tunelab.evaluate.compare import compare
    rows = [c.to_json() for c in read_conversations(sound_task["train"])
            if c.messages[-1]["content"] != "woof"]
    write_jsonl(tmp_path / "train.jsonl", rows)
    test_woofs = sum(c.messages[-1]["content"] == "woof"
                     for c in read_conversations(sound_task["test"]))
    result = compare(base=None, tuned=str(sound_run.model_dir), data=sound_task["test"],
                     out_dir=tmp_path / "out", task="classification",
                     train=tmp_path / "train.jsonl", few_shot=2, general_check=False)
    assert [r.name for r in result.rows] == ["base zero-shot", "base 2-shot", "fine-tuned"]
    assert f"{test_woofs} test examples have labels the training file never shows: woof" in \
        result.warnings
    assert result.forgetting is None and Path(result.report_html).exists()


def test_shots_are_never_in_label_order():
    """A 135M model shown reviews rated 1, 2, 3, 4, 5 answered "6" to every test review."""
    task = Classification()
    train = [Example(f"t:{i}", [{"role": "user", "content": f"review {i}"}], str(1 + i % 5))
             for i in range(50)]
    task.prepare(train)
    for seed in range(30):
        labels = [int(s.reference) for s in choose_shots(train, [], 5, task, seed=seed)]
        assert sorted(labels) == [1, 2, 3, 4, 5]
        assert labels not in ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])


def test_general_file_reports_loss_and_match_before_and_after(sound_run, sound_task, tmp_path):
    from tunelab.evaluate.compare import compare
    result = compare(base=None, tuned=str(sound_run.output_dir), data=sound_task["test"],
                     out_dir=tmp_path / "out", task="classification", few_shot=0,
                     general=sound_task["train"], general_check=False, limit=4)
    f = result.forgetting["file"]
    assert f["tuned"]["loss"] < f["base"]["loss"]      # it trained on these very answers
    assert f["tuned"]["normalized_match"] > f["base"]["normalized_match"]
    assert "train.jsonl: loss" in Path(result.report_md).read_text()
    assert "train.jsonl: loss" in Path(result.report_html).read_text()
