"""ReLoRA on real data: does the loss keep falling across merge-and-restarts, and does the merged
update really grow past rank r?

    .venv/bin/python benchmarks/relora.py                   # ReLoRA alone: 30 steps of 4 problems (<= 160 tokens)
    .venv/bin/python benchmarks/relora.py --compare-lora    # and a plain LoRA of the same rank, same run

SmolLM2-135M-Instruct, GSM8K problems in the CoT format (../shared/data/gsm8k), ReLoRA on every linear
layer with the jagged ``cosine_restarts`` schedule. Reported per cycle: the mean training loss and
the held-out loss measured just after the cycle's restart (so it includes the merge), then the
numerical rank of one layer's whole update (merged factors + current LoRA; singular values
above 1e-4 x the largest) against r.
A restart that lost what the cycle learned would show as a held-out loss jumping back up.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import graft
from graft import data, models, recipe
from graft.core import adapter_layers
from graft.train import TrainConfig, evaluate, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def gsm8k_examples(tok, n_train: int, n_eval: int, max_length: int, seed: int) -> tuple[list, list]:
    rows = [json.loads(line) for line in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()]
    random.Random(seed).shuffle(rows)
    kw = {"format": "cot", "max_length": max_length, "on_overflow": "truncate"}  # a long rationale is cut short
    return data.tokenize(rows[:n_train], tok, **kw), data.tokenize(rows[n_train:n_train + n_eval], tok, **kw)


def run(method: graft.core.Method, args: argparse.Namespace) -> dict:
    model, tok = models.load("smollm2-135m")
    train_ex, eval_ex = gsm8k_examples(tok, args.steps * args.batch_size, args.eval, args.max_length, args.seed)
    torch.manual_seed(args.seed)
    graft.attach(model, method)
    collate = recipe.make_collate(model, tok, args.max_length, packed=True)
    schedule = {"schedule": "cosine_restarts", "restart_every": args.restart_every, "restart_warmup_steps": 2}
    cfg = TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=args.batch_size, warmup_steps=3,
                      eval_every=args.restart_every, seed=args.seed, progress=False, **schedule)
    before = evaluate(model, eval_ex, collate, cfg)["eval_loss"]
    t0, cpu0 = time.time(), time.process_time()
    result = train(model, train_ex, collate, cfg, eval_data=eval_ex)
    cycles = [result.losses[i:i + args.restart_every] for i in range(0, len(result.losses), args.restart_every)]
    out = {"method": type(method).__name__, "r": method.r, "eval_before": round(before, 4),
           "cycle_train_loss": [round(sum(c) / len(c), 4) for c in cycles],
           "eval_after_cycle": [round(e["eval_loss"], 4) for e in result.evals],
           "steps": result.steps, "seconds": round(time.time() - t0, 1),
           "cpu_seconds": round(time.process_time() - cpu0, 1)}
    name, lay = next((n, m) for n, m in adapter_layers(model) if n.endswith("layers.0.self_attn.q_proj"))
    delta = lay.delta_weight("default").double()
    s = torch.linalg.svdvals(delta)
    out["layer"], out["update_rank"] = name, int((s > 1e-4 * s[0]).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--restart-every", type=int, default=10)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=160, help="tokens per example (longer ones are cut)")
    ap.add_argument("--eval", type=int, default=24, help="held-out problems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-lora", action="store_true", help="also train a plain LoRA of rank r (same schedule)")
    args = ap.parse_args()
    if not (SHARED / "gsm8k").exists():
        print(f"skipped: {SHARED / 'gsm8k'} not found")
        return
    torch.set_num_threads(2)
    methods = [graft.ReLoRA(r=args.r, alpha=2 * args.r, restart_every=args.restart_every)]
    if args.compare_lora:
        methods.append(graft.LoRA(r=args.r, alpha=2 * args.r, targets="all-linear"))
    for method in methods:
        r = run(method, args)
        print(json.dumps(r))
        print(f"{r['method']} r={r['r']}: held-out loss {r['eval_before']:.3f} -> "
              + " -> ".join(f"{x:.3f}" for x in r["eval_after_cycle"])
              + f" (after each {args.restart_every}-step cycle); train loss per cycle "
              + ", ".join(f"{x:.3f}" for x in r["cycle_train_loss"])
              + f"; rank of {r['layer']}'s update {r['update_rank']} (r = {r['r']}); "
              f"{r['seconds']:.0f}s ({r['cpu_seconds']:.0f}s CPU)")


if __name__ == "__main__":
    main()
