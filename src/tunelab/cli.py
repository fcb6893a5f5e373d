"""`tunelab ...` commands. Thin: each calls the library functions and formats the result.

User errors (TunelabError) print one line on stderr and exit 1; usage errors exit 2.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from tunelab.cli_data import data_app, quiet_libraries
from tunelab.errors import TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune open language models on your examples.")
app.add_typer(data_app, name="data")


# eval's and compare's --batch-size (inference.generation_batch_size decides the default)
GENERATION_BATCH_HELP = ("rows per generate() call (default: as many as a 1 GiB key/value cache "
                         "holds, up to tunelab.inference.MAX_GENERATION_BATCH)")

@app.command()
def train(config: Path = typer.Argument(..., help="YAML config"),
          set_: list[str] = typer.Option([], "--set", help="override: key=value (lora.r=8)"),
          objective: Optional[str] = typer.Option(
              None, "--objective", help="what is optimised: sft (conversations) or dpo "
              "(preference pairs); same as --set objective=..."),
          resume: bool = typer.Option(False, "--resume",
                                      help="continue a killed, failed or cancelled run from its "
                                      "last checkpoint"),
          quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Fine-tune a model from a YAML config (also under torchrun / accelerate launch).

    Ctrl-C stops after the current step with a checkpoint (--resume continues); twice: at once."""
    from tunelab.config import load_config
    from tunelab.train import train as run_train
    from tunelab.train.events import TrainingCancelled
    from tunelab.train.progress import CtrlCCancels
    cfg = load_config(config, [*set_, *([f"objective={objective}"] if objective else [])])
    quiet_libraries()
    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        with CtrlCCancels(announce=main_process) as ctrl_c:
            run_train(cfg, resume=resume, quiet=quiet, should_cancel=ctrl_c)
    except TrainingCancelled as e:
        if main_process:
            print(f"tunelab: {e}", file=sys.stderr)
        raise typer.Exit(130) from None


# the grader options of `eval` and `compare`, declared once
JUDGE_URL_OPTION = typer.Option(
    None, "--judge-url", help="--task judge: the grader's OpenAI-compatible endpoint (a base "
    "URL ending in /v1; default: OPENAI_BASE_URL, else OpenAI's API)")
JUDGE_MODEL_OPTION = typer.Option(
    None, "--judge-model", help="--task judge: the grader model (default: gpt-4o-mini)")
JUDGE_KEY_OPTION = typer.Option(
    None, "--judge-key-env", help="--task judge: the environment variable holding the "
    "grader's API key (default OPENAI_API_KEY)")
JUDGE_RUBRIC_OPTION = typer.Option(
    None, "--judge-rubric", help="--task judge: a text file with the grading instructions "
    "(criteria for grades 1 to 5) instead of tunelab's default rubric")


def _judge_config(task: str, url, model, key_env, rubric, pairwise: bool = False,
                  concurrency: int = 4, seed: int = 0):
    """A JudgeConfig when the judge task or any --judge-* option is asked for, else None
    (compare then refuses --judge-* without --task judge)."""
    if task != "judge" and url is None and model is None and rubric is None and not pairwise:
        return None
    from tunelab.evaluate.judge import DEFAULT_KEY_ENV, DEFAULT_MODEL, JudgeConfig, read_rubric
    return JudgeConfig(model=model or DEFAULT_MODEL, url=url, key_env=key_env or DEFAULT_KEY_ENV,
                       rubric=read_rubric(rubric) if rubric else None,
                       rubric_source=str(rubric) if rubric else None, pairwise=pairwise,
                       concurrency=concurrency, seed=seed)


@app.command("eval")
def eval_(model: str = typer.Option(..., "--model", "-m", help="model spec"),
          data: Optional[Path] = typer.Option(None, "--data", "-d", help="JSONL of conversations "
                                              "(the final assistant turn is the reference) or of "
                                              "preference pairs (the preference task); the "
                                              "code task defaults to HumanEval"),
          task: str = typer.Option("auto", "--task", help="auto, classification, exact_match, "
                                   "gsm8k, rouge, code, preference, loss or judge (a grader "
                                   "model scores each answer; auto: preference for a file of "
                                   "preference pairs, never judge)"),
          judge_url: Optional[str] = JUDGE_URL_OPTION,
          judge_model: Optional[str] = JUDGE_MODEL_OPTION,
          judge_key_env: Optional[str] = JUDGE_KEY_OPTION,
          judge_rubric: Optional[Path] = JUDGE_RUBRIC_OPTION,
          labels: Optional[str] = typer.Option(None, help="classification labels: a,b,c "
                                               "(default: the references' answers)"),
          as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
          limit: Optional[int] = typer.Option(None, help="evaluate the first N examples"),
          max_new_tokens: Optional[int] = typer.Option(None, help="default: what the task needs"),
          max_length: Optional[int] = typer.Option(None, help="tokens per example for the loss "
                                                   "and per answer of a preference pair "
                                                   "(default: what the model was trained with)"),
          batch_size: Optional[int] = typer.Option(None, help=GENERATION_BATCH_HELP),
          precision: str = typer.Option("auto", help="weights for inference: auto (bf16 where "
                                        "the hardware has it), bf16, fp16 or fp32"),
          predictions: Optional[Path] = typer.Option(None, help="write scored answers (JSONL) "
                                                     "here, batch by batch"),
          quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Score a model on test data: task metrics of the final assistant turn, and test loss; or
    held-out preference pairs by log-probability (accuracy, margin)."""
    from tqdm.auto import tqdm

    from tunelab import models
    from tunelab.evaluate import evaluate, load_examples, make_task
    from tunelab.evaluate.report import format_metrics
    from tunelab.runtime import set_threads, torch_dtype
    examples = load_examples(task, data, limit=limit)
    task_obj = make_task(task, examples, labels=labels.split(",") if labels else None,
                         judge=_judge_config(task, judge_url, judge_model, judge_key_env,
                                             judge_rubric))
    quiet_libraries()
    set_threads()
    m, tok = models.load(model, dtype=torch_dtype(precision))
    max_length = max_length or models.trained_with(model).max_length
    with tqdm(total=len(examples), desc=f"{task_obj.name}", disable=quiet or as_json,
              unit="ex", file=sys.stderr) as bar:
        res = evaluate(m, tok, examples, task=task_obj, max_length=max_length,
                       batch_size=batch_size, max_new_tokens=max_new_tokens,
                       predictions_file=predictions, progress=bar.update, model_name=model)
    if as_json:
        print(json.dumps({"model": model, "data": str(data) if data else None,
                          **res.to_json()}))
        return
    print(format_metrics(res))
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)


@app.command()
def compare(tuned: list[str] = typer.Option(..., "--tuned", help="fine-tuned model: a tunelab "
                                            "run, model or adapter folder (its base is found), "
                                            "or any spec; repeat it to compare several side by "
                                            "side, NAME=SPEC to name one (--tuned sft=runs/sft "
                                            "--tuned dpo=runs/dpo)"),
            data: Path = typer.Option(..., "--data", "-d", help="test conversations"),
            base: Optional[str] = typer.Option(None, "--base", help="base model (default: the "
                                               "one --tuned was fine-tuned from)"),
            task: str = typer.Option("auto", "--task", help="auto, classification, "
                                     "exact_match, gsm8k, rouge, code or judge (a grader model "
                                     "scores each free-form answer 1-5, with its reason)"),
            judge_url: Optional[str] = JUDGE_URL_OPTION,
            judge_model: Optional[str] = JUDGE_MODEL_OPTION,
            judge_key_env: Optional[str] = JUDGE_KEY_OPTION,
            judge_rubric: Optional[Path] = JUDGE_RUBRIC_OPTION,
            judge_pairwise: bool = typer.Option(False, "--judge-pairwise", help="--task judge: "
                                                "also ask the grader which of two answers is "
                                                "better, the best fine-tuned model's or the "
                                                "best baseline's, in both orders; reports the "
                                                "win rate with a 95% Wilson interval"),
            judge_concurrency: int = typer.Option(4, "--judge-concurrency", min=1,
                                                  help="grader requests at a time"),
            judge_seed: int = typer.Option(0, "--judge-seed", help="the grader's seed, and "
                                           "which order of a pair is asked first"),
            labels: Optional[str] = typer.Option(None, help="classification labels: a,b,c"),
            train_file: Optional[Path] = typer.Option(None, "--train", help="few-shot examples "
                                                      "come from here (default: the run's "
                                                      "training file)"),
            few_shot: int = typer.Option(5, "--few-shot", help="examples in the few-shot "
                                         "prompt (0: none)"),
            system: Optional[str] = typer.Option(None, "--system", help="also try the base "
                                                 "model with this system prompt"),
            general: Optional[Path] = typer.Option(None, "--general", help="conversations to "
                                                   "check forgetting on (loss, exact match)"),
            preference: Optional[Path] = typer.Option(None, "--preference", help="held-out "
                                                      "preference pairs: how often the base and "
                                                      "each fine-tuned model prefer the chosen "
                                                      "answer, and the mean margin"),
            no_general_check: bool = typer.Option(False, "--no-general-check",
                                                  help="skip the shipped general prompts"),
            retrieval: int = typer.Option(0, "--retrieval", help="K: also try the base model "
                                          "with the K training examples most similar to each "
                                          "request as shots (BM25 over the user turn)"),
            corpus: Optional[Path] = typer.Option(None, "--corpus", help="with --retrieval: "
                                                  "retrieve K passages from these documents "
                                                  "(JSONL of {text, title}) into the system "
                                                  "prompt instead (RAG)"),
            price_input: Optional[float] = typer.Option(None, "--price-input-per-mtok",
                                              help="USD per million prompt tokens (default "
                                              "0.15: gpt-4o-mini's list price, 2024-07)"),
            price_output: Optional[float] = typer.Option(None, "--price-output-per-mtok",
                                               help="USD per million generated tokens (default "
                                               "0.60, the same source)"),
            price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour",
                                                           help="USD per hour of the serving "
                                                           "machine: prices requests by their "
                                                           "measured throughput instead of "
                                                           "tokens"),
            train_price: Optional[float] = typer.Option(None, "--train-price-per-hour",
                                              help="USD per hour of the training machine "
                                              "(default 1.006: AWS g5.xlarge on demand, "
                                              "2024)"),
            out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="report folder"),
            limit: Optional[int] = typer.Option(None, help="the first N test examples"),
            batch_size: Optional[int] = typer.Option(None, help=GENERATION_BATCH_HELP),
            precision: str = typer.Option("auto", help="weights for inference: auto (bf16 "
                                          "where the hardware has it), bf16, fp16 or fp32"),
            as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
            quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Fine-tuned vs the base model prompted zero-shot, with a system prompt and few-shot:
    quality and tokens per request, a forgetting check, and report.html. Several --tuned
    models (base -> SFT -> SFT+DPO) are measured side by side in one table."""
    from tunelab.evaluate.compare import compare as run_compare
    from tunelab.evaluate.cost import Prices
    from tunelab.evaluate.progress import stage_progress
    from tunelab.evaluate.report import format_comparison
    quiet_libraries()
    bars = stage_progress(quiet or as_json)
    given = {"input_per_mtok": price_input, "output_per_mtok": price_output,
             "per_hour": price_per_hour, "train_per_hour": train_price}
    prices = Prices(**{k: v for k, v in given.items() if v is not None})
    result = run_compare(base=base, tuned=tuned, data=data, out_dir=out, task=task,
                         train=train_file, few_shot=few_shot, system=system, general=general,
                         general_check=not no_general_check, preference=preference,
                         labels=labels.split(",") if labels else None, limit=limit,
                         batch_size=batch_size, precision=precision, retrieval=retrieval,
                         corpus=corpus, prices=prices, progress_factory=bars,
                         judge=_judge_config(task, judge_url, judge_model, judge_key_env,
                                             judge_rubric, judge_pairwise, judge_concurrency,
                                             judge_seed))
    if as_json:
        print(json.dumps(result.to_json()))
        return
    print(format_comparison(result))
    print(f"report: {result.report_html}  ({result.report_md})")


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
    quiet_libraries()
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


@app.command()
def export(model: str = typer.Argument(..., help="model spec: a run folder, adapter, "
                                       "checkpoint, model folder or builtin alias"),
           output: Path = typer.Option(..., "--output", "-o", help="folder to write"),
           fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp), ollama (GGUF "
                                   "+ Modelfile) or hf (merged safetensors + model card)"),
           quant: str = typer.Option("f16", "--quant", help="GGUF weights: f16, bf16, q8_0, "
                                     "q4_0 or f32"),
           overwrite: bool = typer.Option(False, "--overwrite", help="replace the folder"),
           name: Optional[str] = typer.Option(None, help="the model's name in the files")):
    """Export a model where people run it: GGUF for llama.cpp, Ollama, or a Hugging Face folder
    (LoRA merged into its base)."""
    from tunelab.export import export as run_export
    quiet_libraries()
    res = run_export(model, output, fmt=fmt, quant=quant, overwrite=overwrite, name=name)
    print(f"wrote {res['output']} ({res['bytes'] / 2**20:.1f} MB in {res['seconds']:.1f} s): "
          + ", ".join(res["files"]))
    if fmt == "ollama":
        print(f"  ollama create {Path(res['output']).name} -f {res['output']}/Modelfile")


@app.command()
def demo(out: Optional[Path] = typer.Option(None, help="output folder (default: runs/demo, "
                                           "runs/demo-dpo with --dpo)"),
         examples: int = typer.Option(900, help="reviews to generate"),
         epochs: float = typer.Option(2.0),
         replay: int = typer.Option(48, help="general prompts the base model answers for "
                                    "replay against forgetting (0: none)"),
         dpo: bool = typer.Option(False, "--dpo", help="the DPO demo instead: SFT on answers in "
                                  "two formats, then DPO preferring the bare number"),
         quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Offline end-to-end demo: star ratings, base SmolLM2-135M prompted zero- and few-shot vs
    LoRA fine-tuned (--dpo: SFT, then DPO on preference pairs, base vs SFT vs SFT+DPO)."""
    quiet_libraries()
    if dpo:
        from tunelab.demo_dpo import run_dpo_demo
        report = run_dpo_demo(out or Path("runs/demo-dpo"), quiet=quiet)
    else:
        from tunelab.demo import run_demo
        report = run_demo(out or Path("runs/demo"), n_examples=examples, epochs=epochs,
                          replay=replay, quiet=quiet)
    if quiet:
        print(json.dumps({"verdict": report["comparison"]["verdict"],
                          "rows": {r["name"]: r["primary"] for r in report["comparison"]["rows"]},
                          "report": report["comparison"]["report_html"]}))


from tunelab.cli_server import register as _register_server  # noqa: E402

_register_server(app)   # serve, worker, keys


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
