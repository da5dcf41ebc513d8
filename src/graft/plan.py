"""``graft plan``: what fits, what it costs, and which method to use, before loading any weights.

The model's architecture is built on the meta device (shapes only, no memory) from a preset, a
local ``config.json`` or a built-in model name. Each method is *attached* to that meta model, so
its trainable-parameter count is exactly what ``graft.attach`` gives (and therefore peft's). Memory
is then derived from the shapes:

* **weights**: every base parameter in the planning dtype. QLoRA follows ``graft.quant``: every
  ``nn.Linear`` but the output head in NF4 with double quantisation, 4 bits + an 8-bit absmax per
  64 weights + an fp32 absmax per 256 blocks = 4 + 8/64 + 32/16384 ≈ 4.127 bits/weight (Dettmers
  et al. 2023, §3); ``prepare_kbit_training`` then keeps everything else (embeddings, head, norms,
  biases) in fp32, so its residual stream, and its activations, are fp32 whatever the compute
  dtype. Adapter parameters are fp32 when the base is 16-bit (graft's adapters always are).
* **gradients**: one per trainable parameter, in its dtype.
* **optimizer**: AdamW keeps two fp32 moments (8 bytes/param); bitsandbytes' 8-bit AdamW keeps two
  uint8 moments with an fp32 absmax per 256 values (≈ 2.03 bytes/param; tensors under 4,096
  values stay fp32, as bitsandbytes does). Decision: full fine-tuning of a 16-bit model is planned
  as mixed precision (Micikevicius et al. 2018; ZeRO's K = 12): 16-bit weights and gradients plus an
  fp32 master copy (4 bytes/param, counted as optimizer state) and fp32 moments, 16 bytes/param in
  all, the same total as graft's ``autocast`` on fp32 weights (4 + 4 + 8). Pure 16-bit AdamW
  states are not planned: they lose the small updates.
* **activations**: what autograd saves for backward, walked op by op through each block's dataflow
  for the family (Llama-like, GPT-2, BERT; :class:`_Trace` states the rules), with the method's
  adapter layers read off the attached meta model, plus what lives outside the blocks. The walk
  equals, byte for byte, what autograd keeps on real tiny models (``tests/test_plan.py`` records
  every saved tensor with ``saved_tensors_hooks``). graft's trainer computes the LM head on supervised
  positions only, ``logits_chunk`` rows at a time under checkpointing, so instead of
  batch x seq x vocab logits the head holds at most one (chunk, vocab) block: its fp32
  log-softmax and two fp32 gradients of that size in backward (12 bytes x chunk x vocab). With
  gradient checkpointing each block keeps only its input and one block is recomputed at a time.
  Attention is planned as a fused kernel (PyTorch SDPA flash / memory-efficient): q, k, v, the
  output and a log-sum-exp are saved, never the (heads x seq x seq) scores; except on CPU with
  attention dropout (GPT-2, BERT), where SDPA falls back to the math kernel and keeps them (and
  CPU dropout keeps float masks where CUDA keeps 1-byte ones). Rows are full length (packed,
  no padding mask), every position supervised (the worst case for the head).
* **peak**: gradients are not alive during the forward pass, so the total is the larger of two
  moments: the start of backward (weights + optimizer state + stored activations + the loss head's
  transient + the head's gradient if it trains) and the optimizer step (weights + gradients +
  optimizer state + the step's temporaries: on CUDA torch's foreach AdamW holds one fp32 copy of
  the trainable parameters; on CPU the single-tensor path two copies of the largest one).

``fits`` compares that peak plus ``reserve`` (the runtime: CUDA context, allocator slack; default
1 GB on CUDA, 0 on CPU) with the memory budget. Memory strings use SI units (``GB`` = 10^9 bytes)
and binary ones (``GiB`` = 2^30). Calibration against measured peaks (SmolLM2-135M on CPU, full,
LoRA and QLoRA at two lengths): ``benchmarks/plan_calibration.py``.

Example:
    >>> p = graft.plan("llama-2-7b", memory="24GB", seq_len=512, goal="instructions")
    >>> print(p)              # the table and the recommendation
    >>> p.to_json()           # one dict per method
    >>> p.plot("plan.png")    # stacked bars of the memory breakdown
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# Sizes

_UNITS = {"": None, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # ≈ 4.127 bits per weight with double quantisation
NF4_BITS_SINGLE = 4 + 32 / 64  # 4.5 bits without double quantisation
ADAM_8BIT_MIN_SIZE = 4096  # bitsandbytes keeps fp32 states for smaller tensors (min_8bit_size)
ADAM_8BIT_BLOCK = 256  # one fp32 absmax per 256 values and state


def parse_memory(value: str | float) -> int:
    """Bytes in a memory size: ``"24GB"``, ``"16GiB"``, ``"512MB"``, ``"1.5 TB"``; a number is bytes.

    ``KB/MB/GB/TB`` (and ``K/M/G/T``) are powers of 10, ``KiB/MiB/GiB/TiB`` powers of 2.

    Raises:
        ValueError: Text that is not a positive number followed by a known unit.
        TypeError: A boolean.
    """
    if isinstance(value, bool):
        raise TypeError(f"memory={value!r} is not a size; write e.g. '24GB', '16GiB' or '512MB'")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"memory={value!r} must be a positive number of bytes")
        return int(value)
    text = str(value).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)", text)
    unit = match.group(2).lower() if match else ""
    if not match or _UNITS.get(unit) is None:
        if not match:
            why = "it is not a number followed by a unit"
        else:
            why = "it has no unit" if not unit else f"unknown unit {match.group(2)!r}"
        units = ", ".join(u.upper() if "i" not in u else u[0].upper() + "iB" for u in _UNITS if u)
        raise ValueError(f"cannot read memory {value!r}: {why}; write e.g. '24GB', '16GiB' or '512MB' "
                         f"(units: {units})")
    size = float(match.group(1)) * _UNITS[unit]
    if size < 1:
        raise ValueError(f"memory {value!r} must be at least one byte")
    return int(size)


def format_bytes(n: float | None) -> str:
    """``13.5 GB``, ``67.1 MB``, ``812 kB`` (SI units, like the memory budget)."""
    if n is None:
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{1 if n / size >= 10 else 2}f} {unit}"
    return f"{int(n)} B"


# --------------------------------------------------------------------------------------------
# Architectures: presets (published shapes), local configs, built-in models

PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama-2-13b": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama-2-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                   "tie_word_embeddings": False},
    "llama-3-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                    "tie_word_embeddings": False},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "sliding_window": 4096, "tie_word_embeddings": False},
    "qwen2-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                 "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "tie_word_embeddings": False},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                     "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
             "n_positions": 1024, "activation_function": "gelu_new"},
    "bert-base": {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512,
                  "type_vocab_size": 2, "hidden_act": "gelu"},
}

# Fields a config must give explicitly (a missing one would silently take the config class's default).
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_REQUIRED_GATED = ("intermediate_size",)
_ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta", "deberta-v2")


def load_config(model_or_config: Any) -> tuple[str, Any]:
    """(display name, transformers config) for a preset, built-in name, directory, config.json file,
    dict of config fields, transformers config, or model (its config; the model itself is untouched).

    Raises:
        ValueError: An unknown name (with close presets suggested), a directory without config.json,
            or a config without the fields the architecture needs.
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", None)
        if config is None:
            raise ValueError(f"{type(model_or_config).__name__} has no .config; pass a transformers model or config")
        return getattr(config, "name_or_path", "") or type(model_or_config).__name__, config
    if isinstance(model_or_config, PretrainedConfig):
        return getattr(model_or_config, "name_or_path", "") or model_or_config.model_type, model_or_config
    if isinstance(model_or_config, dict):
        name = str(model_or_config.get("model_type", "config"))
        return name, _config_from_fields(dict(model_or_config), "the dict")
    if not isinstance(model_or_config, (str, os.PathLike)):
        raise TypeError("graft.plan takes a preset name, a path, a config or a model, "
                        f"got {type(model_or_config).__name__}")
    from graft import models

    text = os.fspath(model_or_config)
    key = models._ALIASES.get(text.lower(), text.lower())
    if key in PRESETS:  # a preset wins over a same-named directory, as a built-in name does in models.load
        return key, AutoConfig.for_model(**PRESETS[key])
    path = Path(text).expanduser()
    if not path.exists():
        path = _builtin_path(key) or path
    if not path.exists() and "/" in text and not text.startswith((".", "~", "/")):
        from graft import hub

        if hub.is_repo_id(text):  # a hub model id: only its config.json is fetched (or read from the cache)
            path = hub.config_file(text)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{path.parent} has no config.json; graft plan needs the model's config to build "
                             "its shape")
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path} as a JSON config: {e}") from None
        return text, _config_from_fields(fields, str(path))
    raise ValueError(_unknown_model_message(text))


def _builtin_path(name: str) -> Path | None:
    """The directory of a graft built-in model that needs no conversion (a GGUF one has a preset)."""
    from graft import models

    if name in PRESETS or name not in models.BUILTIN:
        return None
    try:
        return models.resolve(name)
    except (ModuleNotFoundError, FileNotFoundError, ValueError):
        return None


def _unknown_model_message(text: str) -> str:
    from graft import models

    names = [*PRESETS, *(n for n in models.BUILTIN if n not in PRESETS)]
    close = difflib.get_close_matches(text.lower(), names, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f"unknown model {text!r}.{hint} Presets: {', '.join(PRESETS)}; built-in models: "
            f"{', '.join(models.BUILTIN)}; or a directory (or config.json file) with the model's config.")


def _config_from_fields(fields: dict[str, Any], where: str) -> Any:
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = fields.get("model_type")
    if not model_type:
        raise ValueError(f"{where} has no model_type; graft plan needs it to build the architecture (e.g. 'llama')")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}: transformers does not know model_type={model_type!r}")
    # attribute_map: standard name -> this config's own name (GPT-2: hidden_size -> n_embd)
    aliases = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {}
    given = set(fields) | {standard for standard, own in aliases.items() if own in fields}
    need = _REQUIRED + (() if model_type == "gpt2" else _REQUIRED_GATED)
    missing = [f for f in need if f not in given]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}, which graft plan needs to build the architecture "
                         f"(model_type={model_type!r})")
    return AutoConfig.for_model(model_type, **{k: v for k, v in fields.items() if k != "model_type"})


def build_meta(config: Any, dtype: torch.dtype) -> nn.Module:
    """The architecture with every tensor on the meta device: shapes only, no memory."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)  # never change the caller's config
    with torch.device("meta"):
        if config.model_type in _ENCODERS:
            return AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# --------------------------------------------------------------------------------------------
# What autograd saves: one block's dataflow, op by op


@dataclass(frozen=True)
class _T:
    """A tensor of the dataflow: ``width`` elements per position, ``itemsize`` bytes each."""

    key: str
    width: float
    itemsize: int
    grad: bool
    kv: bool = False  # per key/value position (a prefix makes those more than the query positions)


class _Trace:
    """Records the tensors autograd keeps for backward while walking a block's forward.

    Rules (PyTorch's derivative formulas): a linear keeps its input only when its weight trains
    (else just the weight); an elementwise product keeps each operand whose partner needs a
    gradient; SiLU/GELU keep their input (GPT-2's Python ``gelu_new`` three more); RMSNorm keeps its
    fp32 input and rsqrt(var), and its normalised value only when its weight trains; LayerNorm
    keeps its input and two fp32 statistics; fused attention keeps q, k, v, the output and an fp32
    log-sum-exp per head; dropout keeps its mask; ``t.to(dtype)`` makes a new tensor only when the
    dtype changes; a residual add or a view keeps nothing. Tensors are identified by key, so one
    kept by several ops (the normed input of q and v) counts once. Sizes are bytes per sequence.
    """

    def __init__(self, modules: dict[str, nn.Module], prefix: str, *, act: int, full: bool, quantized: bool,
                 adapter: str, q_len: int, kv_len: int, compute: int = 2, device: str = "cuda",
                 attn_dropout: float = 0.0) -> None:
        self.modules, self.prefix, self.compute = modules, prefix, compute
        # CUDA dropout keeps a bool mask; the CPU one multiplies by a mask in the activations' dtype
        self.mask_bytes = 1 if device == "cuda" else act
        # attention-probability dropout: CUDA's fused kernels handle it; on CPU SDPA falls back to the
        # math kernel, which keeps the (heads x seq x seq) probabilities
        self.math_attention = device == "cpu" and attn_dropout > 0
        self.act, self.full, self.quantized, self.adapter = act, full, quantized, adapter
        self.q_len, self.kv_len = q_len, kv_len
        self.saved: dict[str, float] = {}
        self.weight_transient = 0.0  # bytes of weight-sized temporaries (dequantised NF4, DoRA norms)
        self.fixed = 0.0  # saved bytes that do not grow with the sequence (DoRA's per-feature vectors)
        self.ad = max(act, 4)  # graft's adapters are fp32 on a 16-bit base

    # ---- tensors
    def new(self, key: str, width: float, itemsize: int | None = None, grad: bool = True, kv: bool = False) -> _T:
        return _T(self.prefix + key, width, self.act if itemsize is None else itemsize, grad, kv)

    def save(self, t: _T) -> None:
        self.saved[t.key] = t.width * t.itemsize * (self.kv_len if t.kv else self.q_len)

    def cast(self, t: _T, itemsize: int, by: str) -> _T:
        """``t.to(dtype)`` in module ``by``: the same tensor when the dtype already matches, else a new one
        (each module casts for itself: LoRA on q and on v keep two fp32 copies of a 16-bit input)."""
        if t.itemsize == itemsize:
            return t
        return dataclasses.replace(t, key=f"{t.key}@{itemsize}:{by}", itemsize=itemsize)

    # ---- modules
    def module(self, name: str) -> nn.Module | None:
        return self.modules.get(self.prefix + name)

    def trains(self, module: nn.Module | None) -> bool:
        base = getattr(module, "base_layer", module)
        weight = getattr(base, "weight", None)
        return self.full if weight is None else bool(weight.requires_grad)

    def adapter_of(self, module: nn.Module | None) -> tuple[str, Any]:
        from graft.core import AdapterLayer

        if isinstance(module, AdapterLayer) and self.adapter in module.configs:
            return type(module).__name__, module.configs[self.adapter]
        return "", None

    # ---- ops
    def linear(self, x: _T, name: str, width: int) -> _T:
        module = self.module(name)
        kind, spec = self.adapter_of(module)
        trains = self.trains(module)
        if kind == "IA3Linear" and spec.feedforward:  # x * l: keeps x (in the adapter's dtype) for l's gradient
            self.save(self.cast(x, self.ad, name))
            x = self.new(f"{name}.ia3_in", x.width)
        if trains:
            self.save(x)
        if self.quantized and not trains and _is_linear(getattr(module, "base_layer", module)):
            # dequantised W in the compute dtype, rebuilt for each matmul (forward and backward)
            self.weight_transient = max(self.weight_transient, _weight_numel(module) * self.compute)
        out = self.new(f"{name}.out", width, grad=x.grad or trains)
        if kind == "LoraLinear":
            return self._lora(x, out, name, spec, module)
        if kind == "IA3Linear" and not spec.feedforward:  # out * l: keeps out for l's gradient
            self.save(self.cast(out, self.ad, name))
            return self.new(f"{name}.ia3_out", width)
        if kind == "BottleneckLayer":
            return self.bottleneck(out, name, spec)
        if kind == "BitFitLayer":  # out + δ keeps nothing
            return self.new(f"{name}.bitfit", width)
        return out

    def _lora(self, x: _T, out: _T, name: str, spec: Any, module: nn.Module) -> _T:
        xa = self.cast(x, self.ad, name)
        if spec.dropout > 0:
            self.save(self.new(f"{name}.lora_mask", x.width, self.mask_bytes))
            xa = self.new(f"{name}.lora_dropped", x.width, self.ad)
        self.save(xa)  # lora_A keeps its input
        self.save(self.new(f"{name}.lora_Ax", spec.r, self.ad))  # lora_B keeps A x
        if spec.dora:  # (g - 1) · W0x keeps W0x, g · sBAx keeps sBAx; the row norm is built from weights
            self.save(self.cast(out, self.ad, name + ".dora"))
            self.save(self.new(f"{name}.dora_lora", out.width, self.ad))
            # per feature: g = m / ‖W‖ keeps ‖W‖, g · sBAx keeps g, and (g - 1) · W0x keeps g - 1 if W0x
            # needs a gradient
            self.fixed += (2 + out.grad) * out.width * self.ad
            # ‖W0 + sBA‖ builds W0 (cast), sBA and their sum, weight-sized, then drops them (detached)
            self.weight_transient = max(self.weight_transient, 3 * _weight_numel(module) * self.ad)
        return self.new(f"{name}.lora_sum", out.width)

    def bottleneck(self, h: _T, name: str, spec: Any) -> _T:
        """A(h) = up(σ(down(h))): down keeps h, σ keeps its input, up keeps σ's output."""
        self.save(self.cast(h, self.ad, name))
        self.save(self.new(f"{name}.adapter_z", spec.bottleneck, self.ad))
        self.save(self.new(f"{name}.adapter_act", spec.bottleneck, self.ad))
        if spec.dropout > 0:
            self.save(self.new(f"{name}.adapter_mask", spec.hidden, self.mask_bytes))
        return self.new(f"{name}.adapter_sum", h.width)

    def rmsnorm(self, x: _T, name: str) -> _T:
        trains = self.trains(self.module(name))
        if x.grad:  # x.float().pow(2) and x * rsqrt(var) keep the fp32 input and rsqrt(var)
            self.save(self.cast(x, 4, name))
            self.save(self.new(f"{name}.rsqrt", 1, 4))
        if trains:  # weight * normed keeps normed for the weight's gradient
            self.save(self.new(f"{name}.normed", x.width))
        return self.new(f"{name}.out", x.width, grad=x.grad or trains)

    def layernorm(self, x: _T, name: str) -> _T:
        module = self.module(name)
        trains = self.trains(module)
        if x.grad or trains:  # native_layer_norm keeps input, mean and rstd
            self.save(x)
            self.save(self.new(f"{name}.stats", 2, 4))
        kind, _ = self.adapter_of(module)
        grad = x.grad or trains or kind == "BitFitLayer"
        return self.new(f"{name}.out", x.width, grad=grad)

    def attention(self, q: _T, k: _T, v: _T, key: str, heads: int, width: int) -> _T:
        out = self.new(f"{key}.out", width, grad=q.grad or k.grad or v.grad)
        if not out.grad:
            return out
        if self.math_attention:  # (q·√s)(k·√s)ᵀ keeps each side for the other's gradient, then
            if k.grad:  # softmax keeps its output, dropout its mask, probs @ v both operands
                self.save(self.new(f"{key}.q_scaled", width))
            if q.grad:
                self.save(self.new(f"{key}.k_scaled", width if k is q else k.width, kv=k.kv))
            for part in ("probs", "mask"):
                self.save(self.new(f"{key}.{part}", heads * self.kv_len))
            self.save(v)
            if v.grad:
                self.save(self.new(f"{key}.dropped", heads * self.kv_len))
            return self.new(f"{key}.contiguous", width)  # (batch, heads, seq, dim): transposing copies it
        for t in (q, k, v, out):
            self.save(t)
        self.save(self.new(f"{key}.lse", heads, 4))
        if self.kv_len != self.q_len:  # a prefix needs an explicit (seq x kv) mask, kept by the kernel
            self.save(self.new(f"{key}.mask", self.kv_len))
        return out

    def act_fn(self, x: _T, kind: str, key: str) -> _T:
        if x.grad:
            self.save(x)
            if kind == "gelu_new":  # 0.5·x·(1 + tanh(c(x + 0.044715x³))) in Python ops: keeps 3 more
                for part in ("tanh", "half", "one_plus"):
                    self.save(self.new(f"{key}.{part}", x.width))
        return self.new(f"{key}.out", x.width, grad=x.grad)

    def mul(self, a: _T, b: _T, key: str) -> _T:
        if b.grad:
            self.save(a)
        if a.grad:
            self.save(b)
        return self.new(key, a.width, grad=a.grad or b.grad)

    def dropout(self, x: _T, p: float, key: str) -> _T:
        if p <= 0:
            return x
        if x.grad:
            self.save(self.new(f"{key}.mask", x.width, self.mask_bytes))
        return self.new(f"{key}.out", x.width, grad=x.grad)

    def add(self, a: _T, b: _T, key: str) -> _T:
        return self.new(key, a.width, grad=a.grad or b.grad)

    def bytes(self, exclude: str | None = None, batch: int = 1) -> float:
        """Saved bytes per row (the per-batch ``fixed`` part spread over the batch's rows)."""
        return sum(v for k, v in self.saved.items() if k != exclude) + self.fixed / batch


def _is_linear(module: nn.Module | None) -> bool:
    from graft import targets as tg

    return module is not None and tg.is_linear(module)


def _weight_numel(module: nn.Module | None) -> int:
    base = getattr(module, "base_layer", module)
    weight = getattr(base, "weight", None)
    return int(weight.numel()) if weight is not None else 0


# ---- the block of each family: (trace, block input) -> block output


@dataclass(frozen=True)
class _Shape:
    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    act: str
    dropout: float
    attn_dropout: float
    encoder: bool
    blocks: tuple[str, ...]  # each block's module-name prefix, e.g. "model.layers.3."

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _shape(model: nn.Module) -> _Shape:
    c = model.config
    hidden = c.hidden_size
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
    names = {n for n, _ in model.named_modules()}
    if any(n.endswith("mlp.gate_proj") for n in names):
        family = "llama"
    elif any(n.endswith("attn.c_attn") for n in names):
        family = "gpt2"
    elif any(n.endswith("attention.self.query") for n in names):
        family = "bert"
    else:
        family = "generic"  # planned as a Llama-style block from the config's sizes
    act = getattr(c, "hidden_act", None) or getattr(c, "activation_function", None) or "silu"
    dropout = float(getattr(c, "resid_pdrop", None) or getattr(c, "hidden_dropout_prob", None) or 0.0)
    attn_dropout = float(getattr(c, "attn_pdrop", None) or getattr(c, "attention_probs_dropout_prob", None)
                         or getattr(c, "attention_dropout", None) or 0.0)
    found: dict[int, str] = {}
    for n in sorted(names, key=len):  # the outermost match: the block itself
        m = re.fullmatch(r"(?:.*\.)?(?:layers|h|layer)\.(\d+)", n)
        if m:
            found.setdefault(int(m.group(1)), n + ".")
    blocks = tuple(found.get(i, f"model.layers.{i}.") for i in range(c.num_hidden_layers))
    return _Shape(family, hidden, c.num_hidden_layers, heads, kv_heads, head_dim, inter, c.vocab_size,
                  act if isinstance(act, str) else "silu", dropout, attn_dropout, c.model_type in _ENCODERS, blocks)


def _llama_block(t: _Trace, x: _T, s: _Shape) -> _T:
    y = t.rmsnorm(x, "input_layernorm")
    q = t.linear(y, "self_attn.q_proj", s.q_dim)
    k = t.linear(y, "self_attn.k_proj", s.kv_dim)
    v = t.linear(y, "self_attn.v_proj", s.kv_dim)
    q = t.new("rope_q", s.q_dim, grad=q.grad)  # q·cos + rot(q)·sin keeps only the shared cos/sin
    k = t.new("rope_k", s.kv_dim, grad=k.grad)
    k, v = _with_prefix(t, k, v, s)
    # the fused kernels return the output as a (batch, heads, seq, dim) view of a (batch, seq, heads,
    # dim) buffer, so transpose(1, 2).contiguous() is that same buffer: o_proj's input costs nothing more
    o = t.attention(q, k, v, "attn", s.heads, s.q_dim)
    a = t.linear(o, "self_attn.o_proj", s.hidden)
    h = t.add(x, a, "resid1")
    y2 = t.rmsnorm(h, "post_attention_layernorm")
    g = t.linear(y2, "mlp.gate_proj", s.intermediate)
    u = t.linear(y2, "mlp.up_proj", s.intermediate)
    p = t.mul(t.act_fn(g, s.act, "mlp.act"), u, "mlp.prod")
    m = t.linear(p, "mlp.down_proj", s.hidden)
    m = _parallel_adapter(t, "mlp", y2, m)
    return t.add(h, m, "resid2")


def _gpt2_block(t: _Trace, x: _T, s: _Shape) -> _T:
    y = t.layernorm(x, "ln_1")
    qkv = t.linear(y, "attn.c_attn", 3 * s.hidden)  # q, k, v are views of one tensor, kept whole
    k, v = _with_prefix(t, qkv, qkv, s)  # with a prefix: cat(prefix, k) and cat(prefix, v) are new tensors
    o = t.attention(qkv, k, v, "attn", s.heads, s.hidden)
    a = t.dropout(t.linear(o, "attn.c_proj", s.hidden), s.dropout, "attn.resid_dropout")
    h = t.add(x, a, "resid1")
    y2 = t.layernorm(h, "ln_2")
    f = t.act_fn(t.linear(y2, "mlp.c_fc", s.intermediate), s.act, "mlp.act")
    m = t.dropout(t.linear(f, "mlp.c_proj", s.hidden), s.dropout, "mlp.dropout")
    m = _parallel_adapter(t, "mlp", y2, m)
    return t.add(h, m, "resid2")


def _bert_block(t: _Trace, x: _T, s: _Shape) -> _T:
    q = t.linear(x, "attention.self.query", s.hidden)
    k = t.linear(x, "attention.self.key", s.hidden)
    v = t.linear(x, "attention.self.value", s.hidden)
    k, v = _with_prefix(t, k, v, s)
    o = t.attention(q, k, v, "attn", s.heads, s.hidden)
    a = t.dropout(t.linear(o, "attention.output.dense", s.hidden), s.dropout, "attention.output.dropout")
    h = t.layernorm(t.add(x, a, "resid1"), "attention.output.LayerNorm")
    f = t.act_fn(t.linear(h, "intermediate.dense", s.intermediate), s.act, "intermediate.act")
    m = t.dropout(t.linear(f, "output.dense", s.hidden), s.dropout, "output.dropout")
    m = _parallel_adapter(t, "output", h, m)
    return t.layernorm(t.add(h, m, "resid2"), "output.LayerNorm")


_BLOCKS = {"llama": _llama_block, "generic": _llama_block, "gpt2": _gpt2_block, "bert": _bert_block}


def _with_prefix(t: _Trace, k: _T, v: _T, s: _Shape) -> tuple[_T, _T]:
    """Prefix tuning: cat(prefix, k) is a new tensor over kv positions; with a mask present,
    transformers repeats k/v to the query heads before SDPA."""
    if t.kv_len == t.q_len:
        return k, v
    width = s.q_dim if s.family in ("llama", "generic") else s.hidden
    return t.new("k_full", width, kv=True), t.new("v_full", width, kv=True)


def _parallel_adapter(t: _Trace, name: str, x: _T, out: _T) -> _T:
    """A parallel bottleneck adapter wraps the feed-forward block and reads its input x."""
    kind, spec = t.adapter_of(t.module(name))
    if kind != "BottleneckLayer" or spec is None:
        return out
    t.bottleneck(x, name, spec)
    return t.new(f"{name}.parallel_sum", out.width)


# --------------------------------------------------------------------------------------------
# One method's estimate


@dataclass(frozen=True)
class _Candidate:
    name: str
    label: str
    method: Any  # a graft Method, or None for full fine-tuning
    quantized: bool = False


@dataclass(frozen=True)
class Estimate:
    """One method's row of the plan. Byte counts are None where the method does not apply."""

    method: str
    label: str
    applicable: bool
    note: str | None
    trainable_params: int
    total_params: int
    weights_bytes: int | None = None
    gradient_bytes: int | None = None
    optimizer_bytes: int | None = None
    optimizer_bytes_adamw: int | None = None
    optimizer_bytes_adamw8bit: int | None = None
    activation_bytes: int | None = None
    activation_bytes_no_checkpointing: int | None = None
    activation_bytes_checkpointing: int | None = None
    step_transient_bytes: int | None = None
    gradient_checkpointing: bool | None = None
    total_bytes: int | None = None
    total_bytes_no_checkpointing: int | None = None
    total_bytes_checkpointing: int | None = None
    fits: bool = False
    adapter_file_bytes: int | None = None

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "trainable_percent": round(self.trainable_percent, 4)}


def _estimates(model: nn.Module, cands: list[_Candidate], s: _Settings, shape: _Shape, base_total: int,
               quantized: set[int] | str) -> list[Estimate]:
    """Attach the candidates' shared method to the meta model once, estimate each candidate, detach.

    ``quantized``: ids of the weights NF4 would store (or why the model cannot be quantized).
    """
    from graft.core import attach, detach

    name, method = "plan", cands[0].method
    try:
        if method is not None:
            attach(model, method, name)
    except (ValueError, TypeError) as e:
        return [Estimate(c.name, c.label, False, str(e), 0, base_total) for c in cands]
    try:
        modules = dict(model.named_modules())
        out = []
        for cand in cands:
            if cand.quantized and isinstance(quantized, str):
                out.append(Estimate(cand.name, cand.label, False, quantized, 0, base_total))
            else:
                out.append(_estimate(model, modules, cand, s, shape, base_total,
                                     quantized if cand.quantized else set(), name))
        return out
    finally:
        if method is not None:
            detach(model, name)


def _estimate(model: nn.Module, modules: dict[str, nn.Module], cand: _Candidate, s: _Settings, shape: _Shape,
              base_total: int, quantized: set[int], name: str) -> Estimate:
    """One row, read off the model with ``cand``'s method attached as adapter ``name``."""
    params = list(model.parameters())  # shared (tied) tensors once
    trainable = [p for p in params if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    weights = (sum(_param_bytes(p, quantized, cand.quantized) for p in params)
               + sum(b.numel() * b.element_size() for b in model.buffers()))
    grads = sum(p.numel() * p.element_size() for p in trainable)
    opt = {o: _optimizer_bytes(trainable, o) for o in ("adamw", "adamw8bit")}
    head = model.get_output_embeddings()
    head_trains = head is not None and head.weight.requires_grad
    head_grad = head.weight.numel() * head.weight.element_size() if head_trains else 0
    largest = max((p.numel() * p.element_size() for p in trainable), default=0)
    virtual = _virtual_tokens(model, name)
    acts: dict[bool, float | None] = {ckpt: _activations(model, modules, shape, s, cand, ckpt, virtual, name)
                                      for ckpt in (False, True)}
    if virtual[1]:
        acts[True] = None  # graft refuses prefix tuning under checkpointing (transformers drops the cache)
    if cand.method is None:
        file_bytes = sum(p.numel() * p.element_size() for p in params)  # the whole model
    else:
        file_bytes = 4 * n_train + 128 * len(trainable) + 1024  # fp32 tensors + safetensors header + config
    if s.optimizer == "adamw8bit":
        step = 0  # bitsandbytes updates block by block, in place
    else:
        step = 4 * n_train if s.device == "cuda" else 2 * largest  # foreach list vs two single-tensor temps
    optim = opt[s.optimizer]
    totals = {ckpt: None if a is None else max(weights + optim + a + head_grad, weights + grads + optim + step)
              for ckpt, a in acts.items()}
    budget = s.memory - s.reserve
    if s.gradient_checkpointing is None:  # only where it is needed to fit
        ckpt = totals[True] is not None and totals[False] > budget and totals[True] <= budget
    else:
        ckpt = s.gradient_checkpointing and totals[True] is not None
    note = "prefix tuning cannot train under gradient checkpointing" if virtual[1] else None
    return Estimate(
        method=cand.name, label=cand.label, applicable=True, note=note, trainable_params=n_train,
        total_params=base_total, weights_bytes=int(weights), gradient_bytes=int(grads), optimizer_bytes=int(optim),
        optimizer_bytes_adamw=int(opt["adamw"]), optimizer_bytes_adamw8bit=int(opt["adamw8bit"]),
        activation_bytes=_int(acts[ckpt]), activation_bytes_no_checkpointing=_int(acts[False]),
        activation_bytes_checkpointing=_int(acts[True]), step_transient_bytes=int(step), gradient_checkpointing=ckpt,
        total_bytes=_int(totals[ckpt]), total_bytes_no_checkpointing=_int(totals[False]),
        total_bytes_checkpointing=_int(totals[True]), fits=totals[ckpt] <= budget, adapter_file_bytes=int(file_bytes),
    )


def _int(x: float | None) -> int | None:
    return None if x is None else round(x)


def _quantizable(model: nn.Module) -> list[str]:
    """The layers ``graft.quant.quantize(model, "nf4")`` replaces: every linear but the output head.

    Raises:
        ValueError: A linear-like layer bitsandbytes cannot take (GPT-2's Conv1D), as quantize does.
    """
    from graft import targets as tg

    heads = tg.output_head_names(model)
    names = [n for n, m in model.named_modules() if n and n not in heads and tg.is_linear(m)]
    other = [n for n in names if type(model.get_submodule(n)) is not nn.Linear]
    if other:
        raise ValueError(f"graft.quant quantizes torch.nn.Linear layers only, and {other[0]} is a "
                         f"{type(model.get_submodule(other[0])).__name__}")
    return names


def _param_bytes(p: torch.Tensor, quantized: set[int], upcast: bool) -> float:
    """NF4 for quantized weights; with ``upcast`` (QLoRA after prepare_kbit_training) the rest in fp32."""
    if id(p) in quantized:
        return p.numel() * NF4_BITS / 8
    return p.numel() * (max(4, p.element_size()) if upcast else p.element_size())


def _optimizer_bytes(trainable: list[torch.Tensor], optimizer: str) -> float:
    """AdamW: two fp32 moments; 8-bit: two uint8 moments + an fp32 absmax per 256 values (fp32 below
    4,096 values). A 16-bit trainable tensor also gets an fp32 master copy (mixed precision)."""
    total = 0.0
    for p in trainable:
        n = p.numel()
        if optimizer == "adamw8bit" and n >= ADAM_8BIT_MIN_SIZE:
            total += n * 2 + 2 * 4 * math.ceil(n / ADAM_8BIT_BLOCK)
        else:
            total += n * 8
        if p.element_size() < 4:
            total += n * 4
    return total


def _virtual_tokens(model: nn.Module, name: str) -> tuple[int, int]:
    """(prompt tokens, prefix positions) the method puts in front of every row."""
    from graft.methods.prompt import INPUT_ATTR

    container = getattr(model, INPUT_ATTR, None)
    if container is None or name not in container.adapters:
        return 0, 0
    module = container.adapters[name]
    return (module.num_virtual_tokens, 0) if module.kind == "tokens" else (0, module.num_virtual_tokens)


@dataclass(frozen=True)
class _Walk:
    """Activation bytes of one row (sequence), by where they live."""

    blocks: float  # every block's saved tensors (no checkpointing)
    inputs: float  # every block's input (what checkpointing keeps instead)
    recompute: float  # the largest block's saved tensors besides its input (recomputed under checkpointing)
    working: float  # the largest block's backward working set (gradients of its intermediates)
    outside: float  # kept outside the blocks: rotary tables, final norm, the rows the loss head reads
    head: float  # the loss head's transient for the whole micro-batch (one logits chunk in fp32)


def _act_bytes(s: _Settings, cand: _Candidate) -> int:
    # QLoRA: prepare_kbit_training keeps the embeddings and norms in fp32, so the residual stream, and
    # every 4-bit layer's output (cast back to its input's dtype), is fp32 whatever the compute dtype.
    return 4 if cand.quantized else _dtype_bytes(s.dtype)


def _walk(model: nn.Module, modules: dict[str, nn.Module], shape: _Shape, s: _Settings, cand: _Candidate,
          ckpt: bool, virtual: tuple[int, int], name: str) -> _Walk:
    """Walk every block's dataflow (see :class:`_Trace`) for one row of ``seq_len`` tokens."""
    act = _act_bytes(s, cand)
    full = cand.method is None
    q_len = s.seq_len + virtual[0]
    kv_len = q_len + virtual[1]
    block = _BLOCKS[shape.family]
    # The embeddings' output needs a gradient when they train or a prompt is prepended; the first
    # block's input also when something between them trains (BitFit on BERT's embedding LayerNorm),
    # or under checkpointing (transformers then makes the embedding output require grad).
    embed_grad = full or bool(virtual[0])
    before = _trains_before_blocks(model, shape)
    grad = embed_grad or before or ckpt
    blocks = recompute = working = 0.0
    for i in range(shape.layers):
        t = _Trace(modules, shape.blocks[i], act=act, full=full, quantized=cand.quantized, adapter=name,
                   q_len=q_len, kv_len=kv_len, compute=_dtype_bytes(s.dtype), device=s.device,
                   attn_dropout=shape.attn_dropout)
        x = _T(f"block{i}.in", shape.hidden, act, grad)
        out = block(t, x, shape)
        blocks += t.bytes(batch=s.batch)
        recompute = max(recompute, t.bytes(exclude=x.key, batch=s.batch))
        # one block's backward: three intermediate-sized gradients and the residual stream's gradient
        live = (3 * max(shape.intermediate, shape.q_dim + 2 * shape.kv_dim) + 2 * shape.hidden) * act * q_len
        working = max(working, live + t.weight_transient / s.batch)
        grad = out.grad
    outside, head = _outside(shape, s, act, q_len, full, embed_grad, embed_grad or before)
    return _Walk(blocks, shape.layers * shape.hidden * act * q_len, recompute, working, outside, head)


def _activations(model: nn.Module, modules: dict[str, nn.Module], shape: _Shape, s: _Settings,
                 cand: _Candidate, ckpt: bool, virtual: tuple[int, int], name: str) -> float:
    """Peak activation bytes of one micro-batch: stored tensors plus the larger transient of backward.

    Backward first runs the loss head (its chunk transient, while the rows and every block's tensors
    are alive), then the blocks from the top (the working set; under checkpointing also the
    recomputed block), by which time the rows and the final norm's tensors are freed.
    """
    w = _walk(model, modules, shape, s, cand, ckpt, virtual, name)
    stored, during_blocks = (w.inputs, w.recompute + w.working) if ckpt else (w.blocks, w.working)
    return (stored + max(w.outside + w.head / s.batch, during_blocks)) * s.batch


def _trains_before_blocks(model: nn.Module, shape: _Shape) -> bool:
    """Whether a parameter registered before the first block (the embeddings' modules) trains."""
    for pname, p in model.named_parameters():
        if pname.startswith(shape.blocks[0]):
            return False
        if p.requires_grad:
            return True
    return False


def _outside(shape: _Shape, s: _Settings, act: int, q_len: int, full: bool, embed_grad: bool,
             block_grad: bool) -> tuple[float, float]:
    """(bytes per row kept outside the blocks, bytes of the loss head's transient per micro-batch).

    ``embed_grad``: the embeddings' output needs a gradient; ``block_grad``: the first block's input does.
    """
    h = shape.hidden
    mask = (1 if s.device == "cuda" else act) if shape.dropout else 0  # dropout masks, as in _Trace
    if shape.encoder:
        # the pooler's tanh output, its dropout mask and the classifier's input: one row each; a
        # training pooler keeps hidden[:, 0], a view that holds the whole last hidden state
        head = 3 * h * act + 20 + (h * act * q_len if full else 0)
        ids = 16 * q_len if full else 0  # the token and token-type ids, int64
        norm = (h * act + 8) * q_len if embed_grad else 0  # the embeddings' LayerNorm: input, mean, rstd
        return head + ids + norm + (h * mask * q_len if block_grad else 0), 0.0  # and their dropout mask
    kept = 0.0
    if shape.family in ("llama", "generic"):
        kept += 2 * shape.head_dim * act * q_len  # rotary cos and sin, shared by every block
        kept += (h + 1) * 4 * q_len + (h * act * q_len if full else 0)  # final RMSNorm: fp32 input, rsqrt (+ normed)
    else:
        kept += (h * act + 8) * q_len  # the final LayerNorm: input, mean, rstd
        if block_grad:
            kept += h * mask * q_len  # the embedding dropout mask
    if full:  # the token (and GPT-2's position) embeddings keep their int64 ids for the gradient
        kept += 8 * q_len * (2 if shape.family == "gpt2" else 1)
    rows = s.seq_len - 1  # supervised positions of one row
    # hidden[:, :-1][keep]: the bool mask, and per row what the chunked head keeps for backward: a frozen
    # head the gradient of its input rows (formed in forward), a trainable one (full) the rows and their
    # int64 targets (checkpointed)
    kept += rows + rows * (h * act + (8 if full else 0))
    chunk = min(s.logits_chunk, rows * s.batch)
    transient = 12.0 * chunk * shape.vocab  # fp32 log-softmax + two fp32 gradients of one chunk
    if full and rows * s.batch > s.logits_chunk:
        transient += shape.vocab * h * act  # a later chunk's head gradient before it is accumulated
    return kept, transient


def _dtype_bytes(dtype: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]


# --------------------------------------------------------------------------------------------
# The plan


GOALS = ("instructions", "reasoning", "classification", "multi-task", "no-training")
ROWS = ("full", "lora", "qlora", "dora", "ia3", "prompt-tuning", "prefix-tuning", "adapter", "bitfit")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


@dataclass(frozen=True)
class _Settings:
    memory: int
    seq_len: int
    batch: int
    dtype: str
    optimizer: str
    gradient_checkpointing: bool | None
    logits_chunk: int
    device: str
    reserve: int
    goal: str | None
    tasks: int


@dataclass(frozen=True)
class Recommendation:
    """What to do, and why (each reason carries the numbers that drove it)."""

    method: str  # a row's method name, or "icl"
    approach: str  # one line: e.g. "instruction tuning with LoRA (r=8) + gradient checkpointing"
    fits: bool
    gradient_checkpointing: bool | None
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


# --------------------------------------------------------------------------------------------
# The advice


def recommend(rows: list[Estimate], s: _Settings, inference: float, encoder: bool = False) -> Recommendation:
    """The decision path practitioners use: no training budget -> ICL; instructions -> instruction
    tuning + LoRA; reasoning -> CoT data + LoRA; tight memory -> QLoRA; many tasks -> one adapter each."""
    budget = s.memory - s.reserve
    mem = f"{format_bytes(s.memory)}" + (f" ({format_bytes(s.reserve)} kept for the runtime)" if s.reserve else "")
    if s.goal == "no-training":
        return _recommend_icl(rows, s, inference, budget, mem)
    by = {r.method: r for r in rows}
    lora, qlora, full = by["lora"], by["qlora"], by["full"]
    if not lora.applicable:
        return Recommendation("lora", "LoRA with explicit targets", False, None,
                              [f"LoRA could not be planned: {lora.note}"])
    reasons: list[str] = []
    if lora.fits:
        pick = lora
        reasons.append(f"LoRA needs {_cost(lora)} of {mem}: it fits" + _ckpt_reason(lora))
    elif qlora.fits:
        pick = qlora
        reasons.append(f"tight memory: 16-bit LoRA needs {format_bytes(_best(lora))} (its frozen weights alone "
                       f"{format_bytes(lora.weights_bytes)}), more than {mem}; QLoRA keeps the frozen base in NF4 "
                       f"({format_bytes(qlora.weights_bytes)} of weights) and needs {_cost(qlora)}"
                       + _ckpt_reason(qlora))
    else:
        pick = qlora
        reasons.append(f"nothing fits: even QLoRA needs {format_bytes(_best(qlora))} with gradient checkpointing, "
                       f"more than {mem}; shorten --seq-len (now {s.seq_len}), use --batch 1 (now {s.batch}) "
                       f"with gradient accumulation, or pick a smaller model")
    if full.fits and pick is lora:
        reasons.append(f"full fine-tuning would fit too ({format_bytes(full.total_bytes)}); LoRA trains "
                       f"{lora.trainable_params:,} parameters instead of {full.trainable_params:,} and saves a "
                       f"{format_bytes(lora.adapter_file_bytes)} adapter instead of a "
                       f"{format_bytes(full.adapter_file_bytes)} model")
    elif not full.fits:
        reasons.append(f"full fine-tuning would need {format_bytes(_best(full))}, more than {mem}")
    name = "QLoRA" if pick is qlora else "LoRA"
    ckpt = " + gradient checkpointing" if pick.gradient_checkpointing else ""
    approach, extra = _goal_advice(s, encoder, name, pick, full)
    reasons.extend(extra)
    return Recommendation(pick.method, approach + ckpt, pick.fits, pick.gradient_checkpointing, reasons)


def _goal_advice(s: _Settings, encoder: bool, name: str, pick: Estimate, full: Estimate) -> tuple[str, list[str]]:
    if s.goal == "instructions":
        return f"instruction tuning with {name}", [(
            "instruction following: train on instruction -> response pairs (alpaca or chat template, loss on the "
            f"response only); a low-rank update is enough to teach the format ({pick.trainable_params:,} "
            f"trainable parameters, {pick.trainable_percent:.3f}% of the model)")]
    if s.goal == "reasoning":
        return f"chain-of-thought data + {name}", [(
            "reasoning: train on worked solutions that end in the answer (--format cot), so the model learns to "
            f"write the steps; with seq-len {s.seq_len} the rationale must fit in a row")]
    if s.goal == "classification":
        what = "a classification head (task classification)" if encoder else "the label as the response"
        return f"{name} with {what}", [
            f"classification: {name} plus {what}; the head is trained in full and saved with the adapter"]
    if s.goal == "multi-task":
        n = max(s.tasks, 2)
        return f"one {name} adapter per task on one shared base, served together", [(
            f"many tasks on one base: {n} tasks cost one {format_bytes(pick.weights_bytes)} base plus "
            f"{n} x {format_bytes(pick.adapter_file_bytes)} adapters, instead of {n} x "
            f"{format_bytes(full.adapter_file_bytes)} fully fine-tuned models; graft.route serves several "
            "adapters in one batch")]
    return name, []


def _recommend_icl(rows: list[Estimate], s: _Settings, inference: float, budget: int, mem: str) -> Recommendation:
    by = {r.method: r for r in rows}
    fits = inference <= budget
    reasons = [("no training budget: in-context learning (instructions and a few worked examples in the prompt, "
                "chain-of-thought for reasoning) changes no weights"),
               (f"serving needs about {format_bytes(inference)} (weights + KV cache for {s.batch} x {s.seq_len} "
                f"tokens) of {mem}: ") + ("it fits" if fits else "it does not fit; load the weights in 4 bits")]
    cheapest = min((r for r in rows if r.applicable and r.total_bytes is not None), key=lambda r: r.total_bytes,
                   default=None)
    if cheapest is not None:
        reasons.append(f"when training becomes possible, the cheapest method is {cheapest.label} "
                       f"({format_bytes(cheapest.total_bytes)}); LoRA needs {format_bytes(by['lora'].total_bytes)}")
    return Recommendation("icl", "in-context learning (few-shot / chain-of-thought prompts), no training", fits,
                          None, reasons)


def _best(r: Estimate) -> int:
    options = [t for t in (r.total_bytes_no_checkpointing, r.total_bytes_checkpointing) if t is not None]
    return min(options) if options else 0


def _cost(r: Estimate) -> str:
    return (f"{format_bytes(r.total_bytes)} (weights {format_bytes(r.weights_bytes)}, activations "
            f"{format_bytes(r.activation_bytes)}, optimizer {format_bytes(r.optimizer_bytes)})")


def _ckpt_reason(r: Estimate) -> str:
    if r.gradient_checkpointing and r.total_bytes_no_checkpointing is not None:
        return (f"; only with gradient checkpointing: without it activations take "
                f"{format_bytes(r.activation_bytes_no_checkpointing)} and the total "
                f"{format_bytes(r.total_bytes_no_checkpointing)}")
    return ""


# --------------------------------------------------------------------------------------------
# Output


def _render(p: Plan) -> str:
    s = p.settings
    reserve = f" ({format_bytes(s.reserve)} reserved for the runtime)" if s.reserve else ""
    lines = [f"model: {p.model} - {p.architecture}, {p.total_params:,} parameters",
             (f"budget: {format_bytes(s.memory)} on {s.device}{reserve}; seq-len {s.seq_len}, batch {s.batch}, "
              f"{s.dtype}, optimizer {s.optimizer}, logits chunk {s.logits_chunk}"), ""]
    head = ("method", "trainable", "%", "weights", "grads", "optim adamw / 8bit", "activ full / ckpt",
            "total full / ckpt", "fits", "file")
    table = [head]
    for r in (r for r in p.rows if r.applicable):
        star = ("*", "") if not r.gradient_checkpointing else ("", "*")
        table.append((
            r.method, f"{r.trainable_params:,}", f"{r.trainable_percent:.3f}", format_bytes(r.weights_bytes),
            format_bytes(r.gradient_bytes),
            f"{format_bytes(r.optimizer_bytes_adamw)} / {format_bytes(r.optimizer_bytes_adamw8bit)}",
            f"{format_bytes(r.activation_bytes_no_checkpointing)} / {format_bytes(r.activation_bytes_checkpointing)}",
            (f"{format_bytes(r.total_bytes_no_checkpointing)}{star[0]} / "
             f"{format_bytes(r.total_bytes_checkpointing)}{star[1]}"),
            "yes" if r.fits else "no", format_bytes(r.adapter_file_bytes)))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines += [f"{r.method.ljust(widths[0])}  n/a: {_first_sentence(r.note)}" for r in p.rows if not r.applicable]
    lines += ["", ("total = the predicted peak; * marks the setting planned (gradient checkpointing only where it "
                   "is needed to fit). Gradients and activations are not alive at the same time, so the peak is less "
                   "than the sum of the columns. file = the adapter file (full fine-tuning: the model)."), ""]
    rec = p.recommendation
    lines.append(f"recommendation: {rec.approach}" + ("" if rec.fits else " (does not fit)"))
    lines += [f"  - {reason}" for reason in rec.reasons]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def _first_sentence(text: str | None) -> str:
    text = text or ""
    return text.split("; ")[0]


_COLORS = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer": "#55a868", "activations": "#c44e52",
           "optimizer-step temporaries": "#b0b0b0"}


def _plot(p: Plan, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in p.rows if r.applicable and r.total_bytes is not None]
    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    parts = {"weights": [r.weights_bytes for r in rows], "gradients": [r.gradient_bytes for r in rows],
             "optimizer": [r.optimizer_bytes for r in rows], "activations": [r.activation_bytes for r in rows],
             "optimizer-step temporaries": [r.step_transient_bytes for r in rows]}
    for label, values in parts.items():
        gb = [v / 1e9 for v in values]
        ax.bar(x, gb, bottom=bottom, label=label, color=_COLORS[label], width=0.6)
        bottom = [b + v for b, v in zip(bottom, gb)]
    ax.scatter(list(x), [r.total_bytes / 1e9 for r in rows], marker="_", s=600, color="black", zorder=3,
               label="predicted peak")
    reserve = f" - {format_bytes(p.settings.reserve)} runtime" if p.settings.reserve else ""
    ax.axhline((p.settings.memory - p.settings.reserve) / 1e9, color="gray", linestyle="--",
               label=f"budget {format_bytes(p.settings.memory)}{reserve}")
    ax.set_xticks(list(x), [r.method for r in rows], rotation=30, ha="right")
    ax.set_ylabel("GB")
    ax.set_title(f"{p.model}: seq-len {p.settings.seq_len}, batch {p.settings.batch}, {p.settings.dtype}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path
