"""Does DPO with an adapter teach a preference? SmolLM2-135M-Instruct + LoRA on SST-2 preference pairs.

    .venv/bin/python benchmarks/dpo.py                       # 30 steps of 4 pairs, 1 thread
    .venv/bin/python benchmarks/dpo.py --steps 60 --batch-size 8 --train 480 --heldout 128 --threads 4

Pairs from SST-2 sentences: the prompt asks for the review's sentiment (``Review: ...\nSentiment:``,
no chat template, so sequences stay short on a CPU), ``chosen`` is the right word (" positive" /
" negative") and ``rejected`` the wrong one. Training and held-out pairs are disjoint sentences.
Reported on the held-out pairs, before and after training:

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
from graft.train import TrainConfig, train
from graft.train.dpo import reference_logps, sequence_logps

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = {0: "negative", 1: "positive"}


def sst2_pairs(n: int, seed: int) -> list[dict[str, str]]:
    lines = (SHARED / "sst2" / "train.tsv").read_text().splitlines()[1:]
    rows = [(t.strip(), int(lab)) for t, lab in (line.rsplit("\t", 1) for line in lines)]
    rows = [r for r in rows if len(r[0].split()) >= 6]  # full sentences, not phrase fragments
    random.Random(seed).shuffle(rows)
    return [{"prompt": f"Review: {text}\nSentiment:", "chosen": " " + WORDS[label],
             "rejected": " " + WORDS[1 - label]} for text, label in rows[:n]]


def logps(model, pairs, collate, reference: bool, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probabilities of every pair, policy or reference."""
    chosen, rejected = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = collate(chunk)
            out = reference_logps(model, batch) if reference else sequence_logps(model, batch)
            chosen.append(out[:len(chunk)])
            rejected.append(out[len(chunk):])
    return torch.cat(chosen), torch.cat(rejected)


def scores(policy: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor], beta: float) -> dict:
    margins = beta * ((policy[0] - ref[0]) - (policy[1] - ref[1]))
    return {"reward margin": float(margins.mean()), "reward accuracy": float((margins > 0).float().mean()),
            "policy prefers chosen": float((policy[0] > policy[1]).float().mean()),
            "log p(chosen) - log p(rejected)": float((policy[0] - policy[1]).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=120)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a shared, busy machine)")
    args = p.parse_args()
    if not (SHARED / "sst2" / "train.tsv").exists():
        print(f"skipped: {SHARED / 'sst2' / 'train.tsv'} not found")
        return
    torch.set_num_threads(args.threads)
    rows = sst2_pairs(args.train + args.heldout, args.seed)
    model, tok = models.load("smollm2-135m")
    train_pairs = data.tokenize_pairs(rows[:args.train], tok, max_length=128)
    heldout = data.tokenize_pairs(rows[args.train:], tok, max_length=128)
    graft.attach(model, graft.LoRA(r=16, alpha=32, targets="all-linear"))
    collate = recipe.make_collate(model, tok, 256, packed=True, pairs=True)
    cfg = TrainConfig(objective="dpo", beta=args.beta, lr=args.lr, batch_size=args.batch_size,
                      max_steps=args.steps, warmup_ratio=0.1, seed=args.seed, progress=False)
    ref = logps(model, heldout, collate, reference=True)  # = the policy before training (LoRA B = 0)
    before = scores(ref, ref, args.beta)
    t0 = time.time()
    steps: list[dict] = []

    def show(info) -> None:
        steps.append(info)
        print(f"step {info.step}: loss {info.loss:.4f}, margin {info['rewards/margins']:.4f}, "
              f"accuracy {info['rewards/accuracies']:.2f}", flush=True)

    result = train(model, train_pairs, collate, cfg, on_step=show)
    seconds = time.time() - t0
    after = scores(logps(model, heldout, collate, reference=False), ref, args.beta)
    print(f"SmolLM2-135M-Instruct + LoRA r=16 all-linear, DPO beta={args.beta}, {result.steps} steps x "
          f"{args.batch_size} pairs ({args.train} training pairs), lr {args.lr:g}; {len(heldout)} held-out pairs; "
          f"{seconds:.0f} s training, {torch.get_num_threads()} thread(s)\n")
    print("| held-out pairs | before | after |\n|---|---|---|")
    for key in before:
        print(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
    print(json.dumps({"before": before, "after": after, "train_losses": [round(x, 4) for x in result.losses],
                      "train_margins": [round(s["rewards/margins"], 4) for s in steps], "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
