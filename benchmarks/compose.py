"""Composing adapters for unseen tasks, measured: LoraHub and friends on SmolLM2-135M-Instruct.

    .venv/bin/python benchmarks/compose.py --library /work/artifacts/lib-smollm2            # run (resumable)
    .venv/bin/python benchmarks/compose.py --library /work/artifacts/lib-smollm2 --table    # the markdown table

The library is one LoRA per task of ../shared/data/tasks (`graft library build`). The ten tasks of
``graft.compose.tasks.BENCHMARK_HELDOUT`` are held out: the *library* here is the other 35 adapters,
and for each held-out task, on its held-out rows (the rows its own adapter was scored on in the
library's manifest, at most --rows), this reports:

- ``zero-shot``: the base model, the task's description and the input as one user turn;
- ``5-shot ICL``: the same with 5 training rows as earlier turns of the conversation;
- ``uniform``: the average of the 35 library LoRAs, ``graft.combine(method="cat")`` with every weight
  1/35 (the exact mean of their weight deltas; ``linear`` would add cross terms B_i A_j);
- ``nearest``: the library adapter whose description is nearest to the task's (all-MiniLM-L6-v2);
- ``LoraHub``: ``graft.lorahub`` on the same 5 rows over k=20 library LoRAs sampled at random (a new
  sample per seed), budget 40, w in [-1.5, 1.5] from 0, 0.05 mean|w| (the paper's settings); mean and
  best over --seeds seeds; with --nearest-k also over the 20 nearest by description;
- ``5-shot LoRA``: a fresh LoRA (the library's rank, targets and lr) trained on the same 5 rows;
- ``own LoRA``: the task's own adapter from the library (the ceiling: trained on its training rows).

Every number is ``graft.compose.tasks.evaluate``: option log-likelihood where a row lists options,
else greedy exact match after normalisation. Results go to --out (one JSON per task, so an
interrupted run resumes); --table prints the tables in docs/benchmarks.md from them. Without
../shared/data the benchmark says so and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("zero-shot", "5-shot ICL", "uniform", "nearest", "LoraHub mean", "LoraHub best",
           "LoraHub-near mean", "LoraHub-near best", "5-shot LoRA", "own LoRA")


def sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    keep = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    return [rows[i] for i in keep]


def run_task(name: str, args, lib, model, tok, library_names: list[str]) -> dict:
    import graft
    from graft.compose import tasks as T
    from graft.compose.combine import combine
    from graft.compose.lorahub import lorahub

    task = next(t for t in T.read_tasks(args.tasks) if t.name == name)
    entry = lib.entry(name)
    rows = heldout_rows(task, entry, args.rows)
    train_rows, _ = T.split_rows(task.rows(), entry.data["split"]["heldout"], seed=entry.data["split"]["split_seed"],
                                 max_heldout=entry.data["split"]["max_heldout"])
    shots = sample(train_rows, 5, args.seed)
    examples = [(T.prompt_text(tok, T.messages(task, r)), r["output"]) for r in shots]
    out = {"task": name, "family": T.family(name), "rows": len(rows), "shots": [r["input"][:80] for r in shots],
           "scores": {}, "seconds": {}, "detail": {}}
    siblings = [n for n in library_names if T.family(n) and T.family(n) == T.family(name)]
    out["siblings_in_library"] = siblings

    def timed(key, fn):
        t0 = time.time()
        value = fn()
        out["seconds"][key] = round(time.time() - t0, 1)
        return value

    def score(active: str | None, **kw) -> float:
        if active is None:
            with graft.disabled(model):
                return T.evaluate(model, tok, task, rows, **kw)
        graft.activate(model, active)
        return T.evaluate(model, tok, task, rows, **kw)

    say = lambda s: print(f"  {name}: {s}", flush=True)
    out["scores"]["zero-shot"] = timed("zero-shot", lambda: score(None))
    say(f"zero-shot {out['scores']['zero-shot']:.3f}")
    out["scores"]["5-shot ICL"] = timed("5-shot ICL", lambda: score(None, shots=shots))
    say(f"5-shot ICL {out['scores']['5-shot ICL']:.3f}")

    combine(model, dict.fromkeys(library_names, 1.0 / len(library_names)), method="cat", name="uniform")
    out["scores"]["uniform"] = timed("uniform", lambda: score("uniform"))
    graft.detach(model, "uniform")
    say(f"uniform {out['scores']['uniform']:.3f}")

    near, similarity = lib.search(task.description, k=1, exclude=[n for n in lib.names if n not in library_names])[0]
    out["detail"]["nearest"] = {"adapter": near.name, "similarity": round(similarity, 4)}
    out["scores"]["nearest"] = timed("nearest", lambda: score(near.name))
    say(f"nearest ({near.name}) {out['scores']['nearest']:.3f}")

    pools = {"LoraHub": None}
    if args.nearest_k:
        hits = lib.search(task.description, k=args.k, exclude=[n for n in lib.names if n not in library_names])
        pools["LoraHub-near"] = [e.name for e, _ in hits]
    for label, pool in pools.items():
        runs = []
        for seed in range(args.seeds):
            chosen = pool or sorted(random.Random(seed).sample(library_names, min(args.k, len(library_names))))
            result = timed(f"{label} search {seed}", lambda chosen=chosen, seed=seed: lorahub(
                model, tok, chosen, examples, name="lorahub", budget=args.budget, seed=seed))
            acc = timed(f"{label} eval {seed}", lambda: score("lorahub"))
            graft.detach(model, "lorahub")
            runs.append({"seed": seed, "accuracy": acc, "loss": result.loss, "start_loss": result.start_loss,
                         "weights": dict(zip(result.adapters, (round(w, 3) for w in result.weights))),
                         "eval_ms": round(1000 * statistics.median(result.eval_seconds), 1),
                         "search_s": round(result.search_seconds, 1)})
            say(f"{label} seed {seed}: {acc:.3f} (example loss {result.start_loss:.3f} -> {result.loss:.3f}, "
                f"{result.search_seconds:.0f} s)")
        out["detail"][label] = runs
        out["scores"][f"{label} mean"] = statistics.mean(r["accuracy"] for r in runs)
        out["scores"][f"{label} best"] = max(r["accuracy"] for r in runs)

    out["scores"]["5-shot LoRA"] = timed("5-shot LoRA", lambda: few_shot_lora(model, tok, task, shots, rows, entry, args))
    say(f"5-shot LoRA {out['scores']['5-shot LoRA']:.3f}")

    graft.load(model, lib.path_of(name), "own", activate=False)
    out["scores"]["own LoRA"] = timed("own LoRA", lambda: score("own"))
    graft.detach(model, "own")
    say(f"own LoRA {out['scores']['own LoRA']:.3f}")
    return out


def few_shot_lora(model, tok, task, shots, rows, entry, args) -> float:
    """A LoRA of the library's shape trained on the 5 rows alone (--few-shot-steps full-batch steps)."""
    import torch

    import graft
    from graft import data
    from graft.compose import tasks as T
    from graft.recipe import make_collate
    from graft.train import TrainConfig, train

    m, t = entry.method, entry.training
    records = [{"messages": [*T.messages(task, r), {"role": "assistant", "content": r["output"]}]} for r in shots]
    examples = data.tokenize(records, tok, format="chat", max_length=t["max_length"], on_overflow="skip")
    torch.manual_seed(args.seed)
    graft.attach(model, graft.LoRA(r=m["r"], alpha=m["alpha"], targets=m["targets"]), "fewshot")
    try:
        cfg = TrainConfig(lr=t["lr"], epochs=args.few_shot_steps, batch_size=len(examples), seed=args.seed,
                          progress=False)
        train(model, examples, make_collate(model, tok, t["max_length"], packed=True), cfg)
        model.eval()
        graft.activate(model, "fewshot")
        return T.evaluate(model, tok, task, rows)
    finally:
        graft.detach(model, "fewshot")


def heldout_rows(task, entry, n: int) -> list[dict]:
    """The rows the library scored the task's own adapter on, topped up from its other held-out rows to n."""
    from graft.compose.library import select_rows

    _, held, scored = select_rows(task.rows(), entry.data["split"])
    if n <= len(scored):
        return scored[:n]
    rest = [r for r in held if r not in scored]
    return scored + sample(rest, n - len(scored), 0)


def table(out_dir: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json")) if p.name != "run.json"]
    if not results:
        return f"no results in {out_dir}"
    methods = [m for m in METHODS if any(m in r["scores"] for r in results)]
    head = "| task | sibling in library | rows | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (3 + len(methods))]
    for r in results:
        sib = r["family"] if r["siblings_in_library"] else "no"
        cells = [f"{100 * r['scores'][m]:.0f}" if m in r["scores"] else "" for m in methods]
        lines.append(f"| {r['task']} | {sib} | {r['rows']} | " + " | ".join(cells) + " |")
    for label, group in (("mean, all", results), ("mean, with sibling", [r for r in results if r["siblings_in_library"]]),
                         ("mean, no sibling", [r for r in results if not r["siblings_in_library"]])):
        if not group:
            continue
        cells = []
        for m in methods:
            vals = [r["scores"][m] for r in group if m in r["scores"]]
            cells.append(f"**{100 * statistics.mean(vals):.1f}**" if vals else "")
        lines.append(f"| {label} ({len(group)} tasks) | | | " + " | ".join(cells) + " |")
    evals = [run["eval_ms"] for r in results for runs in (r["detail"].get("LoraHub", []),) for run in runs]
    if evals:
        lines.append(f"\nLoraHub: median time per evaluation (write w into the factors + forward of the 5 examples) "
                     f"{statistics.median(evals):.0f} ms over {len(evals)} searches.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--library", default="/work/artifacts/lib-smollm2", help="a library built from the task collection")
    ap.add_argument("--tasks", default=str(SHARED / "tasks" / "index.json"))
    ap.add_argument("--out", default="/work/artifacts/compose-bench", help="one JSON of results per held-out task")
    ap.add_argument("--only", help="comma-separated held-out tasks to run (default: all ten)")
    ap.add_argument("--rows", type=int, default=30, help="held-out rows scored per task")
    ap.add_argument("--seeds", type=int, default=5, help="LoraHub seeds (each: a new sample of k and optimizer seed)")
    ap.add_argument("--k", type=int, default=20, help="LoRAs LoraHub composes")
    ap.add_argument("--budget", type=int, default=40, help="LoraHub objective evaluations")
    ap.add_argument("--nearest-k", action="store_true", help="also LoraHub over the k nearest by description")
    ap.add_argument("--few-shot-steps", type=int, default=10, help="full-batch steps of the 5-shot LoRA")
    ap.add_argument("--seed", type=int, default=0, help="which 5 training rows are the examples")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.out)))
        return
    if not Path(args.tasks).is_file():
        print(f"skipped: {args.tasks} not found (the benchmark reads ../shared/data/tasks)")
        return
    import torch

    import graft
    from graft import models
    from graft.compose.library import Library
    from graft.compose.tasks import BENCHMARK_HELDOUT

    torch.set_num_threads(args.threads)
    lib = Library.open(args.library)
    heldout = [n for n in (args.only.split(",") if args.only else BENCHMARK_HELDOUT)]
    missing = [n for n in heldout if n not in lib]
    library_names = [n for n in lib.names if n not in BENCHMARK_HELDOUT]
    if missing:
        raise SystemExit(f"the library lacks the held-out tasks' own adapters {missing}; finish `graft library build` "
                         "or pass --only")
    if len(library_names) < args.k:
        raise SystemExit(f"the library has {len(library_names)} adapters besides the held-out tasks' "
                         f"(fewer than --k {args.k}); finish `graft library build`")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = models.load(lib.base["id"])
    for n in library_names:
        graft.load(model, lib.path_of(n), n, activate=False)
    print(f"library {lib.path}: {len(library_names)} adapters composed, {len(heldout)} held-out tasks, "
          f"{args.rows} rows each; load average {os.getloadavg()[0]:.1f}", flush=True)
    started = time.time()
    for name in heldout:
        file = out_dir / f"{name}.json"
        if file.exists():
            print(f"  {name}: done before, skipped", flush=True)
            continue
        t0 = time.time()
        result = run_task(name, args, lib, model, tok, library_names)
        result["wall_s"] = round(time.time() - t0, 1)
        result["settings"] = {k: getattr(args, k) for k in ("rows", "seeds", "k", "budget", "few_shot_steps", "seed",
                                                          "threads")}
        result["load_average"] = round(os.getloadavg()[0], 1)
        result["library_adapters"] = len(library_names)
        file.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wall {time.time() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")
    print(table(out_dir))


if __name__ == "__main__":
    main()
