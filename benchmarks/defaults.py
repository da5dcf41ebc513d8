"""How `graft train --method lora`'s defaults were chosen, and whether they reach full fine-tuning.

Two kinds of task, as users meet them:

sst2:  all-MiniLM-L6-v2 + a new classification head on SST-2 sentences (../shared/data/sst2);
clinc: SmolLM2-135M-Instruct + a new classification head on CLINC150's 150 intents
       (../shared/data/clinc150; in-scope queries only).

Every split comes from the data sets' *train* files, seeded and disjoint: ``train`` (what every run
trains on), ``val`` (what the grid is judged on) and ``test`` (what the chosen default and full
fine-tuning are reported on; the grid never sees it).

    python benchmarks/defaults.py grid  --task sst2 [--configs default,lr5e-4,...]   # judged on val
    python benchmarks/defaults.py check --task sst2                                  # default vs full on test
    python benchmarks/defaults.py table --results benchmarks/results/defaults.jsonl

A run is `graft.recipe.run` with the options a user would give on the command line (data as JSONL
files): config ``default`` gives no LoRA option at all, so it measures whatever the defaults are
when the script runs. Each run is its own subprocess (its own peak RSS; nothing carried over).
Run it on an otherwise idle machine for the times; accuracies do not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results" / "defaults.jsonl"

# The grid: name -> the options given. ``default`` gives none but the method, so it is graft's defaults of the
# day; every other config spells out what it ran (lr, warmup, head ratio), so a later change of the defaults
# does not change what an earlier row means. Full fine-tuning is the reference; it gets its own small
# learning-rate sweep on val so that it is not handicapped.
PLAIN = {"warmup_ratio": 0.0, "head_lr_ratio": 1.0}  # no warmup, the new head at lr: graft's defaults before the grid
CONFIGS: dict[str, dict] = {
    "default": {"method": "lora"},
    # round 1: SST-2, 2,000 rows x 1 epoch
    "alpha-r": {"method": "lora", "rslora": False, "lr": 2e-4, **PLAIN},  # graft's defaults before this grid
    "qv-r8": {"method": "lora", "r": 8, "alpha": 16, "targets": "qv", "rslora": False, "lr": 2e-4, **PLAIN},
    "lr5e-4": {"method": "lora", "lr": 5e-4, "rslora": False, **PLAIN},
    "lr1e-3": {"method": "lora", "lr": 1e-3, "rslora": False, **PLAIN},
    "rslora": {"method": "rslora", "lr": 2e-4, **PLAIN},
    "rslora-lr5e-4": {"method": "rslora", "lr": 5e-4, **PLAIN},
    "loraplus16": {"method": "lora", "loraplus_ratio": 16.0, "rslora": False, "lr": 2e-4, **PLAIN},
    "r8-lr5e-4": {"method": "lora", "r": 8, "alpha": 16, "lr": 5e-4, "rslora": False, **PLAIN},
    # round 2: CLINC150, then SST-2 at 8,000 x 2 epochs: a faster new head, warmup
    "head10": {"method": "rslora", "lr": 2e-4, "warmup_ratio": 0.0, "head_lr_ratio": 10.0},
    "lr4e-4-head5": {"method": "rslora", "lr": 4e-4, "warmup_ratio": 0.0, "head_lr_ratio": 5.0},
    "lr1e-3-warmup": {"method": "lora", "lr": 1e-3, "rslora": False, "warmup_ratio": 0.1, "head_lr_ratio": 1.0},
    "alpha-r-lr5e-4-head4": {"method": "lora", "lr": 5e-4, "rslora": False, "warmup_ratio": 0.1, "head_lr_ratio": 4.0},
    "full-2e-5": {"method": "full", "lr": 2e-5},
    "full-5e-5": {"method": "full", "lr": 5e-5},
    "full-1e-4": {"method": "full", "lr": 1e-4},
    "full-2e-4": {"method": "full", "lr": 2e-4},
    "full-5e-4": {"method": "full", "lr": 5e-4},
}

TASKS = {
    # model, rows per split (train, val, test), epochs, batch, max_length
    "sst2": {"model": "minilm", "train": 8000, "val": 1000, "test": 2000, "epochs": 2, "max_length": 128},
    "clinc": {"model": "smollm2-135m", "train": 30, "val": 5, "test": 10, "epochs": 2, "max_length": 64},
}


def splits(task: str, sizes: dict, seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint train / val / test rows ({"text", "label"}); CLINC's sizes are per intent (stratified)."""
    rng = random.Random(seed)
    if task == "sst2":
        lines = (SHARED / "sst2" / "train.tsv").read_text().splitlines()[1:]
        names = {"0": "negative", "1": "positive"}
        rows = [{"text": t.strip(), "label": names[lab.strip()]} for t, lab in (line.rsplit("\t", 1) for line in lines)]
        rng.shuffle(rows)
        a, b = sizes["train"], sizes["train"] + sizes["val"]
        return {"train": rows[:a], "val": rows[a:b], "test": rows[b:b + sizes["test"]]}
    by_intent: dict[str, list[str]] = defaultdict(list)
    for text, intent in json.loads((SHARED / "clinc150" / "train.json").read_text())["train"]:
        by_intent[intent].append(text)
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for intent in sorted(by_intent):
        texts = by_intent[intent]
        rng.shuffle(texts)
        start = 0
        for part in ("train", "val", "test"):
            out[part] += [{"text": t, "label": intent} for t in texts[start:start + sizes[part]]]
            start += sizes[part]
    for part in out.values():
        rng.shuffle(part)
    return out


def run_one(task: str, config: str, split: str, seed: int, threads: int, sizes: dict | None = None) -> dict:
    import torch

    from graft import data, recipe
    from graft.train import evaluate
    from graft.train.monitor import peak_memory_mb

    spec = {**TASKS[task], **(sizes or {})}
    rows = splits(task, spec)
    options = {"model": spec["model"], "epochs": spec["epochs"], "max_length": spec["max_length"],
               "task": "classification", "seed": seed, "progress": False, "threads": threads,
               **CONFIGS[config]}
    if options.get("targets") == "qv":  # query and value projections, by the model's own names
        options["targets"] = "query,value" if task == "sst2" else "q_proj,v_proj"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows["train"]))
        job, cfg = recipe.split_options({**options, "data": str(path), "out_dir": str(Path(tmp) / "out")})
        t0 = time.perf_counter()
        model, tok, result = recipe.run(job, cfg)
        seconds = time.perf_counter() - t0
        torch.set_num_threads(threads)
        settings = json.loads((Path(tmp) / "out" / "job.json").read_text())
        label_map, autocast = settings["label_map"], settings["train"]["autocast"]  # --dtype auto's choice
        collate = recipe.make_collate(model, tok, job.max_length, packed=False)
        metrics = {}
        for part in dict.fromkeys((split, "val", "test")):  # the asked split first; both are recorded
            scored = data.tokenize(data.read(rows[part]), tok, format="classification",
                                   max_length=job.max_length, label_map=label_map)
            metrics[part] = evaluate(model, scored, collate, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"task": task, "config": config, "split": split, "seed": seed, "options": CONFIGS[config],
            "epochs": spec["epochs"], "autocast": autocast,
            "accuracy": metrics[split]["eval_accuracy"], "loss": metrics[split]["eval_loss"],
            "val_accuracy": metrics["val"]["eval_accuracy"], "test_accuracy": metrics["test"]["eval_accuracy"],
            "steps": result.steps,
            "train_rows": len(rows["train"]), "scored_rows": len(rows[split]), "trainable": trainable,
            "train_s": round(seconds, 1), "peak_rss_mb": round(peak_memory_mb()["peak_rss_mb"]),
            "load_average": round(os.getloadavg()[0], 1)}


def launch(task: str, config: str, split: str, seed: int, threads: int, out: Path, sizes: dict) -> dict:
    cmd = [sys.executable, __file__, "child", "--task", task, "--configs", config, "--split", split,
           "--seed", str(seed), "--threads", str(threads), "--sizes", json.dumps(sizes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-3:]
        result = {"task": task, "config": config, "split": split, "seed": seed, "failed": " | ".join(tail)}
    else:
        result = json.loads(line[-1][7:])
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return result


def table(path: Path) -> None:
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for task in TASKS:
        for split in ("val", "test"):
            done = [r for r in results if r["task"] == task and r["split"] == split and "accuracy" in r]
            for budget in sorted({(r["train_rows"], r["epochs"]) for r in done}):
                rows = [r for r in done if (r["train_rows"], r["epochs"]) == budget]
                print(f"\n{task} ({TASKS[task]['model']}), scored on {split} ({rows[0]['scored_rows']} rows), "
                      f"{budget[0]} train rows, {budget[1]} epochs\n")
                other = "test" if split == "val" else "val"
                print(f"| config | options | {split} accuracy | {split} loss | {other} accuracy | trainable | steps "
                      "| train s | peak RSS |")
                print("|---|---|---|---|---|---|---|---|---|")
                for r in sorted(rows, key=lambda r: -r["accuracy"]):
                    opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
                    seen = r.get(f"{other}_accuracy")
                    print(f"| {r['config']} (seed {r['seed']}) | {opts} | {100 * r['accuracy']:.1f}% | "
                          f"{r['loss']:.4f} | {'-' if seen is None else f'{100 * seen:.1f}%'} | {r['trainable']:,} | "
                          f"{r['steps']} | {r['train_s']:.0f} | {r['peak_rss_mb']:,} MB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["grid", "check", "table", "child"])
    ap.add_argument("--task", choices=list(TASKS), default="sst2")
    ap.add_argument("--configs", help="comma-separated configs (grid: default all LoRA ones + full sweep)")
    ap.add_argument("--split", choices=["val", "test"], default="val")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="0", help="check: comma-separated seeds")
    ap.add_argument("--full", default=None, help="check: the full fine-tuning config (default: best on val)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", type=int, help="train rows (CLINC: per intent) instead of the task's default")
    ap.add_argument("--epochs", type=int, help="epochs instead of the task's default")
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.stage == "child":
        print("RESULT " + json.dumps(run_one(args.task, args.configs, args.split, args.seed, args.threads,
                                             json.loads(args.sizes or "{}"))), flush=True)
        return
    if args.stage == "table":
        table(args.results)
        return
    if not SHARED.exists():
        print(f"skipped: {SHARED} not found (the benchmark reads ../shared/data)")
        return
    sizes = {k: v for k, v in (("train", args.train), ("epochs", args.epochs)) if v is not None}
    if args.stage == "grid":
        names = args.configs.split(",") if args.configs else list(CONFIGS)
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            raise SystemExit(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
        for name in names:
            launch(args.task, name, "val", args.seed, args.threads, args.results, sizes)
        return
    full = args.full
    if full is None:  # the best full fine-tuning learning rate on val, from the grid's results
        done = [json.loads(x) for x in args.results.read_text().splitlines()] if args.results.exists() else []
        swept = [r for r in done if r["task"] == args.task and r["split"] == "val" and "accuracy" in r
                 and r["config"].startswith("full")]
        if not swept:
            raise SystemExit("check needs --full CONFIG or a grid run of the full-* configs on val first")
        full = max(swept, key=lambda r: r["accuracy"])["config"]
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in ("default", full):
            launch(args.task, name, "test", seed, args.threads, args.results, sizes)


if __name__ == "__main__":
    main()
