"""An Ollama Modelfile for an exported GGUF: FROM, the chat format as an Ollama (Go) template,
the end-of-turn tokens as stop parameters, and the system prompt the training data used."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tunelab.errors import TunelabError

CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
          "{{ end }}<|im_start|>assistant\n")
LLAMA3 = ("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}"
          "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n")
# Gemma has no system role: its template puts the system text at the top of the first user turn
GEMMA = ("<bos>{{- $system := \"\" }}{{- range .Messages }}"
         "{{- if eq .Role \"system\" }}{{ $system = .Content }}{{ continue }}{{ end }}"
         "<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
         "{{ if and $system (eq .Role \"user\") }}{{ $system }}\n\n{{ $system = \"\" }}{{ end }}"
         "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n")

FORMATS = {"chatml": (CHATML, ["<|im_end|>", "<|im_start|>"]),
           "llama3": (LLAMA3, ["<|eot_id|>", "<|start_header_id|>"]),
           "gemma": (GEMMA, ["<end_of_turn>", "<start_of_turn>"])}


def chat_format(chat_template: str | None) -> str:
    t = chat_template or ""
    if "<|im_start|>" in t:
        return "chatml"
    if "<|start_header_id|>" in t:
        return "llama3"
    if "<start_of_turn>" in t:
        return "gemma"
    raise TunelabError("no Ollama template for this chat format: ChatML (SmolLM2, Qwen), "
                       "Llama 3 and Gemma are supported", field="chat_template")


def _after(full: str, prefix: str, what: str) -> str:
    if not full.startswith(prefix):
        raise ValueError(f"the template renders {what} differently once more turns follow")
    return full[len(prefix):]


def turn_wrappers(tokenizer) -> dict[str, tuple[str, str]]:
    """What the model's own chat template puts around each role's content, read by rendering
    probe conversations: {"system"|"user"|"assistant": (before, after), "generation":
    (the assistant prefix, "")}. Raises ValueError when the template is not turn by turn (no
    system role, say)."""
    from tunelab.data.render import chat_text
    S, U, A = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01"

    def render(msgs, gen=False):
        return chat_text(tokenizer, msgs, add_generation_prompt=gen)
    sys_m = {"role": "system", "content": S}
    user_m = {"role": "user", "content": U}
    t_s = render([sys_m])
    t_su = render([sys_m, user_m])
    t_sua = render([sys_m, user_m, {"role": "assistant", "content": A}])
    t_gen = render([sys_m, user_m], gen=True)
    out = {}
    for role, text, mark in (("system", t_s, S), ("user", _after(t_su, t_s, "a user turn"), U),
                             ("assistant", _after(t_sua, t_su, "an assistant turn"), A)):
        if text.count(mark) != 1:
            raise ValueError(f"the template does not show a {role} message once")
        before, after = text.split(mark)
        out[role] = (before, after)
    out["generation"] = (_after(t_gen, t_su, "the generation prompt"), "")
    # the first user turn again, after an assistant turn: the same wrapper?
    t_suau = render([sys_m, user_m, {"role": "assistant", "content": A}, user_m])
    if _after(t_suau, t_sua, "a second user turn") != "".join((out["user"][0], U,
                                                               out["user"][1])):
        raise ValueError("the template shows later user turns differently")
    return out


def _go(s: str) -> str:
    """Literal text inside a Go template."""
    return s.replace("{{", '{{ "{{" }}')


def ollama_template(tokenizer) -> str:
    """The chat format as an Ollama (Go) template, from the model's own turn wrappers; the
    known formats' hand-written templates when the template cannot be probed (Gemma: no
    system role)."""
    try:
        w = turn_wrappers(tokenizer)
    except (ValueError, TunelabError, Exception):
        return FORMATS[chat_format(tokenizer.chat_template)][0]
    bos = tokenizer.bos_token or ""
    sb = w["system"][0]
    if bos and getattr(tokenizer, "add_bos_token", False) and sb.startswith(bos):
        sb = sb[len(bos):]   # llama.cpp adds BOS itself for this model
    parts = ["{{- range .Messages }}"]
    for i, (role, (before, after)) in enumerate((("system", (sb, w["system"][1])),
                                                  ("user", w["user"]),
                                                  ("assistant", w["assistant"]))):
        kw = "if" if i == 0 else "else if"
        parts.append(f'{{{{- {kw} eq .Role "{role}" }}}}{_go(before)}{{{{ .Content }}}}'
                     f"{_go(after)}")
    parts.append("{{- end }}{{- end }}" + _go(w["generation"][0]))
    return "".join(parts)


def training_system_prompt(train_file: str | Path | None) -> str | None:
    """The system message most training conversations opened with (more than half), if any."""
    if not train_file or not Path(train_file).is_file():
        return None
    seen: Counter[str] = Counter()
    n = 0
    with open(train_file, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or not msgs:
                continue
            n += 1
            if isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
                seen[str(msgs[0].get("content", ""))] += 1
    if not seen:
        return None
    text, count = seen.most_common(1)[0]
    return text if count * 2 > n else None


def _quote(s: str) -> str:
    return '"""' + s.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(gguf_name: str, tokenizer, *, system: str | None = None,
              stops: list[str] | None = None) -> str:
    """FROM, TEMPLATE, the stop parameters (end-of-turn tokens) and the training's system
    prompt."""
    try:
        default_stops = FORMATS[chat_format(tokenizer.chat_template)][1]
    except TunelabError:
        default_stops = []
    template = ollama_template(tokenizer)
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quote(template)}"]
    for s in dict.fromkeys([*(stops or []), *default_stops]):
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    lines.append("PARAMETER temperature 0")
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    return "\n".join(lines) + "\n"
