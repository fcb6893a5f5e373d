"""Training speed on a GPU: tunelab against TRL's SFTTrainer, its defaults and its own speed
options, on the same model and data, one prepared run that fits in ~10 minutes of GPU time.

    .venv/bin/python bench/gpu.py                    # on a CUDA machine
    .venv/bin/python bench/gpu.py --tiny --steps 3   # the same code path on CPU, in a minute

Models: a ~1.1B-parameter Llama (SmolLM2's tokenizer, random weights: throughput does not
depend on the values, and nothing is downloaded) and the builtin SmolLM2-135M (or, as
`smollm2-135m`, its shape with random weights: what bench/gpu_device.py runs). Data: the
mixed-length chat conversations of bench/train.py. Each runner trains --steps optimizer steps
in its own process (so peak memory is its own):
  trl          SFTTrainer with its defaults (bf16 on a GPU), prompt/completion data; TRL 1.16
               computes the loss in chunks through its own fused LM head in every setting;
  trl-fast     SFTTrainer with padding-free packing (packing_strategy="bfd") and, on CUDA
               with liger-kernel installed, use_liger_kernel=True: Liger's layer kernels
               (RMSNorm, SwiGLU, RoPE; TRL turns Liger's own fused cross-entropy off).
               Checked on CPU (2026-12-08, triton 3.9 installed beside it): liger-kernel
               0.8.5 binds those three into transformers 5.23's Llama, PEFT-wrapped too;
               the Triton kernels themselves run on CUDA only;
  tunelab      tunelab's defaults (LoRA), and tunelab-full (method: full);
  tunelab-qlora  LoRA on a 4-bit base (bitsandbytes: on CUDA, or its CPU backend).
Prints non-padding tokens/s, peak memory (GPU: torch.cuda.max_memory_allocated; CPU: RSS),
and the model FLOP utilisation (6 x parameters x tokens/s) against the bf16 matmul peak
measured on the same device at the start, with ratios against `trl`. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

RUNNERS = ("trl", "trl-fast", "tunelab", "tunelab-full", "tunelab-qlora")
SIZES = {   # hidden, intermediate, layers, heads, kv heads
    "llama-1b": (2048, 5632, 22, 32, 4),        # TinyLlama-1.1B's shape
    "smollm2-135m": (576, 1536, 30, 9, 3),      # SmolLM2-135M's, where its weights are not
    # installed (a lent GPU machine: its 270 MB do not travel; the bundle holds its tokenizer)
    "tiny": (128, 256, 2, 4, 2),
}


def device_peak() -> tuple[str, float]:
    """The device and its bf16 matmul GFLOP/s, measured now (median of 7)."""
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if dev == "cuda" else 1024
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    times = []
    for i in range(9):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return dev, 2 * n ** 3 / statistics.median(times) / 1e9


def random_llama(folder: Path, size: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models import load_tokenizer
    tok = load_tokenizer(os.environ.get("TUNELAB_SMOLLM2_TOKENIZER") or "smollm2-135m-instruct")
    hidden, inter, layers, heads, kv = SIZES[size]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


# ---- the workers (each in its own process) --------------------------------------------------


def _timer():
    from train import Timer
    return Timer.callback()


def run_trl(model_dir: str, data: dict, out: str, steps: int, fast: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    rows = [json.loads(line) for line in open(data["train"])]
    ds = datasets.Dataset.from_list([{"prompt": r["messages"][:-1],
                                      "completion": r["messages"][-1:]} for r in rows])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cuda = torch.cuda.is_available()
    extra = {}
    if fast:   # TRL's padding-free path: best-fit packing, sequences kept apart
        extra.update(packing=True, packing_strategy="bfd")
        import importlib.util
        if cuda and importlib.util.find_spec("liger_kernel"):   # Triton kernels: CUDA only
            extra["use_liger_kernel"] = True
    timer = _timer()
    args = SFTConfig(output_dir=out, use_cpu=not cuda, bf16=cuda, max_steps=steps,
                     report_to="none", include_num_input_tokens_seen="non_padding",
                     save_strategy="no", logging_steps=max(1, steps), **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[timer])
    trainer.train()
    return {"seconds": timer.seconds, "tokens": timer.tokens,
            "params": sum(p.numel() for p in model.parameters()),
            "options": sorted(extra)}


def run_tunelab(model_dir: str, data: dict, out: str, steps: int, method: str) -> dict:
    import tunelab
    timer = _timer()
    res = tunelab.train({"model": model_dir, "train_file": data["train"], "output_dir": out,
                         "method": method, "max_steps": steps, "save_merged": False,
                         "load_best_at_end": False}, quiet=True, callbacks=[timer])
    return {"seconds": timer.seconds, "tokens": timer.tokens,
            "params": res.extra["total_parameters"], "options": [method]}


def worker(name: str, model_dir: str, data: dict, out: str, steps: int) -> None:
    import torch

    from tunelab.runtime import set_threads
    set_threads()
    if name.startswith("trl"):
        r = run_trl(model_dir, data, out, steps, fast=name == "trl-fast")
    else:
        method = {"tunelab": "lora", "tunelab-full": "full", "tunelab-qlora": "qlora"}[name]
        r = run_tunelab(model_dir, data, out, steps, method)
    if torch.cuda.is_available():
        r["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        r["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(r), flush=True)


# ---- the parent -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama-1b,smollm2")
    ap.add_argument("--runners", default=",".join(RUNNERS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--examples", type=int, default=160)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead (CPU check)")
    ap.add_argument("--results", help="where to write the results (JSON)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.model_dir, json.loads(a.data), a.out, a.steps)
        return

    import torch

    from train import make_data
    from tunelab.models import resolve
    dev, peak = device_peak()
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; bf16 matmul peak measured now: {peak:.0f} GFLOP/s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="tunelab-gpu-bench-"))
    data = {k: str(v) for k, v in make_data(work / "data", a.examples, 0).items()}
    models = ["tiny"] if a.tiny else a.models.split(",")
    out = Path(a.results) if a.results else \
        work / "gpu-results.json" if a.tiny else Path(__file__).with_name("gpu-results.json")
    report = {}

    def save():
        out.write_text(json.dumps({"device": name, "bf16_peak_gflops": peak, "steps": a.steps,
                                   "results": report}, indent=1))
    for model in models:
        model_dir = resolve("smollm2-135m-instruct").path if model == "smollm2" else \
            random_llama(work / model, model)
        results = report[model] = {}
        for runner in a.runners.split(","):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--worker", runner, "--model-dir",
                                   model_dir, "--data", json.dumps(data), "--out",
                                   str(work / f"{model}-{runner}"), "--steps", str(a.steps)],
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                results[runner] = {"failed": proc.stderr[-1500:]}
            else:
                results[runner] = json.loads(line[-1][7:])
            print(f"  {model} {runner}: {time.perf_counter() - start:.0f} s", flush=True)
            save()      # after every runner: a run cut short by a time limit keeps what it had
        show(model, results, peak)
        save()
    print(f"\nwrote {out}")


def show(model: str, results: dict, peak: float) -> None:
    print(f"\n== {model} ==")
    print(f"{'runner':15} {'tok/s':>9} {'peak MB':>9} {'MFU':>6}  options")
    for name, r in results.items():
        if "tokens" not in r:
            print(f"{name:15} {'-':>9}  failed: {r['failed'][-300:]}")
            continue
        r["tps"] = r["tokens"] / r["seconds"]
        r["mfu"] = 6 * r["params"] * r["tps"] / 1e9 / peak
        print(f"{name:15} {r['tps']:9.0f} {r['peak_mb']:9.0f} {100 * r['mfu']:5.1f}%  "
              f"{', '.join(r['options'])}")
    base = results.get("trl", {})
    if "tps" in base:
        for name, r in results.items():
            if name != "trl" and "tps" in r:
                print(f"{name} / trl: tok/s x{r['tps'] / base['tps']:.2f}, peak memory "
                      f"x{r['peak_mb'] / base['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
