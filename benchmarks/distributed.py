"""Data-parallel training throughput: 1 rank against 2 ranks (DDP and FSDP) on the same global batch.

    .venv/bin/python benchmarks/distributed.py                        # CPU (gloo), or CUDA (NCCL) if present
    .venv/bin/python benchmarks/distributed.py --steps 4 --examples 40 # quicker
    .venv/bin/python benchmarks/distributed.py --device cpu            # force the CPU runs on a GPU machine

Model SmolLM2-135M-Instruct (fp32), LoRA r=16 alpha=32 all-linear, GSM8K train problems from
../shared/data/gsm8k in the Alpaca template, packing and selective logits (graft's defaults), max
length 512, a global batch of ``--global-batch`` examples per optimizer step (per rank: global / ranks),
AdamW lr 2e-4 constant. Every configuration is launched with ``torchrun --standalone`` (one rank runs
graft's single-process loop); throughput counts the tokens of all ranks over steps 2..N (step 1 warms up).

On CPU the ranks share the machine's cores: with C cores, one rank computes with C threads and each
of two ranks with C/2, so two ranks can at best match one (there is no extra hardware to scale onto);
what the comparison shows is the cost of the collectives and of the smaller per-rank matrices. On a
GPU machine the same runs use NCCL, one GPU per rank; with a single GPU only the 1-rank run is
possible (NCCL needs a device per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import DATA, rows, run_child  # benchmarks/train.py: the same GSM8K rows in the Alpaca fields


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """One configuration, on every rank torchrun started."""
    import torch
    import torch.distributed as dist

    import graft
    from graft import data, models, recipe
    from graft.train import TrainConfig, distributed, train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = args.device == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    distributed.init_process_group()
    model, tok = models.load("smollm2-135m")
    if cuda and world == 1:
        model.to("cuda")  # with several ranks, graft.train puts each rank's model on cuda:LOCAL_RANK
    graft.attach(model, graft.LoRA(r=16, alpha=32, targets="all-linear"))
    examples = data.tokenize(rows(args.examples), tok, format="alpaca", max_length=args.max_length,
                              on_overflow="skip")
    collate = recipe.make_collate(model, tok, args.max_length, packed=True)
    cfg = TrainConfig(lr=2e-4, batch_size=args.global_batch // world, max_steps=args.steps, schedule="constant",
                      seed=0, max_grad_norm=1.0, progress=False)
    records: list[dict] = []
    t0 = time.perf_counter()
    result = train(model, examples, collate, cfg, on_step=records.append,
                   distributed=distributed.DistConfig(strategy=args.strategy))
    seconds = time.perf_counter() - t0
    timed = records[1:]
    span = timed[-1]["elapsed"] - records[0]["elapsed"]
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # an FSDP shard: its part
    weights_mb = sum(t.numel() * t.element_size() for t in local) / 2**20
    rss = torch.tensor([vm_rss_mb()], dtype=torch.float64)
    if world > 1:
        rss = rss.to("cuda") if cuda else rss
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if distributed.is_main():
        out = {"ranks": world, "strategy": args.strategy if world > 1 else "single process",
               "device": f"{'cuda/nccl' if cuda else 'cpu/gloo'}", "threads": torch.get_num_threads(),
               "tok_per_s": sum(r["tokens"] for r in timed) / span,
               "sup_tok_per_s": sum(r["supervised_tokens"] for r in timed) / span,
               "s_per_step": span / len(timed), "seconds": seconds,
               "peak_rss_mb": records[-1]["peak_rss_mb"], "rss_end_mb": float(rss[0]), "weights_mb": weights_mb,
               "losses": result.losses}
        if cuda:
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20  # rank 0's
        print("RESULT " + json.dumps(out), flush=True)
    distributed.shutdown()


def launch(args: argparse.Namespace, ranks: int, strategy: str, device: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__,
           "--child", "--strategy", strategy, "--device", device, "--steps", str(args.steps),
           "--examples", str(args.examples), "--global-batch", str(args.global_batch),
           "--max-length", str(args.max_length)]
    return run_child(cmd, f"{ranks} ranks ({strategy}, {device})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--global-batch", type=int, default=8, help="examples per optimizer step, over all ranks")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error(f"--steps {args.steps}: give at least 2 (the first step is a warm-up; the rest are timed)")
    if args.child:
        return child(args)
    if not DATA.exists():
        print(f"skipped: {DATA} not found (the benchmark reads ../shared/data)")
        return None
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    runs = [(1, "ddp")]
    if device == "cpu" or gpus >= 2:
        runs += [(2, "ddp"), (2, "fsdp")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, device {device}"
          + (f" ({gpus} x {torch.cuda.get_device_name(0)})" if gpus else "")
          + f"; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for ranks, strategy in runs:
        r = launch(args, ranks, strategy, device)
        results.append(r)
        print(f"{r['ranks']} rank(s) {r['strategy']:<15} {r['tok_per_s']:8.1f} tok/s {r['sup_tok_per_s']:8.1f} sup tok/s "
              f"{r['s_per_step']:6.2f} s/step  peak RSS/rank {r['peak_rss_mb']:6.0f} MB  RSS at end/rank "
              f"{r['rss_end_mb']:6.0f} MB  final loss {r['losses'][-1]:.4f}"
              + (f"  CUDA peak (rank 0) {r['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in r else ""), flush=True)
    base = results[0]
    print("\n| ranks | strategy | device | threads/rank | tokens/s | supervised tok/s | s/step | weights/rank (MB) "
          "| peak RSS/rank (MB) | RSS at end/rank (MB) | tokens/s vs 1 rank |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['ranks']} | {r['strategy']} | {r['device']} | {r['threads']} | {r['tok_per_s']:.1f} | "
              f"{r['sup_tok_per_s']:.1f} | {r['s_per_step']:.2f} | {r['weights_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['rss_end_mb']:.0f} | {r['tok_per_s'] / base['tok_per_s']:.2f}x |")
    for r in results[1:]:
        gaps = [abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True)]
        print(f"{r['ranks']} ranks {r['strategy']}: loss difference to 1 rank at step 1 {gaps[0]:.1e} (same weights, "
              f"same examples: float summation order only), largest over the steps {max(gaps):.1e} (later steps drift "
              "as much within one process between configurations equal in exact arithmetic, e.g. batch 4 against "
              "batch 2 x grad_accum 2: see docs/distributed.md)")
    for r in results:
        print(f"losses, {r['ranks']} rank(s) {r['strategy']}: " + " ".join(f"{x:.6f}" for x in r["losses"]))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return None


if __name__ == "__main__":
    main()
