"""`graft <verb>`: the command line. Each verb's ``--help`` ends with an example."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = {
    "train": "graft train --model smollm2-135m --data train.jsonl --method lora --r 16 --targets all-linear "
             "--epochs 1 --out runs/x\n  graft train config.yaml --max-steps 100",
    "generate": 'graft generate --model smollm2-135m --adapter runs/x/adapter --prompt "What is LoRA?"',
    "merge": "graft merge --model smollm2-135m --adapter runs/x/adapter --out runs/x/merged --dtype bf16",
    "inspect": "graft inspect runs/x/adapter",
}


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graft", description="Parameter-efficient adaptation of transformers.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=f"example:\n  {EXAMPLES[name]}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    add_train_arguments(verb("train", "Fine-tune a model on a data file (LoRA and friends, or full)."))

    g = verb("generate", "Generate text with a model and an optional adapter (chat template applied).")
    g.add_argument("--model", required=True, help="built-in name, transformers dir or .gguf file")
    g.add_argument("--adapter", help="adapter directory (PEFT format)")
    g.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-chat-template", action="store_true", help="send the raw prompt")

    m = verb("merge", "Merge an adapter into its base and write a plain transformers model directory.")
    m.add_argument("--model", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")

    i = verb("inspect", "Describe an adapter directory: method, rank, targets, sizes, base model.")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": cmd_train, "generate": cmd_generate, "merge": cmd_merge, "inspect": cmd_inspect}[args.verb](args)
    except (CliError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"graft {args.verb}: error: {msg}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------


# (flag, type, help); the flag's name with "_" is the YAML key. Only flags given override the YAML.
TRAIN_FLAGS = [
    ("--model", str, "built-in name (smollm2-135m, minilm), transformers dir or .gguf file"),
    ("--data", str, "training data: .jsonl, .json, .csv or .tsv"),
    ("--eval-data", str, "held-out data (default: --eval-split of the training data)"),
    ("--eval-split", float, "fraction of the training data held out for evaluation"),
    ("--format", str, "alpaca, chat, completion, text, classification, cot or table (default: detected)"),
    ("--template", str, "prompt template with {field} names, e.g. 'Q: {question}\nA:'"),
    ("--max-length", int, "tokens per example (the prompt is cut first, never the response)"),
    ("--method", str, ("lora, rslora, dora, ia3, adapter, prompt-tuning, p-tuning, prefix-tuning, bitfit, "
                       "child-tuning, probe or full")),
    ("--r", int, "LoRA rank"),
    ("--alpha", float, "LoRA alpha"),
    ("--dropout", float, "LoRA dropout"),
    ("--targets", str, "comma-separated module names, a regex, or all-linear"),
    ("--task", str, "causal-lm or classification"),
    ("--text-field", str, "column holding the text (classification)"),
    ("--label-field", str, "column holding the label (classification)"),
    ("--limit", int, "use only the first N training examples"),
    ("--epochs", int, "passes over the data"),
    ("--max-steps", int, "optimizer steps (overrides --epochs)"),
    ("--batch-size", int, "examples per micro-batch"),
    ("--grad-accum", int, "micro-batches per optimizer step"),
    ("--lr", float, "peak learning rate"),
    ("--weight-decay", float, "decoupled weight decay"),
    ("--optimizer", str, "adamw or adamw8bit"),
    ("--loraplus-ratio", float, "LoRA+: lr of B = ratio x lr"),
    ("--schedule", str, "cosine, linear or constant"),
    ("--warmup-steps", int, "linear warmup steps"),
    ("--warmup-ratio", float, "warmup as a fraction of all steps"),
    ("--max-grad-norm", float, "gradient clipping (0 = off)"),
    ("--autocast", str, "bf16 or fp16 where the hardware supports it"),
    ("--seed", int, "seed for weights init, data order and dropout"),
    ("--eval-every", int, "evaluate every N steps"),
    ("--save-every", int, "checkpoint every N steps"),
    ("--logits-chunk", int, "rows of the output head computed at once"),
    ("--out", str, "output directory (adapter, checkpoints, metrics.jsonl, loss.png)"),
]
TRAIN_SWITCHES = [
    ("--packing", "pack several examples per row (default on for causal LM)"),
    ("--train-on-prompt", "supervise the prompt tokens too"),
    ("--chat-template", "render prompts with the tokenizer's chat template"),
    ("--gradient-checkpointing", "recompute activations in backward to save memory"),
]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (flags override its keys)")
    for flag, typ, help_ in TRAIN_FLAGS:
        p.add_argument(flag, type=typ, help=help_, default=argparse.SUPPRESS)
    for flag, help_ in TRAIN_SWITCHES:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_, default=argparse.SUPPRESS)
    p.add_argument("--method-arg", action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                   help="a setting of the method, e.g. num_virtual_tokens=20 or placement=pfeiffer (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")


def _key_values(items: list[str]) -> dict[str, object]:
    """["a=1", "b=mlp"] -> {"a": 1, "b": "mlp"} (values read as YAML: numbers, booleans, lists)."""
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--method-arg {item!r} must look like KEY=VALUE, e.g. num_virtual_tokens=20")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from graft import recipe

    options = recipe.read_yaml(args.config) if args.config else {}
    where = args.config or "flags"
    given = {k: v for k, v in vars(args).items() if k not in ("verb", "config", "resume")}
    if "out" in given:
        given["out_dir"] = given.pop("out")
    if "method_arg" in given:
        given["method_args"] = {**(options.get("method_args") or {}), **_key_values(given.pop("method_arg"))}
    if "out" in options:
        options["out_dir"] = options.pop("out")
    options.update(given)
    options.setdefault("out_dir", "runs/latest")
    job, config = recipe.split_options(options, where)
    _, _, result = recipe.run(job, config, resume=args.resume)
    print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}"
          + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
          + f", {result.seconds:.0f}s, peak RSS {result.peak_rss_mb:.0f} MB -> {result.saved_to}")
    return 0


def _load_model(name: str, adapter: str | None):
    import graft
    from graft import models

    model, tokenizer = models.load(name)
    if adapter:
        graft.load(model, adapter)
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    model, tok = _load_model(args.model, args.adapter)
    torch.manual_seed(args.seed)
    if args.no_chat_template or not getattr(tok, "chat_template", None):
        texts = list(args.prompt)
    else:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in args.prompt]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=args.no_chat_template)
    sample = args.temperature > 0
    kw = {"do_sample": sample, "max_new_tokens": args.max_new_tokens, "pad_token_id": tok.pad_token_id}
    if sample:
        kw.update(temperature=args.temperature, top_p=args.top_p)
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    for prompt, row in zip(args.prompt, out):
        text = tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        print(text if len(args.prompt) == 1 else f"### {prompt}\n{text}\n")
    return 0


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    import graft
    from graft.io import atomic_dir_write

    model, tok = _load_model(args.model, args.adapter)
    plain = graft.unload(model, merge=True).to(getattr(torch, DTYPES[args.dtype]))

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_dir_write(Path(args.out), write)
    print(f"wrote a merged {args.dtype} model to {args.out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def describe(path: str) -> dict:
    """What an adapter directory holds: method, rank, targets, sizes, base model."""
    from graft.io import WEIGHTS_NAME, read_config, read_tensors

    cfg = read_config(path)
    tensors = read_tensors(path)
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    return {
        "path": str(path),
        "method": cfg.get("peft_type"),
        "variant": [k for k in ("use_dora", "use_rslora") if cfg.get(k)] or None,
        "r": cfg.get("r"),
        "alpha": cfg.get("lora_alpha"),
        "targets": cfg.get("target_modules"),
        "modules_to_save": cfg.get("modules_to_save"),
        "task_type": cfg.get("task_type"),
        "base_model": cfg.get("base_model_name_or_path"),
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "weights_file": WEIGHTS_NAME,
        "bytes": size,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k == "bytes":
            v = f"{v:,} ({v / 1e6:.2f} MB)"
        elif k == "parameters":
            v = f"{v:,}"
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
