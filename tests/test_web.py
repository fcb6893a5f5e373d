"""The web page (issue 9), end to end in a real browser: Debian's chromium driven by Playwright,
against a real `tunelab serve` (its worker, the tiny random model registered with --model).

One module-scoped server and browser; the slow part (upload -> split -> train -> watch) runs
once in the `tuned` fixture, which records what the page showed while the job ran; the tests
assert on that record, then chat with and compare the model it made. Screenshots of every
page at laptop (1366x800) and phone (390x844) width go to the pytest tmp dir (and to
$TUNELAB_WEB_SHOTS when set, to look at while working on the page).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import sound_rows
from test_server_harness import Server, make_key

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
LAPTOP = {"width": 1366, "height": 800}
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium: `make browser`")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("web-data")
    key = make_key(data, "web")
    srv = Server(data, "--workers", "1", "--model", f"tiny={tiny_model_dir}")
    srv.key = key
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web-files")
    rows = sound_rows()
    good = folder / "sounds.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = folder / "broken.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows[:12]) +
                   '{"messages": [{"role": "bot", "content": "hi"}, '
                   '{"role": "assistant", "content": "woof"}]}\n'
                   '{"messages": [oops\n')
    reviews = folder / "reviews.csv"   # raw rows, not conversations: the template step's input
    reviews.write_text("text,label\n" + "".join(
        f"{'great screen' if i % 2 else 'broke in a day'} #{i},{'positive' if i % 2 else 'negative'}\n"
        for i in range(20)))
    return {"good": good, "bad": bad, "reviews": reviews}


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web-shots")
    extra = os.environ.get("TUNELAB_WEB_SHOTS")

    def shot(page, name: str, *, phone: bool = True) -> None:
        """Full-page screenshots at laptop and phone width; at phone width nothing may
        overflow sideways (the page scrolls vertically only)."""
        sizes = [("laptop", LAPTOP)] + ([("phone", PHONE)] if phone else [])
        for label, size in sizes:
            page.set_viewport_size(size)
            page.wait_for_timeout(250)   # charts redraw on resize
            page.evaluate("window.scrollTo(0, 0)")
            path = folder / f"{name}-{label}.png"
            page.screenshot(path=str(path), full_page=True)
            if extra:
                Path(extra).mkdir(parents=True, exist_ok=True)
                shutil.copy(path, Path(extra) / path.name)
            if label == "phone":
                width = page.evaluate("document.documentElement.scrollWidth")
                assert width <= PHONE["width"], f"{name}: {width}px wide at phone width"
        page.set_viewport_size(LAPTOP)
    shot.folder = folder
    return shot


def signed_in(browser, server):
    """A browser context whose tab already holds the key (the sign-in form is tested apart)."""
    ctx = browser.new_context(viewport=LAPTOP)
    # top frame only: the comparison report's sandboxed frame has no storage
    ctx.add_init_script("if (window === window.top) sessionStorage.setItem('tunelab.apiKey', "
                        f"{json.dumps(server.key)})")
    ctx.set_default_timeout(30_000)
    page = ctx.new_page()
    page.base = server.url
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    # works offline: every script, style, font and call goes to tunelab itself
    page.on("request", lambda r: r.url.startswith((server.url, "data:", "blob:", "about:"))
            or page.errors.append(f"request off the server: {r.url}"))
    return ctx, page


@pytest.fixture
def page(browser, server):
    ctx, page = signed_in(browser, server)
    yield page
    ctx.close()
    assert not page.errors, page.errors


def assert_labelled(page) -> None:
    """Every form control has an accessible name (a <label for>, or aria-label)."""
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => e.type !== 'hidden' && !e.closest('[hidden]') &&
                     !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
        .map(e => e.id || e.outerHTML.slice(0, 60))""")
    assert not unnamed, unnamed


# WCAG contrast of every visible text against the background it is drawn on (solid
# backgrounds: the page uses no text over images); disabled controls are exempt, as in WCAG.
CONTRAST_JS = """() => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
                               return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const bg = (el) => { for (; el; el = el.parentElement) { const c = rgb(getComputedStyle(el).backgroundColor);
                                                          if (c.length === 3 || c[3] > 0.9) return c.slice(0, 3); }
                       return [255, 255, 255]; };
  const bad = [];
  for (const el of document.querySelectorAll('body *')) {
    if (el.closest('svg, [disabled], [hidden], .toasts')) continue;
    const text = [...el.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
    const r = el.getBoundingClientRect();
    if (!text || !r.width || !r.height) continue;
    const st = getComputedStyle(el);
    const fg = rgb(st.color), b = bg(el);
    const [hi, lo] = [lum(fg.slice(0, 3)), lum(b)].sort((x, y) => y - x);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const large = parseFloat(st.fontSize) >= 24 || (parseFloat(st.fontSize) >= 18.5 && +st.fontWeight >= 700);
    if (ratio < (large ? 3 : 4.5)) bad.push(`${text.slice(0, 30)}: ${ratio.toFixed(2)}`);
  }
  return bad;
}"""


def assert_contrast(page) -> None:
    bad = page.evaluate(CONTRAST_JS)
    assert not bad, bad


# A line of text that starts with a dash reads as an orphan ("— general prompts..." alone
# under the label it belongs to): every dash laid out in `root` must have text before it on
# its line, in its own block.
ORPHAN_DASHES_JS = """(root) => {
  const out = [];
  const walker = document.createTreeWalker(document.querySelector(root), NodeFilter.SHOW_TEXT);
  for (let n; (n = walker.nextNode());) {
    const t = n.textContent;
    for (let i = 0; i < t.length; i++) {
      if (t[i] !== '—' && t[i] !== '–') continue;
      const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + 1);
      const rect = r.getBoundingClientRect();
      if (!rect.width) continue;                      // not laid out (an <option>)
      let box = n.parentElement;
      while (box && getComputedStyle(box).display === 'inline') box = box.parentElement;
      const st = getComputedStyle(box);
      const left = box.getBoundingClientRect().left + parseFloat(st.borderLeftWidth) + parseFloat(st.paddingLeft);
      if (rect.left - left < 2) out.push(t.trim().slice(0, 40));
    }
  }
  return out;
}"""


def fits_its_card(page, selector: str) -> tuple[int, int]:
    """(scrollWidth, clientWidth) of a scrolling table wrapper: equal when nothing is cut."""
    return tuple(page.eval_on_selector(selector, "w => [w.scrollWidth, w.clientWidth]"))


def upload(page, path: Path) -> None:
    page.goto(page.base + "/#/data")
    page.set_input_files("#file-input", str(path))
    page.wait_for_url("**/#/data/file-*")


@pytest.fixture(scope="module")
def tuned(browser, server, files, shots):
    """Upload the good file, split it, train on the tiny model and watch the job, as a user
    does; returns what the page showed along the way."""
    ctx, page = signed_in(browser, server)
    seen = {"points": [], "statuses": [], "banner_during_drop": None, "banner_after": None}
    upload(page, files["good"])
    page.wait_for_selector(".step.done")              # step 1 "Check" passed
    seen["report"] = page.text_content(".report")
    page.fill("#split-val", "20")
    page.fill("#split-test", "25")
    page.click("form:has(#split-val) button[type=submit]")
    page.wait_for_selector(".split-parts")
    seen["split"] = page.text_content(".split-parts")
    shots(page, "data-good")
    page.click("button:has-text('Train on these')")
    page.wait_for_selector("#f-model")
    page.select_option("#f-model", "tiny")
    page.fill("#f-epochs", "25")     # ~60 steps: the curve grows over several polls
    page.fill("#f-maxlen", "64")
    page.fill("#f-suffix", "sounds")
    page.wait_for_selector(".plan[aria-busy=false]")   # the server's plan for these settings
    seen["plan"] = page.text_content(".plan")
    assert_labelled(page)
    shots(page, "train")
    page.click("button[form=train-form]")
    page.wait_for_url("**/#/jobs/ftjob-*")
    seen["job_url"] = page.url
    # A marker that a reload would wipe: the curve must grow without one.
    page.evaluate("window.__sameDocument = true")
    dropped = False
    deadline = time.time() + 240
    while time.time() < deadline:
        status = page.text_content(".job-status .pill").strip().lower()
        points = page.get_attribute(".chart-card svg", "data-points") or "0,0"
        seen["statuses"].append(status)
        seen["points"].append(int(points.split(",")[0]))
        if not dropped and seen["points"][-1] >= 1 and status == "running":
            # the connection drops for a few seconds while watching
            dropped = True
            page.route("**/v1/fine_tuning/jobs/**", lambda route: route.abort())
            page.wait_for_selector(".banner:not([hidden])", timeout=15_000)
            seen["banner_during_drop"] = page.text_content(".banner")
            shots(page, "job-reconnecting", phone=False)
            page.unroute("**/v1/fine_tuning/jobs/**")
            page.wait_for_selector(".banner", state="hidden", timeout=30_000)
            seen["banner_after"] = "hidden"
        if status in ("succeeded", "failed", "cancelled"):
            break
        page.wait_for_timeout(700)
    page.wait_for_selector(".page-actions button:has-text('Chat')")
    seen["same_document"] = page.evaluate("window.__sameDocument === true")
    seen["model"] = page.text_content(".page-titles h1").strip()
    seen["checkpoints"] = page.locator(".card:has(h2:text('Checkpoints')) tbody tr").count()
    seen["events"] = page.text_content(".log")
    seen["contrast"] = page.evaluate(CONTRAST_JS)
    shots(page, "job-succeeded")
    seen["page_errors"] = page.errors
    ctx.close()
    return seen


# ---------------------------------------------------------------- tests
def test_wrong_api_key_is_refused_and_the_right_one_signs_in(browser, server, shots):
    ctx = browser.new_context(viewport=LAPTOP)
    page = ctx.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#api-key")                 # auth is on: the sign-in form first
    page.fill("#api-key", "tl-not-a-real-key")
    page.keyboard.press("Enter")
    error = page.wait_for_selector("#api-key-err:not([hidden])")
    assert "refused" in error.text_content() and "401" in error.text_content()
    assert page.get_attribute("#api-key", "aria-invalid") == "true"
    assert "#/login" in page.url
    shots(page, "login-refused")
    page.fill("#api-key", server.key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#dropzone")
    assert page.evaluate("sessionStorage.getItem('tunelab.apiKey')") == server.key
    assert page.evaluate("localStorage.getItem('tunelab.apiKey')") is None
    ctx.close()


def test_bad_file_shows_its_errors_with_line_numbers_and_fields(page, files, shots):
    upload(page, files["bad"])
    page.wait_for_selector(".err-kind")
    kinds = {k.get_attribute("data-kind"): k.text_content()
             for k in page.query_selector_all(".err-kind")}
    assert "line 13" in kinds["unknown_role"] and "messages[0].role" in kinds["unknown_role"]
    assert "'bot'" in kinds["unknown_role"]
    assert "line 14" in kinds["not_json"]
    assert page.is_disabled(".page-actions button:has-text('Train on it')")
    assert page.is_disabled("form:has(#split-val) button[type=submit]")
    assert_contrast(page)
    shots(page, "data-bad")
    page.emulate_media(color_scheme="dark")             # the dark theme follows the system
    assert_contrast(page)
    shots(page, "data-bad-dark", phone=False)


def test_raw_rows_become_conversations_with_a_template_and_a_preview(page, files, shots):
    upload(page, files["reviews"])
    page.wait_for_selector("#tpl-name")                # opened by itself: rows are not chats
    assert "not conversations yet" in page.text_content(".step:first-child")
    page.select_option("#tpl-name", "review-sentiment")
    page.select_option("#map-review", "col:text")      # the file's own columns are offered
    page.click("button:has-text('Apply template')")    # 'sentiment' has no column yet
    assert "sentiment" in page.text_content("#map-sentiment-err")
    page.select_option("#map-sentiment", "col:label")
    page.click("button:has-text('Apply template')")
    page.wait_for_selector(".tpl-done")
    assert "20 conversations" in page.text_content(".tpl-done .alert")
    first = page.query_selector(".previews .conv")
    assert first.query_selector(".msg.assistant").text_content().strip().endswith(("positive", "negative"))
    shots(page, "data-template")


def test_keyboard_reaches_the_navigation_and_the_upload_in_order(page):
    page.goto(page.base + "/#/data")
    page.wait_for_selector("#dropzone")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    focused = []
    for _ in range(12):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.textContent.trim()"))
    nav = ["Data", "Train", "Jobs", "Compare", "Chat"]
    assert [f for f in focused if f in nav] == nav                   # in the order shown
    assert focused.index("Choose a file") > focused.index("Chat")     # then the page itself
    page.reload()
    page.wait_for_selector("#dropzone")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")                                        # skip link -> heading
    assert page.evaluate("document.activeElement.tagName") == "H1"


def test_good_file_trains_with_a_live_curve_and_succeeds(tuned):
    assert "Trainable" in tuned["report"] and "48" in tuned["report"]
    assert "12" in tuned["split"]                     # 48 examples, 25% held out for the test
    assert "auto" not in tuned["plan"] and "Optimizer steps" in tuned["plan"]
    assert "running" in tuned["statuses"]
    assert tuned["statuses"][-1] == "succeeded", tuned["statuses"]
    # the curve gained points while the page stayed the same document (no reload)
    growth = sorted(set(tuned["points"]))
    assert len(growth) >= 3 and growth[-1] > growth[0], tuned["points"]
    assert tuned["same_document"]
    # a dropped connection showed a banner and recovered by itself
    assert "Connection lost" in tuned["banner_during_drop"]
    assert tuned["banner_after"] == "hidden"
    assert tuned["model"].startswith("ft:tiny:web:sounds:ftjob-")
    assert tuned["checkpoints"] >= 1
    assert "validation loss" in tuned["events"]
    assert not tuned["page_errors"]
    assert not tuned["contrast"], tuned["contrast"]


def test_chat_streams_both_models_side_by_side(page, server, tuned, shots):
    model = tuned["model"]
    page.goto(f"{server.url}/#/chat?left=tiny&right={model}")
    page.wait_for_selector("#chat-input")
    assert page.input_value("#chat-model-right") == model
    page.click(".chat-settings summary")
    page.fill("#chat-max", "12")
    assert_labelled(page)
    # count how often each answer changes while it streams
    page.evaluate("""() => { window.__updates = {left: 0, right: 0};
        for (const side of ['left', 'right'])
            new MutationObserver(() => window.__updates[side]++).observe(
                document.querySelector(`[data-side=${side}] .chat-log`),
                {childList: true, subtree: true, characterData: true}); }""")
    page.fill("#chat-input", "What sound does a dog make?")
    page.keyboard.press("Enter")
    # both answers end with a token count (or an error, shown in the pane that asked)
    page.wait_for_function("""() => ['left', 'right'].every(s => document.querySelector(
        `[data-side=${s}] .tokens, [data-side=${s}] .bubble-meta .alert`))""", timeout=90_000)
    for side in ("left", "right"):
        assert not page.query_selector(f"[data-side={side}] .bubble-meta .alert"), \
            page.text_content(f"[data-side={side}] .chat-log")
    right = page.query_selector("[data-side=right] .tokens")
    assert int(right.get_attribute("data-tokens")) > 0
    assert "tokens" in right.text_content()
    assert page.text_content("[data-side=right] .bubble.assistant .bubble-text")  # a random model
    # The random base model talks until max_tokens (12): its answer arrives in pieces, not at
    # once. The fine-tune learned short answers, so it may stop after a word or two.
    updates = page.evaluate("window.__updates")
    left_tokens = int(page.get_attribute("[data-side=left] .tokens", "data-tokens"))
    assert left_tokens > 3 and updates["left"] > 3, (left_tokens, updates)
    assert updates["right"] >= 2, updates                 # the text, then its token count
    assert page.text_content("[data-side=left] .bubble.user") == "What sound does a dog make?"
    shots(page, "chat")


def test_comparison_runs_from_the_page_and_shows_its_table(page, server, tuned, shots):
    model = tuned["model"]
    page.goto(f"{server.url}/#/compare?model={model}")
    page.wait_for_selector("#c-test")
    page.click("button:has-text('Run comparison')")     # no test file yet: said next to it
    assert "test file" in page.text_content("#c-test-err")
    options = page.eval_on_selector_all("#c-test option", "os => os.map(o => [o.value, o.text])")
    test_file = next(v for v, text in options if text.startswith("sounds.test.jsonl"))
    page.select_option("#c-test", test_file)
    page.fill("#c-shots", "2")
    page.fill("#c-retrieval", "2")
    if page.query_selector("#c-general"):
        page.uncheck("#c-general")
    assert_labelled(page)
    assert page.is_hidden("#c-judge")                  # the grader's fields: judge task only
    for size in (LAPTOP, PHONE):                       # no line starts with an orphaned dash
        page.set_viewport_size(size)
        assert not page.evaluate(ORPHAN_DASHES_JS, "form"), size
    page.set_viewport_size(LAPTOP)
    shots(page, "compare-form")
    page.click("button:has-text('Run comparison')")
    page.wait_for_url("**/#/compare/eval-*")
    table = page.wait_for_selector("#comparison-table", timeout=240_000)
    rows = [r.text_content() for r in table.query_selector_all("tbody tr")]
    assert any(r.startswith("fine-tuned") for r in rows), rows
    assert any(r.startswith("base zero-shot") for r in rows), rows
    assert any(r.startswith("base 2-shot") for r in rows), rows
    assert any(r.startswith("base + 2 retrieved examples") for r in rows), rows
    # every row's cost per 1,000 requests, and the cost card with its chart and training cost
    assert all("$" in r for r in rows), rows
    cost = page.text_content("#cost-card")
    assert "Training:" in cost and "USD per 1,000 requests" in cost, cost
    assert len(page.query_selector_all("#cost-card .bar-row")) == len(rows)
    assert page.text_content(".verdict-text").strip()
    # the verdict's fields, shown as facts (read from verdict_detail, not from the sentence)
    with server.http(server.key) as h:
        detail = h.get(f"/v1/tunelab/evaluations/{page.url.rsplit('/', 1)[1]}").json()[
            "result"]["verdict_detail"]
    assert page.get_attribute(".verdict", "data-kind") == detail["kind"]
    assert page.text_content("[data-fact=points]").startswith(f"{detail['points']:+.1f} points")
    assert f"×{detail['prompt_tokens_ratio']:.2f}" in page.text_content("[data-fact=tokens]")
    if detail["pays_back"]:     # the break-even reads as in the sentence (~220, not ~225)
        requests = page.text_content("[data-fact=break-even]").split()[-2]
        assert f"after {requests} requests" in page.text_content(".verdict-text")
    # the table's headings come from the server's metric table
    heads = [t.strip().replace("\u2011", "-") for t in page.eval_on_selector_all(
        "#comparison-table thead th", "hs => hs.map(h => h.textContent)")]
    assert heads[:4] == ["Setup", "accuracy", "macro-F1", "invalid answers"], heads
    # at laptop width the table fits its card: nothing is cut or scrolls sideways
    page.set_viewport_size(LAPTOP)
    scroll, client = fits_its_card(page, "#comparison-wrap")
    assert scroll <= client, (scroll, client)
    report = page.frame_locator(".report-frame iframe")
    assert "fine-tuned" in report.locator("body").inner_text(timeout=30_000)
    assert_contrast(page)
    shots(page, "compare-result")


def test_a_comparison_graded_by_a_model_from_the_page(page, server, tuned, shots):
    """The judge task from the form: the grader is this server itself (its tiny random model,
    whose replies hold no grade), reached with the key the form sends. The result shows every
    answer ungraded and counted, and the pairs as ungraded: nothing fails."""
    page.goto(f"{server.url}/#/compare?model={tuned['model']}")
    page.wait_for_selector("#c-test")
    options = page.eval_on_selector_all("#c-test option", "os => os.map(o => [o.value, o.text])")
    page.select_option("#c-test", next(v for v, text in options
                                       if text.startswith("sounds.test.jsonl")))
    page.fill("#c-shots", "0")
    page.fill("#c-limit", "2")
    if page.query_selector("#c-general"):
        page.uncheck("#c-general")
    page.select_option("#c-task", "judge")
    assert page.is_visible("#c-judge")
    page.fill("#c-judge-url", server.url + "/v1")
    page.fill("#c-judge-model", "tiny")
    page.fill("#c-judge-key", server.key)
    page.check("#c-judge-pairwise")
    assert_labelled(page)
    for size in (LAPTOP, PHONE):
        page.set_viewport_size(size)
        assert not page.evaluate(ORPHAN_DASHES_JS, "form"), size
    page.set_viewport_size(LAPTOP)
    shots(page, "compare-form-judge")
    page.click("button:has-text('Run comparison')")
    page.wait_for_url("**/#/compare/eval-*")
    card = page.wait_for_selector("#judge-card", timeout=300_000)
    eval_id = page.url.rsplit("/", 1)[1]
    with server.http(server.key) as h:
        ev = h.get(f"/v1/tunelab/evaluations/{eval_id}").json()
    assert {k: ev["judge"][k] for k in ("url", "model", "pairwise", "api_key", "rubric")} == \
        {"url": server.url + "/v1", "model": "tiny", "pairwise": True, "api_key": "(given)",
         "rubric": None}
    assert server.key not in json.dumps(ev)
    text = card.text_content()
    assert "Graded by tiny" in text
    # nothing graded: the verdict claims nothing, and says so
    assert page.get_attribute(".verdict", "data-kind") == "ungraded"
    assert page.text_content(".verdict-text").startswith("no verdict: the grader graded none")
    rows = page.eval_on_selector_all("#judge-table tbody tr", "rs => rs.map(r => r.textContent)")
    assert len(rows) == 2 and all(r.endswith("2 of 2") for r in rows), rows   # all ungraded
    assert "no pair could be graded" in page.text_content("#pairwise")
    assert "judge score" in page.text_content("#comparison-table thead")
    assert "ungraded" in page.text_content("#comparison-table thead")
    scroll, client = fits_its_card(page, "#comparison-wrap")
    assert scroll <= client, (scroll, client)
    assert_contrast(page)
    shots(page, "compare-result-judge")


def test_training_time_is_estimated_from_jobs_this_server_finished(page, server, tuned):
    """A browser that never watched a job still gets a time estimate: the server publishes
    the speed of the jobs it finished."""
    page.goto(f"{server.url}/#/train")
    page.wait_for_selector("#f-model")
    page.select_option("#f-model", "tiny")
    page.wait_for_selector(".plan[aria-busy=false]")
    plan = page.text_content(".plan")
    assert "from 1 finished job on this server" in plan, plan
    assert "tok/s" in plan and "≈" in plan


def test_a_running_job_is_cancelled_from_its_page(page, server, tuned, shots):
    page.goto(f"{server.url}/#/train")
    page.wait_for_selector("#f-model")
    page.select_option("#f-model", "tiny")
    options = page.eval_on_selector_all("#f-train option", "os => os.map(o => [o.value, o.text])")
    page.select_option("#f-train", next(v for v, text in options
                                        if text.startswith("sounds.jsonl")))
    page.fill("#f-epochs", "50")            # 2,400 steps: minutes, so the cancel lands mid-run
    page.fill("#f-batch", "1")
    page.fill("#f-maxlen", "64")
    page.fill("#f-suffix", "long")
    page.click("button[form=train-form]")
    page.wait_for_url("**/#/jobs/ftjob-*")
    page.wait_for_function("""() => {
        const pts = document.querySelector('.chart-card svg')?.getAttribute('data-points');
        return pts && +pts.split(',')[0] >= 2; }""", timeout=120_000)
    page.once("dialog", lambda d: d.accept())
    page.click("#cancel-job")
    page.wait_for_function("document.querySelector('.job-status .pill')?.textContent"
                           ".trim().toLowerCase() === 'cancelled'", timeout=60_000)
    assert "What was trained so far is kept" in page.text_content(".view")
    assert page.locator(".card:has(h2:text('Checkpoints')) tbody tr").count() >= 1
    assert page.query_selector("#cancel-job") is None
    # the log reads newest first, in the server's order, though many events share a second
    log = page.text_content(".log")
    steps = [int(s) for s in re.findall(r"Step (\d+)/2400", log)]
    assert len(steps) >= 2 and steps == sorted(steps, reverse=True), steps
    assert log.index("The job was cancelled") < log.index("Cancellation requested")
    shots(page, "job-cancelled", phone=False)


def test_a_running_comparison_is_cancelled_from_its_page(page, server, tuned, tmp_path, shots):
    # A test file long enough that the comparison cannot end before the cancel lands: the
    # random base model never emits its end-of-turn token, so each of 800 answers runs to the
    # 256-token cap (about 25 s for the zero-shot row alone on 2 cores, minutes in all). The
    # 12-row test split and the 104-prompt general check end in a few seconds on the tiny
    # model: a cancel clicked under load could arrive after the comparison had finished.
    sentence = "The {a} makes its sound at dawn, at noon and at night, and every farmer knows it."
    essay = " ".join(sentence.format(a=a) for a in ("dog", "cat", "cow", "duck", "sheep", "owl"))
    long_test = tmp_path / "essays.test.jsonl"
    long_test.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Describe animal number {i} and its sound."},
        {"role": "assistant", "content": essay}]}) + "\n" for i in range(800)))
    upload(page, long_test)
    page.wait_for_selector(".step.done")
    page.goto(f"{server.url}/#/compare?model={tuned['model']}")
    page.wait_for_selector("#c-test")
    options = page.eval_on_selector_all("#c-test option", "os => os.map(o => [o.value, o.text])")
    page.select_option("#c-test", next(v for v, text in options
                                       if text.startswith("essays.test.jsonl")))
    page.click("button:has-text('Run comparison')")
    page.wait_for_url("**/#/compare/eval-*")
    page.wait_for_selector(".eval-progress", timeout=120_000)
    clicked = time.monotonic()
    page.click("#cancel-eval")
    page.wait_for_selector(".alert:has-text('Cancelled. A comparison keeps nothing partial')",
                           timeout=60_000)
    # noticed between decoding steps of a 128-row batch, not after the whole batch
    assert time.monotonic() - clicked < 30
    assert page.query_selector("#cancel-eval") is None
    assert page.query_selector("#comparison-table") is None
    shots(page, "compare-cancelled", phone=False)


# ---------------------------------------------------------------- DPO on the page (issue 12)
@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    from test_server_dpo import pairs
    folder = tmp_path_factory.mktemp("web-pairs")
    rows = pairs()
    train, valid = folder / "prefs.jsonl", folder / "prefs-valid.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:36]))
    valid.write_text("".join(json.dumps(r) + "\n" for r in rows[36:]))
    return {"train": train, "valid": valid, "rows": rows}


def test_the_data_view_shows_preference_pairs_side_by_side(page, pair_files, shots):
    upload(page, pair_files["train"])
    pair = page.wait_for_selector(".file-preview .pair")
    first = pair_files["rows"][0]
    cols = {c: pair.query_selector(f".pair-col.{c}") for c in ("prompt", "chosen", "rejected")}
    assert first["input"]["messages"][0]["content"] in cols["prompt"].text_content()
    assert cols["chosen"].text_content().endswith(first["preferred_output"][0]["content"])
    assert cols["rejected"].text_content().endswith(first["non_preferred_output"][0]["content"])
    boxes = {c: el.bounding_box() for c, el in cols.items()}
    assert boxes["prompt"]["x"] < boxes["chosen"]["x"] < boxes["rejected"]["x"]   # side by side
    assert abs(boxes["prompt"]["y"] - boxes["rejected"]["y"]) < 2
    assert page.locator(".file-preview .pair").count() == 3
    assert "preference pairs" in page.text_content(".step:first-child")
    assert_contrast(page)
    shots(page, "data-pairs")
    page.click(".page-actions button:has-text('Train on it')")      # DPO is preselected
    page.wait_for_selector("#f-model")
    assert page.is_checked("input[name=objective][value=dpo]")


def test_the_train_view_offers_dpo_with_its_own_settings(page, server, files, pair_files, shots):
    """The objectives, their hyperparameters and the auto values all come from the server."""
    for path in (files["good"], pair_files["train"]):
        upload(page, path)
        page.wait_for_selector(".step:first-child .sub:has-text('Every example')")
    page.goto(page.base + "/#/train")
    page.wait_for_selector("#f-model")
    page.select_option("#f-model", "tiny")
    objectives = page.eval_on_selector_all("input[name=objective]", "os => os.map(o => o.value)")
    assert objectives == ["supervised", "dpo"]
    assert page.is_checked("input[name=objective][value=supervised]")
    assert page.is_hidden("#f-hp-beta")                     # DPO's own box, hidden for SFT
    trainable = lambda: page.eval_on_selector_all(          # noqa: E731
        "#f-train option", "os => os.map(o => o.text.split(' · ')[0])")
    assert "sounds.jsonl" in trainable() and "prefs.jsonl" not in trainable()
    page.check("input[name=objective][value=dpo]")
    page.wait_for_selector(".plan[aria-busy=false]")
    assert page.is_visible("#f-hp-beta")
    assert page.get_attribute("#f-hp-beta", "placeholder") == "auto (0.1)"
    assert set(trainable()) == {"prefs.jsonl"}               # only preference pairs
    assert "hidden" in page.text_content("#f-train-hint")
    plan = page.text_content(".plan")
    assert "Objectivedpo" in plan and "Beta0.1" in plan
    assert "Learning rate2.0e-5" in plan                    # DPO's own auto rate (SFT's: 2e-4)
    assert "Optimizer steps≈ " in plan and "auto" not in plan
    page.fill("#f-hp-beta", "0.25")
    page.fill("#f-lr", "10")
    page.wait_for_selector(".plan[aria-busy=false]")
    assert "Beta0.25" in page.text_content(".plan")
    page.fill("#f-hp-beta", "20")                          # over the API's bound: said at the box
    page.fill("#f-maxlen", "64")
    page.fill("#f-suffix", "prefs")
    page.click("button[form=train-form]")
    assert "less than or equal to 10" in page.wait_for_selector("#f-hp-beta-err:not([hidden])").text_content()
    assert_labelled(page)
    page.fill("#f-hp-beta", "0.25")
    page.wait_for_selector(".plan[aria-busy=false]")
    shots(page, "train-dpo")
    page.click("button[form=train-form]")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]
    with server.http(server.key) as h:
        job = h.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["method"]["type"] == "dpo"
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.25
    assert job["tunelab"]["config"]["learning_rate"] == pytest.approx(10 * 2e-5)
    page.wait_for_function("document.querySelector('.job-status .pill')?.textContent.trim()"
                           ".toLowerCase() === 'succeeded'", timeout=240_000)


def test_the_train_view_offers_qlora_and_its_job_trains(page, server, files, shots):
    """QLoRA is a method card beside LoRA and full; it keeps LoRA's rank box and its job
    trains here, on the CPU (bitsandbytes' CPU backend)."""
    upload(page, files["good"])
    page.wait_for_selector(".step:first-child .sub:has-text('Every example')")
    page.goto(page.base + "/#/train")
    page.wait_for_selector("#f-model")
    page.select_option("#f-model", "tiny")
    methods = page.eval_on_selector_all("input[name=method]", "ms => ms.map(m => m.value)")
    assert methods == ["lora", "qlora", "full"]
    page.check("input[name=method][value=full]")
    assert page.is_hidden("#f-rank")
    page.check("input[name=method][value=qlora]")
    assert page.is_visible("#f-rank")
    page.fill("#f-rank", "4")
    page.wait_for_selector(".plan[aria-busy=false]")
    assert "Learning rate2.0e-4" in page.text_content(".plan")     # LoRA's auto rate
    assert "(the sft QLoRA rate)" in page.text_content("#f-lr-hint")
    shots(page, "train-qlora")   # the phone width overflows nothing with a third card
    page.click("button[form=train-form]")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_function("document.querySelector('.job-status .pill')?.textContent.trim()"
                           ".toLowerCase() === 'succeeded'", timeout=240_000)
    with server.http(server.key) as h:
        job = h.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["tunelab"]["config"]["method"] == "qlora"
    assert job["tunelab"]["config"]["lora"]["r"] == 4


def test_the_job_page_plots_dpo_metrics(page, server, pair_files, shots):
    """A DPO job with a validation file: the page plots loss, reward accuracy and reward
    margin, and its checkpoint table shows the objective's metrics."""
    with server.http(server.key) as h:
        ids = []
        for name in ("train", "valid"):
            r = h.post("/v1/files", data={"purpose": "fine-tune"},
                       files={"file": (pair_files[name].name, pair_files[name].read_bytes())})
            assert r.status_code == 200 and r.json()["status"] == "processed", r.text
            ids.append(r.json()["id"])
        r = h.post("/v1/fine_tuning/jobs", json={
            "model": "tiny", "training_file": ids[0], "validation_file": ids[1], "suffix": "dpo",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {
                "beta": 0.2, "batch_size": 4, "learning_rate_multiplier": 10}}},
            "tunelab": {"method": "lora", "lora": {"r": 4, "alpha": 8}, "max_steps": 8,
                        "max_length": 64, "logging_steps": 1, "eval_steps": 4,
                        "precision": "fp32"}})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
    page.goto(f"{server.url}/#/jobs/{job_id}")
    page.wait_for_function("document.querySelector('.job-status .pill')?.textContent.trim()"
                           ".toLowerCase() === 'succeeded'", timeout=240_000)
    charts = page.eval_on_selector_all(".chart-card h2", "hs => hs.map(h => h.textContent)")
    assert charts == ["Loss", "Reward accuracy", "Reward margin"]
    acc = page.get_attribute("[data-metric=reward_accuracy] svg", "data-points")
    assert [int(n) for n in acc.split(",")] == [8, 2]        # 8 training steps, 2 evaluations
    assert "reward accuracy" in page.get_attribute("[data-metric=reward_accuracy] svg",
                                                   "aria-label")
    head = page.text_content(".card:has(h2:text('Checkpoints')) thead")
    for label in ("Reward accuracy", "Reward margin", "Reward chosen", "Reward rejected"):
        assert label.upper() in head.upper()
    row = page.text_content(".card:has(h2:text('Checkpoints')) tbody tr")
    assert "%" in row                                         # the accuracy, as a share
    assert "Reward accuracy" in page.text_content(".tiles")
    details = page.text_content(".card:has(h2:text('Details'))")
    assert "dpo (direct preference optimisation)" in details and "Beta0.2" in details
    assert_contrast(page)
    shots(page, "job-dpo")


# ---------------------------------------------------------------- one vocabulary (issue 16)
def test_a_finished_job_shows_its_statuses_kinds_and_training_cost(page, server, tuned, shots):
    """Pills and polling read the statuses the server publishes (GET /v1/tunelab/info), the
    log its events' kinds, and a finished job shows what its training cost: its measured
    training time at the server's price per hour (tunelab.evaluate.cost's default here)."""
    from tunelab.evaluate.cost import DEFAULT_TRAIN_PER_HOUR
    with server.http(None) as h:
        info = h.get("/v1/tunelab/info").json()
    assert info["statuses"]["fine_tuning.job"] == {
        "validating_files": "waiting", "queued": "waiting", "running": "running",
        "succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}
    assert info["training_price_per_hour"] == DEFAULT_TRAIN_PER_HOUR
    page.goto(tuned["job_url"])
    tile = page.wait_for_selector(".stat:has(.stat-label:text('Training cost'))")
    text = tile.text_content()
    assert re.search(r"\$\d+\.\d{3,4}", text) and f"at ${DEFAULT_TRAIN_PER_HOUR:g}/h" in text, text
    assert page.get_attribute(".job-status .pill", "data-phase") == "succeeded"
    page.wait_for_selector(".log li[data-kind=succeeded]")     # the events are read
    kinds = page.eval_on_selector_all(".log li", "ls => ls.map(l => l.dataset.kind)")
    assert {"created", "queued", "started", "checkpoint", "metrics", "succeeded"} <= set(kinds)
    took = page.text_content(".stat:has(.stat-label:text('Took')) .stat-value")
    assert took.strip() not in ("", "—"), took
    page.goto(page.base + "/#/jobs")
    page.wait_for_selector("table .pill")
    phases = page.eval_on_selector_all("table .pill", "ps => ps.map(p => p.dataset.phase)")
    assert phases and "unknown" not in phases, phases
    shots(page, "job-cost", phone=False)


def test_a_running_job_follows_event_kinds_not_their_words(page, server, files):
    """The job page switches on events' kinds: with every message reworded on the way to the
    browser, a running job still finds its checkpoints (once looked for by the word
    'checkpoint') and its start."""
    with server.http(server.key) as h:
        f = h.post("/v1/files", files={"file": ("kinds.jsonl", files["good"].read_bytes())},
                   data={"purpose": "fine-tune"}).json()
        job = h.post("/v1/fine_tuning/jobs", json={
            "model": "tiny", "training_file": f["id"], "tunelab": {
                "max_steps": 100_000, "max_length": 64, "eval_steps": 2, "save_steps": 4,
                "logging_steps": 1, "lora": {"r": 4, "alpha": 8}, "precision": "fp32"}}).json()

    def reword(route):
        response = route.fetch()
        body = response.json()
        for e in body.get("data", []):
            e["message"] = "Ereignis"          # no English word left to match
        route.fulfill(response=response, json=body)
    page.route(f"**/v1/fine_tuning/jobs/{job['id']}/events*", reword)
    try:
        page.goto(f"{page.base}/#/jobs/{job['id']}")
        page.wait_for_function("document.querySelector('.job-status .pill')?.dataset.phase "
                               "=== 'running'", timeout=120_000)
        page.wait_for_selector(".card:has(h2:text('Checkpoints')) tbody tr", timeout=120_000)
        assert page.get_attribute(".job-status .pill", "data-phase") == "running"
        assert "Ereignis" in page.text_content(".log")
        assert "elapsed" in page.text_content(".stat:has(.stat-label:text('ETA'))")
    finally:
        page.unroute(f"**/v1/fine_tuning/jobs/{job['id']}/events*")
        with server.http(server.key) as h:
            h.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")


def test_duplicates_show_their_lines_and_the_train_page_can_drop_them(page, files, shots):
    """One exact duplicate once made a file untrainable. The data view lists the duplicates
    with their lines and the file trains; the Train page offers to drop them, and its plan
    counts the examples that will train."""
    rows = sound_rows()
    folder = files["good"].parent
    dups = folder / "dups.jsonl"
    dups.write_text("".join(json.dumps(r) + "\n" for r in rows + [rows[3], rows[3], rows[9]]))
    upload(page, dups)
    page.wait_for_selector(".step.done")                        # trainable: a warning only
    warning = page.wait_for_selector(".warnings li[data-kind=duplicates]")
    text = warning.text_content()
    assert "3 exact duplicate examples" in text
    lines = page.eval_on_selector_all(".dup-lines li", "ls => ls.map(l => l.textContent)")
    assert lines == ["line 49same as line 4", "line 50same as line 4", "line 51same as line 10"]
    assert not page.is_disabled(".page-actions button:has-text('Train on it')")
    assert_contrast(page)
    shots(page, "data-duplicates")
    page.click(".page-actions button:has-text('Train on it')")
    page.wait_for_selector("#f-model")
    page.select_option("#f-model", "tiny")
    assert page.is_visible("#f-dedupe")
    assert "3 exact duplicates in this file (line 49 = line 4" in page.text_content(".dedupe")
    examples = lambda: page.text_content(".plan dt:text('Examples') + dd").strip()   # noqa: E731
    page.wait_for_selector(".plan[aria-busy=false]")
    assert examples() == "51"
    page.check("#f-dedupe")
    page.wait_for_function("document.querySelector('.plan dt + dd') && [...document.querySelectorAll"
                           "('.plan dt')].find(d => d.textContent === 'Examples')"
                           ".nextElementSibling.textContent.trim() === '48'")
    assert_labelled(page)
    shots(page, "train-dedupe", phone=False)


def test_an_unusable_validation_part_leaves_none_chosen_and_says_why(page, files):
    """After a split whose validation part is "Not usable" (4 examples; 10 are needed), the
    Train page chooses "— none —" for validation (once a blank box) and says why."""
    rows = sound_rows()[:40]
    small = files["good"].parent / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    upload(page, small)
    page.wait_for_selector(".step.done")
    page.fill("#split-val", "10")
    page.fill("#split-test", "10")
    page.click("form:has(#split-val) button[type=submit]")
    page.wait_for_selector(".split-parts")
    assert "Not usable" in page.text_content(".split-part:has-text('validation')")
    page.click("button:has-text('Train on these')")
    page.wait_for_selector("#f-valid")
    chosen = page.eval_on_selector("#f-valid", "s => [s.value, s.selectedIndex, "
                                   "s.selectedIndex >= 0 ? s.options[s.selectedIndex].text : null]")
    assert chosen == ["", 0, "— none —"], chosen
    hint = page.text_content("#f-valid-hint")
    assert "small.val.jsonl is not usable" in hint and "at least 10" in hint, hint


@pytest.mark.parametrize("speed, said", [
    ({"tokens_per_second": 187.4, "low": 185.0, "high": 190.0, "jobs": 3, "used": 2,
      "left_out": 1},
     "token-weighted over 2 of 3 finished jobs on this server (1 far off left out)"),
    ({"tokens_per_second": 39.0, "low": 8.0, "high": 190.0, "jobs": 2, "used": 2,
      "left_out": 0}, "token-weighted over 2 finished jobs on this server"),
])
def test_the_training_estimate_shows_how_it_was_made_and_its_range(page, server, tuned, speed,
                                                                   said):
    """The estimate reads the server's structured speed: which jobs it used, and when they
    disagree, the range of times they give (a busy machine's 8 tok/s against 190 quiet)."""
    def info(route):
        response = route.fetch()
        body = response.json()
        body["training_speed"] = {"tiny": speed}
        route.fulfill(response=response, json=body)
    page.route("**/v1/tunelab/info", info)
    page.goto(f"{server.url}/#/train")
    page.wait_for_selector("#f-model")
    page.select_option("#f-model", "tiny")
    page.wait_for_selector(".plan[aria-busy=false]")
    time_row = page.text_content(".plan dt:text('Time') + dd")
    assert said in time_row and f"at {round(speed['tokens_per_second'])} tok/s" in time_row
    estimate = time_row.split(" at ")[0]                 # "≈ 27s" or "≈ 1m 9s (27s–10m 25s)"
    assert estimate.startswith("≈ ")
    assert ("–" in estimate) == (speed["high"] / speed["low"] >= 1.25), time_row


def test_the_workers_panel_lists_each_hosts_live_workers(page, server, shots):
    """Workers (GET /v1/tunelab/workers): the server's own worker, and one on another host (a
    row its heartbeat keeps fresh in the shared database) with its GPU and Ray cluster, each
    host a card; a worker that stops leaves the panel at the next poll."""
    import socket
    import threading

    from sqlalchemy import update

    from tunelab.jobs.store import Store, Worker
    store = Store(server.data_dir)
    remote = "gpu-box-7:4242:abc123"
    res = {"cpus": 32, "memory_bytes": 256 * 2**30, "ray": "10.0.0.5:6379",
           "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 * 2**30}]}
    stop = threading.Event()

    def beat():   # as its Presence thread would, from that host
        first = True
        while not stop.is_set():
            store.worker_beat(remote, resources=res if first else None)
            if first:   # the row names the host it registered from
                with store.session() as s:
                    s.execute(update(Worker).where(Worker.id == remote).values(host="gpu-box-7"))
            first = False
            stop.wait(0.5)
    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        page.goto(f"{server.url}/#/data")
        page.click("nav a[data-route=workers]")
        page.wait_for_selector(f"tr[data-worker='{remote}']")
        # the server's own worker too (it registers within seconds of the server's start)
        page.wait_for_function("document.querySelectorAll('section.card').length === 2")
        assert page.text_content("h1") == "Workers"
        cards = page.locator("section.card")
        titles = [cards.nth(i).locator("h2").text_content() for i in range(cards.count())]
        assert sorted(titles) == sorted([socket.gethostname(), "gpu-box-7"])
        box = page.locator("section.card", has=page.locator("h2", has_text="gpu-box-7"))
        offer = box.locator(".sub").text_content()
        assert "32 CPUs" in offer and "NVIDIA H100 80GB HBM3 (80 GB)" in offer, offer
        assert "Ray 10.0.0.5:6379" in box.text_content()
        row = page.locator(f"tr[data-worker='{remote}']")
        assert row.locator(".pill").text_content() == "idle"
        assert re.search(r"\d(\.\d)? s ago", row.locator("td").nth(3).text_content())
        own = page.locator("section.card", has=page.locator("h2", has_text=socket.gethostname()))
        assert own.locator("tbody tr").count() == 1          # the server's one worker
        tiles = page.text_content(".tiles")
        assert "Hosts2" in tiles.replace(" ", "") and "10.0.0.5:6379" in tiles
        assert_labelled(page)
        assert not page.evaluate(CONTRAST_JS)
        shots(page, "workers")
    finally:
        stop.set()
        beating.join()
    store.worker_gone(remote)                                 # it stopped cleanly
    page.wait_for_selector(f"tr[data-worker='{remote}']", state="detached", timeout=10_000)
    assert page.locator("section.card").count() == 1
