"""The `preference` evaluation task (held-out preference pairs scored by log-probabilities) and
`tunelab compare` with several fine-tuned models (base, SFT, SFT+DPO side by side): the task's
figures pinned against log-probabilities computed by hand with the model, an answer a tuned
model gives scored as preferred, clean errors for bad pairs, and one comparison table, report
and page for two tuned models."""
from __future__ import annotations

import json
import random
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from conftest import PHRASINGS, SOUNDS, assert_clean_error, run_cli
from tunelab.data.conversation import read_conversations
from tunelab.data.io import write_jsonl


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    """A row in OpenAI's DPO format."""
    return {"input": {"messages": [{"role": "user", "content": prompt}]},
            "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def hand_logp(model, tok, prompt: str, answer: str) -> tuple[float, int]:
    """log p(answer + end-of-turn | prompt), summed over the answer's tokens, computed here
    without tunelab's rendering or batching: the chat template's prompt, the answer's tokens
    and <|im_end|>, one forward pass, log-softmax, and the sum over the answer's positions."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + \
        [tok.convert_tokens_to_ids("<|im_end|>")]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logps = model(ids).logits[0].float().log_softmax(-1)
    total = sum(logps[len(prompt_ids) + k - 1, t].item() for k, t in enumerate(answer_ids))
    return total, len(answer_ids)


def test_preference_figures_match_log_probabilities_computed_by_hand(tiny_model_dir, tmp_path):
    from tunelab import models
    from tunelab.evaluate import evaluate
    rows = [pair("What does a dog say?", "woof", "meow"),
            pair("What does a dog say?", "meow", "woof"),     # the same pair, swapped
            pair("What does a cow say?", "moo", "quack quack quack")]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    model, tok = models.load(str(tiny_model_dir), dtype=torch.float32)
    hand = []
    for r in rows:
        prompt = r["input"]["messages"][0]["content"]
        c, nc = hand_logp(model, tok, prompt, r["preferred_output"][0]["content"])
        j, nj = hand_logp(model, tok, prompt, r["non_preferred_output"][0]["content"])
        hand.append((c, j, nc, nj))
    preds = tmp_path / "preds.jsonl"
    # batches of 2: the cow pair (longer rejected answer) is padded beside a dog pair
    res = evaluate(model, tok, tmp_path / "pairs.jsonl", task="auto", batch_size=2,
                   predictions_file=preds)
    assert res.task["task"] == "preference" and res.examples == 3
    scored = sorted(res.scored, key=lambda s: s["index"])
    for s, (c, j, nc, nj) in zip(scored, hand):
        assert s["chosen_logp"] == pytest.approx(c, abs=1e-4)
        assert s["rejected_logp"] == pytest.approx(j, abs=1e-4)
        assert (s["chosen_tokens"], s["rejected_tokens"]) == (nc, nj)
    m = res.metrics
    assert m["accuracy"] == pytest.approx(sum(c > j for c, j, _, _ in hand) / 3)
    assert m["normalized_accuracy"] == pytest.approx(
        sum(c / nc > j / nj for c, j, nc, nj in hand) / 3)
    assert m["margin"] == pytest.approx(sum(c - j for c, j, _, _ in hand) / 3, abs=1e-4)
    # a pair and its swap: exactly one of the two is preferred, with opposite margins
    assert scored[0]["score"] + scored[1]["score"] == 1.0
    assert scored[0]["margin"] == pytest.approx(-scored[1]["margin"], abs=1e-4)
    assert m["accuracy"] in (pytest.approx(1 / 3), pytest.approx(2 / 3))
    # one pair at a time gives the same figures: padding changes nothing
    alone = evaluate(model, tok, tmp_path / "pairs.jsonl", task="preference", batch_size=1)
    assert alone.metrics["margin"] == pytest.approx(m["margin"], abs=1e-4)
    assert alone.metrics["accuracy"] == m["accuracy"]
    written = [json.loads(line) for line in preds.read_text().splitlines()]
    assert sorted(w["index"] for w in written) == [0, 1, 2]
    assert {"chosen", "rejected", "score", "margin", "normalized_score"} <= set(written[0])


def test_what_a_tuned_model_answers_is_the_preferred_answer(sound_run, sound_task,
                                                           tiny_model_dir, tmp_path):
    """Chosen: exactly what the fine-tuned model answers; rejected: another animal's sound.
    The tuned model prefers every chosen answer; the random base model does not."""
    from tunelab import models
    from tunelab.inference import generate
    convs = read_conversations(sound_task["test"])
    model, tok = models.load(sound_run.model_dir)
    said = generate(model, tok, [c.messages[:-1] for c in convs], max_new_tokens=8)
    rows = []
    for c, answer in zip(convs, said):
        other = next(s for s in SOUNDS.values() if s != answer.strip())
        rows.append(pair(c.messages[0]["content"], answer, other))
    write_jsonl(tmp_path / "said.jsonl", rows)
    tuned = run_cli("eval", "--model", sound_run.output_dir, "--data", tmp_path / "said.jsonl",
                    "--json")                                   # --task auto
    assert tuned.returncode == 0, tuned.stderr
    t = json.loads(tuned.stdout)
    assert t["task"]["task"] == "preference" and t["examples"] == len(rows)
    assert t["metrics"]["accuracy"] == 1.0 and t["metrics"]["margin"] > 0
    assert "test_loss" not in t["metrics"]
    base = run_cli("eval", "--model", tiny_model_dir, "--data", tmp_path / "said.jsonl",
                   "--task", "preference", "--json")
    assert base.returncode == 0, base.stderr
    b = json.loads(base.stdout)
    assert b["metrics"]["margin"] < t["metrics"]["margin"] - 1.0
    text = run_cli("eval", "--model", sound_run.output_dir, "--data", tmp_path / "said.jsonl")
    assert text.returncode == 0, text.stderr
    assert "per-token accuracy" in text.stdout and "mean margin" in text.stdout
    assert "100.0%" in text.stdout


def test_bad_preference_data_fails_with_its_line(tmp_path, tiny_model_dir, sound_task):
    write_jsonl(tmp_path / "pairs.jsonl", [pair("hi", "yo", "hey"), pair("hi", "yo", "yo")])
    assert_clean_error(run_cli("eval", "--model", tiny_model_dir, "--data",
                               tmp_path / "pairs.jsonl"), "pairs.jsonl:2",
                       "field 'non_preferred_output'", "same text")
    assert_clean_error(run_cli("eval", "--model", tiny_model_dir, "--data", sound_task["test"],
                               "--task", "preference"), "test.jsonl", "not preference pairs")
    write_jsonl(tmp_path / "good.jsonl", [pair("hi", "yo", "hey")])
    assert_clean_error(run_cli("eval", "--model", tiny_model_dir, "--data",
                               tmp_path / "good.jsonl", "--task", "classification"),
                       "good.jsonl", "holds preference pairs", "--task preference")
    # a pair whose prompt alone is longer than max_length has nothing left to score
    write_jsonl(tmp_path / "long.jsonl", [pair("hi", "yo", "hey"),
                                          pair("word " * 300, "yo", "hey")])
    assert_clean_error(run_cli("eval", "--model", tiny_model_dir, "--data",
                               tmp_path / "long.jsonl", "--max-length", "64"),
                       "long.jsonl:2", "max_length=64")


# ---------------------------------------------------------------- several tuned models
def sound_pairs(prompts_and_sounds, seed: int) -> list[dict]:
    """The right sound chosen, another animal's rejected."""
    rng = random.Random(seed)
    return [pair(p, s, rng.choice([x for x in SOUNDS.values() if x != s]))
            for p, s in prompts_and_sounds]


@pytest.fixture(scope="module")
def pair_files(sound_task, tmp_path_factory):
    """DPO training pairs on the training prompts; held-out pairs on the test prompts."""
    folder = tmp_path_factory.mktemp("pairs")
    split = {}
    for name in ("train", "test"):
        convs = read_conversations(sound_task[name])
        write_jsonl(folder / f"{name}.jsonl", sound_pairs(
            [(c.messages[0]["content"], c.messages[-1]["content"]) for c in convs], seed=1))
        split[name] = folder / f"{name}.jsonl"
    return split


@pytest.fixture(scope="module")
def dpo_run(sound_run, pair_files, tmp_path_factory):
    """SFT+DPO: LoRA DPO on top of the fine-tuned sound model (a run started from a run).

    At 5e-4, not more: at 2e-3 this tiny model's DPO pushed both answers down together (held-out
    chosen log p -1.7 -> -32.6, rejected -3.3 -> -32.8: DPO's known likelihood displacement) and
    the held-out accuracy fell from 1.0 to 0.375 or stayed at 1.0 depending on the SFT run's
    data order; at 5e-4 it was 1.0 from either, the margin 1.6 -> 2.2."""
    import tunelab
    out = tmp_path_factory.mktemp("dpo-run") / "dpo"
    return tunelab.train({"model": str(sound_run.output_dir), "objective": "dpo",
                          "train_file": str(pair_files["train"]), "output_dir": str(out),
                          "method": "lora", "epochs": 4, "batch_size": 8,
                          "learning_rate": 5e-4, "precision": "fp32", "logging_steps": 2},
                         quiet=True)


@pytest.fixture(scope="module")
def two_tuned(sound_run, dpo_run, sound_task, pair_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-two")
    proc = run_cli("compare", "--tuned", f"sft={sound_run.output_dir}", "--tuned",
                   dpo_run.output_dir, "--data", sound_task["test"], "--task", "classification",
                   "--few-shot", "2", "--preference", pair_files["test"], "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out


def test_the_base_and_the_few_shot_file_are_found_through_a_run_started_from_a_run(
        dpo_run, sound_run, sound_task, tiny_model_dir):
    from tunelab.evaluate.compare import _base_of, _shots_file, tuned_models
    tuned, lineages = tuned_models([str(dpo_run.output_dir)])
    assert tuned[0].name == "fine-tuned"                         # one model: as it always was
    assert tuned[0].base == str(tiny_model_dir)                  # DPO -> SFT run -> base
    assert _base_of(tuned) == str(tiny_model_dir)
    # the DPO run trained on pairs: the shots come from the SFT run it started from
    assert _shots_file(lineages) == str(sound_task["train"])


def test_two_tuned_models_share_one_table_verdict_and_forgetting_check(two_tuned, sound_run,
                                                                       dpo_run, tiny_model_dir,
                                                                       sound_task):
    result, out = two_tuned
    names = [r["name"] for r in result["rows"]]
    assert names == ["base zero-shot", "base 2-shot", "sft", "dpo"]   # dpo: its run folder
    assert result["base"] == str(tiny_model_dir)
    assert result["train_file"] == str(sound_task["train"])
    assert [(t["name"], t["model"]) for t in result["tuned_models"]] == \
        [("sft", str(sound_run.output_dir)), ("dpo", str(dpo_run.output_dir))]
    rows = {r["name"]: r for r in result["rows"]}
    assert all(r["examples"] == 8 for r in result["rows"])
    assert rows["sft"]["primary"] >= 0.75 > rows["base zero-shot"]["primary"]
    # the verdict: the best fine-tuned model (first among equals) against the best baseline
    best = max(("sft", "dpo"), key=lambda n: (rows[n]["primary"], -rows[n]["prompt_tokens"]))
    detail = result["verdict_detail"]
    assert detail["best_tuned"] == best and detail["kind"] == "tuned_wins"
    assert result["verdict"].startswith(f"fine-tuned ({best}): +")
    assert f"over {detail['best_baseline']}" in result["verdict"]
    assert result["tuned"] == next(t["model"] for t in result["tuned_models"]
                                   if t["name"] == best)
    # forgetting: each tuned model against the base, on the same general prompts
    f = result["forgetting"]
    assert [m["name"] for m in f["models"]] == ["sft", "dpo"]
    for m in f["models"]:
        g = m["general"]
        assert g["items"] >= 90 and g["base"] == f["general"]["base"]
        assert g["delta_points"] == pytest.approx(100 * (g["tuned"] - g["base"]))
    assert f["general"] == next(m["general"] for m in f["models"] if m["name"] == best)
    for name in ("sft", "dpo", "general-base", "general-sft", "general-dpo",
                 "preference-base", "preference-sft", "preference-dpo"):
        assert (out / "predictions" / f"{name}.jsonl").is_file(), name
    assert json.loads((out / "comparison.json").read_text())["rows"] == result["rows"]


def test_held_out_pairs_score_the_base_and_each_tuned_model(two_tuned, pair_files):
    result, out = two_tuned
    pref = result["preference"]
    assert pref["file"] == str(pair_files["test"]) and pref["pairs"] == 8
    rows = {r["name"]: r for r in pref["rows"]}
    assert list(rows) == ["base", "sft", "dpo"]
    assert all(r["task"]["task"] == "preference" and r["examples"] == 8 for r in rows.values())
    # SFT taught the right sounds; DPO on pairs of the same kind (other prompts) widened the
    # margin between the right sound and a wrong one further
    assert rows["sft"]["metrics"]["accuracy"] >= 0.75 and rows["dpo"]["metrics"]["accuracy"] >= 0.75
    assert rows["dpo"]["metrics"]["margin"] > rows["sft"]["metrics"]["margin"] > \
        rows["base"]["metrics"]["margin"]
    scored = [json.loads(line) for line in
              (out / "predictions" / "preference-dpo.jsonl").read_text().splitlines()]
    assert sum(s["score"] for s in scored) / 8 == rows["dpo"]["metrics"]["accuracy"]


class _Tables(HTMLParser):
    """The text of every table cell, per row, per table."""

    def __init__(self):
        super().__init__()
        self.tables, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_one_report_shows_both_tuned_models_side_by_side(two_tuned):
    result, out = two_tuned
    parser = _Tables()
    parser.feed(Path(result["report_html"]).read_text())
    main = parser.tables[0]
    assert [r[0] for r in main] == ["", "base zero-shot", "base 2-shot", "sft", "dpo"]
    head = main[0]
    assert "preferred" in head and "pref. margin" in head
    by_name = {r[0]: dict(zip(head, r)) for r in main[1:]}
    pref = {r["name"]: r for r in result["preference"]["rows"]}
    assert by_name["base 2-shot"]["preferred"] == "-"           # prompted rows: no pairs
    assert by_name["base zero-shot"]["preferred"] == f"{100 * pref['base']['primary']:.1f}%"
    assert by_name["dpo"]["pref. margin"] == f"{pref['dpo']['metrics']['margin']:+.2f}"
    pref_table = next(t for t in parser.tables if t[0][:2] == ["model", "accuracy"])
    assert [r[0] for r in pref_table[1:]] == ["base", "sft", "dpo"]
    md = (out / "report.md").read_text()
    assert "| sft |" in md and "| dpo |" in md and "## Preference pairs" in md
    assert "| prompt | reference | base 2-shot | sft | dpo |" in md


def test_the_page_renders_a_comparison_of_two_tuned_models(two_tuned):
    playwright = pytest.importorskip("playwright.sync_api")
    result, out = two_tuned
    static = Path(__file__).parents[1] / "src" / "tunelab" / "server" / "static"
    evaluation = {"id": "eval-1", "object": "tunelab.evaluation", "status": "succeeded",
                  "model": "sft", "result": result}
    shell = ("<!doctype html><html><head><link rel='stylesheet' href='/app.css'></head><body>"
             "<main id='root'></main><script type='module'>"
             "import { render } from '/js/views/compare.js';"
             "const ctx = { setHeader() {}, setOnline() {}, navigate() {} };"
             "render(document.getElementById('root'), { id: 'eval-1', query: new "
             "URLSearchParams() }, ctx);</script></body></html>")

    def serve(route):
        path = route.request.url.split("://", 1)[1].split("/", 1)[1].split("?")[0]
        if path == "":
            return route.fulfill(body=shell, content_type="text/html")
        if path == "v1/tunelab/evaluations/eval-1":
            return route.fulfill(body=json.dumps(evaluation), content_type="application/json")
        if path == "v1/tunelab/evaluations/eval-1/report":
            return route.fulfill(path=result["report_html"], content_type="text/html")
        file = static / path
        if file.is_file():
            return route.fulfill(path=str(file), content_type="text/javascript"
                                 if file.suffix == ".js" else "text/css")
        return route.fulfill(status=404, body="")

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1366, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route("**/*", serve)
        page.goto("http://tunelab.test/")
        table = page.wait_for_selector("#comparison-table", timeout=30_000)
        rows = table.query_selector_all("tbody tr")
        names = [r.query_selector("th").evaluate("e => e.firstChild.textContent") for r in rows]
        assert names == ["base zero-shot", "base 2-shot", "sft", "dpo"]
        classes = [r.get_attribute("class") or "" for r in rows]
        assert ["tuned" in c for c in classes] == [False, False, True, True]
        heads = [h.text_content() for h in table.query_selector_all("thead th")]
        assert "Preferred" in heads and "Pref. margin" in heads
        pref = page.query_selector_all("#preference-table tbody tr th")
        assert [x.text_content() for x in pref] == ["base", "sft", "dpo"]
        forgot = page.locator("section.card", has_text="What the fine-tunes forgot").text_content()
        assert "→ sft" in forgot and "→ dpo" in forgot
        assert page.text_content(".verdict-text").strip() == result["verdict"]
        verdict_class = page.get_attribute(".verdict", "class")
        assert "good" in verdict_class                      # from verdict_detail.kind
        assert not errors, errors
        browser.close()
