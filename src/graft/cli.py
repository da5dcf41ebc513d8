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
    "eval": "graft eval --model smollm2-135m --data gsm8k.jsonl --task math --strategy cot --k 4 --limit 200\n"
            "  graft eval --model smollm2-135m --data sst2.tsv --task classification --text-field sentence "
            "--labels 0=negative,1=positive --strategy few-shot --k 4 --select similar\n"
            "  graft eval --model smollm2-135m --data gsm8k.jsonl --task math --strategy proxy --expert runs/cot/adapter",
    "plan": "graft plan --model llama-2-7b --memory 24GB --seq-len 2048 --batch 4 --goal instructions\n"
            "  graft plan --model ./my-model-dir --memory 16GiB --json\n"
            "  graft plan --model smollm2-135m --memory 8GB --dtype fp32 --device cpu --plot plan.png",
    "serve": "graft serve --model smollm2-135m --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter "
             "--port 8000 --api-key-file keys.txt --adapter-root runs",
    "t2l": "",  # filled from graft.compose.t2l_cli below
}


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graft", description="Parameter-efficient adaptation of transformers.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_.replace("%%", "%"), epilog=f"example:\n  {EXAMPLES[name]}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    add_train_arguments(verb("train", "Fine-tune a model on a data file (LoRA and friends, or full)."))

    from graft.compose import t2l_cli

    EXAMPLES["t2l"] = t2l_cli.EXAMPLE
    t2l_cli.add_arguments(verb("t2l", "Text-to-LoRA: train a hypernetwork that writes LoRAs from task descriptions, "
                                      "or generate one."))

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
    m.add_argument("--quantize", choices=["nf4", "fp4", "int8"],
                   help="the base was quantized in training (graft train --quantize): merge into its dequantized "
                        "weights, so the dense export computes what was trained; default: the full-precision base")

    i = verb("inspect", "Describe an adapter directory: method, rank, targets, sizes, base model.")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")

    add_eval_arguments(verb("eval", "Evaluate a model (and adapter) by a prompting strategy: accuracy with a 95%% "
                                    "interval, tokens, time, per-example JSONL."))

    add_plan_arguments(verb("plan", "What fits in your memory, what each method costs, and which one to use "
                                    "(nothing is loaded: the architecture is built on the meta device)."))

    s = verb("serve", "Serve one base model and many adapters over an OpenAI-compatible HTTP API "
                      "(the request's model field picks the adapter).")
    s.add_argument("--model", help="built-in name, transformers dir or .gguf file (not with --engine vllm)")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="an adapter to serve; repeat")
    s.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                   help="a directory POST /v1/load_lora_adapter may load from; repeat (none: loading over HTTP is refused)")
    s.add_argument("--max-loaded", type=int, help="most adapters held in memory (least recently used are unloaded)")
    s.add_argument("--served-name", help="the model name of the base model (default: --model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key-file", help="file with one API key per line (Bearer auth); default: no auth")
    s.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    s.add_argument("--adapter-dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="dtype adapters are served in (auto: the base model's)")
    s.add_argument("--max-batch", type=int, default=64, help="most requests decoded together")
    s.add_argument("--max-prompt-tokens", type=int, default=4096)
    s.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask for")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--hypernet", help="a Text-to-LoRA hypernetwork: POST /v1/generate_lora_adapter {lora_name, "
                                       "description} makes and serves an adapter")
    s.add_argument("--library", help="an adapter library (manifest.json): its adapters are served by name, and POST "
                                      "/v1/pick_lora_adapter {description} loads the nearest")
    s.add_argument("--adapter-cache", help="where generated adapters are written (default: a temporary directory; "
                                            "with --engine vllm, a directory the vLLM server can read)")
    s.add_argument("--engine", choices=["graft", "vllm"], default="graft",
                   help="vllm: front a vLLM server (--vllm-url): adapters are generated or picked here, loaded there")
    s.add_argument("--vllm-url", help="the vLLM server's base URL (with --engine vllm)")
    s.add_argument("--vllm-api-key-file", help="file whose first key is sent to the vLLM server")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": cmd_train, "generate": cmd_generate, "merge": cmd_merge, "inspect": cmd_inspect,
                "plan": cmd_plan, "eval": cmd_eval, "serve": cmd_serve, "t2l": cmd_t2l}[args.verb](args)
    except (CliError, FileNotFoundError, ValueError, KeyError, ImportError) as e:
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
    ("--quantize", str, "nf4, fp4 or int8: train on a bitsandbytes-quantized base (QLoRA: nf4)"),
    ("--init", str, ("LoRA init: default, gaussian, pissa, olora, or loftq (with --quantize nf4/fp4: base and "
                     "adapter fitted together)")),
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
    ("--strategy", str, "under torchrun: ddp (model on every rank) or fsdp (frozen base sharded across ranks)"),
    ("--dist-timeout", float, "under torchrun: seconds a collective waits for the other ranks (default 1800)"),
]
TRAIN_SWITCHES = [
    ("--packing", "pack several examples per row (default on for causal LM)"),
    ("--train-on-prompt", "supervise the prompt tokens too"),
    ("--chat-template", "render prompts with the tokenizer's chat template"),
    ("--gradient-checkpointing", "recompute activations in backward to save memory"),
    ("--release-cpu-memory", "CPU on Linux: hand freed memory back at once (measured: peak RSS 0.73x, time 1.46x)"),
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
    from graft.train import distributed

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
    main = distributed.is_main()  # under torchrun, rank 0 reports
    distributed.shutdown()
    if not main:
        return 0
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
    from graft.io import atomic_dir_write, read_config

    if args.quantize and read_config(args.adapter).get("init_lora_weights") == "loftq":
        # A LoftQ base is rebuilt from the full-precision weights (graft.load writes Q_T into them);
        # a plain quantize-then-dequantize base would be the wrong one.
        args.quantize = None
    if args.quantize:
        from graft import models, quant

        model, tok = models.load(args.model, quantize=args.quantize, compute_dtype=torch.float32)
        graft.load(quant.dequantize_model(model), args.adapter)  # dense, so the merge below is exact
    else:
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
        # a named init (pissa, olora, loftq: the base it needs), with LoftQ's quantization settings
        "init": cfg.get("init_lora_weights") if isinstance(cfg.get("init_lora_weights"), str) else None,
        "loftq": (cfg.get("loftq_config") or {}).get("graft"),
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
    from graft.compose import t2l

    info = t2l.describe(args.path) if t2l.is_hypernet(args.path) else describe(args.path)
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


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a preset (llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, llama-3-70b, mistral-7b, qwen2-7b, "
                        "smollm2-135m, gpt2, bert-base), a built-in model, or a directory / config.json")
    p.add_argument("--memory", default="24GB", help="accelerator memory: 24GB, 16GiB, 512MB (default 24GB)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--batch", type=int, default=1, help="rows per micro-batch (default 1)")
    p.add_argument("--goal", choices=["instructions", "reasoning", "classification", "multi-task", "no-training"],
                   help="what the fine-tuning is for; shapes the recommendation")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="weights and activations (16-bit = mixed precision); default bf16")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="force it on or off (default: on only where a method needs it to fit)")
    p.add_argument("--r", type=int, default=8, help="LoRA / QLoRA / DoRA rank (default 8)")
    p.add_argument("--targets", help="LoRA targets: comma-separated names, a regex, or all-linear")
    p.add_argument("--virtual-tokens", type=int, default=20, help="prompt / prefix tuning length (default 20)")
    p.add_argument("--logits-chunk", type=int, default=512, help="rows of the LM head computed at once")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--reserve", help="memory the runtime needs besides tensors (default 1GB on cuda, 0 on cpu)")
    p.add_argument("--tasks", type=int, default=1, help="tasks sharing one base (multi-task advice)")
    p.add_argument("--json", action="store_true", help="print one JSON object per method")
    p.add_argument("--plot", metavar="FILE.png", help="write a stacked bar chart of the memory per method")


def cmd_plan(args: argparse.Namespace) -> int:
    from graft.plan import plan
    from graft.recipe import _targets

    result = plan(args.model, memory=args.memory, seq_len=args.seq_len, batch=args.batch, goal=args.goal,
                  dtype=args.dtype, optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing,
                  r=args.r, targets=_targets(args.targets) if args.targets else None,
                  num_virtual_tokens=args.virtual_tokens, logits_chunk=args.logits_chunk, device=args.device,
                  reserve=args.reserve, tasks=args.tasks)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result)
    if args.plot:
        print(f"wrote {result.plot(args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0



def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in name, transformers dir or .gguf file")
    p.add_argument("--adapter", help="adapter directory to evaluate with (PEFT format)")
    p.add_argument("--data", required=True, help="rows to evaluate: .jsonl, .json, .csv or .tsv")
    p.add_argument("--task", required=True, choices=["math", "classification", "exact"],
                   help="math: GSM8K-style numbers; classification: label likelihood; exact: normalised match")
    p.add_argument("--strategy", default="zero-shot",
                   choices=["zero-shot", "few-shot", "cot", "zero-shot-cot", "self-consistency", "proxy"])
    p.add_argument("--k", type=int, help="few-shot / cot: exemplars (default 4); self-consistency: chains (default 5)")
    p.add_argument("--shots", type=int, help="exemplars in the prompt (self-consistency; default 4)")
    p.add_argument("--select", choices=["first", "random", "similar"], default="first",
                   help="exemplar selection (similar: nearest by all-MiniLM-L6-v2 embedding)")
    p.add_argument("--exemplars", help="file to draw exemplars from (default: --data; a row is never its own)")
    p.add_argument("--expert", help="proxy: the expert, an adapter directory (anti-expert: its base with the "
                                    "adapter off) or a model (then --anti-expert is needed)")
    p.add_argument("--expert-model", help="proxy: the model the --expert adapter belongs to (default: --model)")
    p.add_argument("--anti-expert", help="proxy: the untuned model (default: the expert's base, adapter off)")
    p.add_argument("--alpha", type=float, default=1.0, help="proxy: steering strength (paper: 1.0)")
    p.add_argument("--limit", type=int, help="evaluate the first N rows")
    p.add_argument("--batch-size", type=int, default=8, help="sequences generated or scored at once")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="sampling temperature (default: greedy; self-consistency 0.7)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", help="query template with {field} names, e.g. 'Q: {question}\\nA:'")
    p.add_argument("--instruction", help="text before the exemplars (chat: the system message)")
    p.add_argument("--labels", help="classification verbalisers: LABEL=word,..., e.g. 0=negative,1=positive")
    p.add_argument("--text-field", help="column holding the text (classification)")
    p.add_argument("--label-field", help="column holding the label (classification)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the tokenizer's chat template (default: when it has one)")
    p.add_argument("--max-prompt-tokens", type=int, help="prompt budget: exemplars are dropped to fit, the query "
                                                         "is never cut (default: context minus answer)")
    p.add_argument("--out", help="output directory (default runs/eval-TASK-STRATEGY)")


def _eval_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """(shots, samples) from --k / --shots, which mean different things per strategy."""
    s = args.strategy
    if s in ("few-shot", "cot"):
        if args.k is not None and args.shots is not None and args.k != args.shots:
            raise CliError(f"--strategy {s}: --k and --shots both set the exemplars; give one")
        return next((v for v in (args.k, args.shots) if v is not None), 4), 1
    if s == "self-consistency":
        return (4 if args.shots is None else args.shots), (5 if args.k is None else args.k)
    given = [flag for flag, value in (("--k", args.k), ("--shots", args.shots)) if value is not None]
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise CliError(f"{' and '.join(given)} {verb} not apply to --strategy {s} (it shows no exemplars)")
    return 0, 1


def _eval_labels(text: str | None) -> dict[str, str] | None:
    if text is None:
        return None
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    if not pairs or any(not sep or not k.strip() or not v.strip() for k, sep, v in pairs):
        raise CliError(f"--labels {text!r} must look like LABEL=word,LABEL=word, e.g. 0=negative,1=positive")
    return {k.strip(): v.strip() for k, _, v in pairs}


def _proxy_source(args: argparse.Namespace, model, tok):
    """base / expert / anti-expert members for --strategy proxy."""
    import graft
    from graft import decode, models

    expert = Path(args.expert)
    if not expert.exists():
        raise FileNotFoundError(f"--expert {args.expert} does not exist")
    base = decode.adapter_on(model, "default") if args.adapter else decode.adapter_off(model)
    tokenizers = [tok]
    if (expert / "adapter_config.json").is_file():
        same = args.expert_model in (None, args.model)
        small, small_tok = (model, tok) if same else models.load(args.expert_model)
        graft.load(small, expert, name="expert", activate=False)
        expert_member, anti = decode.adapter_on(small, "expert"), decode.adapter_off(small)
        tokenizers.append(small_tok)
    elif (expert / "config.json").is_file() or expert.suffix == ".gguf":
        if not args.anti_expert:
            raise CliError("--expert is a model, so --anti-expert (its untuned counterpart) is needed")
        small, small_tok = models.load(expert)
        expert_member = decode.Member(small)
        tokenizers.append(small_tok)
    else:
        raise CliError(f"--expert {args.expert} is neither an adapter directory (adapter_config.json) nor a model")
    if args.anti_expert:
        anti_model, anti_tok = models.load(args.anti_expert)
        anti = decode.Member(anti_model)
        tokenizers.append(anti_tok)
    return decode.ProxyTuner(base, expert_member, anti, alpha=args.alpha, tokenizers=tokenizers)


def cmd_eval(args: argparse.Namespace) -> int:
    from graft import data, decode

    shots, samples = _eval_sizes(args)
    if (args.strategy == "proxy") != bool(args.expert):
        raise CliError("--strategy proxy needs --expert DIR" if args.expert is None
                       else "--expert goes with --strategy proxy")
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be >= 1, got {args.limit}")
    fields = {k: v for k, v in (("text", args.text_field), ("label", args.label_field)) if v}
    temperature = {"temperature": args.temperature} if args.temperature is not None else {}
    if args.strategy == "self-consistency":
        temperature = {"sc_temperature": args.temperature} if args.temperature is not None else {}
    def unescape(text: str | None) -> str | None:  # a shell passes "\\n" literally
        return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")

    config = decode.EvalConfig(
        task=args.task, strategy=args.strategy, shots=shots, samples=samples, selection=args.select,
        chat=args.chat_template, template=unescape(args.template), instruction=unescape(args.instruction),
        labels=_eval_labels(args.labels), fields=fields or None, max_new_tokens=args.max_new_tokens,
        top_p=args.top_p, batch_size=args.batch_size, seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
        **temperature,
    )
    records = data.read(args.data)
    pool = data.read(args.exemplars) if args.exemplars else records
    model, tok = _load_model(args.model, args.adapter)
    source = _proxy_source(args, model, tok) if args.strategy == "proxy" else model
    meta = {"model": args.model, "adapter": args.adapter, "expert": args.expert, "data": args.data}
    result = decode.evaluate(source, tok, records[: args.limit], config, pool=pool, meta=meta)
    paths = decode.write_results(result, args.out or f"runs/eval-{args.task}-{args.strategy}")
    s = result.summary
    print(decode.format_table([s]))
    print(f"\naccuracy {100 * s['accuracy']:.1f}% (95% CI {100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f}), "
          f"{s['tokens']:,} tokens in {s['seconds']:.1f}s; wrote {paths['predictions']} and {paths['table']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def cmd_t2l(args: argparse.Namespace) -> int:
    from graft.compose import t2l_cli

    return t2l_cli.run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from graft.serve import Limits, read_api_keys, serve

    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--adapter takes NAME=DIR, got {item!r}")
        if name in adapters:
            raise CliError(f"--adapter {name} is given twice")
        adapters[name] = path
    keys = read_api_keys(args.api_key_file) if args.api_key_file else None
    if args.engine == "vllm":
        from graft.serve.dispatch import Dispatcher, serve_vllm

        if not args.vllm_url or not (args.hypernet or args.library):
            raise CliError("--engine vllm needs --vllm-url and --hypernet and/or --library")
        upstream_key = read_api_keys(args.vllm_api_key_file)[0] if args.vllm_api_key_file else None
        serve_vllm(Dispatcher(args.hypernet, args.library, args.adapter_cache), args.vllm_url, host=args.host,
                   port=args.port, api_keys=keys or (), vllm_api_key=upstream_key, max_body_bytes=args.max_body_bytes)
        return 0
    if not args.model:
        raise CliError("--model is required (the base model to serve)")
    limits = Limits(args.max_body_bytes, args.max_prompt_tokens, args.max_tokens)
    serve(args.model, host=args.host, port=args.port, adapters=adapters, adapter_roots=args.adapter_root,
          max_loaded=args.max_loaded, api_keys=keys, limits=limits, max_batch=args.max_batch, dtype=args.dtype,
          served_name=args.served_name, adapter_dtype=args.adapter_dtype, hypernet=args.hypernet, library=args.library,
          cache_dir=args.adapter_cache)
    return 0
