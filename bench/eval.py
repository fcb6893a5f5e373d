"""Speed of `tunelab eval` against one-at-a-time `generate`, on the same examples, in one run.

    python bench/eval.py [--model smollm2-135m-instruct] [--examples 96] [--repeats 3]

The examples are the demo's star-rating reviews (the same prompts the demo scores). The peer is
what an evaluation loop written by hand usually does: for each example, render the prompt with
the chat template and call `model.generate` greedily with room for a generous answer
(max_new_tokens=64), stopping at the end-of-turn token. tunelab batches prompts of similar
length, stops each batch when every row has emitted its end-of-turn token, and caps generation
by what the task needs (a one-digit label here). Both load the same model once; medians of
`--repeats` timed passes are printed, with the ratio, and where tunelab's time goes (prefill vs
decode steps).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch

    from tunelab import models
    from tunelab.data.render import render_prompt
    from tunelab.demo import build_dataset
    from tunelab.evaluate import load_examples, make_task, run_task
    from tunelab.inference import stop_ids
    from tunelab.runtime import set_threads

    threads = set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_dataset(Path(tmp), n=max(300, args.examples * 3))
        examples = load_examples("classification", paths["test"])[:args.examples]
    from tunelab.runtime import torch_dtype
    model, tok = models.load(args.model)                       # fp32, as a hand-written loop
    fast, _ = models.load(args.model, dtype=torch_dtype("auto"))   # as tunelab eval loads it
    task = make_task("classification", examples)
    stops = sorted(stop_ids(model))

    def one_at_a_time(on=examples) -> tuple[float, int]:
        generated = 0
        started = time.perf_counter()
        for e in on:
            ids = torch.tensor([render_prompt(e.messages, tok)])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=64, do_sample=False, eos_token_id=stops,
                                     pad_token_id=tok.pad_token_id)
            generated += out.shape[1] - ids.shape[1]
        return time.perf_counter() - started, generated

    def tunelab_eval(m) -> tuple[float, int, float]:
        started = time.perf_counter()
        res = run_task(m, tok, task, examples, batch_size=args.batch_size)
        return (time.perf_counter() - started, round(res.completion_tokens * res.examples),
                res.metrics["accuracy"])

    one_at_a_time(examples[:2]), tunelab_eval(model), tunelab_eval(fast)   # warm-up
    peer = [one_at_a_time() for _ in range(args.repeats)]
    ours32 = [tunelab_eval(model) for _ in range(args.repeats)]
    ours = [tunelab_eval(fast) for _ in range(args.repeats)]
    peer_s = statistics.median(t for t, _ in peer)
    n = len(examples)
    print(f"model {args.model}, {n} star-rating examples, {threads} threads, "
          f"median of {args.repeats} (machine may be shared: compare within this run)")
    print(f"  one-at-a-time generate, fp32 (max_new_tokens 64): {n / peer_s:6.2f} examples/s  "
          f"({peer_s:.1f} s, {peer[0][1] / n:.1f} generated tokens/example)")
    for name, runs in (("fp32", ours32), (str(fast.dtype).replace("torch.", ""), ours)):
        s = statistics.median(t for t, _, _ in runs)
        print(f"  tunelab eval, {name} (batch {args.batch_size}, capped by the task): "
              f"{n / s:6.2f} examples/s  ({s:.1f} s, {runs[0][1] / n:.1f} generated "
              f"tokens/example, accuracy {runs[0][2]:.1%}): {peer_s / s:.1f}x")

    # where tunelab's time goes: one batch's prefill vs its decode steps
    from tunelab.batching import pad_prompts
    batch = pad_prompts([render_prompt(e.messages, tok) for e in examples[:args.batch_size]],
                        tok.pad_token_id)
    with torch.inference_mode():
        started = time.perf_counter()
        out = model(**batch, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - started
        step_ids = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(step_ids)], dim=1)
        started = time.perf_counter()
        model(input_ids=step_ids, attention_mask=mask, past_key_values=out.past_key_values,
              use_cache=True)
        step = time.perf_counter() - started
    width = batch["input_ids"].shape[1]
    print(f"  one batch of {args.batch_size}: prefill of {width} tokens/row {prefill * 1000:.0f} ms, "
          f"one decode step {step * 1000:.0f} ms")


if __name__ == "__main__":
    main()
