"""Reading and writing record files, with errors that name the file and line."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise TunelabError("file not found", file=path)
    if path.is_dir():
        raise TunelabError("expected a file, got a folder", file=path)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON value) for each non-blank line; 1-based line numbers."""
    path = Path(path)
    _check_readable(path)
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TunelabError(f"not valid UTF-8 (byte {e.start} of the line)", file=path,
                                   line=line_no) from None
            if line_no == 1:
                text = text.lstrip("\ufeff")  # a BOM that Windows editors write
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                raise TunelabError(f"not valid JSON ({e.msg} at column {e.colno})", file=path,
                                   line=line_no) from None


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Write rows atomically (temp file + rename): a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def write_json(path: str | Path, value: Any) -> None:
    """Write one JSON document atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
