"""A first-time user's first minute: `tunelab serve` on a machine where the builtin model was
never converted, and chat requests arriving while the server converts it. They wait for the
one conversion (across threads and processes) and all answer; none sees a half-made model."""
from __future__ import annotations

import asyncio

import httpx2 as httpx

from tunelab.jobs.store import Store

from test_server_harness import Server


def test_chat_during_the_first_conversion_of_the_builtin_model(tmp_path):
    token = Store(tmp_path / "data").create_key("alice")[1]
    cache = tmp_path / "empty-cache"          # nothing converted: the start-up converts
    half = cache / "models" / "smollm2-135m-instruct"
    half.mkdir(parents=True)                  # a half-written folder (a copy cut short) ...
    (half / "config.json").write_text("{}")   # ... never counts as converted
    server = Server(tmp_path / "data", "--workers", "0", TUNELAB_CACHE=str(cache))
    headers = {"Authorization": f"Bearer {token}"}

    async def ask(c, i):
        return await c.post("/v1/chat/completions", json={
            "model": "smollm2-135m-instruct", "max_tokens": 3, "temperature": 0,
            "messages": [{"role": "user", "content": f"Say hello {i}"}]})

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=600) as c:
            first = await asyncio.gather(*(ask(c, i) for i in range(4)))
            later = await ask(c, 9)
            return first, later

    try:
        assert not (half / "model.safetensors").exists()
        first, later = asyncio.run(main())
        assert [r.status_code for r in first] == [200] * 4, [r.text for r in first]
        assert later.status_code == 200
        assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in first)
        made = sorted(p.name for p in (cache / "models").iterdir())
        # one converted folder; no temporary folder left behind (the lock file may stay)
        assert [n for n in made if not n.endswith(".lock")] == ["smollm2-135m-instruct"]
        assert (half / "model.safetensors").is_file() and \
            (half / "config.json").read_text() != "{}"
        assert "Traceback" not in server.logs()
    finally:
        server.stop()
