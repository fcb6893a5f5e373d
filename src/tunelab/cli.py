"""`tunelab ...` commands. Thin: each calls the library functions and formats the result.

User errors (TunelabError) print one line on stderr and exit 1; usage errors exit 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from tunelab.errors import TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune open language models on your examples.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect and prepare training data.")
app.add_typer(data_app, name="data")


def _quiet_libraries(quiet: bool = True) -> None:
    import os
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars; the Trainer keeps its own


@app.command()
def train(config: Path = typer.Argument(..., help="YAML config"),
          set_: list[str] = typer.Option([], "--set", help="override: key=value (lora.r=8)"),
          quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Fine-tune a model from a YAML config."""
    from tunelab.config import load_config
    from tunelab.train import train as run_train
    cfg = load_config(config, set_)
    _quiet_libraries(quiet)
    result = run_train(cfg, quiet=quiet)
    if not quiet:
        print(f"model: {result.model_dir}")
        if result.adapter_dir:
            print(f"adapter: {result.adapter_dir}")
        vl = f"{result.valid_loss:.4f}" if result.valid_loss is not None else "-"
        print(f"train loss {result.train_loss:.4f}, valid loss {vl}, {result.steps} steps in "
              f"{result.seconds:.0f} s; metrics: {result.metrics_file}")


@app.command("eval")
def eval_(model: str = typer.Option(..., "--model", "-m", help="model spec"),
          data: Path = typer.Option(..., "--data", "-d", help="JSONL of conversations"),
          as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
          limit: Optional[int] = typer.Option(None, help="evaluate the first N examples"),
          max_new_tokens: Optional[int] = typer.Option(None, help="default: from the references"),
          batch_size: int = typer.Option(16),
          predictions: Optional[Path] = typer.Option(None, help="write predictions JSONL here"),
          quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Test loss and exact-match accuracy of the final assistant turn."""
    from tqdm.auto import tqdm

    from tunelab import models
    from tunelab.data.conversation import read_conversations
    from tunelab.data.io import write_jsonl
    from tunelab.evaluate import evaluate
    from tunelab.runtime import set_threads
    convs = read_conversations(data)[:limit] if limit else read_conversations(data)
    _quiet_libraries(quiet or as_json)
    set_threads()
    m, tok = models.load(model)
    with tqdm(total=len(convs), desc="generating", disable=quiet or as_json, unit="ex") as bar:
        res = evaluate(m, tok, convs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=bar.update)
    if predictions:
        write_jsonl(predictions, res.predictions)
    if as_json:
        print(json.dumps({"model": model, "data": str(data), **res.summary()}))
    else:
        print(f"examples          {res.examples}")
        print(f"test loss         {res.loss:.4f}")
        print(f"exact match       {res.exact_match:.1%}")
        print(f"normalized match  {res.normalized_match:.1%}  (case and punctuation ignored)")


@app.command()
def chat(model: str = typer.Argument("smollm2-135m-instruct", help="model spec"),
         prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="answer once and exit"),
         system: Optional[str] = typer.Option(None, "--system", help="system message"),
         max_new_tokens: int = typer.Option(256),
         temperature: float = typer.Option(0.0, help="0 = greedy")):
    """Chat with a model in the terminal (or answer one --prompt)."""
    from tunelab import models
    from tunelab.inference import generate
    from tunelab.runtime import set_threads
    _quiet_libraries(True)
    set_threads()
    m, tok = models.load(model)
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        reply = generate(m, tok, [history], max_new_tokens=max_new_tokens,
                         temperature=temperature)[0]
        history.append({"role": "assistant", "content": reply})
        return reply

    if prompt is not None:
        print(answer(prompt))
        return
    print(f"chatting with {model} (Ctrl-D or /exit to quit, /reset to clear the history)")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            del history[1 if system else 0:]
            continue
        if text:
            print(f"model> {answer(text)}")


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
    _quiet_libraries(True)
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


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="output folder"),
         examples: int = typer.Option(900, help="reviews to generate"),
         epochs: float = typer.Option(1.0),
         quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Offline end-to-end demo: sentiment task, base vs LoRA fine-tuned SmolLM2-135M."""
    from tunelab.demo import run_demo
    _quiet_libraries(quiet)
    report = run_demo(out, n_examples=examples, epochs=epochs, quiet=quiet)
    if quiet:
        print(json.dumps({k: report[k] for k in ("base", "fine_tuned")}, default=str))


def main() -> None:
    try:
        app()
    except TunelabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
