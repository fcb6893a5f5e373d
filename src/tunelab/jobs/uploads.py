"""Uploaded files: converted and validated with tunelab.data, as `tunelab data convert` and
`tunelab data validate` do; templated and split as `tunelab data template / split`.

A file lives in `files/<id>/`: the bytes as uploaded (`upload<suffix>`; the user's file name is
only a label, never part of a path) and, once converted, `data.jsonl`: chat JSONL for
conversations, OpenAI's DPO format for preference pairs. The file's `validation` says which
(`kind`: "conversations" | "preferences"; tunelab.data.preference.data_kind_of reads it from
data.jsonl itself) and `format` the format it was uploaded in. Messages that name a server path
name the user's file instead.
"""
from __future__ import annotations

import re
import shutil
import threading
import unicodedata
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from tunelab.data.formats import ConvertReport, convert_records
from tunelab.data.io import file_kind, read_records, write_jsonl
from tunelab.data.validate import ERROR_LABELS, SAMPLES, drop_duplicates
from tunelab.errors import TunelabError
from tunelab.jobs.store import File, Store, new_id

PREVIEW = 5          # conversations shown after a template is applied
# a file's status: received (and being checked), checked and usable, or not usable
FILE_STATUSES = ("uploaded", "processed", "error")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_filename(name: str | None) -> str:
    """The last component of what the client sent (both separators), without control
    characters, at most 255 bytes; never empty, never '.' or '..'."""
    name = unicodedata.normalize("NFC", name or "")
    name = PureWindowsPath(PurePosixPath(name.replace("\\", "/")).name).name
    name = _CONTROL.sub("", name).strip().lstrip(".") or "upload"
    stem, suffix = (name, "") if len(Path(name).suffix) > 16 else \
        (name[:len(name) - len(Path(name).suffix)], Path(name).suffix)
    while len((stem + suffix).encode("utf-8")) > 255:   # shorten the stem, keep the suffix
        stem = stem[:-1]
    return stem + suffix


def upload_path(store: Store, file_id: str, filename: str) -> Path:
    """Where the raw bytes go: `upload` plus the name's suffix, which tells tunelab.data the
    file's kind (.csv, .parquet, ...; without one it sniffs the content)."""
    suffix = Path(filename).suffix.lower()
    ok = 1 < len(suffix) <= 10 and suffix[1:].isalnum() and suffix[1:].isascii()
    folder = store.path("files") / file_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder / ("upload" + (suffix if ok else ""))


class _Tokenizers:
    """Tokenizers for token statistics, loaded once per model spec."""

    def __init__(self):
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, spec: str):
        with self._lock:
            if spec not in self._cache:
                from tunelab import models
                self._cache[spec] = models.load_tokenizer(spec)
            return self._cache[spec]


tokenizers = _Tokenizers()


def _redact(text: str, paths: dict[Path, str]) -> str:
    for path, label in paths.items():
        text = text.replace(str(path), label)
    return text


def _redact_report(value: Any, paths: dict[Path, str]) -> Any:
    if isinstance(value, str):
        return _redact(value, paths)
    if isinstance(value, list):
        return [_redact_report(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: _redact_report(v, paths) for k, v in value.items()}
    return value


def _error_report(filename: str, errors: list[TunelabError], examples: int,
                  error_kind: str, data_kind: str | None = None) -> dict[str, Any]:
    """A ValidationReport-shaped answer for a file that could not even be converted (its
    `kind`: what its rows were recognised as, None when not even that)."""
    label = ERROR_LABELS.get(error_kind, error_kind.replace("_", " "))
    return {"file": filename, "kind": data_kind, "trainable": False, "examples": examples,
            "valid": 0, "errors": {error_kind: {"label": label, "count": len(errors),
                                                "first": [str(e) for e in errors[:SAMPLES]]}},
            "warnings": [], "warning_details": [], "duplicates": None, "tokens": None}


def _jsonl_records(raw: Path, bad: list[TunelabError]):
    """Good lines of a JSONL file; bad ones (not JSON, not UTF-8) are collected."""
    from tunelab.data.io import iter_jsonl_lenient
    for line, obj in iter_jsonl_lenient(raw):
        if isinstance(obj, TunelabError):
            bad.append(obj)
        else:
            yield line, obj


def _as_uploaded(raw: Path) -> str | None:
    """The format a JSONL upload is validated in as uploaded, so every line number is the
    user's and every bad line is reported (format detection would stop at rows that differ):
    "messages" when its first rows are mostly conversations, their preference format when they
    are mostly preference pairs (the validator reads every preference format); None: convert
    it first."""
    from itertools import islice

    from tunelab.data.io import iter_jsonl_lenient
    from tunelab.data.preference import DETECT_ROWS, detect_kind
    # the rows the validator detects from (bad lines included), so the two agree
    kind, fmt = detect_kind(obj for _, obj in islice(iter_jsonl_lenient(raw), DETECT_ROWS))
    return {"conversations": "messages", "preferences": fmt}.get(kind)


DATA_LABELS = {"conversations": "as chat JSONL", "preferences": "as OpenAI DPO JSONL"}


def process(store: Store, f: File, *, model: str | None, max_length: int = 1024,
            dedupe: bool = False) -> File:
    """Convert and validate an uploaded file; sets status ("processed" | "error"),
    status_details (the first errors, line-numbered), validation (with the data's `kind`),
    format and data_path. Exact duplicates are a warning; `dedupe` drops them from data.jsonl
    (as empty lines: every other line keeps the number the user's file gives it)."""
    from tunelab.data.formats import summarize_errors
    from tunelab.data.validate import validate_file
    raw = store.path(f.raw_path)
    data = raw.parent / "data.jsonl"
    labels = {raw: f.filename, data: f"{f.filename} ({DATA_LABELS['conversations']})"}
    report = ConvertReport(format="")
    bad: list[TunelabError] = []
    try:
        kind = file_kind(raw)
        # JSONL in a form the validator reads (conversations, preference pairs) is validated
        # as uploaded; the rest is converted first and its converted rows validated.
        as_is = _as_uploaded(raw) if kind == "jsonl" else None
        records = _jsonl_records(raw, bad) if kind == "jsonl" else read_records(raw, kind=kind)
        rows = convert_records(records, fmt=as_is, file=raw, report=report)
        report.examples = write_jsonl(data, rows)
    except TunelabError as e:   # unreadable, empty, or no format detected
        data.unlink(missing_ok=True)
        result = _error_report(f.filename, [_redacted(e, labels)], 0, e.kind or "unreadable",
                               report.kind or None)
        if e.kind == "unknown_format":   # raw rows: the columns a template could map
            result["columns"] = _columns(raw)
        return _set_error(store, f, _redact(str(e), labels), result)
    f.format = report.format
    labels[data] = f"{f.filename} ({DATA_LABELS[report.kind]})"
    errors = sorted(bad + report.errors, key=lambda e: e.line or 0)
    if errors and not as_is:
        data.unlink(missing_ok=True)
        errs = [_redacted(e, labels) for e in errors]
        return _set_error(store, f, summarize_errors(errs),
                          _error_report(f.filename, errs, report.examples + len(errs),
                                        "conversion", report.kind))
    tokenizer = None
    warnings: list[dict[str, Any]] = []
    if model:
        try:
            tokenizer = tokenizers.get(model)
        except TunelabError as e:
            warnings.append({"kind": "no_token_statistics",
                             "message": f"no token statistics: {e}"})
    rep = validate_file(raw if as_is else data, tokenizer=tokenizer, model=model or "",
                        max_length=max_length, dedupe=dedupe)
    if dedupe and rep.trainable and rep.duplicates:
        drop_duplicates(data, data)
    result = _redact_report(rep.to_json(), labels)
    result["file"] = f.filename
    result["warnings"] = [w["message"] for w in warnings] + result["warnings"]
    result["warning_details"] = warnings + result["warning_details"]
    result["format"] = report.format
    result["kind"] = report.kind   # what data.jsonl holds, as converted
    if not rep.trainable:
        data.unlink(missing_ok=True)
        firsts = [m for e in rep.errors.values() for m in e["first"]]
        n = sum(e["count"] for e in rep.errors.values())
        details = "; ".join(_redact(m, labels) for m in firsts[:3])
        more = f" (and {n - len(firsts[:3])} more errors)" if n > 3 else ""
        return _set_error(store, f, details + more, result)
    f.status, f.status_details, f.validation = "processed", None, result
    f.data_path = store.rel(data)
    store.update(File, f.id, status=f.status, status_details=None, validation=result,
                 format=f.format, data_path=f.data_path)
    return f


def _redacted(e: TunelabError, labels: dict[Path, str]) -> TunelabError:
    return e.located(file=_redact(e.file, labels) if e.file else None, line=e.line,
                     field=e.field)


def _columns(raw: Path) -> list[str]:
    """The fields of a file's first records (what a prompt template can map), or []."""
    from itertools import islice
    try:
        kind = file_kind(raw)
        records = [r for r in islice(read_records(raw, kind=kind), 20) if isinstance(r, dict)]
    except (TunelabError, ValueError, OSError):
        return []
    return list(dict.fromkeys(k for r in records for k in r))


def deduped_path(store: Store, f: File) -> Path:
    """Where a job that asks for `dedupe` reads the file: its data without exact duplicates."""
    return store.path(f.data_path).with_name("data.dedupe.jsonl")


def write_deduped(store: Store, f: File) -> list[list[int]]:
    """deduped_path(f), written from the file's data (again, atomically); [line, first line]
    of each duplicate dropped."""
    return drop_duplicates(store.path(f.data_path), deduped_path(store, f))


def _set_error(store: Store, f: File, details: str, validation: dict[str, Any]) -> File:
    f.status, f.status_details, f.validation = "error", details, validation
    store.update(File, f.id, status="error", status_details=details, validation=validation,
                 format=f.format, data_path=None)
    return f


def new_file(store: Store, owner: str, filename: str, purpose: str,
             rows: Iterable[Any] | None = None, source: Path | None = None) -> File:
    """A file made on the server (template / split output, results CSV): JSON rows or a copy."""
    file_id = new_id("file-")
    filename = safe_filename(filename)
    dest = upload_path(store, file_id, filename)
    if rows is not None:
        write_jsonl(dest, rows)
    elif source is not None:
        shutil.copyfile(source, dest)
    status = "processed" if purpose != "fine-tune" else "uploaded"
    return store.add(File(id=file_id, owner=owner, filename=filename, purpose=purpose,
                          bytes=dest.stat().st_size, status=status, raw_path=store.rel(dest)))


def delete_file(store: Store, f: File) -> None:
    store.delete(f)
    shutil.rmtree(store.path("files") / f.id, ignore_errors=True)


def apply_template(store: Store, f: File, *, template: str, mix: bool = False, seed: int = 0,
                   mapping: dict[str, str] | None = None, values: dict[str, str] | None = None,
                   model: str | None) -> tuple[File, list[dict[str, Any]]]:
    """The file's records through a prompt template -> a new file (and a preview)."""
    from tunelab.data.formats import summarize_errors
    from tunelab.data.prompts import apply_records, get_template
    raw = store.path(f.raw_path)
    tpl = get_template(template)
    errors: list[TunelabError] = []
    labels = {raw: f.filename}
    rows = list(apply_records(tpl, read_records(raw), mix=mix, seed=seed, mapping=mapping,
                              values=values, file=raw, errors=errors))
    if errors:
        errs = [_redacted(e, labels) for e in errors]
        raise TunelabError(summarize_errors(errs, what="records lacking fields"),
                           field=errs[0].field)
    out = new_file(store, f.owner, f"{Path(f.filename).stem}.{template}.jsonl", "fine-tune",
                   rows=rows)
    return process(store, out, model=model), rows[:PREVIEW]


def split(store: Store, f: File, *, val: float, test: float, seed: int,
          stratify_by: str | None, model: str | None) -> dict[str, File | None]:
    """train / validation / test files from a processed file (an empty part: None)."""
    import tempfile

    from tunelab.data.split import split_file
    if f.data_path is None:
        raise TunelabError(f"the file is not a processed data file (status {f.status})",
                           field="file_id")
    stem = Path(f.filename).stem
    with tempfile.TemporaryDirectory(dir=store.path("files")) as tmp:
        counts = split_file(store.path(f.data_path), tmp, val=val, test=test, seed=seed,
                            stratify_by=stratify_by)
        out: dict[str, File | None] = {}
        for part, name in (("train", "train"), ("val", "validation"), ("test", "test")):
            if counts[part] == 0:
                out[name] = None
                continue
            made = new_file(store, f.owner, f"{stem}.{part}.jsonl", "fine-tune",
                            source=Path(tmp) / f"{part}.jsonl")
            out[name] = process(store, made, model=model)
    return out


__all__ = ["safe_filename", "upload_path", "process", "new_file", "delete_file",
           "apply_template", "split", "tokenizers", "deduped_path", "write_deduped"]
