"""Text-to-LoRA on SmolLM2-135M-Instruct: adapters written from descriptions, against the baselines.

Held out: ``graft.compose.tasks.BENCHMARK_HELDOUT`` (10 tasks; 6 with a sibling among the training
tasks). Trained on the other 35. Reported on each held-out task's held-out rows (``split_rows``,
the first ``--rows`` of them), prompted with the task's description (which the training never saw):

- base zero-shot; base few-shot ICL (``--shots`` training rows as earlier turns);
- one multi-task LoRA trained on all training tasks' rows (the paper's baseline), with the same
  data budget as T2L SFT (steps x tasks per batch x rows per task, the same sampler);
- T2L trained by SFT, and T2L trained by reconstruction of the library's per-task LoRAs;
- each held-out task's own library LoRA (the ceiling).

Also the training tasks with wordings training never saw: half of each task's ``alt_descriptions``
and, for the SNI tasks with ``descriptions/lol_*.metadata.yaml``, the wordings after the first 100
are held out of training; a T2L adapter generated from such a wording is compared with one from the
task's own description.

Scoring is ``graft.compose.tasks.evaluate`` (the compose benchmark's): options by log-likelihood,
free-form rows by greedy decoding and SQuAD-normalised exact match.

Run (about 40 minutes on 2 loaded CPU cores)::

    python benchmarks/t2l.py --library /work/artifacts/lib-smollm2 --out benchmarks/results/t2l
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import yaml

import graft
from graft import models
from graft.compose import t2l_train
from graft.compose import tasks as task_lib
from graft.compose.t2l import T2LConfig, TextToLoRA, read_library, text_to_lora

TASKS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tasks" / "index.json"


def wordings(tasks: list[task_lib.Task], index: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(training wordings, unseen wordings) per task."""
    lol = {}
    for f in sorted((index.parent / "descriptions").glob("lol_*.metadata.yaml")):
        number = f.name.split("_")[1].split(".")[0]
        lol[number] = [d for d in yaml.safe_load(f.read_text()).get("descriptions", []) if isinstance(d, str)]
    seen, unseen = {}, {}
    for t in tasks:
        half = len(t.alt_descriptions) // 2
        extra = next((v for k, v in lol.items() if t.name.startswith(f"sni_task{k}_")), [])
        seen[t.name] = [t.description, *t.alt_descriptions[:half], *extra[:100]]
        unseen[t.name] = [*t.alt_descriptions[half:], *extra[100:]]
    return seen, unseen


def sample_batch(rng, names, words, rows, by_name, tok, args):
    chosen = rng.sample(names, min(args.tasks_per_batch, len(names)))
    encoded, descs = [], []
    for name in chosen:
        for _ in range(args.rows_per_task):
            row, desc = rng.choice(rows[name]), rng.choice(words[name])
            encoded.append(t2l_train.encode_row(tok, by_name[name], row, desc, args.max_length))
            descs.append(desc)
    return t2l_train.collate(encoded, tok.pad_token_id), descs


def train_multitask_lora(model, tok, train_tasks, words, args) -> float:
    """The paper's baseline: one LoRA on every training task's rows, T2L SFT's sampler and budget."""
    from graft.train.loss import causal_lm_loss

    graft.attach(model, graft.LoRA(r=8, alpha=16, rslora=True, targets=("q_proj", "v_proj")), "multitask")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lora_lr, weight_decay=0.01)
    rng = random.Random(0)
    by_name = {t.name: t for t in train_tasks}
    rows = {t.name: task_lib.split_rows(t.rows())[0] for t in train_tasks}
    names = [t.name for t in train_tasks]
    start = time.perf_counter()
    for step in range(args.steps):
        batch, _ = sample_batch(rng, names, words, rows, by_name, tok, args)
        loss = causal_lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = args.lora_lr * min(1.0, (step + 1) / max(1, args.steps // 10))
        opt.step()
        if step % 10 == 0:
            print(f"multitask lora step {step} loss {float(loss):.4f}", flush=True)
    for p in params:
        p.requires_grad_(False)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=str(TASKS))
    p.add_argument("--library", help="the per-task LoRA library (manifest.json); without it no recon / ceiling")
    p.add_argument("--out", default="benchmarks/results/t2l")
    p.add_argument("--rows", type=int, default=30, help="held-out rows per held-out task")
    p.add_argument("--unseen-tasks", type=int, default=6, help="training tasks evaluated with unseen wordings")
    p.add_argument("--unseen-rows", type=int, default=15)
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="SFT steps (T2L and the multi-task LoRA)")
    p.add_argument("--recon-steps", type=int, default=300)
    p.add_argument("--tasks-per-batch", type=int, default=4)
    p.add_argument("--rows-per-task", type=int, default=2)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--lr", type=float, default=2.5e-4, help="T2L SFT peak lr")
    p.add_argument("--lora-lr", type=float, default=2e-4, help="multi-task LoRA lr")
    p.add_argument("--only", default="", help="comma-separated subset of methods to run "
                                              "(base, icl, t2l-sft, multitask, t2l-recon, own)")
    p.add_argument("--tables", nargs="*", help="print the tables of these results.json files (merged) and exit")
    args = p.parse_args()
    if args.tables is not None:
        merged: dict = {}
        for f in args.tables:
            for method, per_task in json.loads(Path(f).read_text()).items():
                merged.setdefault(method, {}).update(per_task)
        collection = task_lib.read_tasks(args.tasks)
        held = [t for t in collection if t.name in task_lib.BENCHMARK_HELDOUT]
        unseen_names = {n for m in merged if "wording" in m for n in merged[m]}
        print_tables(merged, held, [t for t in collection if t.name in unseen_names])
        return 0
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    def record(method: str, task: str, value: float, **extra) -> None:
        results.setdefault(method, {})[task] = {"accuracy": value, **extra}
        results_file.write_text(json.dumps(results, indent=1))

    only = {m for m in args.only.split(",") if m}
    want = lambda m: not only or m in only

    index = Path(args.tasks)
    collection = task_lib.read_tasks(index)
    held = [t for t in collection if t.name in task_lib.BENCHMARK_HELDOUT]
    train_tasks = [t for t in collection if t.name not in task_lib.BENCHMARK_HELDOUT]
    seen, unseen = wordings(collection, index)
    eval_rows = {t.name: task_lib.split_rows(t.rows())[1][: args.rows] for t in held}
    unseen_tasks = [t for t in train_tasks if unseen[t.name]]
    rng = random.Random(0)
    unseen_tasks = sorted(rng.sample(unseen_tasks, min(args.unseen_tasks, len(unseen_tasks))), key=lambda t: t.name)
    unseen_rows = {t.name: task_lib.split_rows(t.rows())[1][: args.unseen_rows] for t in unseen_tasks}
    library = {e.get("task") or e["name"]: e["path"] for e in read_library(args.library)} if args.library else {}
    print(f"{len(held)} held-out tasks, {len(train_tasks)} training tasks, library: {len(library)} adapters", flush=True)

    model, tok = models.load("smollm2-135m")
    for prm in model.parameters():
        prm.requires_grad_(False)

    def evaluate(method: str, tasks: list, rows: dict, description_of, prepare=None, shots=None) -> None:
        for t in tasks:
            if t.name in results.get(method, {}):
                continue
            start = time.perf_counter()
            name = prepare(t) if prepare else None
            if prepare and name is None:
                continue
            desc = description_of(t)
            acc = task_lib.evaluate(model, tok, t, rows[t.name], description=desc,
                                    shots=shots(t) if shots else ())
            if name:
                graft.detach(model, name)
            record(method, t.name, acc, seconds=round(time.perf_counter() - start, 1), description=desc)
            print(f"{method:>16}  {t.name:<60} {acc:.3f}  ({time.perf_counter() - start:.0f}s)", flush=True)

    main_desc = lambda t: t.description

    def generated(net: TextToLoRA, text_of):
        def prepare(t):
            text_to_lora(model, net, text_of(t), "t2l")
            return "t2l"

        return prepare

    if want("base"):
        evaluate("base zero-shot", held, eval_rows, main_desc)
    if want("icl"):
        evaluate("base ICL", held, eval_rows, main_desc,
                 shots=lambda t: task_lib.split_rows(t.rows())[0][: args.shots])

    # T2L, SFT
    sft_dir = out / "t2l-sft"
    if want("t2l-sft"):
        net = TextToLoRA.for_model(model, T2LConfig())
        config = t2l_train.T2LTrainConfig(mode="sft", steps=args.steps, tasks_per_batch=args.tasks_per_batch,
                                          rows_per_task=args.rows_per_task, lr=args.lr, max_length=args.max_length,
                                          save_every=20)
        if not (sft_dir / "t2l_training.json").is_file():
            t2l_train.train(net, train_tasks, config, model=model, tokenizer=tok, descriptions=seen, out_dir=sft_dir)
        for name in [n for n in graft.core.state_of(model).methods if n.startswith(t2l_train.SLOT)]:
            graft.detach(model, name)
        net = TextToLoRA.load(sft_dir, model=model)
        evaluate("T2L (SFT)", held, eval_rows, main_desc, prepare=generated(net, main_desc))
        evaluate("T2L (SFT) seen wording", unseen_tasks, unseen_rows, main_desc,
                 prepare=generated(net, main_desc))
        evaluate("T2L (SFT) unseen wording", unseen_tasks, unseen_rows, lambda t: unseen[t.name][-1],
                 prepare=generated(net, lambda t: unseen[t.name][-1]))

    # the paper's baseline: one multi-task LoRA
    if want("multitask"):
        seconds = train_multitask_lora(model, tok, train_tasks, seen, args)
        print(f"multi-task LoRA trained in {seconds:.0f}s", flush=True)
        graft.activate(model, "multitask")
        evaluate("multi-task LoRA", held, eval_rows, main_desc)
        evaluate("multi-task LoRA unseen wording", unseen_tasks, unseen_rows, lambda t: unseen[t.name][-1])
        graft.detach(model, "multitask")

    # T2L, reconstruction, and each task's own LoRA
    if library and want("t2l-recon"):
        recon_dir = out / "t2l-recon"
        in_lib = [t for t in train_tasks if t.name in library]
        net = TextToLoRA.for_model(model, T2LConfig())
        config = t2l_train.T2LTrainConfig(mode="recon", steps=args.recon_steps, tasks_per_batch=4, save_every=100)
        if not (recon_dir / "t2l_training.json").is_file():
            t2l_train.train(net, in_lib, config, library={n: library[n] for n in (t.name for t in in_lib)},
                            descriptions=seen, out_dir=recon_dir)
        net = TextToLoRA.load(recon_dir, model=model)
        evaluate("T2L (recon)", held, eval_rows, main_desc, prepare=generated(net, main_desc))
        evaluate("T2L (recon) seen wording", unseen_tasks, unseen_rows, main_desc,
                 prepare=generated(net, main_desc))
        evaluate("T2L (recon) unseen wording", unseen_tasks, unseen_rows, lambda t: unseen[t.name][-1],
                 prepare=generated(net, lambda t: unseen[t.name][-1]))
    if library and want("own"):
        def own(t):
            if t.name not in library:
                return None
            graft.load(model, library[t.name], "own")
            return "own"

        evaluate("own LoRA (ceiling)", held, eval_rows, main_desc, prepare=own)
        evaluate("own LoRA seen wording", unseen_tasks, unseen_rows, main_desc, prepare=own)

    print_tables(results, held, unseen_tasks)
    return 0


def print_tables(results: dict, held: list, unseen_tasks: list) -> None:
    def table(methods: list[str], tasks: list) -> None:
        methods = [m for m in methods if m in results]
        print("| method | " + " | ".join(t.name.replace("sni_", "")[:28] for t in tasks) + " | mean |")
        print("|---" * (len(tasks) + 2) + "|")
        for m in methods:
            vals = [results[m].get(t.name, {}).get("accuracy") for t in tasks]
            have = [v for v in vals if v is not None]
            mean = sum(have) / len(have) if have else float("nan")
            print(f"| {m} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + f" | {mean:.3f} |")
        print()

    table(["base zero-shot", "base ICL", "multi-task LoRA", "T2L (SFT)", "T2L (recon)", "own LoRA (ceiling)"], held)
    table(["multi-task LoRA unseen wording", "T2L (SFT) seen wording", "T2L (SFT) unseen wording",
           "T2L (recon) seen wording", "T2L (recon) unseen wording", "own LoRA seen wording"], unseen_tasks)


if __name__ == "__main__":
    sys.exit(main())
