"""LoRA on the fp32 base vs QLoRA (LoRA on an NF4 base, plain and LoftQ-initialised) with graft, same
model, data, steps and seed.

    .venv/bin/python benchmarks/qlora.py                 # all three, side by side, prints ratios
    .venv/bin/python benchmarks/qlora.py --examples 48   # quicker (6 steps)

Model SmolLM2-135M-Instruct, data: GSM8K train problems from ../shared/data/gsm8k in the Alpaca
template (as benchmarks/train.py), LoRA r=16 alpha=32 all-linear, batch 8, max length 512, AdamW
lr 2e-4 with 10% warmup then cosine, 1 epoch, packing and selective logits, gradient checkpointing
in both runs (as the QLoRA recipe does; without it the activations, ~5 GB here, hide the weights).
QLoRA: every linear layer but the output head in NF4 with double quantisation (blocks of 64),
computing in bf16 where the CPU has AVX512-BF16/AMX (else fp32), the LoRA tensors in fp32; the base
goes through ``graft.prepare_kbit_training``. QLoRA + LoftQ: the same NF4 base and LoRA, fitted together
by ``graft.loftq`` (5 alternations of quantizing W - L and taking L as the rank-16 SVD of what the
quantization missed), so training starts from Q + s·BA ≈ W instead of quant(W).

Each run is its own subprocess. Reported per run: the bytes of the quantized linear weights as
stored (packed codes + block scales + nested scales and code books, measured from the tensors) vs
the same weights in fp32; resident memory before training (after handing the heap pages freed by
quantizing back to the OS: loading reads fp32 first); peak resident memory while training (the
high-water mark is reset just before the first step, so loading does not count); seconds per
optimizer step; the first step's loss (the base model's, before any update) and the final loss
(mean of the last 3 steps). Target: QLoRA's final loss within 5% of LoRA's.
Run it on an otherwise idle machine: two processes sharing two cores distort every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from train import DATA, bf16_supported, rows  # benchmarks/train.py: same data and template


def rss_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them, e.g. the fp32 weights a quantized load dropped)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run(args: argparse.Namespace, variant: str) -> dict:
    import torch

    import graft
    from graft import data, models, quant, recipe
    from graft.train import TrainConfig, train

    torch.set_num_threads(2)
    compute = torch.bfloat16 if bf16_supported() else torch.float32
    method = graft.LoRA(r=16, alpha=32, targets="all-linear")
    t_init = time.perf_counter()
    if variant == "qlora":
        model, tok = models.load("smollm2-135m", quantize="nf4", compute_dtype=compute, double_quant=True)
        stored = quant.weight_bytes(model)
        graft.prepare_kbit_training(model, gradient_checkpointing=True)
        graft.attach(model, method)
    elif variant == "loftq":
        model, tok = models.load("smollm2-135m")
        graft.loftq(model, method, quant_type="nf4", compute_dtype=str(compute).removeprefix("torch."),
                    double_quant=True, gradient_checkpointing=True)
        stored = quant.weight_bytes(model)
    else:
        model, tok = models.load("smollm2-135m")
        stored = None
        graft.attach(model, method)
    init_s = time.perf_counter() - t_init
    examples = data.tokenize(rows(args.examples), tok, format="alpaca", max_length=args.max_length)
    collate = recipe.make_collate(model, tok, args.max_length, packed=True)
    cfg = TrainConfig(lr=args.lr, epochs=1, batch_size=args.batch_size, schedule="cosine", warmup_ratio=0.1,
                      seed=args.seed, max_grad_norm=1.0, gradient_checkpointing=True, progress=False)
    release_freed_memory()
    before = rss_mb("VmRSS")
    reset_peak_rss()
    t0 = time.perf_counter()
    result = train(model, examples, collate, cfg)
    seconds = time.perf_counter() - t0
    dtype = str(compute).removeprefix("torch.")
    name = {"lora": "LoRA (fp32 base)", "qlora": f"QLoRA (nf4 + DQ, {dtype} compute)",
            "loftq": f"QLoRA + LoftQ (nf4 + DQ, {dtype} compute, 5 iterations)"}[variant]
    return {"impl": name, "steps": result.steps, "load_and_init_s": init_s, "s_per_step": seconds / result.steps,
            "rss_before_mb": before, "peak_train_rss_mb": rss_mb("VmHWM"), "final_loss": result.final_loss,
            "first_loss": result.losses[0], "losses": result.losses,
            "quantized_bytes": stored.quantized if stored else None, "fp32_bytes": stored.fp32 if stored else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=["lora", "qlora", "loftq"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run(args, args.child)))
        return
    if not DATA.exists():
        print(f"skipped: {DATA} not found (the benchmark reads ../shared/data)")
        return
    results = {}
    for variant in ("lora", "qlora", "loftq"):
        cmd = [sys.executable, __file__, "--child", variant, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{variant} failed")
        results[variant] = r = json.loads(line[-1][len("RESULT "):])
        print(f"{r['impl']:<32} {r['steps']} steps  {r['s_per_step']:6.2f} s/step  peak RSS in training "
              f"{r['peak_train_rss_mb']:6.0f} MB (before {r['rss_before_mb']:.0f} MB)  "
              f"loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}  (load + init {r['load_and_init_s']:.0f} s)",
              flush=True)
    lora, qlora = results["lora"], results["qlora"]
    mib = 1024 * 1024
    print(f"\nquantized linear weights: {qlora['quantized_bytes'] / mib:.1f} MiB stored vs "
          f"{qlora['fp32_bytes'] / mib:.1f} MiB in fp32 = {qlora['quantized_bytes'] / qlora['fp32_bytes']:.4f}x "
          f"({32 * qlora['quantized_bytes'] / qlora['fp32_bytes']:.3f} bits per weight)")
    print("\n| run | s/step | peak RSS in training (MB) | RSS before training (MB) | first loss | final loss |\n"
          "|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['impl']} | {r['s_per_step']:.2f} | {r['peak_train_rss_mb']:.0f} | {r['rss_before_mb']:.0f} "
              f"| {r['first_loss']:.4f} | {r['final_loss']:.4f} |")
    for r in (qlora, results["loftq"]):
        ratio = r["final_loss"] / lora["final_loss"]
        print(f"\n{r['impl']} vs LoRA: final loss ratio {ratio:.4f} ({100 * (ratio - 1):+.2f}%; target within 5%: "
              f"{'met' if abs(ratio - 1) <= 0.05 else 'missed'}); first-step loss ratio (before any update) "
              f"{r['first_loss'] / lora['first_loss']:.4f}; peak training RSS ratio "
              f"{r['peak_train_rss_mb'] / lora['peak_train_rss_mb']:.2f}x; s/step ratio "
              f"{r['s_per_step'] / lora['s_per_step']:.2f}x")


if __name__ == "__main__":
    main()
