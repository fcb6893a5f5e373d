"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random-weight model built on it, and a
tiny short-answer task. Built once per test session."""
from __future__ import annotations

import copy
import os
import random
import subprocess
import sys

# Tests never reach a model hub: fail fast instead of retrying a network that is not there.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from tunelab.data.io import write_jsonl

SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa",
          "owl": "hoot"}
PHRASINGS = ["What sound does a {a} make?", "Which noise comes from a {a}?",
             "Tell me the sound of a {a}.", "A {a} says what?", "What does the {a} say?",
             "Sound of the {a}?", "Name the noise a {a} makes.", "Hey, what does a {a} sound like?"]


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's tokenizer: the builtin model's, or a folder holding just the tokenizer where
    the builtin's weights package is not installed (a lent GPU machine: bench/gpu_device.py)."""
    from tunelab.models import load_tokenizer
    return load_tokenizer(os.environ.get("TUNELAB_SMOLLM2_TOKENIZER") or
                          "smollm2-135m-instruct")


@pytest.fixture
def fresh_tokenizer(smol_tokenizer):
    """A copy a test may change (templates, special tokens) without touching the others."""
    return copy.deepcopy(smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A 2-layer, 64-wide Llama with random weights and the real SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = smol_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sound_rows():
    rows = [{"messages": [{"role": "user", "content": p.format(a=a)},
                          {"role": "assistant", "content": s}]}
            for p in PHRASINGS for a, s in SOUNDS.items()]
    random.Random(0).shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def sound_task(tmp_path_factory):
    """Animal -> sound: 40 train / 8 held-out test conversations (unseen phrasing+animal pairs)."""
    folder = tmp_path_factory.mktemp("sounds")
    rows = sound_rows()
    write_jsonl(folder / "train.jsonl", rows[:40])
    write_jsonl(folder / "test.jsonl", rows[40:])
    return {"train": folder / "train.jsonl", "test": folder / "test.jsonl", "dir": folder}


def run_cli(*args, cwd=None, input=None):
    """`tunelab ARGS...` in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, input=input,
                          timeout=600)


def diverge_after(step: int):
    """A callback that sets the weights to inf after `step`, as a far too high learning rate
    would (the config refuses learning rates above 1): the next loss is not finite."""
    import torch
    from transformers import TrainerCallback

    class Diverge(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == step:
                with torch.no_grad():
                    model.get_input_embeddings().weight.fill_(float("inf"))
    return Diverge()


def sigkill_training(cfg_file, checkpoints_dir, *, after_step: int) -> None:
    """`tunelab train CFG` in a subprocess, killed with SIGKILL once a complete checkpoint at
    `after_step` or later exists (asserts the run was still going)."""
    import signal
    import time

    from tunelab.train.rundir import complete_checkpoints
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", str(cfg_file),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = complete_checkpoints(checkpoints_dir)
        if done and int(done[-1].name.split("-")[1]) >= after_step:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + \
        proc.stderr.read().decode()[-500:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def assert_clean_error(proc, *needles):
    """Exit code 1, one `error:` line naming every needle, no traceback."""
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


BASE_WORDS = ["<unk>", "</s>", "hi", "yo", "user", "assistant", "system", "\n"]


def templateless_base_model(folder, *, tie_word_embeddings: bool = True):
    """A base model as many are published: a word-level tokenizer with no chat template and no
    chat markers (eos </s>, no pad), and a 1-layer Llama of that vocabulary. Returns the folder."""
    import torch
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    raw = Tokenizer(tk_models.WordLevel({w: i for i, w in enumerate(BASE_WORDS)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(BASE_WORDS), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 tie_word_embeddings=tie_word_embeddings)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sound_run(tmp_path_factory, tiny_model_dir, sound_task):
    """The tiny model fully fine-tuned on the sound task (a tunelab run folder)."""
    import tunelab
    out = tmp_path_factory.mktemp("sound-run") / "run"
    return tunelab.train({"model": str(tiny_model_dir), "train_file": str(sound_task["train"]),
                          "valid_file": str(sound_task["test"]), "output_dir": str(out),
                          "method": "full", "epochs": 20, "batch_size": 8,
                          "learning_rate": 3e-3, "precision": "fp32", "logging_steps": 5},
                         quiet=True)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (tests/pg.py) for the whole session, stopped at its end."""
    import pg
    why = pg.available()
    if why:
        pytest.skip(why)
    server = pg.Postgres().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """The job store's database, once per backend: None (SQLite in the data dir) or the URL of
    a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()
