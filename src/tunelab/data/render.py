"""Render a conversation with the model's own chat template into input_ids and labels.

THIS is the one place where supervision is decided. Labels are -100 everywhere except the
assistant turns' text and the end-of-turn token that closes each turn, so the model learns both
to answer and to stop. Collators only pad; they never decide what is trained.

Why not TRL's `assistant_only_loss`: it needs `{% generation %}` markers, which almost no real
template has. Instead we render incrementally and read the spans off the text:

    prompt_i = template(messages[:i], add_generation_prompt=True)   what the model sees at inference
    upto_i   = template(messages[:i+1])                              the template's answer i
    full     = template(messages)                                    the training row

The trained span of assistant turn i runs from the end of prompt_i to the end of the first
special token after its content (the end-of-turn token: `<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>`, `<|end|>`, `</s>`, ...). Whitespace or an EOS that the template puts after that
token belongs to the scaffolding and is not trained. Two conditions make the mask unambiguous and
are checked for every trained turn, never assumed:

  1. upto_i starts with prompt_i: the answer is rendered after exactly the prompt the model gets
     at inference. Templates that break this (DeepSeek-R1 distills put `<think>\\n` in the
     generation prompt but strip it from rendered answers; Mistral v0.3 puts the system message
     only on the last user turn) are refused with the differing text shown.
  2. full starts with upto_i up to the end of the span: the turn is trained as the template shows
     it when it is the last one. Reasoning templates (Qwen3) break this on purpose: they drop
     earlier turns' reasoning and show the empty `<think></think>` block only on the last turn.
     That raises HistoryRewriteError; `render_examples` then trains such a conversation one turn
     per example (turn i rendered as the last turn of messages[:i+1], earlier answers as context,
     untrained), which is exactly what the model sees when it generates turn i. One row can not
     be right for every turn of such a template, so we make as many rows as trained turns rather
     than train earlier turns in a form the model never produces at inference.

Spans are mapped to tokens through the fast tokenizer's character offsets, so the whole
conversation is tokenized once, exactly as it will be at inference. `render_many` does the
template work per conversation and tokenizes a whole batch in one call into the Rust tokenizer
(which releases the GIL and uses every core); `render` is the one-conversation case of it, and
`start_render` splits it so a caller can template the next batch while this one tokenizes.
"""
from __future__ import annotations

import bisect
import re
import weakref
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tunelab.errors import TunelabError

IGNORE_INDEX = -100


class HistoryRewriteError(TunelabError):
    """The template renders an earlier trained turn differently once later turns follow."""


def _template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    # Only role and content reach the template: extra keys (weight) are ours, not the template's.
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _special_token_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((s for s in specials if s), key=len, reverse=True)  # longest match first


@dataclass
class ChatFormatter:
    """A tokenizer's chat template compiled once, plus what rendering needs from the tokenizer.

    Rendering calls the compiled Jinja template directly with the same variables
    `apply_chat_template` passes (the special tokens), which skips its per-call overhead; a test
    pins that the text is identical for every template in the suite.
    """
    template: str
    compiled: Any
    variables: dict[str, Any]
    specials: list[str]
    tokenizer: Any
    # For the offset-free tokenization path (see _labels_fast): every added token, as a regex
    # and as ids; None when the tokenizer does something that path cannot verify.
    added_re: Any = None
    added_ids: dict[str, int] = field(default_factory=dict)   # added token string -> id
    scaffolds: dict[str, list[int]] = field(default_factory=dict)

    def text(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        msgs = _template_messages(messages)
        try:
            if self.compiled is None:
                return self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
            return self.compiled.render(messages=msgs, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.variables)
        except TunelabError:
            raise
        except Exception as e:  # jinja raises for conversations a template refuses (roles, order)
            raise TunelabError(f"the chat template refused this conversation: {e}",
                               kind="template_refused") from None


# Kept beside the tokenizer, not on it: a compiled template does not survive deepcopy or pickle
# (datasets.map and DataLoader workers copy tokenizers).
_FORMATTERS: "weakref.WeakKeyDictionary[Any, tuple[Any, ChatFormatter]]" = weakref.WeakKeyDictionary()


def formatter(tokenizer) -> ChatFormatter:
    """The tokenizer's ChatFormatter, cached on it and rebuilt when its template or tokens change."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise TunelabError("the tokenizer has no chat template (load it with tunelab.models."
                           "load_tokenizer, which adds ChatML)")
    if not isinstance(template, str):
        template = tokenizer.get_chat_template()
    variables = dict(tokenizer.special_tokens_map)
    key = (template, len(tokenizer), tuple(sorted((k, str(v)) for k, v in variables.items())))
    cached = _FORMATTERS.get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:  # transformers' own compile (same sandbox, extensions and filters as apply_chat_template)
        from transformers.utils.chat_template_utils import _compile_jinja_template
        compiled = _compile_jinja_template(template)
    except Exception:  # a private helper: fall back to the public (slower) path if it moves
        compiled = None
    fmt = ChatFormatter(template, compiled, variables, _special_token_strings(tokenizer), tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    added = getattr(tokenizer, "added_tokens_decoder", {})
    if (backend is not None and hasattr(backend, "encode_batch_fast") and added
            and getattr(backend, "normalizer", None) is None
            and not any(getattr(t, "lstrip", False) or getattr(t, "rstrip", False)
                        or getattr(t, "single_word", False) for t in added.values())):
        strings = sorted({str(t) for t in added.values()}, key=len, reverse=True)
        fmt.added_re = re.compile("|".join(re.escape(x) for x in strings))
        fmt.added_ids = {str(t): i for i, t in added.items()}
    _FORMATTERS[tokenizer] = (key, fmt)
    return fmt


def chat_text(tokenizer, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    return formatter(tokenizer).text(messages, add_generation_prompt=add_generation_prompt)


def _end_of_turn(reply: str, content_end: int, specials: list[str]) -> int | None:
    """End offset (in `reply`) of the first special token after the content, or None.

    Only whitespace may stand between the content and that token: anything else would be text
    the template adds after the answer, and training on it silently is exactly the bug to avoid.
    """
    best = None
    for s in specials:
        pos = reply.find(s, content_end)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, pos + len(s))
    if best is None or reply[content_end:best[0]].strip():
        return None
    return best[1]


def _turn_end(reply: str, content: str, specials: list[str], field: str) -> int:
    """Where the trained span ends in `reply`: just after the end-of-turn token of the answer."""
    def first_closed(needle: str) -> int | None:
        # The first occurrence of the answer that is closed by an end-of-turn token: scaffolding
        # before the answer may contain it too (content "think" inside Qwen3's "<think>").
        start = reply.find(needle)
        while start >= 0:
            end = _end_of_turn(reply, start + len(needle), specials)
            if end is not None:
                return end
            start = reply.find(needle, start + 1)
        return None

    stripped = content.strip()
    if stripped and stripped in reply:
        end = first_closed(stripped)
        if end is None:
            raise TunelabError("the chat template closes assistant turns with no end-of-turn "
                               "token: the model could not learn to stop", field=field,
                               kind="mask_ambiguous")
        return end
    if "</think>" in content:
        # Reasoning templates re-format the think block ("<think>\n...\n</think>\n\n"); the
        # answer after it must still be there, and so must the reasoning, or it is not trained.
        reasoning = content.split("</think>")[0].split("<think>")[-1].strip()
        answer = content.split("</think>")[-1].strip()
        if reasoning and reasoning not in reply:
            raise TunelabError("the chat template drops the reasoning (<think>...</think>) from "
                               "the assistant turn it trains: the model would never learn it",
                               field=field, kind="mask_ambiguous")
        end = first_closed(answer) if answer else None
        if end is not None:
            return end
    raise TunelabError("the chat template altered the assistant content; cannot locate it to "
                       "build the loss mask", field=field, kind="mask_ambiguous")


def _diff(a: str, b: str) -> str:
    """The first place two renderings differ, as two short quoted snippets."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 30)
    return f"{a[lo:i + 30]!r} vs {b[lo:i + 30]!r}"


def assistant_spans(tokenizer, messages: Sequence[dict[str, Any]], *,
                    fmt: ChatFormatter | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans to train on (one per trained turn)."""
    fmt = fmt or formatter(tokenizer)
    full = fmt.text(messages, add_generation_prompt=False)
    spans = []
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        turn = f"messages[{i}]"
        prompt = _generation_prompt(fmt, messages[:i])
        upto = full if i == last else fmt.text(messages[: i + 1], add_generation_prompt=False)
        if not upto.startswith(prompt):
            hint = (" (it adds a think block to the generation prompt that its rendering of the "
                    "answer drops)" if "<think>" in prompt[-40:] else "")
            raise TunelabError(
                "the chat template renders this assistant turn after a different prefix than the "
                f"generation prompt it would answer at inference{hint}: {_diff(prompt, upto)}; "
                "the loss mask would not match inference", field=turn, kind="mask_ambiguous")
        end = len(prompt) + _turn_end(upto[len(prompt):], m["content"], fmt.specials, turn)
        if not full.startswith(upto[:end]):
            raise HistoryRewriteError(
                "the chat template rewrites this assistant turn once later turns follow (e.g. it "
                f"drops reasoning from earlier turns): {_diff(upto[:end], full)}; one row cannot "
                "train it as the model generates it (train one turn per example: "
                "tunelab.data.render_examples)", field=turn)
        spans.append((len(prompt), end))
    return full, spans


def _generation_prompt(fmt: ChatFormatter, history: Sequence[dict[str, Any]]) -> str:
    if history:
        return fmt.text(history, add_generation_prompt=True)
    try:  # a conversation that opens with the assistant: some templates refuse an empty history
        return fmt.text([], add_generation_prompt=True)
    except TunelabError:
        return ""


def _with_source(e: TunelabError, source: str | None) -> TunelabError:
    if not source or e.file is not None:
        return e
    from tunelab.data.conversation import split_source
    file, line = split_source(source)
    return type(e)(e.reason, file=file, line=line, field=e.field, kind=e.kind)


def _labels_from_offsets(ids: list[int], offsets, spans) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    k = 0
    for idx, (start, end) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            break
        # A token is trained when it overlaps the span (a token straddling the start of the
        # answer is still something the model must generate).
        if end > spans[k][0] and start < spans[k][1]:
            labels[idx] = ids[idx]
    return labels


def _labels_from_encoding(enc, spans, text_len: int) -> list[int]:
    """Labels via the Rust encoding's char->token map: two lookups per span, no per-token loop.

    Same rule as _labels_from_offsets (a token is trained when it overlaps a span); a character
    that maps to no token (whitespace some normalizers drop) moves to the nearest one inside.
    """
    ids = enc.ids
    labels = [IGNORE_INDEX] * len(ids)
    for s_start, s_end in spans:
        a = b = None
        for c in range(s_start, min(s_end, text_len)):
            a = enc.char_to_token(c)
            if a is not None:
                break
        for c in range(min(s_end, text_len) - 1, s_start - 1, -1):
            b = enc.char_to_token(c)
            if b is not None:
                break
        if a is not None and b is not None and b >= a:
            labels[a:b + 1] = ids[a:b + 1]
    return labels


def _scaffold_ids(fmt: ChatFormatter, scaffold: str) -> list[list[int]]:
    """Ways the scaffold before an answer can tokenize: alone, and followed by a word (a
    pre-tokenizer may split "\n\n" differently before "Hello" than at the end of a text)."""
    if not scaffold:
        return [[]]
    enc = fmt.tokenizer._tokenizer.encode
    alone = enc(scaffold, add_special_tokens=False).ids
    probed = enc(scaffold + "x", add_special_tokens=False).ids
    options = [alone]
    if probed and enc("x", add_special_tokens=False).ids == probed[-1:] and probed[:-1] != alone:
        options.insert(0, probed[:-1])
    return options


def _labels_fast(fmt: ChatFormatter, text: str, ids: list[int], spans) -> list[int] | None:
    """Labels without character offsets (the tokenizer runs ~30% faster without them).

    Added tokens (<|im_end|>, <|im_start|>, ...) are cut out of the text before anything else
    and are one id each, so the k-th added-token match in the text is the k-th added id. A span
    ends just after such a token (its end-of-turn); it starts after the scaffold that follows
    the last added token before it ("assistant\n"), whose ids are checked against the scaffold
    tokenized alone: equal ids cover exactly that text, so the boundary is exact. Anything that
    does not line up returns None and the caller uses the offsets path instead; a test pins
    that both paths give the same labels for every template in the suite.
    """
    marks, want = [], []
    for m in fmt.added_re.finditer(text):
        marks.append((m.start(), m.end()))
        want.append(fmt.added_ids[m.group()])
    # Find the k-th added id after the (k-1)-th with list.index (C speed, no per-token Python
    # loop), then check by counts that no added id went unmatched.
    pos, at = [], -1
    try:
        for t in want:
            at = ids.index(t, at + 1)
            pos.append(at)
    except ValueError:
        return None
    if any(ids.count(t) != n for t, n in Counter(want).items()):
        return None
    ends = [e for _, e in marks]
    end_index = {e: k for k, e in enumerate(ends)}
    labels = [IGNORE_INDEX] * len(ids)
    for s_start, s_end in spans:
        k_end = end_index.get(s_end)
        if k_end is None:
            return None
        k = bisect.bisect_right(ends, s_start) - 1
        base_tok, base_char = (pos[k] + 1, ends[k]) if k >= 0 else (0, 0)
        scaffold = text[base_char:s_start]
        if len(scaffold) > 256:   # not a role header: let the offsets path handle it
            return None
        options = fmt.scaffolds.get(scaffold)
        if options is None:
            options = _scaffold_ids(fmt, scaffold)
            if len(fmt.scaffolds) < 1024:
                fmt.scaffolds[scaffold] = options
        sc = next((o for o in options if ids[base_tok:base_tok + len(o)] == o), None)
        if sc is None:
            return None
        a, b = base_tok + len(sc), pos[k_end]
        if b < a:
            return None
        labels[a:b + 1] = ids[a:b + 1]
    return labels


def render_many(conversations: Sequence[Sequence[dict[str, Any]]], tokenizer, *,
                max_length: int | None = None, sources: Sequence[str | None] | None = None,
                errors: str = "raise", _fast: bool = True) -> list[dict[str, list[int]] | TunelabError]:
    """`render` for a batch: one {"input_ids", "labels"} per conversation, tokenized in one call.

    errors="raise" raises the first conversation's error (with its source); errors="return" puts
    the TunelabError in that conversation's place instead, for callers that report every problem.
    """
    return start_render(conversations, tokenizer, max_length=max_length, sources=sources,
                        errors=errors, _fast=_fast).result()


def start_render(conversations: Sequence[Sequence[dict[str, Any]]], tokenizer, *,
                 max_length: int | None = None, sources: Sequence[str | None] | None = None,
                 errors: str = "raise", executor: Executor | None = None,
                 _fast: bool = True) -> "PendingRender":
    """`render_many` in two halves: the templates now, the tokenizer in `executor`.

    The Rust tokenizer releases the GIL, so a caller that starts batch k+1's templates (and its
    own reading and checking) while batch k tokenizes keeps both cores busy; `.result()` gives
    render_many's list. Without an executor the tokenizer runs in `.result()`.
    """
    if errors not in ("raise", "return"):
        raise ValueError("errors must be 'raise' or 'return'")
    return PendingRender(conversations, tokenizer, max_length, sources, errors, executor, _fast)


class PendingRender:
    """A batch whose templates are rendered and whose tokenization may still be running."""

    def __init__(self, conversations, tokenizer, max_length, sources, errors, executor, fast):
        self.fmt = fmt = formatter(tokenizer)
        self.tokenizer, self.max_length = tokenizer, max_length
        sources = sources if sources is not None else [None] * len(conversations)
        self.out: list[Any] = [None] * len(conversations)
        self.texts, self.spans_of, self.where = [], [], []
        for n, messages in enumerate(conversations):
            try:
                text, spans = assistant_spans(tokenizer, messages, fmt=fmt)
            except TunelabError as e:
                e = _with_source(e, sources[n])
                if errors == "raise":
                    raise e from None
                self.out[n] = e
                continue
            self.texts.append(text)
            self.spans_of.append(spans)
            self.where.append(n)
        self.backend = getattr(tokenizer, "_tokenizer", None)
        self.encodings: Any = None
        if self.texts and fmt.added_re is not None and fast:
            # add_special_tokens=False: the template already wrote BOS where the model wants
            # it; letting the tokenizer add another is the classic doubled-BOS bug.
            encode = self.backend.encode_batch_fast
            self.encodings = (executor.submit(encode, self.texts, add_special_tokens=False)
                              if executor is not None else
                              partial(encode, self.texts, add_special_tokens=False))

    def result(self) -> list[dict[str, list[int]] | TunelabError]:
        fmt, texts, spans_of = self.fmt, self.texts, self.spans_of
        rows: list[Any] = [None] * len(texts)
        slow = list(range(len(texts)))
        if self.encodings is not None:
            encodings = (self.encodings.result() if isinstance(self.encodings, Future)
                         else self.encodings())
            slow = []
            for i, enc in enumerate(encodings):
                ids = enc.ids
                labels = _labels_fast(fmt, texts[i], ids, spans_of[i])
                if labels is None:
                    slow.append(i)
                else:
                    rows[i] = (ids, labels)
        backend = self.backend
        if slow and backend is not None and hasattr(backend, "encode_batch"):
            encodings = backend.encode_batch([texts[i] for i in slow], add_special_tokens=False)
            for i, enc in zip(slow, encodings):
                rows[i] = (enc.ids, _labels_from_encoding(enc, spans_of[i], len(texts[i])))
        elif slow:
            enc = self.tokenizer([texts[i] for i in slow], add_special_tokens=False,
                                 return_offsets_mapping=True)
            for i, ids, offs in zip(slow, enc["input_ids"], enc["offset_mapping"]):
                rows[i] = (list(ids), _labels_from_offsets(list(ids), offs, spans_of[i]))
        out, max_length = self.out, self.max_length
        for n, (ids, labels) in zip(self.where, rows):
            ids = list(ids)
            if max_length is not None and len(ids) > max_length:
                ids, labels = ids[:max_length], labels[:max_length]
            out[n] = {"input_ids": ids, "labels": labels}
        return out


def render(messages: Sequence[dict[str, Any]], tokenizer, *, max_length: int | None = None,
           source: str | None = None) -> dict[str, list[int]]:
    """Tokenize a conversation: {"input_ids", "labels"} with -100 on every untrained token.

    `source` ("file:line") is put on errors. Sequences longer than max_length are cut on the
    right (what is lost is the validator's business to report).
    """
    return render_many([messages], tokenizer, max_length=max_length, sources=[source])[0]


def per_turn(messages: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """One conversation per trained assistant turn i: messages[:i+1], only turn i trained.

    Earlier answers stay as context with weight 0, so the template renders turn i as the last
    turn, exactly as when the model generates it.
    """
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        out.append([dict(x, weight=0) if x["role"] == "assistant" and j != i else x
                    for j, x in enumerate(messages[: i + 1])])
    return out


def render_examples(conversations: Sequence[Sequence[dict[str, Any]]], tokenizer, *,
                    max_length: int | None = None,
                    sources: Sequence[str | None] | None = None) -> list[dict[str, list[int]]]:
    """Training rows for conversations: one row each, or one row per trained turn for the
    conversations whose template rewrites earlier turns (HistoryRewriteError, e.g. Qwen3's
    reasoning blocks). Any other problem raises with its source."""
    sources = sources if sources is not None else [None] * len(conversations)
    rows = render_many(conversations, tokenizer, max_length=max_length, sources=sources,
                       errors="return")
    out: list[dict[str, list[int]]] = []
    for conv, src, row in zip(conversations, sources, rows):
        if isinstance(row, HistoryRewriteError):
            turns = per_turn(conv)
            out.extend(render_many(turns, tokenizer, max_length=max_length,
                                   sources=[src] * len(turns)))
        elif isinstance(row, TunelabError):
            raise row
        else:
            out.append(row)
    return out


def render_prompt(messages: Sequence[dict[str, Any]], tokenizer) -> list[int]:
    """Token ids of the generation prompt for the next assistant turn (inference path)."""
    text = chat_text(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_token(tokenizer) -> str:
    """The special token the template closes assistant turns with (a stop token for generation)."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    text, spans = assistant_spans(tokenizer, probe)
    start, end = spans[0]
    tail = text[start:end]
    for s in formatter(tokenizer).specials:
        if tail.endswith(s):
            return s
    raise TunelabError("could not find the template's end-of-turn token")
