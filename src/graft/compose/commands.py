"""`graft combine` and `graft lorahub`: the command-line verbs of :mod:`graft.compose`.

``cli.py`` registers them with :func:`add_combine_arguments` / :func:`add_lorahub_arguments` and
runs :func:`cmd_combine` / :func:`cmd_lorahub`; user errors raise ``ValueError`` (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Any

from graft.compose.combine import METHODS, SIGN_METHODS
from graft.compose.lorahub import FORMS

COMBINE_EXAMPLE = ("graft combine --model smollm2-135m --adapter a=runs/a/adapter --adapter b=runs/b/adapter "
                   "--weights 0.7,0.3 --method ties --density 0.5 --out runs/mix")
LORAHUB_EXAMPLE = ('graft lorahub --model smollm2-135m --library lib/ --examples few.jsonl --k 20 '
                   '--select nearest --description "Translate English to Spanish." --out runs/hub')


def _named_dirs(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {item!r}: write NAME=DIR")
        if "." in name:
            raise ValueError(f"--adapter {item!r}: the name may not contain '.'")
        out.append((name, path))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--adapter names repeat: {names}")
    return out


def _check_same_kind(dirs: list[tuple[str, str]]) -> None:
    """Refuse adapters of different methods or base models before anything is loaded."""
    from graft.io import read_config

    configs = {n: read_config(p) for n, p in dirs}
    types = {n: c.get("peft_type") for n, c in configs.items()}
    if len(set(types.values())) > 1:
        raise ValueError(f"the adapters are of different methods ({types}); combine adapters of one method")
    bases = {n: c.get("base_model_name_or_path") for n, c in configs.items() if c.get("base_model_name_or_path")}
    if len(set(bases.values())) > 1:
        raise ValueError(f"the adapters were trained on different base models ({bases})")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# graft combine


def add_combine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in name, transformers dir or .gguf file")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR", help="an adapter to combine; repeat")
    p.add_argument("--weights", required=True, help="comma-separated, one per --adapter, in order (negative subtracts)")
    p.add_argument("--method", default="linear", choices=METHODS)
    p.add_argument("--density", type=float, help="fraction kept by ties / dare_* / magnitude_prune, in (0, 1]")
    p.add_argument("--rank", type=int, help="rank of the *_svd results (default: the largest rank combined)")
    p.add_argument("--majority-sign", default="total", choices=SIGN_METHODS)
    p.add_argument("--seed", type=int, default=0, help="seed of the DARE masks")
    p.add_argument("--name", default="combined", help="name of the new adapter")
    p.add_argument("--out", required=True, help="directory to write the new adapter to (PEFT format)")


def cmd_combine(args: argparse.Namespace) -> int:
    import graft
    from graft import models

    dirs = _named_dirs(args.adapter)
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise ValueError(f"--weights {args.weights!r}: write numbers separated by commas, e.g. 0.7,0.3") from None
    if len(weights) != len(dirs):
        raise ValueError(f"--weights has {len(weights)} values for {len(dirs)} --adapter")
    _check_same_kind(dirs)
    model, _ = models.load(args.model)
    for name, path in dirs:
        graft.load(model, path, name, activate=False)
    graft.combine(model, dict(zip([n for n, _ in dirs], weights)), method=args.method, name=args.name,
                  density=args.density, rank=args.rank, majority_sign=args.majority_sign, seed=args.seed)
    graft.save(model, args.out, args.name)
    print(f"wrote {args.method} combination of {', '.join(f'{w:g}*{n}' for (n, _), w in zip(dirs, weights))} "
          f"to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# graft lorahub


def library_entries(path: str | os.PathLike) -> list[dict[str, str]]:
    """The adapters of the library at ``path`` (``Library.open`` checks it): ``{name, path, description}`` each."""
    from graft.compose.library import Library

    library = Library.open(path)
    return [{"name": e.name, "path": str(library.path_of(e.name)), "description": e.description}
            for e in library.entries]


def select_entries(entries: list[dict[str, str]], k: int, select: str, description: str | None,
                   seed: int) -> list[dict[str, str]]:
    """``k`` entries: a seeded random sample (the paper), or the nearest to ``description`` (MiniLM cosine)."""
    if k < 1:
        raise ValueError(f"--k {k}: pick at least one adapter")
    if k >= len(entries):
        return list(entries)
    if select == "random":
        return random.Random(seed).sample(entries, k)
    if not description:
        raise ValueError("--select nearest needs --description (what the new task is, in words)")
    from graft.data.prompting import sentence_embedder

    embed = sentence_embedder()
    vectors = embed([e["description"] for e in entries])  # (n, d), normalised
    query = embed([description])[0]
    order = (vectors @ query).argsort(descending=True).tolist()
    return [entries[i] for i in order[:k]]


def read_examples(path: str | os.PathLike, tokenizer: Any, description: str | None) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from JSONL: ``{"prompt", "completion"}`` rows as they are, or task rows
    ``{"input", "output"}`` rendered with ``description`` as the benchmarks render them."""
    from graft.compose import tasks

    pairs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
                pairs.append((row["prompt"], row["completion"]))
            elif isinstance(row, dict) and isinstance(row.get("input"), str) and isinstance(row.get("output"), str):
                if not description:
                    raise ValueError(f"{path}:{line_no}: task rows (input/output) need --description to be rendered")
                pairs.append((tasks.prompt_text(tokenizer, tasks.messages(description, row)), row["output"]))
            else:
                raise ValueError(  # noqa: TRY004 (a user file)
                    f"{path}:{line_no}: a row needs string prompt/completion or input/output fields")
    if not pairs:
        raise ValueError(f"{path} holds no examples")
    return pairs


def add_lorahub_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in name, transformers dir or .gguf file")
    p.add_argument("--library", help="an adapter library directory (manifest.json)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a LoRA to compose; repeat")
    p.add_argument("--examples", required=True,
                   help="JSONL of {prompt, completion} (rendered) or {input, output} rows (rendered with --description)")
    p.add_argument("--k", type=int, default=20, help="adapters composed from the library")
    p.add_argument("--select", default="random", choices=["random", "nearest"],
                   help="how the k adapters are picked from the library")
    p.add_argument("--description", help="the new task in words (--select nearest; rendering input/output rows)")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME", help="a library adapter to leave out")
    p.add_argument("--budget", type=int, default=40, help="loss evaluations")
    p.add_argument("--bound", type=float, default=1.5, help="weights are searched in [-bound, bound]")
    p.add_argument("--l1", type=float, default=0.05, help="weight of the mean |w| regulariser")
    p.add_argument("--form", default="factors", choices=FORMS,
                   help="factors: the paper's sum of A's and of B's; cat: the exact weighted sum of the deltas")
    p.add_argument("--optimizer", default="NGOpt", help="a nevergrad optimizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="lorahub", help="name of the composed adapter")
    p.add_argument("--out", required=True, help="directory for the composed adapter (PEFT format) and lorahub.json")


def cmd_lorahub(args: argparse.Namespace) -> int:
    import graft
    from graft import models

    if bool(args.library) == bool(args.adapter):
        raise ValueError("give either --library DIR or --adapter NAME=DIR (repeated)")
    if args.library:
        entries = [e for e in library_entries(args.library) if e["name"] not in set(args.exclude)]
        entries = select_entries(entries, args.k, args.select, args.description, args.seed)
    else:
        entries = [{"name": n, "path": p, "description": ""} for n, p in _named_dirs(args.adapter)]
    _check_same_kind([(e["name"], e["path"]) for e in entries])
    model, tok = models.load(args.model)
    examples = read_examples(args.examples, tok, args.description)
    for e in entries:
        graft.load(model, e["path"], e["name"], activate=False)
    result = graft.lorahub(model, tok, [e["name"] for e in entries], examples, name=args.name, budget=args.budget,
                           bound=args.bound, l1=args.l1, form=args.form, optimizer=args.optimizer, seed=args.seed)
    out = graft.save(model, args.out, args.name)
    _write_json(out / "lorahub.json", {**result.to_dict(), "examples": len(examples), "select": args.select,
                                       "library": args.library})
    top = sorted(zip(result.adapters, result.weights), key=lambda x: -abs(x[1]))[:5]
    print(f"LoraHub over {len(entries)} adapters, {args.budget} evaluations in {result.search_seconds:.1f} s: "
          f"loss {result.start_loss:.4f} (w=0) -> {result.loss:.4f}; largest weights "
          + ", ".join(f"{n}={w:+.3f}" for n, w in top))
    print(f"wrote the composed adapter to {out} (weights and trace in lorahub.json)")
    return 0
