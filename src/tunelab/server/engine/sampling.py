"""Choosing each row's next token, and turning a row's tokens into streamed text."""
from __future__ import annotations

# Below this a temperature is greedy: logits / 1e-300 overflow to inf and softmax gives NaN.
MIN_TEMPERATURE = 1e-4


def choose(logits, seqs) -> list[int | Exception]:
    """The next token of every row (logits: (rows, vocab) float32 on the CPU). A row whose
    sampling fails gets its exception instead of a token: it fails alone, the batch goes on."""
    tokens: list[int | Exception] = list(logits.argmax(-1).tolist())
    for i, s in enumerate(seqs):
        if s.temperature >= MIN_TEMPERATURE:
            try:
                tokens[i] = sample_row(logits[i], s.temperature, s.top_p, s.generator)
            except Exception as e:   # NaN logits, a broken generator: this request only
                tokens[i] = e
    return tokens


def sample_row(logits, temperature: float, top_p: float, generator) -> int:
    import torch
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        return int(torch.multinomial(probs, 1, generator=generator))
    # Nucleus: the most likely tokens whose mass reaches top_p. The most likely one always
    # stays: a top_p like 1e-300 is 0 in float32, which would otherwise zero every token.
    p, order = probs.sort(descending=True)
    drop = (p.cumsum(0) - p) >= top_p
    drop[0] = False
    p[drop] = 0
    return int(order[torch.multinomial(p, 1, generator=generator)])


class TextStream:
    """Incremental detokenization: decode the whole completion each time and emit the new
    suffix, so merged and multi-byte tokens come out right. An incomplete trailing character
    (U+FFFD) and a tail that may be the start of a stop string are held back."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """(new text, whether a stop string ended it)."""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - max(map(len, self.stop)) + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = max(min(hits), self.sent)
                new, self.sent = text[self.sent:cut], cut
                return new, True
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            hold = max((k for s in self.stop for k in range(1, min(len(s), end - self.sent + 1))
                        if text.endswith(s[:k], 0, end)), default=0)
            end -= hold
        new, self.sent = text[self.sent:end], max(self.sent, end)
        return new, False
