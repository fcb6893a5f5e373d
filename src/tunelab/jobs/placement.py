"""Where a fine-tuning job trains: how many training processes ("workers", across hosts) and
what each needs (CPUs, GPUs, memory). Given in the request's `tunelab` field beside the
training keys (`"tunelab": {"workers": 2, "gpus_per_worker": 1, "lora": {...}}`), kept apart
from the training config, and honoured by Ray (tunelab.jobs.ray_train): a job is placed on the
nodes that have what it asks for. Without Ray a job runs in one process on the worker that
claims it, so anything but the default is refused there, naming the field.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tunelab.errors import TunelabError

# key -> (its description, the smallest value, the largest, whole numbers only)
FIELDS: dict[str, tuple[str, float, float, bool]] = {
    "workers": ("training processes (Ray Train workers, one DDP rank each); more than 1 needs "
                "a server started with --ray", 1, 256, True),
    "gpus_per_worker": ("GPUs each worker reserves (NCCL between GPU workers, gloo on CPU)",
                        0, 16, True),
    "cpus_per_worker": ("CPU cores each worker reserves (and its torch threads)", 1, 1024, True),
    "memory_per_worker_gb": ("memory each worker reserves on its node, in GiB", 0.1, 4096,
                             False),
}
DEFAULTS = {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1, "memory_per_worker_gb": None}
NEEDS_RAY = "start the server and its workers with --ray ADDRESS (or TUNELAB_RAY_ADDRESS)"


@dataclass(frozen=True)
class Placement:
    workers: int = 1
    gpus_per_worker: int = 0
    cpus_per_worker: int = 1
    memory_per_worker_gb: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Placement":
        return cls(**{k: v for k, v in (data or {}).items() if k in FIELDS})

    def bundle(self) -> dict[str, float]:
        """One worker's Ray resource request."""
        out: dict[str, float] = {"CPU": float(self.cpus_per_worker)}
        if self.gpus_per_worker:
            out["GPU"] = float(self.gpus_per_worker)
        if self.memory_per_worker_gb:
            out["memory"] = float(self.memory_per_worker_gb) * 2**30
        return out

    @property
    def is_default(self) -> bool:
        return self == Placement()


def split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request's `tunelab` field -> (training config keys, placement keys)."""
    train = {k: v for k, v in options.items() if k not in FIELDS}
    return train, {k: v for k, v in options.items() if k in FIELDS}


def parse(options: dict[str, Any], *, ray: bool) -> Placement:
    """The placement a request's `tunelab` field asks for (TunelabError naming the field as
    `tunelab.<key>`). `ray`: whether this server schedules jobs on a Ray cluster."""
    _, given = split(options)
    values: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        what, low, high, whole = FIELDS[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and whole:
            ok = float(value).is_integer()
        if not ok:
            raise TunelabError(f"expected {'a whole number' if whole else 'a number'} "
                               f"({what}), got {value!r}", field=f"tunelab.{key}")
        if not low <= value <= high:
            raise TunelabError(f"must be between {low:g} and {high:g} ({what}), got {value!r}",
                               field=f"tunelab.{key}")
        values[key] = int(value) if whole else float(value)
    placement = Placement(**values)
    if not ray:
        for key, value in values.items():
            if value != DEFAULTS[key]:
                why = ("training on several workers runs under Ray Train" if key == "workers"
                       else "reserving resources for a job is done by Ray")
                raise TunelabError(f"this server runs jobs without a Ray cluster: {why}; "
                                   f"{NEEDS_RAY}", field=f"tunelab.{key}")
    return placement


def schema() -> dict[str, Any]:
    """The JSON schema of the placement keys (merged into the `tunelab` field's schema)."""
    out = {}
    for key, (what, low, high, whole) in FIELDS.items():
        out[key] = {"type": "integer" if whole else "number", "minimum": low, "maximum": high,
                    "description": what}
        if DEFAULTS[key] is not None:
            out[key]["default"] = DEFAULTS[key]
    return out
