"""Attention over packed rows one example at a time, for CPU training on packed batches.

A packed row (:func:`graft.data.pack`) holds several examples. transformers confines attention to
each of them with a block-diagonal causal mask, but ``scaled_dot_product_attention`` on the CPU
computes every (query, key) pair of the row before masking, and a mask rules out the causal
kernel's skipping of the upper triangle: attention costs rows x width² instead of the sum of each
example's length². This attention function cuts each row at the places where ``position_ids``
restart (the examples, and the row's trailing padding, which :func:`graft.data.collate` gives
positions of its own) and runs ``scaled_dot_product_attention(..., is_causal=True)`` on each piece:
the same result as the block mask (it is the same softmax over the same keys), at the cost of the
pieces. On the training benchmark's batches (SmolLM2-135M, GSM8K, rows of at most 512) attention
forward and backward took 3.19 s instead of 7.46 s (benchmarks/packed_attention.py).

It applies only where that equivalence holds: the mask transformers built is exactly the
block-causal mask of the rows' position runs (checked once per forward), no KV cache (as many keys
as queries), no dropout. Anything else (padding masks, decoding) goes to transformers' own sdpa
function with the mask it was given. :func:`packed_attention` switches a model to it for the duration of a
``with`` block (graft's trainer does so on the CPU when the batches are packed).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "graft_packed_sdpa"


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each run where the position grows by one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    width = position_ids.shape[1]
    out = []
    for row in starts.tolist():
        begin = [t for t, s in enumerate(row) if s]
        out.append(list(zip(begin, [*begin[1:], width])))
    return out


def block_causal(position_ids: torch.Tensor) -> torch.Tensor:
    """(b, 1, s, s) bool: causal within each run of :func:`segments`, nothing across."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    seg = starts.cumsum(dim=1)  # (b, s): which run each position is in
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


_cache: dict[str, Any] = {}


def _plan(position_ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[tuple[int, int]]] | None:
    """The rows' segments when ``mask`` is exactly their block-causal mask (else None), once per forward.

    Every layer of a forward gets the same ``position_ids`` and mask, so the check runs once. Any
    other mask (padding, a cache, a custom pattern) means the pieces would not be exact.
    """
    key = (position_ids.data_ptr(), position_ids._version, tuple(position_ids.shape),
           None if mask is None else (mask.data_ptr(), mask._version, tuple(mask.shape)))
    if _cache.get("key") != key:
        exact = (mask is not None and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
                 and mask.shape[0] == position_ids.shape[0] and torch.equal(mask, block_causal(position_ids)))
        _cache["key"], _cache["value"] = key, segments(position_ids) if exact else None
    return _cache["value"]


def packed_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; query (b, h, s, d), key / value (b, h_kv, s, d) -> (b, s, h, d)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_len = query.shape[2]
    bounds = None
    if (position_ids is not None and position_ids.dim() == 2 and position_ids.shape == (query.shape[0], q_len)
            and q_len > 1 and key.shape[2] == q_len and not dropout and kwargs.get("position_bias") is None):
        bounds = _plan(position_ids, attention_mask)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    dtype = query.dtype
    if upcast(query):
        query, key, value = query.float(), key.float(), value.float()
    rows = []
    for b, row in enumerate(bounds):
        rows.append(torch.cat([
            F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                           is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in row], dim=2))  # (1, h, s, d)
    return torch.cat(rows, dim=0).to(dtype).transpose(1, 2).contiguous(), None


@functools.cache
def _cpu_has_amx() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def upcast(query: torch.Tensor) -> bool:
    """Whether to run this attention in fp32: 16-bit inputs on a CPU without AMX, whose bf16 attention kernel
    is slower than fp32's (SmolLM2 shapes, forward + backward: 0.40 s bf16, 0.33 s cast to fp32, 0.29 s fp32;
    AVX512-BF16, 2 threads). Attention is a small share of the FLOPs, so fp32 there costs little and is exact-er."""
    return query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and not _cpu_has_amx()


def register() -> None:
    """Make :data:`NAME` known to transformers (attention function, and sdpa's mask for the fallback)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def applies(model: nn.Module, batch: dict[str, Any], device: torch.device) -> bool:
    """Whether training ``model`` on batches like ``batch`` should use it.

    A packed batch (position_ids, no attention_mask) on the CPU, for a model that runs
    transformers' sdpa attention, and where a probe shows that the switch is exact for this model:
    a row of two random sequences gives the same logits (to 1e-4, fp32) both ways, and the
    per-example path did run. Models whose code treats attention implementations other than
    "sdpa" differently, or that do not hand ``position_ids`` to the attention function (GPT-2),
    keep their own attention.
    """
    config = getattr(model, "config", None)
    if not (device.type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa"
            and "position_ids" in batch and "attention_mask" not in batch
            and hasattr(model, "set_attn_implementation")):
        return False
    return _probe(model)


def _probe(model: nn.Module) -> bool:
    embeddings = model.get_input_embeddings()
    if embeddings is None or embeddings.weight.dtype != torch.float32:
        return False
    generator = torch.Generator().manual_seed(0)
    device = embeddings.weight.device
    ids = torch.randint(embeddings.num_embeddings, (1, 11), generator=generator).to(device)
    pos = torch.cat([torch.arange(5), torch.arange(6)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            _cache.clear()
            with packed_attention(model):
                if model.config._attn_implementation != NAME:
                    return False
                pieces = model(input_ids=ids, position_ids=pos, use_cache=False).logits
                ran = _cache.get("value") is not None
    finally:
        model.train(was_training)
    diff = (plain.float() - pieces.float()).abs().max().item()
    return ran and diff <= 1e-4 * (1.0 + plain.float().abs().max().item())


@contextlib.contextmanager
def packed_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with :func:`packed_sdpa_forward` inside the block; its own attention again after."""
    register()
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, TypeError, NotImplementedError):  # a model that takes no registered attention function
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(before)
