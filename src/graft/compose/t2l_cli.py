"""``graft t2l train`` and ``graft t2l generate``: the command line of Text-to-LoRA."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

EXAMPLE = ("graft t2l train --model smollm2-135m --tasks ../shared/data/tasks/index.json --mode sft --steps 200 "
           "--out t2l/\n  graft t2l train --model smollm2-135m --tasks ../shared/data/tasks/index.json --mode recon "
           "--library lib/ --out t2l-recon/\n"
           '  graft t2l generate --hypernet t2l/ --description "Translate English to Spanish." --out adapters/es')


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="t2l_verb", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train a hypernetwork (sft: through the base on the tasks' rows; recon: regress "
                                     "a library of per-task LoRAs)")
    t.add_argument("--model", required=True, help="the base model (built-in name, transformers dir or .gguf)")
    t.add_argument("--tasks", required=True, help="a task collection's index.json")
    t.add_argument("--mode", choices=["sft", "recon"], default="sft")
    t.add_argument("--library", help="recon: an adapter library (manifest.json of {name, path, description})")
    t.add_argument("--out", required=True, help="output directory (hypernetwork, metrics.jsonl, loss.png, checkpoints)")
    t.add_argument("--exclude", default="", help="comma-separated task names to leave out of training "
                                                 "('benchmark': graft.compose.tasks.BENCHMARK_HELDOUT)")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--tasks-per-batch", type=int, default=4)
    t.add_argument("--rows-per-task", type=int, default=2)
    t.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 recon, 2.5e-4 sft)")
    t.add_argument("--max-length", type=int, default=256)
    t.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (0: never)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a checkpoint")
    t.add_argument("--r", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--no-rslora", action="store_true", help="scale by alpha/r instead of alpha/sqrt(r)")
    t.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module types")
    t.add_argument("--latent", type=int, default=128)
    t.add_argument("--head-in", type=int, default=512)
    t.add_argument("--blocks", type=int, default=2)
    t.add_argument("--embedder", default="minilm", help="sentence embedder: minilm or a local model directory")

    g = sub.add_parser("generate", help="write the LoRA a description asks for, in PEFT format")
    g.add_argument("--hypernet", required=True, help="a trained hypernetwork directory")
    g.add_argument("--description", required=True)
    g.add_argument("--out", required=True, help="the adapter directory to write")
    g.add_argument("--model", help="check the hypernetwork against this base model first")


def run(args: argparse.Namespace) -> int:
    return cmd_train(args) if args.t2l_verb == "train" else cmd_generate(args)


def cmd_train(args: argparse.Namespace) -> int:
    from graft import models
    from graft.compose import tasks as task_lib
    from graft.compose.t2l import T2LConfig, TextToLoRA, is_hypernet
    from graft.compose.t2l_train import T2LTrainConfig, train

    config = T2LConfig(r=args.r, alpha=args.alpha, rslora=not args.no_rslora,
                       targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()), latent=args.latent,
                       head_in=args.head_in, blocks=args.blocks, embedder=args.embedder)
    train_config = T2LTrainConfig(mode=args.mode, steps=args.steps, tasks_per_batch=args.tasks_per_batch,
                                  rows_per_task=args.rows_per_task, lr=args.lr, max_length=args.max_length,
                                  save_every=args.save_every, seed=args.seed)
    if args.mode == "recon" and not args.library:
        raise ValueError("--mode recon needs --library DIR (a library of per-task LoRAs)")
    collection = task_lib.read_tasks(args.tasks)
    excluded = set(task_lib.BENCHMARK_HELDOUT) if args.exclude == "benchmark" else \
        {x.strip() for x in args.exclude.split(",") if x.strip()}
    unknown = excluded - {t.name for t in collection}
    if unknown:
        raise ValueError(f"--exclude names tasks not in {args.tasks}: {sorted(unknown)[:5]}")
    chosen = [t for t in collection if t.name not in excluded]
    model, tokenizer = models.load(args.model)
    net = TextToLoRA.for_model(model, config, seed=args.seed)
    if is_hypernet(args.out) and not args.no_resume and not (Path(args.out) / "checkpoints").is_dir():
        print(f"note: {args.out} holds a finished hypernetwork; it is overwritten")
    print(f"training a Text-to-LoRA hypernetwork ({args.mode}) on {len(chosen)} tasks, "
          f"{sum(p.numel() for p in net.parameters()):,} parameters", flush=True)
    result = train(net, chosen, train_config, model=model if args.mode == "sft" else None,
                   tokenizer=tokenizer if args.mode == "sft" else None, library=args.library, out_dir=args.out,
                   resume=not args.no_resume)
    print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, {result.seconds:.0f}s -> {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from graft.compose.t2l import TextToLoRA

    model = None
    if args.model:
        from graft import models

        model, _ = models.load(args.model)
    net = TextToLoRA.load(args.hypernet, model=model)
    net.embed(["warm-up"])  # load the sentence encoder outside the timing
    start = time.perf_counter()
    factors = net.generate_one(args.description)
    seconds = time.perf_counter() - start
    out = net.write_peft(args.description, args.out, factors)
    print(f"generated a rank-{net.config.r} LoRA on {len(factors)} modules in {seconds * 1000:.0f} ms -> {out}")
    return 0
