"""Reading and writing record files, with errors that name the file and line (or row).

Every reader streams: records come one at a time, so a file is never held in memory whole
(a JSON array is the exception: it is one document).
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tunelab.errors import TunelabError

# One JSONL line is one example; 16 MiB of text is millions of tokens, far beyond any context.
# A longer line is a broken file (or not JSONL), and reading it whole could exhaust memory.
MAX_LINE_BYTES = 16 * 2**20
FILE_KINDS = ("jsonl", "json", "csv", "tsv", "parquet", "dataset")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
             ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise TunelabError("file not found", file=path)
    if path.is_dir():
        raise TunelabError("expected a file, got a folder", file=path)


def iter_jsonl_lenient(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, value) for each non-blank line; a bad line yields a TunelabError
    as its value instead of stopping, so a validator can report every bad line."""
    path = Path(path)
    _check_readable(path)
    with path.open("rb") as f:
        line_no = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            line_no += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):   # skip the rest of the line, in chunks
                    raw = f.readline(MAX_LINE_BYTES)
                yield line_no, TunelabError(
                    f"line is longer than {MAX_LINE_BYTES // 2**20} MiB: not one JSONL example "
                    "(is this a JSON document rather than JSON lines?)", file=path, line=line_no,
                    kind="line_too_long")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, TunelabError(f"not valid UTF-8 (byte {e.start} of the line)",
                                            file=path, line=line_no, kind="bad_encoding")
                continue
            if line_no == 1:
                text = text.lstrip("\ufeff")  # a BOM that Windows editors write
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, TunelabError(f"not valid JSON ({e.msg} at column {e.colno})",
                                            file=path, line=line_no, kind="not_json")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON value) for each non-blank line; 1-based line numbers.
    The first bad line raises."""
    for line_no, value in iter_jsonl_lenient(path):
        if isinstance(value, TunelabError):
            raise value
        yield line_no, value


def file_kind(path: str | Path) -> str:
    """jsonl | json | csv | tsv | parquet | dataset (a folder saved by datasets.save_to_disk)."""
    path = Path(path)
    if not path.exists():
        raise TunelabError("file not found", file=path)
    if path.is_dir():
        return "dataset"
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind:
        return kind
    with path.open("rb") as f:   # no telling suffix: sniff the first non-blank byte
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        return "jsonl"
    raise TunelabError("unknown file type: expected .jsonl, .json, .csv, .tsv, .parquet or a "
                       "folder saved by datasets", file=path)


def read_records(path: str | Path, *, kind: str | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, record) from any supported input; errors name file and line.

    JSONL and JSON give line numbers; CSV the line a record starts on; Parquet and dataset
    folders the 1-based row. An input with no records raises.
    """
    path = Path(path)
    kind = kind or file_kind(path)
    readers = {"jsonl": iter_jsonl, "json": _iter_json, "csv": _iter_csv,
               "tsv": lambda p: _iter_csv(p, delimiter="\t"), "parquet": _iter_parquet,
               "dataset": _iter_dataset}
    if kind not in readers:
        raise TunelabError(f"unknown input kind {kind!r} (expected one of: {', '.join(FILE_KINDS)})")
    n = 0
    for n, (where, record) in enumerate(readers[kind](path), start=1):
        yield where, record
    if n == 0:
        raise TunelabError("no examples (the file is empty)", file=path)


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON array of records, each reported by the line it starts on. A .json file that holds
    JSON lines (what datasets' to_json writes) is read as JSONL."""
    _check_readable(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise TunelabError("not valid UTF-8", file=path, line=line) from None
    start = len(text) - len(text.lstrip())
    if not text[start:start + 1] == "[":
        if text[start:start + 1] == "{":
            yield from iter_jsonl(path)
            return
        if not text.strip():
            return
        raise TunelabError("expected a JSON array of records (or JSON lines)", file=path, line=1)
    # json.load would lose line numbers; raw_decode walks the array element by element.
    decoder = json.JSONDecoder()
    idx, line, counted = start + 1, 1, 0

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    idx = skip_ws(idx)
    if text[idx:idx + 1] == "]":
        return
    while True:
        line += text.count("\n", counted, idx)
        counted = idx
        try:
            value, idx = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as e:
            raise TunelabError(f"not valid JSON ({e.msg})", file=path, line=e.lineno) from None
        yield line, value
        idx = skip_ws(idx)
        if text[idx:idx + 1] == ",":
            idx = skip_ws(idx + 1)
            continue
        if text[idx:idx + 1] == "]":
            return
        raise TunelabError("not valid JSON (expected ',' or ']' between records)", file=path,
                           line=text.count("\n", 0, idx) + 1)


def _iter_csv(path: Path, delimiter: str = ",") -> Iterator[tuple[int, dict[str, str]]]:
    _check_readable(path)
    csv.field_size_limit(MAX_LINE_BYTES)   # the default (128 KiB) is smaller than long examples
    with path.open("rb") as f:
        def lines():
            # Decoded line by line (not by the text layer's 8 KiB chunks) so a bad byte is
            # reported on its own line.
            for n, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TunelabError(f"not valid UTF-8 (byte {e.start} of the line)", file=path,
                                       line=n) from None
                yield text.lstrip("\ufeff") if n == 1 else text
        reader = csv.reader(lines(), delimiter=delimiter)
        line = 1
        try:
            header = next(reader, None)
            if header is None:
                return
            if len(set(header)) != len(header) or any(not h.strip() for h in header):
                raise TunelabError(f"the header has empty or repeated column names: {header}",
                                   file=path, line=1)
            line = reader.line_num + 1
            for row in reader:
                start, line = line, reader.line_num + 1
                if not row:
                    continue
                if len(row) != len(header):
                    raise TunelabError(f"row has {len(row)} fields, the header has {len(header)} "
                                       f"({', '.join(header)})", file=path, line=start)
                yield start, dict(zip(header, row))
        except csv.Error as e:
            raise TunelabError(f"not valid CSV ({e})", file=path, line=reader.line_num) from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    _check_readable(path)
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise TunelabError(f"not a valid Parquet file ({str(e).splitlines()[0]})", file=path) from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _iter_dataset(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise TunelabError("not a folder saved by datasets (save_to_disk): no dataset_info.json "
                           "or dataset_dict.json", file=path) from None
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(ds)
        raise TunelabError(f"a DatasetDict with splits {splits}: pass one split's folder "
                           f"({path / next(iter(ds))})", file=path)
    row = 0
    for batch in ds.iter(batch_size=1024):
        cols = list(batch)
        for values in zip(*(batch[c] for c in cols)):
            row += 1
            yield row, dict(zip(cols, values))


@contextmanager
def atomic_write(path: str | Path) -> Iterator[TextIO]:
    """A text file that appears at `path` only once it is whole (temp file + rename): a crash
    never leaves a half-written file, and an old file stays intact until the new one replaces it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Write rows atomically; returns how many."""
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, value: Any) -> None:
    """Write one JSON document atomically."""
    with atomic_write(path) as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")
