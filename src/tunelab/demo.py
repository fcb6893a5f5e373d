"""The main job: product-review sentiment, base model vs LoRA fine-tune, offline on a CPU.

1. generate varied reviews (tunelab.data.generators.reviews) and split train/val/test;
2. measure the base model on the test split;
3. LoRA fine-tune the base model on train (validation loss on val);
4. measure the fine-tuned model on the same test split; print both.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.data.generators.reviews import generate_reviews
from tunelab.data.io import write_json, write_jsonl
from tunelab.data.split import split

INSTRUCTION = ("Classify the sentiment of this product review as positive or negative. "
               "Answer with one word: positive or negative.\n\nReview: {review}")


def sentiment_conversation(text: str, label: str) -> dict:
    return {"messages": [{"role": "user", "content": INSTRUCTION.format(review=text)},
                         {"role": "assistant", "content": label}]}


def build_dataset(folder: Path, *, n: int = 900, seed: int = 0) -> dict[str, Path]:
    rows = [sentiment_conversation(r.text, r.sentiment) for r in generate_reviews(n, seed=seed)]
    train, val, test = split(rows, val=0.1, test=0.2, seed=seed)
    paths = {name: folder / f"{name}.jsonl" for name in ("train", "val", "test")}
    for name, part in zip(paths, (train, val, test)):
        write_jsonl(paths[name], part)
    return paths


def _eval(model_spec, test_file: Path, quiet: bool, label: str) -> dict:
    from tqdm.auto import tqdm

    from tunelab import models
    from tunelab.evaluate import evaluate
    from tunelab.data.conversation import read_conversations
    convs = read_conversations(test_file)
    model, tokenizer = models.load(model_spec)
    with tqdm(total=len(convs), desc=f"eval {label}", disable=quiet, unit="ex") as bar:
        res = evaluate(model, tokenizer, convs, progress=bar.update)
    return {**res.summary(), "samples": res.predictions[:5]}


def run_demo(out: str | Path = "runs/demo", *, model: str = "smollm2-135m-instruct",
             n_examples: int = 900, epochs: float = 1.0, quiet: bool = False) -> dict:
    from tunelab.config import TrainConfig
    from tunelab.runtime import set_threads
    from tunelab.train import train

    say = (lambda *a: None) if quiet else print
    out = Path(out)
    started = time.time()
    set_threads()
    paths = build_dataset(out / "data", n=n_examples)
    counts = {k: sum(1 for _ in open(p, encoding="utf-8")) for k, p in paths.items()}
    say(f"[1/4] data: {counts['train']} train / {counts['val']} val / {counts['test']} test "
        f"reviews in {out / 'data'}")

    say(f"[2/4] base model {model} on the test split")
    base = _eval(model, paths["test"], quiet, "base")

    say("[3/4] LoRA fine-tuning")
    cfg = TrainConfig(model=model, train_file=paths["train"], valid_file=paths["val"],
                      output_dir=out / "run", overwrite=True, method="lora", epochs=epochs,
                      batch_size=8, learning_rate=3e-4, max_length=256, logging_steps=5)
    result = train(cfg, quiet=quiet)

    say("[4/4] fine-tuned model on the same test split")
    tuned = _eval(str(result.model_dir), paths["test"], quiet, "fine-tuned")

    report = {"task": "product-review sentiment (positive/negative)", "base_model": model,
              "test_examples": counts["test"], "base": base, "fine_tuned": tuned,
              "train": result.to_json(), "seconds": round(time.time() - started, 1)}
    write_json(out / "report.json", report)
    if not quiet:
        print()
        print(f"  {'':12} {'exact match':>12} {'normalized':>12} {'test loss':>10}")
        for name, r in (("base", base), ("fine-tuned", tuned)):
            print(f"  {name:12} {r['exact_match']:>12.1%} {r['normalized_match']:>12.1%} "
                  f"{r['loss']:>10.3f}")
        print()
        print(f"  base model answered e.g.: {json.dumps(base['samples'][0]['prediction'])[:100]}")
        print(f"  fine-tuned model:         {result.model_dir}  (LoRA adapter: {result.adapter_dir})")
        print(f"  metrics:                  {result.metrics_file}")
        print(f"  training log:             {result.output_dir / 'train.log'}")
        print(f"  report:                   {out / 'report.json'}")
        print(f"  total time:               {report['seconds']:.0f} s")
        print(f"  try it:  tunelab chat {result.model_dir} --prompt "
              f"{json.dumps(INSTRUCTION.format(review='Great battery, awful screen, returning it.'))}")
    return report
