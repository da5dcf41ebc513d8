"""(IA)³, "infused adapter by inhibiting and amplifying inner activations" (Liu et al. 2022, T-Few §3.3).

A learned vector rescales activations element-wise. As in peft, a targeted module is one of two kinds:

    output-side (attention k, v):   y = l ⊙ base(x)      l ∈ R^{d_out}   (the bias is scaled too)
    feedforward (FFN down proj):    y = base(l ⊙ x)      l ∈ R^{d_in}

The feedforward form scales the FFN's intermediate activation, the paper's ``W_2 (l_ff ⊙ γ(W_1 x))``.
Vectors start at one, so a fresh adapter is the exact identity. Several active adapters multiply.
Merging rescales rows of W (output-side, with the bias) or its columns (feedforward): W ← W ⊙ l.

The tensor is ``ia3_l`` with peft's shapes, (d_out, 1) or (1, d_in), so checkpoints interchange.
Feedforward entries are matched like targets (whole name or ``"." + entry`` suffix); peft matches
them with a plain suffix test, so ``save`` writes a ``feedforward_modules`` list that selects the
same modules under peft's rule.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from graft import targets as tg
from graft.core import AdapterLayer, GraftState, TargetedMethod, register
from graft.methods.heads import apply_modules_to_save, heads_to_save, modules_to_save_count
from graft.methods.lora import _check_mergeable, in_out_features

# The paper's choice (keys, values, FFN intermediate), written per architecture as in peft's
# constants. peft's qwen2 entry scales q_proj instead of k_proj; graft keeps the paper's k_proj.
DEFAULT_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bert": ["key", "value", "output.dense"], "roberta": ["key", "value", "output.dense"],
    "t5": ["k", "v", "wo"],
}
DEFAULT_FEEDFORWARD = {
    "llama": ["down_proj"], "mistral": ["down_proj"], "qwen2": ["down_proj"], "gpt2": ["mlp.c_proj"],
    "bert": ["output.dense"], "roberta": ["output.dense"], "t5": ["wo"],
}


@dataclass(frozen=True)
class IA3Spec:
    """The settings of one (IA)³ adapter on one module."""

    feedforward: bool


@register
@dataclass(frozen=True)
class IA3(TargetedMethod):
    """(IA)³: learned rescaling vectors on linear and GPT-2 Conv1D layers.

    Args:
        targets: Suffix list, regex, or "all-linear"; None takes the architecture's default
            (k, v and the FFN down projection for Llama-like models, ``c_attn`` and ``mlp.c_proj``
            for GPT-2, key/value/``output.dense`` for BERT, k/v/wo for T5).
        feedforward: The targets scaled on their input rather than their output (same forms). Must
            be a subset of ``targets``. None takes the architecture's default feedforward modules
            that are among the targets (none for an architecture without a default); ``()`` means none.
        exclude: Modules to leave alone, same forms as ``targets``.
        layers: Only adapt modules inside these block indices.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier);
            None takes a sequence-classification model's head automatically.
    """

    targets: str | tuple[str, ...] | None = None
    feedforward: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    peft_type: ClassVar[str] = "IA3"

    def __post_init__(self) -> None:
        # Copies, never the caller's objects: a frozen config must not change under us.
        for name in ("targets", "feedforward", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            object.__setattr__(self, "layers", layers)
        _check_subset(self.targets, self.feedforward)

    # ---- targets
    def with_defaults(self, model: nn.Module) -> IA3:
        """This config with the architecture's default targets and feedforward modules written out.

        Raises:
            ValueError: No default for this architecture, or a given ``feedforward`` that selects
                none of the targeted modules.
        """
        targets, feedforward = self.targets, self.feedforward
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if targets is None:
            if model_type not in DEFAULT_TARGETS:
                raise ValueError(
                    f"IA3 targets not given and no default is known for model_type={model_type!r} "
                    f"(defaults exist for {sorted(DEFAULT_TARGETS)}); pass targets=[...] and feedforward=[...]"
                )
            targets = tuple(DEFAULT_TARGETS[model_type])
            _check_subset(targets, feedforward, note=f" (the default targets for {model_type})")
        names = self._resolve(model, targets)
        if feedforward is None:
            # Like peft, a default feedforward module that is not targeted simply has no effect.
            defaults = DEFAULT_FEEDFORWARD.get(model_type, [])
            feedforward = tuple(f for f in defaults if any(tg.matches(n, [f]) for n in names))
        elif feedforward and not any(tg.matches(n, feedforward) for n in names):
            raise ValueError(
                f"IA3 feedforward={feedforward!r} selects none of the targeted modules "
                f"{tg.compact_targets(model, names)}; feedforward must be a subset of targets"
            )
        # Not dataclasses.replace: peft does not hold a default feedforward list to the subset rule
        # (targets=["mlp.down_proj"] keeps the default "down_proj"), so neither is it re-checked here.
        explicit = copy.copy(self)
        object.__setattr__(explicit, "targets", targets)
        object.__setattr__(explicit, "feedforward", feedforward)
        return explicit

    def _resolve(self, model: nn.Module, targets: str | tuple[str, ...]) -> list[str]:
        return tg.resolve(model, targets, exclude=self.exclude, layers=self.layers, allowed=(nn.Linear,),
                          what="IA3 targets")

    def resolve(self, model: nn.Module) -> list[str]:
        return self._resolve(model, self.with_defaults(model).targets)

    def layer_config(self, name: str) -> IA3Spec:
        # Called on the config returned by ``with_defaults`` (see ``apply``), where feedforward is explicit.
        return IA3Spec(feedforward=tg.matches(name, self.feedforward or ()))

    def layer_class(self, module: nn.Module) -> type[AdapterLayer]:
        if tg.is_linear(module):
            return IA3Linear
        raise TypeError(f"IA3 supports nn.Linear and GPT-2 Conv1D, not {type(module).__name__}")

    def apply(self, model: nn.Module, name: str, state: GraftState) -> None:
        TargetedMethod.apply(self.with_defaults(model), model, name, state)
        apply_modules_to_save(model, name, state, heads_to_save(model, self.modules_to_save))

    # ---- counts
    def count(self, model: nn.Module) -> int:
        """Σ d_out over output-side targets + Σ d_in over feedforward targets (+ saved modules)."""
        explicit = self.with_defaults(model)
        total = 0
        for module_name in explicit.resolve(model):
            d_in, d_out = in_out_features(model.get_submodule(module_name))
            total += d_in if explicit.layer_config(module_name).feedforward else d_out
        return total + modules_to_save_count(model, heads_to_save(model, self.modules_to_save))

    # ---- PEFT format
    def to_peft(self, model: nn.Module, name: str) -> dict[str, Any]:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear) and name in m.configs}
        feedforward = [n for n, m in layers.items() if m.configs[name].feedforward]
        given = self.with_defaults(model).targets
        preferred = list(given) if isinstance(given, tuple) else None
        targets, ff_entries = _peft_module_lists(model, list(layers), feedforward, preferred)
        return {
            "peft_type": "IA3",
            "target_modules": targets,
            "feedforward_modules": ff_entries,
            "exclude_modules": None,
            "fan_in_fan_out": any(m.fan_in_fan_out for m in layers.values()),
            "modules_to_save": heads_to_save(model, self.modules_to_save) or None,
            "init_ia3_weights": True,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> IA3:
        def spec(value: Any) -> str | tuple[str, ...] | None:
            return value if value is None or isinstance(value, str) else tuple(value)

        return cls(
            targets=spec(config.get("target_modules")),
            feedforward=spec(config.get("feedforward_modules")),
            exclude=spec(config.get("exclude_modules")),
            modules_to_save=config.get("modules_to_save"),
        )


def _check_subset(targets: Any, feedforward: Any, note: str = "") -> None:
    """peft's rule, checked when both are name lists: every feedforward entry is a target entry."""
    if isinstance(targets, tuple) and isinstance(feedforward, tuple):
        extra = [f for f in feedforward if f not in targets]
        if extra:
            raise ValueError(
                f"IA3 feedforward={list(feedforward)!r} must be a subset of targets={list(targets)!r}{note}; "
                f"not among the targets: {extra}. Add them to targets or drop them from feedforward"
            )


def _peft_module_lists(
    model: nn.Module, targeted: list[str], feedforward: list[str], preferred: list[str] | None
) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) that make peft adapt ``targeted`` and treat exactly
    ``feedforward`` as feedforward: the config's own list or short suffixes when they are exact,
    else full module names.

    peft requires the feedforward list to be a subset of the target list and tests it with a plain
    ``key.endswith(entry)``, so each feedforward entry is a target entry checked under that rule.
    """
    names = [n for n, _ in model.named_modules() if n and not tg._inside_adapter(n)]
    exact = preferred is not None and sorted(n for n in names if tg.matches(n, preferred)) == sorted(targeted)
    candidates = ([preferred] if exact else []) + [tg.compact_targets(model, targeted), list(targeted)]
    for entries in candidates:
        ff = [e for e in entries if all(n in feedforward for n in targeted if tg.matches(n, [e]))
              and any(tg.matches(n, [e]) for n in targeted)]
        if {n for n in targeted if any(n.endswith(e) for e in ff)} == set(feedforward):
            return entries, ff
    raise ValueError(f"cannot write feedforward modules {feedforward[:3]}... in a form peft reads back exactly")


# --------------------------------------------------------------------------------------------
# Layer


class IA3Linear(AdapterLayer):
    """(IA)³ on ``nn.Linear`` or GPT-2 ``Conv1D`` (which stores Wᵀ: only merging transposes)."""

    adapter_param_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, state: GraftState) -> None:
        super().__init__(base_layer, state)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self.ia3_l = nn.ParameterDict()

    def add(self, name: str, spec: IA3Spec) -> None:
        w = self.base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) or not w.is_floating_point() else w.dtype
        shape = (1, self.in_features) if spec.feedforward else (self.out_features, 1)
        self.ia3_l[name] = nn.Parameter(torch.ones(shape, dtype=dtype, device=w.device))
        self.configs[name] = spec

    # ---- math
    def _product(self, names: list[str], feedforward: bool) -> torch.Tensor | None:
        """Element-wise product of the vectors of one kind, (d,), or None when there are none."""
        scale = None
        for name in names:
            if self.configs[name].feedforward == feedforward:
                vec = self.ia3_l[name].flatten()
                scale = vec if scale is None else scale * vec
        return scale

    def _routed_scales(self, batch: int, device: torch.device, feedforward: bool) -> torch.Tensor | None:
        """Per-row vectors (batch, d) of one kind, gathered from a table with a ones row for the base."""
        names = self._state.route_names()
        if not any(n in self.configs and self.configs[n].feedforward == feedforward for n in names):
            return None
        ref = next(iter(self.ia3_l.values()))
        ones = ref.new_ones(self.in_features if feedforward else self.out_features)
        table = [self.ia3_l[n].flatten() if n in self.configs and self.configs[n].feedforward == feedforward
                 else ones for n in names]
        idx = self.row_index(batch, device)
        idx = torch.where(idx < 0, len(names), idx)
        return torch.stack([*table, ones])[idx]  # (batch, d)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routed():
            scale_in = self._routed_scales(x.shape[0], x.device, feedforward=True)
            scale_out = self._routed_scales(x.shape[0], x.device, feedforward=False)
            if scale_in is not None:
                scale_in = scale_in.view(x.shape[0], *[1] * (x.dim() - 2), -1)
        else:
            names = self.active_here()
            scale_in, scale_out = self._product(names, True), self._product(names, False)
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)
        out = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            if scale_out.dim() == 2:  # routed: (batch, d_out)
                scale_out = scale_out.view(out.shape[0], *[1] * (out.dim() - 2), -1)
            out = (out.to(scale_out.dtype) * scale_out).to(out.dtype)
        return out

    # ---- merge: W ← W ⊙ l on rows (output-side, bias too) or columns (feedforward)
    def _weight_scale(self, name: str) -> torch.Tensor:
        """l in fp32, shaped to broadcast over the stored weight: (d_out, d_in) Linear, (d_in, d_out) Conv1D."""
        vec = self.ia3_l[name].detach().float().flatten()
        scales_first_dim = (not self.configs[name].feedforward) != self.fan_in_fan_out
        return vec[:, None] if scales_first_dim else vec[None, :]

    def _rescale(self, name: str, undo: bool) -> None:
        w, bias = self.base_layer.weight, self.base_layer.bias
        vec = self.ia3_l[name].detach().float().flatten()
        scale = self._weight_scale(name)
        with torch.no_grad():
            w.copy_((w.float() / scale if undo else w.float() * scale).to(w.dtype))
            if bias is not None and not self.configs[name].feedforward:
                bias.copy_((bias.float() / vec if undo else bias.float() * vec).to(bias.dtype))

    def merge(self, names: list[str]) -> None:
        _check_mergeable(self.base_layer)
        for name in names:
            if name not in self.merged:  # idempotent
                self._rescale(name, undo=False)
                self.merged.append(name)

    def unmerge(self) -> None:
        zero = [n for n in self.merged if bool((self.ia3_l[n] == 0).any())]
        if zero:
            raise RuntimeError(
                f"IA3 adapters {zero} have zero entries in ia3_l, so their merge erased weights and cannot be "
                "undone; reload the base model instead"
            )
        while self.merged:
            self._rescale(self.merged.pop(), undo=True)
