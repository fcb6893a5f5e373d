"""A merged safetensors folder (transformers and vLLM load it) with a model card."""
from __future__ import annotations

import json
from pathlib import Path

from tunelab.models import TrainedWith


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _curve(metrics_file: Path) -> list[tuple[int, float | None, float | None]]:
    rows: dict[int, list] = {}
    if not metrics_file.is_file():
        return []
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        step = m.get("step")
        if step is None:
            continue
        r = rows.setdefault(int(step), [None, None])
        if m.get("train_loss") is not None:
            r[0] = m["train_loss"]
        if m.get("valid_loss") is not None:
            r[1] = m["valid_loss"]
    return [(s, *v) for s, v in sorted(rows.items())]


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def model_card(name: str, trained: TrainedWith, source_spec: str, arch: str) -> str:
    """README.md: base model, data summary, hyperparameters, training curve, comparison."""
    front = ["---", "library_name: transformers", "tags: [tunelab, fine-tuned]"]
    if trained.base and "/" in trained.base and not Path(trained.base).exists():
        front.append(f"base_model: {trained.base}")
    out = [*front, "---", "", f"# {name}", "",
           f"Exported by tunelab from `{Path(source_spec).name}` ({arch}).", ""]
    if trained.base:
        out += [f"- Base model: `{trained.base}`"]
    if trained.train_file:
        out += [f"- Training data: `{Path(trained.train_file).name}`"]
    run = trained.run_dir
    result = _read_json(run / "result.json") if run else {}
    if result:
        out += ["", "## Data", "", "| | |", "|---|---|"]
        for k in ("train_examples", "trained_tokens", "steps", "train_loss", "valid_loss",
                  "seconds"):
            if result.get(k) is not None:
                out.append(f"| {k.replace('_', ' ')} | {_fmt(result[k])} |")
    if run and (run / "config.yaml").is_file():
        import yaml
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        extra = result.get("extra") or {}
        hp = {k: cfg.get(k) for k in ("method", "objective", "epochs", "batch_size",
                                      "learning_rate", "max_length", "precision")}
        hp.update({k: v for k, v in extra.items() if k in hp and v is not None})
        if isinstance(cfg.get("lora"), dict) and hp.get("method") != "full":
            hp.update({f"lora.{k}": v for k, v in cfg["lora"].items() if k in ("r", "alpha")})
        out += ["", "## Hyperparameters", "", "| | |", "|---|---|"]
        out += [f"| {k} | {_fmt(v)} |" for k, v in hp.items() if v is not None]
    curve = _curve(run / "metrics.jsonl") if run else []
    if curve:
        out += ["", "## Training curve", "", "| step | train loss | valid loss |", "|---|---|---|"]
        out += [f"| {s} | {_fmt(t)} | {_fmt(v)} |" for s, t, v in curve]
    compare = next((p for p in ((run / "compare" / "report.md") if run else None,
                                (run.parent / "compare" / "report.md") if run else None)
                    if p is not None and p.is_file()), None)
    if compare:
        out += ["", "## Comparison (tunelab compare)", "",
                compare.read_text(encoding="utf-8").strip()]
    return "\n".join(out) + "\n"
