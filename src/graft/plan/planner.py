"""graft plan: the plan: every method's estimate for one model, budget and setting."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from graft.plan.advice import recommend
from graft.plan.architectures import build_meta, load_config
from graft.plan.estimate import Estimate, _Candidate, _dtype_bytes, _estimates, _quantizable
from graft.plan.render import _plot, _render
from graft.plan.settings import _DTYPE_ALIASES, DTYPES, GOALS, ROWS, Recommendation, _Settings
from graft.plan.sizes import parse_memory
from graft.plan.trace import _Shape, _shape


@dataclass(frozen=True)
class Plan:
    """The plan for one model and budget: a row per method and a recommendation."""

    model: str
    architecture: str
    total_params: int
    settings: _Settings
    rows: list[Estimate]
    recommendation: Recommendation
    inference_bytes: int
    encoder: bool = False  # an encoder (BERT-like): classification models, no LM head
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Estimate]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, method: str) -> Estimate:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(f"no row {method!r}; rows: {[r.method for r in self.rows]}")

    def to_json(self) -> list[dict[str, Any]]:
        """One object per method (``method``, ``trainable_params``, ``weights_bytes``, ``optimizer_bytes``,
        ``activation_bytes``, ``total_bytes``, ``fits``, ...)."""
        return [r.to_dict() for r in self.rows]

    def summary(self) -> dict[str, Any]:
        """Everything: model, settings, rows and the recommendation."""
        return {"model": self.model, "architecture": self.architecture, "total_params": self.total_params,
                "settings": dataclasses.asdict(self.settings), "rows": self.to_json(),
                "recommendation": self.recommendation.to_dict(), "inference_bytes": self.inference_bytes,
                "notes": self.notes}

    def __str__(self) -> str:
        return _render(self)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """A stacked bar chart of each method's memory (PNG), with its predicted peak and the budget.

        The components are not all alive at once (activations are gone by the optimizer step, which
        has the gradients and its temporaries instead), so a bar is taller than its peak mark."""
        return _plot(self, Path(path))


def plan(
    model_or_config: Any,
    memory: str | int = "24GB",
    *,
    seq_len: int = 512,
    batch: int = 1,
    goal: str | None = None,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    gradient_checkpointing: bool | None = None,
    r: int = 8,
    targets: str | list[str] | None = None,
    num_virtual_tokens: int = 20,
    logits_chunk: int = 512,
    device: str = "cuda",
    reserve: str | int | None = None,
    tasks: int = 1,
    weight_dtype: str | None = None,
) -> Plan:
    """Plan fine-tuning ``model_or_config`` within ``memory``: every method's cost and a recommendation.

    Args:
        model_or_config: A preset (``graft.plan.PRESETS``), a built-in model name, a directory or
            ``config.json`` file, a dict of config fields, a transformers config, or a model.
        memory: The accelerator's memory: ``"24GB"``, ``"16GiB"``, ``"512MB"`` or bytes.
        seq_len: Tokens per row.
        batch: Rows per micro-batch.
        goal: ``instructions``, ``reasoning``, ``classification``, ``multi-task``, ``no-training`` or None.
        dtype: ``bf16``/``fp16`` (mixed precision) or ``fp32``: weights and activations.
        optimizer: ``adamw`` (fp32 states) or ``adamw8bit`` (bitsandbytes).
        gradient_checkpointing: True / False for every method; None turns it on only where a method
            needs it to fit.
        r: LoRA / QLoRA / DoRA rank.
        targets: LoRA targets (default: the architecture's, q and v projections for Llama).
        num_virtual_tokens: Prompt- and prefix-tuning length.
        logits_chunk: Rows of the LM head computed at once (graft's trainer; ``TrainConfig.logits_chunk``).
        device: ``cuda`` or ``cpu``: which optimizer-step temporaries and default reserve apply.
        reserve: Memory the runtime takes besides tensors; default 1GB on CUDA, 0 on CPU.
        tasks: How many tasks share the base (for the multi-task advice).
        weight_dtype: The dtype the base weights are held in, when it differs from ``dtype`` (the
            compute dtype): ``fp32`` weights under bf16 autocast, as ``graft train`` runs on a CPU
            with bf16 units (:func:`graft.runtime.resolve`). None: ``dtype``.

    Raises:
        ValueError: A bad memory string, unknown model or preset, unknown goal/dtype/optimizer, a
            config without the fields needed.
    """
    settings = _settings(memory, seq_len, batch, goal, dtype, optimizer, gradient_checkpointing, logits_chunk,
                         device, reserve, tasks)
    weights = settings.dtype if weight_dtype is None else _DTYPE_ALIASES.get(str(weight_dtype), str(weight_dtype))
    if weights not in DTYPES:
        raise ValueError(f"plan weight_dtype={weight_dtype!r} is not one of {tuple(DTYPES)}")
    name, config = load_config(model_or_config)
    model = build_meta(config, DTYPES[weights])
    shape = _shape(model)
    base_total = sum(p.numel() for p in model.parameters())
    try:
        quantized: set[int] | str = {id(model.get_submodule(n).weight) for n in _quantizable(model)}
    except ValueError as e:
        quantized = str(e)
    groups: dict[int, list[_Candidate]] = {}  # LoRA and QLoRA share one attached LoRA
    for cand in _candidates(model, r, targets, num_virtual_tokens):
        groups.setdefault(id(cand.method), []).append(cand)
    by_name = {e.method: e for group in groups.values()
               for e in _estimates(model, group, settings, shape, base_total, quantized)}
    rows = [by_name[c] for c in ROWS]
    notes = []
    if weights != settings.dtype:
        notes.append(f"base weights in {weights}, matmuls under {settings.dtype} autocast (as graft train runs here)")
    if shape.family == "generic":
        notes.append(f"{config.model_type}: activations planned as a Llama-style block from the config's sizes")
    inference = _inference_bytes(model, shape, settings)
    return Plan(model=name, architecture=f"{type(model).__name__} ({config.model_type})", total_params=base_total,
                settings=settings, rows=rows, recommendation=recommend(rows, settings, inference, shape.encoder),
                inference_bytes=int(inference), encoder=shape.encoder, notes=notes)


def _settings(memory: Any, seq_len: Any, batch: Any, goal: Any, dtype: Any, optimizer: Any, ckpt: Any,
              chunk: Any, device: Any, reserve: Any, tasks: Any) -> _Settings:
    for label, value in (("seq_len", seq_len), ("batch", batch), ("logits_chunk", chunk), ("tasks", tasks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"plan {label}={value!r} must be a positive integer")
    if seq_len < 2:
        raise ValueError(f"plan seq_len={seq_len!r} must be at least 2 (one token predicts the next)")
    if goal is not None and goal not in GOALS:
        close = difflib.get_close_matches(str(goal), GOALS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"plan goal={goal!r} is not one of {GOALS}{hint}")
    dtype = _DTYPE_ALIASES.get(str(dtype), str(dtype))
    if dtype not in DTYPES:
        raise ValueError(f"plan dtype={dtype!r} is not one of {tuple(DTYPES)}")
    if optimizer not in ("adamw", "adamw8bit"):
        raise ValueError(f"plan optimizer={optimizer!r} is not one of ('adamw', 'adamw8bit')")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"plan device={device!r} is not one of ('cuda', 'cpu')")
    if ckpt is not None and not isinstance(ckpt, bool):
        raise ValueError(f"plan gradient_checkpointing={ckpt!r} must be True, False or None (only where needed)")
    budget = parse_memory(memory)
    if reserve is None:
        spare = 10**9 if device == "cuda" else 0
    else:
        spare = 0 if reserve in (0, "0") else parse_memory(reserve)
    return _Settings(budget, seq_len, batch, dtype, optimizer, ckpt, chunk, device, spare, goal, tasks)


def _candidates(model: nn.Module, r: int, targets: Any, n_virtual: int) -> list[_Candidate]:
    import graft

    lora_kw = {"r": r, "alpha": 2 * r, **({"targets": targets} if targets is not None else {})}
    lora = graft.LoRA(**lora_kw)
    try:
        shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in lora.resolve(model)}))
    except (ValueError, TypeError):
        shown = str(targets)
    return [
        _Candidate("full", "full fine-tuning", None),
        _Candidate("lora", f"LoRA r={r} on {shown}", lora),
        _Candidate("qlora", f"QLoRA: LoRA r={r} on an NF4 base", lora, quantized=True),
        _Candidate("dora", f"DoRA r={r} on {shown}", graft.LoRA(**lora_kw, dora=True)),
        _Candidate("ia3", "(IA)³ (default targets)", graft.IA3()),
        _Candidate("prompt-tuning", f"prompt tuning, {n_virtual} tokens",
                   graft.PromptTuning(num_virtual_tokens=n_virtual)),
        _Candidate("prefix-tuning", f"prefix tuning, {n_virtual} tokens",
                   graft.PrefixTuning(num_virtual_tokens=n_virtual)),
        _Candidate("adapter", "bottleneck adapters (Houlsby, d/16)", graft.Adapter()),
        _Candidate("bitfit", "BitFit (biases)", graft.BitFit()),
    ]


def _inference_bytes(model: nn.Module, shape: _Shape, s: _Settings) -> float:
    """Serving for in-context learning: weights + KV cache for batch x seq + one block's activations."""
    act = _dtype_bytes(s.dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 2 * shape.layers * shape.kv_dim * s.seq_len * s.batch * act
    work = (2 * shape.intermediate + shape.q_dim + 2 * shape.kv_dim) * s.seq_len * s.batch * act
    return weights + kv + work
