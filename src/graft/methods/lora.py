"""LoRA (Hu et al. 2021) and its variants as one layer: rsLoRA, DoRA, PiSSA / OLoRA init.

    y = W0 x + b + s · B A dropout(x),   A ∈ R^{r×d_in}, B ∈ R^{d_out×r}
    s = alpha / r   (LoRA, Hu et al. eq. 4)        s = alpha / sqrt(r)   (rsLoRA, Kalajdzievski 2023)

DoRA (Liu et al. 2024, eq. 5): W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row with the norm detached
(paper §4.3), computed as ``base(x) + (g - 1)(W0 x) + g(sBAx)`` with g = m / ‖·‖ so the base
matmul is never repeated (the bias is not rescaled, as in peft).

Tensor names follow peft (``lora_A``, ``lora_B``, ``lora_magnitude_vector``, ``lora_embedding_A/B``)
so checkpoints interchange.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from graft import quant
from graft import targets as tg
from graft.core import AdapterLayer, GraftState, TargetedMethod, register
from graft.methods.heads import apply_modules_to_save, heads_to_save, modules_to_save_count
from graft.methods.loftq_init import PENDING_ATTR, check_settings, decompose

INITS = ("default", "gaussian", "pissa", "olora", "loftq")
REWRITES_BASE = ("pissa", "olora", "loftq")  # inits that change the base weight when the adapter is created
BIAS_MODES = ("none", "all", "lora_only")

# peft's per-architecture defaults (utils/constants.py), used when ``targets`` is not given.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"], "t5": ["q", "v"],
    "falcon": ["query_key_value"], "bloom": ["query_key_value"], "gpt_neox": ["query_key_value"],
}


def pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """Per-module override: a key matches a module name exactly or as a ``(.*\\.)?key`` regex (peft)."""
    for key, value in pattern.items():
        if key == module_name or re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
            return value
    return default


@dataclass(frozen=True)
class LoraSpec:
    """The settings of one LoRA adapter on one module, after rank/alpha patterns."""

    r: int
    alpha: float
    dropout: float
    rslora: bool
    dora: bool
    init: str
    loftq: dict[str, Any] | None = None  # init="loftq": the quantisation settings (graft.methods.loftq_init.DEFAULTS)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


@register
@dataclass(frozen=True)
class LoRA(TargetedMethod):
    """Low-rank adaptation of linear, GPT-2 Conv1D and embedding layers.

    Args:
        r: Rank of the update (> 0).
        alpha: Scaling numerator (> 0): s = alpha / r, or alpha / sqrt(r) with ``rslora``.
        dropout: Dropout on the LoRA input, in [0, 1).
        targets: Suffix list, regex, or "all-linear"; None takes the architecture's default
            (q,v projections for Llama-like models, ``c_attn`` for GPT-2, query/value for BERT).
        exclude: Modules to leave alone, same forms as ``targets``.
        layers: Only adapt modules inside these block indices.
        bias: "none", "all" (train every bias) or "lora_only" (biases of adapted layers).
        rank_pattern: Per-module rank overrides, keys matched as in peft.
        alpha_pattern: Per-module alpha overrides.
        rslora: Rank-stabilised scaling alpha / sqrt(r).
        dora: Weight-decomposed LoRA (trainable magnitude per output feature).
        init: "default" (kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r)), "pissa" or
            "olora" (both move the principal part of W0 into A and B and change the base weight;
            ``graft.save`` converts such an adapter to a plain rank-2r LoRA of the original base),
            "loftq" (quantized base and adapter fitted together: use :func:`graft.loftq`, which
            quantizes the model; on a full-precision model the LoftQ base is written into its weights).
        loftq_config: init="loftq" only: ``quant_type`` ("nf4"/"fp4"), ``iters``, ``compute_dtype``,
            ``double_quant`` (defaults in ``graft.methods.loftq_init.DEFAULTS``).
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier);
            None takes a sequence-classification model's head automatically.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rslora: bool = False
    dora: bool = False
    init: str = "default"
    modules_to_save: tuple[str, ...] | None = None
    loftq_config: dict[str, Any] = field(default_factory=dict)

    peft_type: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        _check_rank("r", self.r)
        _check_positive("alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r} is outside [0, 1)")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoRA bias={self.bias!r} is not one of {BIAS_MODES}")
        if self.init not in INITS:
            raise ValueError(f"LoRA init={self.init!r} is not one of {INITS}")
        if self.dora and self.init in REWRITES_BASE:
            raise ValueError(f"LoRA init={self.init!r} cannot be combined with dora=True")
        if self.loftq_config and self.init != "loftq":
            raise ValueError(f"LoRA loftq_config is for init='loftq', not init={self.init!r}")
        if self.init == "loftq":
            object.__setattr__(self, "loftq_config", check_settings(dict(self.loftq_config)))
        else:
            object.__setattr__(self, "loftq_config", {})
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_positive(f"alpha_pattern[{key!r}]", value)
        # Copies, never the caller's objects: a frozen config must not change under us.
        for name in ("targets", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))

    # ---- targets and per-module settings
    def target_spec(self, model: nn.Module) -> str | tuple[str, ...]:
        if self.targets is not None:
            return self.targets
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"LoRA targets not given and no default is known for model_type={model_type!r}; "
                "pass targets=[...] or targets='all-linear'"
            )
        return tuple(DEFAULT_TARGETS[model_type])

    def resolve(self, model: nn.Module) -> list[str]:
        return tg.resolve(
            model, self.target_spec(model), exclude=self.exclude, layers=self.layers,
            allowed=(nn.Linear, nn.Embedding), what="LoRA targets",
        )

    def layer_config(self, name: str) -> LoraSpec:
        return LoraSpec(
            r=pattern_value(self.rank_pattern, name, self.r),
            alpha=pattern_value(self.alpha_pattern, name, self.alpha),
            dropout=self.dropout, rslora=self.rslora, dora=self.dora, init=self.init,
            loftq=self.loftq_config or None,
        )

    def layer_class(self, module: nn.Module) -> type[AdapterLayer]:
        # Ordered dispatch: embeddings first, then anything linear-like (Linear, Conv1D, bnb).
        if isinstance(module, nn.Embedding):
            if self.dora:
                raise TypeError("DoRA on nn.Embedding is not supported; exclude the embedding or use dora=False")
            return LoraEmbedding
        if tg.is_linear(module):
            return LoraLinear
        raise TypeError(
            f"LoRA supports nn.Linear, GPT-2 Conv1D and nn.Embedding, not {type(module).__name__}"
        )

    def apply(self, model: nn.Module, name: str, state: GraftState) -> None:
        others = [n for n in state.methods if n != name]
        if self.init in REWRITES_BASE and others:
            raise ValueError(
                f"LoRA init={self.init!r} rewrites the base weights, and this model carries adapters {others} that "
                "were fitted to the current ones; attach it to a model without adapters (graft.save stores "
                "PiSSA/OLoRA as a plain LoRA of the original base, which loads anywhere)"
            )
        if self.bias != "none":
            for other, method in state.methods.items():
                if getattr(method, "bias", "none") != "none":
                    raise ValueError(
                        f"adapter '{other}' already trains biases (bias={method.bias!r}); only one adapter "
                        "per model may use bias != 'none'"
                    )
        super().apply(model, name, state)
        apply_modules_to_save(model, name, state, heads_to_save(model, self.modules_to_save))

    # ---- counts and trainable base parameters
    def count(self, model: nn.Module) -> int:
        total = 0
        for module_name in self.resolve(model):
            module = model.get_submodule(module_name)
            spec = self.layer_config(module_name)
            d_in, d_out = in_out_features(module)
            total += spec.r * (d_in + d_out) + (d_out if spec.dora else 0)
        total += modules_to_save_count(model, heads_to_save(model, self.modules_to_save))
        if self.bias == "all":
            total += sum(p.numel() for _, p in _biases(model))
        elif self.bias == "lora_only":
            for module_name in self.resolve(model):
                bias = getattr(model.get_submodule(module_name), "bias", None)
                total += bias.numel() if isinstance(bias, nn.Parameter) else 0
        return total

    def trainable_base_parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        if self.bias == "all":
            return dict(_biases(model))
        if self.bias == "lora_only":
            out = {}
            for lname, module in model.named_modules():
                if isinstance(module, (LoraLinear, LoraEmbedding)) and name in module.configs:
                    bias = getattr(module.base_layer, "bias", None)
                    if isinstance(bias, nn.Parameter):
                        out[f"{lname}.base_layer.bias"] = bias
            return out
        return {}

    # ---- PEFT format
    def to_peft(self, model: nn.Module, name: str) -> dict[str, Any]:
        resolved = [n for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding)) and name in m.configs]
        conv1d = any(type(model.get_submodule(n).base_layer).__name__ == "Conv1D" for n in resolved)
        r, alpha, rank_pattern, alpha_pattern = self.r, self.alpha, dict(self.rank_pattern), dict(self.alpha_pattern)
        if self.init in ("pissa", "olora"):
            # Saved as the equivalent plain LoRA of the original base: rank 2r, same scaling.
            factor = math.sqrt(2) if self.rslora else 2.0
            r, alpha = 2 * r, alpha * factor
            rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
            alpha_pattern = {k: v * factor for k, v in alpha_pattern.items()}
            alpha_pattern.update({k: pattern_value(self.alpha_pattern, k, self.alpha) * factor
                                  for k in rank_pattern if k not in alpha_pattern})
        return {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": self.dropout,
            "target_modules": tg.compact_targets(model, resolved),
            "exclude_modules": None,
            "bias": self.bias,
            "use_rslora": self.rslora,
            "use_dora": self.dora,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "modules_to_save": heads_to_save(model, self.modules_to_save) or None,
            "fan_in_fan_out": conv1d,
            "init_lora_weights": "loftq" if self.init == "loftq" else True,
            # peft's keys (bits, iterations) and graft's, which rebuild the exact 4-bit base.
            **({"loftq_config": {"loftq_bits": 4, "loftq_iter": self.loftq_config["iters"], "graft": self.loftq_config}}
               if self.init == "loftq" else {}),
            "layers_to_transform": None,
            "layers_pattern": None,
            "lora_bias": False,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> LoRA:
        for key in ("lora_bias", "layer_replication", "target_parameters", "use_qalora", "alora_invocation_tokens"):
            if config.get(key):
                raise ValueError(f"this LoRA checkpoint uses peft's {key}={config[key]!r}, which graft does not support")
        targets = config.get("target_modules")
        # peft's PiSSA/OLoRA rewrite the base weight when the adapter is created (also on load), and a
        # checkpoint saved without conversion is relative to that residual base: redo the same init.
        peft_init = config.get("init_lora_weights", True)
        init = peft_init.lower() if isinstance(peft_init, str) and peft_init.lower() in ("pissa", "olora") else "default"
        loftq_config = {}
        graft_loftq = (config.get("loftq_config") or {}).get("graft")
        if isinstance(peft_init, str) and peft_init.lower() == "loftq" and isinstance(graft_loftq, dict):
            # written by graft: its settings rebuild the base exactly (before "svd" existed, the SVD was exact)
            init, loftq_config = "loftq", {"svd": "exact", **graft_loftq}
        elif isinstance(peft_init, str) and peft_init.lower().startswith(("pissa_niter_", "corda", "loftq")):
            raise ValueError(
                f"this LoRA checkpoint uses peft's init_lora_weights={peft_init!r}, which rewrites the base weights in "
                "a way graft cannot reproduce; convert it in peft with save_pretrained(..., "
                "path_initial_model_for_weight_conversion=...) to a plain LoRA first"
            )
        return cls(
            r=int(config.get("r", 8)),
            alpha=config.get("lora_alpha", 8),
            dropout=float(config.get("lora_dropout", 0.0)),
            targets=targets if isinstance(targets, str) else tuple(targets or ()) or None,
            exclude=config.get("exclude_modules"),
            layers=config.get("layers_to_transform"),
            bias=config.get("bias", "none"),
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
            rslora=bool(config.get("use_rslora", False)),
            dora=bool(config.get("use_dora", False)),
            init=init,
            modules_to_save=config.get("modules_to_save"),
            loftq_config=loftq_config,
        )


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LoRA {name}={value!r} must be a positive integer")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"LoRA {name}={value!r} must be a positive number")


def _biases(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every base ``bias`` parameter, by state-dict name (outside adapter tensors and head copies)."""
    out = []
    for mname, module in model.named_modules():
        if tg._inside_adapter(mname) and ".base_layer" not in f".{mname}":
            continue
        bias = module._parameters.get("bias")
        if isinstance(bias, nn.Parameter):
            out.append((f"{mname}.bias" if mname else "bias", bias))
    return out


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like module; (num_embeddings, embedding_dim) of an embedding."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D":  # GPT-2 stores W0ᵀ: (d_in, d_out)
        d_in, d_out = module.weight.shape
        return d_in, d_out
    return module.in_features, module.out_features


# --------------------------------------------------------------------------------------------
# Layers


def _lowered_by_autocast(out: torch.Tensor, base: nn.Module) -> bool:
    """Whether ``out`` is in a lower precision than the layer's (floating-point) weight because of autocast."""
    weight = getattr(base, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dtype == torch.float32
            and out.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(out.device.type))


class LoraLinear(AdapterLayer):
    """LoRA on ``nn.Linear`` or GPT-2 ``Conv1D`` (fan-in/fan-out: only weight-touching ops transpose)."""

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, state: GraftState) -> None:
        super().__init__(base_layer, state)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self._norms: dict[str, torch.Tensor] = {}  # DoRA: the row norms used when merging
        self.init_ab: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA A0, B0
        self._stack_cache: tuple[Any, ...] | None = None
        self._mode_cache: tuple[Any, ...] | None = None

    def add(self, name: str, spec: LoraSpec) -> None:
        weight = self.base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() else weight.dtype
        kw = {"device": weight.device, "dtype": dtype}
        self.lora_A[name] = nn.Linear(self.in_features, spec.r, bias=False, **kw)
        self.lora_B[name] = nn.Linear(spec.r, self.out_features, bias=False, **kw)
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling[name] = spec.scaling
        self.configs[name] = spec
        INIT_FUNCTIONS[spec.init](self, name)
        if spec.dora:
            norm = self._row_norm(name).to(dtype)
            self.lora_magnitude_vector[name] = nn.Parameter(norm)

    def remove(self, name: str) -> None:
        super().remove(name)
        if name in self.lora_dropout:
            del self.lora_dropout[name]
        self.scaling.pop(name, None)
        self.init_ab.pop(name, None)
        self._stack_cache = None

    # ---- math
    def base_weight(self) -> torch.Tensor:
        """W0 as (d_out, d_in), whatever the storage layout (dequantized to fp32 for a bitsandbytes base)."""
        if quant.is_quantized(self.base_layer):
            return quant.dequantize(self.base_layer)
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def _set_base_weight(self, new: torch.Tensor) -> None:
        """Store W (d_out, d_in, fp32) in the base layer; a quantized base is requantized (error recorded)."""
        if quant.is_quantized(self.base_layer):
            quant.requantize(self.base_layer, new)
            return
        w = self.base_layer.weight
        with torch.no_grad():
            w.copy_((new.T if self.fan_in_fan_out else new).to(w.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A in fp32, (d_out, d_in)."""
        a = self.lora_A[name].weight.float()  # (r, d_in)
        b = self.lora_B[name].weight.float()  # (d_out, r)
        return (b @ a) * self.scaling[name]

    def _row_norm(self, name: str) -> torch.Tensor:
        """‖W0 + sBA‖ per output row (d_out,), detached (DoRA §4.3)."""
        with torch.no_grad():
            return torch.linalg.norm(self.base_weight().float() + self.delta_weight(name), dim=1)

    def _lora(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name].weight
        x = self.lora_dropout[name](x.to(a.dtype))
        return F.linear(F.linear(x, a) * self.scaling[name], self.lora_B[name].weight)  # (..., d_out)

    def _dora(self, x: torch.Tensor, out: torch.Tensor, name: str) -> torch.Tensor:
        """out + (g - 1) W0 x + g s B A x, with g = m / ‖W0 + sBA‖ (norm detached)."""
        a = self.lora_A[name].weight
        drop = self.lora_dropout[name]
        xd = drop(x.to(a.dtype))
        w = self.base_weight()
        norm = torch.linalg.norm(w.to(a.dtype) + (self.lora_B[name].weight @ a) * self.scaling[name], dim=1).detach()
        g = self.lora_magnitude_vector[name] / norm  # (d_out,)
        bias = self.base_layer.bias
        if isinstance(drop, nn.Identity) or not self.training:
            base = out.to(a.dtype) if bias is None else out.to(a.dtype) - bias.to(a.dtype)
        else:
            base = F.linear(xd, w.to(a.dtype))
        lora = F.linear(F.linear(xd, a) * self.scaling[name], self.lora_B[name].weight)
        return out + ((g - 1) * base + g * lora).to(out.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.routed():
            return self._add_routed(out, x)
        names = self.active_here()
        if names and _lowered_by_autocast(out, self.base_layer):
            # Under autocast the base matmul returns bf16/fp16 although the weights are fp32. Adding the
            # (small, early in training: B starts at zero) LoRA delta in that precision rounds most of it
            # away (bf16 keeps 8 bits), which slows learning; add it in the weights' precision instead.
            out = out.to(self.base_layer.weight.dtype)
        for name in names:
            if self.configs[name].dora:
                out = self._dora(x, out, name)
            else:
                out = out + self._lora(x, name).to(out.dtype)
        return out

    # ---- per-row routing: one gathered, batched matmul for every adapter in the batch
    def _stacks(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(s·A)ᵀ stacked (n, d_in, r_max) and Bᵀ stacked (n, r_max, d_out), ranks zero-padded.

        An adapter that does not reach this layer stacks as zeros. Cached while no gradient flows
        and no factor has changed (same adapters, same tensor versions), so decoding rebuilds them
        only when the set of adapters in the batch changes.
        """
        grad = torch.is_grad_enabled()
        signature = (tuple(names), self._state.version)
        cache = self._stack_cache
        if not grad and cache is not None and cache[0] == signature and cache[2] == tuple(p._version for p in cache[1]):
            return cache[3]
        params = [p for n in names if n in self.lora_A for p in (self.lora_A[n].weight, self.lora_B[n].weight)]
        ref = next(iter(self.lora_A.values())).weight
        r_max = max([self.lora_A[n].weight.shape[0] for n in names if n in self.lora_A] or [1])
        a_list, b_list = [], []
        for n in names:
            if n not in self.lora_A:
                a_list.append(ref.new_zeros(self.in_features, r_max))
                b_list.append(ref.new_zeros(r_max, self.out_features))
                continue
            a, b = self.lora_A[n].weight, self.lora_B[n].weight
            pad = r_max - a.shape[0]
            a_list.append(F.pad(a * self.scaling[n], (0, 0, 0, pad)).t())
            b_list.append(F.pad(b, (0, pad)).t())
        stacks = (torch.stack(a_list), torch.stack(b_list))
        if not grad:
            self._stack_cache = (signature, params, tuple(p._version for p in params), stacks)
        return stacks

    def _needs_loop(self, names: list[str]) -> bool:
        """DoRA, and dropout while training, are per-adapter computations the stacked matmul cannot do."""
        return any(
            self.configs[n].dora or (self.training and self.configs[n].dropout > 0) for n in names if n in self.configs
        )

    def _route_mode(self, names: list[str]) -> str:
        """This layer's routed path: "skip" (no routed adapter reaches it), "loop" or "stack"; cached per routing."""
        key = (self._state.version, self.training)
        cached = self._mode_cache
        if cached is not None and cached[1] is names and cached[0] == key:  # names: one list per routing
            return cached[2]
        if not any(n in self.lora_A for n in names):
            mode = "skip"
        else:
            mode = "loop" if self._needs_loop(names) else "stack"
        self._mode_cache = (key, names, mode)
        return mode

    def _add_routed(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out`` plus each row's own adapter delta.

        Rows are gathered per adapter and multiplied by the stacked factors in one bmm pair (the
        idea of Punica's SGMV kernel): the copy is of activations (rows x d_in), never of per-row
        weights (rows x adapter size), however many rows share an adapter. The deltas come back to
        their rows by one index_select and an add (an index_add scatter costs about twice that).
        """
        plan = self._state.route_plan(x.shape[0], x.device)
        names = plan.names
        mode = self._route_mode(names)
        if mode == "skip":
            return out
        if mode == "loop":
            return out + routed_loop(self, x, names).to(out.dtype)
        n = plan.gather.shape[0]
        if n == 1 and plan.base_rows is None:  # one adapter for the whole batch: the plain path
            return out + self._lora(x, names[0]).to(out.dtype)
        a, b = self._stacks(names)
        grouped = x.index_select(0, plan.gather.view(-1)).reshape(n, -1, self.in_features)  # (n, g*seq, d_in)
        delta = torch.bmm(torch.bmm(grouped.to(a.dtype), a), b)  # (n, g*seq, d_out)
        delta = delta.reshape(-1, *x.shape[1:-1], self.out_features)  # (n*g, seq, d_out)
        delta = delta.index_select(0, plan.inverse)  # (batch, seq, d_out), row order
        if plan.base_rows is not None:  # base rows took some adapter's entry: zero them (a fill, so an inf there cannot leak)
            delta = delta.masked_fill(plan.base_rows.view(-1, *([1] * (delta.dim() - 1))), 0.0)
        if torch.is_grad_enabled():
            return out + delta.to(out.dtype)
        return out.add_(delta.to(out.dtype))

    def _routed_one(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The delta one adapter adds to rows ``x`` (used by the loop fallback)."""
        if not self.configs[name].dora:
            return self._lora(x, name)
        out = self.base_layer(x)
        return self._dora(x, out, name) - out

    # ---- merge
    def merge(self, names: list[str]) -> None:
        for name in names:
            if name in self.merged:
                continue  # idempotent
            w0 = self.base_weight().float()
            delta = self.delta_weight(name)
            if self.configs[name].dora:
                norm = torch.linalg.norm(w0 + delta, dim=1)
                self._norms[name] = norm
                new = (self.lora_magnitude_vector[name].float() / norm).unsqueeze(1) * (w0 + delta)
            else:
                new = w0 + delta
            self._set_base_weight(new)
            self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            cur = self.base_weight().float()
            delta = self.delta_weight(name)
            if self.configs[name].dora:
                old = cur / (self.lora_magnitude_vector[name].float() / self._norms.pop(name)).unsqueeze(1) - delta
            else:
                old = cur - delta
            self._set_base_weight(old)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        state = super().adapter_state(name)
        if name in self.init_ab:  # PiSSA/OLoRA: ΔW = BA − B0A0 = [B | −B0][A ; A0], rank 2r
            a0, b0 = self.init_ab[name]
            state["lora_A.weight"] = torch.cat([state["lora_A.weight"], a0.to(state["lora_A.weight"])], dim=0)
            state["lora_B.weight"] = torch.cat([state["lora_B.weight"], -b0.to(state["lora_B.weight"])], dim=1)
        return state


class LoraEmbedding(AdapterLayer):
    """LoRA on ``nn.Embedding``: A (r, vocab) starts at zero, B (dim, r) ~ N(0, 1) (peft's convention)."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding, state: GraftState) -> None:
        super().__init__(base_layer, state)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add(self, name: str, spec: LoraSpec) -> None:
        if spec.init in REWRITES_BASE:
            raise ValueError(f"init={spec.init!r} is not supported on nn.Embedding")
        w = self.base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        a = torch.zeros(spec.r, self.base_layer.num_embeddings, device=w.device, dtype=dtype)
        b = torch.empty(self.base_layer.embedding_dim, spec.r, device=w.device, dtype=dtype)
        if not w.is_meta:
            nn.init.normal_(b)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.scaling[name] = spec.scaling
        self.configs[name] = spec

    def _lora(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        e = self.base_layer
        after_a = F.embedding(ids, self.lora_embedding_A[name].T, e.padding_idx, e.max_norm,
                              e.norm_type, e.scale_grad_by_freq, e.sparse)  # (..., r)
        return (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]

    def _routed_one(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        return self._lora(ids, name)

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(ids, *args, **kwargs)
        if self.routed():
            return out + routed_loop(self, ids, self._state.route_names()).to(out.dtype)
        for name in self.active_here():
            out = out + self._lora(ids, name).to(out.dtype)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """(vocab, dim) = s · (B A)ᵀ in fp32."""
        return (self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()).T * self.scaling[name]

    def merge(self, names: list[str]) -> None:
        for name in names:
            if name not in self.merged:
                w = self.base_layer.weight
                with torch.no_grad():
                    w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
                self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            w = self.base_layer.weight
            with torch.no_grad():
                w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))


def routed_loop(layer: AdapterLayer, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Per-row deltas by looping over the adapters present in the batch (DoRA, dropout, embeddings)."""
    idx = layer.row_index(x.shape[0], x.device)
    out: torch.Tensor | None = None
    for i, name in enumerate(names):
        if name not in layer.configs:
            continue
        rows = (idx == i).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        delta = layer._routed_one(x[rows], name)
        if out is None:
            out = delta.new_zeros((x.shape[0], *delta.shape[1:]))
        out = out.index_add(0, rows, delta)
    if out is None:
        return torch.zeros((), device=x.device)
    return out


def _check_mergeable(base: nn.Module) -> None:
    """PiSSA / OLoRA rewrite W0 into a residual at init; graft does not do that to a quantized base."""
    if quant.is_quantized(base):
        raise NotImplementedError(f"init='pissa'/'olora' on a quantized {type(base).__name__} is not supported; "
                                  "use init='default' or 'gaussian' on a quantized base")


# --------------------------------------------------------------------------------------------
# Initialisations: functions taking a layer, never methods piling onto it


def init_default(layer: LoraLinear, name: str) -> None:
    """A ~ kaiming_uniform(a=√5) = U(±1/√d_in), B = 0: the adapter starts as a no-op (Hu et al.)."""
    if layer.lora_A[name].weight.is_meta:
        return
    nn.init.kaiming_uniform_(layer.lora_A[name].weight, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[name].weight)


def init_gaussian(layer: LoraLinear, name: str) -> None:
    """A ~ N(0, std=1/r) (peft's "gaussian"), B = 0."""
    if layer.lora_A[name].weight.is_meta:
        return
    nn.init.normal_(layer.lora_A[name].weight, std=1.0 / layer.configs[name].r)
    nn.init.zeros_(layer.lora_B[name].weight)


def _set_principal(layer: LoraLinear, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """Install A, B and W_res = W0 − sBA (so the output is unchanged), remembering A0, B0."""
    a_w, b_w = layer.lora_A[name].weight, layer.lora_B[name].weight
    with torch.no_grad():
        a_w.copy_(a.to(a_w.dtype))
        b_w.copy_(b.to(b_w.dtype))
        w = layer.base_layer.weight
        res = layer.base_weight().float() - layer.scaling[name] * (b @ a)
        w.copy_((res.T if layer.fan_in_fan_out else res).to(w.dtype))
    layer.init_ab[name] = (a_w.detach().clone(), b_w.detach().clone())


def init_pissa(layer: LoraLinear, name: str) -> None:
    """PiSSA (Meng et al. 2024): A = √S_r' Vᵀ_r, B = U_r √S_r' with S_r' = S_r / s."""
    _check_mergeable(layer.base_layer)
    if layer.base_layer.weight.is_meta:
        return
    r = layer.configs[name].r
    u, s, vh = torch.linalg.svd(layer.base_weight().detach().float(), full_matrices=False)
    root = torch.sqrt(s[:r] / layer.scaling[name])
    _set_principal(layer, name, root[:, None] * vh[:r], u[:, :r] * root[None, :])


def init_olora(layer: LoraLinear, name: str) -> None:
    """OLoRA (Büyükakyüz 2024): W0 = QR, B = Q[:, :r], A = R[:r] (no division by s, as in peft)."""
    _check_mergeable(layer.base_layer)
    if layer.base_layer.weight.is_meta:
        return
    r = layer.configs[name].r
    q, rr = torch.linalg.qr(layer.base_weight().detach().float())
    _set_principal(layer, name, rr[:r], q[:, :r])


def init_loftq(layer: LoraLinear, name: str) -> None:
    """LoftQ: A, B from graft.loftq (quantized base), or computed here and Q_T written into a full-precision base."""
    base = layer.base_layer
    factors = base.__dict__.pop(PENDING_ATTR, None)
    if factors is None:
        if quant.is_quantized(base):
            raise ValueError(f"init='loftq' on an already quantized {type(base).__name__}: LoftQ needs the full-precision "
                             "weights; call graft.loftq(model, lora_or_adapter_dir) on the full-precision model")
        if layer.fan_in_fan_out:
            raise ValueError("init='loftq' on a GPT-2 Conv1D is not supported (graft does not quantize Conv1D)")
        if base.weight.is_meta:
            return
        spec = layer.configs[name]
        d = decompose(base.weight, spec.r, spec.scaling, spec.loftq or {})
        with torch.no_grad():
            base.weight.copy_(d.quantized.to(base.weight.dtype))  # the LoftQ base, dequantized
        factors = (d.a, d.b)
    a, b = factors
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(a.to(layer.lora_A[name].weight.dtype))
        layer.lora_B[name].weight.copy_(b.to(layer.lora_B[name].weight.dtype))


INIT_FUNCTIONS = {"default": init_default, "gaussian": init_gaussian, "pissa": init_pissa, "olora": init_olora,
                  "loftq": init_loftq}
