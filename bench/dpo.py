"""DPO speed and memory: TRL's DPOTrainer vs tunelab's DPO, LoRA and full, in one run.

    .venv/bin/python bench/dpo.py [--pairs 64] [--epochs 1] [--threads N] [--quick]
                                  [--runners trl-lora,tunelab-lora,trl-full,tunelab-full]

On SmolLM2-135M-Instruct (the builtin model) and the same preference pairs, each in its own
process (so peak RSS is its own):
  trl-lora      TRL DPOTrainer with its defaults, changed only to run on CPU (use_cpu=True),
                given tunelab's default LoRA (r 16, alpha 32, dropout 0.05, all linear layers)
                as its peft_config; its reference is the model with the adapter switched off;
  tunelab-lora  tunelab, objective dpo, method lora (same reference);
  trl-full      TRL DPOTrainer defaults, full fine-tuning: TRL loads a second copy of the model
                as the reference and runs it at every step;
  tunelab-full  tunelab, method full: reference log-probabilities computed once, before the
                first step (that pass is counted in its time).
Matched: pairs, batch (8 pairs a step, one micro-batch: TRL's default and tunelab's auto),
max_length 1024 (both defaults), epochs (so steps), precision (bf16 autocast where the CPU has
it, as both pick by default; else fp32), beta 0.1, sigmoid loss, seed. Not matched, on purpose:
each one's default learning rate (TRL 1e-6; tunelab 2e-5 LoRA, 2e-6 full; --lr sets one for
all) and TRL's default activation checkpointing (on). TRL gets the pairs as conversations, as a
user gives them (its tokenization also trains the "\\n" after <|im_end|>: one token more per
answer than tunelab, see tests/test_dpo_trl.py). tunelab writes no checkpoint during the run
(save_steps past the end; TRL's default saves none in so few steps either).

Prints pairs/s (pairs x epochs / wall time of training, from the first step to the last; and
from the median step, which other processes on a shared machine disturb less), peak RSS at the
end of training, the ratios against TRL, and, scored the same way for every run
(tunelab's pair_scores, pinned to TRL's loss by tests/test_dpo_trl.py, in fp32), the DPO loss,
reward accuracy and margin of the trained model on held-out pairs. Not a test: no assertions.
The pairs: a review and the demo's star-rating question; chosen: the bare number, rejected: a
rambling explanation that ends on the same number.

Variants, for looking into differences (any runner name + flags): tunelab-lora+nodrop (LoRA
dropout 0: TRL switches dropout off by default, disable_dropout=True), tunelab-lora+ckpt
(activation checkpointing, as TRL's default), trl-lora+nockpt / trl-full+nockpt (TRL without
it). About 9 minutes for the four default runners on 2 quiet cores (an EPYC or Xeon of these
machines); --quick: 16 pairs, 2 steps each. Other processes on the cores slow torch a lot and
unevenly (threads spin-wait): run it when `uptime` shows the machine idle, and read the load
averages it prints before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BETA, LOSS_TYPE, MAX_LENGTH, BATCH, SEED = 0.1, "sigmoid", 1024, 8, 42

# ---------------------------------------------------------------------------------------------
# data

RAMBLES = [
    "Let me think about this carefully. The review talks about a {p}, and the author says: "
    "\"{s}\" When I weigh everything the author mentions, the good and the bad, I would say "
    "that this probably corresponds to {n} stars, although star ratings are always somewhat "
    "subjective and another reader might see it a little differently.",
    "Great question! Reviews like this one can be tricky. The key sentence seems to be \"{s}\" "
    "Taking the overall tone into account, as well as the details about the {p}, my best "
    "estimate is that the author gave {n} out of 5 stars.",
    "To answer this, we need to look at the language used. The author of this review of a {p} "
    "writes \"{s}\" This suggests a particular level of satisfaction. Based on that, I believe "
    "the rating is {n} stars. I hope this helps!",
]


def make_pairs(folder: Path, n_train: int, n_heldout: int, seed: int) -> dict[str, Path]:
    from tunelab.data.generators.reviews import generate_reviews
    from tunelab.data.io import write_jsonl
    from tunelab.demo import INSTRUCTION
    rng = random.Random(seed)
    rows = []
    for r in generate_reviews(n_train + n_heldout, seed=seed):
        first = r.text.split(". ")[0].rstrip(".!") + "."
        ramble = rng.choice(RAMBLES).format(p=r.product, s=first, n=r.stars)
        rows.append({"input": {"messages": [{"role": "user",
                                             "content": INSTRUCTION.format(review=r.text)}]},
                     "preferred_output": [{"role": "assistant", "content": str(r.stars)}],
                     "non_preferred_output": [{"role": "assistant", "content": ramble}]})
    paths = {"train": folder / "train.jsonl", "heldout": folder / "heldout.jsonl"}
    write_jsonl(paths["train"], rows[:n_train])
    write_jsonl(paths["heldout"], rows[n_train:])
    return paths


def rendered(path: str, tokenizer):
    from tunelab.data.preference import read_preferences
    from tunelab.objectives.dpo import render_pairs
    return render_pairs(read_preferences(Path(path)), tokenizer, max_length=MAX_LENGTH)


def as_trl_conversations(path: str):
    import datasets
    rows = [json.loads(line) for line in open(path)]
    return datasets.Dataset.from_list([{"prompt": r["input"]["messages"],
                                        "chosen": r["preferred_output"],
                                        "rejected": r["non_preferred_output"]} for r in rows])


# ---------------------------------------------------------------------------------------------
# the workers (a child process each)


class Timer:
    """Wall time of trainer.train() proper (first to last step), each optimizer step's time,
    and the peak RSS at the end of training."""

    @staticmethod
    def callback():
        from transformers import TrainerCallback

        class _T(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()
                self.step_seconds = []

            def on_step_begin(self, args, state, control, **kw):
                self.t_step = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.step_seconds.append(time.perf_counter() - self.t_step)

            def on_train_end(self, args, state, control, **kw):
                self.seconds = time.perf_counter() - self.t0
                self.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                self.steps = state.global_step
        return _T()


def worker_trl(model_dir: str, data: dict, out: str, method: str, flags: list[str],
               a) -> tuple[dict, object]:
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    tok = AutoTokenizer.from_pretrained(model_dir)
    timer = Timer.callback()
    kwargs = {} if a.lr is None else {"learning_rate": a.lr}
    if "nockpt" in flags:
        kwargs["activation_checkpointing"] = False
    args = DPOConfig(output_dir=out, use_cpu=True, bf16=a.precision == "bf16",
                     per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     num_train_epochs=a.epochs, max_length=MAX_LENGTH, beta=BETA,
                     loss_type=LOSS_TYPE, seed=SEED, report_to="none", save_strategy="no",
                     **kwargs)
    trainer = DPOTrainer(model=model_dir, args=args,
                         train_dataset=as_trl_conversations(data["train"]),
                         processing_class=tok, callbacks=[timer],
                         peft_config=lora_config() if method == "lora" else None)
    ds = trainer.train_dataset
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in
                 zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    trained = sum(len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"]))
    trainer.train()
    return ({"seconds": timer.seconds, "peak_rss_mb": timer.peak_rss_mb, "steps": timer.steps,
             "step_seconds": timer.step_seconds,
             "tokens": tokens, "trained_tokens": trained, "lr": args.learning_rate,
             "activation_checkpointing": bool(args.activation_checkpointing),
             "dropout": "off" if args.disable_dropout else "on",
             "reference": "adapter off" if method == "lora" else "2nd model copy, every step"},
            trainer.model)


def lora_config():
    """tunelab's default LoRA, for TRL (which has no LoRA defaults of its own)."""
    from peft import LoraConfig
    from tunelab.config import LoraSettings
    s = LoraSettings()
    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                      target_modules=s.target_modules, task_type="CAUSAL_LM")


def worker_tunelab(model_dir: str, data: dict, out: str, method: str, flags: list[str],
                   a) -> tuple[dict, object]:
    import tunelab
    from tunelab.objectives import get as get_objective
    # the reference pass of full fine-tuning happens before trainer.train(): time it too
    dpo, ref_seconds = get_objective("dpo"), []
    original = dpo.before_training

    def timed(*args, **kwargs):
        t = time.perf_counter()
        original(*args, **kwargs)
        ref_seconds.append(time.perf_counter() - t)
    dpo.before_training = timed
    timer = Timer.callback()
    cfg = {"objective": "dpo", "dpo": {"beta": BETA, "loss_type": LOSS_TYPE},
           "model": model_dir, "train_file": data["train"], "output_dir": out, "method": method,
           "epochs": a.epochs, "batch_size": BATCH, "micro_batch_size": BATCH,
           "max_length": MAX_LENGTH, "precision": a.precision, "seed": SEED,
           "save_steps": 10 ** 6, "threads": a.threads, "tensorboard": False}
    if a.lr is not None:
        cfg["learning_rate"] = a.lr
    if "nodrop" in flags:
        cfg["lora"] = {"dropout": 0.0}
    if "ckpt" in flags:
        cfg["gradient_checkpointing"] = True
    res = tunelab.train(cfg, quiet=True, callbacks=[timer])
    from tunelab import models
    rows = rendered(data["train"], models.load_tokenizer(model_dir))
    tokens = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    trained = sum(sum(x != -100 for x in r[f"{s}_labels"]) for r in rows
                  for s in ("chosen", "rejected"))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(res.model_dir)   # after the peak is taken
    from tunelab.train.auto import auto_learning_rate
    lr = a.lr if a.lr is not None else auto_learning_rate(method, "dpo")
    return ({"seconds": timer.seconds + sum(ref_seconds), "train_seconds": timer.seconds,
             "ref_seconds": sum(ref_seconds), "peak_rss_mb": timer.peak_rss_mb,
             "steps": timer.steps, "step_seconds": timer.step_seconds, "tokens": tokens,
             "trained_tokens": trained, "lr": lr, "activation_checkpointing": "ckpt" in flags,
             "dropout": "off" if method == "full" or "nodrop" in flags else "lora 0.05",
             "reference": "adapter off" if method == "lora" else "precomputed once"}, model)


def heldout_logps(model, rows, pad_id: int):
    """Per pair: the summed log-probability of chosen and of rejected (fp32, no dropout)."""
    import torch
    from tunelab.batching import sequence_logps
    from tunelab.objectives.dpo import pad_pairs
    model = model.float().eval()
    chosen, rejected = [], []
    for b in range(0, len(rows), 8):
        with torch.inference_mode():
            logps, _ = sequence_logps(model, pad_pairs(rows[b:b + 8], pad_id))
        c, r = logps.double().chunk(2)
        chosen += c.tolist()
        rejected += r.tolist()
    return chosen, rejected


def heldout_scores(model, data: dict, model_dir: str, ref_file: str) -> dict:
    import torch
    from tunelab import models
    from tunelab.objectives.dpo import pair_scores
    tok = models.load_tokenizer(model_dir)
    rows = rendered(data["heldout"], tok)
    chosen, rejected = heldout_logps(model, rows, tok.pad_token_id)
    ref = json.loads(Path(ref_file).read_text())
    logps = torch.tensor(chosen + rejected, dtype=torch.float64)
    ref_logps = torch.tensor(ref["chosen"] + ref["rejected"], dtype=torch.float64)
    losses, c, r = pair_scores(logps, ref_logps, torch.ones_like(logps), BETA, LOSS_TYPE)
    return {"heldout_loss": float(losses.mean()),
            "heldout_reward_accuracy": float((c > r).double().mean()),
            "heldout_margin": float((c - r).mean())}


def run_worker(name: str, model_dir: str, data: dict, out: str, a) -> None:
    from tunelab.runtime import set_threads
    set_threads(a.threads)
    if name == "reference":   # the starting model's held-out log-probabilities
        from transformers import AutoModelForCausalLM
        from tunelab import models
        tok = models.load_tokenizer(model_dir)
        chosen, rejected = heldout_logps(AutoModelForCausalLM.from_pretrained(model_dir),
                                         rendered(data["heldout"], tok), tok.pad_token_id)
        Path(out).write_text(json.dumps({"chosen": chosen, "rejected": rejected}))
        print("RESULT {}", flush=True)
        return
    base, *flags = name.split("+")
    runner, method = base.split("-")
    worker = worker_trl if runner == "trl" else worker_tunelab
    r, model = worker(model_dir, data, out, method, flags, a)
    r.update(heldout_scores(model, data, model_dir, data["reference"]))
    print("RESULT " + json.dumps(r), flush=True)


# ---------------------------------------------------------------------------------------------
# the parent


def spawn(name: str, model_dir: str, data: dict, out: str, a) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, "--model-dir", model_dir,
           "--data", json.dumps(data), "--out", out, "--epochs", str(a.epochs),
           "--precision", a.precision, "--threads", str(a.threads)]
    if a.lr is not None:
        cmd += ["--lr", str(a.lr)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(f"{name} failed:\n{proc.stderr[-3000:]}", flush=True)
        return None
    r = json.loads(line[-1][7:])
    steps = ", ".join(f"{x:.1f}" for x in r.get("step_seconds", []))
    print(f"  {name}: done in {time.perf_counter() - t:.0f} s (process); load now "
          f"{os.getloadavg()[0]:.2f}" + (f"; {json.dumps({k: v for k, v in r.items() if k != 'step_seconds'})}"
                                        f"; step seconds: {steps}" if r else ""), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64, help="training pairs")
    ap.add_argument("--heldout", type=int, default=32, help="held-out pairs, scored after")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--runners", default="trl-lora,tunelab-lora,trl-full,tunelab-full")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="auto: bf16 where the CPU has it (both trainers' default)")
    ap.add_argument("--lr", type=float, default=None, help="one learning rate for all "
                    "(default: each one's own default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the "
                    "cores this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a model spec (the "
                    "builtin by default; a small folder for a smoke run of this script)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 pairs, 8 held out")
    ap.add_argument("--worker")
    ap.add_argument("--model-dir")
    ap.add_argument("--data")
    ap.add_argument("--out")
    a = ap.parse_args()
    from tunelab.runtime import available_cores, resolve_precision
    a.threads = a.threads or available_cores()
    a.precision = resolve_precision(a.precision) if a.precision == "auto" else a.precision
    if a.worker:
        run_worker(a.worker, a.model_dir, json.loads(a.data), a.out, a)
        return
    if a.quick:
        a.pairs, a.heldout = 16, 8

    from tunelab.models import load_tokenizer, resolve
    model_dir = resolve(a.model).path
    work = Path(tempfile.mkdtemp(prefix="tunelab-bench-dpo-"))
    data = {k: str(v) for k, v in make_pairs(work / "data", a.pairs, a.heldout, a.seed).items()}
    rows = rendered(data["train"], load_tokenizer(model_dir))
    lengths = sorted(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{a.threads} torch threads ({os.cpu_count()} cores); precision {a.precision}")
    print(f"data: {len(rows)} train pairs (longer side: tokens min {lengths[0]}, median "
          f"{lengths[len(lengths) // 2]}, max {lengths[-1]}), {a.heldout} held out; "
          f"{a.epochs} epoch(s) of batch {BATCH} = {-(-len(rows) // BATCH) * a.epochs} steps",
          flush=True)
    data["reference"] = str(work / "reference.json")
    if spawn("reference", model_dir, data, data["reference"], a) is None:
        return
    results = {}
    for runner in a.runners.split(","):
        r = spawn(runner, model_dir, data, str(work / runner), a)
        if r is not None:
            results[runner] = r
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    report(results, len(rows) * a.epochs, a.epochs)


def median_step_pairs_per_s(r: dict) -> float:
    """Pairs/s of a typical step (the median, the first left out when there are more than two):
    less sensitive than the wall time to other processes on the machine. The reference pass
    that tunelab-full runs before training is spread over its steps."""
    import statistics
    steps = r["step_seconds"][1:] if len(r["step_seconds"]) > 2 else r["step_seconds"]
    return BATCH / (statistics.median(steps) + r.get("ref_seconds", 0) / max(1, r["steps"]))


def report(results: dict, pairs_seen: int, epochs: int) -> None:
    w = max(14, *map(len, results))
    print(f"\n{'runner':{w}} {'pairs/s':>8} {'(step)':>7} {'tok/s':>6} {'peak RSS MB':>12} "
          f"{'seconds':>8} {'lr':>6} {'ckpt':>4} {'dropout':>9} {'held-out loss':>13} "
          f"{'reward acc':>10} {'margin':>7}  reference")
    for name, r in results.items():
        r["pairs_per_s"] = pairs_seen / r["seconds"]
        r["step_pairs_per_s"] = median_step_pairs_per_s(r)
        r["tps"] = r["tokens"] * epochs / r["seconds"]   # non-padding tokens, both sides
        print(f"{name:{w}} {r['pairs_per_s']:>8.3f} {r['step_pairs_per_s']:>7.3f} "
              f"{r['tps']:>6.0f} {r['peak_rss_mb']:>12.0f} {r['seconds']:>8.1f} {r['lr']:>6.0e} "
              f"{'on' if r['activation_checkpointing'] else 'off':>4} {r['dropout']:>9} "
              f"{r['heldout_loss']:>13.4f} {r['heldout_reward_accuracy']:>10.3f} "
              f"{r['heldout_margin']:>7.3f}  {r['reference']}")
        if r.get("ref_seconds", 0) > 0.05:
            print(f"{'':{w}} (of which {r['ref_seconds']:.1f} s reference pass before training, "
                  f"{r['train_seconds']:.1f} s training)")
    print("pairs/s: pairs x epochs / wall time of training; (step): from the median step")
    for name, ours in results.items():
        if not name.startswith("tunelab-"):
            continue
        method = name.split("+")[0].split("-")[1]
        base = results.get(f"trl-{method}")
        if base:
            print(f"{name} / trl-{method}: pairs/s x{ours['pairs_per_s'] / base['pairs_per_s']:.2f} "
                  f"(median step x{ours['step_pairs_per_s'] / base['step_pairs_per_s']:.2f}), "
                  f"peak RSS x{ours['peak_rss_mb'] / base['peak_rss_mb']:.2f} "
                  f"({ours['peak_rss_mb'] - base['peak_rss_mb']:+.0f} MB); trained tokens per "
                  f"epoch {ours['trained_tokens']} vs {base['trained_tokens']}")


if __name__ == "__main__":
    main()
