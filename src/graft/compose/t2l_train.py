"""Training a Text-to-LoRA hypernetwork, the paper's two ways (METHODS.md §11).

- **Reconstruction** (``mode="recon"``): regress a library of per-task LoRAs. Targets are the
  library's factors normalised per coordinate (z-scores with the mean and std over the library,
  T2L's ``pred_z_score``); the loss is L1. The statistics become the hypernetwork's fixed
  ``shift``/``scale``, so it emits LoRAs in the library's own units.
- **SFT** (``mode="sft"``): end to end through the frozen base on the tasks' rows. Each step samples
  several tasks and, per row, one of the task's descriptions; every row of the batch carries its
  own generated LoRA. The rows go through graft's routed-batch path (``graft.route``): one LoRA
  slot per row is attached to the model, and for the step each slot's ``lora_A``/``lora_B`` weights
  are the hypernetwork's outputs (non-leaf tensors), so one forward serves every task and the
  gradient reaches the hypernetwork. Loss: response-token NLL plus T2L's
  ``1e-3 * (mean A^2 + mean B^2)`` on the generated factors.

Only the hypernetwork trains: the base model's tensors are never handed to the optimizer.

Resume is exact: a checkpoint holds the hypernetwork, the optimizer and scheduler states, the
torch/python/numpy RNG states and the task sampler's state (``out_dir/checkpoints/checkpoint-<step>``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from graft.compose.t2l import HypernetError, TextToLoRA, read_library
from graft.compose.tasks import Task, messages, prompt_text, split_rows
from graft.io import PREFIX, atomic_dir_write, read_config, read_tensors

__all__ = ["MODES", "T2LTrainConfig", "TrainResult", "library_targets", "train"]

MODES = ("sft", "recon")
SLOT = "t2l_slot_"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class T2LTrainConfig:
    """How to train a hypernetwork.

    Args:
        mode: ``"sft"`` (through the base on the tasks' rows) or ``"recon"`` (regress a library).
        steps: Optimizer steps.
        tasks_per_batch: Tasks sampled per step (without replacement).
        rows_per_task: SFT: rows per sampled task, each with its own sampled description.
        lr: Peak learning rate (default: 1e-3 for recon, as T2L; 2.5e-4 for SFT, ten times T2L's
            2.5e-5, which is tuned for days of training, not a few hundred steps).
        warmup: Fraction of the steps with linear warmup, then cosine decay to 0.
        weight_decay: AdamW weight decay.
        grad_clip: Gradient-norm clip (0 = off).
        l2_generated: SFT: weight of mean(A^2) + mean(B^2) of the generated factors (T2L: 1e-3).
        max_length: SFT: tokens per row (the prompt is cut from the left).
        heldout: SFT: the rows of each task held out by ``tasks.split_rows`` (never trained on).
        seed: Seed of the sampler and of the hypernetwork's dropout.
        save_every: Checkpoint every N steps (0: only the final hypernetwork).
        log_every: Write a metrics record every N steps.
    """

    mode: str = "sft"
    steps: int = 200
    tasks_per_batch: int = 4
    rows_per_task: int = 2
    lr: float | None = None
    warmup: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    l2_generated: float = 1e-3
    max_length: int = 256
    heldout: float | int = 0.2
    seed: int = 0
    save_every: int = 0
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"T2LTrainConfig mode={self.mode!r} is not one of {MODES}")
        for name in ("steps", "tasks_per_batch", "rows_per_task", "max_length", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"T2LTrainConfig {name}={value!r} must be a positive integer")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"T2LTrainConfig save_every={self.save_every!r} must be an integer >= 0")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"T2LTrainConfig lr={self.lr!r} must be positive")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"T2LTrainConfig warmup={self.warmup!r} is outside [0, 1)")
        for name in ("weight_decay", "grad_clip", "l2_generated"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"T2LTrainConfig {name}={getattr(self, name)!r} must be >= 0")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.mode == "recon" else 2.5e-4)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    saved_to: Path | None


# --------------------------------------------------------------------------------------------
# Reconstruction targets


def library_targets(net: TextToLoRA, adapters: Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """Each adapter's factors in the hypernetwork's head layout: ``{kind: (n, modules, r*(d_in+d_out))}``.

    B is rescaled so the update s_lib * B A equals s_t2l * B' A when the library's scaling differs.

    Raises:
        HypernetError: An adapter of another rank, or lacking one of the hypernetwork's modules.
    """
    per_adapter = []
    for path in adapters:
        cfg = read_config(path)
        if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
            raise HypernetError(f"{path}: reconstruction needs plain LoRA adapters, not {cfg.get('peft_type')}"
                                f"{' with DoRA' if cfg.get('use_dora') else ''}")
        r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        if r != net.config.r or cfg.get("rank_pattern"):
            raise HypernetError(f"{path} has rank {r}{' with a rank_pattern' if cfg.get('rank_pattern') else ''}; "
                                f"the hypernetwork emits rank {net.config.r}")
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        tensors = {k.replace(".default.", "."): v for k, v in read_tensors(path).items()}
        factors = {}
        for name, *_ in net.layout.modules:
            a, b = tensors.get(f"{PREFIX}{name}.lora_A.weight"), tensors.get(f"{PREFIX}{name}.lora_B.weight")
            if a is None or b is None:
                raise HypernetError(f"{path} has no LoRA on {name!r}, a target of the hypernetwork")
            factors[name] = (a.float()[None], b.float()[None] * (scaling / net.scaling))
        per_adapter.append(net.flat_targets(factors))
    return {kind: torch.cat([t[kind] for t in per_adapter]) for kind in net.layout.kinds}


def set_normalisation(net: TextToLoRA, targets: Mapping[str, torch.Tensor]) -> None:
    """shift/scale := per-coordinate mean/std over the library; heads start at the mean (z = 0)."""
    for kind, t in targets.items():
        mean, std = t.mean(0), t.std(0, unbiased=False)  # (modules, width)
        floor = max(1e-8, 0.01 * float(std.mean()))  # a coordinate equal in every adapter has std 0
        with torch.no_grad():
            getattr(net, f"shift_{kind}").copy_(mean)
            getattr(net, f"scale_{kind}").copy_(std.clamp(min=floor))
            net.heads[kind].weight.zero_()
            net.heads[kind].bias.zero_()


def _z(net: TextToLoRA, kind: str, t: torch.Tensor) -> torch.Tensor:
    return (t - getattr(net, f"shift_{kind}")) / getattr(net, f"scale_{kind}")


# --------------------------------------------------------------------------------------------
# SFT: rows, slots, and the generated factors in the routed batch


def encode_row(tokenizer: Any, task: Task, row: dict, description: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one row: the chat prompt (unsupervised) then the answer and EOS."""
    prompt = tokenizer(prompt_text(tokenizer, messages(task, row, description)), add_special_tokens=False)["input_ids"]
    answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer = [*answer, tokenizer.eos_token_id]
    answer = answer[:max_length // 2] if len(answer) >= max_length else answer
    prompt = prompt[-(max_length - len(answer)):]
    return prompt + answer, [-100] * len(prompt) + answer


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def attach_slots(model: nn.Module, net: TextToLoRA, n: int) -> list[str]:
    """``n`` frozen LoRA slots (``t2l_slot_<i>``) on the hypernetwork's targets; the model's adapters so far stay."""
    from graft.core import STATE_ATTR, adapter_parameters, attach

    net.layout.check(model)
    state = getattr(model, STATE_ATTR, None)
    names = [f"{SLOT}{i}" for i in range(n)]
    for name in names:
        if state is None or name not in state.methods:
            attach(model, net.lora(), name, activate=False)
            state = getattr(model, STATE_ATTR)
        for p in adapter_parameters(model, name).values():
            p.requires_grad_(False)
    return names


@contextmanager
def generated_factors(model: nn.Module, names: Sequence[str],
                      factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """For the block, slot ``names[i]``'s A and B on every module are ``factors[module][0/1][i]``.

    The slot layers' weight entries are swapped for the given (non-leaf) tensors, as
    ``torch.func.functional_call`` does, so the routed forward's gradient flows back into whatever
    produced them; the slots' own parameters come back afterwards, untouched.
    """
    from graft.core import adapter_layers

    layers = dict(adapter_layers(model))
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module, (a, b) in factors.items():
            layer = layers[module]
            for i, name in enumerate(names):
                for table, t in ((layer.lora_A, a[i]), (layer.lora_B, b[i])):
                    linear = table[name]
                    saved.append((linear, linear._parameters["weight"]))
                    linear._parameters["weight"] = t
        yield
    finally:
        for linear, p in reversed(saved):
            linear._parameters["weight"] = p


def sft_loss(model: nn.Module, net: TextToLoRA, slots: Sequence[str], batch: dict[str, torch.Tensor],
             descriptions: Sequence[str], l2: float) -> tuple[torch.Tensor, dict[str, float]]:
    """One routed forward: row i runs with the LoRA generated from ``descriptions[i]``."""
    from graft.core import route
    from graft.train.loss import causal_lm_loss

    factors = net(net.embed(descriptions))
    names = list(slots[: len(descriptions)])
    with generated_factors(model, names, factors), route(model, names):
        nll = causal_lm_loss(model, batch)
    reg = sum(a.pow(2).mean() + b.pow(2).mean() for a, b in factors.values()) / len(factors)
    return nll + l2 * reg, {"nll": float(nll.detach()), "l2": float(reg.detach())}


# --------------------------------------------------------------------------------------------
# The loop


def _schedule(config: T2LTrainConfig) -> Callable[[int], float]:
    warm = int(config.warmup * config.steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, config.steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    net: TextToLoRA,
    tasks: Sequence[Task],
    config: T2LTrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    library: str | Path | Mapping[str, str | Path] | None = None,
    descriptions: Mapping[str, Sequence[str]] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train ``net`` in place.

    Args:
        net: The hypernetwork (from ``TextToLoRA.for_model``).
        tasks: The training tasks.
        config: Mode, steps, batch and optimiser settings.
        model, tokenizer: SFT: the frozen base model (it gets LoRA slots ``t2l_slot_<i>``) and tokenizer.
        library: Recon: a library directory / manifest (entries named after tasks, or with a ``task``
            key), or ``{task name: adapter dir}``. Only the given ``tasks`` are used.
        descriptions: ``{task name: wordings}`` the training may use (default: each task's
            description and alt_descriptions). Hold wordings out here to test on unseen ones.
        out_dir: Where the hypernetwork, ``metrics.jsonl``, ``loss.png`` and checkpoints go.
        resume: Continue from the latest checkpoint in ``out_dir`` when there is one.
        progress: Print a line per logged step.
    """
    from graft.train.checkpoint import rng_state, set_rng_state
    from graft.train.monitor import PLOT_NAME, MetricsLog, plot_losses

    if not tasks:
        raise ValueError("no training tasks given")
    words = {t.name: list(descriptions[t.name] if descriptions and t.name in descriptions else t.descriptions)
             for t in tasks}
    for name, ws in words.items():
        if not ws:
            raise ValueError(f"task {name!r} has no description to train on")
        net.check_descriptions(ws)
    out = Path(out_dir) if out_dir is not None else None
    if config.mode == "recon":
        names, sample_batch, loss_of = _recon_setup(net, tasks, library, words)
    else:
        if model is None or tokenizer is None:
            raise ValueError("SFT training needs the base model and its tokenizer")
        names, sample_batch, loss_of = _sft_setup(net, tasks, model, tokenizer, config, words)

    torch.manual_seed(config.seed)
    sampler = random.Random(config.seed)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    step, records = 0, []
    latest = _latest(out) if out is not None and resume else None
    if latest is not None:
        state = json.loads((latest / "state.json").read_text())
        if state["config"] != _jsonable(asdict(config)):
            raise ValueError(f"{latest} was written with another training config; start a new --out, or pass the same "
                             f"settings (saved: {state['config']})")
        net.load_state_dict(load_file(str(latest / "t2l_model.safetensors")))
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=True))
        set_rng_state(load_file(str(latest / "rng.safetensors")), json.loads((latest / "rng.json").read_text()))
        sampler.setstate(_tuple_state(state["sampler"]))
        step, records = state["step"], state["records"]
        if progress:
            print(f"resuming from {latest} (step {step})", flush=True)
    log = MetricsLog(out, records) if out is not None else None
    net.train()
    start, loss_value = time.perf_counter(), float("nan")
    while step < config.steps:
        t0 = time.perf_counter()
        chosen = sampler.sample(names, min(config.tasks_per_batch, len(names)))
        batch = sample_batch(chosen, sampler)
        loss, extra = loss_of(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf")))
        optimizer.step()
        scheduler.step()
        step += 1
        loss_value = float(loss.detach())
        if step % config.log_every == 0 or step == config.steps:
            record = {"step": step, "loss": round(loss_value, 6), "lr": scheduler.get_last_lr()[0],
                      "grad_norm": round(grad_norm, 6), "step_s": round(time.perf_counter() - t0, 3),
                      **{k: round(v, 6) for k, v in extra.items()}}
            records.append(record)
            if log is not None:
                log.write(record)
            if progress:
                print(f"t2l {config.mode} step {step}/{config.steps}  loss {loss_value:.4f}  "
                      + "  ".join(f"{k} {v:.4g}" for k, v in extra.items()) + f"  {record['step_s']:.2f}s/step", flush=True)
        if out is not None and config.save_every and step % config.save_every == 0 and step < config.steps:
            _checkpoint(out, step, net, optimizer, scheduler, sampler, config, records, rng_state)
    net.eval()
    if out is not None:
        seconds = time.perf_counter() - start
        summary = {"mode": config.mode, "steps": step, "final_loss": loss_value, "seconds": round(seconds, 1), "tasks": [t.name for t in tasks],
                   "config": _jsonable(asdict(config))}

        def write(tmp: Path) -> None:
            net.write_files(tmp)
            (tmp / "t2l_training.json").write_text(json.dumps(summary, indent=1) + "\n")

        atomic_dir_write(out, write)
        plot_losses(records, out / PLOT_NAME)
    return TrainResult(step, loss_value, time.perf_counter() - start, out)


def _recon_setup(net: TextToLoRA, tasks: Sequence[Task], library: Any, words: dict[str, list[str]]):
    if library is None:
        raise ValueError("reconstruction training needs a library of per-task LoRAs (--library DIR)")
    if isinstance(library, Mapping):
        paths = {str(k): str(v) for k, v in library.items()}
    else:
        paths = {}
        for entry in read_library(library):
            paths.setdefault(str(entry.get("task") or entry["name"]), entry["path"])
    names = [t.name for t in tasks if t.name in paths]
    missing = [t.name for t in tasks if t.name not in paths]
    if len(names) < 2:
        raise ValueError(f"the library has adapters for {len(names)} of the {len(tasks)} tasks; reconstruction needs "
                         f"at least 2 (missing: {missing[:5]})")
    targets = library_targets(net, [paths[n] for n in names])
    set_normalisation(net, targets)
    z = {kind: _z(net, kind, t) for kind, t in targets.items()}  # (n, modules, width)
    index = {n: i for i, n in enumerate(names)}

    def sample(chosen: list[str], rng: random.Random) -> tuple[list[str], list[int]]:
        return [rng.choice(words[n]) for n in chosen], [index[n] for n in chosen]

    def loss_of(batch: tuple[list[str], list[int]]) -> tuple[torch.Tensor, dict[str, float]]:
        descs, rows = batch
        raw = net(net.embed(descs), normalised=True)
        losses = [(raw[kind][0] - z[kind][rows]).abs().mean() for kind in z]
        with torch.no_grad():  # relative error of the factors in the library's units
            num = sum(((raw[k][0] - z[k][rows]) * getattr(net, f"scale_{k}")).pow(2).sum() for k in z)
            den = sum(targets[k][rows].pow(2).sum() for k in z)
        return sum(losses) / len(losses), {"rel_error": float((num / den).sqrt())}

    return names, sample, loss_of


def _sft_setup(net: TextToLoRA, tasks: Sequence[Task], model: nn.Module, tokenizer: Any,
               config: T2LTrainConfig, words: dict[str, list[str]]):
    for p in model.parameters():
        p.requires_grad_(False)
    slots = attach_slots(model, net, config.tasks_per_batch * config.rows_per_task)
    model.eval()  # the base's own dropout stays off; only the hypernetwork trains
    by_name = {t.name: t for t in tasks}
    rows = {t.name: split_rows(t.rows(), heldout=config.heldout)[0] for t in tasks}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def sample(chosen: list[str], rng: random.Random) -> tuple[dict[str, torch.Tensor], list[str]]:
        encoded, descs = [], []
        for name in chosen:
            for _ in range(config.rows_per_task):
                row, desc = rng.choice(rows[name]), rng.choice(words[name])
                encoded.append(encode_row(tokenizer, by_name[name], row, desc, config.max_length))
                descs.append(desc)
        return collate(encoded, pad), descs

    def loss_of(batch: tuple[dict[str, torch.Tensor], list[str]]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, descs = batch
        return sft_loss(model, net, slots, inputs, descs, config.l2_generated)

    return [t.name for t in tasks], sample, loss_of


def _checkpoint(out: Path, step: int, net: TextToLoRA, optimizer: Any, scheduler: Any, sampler: random.Random,
                config: T2LTrainConfig, records: list[dict], rng_state: Callable) -> None:
    tensors, rng_json = rng_state()
    state = {"step": step, "records": records, "sampler": _list_state(sampler.getstate()),
             "config": _jsonable(asdict(config))}

    def write(tmp: Path) -> None:
        net.write_files(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_file(tensors, str(tmp / "rng.safetensors"))
        (tmp / "rng.json").write_text(json.dumps(rng_json))
        (tmp / "state.json").write_text(json.dumps(state) + "\n")

    atomic_dir_write(out / CHECKPOINTS / f"checkpoint-{step}", write)
    for old in (out / CHECKPOINTS).glob("checkpoint-*"):  # keep the newest only: each holds the optimizer state
        if old.name != f"checkpoint-{step}" and old.name.split("-")[-1].isdigit():
            shutil.rmtree(old, ignore_errors=True)


def _latest(out: Path) -> Path | None:
    found = [(int(p.name.split("-")[-1]), p) for p in (out / CHECKPOINTS).glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "state.json").is_file()]
    return max(found)[1] if found else None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _list_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _tuple_state(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
