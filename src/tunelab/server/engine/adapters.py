"""LoRA fine-tunes as adapters on a shared loaded base.

A base holds at most `max_adapters` adapters at once: an adapter loads on the first request
that names it and, when the slots are full, the least recently used adapter with no request in
flight is deleted from the base to make room (one in use is never evicted; a newcomer waits for
a slot instead). Unused adapters cost only disk. Rows of different adapters, of different
ranks, and of the base itself share every forward step (lora.LoraBank).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

BASE_ADAPTER = "__base__"       # a row with no adapter in a mixed batch


def mixable(adapter_dir: str) -> bool:
    """Whether the adapter can share its base with other rows of a batch (lora.LoraBank):
    plain LoRA pairs only, one rank and alpha for every layer. DoRA, biases, per-layer rank
    patterns, and whole layers saved beside the LoRA (PEFT saves the embeddings of a resized
    vocabulary, as tunelab's LoRA on a template-less base does) make a model of its own."""
    from safetensors import safe_open
    folder = Path(adapter_dir)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("lora_bias") or \
            cfg.get("rank_pattern") or cfg.get("alpha_pattern") or not weights.exists():
        return False
    with safe_open(str(weights), "pt") as f:
        return all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in f.keys())


def base_name(adapter_dir: str) -> str:
    """The base spec an adapter names (how Engine.loaded() lists the base it loaded)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return str(cfg.get("base_model_name_or_path"))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_key(src) -> str:
    """What identifies the tokenizer a model source loads: the contents of its files. Two
    hundred fine-tunes of one base carry copies of one tokenizer; the engine loads it once
    (each copy would cost tens of MB and a tenth of a second per cold adapter)."""
    folder = Path(src.adapter) if src.adapter and \
        (Path(src.adapter) / "tokenizer_config.json").exists() else Path(src.path)
    if not folder.is_dir():
        return f"{src.path}|{src.gguf_file}"
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = folder / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
