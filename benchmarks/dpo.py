"""Does DPO with an adapter teach a preference? SmolLM2-135M-Instruct + LoRA on SST-2 preference pairs.

    .venv/bin/python benchmarks/dpo.py                       # 40 steps of 8 pairs (a few CPU minutes)
    .venv/bin/python benchmarks/dpo.py --steps 20 --train 160 --heldout 64

Pairs from SST-2 sentences: the prompt asks for the review's sentiment (through the chat template),
``chosen`` is the right word ("positive" / "negative") and ``rejected`` the wrong one. Training and
held-out pairs are disjoint sentences. Reported on the held-out pairs, before and after training:

* the implicit reward margin β·[(log π - log π_ref)(chosen) - (same)(rejected)] (0 before: LoRA's B = 0,
  so the policy is the reference) and the fraction of pairs where it is positive (reward accuracy);
* the policy's own preference: the fraction of pairs with log π(chosen) > log π(rejected), i.e. how
  often the model would pick the right word. Before training that is the base model's zero-shot score.

Reads ../shared/data and skips cleanly when it is absent.
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
from graft.train import TrainConfig, evaluate, train
from graft.train.dpo import sequence_logps

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = {0: "negative", 1: "positive"}


def sst2_pairs(n: int, seed: int) -> list[dict[str, str]]:
    lines = (SHARED / "sst2" / "train.tsv").read_text().splitlines()[1:]
    rows = [(t.strip(), int(lab)) for t, lab in (line.rsplit("\t", 1) for line in lines)]
    rows = [r for r in rows if len(r[0].split()) >= 6]  # full sentences, not phrase fragments
    random.Random(seed).shuffle(rows)
    return [{"prompt": f"Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
                       f"Review: {text}",
             "chosen": WORDS[label], "rejected": WORDS[1 - label]} for text, label in rows[:n]]


def policy_accuracy(model, pairs, collate, batch_size: int = 16) -> float:
    """Fraction of pairs where the model gives the chosen response the higher log-probability."""
    right = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            logps = sequence_logps(model, collate(chunk))
            n = len(chunk)
            right += int((logps[:n] > logps[n:]).sum())
    return right / len(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=320)
    p.add_argument("--heldout", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if not (SHARED / "sst2" / "train.tsv").exists():
        print(f"skipped: {SHARED / 'sst2' / 'train.tsv'} not found")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = sst2_pairs(args.train + args.heldout, args.seed)
    model, tok = models.load("smollm2-135m")
    kw = {"max_length": 256, "chat_template": True}
    train_pairs = data.tokenize_pairs(rows[:args.train], tok, **kw)
    heldout = data.tokenize_pairs(rows[args.train:], tok, **kw)
    graft.attach(model, graft.LoRA(r=16, alpha=32, targets="all-linear"))
    collate = recipe.make_collate(model, tok, 256, packed=True, pairs=True)
    cfg = TrainConfig(objective="dpo", beta=args.beta, lr=args.lr, batch_size=args.batch_size,
                      max_steps=args.steps, warmup_ratio=0.1, seed=args.seed, progress=False)
    before = {**evaluate(model, heldout, collate, cfg), "policy_accuracy": policy_accuracy(model, heldout, collate)}
    t0 = time.time()
    result = train(model, train_pairs, collate, cfg)
    seconds = time.time() - t0
    after = {**evaluate(model, heldout, collate, cfg), "policy_accuracy": policy_accuracy(model, heldout, collate)}
    keys = ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "policy_accuracy")
    print(f"SmolLM2-135M-Instruct + LoRA r=16 all-linear, DPO beta={args.beta}, {result.steps} steps x "
          f"{args.batch_size} pairs ({args.train} training pairs), lr {args.lr:g}; {len(heldout)} held-out pairs; "
          f"{seconds:.0f} s training, {torch.get_num_threads()} threads\n")
    print("| held-out pairs | before | after |\n|---|---|---|")
    for key in keys:
        print(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
    print(json.dumps({"before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys},
                      "train_losses": [round(x, 4) for x in result.losses], "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
