"""`tunelab data ...` commands: inspect and prepare training data. Thin wrappers over tunelab.data."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from tunelab.data.formats import FORMATS, PREFERENCE_FORMATS
from tunelab.errors import TunelabError

data_app = typer.Typer(no_args_is_help=True, help="Inspect and prepare training data.")


def quiet_libraries() -> None:
    """Silence library chatter that is not ours (warnings, weight-loading bars)."""
    import os
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; the Trainer keeps its own


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TunelabError(f"expected NAME=VALUE, got {item!r}", field=option)
        out[key.strip()] = value
    return out


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr)


@data_app.command("render")
def data_render(file: Path = typer.Argument(..., help="JSONL of conversations"),
                tokenizer: str = typer.Option("smollm2-135m-instruct", "--tokenizer", "-t",
                                              "--model", "-m", help="model spec (or a folder "
                                              "with only tokenizer files) whose tokenizer and "
                                              "template to use"),
                as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
                max_length: Optional[int] = typer.Option(None),
                limit: Optional[int] = typer.Option(None, help="render the first N examples")):
    """Show exactly which tokens are trained (labels != -100)."""
    from tunelab import models
    from tunelab.data.conversation import read_conversations, split_source
    from tunelab.data.render import render_examples
    quiet_libraries()
    tok = models.load_tokenizer(tokenizer)
    convs = read_conversations(file)[:limit] if limit else read_conversations(file)
    for conv in convs:
        # one row, or one per trained turn where the template rewrites earlier turns (Qwen3)
        rows = render_examples([conv.messages], tok, max_length=max_length, sources=[conv.source])
        for row in rows:
            if as_json:
                print(json.dumps({"line": split_source(conv.source)[1], **row}))
                continue
            trained = sum(1 for x in row["labels"] if x != -100)
            print(f"--- {conv.source}: {len(row['input_ids'])} tokens, {trained} trained "
                  "(trained text is [[bracketed]]) ---")
            print(_visualize(tok, row))


def _visualize(tok, row) -> str:
    out, in_span = [], False
    for tid, lab in zip(row["input_ids"], row["labels"]):
        trained = lab != -100
        if trained and not in_span:
            out.append("[[")
        elif not trained and in_span:
            out.append("]]")
        in_span = trained
        out.append(tok.decode([tid]))
    if in_span:
        out.append("]]")
    return "".join(out)


TARGETS = {"chat": "conversations", "dpo": "preferences"}


@data_app.command("convert")
def data_convert(file: Path = typer.Argument(..., help="JSONL, JSON, CSV, TSV, Parquet, or a "
                                             "folder saved by datasets"),
                 output: Path = typer.Option(..., "--output", "-o", help="JSONL to write"),
                 to: Optional[str] = typer.Option(None, "--to", help="chat (conversations -> "
                                                  "OpenAI messages) or dpo (preference pairs -> "
                                                  "OpenAI's DPO format); default: whichever the "
                                                  "data holds"),
                 from_: Optional[str] = typer.Option(None, "--from", help="force the input "
                                                     f"format: {', '.join(FORMATS)}; preference "
                                                     f"pairs: {', '.join(PREFERENCE_FORMATS)}"),
                 system: Optional[str] = typer.Option(None, "--system",
                                                      help="system message for every "
                                                      "conversation (or pair's prompt) that has "
                                                      "none"),
                 dedupe: bool = typer.Option(False, "--dedupe", help="leave out exact "
                                             "duplicates of earlier examples (each is "
                                             "reported with its line)"),
                 quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Convert a dataset in any common format to chat JSONL, or preference pairs to OpenAI's
    DPO format (format detected from the first rows)."""
    from tqdm.auto import tqdm

    from tunelab.data.formats import convert_file
    if to is not None and to not in TARGETS:
        raise TunelabError(f"unknown target format {to!r} (expected one of: "
                           f"{', '.join(TARGETS)})", field="to")
    with tqdm(desc="converting", unit="ex", disable=True if quiet else None, file=sys.stderr,
              leave=False) as bar:
        report = convert_file(file, output, fmt=from_, system=system,
                              kind=TARGETS.get(to), progress=bar.update)
    noun = "preference pairs" if report.kind == "preferences" else "examples"
    dropped = []
    if dedupe:
        from tunelab.data.validate import drop_duplicates
        dropped = drop_duplicates(output, output, keep_lines=False)
    if report.kind == "preferences":
        _say(quiet, f"converted {report.examples - len(dropped):,} preference pairs "
                    f"({report.format} -> OpenAI DPO format) -> {output}")
    else:
        _say(quiet, f"converted {report.examples - len(dropped):,} examples ({report.format})"
                    f" -> {output}")
    if dropped:   # rows of the input: convert writes one line per row
        shown = ", ".join(f"row {a} = row {b}" for a, b in dropped[:5])
        _say(quiet, f"dropped {len(dropped):,} exact duplicate {noun} ({shown}"
                    f"{', ...' if len(dropped) > 5 else ''})")


@data_app.command("template")
def data_template(file: Optional[Path] = typer.Argument(None, help="records (any input format)"),
                  template: Optional[str] = typer.Option(None, "--template", "-t",
                                                         help="template name (--list shows them)"),
                  output: Optional[Path] = typer.Option(None, "--output", "-o"),
                  mix: bool = typer.Option(False, "--mix", help="mix the template's phrasings"),
                  seed: int = typer.Option(0, help="seed for --mix"),
                  templates_dir: Optional[Path] = typer.Option(None, "--templates",
                                                               help="folder of your own YAML "
                                                               "templates"),
                  mapping: list[str] = typer.Option([], "--map", help="FIELD=COLUMN: read a "
                                                    "template field from another column"),
                  value: list[str] = typer.Option([], "--value", help="FIELD=TEXT: the same "
                                                  "value for every record"),
                  skip_invalid: bool = typer.Option(False, "--skip-invalid", help="write the good "
                                                    "records and list the bad ones"),
                  list_: bool = typer.Option(False, "--list", help="list the templates"),
                  quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Turn raw records into instruction conversations with a prompt template."""
    from tunelab.data.prompts import load_templates, template_file
    if list_:
        for name, t in sorted(load_templates(templates_dir).items()):
            opt = f" [{', '.join(t.optional)}]" if t.optional else ""
            print(f"{name:18} {', '.join(t.fields)}{opt}  ({len(t.phrasings)} phrasings) "
                  f"{t.description}")
        return
    if file is None or template is None or output is None:
        raise TunelabError("give FILE, --template NAME and --output FILE (or --list)")
    n, skipped = template_file(file, output, template, mix=mix, seed=seed, user_dir=templates_dir,
                               mapping=_pairs(mapping, "map"), values=_pairs(value, "value"),
                               skip_invalid=skip_invalid)
    for e in skipped[:20]:
        _say(quiet, f"skipped {e}")
    if len(skipped) > 20:
        _say(quiet, f"... and {len(skipped) - 20} more skipped")
    _say(quiet, f"wrote {n:,} examples -> {output}" + (f" ({len(skipped)} skipped)" if skipped else ""))


@data_app.command("validate")
def data_validate(file: Path = typer.Argument(..., help="JSONL of conversations or of "
                                              "preference pairs to check"),
                  model: str = typer.Option("smollm2-135m-instruct", "--tokenizer", "-t",
                                            "--model", "-m", help="model spec (or a folder with "
                                            "only tokenizer files) whose template counts the "
                                            "tokens"),
                  max_length: Optional[int] = typer.Option(None, help="tokens per example "
                                                           "(default: the training default)"),
                  epochs: float = typer.Option(3.0, help="for the training-token estimate"),
                  val: list[Path] = typer.Option([], "--val", help="validation file: check leakage"),
                  test: list[Path] = typer.Option([], "--test", help="test file: check leakage"),
                  no_tokens: bool = typer.Option(False, "--no-tokens", help="skip token statistics"),
                  as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
                  quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Check a training file (conversations or preference pairs, told apart by its rows); exit 0
    when it can be trained on, 1 when not."""
    import os

    from tqdm.auto import tqdm

    from tunelab.config import DEFAULT_MAX_LENGTH
    from tunelab.data.validate import validate_file
    tok = None
    if not no_tokens:
        from tunelab import models
        quiet_libraries()
        tok = models.load_tokenizer(model)
        # batched tokenization runs on every core: undo quiet_libraries' "false" for this command
        # (measured here: unset gives the Rust tokenizer both cores, "true" did not reliably)
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    with tqdm(desc="validating", unit="ex", disable=True if (quiet or as_json) else None,
              file=sys.stderr) as bar:
        report = validate_file(file, tokenizer=tok, model=model,
                               max_length=max_length or DEFAULT_MAX_LENGTH, epochs=epochs,
                               others=[*val, *test], progress=bar.update)
    if as_json:
        print(json.dumps(report.to_json()))
    else:
        print(report.format())
    if not report.trainable:
        raise typer.Exit(1)


@data_app.command("split")
def data_split(file: Path = typer.Argument(..., help="JSONL to split"),
               output: Path = typer.Option(..., "--output", "-o", help="folder for train/val/test.jsonl"),
               val: float = typer.Option(0.1, "--val", help="validation fraction"),
               test: float = typer.Option(0.1, "--test", help="test fraction"),
               seed: int = typer.Option(0, "--seed"),
               stratify_by: Optional[str] = typer.Option(None, "--stratify-by",
                                                         help="a field (e.g. label), or "
                                                         "'assistant' for the final answer"),
               quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Deterministic train/val/test split; exact duplicates never land in two splits, nor do
    preference pairs of one prompt."""
    from tunelab.data.split import split_file
    counts = split_file(file, output, val=val, test=test, seed=seed, stratify_by=stratify_by)
    _say(quiet, "  ".join(f"{k} {v:,}" for k, v in counts.items()) + f" -> {output}")


@data_app.command("replay")
def data_replay(model: str = typer.Option(..., "--model", "-m",
                                          help="the base model you will fine-tune"),
                output: Path = typer.Option(..., "--output", "-o", help="JSONL to write"),
                n: int = typer.Option(100, "-n", help="conversations to make (about 10% of "
                                      "the training examples is a usual share)"),
                prompts: Optional[Path] = typer.Option(None, "--prompts", help="JSONL of "
                                                       "{'prompt': ...} (default: tunelab's "
                                                       "240 general prompts)"),
                seed: int = typer.Option(0, "--seed"),
                max_new_tokens: int = typer.Option(160, "--max-new-tokens"),
                precision: str = typer.Option("auto", "--precision"),
                quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Replay data against forgetting: general prompts answered by the base model itself.

    Train with it as `replay_file:` (or append it to the training file); the comparison's
    general check shows what it kept."""
    from tqdm.auto import tqdm

    from tunelab.data.io import write_jsonl
    from tunelab.data.replay import make_replay
    quiet_libraries()
    with tqdm(total=n, desc="answering", unit="prompt", disable=True if quiet else None,
              file=sys.stderr) as bar:
        rows, stats = make_replay(model, n, prompts=prompts, seed=seed,
                                  max_new_tokens=max_new_tokens, precision=precision,
                                  progress=bar.update)
    write_jsonl(output, rows)
    dropped = f"; dropped {stats.cut} cut at {max_new_tokens} tokens" if stats.cut else ""
    dropped += f", {stats.empty} empty" if stats.empty else ""
    _say(quiet, f"{stats.kept} of {stats.asked} answers by {model}{dropped} -> {output}")
