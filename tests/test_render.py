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
    extra = {"additional_special_tokens": list(specials)} if specials else {}
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


# ---------------------------------------------------------------------------------------------
# The real templates of the families people fine-tune, reconstructed from their public
# tokenizer_config.json files (tool-calling branches left out where they never fire without
# tools; every branch a plain conversation reaches is kept as published).
# ---------------------------------------------------------------------------------------------
import datetime  # noqa: E402

from tunelab.data.render import (HistoryRewriteError, chat_text, per_turn,  # noqa: E402
                                 render_examples, render_many)
from tunelab.models import CHATML_TEMPLATE  # noqa: E402

LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {{- message.content }}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
# Llama 3.2 differs in one line that matters here: today's date, from strftime_now.
LLAMA32 = LLAMA31.replace('{%- set date_string = "26 Jul 2024" %}',
                          '{%- if strftime_now is defined %}{%- set date_string = '
                          'strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = '
                          '"26 Jul 2024" %}{%- endif %}')

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "tool" %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant"
    "/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = "
    "'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + "
    "'\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if "
    "add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")

GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

PHI35 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")

MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/"
    "assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
    "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
    "message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}")

MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {{- tool | tojson }}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# DeepSeek-R1-Distill-Qwen as first published; the later revision ends the generation prompt
# with '<think>\n' (R1_DISTILL_V2).
R1_DISTILL = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = "
    "message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = "
    "false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + "
    "'<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}")
R1_DISTILL_V2 = R1_DISTILL.replace("{{'<｜Assistant｜>'}}{% endif %}",
                                   "{{'<｜Assistant｜><think>\\n'}}{% endif %}")

SMOLLM3 = r"""{# ───── defaults ───── #}
{%- if enable_thinking is not defined -%}
{%- set enable_thinking = true -%}
{%- endif -%}

{# ───── reasoning mode ───── #}
{%- if enable_thinking -%}
{%- set reasoning_mode = "/think" -%}
{%- else -%}
{%- set reasoning_mode = "/no_think" -%}
{%- endif -%}

{# ───── header (system message) ───── #}
{{- "<|im_start|>system\n" -}}

{%- if messages[0].role == "system" -%}
{%- set system_message = messages[0].content -%}
{%- if "/no_think" in system_message -%}
{%- set reasoning_mode = "/no_think" -%}
{%- elif "/think" in system_message -%}
{%- set reasoning_mode = "/think" -%}
{%- endif -%}
{%- set custom_instructions = system_message.replace("/no_think", "").replace("/think", "").rstrip() -%}
{%- endif -%}

{%- if "/system_override" in system_message -%}
{{- custom_instructions.replace("/system_override", "").rstrip() -}}
{{- "<|im_end|>\n" -}}
{%- else -%}
{{- "## Metadata\n\n" -}}
{{- "Knowledge Cutoff Date: June 2025\n" -}}
{%- set today = strftime_now("%d %B %Y") -%}
{{- "Today Date: " ~ today ~ "\n" -}}
{{- "Reasoning Mode: " + reasoning_mode + "\n\n" -}}

{{- "## Custom Instructions\n\n" -}}
{%- if custom_instructions -%}
{{- custom_instructions + "\n\n" -}}
{%- elif reasoning_mode == "/think" -%}
{{- "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant involves thoroughly exploring questions through a systematic thinking process before providing the final precise and accurate solutions.\n\n" -}}
{%- else -%}
{{- "You are a helpful AI assistant named SmolLM, trained by Hugging Face.\n\n" -}}
{%- endif -%}

{%- if xml_tools or python_tools -%}
{{- "### Tools\n\n" -}}
{{- "\n\n" -}}
{{- "<|im_end|>\n" -}}
{%- endif -%}
{%- endif -%}
{# ───── main loop ───── #}
{%- for message in messages -%}
{%- set content = message.content if message.content is string else "" -%}
{%- if message.role == "user" -%}
    {{ "<|im_start|>" + message.role + "\n"  + content + "<|im_end|>\n" }}
{%- elif message.role == "assistant" -%}
    {% generation %}
    {%- if reasoning_mode == "/think" -%}
        {{ "<|im_start|>assistant\n" + content.lstrip("\n") + "<|im_end|>\n" }}
    {%- else -%}
        {{ "<|im_start|>assistant\n" + "<think>\n\n</think>\n" + content.lstrip("\n") + "<|im_end|>\n" }}
    {%- endif -%}
    {% endgeneration %}
{%- elif message.role == "tool" -%}
{{ "<|im_start|>" + "user\n"  + content + "<|im_end|>\n" }}
{%- endif -%}
{%- endfor -%}
{# ───── generation prompt ───── #}
{%- if add_generation_prompt -%}
{%- if reasoning_mode == "/think" -%}
    {{ "<|im_start|>assistant\n" }}
{%- else -%}
    {{ "<|im_start|>assistant\n" + "<think>\n\n</think>\n"  }}
{%- endif -%}
{%- endif -%}
"""

LLAMA_TOKENS = dict(bos="<|begin_of_text|>", eos="<|eot_id|>",
                    specials=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
FAMILIES = {
    # name: (template, with_template kwargs, supports a system message)
    "llama3.1": (LLAMA31, LLAMA_TOKENS, True),
    "llama3.2": (LLAMA32, LLAMA_TOKENS, True),
    "qwen2.5": (QWEN25, {}, True),
    "qwen3": (QWEN3, dict(added=["<think>", "</think>"]), True),
    "gemma2": (GEMMA2, dict(bos="<bos>", specials=["<start_of_turn>", "<end_of_turn>"]), False),
    "gemma3": (GEMMA3, dict(bos="<bos>", specials=["<start_of_turn>", "<end_of_turn>"]), True),
    "phi3.5": (PHI35, dict(eos="<|endoftext|>",
                           specials=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]), True),
    "mistral-v0.1": (MISTRAL_V01, dict(bos="<s>", eos="</s>", specials=["[INST]", "[/INST]"]), False),
    "mistral-v0.3": (MISTRAL_V03, dict(bos="<s>", eos="</s>", specials=["[INST]", "[/INST]"]), False),
    "smollm2": (None, {}, True),   # the real tokenizer's own template
    "smollm3": (SMOLLM3, dict(added=["<think>", "</think>"]), True),
    "r1-distill": (R1_DISTILL, dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
                                    specials=["<｜User｜>", "<｜Assistant｜>"]), True),
    "chatml": (CHATML_TEMPLATE, {}, True),
}


def family(tok, name):
    template, kwargs, _ = FAMILIES[name]
    if template is None:
        return tok
    kwargs = dict(kwargs)
    added = kwargs.pop("added", ())
    if added:
        tok.add_tokens(list(added))   # Qwen3's <think> tags are added tokens, not special ones
    return with_template(tok, template, **kwargs)


def today(fmt):
    return datetime.datetime.now().strftime(fmt)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fast_render_path_is_byte_identical_to_apply_chat_template(fresh_tokenizer, name):
    tok = family(fresh_tokenizer, name)
    convs = [TWO_TURNS[1:3], TWO_TURNS[1:], TWO_TURNS[1:2]]
    if FAMILIES[name][2]:
        convs.append(TWO_TURNS)
    for conv in convs:
        for gen in (True, False):
            assert chat_text(tok, conv, add_generation_prompt=gen) == tok.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=gen), (name, conv, gen)
    rows = render_examples(convs[:2], tok)
    for row in rows:   # the batched Rust path tokenizes exactly like tokenizer(text)
        text = tok.decode(row["input_ids"])
        assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name,expected", [
    ("llama3.1",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
     "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n[[Hello there!<|eot_id|>]]"
     "<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n[[Bye<|eot_id|>]]"),
    ("qwen2.5",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\n[[Hello there!<|im_end|>]]\n<|im_start|>user\nBye?<|im_end|>\n"
     "<|im_start|>assistant\n[[Bye<|im_end|>]]\n"),
    ("gemma3",
     "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
     "<start_of_turn>model\n[[Hello there!<end_of_turn>]]\n"
     "<start_of_turn>user\nBye?<end_of_turn>\n<start_of_turn>model\n[[Bye<end_of_turn>]]\n"),
    # Phi-3.5 closes the whole conversation with EOS: after the last <|end|>, so not trained.
    ("phi3.5",
     "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n[[Hello there!<|end|>]]\n"
     "<|user|>\nBye?<|end|>\n<|assistant|>\n[[Bye<|end|>]]\n<|endoftext|>"),
    ("r1-distill",
     "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>[[Hello there!<｜end▁of▁sentence｜>]]"
     "<｜User｜>Bye?<｜Assistant｜>[[Bye<｜end▁of▁sentence｜>]]"),
    ("chatml",
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\n[[Hello there!<|im_end|>]]\n<|im_start|>user\nBye?<|im_end|>\n"
     "<|im_start|>assistant\n[[Bye<|im_end|>]]\n"),
])
def test_real_template_masks_with_system_two_turns(fresh_tokenizer, name, expected):
    tok = family(fresh_tokenizer, name)
    row = render(TWO_TURNS, tok)
    assert visualize(tok, row) == expected
    eot = end_of_turn_token(tok)
    assert trained_tokens(tok, row) == [["Hello", " there", "!", eot], ["By", "e", eot]]


@pytest.mark.parametrize("name,expected", [
    # default system prompts are context, never trained
    ("llama3.1",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
     "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n[[Hello there!<|eot_id|>]]"),
    ("qwen2.5",
     "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
     "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello there!<|im_end|>]]\n"),
    ("gemma2", "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
               "[[Hello there!<end_of_turn>]]\n"),
    ("gemma3", "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
               "[[Hello there!<end_of_turn>]]\n"),
    ("phi3.5", "<|user|>\nHi<|end|>\n<|assistant|>\n[[Hello there!<|end|>]]\n<|endoftext|>"),
    ("mistral-v0.1", "<s>[INST] Hi [/INST][[Hello there!</s>]]"),
    ("mistral-v0.3", "<s>[INST] Hi[/INST][[ Hello there!</s>]]"),
    ("r1-distill", "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>[[Hello there!<｜end▁of▁sentence｜>]]"),
    # Qwen3 shows an (empty) think block on the turn it trains: the model learns to emit it.
    ("qwen3", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
              "[[<think>\n\n</think>\n\nHello there!<|im_end|>]]\n"),
])
def test_real_template_masks_without_system(fresh_tokenizer, name, expected):
    tok = family(fresh_tokenizer, name)
    row = render(TWO_TURNS[1:3], tok)
    assert visualize(tok, row) == expected
    assert trained_tokens(tok, row)[0][-1] == end_of_turn_token(tok)
    bos = tok.bos_token_id
    if FAMILIES[name][1].get("bos"):   # a BOS-writing template: exactly one, first, never doubled
        assert row["input_ids"].count(bos) == 1 and row["input_ids"][0] == bos


def test_llama32_today_date_system_prompt(fresh_tokenizer):
    tok = family(fresh_tokenizer, "llama3.2")
    row = render(TWO_TURNS[1:3], tok)
    assert visualize(tok, row).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        f"December 2023\nToday Date: {today('%d %b %Y')}\n\n<|eot_id|>")
    assert trained_tokens(tok, row) == [["Hello", " there", "!", "<|eot_id|>"]]


def test_mistral_multi_turn_alternation_and_its_system_message_refusal(fresh_tokenizer):
    tok = family(fresh_tokenizer, "mistral-v0.3")
    row = render(TWO_TURNS[1:], tok)
    assert visualize(tok, row) == ("<s>[INST] Hi[/INST][[ Hello there!</s>]]"
                                   "[INST] Bye?[/INST][[ Bye</s>]]")
    # v0.3 puts the system message on the LAST user turn only: the prompt the model answers at
    # inference is not what the training row shows; refuse, and show where they differ.
    with pytest.raises(TunelabError, match=r"different prefix.*Be brief"):
        render(TWO_TURNS, tok)
    # the template forbids consecutive user turns; its own words reach the user
    with pytest.raises(TunelabError, match="roles must alternate"):
        render([TWO_TURNS[1], TWO_TURNS[1], TWO_TURNS[2]], tok)


def test_smollm3_think_mode_default_system_and_no_think(fresh_tokenizer):
    tok = family(fresh_tokenizer, "smollm3")
    row = render(TWO_TURNS[1:3], tok)
    text = visualize(tok, row)
    assert text.startswith(f"<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n"
                           f"Today Date: {today('%d %B %Y')}\nReasoning Mode: /think\n\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                         "[[Hello there!<|im_end|>]]\n")
    assert text.count("[[") == 1
    # /no_think in the system message: the empty think block belongs to the generation prompt,
    # so only the answer is trained.
    msgs = [{"role": "system", "content": "Be brief. /no_think"}, *TWO_TURNS[1:]]
    row = render(msgs, tok)
    assert visualize(tok, row).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n"
        "[[Hello there!<|im_end|>]]\n<|im_start|>user\nBye?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n[[Bye<|im_end|>]]\n")


def test_qwen3_reasoning_in_the_trained_turn_is_trained(fresh_tokenizer):
    tok = family(fresh_tokenizer, "qwen3")
    for content in ("<think>\nSay hello.\n</think>\n\nHello there!",
                    "<think>Say hello.</think>Hello there!"):   # re-formatted by the template
        row = render([TWO_TURNS[1], {"role": "assistant", "content": content}], tok)
        assert visualize(tok, row) == (
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            "[[<think>\nSay hello.\n</think>\n\nHello there!<|im_end|>]]\n")


def test_qwen3_multi_turn_is_trained_one_turn_per_example(fresh_tokenizer):
    tok = family(fresh_tokenizer, "qwen3")
    with pytest.raises(HistoryRewriteError, match="rewrites this assistant turn"):
        render(TWO_TURNS, tok)
    rows = render_examples([TWO_TURNS], tok)
    assert len(rows) == 2
    assert visualize(tok, rows[0]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n[[<think>\n\n</think>\n\nHello there!<|im_end|>]]\n")
    # turn 2 sees turn 1 as the template shows history (no think block), untrained
    assert visualize(tok, rows[1]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello there!<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n"
        "<|im_start|>assistant\n[[<think>\n\n</think>\n\nBye<|im_end|>]]\n")
    # each row's prompt is exactly what inference feeds the model before that turn
    for i, row in zip((2, 4), rows):
        prompt = render_prompt(TWO_TURNS[:i], tok)
        assert row["input_ids"][:len(prompt)] == prompt
        assert all(lab == IGNORE_INDEX for lab in row["labels"][:len(prompt)])
    assert [m.get("weight") for m in per_turn(TWO_TURNS)[1]] == [None, None, 0, None, None]


def test_r1_distill_think_stripping_fails_loudly(fresh_tokenizer):
    tok = family(fresh_tokenizer, "r1-distill")
    reasoning = [TWO_TURNS[1], {"role": "assistant", "content": "<think>Greet.</think>Hello"}]
    with pytest.raises(TunelabError, match="drops the reasoning"):
        render(reasoning, tok)
    v2 = with_template(tok, R1_DISTILL_V2)
    with pytest.raises(TunelabError, match="adds a think block to the generation prompt"):
        render(TWO_TURNS[1:3], v2)


def test_render_many_matches_render_and_returns_errors_in_place(fresh_tokenizer):
    tok = family(fresh_tokenizer, "gemma2")
    convs = [TWO_TURNS[1:3], TWO_TURNS, TWO_TURNS[1:]]
    out = render_many(convs, tok, sources=["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"], errors="return")
    assert out[0] == render(convs[0], tok) and out[2] == render(convs[2], tok)
    assert isinstance(out[1], TunelabError) and out[1].line == 2 and "System role" in str(out[1])
    with pytest.raises(TunelabError, match="a.jsonl:2"):
        render_many(convs, tok, sources=["a.jsonl:1", "a.jsonl:2", "a.jsonl:3"])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_offset_free_fast_path_gives_the_offsets_paths_labels(fresh_tokenizer, name):
    from tunelab.data.render import _labels_fast, assistant_spans, formatter
    tok = family(fresh_tokenizer, name)
    convs = [TWO_TURNS[1:3], TWO_TURNS[1:], [dict(m) for m in TWO_TURNS[1:]],
             [TWO_TURNS[1], {"role": "assistant", "content": "  spaced answer\n"}]]
    convs[2][1]["weight"] = 0
    if FAMILIES[name][2]:
        convs.append(TWO_TURNS)
    convs = [c for c in convs if not isinstance(render_many([c], tok, errors="return")[0], TunelabError)]
    assert convs
    assert render_many(convs, tok) == render_many(convs, tok, _fast=False)
    fmt = formatter(tok)
    text, spans = assistant_spans(tok, convs[0])
    ids = tok._tokenizer.encode(text, add_special_tokens=False).ids
    assert _labels_fast(fmt, text, ids, spans) is not None   # the fast path is really taken
