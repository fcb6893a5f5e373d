"""Training speed and memory: TRL's SFTTrainer defaults vs tunelab's defaults, in one run.

    .venv/bin/python bench/train.py [--models tiny,smollm2] [--examples 48] [--seed 0]

On the same model and the same mixed-length chat data (~30 to ~1000 tokens per conversation),
for one epoch (the same trained tokens), each in its own process (so peak RSS is its own):
  (a) trl      TRL SFTTrainer with its defaults, changed only to run on CPU (use_cpu=True), to
               train one epoch, and, on a CPU without native bf16, to fp32 (bf16=False); the
               data is given in TRL's conversational prompt/completion form, so TRL trains on
               the completion only, like tunelab (its default for "messages" data would train
               on every token, which is not the same work);
  (b) tunelab  tunelab's defaults (LoRA; epochs set to 1);
  (c) tunelab-full  tunelab's defaults with method: full (the same method as TRL's default);
  (d) plain    the reference for speed: a plain hand-written loop (weights and AdamW states in
               the precision this CPU runs natively: bf16 with AVX-512 BF16 or AMX, else fp32;
               every token of the same data in 8 x 256-token rows, full logits), what the
               hardware does without a framework; its valid loss is not comparable (it trains
               on every token, prompts included);
  (e) plain-heap  (only when asked for: --runners ...,plain-heap) the same loop under the
               allocator settings tunelab trains with (tunelab.runtime.training_allocator).
  (f) trl-fast  (only when asked for) TRL as in (a) but without gradient checkpointing, which
               TRL turns on by default (memory for speed): the fastest TRL full fine-tuning here;
  (g) trl-lora  (only when asked for) TRL as in (a) with a PEFT LoRA of tunelab's defaults (r 16,
               alpha 32, no dropout, every linear layer, lr 2e-4): the same method as (b).
  (h) tunelab-qlora, tunelab-dora  (only when asked for) tunelab's defaults with that method.
tunelab's runs save their checkpoints inside the timed window (its defaults); TRL's save none.
Prints trained tokens/s, total non-padding tokens/s, peak RSS, validation loss (tunelab's
test_loss on each saved model: one metric for all), the ratios against (a), and the model FLOP
utilisation of (c) against the matmul peak measured here, now, in that native precision.
Not a test: no assertions.
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import random
import resource
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ---------------------------------------------------------------------------------------------
# data: k product reviews in, one sentiment label per review out: the answer grows with the
# prompt, and lengths spread from ~30 to ~1000 tokens.


def make_data(folder: Path, n: int, seed: int) -> dict[str, Path]:
    from tunelab.data.generators.reviews import generate_reviews
    from tunelab.data.io import write_jsonl
    rng = random.Random(seed)
    pool = generate_reviews(n * 30, seed=seed)
    rows = []
    for i in range(n):
        k = max(1, round(math.exp(rng.uniform(0, math.log(25)))))  # log-uniform 1..25 reviews
        reviews = rng.sample(pool, k)
        numbered = "\n".join(f"{j + 1}. {r.text}" for j, r in enumerate(reviews))
        rows.append({"messages": [
            {"role": "system", "content": "You label reviews."},
            {"role": "user", "content": f"Label each review as positive or negative, one per "
                                        f"line.\n\n{numbered}"},
            {"role": "assistant", "content": "\n".join(f"{j + 1}. {r.sentiment}"
                                                       for j, r in enumerate(reviews))}]})
    n_val = max(4, n // 6)
    paths = {"train": folder / "train.jsonl", "val": folder / "val.jsonl"}
    write_jsonl(paths["train"], rows[n_val:])
    write_jsonl(paths["val"], rows[:n_val])
    return paths


# ---------------------------------------------------------------------------------------------
# the workers (run in a child process each)


class Timer:
    """Wall time of trainer.train() proper: from the first to the last step."""

    @staticmethod
    def callback():
        from transformers import TrainerCallback

        class _T(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):
                self.seconds = time.perf_counter() - self.t0
                self.tokens = int(state.num_input_tokens_seen or 0)
        return _T()


def worker_trl(model_dir: str, data: dict, out: str, variant: str = "") -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    def as_prompt_completion(path):
        rows = [json.loads(line) for line in open(path)]
        return datasets.Dataset.from_list([{"prompt": r["messages"][:-1],
                                            "completion": r["messages"][-1:]} for r in rows])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    timer = Timer.callback()
    from tunelab.runtime import cpu_has_bf16
    # TRL turns bf16 autocast on by default; on a CPU without native bf16 (AVX2 only) every
    # matmul would then run emulated, ~50x slower than fp32: nobody would keep that, so the
    # peer runs in fp32 there, its other defaults unchanged
    changed = {"fast": {"gradient_checkpointing": False},
               "lora": {"learning_rate": 2e-4}}.get(variant, {})
    args = SFTConfig(output_dir=out, use_cpu=True, num_train_epochs=1, report_to="none",
                     bf16=cpu_has_bf16(),
                     include_num_input_tokens_seen="non_padding", save_strategy="no", **changed)
    peft_config = None
    if variant == "lora":
        from peft import LoraConfig
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=as_prompt_completion(data["train"]),
                         processing_class=tok, callbacks=[timer], peft_config=peft_config)
    trained = sum(sum(1 for x in lab if x != -100) for lab in trainer.train_dataset["labels"])
    trainer.train()
    trainer.save_model(out + "/model")
    tok.save_pretrained(out + "/model")
    return {"seconds": timer.seconds, "tokens": timer.tokens, "trained_tokens": trained,
            "model_dir": out + "/model", "params": sum(p.numel() for p in model.parameters())}


def worker_tunelab(model_dir: str, data: dict, out: str, method: str) -> dict:
    import tunelab
    timer = Timer.callback()
    res = tunelab.train({"model": model_dir, "train_file": data["train"], "output_dir": out,
                         "method": method, "epochs": 1}, quiet=True, callbacks=[timer])
    return {"seconds": timer.seconds, "tokens": timer.tokens,
            "trained_tokens": res.trained_tokens, "model_dir": str(res.model_dir),
            "params": res.extra["total_parameters"]}


def worker_plain(model_dir: str, data: dict, out: str) -> dict:
    """The reference: a plain hand-written loop, what the hardware does with no framework.
    Weights and AdamW states in the native precision (no master copies), every token of the
    training data once, cut into 8 x 256-token rows (no padding, no masking), full logits,
    loss on every token."""
    import torch
    from tunelab import models
    from tunelab.runtime import torch_dtype
    from tunelab.data.conversation import read_conversations
    from tunelab.data.render import render_examples
    model, tok = models.load(model_dir)
    model.to(torch_dtype("auto")).train()
    rows = render_examples([c.messages for c in read_conversations(data["train"])], tok,
                           max_length=1024)
    flat = torch.tensor([t for r in rows for t in r["input_ids"]])
    flat = flat[:len(flat) // 256 * 256].view(-1, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    t0 = time.perf_counter()
    for i in range(0, len(flat), 8):
        ids = flat[i:i + 8]
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    model.save_pretrained(out + "/model")
    tok.save_pretrained(out + "/model")
    return {"seconds": seconds, "tokens": flat.numel(), "trained_tokens": flat.numel(),
            "model_dir": out + "/model", "params": sum(p.numel() for p in model.parameters())}


def valid_loss(model_dir: str, val_file: str) -> float:
    from tunelab import models
    from tunelab.data.conversation import read_conversations
    from tunelab.config import DEFAULT_MAX_LENGTH
    from tunelab.evaluate import loss_metrics
    model, tok = models.load(model_dir)
    return loss_metrics(model, tok, read_conversations(val_file), batch_size=4,
                        max_length=DEFAULT_MAX_LENGTH)["loss"]


def run_worker(name: str, model_dir: str, data: dict, out: str) -> None:
    from tunelab.runtime import set_threads
    set_threads()
    if name.startswith("trl"):
        r = worker_trl(model_dir, data, out, name.removeprefix("trl").removeprefix("-"))
    elif name == "plain":
        r = worker_plain(model_dir, data, out)
    elif name == "plain-heap":
        # the reference loop with the allocator settings tunelab trains under, to show what
        # they give a loop with no framework (and that tunelab's ratio is not only them)
        from tunelab.runtime import training_allocator
        with training_allocator():
            r = worker_plain(model_dir, data, out)
    else:
        r = worker_tunelab(model_dir, data, out,
                           name.removeprefix("tunelab").removeprefix("-") or "lora")
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before eval
    r["valid_loss"] = valid_loss(r["model_dir"], data["val"])
    print("RESULT " + json.dumps(r), flush=True)


# ---------------------------------------------------------------------------------------------
# the parent


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 7) -> float:
    """GFLOP/s of a square matmul on this machine, now (median of reps)."""
    import torch
    from tunelab.runtime import cpu_has_bf16, set_threads
    set_threads()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if dtype == torch.bfloat16 and not cpu_has_bf16():
        n = 512    # emulated (~0.6 GFLOP/s on AVX2): the full size would take minutes
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def tiny_model(folder: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from tunelab.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runners", default="trl,tunelab,tunelab-full,plain")
    ap.add_argument("--worker")
    ap.add_argument("--model-dir")
    ap.add_argument("--data")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        run_worker(a.worker, a.model_dir, json.loads(a.data), a.out)
        return

    from tunelab.models import resolve
    work = Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
    # the runs' models and checkpoints, 2-3 GB an invocation: gone when the bench ends
    atexit.register(shutil.rmtree, work, True)
    from tunelab.runtime import resolve_precision
    native = resolve_precision("auto")
    peaks = {d: matmul_peak(d) for d in ("fp32", "bf16")}
    print(f"matmul peak here, now: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} "
          f"GFLOP/s ({os.cpu_count()} cores); native precision: {native}")
    data = {k: str(v) for k, v in make_data(work / "data", a.examples, a.seed).items()}
    from tunelab.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    lengths = sorted(len(tok.apply_chat_template(json.loads(line)["messages"], tokenize=True)
                         ["input_ids"]) for line in open(data["train"]))
    print(f"data: {len(lengths)} train conversations, tokens min {lengths[0]} median "
          f"{lengths[len(lengths) // 2]} max {lengths[-1]}; 1 epoch each")
    for model_name in a.models.split(","):
        model_dir = tiny_model(work / "tiny") if model_name == "tiny" else \
            resolve("smollm2-135m-instruct").path
        results = {}
        for runner in a.runners.split(","):
            out = str(work / f"{model_name}-{runner}")
            proc = subprocess.run([sys.executable, __file__, "--worker", runner, "--model-dir",
                                   model_dir, "--data", json.dumps(data), "--out", out],
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{runner} failed:\n{proc.stderr[-3000:]}")
                continue
            results[runner] = json.loads(line[-1][7:])
        report(model_name, results, native, peaks[native])


def report(model_name: str, results: dict, native: str, peak: float) -> None:
    print(f"\n== {model_name} ==")
    print(f"{'runner':14} {'trained tok/s':>14} {'total tok/s':>12} {'peak RSS MB':>12} "
          f"{'valid loss':>11} {'seconds':>8}")
    for name, r in results.items():
        r["trained_tps"] = r["trained_tokens"] / r["seconds"]
        r["total_tps"] = r["tokens"] / r["seconds"]
        print(f"{name:14} {r['trained_tps']:>14.1f} {r['total_tps']:>12.1f} "
              f"{r['peak_rss_mb']:>12.0f} {r['valid_loss']:>11.4f} {r['seconds']:>8.1f}")
    base = results.get("trl")
    if base:
        for name, r in results.items():
            if name == "trl":
                continue
            print(f"{name} / trl: total tok/s x{r['total_tps'] / base['total_tps']:.2f}, "
                  f"trained tok/s x{r['trained_tps'] / base['trained_tps']:.2f}, peak RSS "
                  f"x{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}, valid loss "
                  f"{100 * (r['valid_loss'] / base['valid_loss'] - 1):+.1f}%")
    # each of tunelab's runs against TRL's same method, where that peer ran
    for name, peer in (("tunelab", "trl-lora"), ("tunelab-full", "trl-fast")):
        if name in results and peer in results:
            r, p = results[name], results[peer]
            print(f"{name} / {peer}: total tok/s x{r['total_tps'] / p['total_tps']:.2f}, peak "
                  f"RSS x{r['peak_rss_mb'] / p['peak_rss_mb']:.2f}, valid loss "
                  f"{100 * (r['valid_loss'] / p['valid_loss'] - 1):+.1f}%")
    for ref in ("plain", "plain-heap"):
        if ref not in results:
            continue
        for name in ("tunelab", "tunelab-full"):
            if name in results:
                print(f"{name} / {ref} ({native}): total tok/s "
                      f"x{results[name]['total_tps'] / results[ref]['total_tps']:.2f}")
    full = results.get("tunelab-full")
    if full:
        achieved = 6 * full["params"] * full["total_tps"] / 1e9
        print(f"tunelab-full model FLOP utilisation: 6 x {full['params'] / 1e6:.1f}M params x "
              f"{full['total_tps']:.0f} tok/s = {achieved:.0f} GFLOP/s = "
              f"{100 * achieved / peak:.0f}% of the {native} matmul peak")


if __name__ == "__main__":
    main()
