"""bf16 weights with fp32 master copies in the optimizer (tunelab.train.precision)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from conftest import sigkill_training
from tunelab.config import TrainConfig
from tunelab.train import precision
from tunelab.train.precision import MasterWeightAdamW, master_grad_norm, stochastic_round_

CLI = [sys.executable, "-m", "tunelab.cli"]


def assert_rounds(low: torch.Tensor, master: torch.Tensor) -> None:
    """Each bf16 weight is its master rounded down or up: within one bf16 step (2**-7
    relative, taken at the larger of the two)."""
    gap = (low.detach().float() - master.detach()).abs()
    assert low.dtype == torch.bfloat16
    assert bool((gap <= master.detach().abs() * 2 ** -7 + 1e-30).all())


def test_stochastic_rounding_is_unbiased_and_stays_on_the_two_neighbours():
    g = torch.Generator().manual_seed(0)
    for value in (1.0 + 2 ** -10, -(1.0 + 2 ** -10), 3.3e-5, -7.77e3):
        master = torch.full((1 << 20,), value)
        low = torch.empty_like(master, dtype=torch.bfloat16)
        stochastic_round_(low, master, g)
        below = master.to(torch.bfloat16)   # nearest; the other neighbour is one step away
        assert len(low.unique()) == 2 and bool((low == below).any())
        assert_rounds(low, master)
        step = (low.float() - below.float()).abs().max().item()
        # mean within 4 standard errors of the value (nearest rounding would be off by 1/8 step)
        assert abs(low.float().mean().item() - value) < 4 * step / 2 / 2 ** 10
    exact = torch.tensor([1.0, -2.5, 0.0, 0.15625])    # representable in bf16: never moved
    low = torch.empty(4, dtype=torch.bfloat16)
    stochastic_round_(low, exact, g)
    assert low.float().tolist() == exact.tolist()


def test_updates_below_a_bf16_step_accumulate_in_the_master():
    """lr x update ~1e-4 is far below half a bf16 step at 1.0 (2**-9): stepped in place, a
    bf16 weight never moves; through an fp32 master the updates add up and show."""
    start = torch.ones(8, dtype=torch.bfloat16)
    in_place = torch.nn.Parameter(start.clone())
    mastered = torch.nn.Parameter(start.clone())
    plain = torch.optim.AdamW([in_place], lr=1e-4, weight_decay=0.0)
    ours = MasterWeightAdamW([mastered], lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        for p, opt in ((in_place, plain), (mastered, ours)):
            p.grad = torch.full_like(p, -1.0)      # Adam's update is ~lr per step
            opt.step()
            opt.zero_grad()
    assert torch.equal(in_place.detach(), start)                     # stalled
    assert ours.masters[0].dtype == torch.float32
    assert ours.masters[0][0].item() == pytest.approx(1.01, abs=1e-4)  # 100 x 1e-4
    assert_rounds(mastered, ours.masters[0])
    assert mastered.dtype == torch.bfloat16 and bool((mastered > 1.0).all())


def test_masters_follow_fp32_adamw_and_grads_sum_in_fp32():
    torch.manual_seed(0)
    w = torch.randn(16, 16)
    grads = [torch.randn(16, 16) for _ in range(6)]
    ref = torch.nn.Parameter(w.clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.1, fused=True)
    low = torch.nn.Parameter(w.to(torch.bfloat16))
    opt = MasterWeightAdamW([low], lr=1e-3, weight_decay=0.1, fold_grads_on_backward=True)
    opt.masters[0].data.copy_(w)      # the same fp32 start (bf16 rounding aside)
    for i in range(0, 6, 2):
        for g in grads[i:i + 2]:      # two micro-batches: each backward folds into the master
            (low * g.to(torch.bfloat16)).sum().backward()
            assert low.grad is None   # freed at once
        expected = (grads[i].to(torch.bfloat16).float() + grads[i + 1].to(torch.bfloat16).float())
        assert torch.equal(opt.masters[0].grad, expected)            # summed in fp32
        opt.step()
        opt.zero_grad()
        ref.grad = expected           # fp32 AdamW on the same gradients
        ref_opt.step()
        ref_opt.zero_grad()
        assert torch.allclose(opt.masters[0], ref.detach(), rtol=0, atol=1e-7)
        assert_rounds(low, opt.masters[0])
    # an fp32 parameter is its own master: no copy
    same = torch.nn.Parameter(torch.zeros(3))
    assert MasterWeightAdamW([same], lr=1e-3).masters[0] is same


def test_each_step_starts_from_fresh_master_gradients():
    """The Trainer clears gradients with model.zero_grad() only: the step itself must drop the
    masters' gradients, or every step adds in all the previous ones (an uninterrupted run and a
    resumed one then differ: the resume test caught it)."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([p], lr=1e-2, fold_grads_on_backward=True)
    module_like = torch.nn.ParameterList([p])
    for g in ([1.0, 0.0], [0.0, 1.0]):
        (p * torch.tensor(g, dtype=torch.bfloat16)).sum().backward()
        assert opt.masters[0].grad.tolist() == g           # this step's gradient only
        opt.step()
        module_like.zero_grad()


def test_gradient_norm_and_clipping_on_the_masters():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([p], lr=1e-3)
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.bfloat16)
    norm = master_grad_norm(opt, max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)
    assert torch.allclose(opt.masters[0].grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), atol=1e-5)
    assert p.grad is None


def test_state_dict_carries_the_masters():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([p], lr=1e-4)
    for _ in range(3):
        p.grad = torch.full_like(p, -1.0)
        opt.step()
    saved = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())          # what a checkpoint's weights hold
    again = MasterWeightAdamW([q], lr=1e-4)
    again.load_state_dict(saved)
    assert torch.equal(again.masters[0], opt.masters[0])            # not the rounded weight
    assert not torch.equal(again.masters[0], q.detach().float())
    assert again.state[again.masters[0]]["step"] == opt.state[opt.masters[0]]["step"]


def test_small_updates_reach_the_bf16_model(monkeypatch):
    """Full fine-tuning's lr moves a weight by less than half a bf16 step per step (SmolLM2's
    weights at 2e-5): rounded to nearest, the bf16 copies the forward uses stay at their start
    while the masters move, and the run stalls (SmolLM2 at 2e-5 ended 16% worse). Rounded
    stochastically the bf16 weights follow the masters and the loss follows an fp32 run's.
    The stall needs weights that start on bf16 values, as a bf16 checkpoint's do: a master must
    then move half a step before its nearest bf16 value changes. Weights in [1, 2) (a step of
    2**-7) moved 40 x 5e-5 reproduce it in a second."""
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    start = (1 + torch.rand(64) * 0.9).bfloat16().float()    # half a bf16 step is 0.0039
    target = start + 0.05
    y = x @ target

    def losses(dtype, rounding=None):
        if rounding:
            monkeypatch.setattr(precision, "stochastic_round_", rounding)
        w = torch.nn.Parameter(start.to(dtype, copy=True))
        opt = MasterWeightAdamW([w], lr=5e-5, weight_decay=0.0, seed=0)
        curve = []
        for _ in range(40):
            loss = ((x.to(dtype) @ w).float() - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        monkeypatch.undo()
        return curve

    fp32 = losses(torch.float32)
    learned = fp32[0] - fp32[-1]
    assert learned > 0.05 * fp32[0]
    stochastic = losses(torch.bfloat16)
    nearest = losses(torch.bfloat16, lambda out, master, gen, pool, offsets: out.copy_(master))
    assert stochastic[0] - stochastic[-1] > 0.8 * learned
    assert nearest[0] - nearest[-1] < 0.2 * learned       # the stall this guards against


def train_losses(metrics_file):
    return [e["train_loss"] for e in map(json.loads, open(metrics_file)) if "train_loss" in e]


def bf16_cfg(tiny_model_dir, train_file, out, **kw):
    return TrainConfig(**{"model": str(tiny_model_dir), "train_file": train_file,
                          "output_dir": out, "method": "full", "precision": "bf16",
                          "learning_rate": 1e-3, **kw})


def test_bf16_run_trains_bf16_weights_with_fp32_masters(tmp_path, tiny_model_dir, sound_task):
    from test_train import ParamSnapshot
    seen = {}

    class Look(ParamSnapshot):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            super().on_train_begin(args, state, control, model=model, **kw)
            seen["dtypes"] = {p.dtype for p in model.parameters()}
            seen["autocast"] = args.bf16
            seen["optimizer"] = type(getattr(optimizer, "optimizer", optimizer)).__name__

    snap = Look()
    res = tunelab.train(bf16_cfg(tiny_model_dir, sound_task["train"], tmp_path / "o",
                                 max_steps=20, logging_steps=1), quiet=True, callbacks=[snap])
    assert seen == {"dtypes": {torch.bfloat16}, "autocast": False,
                    "optimizer": "MasterWeightAdamW"}
    assert snap.changed() == snap.trainable                  # every weight moved
    logs = [json.loads(x) for x in open(res.metrics_file)]
    assert all(e["grad_norm"] > 0 for e in logs if "grad_norm" in e)   # the masters' norm
    # the same run in fp32: the bf16 curve follows it (here within 0.3% over 40 steps)
    ref = tunelab.train(bf16_cfg(tiny_model_dir, sound_task["train"], tmp_path / "f",
                                 max_steps=20, logging_steps=1, precision="fp32"), quiet=True)
    got, want = (train_losses(r.metrics_file) for r in (res, ref))
    assert len(got) == len(want) == 20 and want[-1] < want[0] - 1.0
    assert got == pytest.approx(want, rel=0.01)
    weights = load_file(res.model_dir / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}      # half the disk


def test_bf16_lora_keeps_the_base_in_bf16(tmp_path, tiny_model_dir, sound_task):
    from test_train import ParamSnapshot
    snap = ParamSnapshot()
    res = tunelab.train({"model": str(tiny_model_dir), "train_file": str(sound_task["train"]),
                         "output_dir": str(tmp_path / "l"), "precision": "bf16",
                         "max_steps": 6, "learning_rate": 1e-2}, quiet=True, callbacks=[snap])
    assert snap.trainable and snap.changed() == snap.trainable
    assert all("lora" in n for n in snap.trainable)
    adapter = load_file(res.adapter_dir / "adapter_model.safetensors")
    assert adapter and all(t.dtype in (torch.float32, torch.bfloat16) for t in adapter.values())


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_bf16_sigkill_then_resume_is_exact(tmp_path, tiny_model_dir, sound_task, method):
    """The checkpoint's bf16 weights are rounded: resuming must take the fp32 masters from the
    optimizer state, or the curve after the kill drifts from an uninterrupted run. LoRA on a
    bf16 base, and QLoRA on a 4-bit one, keep bf16 adapters with fp32 masters the same way."""
    kw = dict(max_steps=30, batch_size=4, save_steps=3, save_total_limit=2, logging_steps=1,
              method=method, **({"learning_rate": 1e-2} if method != "full" else {}))
    ref = tunelab.train(bf16_cfg(tiny_model_dir, sound_task["train"], tmp_path / "ref", **kw),
                        quiet=True)
    expected = train_losses(ref.metrics_file)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(bf16_cfg(tiny_model_dir, sound_task["train"], tmp_path / "run",
                                 **kw).to_yaml())
    sigkill_training(cfg_file, tmp_path / "run.partial" / "checkpoints", after_step=9)
    resumed = subprocess.run([*CLI, "train", str(cfg_file), "--resume", "--quiet"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = train_losses(tmp_path / "run" / "metrics.jsonl")
    assert got == pytest.approx(expected, abs=1e-6)
    weights = "adapter_model.safetensors" if method != "full" else "model.safetensors"
    a = load_file(ref.model_dir / weights)
    b = load_file(tmp_path / "run" / ref.model_dir.name / weights)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert {t.dtype for t in a.values()} == {torch.bfloat16}


def test_a_checkpoints_size_is_estimated_from_what_it_holds(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.train.callbacks import CheckpointBudget, checkpoint_bytes
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    # full fine-tuning in bf16: the weight 2 + its fp32 master 4 + AdamW's moments 8
    assert checkpoint_bytes(model) == 14 * n
    budget = CheckpointBudget(keep_best=False, checkpoint_bytes=checkpoint_bytes(model))
    assert budget.save_seconds == pytest.approx(14 * n / CheckpointBudget.WRITE_BYTES_PER_S)
    model.float()
    assert checkpoint_bytes(model) == 12 * n   # an fp32 weight is its own master
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert 0 < adapters < n / 10 and checkpoint_bytes(lora) == 12 * adapters



# Run in a fresh interpreter: in a long pytest process earlier tests have grown (and fragmented)
# glibc's arenas, so how a big block is served says nothing about the setting under test. What
# is measured is the claim itself: page faults (the kernel handing out fresh zeroed pages) per
# refill of a 384 MiB block, as a fraction of its pages.
_ALLOCATOR_PROBE = r"""
import json, resource, torch
from tunelab.runtime import _glibc, training_allocator
big = 384 << 20    # over glibc's largest mmap threshold (32 MiB) and the 256 MiB top pad

def faults_per_refill(n):
    out = []
    for _ in range(n):     # a step's tensors: made, filled, freed, made again
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.ones(big, dtype=torch.uint8)
        out.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (big >> 12))
        del t
    return out

report = {"glibc": _glibc() is not None, "before": faults_per_refill(3)}
with training_allocator():
    report["inside"] = faults_per_refill(6)
report["after"] = faults_per_refill(1)
print(json.dumps(report))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_training_allocator_keeps_freed_pages_and_gives_them_back_after():
    done = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["glibc"]:
        pytest.skip("not glibc")
    # glibc's defaults: the block is mapped of its own and unmapped on free, fresh pages each time
    assert min(report["before"]) > 0.9, report
    # training: once the heap holds the working set (a small allocation may split a freed
    # block early on, so the first refills can still land on new heap pages), none are fresh
    assert report["inside"][0] > 0.9 and sum(report["inside"][3:]) < 0.05, report
    # on leaving, the heap is trimmed (free pages returned): the next block is fresh again
    assert report["after"][0] > 0.9, report
