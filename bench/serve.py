"""Serving speed: tunelab's generation engine against plain transformers and `transformers serve`.

    .venv/bin/python bench/serve.py [--reps 3]
        [--only sequential,peer,engine,http,load,adapters,prefill,vllm,vllm-adapters]

The builtin smollm2-135m-instruct, 8 clients that each ask one question at the same moment for
64 greedy tokens (every answer is longer than that, so each request makes 64 tokens):
  sequential    plain transformers `model.generate`, the same requests answered one at a time
                (fp32 as from_pretrained loads it, and bf16);
  peer          `transformers serve --continuous-batching` (paged attention), started here on a
                free 127.0.0.1 port with the cached smollm2 folder, 8 streaming openai clients
                (--dtype auto, which is fp32 for this folder, and bfloat16);
  engine        tunelab.server.engine.Engine in this process (precision auto: bf16 on CPUs with
                AVX-512 BF16);
  http          `tunelab serve` with the same 8 streaming openai clients;
  load          `tunelab serve` under 200 requests from 50 concurrent clients (32 tokens each):
                errors, tok/s, time to first token and the server's peak RSS;
  adapters      the engine in process: 8 clients on 8 different LoRA fine-tunes (rank 8 on every
                linear layer, random weights) against 8 clients on the base, and the cold-load
                latency of an adapter (first token of its first request, less a warm one's);
  prefill       the engine in process: time to first token of short requests (and the longest
                pause of streams already running) while a 4,000-token prompt is prefilled, with
                --prefill-chunk 0 (the prompt at once) and 256;
  vllm-adapters the same as `adapters`, on vLLM's CPU build with LoRA on (8 slots, rank 8);
  vllm          vLLM's CPU build (`make vllm`) as its own OpenAI server, against `tunelab serve`
                and `tunelab serve --engine vllm`, with the same streaming clients at 8 and 32
                clients (bf16 both).
Prints aggregate generated tokens/s (all completion tokens / wall time from the first request
to the last answer) and time to first token p50/p95 (from the moment all requests were sent,
so queueing counts), medians over --reps repetitions, and ratios against the peers.
Each section runs in its own process: torch work on one thread slows later torch work on another
in the same process (every thread that runs parallel ops keeps its own OpenMP pool; with more
pool threads than cores libgomp stops spinning, measured 1.6x slower steps here), and peak RSS
stays each section's own. Not a test: no assertions. The machine may be shared: quote medians of
a few repetitions and say so.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m-instruct"
MAX_NEW = 64
QUESTIONS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works, step by step.",
    "Describe the city of Paris to a tourist who has never been there.",
    "What are the benefits of regular exercise? Give several examples.",
    "Tell me about the history of the printing press.",
    "How do airplanes stay in the air? Explain it to a child.",
    "Write a poem about the ocean at night.",
    "Give detailed advice to a new programmer who is learning Python.",
]


@dataclass
class Run:
    tokens: int
    seconds: float
    ttfts: list[float]
    errors: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Result:
    name: str
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    @property
    def tok_s(self) -> float:
        return statistics.median(r.tok_s for r in self.runs)

    def ttft(self, q: float) -> float:
        xs = sorted(t for r in self.runs for t in r.ttfts)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def messages(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


# ---- in-process: plain generate and the tunelab engine --------------------------------------


class _FirstToken:
    """A generate() streamer that notes when the first new token comes (put #1 is the prompt)."""

    def __init__(self):
        self.calls, self.at = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.at is None:
            self.at = time.perf_counter()

    def end(self):
        pass


def sequential(dtype_name: str, reps: int) -> Result:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import resolve
    from tunelab.runtime import set_threads
    set_threads()
    folder = resolve(MODEL).path
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = [tok.apply_chat_template(messages(q), add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True) for q in QUESTIONS]
    kw = dict(max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
              pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.inference_mode():
        model.generate(**prompts[0], max_new_tokens=4, do_sample=False)     # warm-up
    res = Result(f"transformers generate, one at a time ({dtype_name})")
    for _ in range(reps):
        start, ttfts, tokens = time.perf_counter(), [], 0
        for p in prompts:
            streamer = _FirstToken()
            with torch.inference_mode():
                out = model.generate(**p, streamer=streamer, **kw)
            tokens += out.shape[1] - p["input_ids"].shape[1]
            ttfts.append(streamer.at - start)
        res.runs.append(Run(tokens, time.perf_counter() - start, ttfts))
        print(f"  {res.name}: {res.runs[-1].tok_s:.1f} tok/s", flush=True)
    return res


async def _engine_once(engine) -> Run:
    from tunelab.server.engine import GenerationRequest
    start = time.perf_counter()

    async def one(q: str) -> tuple[int, float]:
        first, n = None, 0
        async for c in engine.generate(GenerationRequest(MODEL, messages(q), max_new_tokens=MAX_NEW,
                                                         temperature=0)):
            if first is None and c.completion_tokens:
                first = time.perf_counter() - start
            n = c.completion_tokens
        return n, first

    got = await asyncio.gather(*(one(q) for q in QUESTIONS))
    return Run(sum(n for n, _ in got), time.perf_counter() - start, [t for _, t in got])


def engine(reps: int) -> Result:
    from tunelab.server.engine import GenerationRequest
    from tunelab.server.engine.local import Engine

    async def main() -> Result:
        eng = Engine()
        try:
            async for _ in eng.generate(GenerationRequest(MODEL, messages("hi"), max_new_tokens=4,
                                                          temperature=0)):
                pass    # load + warm-up
            res = Result("tunelab engine (in process)")
            for _ in range(reps):
                steps = eng.forward_steps
                res.runs.append(await _engine_once(eng))
                print(f"  {res.name}: {res.runs[-1].tok_s:.1f} tok/s, "
                      f"{eng.forward_steps - steps} forward steps", flush=True)
            res.note = f"dtype {eng.dtype}"
            return res
        finally:
            eng.close()
    return asyncio.run(main())


# ---- over HTTP: transformers serve and tunelab serve -----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll `url` until it answers 200 (transformers serve: /health; its /v1/models scans the
    hub cache and fails when there is none)."""
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(1)
    raise RuntimeError("server did not come up")


async def _http_once(base: str, model: str, n_requests: int, clients: int,
                     max_new: int) -> Run:
    import openai
    async with openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0,
                                  timeout=600) as client:
        return await _http_load(client, model, n_requests, clients, max_new)


async def _http_load(client, model: str, n_requests: int, clients: int, max_new: int) -> Run:
    slots = asyncio.Semaphore(clients)
    start = time.perf_counter()
    errors = 0

    async def one(q: str) -> tuple[int, float | None]:
        nonlocal errors
        async with slots:
            first, n = None, 0
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=messages(q), max_tokens=max_new, temperature=0,
                    stream=True, stream_options={"include_usage": True})
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content and first is None:
                        first = time.perf_counter() - start
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
            except Exception as e:
                errors += 1
                print(f"    request failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            return n, first

    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(n_requests)]
    got = await asyncio.gather(*(one(q) for q in qs))
    return Run(sum(n for n, _ in got), time.perf_counter() - start,
               [t for _, t in got if t is not None], errors)


class PeakRSS(threading.Thread):
    """Samples the RSS of a process and its children every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self):
        import psutil
        proc = psutil.Process(self.pid)
        while not self.done.wait(0.05):
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss
                                                   for c in proc.children(recursive=True))
            except psutil.Error:
                continue
            self.peak = max(self.peak, rss)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def peer(dtype: str, reps: int) -> Result:
    from tunelab.models import resolve
    folder = resolve(MODEL).path
    port = free_port()
    exe = Path(sys.executable).parent / "transformers"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([str(exe), "serve", "--continuous-batching", "--host", "127.0.0.1",
                             "--port", str(port), "--dtype", dtype, folder],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    res = Result(f"transformers serve --continuous-batching (--dtype {dtype})")
    base = f"http://127.0.0.1:{port}/v1"
    try:
        async def main():
            await _wait_ready(f"http://127.0.0.1:{port}/health", proc, 600)
            await _http_once(base, folder, 1, 1, 4)     # warm-up
            for _ in range(reps):
                res.runs.append(await _http_once(base, folder, 8, 8, MAX_NEW))
                print(f"  {res.name}: {res.runs[-1].tok_s:.1f} tok/s "
                      f"({res.runs[-1].errors} errors)", flush=True)
        asyncio.run(main())
    except Exception as e:
        log.seek(0)
        res.note = f"could not run: {e}; log tail: {log.read()[-1500:]}"
        print("  " + res.note, flush=True)
    finally:
        _stop(proc)
    return res


def tunelab_http(reps: int, load: bool) -> list[Result]:
    data = tempfile.mkdtemp(prefix="tunelab-bench-")
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", "--port", "0",
                             "--no-auth", "--workers", "0", "--data-dir", data],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    results = []
    try:
        base = None
        for line in proc.stdout:
            if m := re.search(r"serving (http://\S+)", line):
                base = m.group(1) + "/v1"
                break
        if base is None:
            raise RuntimeError(f"tunelab serve did not start (exit {proc.wait()})")
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        rss = PeakRSS(proc.pid)
        rss.start()

        async def main():
            await _wait_ready(base + "/models", proc, 120)
            await _http_once(base, MODEL, 1, 1, 4)      # loads the model
            res = Result("tunelab serve (HTTP, streaming)")
            for _ in range(reps):
                res.runs.append(await _http_once(base, MODEL, 8, 8, MAX_NEW))
                print(f"  {res.name}: {res.runs[-1].tok_s:.1f} tok/s "
                      f"({res.runs[-1].errors} errors)", flush=True)
            if res.runs:
                results.append(res)
            if load:
                res = Result("tunelab serve: 200 requests, 50 clients, 32 tokens")
                res.runs.append(await _http_once(base, MODEL, 200, 50, 32))
                res.note = (f"errors {res.runs[0].errors}/200, peak server RSS "
                            f"{rss.peak / 2**30:.2f} GiB")
                print(f"  {res.name}: {res.tok_s:.1f} tok/s, {res.note}", flush=True)
                results.append(res)
        asyncio.run(main())
        rss.done.set()
    finally:
        _stop(proc)
        shutil.rmtree(data, ignore_errors=True)
    return results


# ---- many adapters, chunked prefill (the engine in process) ----------------------------------


def _random_adapters(base_folder: str, n: int, root: Path) -> list[str]:
    """n real PEFT folders, rank 8 on every linear layer (tunelab's default targets)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder),
                           LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                      target_modules="all-linear"))
    folders = []
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(std=0.01)
        folders.append(str(root / f"adapter{i}"))
        model.save_pretrained(folders[-1])
    return folders


async def _clients(eng, specs: list[str], questions: list[str], max_new: int = MAX_NEW) -> Run:
    from tunelab.server.engine import GenerationRequest
    start = time.perf_counter()

    async def one(spec: str, q: str) -> tuple[int, float]:
        first, n = None, 0
        async for c in eng.generate(GenerationRequest(spec, messages(q), max_new_tokens=max_new,
                                                      temperature=0)):
            if first is None and c.completion_tokens:
                first = time.perf_counter() - start
            n = c.completion_tokens
        return n, first

    got = await asyncio.gather(*(one(s, q) for s, q in zip(specs, questions)))
    return Run(sum(n for n, _ in got), time.perf_counter() - start, [t for _, t in got])


def adapters(reps: int) -> list[Result]:
    from tunelab.models import resolve
    from tunelab.server.engine.local import Engine
    root = Path(tempfile.mkdtemp(prefix="tunelab-bench-adapters-"))
    base = MODEL
    folders = _random_adapters(resolve(MODEL).path, len(QUESTIONS) + 1, root)
    cold_one = folders.pop()

    async def main() -> list[Result]:
        eng = Engine()
        try:
            await _clients(eng, [base], ["hi"], 4)                  # load + warm-up
            await _clients(eng, folders, QUESTIONS, 4)              # the 8 adapters resident
            on_base, on_adapters = Result("engine: 8 clients on the base"), \
                Result("engine: 8 clients on 8 different LoRA adapters")
            for _ in range(reps):   # interleaved, so drift in the machine's load hits both
                on_base.runs.append(await _clients(eng, [base] * len(QUESTIONS), QUESTIONS))
                on_adapters.runs.append(await _clients(eng, folders, QUESTIONS))
                print(f"  base {on_base.runs[-1].tok_s:.1f} tok/s, 8 adapters "
                      f"{on_adapters.runs[-1].tok_s:.1f} tok/s", flush=True)
            cold = await _clients(eng, [cold_one], [QUESTIONS[0]], 1)
            warm = await _clients(eng, [cold_one], [QUESTIONS[0]], 1)
            on_adapters.note = (f"x{on_adapters.tok_s / on_base.tok_s:.2f} the base's tok/s; "
                                f"an adapter's cold load adds "
                                f"{(cold.ttfts[0] - warm.ttfts[0]) * 1000:.0f} ms to its first "
                                f"token ({cold.ttfts[0] * 1000:.0f} ms cold, "
                                f"{warm.ttfts[0] * 1000:.0f} ms warm)")
            print(f"  {on_adapters.note}", flush=True)
            return [on_base, on_adapters]
        finally:
            eng.close()
            shutil.rmtree(root, ignore_errors=True)
    return asyncio.run(main())


LONG_TOKENS = 4000


def prefill(reps: int) -> list[Result]:
    """Short requests arriving while a 4,000-token prompt is read; 4 streams already running."""
    from tunelab.models import load_tokenizer
    from tunelab.server.engine import GenerationRequest
    from tunelab.server.engine.local import Engine
    tok = load_tokenizer(MODEL)
    words = " ".join(QUESTIONS) + " "
    long_text = words * (LONG_TOKENS // len(tok(words)["input_ids"]) + 1)
    long_text = tok.decode(tok(long_text)["input_ids"][:LONG_TOKENS - 40])

    async def once(eng) -> tuple[Run, float]:
        gaps: list[float] = []

        async def running(q: str) -> None:       # a stream already answering: its pauses
            last = None
            async for c in eng.generate(GenerationRequest(MODEL, messages(q), max_new_tokens=96,
                                                          temperature=0)):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now

        async def long_one() -> None:
            async for _ in eng.generate(GenerationRequest(MODEL, messages(long_text),
                                                          max_new_tokens=4, temperature=0)):
                pass

        async def short_ones() -> Run:
            runs = []
            for q in QUESTIONS:                  # one every 0.2 s while the prompt is read
                runs.append(asyncio.ensure_future(_clients(eng, [MODEL], [q], 8)))
                await asyncio.sleep(0.2)
            done = await asyncio.gather(*runs)
            return Run(sum(r.tokens for r in done), max(r.seconds for r in done),
                       [r.ttfts[0] for r in done])

        streams = [asyncio.ensure_future(running(q)) for q in QUESTIONS[:4]]
        await asyncio.sleep(0.5)
        longer = asyncio.ensure_future(long_one())
        shorts = await short_ones()
        await asyncio.gather(longer, *streams)
        return shorts, max(gaps)

    results = []
    for chunk in (0, 256):
        async def main() -> Result:
            eng = Engine(prefill_chunk=chunk or 1 << 30)
            try:
                await _clients(eng, [MODEL], ["hi"], 4)          # load + warm-up
                res = Result(f"engine, --prefill-chunk {chunk}: short requests during a "
                             f"{LONG_TOKENS}-token prefill")
                stalls = []
                for _ in range(reps):
                    run, stall = await once(eng)
                    res.runs.append(run)
                    stalls.append(stall)
                    print(f"  chunk {chunk}: short TTFT p95 {res.ttft(0.95):.2f} s, "
                          f"longest pause of a running stream {stall:.2f} s", flush=True)
                res.note = f"running streams paused at most {statistics.median(stalls):.2f} s"
                return res
            finally:
                eng.close()
        results.append(asyncio.run(main()))
    return results


# ---- vLLM's CPU engine -----------------------------------------------------------------------


def vllm(reps: int) -> list[Result]:
    from tunelab.models import resolve
    from tunelab.server.engine.vllm import VLLM_MODULE, find_python
    folder = resolve(MODEL).path
    results: list[Result] = []

    def measure(name: str, base: str, model: str, proc) -> None:
        async def main():
            await _http_once(base, model, 1, 1, 4)         # warm-up (and a managed start)
            for clients in (8, 32):
                res = Result(f"{name}, {clients} clients")
                for _ in range(reps):
                    res.runs.append(await _http_once(base, model, clients, clients, MAX_NEW))
                    print(f"  {res.name}: {res.runs[-1].tok_s:.1f} tok/s "
                          f"({res.runs[-1].errors} errors)", flush=True)
                results.append(res)
        asyncio.run(main())

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([find_python(), "-m", VLLM_MODULE, "--model", folder,
                             "--served-model-name", MODEL, "--host", "127.0.0.1", "--port",
                             str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
                             "--generation-config", "vllm"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2",
                                 "VLLM_NO_USAGE_STATS": "1"})
    try:
        asyncio.run(_wait_ready(f"http://127.0.0.1:{port}/health", proc, 900))
        measure("vLLM CPU (its own server)", f"http://127.0.0.1:{port}/v1", MODEL, proc)
    except Exception as e:
        log.seek(0)
        results.append(Result("vLLM CPU", note=f"could not run: {e}; {log.read()[-1500:]}"))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait()
    for name, extra in (("tunelab serve", []), ("tunelab serve --engine vllm",
                                                ["--engine", "vllm", "--precision", "bf16"])):
        data = tempfile.mkdtemp(prefix="tunelab-bench-")
        proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", "--port", "0",
                                 "--no-auth", "--workers", "0", "--data-dir", data, *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        try:
            base = None
            for line in proc.stdout:
                if m := re.search(r"serving (http://\S+)", line):
                    base = m.group(1) + "/v1"
                    break
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            asyncio.run(_wait_ready(base + "/models", proc, 120))
            measure(name, base, MODEL, proc)
        finally:
            _stop(proc)
            shutil.rmtree(data, ignore_errors=True)
    return results


def vllm_adapters(reps: int) -> list[Result]:
    """The peer's side of `adapters`: vLLM's CPU build with 8 LoRA slots of rank 8, 8 clients
    on the base against 8 clients on 8 different adapters (the same random adapters)."""
    import urllib.request

    from tunelab.models import resolve
    from tunelab.server.engine.vllm import VLLM_MODULE, find_python
    folder = resolve(MODEL).path
    root = Path(tempfile.mkdtemp(prefix="tunelab-bench-vllm-adapters-"))
    folders = _random_adapters(folder, len(QUESTIONS), root)
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([find_python(), "-m", VLLM_MODULE, "--model", folder,
                             "--served-model-name", MODEL, "--host", "127.0.0.1", "--port",
                             str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
                             "--generation-config", "vllm", "--enable-lora", "--max-loras",
                             str(len(folders)), "--max-lora-rank", "8"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2",
                                 "VLLM_NO_USAGE_STATS": "1",
                                 "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        asyncio.run(_wait_ready(url + "/health", proc, 900))
        names = []
        for i, f in enumerate(folders):
            req = urllib.request.Request(url + "/v1/load_lora_adapter", method="POST",
                                         data=json.dumps({"lora_name": f"a{i}",
                                                          "lora_path": f}).encode(),
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=300).read()
            names.append(f"a{i}")

        async def main():
            import openai
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none",
                                          max_retries=0, timeout=600) as client:
                on_base = Result("vLLM CPU (LoRA on): 8 clients on the base")
                on_adapters = Result("vLLM CPU (LoRA on): 8 clients on 8 adapters")
                for name in [MODEL, *names]:                      # warm-up, every adapter
                    await _http_load(client, name, 1, 1, 2)
                for _ in range(reps):
                    on_base.runs.append(await _http_load(client, MODEL, 8, 8, MAX_NEW))
                    on_adapters.runs.append(await _many(client, names))
                    print(f"  vLLM base {on_base.runs[-1].tok_s:.1f} tok/s, 8 adapters "
                          f"{on_adapters.runs[-1].tok_s:.1f}", flush=True)
                on_adapters.note = f"x{on_adapters.tok_s / on_base.tok_s:.2f} the base's tok/s"
                results.extend([on_base, on_adapters])
        asyncio.run(main())
    except Exception as e:
        log.seek(0)
        results.append(Result("vLLM CPU adapters", note=f"could not run: {e}; "
                              f"{log.read()[-1500:]}"))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)
    return results


async def _many(client, models: list[str]) -> Run:
    """One streaming request per model, all at once (each its own adapter)."""
    runs = await asyncio.gather(*(_http_load(client, m, 1, 1, MAX_NEW) for m in models))
    return Run(sum(r.tokens for r in runs), max(r.seconds for r in runs),
               [t for r in runs for t in r.ttfts], sum(r.errors for r in runs))


# ---- report -----------------------------------------------------------------------------------


def report(results: list[Result]) -> None:
    print(f"\n{'':58} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9}")
    for r in results:
        if r.runs:
            print(f"{r.name:58} {r.tok_s:7.1f} {r.ttft(0.5):8.2f}s {r.ttft(0.95):8.2f}s  {r.note}")
        else:
            print(f"{r.name:58} {'-':>7}  {r.note[:300]}")
    # ratios against the peers, at equal client counts ("engine:" rows carry their own note)
    ours = [r for r in results if r.runs and r.name.startswith("tunelab")
            and "200 requests" not in r.name]
    peers = [r for r in results if r.runs and not r.name.startswith(("tunelab", "engine"))]
    clients = lambda name: (re.findall(r", (\d+) clients$", name) or [None])[0]   # noqa: E731
    pairs = [(o, p) for o in ours for p in peers if clients(o.name) == clients(p.name)]
    if pairs:
        print()
    for o, p in pairs:
        print(f"{o.name} / {p.name}: tok/s x{o.tok_s / p.tok_s:.2f}, "
              f"TTFT p50 x{p.ttft(0.5) / o.ttft(0.5):.2f} faster")


SECTIONS = {
    "sequential": lambda reps: [sequential("fp32", reps), sequential("bf16", reps)],
    "peer": lambda reps: [peer("auto", reps), peer("bfloat16", reps)],
    "engine": lambda reps: [engine(reps)],
    "http": lambda reps: tunelab_http(reps, load=False),
    "load": lambda reps: tunelab_http(0, load=True),
    "adapters": adapters,
    "prefill": prefill,
    "vllm": vllm,
    "vllm-adapters": vllm_adapters,
}


def run_section(name: str, reps: int) -> list[Result]:
    """One section in a fresh process (see the module docstring for why)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.run([sys.executable, __file__, "--section", name, "--reps", str(reps),
                               "--out", out.name])
        if proc.returncode != 0:
            return [Result(name, note=f"failed with exit code {proc.returncode}")]
        return [Result(r["name"], [Run(**x) for x in r["runs"]], r["note"])
                for r in json.loads(Path(out.name).read_text())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        results = SECTIONS[args.section](args.reps)
        Path(args.out).write_text(json.dumps([asdict(r) for r in results]))
        return
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start", flush=True)
    results = [r for name in args.only.split(",") for r in run_section(name, args.reps)]
    print(f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    report(results)


if __name__ == "__main__":
    main()
