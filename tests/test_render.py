"""The loss mask, pinned token by token for ChatML and three other template styles.

Templates are written here (reconstructions of the public Jinja), applied to the real SmolLM2
tokenizer with the template's special tokens added, so ids are real BPE ids.
"""
from __future__ import annotations

import pytest

from tunelab.data.render import IGNORE_INDEX, end_of_turn_token, render, render_prompt
from tunelab.errors import TunelabError

LLAMA3_STYLE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA_STYLE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL_STYLE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "Bye?"},
    {"role": "assistant", "content": "Bye"},
]


def visualize(tok, row) -> str:
    """Decoded text with trained tokens wrapped in [[...]]: pins the mask at token boundaries."""
    out, inside = [], False
    for tid, lab in zip(row["input_ids"], row["labels"]):
        trained = lab != IGNORE_INDEX
        if trained != inside:
            out.append("[[" if trained else "]]")
            inside = trained
        out.append(tok.decode([tid]))
    return "".join(out) + ("]]" if inside else "")


def trained_tokens(tok, row) -> list[list[str]]:
    """Each contiguous trained run, as a list of single-token strings."""
    runs, cur = [], None
    for tid, lab in zip(row["input_ids"], row["labels"]):
        if lab != IGNORE_INDEX:
            cur = cur if cur is not None else []
            cur.append(tok.decode([tid]))
        elif cur is not None:
            runs.append(cur)
            cur = None
    if cur is not None:
        runs.append(cur)
    return runs


def with_template(tok, template, *, bos=None, eos=None, specials=()):
    extra = {"additional_special_tokens": list(specials)}
    if bos:
        extra["bos_token"] = bos
    if eos:
        extra["eos_token"] = eos
    tok.add_special_tokens(extra)
    tok.chat_template = template
    return tok


def test_chatml_two_turns_trains_answers_and_im_end(smol_tokenizer):
    row = render(TWO_TURNS, smol_tokenizer)
    assert len(row["input_ids"]) == len(row["labels"])
    assert visualize(smol_tokenizer, row) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n[[Hello there!<|im_end|>]]\n"
        "<|im_start|>user\nBye?<|im_end|>\n"
        "<|im_start|>assistant\n[[Bye<|im_end|>]]\n")
    assert trained_tokens(smol_tokenizer, row) == [["Hello", " there", "!", "<|im_end|>"],
                                                   ["By", "e", "<|im_end|>"]]
    # trained labels are the ids themselves (the model shifts internally)
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100].count(im_end) == 2


def test_chatml_default_system_prompt_is_not_trained(smol_tokenizer):
    row = render(TWO_TURNS[1:3], smol_tokenizer)
    text = visualize(smol_tokenizer, row)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.count("[[") == 1 and text.endswith("[[Hello there!<|im_end|>]]\n")


def test_weight_zero_turn_is_not_trained(smol_tokenizer):
    msgs = [dict(m) for m in TWO_TURNS]
    msgs[2]["weight"] = 0
    row = render(msgs, smol_tokenizer)
    assert trained_tokens(smol_tokenizer, row) == [["By", "e", "<|im_end|>"]]


def test_llama3_style_single_bos_and_eot(fresh_tokenizer):
    tok = with_template(fresh_tokenizer, LLAMA3_STYLE, bos="<|begin_of_text|>",
                        specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    row = render(TWO_TURNS, tok)
    assert visualize(tok, row) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n[[Hello there!<|eot_id|>]]"
        "<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n[[Bye<|eot_id|>]]")
    assert trained_tokens(tok, row) == [["Hello", " there", "!", "<|eot_id|>"],
                                        ["By", "e", "<|eot_id|>"]]
    assert row["input_ids"].count(tok.bos_token_id) == 1 and row["input_ids"][0] == tok.bos_token_id
    assert render_prompt(TWO_TURNS[:2], tok).count(tok.bos_token_id) == 1
    assert end_of_turn_token(tok) == "<|eot_id|>"


def test_llama3_style_trims_content_but_mask_follows(fresh_tokenizer):
    tok = with_template(fresh_tokenizer, LLAMA3_STYLE, bos="<|begin_of_text|>",
                        specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  padded  \n"}]
    assert trained_tokens(tok, render(msgs, tok)) == [["p", "added", "<|eot_id|>"]]


def test_gemma_style_model_role_and_end_of_turn(fresh_tokenizer):
    tok = with_template(fresh_tokenizer, GEMMA_STYLE, bos="<bos>",
                        specials=["<start_of_turn>", "<end_of_turn>"])
    row = render(TWO_TURNS[1:], tok)
    assert visualize(tok, row) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\n[[Hello there!<end_of_turn>]]\n"
        "<start_of_turn>user\nBye?<end_of_turn>\n"
        "<start_of_turn>model\n[[Bye<end_of_turn>]]\n")
    assert trained_tokens(tok, row)[1] == ["By", "e", "<end_of_turn>"]


def test_gemma_style_refuses_system_with_a_clear_error(fresh_tokenizer):
    tok = with_template(fresh_tokenizer, GEMMA_STYLE, bos="<bos>",
                        specials=["<start_of_turn>", "<end_of_turn>"])
    with pytest.raises(TunelabError, match="System role not supported"):
        render(TWO_TURNS, tok, source="data.jsonl:7")
    try:
        render(TWO_TURNS, tok, source="data.jsonl:7")
    except TunelabError as e:
        assert e.file == "data.jsonl" and e.line == 7


def test_mistral_style_eos_closes_turn_and_no_generation_prompt(fresh_tokenizer):
    tok = with_template(fresh_tokenizer, MISTRAL_STYLE, bos="<s>", eos="</s>",
                        specials=["[INST]", "[/INST]"])
    row = render(TWO_TURNS[1:], tok)
    assert visualize(tok, row) == (
        "<s>[INST] Hi [/INST][[ Hello there!</s>]][INST] Bye? [/INST][[ Bye</s>]]")
    assert trained_tokens(tok, row)[0][-1] == "</s>"


def test_template_that_rewrites_earlier_turns_fails_loudly(fresh_tokenizer):
    # Like reasoning templates that drop earlier turns' text once a later turn exists.
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\\n<|im_end|>\\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(TunelabError, match="rewrites this assistant turn"):
        render(TWO_TURNS, fresh_tokenizer)


def test_template_without_end_of_turn_token_fails_loudly(fresh_tokenizer):
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(TunelabError, match="no end-of-turn token"):
        render(TWO_TURNS, fresh_tokenizer)


def test_truncation_keeps_ids_and_labels_aligned(smol_tokenizer):
    full = render(TWO_TURNS, smol_tokenizer)
    cut = render(TWO_TURNS, smol_tokenizer, max_length=20)
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


def test_render_prompt_is_the_training_prefix(smol_tokenizer):
    """Inference formats prompts with the same code: the prompt is a prefix of the training row."""
    row = render(TWO_TURNS[:3], smol_tokenizer)
    prompt = render_prompt(TWO_TURNS[:2], smol_tokenizer)
    assert row["input_ids"][:len(prompt)] == prompt
    assert row["labels"][len(prompt)] != IGNORE_INDEX
    assert all(lab == IGNORE_INDEX for lab in row["labels"][:len(prompt)])
