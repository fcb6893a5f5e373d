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


def test_smollm2_with_a_lora_merged(tmp_path):
    """The builtin model with a LoRA: llama.cpp tokenizes and answers like the merged model,
    transformers reads the GGUF back, and the template in the file is the tokenizer's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.data.render import chat_text
    from tunelab.export.gguf import read_metadata
    from tunelab.models import load_model, load_tokenizer, resolve, stop_token_ids
    base = resolve("smollm2-135m-instruct").path
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.02)
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    tok = load_tokenizer(adapter)
    merged = load_model(str(adapter), tokenizer=tok, dtype=torch.float32).eval()
    prompts = prompts_for(tok, 3)
    want = hf_greedy(merged, prompts, 8, set(stop_token_ids(tok)))

    res = export(str(adapter), tmp_path / "gguf", quant="f16", name="smol-lora")
    gguf = tmp_path / "gguf" / "smol-lora-f16.gguf"
    conv = [{"role": "user", "content": "Salt, rain and 42 stones?"}]
    text = chat_text(tok, conv, add_generation_prompt=True)
    r = llama_cpp(gguf, prompts, 8, texts=[text])
    assert r["tokenized"][0] == tok(text, add_special_tokens=False)["input_ids"]
    assert all(near_greedy(merged, prompts, r["outputs"], tol=0.05)), (want, r["outputs"])

    back = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                dtype=torch.float32).eval()
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        a, b = merged(ids).logits, back(ids).logits
    assert (a - b).abs().max() < 0.02 * a.abs().max()

    meta = read_metadata(gguf)
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert res["bytes"] > 200e6


def test_lora_as_gguf_adapter_runs_in_llama_cpp(tmp_path, tiny_models):
    """--format gguf-adapter: llama.cpp with the base GGUF and the adapter answers like the
    merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.export.gguf import read_metadata
    from tunelab.models import load_model, load_tokenizer
    src = tiny_models["llama"]
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(src),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    tok = load_tokenizer(adapter)
    merged = load_model(str(adapter), tokenizer=tok, dtype=torch.float32).eval()
    plain = load_model(str(src), tokenizer=tok, dtype=torch.float32).eval()
    prompts = prompts_for(tok, 6)
    res = export(str(adapter), tmp_path / "lora", fmt="gguf-adapter")
    lora = tmp_path / "lora" / res["files"][0]
    meta = read_metadata(lora)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8
    base = tmp_path / "base"
    export(str(src), base, quant="f16")
    got = llama_cpp(base / "model-f16.gguf", prompts, 10, lora=lora)["outputs"]
    assert all(near_greedy(merged, prompts, got, tol=0.05)), got
    assert not all(near_greedy(plain, prompts, got, tol=0.05))   # the adapter acted


def test_ollama_modelfile_wraps_turns_like_the_template(tmp_path, tiny_models):
    from tunelab.data.render import chat_text
    from tunelab.export.ollama import turn_wrappers
    from tunelab.models import load_tokenizer
    res = export(str(tiny_models["llama"]), tmp_path / "ollama", fmt="ollama", quant="q8_0")
    assert sorted(res["files"]) == ["Modelfile", "model-q8_0.gguf"]
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    assert text.startswith("FROM ./model-q8_0.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    tok = load_tokenizer(tiny_models["llama"])
    w = turn_wrappers(tok)
    for role in ("system", "user", "assistant"):
        assert f'eq .Role "{role}" }}}}{w[role][0]}{{{{ .Content }}}}{w[role][1]}' in text
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
    built = "".join(w[m["role"]][0] + m["content"] + w[m["role"]][1] for m in conv)
    assert built + w["generation"][0] == chat_text(tok, conv, add_generation_prompt=True)


def test_ollama_system_prompt_from_the_training_data(tmp_path, tiny_models):
    from tunelab.data.io import write_jsonl
    from tunelab.export.ollama import training_system_prompt
    rows = [{"messages": [{"role": "system", "content": "Answer in one word."},
                          {"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": "a"}]} for i in range(3)]
    write_jsonl(tmp_path / "train.jsonl", rows + [{"messages": rows[0]["messages"][1:]}])
    assert training_system_prompt(tmp_path / "train.jsonl") == "Answer in one word."
    write_jsonl(tmp_path / "few.jsonl", rows[:1] + [{"messages": rows[0]["messages"][1:]}] * 2)
    assert training_system_prompt(tmp_path / "few.jsonl") is None


def test_hf_folder_loads_and_answers_the_same(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    from tunelab.models import load_model, load_tokenizer
    src = tiny_models["qwen2"]
    res = export(str(src), tmp_path / "hf", fmt="hf")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= \
        set(res["files"])
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    orig = load_model(str(src), tokenizer=load_tokenizer(src), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, orig(ids).logits, atol=1e-5)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "Qwen2ForCausalLM" in card and "library_name: transformers" in card


def test_model_card_of_a_run(tmp_path, sound_run):
    res = export(str(sound_run.output_dir), tmp_path / "hf", fmt="hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| train examples | 40 |" in card and "## Training curve" in card
    assert "| method | full |" in card and "README.md" in res["files"]


def test_bad_input_leaves_nothing_behind(tmp_path, tiny_models, monkeypatch):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    with pytest.raises(TunelabError) as e:
        export(str(empty), tmp_path / "out2")
    assert "no weights" in str(e.value) and "model.safetensors" in str(e.value)

    exists = tmp_path / "exists"
    exists.mkdir()
    with pytest.raises(TunelabError) as e:
        export(str(tiny_models["llama"]), exists)
    assert "--overwrite" in str(e.value) and str(exists) in str(e.value)

    with pytest.raises(TunelabError) as e:
        export(str(tiny_models["llama"]), tmp_path / "out4", quant="q2_k")
    assert e.value.field == "quant"

    # the disk fills up half-way through the tensors (after the 5th write)
    import gguf
    real = gguf.GGUFWriter.write_padding
    calls = []

    def full_disk(self, *a, **kw):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)
    monkeypatch.setattr(gguf.GGUFWriter, "write_padding", full_disk)
    with pytest.raises(TunelabError) as e:
        export(str(tiny_models["llama"]), tmp_path / "out3")
    assert "No space left" in str(e.value) and len(calls) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "no-weights"]


def test_cli_export(tmp_path, tiny_models):
    from conftest import assert_clean_error, run_cli
    p = run_cli("export", tiny_models["qwen2"], "-o", tmp_path / "o", "--format", "gguf",
                "--quant", "q4_0")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "model-q4_0.gguf").stat().st_size > 1e6
    assert_clean_error(run_cli("export", tiny_models["qwen2"], "-o", tmp_path / "o"),
                       "--overwrite")


def test_export_over_the_api(tmp_path, tiny_models):
    """POST /v1/tunelab/exports runs in the background; GET says succeeded; download is the
    GGUF; another key cannot see it; a bad model name is a 404 naming the field."""
    import time

    from fastapi.testclient import TestClient

    from tunelab.export.gguf import read_metadata
    from tunelab.server.app import create_app
    from tunelab.server.context import Settings
    app = create_app(Settings(data_dir=tmp_path / "data", auth=False,
                              models={"tiny": str(tiny_models["qwen2"])}))
    with TestClient(app) as client:
        r = client.post("/v1/tunelab/exports", json={"model": "tiny", "quant": "q8_0"})
        assert r.status_code == 200, r.text
        e = r.json()
        assert e["object"] == "tunelab.export" and e["status"] in ("queued", "running")
        for _ in range(300):
            e = client.get(f"/v1/tunelab/exports/{e['id']}").json()
            if e["status"] not in ("queued", "running"):
                break
            time.sleep(0.2)
        assert e["status"] == "succeeded", e
        d = client.get(f"/v1/tunelab/exports/{e['id']}/download")
        assert d.status_code == 200 and d.content[:4] == b"GGUF"
        assert len(d.content) == e["bytes"] and e["filename"] == "tiny-q8_0.gguf"
        (tmp_path / "dl.gguf").write_bytes(d.content)
        assert read_metadata(tmp_path / "dl.gguf")["general.architecture"] == "qwen2"
        bad = client.post("/v1/tunelab/exports", json={"model": "nope"})
        assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
        assert client.get("/v1/tunelab/exports/export-nothere").status_code == 404
