"""Child-Tuning (Xu et al. 2021): update only a child network of the base weights, by masking gradients.

    W = W0 + Δ,   Δ trained with its gradient masked before every optimizer step:
    mode "F" (task-free):   g ← g ⊙ M / p,  M ~ Bernoulli(p) drawn afresh every step
    mode "D" (task-driven): g ← g ⊙ M,      M = top-p fraction of the Fisher information
                                            F = mean over N batches of grad², computed once before training

Design decisions (METHODS.md §9 for the reference behaviour):

* The change is held in a separate tensor Δ (zero at init) rather than written into W0, so the base
  stays bit-identical, ``graft.disabled`` gives the base model, several Child-Tuning adapters can
  coexist, merge is ``W0 += Δ``, and saving stores only the entries of Δ that changed (a sparse
  delta: flat int32 indices + values), not a copy of the weights; a layer where at least half the
  entries changed is stored dense (smaller than index/value pairs). Gradients equal those of training W0.
* The mask is applied after gradient clipping and before the optimizer's moment update, as the
  reference ``ChildTuningAdamW`` does; so in mode F coordinates masked at one step still move by
  momentum (a property of the method, not a bug). In mode D coordinates outside the mask never
  receive a gradient, so they stay exactly zero and the saved delta is sparse.
* Targets are the weight matrices of linear layers inside the transformer blocks ("all-linear"
  by default); biases and norms stay frozen (they are well under 1% of the weights). A
  classification head is trained in full next to it (``modules_to_save``), as in the reference,
  where everything outside the encoder layers is updated normally.
* The Fisher pass of mode D runs in eval mode (no dropout), so it is deterministic and draws no
  random numbers: a resumed run restores the mask from its checkpoint instead of recomputing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from graft import targets as tg
from graft.core import AdapterLayer, GraftState, TargetedMethod, adapter_layers, register
from graft.methods.heads import apply_modules_to_save, heads_to_save, modules_to_save_count

MODES = ("F", "D")


@register
@dataclass(frozen=True)
class ChildTuning(TargetedMethod):
    """Child-Tuning of the base weight matrices through a sparse, masked delta.

    Args:
        mode: "F" (task-free: a fresh Bernoulli(p) gradient mask every step, kept gradients divided
            by p) or "D" (task-driven: a Fisher-information mask computed once on ``fisher_batches``
            training batches before training; the top ``p`` fraction of entries is kept).
        p: Fraction of entries kept, in (0, 1] (the paper's reserve probability; 0.3 in its runs).
        fisher_batches: Mode D: number of training batches the Fisher information is averaged over.
        fisher_clip: Mode D: each tensor's gradient norm is clipped to this before squaring (as the
            reference clips with its max_grad_norm); None to not clip.
        targets: Modules whose weight trains (suffix list, regex or "all-linear").
        exclude: Modules to leave alone.
        layers: Only modules in these block indices.
        modules_to_save: Modules trained in full next to the delta (None: a classifier's head).
    """

    mode: str = "F"
    p: float = 0.3
    fisher_batches: int = 16
    fisher_clip: float | None = 1.0
    targets: str | tuple[str, ...] = "all-linear"
    exclude: str | tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    peft_type: ClassVar[str] = "CHILD_TUNING"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"ChildTuning mode={self.mode!r} is not one of {MODES} (F = task-free, D = task-driven)")
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0.0 < self.p <= 1.0:
            raise ValueError(f"ChildTuning p={self.p!r} must be a fraction in (0, 1]")
        if isinstance(self.fisher_batches, bool) or not isinstance(self.fisher_batches, int) or self.fisher_batches <= 0:
            raise ValueError(f"ChildTuning fisher_batches={self.fisher_batches!r} must be a positive integer")
        if self.fisher_clip is not None and not self.fisher_clip > 0:
            raise ValueError(f"ChildTuning fisher_clip={self.fisher_clip!r} must be positive or None")
        self.freeze_targeting_fields()

    # ---- the targeted-method protocol
    def resolve(self, model: nn.Module) -> list[str]:
        return tg.resolve(model, self.targets, exclude=self.exclude, layers=self.layers, allowed=(nn.Linear,),
                          what="ChildTuning targets")

    def layer_class(self, module: nn.Module) -> type[AdapterLayer]:
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            raise TypeError("ChildTuning trains the base weights themselves and cannot apply to a quantized "
                            f"{type(module).__name__}; load the model unquantized or use LoRA (QLoRA)")
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            return ChildLinear
        raise TypeError(f"ChildTuning trains nn.Linear and GPT-2 Conv1D weights, not {type(module).__name__}")

    def apply(self, model: nn.Module, name: str, state: GraftState) -> None:
        super().apply(model, name, state)
        apply_modules_to_save(model, name, state, heads_to_save(model, self.modules_to_save))

    def count(self, model: nn.Module) -> int:
        total = sum(model.get_submodule(n).weight.numel() for n in self.resolve(model))
        return total + modules_to_save_count(model, heads_to_save(model, self.modules_to_save))

    # ---- hooks the trainer calls (graft.train)
    def needs_preparation(self) -> bool:
        return self.mode == "D"

    def prepare(self, model: nn.Module, name: str, batches: Iterable[dict[str, torch.Tensor]],
                loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]) -> None:
        """Mode D: average grad² over ``batches`` and keep the top ``p`` fraction as the mask."""
        layers = _layers(model, name)
        fisher = {id(layer): torch.zeros_like(layer.child_delta[name], dtype=torch.float32) for layer in layers}
        was_training = model.training
        model.eval()
        n = 0
        try:
            for batch in batches:
                model.zero_grad(set_to_none=True)
                loss_fn(model, batch).backward()
                for layer in layers:
                    g = layer.child_delta[name].grad
                    if g is None:
                        continue
                    g = g.float()
                    if self.fisher_clip is not None:
                        norm = torch.linalg.vector_norm(g)
                        g = g * min(1.0, self.fisher_clip / (float(norm) + 1e-6))
                    fisher[id(layer)] += g * g
                n += 1
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        if n == 0:
            raise ValueError("ChildTuning mode D needs at least one training batch to compute the Fisher information")
        threshold = fisher_threshold([fisher[id(layer)] for layer in layers], self.p)
        for layer in layers:
            layer.child_mask[name] = fisher[id(layer)] >= threshold

    def before_optimizer_step(self, model: nn.Module, name: str) -> None:
        """Mask the gradients of Δ: fresh Bernoulli(p) / p in mode F, the Fisher mask in mode D."""
        for layer in _layers(model, name):
            delta = layer.child_delta[name]
            if delta.grad is None:
                continue
            if self.mode == "F":
                if self.p < 1.0:
                    keep = torch.rand(delta.shape, device=delta.device) < self.p  # global RNG: restored on resume
                    delta.grad.mul_(keep.to(delta.grad.dtype)).div_(self.p)
            else:
                mask = layer.child_mask.get(name)
                if mask is None:
                    raise RuntimeError("ChildTuning mode D has no mask yet: train with graft.train (it computes the "
                                       "Fisher mask first) or call method.prepare(model, name, batches, loss_fn)")
                delta.grad.mul_(mask.to(delta.grad.dtype))

    def training_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Tensors a training checkpoint must keep to resume exactly (mode D's mask)."""
        return {f"{lname}.child_mask": layer.child_mask[name].to(torch.uint8)
                for lname, layer in adapter_layers(model)
                if isinstance(layer, ChildLinear) and name in layer.child_mask}

    def load_training_state(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        for lname, layer in adapter_layers(model):
            key = f"{lname}.child_mask"
            if isinstance(layer, ChildLinear) and key in tensors:
                layer.child_mask[name] = tensors[key].to(device=layer.child_delta[name].device, dtype=torch.bool)

    # ---- format (graft's own: peft has no Child-Tuning)
    def to_peft(self, model: nn.Module, name: str) -> dict[str, Any]:
        resolved = [n for n, m in adapter_layers(model) if isinstance(m, ChildLinear) and name in m.configs]
        return {
            "peft_type": self.peft_type, "mode": self.mode, "p": self.p, "fisher_batches": self.fisher_batches,
            "fisher_clip": self.fisher_clip, "target_modules": tg.compact_targets(model, resolved),
            "modules_to_save": heads_to_save(model, self.modules_to_save) or None,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> ChildTuning:
        targets = config.get("target_modules") or "all-linear"
        return cls(mode=config.get("mode", "F"), p=float(config.get("p", 0.3)),
                   fisher_batches=int(config.get("fisher_batches", 16)), fisher_clip=config.get("fisher_clip", 1.0),
                   targets=targets if isinstance(targets, str) else tuple(targets),
                   modules_to_save=config.get("modules_to_save"))


def _layers(model: nn.Module, name: str) -> list[ChildLinear]:
    return [m for _, m in adapter_layers(model) if isinstance(m, ChildLinear) and name in m.configs]


def fisher_threshold(fishers: list[torch.Tensor], p: float) -> float:
    """The value v such that entries >= v are the top ``p`` fraction of all entries (ties kept)."""
    flat = torch.cat([f.flatten() for f in fishers])
    keep = max(1, math.ceil(p * flat.numel()))
    if keep >= flat.numel():
        return float("-inf")
    return float(torch.kthvalue(flat, flat.numel() - keep + 1).values)


class ChildLinear(AdapterLayer):
    """A linear (or GPT-2 Conv1D) layer computing with W0 + Δ; Δ has W0's shape and layout."""

    adapter_param_names = ("child_delta",)

    def __init__(self, base_layer: nn.Module, state: GraftState) -> None:
        super().__init__(base_layer, state)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self.child_delta = nn.ParameterDict()
        self.child_mask: dict[str, torch.Tensor] = {}  # mode D: bool, W0's shape

    def add(self, name: str, config: Any) -> None:
        w = self.base_layer.weight
        self.child_delta[name] = nn.Parameter(torch.zeros_like(w, dtype=torch.float32 if w.dtype != torch.float64 else w.dtype))
        self.configs[name] = config

    def remove(self, name: str) -> None:
        super().remove(name)
        self.child_mask.pop(name, None)

    def _weight(self, names: list[str]) -> torch.Tensor:
        w = self.base_layer.weight
        for n in names:
            w = w + self.child_delta[n].to(w.dtype)
        return w

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routed():
            return self._routed(x)
        names = self.active_here()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self._linear(x, self._weight(names))

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        if self.fan_in_fan_out:  # Conv1D: y = x W + b with W stored (d_in, d_out)
            out = x @ w.to(x.dtype)
            return out + bias if bias is not None else out
        return F.linear(x, w.to(x.dtype), bias)

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        idx = self.row_index(x.shape[0], x.device)
        for i, name in enumerate(self._state.route_names()):
            rows = (idx == i).nonzero(as_tuple=True)[0]
            if name in self.child_delta and rows.numel():
                out = out.index_copy(0, rows, self._linear(x[rows], self._weight([name])))
        return out

    # ---- saving: only the entries that changed
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        delta = self.child_delta[name].detach()
        flat = delta.flatten()
        idx = flat.nonzero(as_tuple=True)[0]
        if 2 * idx.numel() >= flat.numel():
            # Mostly changed (mode F moves nearly every entry through momentum): (index, value) pairs
            # would take twice the bytes of the dense delta, so the dense delta is stored instead.
            return {"child_delta": delta.clone()}
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64  # 4 bytes an entry where they suffice
        return {"child_indices": idx.to(index_dtype), "child_values": flat[idx].clone()}

    def load_adapter_state(self, name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Inverse of ``adapter_state``: scatter the saved entries into a zero delta."""
        delta = self.child_delta[name]
        if "child_delta" in tensors and len(tensors) == 1:
            dense = tensors["child_delta"]
            if tuple(dense.shape) != tuple(delta.shape):
                raise ValueError(f"Child-Tuning delta for '{where}' has shape {tuple(dense.shape)} but the weight has "
                                 f"{tuple(delta.shape)}: the adapter was trained for a different base model")
            with torch.no_grad():
                delta.copy_(dense)
            return
        missing = {"child_indices", "child_values"} - set(tensors)
        if missing:
            raise ValueError(f"Child-Tuning tensors for '{where}' lack {sorted(missing)}")
        idx, values = tensors["child_indices"], tensors["child_values"]
        if idx.dim() != 1 or values.shape != idx.shape:
            raise ValueError(f"Child-Tuning tensors for '{where}': indices {tuple(idx.shape)} and values "
                             f"{tuple(values.shape)} must be two vectors of the same length")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= delta.numel()):
            raise ValueError(f"Child-Tuning indices for '{where}' fall outside the weight ({delta.numel()} entries, "
                             f"shape {tuple(delta.shape)}): the adapter was trained for a different base model")
        with torch.no_grad():
            delta.zero_()
            delta.view(-1)[idx.to(delta.device, torch.int64)] = values.to(delta.device, delta.dtype)

    # ---- merge
    def merge(self, names: list[str]) -> None:
        with torch.no_grad():
            for name in names:
                if name in self.merged:
                    continue  # idempotent
                self.base_layer.weight.add_(self.child_delta[name].to(self.base_layer.weight.dtype))
                self.merged.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            for name in reversed(self.merged):
                self.base_layer.weight.sub_(self.child_delta[name].to(self.base_layer.weight.dtype))
        self.merged = []

    def active_here(self) -> list[str]:
        return [n for n in super().active_here() if n in self.child_delta]
