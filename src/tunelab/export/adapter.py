"""A LoRA adapter as a GGUF adapter (general.type=adapter, adapter.type=lora,
adapter.lora.alpha) for `llama-server -m base.gguf --lora adapter.gguf` and Ollama's ADAPTER.
Tensors keep the base's GGUF names with `.lora_a` / `.lora_b`; Llama's q/k rows are permuted in
lora_b as they are in the base weight."""
from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import TunelabError


def write_adapter(src, path: Path) -> dict:
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from tunelab.export.gguf import _permute, arch_of
    if not src.adapter:
        raise TunelabError("not a LoRA model: --format gguf-adapter needs an adapter folder or "
                           "a LoRA run", field="format")
    if src.below:
        raise TunelabError("this adapter was trained on top of another adapter: export it "
                           "merged (--format gguf)", file=src.adapter)
    adapter = Path(src.adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise TunelabError("DoRA adapters have no GGUF adapter form: export merged "
                           "(--format gguf)", file=adapter / "adapter_config.json")
    config = AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    arch_name = arch_of(config)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    w = gguf.GGUFWriter(str(path), arch_name)
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.get("lora_alpha", cfg["r"])))
        n = 0
        for key, t in sorted(state.items()):
            if ".lora_A." not in key and ".lora_B." not in key:
                raise TunelabError(f"adapter tensor '{key}' is not a LoRA A/B matrix (trained "
                                   "embeddings?): export merged (--format gguf)",
                                   file=adapter / "adapter_model.safetensors")
            part = "lora_a" if ".lora_A." in key else "lora_b"
            base = key.replace("base_model.model.", "", 1).replace(".lora_A", "") \
                .replace(".lora_B", "")
            new = names.get_name(base, try_suffixes=(".weight",))
            if new is None:
                raise TunelabError(f"no GGUF name for adapted module '{base}'", file=adapter)
            arr = t.float().numpy()
            if arch_name == "llama" and part == "lora_b":
                if ".q_proj." in base:
                    arr = _permute(arr, n_head)
                elif ".k_proj." in base:
                    arr = _permute(arr, n_kv)
            w.add_tensor(f"{new}.{part}", arr.astype("float32"))
            n += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
    finally:
        w.close()
    return {"architecture": arch_name, "tensors": n, "gguf": path.name,
            "lora_alpha": cfg.get("lora_alpha"), "r": cfg.get("r")}
