"""The retrieval baselines of a comparison: the base model prompted with what is most similar
to each request, found by BM25 (the `bm25s` library) over the request's user turn.

- retrieved examples: the K training examples whose user turn is nearest go into the prompt as
  shots, like few-shot, but chosen per request;
- retrieved passages (`--corpus docs.jsonl`, one `{"text", optional "title"}` per line): the K
  nearest passages of the user's own documents go into the system prompt (RAG).

A training example whose prompt is also in the test set is never retrievable (the same guard
as few-shot), so a copy of a test example cannot leak its answer into the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluate.tasks import Example, normalize_answer

PASSAGE_WORDS = 160      # a document longer than this is cut into passages of this many words
RAG_INSTRUCTION = "Use the following passages if they help to answer."


def retrieved_examples_name(k: int) -> str:
    return f"base + {k} retrieved examples"


def retrieved_passages_name(k: int) -> str:
    return f"base + {k} retrieved passages"


def prompt_key(messages: list[dict[str, Any]]) -> str:
    """What makes two examples "the same request": their non-system turns, normalised."""
    return normalize_answer(" ".join(m["content"] for m in messages if m["role"] != "system"))


def user_text(example: Example) -> str:
    """The query of a request: its last user turn."""
    users = [m["content"] for m in example.messages if m["role"] == "user"]
    return users[-1] if users else ""


class BM25Index:
    """BM25 over a list of texts (English stop words dropped); `top(queries, k)` -> for each
    query the indices of its k best texts, best first."""

    def __init__(self, texts: list[str]):
        import bm25s
        self._bm25s = bm25s
        self.size = len(texts)
        self.retriever = bm25s.BM25()
        self.retriever.index(self._tokenize(texts), show_progress=False)

    def _tokenize(self, texts: list[str]):
        # a text of stop words only still needs a token, or bm25s drops the row
        return self._bm25s.tokenize([t if t.strip() else "_" for t in texts], stopwords="en",
                                    show_progress=False)

    def top(self, queries: list[str], k: int) -> list[list[int]]:
        k = min(k, self.size)
        if k <= 0 or not queries:
            return [[] for _ in queries]
        docs, _ = self.retriever.retrieve(self._tokenize(queries), k=k, show_progress=False)
        return [[int(i) for i in row] for row in docs]


def retrieve_shots(train: list[Example], test: list[Example], k: int
                   ) -> list[list[Example]]:
    """For each test example, the k training examples nearest to its user turn, the nearest
    last (closest to the question). Training examples whose prompt is in the test set are
    dropped before indexing: they can never be retrieved."""
    test_keys = {prompt_key(e.messages) for e in test}
    pool = [e for e in train if prompt_key(e.messages) not in test_keys]
    if not pool or k <= 0:
        return [[] for _ in test]
    index = BM25Index([user_text(e) for e in pool])
    return [[pool[i] for i in reversed(row)]
            for row in index.top([user_text(e) for e in test], k)]


@dataclass(frozen=True)
class Passage:
    text: str
    title: str | None
    line: int             # the document's line in the corpus file


def read_corpus(path: str | Path) -> list[Passage]:
    """`{"text": ..., "title": optional}` per line -> passages (long documents cut into
    PASSAGE_WORDS-word pieces). Errors name the file, line and field."""
    from tunelab.data.io import iter_jsonl
    path = Path(path)
    if not path.is_file():
        raise TunelabError("file not found", file=path, field="corpus")
    out: list[Passage] = []
    for line, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise TunelabError('each line is one document: {"text": ..., "title": optional}',
                               file=path, line=line)
        text, title = obj.get("text"), obj.get("title")
        if not isinstance(text, str) or not text.strip():
            raise TunelabError('needs a non-empty "text" string', file=path, line=line,
                               field="text")
        if title is not None and not isinstance(title, str):
            raise TunelabError('"title" must be a string', file=path, line=line, field="title")
        words = text.split()
        for start in range(0, len(words), PASSAGE_WORDS):
            out.append(Passage(" ".join(words[start:start + PASSAGE_WORDS]), title, line))
    if not out:
        raise TunelabError("no documents (the file is empty)", file=path, field="corpus")
    return out


def retrieve_passages(passages: list[Passage], test: list[Example], k: int
                      ) -> list[list[Passage]]:
    """For each test example, the k passages nearest to its user turn, best first."""
    index = BM25Index([f"{p.title or ''} {p.text}" for p in passages])
    return [[passages[i] for i in row] for row in index.top([user_text(e) for e in test], k)]


def rag_system(passages: list[Passage], system: str | None = None) -> str:
    """The system prompt of a RAG request: the user's system prompt (if any), then the
    passages."""
    body = "\n\n".join(f"[{i}] {p.title + ': ' if p.title else ''}{p.text}"
                       for i, p in enumerate(passages, 1))
    return "\n\n".join(x for x in (system, RAG_INSTRUCTION, body) if x)
