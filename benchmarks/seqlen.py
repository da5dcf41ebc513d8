"""Training step time and peak memory vs sequence length, graft vs peft + Trainer (issue 20, point 4).

    .venv/bin/python benchmarks/seqlen.py                         # 256 ... 4096, 1 row a step, ~15 min
    .venv/bin/python benchmarks/seqlen.py --lengths 256 512 --rows 2
    .venv/bin/python benchmarks/seqlen.py --quick                 # smoke test: lengths 64 and 128
    .venv/bin/python benchmarks/seqlen.py --out docs/benchmarks.md --plot-dir docs/img

The step is benchmarks/train.py's (SmolLM2-135M-Instruct, LoRA r=16 alpha=32 all-linear, AdamW,
max_grad_norm 1), built by its builders, with ``--rows`` rows of exactly L tokens a step. Each row
is GSM8K examples (Alpaca template, tokenised by graft) laid end to end and cut at L, so both sides
see the same tokens and the same supervised positions. graft takes them packed: ``position_ids``
restarting at each example, attention confined per example, selective logits (its defaults,
through its real ``_train_step``). The reference takes each row as one causal sequence with an
all-ones attention mask and full logits (the ``group_texts`` recipe of transformers' examples;
peft + Trainer cannot confine attention within a row), through ``Trainer.training_step``.

Every (side, L) point runs in its own process, so its peak RSS (``ru_maxrss``) is its own; the
table gives the peak RSS while stepping (VmHWM, reset after loading, since loading a checkpoint can
peak higher than the steps), the RSS after loading (model, adapter, optimizer), and the step time
(median of ``--steps`` after a warm-up step). The slope is the least-squares exponent k of time ~ L^k (1:
linear in L, 2: quadratic), over the measured lengths, and likewise for the memory a step adds
(peak - loaded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step  # benchmarks/profile_step.py: the two sides' real training steps
import train as train_bench  # benchmarks/train.py: the same builders and data

SECTION = "## Training step vs sequence length (issue 20)"
BEGIN = "<!-- benchmarks/seqlen.py: begin generated -->"
END = "<!-- benchmarks/seqlen.py: end generated -->"
IGNORE = -100


def make_rows(examples: list[Any], length: int, count: int) -> list[dict[str, list[int]]]:
    """``count`` rows of exactly ``length`` tokens: examples end to end, the last one cut.

    Each row keeps its examples' ``position_ids`` (0.. per example) and labels, with ``-100`` at
    each example's first position (it would be predicted from the previous example), as
    :func:`graft.data.pack` does. Examples are used in order and cycled when they run out.
    """
    rows = []
    i = 0
    for _ in range(count):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        while len(ids) < length:
            ex = examples[i % len(examples)]
            i += 1
            ids += ex.input_ids
            labels += [IGNORE, *ex.labels[1:]]
            positions += range(len(ex.input_ids))
        rows.append({"input_ids": ids[:length], "labels": labels[:length], "position_ids": positions[:length]})
    return rows


def collate_packed(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """graft's packed batch: ids, labels, position_ids; no attention mask (confined per example)."""
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}


def collate_causal(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """The reference's batch: each row one causal sequence."""
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": torch.tensor([r["labels"] for r in rows]), "attention_mask": torch.ones_like(ids)}


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); whether that worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One (side, length) point in this process."""
    from transformers import AutoTokenizer

    from graft import data, models

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    length = args.length
    args.max_length = max(512, length)  # tokenising: GSM8K examples fit 512; rows are cut to `length` below
    tok = AutoTokenizer.from_pretrained(models.resolve(args.model), local_files_only=True)
    examples = data.tokenize(train_bench.rows(args.examples, args.data), tok, format="alpaca",
                             max_length=args.max_length)
    rows = make_rows(list(examples), length, args.rows * (1 + args.steps))
    if args.side == "graft":
        model, _, _, cfg = train_bench.build_graft(args, packing=True, selective=True, checkpointing=False)
        side = profile_step.graft_side(model, rows, collate_packed, cfg)
    else:
        trainer, _, _ = train_bench.build_reference(args)
        side = profile_step.reference_side(trainer, rows, collate_causal, bf16=False)
    loaded = _status_mb("VmRSS")
    # The steps' own peak: VmHWM reset after loading (a load can peak higher than the steps do); else ru_maxrss.
    own_peak = reset_peak() and loaded is not None
    batches = [rows[k * args.rows:(k + 1) * args.rows] for k in range(1 + args.steps)]
    side.step(batches[0])
    times = []
    for batch in batches[1:]:
        t0 = time.perf_counter()
        side.step(batch)
        times.append(time.perf_counter() - t0)
    peak = _status_mb("VmHWM") if own_peak else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    supervised = sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in batches[1])
    return {"side": side.name, "length": length, "rows": args.rows, "step_s": statistics.median(times), "times_s": times,
            "loaded_rss_mb": loaded if loaded is not None else float("nan"), "peak_rss_mb": peak,
            "peak_is_steps_only": own_peak, "supervised_tokens": supervised}


def slope(points: dict[int, float]) -> float:
    """Least-squares exponent k of y ~ x^k over the points (log-log)."""
    xs = [math.log(x) for x in points]
    ys = [math.log(max(y, 1e-9)) for y in points.values()]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def report(results: list[dict[str, Any]], args: argparse.Namespace, plot_note: str) -> str:
    sides = sorted({r["side"] for r in results}, key=lambda s: s != "graft")
    by = {(r["side"], r["length"]): r for r in results}
    lengths = sorted({r["length"] for r in results})
    lines = [BEGIN, "", (f"Command: `.venv/bin/python benchmarks/seqlen.py {' '.join(sys.argv[1:])}` "
             f"({args.rows} row(s) of L tokens a step, median of {args.steps} step(s) after a warm-up, "
             f"{args.threads} threads, fp32). Machine: {os.cpu_count()} logical cores; load average at end "
             f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())}."), "",
             "| L | " + " | ".join(f"{s} step (s) | {s} peak RSS (MB) | {s} added by the step (MB)" for s in sides)
             + " | time graft / ref |" * (len(sides) == 2),
             "|---:|" + "---:|---:|---:|" * len(sides) + "---:|" * (len(sides) == 2)]
    for n in lengths:
        cells = []
        for s in sides:
            r = by.get((s, n))
            cells.append("—|—|—" if r is None else
                         f"{r['step_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['loaded_rss_mb']:.0f}")
        ratio = ""
        if len(sides) == 2 and (sides[0], n) in by and (sides[1], n) in by:
            ratio = f" {by[(sides[0], n)]['step_s'] / by[(sides[1], n)]['step_s']:.2f} |"
        lines.append(f"| {n} | " + " | ".join(cells) + " |" + ratio)
    lines.append("")
    for s in sides:
        t = {n: by[(s, n)]["step_s"] for n in lengths if (s, n) in by}
        m = {n: by[(s, n)]["peak_rss_mb"] - by[(s, n)]["loaded_rss_mb"] for n in lengths if (s, n) in by}
        if len(t) >= 2:
            lines.append(f"- {s}: step time ~ L^{slope(t):.2f}, memory added by the step ~ L^{slope(m):.2f} "
                         f"(log-log least squares over L = {', '.join(map(str, sorted(t)))})")
    lines += [f"- {plot_note}", "", END]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--rows", type=int, default=1, help="rows of L tokens in a step")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test: lengths 64 and 128, one timed step")
    ap.add_argument("--only", choices=["graft", "reference"], action="append")
    ap.add_argument("--examples", type=int, default=64, help="GSM8K rows to draw the tokens from")
    ap.add_argument("--model", default="smollm2-135m", help="built-in name or transformers directory")
    ap.add_argument("--data", type=Path, default=train_bench.DATA, help="GSM8K train.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the table into this markdown file's section")
    ap.add_argument("--plot-dir", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "img")
    ap.add_argument("--json", type=Path, help="write every point here")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/graft-bench-seqlen", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # the builders read these
    ap.add_argument("--lr", type=float, default=2e-4, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.steps, args.examples = [64, 128], 1, 8
    if args.side:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    if not args.data.exists():
        print(f"skipped: {args.data} not found (the benchmark reads ../shared/data)")
        return
    results = []
    for length in args.lengths:
        for which in args.only or ["graft", "reference"]:
            cmd = [sys.executable, __file__, "--side", which, "--length", str(length), "--rows", str(args.rows),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--examples", str(args.examples),
                   "--model", args.model, "--data", str(args.data), "--seed", str(args.seed)]
            r = train_bench.run_child(cmd, f"{which} at L={length}")
            results.append(r)
            print(f"L={length:5d} {r['side']:<13} {r['step_s']:8.2f} s/step  peak RSS {r['peak_rss_mb']:7.0f} MB "
                  f"(loaded {r['loaded_rss_mb']:.0f})", flush=True)
    from plots import panels_plot

    times: dict[str, dict[float, float]] = {}
    memory: dict[str, dict[float, float]] = {}
    for r in results:
        times.setdefault(r["side"], {})[r["length"]] = r["step_s"]
        memory.setdefault(r["side"], {})[r["length"]] = r["peak_rss_mb"] / 1024
    note = panels_plot(args.plot_dir / "seqlen_step.png",
                       [(f"training step, {args.rows} row(s) of L tokens", "seconds", times),
                        ("peak RSS while stepping", "GB", memory)],
                       xlabel="sequence length L")
    md = report(results, args, note)
    print("\n" + md)
    if args.out is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from core import write_section

        write_section(args.out, md, SECTION, BEGIN, END)
        print(f"wrote {args.out}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
