"""Prefix tuning (Li & Liang 2021): trained keys and values in front of every attention layer's own.

    layer l:  K' = [K_p^l ; K],  V' = [V_p^l ; V],   K_p^l, V_p^l ∈ R^{n×d_kv}   (Li & Liang §4.2)

The n prefix positions are not tokens: they reach the model as a KV cache that already holds them
(``past_key_values``), through the backbone hook of ``prompt.py``. The attention mask gets n leading
ones and given ``position_ids`` are shifted by n, as peft does; without them the model numbers the
real tokens from the cache length, n..n+L-1.

The table has one row per virtual token of width L·2·d_kv (peft's ``PrefixEncoder``), reshaped to
(2L, heads, n, head_dim): rows 2l and 2l+1 are layer l's keys and values. Under grouped-query
attention d_kv = head_dim · num_key_value_heads, not the hidden size (METHODS.md §6.3).
With ``projection`` (Li & Liang's reparametrisation) the table is
``Linear(h, 2L·d_kv)(tanh(Linear(d_kv, h)(E)))`` with E ∈ R^{n×d_kv}; the PEFT file keeps only its output,
graft's resume file keeps E and the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from graft.core import register
from graft.methods.prompt import (
    ModelDims,
    PromptLearning,
    VirtualTokens,
    backbone_of,
    cache_argument,
    check_size,
)


class PrefixEncoder(VirtualTokens):
    """The per-layer key/value prefixes of one adapter, optionally through the projection MLP."""

    kind = "kv"
    encoder_names = ("transform",)

    def __init__(self, num_virtual_tokens: int, dims: ModelDims, projection: bool, hidden: int,
                 device: torch.device) -> None:
        width = dims.num_layers * 2 * dims.kv_dim
        super().__init__(num_virtual_tokens, dims.kv_dim if projection else width, device)
        self.dims = dims
        self.transform: nn.Sequential | None = None
        if projection:
            kw = {"device": device, "dtype": torch.float32}
            self.transform = nn.Sequential(nn.Linear(dims.kv_dim, hidden, **kw), nn.Tanh(),
                                           nn.Linear(hidden, width, **kw))

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight  # (n, 2L·d_kv), or (n, d_kv) before the projection
        return self.transform(table) if self.transform is not None else table

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (keys, values) of shape (batch, kv_heads, n, head_dim), as the model's cache holds them."""
        n, d = self.num_virtual_tokens, self.dims
        kv = self().to(dtype).view(n, 2 * d.num_layers, d.kv_heads, d.head_dim).permute(1, 2, 0, 3)  # (2L, H, n, hd)
        kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, batch, H, n, hd)
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(d.num_layers)]


@register
@dataclass(frozen=True)
class PrefixTuning(PromptLearning):
    """Prefix tuning: n trained key/value positions in front of every layer's attention.

    Args:
        num_virtual_tokens: n (> 0). Li & Liang use 10 (E2E) or 5.
        projection: Reparametrise the prefixes by an MLP (Li & Liang §4.3); trained, then only its
            output is shipped (peft's ``prefix_projection``).
        encoder_hidden_size: h of the projection; None takes d_kv (peft's default). Li & Liang use 512.

    Works for models whose backbone takes ``past_key_values`` (decoder-only LMs; also BERT-style
    encoders in transformers 5, which prepend a given cache to their keys and values). Initial values
    are N(0, 1), as peft's; a prefix is never identity at init.
    """

    projection: bool = False
    encoder_hidden_size: int | None = None

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    # transformers calls a checkpointed layer without its past_key_values, which carry the prefix
    gradient_checkpointing_ok: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.projection, bool):
            raise TypeError(f"PrefixTuning projection={self.projection!r} must be True or False")
        check_size("PrefixTuning", "encoder_hidden_size", self.encoder_hidden_size, optional=True)
        if self.encoder_hidden_size is not None and not self.projection:
            raise ValueError("PrefixTuning encoder_hidden_size is the projection's width; it needs projection=True")

    def check_model(self, model: nn.Module) -> nn.Module:
        backbone = backbone_of(model, "PrefixTuning")
        if cache_argument(backbone) is None:
            raise ValueError(
                f"PrefixTuning needs a model whose attention takes a KV cache (cache or past_key_values), and "
                f"{type(backbone).__name__}.forward has none; use PromptTuning or PTuning for this model"
            )
        return backbone

    def hidden(self, dims: ModelDims) -> int:
        return self.encoder_hidden_size or dims.kv_dim

    def build(self, model: nn.Module, dims: ModelDims) -> PrefixEncoder:
        device = backbone_of(model, "PrefixTuning").get_input_embeddings().weight.device
        return PrefixEncoder(self.num_virtual_tokens, dims, self.projection, self.hidden(dims), device)

    def table_count(self, dims: ModelDims) -> int:
        n, t, width = self.num_virtual_tokens, dims.kv_dim, 2 * dims.num_layers * dims.kv_dim
        if not self.projection:
            return n * width
        h = self.hidden(dims)
        return n * t + (t * h + h) + (h * width + width)

    def peft_fields(self, dims: ModelDims) -> dict[str, Any]:
        # peft's prefix config describes the cache: token_dim = d_kv and heads = kv heads under GQA
        return {
            "token_dim": dims.kv_dim,
            "num_attention_heads": dims.kv_heads,
            "prefix_projection": self.projection,
            "encoder_hidden_size": self.hidden(dims),
            "init_weights": None,
        }

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> PrefixTuning:
        projection = bool(config.get("prefix_projection", False))
        return cls(**cls.common_from_peft(config), projection=projection,
                   encoder_hidden_size=config.get("encoder_hidden_size") if projection else None)
