"""The training engine: resume after SIGKILL, packing isolation, gradient accumulation, DDP,
metrics files, best checkpoint / early stopping, and failures that keep the last checkpoint."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tunelab import models
from tunelab.config import TrainConfig
from tunelab.data.io import write_jsonl
from tunelab.data.render import render
from tunelab.errors import TunelabError
from tunelab.train.auto import auto_batch_size, auto_epochs, make_plan
from tunelab.batching import pad_rows
from tunelab.train.packing import pack
from tunelab.train.rundir import COMPLETE, complete_checkpoints

from conftest import SOUNDS, diverge_after, sigkill_training, sound_rows

CLI = [sys.executable, "-m", "tunelab.cli"]


def train_losses(metrics_file):
    return [(e["step"], e["train_loss"]) for e in map(json.loads, open(metrics_file))
            if "train_loss" in e]


def base_cfg(tiny_model_dir, train_file, out, **kw):
    return TrainConfig(**{"model": str(tiny_model_dir), "train_file": train_file,
                          "output_dir": out, "method": "full", "precision": "fp32",
                          "learning_rate": 1e-3, **kw})


@pytest.fixture(scope="module")
def mixed_lengths(tmp_path_factory):
    """Answers of 1 to 12 words: micro-batches with very different numbers of trained tokens."""
    rows = []
    for i, (animal, sound) in enumerate(sorted(SOUNDS.items()) * 5):
        n = 1 + (i * 7) % 12
        rows.append({"messages": [{"role": "user", "content": f"Make the {animal} sound {n} times"},
                                  {"role": "assistant", "content": " ".join([sound] * n)}]})
    path = tmp_path_factory.mktemp("mixed") / "train.jsonl"
    write_jsonl(path, rows)
    return path


def test_sigkill_mid_training_then_resume_gives_the_same_loss_curve(tmp_path, tiny_model_dir,
                                                                     sound_task):
    # 10 steps per epoch; checkpoints every 3 steps, so the kill lands mid-epoch in epoch >= 2,
    # where the shuffle of a length-grouped epoch must be re-created exactly
    kw = dict(max_steps=60, batch_size=4, save_steps=3, save_total_limit=2, logging_steps=1)
    ref = tunelab.train(base_cfg(tiny_model_dir, sound_task["train"], tmp_path / "ref", **kw),
                        quiet=True)
    expected = train_losses(ref.metrics_file)
    assert len(expected) == 60

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(base_cfg(tiny_model_dir, sound_task["train"], tmp_path / "run",
                                 **kw).to_yaml())
    ckpts = tmp_path / "run.partial" / "checkpoints"
    sigkill_training(cfg_file, ckpts, after_step=12)
    assert not (tmp_path / "run").exists()            # nothing half-written in place
    kept = complete_checkpoints(ckpts)
    assert 1 <= len(kept) <= 3                         # rotation kept at most limit (+ one in flight)
    logged_before = len(train_losses(tmp_path / "run.partial" / "metrics.jsonl"))

    resumed = subprocess.run([*CLI, "train", str(cfg_file), "--resume", "--quiet"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = train_losses(tmp_path / "run" / "metrics.jsonl")
    assert [s for s, _ in got] == list(range(1, 61))   # each step logged once
    assert logged_before >= 12
    for (s, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, abs=1e-5), f"step {s}: {a} != {b}"
    again = subprocess.run([*CLI, "train", str(cfg_file), "--resume"], capture_output=True,
                           text=True)
    assert again.returncode == 1 and "nothing to resume" in again.stderr


def test_torn_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / COMPLETE).write_text("2")
    (tmp_path / "checkpoint-4").mkdir()               # killed mid-save: no marker
    (tmp_path / "checkpoint-4" / "model.safetensors").write_text("half")
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]


def test_packed_rows_give_the_same_logits_as_separate_examples(smol_tokenizer, tiny_model_dir):
    model = models.load_model(tiny_model_dir, tokenizer=smol_tokenizer)
    model.config.use_cache = False
    model.eval()
    rows = [render(r["messages"], smol_tokenizer) for r in sound_rows()[:5]]
    packed = pack(rows, max_length=sum(len(r["input_ids"]) for r in rows[:3]) + 1)
    assert len(packed) == 2 and sum(len(p["input_ids"]) for p in packed) == \
        sum(len(r["input_ids"]) for r in rows)
    batch = pad_rows(packed, smol_tokenizer.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for b, p in enumerate(packed):
            starts = [i for i, pos in enumerate(p["position_ids"]) if pos == 0] + \
                [len(p["position_ids"])]
            for s, e in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([p["input_ids"][s:e]])).logits[0]
                assert torch.allclose(packed_logits[b, s:e], alone, atol=1e-4)
                assert batch["labels"][b, s] == -100          # never predicted across examples
    # the padding of the shorter row is a segment of its own and is not trained
    assert (batch["labels"][1, len(packed[1]["input_ids"]):] == -100).all()


def test_packing_trains_and_learns(tmp_path, tiny_model_dir, sound_task):
    res = tunelab.train(base_cfg(tiny_model_dir, sound_task["train"], tmp_path / "p",
                                 packing=True, max_length=256, epochs=25, batch_size=2,
                                 learning_rate=3e-3, logging_steps=5), quiet=True)
    assert res.extra["packed_rows"] <= res.train_examples / 5
    losses = [b for _, b in train_losses(res.metrics_file)]
    assert losses[-1] < 0.3 * losses[0]
    from tunelab.evaluate import evaluate
    assert evaluate(*models.load(res.model_dir), sound_task["test"],
                    task="exact_match").metrics["exact_match"] >= 0.75


def _split_cost(runs, lengths, overhead):
    return sum(len(r) * max(lengths[i] for i in r) + overhead for r in runs)


def _cheapest_split(lengths, budget, overhead):
    """Every contiguous cut of the rows sorted longest first, tried one by one."""
    import itertools
    ls = sorted(lengths, reverse=True)
    best = None
    for cuts in itertools.product([False, True], repeat=len(ls) - 1):
        runs, start = [], 0
        for k, cut in enumerate(cuts, 1):
            if cut:
                runs.append(ls[start:k])
                start = k
        runs.append(ls[start:])
        if all(len(r) == 1 or len(r) * r[0] <= budget for r in runs):
            cost = sum(len(r) * r[0] + overhead for r in runs)
            best = cost if best is None else min(best, cost)
    return best


def test_a_step_is_split_into_forwards_by_padded_tokens():
    import random

    from tunelab.batching import split_by_tokens
    # the bench's kind of step: 8 random rows of 57 to 850 tokens, 4 x 850 tokens a forward
    lengths = [850, 57, 400, 61, 300, 65, 90, 200]
    runs = split_by_tokens(lengths, 4 * 850, 192)
    assert sorted(i for r in runs for i in r) == list(range(8))
    assert all(len(r) * max(lengths[i] for i in r) <= 4 * 850 for r in runs)
    fixed = [[0, 2, 4, 7], [1, 3, 5, 6]]        # 4 rows a forward, longest first: what it was
    assert _split_cost(runs, lengths, 192) < 0.75 * _split_cost(fixed, lengths, 192)
    assert [lengths[i] for i in runs[-1]] == [90, 65, 61, 57]   # the short rows share one
    assert split_by_tokens([5000, 10], 3400, 192) == [[0], [1]]   # too long: alone
    assert split_by_tokens([3] * 8, 12, 0) == [[0, 1, 2, 3], [4, 5, 6, 7]]   # ties: fewer
    rng = random.Random(0)
    for _ in range(300):
        ls = [rng.randint(1, 900) for _ in range(rng.randint(1, 9))]
        budget, overhead = rng.choice([900, 1800, 3600]), rng.choice([0, 50, 200])
        runs = split_by_tokens(ls, budget, overhead)
        assert sorted(i for r in runs for i in r) == list(range(len(ls)))
        assert _split_cost(runs, ls, overhead) == _cheapest_split(ls, budget, overhead)


def _rows_of(forward) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, labels) rows in a padded or a flat forward."""
    if "cu_seq_lens_q" in forward or "tunelab_segments" in forward:
        # flat: one row, the sequences end to end, a shared prefix once (in its tree's first)
        if "cu_seq_lens_q" in forward:
            bounds = forward["cu_seq_lens_q"].tolist()
            segments = [(a, b, a, a) for a, b in zip(bounds, bounds[1:])]
        else:
            segments = forward["tunelab_segments"].tolist()
        assert forward["input_ids"].shape[0] == 1 and \
            segments[-1][1] == forward["input_ids"].shape[1]
        ids, labels, pos = (forward[k][0].tolist() for k in ("input_ids", "labels",
                                                              "position_ids"))
        out = []
        for a, b, p0, p1 in segments:
            assert pos[a:b] == list(range(p1 - p0, p1 - p0 + b - a)) and labels[a] == -100
            # the prefix's labels are the first row's, untrained; this row's first token after
            # it is untrained too (its -100 here loses nothing)
            out.append((ids[p0:p1] + ids[a:b], [-100] * (p1 - p0) + labels[a:b]))
        return out
    out = []
    for ids, mask, labels in zip(forward["input_ids"], forward["attention_mask"],
                                 forward["labels"]):
        n = int(mask.sum())
        assert (labels[n:] == -100).all()
        out.append((ids[:n].tolist(), labels[:n].tolist()))
    return out


def test_the_step_collator_loses_no_row_and_goes_flat_for_mixed_lengths(smol_tokenizer,
                                                                        mixed_lengths):
    from tunelab.batching import split_by_tokens
    from tunelab.data.conversation import read_conversations
    from tunelab.data.render import render_examples
    from tunelab.objectives import get
    from tunelab.train.trainer import StepCollator
    tok = smol_tokenizer
    rows = render_examples([c.messages for c in read_conversations(mixed_lengths)], tok,
                           max_length=256)[:16]
    lengths = [len(r["input_ids"]) for r in rows]
    longest = max(lengths)
    # (these rows share SmolLM2's default system prompt: where it can run once, padded wins)
    step = StepCollator(get("sft"), tok.pad_token_id, forward_tokens=4 * longest, overhead=8,
                        shared_prefix=False)(rows)
    # mixed lengths: flat, in fewer forwards than padded ones of similar lengths, none padded
    assert all("cu_seq_lens_q" in f and "attention_mask" not in f for f in step["forwards"])
    assert len(step["forwards"]) < len(split_by_tokens(lengths, 4 * longest, 8))
    assert all(f["input_ids"].numel() <= 4 * longest for f in step["forwards"])
    seen = [r for f in step["forwards"] for r in _rows_of(f)]
    assert sorted(seen) == sorted((r["input_ids"], r["labels"]) for r in rows)
    # DPO's pairs do not flatten: padded, and every row still there
    assert not get("dpo").flattens


def test_rows_sharing_a_long_prompt_run_it_once_padded_or_in_a_prefix_tree(smol_tokenizer):
    from tunelab.batching import common_prefix, flat_tokens
    from tunelab.data.render import render_examples
    from tunelab.objectives import get
    from tunelab.train.trainer import StepCollator
    tok = smol_tokenizer
    system = {"role": "system", "content": "Classify the review as positive or negative. " * 4}
    convs = [[system, {"role": "user", "content": f"review number {i}: fine" + " ok" * i},
              {"role": "assistant", "content": "positive"}] for i in range(8)]
    rows = render_examples(convs, tok, max_length=256)
    longest = max(len(r["input_ids"]) for r in rows)

    def layout(**kw):
        step = StepCollator(get("sft"), tok.pad_token_id, forward_tokens=12 * longest,
                            overhead=192, **kw)(rows)
        assert sorted(r for f in step["forwards"] for r in _rows_of(f)) == \
            sorted((r["input_ids"], r["labels"]) for r in rows)
        return [("tree" if "tunelab_segments" in f else "flat") if "position_ids" in f
                else "padded" for f in step["forwards"]], step["forwards"]
    assert layout(shared_prefix=True)[0] == ["padded"]
    # where the prompt cannot run once (DDP), flat wins: no padding
    assert layout(shared_prefix=False)[0] == ["flat"]
    # where the attention sees a shared prefix in a flat row: a tree, the prompt once, no pads
    kinds, forwards = layout(shared_prefix=True, prefix_trees=True)
    assert kinds == ["tree"]
    shared = forwards[0]["tunelab_segments"][1:, 3] - forwards[0]["tunelab_segments"][1:, 2]
    assert (shared == common_prefix(rows)).all() and common_prefix(rows) > 40   # the system prompt
    assert forwards[0]["input_ids"].numel() == \
        sum(len(r["input_ids"]) for r in rows) - int(shared.sum())
    assert flat_tokens(forwards[0]) == sum(len(r["input_ids"]) for r in rows)
    # with rows of other lengths and prompts (the demo's replay rows): those go flat beside
    # the padded prompt-sharing run, or in the same flat forward as the tree
    others = render_examples([[{"role": "user", "content": "word " * n},
                               {"role": "assistant", "content": "ok " * n}]
                              for n in (30, 55, 80)], tok, max_length=256)
    rows += others
    assert sorted(layout(shared_prefix=True)[0]) == ["flat", "padded"]
    kinds, forwards = layout(shared_prefix=True, prefix_trees=True)
    assert kinds == ["tree"]
    assert forwards[0]["tunelab_segments"].shape[0] == len(rows)


def test_prefix_trees_group_rows_by_their_shared_untrained_prefix():
    from tunelab.batching import flatten_rows, prefix_trees

    def row(prompt, answer):
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
    a, b = list(range(100, 130)), list(range(200, 240))
    rows = [row(a + [1, 2], [9]), row(b + [3], [8, 8]), row(a + [5], [7]), row([1] * 5, [2]),
            row(a + [6, 6, 6], [7]), row(b + [4, 4], [9])]
    units = prefix_trees(rows, budget=1000, longest=1024)
    assert sorted((sorted(m), s) for m, s in units) == [([0, 2, 4], 30), ([1, 5], 40), ([3], 0)]
    # the budget caps a unit (the prefix counted once); rows past `longest` share nothing
    assert sorted(len(m) for m, _ in prefix_trees(rows, budget=38, longest=1024)) == [1, 1, 1, 1, 2]
    assert sorted((sorted(m), s) for m, s in prefix_trees(rows, budget=1000, longest=40)) == \
        [([0, 2, 4], 30), ([1], 0), ([3], 0), ([5], 0)]           # the b rows: 43 tokens
    # a prefix that ends inside the trained part is refused, as is one the head does not share
    with pytest.raises(ValueError, match="shared prefix"):
        flatten_rows([rows[0], rows[2]], [0, 32])
    with pytest.raises(ValueError, match="shared prefix"):
        flatten_rows([rows[0], rows[1]], [0, 30])


def test_split_flat_fills_forwards_up_to_the_budget():
    import random

    from tunelab.batching import split_flat
    assert split_flat([850, 57, 400, 61, 300, 65, 90, 200], 1024) == \
        [[0, 6, 5], [2, 4, 7, 3, 1]]          # 850+90+65, 400+300+200+61+57: longest first
    assert split_flat([5000, 10], 3400) == [[0], [1]]          # too long: alone
    rng = random.Random(0)
    for _ in range(200):
        ls = [rng.randint(1, 900) for _ in range(rng.randint(1, 12))]
        runs = split_flat(ls, 1800)
        assert sorted(i for r in runs for i in r) == list(range(len(ls)))
        assert all(sum(ls[i] for i in r) <= 1800 or len(r) == 1 for r in runs)
        assert len(runs) <= -(-sum(ls) // 1800) * 2     # first-fit: at most twice the bound


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_model_dir, mixed_lengths):
    def run(name, micro):
        res = tunelab.train(base_cfg(tiny_model_dir, mixed_lengths, tmp_path / name, max_steps=4,
                                     batch_size=8, micro_batch_size=micro, logging_steps=1,
                                     group_by_length=False), quiet=True)
        return res, train_losses(res.metrics_file)
    (big, a), (acc, b) = run("big", 8), run("acc", 2)
    assert acc.extra["gradient_accumulation_steps"] == 4 and big.extra["gradient_accumulation_steps"] == 1
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4)
    w1, w2 = load_file(big.model_dir / "model.safetensors"), load_file(acc.model_dir / "model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir,
                                                                       mixed_lengths):
    common = dict(max_steps=3, batch_size=8, logging_steps=1, group_by_length=False)
    one = tunelab.train(base_cfg(tiny_model_dir, mixed_lengths, tmp_path / "one",
                                 micro_batch_size=8, **common), quiet=True)
    half = tunelab.train(base_cfg(tiny_model_dir, mixed_lengths, tmp_path / "half",
                                  micro_batch_size=4, batch_size=4, max_steps=3,
                                  logging_steps=1, group_by_length=False), quiet=True)
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(base_cfg(tiny_model_dir, mixed_lengths, tmp_path / "two",
                                 micro_batch_size=4, **common).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", "-m", "tunelab.cli", "train", str(cfg_file),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["extra"]["world_size"] == 2 and two["extra"]["micro_batch_size"] == 4
    assert two["extra"]["gradient_accumulation_steps"] == 1
    # both ranks' shards were used: the tokens seen equal the 1-process run with the same batch
    assert two["extra"]["tokens_seen"] == one.extra["tokens_seen"] == 2 * half.extra["tokens_seen"] \
        or two["extra"]["tokens_seen"] == one.extra["tokens_seen"]
    w1 = load_file(one.model_dir / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "model" / "model.safetensors")
    wh = load_file(half.model_dir / "model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert not all(torch.allclose(w1[k], wh[k], atol=1e-5) for k in w1)


def test_metrics_files_best_checkpoint_and_early_stopping(tmp_path, tiny_model_dir, sound_task):
    """Validation answers contradict training (permuted sounds): validation loss rises once the
    model learns, so early stopping triggers and the best model is an early checkpoint."""
    rows = sound_rows()
    perm = dict(zip(SOUNDS.values(), list(SOUNDS.values())[1:] + list(SOUNDS.values())[:1]))
    for r in rows:
        r["messages"][1]["content"] = perm[r["messages"][1]["content"]]
    write_jsonl(tmp_path / "contra.jsonl", rows[:16])
    res = tunelab.train(base_cfg(tiny_model_dir, sound_task["train"], tmp_path / "es",
                                 valid_file=tmp_path / "contra.jsonl", epochs=30, batch_size=8,
                                 learning_rate=3e-3, eval_steps=5, early_stopping_patience=2,
                                 logging_steps=5), quiet=True)
    entries = [json.loads(l) for l in open(res.metrics_file)]
    valid = [e for e in entries if "valid_loss" in e]
    assert res.steps < 150                                   # stopped early
    best = min(valid, key=lambda e: e["valid_loss"])
    assert res.best_step == best["step"] and res.valid_loss == pytest.approx(best["valid_loss"])
    assert len([e for e in valid if e["step"] > res.best_step]) >= 2   # patience 2
    train = [e for e in entries if "train_loss" in e]
    assert all(0 <= e["train_mean_token_accuracy"] <= 1 and e["tokens_per_s"] > 0 for e in train[1:])
    assert all(0 <= e["valid_mean_token_accuracy"] <= 1 for e in valid)
    assert train[-1]["trained_tokens_seen"] > train[0]["trained_tokens_seen"] > 0
    header, *lines = (res.output_dir / "results.csv").read_text().splitlines()
    assert header == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(lines) == len({e["step"] for e in entries})
    assert (res.output_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the output model is the best checkpoint's
    model, tok = models.load(res.model_dir)
    from tunelab.evaluate import loss_metrics
    from tunelab.data.conversation import read_conversations
    test = loss_metrics(model, tok, read_conversations(tmp_path / "contra.jsonl"),
                        max_length=models.trained_with(res.output_dir).max_length)
    assert test["loss"] == pytest.approx(res.valid_loss, rel=1e-3)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, sound_task):
    cfg = base_cfg(tiny_model_dir, sound_task["train"], tmp_path / "nan", max_steps=30,
                   batch_size=4, save_steps=2)
    with pytest.raises(TunelabError, match=r"loss became (nan|inf).*last good checkpoint"):
        tunelab.train(cfg, quiet=True, callbacks=[diverge_after(5)])
    assert not (tmp_path / "nan").exists()
    assert complete_checkpoints(tmp_path / "nan.partial" / "checkpoints")


@pytest.mark.parametrize("overrides,field,needle", [
    ({"lora": {"r": 0}}, "lora.r", "greater than or equal to 1"),
    ({"batch_size": 0}, "batch_size", "greater than 0"),
    ({"method": "lora", "freeze_layers": 1}, "freeze_layers", "full"),
    ({"max_length": 12}, "messages", "nothing left to train on"),
    ({"lora": {"target_modules": ["nope_proj"]}}, "lora.target_modules", "nope_proj"),
])
def test_impossible_configs_fail_before_the_model_loads(tmp_path, tiny_model_dir, sound_task,
                                                        monkeypatch, overrides, field, needle):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(models, "load_model", no_loading)
    data = {"model": str(tiny_model_dir), "train_file": str(sound_task["train"]),
            "output_dir": str(tmp_path / "o"), **overrides}
    with pytest.raises(TunelabError) as info:
        tunelab.train(data, quiet=True)
    assert info.value.field == field and needle in str(info.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_qlora_without_bitsandbytes_fails_before_the_model_loads(tmp_path, tiny_model_dir,
                                                                 sound_task, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)    # as if not installed
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(TunelabError) as info:
        tunelab.train(base_cfg(tiny_model_dir, sound_task["train"], tmp_path / "o",
                               method="qlora"), quiet=True)
    assert info.value.field == "method" and "tunelab[qlora]" in str(info.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_qlora_trains_on_a_4bit_base(tiny_model_dir, sound_task, tmp_path):
    """QLoRA on whatever device is here (bitsandbytes runs its 4-bit layers on the CPU too):
    the base's linear layers are 4-bit, its weights are counted as weights, the adapter learns
    and the run's model answers, loaded on its base."""
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            layer = model.base_model.model.model.layers[0].self_attn.q_proj
            seen["base"] = type(layer.base_layer).__name__
            seen["packed"] = layer.base_layer.weight.dtype
            seen["embeddings"] = model.get_input_embeddings().weight.dtype
            seen["adapters"] = {p.dtype for p in model.parameters() if p.requires_grad}
    result = tunelab.train({"model": str(tiny_model_dir), "train_file": str(sound_task["train"]),
                            "output_dir": str(tmp_path), "method": "qlora", "epochs": 6,
                            "learning_rate": 5e-3, "logging_steps": 1},
                           quiet=True, callbacks=[Look()])
    # what it does not quantize stays in the run's precision (PEFT's k-bit preparation would
    # make it fp32), and the adapters train as LoRA's do (bf16, with fp32 masters)
    from tunelab.runtime import torch_dtype
    native = torch_dtype("auto")
    assert seen == {"base": "Linear4bit", "packed": torch.uint8, "embeddings": native,
                    "adapters": {native}}
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    # the 4-bit weights counted as weights, not as the bytes that pack them
    assert result.extra["total_parameters"] == sum(p.numel() for p in plain.parameters()) + \
        result.extra["trainable_parameters"]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    curve = [loss for _, loss in train_losses(result.metrics_file)]
    assert all(map(math.isfinite, curve)) and curve[-1] < 0.95 * curve[0], curve
    from tunelab.inference import generate_completions
    model, tok = models.load(result.output_dir)
    [answer] = generate_completions(model, tok, [sound_rows()[0]["messages"][:-1]],
                                    max_new_tokens=8)
    assert answer.text.strip()


def test_freeze_layers_and_dora(tmp_path, tiny_model_dir, sound_task):
    from test_train import ParamSnapshot
    snap = ParamSnapshot()
    tunelab.train(base_cfg(tiny_model_dir, sound_task["train"], tmp_path / "f", max_steps=2,
                           freeze_layers=1), quiet=True, callbacks=[snap])
    assert not any(n.startswith(("model.embed_tokens", "model.layers.0.")) for n in snap.trainable)
    assert any(n.startswith("model.layers.1.") for n in snap.trainable)
    assert snap.changed() == snap.trainable
    snap2 = ParamSnapshot()
    res = tunelab.train({"model": str(tiny_model_dir), "train_file": str(sound_task["train"]),
                         "output_dir": str(tmp_path / "d"), "method": "dora", "max_steps": 2,
                         "precision": "fp32"}, quiet=True, callbacks=[snap2])
    assert any("lora_magnitude_vector" in n for n in snap2.trainable)
    assert json.loads((res.adapter_dir / "adapter_config.json").read_text())["use_dora"] is True


def test_auto_hyperparameters():
    assert auto_epochs(10) == 10 and auto_epochs(40) == 3 and auto_epochs(500) == 3
    assert auto_epochs(100_000) == 1 and auto_epochs(5000) == 3
    assert (auto_batch_size(100), auto_batch_size(5000), auto_batch_size(50_000)) == (8, 16, 32)
    cfg = TrainConfig(train_file="t.jsonl")
    plan = make_plan(cfg, 630)
    assert (plan.epochs, plan.batch_size, plan.learning_rate) == (3.0, 8, 2e-4)
    assert plan.total_steps == 3 * 79
    big = make_plan(TrainConfig(train_file="t.jsonl", method="full"), 20_000, longest=400,
                    world_size=2)
    assert make_plan(TrainConfig(train_file="t.jsonl"), 630, longest=1000).micro_batch_size == 4
    assert (big.batch_size, big.micro_batch_size, big.gradient_accumulation_steps) == (32, 8, 2)
    assert big.learning_rate == 2e-5


def test_validation_batches_fill_the_forward_token_budget():
    from tunelab.train.auto import TOKENS_PER_FORWARD
    cfg = TrainConfig(train_file="t.jsonl")
    # the demo's reviews: 8 rows a training forward, 21 a validation one (no backward to keep
    # activations for), split by the whole budget
    demo = make_plan(cfg, 630, longest=195, longest_valid=195)
    assert (demo.micro_batch_size, demo.forward_tokens) == (8, 1560)
    assert demo.eval_batch_size == TOKENS_PER_FORWARD["cpu"] // 195 == 21
    assert demo.eval_forward_tokens == TOKENS_PER_FORWARD["cpu"]
    # short validation rows: at most MAX_EVAL_BATCH; a validation row longer than the budget:
    # never fewer rows than a training forward holds
    assert make_plan(cfg, 630, longest=195, longest_valid=10).eval_batch_size == 64
    long = make_plan(cfg, 630, longest=100, longest_valid=9000)
    assert long.eval_batch_size == long.micro_batch_size == 8
    assert long.eval_forward_tokens == TOKENS_PER_FORWARD["cpu"]


def test_the_gpu_forward_budget_is_what_its_memory_holds():
    """On a GPU the tokens per forward shrink with the model (its activations are kept for the
    backward) and with what its weights and optimizer state already take."""
    from transformers import LlamaConfig

    from tunelab.train.auto import TOKENS_PER_FORWARD, gpu_forward_budget

    def llama(h, inner, layers, heads, kv, vocab=49152):
        return LlamaConfig(hidden_size=h, intermediate_size=inner, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv,
                           vocab_size=vocab, tie_word_embeddings=True)
    smol, tiny_llama = llama(576, 1536, 30, 9, 3), llama(2048, 5632, 22, 32, 4, 32000)
    eight_b = llama(4096, 14336, 32, 32, 8, 128256)
    h100 = 80 * 2**30
    cap = TOKENS_PER_FORWARD["gpu"]
    assert gpu_forward_budget(smol, "lora", h100) == cap          # 135M: the cap
    lora, full = (gpu_forward_budget(tiny_llama, m, h100) for m in ("lora", "full"))
    assert 8192 < full < lora < cap                               # 1.1B: ~12k / ~18k tokens
    big = gpu_forward_budget(eight_b, "lora", h100)
    assert 2048 < big < full                                      # 8B: a few rows of 1k
    assert gpu_forward_budget(eight_b, "qlora", h100) > big       # its base in 4 bits
    assert gpu_forward_budget(eight_b, "lora", h100, checkpointing=True) == cap
    assert gpu_forward_budget(eight_b, "full", h100) == 1         # does not fit at all
    assert gpu_forward_budget(eight_b, "lora", 24 * 2**30) < big  # a 24 GB card
    cfg = TrainConfig(train_file="t.jsonl")
    assert make_plan(cfg, 630, longest=1000, on_gpu=True).micro_batch_size == 8
    assert make_plan(cfg, 630, longest=1000, on_gpu=True,
                     gpu_budget=big).micro_batch_size == 4        # ~4.3k tokens
    assert make_plan(cfg, 630, longest=1000, on_gpu=False,       # a CPU: its own budget
                     gpu_budget=1).micro_batch_size == 4


def test_lora_trains_the_chat_tokens_a_base_model_gained(tmp_path):
    """A base model without a chat template gets ChatML tokens with fresh embedding rows; LoRA
    must train those rows (else <|im_end|> stays random and the model never learns to stop)."""
    from conftest import BASE_WORDS as words, templateless_base_model
    base = templateless_base_model(tmp_path / "base", tie_word_embeddings=False)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 12
    write_jsonl(tmp_path / "t.jsonl", rows)
    from test_train import ParamSnapshot
    snap = ParamSnapshot()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = tunelab.train({"model": str(base), "train_file": str(tmp_path / "t.jsonl"),
                             "output_dir": str(tmp_path / "o"), "max_steps": 3, "save_steps": 1,
                             "precision": "fp32", "learning_rate": 1e-2, "save_merged": True},
                            quiet=True, callbacks=[snap])
    # tunelab tells PEFT the vocabulary was resized: it neither guesses (a Hub lookup for a
    # base that is not a local folder) nor warns at each save
    assert not [w for w in seen if "embedding" in str(w.message) or "remote file" in
                str(w.message)], [str(w.message) for w in seen]
    adapter = load_file(res.adapter_dir / "adapter_model.safetensors")
    assert any("embed_tokens" in k and k.endswith("base_layer.weight") for k in adapter) and \
        any(k.endswith("lm_head.weight") for k in adapter), list(adapter)   # whole layers
    new_rows = {n for n in snap.trainable if "trainable_tokens" in n}
    assert new_rows and new_rows <= snap.changed()                    # the new rows trained
    before = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    after = load_file(res.model_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert after.shape[0] == len(words) + 2
    assert torch.equal(after[:len(words)], before)                    # the old rows did not
    assert "tunelab_added_token_ids" not in (res.model_dir / "config.json").read_text()


def test_length_grouped_steps_come_in_a_random_order_not_a_sweep():
    """Each optimizer step holds examples of similar length (less padding), but the steps do not
    sweep from long to short: where length goes with the answer, a sweep feeds consecutive
    steps one kind of example (valid loss 0.168 vs 0.111 ungrouped in bench/train_match.py)."""
    import random

    from transformers.trainer_pt_utils import get_length_grouped_indices

    from tunelab.train.trainer import EpochSeededLengthGroupedSampler
    rng = random.Random(0)
    lengths = [rng.randint(20, 900) for _ in range(803)]     # 100 steps of 8, then 3
    sampler = EpochSeededLengthGroupedSampler(8, lengths, seed=7)
    sampler.set_epoch(1)
    order = list(sampler)
    assert sorted(order) == list(range(803)) and order == list(sampler)   # one epoch, repeatable
    steps = [order[i:i + 8] for i in range(0, 803, 8)]
    assert len(steps[-1]) == 3                                # the short step stays last
    assert max(lengths) in [lengths[i] for i in steps[0]]     # the longest first: OOM at once
    # the same steps as transformers' grouping (as little padding), in another order
    grouped = get_length_grouped_indices(lengths, 8, generator=torch.Generator().manual_seed(8))
    theirs = [grouped[i:i + 8] for i in range(0, 803, 8)]
    assert sorted(map(sorted, steps)) == sorted(map(sorted, theirs))
    padding = sum(8 * max(lengths[i] for i in s) - sum(lengths[i] for i in s) for s in steps)
    assert padding < 0.1 * sum(lengths)
    # not a sweep: in transformers' order the first 50 steps' longest examples only shrink
    ours = [max(lengths[i] for i in s) for s in steps[:50]]
    assert ours != sorted(ours, reverse=True)
    assert sum(a > b for a, b in zip(ours, ours[1:])) < 40   # a sweep would give 49
    sampler.set_epoch(2)
    assert list(sampler) != order


def test_sft_steps_are_random_dpo_steps_length_grouped_and_shuffle_false_keeps_the_file_order(
        tmp_path, tiny_model_dir, sound_task, monkeypatch):
    from tunelab.train import trainer as trainer_module
    from tunelab.train.run import _sampling_strategy

    def strategy(**kw):
        return _sampling_strategy(TrainConfig(model="m", train_file="t.jsonl", output_dir="o",
                                              **kw))
    # SFT rows go flat (no padding to save); DPO's pairs are padded
    assert strategy() == "random" and strategy(objective="dpo") == "group_by_length"
    assert strategy(group_by_length=True) == "group_by_length"
    assert strategy(group_by_length=True, packing=True) == "random"
    assert strategy(objective="dpo", shuffle=False) == "sequential"
    with pytest.raises(ValueError, match="group_by_length: reorders"):
        strategy(shuffle=False, group_by_length=True)
    # shuffle: false -> each step holds the next rows of the file, every epoch
    steps = []
    real = trainer_module.StepCollator.__call__

    def spy(self, rows):
        steps.append([r["input_ids"] for r in rows])
        return real(self, rows)
    monkeypatch.setattr(trainer_module.StepCollator, "__call__", spy)
    run = tunelab.train({"model": str(tiny_model_dir), "train_file": str(sound_task["train"]),
                         "output_dir": str(tmp_path / "run"), "method": "full", "epochs": 2,
                         "batch_size": 8, "shuffle": False, "precision": "fp32"}, quiet=True)
    from tunelab.data.conversation import read_conversations
    from tunelab.data.render import render_examples
    tok = models.load_tokenizer(str(tiny_model_dir))
    rows = render_examples([c.messages for c in read_conversations(sound_task["train"])], tok,
                           max_length=TrainConfig.model_fields["max_length"].default)
    in_order = [[r["input_ids"] for r in rows[i:i + 8]] for i in range(0, 40, 8)]
    assert run.steps == 10 and steps[:10] == in_order * 2
