"""Export SmolLM2-135M with a LoRA merged to f16 / q8_0 / q4_0 GGUF: time and size of each, and
llama.cpp's greedy generation speed on the q8_0 file against tunelab's own generation
(tunelab.inference.generate, fp32) on the same prompts. Needs `make llama`.

    python bench/export.py [--prompts 4] [--tokens 32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.export import export
    from tunelab.models import load, resolve
    from tunelab.runtime import set_threads
    set_threads()
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m-instruct")
                                                               .path),
                          LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    peft.save_pretrained(work / "adapter")
    rows = {}
    for quant in ("f16", "q8_0", "q4_0"):
        t = time.time()
        r = export(str(work / "adapter"), work / quant, quant=quant, name="smol")
        rows[quant] = (time.time() - t, r["bytes"])
        print(f"export {quant:5s} {rows[quant][0]:6.1f} s  {rows[quant][1] / 2**20:7.1f} MiB",
              flush=True)
    model, tok = load(str(work / "adapter"))
    qs = ["Tell me about the sea.", "Write a short poem about bread.",
          "How do I boil an egg?", "What is the wind?", "Name three colours.",
          "Why is the sky blue?"][:args.prompts]
    from tunelab.data.render import render_prompt
    prompts = [render_prompt([{"role": "user", "content": q}], tok) for q in qs]
    t = time.time()
    n = 0
    with torch.no_grad():
        for p in prompts:   # one at a time, like llama.cpp's single sequence below
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 pad_token_id=tok.pad_token_id)
            n += out.shape[1] - len(p)
    hf_tps = n / (time.time() - t)
    req = {"model": str(work / "q8_0" / "smol-q8_0.gguf"), "prompts": prompts,
           "max_tokens": args.tokens}
    r = json.loads(subprocess.run(["node", str(ROOT / "tests" / "llama_greedy.mjs")],
                                  input=json.dumps(req), capture_output=True, text=True,
                                  check=True).stdout.strip().splitlines()[-1])
    print(f"tunelab generate (fp32, transformers): {hf_tps:6.1f} tok/s")
    print(f"llama.cpp q8_0 (2 threads):            {r['tokens_per_second']:6.1f} tok/s "
          f"({r['generated']} tokens, prompts included in the time) "
          f"= x{r['tokens_per_second'] / hf_tps:.2f}")
    print(f"sizes: q8_0/f16 = {rows['q8_0'][1] / rows['f16'][1]:.2f}, "
          f"q4_0/f16 = {rows['q4_0'][1] / rows['f16'][1]:.2f}")
    import shutil
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
