"""The main job, offline on a CPU: does fine-tuning beat prompting on a task where prompting is
weak? Star ratings (1-5) of product reviews, SmolLM2-135M-Instruct.

1. generate varied reviews whose text carries the rating (tunelab.data.generators.reviews) and
   split them train/val/test;
2. LoRA fine-tune the base model on train (validation loss on val);
3. compare on the same test split: the base model zero-shot and 5-shot (examples from train)
   against the fine-tuned model, in accuracy and tokens per request, plus the general check of
   what fine-tuning cost elsewhere (tunelab.evaluate.compare);
4. print the table, the verdict, the forgetting line and the report's path.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.data.generators.reviews import generate_reviews
from tunelab.data.io import write_json, write_jsonl
from tunelab.data.split import split

INSTRUCTION = ("How many stars (1 to 5) did the author of this review give? "
               "Answer with one number.\n\nReview: {review}")
TASK = "product-review star rating (1-5)"


def stars_conversation(text: str, stars: int) -> dict:
    return {"messages": [{"role": "user", "content": INSTRUCTION.format(review=text)},
                         {"role": "assistant", "content": str(stars)}],
            "stars": stars}


def build_dataset(folder: Path, *, n: int = 900, seed: int = 0) -> dict[str, Path]:
    rows = [stars_conversation(r.text, r.stars) for r in generate_reviews(n, seed=seed)]
    train, val, test = split(rows, val=0.1, test=0.2, seed=seed, stratify_by=lambda r: r["stars"])
    paths = {name: folder / f"{name}.jsonl" for name in ("train", "val", "test")}
    for name, part in zip(paths, (train, val, test)):
        write_jsonl(paths[name], part)
    return paths


def run_demo(out: str | Path = "runs/demo", *, model: str = "smollm2-135m-instruct",
             n_examples: int = 900, epochs: float = 2.0, few_shot: int = 5,
             replay: int = 48, quiet: bool = False) -> dict:
    from tunelab.config import TrainConfig
    from tunelab.evaluate.compare import compare
    from tunelab.evaluate.report import format_comparison
    from tunelab.runtime import set_threads
    from tunelab.train import train

    say = (lambda *a: None) if quiet else print
    out = Path(out)
    started = time.time()
    set_threads()
    paths = build_dataset(out / "data", n=n_examples)
    counts = {k: sum(1 for _ in open(p, encoding="utf-8")) for k, p in paths.items()}
    say(f"[1/3] data: {counts['train']} train / {counts['val']} val / {counts['test']} test "
        f"reviews rated 1-5 stars, in {out / 'data'}")
    replay_file = None
    if replay:
        from tunelab.data.replay import make_replay
        rows, stats = make_replay(model, replay)
        replay_file = out / "data" / "replay.jsonl"
        write_jsonl(replay_file, rows)
        say(f"      replay: {stats.kept} general answers by the base model itself, trained "
            f"along against forgetting ({stats.cut} cut at the length cap left out)")

    say(f"[2/3] LoRA fine-tuning {model}")
    cfg = TrainConfig(model=model, train_file=paths["train"], valid_file=paths["val"],
                      replay_file=replay_file, output_dir=out / "run", overwrite=True,
                      method="lora", epochs=epochs, batch_size=8, learning_rate=3e-4,
                      max_length=256, logging_steps=5)
    result = train(cfg, quiet=quiet)

    say(f"[3/3] base model zero-shot and {few_shot}-shot vs the fine-tuned model, on the same "
        f"{counts['test']} test reviews; then the general check")
    from tunelab.evaluate.progress import stage_progress
    bars = stage_progress(quiet, indent="  ")
    comparison = compare(base=model, tuned=str(result.output_dir), data=paths["test"],
                         out_dir=out / "compare", task="classification", train=paths["train"],
                         few_shot=few_shot, progress_factory=bars)
    report = {"task": TASK, "base_model": model, "test_examples": counts["test"],
              "comparison": comparison.to_json(), "train": result.to_json(),
              "seconds": round(time.time() - started, 1)}
    write_json(out / "report.json", report)
    if not quiet:
        print()
        print("\n".join("  " + line for line in format_comparison(comparison).splitlines()))
        print()
        print(f"  fine-tuned model:  {result.output_dir}  (LoRA adapter: {result.adapter_dir}, "
              "loaded on its base)")
        print(f"  report:            {comparison.report_html}")
        print(f"  training metrics:  {result.metrics_file}")
        print(f"  total time:        {report['seconds']:.0f} s")
        example = INSTRUCTION.format(review="Great battery, but the screen is a bit flimsy.")
        print(f"  try it:  tunelab chat {result.output_dir} --prompt {json.dumps(example)}")
    return report
