"""graft's trainer vs peft + transformers Trainer on the same model, data, LoRA config and seed.

    .venv/bin/python benchmarks/train.py                 # both, side by side, prints ratios
    .venv/bin/python benchmarks/train.py --examples 48   # quicker
    .venv/bin/python benchmarks/train.py --examples 48 --repeat 3   # medians of 3 interleaved rounds

Model SmolLM2-135M-Instruct (fp32, CPU; ``--device cuda`` for a GPU, ``--model DIR`` for another
model directory), data: GSM8K train problems from ../shared/data/gsm8k in
the Alpaca template (instruction = question, output = worked answer), LoRA r=16 alpha=32
all-linear, batch 8, max length 512, AdamW lr 2e-4 with 10% warmup then cosine, 1 epoch.
Each implementation runs in its own subprocess so peak RSS is its own; the reference is the usual
padded, unpacked recipe (right padding, full logits), in fp32. graft runs with its defaults in fp32:
packing and selective logits (the headline row); then with bf16 autocast where the CPU has
AVX512-BF16/AMX (graft's ``--dtype auto`` there) and the reference with bf16 autocast too; ``--ablate``
also runs graft with gradient checkpointing and with each technique alone.
Run it on an otherwise idle machine: two processes sharing two cores distort every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def rows(n: int, path: Path = DATA) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out.append({"instruction": r["question"], "input": "", "output": r["answer"]})
            if len(out) == n:
                break
    return out


def step_args(ap: argparse.ArgumentParser) -> None:
    """The training-step settings the builders read (this script's defaults), for every script that builds them."""
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m", help="built-in name or transformers directory")
    ap.add_argument("--data", type=Path, default=DATA, help="GSM8K train.jsonl")


def run_child(cmd: list[str], what: str) -> dict:
    """Run one measured child process (its own peak RSS) and return the figures of its ``RESULT`` line;
    print its output's tail and exit when it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"{what} failed")
    return json.loads(line[-1][len("RESULT "):])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def encode_reference(tok, row: dict, max_length: int) -> dict:
    """Stanford-Alpaca style: source and target tokenised separately, source masked with -100."""
    src = tok(ALPACA.format(instruction=row["instruction"]), add_special_tokens=False)["input_ids"]
    tgt = tok(row["output"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = (src + tgt)[:max_length]
    labels = ([-100] * len(src) + tgt)[:max_length]
    return {"input_ids": ids, "labels": labels}


def build_reference(args: argparse.Namespace, bf16: bool = False) -> tuple:
    """The reference recipe, untrained: (Trainer, encoded rows, collate). Also used by profile_step.py."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from graft import models

    path = models.resolve(args.model)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    data = [encode_reference(tok, r, args.max_length) for r in rows(args.examples, args.data)]
    pad = tok.pad_token_id

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.tensor([b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch])
        lab = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
        mask = torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch])
        return {"input_ids": ids, "labels": lab, "attention_mask": mask}

    targs = TrainingArguments(
        output_dir=str(Path(args.tmp) / "ref"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.1 * math.ceil(len(data) / args.batch_size)), weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=args.device == "cpu", seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0, remove_unused_columns=False, max_grad_norm=1.0, bf16=bf16,
    )
    return Trainer(model=model, args=targs, train_dataset=data, data_collator=collate), data, collate


def run_reference(args: argparse.Namespace, bf16: bool = False) -> dict:
    import torch

    torch.set_num_threads(2)
    trainer, data, _ = build_reference(args, bf16)
    supervised = sum(sum(1 for x in d["labels"][1:] if x != -100) for d in data)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # per-step mean over supervised tokens
    return {"impl": "peft+Trainer" + (" (bf16 autocast)" if bf16 else ""), "seconds": seconds, "supervised_tokens": supervised,
            "sup_tok_per_s": supervised / seconds, "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(args.device),
            "final_loss": sum(losses[-3:]) / len(losses[-3:]), "losses": losses}


def bf16_supported() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_graft(args: argparse.Namespace, *, packing: bool, selective: bool, checkpointing: bool,
                bf16: bool = False) -> tuple:
    """graft's side, untrained: (model with LoRA, tokenised examples, collate, TrainConfig). Also used by
    profile_step.py."""
    import graft
    from graft import data, models, recipe
    from graft.train import TrainConfig

    model, tok = models.load(args.model)
    graft.attach(model, graft.LoRA(r=16, alpha=32, targets="all-linear"))
    model.to(args.device)
    examples = data.tokenize(rows(args.examples, args.data), tok, format="alpaca", max_length=args.max_length)
    collate = recipe.make_collate(model, tok, args.max_length, packed=packing)
    cfg = TrainConfig(lr=args.lr, epochs=1, batch_size=args.batch_size, schedule="cosine", warmup_ratio=0.1,
                      seed=args.seed, selective_logits=selective, gradient_checkpointing=checkpointing,
                      max_grad_norm=1.0, progress=False, autocast="bf16" if bf16 else None)
    return model, examples, collate, cfg


def run_graft(args: argparse.Namespace, *, packing: bool, selective: bool, checkpointing: bool,
              bf16: bool = False) -> dict:
    import torch

    from graft import data
    from graft.train import train

    torch.set_num_threads(2)
    model, examples, collate, cfg = build_graft(args, packing=packing, selective=selective,
                                                checkpointing=checkpointing, bf16=bf16)
    t0 = time.perf_counter()
    result = train(model, examples, collate, cfg)
    seconds = time.perf_counter() - t0
    supervised = data.stats(examples).supervised_tokens
    on = [k for k, v in (("packing", packing), ("selective", selective), ("ckpt", checkpointing)) if v]
    name = f"graft ({'+'.join(on) or 'plain'}{', bf16 autocast' if bf16 else ', fp32'})"
    return {"impl": name, "seconds": seconds, "supervised_tokens": supervised, "sup_tok_per_s": supervised / seconds,
            "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(args.device), "final_loss": result.final_loss, "losses": result.losses}


def child(args: argparse.Namespace) -> None:
    if args.child in ("reference", "reference-bf16"):
        out = run_reference(args, bf16=args.child == "reference-bf16")
    else:
        flags = dict(x.split("=") for x in args.child.split(",")[1:])
        out = run_graft(args, **{k: v == "1" for k, v in flags.items()})
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step_args(ap)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--ablate", action="store_true",
                    help="also run graft with gradient checkpointing, and with each technique alone")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every run; the table shows medians")
    ap.add_argument("--json", type=Path, help="write every run's figures and the medians here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/graft-bench-train")
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not args.data.exists():
        print(f"skipped: {args.data} not found (the benchmark reads ../shared/data)")
        return
    bf16 = "1" if args.device == "cuda" or bf16_supported() else "0"
    # Headline: graft's defaults (packing + selective logits, no gradient checkpointing) in fp32 like the
    # reference, then graft's default precision (--dtype auto: bf16 autocast where the hardware has bf16
    # units) against the reference's default (Trainer: fp32), and the reference with bf16 autocast too.
    runs = ["graft,packing=1,selective=1,checkpointing=0,bf16=0", "reference"]
    if bf16 == "1":  # Trainer's bf16=True is CPU autocast
        runs += ["graft,packing=1,selective=1,checkpointing=0,bf16=1", "reference-bf16"]
    if args.ablate:
        runs += ["graft,packing=1,selective=1,checkpointing=1,bf16=0",
                 "graft,packing=0,selective=0,checkpointing=0", "graft,packing=1,selective=0,checkpointing=0",
                 "graft,packing=0,selective=1,checkpointing=0", "graft,packing=0,selective=0,checkpointing=1"]
    rounds: dict[str, list[dict]] = {run: [] for run in runs}
    for i in range(args.repeat):  # whole rounds, so a slow spell of the machine hits every run alike
        for run in runs:
            r = launch(run)
            rounds[run].append(r)
            gpu = f" {r['peak_gpu_mb']:8.0f} MB peak GPU" if r.get("peak_gpu_mb") is not None else ""
            print(f"[{i + 1}/{args.repeat}] {r['impl']:<34} {r['seconds']:8.1f}s {r['sup_tok_per_s']:8.1f} sup tok/s "
                  f"{r['peak_rss_mb']:8.0f} MB peak RSS{gpu}  final loss {r['final_loss']:.4f}", flush=True)
    results = [median_run(rounds[run]) for run in runs]
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"runs": rounds, "median": results}, indent=1) + "\n")


def launch(run: str) -> dict:
    return run_child([sys.executable, __file__, "--child", run] + [a for a in sys.argv[1:] if a != "--ablate"], run)


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput, whole (its time, RSS and loss belong together), with the spread."""
    ranked = sorted(runs, key=lambda r: r["sup_tok_per_s"])
    out = dict(ranked[len(ranked) // 2])
    out["repeats"] = len(runs)
    out["sup_tok_per_s_range"] = [ranked[0]["sup_tok_per_s"], ranked[-1]["sup_tok_per_s"]]
    out["peak_rss_mb_range"] = [min(r["peak_rss_mb"] for r in runs), max(r["peak_rss_mb"] for r in runs)]
    return out


def report(results: list[dict], args: argparse.Namespace) -> None:
    g, ref = results[0], results[1]
    cuda = args.device == "cuda"
    if args.repeat > 1:
        print(f"\n{args.repeat} runs each; each row is the run of median throughput (range in the JSON)")
    print("| run | time (s) | supervised tok/s | peak RSS (MB) |" + (" peak GPU (MB) |" if cuda else "")
          + " final loss | vs reference fp32 |\n|---|---|---|---|" + ("---|" if cuda else "") + "---|---|")
    for r in results:
        gpu = f" {r['peak_gpu_mb']:.0f} |" if cuda else ""
        print(f"| {r['impl']} | {r['seconds']:.1f} | {r['sup_tok_per_s']:.1f} | {r['peak_rss_mb']:.0f} |{gpu} "
              f"{r['final_loss']:.4f} | {r['sup_tok_per_s'] / ref['sup_tok_per_s']:.2f}x, "
              f"RSS {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x |")

    def loss(r: dict) -> str:
        return f"{100 * (r['final_loss'] - ref['final_loss']) / ref['final_loss']:+.2f}%"

    print(f"\nfp32, graft / reference: throughput {g['sup_tok_per_s'] / ref['sup_tok_per_s']:.2f}x (target >= 1.6x), "
          f"peak RSS {g['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x (target <= 0.6x), loss {loss(g)} (target within 1%)")
    if cuda:
        print(f"peak GPU memory graft/reference:  {g['peak_gpu_mb'] / ref['peak_gpu_mb']:.2f}x")
    if len(results) > 3 and "bf16" in results[2]["impl"]:
        gb, rb = results[2], results[3]
        print(f"defaults, graft --dtype auto ({gb['impl']}) / reference's default (fp32): throughput "
              f"{gb['sup_tok_per_s'] / ref['sup_tok_per_s']:.2f}x (target >= 2.0x), "
              f"peak RSS {gb['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x, loss {loss(gb)}")
        print(f"bf16 autocast on both sides: throughput {gb['sup_tok_per_s'] / rb['sup_tok_per_s']:.2f}x, "
              f"peak RSS {gb['peak_rss_mb'] / rb['peak_rss_mb']:.2f}x"
              + (f", peak GPU {gb['peak_gpu_mb'] / rb['peak_gpu_mb']:.2f}x" if cuda else ""))

if __name__ == "__main__":
    main()
