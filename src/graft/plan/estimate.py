"""graft plan: one method's trainable parameters and memory."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graft.plan.settings import _Settings
from graft.plan.sizes import ADAM_8BIT_BLOCK, ADAM_8BIT_MIN_SIZE, NF4_BITS
from graft.plan.trace import _BLOCKS, _T, _Shape, _Trace


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
