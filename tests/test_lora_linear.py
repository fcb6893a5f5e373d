"""tunelab.lora_linear: PEFT's LoRA layers with their forward and backward fused while training.
The fused function must compute what PEFT computes (outputs and every gradient), and leave to
PEFT every case it does not take."""
from __future__ import annotations

import copy

import pytest
import torch

from tunelab import lora_linear


class Block(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.up = torch.nn.Linear(24, 40, bias=bias)
        self.down = torch.nn.Linear(40, 24, bias=bias)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def peft_pair(dtype, *, bias=True, dropout=0.0):
    """(PEFT's model, the same with fused forwards), both with non-zero B (a trained adapter)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"],
                        init_lora_weights=False)
    ref = get_peft_model(Block(bias).to(dtype), config, autocast_adapter_dtype=False)
    fused = copy.deepcopy(ref)
    assert lora_linear.use_fused_lora(fused) == 2
    return ref, fused


def counting(monkeypatch) -> dict:
    calls = {"fused": 0}
    real = lora_linear._LoraLinear.apply

    def apply(*args):
        calls["fused"] += 1
        return real(*args)
    monkeypatch.setattr(lora_linear._LoraLinear, "apply", apply)
    return calls


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_fused_layers_compute_what_peft_computes(dtype, tol, bias, monkeypatch):
    calls = counting(monkeypatch)
    ref, fused = peft_pair(dtype, bias=bias)
    x = torch.randn(3, 7, 24, dtype=dtype)
    results = []
    for model in (ref, fused):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach().float(), xi.grad.float(), grads))
    assert calls["fused"] == 2                           # the fused model took the fast path
    (out_r, dx_r, g_r), (out_f, dx_f, g_f) = results
    assert sorted(g_r) == sorted(g_f) and len(g_r) == 4  # A and B of both layers, no others

    def close(a, b):
        return (a - b).abs().max() <= tol * max(1.0, float(a.abs().max()))
    assert close(out_r, out_f) and close(dx_r, dx_f)
    for name in g_r:
        assert close(g_r[name], g_f[name]), name
    assert not torch.equal(g_r[next(iter(g_r))], torch.zeros_like(g_r[next(iter(g_r))]))


def test_what_the_fused_function_does_not_take_runs_peft_unchanged(monkeypatch):
    calls = counting(monkeypatch)
    x = torch.randn(2, 5, 24)
    # dropout: PEFT's masks (the fused function has none), the same masks from the same seed
    ref, fused = peft_pair(torch.float32, dropout=0.5)
    torch.manual_seed(1)
    a = fused.train()(x)
    torch.manual_seed(1)
    b = ref.train()(x)
    assert calls["fused"] == 0 and torch.equal(a, b)
    # adapters disabled: the base model alone, as PEFT computes it
    ref, fused = peft_pair(torch.float32)
    with fused.disable_adapter():
        plain = fused(x)
    with ref.disable_adapter():
        assert torch.equal(plain, ref(x))
    assert not torch.allclose(plain, fused(x))      # (the adapters do change the output)
    assert calls["fused"] == 2                       # only that last call took the fast path
    # mixed dtypes (fp32 adapters on a bf16 base, PEFT's default): PEFT's casts
    calls["fused"] = 0
    ref, fused = peft_pair(torch.bfloat16)
    for n, p in fused.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    fused(x.bfloat16())
    assert calls["fused"] == 0


def test_lora_training_on_a_bf16_base_keeps_bf16_adapters_with_fused_layers(tiny_model_dir):
    """On a bf16 base the adapters stay bf16 (their fp32 masters are the optimizer's) and every
    LoRA layer runs fused; an fp32 base keeps PEFT's fp32 adapters."""
    from tunelab import models
    from tunelab.config import TrainConfig
    from tunelab.train.run import _apply_method, _load_model
    tok = models.load_tokenizer(str(tiny_model_dir))
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = TrainConfig(model=str(tiny_model_dir), train_file=__file__, output_dir="unused",
                          method="lora")
        model = _apply_method(_load_model(cfg, tok, None, precision), cfg)
        adapters = [p for n, p in model.named_parameters() if "lora_" in n]
        assert adapters and all(p.dtype == dtype and p.requires_grad for p in adapters)
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert layers and all(m.forward.__func__ is lora_linear._fused_forward for m in layers)
