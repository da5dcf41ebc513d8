"""Attention cost of packed rows vs padded rows vs one example at a time (issue 20, point 2).

    .venv/bin/python benchmarks/packed_attention.py                 # the training benchmark's batches
    .venv/bin/python benchmarks/packed_attention.py --batches 2 --reps 3 --threads 1

Why packing and selective logits do not compound: a packed row holds several examples and gets a
block-diagonal causal mask, but ``scaled_dot_product_attention`` on the CPU computes every
(query, key) pair of the row and masks afterwards, so attention costs rows x width^2, not the
sum of each example's length^2, and the mask rules out the causal kernel's skipping of the upper
triangle. Unpacked rows pay width^2 too, over shorter rows (each row's width is the batch's longest
example). This script times attention alone (forward and backward, SmolLM2-135M's heads and head
size, times its layers) on the same batches benchmarks/train.py uses (GSM8K, Alpaca template,
batch 8, packed into rows of at most 512 tokens by graft.data.pack), three ways:

* packed rows with their block-diagonal causal mask (what graft's packing runs now);
* padded rows with a padding + causal mask (what the reference and graft without packing run);
* each example alone with ``is_causal=True`` (what a per-example, "varlen" attention would run).

It reports the CPU time of this process (robust to other load with one thread) and the wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as train_bench  # benchmarks/train.py: the same data


def _fwd_bwd(x: torch.Tensor, **kw: object) -> None:
    q, k, v = (x.clone().requires_grad_() for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, **kw).sum().backward()


def block_mask(seq_lens: list[list[int]], width: int) -> torch.Tensor:
    """(rows, 1, width, width) bool: causal within each example, nothing across; trailing padding is its own block."""
    mask = torch.zeros(len(seq_lens), 1, width, width, dtype=torch.bool)
    for i, lens in enumerate(seq_lens):
        start = 0
        for n in [*lens, width - sum(lens)]:
            mask[i, 0, start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
            start += n
    return mask


def cases(lens: list[int], rows: list[list[int]], heads: int, head_dim: int) -> dict[str, Callable[[], None]]:
    gen = torch.Generator().manual_seed(0)
    width = max(sum(r) for r in rows)
    packed_x = torch.randn(len(rows), heads, width, head_dim, generator=gen)
    packed_mask = block_mask(rows, width)
    longest = max(lens)
    padded_x = torch.randn(len(lens), heads, longest, head_dim, generator=gen)
    padded_mask = block_mask([[n] for n in lens], longest)  # causal over the example, padding apart
    alone = [torch.randn(1, heads, n, head_dim, generator=gen) for n in lens]
    return {
        "packed rows, block mask": lambda: _fwd_bwd(packed_x, attn_mask=packed_mask),
        "padded rows, mask": lambda: _fwd_bwd(padded_x, attn_mask=padded_mask),
        "each example, is_causal": lambda: [_fwd_bwd(x, is_causal=True) for x in alone],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=4, help="batches of the seeded order to time")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5, help="rounds (the first is a warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=train_bench.DATA)
    args = ap.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    from graft import data, models

    torch.set_num_threads(args.threads)
    path = models.resolve(args.model)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    examples = data.tokenize(train_bench.rows(args.examples, args.data), tok, format="alpaca",
                             max_length=args.max_length)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    totals: dict[str, list[float]] = {}
    walls: dict[str, list[float]] = {}
    for b in range(args.batches):
        items = [examples[i] for i in order[b * args.batch_size:(b + 1) * args.batch_size]]
        lens = [len(x) for x in items]
        rows = [p.seq_lens for p in data.pack(items, args.max_length)]
        width = max(sum(r) for r in rows)
        print(f"batch {b}: examples {lens}; packed rows {[sum(r) for r in rows]} (width {width}); "
              f"positions padded {len(lens) * max(lens)}, packed {len(rows) * width}, real {sum(lens)}", flush=True)
        timed = cases(lens, rows, heads, head_dim)
        cpu: dict[str, list[float]] = {k: [] for k in timed}
        wall: dict[str, list[float]] = {k: [] for k in timed}
        names = list(timed)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                c0, w0 = time.process_time(), time.perf_counter()
                timed[name]()
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
        for name in names:
            c, w = statistics.median(cpu[name][1:] or cpu[name]), statistics.median(wall[name][1:] or wall[name])
            totals.setdefault(name, []).append(c * config.num_hidden_layers)
            walls.setdefault(name, []).append(w * config.num_hidden_layers)
            print(f"  {name:<26} x{config.num_hidden_layers} layers: {c * config.num_hidden_layers:6.2f} s CPU, "
                  f"{w * config.num_hidden_layers:6.2f} s wall", flush=True)
    print(f"\n| attention, forward + backward, {args.batches} batches x {config.num_hidden_layers} layers, "
          f"{args.threads} thread(s) | CPU s | wall s |\n|---|---:|---:|")
    for name, seconds in totals.items():
        print(f"| {name} | {sum(seconds):.2f} | {sum(walls[name]):.2f} |")


if __name__ == "__main__":
    main()
