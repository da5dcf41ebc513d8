"""LoraHub search speed on SmolLM2-135M-Instruct (issue 18, acceptance 4).

A search over 20 LoRAs (r=8, alpha=16, q_proj + v_proj; random non-zero A and B, which cost the
same as trained ones), 40 evaluations of 5 examples, next to one plain forward of the same 5
examples. The examples are the first rows of a task of ``../shared/data/tasks`` rendered as the
benchmarks render them (``tasks.messages`` + the chat template), so their lengths are realistic.

Printed: the whole search (target: under 2 minutes on the 2-core CPU), its setup, the time per
evaluation (mean and median; an evaluation = writing w into the composed factors + one forward of
the 5 examples + the optimizer's ask/tell), and the median of repeated forwards of the same batch
with the adapters disabled (the plain base model), alternating with evaluations so that both see
the same machine load (the median of the paired ratios is the figure to read on a busy machine).

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
from statistics import median

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


def median_time(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``fn`` after a warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def say(text: str) -> None:
    print(text, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=Path, default=TASKS)
    p.add_argument("--task", default="bigbench_implicatures")
    p.add_argument("--examples", type=int, default=5)
    p.add_argument("--loras", type=int, default=20)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--form", default="factors", choices=["factors", "cat"])
    p.add_argument("--repeats", type=int, default=5, help="forwards timed for the plain-forward medians")
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
    rows, width = batch.input_ids.shape
    say(f"SmolLM2-135M-Instruct (load {load_s:.1f} s), {args.loras} LoRAs r={args.r} q_proj,v_proj, "
        f"form={args.form}, {rows} examples of {args.task} ({batch.tokens} tokens, padded width {width}, "
        f"loss on the last {batch.keep - 1} positions), torch threads {args.threads}")

    c0 = time.process_time()
    result = graft.lorahub(model, tok, names, pairs, budget=args.budget, form=args.form, seed=0)
    cpu_total = time.process_time() - c0
    evals = args.budget + 2  # the budget, the loss at w = 0, and the loss at the weights found
    cpu_eval = (cpu_total - result.setup_seconds) / evals
    per_eval = result.eval_seconds
    mean_eval, median_eval = statistics.mean(per_eval), statistics.median(per_eval)
    total = result.setup_seconds + result.search_seconds

    say(f"search done (load average {load()}); now {args.repeats} interleaved pairs: plain forward, evaluation")
    plain, plain_cpu, ev, ev_cpu = paired(model, batch, result, args.repeats)
    say(f"(load average at the end {load()})")
    say("")
    say("| what | wall | CPU (process) |")
    say("|---|---|---|")
    say(f"| LoraHub search, {args.budget} evaluations (setup + search) | {total:.1f} s | {cpu_total:.1f} s |")
    say(f"| setup (tokenise, stack the {args.loras} adapters' factors) | {result.setup_seconds * 1000:.0f} ms | |")
    say(f"| per evaluation, mean / median | {mean_eval * 1000:.0f} / {median_eval * 1000:.0f} ms | "
        f"{cpu_eval * 1000:.0f} ms (mean) |")
    say(f"| interleaved: plain forward of the {rows} examples (adapters disabled), median of {args.repeats} | "
        f"{median(plain) * 1000:.0f} ms | {median(plain_cpu) * 1000:.0f} ms |")
    say(f"| interleaved: evaluation (write w into the factors + forward), median of {args.repeats} | "
        f"{median(ev) * 1000:.0f} ms | {median(ev_cpu) * 1000:.0f} ms |")
    say(f"| evaluation / plain forward, median of the {args.repeats} paired ratios | "
        f"{median([e / p for e, p in zip(ev, plain)]):.2f}x | {median([e / p for e, p in zip(ev_cpu, plain_cpu)]):.2f}x |")
    say("")
    say(f"loss at w=0 {result.start_loss:.4f}, at the weights found {result.loss:.4f}; "
        f"target (< 120 s wall) {'met' if total < 120 else 'MISSED'}; CPU seconds / {args.threads} threads = "
        f"{cpu_total / args.threads:.1f} s (the wall time an idle {args.threads}-core machine would take)")


def paired(model, batch, result, repeats: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Wall and CPU seconds of plain forwards and of evaluations, alternating so both see the same load.

    An evaluation here is what one step of the search does: a new w written into the composed adapter's
    factors (``_Swap.write``, rebuilt on the adapter the search left) and the forward with it.
    """
    from graft.compose.lorahub import _Swap

    swap = _Swap(model, result.name, list(result.adapters), "factors")
    w = torch.tensor(result.weights, dtype=torch.float32)
    out: tuple[list[float], ...] = ([], [], [], [])
    graft.activate(model, result.name)
    for i in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        with graft.disabled(model):
            example_loss(model, batch)
        t1, c1 = time.perf_counter(), time.process_time()
        swap.write(w * (1 + 0.01 * i))
        example_loss(model, batch)
        t2, c2 = time.perf_counter(), time.process_time()
        if i:  # the first pair warms up
            for seq, value in zip(out, (t1 - t0, c1 - c0, t2 - t1, c2 - c1)):
                seq.append(value)
    return out


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
