"""Files written at the end of a run from metrics.jsonl: results.csv (the OpenAI fine-tuning
results-file columns) and a loss-curve PNG."""
from __future__ import annotations

import csv
from pathlib import Path

from tunelab.data.io import atomic_write
from tunelab.train.events import read_metrics

RESULTS_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss",
                   "valid_mean_token_accuracy"]


def write_results_csv(metrics_file: Path, out: Path) -> None:
    rows: dict[int, dict] = {}
    for e in read_metrics(metrics_file):
        row = rows.setdefault(e["step"], {"step": e["step"]})
        if "train_loss" in e:
            row.update(train_loss=e["train_loss"], train_accuracy=e.get("train_mean_token_accuracy"))
        if "valid_loss" in e:
            row.update(valid_loss=e["valid_loss"],
                       valid_mean_token_accuracy=e.get("valid_mean_token_accuracy"))
    with atomic_write(out) as f:
        writer = csv.DictWriter(f, fieldnames=RESULTS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for step in sorted(rows):
            writer.writerow({k: ("" if rows[step].get(k) is None else rows[step][k])
                             for k in RESULTS_COLUMNS})


def plot_losses(metrics_file: Path, out: Path, *, best_step: int | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = read_metrics(metrics_file)
    train = [(e["step"], e["train_loss"]) for e in entries if "train_loss" in e]
    valid = [(e["step"], e["valid_loss"]) for e in entries if "valid_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", color="tab:orange")
    if best_step is not None:
        ax.axvline(best_step, color="gray", linestyle=":", label=f"best (step {best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
