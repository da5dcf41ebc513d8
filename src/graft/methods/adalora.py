"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

Each adapted matrix gets an SVD-shaped update whose singular values are pruned during training
so the rank budget goes where it matters (the paper's SVD-based adaptation):

    y = W0 x + b + s · P Λ Q dropout(x),   Q = lora_A ∈ R^{r×d_in},  Λ = diag(lora_E), lora_E ∈ R^{r×1},
                                           P = lora_B ∈ R^{d_out×r},  r = init_r
    s = alpha / (init_r + 1e-5)            (peft: ``scaling / (ranknum + 1e-5)``; ranknum stays init_r
                                            after pruning, and is rounded to float32 as peft stores it)

Init: Λ = 0 (so the adapter starts as a no-op), P, Q ~ N(0, 0.02²) (peft and the authors' code).

Training (``after_optimizer_step``, once per optimizer step t = 1..T, after ``optimizer.step`` and
before the gradients are cleared; peft's ``update_and_allocate(t)``):

* importance of every entry w of P, Λ, Q (sensitivity smoothed by an EMA, with its uncertainty): I = |w ∇w|,
  Ī ← β1 Ī + (1 − β1) I,  Ū ← β2 Ū + (1 − β2) |I − Ī|,  s(w) = Ī Ū   (for t < T − t_f);
* triplet score of singular value i: S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji);
* budget (the paper's cubic global budget scheduler), over all n matrices: b(t) = b0 for t ≤ t_i;
  b(t) = int((b0 − b_T)(1 − (t − t_i)/(T − t_f − t_i))³ + b_T) for t_i < t ≤ T − t_f; b_T afterwards,
  with b0 = n · init_r and b_T = n · target_r;
* masking every ΔT steps in the pruning phase: λ_i ← 0 where S_i ≤ the (b0 − b(t))-th smallest
  score. This is soft: P and Q stay, and a masked λ can grow back until the next masking step;
* at t = T − t_f a last mask to b_T fixes the pattern; it is re-applied after every later step.

Orthogonality regulariser, added once per optimizer step through ``loss_penalty``:
``orth_reg_weight · mean over every P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F``. The paper writes the squared
norm; graft uses the unsquared one, as peft and the authors' code do, so a run trains as it would in peft.

Format: peft's (``peft_type`` "ADALORA", tensors ``lora_A``, ``lora_E``, ``lora_B``). Once the pattern
is fixed, a save writes it as ``rank_pattern`` and keeps only the surviving triplets, as peft does.
Before that graft saves every triplet and no pattern: peft already writes the latest mask while
pruning, which drops triplets that grew back since that mask (ΔT > 1), so its file can differ from the
model; graft's is exact, and peft loads both forms. Loading a pattern builds each module with the
ranks it keeps (divisor still init_r), like peft. (peft warns, for its own files too, that the
pattern's '<module>.lora_E' keys match no module when it builds the model; it applies them on load.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from graft import targets as tg
from graft.core import AdapterLayer, GraftState, TargetedMethod, adapter_layers, register, state_of
from graft.methods.heads import apply_modules_to_save, heads_to_save, modules_to_save_count
from graft.methods.lora import _check_mergeable, in_out_features, routed_loop

EPS = 1e-5  # peft adds this to ranknum before dividing
FACTORS = ("lora_A", "lora_E", "lora_B")  # Q, Λ, P

# peft's per-architecture AdaLoRA defaults (utils/constants.py), used when ``targets`` is not given.
DEFAULT_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "bloom": ["query_key_value"], "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "bert": ["query", "value"], "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}


@dataclass(frozen=True)
class AdaSpec:
    """The settings of one AdaLoRA adapter on one module."""

    r: int  # triplets this module holds: init_r, or those a fixed rank pattern keeps
    init_r: int  # what the update is divided by (peft's ranknum), also after pruning
    alpha: float
    dropout: float
    pattern: tuple[bool, ...] | None  # a fixed rank pattern (from a saved adapter), or None

    @property
    def divisor(self) -> float:
        """init_r + 1e-5 rounded to float32, as peft's stored ``ranknum`` tensor is."""
        return float(torch.tensor(float(self.init_r)) + EPS)


@register
@dataclass(frozen=True)
class AdaLoRA(TargetedMethod):
    """Adaptive-rank LoRA of linear and GPT-2 Conv1D layers: SVD-shaped updates whose least important
    singular values are pruned on a cubic schedule from ``init_r`` to an average of ``target_r``.

    Train it with ``graft.train`` (which calls the pruning and regulariser hooks), or call
    ``update_and_allocate`` and add ``orthogonality_penalty`` in a loop of your own. Only one AdaLoRA
    adapter per model may train at a time (others must be frozen, e.g. ``graft.load(..., trainable=False)``
    before attaching the one to train).

    Args:
        init_r: Initial rank of every matrix (> 0).
        target_r: Average rank per matrix at the end (> 0, at most ``init_r``).
        alpha: Scaling numerator (> 0): s = alpha / (init_r + 1e-5).
        dropout: Dropout on the adapter input, in [0, 1).
        targets: Suffix list, regex, or "all-linear"; None takes peft's AdaLoRA default for the
            architecture (q,v projections for Llama-like models, ``c_attn`` for GPT-2, all of T5's).
        exclude: Modules to leave alone, same forms as ``targets``.
        layers: Only adapt modules inside these block indices.
        tinit: Steps of warm-up before any pruning (t_i).
        tfinal: Steps at the end trained with the final, fixed rank pattern (t_f).
        delta_t: Prune every ``delta_t`` steps during the pruning phase (ΔT, >= 1).
        beta1: EMA factor of the sensitivity, in (0, 1).
        beta2: EMA factor of the uncertainty, in (0, 1).
        orth_reg_weight: Weight of the orthogonality regulariser (>= 0).
        total_step: Length T of the schedule in optimizer steps; None takes the trainer's total steps.
            ``tinit + tfinal`` must be smaller.
        rank_pattern: A fixed pattern, as saved after training: module name -> one bool per initial
            triplet (kept or not). Each module is then built with the triplets it keeps.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. a classifier);
            None takes a sequence-classification model's head automatically.
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    targets: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, tuple[bool, ...]] | None = None
    modules_to_save: tuple[str, ...] | None = None

    peft_type: ClassVar[str] = "ADALORA"

    def __post_init__(self) -> None:
        for name in ("init_r", "target_r", "delta_t"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("tinit", "tfinal"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.init_r < self.target_r:
            raise ValueError(f"AdaLoRA init_r={self.init_r} is smaller than target_r={self.target_r}: ranks are "
                             "pruned from init_r down to an average of target_r per matrix, so init_r >= target_r")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"AdaLoRA alpha={self.alpha!r} must be a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoRA dropout={self.dropout!r} is outside [0, 1)")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"AdaLoRA {name}={getattr(self, name)!r} must lie in (0, 1)")
        if not self.orth_reg_weight >= 0:
            raise ValueError(f"AdaLoRA orth_reg_weight={self.orth_reg_weight!r} must be >= 0")
        if self.total_step is not None:
            _check_int("total_step", self.total_step, minimum=1)
            self.check_schedule(self.total_step)
        self.freeze_targeting_fields()
        if self.rank_pattern is not None:
            pattern = {}
            for key, keep in self.rank_pattern.items():
                keep = tuple(keep)
                if len(keep) != self.init_r or not all(isinstance(k, bool) for k in keep):
                    raise ValueError(f"AdaLoRA rank_pattern[{key!r}] must be {self.init_r} (init_r) booleans, "
                                     f"got {list(keep)!r}")
                pattern[key] = keep
            object.__setattr__(self, "rank_pattern", pattern)

    def check_schedule(self, total: int) -> None:
        """Refuse a schedule with no pruning phase (peft's check ``tinit < total_step - tfinal``)."""
        if self.tinit + self.tfinal >= total:
            raise ValueError(f"AdaLoRA tinit={self.tinit} + tfinal={self.tfinal} must be smaller than "
                             f"total_step={total} (the training steps): no step would be left to prune ranks")

    # ---- targets and per-module settings
    def target_spec(self, model: nn.Module) -> str | tuple[str, ...]:
        if self.targets is not None:
            return self.targets
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"AdaLoRA targets not given and no default is known for model_type={model_type!r}; "
                             "pass targets=[...] or targets='all-linear'")
        return tuple(DEFAULT_TARGETS[model_type])

    def resolve(self, model: nn.Module) -> list[str]:
        return tg.resolve(model, self.target_spec(model), exclude=self.exclude, layers=self.layers,
                          allowed=(nn.Linear,), what="AdaLoRA targets")

    def layer_config(self, name: str) -> AdaSpec:
        pattern = (self.rank_pattern or {}).get(name)
        return AdaSpec(r=self.init_r if pattern is None else sum(pattern), init_r=self.init_r, alpha=self.alpha,
                       dropout=self.dropout, pattern=pattern)

    def layer_class(self, module: nn.Module) -> type[AdapterLayer]:
        if tg.is_linear(module):
            return SVDLinear
        raise TypeError(f"AdaLoRA supports nn.Linear, GPT-2 Conv1D and bitsandbytes linears, not {type(module).__name__}")

    def apply(self, model: nn.Module, name: str, state: GraftState) -> None:
        training = [n for n, m in state.methods.items() if isinstance(m, AdaLoRA) and trains(model, n)]
        if training:
            raise ValueError(
                f"adapter '{training[0]}' is a trainable AdaLoRA adapter already; AdaLoRA allocates one rank budget "
                "per model, so only one AdaLoRA adapter may train. Freeze it first (requires_grad_(False) on its "
                "parameters; load finished ones with graft.load(..., trainable=False)) or detach it"
            )
        super().apply(model, name, state)
        apply_modules_to_save(model, name, state, heads_to_save(model, self.modules_to_save))

    def count(self, model: nn.Module) -> int:
        """init_r·(d_in + d_out) + init_r per matrix (fewer triplets where a fixed pattern prunes them)."""
        total = 0
        for module_name in self.resolve(model):
            module = model.get_submodule(module_name)
            d_in, d_out = in_out_features(getattr(module, "base_layer", module))
            r = self.layer_config(module_name).r
            total += r * (d_in + d_out) + r
        return total + modules_to_save_count(model, heads_to_save(model, self.modules_to_save))

    # ---- hooks the trainer calls (graft.train)
    def loss_penalty(self, model: nn.Module, name: str) -> torch.Tensor:
        """orth_reg_weight x the orthogonality regulariser; a frozen adapter adds nothing."""
        if not trains(model, name):
            device = next(layer.lora_E[name].device for _, layer in _layers(model, name))
            return torch.zeros((), device=device, requires_grad=True)
        _check_one_training(model)
        return self.orth_reg_weight * orthogonality_penalty(model, name)

    def after_optimizer_step(self, model: nn.Module, name: str, *, step: int, total_steps: int,
                             optimizer: Any = None) -> None:
        """Score importance and prune to the budget of optimizer step ``step`` (1-based)."""
        if trains(model, name):
            update_and_allocate(model, step, total=self.total_step or total_steps, name=name)

    def training_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The importance EMAs and the fixed rank pattern: what an exact resume needs beyond the weights."""
        out: dict[str, torch.Tensor] = {}
        for lname, layer in _layers(model, name):
            for factor, (avg, unc) in layer.importance.get(name, {}).items():
                out[f"{lname}.{factor}.exp_avg_ipt"] = avg
                out[f"{lname}.{factor}.exp_avg_unc"] = unc
            if name in layer.rank_mask:
                out[f"{lname}.rank_mask"] = layer.rank_mask[name].to(torch.uint8)
        return out

    def load_training_state(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        for lname, layer in _layers(model, name):
            device = layer.lora_E[name].device
            scores = {}
            for factor in FACTORS:
                avg, unc = tensors.get(f"{lname}.{factor}.exp_avg_ipt"), tensors.get(f"{lname}.{factor}.exp_avg_unc")
                if avg is not None and unc is not None:
                    scores[factor] = (avg.to(device), unc.to(device))
            layer.importance.pop(name, None)
            if scores:
                layer.importance[name] = scores
            if f"{lname}.rank_mask" in tensors:
                layer.rank_mask[name] = tensors[f"{lname}.rank_mask"].to(device=device, dtype=torch.bool)

    # ---- PEFT format
    def to_peft(self, model: nn.Module, name: str) -> dict[str, Any]:
        layers = _layers(model, name)
        resolved = [lname for lname, _ in layers]
        pattern = {f"{lname}.lora_E": layer.rank_mask[name].tolist() for lname, layer in layers
                   if name in layer.rank_mask}
        recorded = [layer.total_step[name] for _, layer in layers if name in layer.total_step]
        # peft requires total_step > tinit + tfinal even for inference; an untrained adapter with no
        # total_step writes the smallest such value.
        total = self.total_step or (recorded[0] if recorded else self.tinit + self.tfinal + 1)
        return {
            "peft_type": "ADALORA",
            "init_r": self.init_r,
            "target_r": self.target_r,
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.delta_t,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "total_step": total,
            "rank_pattern": pattern or None,
            "r": 8,  # LoraConfig's default: AdaLoRA ignores r, and peft warns when it differs
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": tg.compact_targets(model, resolved),
            "exclude_modules": None,
            "bias": "none",
            "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
            "modules_to_save": heads_to_save(model, self.modules_to_save) or None,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "use_rslora": False,
            "use_dora": False,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> AdaLoRA:
        for key in ("use_dora", "loftq_config", "layer_replication"):
            if config.get(key):
                raise ValueError(f"this AdaLoRA checkpoint uses peft's {key}={config[key]!r}, which graft does not support")
        if config.get("bias", "none") != "none":
            raise ValueError(f"this AdaLoRA checkpoint trains biases (bias={config['bias']!r}), which graft's AdaLoRA "
                             "does not support")
        init_r = int(config.get("init_r", 12))
        alpha = config.get("lora_alpha", 8)
        pattern = None
        if config.get("rank_pattern"):
            # Keys are '<module>.lora_E', or '<module>.lora_E.<adapter>' from older peft versions.
            pattern = {key.split(".lora_E")[0]: tuple(bool(k) for k in keep)
                       for key, keep in config["rank_pattern"].items()}
        targets = config.get("target_modules")
        return cls(
            init_r=init_r,
            target_r=int(config.get("target_r", 8)),
            alpha=alpha if alpha > 0 else float(init_r),  # peft: scaling = alpha if alpha > 0 else r
            dropout=float(config.get("lora_dropout", 0.0)),
            targets=targets if isinstance(targets, str) else tuple(targets or ()) or None,
            exclude=config.get("exclude_modules"),
            layers=config.get("layers_to_transform"),
            tinit=int(config.get("tinit", 0)),
            tfinal=int(config.get("tfinal", 0)),
            delta_t=int(config.get("deltaT", 1)),
            beta1=float(config.get("beta1", 0.85)),
            beta2=float(config.get("beta2", 0.85)),
            orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
            total_step=config.get("total_step"),
            rank_pattern=pattern,
            modules_to_save=config.get("modules_to_save"),
        )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"AdaLoRA {name}={value!r} must be an integer >= {minimum}")


def _layers(model: nn.Module, name: str) -> list[tuple[str, SVDLinear]]:
    return [(n, m) for n, m in adapter_layers(model) if isinstance(m, SVDLinear) and name in m.configs]


def trains(model: nn.Module, name: str) -> bool:
    """Whether AdaLoRA adapter ``name`` has trainable tensors."""
    return any(p.requires_grad for _, layer in _layers(model, name) for p in layer.adapter_parameters(name).values())


def _check_one_training(model: nn.Module) -> None:
    names = [n for n, m in state_of(model).methods.items() if isinstance(m, AdaLoRA) and trains(model, n)]
    if len(names) > 1:
        raise ValueError(f"AdaLoRA adapters {names} are all trainable; only one AdaLoRA adapter may train at a time "
                         "(one rank budget per model): freeze the others with requires_grad_(False)")


# --------------------------------------------------------------------------------------------
# The regulariser and the rank allocator, as functions on a model


def orthogonality_penalty(model: nn.Module, name: str) -> torch.Tensor:
    """R = mean over every Q and P of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (unsquared, as peft; the paper squares)."""
    total: torch.Tensor | None = None
    count = 0
    for _, layer in _layers(model, name):
        a, b = layer.lora_A[name], layer.lora_B[name]
        for cov in (a @ a.T, b.T @ b):  # (r, r)
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            norm = torch.linalg.matrix_norm(cov - eye, ord="fro")
            total = norm if total is None else total + norm
            count += 1
    if total is None:
        raise ValueError(f"adapter '{name}' has no AdaLoRA layers")
    return total / count


def rank_budget(step: int, *, initial: int, target: int, tinit: int, tfinal: int, total: int,
                delta_t: int) -> tuple[int, bool]:
    """(b(t), whether step t prunes): the paper's cubic budget schedule, as peft computes it."""
    if step <= tinit:
        return initial, False
    if step > total - tfinal:
        return target, True
    coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((initial - target) * coeff**3 + target), step % delta_t == 0


def update_importance(layer: SVDLinear, name: str, beta1: float, beta2: float) -> None:
    """Fold this step's sensitivity |w ∇w| of every entry of Q, Λ, P into the sensitivity and uncertainty EMAs.

    A factor without a gradient (the layer was not used this step) counts as zero sensitivity.
    """
    scores = layer.importance.setdefault(name, {})
    with torch.no_grad():
        for factor in FACTORS:
            p = getattr(layer, factor)[name]
            sens = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            avg, unc = scores.get(factor, (torch.zeros_like(p), torch.zeros_like(p)))
            avg = beta1 * avg + (1 - beta1) * sens
            unc = beta2 * unc + (1 - beta2) * (sens - avg).abs()
            scores[factor] = (avg, unc)


def triplet_scores(layer: SVDLinear, name: str) -> torch.Tensor:
    """(r,) score of each triplet: s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji), with s = Ī·Ū."""
    scores = layer.importance.get(name, {})
    s = {}
    for factor in FACTORS:
        p = getattr(layer, factor)[name]
        avg, unc = scores.get(factor, (torch.zeros_like(p), torch.zeros_like(p)))
        s[factor] = avg * unc
    return s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))


def mask_to_budget(layers: list[SVDLinear], name: str, budget: int) -> list[torch.Tensor]:
    """Zero the singular values of all but the ``budget`` best-scored triplets; return the kept masks.

    Triplets scoring at or below the k-th smallest score (k = triplets − budget) are pruned, so ties
    at the threshold are all pruned (as in peft).
    """
    scores = [triplet_scores(layer, name) for layer in layers]
    k = sum(s.numel() for s in scores) - budget
    if k <= 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    threshold = torch.kthvalue(torch.cat(scores), k).values.item()
    masks = []
    with torch.no_grad():
        for layer, s in zip(layers, scores):
            keep = ~(s <= threshold)
            layer.lora_E[name].masked_fill_(~keep.view(-1, 1), 0.0)
            masks.append(keep)
    return masks


def update_and_allocate(model: nn.Module, step: int, *, total: int | None = None, name: str = "default") -> int:
    """AdaLoRA's step: score importance and prune to the budget of optimizer step ``step`` (1..T).

    Call it after ``optimizer.step()`` and before the gradients are cleared, once per optimizer step
    (``graft.train`` does), with t = 1 after the first step; ``total`` is T unless the method sets
    ``total_step``. Returns the budget b(t): how many triplets may be non-zero after this step.
    """
    method = state_of(model).methods[name]
    if not isinstance(method, AdaLoRA):
        raise TypeError(f"adapter '{name}' is a {type(method).__name__}, not AdaLoRA")
    total = method.total_step or total
    if total is None:
        raise ValueError("AdaLoRA needs the schedule length: set total_step, or pass total")
    method.check_schedule(total)
    layers = [layer for _, layer in _layers(model, name)]
    for layer in layers:
        layer.total_step[name] = total
    initial = sum(layer.lora_A[name].shape[0] for layer in layers)
    target = method.target_r * len(layers)
    if layers and all(name in layer.rank_mask for layer in layers):  # pattern fixed: keep it
        with torch.no_grad():
            for layer in layers:
                mask = layer.rank_mask[name]
                if mask.numel() == layer.lora_E[name].shape[0]:  # a pruned module has only kept triplets
                    layer.lora_E[name].masked_fill_(~mask.view(-1, 1), 0.0)
        return target
    final = total - method.tfinal
    if step < final:
        for layer in layers:
            update_importance(layer, name, method.beta1, method.beta2)
    budget, prune = rank_budget(step, initial=initial, target=target, tinit=method.tinit, tfinal=method.tfinal,
                                total=total, delta_t=method.delta_t)
    if step >= final:  # the last pruning fixes the pattern for the rest of training
        for layer, keep in zip(layers, mask_to_budget(layers, name, target)):
            layer.rank_mask[name] = keep
            layer.importance.pop(name, None)
        return target
    if prune:
        mask_to_budget(layers, name, budget)
    return budget


# --------------------------------------------------------------------------------------------
# The layer


class SVDLinear(AdapterLayer):
    """AdaLoRA on ``nn.Linear`` or GPT-2 ``Conv1D`` (fan-in/fan-out: only merging transposes)."""

    adapter_param_names = FACTORS

    def __init__(self, base_layer: nn.Module, state: GraftState) -> None:
        super().__init__(base_layer, state)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self.lora_A = nn.ParameterDict()  # Q: (r, d_in), right singular vectors
        self.lora_E = nn.ParameterDict()  # Λ: (r, 1), singular values
        self.lora_B = nn.ParameterDict()  # P: (d_out, r), left singular vectors
        self.lora_dropout = nn.ModuleDict()
        # Allocator state per adapter (not saved in the PEFT file; kept for resume by training_state).
        self.importance: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # factor -> (Ī, Ū)
        self.rank_mask: dict[str, torch.Tensor] = {}  # (init_r,) bool, once the pattern is fixed
        self.total_step: dict[str, int] = {}  # the schedule length trained with (for the saved config)

    def add(self, name: str, spec: AdaSpec) -> None:
        weight = self.base_layer.weight
        half = weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point()
        kw = {"device": weight.device, "dtype": torch.float32 if half else weight.dtype}
        self.lora_A[name] = nn.Parameter(torch.empty(spec.r, self.in_features, **kw))
        self.lora_E[name] = nn.Parameter(torch.zeros(spec.r, 1, **kw))
        self.lora_B[name] = nn.Parameter(torch.empty(self.out_features, spec.r, **kw))
        if not weight.is_meta:
            nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.configs[name] = spec
        if spec.pattern is not None:
            self.rank_mask[name] = torch.tensor(spec.pattern, dtype=torch.bool, device=weight.device)

    def remove(self, name: str) -> None:
        super().remove(name)
        if name in self.lora_dropout:
            del self.lora_dropout[name]
        for store in (self.importance, self.rank_mask, self.total_step):
            store.pop(name, None)

    # ---- math
    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """s · P Λ Q dropout(x), (..., d_out); in peft's order of operations so results match bit for bit."""
        a, e, b = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        spec = self.configs[name]
        x = self.lora_dropout[name](x.to(a.dtype))
        return (x @ (a * e).T @ b.T) * spec.alpha / spec.divisor

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.routed():
            return out + routed_loop(self, x, self._state.route_names()).to(out.dtype)
        for name in self.active_here():
            out = out + self._delta(x, name).to(out.dtype)
        return out

    def _routed_one(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self._delta(x, name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · P Λ Q in fp32, (d_out, d_in)."""
        spec = self.configs[name]
        a, e, b = (getattr(self, f)[name].float() for f in FACTORS)
        return (b @ (a * e)) * spec.alpha / spec.divisor

    def merge(self, names: list[str]) -> None:
        _check_mergeable(self.base_layer)
        for name in names:
            if name not in self.merged:  # idempotent
                self._add_delta(name, +1.0)
                self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            self._add_delta(self.merged.pop(), -1.0)

    def _add_delta(self, name: str, sign: float) -> None:
        w = self.base_layer.weight
        delta = self.delta_weight(name)
        with torch.no_grad():
            w.copy_((w.float() + sign * (delta.T if self.fan_in_fan_out else delta)).to(w.dtype))

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """Q, Λ, P; once the pattern is fixed, only the kept triplets (peft's saved form)."""
        state = super().adapter_state(name)
        keep = self.rank_mask.get(name)
        if keep is not None and keep.numel() == state["lora_E"].shape[0]:
            state = {"lora_A": state["lora_A"][keep], "lora_E": state["lora_E"][keep],
                     "lora_B": state["lora_B"][:, keep]}
        return state
