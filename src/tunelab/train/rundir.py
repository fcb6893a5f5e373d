"""The run folder and its checkpoints, from start to finish: the one place that knows the layout.

A run writes into `<output_dir>.partial` and is renamed to `<output_dir>` only when it finished,
so a finished folder is never half-written. Checkpoints live in `<output_dir>.partial/checkpoints/
checkpoint-N`; one counts only once its COMPLETE marker is written (atomically, last), and older
ones are rotated away only after that, so a kill mid-save keeps the previous one. A failed or
cancelled run keeps its partial folder when it has a checkpoint (`resume=True` continues from the
last one) and is removed when it has none.

A caller other than `train()` (a job worker) can use this module alone: `RunDir(out).checkpoints()`
lists what a run saved, and each complete checkpoint is a model spec for `tunelab.models.load`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from tunelab.errors import TunelabError

COMPLETE = "COMPLETE"
_CKPT = re.compile(r"^checkpoint-(\d+)$")

# config keys that may differ when a run is resumed
RESUME_SAFE_KEYS = frozenset({"overwrite", "threads", "tensorboard"})


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """Whole checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _CKPT.match(p.name)) and (p / COMPLETE).exists()]
    return [p for _, p in sorted(found)]


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step a `checkpoint-N` folder was saved at."""
    m = _CKPT.match(Path(checkpoint).name)
    if m is None:
        raise ValueError(f"not a checkpoint folder: {checkpoint}")
    return int(m.group(1))


def checkpoint_state(checkpoint: Path) -> dict:
    """What tunelab stored in a checkpoint's COMPLETE marker (step, trained tokens)."""
    try:
        return json.loads((Path(checkpoint) / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}


def commit_checkpoint(checkpoint: Path, **state) -> None:
    """Mark a fully written checkpoint as whole: the marker is the commit point."""
    tmp = checkpoint / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, checkpoint / COMPLETE)


def rotate_checkpoints(folder: Path, keep: int, keep_also: str | Path | None = None) -> None:
    """Keep the newest `keep` whole checkpoints (and `keep_also`, the best); remove the rest,
    torn ones included. Call only after the newest one is committed."""
    kept = set(complete_checkpoints(folder)[-keep:])
    if keep_also:
        kept.add(Path(keep_also))
    kept = {k.resolve() for k in kept}
    for p in folder.iterdir():
        if _CKPT.match(p.name) and p.resolve() not in kept:
            shutil.rmtree(p, ignore_errors=True)


class RunDir:
    """The folders of one run: `output` (finished) and `partial` (in progress)."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.partial = self.output.with_name(self.output.name + ".partial")
        self.checkpoints_dir = self.partial / "checkpoints"
        self.metrics_file = self.partial / "metrics.jsonl"
        self.log_file = self.partial / "train.log"
        self.config_file = self.partial / "config.yaml"

    def checkpoints(self) -> list[Path]:
        """Whole checkpoints of the unfinished run, oldest first."""
        return complete_checkpoints(self.checkpoints_dir)

    def resume_point(self, config: dict) -> Path:
        """The checkpoint to continue from; refuses when there is none or the config changed
        (`config`: the run's config as JSON-able dict)."""
        ckpts = self.checkpoints()
        if not ckpts:
            what = "the run already finished" if self.output.exists() else "no checkpoint"
            raise TunelabError(f"nothing to resume: {what} ({self.partial} has no whole "
                               "checkpoint)", field="output_dir")
        if self.config_file.exists():
            import yaml
            before = yaml.safe_load(self.config_file.read_text(encoding="utf-8"))
            changed = [k for k in config if k not in RESUME_SAFE_KEYS and before.get(k) != config[k]]
            if changed:
                raise TunelabError(f"the config changed since the run started ({', '.join(changed)}"
                                   "); resume with the same config", field=changed[0])
        return ckpts[-1]

    def check_fresh(self, overwrite: bool) -> None:
        """A new run may start here: no unfinished run with checkpoints, no finished run (unless
        `overwrite`)."""
        if self.checkpoints() and not overwrite:
            raise TunelabError(f"an unfinished run with checkpoints is in {self.partial}: continue "
                               "it with --resume, or set overwrite: true to start again",
                               field="output_dir")
        if self.output.exists() and any(self.output.iterdir()) and not overwrite:
            raise TunelabError("output folder exists and is not empty (set overwrite: true or "
                               "choose another output_dir)", field="output_dir")

    def create(self, config_yaml: str) -> None:
        """An empty partial folder holding the run's config."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self.config_file.write_text(config_yaml, encoding="utf-8")

    def finalize(self) -> None:
        """Move the finished run into place; an old run is removed only after the new one is
        whole."""
        trash = None
        if self.output.exists():
            trash = self.output.with_name(self.output.name + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(self.output, trash)
        os.rename(self.partial, self.output)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def after_failure(self) -> Path | None:
        """Keep a failed run's checkpoints for resume (returns the last); remove a run that
        never saved one."""
        ckpts = self.checkpoints()
        if not ckpts:
            shutil.rmtree(self.partial, ignore_errors=True)
            return None
        return ckpts[-1]
