"""Calibrate ``graft plan`` against measured peak memory: SmolLM2-135M on this CPU.

    .venv/bin/python benchmarks/plan_calibration.py                       # full, LoRA, QLoRA x seq 256, 1024
    .venv/bin/python benchmarks/plan_calibration.py --seq-lens 128 512 --methods lora qlora

Each (method, seq-len) case runs in its own subprocess: load SmolLM2-135M (fp32; QLoRA: NF4 with
double quantisation, fp32 compute on a CPU without native bf16, then ``prepare_kbit_training``),
attach the plan's method (LoRA r=8 on the default q/v targets), and run graft's trainer for two
optimizer steps on random token rows (batch 1, no padding, every position supervised, no gradient
checkpointing unless ``--checkpointing``). Two steps, not one: from the second step on, the AdamW
state is alive during forward and backward, and that steady state is what the plan predicts (one
step would under-measure full fine-tuning by its optimizer state).

What is measured, and why it is what the plan predicts (``device="cpu"``, ``reserve=0``): the plan
predicts the tensors training holds at its peak: weights, gradients, optimizer state, activations
and transients, not the runtime around them. So the runtime is measured first: the process's
resident memory (RSS) after importing torch/transformers/graft and training a tiny model one step in
full and with QLoRA, so thread pools, kernels and bitsandbytes' library are already up. Then the model
is loaded and its tensors copied out of the checkpoint's memory map (see :func:`materialise`), freed
load-time buffers go back to the OS (``malloc_trim``), the peak-RSS counter is reset
(``/proc/self/clear_refs``), training runs, and the peak (``VmHWM``, which the trainer also reports)
minus the runtime is the measured figure.

The allocator: glibc's default mmap threshold is dynamic. Once a large block is freed it rises (up to
32 MiB), after which activation-sized blocks come from the heap, and freed heap memory stays in the
process, fragmented: the RSS peak then runs 10-25% above the live tensors (LoRA at 1024 tokens:
2201 MiB with the default, 1766 MiB with a fixed threshold; torch's profiler puts the live-tensor
peak of that run at 1737 MiB, the plan at 1735 MiB). That is allocator slack, the CPU counterpart of
the CUDA caching allocator's reserved-but-unallocated memory, which the plan leaves to ``reserve``.
Each child runs as ``graft train --release-cpu-memory`` does: ``map_large_blocks()`` before anything is
loaded and ``TrainConfig(release_cpu_memory=True)``, which set glibc's mmap threshold to 64 KiB
(``mallopt``, as ``MALLOC_MMAP_THRESHOLD_=65536`` would: blocks of 64 KiB or more are mapped and
unmapped, so RSS follows the tensors); ``--glibc-default`` runs with the default allocator settings.

Prints a markdown table: predicted, measured, and their ratio (target: within 15%).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "qlora")


def rss_kb(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


def trim() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def warm_up() -> None:
    """Train a tiny Llama one step in full and one with QLoRA, so the runtime's lazily started parts
    (thread pools, kernels, bitsandbytes' CPU library) count as runtime."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import graft
    from graft import quant
    from graft.train import TrainConfig, train

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96)
    ids = torch.randint(0, 96, (32,))
    config = TrainConfig(max_steps=1, batch_size=1, progress=False)
    for quantized in (False, True):
        model = LlamaForCausalLM(cfg)
        if quantized:
            quant.quantize(model, "nf4", compute_dtype=quant.default_compute_dtype("cpu"))
            graft.prepare_kbit_training(model, gradient_checkpointing=False)
            graft.attach(model, graft.LoRA(r=8, alpha=16))
        train(model, [{"input_ids": ids, "labels": ids}], collate, config)
        del model


def materialise(model) -> None:
    """Copy every tensor that still lives in the checkpoint's memory map into ordinary memory.

    transformers maps the safetensors file, and its pages count in RSS only once touched (a LoRA
    run's frozen weights would enter the peak piecemeal), while the fp32 pages QLoRA read to
    quantize stay resident as file cache although no tensor uses them. After the copy, RSS is
    the model's tensors, as on a GPU.
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if type(p).__name__ != "Params4bit":  # quantized weights are already plain memory
                    p.data = p.data.clone()
            for name, b in module.named_buffers(recurse=False):
                module._buffers[name] = b.clone()


def collate(rows: list[dict]) -> dict:
    import torch

    return {"input_ids": torch.stack([r["input_ids"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows])}


def child(method: str, seq_len: int, checkpointing: bool, steps: int, release: bool) -> None:
    import torch

    import graft
    from graft import models, quant
    from graft.train import TrainConfig, train

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if release:  # from the start, as `graft train --release-cpu-memory` does: loading and quantizing fragment too
        from graft.train.monitor import map_large_blocks

        map_large_blocks()
    warm_up()
    trim()
    runtime_kb = rss_kb()

    if method == "qlora":
        model, _ = models.load("smollm2-135m", quantize="nf4", compute_dtype=quant.default_compute_dtype("cpu"))
        graft.prepare_kbit_training(model, gradient_checkpointing=False)
    else:
        model, _ = models.load("smollm2-135m")
    if method != "full":
        graft.attach(model, graft.LoRA(r=8, alpha=16))
    materialise(model)
    vocab = model.config.vocab_size
    data = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (seq_len,))
        data.append({"input_ids": ids, "labels": ids})
    trim()
    loaded_kb = rss_kb()
    reset_peak()
    t0 = time.perf_counter()
    result = train(model, data, collate, TrainConfig(lr=1e-4, max_steps=steps, batch_size=1, progress=False,
                                                     gradient_checkpointing=checkpointing, logits_chunk=512,
                                                     release_cpu_memory=release))
    seconds = time.perf_counter() - t0
    peak_kb = rss_kb("VmHWM")
    print(json.dumps({"method": method, "seq_len": seq_len, "checkpointing": checkpointing,
                      "runtime_mb": runtime_kb / 1024, "loaded_mb": loaded_kb / 1024, "peak_mb": peak_kb / 1024,
                      "measured_mb": (peak_kb - runtime_kb) / 1024, "seconds": seconds,
                      "selective_logits": result.selective_logits, "loss": result.final_loss}))


def predict(method: str, seq_len: int, checkpointing: bool) -> dict:
    from graft.plan import plan

    p = plan("smollm2-135m", memory="1TB", seq_len=seq_len, batch=1, dtype="fp32", device="cpu", reserve=0,
             gradient_checkpointing=checkpointing, r=8, logits_chunk=512)
    return p.row(method).to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[256, 768])
    ap.add_argument("--checkpointing", action="store_true", help="train (and plan) with gradient checkpointing")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--glibc-default", action="store_true", help="measure with glibc's default malloc settings")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.checkpointing, args.steps, release=not args.glibc_default)
        return

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for method in args.methods:
        for seq_len in args.seq_lens:
            cmd = [sys.executable, __file__, "--child", method, str(seq_len), "--steps", str(args.steps)]
            cmd += ["--checkpointing"] if args.checkpointing else []
            cmd += ["--glibc-default"] if args.glibc_default else []
            out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT)
            if out.returncode != 0:
                print(f"{method} seq {seq_len} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            planned = predict(method, seq_len, args.checkpointing)
            rows.append((measured, planned))
            ratio = planned["total_bytes"] / 2**20 / measured["measured_mb"]
            print(f"{method:>5} seq {seq_len:>5}: predicted {planned['total_bytes'] / 2**20:7.0f} MiB, measured "
                  f"{measured['measured_mb']:7.0f} MiB, ratio {ratio:.3f} ({measured['seconds']:.0f}s)", flush=True)

    print("\nSmolLM2-135M, fp32, CPU, batch 1, AdamW, logits chunk 512"
          + (", gradient checkpointing" if args.checkpointing else "")
          + (", glibc default malloc" if args.glibc_default else ", TrainConfig(release_cpu_memory=True)")
          + "; MiB = 2^20 bytes.")
    print("runtime = RSS after imports and a tiny warm-up step; measured = training peak RSS - runtime.\n")
    print("| method | seq len | weights | activations (plan) | predicted peak | measured peak "
          "| predicted / measured |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for m, p in rows:
        ratio = p["total_bytes"] / 2**20 / m["measured_mb"]
        worst = max(worst, abs(ratio - 1))
        print(f"| {m['method']} | {m['seq_len']} | {p['weights_bytes'] / 2**20:.0f} | "
              f"{p['activation_bytes'] / 2**20:.0f} | {p['total_bytes'] / 2**20:.0f} | {m['measured_mb']:.0f} | "
              f"{ratio:.3f} |")
    if rows:
        runtime = sum(m["runtime_mb"] for m, _ in rows) / len(rows)
        print(f"\nruntime (not predicted): {runtime:.0f} MiB on average; worst |ratio - 1| = {worst:.3f} "
              f"({'within' if worst <= 0.15 else 'OUTSIDE'} the 15% target)")


if __name__ == "__main__":
    main()
