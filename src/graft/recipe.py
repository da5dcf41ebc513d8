"""One fine-tuning job from a flat set of options: what `graft train`, the demo and the benchmarks run.

Options come from a YAML file and/or flags (same names, ``-`` or ``_``); every option is checked
before the model is loaded or any data is read, and everything that can be checked on the data
(fields, lengths, formats) is checked before the first training step.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from graft.data.tokenize import OVERFLOW
from graft.options import NAME, OptionError, apply_aliases, suggest
from graft.train import TrainConfig
from graft.train.loop import seed_everything

# --method NAME -> the graft method class (resolved lazily); "full" trains every weight.
METHOD_CLASSES = {
    "lora": "LoRA", "rslora": "LoRA", "dora": "LoRA", "ia3": "IA3", "adapter": "Adapter",
    "prompt-tuning": "PromptTuning", "p-tuning": "PTuning", "prefix-tuning": "PrefixTuning",
    "bitfit": "BitFit", "child-tuning": "ChildTuning", "probe": "Probe", "adalora": "AdaLoRA",
    "relora": "ReLoRA",
}
METHODS = (*METHOD_CLASSES, "full")
logger = logging.getLogger(__name__)
LORA_FAMILY = ("lora", "rslora", "dora")
# `graft train --method lora`'s defaults where the user gives none, chosen on the defaults grid (docs/benchmarks.md,
# "LoRA defaults": within 1 point of full fine-tuning on SST-2 and CLINC150): r 16, alpha 32, all linear layers,
# peft's alpha / r, lr 5e-4 after a 10% warmup, and a new classification head at 4x the lr (it starts from random
# weights; the adapter only nudges pretrained ones). rsLoRA (--rslora, --method rslora) scales 4x higher at r 16
# and keeps lr 2e-4, which moved the weights as fast on the grid. DPO keeps TrainConfig's own defaults.
# graft.LoRA and TrainConfig in Python keep peft's and the Trainer's conventions: code ported from them means
# what it meant.
LORA_LR = 5e-4
RSLORA_LR = 2e-4
LORA_WARMUP_RATIO = 0.1
HEAD_LR_RATIO = 4.0
SETTING_EXAMPLES = {"num_virtual_tokens": 20}  # values to show for a required method setting left out


@dataclass(frozen=True)
class Job:
    """What to fine-tune on what (the training loop's own settings live in ``TrainConfig``)."""

    model: str = "smollm2-135m"
    revision: str | None = None  # a hub model's branch, tag or commit
    data: str | None = None
    data_split: str | None = None  # a datasets directory's or hub data set's split (default: train)
    data_config: str | None = None  # a hub data set's configuration (subset)
    fields: dict | None = None  # {format field: column}, e.g. {instruction: question}
    eval_data: str | None = None
    eval_split: float = 0.0
    format: str | None = None
    template: str | None = None
    max_length: int = 512
    train_on_prompt: bool = False
    chat_template: bool = False
    system: str | None = None  # a system message first in every chat-template conversation
    packing: bool = True
    method: str = "lora"
    method_args: dict | None = None  # the method's own settings, e.g. {num_virtual_tokens: 20}
    # r, alpha, dropout, targets, rslora: None = not given. The LoRA family then takes r 16, alpha 32,
    # dropout 0, all-linear, alpha / r (LORA_LR and the rest above); another method takes its own default,
    # and a setting it lacks is an error.
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: str | None = None
    rslora: bool | None = None
    text_field: str | None = None
    label_field: str | None = None
    limit: int | None = None
    quantize: str | None = None  # nf4, fp4 or int8: a bitsandbytes base (QLoRA); None: full precision
    init: str = "default"  # LoRA family: default, gaussian, pissa, olora, or loftq (with quantize nf4/fp4)
    strategy: str = "ddp"  # under torchrun: ddp or fsdp (graft.train.distributed); ignored in one process
    device: str = "auto"  # auto, cpu, cuda or cuda:N (graft.runtime.resolve); under torchrun: each rank's GPU
    dtype: str = "auto"  # auto, fp32, bf16 or fp16: the precision (graft.runtime.resolve)
    dist_timeout: float = 1800.0  # seconds a collective waits for the other ranks
    push_to_hub: str | None = None  # after training, upload the adapter to this hub repository (org/name)
    hub_private: bool = False  # with push_to_hub: create the repository as private
    on_overflow: str = "error"  # a response longer than max_length: error, skip the row, or truncate it
    threads: int | None = None  # torch CPU threads; None: the cores this process may use (per local rank)
    overwrite: bool = False  # replace a finished run in out_dir (its adapter, metrics, checkpoints)

    def __post_init__(self) -> None:
        _check_types(self)
        self.distributed()  # a bad strategy or timeout fails here, before anything is loaded
        if self.method == "qlora":
            raise OptionError("{method} is LoRA on a 4-bit base: use {method__lora} with {quantize}",
                              method="qlora", method__lora="lora", quantize="nf4")
        from graft.runtime import check_words

        object.__setattr__(self, "dtype", check_words(self.device, self.dtype)[1])  # "bfloat16" -> "bf16"
        if self.quantize is not None:
            from graft.quant import check_mode

            check_mode(self.quantize)  # an unknown value or a missing bitsandbytes fails before any loading
            if self.method == "full":
                raise OptionError("{quantize} freezes the base in bitsandbytes layers, so {method} cannot train it; "
                                  "use an adapter method such as lora", quantize=self.quantize, method="full")
        if self.init != "default":
            from graft.methods.lora import INITS

            if self.method not in LORA_FAMILY:
                raise OptionError("{init} is a LoRA setting; {method} has its own initialisation",
                                  init=self.init, method=self.method)
            if self.init not in INITS:
                raise OptionError(f"{{init}} is not one of {', '.join(INITS)}", init=self.init)
            if (self.init == "loftq") != (self.quantize in ("nf4", "fp4")):
                raise OptionError("{init} with {quantize}: LoftQ fits the adapter to a 4-bit base, so "
                                  "{init__loftq} goes with {quantize__nf4} or {quantize__fp4}, and only there",
                                  init=self.init, quantize=self.quantize, init__loftq="loftq",
                                  quantize__nf4="nf4", quantize__fp4="fp4")
        if self.format is not None:
            from graft.data.formats import spec_for

            spec_for(self.format)  # an unknown format fails here, before any data or model is loaded
        if self.method not in METHODS:
            close = difflib.get_close_matches(self.method, METHODS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise OptionError(f"{{method}} is not one of {', '.join(METHODS)}{hint}", method=self.method)
        if self.method_args and self.method in (*LORA_FAMILY, "full"):
            raise OptionError("{method_args} are for the other methods; {method} takes {r}, {alpha}, {dropout}, "
                              "{targets}", method_args=NAME, method=self.method, r=NAME, alpha=NAME,
                              dropout=NAME, targets=NAME)
        if self.method == "rslora" and self.rslora is False:
            raise OptionError("{method} is LoRA with rsLoRA scaling; with {rslora} give {method__lora}",
                              method="rslora", rslora=False, method__lora="lora")
        if self.method == "full":
            given = {k: NAME for k in ("r", "alpha", "dropout", "targets", "rslora") if getattr(self, k) is not None}
            if given:
                raise OptionError(f"{{method}} trains every weight: {' and '.join(f'{{{k}}}' for k in given)} "
                                  f"{'does' if len(given) == 1 else 'do'} not apply", method="full", **given)
        if self.template is not None and not re.search(r"\{\w+\}", self.template):
            # e.g. LLaMA-Factory's `template: llama3` names a chat template; here it would be every prompt
            raise OptionError("{template} names no {field} of the rows, so every prompt would be that same text; "
                              "a template is a pattern such as 'Q: {question} A:' (for the tokenizer's own chat "
                              "template, use {chat_template})", template=self.template, chat_template=True)
        self._check_hub_options()
        if not 0.0 <= self.eval_split < 1.0:
            raise OptionError("{eval_split} must be in [0, 1)", eval_split=self.eval_split)
        if self.max_length < 8:
            raise OptionError("{max_length} must be at least 8", max_length=self.max_length)
        if self.on_overflow not in OVERFLOW:
            raise OptionError(f"{{on_overflow}} is not one of {', '.join(OVERFLOW)}", on_overflow=self.on_overflow)
        if self.threads is not None and self.threads < 1:
            raise OptionError("{threads} must be at least 1", threads=self.threads)

    def _check_hub_options(self) -> None:
        """Field mappings and the push target are checked before anything is loaded or trained."""
        from graft import hub
        from graft.data.sources import parse_fields

        if self.fields is not None:
            parse_fields(self.fields, "fields:")
        if self.push_to_hub is not None and ("/" not in self.push_to_hub or not hub.is_repo_id(self.push_to_hub)):
            raise ValueError(f"push_to_hub={self.push_to_hub!r} must be a hub repository id, org/name")
        if self.hub_private and self.push_to_hub is None:
            raise ValueError("hub_private applies with push_to_hub (--push-to-hub org/name)")
        if self.push_to_hub is not None and self.method == "full":
            raise ValueError("push_to_hub uploads an adapter; method=full writes a whole model (push it with "
                             "huggingface_hub's upload_folder)")

    def distributed(self):
        """The settings of a multi-process (torchrun) run."""
        from graft.train.distributed import DistConfig

        return DistConfig(strategy=self.strategy, timeout_s=self.dist_timeout)


JOB_KEYS = {f.name for f in dataclasses.fields(Job)}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
# YAML 1.1 reads 2e-4 (no dot) as a string; these keys take it as the number it means.
FLOAT_KEYS = {f.name for f in (*dataclasses.fields(Job), *dataclasses.fields(TrainConfig))
              if f.type.split(" | ")[0] == "float"}
_TYPES = {"str": (str, os.PathLike), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,)}


def _check_types(job: Job) -> None:
    """A value of the wrong type (``packing: "no"``, ``r: "16"``) is an error, not silently truthy."""
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        kind, _, optional = f.type.partition(" | ")
        if value is None and optional:
            continue
        if not isinstance(value, _TYPES[kind]) or (kind != "bool" and isinstance(value, bool)):
            raise OptionError(f"{{{f.name}}} must be {'an' if kind == 'int' else 'a'} {kind}"
                              + (" (true or false)" if kind == "bool" else ""), **{f.name: value})


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a mapping of option: value, not a {type(cfg).__name__}")  # noqa: TRY004 (a user's file, not a caller's type)
    cfg = {str(k).replace("-", "_"): v for k, v in cfg.items()}
    cfg, notes = apply_aliases(cfg, str(path))
    if notes:
        logger.warning("%s: read other tools' keys as graft's: %s", path, ", ".join(notes))
    for key in FLOAT_KEYS & cfg.keys():
        if isinstance(cfg[key], str):
            try:
                cfg[key] = float(cfg[key])
            except ValueError:
                pass  # left as is: the config check names the key and the bad value
    return cfg


def split_options(options: dict[str, Any], where: str = "options") -> tuple[Job, TrainConfig]:
    """Check every key (suggesting the closest for a typo) and build the two configs.

    Other tools' key names (``learning_rate``, ``lora_r``, ...: :data:`graft.options.ALIASES`) are read as
    graft's, saying so once; ``method: qlora`` is read as LoRA on an NF4 base.
    """
    options, notes = apply_aliases(options, where)
    if options.get("method") == "qlora":
        if options.get("quantize", "nf4") not in ("nf4", "fp4"):
            raise OptionError("{method} is LoRA on a 4-bit base, not {quantize}; use {method__lora} for that",
                              method="qlora", quantize=options["quantize"], method__lora="lora")
        options = {**options, "method": "lora", "quantize": options.get("quantize", "nf4")}
        notes.append(f"method: qlora -> method: lora with quantize: {options['quantize']} (QLoRA)")
    if notes:
        logger.warning("%s: read as graft's options: %s", where, ", ".join(notes))
    known = JOB_KEYS | TRAIN_KEYS
    for key in options:
        if key not in known:
            close = suggest(key, known)
            hint = f"; did you mean '{close}'?" if close else "."
            raise ValueError(f"unknown key '{key}' in {where}{hint} Known keys: {', '.join(sorted(known))}")
    if isinstance(options.get("targets"), list):
        options = {**options, "targets": ",".join(options["targets"])}
    job = Job(**{k: v for k, v in options.items() if k in JOB_KEYS})
    method = build_method(job)  # the method's own settings are checked now, before anything is loaded
    train_opts = {k: v for k, v in options.items() if k in TRAIN_KEYS}
    if job.method == "relora" and train_opts.get("schedule") == "cosine_restarts":
        # The jagged schedule must restart where the method merges: one number, given once.
        train_opts.setdefault("restart_every", method.restart_every)
        if train_opts["restart_every"] != method.restart_every:
            raise OptionError("{restart_every} (the schedule) differs from the ReLoRA method's "
                              "{method_arg_restart_every}; give it once, as a method setting",
                              restart_every=train_opts["restart_every"],
                              method_arg_restart_every=method.restart_every)
    if job.method == "probe":
        train_opts.setdefault("task", "classification")
        if train_opts["task"] != "classification":
            raise OptionError("{method} trains a classification head: use {task}",
                              method="probe", task="classification")
    if job.method != "full" and "task" not in train_opts:
        train_opts["task"] = default_task(job)
    if job.method in LORA_FAMILY and train_opts.get("objective", "sft") == "sft":
        train_opts = lora_training_defaults(method, train_opts)
    try:
        config = TrainConfig(**train_opts)
    except TypeError as e:  # a wrong-typed switch (gradient_checkpointing: "yes"): a user error
        raise ValueError(str(e)) from None
    check_together(job, config, method)
    return job, config


def lora_training_defaults(method: Any, train_opts: dict[str, Any]) -> dict[str, Any]:
    """The LoRA family's training settings where none were given (see LORA_LR): lr, warmup, a new head's lr."""
    out = dict(train_opts)
    out.setdefault("lr", RSLORA_LR if method.rslora else LORA_LR)
    if "warmup_steps" not in out and "warmup_ratio" not in out and out.get("schedule") != "cosine_restarts":
        out["warmup_ratio"] = LORA_WARMUP_RATIO
    if out.get("task") == "classification":
        out.setdefault("head_lr_ratio", HEAD_LR_RATIO)
    return out


def check_together(job: Job, config: TrainConfig, method: Any) -> None:
    """Settings that are each fine but wrong together (the job's against the training loop's)."""
    if config.eval_every and not (job.eval_data or job.eval_split):
        raise OptionError("{eval_every} needs data to evaluate on: give {eval_data} or {eval_split}",
                          eval_every=config.eval_every, eval_data=NAME, eval_split=NAME)
    if config.gradient_checkpointing and not getattr(method, "gradient_checkpointing_ok", True):
        raise OptionError("{method} cannot train with {gradient_checkpointing}: transformers drops the "
                          "past_key_values that carry the prefix inside checkpointed layers; leave checkpointing off",
                          method=job.method, gradient_checkpointing=True)


def default_task(job: Job) -> str:
    """classification for labelled rows on an encoder model (no language-model head), else causal-lm."""
    return "classification" if labelled(job) and is_encoder(job.model) else "causal-lm"


def labelled(job: Job, first: list | None = None) -> bool:
    """Whether the job's rows are labelled: ``format: classification`` (or table), or, with no format
    given, a first row (``first``, else read from ``job.data``) that reads as classification."""
    from graft import data
    from graft.data.formats import CLASSIFICATION_FORMATS, detect_format

    if job.format is not None or (first is None and (job.data is None or not Path(job.data).is_file())):
        return job.format in CLASSIFICATION_FORMATS
    fields = {k: v for k, v in (("text", job.text_field), ("label", job.label_field)) if v}
    try:
        first = data.read(job.data)[:1] if first is None else first
        return bool(first) and detect_format(first[0], fields or None) in CLASSIFICATION_FORMATS
    except (ValueError, OSError):  # unreadable or undetectable data is reported where it is read
        return False


def is_encoder(model: str) -> bool:
    """Whether ``model`` is an encoder without a language-model head (BERT, MiniLM, RoBERTa...)."""
    from graft import models

    try:
        path = models.resolve(model)
    except (ValueError, OSError):
        return False  # reported when the model is loaded
    if path.suffix == ".gguf" or not (path / "config.json").is_file():
        return False  # GGUF files hold decoders
    config = json.loads((path / "config.json").read_text())
    if config.get("is_encoder_decoder") or config.get("is_decoder"):
        return False
    generative = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
    architectures = config.get("architectures") or []
    return bool(architectures) and not any(a.endswith(generative) for a in architectures)


def _targets(spec: str) -> str | list[str]:
    if spec == "all-linear" or any(c in spec for c in "*()[]|^$\\"):
        return spec
    return [t.strip() for t in spec.split(",") if t.strip()]


def build_method(job: Job):
    """The graft method for ``job`` (None for full fine-tuning); bad settings fail here, before any loading."""
    import graft

    if job.method == "full":
        return None
    if job.method in LORA_FAMILY:
        return graft.LoRA(r=16 if job.r is None else job.r, alpha=32 if job.alpha is None else job.alpha,
                          dropout=job.dropout or 0.0, targets=_targets(job.targets or "all-linear"),
                          rslora=bool(job.rslora) or job.method == "rslora", dora=job.method == "dora", init=job.init)
    cls = getattr(graft, METHOD_CLASSES[job.method])
    args = dict(job.method_args or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    settings = ", ".join(sorted(fields))
    for key in ("r", "alpha", "dropout", "targets", "rslora"):  # the LoRA flags: where the method has the setting
        value = getattr(job, key)
        if value is None:
            continue
        if key not in fields:
            what = {"r": "has no rank", "targets": "chooses its own modules"}.get(key, f"has no {key}")
            raise OptionError(f"{{method}} {what}: {{{key}}} does not apply (its settings: {settings})",
                              method=job.method, **{key: value})
        value = _targets(value) if key == "targets" else value
        if args.setdefault(key, value) != value:
            raise OptionError(f"{{{key}}} and {{method_arg_{key}}} disagree; give one",
                              **{key: value, f"method_arg_{key}": args[key]})
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ValueError(f"method {job.method} has no setting(s) {unknown}; its settings are {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in args and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:  # e.g. prompt tuning's num_virtual_tokens
        examples = {f"method_arg_{n}__example": SETTING_EXAMPLES[n] for n in missing if n in SETTING_EXAMPLES}
        raise OptionError(f"{{method}} needs {' and '.join(f'{{method_arg_{n}}}' for n in missing)}"
                          + (f" (e.g. {', '.join(f'{{{k}}}' for k in examples)})" if examples else ""),
                          method=job.method, **{f"method_arg_{n}": NAME for n in missing}, **examples)
    return cls(**args)


def prepare(job: Job, config: TrainConfig, info: dict[str, Any] | None = None):
    """Load data, model and adapter; return (model, tokenizer, train rows, eval rows, collate, label map).

    ``info``, when given, receives what was found on the way: ``format``, the data format (as given or
    detected; None for rows no format matches, e.g. preference pairs), and ``description``, the same in
    words for the start-up summary.
    """
    import graft
    from graft import data, models, runtime
    from graft.train import distributed

    if job.data is None:
        raise OptionError("no training data: give {data} (a .jsonl, .json, .csv, .tsv or .parquet file, a "
                          "datasets directory or a hub data set name)", data=NAME)
    if config.release_cpu_memory:  # before loading: the load's and quantization's temporaries fragment the heap too
        from graft.train.monitor import map_large_blocks

        map_large_blocks()
    fields = {**(job.fields or {}), **{k: v for k, v in (("text", job.text_field), ("label", job.label_field)) if v}}
    records = data.load(job.data, split=job.data_split, config=job.data_config, fields=fields)
    if job.limit:
        records = records[: job.limit]
    hub_eval = job.eval_data is not None and not Path(job.eval_data).expanduser().exists()
    eval_records = (data.load(job.eval_data, config=job.data_config if hub_eval else None, fields=fields,
                              prefer=("validation", "test")) if job.eval_data else [])
    if job.eval_split and not eval_records:
        order = list(range(len(records)))
        random.Random(config.seed).shuffle(order)
        cut = max(1, int(len(records) * job.eval_split))
        eval_records = [records[i] for i in order[:cut]]
        records = [records[i] for i in order[cut:]]
    classification = config.task == "classification"
    if not classification:
        check_causal(job, records[:1])
    label_map = data.label_map(records, field=fields.get("label", "label")) if classification else None
    # Everything the run initialises (a new classification head, the adapter) is drawn after this.
    seed_everything(config.seed)
    choice, _ = precision(job, config)
    compute = runtime.DTYPES[choice.compute_dtype]  # what a 4-bit layer multiplies in: the run's precision
    loftq = job.init == "loftq"  # loaded in full precision: LoftQ quantizes and attaches together
    kbit = {"quantize": job.quantize, "compute_dtype": compute} if job.quantize and not loftq else {}
    # A quantized base keeps its non-quantized weights (norms, embeddings, head) in full precision.
    weights = {} if job.quantize else {"dtype": choice.torch_dtype}
    if classification:
        model, tokenizer = models.load(job.model, task="sequence-classification", num_labels=len(label_map),
                                       revision=job.revision, **kbit, **weights)
    else:
        model, tokenizer = models.load(job.model, revision=job.revision, **kbit, **weights)
    if job.quantize and not loftq:
        graft.prepare_kbit_training(model, gradient_checkpointing=config.gradient_checkpointing)
    fmt = job.format or ("classification" if classification else None)
    if info is not None:
        info["format"] = fmt or _detected_format(records[0], fields or None)
    kw = {"format": fmt, "template": job.template, "max_length": job.max_length,
          "train_on_prompt": job.train_on_prompt, "chat_template": job.chat_template, "fields": fields or None,
          "label_map": label_map, "on_overflow": job.on_overflow,
          **({"system": job.system} if job.system is not None else {})}
    pairs = config.objective == "dpo"
    if not pairs and data.is_preference_row(records[0].data):
        raise OptionError(f"{records[0].where} has 'chosen' and 'rejected': preference pairs train with {{objective}}",
                          objective="dpo")
    if pairs:
        if job.format is not None:
            raise OptionError("{format} does not apply to {objective}: preference rows are prompt / chosen / "
                              "rejected (strings or message lists)", format=job.format, objective="dpo")
        if job.train_on_prompt:
            raise OptionError("{train_on_prompt} does not apply to {objective}: DPO scores the responses only",
                              train_on_prompt=True, objective="dpo")
        kw = {"template": job.template, "max_length": job.max_length, "chat_template": job.chat_template}
        train_ex = data.tokenize_pairs(records, tokenizer, **kw)
        eval_ex = data.tokenize_pairs(eval_records, tokenizer, **kw) if eval_records else None
    else:
        train_ex = data.tokenize(records, tokenizer, **kw)
        eval_ex = data.tokenize(eval_records, tokenizer, **kw) if eval_records else None
    if info is not None:
        info["description"] = _describe_format(records[0].data, fmt, fields, pairs)
    method = build_method(job)
    if loftq:
        graft.loftq(model, method, quant_type=job.quantize, compute_dtype=str(compute).removeprefix("torch."),
                    gradient_checkpointing=config.gradient_checkpointing)
    elif method is not None:
        graft.attach(model, method)
    runtime.keep_trainable_fp32(model)  # a new classification head on a 16-bit base, say
    if not distributed.launched():  # under torchrun each rank's GPU is chosen by graft.train.distributed
        runtime.place(model, choice)
    # Input-side methods (prompt, prefix) put virtual tokens in front of every row: one example per row.
    # LLM.int8() inference picks its 16-bit outlier columns over the whole batch, so the examples in a
    # packed row are not numerically independent (the packing check sees logits move): int8 trains unpacked.
    packing = (job.packing and not classification and not getattr(method, "input_side", False)
               and job.quantize != "int8")
    collate = make_collate(model, tokenizer, job.max_length, packing, pairs=pairs)
    return model, tokenizer, train_ex, eval_ex, collate, label_map


def _detected_format(record, fields) -> str | None:
    """The data format of ``record``, or None where no format of graft.data matches (rows another
    objective reads, e.g. preference pairs): such a run saves no prompt format."""
    from graft.data import DataError, detect_format

    try:
        return detect_format(record, fields)
    except DataError:
        return None


def precision(job: Job, config: TrainConfig):
    """The device and precision of a training run, and ``config`` with its ``autocast`` set to match.

    ``autocast`` (the older option) and ``dtype`` name one thing: given alone, ``autocast: bf16``
    means ``dtype: bf16``; given both, they must agree.
    """
    from graft import runtime
    from graft.train import distributed

    dtype = job.dtype
    if config.autocast is not None:
        if dtype == "auto":
            dtype = config.autocast
        elif dtype != config.autocast:
            raise ValueError(f"autocast={config.autocast!r} contradicts dtype={job.dtype!r}; give dtype alone "
                             "(autocast is its older name)")
    device = job.device
    if distributed.launched() and device == "auto":
        import torch

        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    choice = runtime.resolve(device, dtype, training=True, full=job.method == "full")
    if choice.autocast_dtype != config.autocast:
        config = dataclasses.replace(config, autocast=choice.autocast_dtype)
    return choice, config


def write_prompt_format(adapter_dir: str | Path, job: Job, tokenizer, format: str) -> Path:
    """Save how training rendered prompts (``graft_format.json``, beside the adapter or the fully tuned model),
    so inference renders them the same way."""
    from graft.data import promptformat

    fmt = promptformat.from_training(tokenizer, format, chat_template=job.chat_template, template=job.template,
                                     fields={k: v for k, v in (("text", job.text_field), ("label", job.label_field))
                                             if v} or None,
                                     system=job.system, train_on_prompt=job.train_on_prompt,
                                     max_length=job.max_length)
    return promptformat.write(adapter_dir, fmt)


def _describe_format(row: dict[str, Any], fmt: str | None, fields: dict[str, str], pairs: bool) -> str:
    """The data format, and whether it was given or detected (for the start-up summary)."""
    from graft import data

    if pairs:
        kind = "message lists" if isinstance(row.get("chosen"), list) else "prompt / chosen / rejected"
        return f"preference pairs ({kind})"
    if fmt is not None:
        return fmt
    return f"{data.detect_format(data.read([row])[0], fields or None)} (detected)"


def check_causal(job: Job, first: list) -> None:
    """A causal-LM run needs a model with a language-model head and rows with a response (``first``: the
    first row)."""
    if is_encoder(job.model):
        raise OptionError(f"{job.model} is an encoder without a language-model head: it trains a classifier "
                          "on labelled rows ({task}, with {format} or text/label columns)",
                          task="classification", format="classification")
    if labelled(job, first):
        raise OptionError(f"{job.data} holds labelled rows (text, label), which a causal LM cannot learn as "
                          "prompt and response: train a classifier with {task}", task="classification")


def make_collate(model, tokenizer, max_length: int, packed: bool, pairs: bool = False):
    """Batches of examples -> tensors. With packing, each batch's examples are packed into as few
    rows as fit ``max_length`` (padding-free, attention confined per example), so an optimizer step
    sees exactly the examples it would see unpacked: same loss, fewer wasted pad tokens.
    """
    from graft import data

    pad = tokenizer.pad_token_id
    if pairs:  # DPO: the chosen and rejected sequences of a batch in one forward, packed like SFT rows
        if packed:
            data.check_packing(model, use_cache=False)
        return lambda batch: data.collate_pairs(batch, pad, packed=packed, max_length=max_length)
    if not packed:
        return lambda batch: data.collate(batch, pad, packed=False)
    # Packed rows are confined per example only without a KV cache: the trainer calls the model
    # with use_cache=False; check once that this model family really confines attention.
    data.check_packing(model, use_cache=False)
    return lambda batch: data.collate(data.pack(batch, max_length, balance=True), pad, packed=True)


def run(job: Job, config: TrainConfig, resume: bool = False, callbacks=()):
    """Prepare and train; the adapter (or full model) ends up in ``config.out_dir``.

    An ``out_dir`` that holds anything is refused unless ``resume`` continues the run there or
    ``job.overwrite`` replaces it (:mod:`graft.rundir`); both are checked before anything is loaded.
    """
    import torch

    from graft import rundir, runtime
    from graft.train import distributed, train
    from graft.train.loop import planned_steps
    from graft.train.report import check_available, startup_summary

    check_available(config)  # a missing metrics backend fails before the model is loaded
    found = rundir.check(config.out_dir, resume, job.overwrite)
    distributed.init_process_group(job.dist_timeout)  # under torchrun; first, so each rank picks its own GPU
    if distributed.is_main():
        if job.overwrite:
            rundir.clear(found)
        elif found.other:
            logger.warning("left in %s from before (not written by this run, so they may not match it): %s",
                           config.out_dir, rundir.names(found.other))
    choice, config = precision(job, config)
    if distributed.is_main():
        runtime.announce(choice)
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads or default_threads())
    try:
        seen: dict[str, Any] = {}
        model, tokenizer, train_rows, eval_rows, collate, label_map = prepare(job, config, seen)
        if config.progress and not distributed.launched():
            print(startup_summary(model, train_rows, eval_rows, config, planned_steps(train_rows, config),
                                  seen.get("description"), label_map), flush=True)
        result = train(model, train_rows, collate, config, eval_data=eval_rows, resume=resume,
                       distributed=job.distributed(), callbacks=callbacks)
    finally:
        torch.set_num_threads(threads)  # the process's own setting again (graft.recipe.run inside a notebook)
    if config.out_dir and distributed.is_main():
        out = Path(config.out_dir)
        target = out / ("adapter" if job.method != "full" else "model")
        tokenizer.save_pretrained(target)
        if seen.get("format") is not None:
            write_prompt_format(target, job, tokenizer, seen["format"])
        info = {"job": dataclasses.asdict(job), "train": dataclasses.asdict(config), "label_map": label_map}
        (out / "job.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        result.outputs["tokenizer"] = str(target)
        result.outputs["job settings"] = str(out / "job.json")
    return model, tokenizer, result


def default_threads() -> int:
    """The cores this process may use, shared among the ranks torchrun started on this machine."""
    from graft.options import available_cores

    return max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
