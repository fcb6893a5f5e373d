"""A merged Hugging Face model -> one GGUF file that llama.cpp (and Ollama, LM Studio) run as is:
weights (f16, bf16, q8_0 or q4_0), the tokenizer (vocabulary, merges, token types, special ids)
and the chat template.

Written with the `gguf` package's GGUFWriter and its tensor-name maps. What each architecture
needs beyond renaming (learned from llama.cpp's converter, written here from scratch):
  - Llama: llama.cpp's rope reads q/k rows in interleaved pairs, HF in halves: permute them;
    Llama 3.x rope scaling is a `rope_freqs` tensor of per-frequency factors.
  - Gemma 2/3: HF's RMSNorm multiplies by (1 + w), llama.cpp by w: store w + 1.
  - Tied embeddings: no output.weight; llama.cpp reuses token_embd.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tunelab.errors import TunelabError

# HF model_type -> gguf architecture name
ARCHES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
          "gemma3_text": "gemma3", "gemma3": "gemma3"}
SUPPORTED = ("LlamaForCausalLM (SmolLM2, Llama 3.x), Qwen2ForCausalLM, Qwen3ForCausalLM, "
             "Gemma2ForCausalLM, Gemma3ForCausalLM")
QUANTS = ("f16", "bf16", "q8_0", "q4_0", "f32")

# tokenizer.json pre-tokenizer regexes -> llama.cpp's pre-tokenizer names
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def arch_of(config) -> str:
    mt = getattr(config, "model_type", None)
    if mt not in ARCHES:
        shown = ", ".join(getattr(config, "architectures", None) or []) or mt
        raise TunelabError(f"cannot export {shown} (model_type '{mt}') to GGUF: supported "
                           f"are {SUPPORTED}", field="architectures")
    return ARCHES[mt]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (per head)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _rope(config) -> dict:
    rp = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rp:          # per layer type (Gemma 3): the global layers' rope
        rp = rp["full_attention"]
    theta = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {**rp, "rope_theta": theta}


def _llama3_freqs(config, rope: dict, head_dim: int) -> np.ndarray:
    base, factor = rope["rope_theta"], rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def pre_tokenizer_name(tok_json: dict) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json does."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre else []
    types = [p.get("type") for p in parts]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if _LLAMA3_RE in regexes:
        return "llama-bpe"
    if _QWEN2_RE in regexes:
        return "qwen2"
    if "ByteLevel" in types:
        if any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts):
            return "smollm"
        return "gpt-2"
    return "default"


def write_tokenizer(w, tokenizer, n_vocab: int) -> None:
    """Vocabulary, merges, token types, special ids and the chat template."""
    import gguf
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        _write_spm_tokenizer(w, tokenizer, tj, n_vocab)
    else:
        vocab = tokenizer.get_vocab()
        by_id = {i: t for t, i in vocab.items()}
        added = {a["id"]: a for a in tj.get("added_tokens", [])}
        tokens, types = [], []
        for i in range(n_vocab):
            if i not in by_id:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.CONTROL if added[i].get("special")
                             else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.NORMAL)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer_name(tj))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    _write_specials(w, tokenizer)


def _write_spm_tokenizer(w, tokenizer, tj: dict, n_vocab: int) -> None:
    """SentencePiece-style tokenizers (Gemma): through the gguf package's vocab readers."""
    import gguf
    from gguf.vocab import LlamaHfVocab, SentencePieceVocab
    folder = Path(tokenizer.name_or_path)
    try:
        vocab = SentencePieceVocab(folder) if (folder / "tokenizer.model").exists() \
            else LlamaHfVocab(folder)
    except Exception as e:
        raise TunelabError(f"cannot convert this tokenizer to GGUF ({type(e).__name__}: {e}); "
                           "byte-level BPE and SentencePiece tokenizers are supported",
                           file=folder) from None
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens[:n_vocab])
    w.add_token_scores(scores[:n_vocab])
    w.add_token_types(types[:n_vocab])


def _write_specials(w, tokenizer) -> None:
    from tunelab.data.render import end_of_turn_token
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
           "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}
    for name, i in ids.items():
        if i is not None:
            getattr(w, f"add_{name}_token_id")(i)
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    if eot is not None and eot != tokenizer.unk_token_id:
        w.add_eot_token_id(eot)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    w.add_add_bos_token(bool(bos is not None and probe and probe[0] == bos))
    w.add_add_eos_token(bool(tokenizer.eos_token_id is not None and probe and
                             probe[-1] == tokenizer.eos_token_id and len(probe) > 1))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


def _qtype(name: str, arr: np.ndarray, quant: str, gguf):
    """The ggml type a tensor is stored in: 1-D tensors stay f32; q4_0 keeps the embedding and
    output in q8_0 (what llama.cpp's own q4_0 mixes do, or near it); rows that do not fill whole
    32-wide blocks fall back to f16."""
    T = gguf.GGMLQuantizationType
    if arr.ndim < 2 or quant == "f32":
        return T.F32
    if quant == "f16":
        return T.F16
    if quant == "bf16":
        return T.BF16
    if arr.shape[-1] % 32:
        return T.F16
    if quant == "q4_0" and name not in ("token_embd.weight", "output.weight"):
        return T.Q4_0
    return T.Q8_0


def _encode(arr: np.ndarray, qt, gguf) -> np.ndarray:
    T = gguf.GGMLQuantizationType
    if qt == T.F32:
        return arr.astype(np.float32)
    if qt == T.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr.astype(np.float32), qt)


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}


def write_hparams(w, config, arch: str) -> None:
    c = config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    rope = _rope(c)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    rtype = rope.get("rope_type", "default")
    if rtype == "linear":
        import gguf
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rtype == "yarn":
        import gguf
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rtype not in ("default", "llama3"):
        raise TunelabError(f"rope type '{rtype}' cannot be exported to GGUF",
                           field="rope_parameters")
    if arch in ("gemma2", "gemma3"):
        if getattr(c, "sliding_window", None):
            w.add_sliding_window(c.sliding_window)
        if getattr(c, "attn_logit_softcapping", None):
            w.add_attn_logit_softcapping(float(c.attn_logit_softcapping))
        if getattr(c, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(c.final_logit_softcapping))
        qpas = getattr(c, "query_pre_attn_scalar", head_dim)
        if qpas != head_dim and qpas != c.hidden_size // c.num_attention_heads:
            raise TunelabError(f"Gemma with query_pre_attn_scalar={qpas} (head_dim {head_dim}) "
                               "has no GGUF equivalent", field="query_pre_attn_scalar")


def gguf_tensors(state: dict, config, arch_name: str):
    """(gguf name, float32 array) for every weight, renamed and fixed up for llama.cpp."""
    import gguf
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = "lm_head.weight" not in state or bool(getattr(config, "tie_word_embeddings", False))
    gemma = arch_name in ("gemma2", "gemma3")
    for hf_name, t in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if "rotary_emb" in hf_name:
            continue
        arr = t.detach().float().cpu().numpy()
        if arch_name == "llama":
            if hf_name.endswith("self_attn.q_proj.weight"):
                arr = _permute(arr, n_head)
            elif hf_name.endswith("self_attn.k_proj.weight"):
                arr = _permute(arr, n_kv)
        if gemma and hf_name.endswith("norm.weight"):
            arr = arr + 1.0
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise TunelabError(f"no GGUF name for tensor '{hf_name}' of a {arch_name} model",
                               field=hf_name)
        yield new, arr
    rope = _rope(config)
    if arch_name == "llama" and rope.get("rope_type") == "llama3":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
        yield "rope_freqs.weight", _llama3_freqs(config, rope, head_dim)


def write_gguf(model, tokenizer, path: Path, *, quant: str = "f16", name: str = "model",
               progress=None) -> dict:
    """Write `model` (merged, a transformers causal LM) and its tokenizer to `path`."""
    import gguf
    if quant not in QUANTS:
        raise TunelabError(f"unknown quantization '{quant}': one of {', '.join(QUANTS)}",
                           field="quant")
    config = model.config
    arch_name = arch_of(config)
    state = model.state_dict()
    emb = state.get("model.embed_tokens.weight")
    n_vocab = emb.shape[0] if emb is not None else config.vocab_size
    w = gguf.GGUFWriter(str(path), arch_name)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_file_type(FILE_TYPES[quant])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, config, arch_name)
        write_tokenizer(w, tokenizer, n_vocab)
        for new, arr in gguf_tensors(state, config, arch_name):
            qt = _qtype(new, arr, quant, gguf)
            data = _encode(arr, qt, gguf)
            w.add_tensor(new, data, raw_dtype=qt if qt not in (
                gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
    finally:
        w.close()
    return {"architecture": arch_name, "quant": quant, "bytes": path.stat().st_size}


write = write_gguf


def read_metadata(path: str | Path) -> dict:
    """A GGUF file's key/value metadata as Python values (strings, numbers, lists)."""
    import gguf
    r = gguf.GGUFReader(str(path))
    out = {}
    for key, f in r.fields.items():
        try:
            out[key] = f.contents()
        except Exception:   # an odd type: skip it rather than fail the whole read
            continue
    return out
