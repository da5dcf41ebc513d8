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

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from graft.core import register, state_of
from graft.methods.prompt import (
    PROMPT_INITS,
    ModelDims,
    PromptLearning,
    VirtualTokens,
    backbone_of,
    cache_argument,
    check_size,
    text_token_ids,
    tokenizer_name,
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

        init: How the prefixes start. "vocab" (default): the keys and values the frozen model itself
            computes for n tokens drawn uniformly from its vocabulary; "text": those of ``init_text``'s
            tokens (cycled or cut to n, as prompt tuning's text init). Both are Li & Liang's
            initialisation from real-word activations (§7.2: it matters most in low-data settings),
            so an untrained prefix looks like n ordinary tokens of context and barely moves the base.
            "random": N(0, 1), peft's initialisation: next to a trained model's own keys and values it
            dominates attention (SmolLM2: held-out loss 6.41 at step 0 instead of 1.28).
            With ``projection`` the MLP's output layer starts at weight 0 with the real activations as
            its bias, so the reparametrised table starts at the same values and still trains.
        init_text: The text for init="text".
        tokenizer: A tokenizer, or the name or path to load one with ``AutoTokenizer``, for init="text".

    Works for models whose backbone takes ``past_key_values`` (decoder-only LMs; also BERT-style
    encoders in transformers 5, which prepend a given cache to their keys and values). A prefix is
    never identity at init. Loading a checkpoint overwrites the table, so ``from_peft`` returns
    init="random" and loading runs no forward pass.
    """

    projection: bool = False
    encoder_hidden_size: int | None = None
    init: str = "vocab"
    init_text: str | None = None
    tokenizer: Any = field(default=None, compare=False)

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
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PrefixTuning init={self.init!r} is not one of {PROMPT_INITS}")
        if self.init == "text":
            if not isinstance(self.init_text, str) or not self.init_text:
                raise ValueError(f"PrefixTuning init='text' needs init_text (a non-empty string), got {self.init_text!r}")
            if self.tokenizer is None:
                raise ValueError("PrefixTuning init='text' needs tokenizer= (a tokenizer, or its name or path)")
        elif self.init_text is not None:
            raise ValueError(f"PrefixTuning init_text is only used with init='text', not init={self.init!r}")

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
        backbone = backbone_of(model, "PrefixTuning")
        embeddings = backbone.get_input_embeddings()
        n = self.num_virtual_tokens
        encoder = PrefixEncoder(n, dims, self.projection, self.hidden(dims), embeddings.weight.device)
        if self.init == "random":
            return encoder
        if self.init == "vocab":
            ids = torch.randint(0, embeddings.weight.shape[0], (n,), dtype=torch.long).tolist()
        else:
            ids = text_token_ids(self.init_text, self.tokenizer, n)
        table = token_key_values(model, backbone, ids, dims)  # (n, 2L·d_kv)
        with torch.no_grad():
            if encoder.transform is None:
                encoder.embedding.weight.copy_(table)
            else:
                encoder.transform[-1].weight.zero_()
                encoder.transform[-1].bias.copy_(table.mean(0) if n > 1 else table[0])
                # every row starts at the mean activation; the rows part as E and the MLP train
        return encoder

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
                   encoder_hidden_size=config.get("encoder_hidden_size") if projection else None, init="random")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "tokenizer": tokenizer_name(self.tokenizer)}


def token_key_values(model: nn.Module, backbone: nn.Module, ids: list[int], dims: ModelDims) -> torch.Tensor:
    """The keys and values the frozen model computes for ``ids`` at positions 0..n-1, as one prefix
    table (n, 2L·d_kv) in :class:`PrefixEncoder`'s layout (Li & Liang's real-word activations).

    Other adapters already on the model are bypassed: the prefix starts from the base's activations.
    """
    from transformers import DynamicCache

    device = backbone.get_input_embeddings().weight.device
    state = state_of(model)
    previous, state.disabled = state.disabled, True
    try:
        with torch.no_grad():
            cache = DynamicCache(config=backbone.config)
            backbone(input_ids=torch.tensor([ids], device=device), **{cache_argument(backbone): cache},
                     use_cache=True)
    finally:
        state.disabled = previous
    n, d = len(ids), dims
    layers = [(cache.layers[i].keys, cache.layers[i].values) for i in range(d.num_layers)]
    kv = torch.stack([t[0] for pair in layers for t in pair])  # (2L, kv_heads, n, head_dim)
    return kv.float().permute(2, 0, 1, 3).reshape(n, 2 * d.num_layers * d.kv_dim)
