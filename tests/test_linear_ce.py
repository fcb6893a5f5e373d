"""The chunked LM head + cross-entropy (tunelab.linear_ce) against the logits it replaces."""
from __future__ import annotations

import pytest
import torch

from tunelab import batching, linear_ce
from tunelab.batching import pad_rows, trained_token_loss
from tunelab.linear_ce import linear_cross_entropy, plain_lm_head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_cross_entropy_over_full_logits(dtype, monkeypatch):
    monkeypatch.setattr(linear_ce, "CHUNK_ELEMENTS", 1000 * 70)     # 5 chunks of 70 rows
    torch.manual_seed(0)
    hidden = torch.randn(330, 64, dtype=dtype, requires_grad=True)
    weight = torch.randn(1000, 64, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 1000, (330,))
    targets[:40] = (hidden[:40].detach() @ weight.detach().t()).argmax(-1)   # some hits
    loss, correct = linear_cross_entropy(hidden, weight, targets)
    (0.5 * loss).backward()

    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logits = (h @ w.t()).float()
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    (0.5 * ref).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert correct.item() == int((logits.argmax(-1) == targets).sum()) >= 40
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(hidden.grad.float(), h.grad.float(), atol=tol, rtol=tol)
    assert torch.allclose(weight.grad.float(), w.grad.float(), atol=tol * 4, rtol=tol)
    assert hidden.grad.dtype == weight.grad.dtype == dtype


def test_nothing_trained_is_zero_with_a_graph():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss, correct = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and correct.item() == 0
    assert weight.grad is not None and not weight.grad.any()


def batch_of(tokenizer):
    from tunelab.data.render import render_examples
    convs = [[{"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Blue."}],
             [{"role": "system", "content": "Be brief and kind."},
              {"role": "user", "content": "What is two plus two, in words?"},
              {"role": "assistant", "content": "Four, as always."}],
             [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]]
    return pad_rows(render_examples(convs, tokenizer, max_length=128),
                    tokenizer.pad_token_id)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_trained_token_loss_takes_the_chunked_path_and_agrees(method, tiny_model_dir,
                                                               smol_tokenizer, monkeypatch):
    """On a Llama the loss, the hits and every gradient are those of the logits path."""
    from transformers import AutoModelForCausalLM
    batch = batch_of(smol_tokenizer)

    def run(chunked: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if method == "lora":
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear",
                                                     init_lora_weights=False))
        assert plain_lm_head(model) is not None             # a Llama, LoRA or not: it applies
        if not chunked:
            monkeypatch.setattr(batching, "plain_lm_head", lambda m: None)
        calls = []
        real = linear_ce._LinearCrossEntropy.forward
        monkeypatch.setattr(linear_ce._LinearCrossEntropy, "forward",
                            staticmethod(lambda *a: calls.append(1) or real(*a)))
        part = trained_token_loss(model, dict(batch))
        part.loss_sum.backward()
        monkeypatch.undo()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return part, grads, calls

    chunked, chunked_grads, calls = run(True)
    plain, plain_grads, no_calls = run(False)
    assert calls and not no_calls
    assert int(chunked.trained) == int(plain.trained) > 5
    assert chunked.loss_sum.item() == pytest.approx(plain.loss_sum.item(), rel=1e-5)
    assert int(chunked.correct) == int(plain.correct)
    assert chunked_grads.keys() == plain_grads.keys() and len(chunked_grads) > 4
    for name, g in chunked_grads.items():
        assert torch.allclose(g, plain_grads[name], atol=1e-6, rtol=1e-4), name


def test_only_plain_heads(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    assert plain_lm_head(llama) is llama.lm_head
    # DDP and accelerate hand the trainer the model under `.module`
    assert plain_lm_head(type("Wrapped", (), {"module": llama})()) is llama.lm_head
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    assert plain_lm_head(gpt2) is None                       # not on the list
    llama.lm_head = torch.nn.Linear(16, 64, bias=True)
    assert plain_lm_head(llama) is None                      # a bias: not just the Linear
