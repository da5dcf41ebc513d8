"""torch.compile (inductor, CPU) of the frozen decoder blocks in graft's training step: faster, and exact?

    .venv/bin/python benchmarks/compile_step.py                    # SmolLM2 step, eager vs compiled
    .venv/bin/python benchmarks/compile_step.py --scope norms      # compile only the RMSNorm modules
    .venv/bin/python benchmarks/compile_step.py --quick            # smoke test: 2 steps, batch 2

Issue 20, point 2: the elementwise chains of a decoder block (RMSNorm, SiLU x gate, rotary,
residual adds) are many small memory-bound kernels in eager PyTorch; inductor can fuse them. This
script runs graft's real training step (benchmarks/train.py's settings, through
``profile_step.graft_side``) eagerly and then with ``torch.compile`` applied in place to every
decoder layer (``--scope layers``: the whole block, LoRA layers included) or to every RMSNorm
(``--scope norms``), from the same adapter weights and a fresh optimizer, on the same batches, and
reports the compile time, the median step time of each, and the largest per-step fp32 loss
difference (the acceptance bar for making it a default: 1e-5).

Inductor on CPU generates C++ and needs a C++ compiler; without one (or when compiling fails) the
script says so and exits 0, so a machine without a toolchain reports "not available" rather than
an error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step  # benchmarks/profile_step.py: graft's real training step
import train as train_bench  # benchmarks/train.py: the same builders and data

from graft.train.compile import compiler_problem as compile_check
from graft.train.compile import decoder_layers  # what --compile compiles

TOLERANCE = 1e-5


def compiler_problem() -> str | None:
    """Why inductor cannot compile on this CPU (graft's check, then a tiny function compiled against eager)."""
    problem = compile_check(torch.device("cpu"))
    if problem:
        return problem
    try:
        def f(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.silu(x) * x.pow(2).mean(-1, keepdim=True).rsqrt()

        x = torch.randn(4, 8)
        if not torch.allclose(torch.compile(f)(x), f(x), atol=1e-5):
            return "a compiled test function does not match eager"
    except Exception as exc:  # noqa: BLE001 (any failure means: not available here)
        return f"torch.compile failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"
    return None


def apply_compile(model: nn.Module, scope: str) -> int:
    """Compile (in place, dynamic shapes: packed widths vary) the modules of ``scope``; how many."""
    if scope == "layers":
        targets = decoder_layers(model)
    else:
        targets = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    for m in targets:
        m.compile(dynamic=True)
    return len(targets)


def run(side_factory: Any, batches: list[list[Any]]) -> dict[str, Any]:
    """A warm-up step (compiles; timed apart), then steps on ``batches`` from the initial weights."""
    side = side_factory()
    t0 = time.perf_counter()
    side.step(batches[0])
    first = time.perf_counter() - t0
    side = side_factory()  # back to the initial adapter weights, fresh optimizer
    losses, times = [], []
    for batch in batches[1:]:
        t0 = time.perf_counter()
        losses.append(side.step(batch))
        times.append(time.perf_counter() - t0)
    return {"first_step_s": first, "step_s": statistics.median(times), "times_s": times, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scope", choices=["layers", "norms"], default="layers")
    ap.add_argument("--steps", type=int, default=4, help="timed steps after the warm-up / compile step")
    ap.add_argument("--block-mask", action="store_true",
                    help="attention over whole packed rows (sdpa, block mask): one graph, where graft's per-example "
                         "attention (its default on the CPU) splits the graph at each row's example boundaries")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 examples, batch 2, max length 256, 2 steps")
    train_bench.step_args(ap)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/graft-bench-compile", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.examples, args.batch_size, args.max_length, args.steps = 8, 2, 256, 2
    torch.set_num_threads(args.threads)
    problem = compiler_problem()
    if problem is not None:
        print(f"compile: not available here: {problem}")
        if args.json:
            args.json.write_text(json.dumps({"available": False, "reason": problem}))
        return
    model, examples, collate, cfg = train_bench.build_graft(args, packing=True, selective=True, checkpointing=False)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def factory() -> profile_step.Side:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in trainable:
                    p.copy_(trainable[n])
        side = profile_step.graft_side(model, examples, collate, cfg)
        if args.block_mask:  # transformers' sdpa over the whole masked row instead of graft's per-example attention
            model.set_attn_implementation("sdpa")
        return side

    index = profile_step.step_batches(len(examples), args.batch_size, 1 + args.steps, args.seed)
    batches = [[examples[i] for i in b] for b in index]
    eager = run(factory, batches)
    print(f"eager:    {eager['step_s']:.3f} s/step (first step {eager['first_step_s']:.2f} s)", flush=True)
    count = apply_compile(model, args.scope)
    try:
        compiled = run(factory, batches)
    except Exception as exc:  # report what failed; the eager figures stand
        print(f"compile ({args.scope}): failed while training: {type(exc).__name__}: {exc}")
        raise SystemExit(1) from exc
    from torch._dynamo.utils import counters

    graphs = int(counters["stats"]["unique_graphs"])
    breaks = {str(k)[:120]: v for k, v in counters["graph_break"].items()}
    print(f"dynamo: {graphs} graph(s) compiled, {sum(breaks.values())} graph break(s)"
          + "".join(f"\n  break x{v}: {k}" for k, v in breaks.items()))
    diffs = [abs(a - b) for a, b in zip(eager["losses"], compiled["losses"])]
    worst = max(diffs)
    print(f"compiled ({args.scope}, {count} modules): {compiled['step_s']:.3f} s/step "
          f"(first step, compiling: {compiled['first_step_s']:.1f} s)")
    print(f"speed-up eager / compiled: {eager['step_s'] / compiled['step_s']:.3f}x")
    print(f"max |loss difference| over {len(diffs)} steps: {worst:.2e} "
          f"({'within' if worst <= TOLERANCE else 'OUTSIDE'} {TOLERANCE:g})")
    if args.json:
        args.json.write_text(json.dumps({"available": True, "scope": args.scope, "modules": count, "eager": eager,
                                         "compiled": compiled, "max_loss_diff": worst,
                                         "graphs": graphs, "graph_breaks": breaks}, indent=2))


if __name__ == "__main__":
    main()
