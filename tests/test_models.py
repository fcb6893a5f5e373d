from __future__ import annotations

import pytest

from tunelab import models
from tunelab.errors import TunelabError


def test_builtin_tokenizer_is_ready_for_chat_sft(smol_tokenizer):
    tok = smol_tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    # the pad token must not be the eos the model has to learn to emit
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"
    assert "<|im_start|>" in tok.chat_template
    ids = tok("hello", add_special_tokens=True)["input_ids"]
    assert ids == tok("hello", add_special_tokens=False)["input_ids"]  # no BOS prepended


@pytest.mark.parametrize("spec,needle", [
    ("not a model", "unknown model spec"),
    ("./missing-folder", "model not found"),
    ("/nowhere/model.gguf", "model not found"),
])
def test_bad_model_specs(spec, needle):
    with pytest.raises(TunelabError, match=needle):
        models.resolve(spec)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(TunelabError, match="not a model folder"):
        models.resolve(tmp_path)


def test_hub_id_offline_fails_at_once_with_the_accepted_specs(monkeypatch):
    import time
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(TunelabError, match="'nobody-xyz/no-model' is not a builtin.*HF_HUB_OFFLINE"
                                           ".*expected a builtin alias"):
        models.load_tokenizer("nobody-xyz/no-model")
    assert time.monotonic() - started < 5


def test_hub_id_without_network_fails_at_once(monkeypatch):
    """No HF_HUB_OFFLINE, but the hub cannot be reached (this machine has no internet, and an
    endpoint on a closed local port stands for it): one error, not ~45 s of retries."""
    import time
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    proc_err = None
    try:
        models.resolve("someone/unknown-model")
    except TunelabError as e:
        proc_err = str(e)
    assert proc_err and "cannot be reached" in proc_err and "a hub id like org/name" in proc_err
    assert time.monotonic() - started < 5


def test_tokenizer_only_folder_is_enough_to_render_and_validate(tmp_path, smol_tokenizer):
    """Masks and token counts can be checked before anyone downloads weights."""
    from conftest import run_cli
    from tunelab.data.io import write_jsonl
    folder = tmp_path / "tok"
    smol_tokenizer.save_pretrained(folder)
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": f"hi {i}"},
                                     {"role": "assistant", "content": "hello"}]}
                       for i in range(12)])
    render = run_cli("data", "render", data, "--tokenizer", folder)
    assert render.returncode == 0 and "[[hello<|im_end|>]]" in render.stdout, render.stderr
    for flag in ("--model", "--tokenizer"):   # both commands take both names
        validate = run_cli("data", "validate", data, flag, folder)
        assert validate.returncode == 0 and "median 36" in validate.stdout, validate.stdout
    with pytest.raises(TunelabError, match="tokenizer but no model"):
        models.load(folder)


def test_local_folder_loads_with_fixed_tokenizer(tiny_model_dir):
    model, tok = models.load(tiny_model_dir)
    assert tok.pad_token_id != tok.eos_token_id
    assert 2 in model.generation_config.eos_token_id          # stops at <|im_end|>
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_tokenizer_without_template_gets_chatml_and_embeddings_grow(tmp_path):
    """A base model with no chat template and no chat markers in its vocabulary: ChatML is added
    as special tokens, the eos becomes <|im_end|>, and the embeddings grow to fit."""
    from conftest import BASE_WORDS as words, templateless_base_model
    from tunelab.data.render import render
    base = templateless_base_model(tmp_path / "base")

    model, tok = models.load(base)
    assert tok.chat_template == models.CHATML_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id not in (None, tok.eos_token_id)
    assert len(tok) == len(words) + 2   # <|im_start|>, <|im_end|>; pad reuses <unk>
    assert model.get_input_embeddings().num_embeddings == len(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    row = render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tok)
    trained = [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert trained == [tok.convert_tokens_to_ids("yo"), im_end]


def test_the_lm_head_of_a_frozen_model_runs_one_matmul_on_a_sliced_input(tiny_model_dir):
    """generate() runs the head on a strided slice (the last position); with frozen weights
    PyTorch's matmul would broadcast the [vocab, hidden] weight into a bmm, one copy per row."""
    import torch
    from tunelab.models import load_model
    model = load_model(str(tiny_model_dir)).requires_grad_(False)
    hidden = torch.randn(6, 9, model.config.hidden_size)[:, -1:]
    assert not hidden.is_contiguous()
    with torch.inference_mode(), torch.profiler.profile() as prof:
        out = model.lm_head(hidden)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::bmm" not in ops and "aten::mm" in ops, ops
    with torch.inference_mode():
        assert torch.equal(out, model.lm_head(hidden.contiguous()))
