"""The engine's batched LoRA (server/engine/lora.py) against PEFT: each row of a batch that
mixes adapters of different ranks and the base gets the logits PEFT gives that row's adapter
alone; a freed slot taken by another adapter serves the newcomer, not a trace of the old."""
from __future__ import annotations

import pytest
import torch

from tunelab.server.engine.adapters import BASE_ADAPTER
from tunelab.server.engine.lora import LoraBank


def make_adapter(folder, base, rank, seed, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=3 * rank, init_lora_weights=False,
                                      target_modules=targets, use_rslora=rank == 4))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)
    model.save_pretrained(folder)
    return str(folder)


def peft_logits(base, adapter, ids, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def close_to(got, base, adapter, ids, dtype):
    """In fp32: PEFT's logits within 1e-4. In bf16: no further from PEFT's fp32 logits than
    PEFT's own bf16 logits are (the bank sums its LoRA products in fp32, PEFT in bf16)."""
    exact = peft_logits(base, adapter, ids, torch.float32)[0]
    if dtype == torch.float32:
        assert (got - exact).abs().max() < 1e-4, adapter
    else:
        peft_error = (peft_logits(base, adapter, ids, dtype)[0] - exact).abs().mean()
        assert (got - exact).abs().mean() <= 1.25 * peft_error, adapter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_equals_each_adapter_alone(tmp_path, tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM
    adapters = {
        "r2": make_adapter(tmp_path / "r2", tiny_model_dir, 2, 1, ["q_proj", "v_proj"]),
        "r4": make_adapter(tmp_path / "r4", tiny_model_dir, 4, 2, "all-linear"),
        "r8": make_adapter(tmp_path / "r8", tiny_model_dir, 8, 3, ["down_proj", "k_proj"]),
    }
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    bank = LoraBank(model, torch.device("cpu"), dtype)
    for name, folder in adapters.items():
        bank.add(name, folder)
    rows = ["r4", BASE_ADAPTER, "r8", "r2", "r4"]
    ids = torch.randint(0, 1000, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), bank.rows(rows):
        got = model(input_ids=ids).logits.float()
    with torch.inference_mode():     # outside rows(): the base, untouched by the bank
        plain = model(input_ids=ids).logits.float()
    tol = 1e-4
    for i, name in enumerate(rows):
        close_to(got[i], tiny_model_dir, adapters.get(name), ids[i:i + 1], dtype)
        want = peft_logits(tiny_model_dir, adapters.get(name), ids[i:i + 1], torch.float32)
        if name != BASE_ADAPTER:      # the adapter changed this row's logits
            assert (want[0] - plain[i]).abs().max() > 0.1
    base = peft_logits(tiny_model_dir, None, ids, dtype)
    assert (plain - base).abs().max() < tol    # the same dtype, no adapter: the same numbers

    # r8 leaves; its slot goes to another adapter, of a larger rank: no trace of r8
    bank.remove("r8")
    adapters["r16"] = make_adapter(tmp_path / "r16", tiny_model_dir, 16, 4, ["o_proj"])
    bank.add("r16", adapters["r16"])
    assert bank.slots["r16"] == 2 and bank.rank == 16
    rows = ["r16", "r2", BASE_ADAPTER]
    with torch.inference_mode(), bank.rows(rows):
        got = model(input_ids=ids[:3]).logits.float()
    for i, name in enumerate(rows):
        close_to(got[i], tiny_model_dir, adapters.get(name), ids[i:i + 1], dtype)
