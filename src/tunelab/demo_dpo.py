"""After SFT, DPO: teach a preference that supervised data left mixed.

The star-rating task of the main demo (tunelab.demo), with training data as teams often have
it: two annotators, one who answers with the number and one who explains it ("4 stars. The
reviewer is mostly happy, ..."). SFT learns both forms. Preference pairs then say which one is
wanted, on the SFT model, without rewriting the SFT data:

1. generate reviews; SFT data with half the answers explained; preference pairs on other
   reviews (chosen: the bare number; rejected: the same number explained); a test split;
2. LoRA SFT of the base model on the mixed answers;
3. LoRA DPO starting from the SFT model (the reference is the SFT model: its adapter off);
4. compare base 0-shot, SFT and SFT+DPO on the test reviews (accuracy, invalid answers, tokens
   per request) and score held-out preference pairs (how often each model gives the bare number
   the higher log-probability, summed and per token).

Measured (README): greedy decoding of the SFT model already starts with the number and stops,
but per token it still prefers the explanation on most held-out pairs; DPO moves that preference
and the accuracy, and its validation reward accuracy goes from chance to ~100%.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from tunelab.data.generators.reviews import explain_rating, generate_reviews
from tunelab.data.io import write_json, write_jsonl
from tunelab.demo import INSTRUCTION

BASE = "smollm2-135m-instruct"


def build_dataset(folder: Path, *, n_sft: int = 400, n_pairs: int = 240, n_test: int = 150,
                  explained: float = 0.5, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    reviews = generate_reviews(n_sft + n_pairs + n_test + 40, seed=seed + 1)
    sft, pairs = reviews[:n_sft], reviews[n_sft:n_sft + n_pairs]
    test, held_out = reviews[n_sft + n_pairs:-40], reviews[-40:]

    def prompt(r):
        return [{"role": "user", "content": INSTRUCTION.format(review=r.text)}]

    def pair(r):
        return {"input": {"messages": prompt(r)},
                "preferred_output": [{"role": "assistant", "content": str(r.stars)}],
                "non_preferred_output": [{"role": "assistant",
                                          "content": explain_rating(r.stars, rng)}],
                "stars": r.stars}
    rows = {
        "sft": [{"messages": [*prompt(r), {"role": "assistant", "content":
                                           explain_rating(r.stars, rng)
                                           if rng.random() < explained else str(r.stars)}],
                 "stars": r.stars} for r in sft],
        "pairs": [pair(r) for r in pairs[:-len(pairs) // 8]],
        "pairs_val": [pair(r) for r in pairs[-len(pairs) // 8:]],
        "pairs_test": [pair(r) for r in held_out],
        "test": [{"messages": [*prompt(r), {"role": "assistant", "content": str(r.stars)}],
                  "stars": r.stars} for r in test],
    }
    paths = {name: folder / f"{name}.jsonl" for name in rows}
    for name, part in rows.items():
        write_jsonl(paths[name], part)
    return paths


def run_dpo_demo(out: str | Path = "runs/demo-dpo", *, model: str = BASE, quiet: bool = False,
                 sft_epochs: float = 2.0, dpo_epochs: float = 1.0, beta: float = 0.1,
                 dpo_learning_rate: float | str = "auto", few_shot: int = 0) -> dict:
    from tqdm.auto import tqdm

    from tunelab.config import TrainConfig
    from tunelab.evaluate.compare import compare
    from tunelab.evaluate.report import format_comparison
    from tunelab.runtime import set_threads
    from tunelab.train import train

    say = (lambda *a: None) if quiet else print
    out = Path(out)
    started = time.time()
    set_threads()
    paths = build_dataset(out / "data")
    say(f"[1/4] data in {out / 'data'}: SFT answers half bare numbers, half explained; "
        "preference pairs: the bare number chosen over the explanation")
    say(f"[2/4] LoRA SFT of {model}")
    sft = train(TrainConfig(model=model, train_file=paths["sft"], output_dir=out / "sft",
                            overwrite=True, method="lora", epochs=sft_epochs, batch_size=8,
                            learning_rate=3e-4, max_length=256, logging_steps=10,
                            load_best_at_end=False), quiet=quiet)
    say("[3/4] LoRA DPO from the SFT model (reference: the SFT model)")
    dpo = train(TrainConfig(model=str(sft.output_dir), train_file=paths["pairs"],
                            valid_file=paths["pairs_val"], output_dir=out / "dpo",
                            overwrite=True, objective="dpo", method="lora", epochs=dpo_epochs,
                            batch_size=8, learning_rate=dpo_learning_rate, max_length=256,
                            logging_steps=5, dpo={"beta": beta}), quiet=quiet)
    n_test = sum(1 for _ in open(paths["test"], encoding="utf-8"))
    say(f"[4/4] base zero-shot, SFT and SFT+DPO on the same {n_test} test reviews, and the "
        "held-out preference pairs")
    bars = None if quiet else (lambda name, total: tqdm(total=total, desc=f"  {name:<20}",
                                                         unit="ex", leave=False))
    comparison = compare(base=model, tuned=[f"sft={sft.output_dir}",
                                            f"sft+dpo={dpo.output_dir}"],
                         data=paths["test"], out_dir=out / "compare", task="classification",
                         train=paths["sft"], few_shot=few_shot, general_check=False,
                         preference=paths["pairs_test"], progress_factory=bars)
    report = {"comparison": comparison.to_json(), "sft": sft.to_json(), "dpo": dpo.to_json(),
              "seconds": round(time.time() - started, 1), "paths": {k: str(v) for k, v in
                                                                     paths.items()}}
    write_json(out / "report.json", report)
    if not quiet:
        print()
        print("\n".join("  " + line for line in format_comparison(comparison).splitlines()))
        print()
        print(f"  report:      {comparison.report_html}")
        print(f"  total time:  {report['seconds']:.0f} s")
    return report
