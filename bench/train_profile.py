"""Where a training step's time goes, on SmolLM2-135M and the bench's mixed-length chat data.

    .venv/bin/python bench/train_profile.py [--steps 6] [--micro 4] [--accum 2]

One process, the same batches for each way of running a step, interleaved (A B C A B C ...) so
that a noisy machine hits them alike; medians per phase:
  fp32+autocast   fp32 weights under torch.autocast(bf16), torch AdamW (transformers' default
                  optimizer on CPU), the loss at trained positions only: tunelab until 2026-12
  bf16+master     bf16 weights, fp32 master copies in a fused AdamW (tunelab.train.precision),
                  the loss at trained positions only
  fp32            fp32 weights, fused AdamW, the loss at trained positions only: tunelab on
                  a CPU without native bf16 (AVX2 only: bf16 matmuls are emulated, ~100x slower)
  plain-bf16      a plain loop: bf16 weights AND bf16 AdamW states (no master copy), full
                  logits and the loss on every token of 8 x 256-token rows cut from the same
                  data (no padding): what the issue's reference loop does
  plain-fp32      the same plain loop in fp32
The default modes are the first three where the CPU runs bf16 natively, else fp32,plain-fp32.
Phases: data (collate), forward+loss, backward, optimizer (incl. master-copy traffic).
Also prints the matmul peak now and whether oneDNN picked AMX / AVX-512 kernels.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--modes", help="comma-separated (default: by the CPU, see above)")
    ap.add_argument("--ops", type=int, default=0,
                    help="then profile one step of each mode with torch.profiler and print "
                         "its N most expensive operators (self CPU time)")
    a = ap.parse_args()

    import torch
    from train import make_data, matmul_peak   # bench/train.py
    from tunelab import models
    from tunelab.batching import pad_rows, trained_token_loss
    from tunelab.data.conversation import read_conversations
    from tunelab.data.render import render_examples
    from tunelab.runtime import resolve_precision, set_threads
    from tunelab.train.precision import MasterWeightAdamW

    set_threads()
    native = resolve_precision("auto")
    modes = (a.modes or ("fp32+autocast,bf16+master,plain-bf16" if native == "bf16"
                         else "fp32,plain-fp32")).split(",")
    peaks = {d: matmul_peak(d) for d in ("fp32", "bf16")}
    print(f"matmul peak now: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} GFLOP/s; "
          f"native precision {native}")
    print("CPU ISA oneDNN reports:", torch.backends.cpu.get_cpu_capability())

    work = Path(tempfile.mkdtemp(prefix="tunelab-prof-"))
    data = make_data(work, 48, 0)
    tok = models.load_tokenizer("smollm2-135m-instruct")
    rows = render_examples([c.messages for c in read_conversations(data["train"])], tok,
                           max_length=1024)
    rows.sort(key=lambda r: len(r["input_ids"]))
    micro_batches = [pad_rows(rows[i:i + a.micro], tok.pad_token_id)
                     for i in range(0, len(rows), a.micro)]
    # the plain loop's rows: every token of the data, cut into 256-token rows
    flat = [t for r in rows for t in r["input_ids"]]
    plain = torch.tensor(flat[:len(flat) // 256 * 256]).view(-1, 256)
    plain_batches = [plain[i:i + 8] for i in range(0, len(plain) - 7, 8)]

    base = models.load_model("smollm2-135m-instruct", tokenizer=tok)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    params = sum(p.numel() for p in base.parameters())

    def build(mode):
        model = base
        model.load_state_dict(state)
        if mode == "fp32+autocast":
            model.float()
            opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        elif mode in ("fp32", "plain-fp32"):
            model.float()
            opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
        elif mode == "bf16+master":
            model.to(torch.bfloat16)
            opt = MasterWeightAdamW(model.parameters(), lr=2e-5)
        else:
            model.to(torch.bfloat16)
            opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
        model.train()
        return model, opt

    def run_step(mode, step):
        """One optimizer step of `mode`: (data, forward+loss, backward, optimizer) seconds and
        the non-padding tokens it trained on."""
        model, opt = build(mode)
        td = tf = tb = 0.0
        ntok = 0
        for k in range(a.accum):
            t0 = time.perf_counter()
            if mode.startswith("plain"):
                ids = plain_batches[(step * a.accum + k) % len(plain_batches)]
                batch = {"input_ids": ids, "labels": ids}
                ntok += ids.numel()
            else:
                batch = micro_batches[(step * a.accum + k * 3) % len(micro_batches)]
                ntok += int(batch["attention_mask"].sum())
            t1 = time.perf_counter()
            ctx = torch.autocast("cpu", torch.bfloat16) if mode == "fp32+autocast" \
                else torch.autocast("cpu", enabled=False)
            with ctx:
                if mode.startswith("plain"):
                    loss = model(**batch, use_cache=False).loss
                else:
                    part = trained_token_loss(model, batch)
                    loss = part.loss_sum / part.trained.clamp(min=1)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            td, tf, tb = td + t1 - t0, tf + t2 - t1, tb + t3 - t2
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"data": td, "forward": tf, "backward": tb, "optimizer": time.perf_counter() - t4,
                "tokens": ntok}

    times = {m: {"data": [], "forward": [], "backward": [], "optimizer": [], "tokens": []}
             for m in modes}
    for step in range(a.steps + 1):          # step 0 warms up and is dropped
        for mode in times:
            phases = run_step(mode, step)
            if step:
                for name, v in phases.items():
                    times[mode][name].append(v)
    print(f"\n{a.steps} steps of {a.accum} x {a.micro} rows (plain: {a.accum} x 8 x 256), "
          f"median per step:")
    print(f"{'mode':15} {'data':>7} {'fwd+loss':>9} {'backward':>9} {'optim':>7} {'total':>7}"
          f" {'tok/s':>7} {f'% {native} peak':>11}")
    for mode, t in times.items():
        med = {k: statistics.median(v) for k, v in t.items()}
        total = med["data"] + med["forward"] + med["backward"] + med["optimizer"]
        tps = med["tokens"] / total
        mfu = 6 * params * tps / 1e9 / peaks[native]
        print(f"{mode:15} {med['data']:7.3f} {med['forward']:9.3f} {med['backward']:9.3f} "
              f"{med['optimizer']:7.3f} {total:7.3f} {tps:7.0f} {100 * mfu:10.1f}%")

    for mode in times if a.ops else ():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run_step(mode, 1)
        print(f"\n{mode}: the {a.ops} most expensive operators of one step")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.ops))


if __name__ == "__main__":
    main()
