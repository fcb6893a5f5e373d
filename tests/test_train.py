"""Training for real on a tiny random model: loss falls, the right parameters change, the task
is learned, and the output folder loads with from_pretrained."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

import tunelab
from tunelab import models
from tunelab.config import TrainConfig
from tunelab.errors import TunelabError
from tunelab.evaluate import evaluate


class ParamSnapshot(TrainerCallback):
    """Records every parameter at the start and the end of training."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

    def changed(self):
        return {n for n in self.before if not torch.equal(self.before[n], self.after[n])}


def losses(metrics_file, key):
    return [e[key] for e in map(json.loads, open(metrics_file)) if key in e]


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, tiny_model_dir, sound_task):
    out = tmp_path_factory.mktemp("full") / "run"
    snap = ParamSnapshot()
    cfg = TrainConfig(model=str(tiny_model_dir), train_file=sound_task["train"],
                      valid_file=sound_task["test"], output_dir=out, method="full", epochs=20,
                      batch_size=8, learning_rate=3e-3, precision="fp32", logging_steps=5)
    result = tunelab.train(cfg, quiet=True, callbacks=[snap])
    return result, snap


PERMUTED = {"woof": "meow", "meow": "moo", "moo": "quack", "quack": "baa", "baa": "hoot",
            "hoot": "woof"}


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, full_run):
    """LoRA on top of the fully fine-tuned tiny model: re-learn the task with permuted answers
    (a random base with frozen embeddings cannot learn much through rank-16 adapters)."""
    from conftest import sound_rows
    from tunelab.data.io import write_jsonl
    folder = tmp_path_factory.mktemp("lora")
    rows = sound_rows()
    for r in rows:
        r["messages"][1]["content"] = PERMUTED[r["messages"][1]["content"]]
    write_jsonl(folder / "train.jsonl", rows[:40])
    write_jsonl(folder / "test.jsonl", rows[40:])
    snap = ParamSnapshot()
    base = full_run[0].model_dir
    result = tunelab.train({"model": str(base), "train_file": str(folder / "train.jsonl"),
                            "valid_file": str(folder / "test.jsonl"),
                            "output_dir": str(folder / "run"), "method": "lora",
                            "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "epochs": 20,
                            "learning_rate": 5e-3, "precision": "fp32",
                            "save_merged": True},   # asked for: LoRA runs leave it out
                           quiet=True, callbacks=[snap])
    return result, snap, base, folder / "test.jsonl"


def test_full_finetune_learns_the_task(full_run, sound_task):
    result, snap = full_run
    train_losses = losses(result.metrics_file, "train_loss")
    valid_losses = losses(result.metrics_file, "valid_loss")
    assert train_losses[-1] < 0.25 * train_losses[0]
    assert valid_losses[-1] < valid_losses[0] and result.valid_loss == valid_losses[-1]
    # every trainable parameter changed
    assert snap.trainable and snap.changed() == snap.trainable
    # held-out phrasing/animal pairs are answered exactly
    model, tok = models.load(result.model_dir)
    res = evaluate(model, tok, sound_task["test"], task="exact_match")
    assert res.metrics["exact_match"] >= 0.9, res.scored


def test_full_output_folder(full_run):
    result, _ = full_run
    files = {p.name for p in result.output_dir.iterdir()}
    assert {"model", "metrics.jsonl", "config.yaml", "result.json", "train.log"} <= files
    assert not result.output_dir.with_name(result.output_dir.name + ".partial").exists()
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)  # plain transformers
    assert model.config.num_hidden_layers == 2
    summary = json.loads((result.output_dir / "result.json").read_text())
    assert summary["steps"] == result.steps == 100 and summary["extra"]["method"] == "full"
    entries = [json.loads(l) for l in open(result.metrics_file)]
    assert all({"step", "epoch", "train_loss", "learning_rate", "grad_norm"} <= e.keys()
               for e in entries if "train_loss" in e)
    assert len([e for e in entries if "valid_loss" in e]) >= 5


def test_lora_trains_only_the_adapter_and_learns(lora_run):
    result, snap, base, test_file = lora_run
    assert snap.trainable and all("lora_" in n for n in snap.trainable)
    assert snap.changed() == snap.trainable             # every adapter weight moved ...
    frozen = set(snap.before) - snap.trainable
    assert frozen and not (snap.changed() & frozen)      # ... and no base weight did
    train_losses = losses(result.metrics_file, "train_loss")
    assert train_losses[-1] < 0.5 * train_losses[0]
    tuned = evaluate(*models.load(result.model_dir), test_file, task="exact_match")
    before = evaluate(*models.load(base), test_file, task="exact_match")
    assert tuned.metrics["exact_match"] >= 0.9 and before.metrics["exact_match"] == 0.0, \
        tuned.scored


def test_lora_outputs_adapter_and_merged_model(lora_run):
    result, _, base_dir, _ = lora_run
    assert (result.adapter_dir / "adapter_config.json").exists()
    # the vocabulary was not resized: the adapter carries its LoRA weights, not whole layers
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter), [k for k in adapter if "lora_" not in k]
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir)
    base = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_parameters())
    differs = [n for n, p in merged.named_parameters() if not torch.equal(p, base[n])]
    assert differs and all("proj" in n for n in differs)   # LoRA targets the linear layers
    # the adapter folder is itself a model spec: base + adapter, merged on load
    via_adapter, _ = models.load(result.adapter_dir)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(via_adapter(x).logits, merged(x).logits, atol=1e-4)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_same_seed_same_loss_curve(tmp_path, tiny_model_dir, sound_task, method):
    """Whatever the process drew from the RNG before (LoRA's initialisation happens before the
    Trainer's own seeding), the same seed gives the same run."""
    def run(name, noise):
        torch.manual_seed(noise)
        torch.rand(noise)
        cfg = TrainConfig(model=str(tiny_model_dir), train_file=sound_task["train"],
                          output_dir=tmp_path / name, method=method, max_steps=6, batch_size=4,
                          learning_rate=1e-3, precision="fp32", logging_steps=1)
        return losses(tunelab.train(cfg, quiet=True).metrics_file, "train_loss")
    a, b = run("a", 1), run("b", 7)
    assert len(a) == 6 and a == b
    if method == "lora":
        # by default a LoRA run writes its adapter and no merged copy of the base; the run
        # folder is still a model spec (base + adapter) that loads and generates
        assert not (tmp_path / "a" / "model").exists()
        assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()
        src = models.resolve(tmp_path / "a")
        assert src.adapter == str(tmp_path / "a" / "adapter") and src.path == str(tiny_model_dir)
        model, _ = models.load(tmp_path / "a")
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)


def test_bad_data_fails_before_any_output(tmp_path, tiny_model_dir, sound_task):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(sound_task["train"].read_text().splitlines()[0] + "\n"
                   '{"messages": [{"role": "user", "content": "only a question"}]}\n')
    out = tmp_path / "out"
    cfg = TrainConfig(model=str(tiny_model_dir), train_file=bad, output_dir=out, method="full")
    with pytest.raises(TunelabError, match=r"bad.jsonl:2: field 'messages': no assistant turn"):
        tunelab.train(cfg, quiet=True)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_existing_output_dir_is_kept_unless_overwrite(tmp_path, tiny_model_dir, sound_task):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    cfg = TrainConfig(model=str(tiny_model_dir), train_file=sound_task["train"], output_dir=out,
                      method="full", max_steps=1)
    with pytest.raises(TunelabError, match="output folder exists"):
        tunelab.train(cfg, quiet=True)
    assert (out / "precious.txt").read_text() == "keep me"


def test_unknown_lora_target_module_is_named(tmp_path, tiny_model_dir, sound_task):
    cfg = TrainConfig(model=str(tiny_model_dir), train_file=sound_task["train"],
                      output_dir=tmp_path / "o", lora={"target_modules": ["nope_proj"]})
    with pytest.raises(TunelabError) as info:
        tunelab.train(cfg, quiet=True)
    assert info.value.field == "lora.target_modules"
    assert not (tmp_path / "o").exists()
