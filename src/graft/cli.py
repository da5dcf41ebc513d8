"""`graft <verb>`: the command line. Each verb's ``--help`` ends with an example."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from graft.compose.commands import (
    COMBINE_EXAMPLE,
    LORAHUB_EXAMPLE,
    add_combine_arguments,
    add_lorahub_arguments,
    cmd_combine,
    cmd_lorahub,
)
from graft.options import OptionError, cli_renderer

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
    "plan": "graft plan --model llama-2-7b --memory 24GB --device cuda --seq-len 2048 --batch 4 --goal instructions\n"
            "  graft plan --model ./my-model-dir --memory 16GiB --json\n"
            "  graft plan --model smollm2-135m --memory 8GB --dtype fp32 --device cpu --plot plan.png",
    "export": "graft export --adapter runs/x/adapter --format gguf --out x-lora.gguf "
              "(then: llama-cli -m base.gguf --lora x-lora.gguf)",
    "push": "graft push --adapter runs/x/adapter --repo me/smollm2-sql --private",
    "combine": COMBINE_EXAMPLE,
    "lorahub": LORAHUB_EXAMPLE,
    "serve": "graft serve --model smollm2-135m --adapter sql=runs/sql/adapter --adapter chat=runs/chat/adapter "
             "--port 8000 --api-key-file keys.txt --adapter-root runs",
    "library": "graft library build --model smollm2-135m --tasks ../shared/data/tasks/index.json --out lib/ "
               "--r 8 --targets q_proj,v_proj\n  graft library list lib/\n"
               '  graft library search lib/ "translate to German" --k 5',
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
    g.add_argument("--model", required=True, help="built-in name, transformers dir, .gguf file or hub id (org/name)")
    g.add_argument("--revision", help="hub model branch, tag or commit")
    g.add_argument("--adapter", help="adapter directory (PEFT format)")
    g.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the tokenizer's chat template (default: the adapter's training format "
                        "if it saved one, else when the tokenizer has a template); --no-chat-template: raw text")
    g.add_argument("--template", help="prompt template with one {field} the prompt fills, e.g. 'Q: {q}\\nA:' "
                                      "(default: the adapter's training format)")
    add_runtime_arguments(g)

    m = verb("merge", "Merge an adapter into its base and write a plain transformers model directory.")
    m.add_argument("--model", required=True)
    m.add_argument("--revision", help="hub model branch, tag or commit")
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="fp32",
                   help="the merged model's dtype (the merge itself runs in fp32); auto: as graft generate would load")
    m.add_argument("--device", default="auto", help="where the merge runs: auto (CUDA when present), cpu, cuda, cuda:N")
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

    x = verb("export", "Export a LoRA adapter for another runtime: llama.cpp's GGUF LoRA format.")
    x.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT format)")
    x.add_argument("--format", choices=["gguf"], default="gguf", help="gguf: llama.cpp's adapter file (--lora)")
    x.add_argument("--out", required=True, help="file to write, e.g. adapter.gguf")
    x.add_argument("--model", help="the base model, for its config (default: base_model_name_or_path of the adapter)")
    x.add_argument("--revision", help="hub revision of --model")
    x.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="tensor type in the file (default f32)")

    u = verb("push", "Upload an adapter directory to the Hugging Face hub, with a model card (README.md).")
    u.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    u.add_argument("--repo", required=True, help="hub repository, org/name (created if missing)")
    u.add_argument("--private", action="store_true", help="create the repository as private")
    u.add_argument("--token", help="hub token (default: HF_TOKEN or the token of `hf auth login`)")
    u.add_argument("--message", help="commit message")

    add_combine_arguments(verb("combine", "Combine adapters into a new one with weights (linear, cat, svd, ties, "
                                          "dare, task arithmetic), written in PEFT format."))
    add_lorahub_arguments(verb("lorahub", "Compose library LoRAs for a new task from a few examples (LoraHub: "
                                          "gradient-free search of their weights)."))

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
    add_runtime_arguments(s)
    s.add_argument("--adapter-dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="dtype adapters are served in (auto: the base model's)")
    s.add_argument("--max-batch", type=int, default=64, help="most requests decoded together")
    s.add_argument("--max-prompt-tokens", type=int, default=4096)
    s.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask for")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--max-request-tokens", type=int,
                   help="most tokens one request may hold, prompt + max_tokens (default: the model's context)")
    s.add_argument("--kv-cache-budget", default="auto",
                   help="most memory the key/value cache may take, e.g. 2GB; requests that do not fit wait "
                        "(auto: half the memory available at start; none: no limit)")
    s.add_argument("--max-queue", type=int, default=1024, help="most requests waiting for admission (more get 429)")
    s.add_argument("--max-adapter-weight", type=float, default=1e4,
                   help="largest adapter weight magnitude admitted (0: any finite value); NaN/inf are always refused")
    s.add_argument("--shutdown-grace", type=float, default=30,
                   help="seconds in-flight requests may finish after SIGTERM/SIGINT; then they get an error reply")
    s.add_argument("--expose-adapter-paths", action="store_true",
                   help="show adapter directories in GET /v1/models (an admin option; hidden by default)")

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

    from graft.compose.library_cli import add_library_arguments

    add_library_arguments(verb("library", "An adapter library: build one LoRA per task of a task collection, "
                                          "list it, search it by description."))
    return p


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, resolved by graft.runtime.resolve (the same words in every verb)."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that support it, else fp16; fp32 on CPUs), "
                                                   "fp32, bf16 or fp16")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        status = {"train": cmd_train, "generate": cmd_generate, "merge": cmd_merge, "inspect": cmd_inspect,
                  "plan": cmd_plan, "eval": cmd_eval, "serve": cmd_serve, "export": cmd_export,
                  "push": cmd_push, "library": cmd_library, "combine": cmd_combine,
                  "lorahub": cmd_lorahub, "t2l": cmd_t2l}[args.verb](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:  # `graft inspect --json | head`: the reader has what it wanted
        _silence_stdout()
        return 128 + signal.SIGPIPE if hasattr(signal, "SIGPIPE") else 1
    except OptionError as e:  # names options as flags (--resume, not resume=True), or as the YAML keys given
        return _error(args.verb, e.render(cli_option(parser, args)))
    except (CliError, FileNotFoundError, ValueError, KeyError, ImportError) as e:
        return _error(args.verb, e.args[0] if isinstance(e, KeyError) and e.args else e)


def _error(verb: str, message: object) -> int:
    print(f"graft {verb}: error: {message}", file=sys.stderr)
    return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so flushing what is left at exit cannot raise again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stdout (tests, notebooks): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


# --------------------------------------------------------------------------------------------


# (flag, type, help); the flag's name with "_" is the YAML key. Only flags given override the YAML.
TRAIN_FLAGS = [
    ("--model", str, "built-in name (smollm2-135m, minilm), transformers dir, .gguf file or hub id (org/name)"),
    ("--revision", str, "hub model branch, tag or commit"),
    ("--data", str, ("training data: .jsonl, .json, .csv, .tsv, .parquet, a datasets directory (save_to_disk or "
                     "data files) or a hub data set name (org/name); ShareGPT / OpenAI-messages rows become chat")),
    ("--data-split", str, "split of a datasets directory or hub data set (default train)"),
    ("--data-config", str, "configuration (subset) of a hub data set, e.g. main"),
    ("--eval-data", str, "held-out data (default: --eval-split of the training data)"),
    ("--eval-split", float, "fraction of the training data held out for evaluation"),
    ("--format", str, "alpaca, chat, completion, text, classification, cot or table (default: detected)"),
    ("--template", str, "prompt template with {field} names, e.g. 'Q: {question}\nA:'"),
    ("--system", str, "system message first in every conversation (with --chat-template or chat rows)"),
    ("--max-length", int, "tokens per example (the prompt is cut first, never the response)"),
    ("--on-overflow", str, "a response longer than --max-length: error (default), skip the row, or truncate it"),
    ("--method", str, ("lora, rslora, dora, ia3, adapter, prompt-tuning, p-tuning, prefix-tuning, bitfit, "
                       "child-tuning, probe or full; qlora = lora with --quantize nf4")),
    ("--r", int, "LoRA rank (default 16; for methods with a rank)"),
    ("--alpha", float, "LoRA alpha (default 32; scaling alpha/r, or alpha/sqrt(r) with --rslora)"),
    ("--dropout", float, "LoRA dropout (default 0)"),
    ("--targets", str, "comma-separated module names, a regex, or all-linear (LoRA default)"),
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
    ("--lr", float, ("peak learning rate (LoRA: 5e-4 after a 10%% warmup, rsLoRA 2e-4; other methods and DPO: "
                     "2e-4)")),
    ("--weight-decay", float, "decoupled weight decay"),
    ("--optimizer", str, "adamw or adamw8bit"),
    ("--loraplus-ratio", float, "LoRA+: lr of B = ratio x lr"),
    ("--head-lr-ratio", float, ("lr of a head trained in full next to the adapter (a new classifier) = ratio x lr "
                                "(LoRA default 4)")),
    ("--schedule", str, "cosine, linear or constant"),
    ("--warmup-steps", int, "linear warmup steps"),
    ("--warmup-ratio", float, "warmup as a fraction of all steps"),
    ("--max-grad-norm", float, "gradient clipping (0 = off)"),
    ("--autocast", str, "bf16 or fp16: the older name of --dtype (give one; they must agree)"),
    ("--device", str, "auto (CUDA when present), cpu, cuda or cuda:N"),
    ("--dtype", str, ("auto (bf16 on GPUs that support it, fp32 weights + bf16 autocast on CPUs with "
                      "AVX512-BF16/AMX, else fp32), fp32, bf16 or fp16")),
    ("--seed", int, "seed for weights init, data order and dropout"),
    ("--eval-every", int, "evaluate every N steps"),
    ("--save-every", int, "checkpoint every N steps"),
    ("--logits-chunk", int, "rows of the output head computed at once"),
    ("--out", str, "output directory (adapter, checkpoints, metrics.jsonl, loss.png)"),
    ("--strategy", str, "under torchrun: ddp (model on every rank) or fsdp (frozen base sharded across ranks)"),
    ("--dist-timeout", float, "under torchrun: seconds a collective waits for the other ranks (default 1800)"),
    ("--push-to-hub", str, "after training, upload the adapter to this hub repository (org/name), with a model card"),
    ("--objective", str, ("sft (default) or dpo: preference pairs (prompt / chosen / rejected), the base with the "
                         "adapter disabled as reference")),
    ("--beta", float, "DPO beta: how far the adapter may move from the base (default 0.1)"),
    ("--label-smoothing", float, "conservative DPO: assumed probability a preference is flipped, in [0, 0.5)"),
    ("--report-to", str, "none, tensorboard, wandb or mlflow (comma-separated for several), besides metrics.jsonl"),
    ("--early-stopping-patience", int, "stop after N evaluations without improvement (needs --eval-every)"),
    ("--early-stopping-threshold", float, "least eval-loss decrease that counts as an improvement (default 0)"),
    ("--threads", int, "CPU threads for torch (default: the cores this process may use)"),
]
TRAIN_SWITCHES = [
    ("--packing", "pack several examples per row (default on for causal LM)"),
    ("--rslora", "LoRA family: scale by alpha/sqrt(r) (rsLoRA); default off: alpha/r, as peft"),
    ("--train-on-prompt", "supervise the prompt tokens too"),
    ("--chat-template", "render prompts with the tokenizer's chat template"),
    ("--gradient-checkpointing", "recompute activations in backward to save memory"),
    ("--compile", "torch.compile each decoder layer (about 1.13x per step on a CPU after ~24 s of compiling)"),
    ("--release-cpu-memory", "CPU on Linux: hand freed memory back at once (measured: peak RSS 0.73x, time 1.46x)"),
    ("--hub-private", "with --push-to-hub: create the repository as private"),
    ("--precompute-ref", "DPO: compute the reference log-probabilities once before training, not every step"),
    ("--keep-best", "save the adapter of the evaluation with the lowest eval loss (needs --eval-every)"),
    ("--overwrite", "replace the run already in --out (its adapter, metrics, checkpoints)"),
]


def _option_flags() -> dict[str, str]:
    """Every train option key -> the flag that sets it (keys without one are YAML-only)."""
    flags = {flag[2:].replace("-", "_"): flag for flag, *_ in (*TRAIN_FLAGS, *TRAIN_SWITCHES)}
    flags["out_dir"] = flags.pop("out")
    return {**flags, "resume": "--resume", "method_args": "--method-arg", "fields": "--text-field / --label-field"}


def cli_option(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """How verb ``args.verb`` names an option in an error: --resume, --max-steps 0, no --quantize; for
    train, ``lr: fast`` where the value came from the YAML config."""
    if args.verb == "train":
        return cli_renderer(_option_flags(), switches=[flag[2:].replace("-", "_") for flag, _ in TRAIN_SWITCHES],
                            yaml_keys=getattr(args, "yaml_keys", ()))
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in verbs.choices[args.verb]._actions if a.option_strings]
    flags = {a.dest: next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0]) for a in actions}
    return cli_renderer(flags, switches=[a.dest for a in actions if a.nargs == 0], yaml=False)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (flags override its keys)")
    for flag, typ, help_ in TRAIN_FLAGS:
        p.add_argument(flag, type=typ, help=help_, default=argparse.SUPPRESS)
    for flag, help_ in TRAIN_SWITCHES:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_, default=argparse.SUPPRESS)
    p.add_argument("--method-arg", action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                   help="a setting of the method, e.g. num_virtual_tokens=20 or placement=pfeiffer (repeatable)")
    p.add_argument("--field", action="append", metavar="FIELD=COLUMN", default=argparse.SUPPRESS,
                   help="read a format field from another column, e.g. instruction=question (repeatable; "
                        "YAML: fields: {instruction: question})")
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
    if "field" in given:
        from graft.data.sources import parse_fields

        given["fields"] = {**parse_fields(options.get("fields")), **parse_fields(given.pop("field"))}
    if "out" in options:
        options["out_dir"] = options.pop("out")
    args.yaml_keys = set(options) - set(given)  # errors name these as the config file does
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
    _print_outcome(result)
    if job.push_to_hub:
        from graft import hub

        try:
            url = hub.push(Path(result.saved_to), job.push_to_hub, private=job.hub_private)
        except (hub.HubError, OSError) as err:
            raise CliError(f"training finished and the adapter is in {result.saved_to}, but the push failed: {err} "
                           f"Retry with: graft push --adapter {result.saved_to} --repo {job.push_to_hub}") from None
        print(f"pushed {result.saved_to} to {job.push_to_hub}: {url}")
    return 0


def _print_outcome(result) -> None:
    """Why the run ended early, which weights were saved, and where every output went."""
    from graft.train.report import outputs_summary

    stopped, best_step = getattr(result, "stopped_early", None), getattr(result, "best_step", None)
    if stopped:
        print(f"stopped after step {result.steps}: {stopped}")
    if best_step is not None:
        best = next((e["eval_loss"] for e in result.evals if e["step"] == best_step), None)
        print(f"saved the best weights: step {best_step}" + (f" (eval loss {best:.4f})" if best is not None else "")
              + ", not the last step's")
    if getattr(result, "outputs", None):
        print(outputs_summary(result.outputs))


def _choice(args: argparse.Namespace):
    """--device / --dtype resolved for inference, said on stderr."""
    from graft import runtime

    choice = runtime.resolve(args.device, args.dtype)
    runtime.announce(choice, f"graft {args.verb}")
    return choice


def _load_model(name: str, adapter: str | None, choice=None, revision: str | None = None):
    import graft
    from graft import models, runtime

    model, tokenizer = models.load(name, revision=revision,
                                   **({"dtype": choice.torch_dtype} if choice is not None else {}))
    if adapter:
        graft.load(model, adapter)
    if choice is not None:
        runtime.place(model, choice)
    return model, tokenizer


def _prompt_format(args: argparse.Namespace, tok, chat: bool | None, template: str | None):
    """The adapter's (or tuned model's) saved training format with the user's explicit choices on top;
    one warning line when they go against it."""
    from graft.data import promptformat

    source = args.adapter or (args.model if Path(args.model).is_dir() else None)
    saved = promptformat.read(source)
    fmt, notes = promptformat.choose(saved, tok, chat=chat, template=template)
    if saved is not None:
        notes += promptformat.check_tokenizer(saved, tok)
    if notes:
        print(f"graft {args.verb}: warning: {'; '.join(notes)} ({source}/{promptformat.FILENAME}: "
              f"{saved.describe()})", file=sys.stderr)
    return fmt, saved


def generation_prompts(args: argparse.Namespace, tok) -> list[list[int]]:
    """The token ids of each --prompt, rendered as the adapter was trained (or as the flags say)."""
    fmt, _ = _prompt_format(args, tok, args.chat_template, _unescape(args.template))
    return [fmt.prompt_ids(tok, p) for p in args.prompt]


def _unescape(text: str | None) -> str | None:  # a shell passes "\\n" literally
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    model, tok = _load_model(args.model, args.adapter, _choice(args), args.revision)
    torch.manual_seed(args.seed)
    prompts = generation_prompts(args, tok)
    width = max(len(ids) for ids in prompts)
    pad = tok.pad_token_id
    device = next(model.parameters()).device
    enc = {"input_ids": torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=device),
           "attention_mask": torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts],
                                          device=device)}
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

        model, tok = models.load(args.model, quantize=args.quantize, compute_dtype=torch.float32,
                                 revision=args.revision)
        graft.load(quant.dequantize_model(model), args.adapter)  # dense, so the merge below is exact
    else:
        model, tok = _load_model(args.model, args.adapter, revision=args.revision)
    _check_mergeable(model, args.adapter)
    from graft import runtime

    # The merge runs in fp32 wherever --device says; only the result is cast to --dtype.
    where = runtime.resolve(args.device, "fp32")
    out_dtype = runtime.resolve(args.device, args.dtype).param_dtype if args.dtype == "auto" else args.dtype
    runtime.announce(runtime.Choice(where.device, out_dtype, None, "merged in fp32"), "graft merge")
    plain = graft.unload(runtime.place(model, where), merge=True).to(getattr(torch, DTYPES[out_dtype]))

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_dir_write(Path(args.out), write)
    print(f"wrote a merged {out_dtype} model to {args.out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def _check_mergeable(model, adapter: str) -> None:
    """A method that adds inputs or modules (prompt, prefix, adapter layers) has no weight to fold into."""
    from graft.core import state_of

    for method in state_of(model).methods.values():
        if not getattr(method, "mergeable", True):
            raise CliError(f"{adapter} is a {type(method).__name__} adapter, which adds inputs or layers rather "
                           "than changing weights, so it cannot be merged into the base model; use it as it is "
                           f"(graft generate / eval / serve --adapter {adapter})")


def describe(path: str) -> dict:
    """What an adapter directory holds: method, rank, targets, sizes, base model."""
    from graft.data import promptformat
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
        # how training rendered prompts (graft_format.json), which generate / eval / serve reuse
        "prompt_format": fmt.to_json() if (fmt := promptformat.read(path)) is not None else None,
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
        elif k == "prompt_format" and v is not None:
            from graft.data.promptformat import PromptFormat

            v = PromptFormat.from_json(v).describe()
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
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="as graft train --dtype (16-bit = mixed precision); default auto: what graft train would "
                        "choose on --device")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="force it on or off (default: on only where a method needs it to fit)")
    p.add_argument("--r", type=int, default=8, help="LoRA / QLoRA / DoRA rank (default 8)")
    p.add_argument("--targets", help="LoRA targets: comma-separated names, a regex, or all-linear")
    p.add_argument("--virtual-tokens", type=int, default=20, help="prompt / prefix tuning length (default 20)")
    p.add_argument("--logits-chunk", type=int, default=512, help="rows of the LM head computed at once")
    p.add_argument("--device", default="auto",
                   help="as graft train --device: auto (this machine's CUDA GPU, else its CPU), cpu, cuda, cuda:N; "
                        "cuda on a machine without one plans for a bf16-capable GPU")
    p.add_argument("--reserve", help="memory the runtime needs besides tensors (default 1GB on cuda, 0 on cpu)")
    p.add_argument("--tasks", type=int, default=1, help="tasks sharing one base (multi-task advice)")
    p.add_argument("--json", action="store_true", help="print one JSON object per method")
    p.add_argument("--plot", metavar="FILE.png", help="write a stacked bar chart of the memory per method")


def plan_choice(device: str, dtype: str, hardware=None):
    """What graft train would choose (graft.runtime.resolve, training, adapter methods) on ``device``;
    ``cuda`` named on a machine without a GPU plans for one that computes bf16 (compute capability 8.0)."""
    from graft import runtime

    hw = runtime.detect() if hardware is None else hardware
    device, _ = runtime.check_words(device, dtype)
    if device.startswith("cuda") and not hw.cuda_capabilities:
        index = int(device.partition(":")[2] or 0)
        hw = dataclasses.replace(hw, cuda_capabilities=((8, 0),) * (index + 1))
    return runtime.resolve(device, dtype, training=True, hardware=hw)


def cmd_plan(args: argparse.Namespace) -> int:
    from graft.plan import plan
    from graft.recipe import _targets

    choice = plan_choice(args.device, args.dtype)
    print(f"graft plan: {choice.describe()}", file=sys.stderr)
    result = plan(args.model, memory=args.memory, seq_len=args.seq_len, batch=args.batch, goal=args.goal,
                  dtype=choice.compute_dtype, weight_dtype=choice.param_dtype, optimizer=args.optimizer,
                  gradient_checkpointing=args.gradient_checkpointing, r=args.r,
                  targets=_targets(args.targets) if args.targets else None, num_virtual_tokens=args.virtual_tokens,
                  logits_chunk=args.logits_chunk, device=choice.torch_device.type, reserve=args.reserve,
                  tasks=args.tasks)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result)
    if args.plot:
        print(f"wrote {result.plot(args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0



def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in name, transformers dir, .gguf file or hub id (org/name)")
    p.add_argument("--revision", help="hub model branch, tag or commit")
    p.add_argument("--adapter", help="adapter directory to evaluate with (PEFT format)")
    p.add_argument("--data", required=True, help="rows to evaluate: .jsonl, .json, .csv, .tsv, .parquet, a datasets "
                                                 "directory or a hub data set name (org/name)")
    p.add_argument("--data-split", help="split of a datasets directory or hub data set (default train)")
    p.add_argument("--data-config", help="configuration (subset) of a hub data set")
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
    add_runtime_arguments(p)


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


def _proxy_source(args: argparse.Namespace, model, tok, choice):
    """base / expert / anti-expert members for --strategy proxy."""
    import graft
    from graft import decode, models, runtime

    def load(name):  # every member on the base's device, in its dtype
        member, member_tok = models.load(name, dtype=choice.torch_dtype)
        return runtime.place(member, choice), member_tok

    expert = Path(args.expert)
    if not expert.exists():
        raise FileNotFoundError(f"--expert {args.expert} does not exist")
    base = decode.adapter_on(model, "default") if args.adapter else decode.adapter_off(model)
    tokenizers = [tok]
    if (expert / "adapter_config.json").is_file():
        same = args.expert_model in (None, args.model)
        small, small_tok = (model, tok) if same else load(args.expert_model)
        graft.load(small, expert, name="expert", activate=False)
        runtime.place(small, choice)
        expert_member, anti = decode.adapter_on(small, "expert"), decode.adapter_off(small)
        tokenizers.append(small_tok)
    elif (expert / "config.json").is_file() or expert.suffix == ".gguf":
        if not args.anti_expert:
            raise CliError("--expert is a model, so --anti-expert (its untuned counterpart) is needed")
        small, small_tok = load(expert)
        expert_member = decode.Member(small)
        tokenizers.append(small_tok)
    else:
        raise CliError(f"--expert {args.expert} is neither an adapter directory (adapter_config.json) nor a model")
    if args.anti_expert:
        anti_model, anti_tok = load(args.anti_expert)
        anti = decode.Member(anti_model)
        tokenizers.append(anti_tok)
    return decode.ProxyTuner(base, expert_member, anti, alpha=args.alpha, tokenizers=tokenizers)


def _eval_format(args: argparse.Namespace, tok, records, fields) -> tuple[bool | None, str | None, str | None]:
    """(chat, template, instruction) for EvalConfig: the flags where given, else the training format saved with
    the adapter (or with a fully tuned --model directory).

    The saved template applies where the rows are of the format it was written for (``exact`` on
    rows of the training format, ``math`` after ``cot`` training); a saved system message becomes
    the instruction (the system message, in chat) unless ``--instruction`` is given.
    """
    from graft.data.formats import detect_format

    template = _unescape(args.template)
    instruction = _unescape(args.instruction)
    fmt, saved = _prompt_format(args, tok, args.chat_template, template)
    if saved is None:
        return args.chat_template, template, instruction
    if template is None and saved.template is not None:
        rows = detect_format(records[0], fields) if args.task == "exact" else None
        if (args.task, rows) == ("exact", saved.format) or (args.task == "math" and saved.format == "cot"):
            template = saved.template
    if instruction is None and saved.system is not None:
        instruction = saved.system
    return fmt.chat, template, instruction


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
    config = decode.EvalConfig(
        task=args.task, strategy=args.strategy, shots=shots, samples=samples, selection=args.select,
        chat=args.chat_template, template=_unescape(args.template), instruction=_unescape(args.instruction),
        labels=_eval_labels(args.labels), fields=fields or None, max_new_tokens=args.max_new_tokens,
        top_p=args.top_p, batch_size=args.batch_size, seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
        **temperature,
    )
    records = data.load(args.data, split=args.data_split, config=args.data_config)
    pool = data.read(args.exemplars) if args.exemplars else records
    choice = _choice(args)
    model, tok = _load_model(args.model, args.adapter, choice, args.revision)
    chat, template, instruction = _eval_format(args, tok, records, fields or None)
    config = dataclasses.replace(config, chat=chat, template=template, instruction=instruction)
    source = _proxy_source(args, model, tok, choice) if args.strategy == "proxy" else model
    meta = {"model": args.model, "adapter": args.adapter, "expert": args.expert, "data": args.data}
    result = decode.evaluate(source, tok, records[: args.limit], config, pool=pool, meta=meta)
    paths = decode.write_results(result, args.out or f"runs/eval-{args.task}-{args.strategy}")
    s = result.summary
    print(decode.format_table([s]))
    print(f"\naccuracy {100 * s['accuracy']:.1f}% (95% CI {100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f}), "
          f"{s['tokens']:,} tokens in {s['seconds']:.1f}s; wrote {paths['predictions']} and {paths['table']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from graft.export import export_gguf

    out = export_gguf(args.adapter, args.out, base=args.model, dtype=args.dtype, revision=args.revision)
    print(f"wrote {out} ({out.stat().st_size:,} bytes), a llama.cpp LoRA adapter: llama-cli -m BASE.gguf --lora {out}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from graft import hub

    url = hub.push(args.adapter, args.repo, private=args.private, token=args.token, commit_message=args.message)
    print(f"pushed {args.adapter} to {args.repo}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def cmd_library(args: argparse.Namespace) -> int:
    from graft.compose.library_cli import cmd_library as run

    return run(args)


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
    limits = Limits(args.max_body_bytes, args.max_prompt_tokens, args.max_tokens, max_request_tokens=args.max_request_tokens)
    kv_budget: str | int | None = args.kv_cache_budget.lower()
    if kv_budget == "none":
        kv_budget = None
    elif kv_budget != "auto":
        from graft.plan import parse_memory

        try:
            kv_budget = parse_memory(args.kv_cache_budget)
        except ValueError as err:
            raise CliError(f"--kv-cache-budget: {err}") from None
    serve(args.model, host=args.host, port=args.port, adapters=adapters, adapter_roots=args.adapter_root,
          max_loaded=args.max_loaded, api_keys=keys, limits=limits, max_batch=args.max_batch, dtype=args.dtype,
          device=args.device, served_name=args.served_name, adapter_dtype=args.adapter_dtype,
          shutdown_grace=args.shutdown_grace, kv_budget=kv_budget, max_waiting=args.max_queue,
          max_weight_abs=args.max_adapter_weight or None, expose_paths=args.expose_adapter_paths,
          hypernet=args.hypernet, library=args.library, cache_dir=args.adapter_cache)
    return 0
