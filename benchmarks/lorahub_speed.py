"""LoraHub search speed on SmolLM2-135M-Instruct (issue 18, acceptance 4).

A search over 20 LoRAs (r=8, alpha=16, q_proj + v_proj; random non-zero A and B, which cost the
same as trained ones), 40 evaluations of 5 examples, next to one plain forward of the same 5
examples. The examples are the first rows of a task of ``../shared/data/tasks`` rendered as the
benchmarks render them (``tasks.messages`` + the chat template), so their lengths are realistic.

Printed: the whole search (target: under 2 minutes on the 2-core CPU), its setup, the time per
evaluation (mean and median; an evaluation = writing w into the composed factors + one forward of
the 5 examples + the optimizer's ask/tell), and the median of repeated forwards of the same batch
with (i) the adapters disabled (the plain base model), (ii) one ordinary LoRA of the same shape.

Usage:
    .venv/bin/python benchmarks/lorahub_speed.py
    .venv/bin/python benchmarks/lorahub_speed.py --task ii_sentiment --loras 20 --budget 40 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import graft
from graft import models
from graft.compose import tasks
from graft.compose.lorahub import example_batch, example_loss
from graft.core import adapter_parameters

TASKS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tasks" / "index.json"


def examples(index: Path, task_name: str, n: int, tokenizer) -> list[tuple[str, str]]:
    task = next((t for t in tasks.read_tasks(index) if t.name == task_name), None)
    if task is None:
        raise SystemExit(f"task {task_name!r} is not in {index}")
    rows = task.rows()[:n]
    return [(tasks.prompt_text(tokenizer, tasks.messages(task, row)), row["output"]) for row in rows]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=Path, default=TASKS)
    p.add_argument("--task", default="bigbench_implicatures")
    p.add_argument("--examples", type=int, default=5)
    p.add_argument("--loras", type=int, default=20)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--form", default="factors", choices=["factors", "cat"])
    p.add_argument("--repeats", type=int, default=7, help="forwards timed for the plain-forward medians")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = models.load("smollm2-135m")
    load_s = time.perf_counter() - t0
    pairs = examples(args.tasks.resolve(), args.task, args.examples, tok)
    names = [f"lora{i}" for i in range(args.loras)]
    g = torch.Generator().manual_seed(0)
    for n in names:
        graft.attach(model, graft.LoRA(r=args.r, alpha=2 * args.r, targets=["q_proj", "v_proj"]), n, activate=False)
        with torch.no_grad():
            for param in adapter_parameters(model, n).values():
                param.copy_(torch.randn(param.shape, generator=g) * 0.02)
                param.requires_grad_(False)
    batch = example_batch(tok, pairs)

    with graft.disabled(model):
        plain = median_time(lambda: example_loss(model, batch), args.repeats)
    graft.activate(model, names[0])
    one_lora = median_time(lambda: example_loss(model, batch), args.repeats)

    result = graft.lorahub(model, tok, names, pairs, budget=args.budget, form=args.form, seed=0)
    per_eval = result.eval_seconds
    mean_eval, median_eval = statistics.mean(per_eval), statistics.median(per_eval)
    total = result.setup_seconds + result.search_seconds

    rows, width = batch.input_ids.shape
    print(f"SmolLM2-135M-Instruct, {args.loras} LoRAs r={args.r} q_proj,v_proj, form={args.form}, "
          f"{rows} examples of {args.task} ({batch.tokens} tokens, padded width {width}, loss on the last "
          f"{batch.keep - 1} positions), torch threads {args.threads}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"model load: {load_s:.1f} s (not part of the search)")
    print()
    print("| what | time |")
    print("|---|---|")
    print(f"| LoraHub search, {args.budget} evaluations (setup + search) | {total:.1f} s |")
    print(f"| setup (tokenise, stack the {args.loras} adapters' factors) | {result.setup_seconds * 1000:.0f} ms |")
    print(f"| per evaluation, mean / median | {mean_eval * 1000:.0f} / {median_eval * 1000:.0f} ms |")
    print(f"| plain forward of the {rows} examples (adapters disabled), median of {args.repeats} | "
          f"{plain * 1000:.0f} ms |")
    print(f"| forward with one ordinary LoRA, median of {args.repeats} | {one_lora * 1000:.0f} ms |")
    print(f"| evaluation / plain forward (medians) | {median_eval / plain:.2f}x |")
    print()
    print(f"loss at w=0 {result.start_loss:.4f}, at the weights found {result.loss:.4f}; "
          f"target (< 120 s) {'met' if total < 120 else 'MISSED'}")


if __name__ == "__main__":
    main()
