"""Files written at the end of a run from metrics.jsonl: results.csv (the OpenAI fine-tuning
results-file columns) and a loss-curve PNG."""
from __future__ import annotations

import csv
from pathlib import Path

from tunelab.data.io import atomic_write
from tunelab.train.events import read_metrics

# OpenAI's results-file columns for supervised jobs; other objectives add theirs
# (train_<metric>, valid_<metric>) after the losses
RESULTS_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss",
                   "valid_mean_token_accuracy"]
_RENAMED = {"train_mean_token_accuracy": "train_accuracy"}


def results_columns(metric_names: tuple[str, ...]) -> list[str]:
    if metric_names == ("mean_token_accuracy",):
        return RESULTS_COLUMNS
    return ["step", "train_loss", "valid_loss", *(f"{p}_{m}" for p in ("train", "valid")
                                                   for m in metric_names)]


def write_results_csv(metrics_file: Path, out: Path,
                      metric_names: tuple[str, ...] = ("mean_token_accuracy",)) -> None:
    columns = results_columns(metric_names)
    rows: dict[int, dict] = {}
    for e in read_metrics(metrics_file):
        row = rows.setdefault(e["step"], {"step": e["step"]})
        if "train_loss" in e or "valid_loss" in e:
            row.update({_RENAMED.get(k, k): v for k, v in e.items()
                        if k.startswith(("train_", "valid_"))})
    with atomic_write(out) as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for step in sorted(rows):
            writer.writerow({k: ("" if rows[step].get(k) is None else rows[step][k])
                             for k in columns})


def plot_losses(metrics_file: Path, out: Path, *, best_step: int | None = None,
                metric: str | None = None, metric_label: str = "") -> None:
    """The loss curves; with `metric` (e.g. DPO's reward_accuracy) a second panel plots its
    train and validation values."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = read_metrics(metrics_file)
    train = [(e["step"], e["train_loss"]) for e in entries if "train_loss" in e]
    valid = [(e["step"], e["valid_loss"]) for e in entries if "valid_loss" in e]
    if metric:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        for prefix, style, color in (("train", "-", "tab:blue"), ("valid", "o-", "tab:orange")):
            points = [(e["step"], e[f"{prefix}_{metric}"]) for e in entries
                      if e.get(f"{prefix}_{metric}") is not None]
            if points:
                ax2.plot(*zip(*points), style, color=color,
                         label="train" if prefix == "train" else "validation")
        ax2.set_xlabel("step")
        ax2.set_ylabel(metric_label or metric)
        ax2.grid(alpha=0.3)
        ax2.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss", color="tab:orange")
    if best_step is not None:
        ax.axvline(best_step, color="gray", linestyle=":", label=f"best (step {best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" if metric else "loss (trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
