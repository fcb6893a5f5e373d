"""`tunelab data ...` commands: inspect and prepare training data. Thin wrappers over tunelab.data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

data_app = typer.Typer(no_args_is_help=True, help="Inspect and prepare training data.")


def quiet_libraries() -> None:
    """Silence library chatter that is not ours (warnings, weight-loading bars)."""
    import os
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; the Trainer keeps its own


@data_app.command("render")
def data_render(file: Path = typer.Argument(..., help="JSONL of conversations"),
                tokenizer: str = typer.Option("smollm2-135m-instruct", "--tokenizer", "-t",
                                              help="model spec whose tokenizer and template to use"),
                as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
                max_length: Optional[int] = typer.Option(None),
                limit: Optional[int] = typer.Option(None, help="render the first N examples")):
    """Show exactly which tokens are trained (labels != -100)."""
    from tunelab import models
    from tunelab.data.conversation import read_conversations
    from tunelab.data.render import render
    quiet_libraries()
    tok = models.load_tokenizer(tokenizer)
    convs = read_conversations(file)[:limit] if limit else read_conversations(file)
    for i, conv in enumerate(convs):
        row = render(conv.messages, tok, max_length=max_length, source=conv.source)
        if as_json:
            print(json.dumps({"line": int(conv.source.rsplit(":", 1)[1]), **row}))
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
