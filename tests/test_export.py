"""`tunelab export`, checked by the real consumers: llama.cpp (node-llama-cpp 3.21.1's prebuilt
CPU binaries, `make llama`) loads the GGUF and continues prompts greedily token for token like
transformers on the source weights; transformers loads the GGUF back; the Modelfile wraps turns
like the model's own template; the HF folder loads and answers the same. Bad input leaves
nothing behind."""
from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.export import export

ROOT = Path(__file__).resolve().parents[1]
NODE_LLAMA = ROOT / ".llama" / "node_modules" / "node-llama-cpp" / "dist" / "index.js"
WORDS = "the a rain stone music salt wind paper glass bread river light cold warm".split()


def llama_cpp(gguf: Path, prompts: list[list[int]], max_tokens: int, *, texts=(),
              lora: Path | None = None) -> dict:
    """Greedy ids from llama.cpp for each prompt, and its tokenization of `texts`."""
    if not NODE_LLAMA.exists():
        pytest.fail("node-llama-cpp is missing: run `make llama` (make test does it)")
    req = {"model": str(gguf), "prompts": prompts, "max_tokens": max_tokens,
           "texts": list(texts), "lora": str(lora) if lora else None}
    r = subprocess.run(["node", str(ROOT / "tests" / "llama_greedy.mjs")], input=json.dumps(req),
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NODE_LLAMA_CPP": str(NODE_LLAMA)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def hf_greedy(model, prompts, max_tokens: int, stops: set[int]) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, pad_token_id=0)[0, len(p):].tolist()
            cut = next((i for i, t in enumerate(gen) if t in stops), len(gen))
            out.append(gen[:cut])     # llama.cpp stops before yielding an end-of-turn token
    return out


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    from tunelab.data.render import render_prompt
    g = torch.Generator().manual_seed(0)
    qs = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (6,), generator=g))
          for _ in range(n)]
    return [render_prompt([{"role": "user", "content": q}], tokenizer) for q in qs]


def near_greedy(model, prompts, outputs, tol: float) -> list[bool]:
    """Per prompt: is every token llama.cpp generated the source model's greedy choice, or
    within `tol` (in units of that step's logit standard deviation) of it? Random tiny models
    have near-ties among ~49k logits that f16 rounding (llama.cpp's KV cache is f16) decides
    either way; a wrong permutation, norm or template misses by whole standard deviations."""
    ok = []
    with torch.no_grad():
        for p, out in zip(prompts, outputs):
            if not out:
                ok.append(True)
                continue
            logits = model(torch.tensor([p + out])).logits[0, len(p) - 1:-1]
            best = logits.max(-1).values
            got = logits.gather(-1, torch.tensor(out)[:, None])[:, 0]
            ok.append(bool(((best - got) <= tol * logits.std(-1)).all()))
    return ok


TINY = {   # name -> (config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 32, "query_pre_attn_scalar": 32,
                                                    "sliding_window": 512}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 32,
                                                        "query_pre_attn_scalar": 32,
                                                        "sliding_window": 512}),
}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smol_tokenizer):
    """Random tiny models of each supported family, with SmolLM2's tokenizer."""
    import transformers
    tok = smol_tokenizer
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  initializer_range=0.2)
    out = {}
    for name, (cfg_cls, model_cls, extra) in TINY.items():
        torch.manual_seed(1)
        folder = tmp_path_factory.mktemp(name) / "model"
        cfg = getattr(transformers, cfg_cls)(**{**common, **extra})
        model = getattr(transformers, model_cls)(cfg)
        if name.startswith("gemma"):   # random norms, so that the +1 shift is checked
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("norm.weight"):
                        p.normal_(std=0.3)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[name] = folder
    return out


@pytest.mark.parametrize("arch", list(TINY))
def test_llama_cpp_continues_like_transformers(tmp_path, tiny_models, arch):
    from tunelab.export.gguf import read_metadata
    from tunelab.models import load_model, load_tokenizer, stop_token_ids
    src = tiny_models[arch]
    tok = load_tokenizer(src)
    model = load_model(str(src), tokenizer=tok, dtype=torch.float32).eval()
    prompts = prompts_for(tok, 20)
    want = hf_greedy(model, prompts, 12, set(stop_token_ids(tok)))
    for quant in ("f16", "q8_0"):
        res = export(str(src), tmp_path / quant, quant=quant)
        gguf = tmp_path / quant / res["files"][0]
        assert read_metadata(gguf)["general.architecture"] == \
            {"gemma3": "gemma3"}.get(arch, arch)
        got = llama_cpp(gguf, prompts, 12)["outputs"]
        exact = sum(w == g for w, g in zip(want, got))
        if quant == "f16":
            assert all(near_greedy(model, prompts, got, tol=0.05)), (arch, want, got)
            assert exact >= 15, (arch, exact)   # the rest: near-ties, decided either way
        else:
            assert sum(near_greedy(model, prompts, got, tol=0.25)) >= 18, (arch, want, got)


def test_unsupported_architecture_names_the_supported_ones(tmp_path, smol_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(smol_tokenizer))
                    ).save_pretrained(gpt2)
    smol_tokenizer.save_pretrained(gpt2)
    with pytest.raises(TunelabError) as e:
        export(str(gpt2), tmp_path / "out")
    assert "GPT2LMHeadModel" in str(e.value) and "LlamaForCausalLM" in str(e.value) and \
        "Gemma3ForCausalLM" in str(e.value) and "Qwen3ForCausalLM" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]
