"""The prompt-template library: raw records -> instruction conversations.

Templates are Jinja in YAML files: the ones shipped in tunelab/data/templates/ plus a user's
own folder (--templates DIR or $TUNELAB_TEMPLATES; a user template replaces a shipped one of the
same name). Each template declares the fields a record must have (`fields`) and may have
(`optional`), and the loader checks that its Jinja uses no other variable, so the declaration
is the truth. A record that lacks a field is reported with its line, never dropped silently.

    templates:
      review-sentiment:
        description: product review -> sentiment
        fields: [review, sentiment]
        optional: [product]
        system: optional system message (Jinja too)
        phrasings:
          - user: "Classify ... Review: {{ review }}"
            assistant: "{{ sentiment }}"

Several phrasings of one task: the first is used, or with `mix` one per record (seeded), so a
model learns the task rather than one wording.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

ENV_DIR = "TUNELAB_TEMPLATES"


def _env():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    # StrictUndefined: a variable the record does not have is an error, never an empty string.
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                         trim_blocks=False, keep_trailing_newline=False)


@dataclass
class PromptTemplate:
    name: str
    fields: list[str]
    phrasings: list[dict[str, Any]]          # compiled {"user", "assistant", "system"?}
    optional: list[str] = field(default_factory=list)
    description: str = ""
    source: str = ""
    answer_fields: list[str] = field(default_factory=list)   # used by the assistant: kept as labels

    def apply(self, record: dict[str, Any], *, phrasing: int = 0) -> dict[str, Any]:
        """Render one record. Raises TunelabError(field=...) for a missing or empty field."""
        if not isinstance(record, dict):
            raise TunelabError(f"expected an object, got {type(record).__name__}")
        values = {}
        for f in self.fields:
            v = record.get(f)
            if v is None or (isinstance(v, str) and not v.strip()):
                raise TunelabError(f"{'missing' if v is None else 'empty'} (template "
                                   f"'{self.name}' needs: {', '.join(self.fields)})", field=f)
            values[f] = v
        for f in self.optional:
            v = record.get(f)
            values[f] = None if isinstance(v, str) and not v.strip() else v
        p = self.phrasings[phrasing % len(self.phrasings)]
        try:
            msgs = []
            if p.get("system") is not None:
                msgs.append({"role": "system", "content": p["system"].render(values).strip()})
            msgs.append({"role": "user", "content": p["user"].render(values).strip()})
            msgs.append({"role": "assistant", "content": p["assistant"].render(values).strip()})
        except Exception as e:   # a template bug (filters on wrong types): name the template
            raise TunelabError(f"template '{self.name}' failed on this record: {e}") from None
        for m in msgs:
            if not m["content"]:
                raise TunelabError(f"template '{self.name}' rendered an empty {m['role']} message")
        kept = {k: record[k] for k in self.answer_fields
                if isinstance(record.get(k), (str, int, float, bool))}
        return {"messages": msgs, **kept}


def _load_file(path: Path, text: str) -> dict[str, PromptTemplate]:
    import jinja2
    import jinja2.meta
    import yaml
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise TunelabError(f"not valid YAML ({getattr(e, 'problem', e)})", file=path,
                           line=mark.line + 1 if mark else None) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("templates"), dict):
        raise TunelabError("expected a mapping 'templates: {name: {fields, phrasings}}'", file=path)
    env = _env()
    out = {}
    for name, spec in doc["templates"].items():
        where = f"templates.{name}"
        if not isinstance(spec, dict):
            raise TunelabError("expected a mapping", file=path, field=where)
        fields = spec.get("fields")
        optional = spec.get("optional") or []
        if not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields):
            raise TunelabError("must be a non-empty list of field names", file=path,
                               field=f"{where}.fields")
        phrasings = spec.get("phrasings")
        if not isinstance(phrasings, list) or not phrasings:
            raise TunelabError("must be a non-empty list of {user, assistant}", file=path,
                               field=f"{where}.phrasings")
        compiled, answer_fields = [], set()
        for i, p in enumerate(phrasings):
            pw = f"{where}.phrasings[{i}]"
            if not isinstance(p, dict) or not all(isinstance(p.get(k), str)
                                                  for k in ("user", "assistant")):
                raise TunelabError("needs 'user' and 'assistant' text", file=path, field=pw)
            c = {}
            for role in ("system", "user", "assistant"):
                src = p.get(role, spec.get("system") if role == "system" else None)
                if src is None:
                    continue
                try:
                    ast = env.parse(src)
                except jinja2.TemplateSyntaxError as e:
                    raise TunelabError(f"Jinja syntax error: {e.message}", file=path,
                                       field=f"{pw}.{role}") from None
                used = jinja2.meta.find_undeclared_variables(ast)
                unknown = used - set(fields) - set(optional)
                if unknown:
                    raise TunelabError(f"uses {sorted(unknown)}, which are not declared in "
                                       "fields or optional", file=path, field=f"{pw}.{role}")
                if role == "assistant":
                    answer_fields |= used
                c[role] = env.from_string(src)
            compiled.append(c)
        out[name] = PromptTemplate(name=name, fields=list(fields), optional=list(optional),
                                   phrasings=compiled, description=str(spec.get("description", "")),
                                   source=str(path), answer_fields=sorted(answer_fields))
    return out


def load_templates(user_dir: str | Path | None = None) -> dict[str, PromptTemplate]:
    """Shipped templates, then the user's folder (its templates replace shipped ones by name)."""
    templates: dict[str, PromptTemplate] = {}
    shipped = resources.files("tunelab.data") / "templates"
    for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            templates.update(_load_file(Path(str(entry)), entry.read_text(encoding="utf-8")))
    user_dir = user_dir or os.environ.get(ENV_DIR)
    if user_dir:
        folder = Path(user_dir)
        if not folder.is_dir():
            raise TunelabError("templates folder not found", file=folder)
        for path in sorted(folder.glob("*.y*ml")):
            templates.update(_load_file(path, path.read_text(encoding="utf-8")))
    return templates


def get_template(name: str, user_dir: str | Path | None = None) -> PromptTemplate:
    templates = load_templates(user_dir)
    if name not in templates:
        import difflib
        close = difflib.get_close_matches(name, templates, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise TunelabError(f"unknown template '{name}'{hint}; available: {', '.join(sorted(templates))}",
                           field="template")
    return templates[name]


def apply_records(template: PromptTemplate, records: Iterable[tuple[int, Any]], *,
                  mix: bool = False, seed: int = 0, mapping: dict[str, str] | None = None,
                  values: dict[str, str] | None = None, file: str | Path | None = None,
                  errors: list[TunelabError] | None = None) -> Iterator[dict[str, Any]]:
    """Stream conversations; with `errors` given, bad records are collected there instead of
    raising. `mapping` renames the record's columns to the template's fields
    (review=text reads field 'review' from column 'text'); `values` fixes a field for every
    record (target_language=French)."""
    rng = random.Random(seed)
    n = len(template.phrasings)
    for where, record in records:
        phrasing = rng.randrange(n) if mix else 0
        if isinstance(record, dict) and (mapping or values):
            record = dict(record)
            for fld, column in (mapping or {}).items():
                record[fld] = record.get(column)
            record.update(values or {})
        try:
            yield template.apply(record, phrasing=phrasing)
        except TunelabError as e:
            err = TunelabError(e.reason, file=file, line=where, field=e.field)
            if errors is None:
                raise err from None
            errors.append(err)


class _BadRecords(Exception):
    pass


def template_file(src: str | Path, dst: str | Path, name: str, *, mix: bool = False,
                  seed: int = 0, user_dir: str | Path | None = None,
                  mapping: dict[str, str] | None = None, values: dict[str, str] | None = None,
                  skip_invalid: bool = False) -> tuple[int, list[TunelabError]]:
    """Template every record of `src` into a chat JSONL file, atomically.

    Records lacking a field: by default nothing is written and the error names the first with
    its line and lists the others; with skip_invalid the others are written and the bad ones
    returned (the CLI prints them). Returns (examples written, skipped records' errors).
    """
    from tunelab.data.formats import summarize_errors
    from tunelab.data.io import read_records, write_jsonl
    template = get_template(name, user_dir)
    errors: list[TunelabError] = []
    rows = apply_records(template, read_records(src), mix=mix, seed=seed, mapping=mapping,
                         values=values, file=src, errors=errors)

    def checked():
        yield from rows
        if errors and not skip_invalid:
            raise _BadRecords
    try:
        n = write_jsonl(dst, checked())
    except _BadRecords:
        raise TunelabError(summarize_errors(errors, what="records lacking fields")) from None
    return n, errors
