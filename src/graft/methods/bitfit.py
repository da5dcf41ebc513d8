"""BitFit (Ben Zaken et al. 2021): train only the bias terms (and the task head).

Design decision: the base bias tensors are never trained in place. Each module whose output is
``f(x) + bias`` with the bias added along the last dimension (``nn.Linear``, GPT-2 ``Conv1D``,
``nn.LayerNorm`` and other ``*LayerNorm`` modules) is wrapped by an adapter layer holding one
zero-initialised delta per adapter:

    y = base(x) + δ          equivalent to training the bias:  b' = b + δ,  ∂L/∂δ = ∂L/∂b

So the base stays bit-identical, several BitFit adapters can coexist (and be routed per row),
disabled == base, merge adds δ to the bias and unmerge subtracts it. As in the paper's code, a
sequence-classification model's head is trained in full (``modules_to_save``), not just its bias.

A model without biases (Llama, Mistral, T5) is refused when the adapter is attached: BitFit would
train nothing but the head there; LoRA or (IA)³ add their own parameters instead.

Save format (graft only; peft has no BitFit): ``adapter_config.json`` with ``peft_type: "BITFIT"``,
``target_modules`` (the adapted modules), ``exclude_modules`` and ``modules_to_save``; tensors
``base_model.model.<module>.bias_delta`` (δ, shaped like ``<module>.bias``) plus the head's tensors
under their plain names, as for every method.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from graft import targets as tg
from graft.core import AdapterLayer, GraftState, TargetedMethod, register
from graft.methods.heads import ModulesToSave, apply_modules_to_save, heads_to_save, modules_to_save_count

SUPPORTED = "nn.Linear, GPT-2 Conv1D, nn.LayerNorm and other *LayerNorm modules (bias added on the last dimension)"


@register
@dataclass(frozen=True)
class BitFit(TargetedMethod):
    """Bias-only fine-tuning through per-adapter bias deltas.

    Args:
        targets: Modules whose bias to train: suffix list or regex (matched modules without a
            bias are skipped; a list entry that selects no biased module is an error). None
            takes every bias of the model outside the head.
        exclude: Modules to leave alone, same forms as ``targets``.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier);
            None takes a sequence-classification model's head automatically.
    """

    targets: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    peft_type: ClassVar[str] = "BITFIT"

    def __post_init__(self) -> None:
        # Copies, never the caller's objects: a frozen config must not change under us.
        for name in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))

    # ---- targets
    def resolve(self, model: nn.Module) -> list[str]:
        """The biased modules to adapt, in model order.

        Raises:
            ValueError: The model has no bias outside its head, or a target selects no biased module.
            TypeError: A selected bias belongs to a module type BitFit cannot wrap (named).
        """
        heads = heads_to_save(model, self.modules_to_save)
        candidates = {n: m for n, m in _biased_modules(model) if not tg.matches(n, heads)}
        if self.targets is None:
            names = [n for n in candidates if not tg.matches(n, self.exclude)]
            if not names:
                where = f" outside its head {heads}" if heads else ""
                raise ValueError(
                    f"{type(model).__name__} has no bias parameters{where}; BitFit would train nothing but the "
                    "head. Use LoRA or IA3, which add their own parameters (graft.LoRA(...), graft.IA3(...))"
                )
        else:
            matched = tg.resolve(model, self.targets, exclude=self.exclude, what="BitFit targets")
            names = [n for n in matched if n in candidates]
            entries = [self.targets] if isinstance(self.targets, str) else list(self.targets)
            for entry in entries:
                if not any(tg.matches(n, entry if isinstance(self.targets, str) else [entry]) for n in names):
                    biased = sorted({n.split(".")[-1] for n in candidates})
                    raise ValueError(
                        f"BitFit targets entry {entry!r} selects no module with a bias in {type(model).__name__}; "
                        f"modules with a bias here: {biased[:20]}"
                    )
        unsupported = [f"{n} ({type(candidates[n]).__name__})" for n in names if not _bias_on_last_dim(candidates[n])]
        if unsupported:
            raise TypeError(
                f"BitFit cannot wrap {unsupported[:5]}: it supports {SUPPORTED}; leave them out with exclude=[...]"
            )
        return names

    def layer_class(self, module: nn.Module) -> type[AdapterLayer]:
        if _bias_on_last_dim(module):
            return BitFitLayer
        raise TypeError(f"BitFit supports {SUPPORTED}, not {type(module).__name__}")

    def apply(self, model: nn.Module, name: str, state: GraftState) -> None:
        super().apply(model, name, state)
        apply_modules_to_save(model, name, state, heads_to_save(model, self.modules_to_save))

    # ---- counts
    def count(self, model: nn.Module) -> int:
        """Σ bias sizes of the adapted modules (+ saved modules)."""
        biases = dict(_biased_modules(model))
        total = sum(biases[n].bias.numel() for n in self.resolve(model))
        return total + modules_to_save_count(model, heads_to_save(model, self.modules_to_save))

    # ---- graft's own format (peft has no BitFit)
    def to_peft(self, model: nn.Module, name: str) -> dict[str, Any]:
        adapted = [n for n, m in model.named_modules() if isinstance(m, BitFitLayer) and name in m.configs]
        return {
            "peft_type": self.peft_type,
            "target_modules": tg.compact_targets(model, adapted),
            "exclude_modules": None,
            "modules_to_save": heads_to_save(model, self.modules_to_save) or None,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> BitFit:
        return cls(
            targets=config.get("target_modules"),
            exclude=config.get("exclude_modules"),
            modules_to_save=config.get("modules_to_save"),
        )


def _biased_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, base module) for every module owning a ``bias`` parameter, seen through adapter layers.

    Modules inside an adapter layer (its base, its adapter tensors, a head's trained copies) are
    not separate candidates; a module wrapped by an adapter layer is reported under the layer's name.
    """
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue  # named_modules is pre-order: an adapter layer's internals follow it directly
        if isinstance(module, AdapterLayer):
            inside = f"{name}."
            if isinstance(module, ModulesToSave):
                continue  # already trained in full by another adapter
            module = module.base_layer
        if isinstance(module._parameters.get("bias"), nn.Parameter):
            yield name, module


def _bias_on_last_dim(module: nn.Module) -> bool:
    """Whether the module computes ``f(x) + bias`` with the bias broadcast over the last dimension."""
    if tg.is_linear(module) or isinstance(module, nn.LayerNorm):
        return True
    bias = getattr(module, "bias", None)
    return type(module).__name__.endswith("LayerNorm") and isinstance(bias, torch.Tensor) and bias.dim() == 1


# --------------------------------------------------------------------------------------------
# Layer


class BitFitLayer(AdapterLayer):
    """A biased module plus one zero-initialised bias delta per adapter: y = base(x) + δ."""

    adapter_param_names = ("bias_delta",)

    def __init__(self, base_layer: nn.Module, state: GraftState) -> None:
        super().__init__(base_layer, state)
        self.bias_delta = nn.ParameterDict()

    def add(self, name: str, config: Any) -> None:
        bias = self.base_layer.bias
        dtype = torch.float32 if bias.dtype in (torch.float16, torch.bfloat16) else bias.dtype
        self.bias_delta[name] = nn.Parameter(torch.zeros(bias.shape, dtype=dtype, device=bias.device))
        self.configs[name] = config

    def _routed_delta(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """Per-row deltas (batch, d), gathered from a table with a zero row for the base."""
        names = self._state.route_names()
        if not any(n in self.configs for n in names):
            return None
        zero = torch.zeros_like(next(iter(self.bias_delta.values())))
        table = [self.bias_delta[n] if n in self.configs else zero for n in names]
        idx = self.row_index(batch, device)
        return torch.stack([*table, zero])[torch.where(idx < 0, len(names), idx)]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.routed():
            delta = self._routed_delta(out.shape[0], out.device)
            if delta is None:
                return out
            return out + delta.view(out.shape[0], *[1] * (out.dim() - 2), -1).to(out.dtype)
        for name in self.active_here():
            out = out + self.bias_delta[name].to(out.dtype)
        return out

    def _shift(self, name: str, sign: float) -> None:
        bias = self.base_layer.bias
        with torch.no_grad():
            bias.copy_((bias.float() + sign * self.bias_delta[name].detach().float()).to(bias.dtype))

    def merge(self, names: list[str]) -> None:
        for name in names:
            if name not in self.merged:  # idempotent
                self._shift(name, 1.0)
                self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            self._shift(self.merged.pop(), -1.0)
