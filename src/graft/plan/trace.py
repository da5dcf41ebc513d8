"""graft plan: what autograd saves, walked op by op through one block's dataflow per family."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from graft.plan.architectures import _ENCODERS


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
