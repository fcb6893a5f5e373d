"""`tunelab export`: take a model where people run it.

  gguf          one GGUF (weights, tokenizer, chat template) for llama.cpp, LM Studio, ...
  ollama        the GGUF plus a Modelfile (`ollama create NAME -f Modelfile`)
  gguf-adapter  only the LoRA, as a GGUF adapter (`llama-server -m base.gguf --lora it.gguf`)
  hf            a merged safetensors folder with a model card (README.md)

Any model spec tunelab accepts (run folder, adapter, checkpoint, the builtin model); a LoRA is
merged into its base first. The output folder is written as a temp folder beside it and renamed
at the end: a failure (a full disk included) leaves nothing behind.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError

FORMATS = ("gguf", "ollama", "gguf-adapter", "hf")


@dataclass
class ExportResult:
    output: Path
    format: str
    files: list[str]
    seconds: float
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"output": str(self.output), "format": self.format, "files": self.files,
                "seconds": self.seconds, **self.info}


def _safe_name(spec: str) -> str:
    name = Path(spec).name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "model"


def check_weights(src) -> None:
    """A model folder must hold its weights: say so before transformers does, in our words."""
    folder = Path(src.path)
    if src.gguf_file or not folder.is_dir():
        return
    if not (folder / "config.json").is_file():
        raise TunelabError("no config.json: not a model folder", file=folder)
    weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json
        wanted = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(w for w in wanted if not (folder / w).is_file())
        if missing:
            raise TunelabError(f"missing weight shards: {', '.join(missing)}", file=index)
    elif not weights:
        raise TunelabError("the model folder has no weights (model.safetensors)",
                           file=folder / "model.safetensors")


def export(model: str, out: str | Path, *, fmt: str = "gguf", quant: str = "f16",
           overwrite: bool = False, name: str | None = None, format: str | None = None
           ) -> dict:
    """Export `model` (a model spec) into the folder `out`. Returns {output, format, files,
    bytes, seconds, ...}."""
    format = format or fmt
    from tunelab import models
    from tunelab.export import gguf as G
    if format not in FORMATS:
        raise TunelabError(f"unknown export format '{format}': one of {', '.join(FORMATS)}",
                           field="format")
    if format in ("gguf", "ollama") and quant not in G.QUANTS:
        raise TunelabError(f"unknown quantization '{quant}': one of {', '.join(G.QUANTS)}",
                           field="quant")
    out = Path(out)
    if out.exists() and not overwrite:
        raise TunelabError("output folder exists (use --overwrite to replace it)", file=out)
    started = time.time()
    src = models.resolve(model)
    check_weights(src)
    for a in (*src.below, src.adapter):
        if a:
            check_weights(models.ModelSource(a, None)) if (Path(a) / "config.json").exists() \
                else _check_adapter(Path(a))
    name = name or _safe_name(str(model))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        info = _write(format, model, src, tmp, quant=quant, name=name)
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise TunelabError("No space left on device; nothing was written",
                               file=out) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out.iterdir())
    return ExportResult(out, format, files, round(time.time() - started, 2),
                        {"bytes": sum(p.stat().st_size for p in out.iterdir()), **info}
                        ).to_json()


def _check_adapter(folder: Path) -> None:
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors",
                                                 "adapter_model.bin")):
        raise TunelabError("the adapter folder has no weights (adapter_model.safetensors)",
                           file=folder / "adapter_model.safetensors")


def _load(model: str, src):
    import torch

    from tunelab import models
    tokenizer = models.load_tokenizer(model, source=src)
    m = models.load_model(model, tokenizer=tokenizer, source=src, dtype=torch.float32)
    return m, tokenizer


def _write(format: str, model: str, src, tmp: Path, *, quant: str, name: str) -> dict:
    from tunelab import models
    from tunelab.export import gguf as G
    trained = models.trained_with(model)
    if format == "gguf-adapter":
        from tunelab.export.adapter import write_adapter
        return write_adapter(src, tmp / f"{name}-lora-f32.gguf")
    m, tok = _load(model, src)
    if format == "hf":
        from tunelab.export.hf import model_card
        arch = ", ".join(getattr(m.config, "architectures", None) or []) or \
            getattr(m.config, "model_type", "?")
        m.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(name, trained, str(model), arch),
                                       encoding="utf-8")
        return {"architecture": arch}
    G.arch_of(m.config)   # refuse before writing anything
    file = f"{name}-{quant}.gguf"
    info = G.write_gguf(m, tok, tmp / file, quant=quant, name=name)
    if format == "ollama":
        from tunelab.data.render import end_of_turn_token
        from tunelab.export.ollama import modelfile, training_system_prompt
        text = modelfile(file, tok, stops=[end_of_turn_token(tok)],
                         system=training_system_prompt(trained.train_file))
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
    return {**info, "gguf": file}
