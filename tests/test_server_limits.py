"""Bodies are bounded before they are read whole: a 30 MB chat body (declared, or chunked
with no length) is refused with a 413 at once and the server's memory stays flat; text past
the prompt limit is refused before tokenising; uploads keep their own, larger limit."""
from __future__ import annotations

import json
import time

import httpx2 as httpx
import psutil
import pytest

from tunelab.jobs.store import Store

from test_server_harness import Server

BODY_MB = 2


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("limits")
    token = Store(data).create_key("alice")[1]
    server = Server(data, "--workers", "0", "--model", f"tiny={tiny_model_dir}",
                    "--max-body-mb", str(BODY_MB), "--max-upload-mb", "10")
    server.token = token
    yield server
    assert server.proc.poll() is None, "the server died"
    server.stop()


def huge_chat() -> bytes:
    """30 messages of 1,000,000 characters: what the schema allows, 30 MB."""
    return json.dumps({"model": "tiny", "max_tokens": 2, "messages": [
        {"role": "user", "content": "x" * 1_000_000} for _ in range(30)]}).encode()


def rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def test_a_huge_chat_body_is_refused_at_once_and_memory_stays_flat(srv):
    headers = {"Authorization": f"Bearer {srv.token}", "Content-Type": "application/json"}
    body = huge_chat()
    with httpx.Client(base_url=srv.url, headers=headers, timeout=120) as h:
        assert h.post("/v1/chat/completions", json={    # the model loaded: memory at rest
            "model": "tiny", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        before = rss(srv)
        for attempt in ("declared", "chunked"):
            start = time.perf_counter()
            content = body if attempt == "declared" else \
                (body[i:i + 2**20] for i in range(0, len(body), 2**20))   # no Content-Length
            r = h.post("/v1/chat/completions", content=content)
            took = time.perf_counter() - start
            assert r.status_code == 413, (attempt, r.text)
            err = r.json()["error"]
            assert err["code"] == "request_too_large" and "--max-body-mb" in err["message"]
            assert took < 10, (attempt, took)
            print(f"\n30 MB chat body, {attempt}: 413 in {took:.2f} s")
        grew_mb = (rss(srv) - before) / 2**20
        print(f"server RSS {before / 2**20:.0f} MB before, grew {grew_mb:+.0f} MB")
        assert grew_mb < 100, grew_mb
        r = h.post("/v1/chat/completions", json={
            "model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "ok?"}]})
        assert r.status_code == 200


def test_text_past_the_prompt_limit_is_refused_before_tokenising(srv):
    headers = {"Authorization": f"Bearer {srv.token}"}
    with httpx.Client(base_url=srv.url, headers=headers, timeout=120) as h:
        start = time.perf_counter()
        r = h.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": [
            {"role": "user", "content": "word " * 100_000}] * 3})  # 1.5M characters, 1.4 MB
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "1,500,000 characters" in r.json()["error"]["message"]
        assert time.perf_counter() - start < 5


def test_uploads_keep_their_own_limit(srv):
    rows = "".join(json.dumps({"messages": [
        {"role": "user", "content": f"question {i} " + "y" * 3000},
        {"role": "assistant", "content": "answer"}]}) + "\n" for i in range(1000)).encode()
    assert BODY_MB * 2**20 < len(rows) < 10 * 2**20
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"},
                      timeout=120) as h:
        r = h.post("/v1/files", files={"file": ("big.jsonl", rows)},
                   data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        assert r.json()["bytes"] == len(rows)
