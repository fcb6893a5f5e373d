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


def test_hub_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunelabError, match="could not load the tokenizer from 'nobody-xyz/no-model'"):
        models.load_tokenizer("nobody-xyz/no-model")


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
