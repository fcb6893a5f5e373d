"""Training quality at matched schedules: tunelab vs TRL's SFTTrainer, same method, same data
in the same amount, same optimizer settings, >= 200 optimizer steps; the validation loss of
each saved model, measured the same way.

    .venv/bin/python bench/train_match.py [--steps 200] [--batch 4] [--method full]
        [--task stars|write] [--seeds 42,1,2] [--same-order] [--fp32]

The data, `steps x batch` training examples seen once, 150 held out; two tasks on the same
generated reviews:
- `stars` (the demo's, tunelab.demo): a review in, its star rating out. The answer is one digit
  and the end-of-turn token, the loss near zero after 200 steps and carried by a few borderline
  reviews: which of them flip follows the trajectory, so one run's loss moves up to 2x.
- `write`: "Write a 4-star review of a laptop." in, the review out (~26 tokens). The loss is
  spread over every token of 150 reviews and settles near the generator's own entropy: a
  measure of the same training that a few examples cannot swing.

Both runs: AdamW, learning rate 2e-5 (full; 2e-4 LoRA r16 on the same modules), linear decay, no
warmup, no weight decay, gradient clipping at 1.0, the loss on the completion only, each in the
precision it picks on this CPU by default (TRL: fp32 weights under bf16 autocast where bf16 is
native; tunelab: bf16 weights with fp32 masters, stochastically rounded). What differs is the
implementation: data order (each shuffles with its own sampler; with --same-order both keep the
train file's order, shuffled once by the seed), loss normalisation, the chunked head and loss,
flat forwards, the precision scheme. This says whether tunelab's speed costs quality;
bench/train.py says how fast. Not a test: no assertions.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

LR = {"full": 2e-5, "lora": 2e-4}


def write_conversation(review) -> dict:
    article = "an" if review.product[0] in "aeiou" else "a"
    return {"messages": [
        {"role": "user", "content": f"Write a {review.stars}-star review of {article} "
                                    f"{review.product}."},
        {"role": "assistant", "content": review.text}]}


def make_data(folder: Path, task: str, n_train: int, order_seed: int | None) -> dict[str, str]:
    """The training examples (the same ones whatever the seed), shuffled by `order_seed` when
    both runners keep the file's order."""
    import random

    from tunelab.data.io import write_jsonl
    from tunelab.demo import stars_conversation
    from tunelab.data.generators.reviews import generate_reviews
    reviews = generate_reviews(n_train + 150, seed=1)
    rows = [stars_conversation(r.text, r.stars) if task == "stars" else write_conversation(r)
            for r in reviews]
    folder.mkdir(parents=True, exist_ok=True)
    train = rows[:n_train]
    if order_seed is not None:
        random.Random(order_seed).shuffle(train)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "val.jsonl", rows[n_train:])
    return {"train": str(folder / "train.jsonl"), "val": str(folder / "val.jsonl")}


def worker(name: str, model_dir: str, data: dict, out: str, method: str, batch: int,
           seed: int, same_order: bool, fp32: bool, tunelab_options: dict) -> dict:
    import time

    from train import Timer, valid_loss
    from tunelab.runtime import cpu_has_bf16, set_threads
    set_threads()
    timer = Timer.callback()
    lora = dict(r=16, alpha=32, dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj"])
    t0 = time.perf_counter()
    if name == "tunelab":
        import tunelab
        cfg = {"model": model_dir, "train_file": data["train"], "output_dir": out,
               "method": method, "epochs": 1, "batch_size": batch, "micro_batch_size": batch,
               "learning_rate": LR[method], "lr_scheduler": "linear", "warmup_ratio": 0.0,
               "weight_decay": 0.0, "max_grad_norm": 1.0, "max_length": 512,
               "seed": seed, **({"shuffle": False} if same_order else {}),
               **({"precision": "fp32"} if fp32 else {}),
               **tunelab_options}
        if method == "lora":
            cfg["lora"] = lora
        res = tunelab.train(cfg, quiet=True, callbacks=[timer])
        model_out, steps = str(res.model_dir), res.steps
    else:
        import datasets
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer
        rows = [json.loads(line) for line in open(data["train"])]
        ds = datasets.Dataset.from_list([{"prompt": r["messages"][:-1],
                                          "completion": r["messages"][-1:]} for r in rows])
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        peft_config = None
        if method == "lora":
            from peft import LoraConfig
            peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                     target_modules=lora["target_modules"], task_type="CAUSAL_LM")
        args = SFTConfig(output_dir=out, use_cpu=True, num_train_epochs=1, report_to="none",
                         bf16=cpu_has_bf16() and not fp32, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=1, learning_rate=LR[method],
                         lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, max_length=512, save_strategy="no", seed=seed,
                         train_sampling_strategy="sequential" if same_order else "random",
                         include_num_input_tokens_seen="non_padding")
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             callbacks=[timer], peft_config=peft_config)
        out_state = trainer.train()
        steps = out_state.global_step
        final = trainer.model.merge_and_unload() if method == "lora" else trainer.model
        final.save_pretrained(out + "/model")
        tok.save_pretrained(out + "/model")
        model_out = out + "/model"
    wall = time.perf_counter() - t0
    return {"steps": steps, "seconds": timer.seconds, "wall": wall, "tokens": timer.tokens,
            "valid_loss": valid_loss(model_out, data["val"])}


def run_seed(a, work: Path, seed: int, model_dir: str) -> dict[str, dict]:
    data = make_data(work / "data", a.task, a.steps * a.batch, seed if a.same_order else None)
    results = {}
    for name in a.runners.split(","):
        kw = {"model_dir": model_dir, "data": data, "out": str(work / name),
              "method": a.method, "batch": a.batch, "seed": seed, "same_order": a.same_order,
              "fp32": a.fp32, "tunelab_options": json.loads(a.tunelab)}
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--args",
                               json.dumps(kw)], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{name} failed at seed {seed}:\n{proc.stderr[-3000:]}")
            continue
        results[name] = json.loads(line[-1][7:])
        if not a.keep:   # ~0.5-1 GB a model: measured, no longer needed
            shutil.rmtree(work / name, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--method", default="full", choices=sorted(LR))
    ap.add_argument("--task", default="stars", choices=["stars", "write"])
    ap.add_argument("--seeds", default="42",
                    help="comma-separated; each seed is one pair of runs: the order they see "
                         "the examples in, the weights of a LoRA adapter (the data stay the "
                         "same)")
    ap.add_argument("--same-order", action="store_true",
                    help="both runners train on the same steps: the train file shuffled by the "
                         "seed, kept in that order (what is left to differ is the "
                         "implementation: precision, loss, kernels)")
    ap.add_argument("--fp32", action="store_true",
                    help="both in fp32 (TRL bf16=False, tunelab precision: fp32)")
    ap.add_argument("--runners", default="trl,tunelab")
    ap.add_argument("--keep", metavar="DIR",
                    help="work in DIR and keep its data and models (each seed's runner's in "
                         "DIR/SEED/NAME)")
    ap.add_argument("--tunelab", default="{}", help="tunelab config overrides, JSON")
    ap.add_argument("--worker")
    ap.add_argument("--args")
    a = ap.parse_args()
    if a.worker:
        kw = json.loads(a.args)
        print("RESULT " + json.dumps(worker(a.worker, **kw)), flush=True)
        return
    from tunelab.models import resolve
    if a.keep:
        work = Path(a.keep)
    else:
        work = Path(tempfile.mkdtemp(prefix="tunelab-match-"))
        # the runs' models and checkpoints, 2-3 GB a pair: gone when the bench ends
        atexit.register(shutil.rmtree, work, True)
    model_dir = resolve("smollm2-135m-instruct").path
    seeds = [int(x) for x in a.seeds.split(",")]
    print(f"SmolLM2-135M, task {a.task}, {a.method}, {a.steps} x {a.batch} examples (one "
          f"epoch), lr {LR[a.method]}, linear, no warmup"
          + (", the same steps for both" if a.same_order else "") + (", fp32" if a.fp32 else ""),
          flush=True)
    print(f"{'seed':>5} {'runner':9} {'steps':>6} {'train s':>8} {'tok/s':>7} {'valid loss':>11}",
          flush=True)
    by_seed = {}
    for seed in seeds:
        results = by_seed[seed] = run_seed(a, work / str(seed), seed, model_dir)
        for name, r in results.items():
            print(f"{seed:>5} {name:9} {r['steps']:>6} {r['seconds']:>8.1f} "
                  f"{tok_s(r):>7.1f} {r['valid_loss']:>11.4f}", flush=True)
    summarise(by_seed)


def tok_s(r: dict) -> float:
    return r["tokens"] / r["seconds"]


def summarise(by_seed: dict[int, dict[str, dict]]) -> None:
    """Per seed, tunelab's loss against TRL's; over the seeds, the mean and spread of each and
    of the paired difference (the same seed is the same steps with --same-order)."""
    import statistics
    pairs = {seed: (r["trl"], r["tunelab"]) for seed, r in by_seed.items()
             if {"trl", "tunelab"} <= r.keys()}
    diff = [100 * (u["valid_loss"] / t["valid_loss"] - 1) for t, u in pairs.values()]
    speed = [tok_s(u) / tok_s(t) for t, u in pairs.values()]
    for seed, d, x in zip(pairs, diff, speed):
        print(f"seed {seed}: tunelab / trl valid loss {d:+.2f}%, tok/s x{x:.2f}")
    if len(pairs) < 2:
        return
    trl = [t["valid_loss"] for t, _ in pairs.values()]
    tl = [u["valid_loss"] for _, u in pairs.values()]
    print(f"over {len(pairs)} seeds: TRL {statistics.mean(trl):.4f} (sd {statistics.stdev(trl):.4f}),"
          f" tunelab {statistics.mean(tl):.4f} (sd {statistics.stdev(tl):.4f}); "
          f"tunelab / trl {100 * (statistics.mean(tl) / statistics.mean(trl) - 1):+.2f}% "
          f"(paired: median {statistics.median(diff):+.2f}%, mean {statistics.mean(diff):+.2f}% "
          f"sd {statistics.stdev(diff):.2f}); tok/s median x{statistics.median(speed):.2f}")


if __name__ == "__main__":
    main()
