"""What one fine-tuning job costs the shared store and the shared data dir: its event rows and
their bytes, its files on disk (run folder, checkpoints, servable copies, upload), measured on
a real job run through the API and a worker in-process (a tiny random model: the counts depend
on steps, not on the model), and the sizes the same files reach for SmolLM2-135M, from its
parameter counts (the architecture built on the meta device: no weights read).

    python bench/footprint.py [--steps 100] [--logging-steps 10] [--save-steps 25]

Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def du(path: Path) -> int:
    """Bytes of the distinct files under `path` (hard links once)."""
    seen, total = set(), 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def measured_job(args) -> None:
    from fastapi.testclient import TestClient

    from conftest import sound_rows
    from tunelab.jobs.store import Event, Job
    from tunelab.jobs.worker import Worker
    from tunelab.server.app import create_app
    from tunelab.server.context import Settings
    root = Path(tempfile.mkdtemp(prefix="tl-footprint-"))
    model = tiny_model(root / "tiny")
    app = create_app(Settings(data_dir=root / "data", auth=False, models={"tiny": str(model)}))
    store = app.state.ctx.store
    rows = "".join(json.dumps(r) + "\n" for r in sound_rows() * 10).encode()
    with TestClient(app) as client:
        f = client.post("/v1/files", data={"purpose": "fine-tune"},
                        files={"file": ("train.jsonl", rows)}).json()
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny", "training_file": f["id"], "tunelab": {
                "method": "lora", "max_steps": args.steps, "logging_steps": args.logging_steps,
                "save_steps": args.save_steps, "max_length": 64, "precision": "fp32"}}).json()
        worker = Worker(store)
        claimed = store.claim_job(worker.id, 60)
        assert claimed.id == job["id"], claimed
        worker._run_job_here(claimed)
    final = store.get(Job, job["id"])
    events = store.all(Event, Event.job_id == job["id"])
    size = sum(len(e.message.encode()) + len(json.dumps(e.data or {}).encode()) for e in events)
    metrics = [e for e in events if e.type == "metrics"]
    print(f"a {args.steps}-step job (logging every {args.logging_steps}, a checkpoint every "
          f"{args.save_steps}): {final.status}")
    print(f"  events: {len(events)} rows ({len(metrics)} metrics), {size / 1024:.1f} KiB of "
          f"message + data; a metrics event {size and sum(len(e.message) + len(json.dumps(e.data)) for e in metrics) // max(1, len(metrics))} B")
    jobdir = root / "data" / "jobs" / job["id"]
    for part in sorted(jobdir.iterdir()):
        print(f"  {part.name + '/':14} {du(part) / 1024:9.1f} KiB")
    tok = sum(p.stat().st_size for p in (jobdir / "run" / "adapter").iterdir()
              if p.name.startswith(("tokenizer", "chat_template")))
    print(f"  of which the tokenizer, saved with the model and each checkpoint: "
          f"{tok / 1024:.0f} KiB a copy")
    print(f"  {'files/':14} {du(root / 'data' / 'files') / 1024:9.1f} KiB (the upload: raw + "
          f"processed, {len(rows) / 1024:.1f} KiB uploaded)")


def smollm2_sizes() -> None:
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.config import TrainConfig
    from tunelab.models import resolve
    src = resolve("smollm2-135m-instruct")
    config = AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()      # the output layer is the embedding (counted once)
    total = sum(p.numel() for p in model.parameters())
    lora = TrainConfig(model="x", train_file="x", output_dir="x").lora
    peft = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                            target_modules=lora.target_modules,
                                            task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    mb = 1e6
    print(f"SmolLM2-135M: {total / 1e6:.1f}M parameters; LoRA r={lora.r} on {lora.target_modules}:"
          f" {trainable / 1e6:.2f}M trainable")
    print(f"  LoRA: adapter {4 * trainable / mb:.1f} MB (fp32); a resumable checkpoint "
          f"{12 * trainable / mb:.1f} MB (adapter + Adam's two moments); a servable copy: hard "
          "links, no extra space")
    print(f"  full: model {4 * total / mb:.0f} MB (fp32); a resumable checkpoint "
          f"{12 * total / mb:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--save-steps", type=int, default=25)
    args = ap.parse_args()
    measured_job(args)
    smollm2_sizes()


if __name__ == "__main__":
    main()
