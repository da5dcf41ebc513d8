"""No-training adaptation, measured: SmolLM2-135M-Instruct on held-out GSM8K and SST-2 with `graft eval`'s
strategies, and batched against one-by-one generation.

    .venv/bin/python benchmarks/eval.py                       # defaults sized for ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/eval.py --n-gen 200 --n-sc 200 --one-by-one 200   # the issue's sizes (hours on CPU)

GSM8K (../shared/data/gsm8k/train.jsonl, shuffled with seed 0 as benchmarks/learning.py does; it trains on
rows 0-239 and evaluates on 240-299, so the problems here, rows 300+, are held out from its adapter):
zero-shot, few-shot CoT (k=4, the pool's first four worked solutions) and self-consistency (k sampled
CoT chains, majority vote), answers extracted as numbers. SST-2 (../shared/data/sst2/train.tsv, rows
5000+ of the seed-0 shuffle): label scoring zero-shot and few-shot with the 4 most similar exemplars by
all-MiniLM-L6-v2 from a pool of 2,000 other sentences. With --cot-adapter DIR (a LoRA trained on GSM8K
CoT, e.g. by benchmarks/learning.py), the adapter is evaluated zero-shot in its training format.

Throughput: the zero-shot prompts generated greedily in batches of --batch-size (the timed zero-shot
evaluation) and again one at a time, on the first --one-by-one problems.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import graft
from graft import data, decode, models
from graft.data.prompting import sentence_embedder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def gsm8k_rows() -> list[dict]:
    rows = [json.loads(line) for line in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(rows)
    return rows


def sst2_rows() -> list[dict]:
    lines = (SHARED / "sst2" / "train.tsv").read_text().splitlines()[1:]
    rows = [{"text": t.strip(), "label": int(lab)} for t, lab in (line.rsplit("\t", 1) for line in lines)]
    random.Random(0).shuffle(rows)
    return rows


def report(result: decode.EvalResult, results: list[dict], args) -> None:
    """Print a summary line and keep the per-example rows under --out/TASK-STRATEGY[-adapter]/."""
    s = result.summary
    results.append(s)
    decode.write_results(result, Path(args.out) / f"{s['task']}-{s['strategy']}{'-adapter' if s.get('adapter') else ''}")
    print(f"  {s.get('model')}{' + ' + s['adapter'] if s.get('adapter') else ''} {s['strategy']} {s['task']}: "
          f"{100 * s['accuracy']:.1f}% ({100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f}) n={s['n']} "
          f"{s['tokens']:,} tokens {s['seconds']:.0f}s", flush=True)


def run_gsm8k(model, tok, args, results: list[dict], extra: dict) -> None:
    rows = gsm8k_rows()
    held_out = data.read(rows[300 : 300 + max(args.n_gen, args.n_sc)])
    pool = data.read(rows[1000:1100])
    meta = {"model": "SmolLM2-135M-Instruct", "data": "GSM8K train (held out)"}
    common = {"task": "math", "max_new_tokens": args.max_new_tokens}
    zero = decode.EvalConfig(strategy="zero-shot", batch_size=args.batch_size, **common)
    zero_result = decode.evaluate(model, tok, held_out[: args.n_gen], zero, meta=meta)
    report(zero_result, results, args)
    if args.one_by_one > 0:
        extra["throughput"] = run_throughput(model, tok, args, zero_result)
    if "cot" not in args.skip.split(","):
        cot = decode.EvalConfig(strategy="cot", shots=4, batch_size=args.batch_size, **common)
        report(decode.evaluate(model, tok, held_out[: args.n_gen], cot, pool=pool, meta=meta), results, args)
    if args.n_sc > 0:
        sc = decode.EvalConfig(strategy="self-consistency", shots=4, samples=args.sc_k,
                               batch_size=args.sc_batch_size, **common)
        report(decode.evaluate(model, tok, held_out[: args.n_sc], sc, pool=pool, meta=meta), results, args)
    if args.cot_adapter:
        if not (Path(args.cot_adapter) / "adapter_config.json").is_file():
            print(f"  CoT adapter: skipped, {args.cot_adapter} holds no adapter", flush=True)
        else:
            graft.load(model, args.cot_adapter, name="cot")
            config = decode.EvalConfig(strategy="zero-shot", chat=False, batch_size=args.batch_size, **common)
            adapter_meta = {**meta, "adapter": "CoT LoRA"}  # zero-shot in the cot training format, no chat
            report(decode.evaluate(model, tok, held_out[: args.n_gen], config, meta=adapter_meta), results, args)
            graft.detach(model, "cot")


def run_sst2(model, tok, args, results: list[dict]) -> dict:
    rows = sst2_rows()
    held_out = data.read(rows[5000 : 5000 + args.n_cls])
    pool = data.read(rows[:2000])
    meta = {"model": "SmolLM2-135M-Instruct", "data": "SST-2 train (held out)"}
    common = {"task": "classification", "labels": {0: "negative", 1: "positive"}, "batch_size": args.batch_size,
              "instruction": "Classify the sentiment of each movie review. Answer with one word: negative or positive."}
    report(decode.evaluate(model, tok, held_out, decode.EvalConfig(strategy="zero-shot", **common),
                           meta=meta), results, args)
    t0 = time.perf_counter()
    embed = sentence_embedder()
    embed(["warm up"])  # load MiniLM outside the timed evaluation
    config = decode.EvalConfig(strategy="few-shot", shots=4, selection="similar", **common)
    report(decode.evaluate(model, tok, held_out, config, pool=pool, embed=embed, meta=meta), results, args)
    labels = [r["label"] for r in rows[5000 : 5000 + args.n_cls]]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    return {"majority": majority, "embed_and_eval_seconds": time.perf_counter() - t0}


def run_throughput(model, tok, args, batched: decode.EvalResult) -> dict:
    """One-by-one greedy generation of the first --one-by-one zero-shot prompts, against the batched run.

    When those are all the prompts of the zero-shot evaluation (the default), its timed batched run is
    the batched side; otherwise the same prompts are generated again in batches.
    """
    rows = batched.rows[: args.one_by_one]
    prompts = [r["prompt"] for r in rows]
    kw = {"max_new_tokens": args.max_new_tokens, "add_special_tokens": False,
          "eos_token_ids": sorted({tok.eos_token_id, *_as_list(model.generation_config.eos_token_id)})}
    if len(rows) == len(batched.rows):
        batched_seconds, batched_texts = batched.summary["seconds"], [r["output"] for r in rows]
    else:
        t0 = time.perf_counter()
        gens = decode.generate(model, tok, prompts, batch_size=args.batch_size, **kw)
        batched_seconds, batched_texts = time.perf_counter() - t0, [g.text for g in gens]
    t0 = time.perf_counter()
    gens = decode.generate(model, tok, prompts, batch_size=1, **kw)
    seconds = time.perf_counter() - t0
    print(f"  one-by-one: {len(prompts)} problems in {seconds:.1f}s (batched: {batched_seconds:.1f}s)", flush=True)
    same = sum(a == g.text for a, g in zip(batched_texts, gens))
    return {"problems": len(prompts), "batch_size": args.batch_size, "batched_seconds": batched_seconds,
            "one_by_one_seconds": seconds, "generated_tokens": sum(g.generated_tokens[0] for g in gens),
            "speedup": seconds / batched_seconds, "identical_outputs": same}


def _as_list(value) -> list:
    return [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-gen", type=int, default=16, help="GSM8K problems for zero-shot and few-shot CoT")
    ap.add_argument("--n-sc", type=int, default=8, help="GSM8K problems for self-consistency")
    ap.add_argument("--sc-k", type=int, default=5, help="self-consistency chains per problem")
    ap.add_argument("--n-cls", type=int, default=200, help="SST-2 sentences")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sc-batch-size", type=int, default=40, help="sequences per batch for self-consistency")
    ap.add_argument("--one-by-one", type=int, default=16,
                    help="zero-shot problems also generated one at a time (throughput); at most --n-gen")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine, 2 threads spin and run 10x slower)")
    ap.add_argument("--cot-adapter", help="a GSM8K CoT LoRA adapter directory to evaluate too")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: gsm8k, sst2, cot (few-shot CoT)")
    ap.add_argument("--out", default="runs/bench-eval")
    args = ap.parse_args()
    if not SHARED.exists():
        print(f"skipped: {SHARED} not found")
        return
    torch.set_num_threads(args.threads)
    args.one_by_one = min(args.one_by_one, args.n_gen)
    skip = set(filter(None, args.skip.split(",")))
    start = time.perf_counter()
    model, tok = models.load("smollm2-135m")
    results: list[dict] = []
    extra: dict = {"args": vars(args)}
    if "sst2" not in skip:
        print("SST-2 label scoring", flush=True)
        extra["sst2"] = run_sst2(model, tok, args, results)
    if "gsm8k" not in skip:
        print("GSM8K", flush=True)
        run_gsm8k(model, tok, args, results, extra)
    extra["total_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"results": results, **extra}, indent=2) + "\n")
    print()
    print(decode.format_table(results))
    if "sst2" in extra:
        print(f"\nSST-2 majority class on the same sentences: {100 * extra['sst2']['majority']:.1f}%")
    if "throughput" in extra:
        t = extra["throughput"]
        print(f"batched (batch {t['batch_size']}) {t['batched_seconds']:.1f}s vs one-by-one "
              f"{t['one_by_one_seconds']:.1f}s on {t['problems']} problems: {t['speedup']:.2f}x; "
              f"identical greedy outputs {t['identical_outputs']}/{t['problems']}")
    print(f"total {extra['total_seconds']:.0f}s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
