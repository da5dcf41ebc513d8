"""Every method on real data, side by side with full fine-tuning and LoRA, in one table.

    .venv/bin/python benchmarks/methods.py                    # both tasks, every method
    .venv/bin/python benchmarks/methods.py --task sst2 --only lora,ia3

sst2:  all-MiniLM-L6-v2 with a classification head on SST-2 sentences (../shared/data/sst2):
       held-out accuracy (majority class shown for scale) and held-out loss.
gsm8k: SmolLM2-135M-Instruct on GSM8K problems in the CoT format (../shared/data/gsm8k):
       held-out loss before and after.
Per method: trainable parameters, adapter file size, mean time per optimizer step, peak RSS.
Each (task, method) runs in its own subprocess, so peak RSS is its own; the learning rate is
each method's usual one (a method trained at another method's rate would be judged unfairly),
everything else (data, steps, batch, seed) is shared. A method that cannot apply to a model (BitFit
on bias-free SmolLM2, a probe on a generative model) is listed with the reason graft gives.
Run it on an otherwise idle machine: two processes sharing two cores distort every time.
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
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# name -> (graft class, kwargs, learning rate). Rates follow each method's paper / reference defaults
# scaled to these short runs: prompt methods need large rates, full fine-tuning small ones.
METHODS = {
    "full": (None, {}, {"sst2": 5e-5, "gsm8k": 2e-5}),
    "lora": ("LoRA", {"r": 8, "alpha": 16, "targets": "all-linear"}, {"sst2": 1e-3, "gsm8k": 3e-4}),
    "ia3": ("IA3", {}, {"sst2": 5e-3, "gsm8k": 3e-3}),
    "adapter-pfeiffer": ("Adapter", {"placement": "pfeiffer", "reduction_factor": 16}, {"sst2": 1e-3, "gsm8k": 3e-4}),
    "adapter-houlsby": ("Adapter", {"placement": "houlsby", "reduction_factor": 16}, {"sst2": 1e-3, "gsm8k": 3e-4}),
    "adapter-parallel": ("Adapter", {"placement": "parallel", "reduction_factor": 16}, {"sst2": 1e-3, "gsm8k": 3e-4}),
    "prompt-tuning": ("PromptTuning", {"num_virtual_tokens": 20, "init": "vocab"}, {"sst2": 3e-2, "gsm8k": 3e-2}),
    "p-tuning": ("PTuning", {"num_virtual_tokens": 20}, {"sst2": 1e-3, "gsm8k": 1e-3}),
    "prefix-tuning": ("PrefixTuning", {"num_virtual_tokens": 20}, {"sst2": 1e-2, "gsm8k": 1e-2}),
    "bitfit": ("BitFit", {}, {"sst2": 1e-3, "gsm8k": 1e-3}),
    "child-tuning-f": ("ChildTuning", {"mode": "F", "p": 0.3}, {"sst2": 5e-5, "gsm8k": 2e-5}),
    "child-tuning-d": ("ChildTuning", {"mode": "D", "p": 0.3, "fisher_batches": 8}, {"sst2": 5e-5, "gsm8k": 2e-5}),
    "probe": ("Probe", {"pooling": "mean"}, {"sst2": 1e-2, "gsm8k": 1e-2}),
}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))


def sst2_rows(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    lines = (SHARED / "sst2" / "train.tsv").read_text().splitlines()[1:]
    rows = [{"text": t.strip(), "label": int(lab)} for t, lab in (line.rsplit("\t", 1) for line in lines)]
    random.Random(seed).shuffle(rows)
    return rows[:n_train], rows[n_train:n_train + n_eval]


def gsm8k_rows(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()]
    random.Random(seed).shuffle(rows)
    return rows[:n_train], rows[n_train:n_train + n_eval]


def run_one(task: str, method: str, args: argparse.Namespace) -> dict:
    import torch

    import graft
    from graft import data, models, recipe
    from graft.train import TrainConfig, evaluate, train
    from graft.train.monitor import peak_memory_mb

    torch.set_num_threads(2)
    cls_name, kwargs, lrs = METHODS[method]
    if task == "sst2":
        train_rows, eval_rows = sst2_rows(args.sst2_train, args.sst2_eval, args.seed)
        labels = data.label_map(data.read(train_rows))
        model, tok = models.load("minilm", task="sequence-classification", num_labels=len(labels))
        kw = {"format": "classification", "max_length": 128, "label_map": labels}
        cfg_kw = {"task": "classification", "epochs": 1, "batch_size": 32}
        max_length, packed = 128, False
    else:
        train_rows, eval_rows = gsm8k_rows(args.gsm8k_train, args.gsm8k_eval, args.seed)
        model, tok = models.load("smollm2-135m")
        kw = {"format": "cot", "max_length": 384}
        cfg_kw = {"epochs": 1, "batch_size": 4}
        max_length, packed = 384, True
    train_ex, eval_ex = data.tokenize(train_rows, tok, **kw), data.tokenize(eval_rows, tok, **kw)
    try:
        if cls_name is None:
            model.requires_grad_(True)
        else:
            graft.attach(model, getattr(graft, cls_name)(**kwargs))
    except (ValueError, TypeError) as e:
        return {"task": task, "method": method, "skipped": str(e).split(";")[0]}
    method_obj = graft.core.state_of(model).methods["default"] if cls_name else None
    packed = packed and not getattr(method_obj, "input_side", False)
    collate = recipe.make_collate(model, tok, max_length, packed=packed)
    cfg = TrainConfig(lr=lrs[task], warmup_ratio=0.1, seed=args.seed, progress=False, **cfg_kw)
    before = evaluate(model, eval_ex, collate, cfg)
    t0 = time.perf_counter()
    result = train(model, train_ex, collate, cfg)
    seconds = time.perf_counter() - t0
    after = evaluate(model, eval_ex, collate, cfg)
    with tempfile.TemporaryDirectory() as d:
        if cls_name is None:
            from safetensors.torch import save_model
            save_model(model, os.path.join(d, "model.safetensors"))
        else:
            graft.save(model, d)
        size = dir_bytes(Path(d))
    out = {"task": task, "method": method, "trainable": graft.report(model).trainable if cls_name else
           sum(p.numel() for p in model.parameters()), "file_bytes": size, "steps": result.steps,
           "s_per_step": seconds / max(result.steps, 1), "peak_rss_mb": peak_memory_mb()["peak_rss_mb"],
           "eval_loss_before": before["eval_loss"], "eval_loss": after["eval_loss"]}
    if task == "sst2":
        out["accuracy"] = after["eval_accuracy"]
        out["majority"] = max(sum(r["label"] == c for r in eval_rows) for c in (0, 1)) / len(eval_rows)
    return out


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["sst2", "gsm8k", "both"], default="both")
    ap.add_argument("--only", help="comma-separated method names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sst2-train", type=int, default=2048)
    ap.add_argument("--sst2-eval", type=int, default=500)
    ap.add_argument("--gsm8k-train", type=int, default=48)
    ap.add_argument("--gsm8k-eval", type=int, default=24)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        task, method = args.child.split(":")
        print("RESULT " + json.dumps(run_one(task, method, args)), flush=True)
        return
    if not SHARED.exists():
        print(f"skipped: {SHARED} not found (the benchmark reads ../shared/data)")
        return
    tasks = ["sst2", "gsm8k"] if args.task == "both" else [args.task]
    methods = args.only.split(",") if args.only else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    results = []
    for task in tasks:
        for method in methods:
            cmd = [sys.executable, __file__, "--child", f"{task}:{method}", "--seed", str(args.seed),
                   "--sst2-train", str(args.sst2_train), "--sst2-eval", str(args.sst2_eval),
                   "--gsm8k-train", str(args.gsm8k_train), "--gsm8k-eval", str(args.gsm8k_eval)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"task": task, "method": method, "failed": err})
            else:
                results.append(json.loads(line[-1][7:]))
            print(json.dumps(results[-1]), flush=True)
    for task in tasks:
        rows = [r for r in results if r["task"] == task]
        ok = [r for r in rows if "eval_loss" in r]
        if task == "sst2":
            maj = ok[0]["majority"] if ok else float("nan")
            print(f"\nSST-2 (MiniLM, {args.sst2_train} train / {args.sst2_eval} held out, 1 epoch, batch 32; "
                  f"majority class {100 * maj:.1f}%)\n")
            print("| method | held-out accuracy | held-out loss | trainable params | adapter file | s / step | peak RSS |")
            print("|---|---|---|---|---|---|---|")
        else:
            print(f"\nGSM8K CoT (SmolLM2-135M-Instruct, {args.gsm8k_train} train / {args.gsm8k_eval} held out, "
                  "1 epoch, batch 4)\n")
            print("| method | held-out loss (before -> after) | trainable params | adapter file | s / step | peak RSS |")
            print("|---|---|---|---|---|---|")
        for r in rows:
            if "eval_loss" not in r:
                why = r.get("skipped") or f"failed: {r.get('failed')}"
                print(f"| {r['method']} | n/a: {why} |" + " |" * (5 if task == "sst2" else 4))
                continue
            common = (f"{r['trainable']:,} | {human(r['file_bytes'])} | {r['s_per_step']:.2f} | "
                      f"{r['peak_rss_mb']:,.0f} MB |")
            if task == "sst2":
                print(f"| {r['method']} | {100 * r['accuracy']:.1f}% | {r['eval_loss']:.4f} | {common}")
            else:
                print(f"| {r['method']} | {r['eval_loss_before']:.4f} -> {r['eval_loss']:.4f} | {common}")


if __name__ == "__main__":
    main()
