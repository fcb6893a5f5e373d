"""Render a conversation with the model's own chat template into input_ids and labels.

THIS is the one place where supervision is decided. Labels are -100 everywhere except the
assistant turns' text and the end-of-turn token that closes each turn, so the model learns both
to answer and to stop. Collators only pad; they never decide what is trained.

Why not TRL's `assistant_only_loss`: it needs `{% generation %}` markers, which almost no real
template has. Instead we render incrementally and read the spans off the text:

    prompt_i = template(messages[:i], add_generation_prompt=True)
    upto_i   = template(messages[:i+1])
    full     = template(messages)

The assistant turn i is `upto_i[len(prompt_i):]`; it is unambiguous when prompt_i is a prefix of
upto_i and upto_i is a prefix of full. When a template breaks that (it rewrites earlier turns
once later ones exist), we raise instead of guessing a mask. The trained span runs from the end
of the generation prompt to the end of the first special token after the content: the
end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, ...). Whitespace the
template puts after that token belongs to the next turn's scaffolding and is not trained.

Spans are mapped to tokens through the fast tokenizer's offsets, so the whole conversation is
tokenized once, exactly as it will be at inference.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunelab.errors import TunelabError

IGNORE_INDEX = -100


def _template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    # Only role and content reach the template: extra keys (weight) are ours, not the template's.
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_text(tokenizer, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TunelabError("the tokenizer has no chat template (load it with tunelab.models."
                           "load_tokenizer, which adds ChatML)")
    try:
        return tokenizer.apply_chat_template(_template_messages(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except TunelabError:
        raise
    except Exception as e:  # jinja raises for conversations a template refuses (roles, order)
        raise TunelabError(f"the chat template refused this conversation: {e}") from None


def _special_token_strings(tokenizer) -> list[str]:
    # Cached on the tokenizer, keyed on what changes when special tokens are added or set.
    key = (len(tokenizer), tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token)
    cached = getattr(tokenizer, "_tunelab_special_strings", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    specials = set(tokenizer.all_special_tokens)
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    found = sorted((s for s in specials if s), key=len, reverse=True)  # longest match first
    try:
        tokenizer._tunelab_special_strings = (key, found)
    except AttributeError:
        pass
    return found


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


def _generation_prompt(tokenizer, history: Sequence[dict[str, Any]]) -> str:
    if history:
        return chat_text(tokenizer, history, add_generation_prompt=True)
    try:  # a conversation that opens with the assistant: some templates refuse an empty history
        return chat_text(tokenizer, [], add_generation_prompt=True)
    except TunelabError:
        return ""


def assistant_spans(tokenizer, messages: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans to train on (one per trained turn)."""
    full = chat_text(tokenizer, messages, add_generation_prompt=False)
    specials = _special_token_strings(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        turn = f"messages[{i}]"
        prompt = _generation_prompt(tokenizer, messages[:i])
        upto = chat_text(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not upto.startswith(prompt):
            raise TunelabError(
                "the chat template renders this assistant turn differently from the generation "
                "prompt it would answer at inference; the loss mask would be ambiguous", field=turn)
        if not full.startswith(upto):
            raise TunelabError(
                "the chat template rewrites this assistant turn once later turns follow (e.g. it "
                "drops reasoning from earlier turns); the loss mask would be ambiguous", field=turn)
        reply = upto[len(prompt):]
        content = m["content"].strip()
        pos = reply.find(content)
        if pos < 0:
            raise TunelabError("the chat template altered the assistant content; cannot locate "
                               "it to build the loss mask", field=turn)
        end = _end_of_turn(reply, pos + len(content), specials)
        if end is None:
            raise TunelabError("the chat template closes assistant turns with no end-of-turn "
                               "token: the model could not learn to stop", field=turn)
        spans.append((len(prompt), len(prompt) + end))
    return full, spans


def render(messages: Sequence[dict[str, Any]], tokenizer, *, max_length: int | None = None,
           source: str | None = None) -> dict[str, list[int]]:
    """Tokenize a conversation: {"input_ids", "labels"} with -100 on every untrained token.

    `source` ("file:line") is put on errors. Sequences longer than max_length are cut on the
    right (what is lost is the validator's business to report).
    """
    try:
        text, spans = assistant_spans(tokenizer, messages)
    except TunelabError as e:
        if source and e.file is None:
            file, _, line = source.rpartition(":")
            raise TunelabError(e.reason, file=file, line=int(line) if line.isdigit() else None,
                               field=e.field) from None
        raise
    # add_special_tokens=False: the template already wrote BOS where the model wants it;
    # letting the tokenizer add another is the classic doubled-BOS bug.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    k = 0
    for idx, (start, end) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        if k == len(spans):
            break
        s_start, s_end = spans[k]
        # A token is trained when it overlaps the span (a token straddling the start of the
        # answer is still something the model must generate).
        if end > s_start and start < s_end:
            labels[idx] = input_ids[idx]
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


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
    for s in _special_token_strings(tokenizer):
        if tail.endswith(s):
            return s
    raise TunelabError("could not find the template's end-of-turn token")
