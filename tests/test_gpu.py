"""What runs only on a CUDA GPU: PyTorch's varlen kernel under flat forwards, and the optimizer's
state on the GPU (QLoRA, which bitsandbytes runs on the CPU too, is tested in
test_train_engine.py). Skipped elsewhere (CI has no GPU); bench/gpu_device.py runs them, and
that QLoRA test on the GPU, on a lent GPU machine before its benchmark."""
from __future__ import annotations

import math

import pytest
import torch

import tunelab
from test_attention import three_sequences_flat
from test_train_precision import train_losses
from tunelab import attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_varlen_kernel_keeps_each_sequence_to_itself(tiny_model_dir):
    """A flat forward through torch's own kernel gives each sequence the logits it gets alone,
    and a gradient."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
    attention.use_fast_attention(model)
    assert attention.varlen_runs(model.config, torch.bfloat16, "cuda")
    seqs, flat = three_sequences_flat("cuda")
    together = model(**flat, use_cache=False).logits[0].float()
    together.pow(2).mean().backward()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None], use_cache=False).logits[0].float()
                           for s in seqs])
    assert ((together - alone).norm() / alone.norm()).item() < 3e-2
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.fixture
def mixed_lengths(tmp_path):
    """The sound task with 0-42 filler sentences before some questions: rows of 30-300 tokens,
    whose padded forwards would be mostly padding, so the steps go flat."""
    from conftest import sound_rows
    from tunelab.data.io import write_jsonl
    rows = sound_rows()[:40]
    for i, r in enumerate(rows):
        r["messages"][0]["content"] = "Listen. " * (i % 8 * 6) + r["messages"][0]["content"]
    write_jsonl(tmp_path / "train.jsonl", rows)
    return tmp_path / "train.jsonl"


def test_lora_trains_padding_free_through_the_varlen_kernel(tiny_model_dir, mixed_lengths,
                                                            tmp_path, monkeypatch):
    sequences = []
    real = attention._varlen_attention

    def spy(query, key, value, cu, longest, scale):
        sequences.append(cu.numel() - 1)
        return real(query, key, value, cu, longest, scale)
    monkeypatch.setattr(attention, "_varlen_attention", spy)
    result = tunelab.train({"model": str(tiny_model_dir), "train_file": str(mixed_lengths),
                            "output_dir": str(tmp_path / "run"), "method": "lora", "epochs": 6,
                            "learning_rate": 5e-3, "logging_steps": 1}, quiet=True)
    assert sequences and max(sequences) > 1          # several sequences in one forward
    curve = train_losses(result.metrics_file)
    # a random base learns slowly through rank-16 adapters: 10.8 -> 9.9 in a CPU dry run
    assert all(map(math.isfinite, curve)) and curve[-1] < 0.95 * curve[0], curve


def test_master_weight_state_survives_the_move_to_the_gpu():
    """accelerate's prepare() (and a resume) moves every tensor of the optimizer's state to the
    model's device, the rounding's generator state too, which set_state takes on the CPU only;
    the steps after the reload are the ones the original would have taken."""
    from accelerate.utils import send_to_device

    from tunelab.train.precision import MasterWeightAdamW

    def run(opt, p, steps):
        for _ in range(steps):
            p.grad = torch.full_like(p, -1.0)
            opt.step()
    p = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16, device="cuda"))
    opt = MasterWeightAdamW([p], lr=1e-3)
    run(opt, p, 3)
    saved = send_to_device(opt.state_dict(), "cuda")
    assert saved["rounding_rng"].is_cuda
    q = torch.nn.Parameter(p.detach().clone())
    again = MasterWeightAdamW([q], lr=1e-3)
    again.load_state_dict(saved)
    run(opt, p, 2)
    run(again, q, 2)
    assert torch.equal(p, q)
