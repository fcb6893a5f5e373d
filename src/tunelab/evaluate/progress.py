"""Progress of a comparison's stages: a tqdm bar on a terminal; in a log or a pipe one line
when a stage starts and one when it ends (a bar there is carriage-return spam)."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class StageLines:
    """The bar interface compare() uses (update, close), printing a line per stage."""

    def __init__(self, name: str, total: int, stream: TextIO):
        self.name, self.total, self.stream = name.strip(), total, stream
        self.done, self.started = 0, time.monotonic()
        print(f"{self.name}: {total} examples ...", file=stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        print(f"{self.name}: {self.done}/{self.total} done in "
              f"{time.monotonic() - self.started:.1f} s", file=self.stream, flush=True)


def stage_progress(quiet: bool = False, stream: TextIO | None = None, indent: str = ""):
    """A progress_factory(name, total) for compare(): None when quiet."""
    if quiet:
        return None
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm.auto import tqdm
        return lambda name, n: tqdm(total=n, desc=f"{indent}{name:<22}", unit="ex", file=stream)
    return lambda name, n: StageLines(f"{indent}{name}", n, stream)
