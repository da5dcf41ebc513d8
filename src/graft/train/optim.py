"""Optimizers (AdamW, 8-bit AdamW), LoRA+ parameter groups, and learning-rate schedules (warmup +
cosine / linear / constant, and ReLoRA's jagged cosine with restarts).

LoRA+ (Hayou et al. 2024, §4): the B matrices learn at ``ratio x lr``. graft finds B through the
adapter-layer protocol (every adapter layer's ``lora_B`` container), never by matching names.
Decision, as in peft's ``create_loraplus_optimizer``: every trainable *vector* (the DoRA magnitude,
biases trained with ``bias="all"``, a classifier head's bias) joins the fast group too, so runs
compare with peft's. LoRA on embeddings (``lora_embedding_A/B``) stays at ``lr``: peft gives it a
separate tiny rate (``loraplus_lr_embedding=1e-6``), a knob graft does not have.

A head trained in full next to an adapter (``modules_to_save``, e.g. a new classifier) can take its
own rate, ``head_lr_ratio x lr``: it starts from random weights, where the adapter only nudges
pretrained ones (docs/benchmarks.md, "LoRA defaults"). It never joins the LoRA+ group.

Weight decay applies to matrices only: vectors (biases, norm gains, the DoRA magnitude, whose
decay would pull the weight norm towards zero) are never decayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from graft.core import adapter_layers
from graft.train.config import TrainConfig


def lora_b_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every LoRA B matrix of every adapter, found through the adapter layers' ``lora_B`` containers."""
    out: list[nn.Parameter] = []
    for _, layer in adapter_layers(model):
        container = getattr(layer, "lora_B", None)
        if isinstance(container, nn.ModuleDict):
            for module in container.values():
                out.extend(module.parameters())
    return out


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every module trained in full next to an adapter (``modules_to_save`` copies)."""
    from graft.methods.heads import ModulesToSave

    return [p for _, layer in adapter_layers(model) if isinstance(layer, ModulesToSave)
            for p in layer.modules_to_save.parameters()]


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters in up to six groups: (base | LoRA+ fast | head) x (decayed | not decayed).

    Raises:
        ValueError: Nothing is trainable, or ``loraplus_ratio`` is set on a model without LoRA.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]  # shared (tied) tensors once
    if not trainable:
        raise ValueError("the model has no trainable parameters; attach an adapter (graft.attach) or unfreeze some")
    head = {id(p) for p in head_parameters(model) if p.requires_grad} if config.head_lr_ratio is not None else set()
    fast: set[int] = set()
    if config.loraplus_ratio is not None:
        b = [p for p in lora_b_parameters(model) if p.requires_grad]
        if not b:
            raise ValueError(
                f"TrainConfig loraplus_ratio={config.loraplus_ratio!r} needs trainable LoRA B matrices, "
                "but the model has none; attach graft.LoRA(...) or set loraplus_ratio=None"
            )
        fast = ({id(p) for p in b} | {id(p) for p in trainable if p.ndim < 2}) - head
    ratio = {"base": 1.0, "loraplus": config.loraplus_ratio, "head": config.head_lr_ratio}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for p in trainable:
        kind = "head" if id(p) in head else "loraplus" if id(p) in fast else "base"
        groups.setdefault((kind, p.ndim >= 2), []).append(p)
    out = []
    for kind in ("base", "loraplus", "head"):
        for decayed in (True, False):
            params = groups.get((kind, decayed))
            if params:
                out.append({
                    "params": params,
                    "name": kind + ("" if decayed else "_no_decay"),
                    "lr": config.lr * ratio[kind],
                    "weight_decay": config.weight_decay if decayed else 0.0,
                })
    return out


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (torch) or AdamW8bit (bitsandbytes) over :func:`param_groups`."""
    groups = param_groups(model, config)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes.optim as bnb_optim
        except Exception as e:  # a broken native library raises more than ImportError
            raise ImportError(
                f"TrainConfig optimizer='adamw8bit' needs bitsandbytes, which failed to import ({e}); "
                "pip install bitsandbytes, or use optimizer='adamw'"
            ) from e
        return bnb_optim.AdamW8bit(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class Schedule:
    """Learning-rate multiplier at an optimizer step (0-based), as in transformers' schedules.

    Linear warmup from 0 (step 0 trains at lr 0, as in transformers), then ``kind``: cosine or
    linear decay reaching 0 at ``total``, or constant. A plain object rather than a lambda so
    ``LambdaLR.state_dict`` saves its fields and a checkpoint holds no code.
    """

    kind: str
    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class CosineRestarts:
    """ReLoRA's jagged cosine schedule (Lialin et al. 2023, §3; ``cosine_restarts`` in
    Guitaricet/relora ``training_utils.py``), as a multiplier at optimizer step ``t`` (0-based)::

        t < T_w                       : t / T_w
        rs = t mod R, rn = t // R
        rs < T_rw and t >= R          : rs / T_rw · cos_m(rn·R + T_rw)     (warm restart)
        otherwise                     : cos_m(t)
        cos_m(t) = m + (1 - m) · ½ (1 + cos(π (t - T_w) / (N - T_w)))

    with N = ``total``, T_w = ``warmup``, R = ``restart_every``, T_rw = ``restart_warmup``,
    m = ``min_ratio``. Each restart step (t = R, 2R, ...) trains at lr 0 and the rate climbs back to the
    cosine envelope over T_rw steps. The reference's ``adjust_step`` is always 0 here (a resumed run
    restores the schedule's position instead), and N need not be a multiple of R (the reference
    asserts it; a shorter last cycle is harmless). Past N the cosine stays at its floor.
    """

    warmup: int
    total: int
    restart_every: int
    restart_warmup: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        in_cycle, cycle = step % self.restart_every, step // self.restart_every
        if step >= self.restart_every and in_cycle < self.restart_warmup:
            return in_cycle / self.restart_warmup * self._cosine(cycle * self.restart_every + self.restart_warmup)
        return self._cosine(step)

    def _cosine(self, step: int) -> float:
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(config: TrainConfig, total: int) -> int:
    return config.warmup_steps or math.ceil(config.warmup_ratio * total)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total: int) -> LambdaLR:
    """A ``LambdaLR`` applying :class:`Schedule` (or :class:`CosineRestarts`) to every group's own peak
    lr (LoRA+ keeps its ratio).

    Raises:
        ValueError: With "cosine_restarts", a warmup (from ``warmup_ratio``) longer than a cycle.
    """
    warmup = warmup_steps(config, total)
    if config.schedule != "cosine_restarts":
        return LambdaLR(optimizer, Schedule(config.schedule, warmup, total))
    if warmup > config.restart_every:
        raise ValueError(f"TrainConfig warmup_ratio={config.warmup_ratio!r} gives {warmup} warmup steps of {total}, "
                         f"more than restart_every={config.restart_every!r}; the first warmup must fit in a cycle")
    restart_warmup = (config.restart_warmup_steps if config.restart_warmup_steps is not None
                      else config.restart_every // 10)
    min_ratio = config.min_lr_ratio if config.min_lr_ratio is not None else 0.1
    return LambdaLR(optimizer, CosineRestarts(warmup, total, config.restart_every, restart_warmup, min_ratio))
