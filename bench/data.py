"""Data preparation speed: tunelab vs TRL on the same conversations, in the same run.

    .venv/bin/python bench/data.py [--n 20000] [--write FILE]

Generates N chat conversations of ~300 tokens (system + user + assistant, varied words),
then measures examples/s of
  - tunelab: render_many (chat template per turn + batched tokenization + assistant-only labels)
  - TRL:     SFTTrainer._prepare_dataset, the dataset preparation SFTTrainer runs (apply the
             chat template, tokenize, assistant-only mask via {% generation %} markers, which
             TRL needs for that mask), timed alone (trainer construction excluded)
and prints the ratio. --write FILE also writes the conversations as JSONL (for timing
`tunelab data validate FILE`). Not a test; no assertions on timings.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("TOKENIZERS_PARALLELISM", None)   # unset: the Rust tokenizer uses every core

WORDS = ("the a product battery screen works great poor quality shipping fast slow price value "
         "would recommend again never broke after week month year customer service helpful "
         "refund sound loud quiet light heavy small large easy hard setup instructions clear "
         "confusing charger cable case fits perfectly disappointed happy love hate okay decent "
         "excellent terrible average color size material plastic metal glass durable fragile "
         "because although however also very quite really not too enough more less best worst").split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."
    return [{"messages": [
        {"role": "system", "content": "You are a helpful assistant that answers product questions."},
        {"role": "user", "content": text(rng.randint(120, 180))},
        {"role": "assistant", "content": text(rng.randint(90, 130))}]} for _ in range(n)]


# ChatML with {% generation %} markers: what TRL's assistant_only_loss requires.
CHATML_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def bench_tunelab(tok, convs) -> tuple[float, int]:
    from tunelab.data.render import render_many
    msgs = [c["messages"] for c in convs]
    t = time.perf_counter()
    rows = []
    for i in range(0, len(msgs), 1024):
        rows += render_many(msgs[i:i + 1024], tok)
    dt = time.perf_counter() - t
    return dt, sum(len(r["input_ids"]) for r in rows)


def bench_trl(tok, convs) -> tuple[float, int]:
    import copy

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl import SFTConfig, SFTTrainer
    tok = copy.deepcopy(tok)
    tok.chat_template = CHATML_GENERATION
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    ds = Dataset.from_list(convs)
    args = SFTConfig(output_dir="/tmp/tunelab-bench-trl", assistant_only_loss=True, use_cpu=True,
                     bf16=False, report_to=[], dataset_num_proc=None, max_length=None,
                     packing=False)
    # Build the trainer on a few rows, then time only its dataset preparation on all of them.
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(convs[:8]),
                         processing_class=tok)
    t = time.perf_counter()
    prepared = trainer._prepare_dataset(ds, tok, args, packing=False, formatting_func=None,
                                        dataset_name="train")
    dt = time.perf_counter() - t
    # TRL 1.x writes the assistant-only mask as labels (-100 outside {% generation %} spans)
    cols = prepared.column_names
    assert "assistant_masks" in cols or "labels" in cols, cols
    if "labels" in cols:
        first = prepared[0]["labels"]
        assert -100 in first and any(x != -100 for x in first), "TRL did not mask the prompt"
    return dt, sum(len(x) for x in prepared["input_ids"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--write", help="also write the conversations as JSONL here")
    a = ap.parse_args()
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    import datasets
    datasets.disable_progress_bars()
    from tunelab.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    convs = conversations(a.n)
    if a.write:
        with open(a.write, "w") as f:
            for c in convs:
                f.write(json.dumps(c) + "\n")
    t_ours, tokens = bench_tunelab(tok, convs)
    t_trl, tokens_trl = bench_trl(tok, convs)
    print(f"{a.n} conversations, ~{tokens // a.n} tokens each (TRL: ~{tokens_trl // a.n})")
    print(f"tunelab render_many : {a.n / t_ours:9.0f} examples/s ({t_ours:.1f} s)")
    print(f"TRL SFTTrainer prep : {a.n / t_trl:9.0f} examples/s ({t_trl:.1f} s)")
    print(f"ratio tunelab/TRL   : {t_trl / t_ours:.2f}x")


if __name__ == "__main__":
    main()
