"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2022) and their
composition (AdapterHub's ``Stack`` / ``Parallel`` / ``Average``).

One adapter at one location is a small residual MLP on the hidden states:

    A(h) = dropout(s · (W_up σ(W_down h + b_down) + b_up))     W_down: d → m, W_up: m → d
    m = max(1, d // reduction_factor)                          σ ∈ {gelu, relu, swish = SiLU}

As in AdapterHub's ``Adapter.forward`` (``up = adapter_up(down) * scaling``), the scaling s
multiplies the whole up-projection, its bias included; METHODS.md §5.1 writes the bias outside s,
which only differs when ``scaling != 1`` and is the same family of functions either way. Init is
AdapterHub's "mam_adapter": W_down kaiming-uniform (a = √5), b_down = 0, W_up = b_up = 0, so a new
adapter is exactly the identity.

Placement (where the adapter reads h and where its change goes), on Llama-, GPT-2-, BERT- and
T5-style blocks, by wrapping existing modules, never by copying model code:

* ``houlsby``: after the attention output projection and after the feed-forward output projection,
  sequentially, ``h → h + A(h)``, before the block's residual add / LayerNorm (2 locations per block;
  T5 decoder cross-attention is left alone, as AdapterHub does without ``cross_adapter``).
* ``pfeiffer``: after the feed-forward output projection only (1 location per block).
* ``parallel`` (He et al. 2022): beside the feed-forward block, ``FFN(x) + A(x)`` where x is the
  feed-forward block's own input (after the pre-LN in Llama / GPT-2 / T5; the attention sub-layer's
  output for BERT, i.e. ``BertOutput``'s second argument, to which ``BertOutput`` adds the FFN output
  before its LayerNorm, so the change is added to that argument).

Where AdapterHub's residual wiring differs (METHODS.md §5.3), and why graft does what it does:

* Pfeiffer: AdapterHub feeds ``LN(h + x)`` (BERT; the block's LayerNorm applied once more later) or
  ``x + h`` (Llama) into the adapter, x being the sub-layer's residual input. graft feeds h, the
  feed-forward output, exactly like Houlsby's second location. Reproducing AdapterHub would mean
  re-implementing each block's residual/LayerNorm code per architecture (and per transformers
  version); with h the same wrap works on every family, and at identity init both are the base.
* Parallel on pre-LN models: AdapterHub's ``ParallelAdapter`` reads the residual stream before the
  FFN's LayerNorm; graft reads the FFN's actual input, as in He et al.'s formulation
  ``FFN(x) + A(x)``. On post-LN BERT the two are the same tensor.
* Dropout: AdapterHub adds A(h) after the sub-layer's own dropout (``dropout(dense(·))``); graft's
  wrap sits on the projection, so in training the block's dropout also applies to h + A(h). In eval
  mode the outputs are identical.
* ``Average``: AdapterHub's ``torch.mean(stack(h_i) * w)`` divides by N a second time and averages
  outputs that include the residual; graft adds Σ w_i A_i(h) with weights summing to 1 (core.Average).

Composition at every location, for input x (h for the sequential placements): a plain list of
active names or ``Parallel(a, b)`` adds Σ_i A_i(x); ``Stack(a, b)`` chains them, x₁ = x + A_a(x),
x₂ = x₁ + A_b(x₁), and adds x₂ - x; ``Average(a, b, weights=w)`` adds Σ_i w_i A_i(x). An adapter
restricted by ``layers`` is skipped where it is absent (the others' weights are not renormalised).
``graft.route`` sends each batch row through its own adapter alone (compositions do not apply).

Not mergeable: A is nonlinear, so there is no weight to fold it into. Checkpoints are graft-only
(peft has no bottleneck adapters): ``peft_type = "BOTTLENECK"``, the config's fields, and per
location ``<module>.adapter_down.{weight,bias}`` and ``<module>.adapter_up.{weight,bias}``, where
``<module>`` is the wrapped module's name (e.g. ``model.layers.0.mlp.down_proj``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from graft import targets as tg
from graft.core import (
    AdapterLayer,
    Average,
    Composition,
    GraftState,
    Parallel,
    Stack,
    TargetedMethod,
    register,
    set_submodule,
)
from graft.methods.heads import apply_modules_to_save, heads_to_save, modules_to_save_count
from graft.methods.lora import routed_loop

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}
COMPOSITIONS = (Stack, Parallel, Average)


# --------------------------------------------------------------------------------------------
# Where adapters go: one small table of module-name patterns per block family


@dataclass(frozen=True)
class Wiring:
    """How a wrapped module feeds its adapters.

    ``source="output"``: the adapters read the module's output h and their change is added to it
    (sequential placement). ``source="input"``: they read the module's argument ``arg`` (by position,
    or by keyword ``kwarg``); the change is added to the module's output, or, with ``into_arg``, to
    that argument itself, for a module that adds the argument back before a LayerNorm (``BertOutput``).
    """

    source: str
    arg: int = 0
    kwarg: str = ""
    into_arg: bool = False


SEQUENTIAL = Wiring("output")


@dataclass(frozen=True)
class Family:
    """Module-name patterns (``re.fullmatch`` on qualified names) of one block family."""

    name: str
    attn_out: str  # the attention output projection (houlsby)
    ffn_out: str  # the feed-forward output projection (houlsby, pfeiffer)
    ffn: str  # the feed-forward block (parallel)
    ffn_input: Wiring  # which argument of ``ffn`` is the feed-forward input


FAMILIES = (
    Family("llama-like (llama, mistral, qwen2, ...)", r"(.*\.)?layers\.\d+\.self_attn\.o_proj",
           r"(.*\.)?layers\.\d+\.mlp\.down_proj", r"(.*\.)?layers\.\d+\.mlp", Wiring("input", 0, "x")),
    Family("gpt2", r"(.*\.)?h\.\d+\.attn\.c_proj", r"(.*\.)?h\.\d+\.mlp\.c_proj", r"(.*\.)?h\.\d+\.mlp",
           Wiring("input", 0, "hidden_states")),
    Family("bert-like (bert, roberta, ...)", r"(.*\.)?layer\.\d+\.attention\.output\.dense",
           r"(.*\.)?layer\.\d+\.output\.dense", r"(.*\.)?layer\.\d+\.output",
           Wiring("input", 1, "input_tensor", into_arg=True)),
    Family("t5", r"(.*\.)?block\.\d+\.layer\.0\.SelfAttention\.o",
           r"(.*\.)?block\.\d+\.layer\.\d+\.DenseReluDense\.wo", r"(.*\.)?block\.\d+\.layer\.\d+\.DenseReluDense",
           Wiring("input", 0, "hidden_states")),
)


def _canonical_modules(model: nn.Module) -> list[tuple[str, str]]:
    """(qualified name, name without graft's ``base_layer`` hops), outermost wrapper first, once each.

    Heads copied by ``modules_to_save`` are left out: they are not transformer sub-layers.
    """
    seen: set[str] = set()
    out = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if not name or "modules_to_save" in parts or "original_module" in parts:
            continue
        canonical = ".".join(p for p in parts if p != "base_layer")
        if canonical not in seen:
            seen.add(canonical)
            out.append((name, canonical))
    return out


def find_family(model: nn.Module) -> Family:
    """The first family whose three patterns each match a module of ``model``.

    Raises:
        ValueError: Naming the model type and the patterns tried, when no family fits.
    """
    canonical = [c for _, c in _canonical_modules(model)]
    for family in FAMILIES:
        patterns = (family.attn_out, family.ffn_out, family.ffn)
        if all(any(re.fullmatch(p, c) for c in canonical) for p in patterns):
            return family
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = "; ".join(f"{f.name}: {f.attn_out}, {f.ffn_out}, {f.ffn}" for f in FAMILIES)
    raise ValueError(
        f"graft.Adapter cannot find the attention-output and feed-forward sub-layers of "
        f"{type(model).__name__} (model_type={model_type!r}); it supports Llama-, GPT-2-, BERT- and "
        f"T5-style blocks, found by these module-name patterns: {known}"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"graft.Adapter needs model.config.hidden_size; {type(model).__name__} has {size!r}")
    return size


# --------------------------------------------------------------------------------------------
# The method


@dataclass(frozen=True)
class BottleneckSpec:
    """The settings of one adapter at one location."""

    hidden: int
    bottleneck: int
    non_linearity: str
    scaling: float
    dropout: float


@register
@dataclass(frozen=True)
class Adapter(TargetedMethod):
    """A bottleneck adapter in every transformer block (AdapterHub's ``BnConfig`` family).

    Args:
        reduction_factor: Hidden size over bottleneck size (> 0, at most the hidden size):
            m = max(1, d // reduction_factor).
        non_linearity: "gelu", "relu" or "swish" (SiLU).
        placement: "houlsby" (after attention and after the feed-forward output), "pfeiffer" (after
            the feed-forward output) or "parallel" (beside the feed-forward block, He et al. 2022).
        scaling: Factor s on the up-projection (> 0; He et al. use 4 for parallel adapters).
        dropout: Dropout on the adapter's change, in [0, 1).
        layers: Only adapt these block indices (None: every block).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier);
            None takes a sequence-classification model's head automatically.
    """

    reduction_factor: float = 16
    non_linearity: str = "gelu"
    placement: str = "houlsby"
    scaling: float = 1.0
    dropout: float = 0.0
    layers: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    peft_type: ClassVar[str] = "BOTTLENECK"
    mergeable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        rf = self.reduction_factor
        if not (_is_number(rf) and rf > 0):
            raise ValueError(f"Adapter reduction_factor={rf!r} must be a positive number (bottleneck = hidden // it)")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"Adapter non_linearity={self.non_linearity!r} is not one of {tuple(ACTIVATIONS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"Adapter placement={self.placement!r} is not one of {PLACEMENTS}")
        if not (_is_number(self.scaling) and self.scaling > 0):
            raise ValueError(f"Adapter scaling={self.scaling!r} must be a positive number")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"Adapter dropout={self.dropout!r} is outside [0, 1)")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"Adapter layers={self.layers!r} must be non-negative block indices")
            object.__setattr__(self, "layers", layers)
        if self.modules_to_save is not None:
            keep = self.modules_to_save
            object.__setattr__(self, "modules_to_save", (keep,) if isinstance(keep, str) else tuple(keep))

    # ---- where, and how big
    def sites(self, model: nn.Module) -> list[tuple[str, Wiring]]:
        """(module name, wiring) of every location this adapter occupies, in model order."""
        family = find_family(model)
        patterns = {
            "houlsby": [(family.attn_out, SEQUENTIAL), (family.ffn_out, SEQUENTIAL)],
            "pfeiffer": [(family.ffn_out, SEQUENTIAL)],
            "parallel": [(family.ffn, family.ffn_input)],
        }[self.placement]
        found, blocks = [], set()
        for name, canonical in _canonical_modules(model):
            for pattern, wiring in patterns:
                if re.fullmatch(pattern, canonical):
                    blocks.add(tg.layer_index(canonical))
                    if self.layers is None or tg.layer_index(canonical) in self.layers:
                        found.append((name, wiring))
        if not found:
            raise ValueError(f"Adapter layers={list(self.layers or ())} selects no block of "
                             f"{type(model).__name__}; its blocks are {sorted(blocks)}")
        return found

    def resolve(self, model: nn.Module) -> list[str]:
        return [name for name, _ in self.sites(model)]

    def bottleneck_size(self, model: nn.Module) -> int:
        d = hidden_size(model)
        if self.reduction_factor > d:
            raise ValueError(
                f"Adapter reduction_factor={self.reduction_factor!r} is larger than the hidden size {d} of "
                f"{type(model).__name__}: the bottleneck would be empty; use 0 < reduction_factor <= {d}"
            )
        return max(1, int(d // self.reduction_factor))

    def layer_class(self, module: nn.Module) -> type[AdapterLayer]:
        return BottleneckLayer

    def check_composition(self, block: Composition) -> None:
        """Bottleneck adapters take ``Stack``, ``Parallel`` and ``Average`` (called by ``graft.activate``)."""
        if not isinstance(block, COMPOSITIONS):
            names = ", ".join(c.__name__ for c in COMPOSITIONS)
            raise TypeError(f"graft.Adapter supports the composition blocks {names}, "
                            f"not {type(block).__name__}")

    def apply(self, model: nn.Module, name: str, state: GraftState) -> None:
        d, m = hidden_size(model), self.bottleneck_size(model)
        spec = BottleneckSpec(hidden=d, bottleneck=m, non_linearity=self.non_linearity,
                              scaling=float(self.scaling), dropout=float(self.dropout))
        for module_name, wiring in self.sites(model):
            module = model.get_submodule(module_name)
            if not isinstance(module, BottleneckLayer):
                # A module another method already wraps (e.g. LoRA on o_proj) is wrapped once more, so
                # the adapter reads that method's output.
                module = BottleneckLayer(module, state, wiring)
                set_submodule(model, module_name, module)
            module.add(name, spec)
        apply_modules_to_save(model, name, state, heads_to_save(model, self.modules_to_save))

    def count(self, model: nn.Module) -> int:
        """Per location 2·d·m + m + d; Houlsby has 2 locations per block, Pfeiffer and parallel 1."""
        d, m = hidden_size(model), self.bottleneck_size(model)
        per_location = 2 * d * m + m + d
        return len(self.sites(model)) * per_location + modules_to_save_count(
            model, heads_to_save(model, self.modules_to_save))

    # ---- checkpoint format (graft-only: peft has no bottleneck adapters)
    def to_peft(self, model: nn.Module, name: str) -> dict[str, Any]:
        config = dataclasses.asdict(self)
        config["layers"] = list(self.layers) if self.layers is not None else None
        # The heads actually copied, so a checkpoint loads the same way into any model; [] stays [].
        heads = heads_to_save(model, self.modules_to_save)
        config["modules_to_save"] = heads if heads or self.modules_to_save is not None else None
        return {"peft_type": self.peft_type, **config}

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> Adapter:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields and v is not None})


# --------------------------------------------------------------------------------------------
# The layer


class BottleneckLayer(AdapterLayer):
    """A module (an output projection or a feed-forward block) plus the named adapters at its location."""

    adapter_param_names = ("adapter_down", "adapter_up")
    mergeable = False

    def __init__(self, base_layer: nn.Module, state: GraftState, wiring: Wiring) -> None:
        super().__init__(base_layer, state)
        self.wiring = wiring
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()

    def add(self, name: str, spec: BottleneckSpec) -> None:
        ref = next(p for p in self.base_layer.parameters() if p.is_floating_point())
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        kw = {"device": ref.device, "dtype": dtype}
        self.adapter_down[name] = nn.Linear(spec.hidden, spec.bottleneck, **kw)
        self.adapter_up[name] = nn.Linear(spec.bottleneck, spec.hidden, **kw)
        self.adapter_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.configs[name] = spec
        init_identity(self, name)

    def remove(self, name: str) -> None:
        super().remove(name)
        if name in self.adapter_dropout:
            del self.adapter_dropout[name]

    # ---- math
    def bottleneck(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """A(x) = dropout(s · (W_up σ(W_down x + b_down) + b_up)), in the adapter's dtype."""
        spec = self.configs[name]
        down, up = self.adapter_down[name], self.adapter_up[name]
        z = ACTIVATIONS[spec.non_linearity](down(x.to(down.weight.dtype)))  # (..., m)
        return self.adapter_dropout[name](up(z) * spec.scaling)  # (..., d)

    def _routed_one(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.bottleneck(x, name)

    def change(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the active adapters add at this location for input x, or None when none applies."""
        if self.routed():
            return routed_loop(self, x, self._state.route_names())
        names = self.active_here()
        if not names:
            return None
        block = self._state.composition
        if isinstance(block, Stack):
            y, total = x, None
            for n in names:  # in the block's order: each adapter reads the previous one's output
                step = self.bottleneck(y, n)
                y = y.to(step.dtype) + step
                total = step if total is None else total + step
            return total
        weights = dict(zip(block.children, block.weights)) if isinstance(block, Average) else {}
        total = None
        for n in names:
            step = self.bottleneck(x, n) * weights.get(n, 1.0)
            total = step if total is None else total + step
        return total

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        w = self.wiring
        if w.source == "output":
            out = self.base_layer(*args, **kwargs)
            delta = self.change(out)
            return out if delta is None else out + delta.to(out.dtype)
        by_position = len(args) > w.arg
        x = args[w.arg] if by_position else kwargs[w.kwarg]
        delta = self.change(x)
        if delta is None:
            return self.base_layer(*args, **kwargs)
        if w.into_arg:
            x = x + delta.to(x.dtype)
            if by_position:
                args = (*args[: w.arg], x, *args[w.arg + 1 :])
            else:
                kwargs = {**kwargs, w.kwarg: x}
            return self.base_layer(*args, **kwargs)
        out = self.base_layer(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"a parallel adapter needs {type(self.base_layer).__name__} to return a tensor, "
                            f"got {type(out).__name__}")
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"wiring={self.wiring.source}, {super().extra_repr()}"


def init_identity(layer: BottleneckLayer, name: str) -> None:
    """W_down kaiming-uniform (a = √5), b_down = 0, W_up = b_up = 0: an exact identity at init
    (AdapterHub's "mam_adapter" init, He et al. 2022)."""
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    if down.weight.is_meta:
        return
    with torch.no_grad():
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
