"""`graft library build | list | search`: the adapter library's command line (registered in graft.cli)."""

from __future__ import annotations

import argparse
import json


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def add_library_arguments(p: argparse.ArgumentParser) -> None:
    from graft.compose.library import BuildConfig

    d = BuildConfig()
    sub = p.add_subparsers(dest="library_verb", required=True, metavar="build|list|search")
    b = sub.add_parser("build", help="train one LoRA per task of a task collection (resumable)",
                       description="Train one LoRA per task of a task collection into a library directory. "
                                   "Resumable: complete adapters are skipped, an interrupted one is redone.")
    b.add_argument("--model", default="smollm2-135m", help="base model: built-in name, transformers dir or .gguf")
    b.add_argument("--tasks", required=True, help="the task collection's index.json")
    b.add_argument("--out", required=True, help="the library directory")
    b.add_argument("--only", help="comma-separated task names to build (default: all)")
    b.add_argument("--exclude", help="comma-separated task names to leave out")
    b.add_argument("--r", type=int, default=d.r, help=f"LoRA rank (default {d.r})")
    b.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    b.add_argument("--targets", default=",".join(d.targets), help=f"modules (default {','.join(d.targets)})")
    b.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over each task's rows (default {d.epochs})")
    b.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    b.add_argument("--batch-size", type=int, default=d.batch_size, help=f"rows per step (default {d.batch_size})")
    b.add_argument("--max-length", type=int, default=d.max_length, help=f"tokens per row (default {d.max_length})")
    b.add_argument("--max-train-rows", type=int, default=d.max_train_rows,
                   help=f"train on at most N rows per task, a seeded sample; 0 = all (default {d.max_train_rows})")
    b.add_argument("--heldout", type=float, default=d.heldout,
                   help=f"fraction of each task's rows held out (default {d.heldout:g})")
    b.add_argument("--max-heldout", type=int, default=d.max_heldout, help=f"cap on held-out rows (default {d.max_heldout})")
    b.add_argument("--eval-rows", type=int, default=d.eval_rows,
                   help=f"score adapter and base on at most N held-out rows; 0 = all (default {d.eval_rows})")
    b.add_argument("--split-seed", type=int, default=d.split_seed)
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--threads", type=int, help="torch CPU threads (on a shared, oversubscribed CPU 1 is fastest)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar (one line per task still)")

    ls = sub.add_parser("list", help="the adapters of a library, with their held-out scores")
    ls.add_argument("path")
    ls.add_argument("--json", action="store_true")

    s = sub.add_parser("search", help="the adapters whose descriptions are nearest to a text")
    s.add_argument("path")
    s.add_argument("text")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--json", action="store_true")


def cmd_library(args: argparse.Namespace) -> int:
    return {"build": _build, "list": _list, "search": _search}[args.library_verb](args)


def _build(args: argparse.Namespace) -> int:
    from graft.compose.library import BuildConfig, build

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = BuildConfig(r=args.r, alpha=args.alpha, targets=args.targets, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, max_length=args.max_length,
                         max_train_rows=args.max_train_rows or None, heldout=args.heldout,
                         max_heldout=args.max_heldout, eval_rows=args.eval_rows or None,
                         split_seed=args.split_seed, seed=args.seed)
    lib = build(args.model, args.tasks, args.out, config, only=_names(args.only), exclude=_names(args.exclude),
                progress=not args.no_progress, log=print if args.no_progress else None)
    print(f"library {lib.path}: {len(lib)} adapters of {lib.base['id']}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from graft.compose.library import Library

    lib = Library.open(args.path)
    if args.json:
        print(json.dumps([e.to_json() for e in lib.entries], indent=1))
        return 0
    rows = [(e.name, f"{e.method.get('type', '?')} r={e.method.get('r', '?')}", str(e.data.get("rows_used", "")),
             _pct(e.scores.get("adapter")), _pct(e.scores.get("base")), str(e.scores.get("rows", "")),
             e.description[:60]) for e in lib.entries]
    print(f"library {lib.path}: {len(lib)} adapters of {lib.base.get('id')}")
    print(_table(("adapter", "method", "trained on", "held-out", "base", "rows", "description"), rows))
    if rows:
        mean = sum(e.scores.get("adapter", 0) for e in lib.entries) / len(rows)
        base = sum(e.scores.get("base", 0) for e in lib.entries) / len(rows)
        print(f"mean held-out accuracy {100 * mean:.1f}% (base zero-shot {100 * base:.1f}%)")
    return 0


def _search(args: argparse.Namespace) -> int:
    from graft.compose.library import Library

    hits = Library.open(args.path).search(args.text, k=args.k)
    if args.json:
        print(json.dumps([{"name": e.name, "score": round(s, 4), "path": e.path, "description": e.description}
                          for e, s in hits], indent=1))
        return 0
    print(_table(("score", "adapter", "description"), [(f"{s:.3f}", e.name, e.description[:70]) for e, s in hits]))
    return 0


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
