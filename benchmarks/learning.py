"""Does fine-tuning really teach? Held-out figures on real data, with graft's trainer.

    .venv/bin/python benchmarks/learning.py            # both tasks
    .venv/bin/python benchmarks/learning.py --task sst2
    .venv/bin/python benchmarks/learning.py --task gsm8k --save runs/cot-adapter   # keep the CoT adapter

gsm8k: LoRA SFT of SmolLM2-135M-Instruct on GSM8K problems in the CoT format (question / worked
       rationale / answer), held-out loss before and after on problems not trained on.
sst2:  all-MiniLM-L6-v2 + LoRA + a classification head on SST-2 sentences; held-out accuracy
       against the majority class.
Both read ../shared/data and skip cleanly when it is absent.
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def gsm8k(n_train: int, n_eval: int, seed: int, save: str | None = None) -> dict:
    rows = [json.loads(line) for line in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()]
    random.Random(seed).shuffle(rows)
    model, tok = models.load("smollm2-135m")
    train_ex = data.tokenize(rows[:n_train], tok, format="cot", max_length=512)
    eval_ex = data.tokenize(rows[n_train:n_train + n_eval], tok, format="cot", max_length=512)
    graft.attach(model, graft.LoRA(r=16, alpha=32, targets="all-linear"))
    collate = recipe.make_collate(model, tok, 512, packed=True)
    cfg = TrainConfig(lr=3e-4, epochs=1, batch_size=8, warmup_ratio=0.1, seed=seed, progress=False)
    before = evaluate(model, eval_ex, collate, cfg)["eval_loss"]
    t0 = time.time()
    result = train(model, train_ex, collate, cfg)
    after = evaluate(model, eval_ex, collate, cfg)["eval_loss"]
    if save:
        graft.save(model, save)  # benchmarks/eval.py --cot-adapter evaluates it beside the prompting strategies
    return {"task": "gsm8k-cot", "train": n_train, "heldout": n_eval, "eval_loss_before": before,
            "eval_loss_after": after, "relative_drop": (before - after) / before, "steps": result.steps,
            "seconds": time.time() - t0}


def sst2(n_train: int, n_eval: int, seed: int) -> dict:
    lines = (SHARED / "sst2" / "train.tsv").read_text().splitlines()[1:]
    rows = [{"text": t.strip(), "label": int(lab)} for t, lab in (line.rsplit("\t", 1) for line in lines)]
    random.Random(seed).shuffle(rows)
    train_rows, eval_rows = rows[:n_train], rows[n_train:n_train + n_eval]
    labels = data.label_map(data.read(train_rows))
    model, tok = models.load("minilm", task="sequence-classification", num_labels=len(labels))
    graft.attach(model, graft.LoRA(r=8, alpha=16, targets=["query", "key", "value", "dense"]))
    kw = {"format": "classification", "max_length": 128, "label_map": labels}
    train_ex = data.tokenize(train_rows, tok, **kw)
    eval_ex = data.tokenize(eval_rows, tok, **kw)
    collate = recipe.make_collate(model, tok, 128, packed=False)
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=32, warmup_ratio=0.1, seed=seed, task="classification",
                      progress=False)
    t0 = time.time()
    result = train(model, train_ex, collate, cfg)
    acc = evaluate(model, eval_ex, collate, cfg)["eval_accuracy"]
    majority = max(sum(r["label"] == c for r in eval_rows) for c in (0, 1)) / len(eval_rows)
    return {"task": "sst2", "train": n_train, "heldout": n_eval, "accuracy": acc, "majority": majority,
            "trainable": graft.report(model).trainable, "steps": result.steps, "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["gsm8k", "sst2", "both"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="write the GSM8K CoT adapter here (for benchmarks/eval.py --cot-adapter)")
    args = ap.parse_args()
    if not SHARED.exists():
        print(f"skipped: {SHARED} not found")
        return
    torch.set_num_threads(2)
    if args.task in ("gsm8k", "both"):
        r = gsm8k(240, 60, args.seed, args.save)
        print(json.dumps(r))
        print(f"GSM8K CoT LoRA SFT: held-out loss {r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f} "
              f"({100 * r['relative_drop']:.1f}% lower), {r['steps']} steps, {r['seconds']:.0f}s")
    if args.task in ("sst2", "both"):
        r = sst2(4000, 1000, args.seed)
        print(json.dumps(r))
        print(f"SST-2 MiniLM + LoRA: held-out accuracy {100 * r['accuracy']:.1f}% vs majority class "
              f"{100 * r['majority']:.1f}%, {r['trainable']:,} trainable params, {r['seconds']:.0f}s")


if __name__ == "__main__":
    main()
