"""Graded answers: a grader model, reached through any OpenAI-compatible endpoint, scores
free-form answers (the `judge` task), and compares two answers to the same request (pairwise).

Rubric mode: the grader reads the request, the reference answer and one answer, and replies
"Score: N" (1 to 5) and "Reason: ...". The rubric is the system message: tunelab's own
(DEFAULT_RUBRIC) or the user's text; the reply format and two short demonstrations of it are
always added, because a small grader follows a format it was shown and not one it was told
(SmolLM2-135M, asked for JSON, answered the question itself; shown two "Score: N" replies, it
replied in that form).

Pairwise mode: the grader reads two answers, A and B, and replies "Winner: A", "B" or "tie".
Each pair is asked in both orders (which order is asked first is drawn from a seeded random
generator); an answer wins only when both orders name it, any disagreement is a tie, and a
reply that names no winner leaves the pair ungraded. Asking both orders cancels the grader's
bias for a position, and makes the comparison symmetric: swapping the two answers swaps the
result (a test pins it).

The win rate counts a tie as half a win: (wins + ties / 2) / graded pairs, with a 95% Wilson
score interval over the graded pairs. A tie's half makes the outcomes less spread than a
coin's, so the Wilson interval (exact in form for win/lose outcomes) is conservative here.

A reply that cannot be parsed, or a request that failed, is never fatal: the answer is
counted as ungraded, with the grader's reply or the error kept for the reader.

Nothing here imports the tasks or the runner: it grades strings, so the `judge` task
(tasks.Judge) and compare's pairwise step both sit on top of it.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

SCALE = (1, 5)
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
Z95 = 1.959963984540054        # the 97.5% quantile of the standard normal

DEFAULT_RUBRIC = (
    "You grade an answer to a request. Compare it with the reference answer, which is one good "
    "answer; another answer can be as good if it is correct and does what the request asks. "
    "5: correct and complete, as good as the reference. 4: correct with a small omission or "
    "flaw. 3: partly correct. 2: mostly wrong, or does not do what was asked. 1: wrong, empty "
    "or useless.")
GRADE_FORMAT = "Reply in exactly this form:\nScore: <1-5>\nReason: <one sentence>"
PAIR_RUBRIC = (
    "You compare two answers, A and B, to the same request and say which is better: more "
    "correct first, then more complete and more to the point. The reference answer is one good "
    "answer. Say tie when they are equally good or equally bad.")
PAIR_FORMAT = "Reply in exactly this form:\nWinner: <A, B or tie>\nReason: <one sentence>"


def conversation_text(messages: Sequence[dict[str, Any]]) -> str:
    """What the grader reads as the request: a lone user turn as it is; a conversation (a
    system prompt, earlier turns) one "role: text" paragraph per message."""
    if len(messages) == 1:
        return str(messages[0].get("content") or "")
    return "\n\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)


def _grade_request(prompt: str, reference: str, answer: str) -> str:
    return f"Request:\n{prompt}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}"


def _pair_request(prompt: str, reference: str, a: str, b: str) -> str:
    return (f"Request:\n{prompt}\n\nReference answer:\n{reference}\n\nAnswer A:\n{a}\n\n"
            f"Answer B:\n{b}")


# demonstrations of the reply format (a user turn and the grader's reply), one good and one bad
_GRADE_DEMOS = [
    (_grade_request("What is the capital of France?", "Paris", "Paris is the capital."),
     "Score: 5\nReason: It names Paris, as the reference does."),
    (_grade_request("What is 2 + 2?", "4", "5"),
     "Score: 1\nReason: 5 is wrong; the answer is 4."),
]
_PAIR_DEMOS = [
    (_pair_request("What is 2 + 2?", "4", "4", "four"),
     "Winner: tie\nReason: Both say 4."),
    (_pair_request("What is the capital of France?", "Paris", "Lyon", "Paris"),
     "Winner: B\nReason: B names Paris; A is wrong."),
]


@dataclass(frozen=True)
class JudgeConfig:
    """Which grader, and how it is asked. `url`: the endpoint's base URL (".../v1"); None is the
    openai client's default (OPENAI_BASE_URL, else OpenAI's API). The key is `api_key` when
    given (the HTTP API passes the request's own), else the environment variable `key_env`
    (None: no variable is read, as for a request to the HTTP API)."""
    model: str = DEFAULT_MODEL
    url: str | None = None
    key_env: str | None = DEFAULT_KEY_ENV
    api_key: str | None = field(default=None, repr=False)
    rubric: str | None = None            # the rubric's text; None: DEFAULT_RUBRIC
    rubric_source: str | None = None     # where the rubric came from (a file), for the report
    pairwise: bool = False
    seed: int = 0
    concurrency: int = 4
    max_tokens: int = 200
    timeout_s: float = 300.0

    def __post_init__(self):
        if not self.model or not self.model.strip():
            raise TunelabError("the grader model is empty", field="judge_model")
        if self.concurrency < 1:
            raise TunelabError("the grader's concurrency is at least 1",
                               field="judge_concurrency")
        if self.rubric is not None and not self.rubric.strip():
            raise TunelabError("the rubric is empty", field="judge_rubric")

    def describe(self) -> dict[str, Any]:
        """What a report says about the grader (never its key)."""
        return {"model": self.model, "url": self.url or "(the openai client's default)",
                "rubric": "tunelab's default" if self.rubric is None else
                (self.rubric_source or "given in the request"),
                "scale": list(SCALE), "pairwise": self.pairwise, "seed": self.seed}


def read_rubric(path: str | Path) -> str:
    """A rubric file: plain text, the grader's instructions (criteria for scores 1 to 5)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TunelabError("file not found", file=p, field="judge_rubric") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TunelabError(f"cannot read the rubric: {e}", file=p, field="judge_rubric") from None
    if not text.strip():
        raise TunelabError("the rubric file is empty", file=p, field="judge_rubric")
    return text.strip()


# -- parsing the grader's replies -------------------------------------------------------------

@dataclass(frozen=True)
class Grade:
    score: float | None        # on SCALE; None when the reply held no usable score
    reason: str | None
    problem: str | None = None  # why there is no score

    @property
    def normalized(self) -> float | None:
        lo, hi = SCALE
        return None if self.score is None else (self.score - lo) / (hi - lo)


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_SCORE_WORDS = r"(?:score|grade|rating|mark)"
_NUM = r"(-?\d+(?:\.\d+)?)"


def _json_objects(text: str) -> list[dict]:
    """Every {...} in the text that parses as a JSON object (innermost braces first)."""
    out = []
    for m in re.finditer(r"\{[^{}]*\}", text):
        try:
            value = json.loads(m.group(0))
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append({str(k).lower(): v for k, v in value.items()})
    return out


def _reason_in(text: str) -> str | None:
    m = re.search(r"(?:reason|explanation|justification|because)\s*[:=\-]\s*(.+)", text,
                  re.IGNORECASE | re.DOTALL)
    return m.group(1).strip()[:1000] if m else None


def parse_grade(reply: str | None) -> Grade:
    """The score (1 to 5) and reason in a grader's reply. Read, in order: a JSON object with
    score/grade/rating; "Score: N" (also "Grade - N", "rating = N"); "N/5" or "N out of 5"; a
    reply that is only a number. A number outside 1-5, or none, is no score."""
    text = _FENCE.sub("", (reply or "").strip())
    if not text:
        return Grade(None, None, "empty reply")
    lo, hi = SCALE
    found: float | None = None
    reason: str | None = None
    for obj in _json_objects(text):
        for key in ("score", "grade", "rating"):
            if key in obj:
                try:
                    found = float(obj[key])
                except (TypeError, ValueError):
                    continue
                r = obj.get("reason") or obj.get("explanation") or obj.get("justification")
                reason = str(r).strip()[:1000] if r else None
                break
        if found is not None:
            break
    if found is None:
        for pattern in (rf"\b{_SCORE_WORDS}\b\s*(?:of|is)?\s*[:=\-]?\s*\**\s*{_NUM}",
                        rf"(?<![\d.]){_NUM}\s*(?:/|out of)\s*{hi}\b",
                        rf"^\s*{_NUM}\s*[.!]?\s*$"):
            m = re.search(pattern, text, re.IGNORECASE | re.MULTILINE)
            if m:
                found = float(m.group(1))
                break
    if reason is None:
        reason = _reason_in(text)
    if found is None:
        return Grade(None, reason or text[:1000], "no score in the reply")
    if math.isnan(found) or not lo <= found <= hi:
        return Grade(None, reason or text[:1000], f"score {found:g} is outside {lo}-{hi}")
    return Grade(found, reason)


@dataclass(frozen=True)
class Choice:
    winner: str | None        # "A", "B" or "tie"; None when the reply named none
    reason: str | None
    problem: str | None = None


def parse_choice(reply: str | None) -> Choice:
    """Which answer a pairwise reply prefers: a JSON object with winner/better/choice;
    "Winner: A" (or B, tie); "[[A]]"; "Answer B is better"; a reply that is only A, B or tie.
    A bare "A" inside a sentence is an article, not a choice, and is not read."""
    text = _FENCE.sub("", (reply or "").strip())
    if not text:
        return Choice(None, None, "empty reply")

    def norm(v: Any) -> str | None:
        s = re.sub(r"[^a-z]", "", str(v).lower().replace("answer", ""))
        return {"a": "A", "b": "B", "tie": "tie", "draw": "tie", "equal": "tie",
                "both": "tie", "neither": "tie"}.get(s)

    winner = None
    reason = None
    for obj in _json_objects(text):
        for key in ("winner", "better", "choice", "preferred"):
            if key in obj and norm(obj[key]):
                winner = norm(obj[key])
                r = obj.get("reason") or obj.get("explanation")
                reason = str(r).strip()[:1000] if r else None
                break
        if winner:
            break
    if winner is None:
        patterns = (r"\b(?:winner|better|choice|verdict)\b\s*(?:is)?\s*[:=\-]?\s*\**\s*"
                    r"(?:answer\s+)?\[*\s*(A|B|tie|draw)\b",
                    r"\[\[\s*(A|B|C|tie)\s*\]\]",
                    r"\banswer\s+(A|B)\s+is\s+(?:better|the better|preferred|best)",
                    r"^\s*(?:answer\s+)?(A|B|tie|draw)\s*[.!]?\s*$")
        for pattern in patterns:
            m = re.search(pattern, text, re.IGNORECASE | re.MULTILINE)
            if m:
                # [[C]] is MT-Bench's tie
                winner = "tie" if m.group(1).upper() == "C" else norm(m.group(1))
                break
    if reason is None:
        reason = _reason_in(text)
    if winner is None:
        return Choice(None, reason or text[:1000], "no winner in the reply")
    return Choice(winner, reason)


# -- statistics --------------------------------------------------------------------------------

def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion (`successes` may hold halves: ties)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def win_rate(outcomes: Sequence[str]) -> dict[str, Any]:
    """Outcomes ("a" won, "b" won, "tie", "ungraded") -> how often a beat b: wins, losses,
    ties, ungraded, the win rate over graded pairs (a tie counts half) and its 95% Wilson
    interval."""
    wins, losses = outcomes.count("a"), outcomes.count("b")
    ties, ungraded = outcomes.count("tie"), outcomes.count("ungraded")
    n = wins + losses + ties
    rate = (wins + ties / 2) / n if n else None
    low, high = wilson_interval(wins + ties / 2, n) if n else (None, None)
    return {"wins": wins, "losses": losses, "ties": ties, "ungraded": ungraded, "graded": n,
            "win_rate": rate, "ci_low": low, "ci_high": high,
            "ci": "95% Wilson score interval over graded pairs; a tie counts half a win"}


# -- the grader --------------------------------------------------------------------------------

class Grader:
    """One grader endpoint: the official openai client, greedy (temperature 0, a fixed seed)."""

    def __init__(self, config: JudgeConfig):
        import openai
        self.config = config
        key = config.api_key or (os.environ.get(config.key_env) if config.key_env else None)
        if not key:
            if config.url is None:
                raise TunelabError(f"the grader needs an API key: {self.key_hint}, or give "
                                   "--judge-url for a server without keys",
                                   field="judge_key_env")
            key = "unused"      # a local server without keys; a 401 says otherwise
        self.client = openai.OpenAI(base_url=config.url, api_key=key, max_retries=2,
                                    timeout=config.timeout_s)
        self.system = (config.rubric or DEFAULT_RUBRIC).strip() + "\n\n" + GRADE_FORMAT
        self.pair_system = PAIR_RUBRIC + "\n\n" + PAIR_FORMAT

    @property
    def key_hint(self) -> str:
        if self.config.key_env is None:
            return "give judge.api_key"
        return (f"set ${self.config.key_env} (or name another variable with "
                "--judge-key-env)")

    def _messages(self, system: str, demos, request: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system}]
        for user, reply in demos:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return msgs + [{"role": "user", "content": request}]

    def ask(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        r = self.client.chat.completions.create(
            model=self.config.model, messages=messages, temperature=0, seed=self.config.seed,
            max_tokens=max_tokens or self.config.max_tokens)
        return (r.choices[0].message.content or "") if r.choices else ""

    def check(self) -> None:
        """One short request before anything is generated: a wrong URL, key or model is said
        now, naming the option, not after an hour of answers."""
        import openai
        where = self.config.url or "the openai client's default endpoint"
        try:
            self.ask([{"role": "user", "content": "Reply with OK."}], max_tokens=1)
        except openai.AuthenticationError as e:
            raise TunelabError(f"the grader at {where} refused the key "
                               f"({self.key_hint}): {_status_message(e)}",
                               field="judge_key_env") from None
        except openai.NotFoundError as e:
            raise TunelabError(f"the grader at {where} has no model '{self.config.model}' (or "
                               f"no chat completions there): {_status_message(e)}",
                               field="judge_model") from None
        except openai.APIStatusError as e:
            raise TunelabError(f"the grader at {where} answered {e.status_code}: "
                               f"{_status_message(e)}", field="judge_model") from None
        except openai.APIConnectionError as e:
            raise TunelabError(f"cannot reach the grader at {where}: {e}",
                               field="judge_url") from None

    def grade(self, prompt: str, reference: str, answer: str) -> dict[str, Any]:
        """One answer's grade, as a predictions row's fields: score (0-1, None ungraded),
        grade (1-5), reason, the grader's reply, and why it is ungraded when it is."""
        try:
            reply = self.ask(self._messages(self.system, _GRADE_DEMOS,
                                            _grade_request(prompt, reference, answer)))
        except Exception as e:      # one failed request must not lose the other grades
            return {"score": None, "grade": None, "reason": None, "grader_reply": None,
                    "ungraded": True, "grade_error": _error_text(e)}
        g = parse_grade(reply)
        out = {"score": g.normalized, "grade": g.score, "reason": g.reason,
               "grader_reply": reply[:2000], "ungraded": g.score is None}
        if g.problem:
            out["grade_error"] = g.problem
        return out

    def grade_many(self, items: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
        """Grades of (prompt, reference, answer) items, `concurrency` requests at a time."""
        return _pool_map(lambda it: self.grade(*it), items, self.config.concurrency)

    def choose(self, prompt: str, reference: str, a: str, b: str) -> dict[str, Any]:
        """One order of a pairwise question: which of A and B the grader prefers."""
        try:
            reply = self.ask(self._messages(self.pair_system, _PAIR_DEMOS,
                                            _pair_request(prompt, reference, a, b)))
        except Exception as e:
            return {"choice": None, "reason": None, "reply": None, "error": _error_text(e)}
        c = parse_choice(reply)
        out = {"choice": c.winner, "reason": c.reason, "reply": reply[:2000]}
        if c.problem:
            out["error"] = c.problem
        return out

    def pairwise(self, items: Sequence[tuple[str, str, str, str]],
                 progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """(prompt, reference, answer a, answer b) items -> each pair's outcome ("a", "b",
        "tie" or "ungraded") and both orders' replies. Swapping a and b swaps every outcome:
        the same two questions are asked either way."""
        rng = random.Random(self.config.seed)
        flips = [rng.random() < 0.5 for _ in items]
        questions = []
        for (prompt, ref, a, b), flip in zip(items, flips):
            # "ab": a is shown as A; which order is asked first is the seeded draw
            orders = ["ba", "ab"] if flip else ["ab", "ba"]
            questions += [(prompt, ref, a, b, order) for order in orders]

        def ask(q):
            prompt, ref, a, b, order = q
            first, second = (a, b) if order == "ab" else (b, a)
            got = self.choose(prompt, ref, first, second)
            return {"order": order, "winner": order_winner(order, got["choice"]), **got}

        answers = _pool_map(ask, questions, self.config.concurrency, progress)
        return [{"outcome": combine([x["winner"] for x in answers[2 * i:2 * i + 2]]),
                 "asked": answers[2 * i:2 * i + 2]} for i in range(len(items))]


def order_winner(order: str, choice: str | None) -> str | None:
    """Which answer a reply chose: `order` "ab" showed a as A, "ba" showed b as A; `choice` is
    "A", "B", "tie" or None."""
    return {"A": order[0], "B": order[1], "tie": "tie"}.get(choice or "")


def combine(winners: Sequence[str | None]) -> str:
    """A pair's outcome from the winner each order named ("a", "b", "tie"; None: the reply
    named none): a win only when both orders name the same answer; any disagreement is a tie;
    a reply without a winner leaves the pair ungraded."""
    if any(w is None for w in winners):
        return "ungraded"
    return winners[0] if all(w == winners[0] for w in winners) else "tie"


def swap_outcome(outcome: str) -> str:
    return {"a": "b", "b": "a"}.get(outcome, outcome)


def _pool_map(fn, items, concurrency: int, progress: Callable[[int], None] | None = None
              ) -> list:
    """fn over items, `concurrency` at a time, results in order. `progress(1)` is called in
    this thread after each result; if it raises (a cancelled job), requests not yet sent are
    dropped and the error goes on."""
    items = list(items)
    if concurrency <= 1 or len(items) <= 1:
        out = []
        for it in items:
            out.append(fn(it))
            if progress:
                progress(1)
        return out
    pool = ThreadPoolExecutor(max_workers=min(concurrency, len(items)))
    try:
        out = []
        for result in pool.map(fn, items):
            out.append(result)
            if progress:
                progress(1)
        return out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _status_message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(getattr(e, "message", e))


def _error_text(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    return f"{type(e).__name__}{f' {status}' if status else ''}: {_status_message(e)}"[:500]
