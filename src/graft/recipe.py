"""One fine-tuning job from a flat set of options: what `graft train`, the demo and the benchmarks run.

Options come from a YAML file and/or flags (same names, ``-`` or ``_``); every option is checked
before the model is loaded or any data is read, and everything that can be checked on the data
(fields, lengths, formats) is checked before the first training step.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from graft.train import TrainConfig

# --method NAME -> the graft method class (resolved lazily); "full" trains every weight.
METHOD_CLASSES = {
    "lora": "LoRA", "rslora": "LoRA", "dora": "LoRA", "ia3": "IA3", "adapter": "Adapter",
    "prompt-tuning": "PromptTuning", "p-tuning": "PTuning", "prefix-tuning": "PrefixTuning",
    "bitfit": "BitFit", "child-tuning": "ChildTuning", "probe": "Probe", "adalora": "AdaLoRA",
    "relora": "ReLoRA",
}
METHODS = (*METHOD_CLASSES, "full")


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
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    targets: str | None = None  # LoRA family: all-linear when not given; others: the method's default
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

    def __post_init__(self) -> None:
        _check_types(self)
        self.distributed()  # a bad strategy or timeout fails here, before anything is loaded
        from graft.runtime import check_words

        object.__setattr__(self, "dtype", check_words(self.device, self.dtype)[1])  # "bfloat16" -> "bf16"
        if self.quantize is not None:
            from graft.quant import check_mode

            check_mode(self.quantize)  # an unknown value or a missing bitsandbytes fails before any loading
            if self.method == "full":
                raise ValueError(f"quantize={self.quantize!r} freezes the base in bitsandbytes layers, so "
                                 "method=full cannot train it; use an adapter method such as lora")
        if self.init != "default":
            from graft.methods.lora import INITS

            if self.method not in ("lora", "rslora", "dora"):
                raise ValueError(f"init={self.init!r} is a LoRA setting; method {self.method} has its own initialisation")
            if self.init not in INITS:
                raise ValueError(f"init={self.init!r} is not one of {', '.join(INITS)}")
            if (self.init == "loftq") != (self.quantize in ("nf4", "fp4")):
                raise ValueError(f"init={self.init!r} with quantize={self.quantize!r}: LoftQ fits the adapter to a 4-bit "
                                 "base, so init=loftq goes with quantize nf4 or fp4, and only there")
        if self.format is not None:
            from graft.data.formats import spec_for

            spec_for(self.format)  # an unknown format fails here, before any data or model is loaded
        if self.method not in METHODS:
            close = difflib.get_close_matches(self.method, METHODS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"method={self.method!r} is not one of {', '.join(METHODS)}{hint}")
        if self.method_args and self.method in ("lora", "rslora", "dora", "full"):
            raise ValueError(f"method_args are for the other methods; {self.method} takes r, alpha, dropout, targets")
        self._check_hub_options()
        if not 0.0 <= self.eval_split < 1.0:
            raise ValueError(f"eval_split={self.eval_split!r} must be in [0, 1)")
        if self.max_length < 8:
            raise ValueError(f"max_length={self.max_length!r} must be at least 8")

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
            raise ValueError(f"{f.name}={value!r} must be {'an' if kind == 'int' else 'a'} {kind}"
                             + (" (true or false)" if kind == "bool" else ""))


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
    for key in FLOAT_KEYS & cfg.keys():
        if isinstance(cfg[key], str):
            try:
                cfg[key] = float(cfg[key])
            except ValueError:
                pass  # left as is: the config check names the key and the bad value
    return cfg


def split_options(options: dict[str, Any], where: str = "options") -> tuple[Job, TrainConfig]:
    """Check every key (suggesting the closest for a typo) and build the two configs."""
    known = JOB_KEYS | TRAIN_KEYS
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
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
            raise ValueError(f"restart_every={train_opts['restart_every']!r} (the schedule) differs from the ReLoRA "
                             f"method's restart_every={method.restart_every!r}; give it once, in method_args")
    if job.method == "probe":
        train_opts.setdefault("task", "classification")
        if train_opts["task"] != "classification":
            raise ValueError("method=probe trains a classification head: use task=classification")
    if job.method != "full":
        train_opts.setdefault("task", "causal-lm")
    try:
        return job, TrainConfig(**train_opts)
    except TypeError as e:  # a wrong-typed switch (gradient_checkpointing: "yes"): a user error
        raise ValueError(str(e)) from None


def _targets(spec: str) -> str | list[str]:
    if spec == "all-linear" or any(c in spec for c in "*()[]|^$\\"):
        return spec
    return [t.strip() for t in spec.split(",") if t.strip()]


def build_method(job: Job):
    """The graft method for ``job`` (None for full fine-tuning); bad settings fail here, before any loading."""
    import graft

    if job.method == "full":
        return None
    if job.method in ("lora", "rslora", "dora"):
        return graft.LoRA(r=job.r, alpha=job.alpha, dropout=job.dropout, targets=_targets(job.targets or "all-linear"),
                          rslora=job.method == "rslora", dora=job.method == "dora", init=job.init)
    cls = getattr(graft, METHOD_CLASSES[job.method])
    args = dict(job.method_args or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    if job.targets is not None:
        if "targets" not in fields:
            raise ValueError(f"method {job.method} has no targets option; its settings are {sorted(fields)}")
        args.setdefault("targets", _targets(job.targets))
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"method {job.method} has no setting(s) {unknown}; its settings are {sorted(fields)}")
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
        raise ValueError("no training data: pass --data FILE (jsonl, json, csv, tsv, parquet), a datasets directory "
                         "or a hub data set name, or set data: in the config")
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
    label_map = data.label_map(records, field=fields.get("label", "label")) if classification else None
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
          "label_map": label_map, **({"system": job.system} if job.system is not None else {})}
    pairs = config.objective == "dpo"
    if not pairs and data.is_preference_row(records[0].data):
        raise ValueError(f"{records[0].where} has 'chosen' and 'rejected': preference pairs train with "
                         "objective=dpo (--objective dpo)")
    if pairs:
        if job.format is not None:
            raise ValueError(f"format={job.format!r} does not apply to objective=dpo: preference rows are "
                             "prompt / chosen / rejected (strings or message lists)")
        if job.train_on_prompt:
            raise ValueError("train_on_prompt does not apply to objective=dpo: DPO scores the responses only")
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
    return lambda batch: data.collate(data.pack(batch, max_length), pad, packed=True)


def run(job: Job, config: TrainConfig, resume: bool = False, callbacks=()):
    """Prepare and train; the adapter (or full model) ends up in ``config.out_dir``."""
    from graft import runtime
    from graft.train import distributed, train
    from graft.train.loop import planned_steps
    from graft.train.report import check_available, startup_summary

    check_available(config)  # a missing metrics backend fails before the model is loaded
    distributed.init_process_group(job.dist_timeout)  # under torchrun; first, so each rank picks its own GPU
    choice, config = precision(job, config)
    if distributed.is_main():
        runtime.announce(choice)
    found: dict[str, Any] = {}
    model, tokenizer, train_rows, eval_rows, collate, label_map = prepare(job, config, found)
    if config.progress and not distributed.launched():
        print(startup_summary(model, train_rows, eval_rows, config, planned_steps(train_rows, config),
                              found.get("description"), label_map), flush=True)
    result = train(model, train_rows, collate, config, eval_data=eval_rows, resume=resume,
                   distributed=job.distributed(), callbacks=callbacks)
    if config.out_dir and distributed.is_main():
        out = Path(config.out_dir)
        target = out / ("adapter" if job.method != "full" else "model")
        tokenizer.save_pretrained(target)
        if found["format"] is not None:
            write_prompt_format(target, job, tokenizer, found["format"])
        info = {"job": dataclasses.asdict(job), "train": dataclasses.asdict(config), "label_map": label_map}
        (out / "job.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        result.outputs["tokenizer"] = str(target)
        result.outputs["job settings"] = str(out / "job.json")
    return model, tokenizer, result
